"""Data safety of the pool layer (issue 11): the manifest validated like metadata, hostile pool files refused, the
lock that unlinking cannot defeat, shared readers, a failed commit failing the pool, whole-request space checks,
queue-if-no-space with its timeout, lineage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from pool_helpers import check_pool, pattern

import thinpool
from thinpool.errors import (
    HostNoSpace,
    InvalidArgument,
    ManifestError,
    NoDataSpace,
    NoSpace,
    NotEmptyDirectory,
    PoolFailed,
    PoolLocked,
    StoreIOError,
    UnsafePoolFile,
)
from thinpool.pool import Pool
from thinpool.testing.faulty import FaultPlan, install

CH = 64 * 1024


def _pool(tmp_path: Path, nr_chunks: int = 16, **kw) -> Path:
    path = tmp_path / "pool"
    with Pool.create(path, data_size=nr_chunks * CH, **kw) as p:
        p.create_thin(1, 4 * CH, name="vol").write(0, pattern(2 * CH, 1))
    return path


def _files(path: Path) -> dict[str, bytes]:
    return {n: (path / n).read_bytes() for n in ("metadata", "pool.json") if (path / n).exists()}


# --- the manifest ------------------------------------------------------------------------------------------------
def test_missing_manifest_is_refused_and_never_written_back(tmp_path: Path) -> None:
    path = _pool(tmp_path)
    (path / "pool.json").unlink()
    for ro in (False, True):
        with pytest.raises(ManifestError) as ei:
            Pool.open(path, readonly=ro)
        assert "missing" in str(ei.value) and "rebuild-manifest" in str(ei.value)
    assert not (path / "pool.json").exists()
    # the recovery: sizes given explicitly
    Pool.rebuild_manifest(path, {1: (4 * CH, "vol")})
    with Pool.open(path) as p:
        assert (p.device_name(1), p.device_size(1)) == ("vol", 4 * CH)
        assert p.device(1).read(0, 2 * CH) == pattern(2 * CH, 1)
    with pytest.raises(InvalidArgument, match="is valid"):
        Pool.rebuild_manifest(path, {1: (4 * CH, "vol")})
    with pytest.raises(InvalidArgument, match="missing"):
        Pool.rebuild_manifest(path, {}, force=True)


@pytest.mark.parametrize("edit,what", [
    (lambda m: m["devices"]["1"].update(size="huge"), "size"),
    (lambda m: m["devices"]["1"].update(size=-4096), "size"),
    (lambda m: m["devices"]["1"].update(size=1000), "size"),
    (lambda m: m["options"].update(discard="shred"), "discard"),
    (lambda m: m["options"].update(no_space_timeout=-1), "no_space_timeout"),
    (lambda m: m.update(transaction_id=m["transaction_id"] + 7), "transaction id"),
    (lambda m: m.update(transaction_id="1"), "transaction_id"),
    (lambda m: m["devices"].pop("1"), "no entry"),
    (lambda m: m["devices"]["1"].update(name="a/b"), "'/'"),
    (lambda m: m.update(devices=[]), "devices"),
])
def test_invalid_manifest_is_refused_with_a_recovery_hint(tmp_path: Path, edit, what: str) -> None:
    path = _pool(tmp_path)
    m = json.loads((path / "pool.json").read_text())
    edit(m)
    (path / "pool.json").write_text(json.dumps(m))
    before = _files(path)
    with pytest.raises(ManifestError) as ei:
        Pool.open(path)
    assert what in str(ei.value) and "rebuild-manifest" in str(ei.value)
    assert _files(path) == before


def test_not_json_manifest(tmp_path: Path) -> None:
    path = _pool(tmp_path)
    (path / "pool.json").write_text("{nope")
    with pytest.raises(ManifestError, match="not valid JSON"):
        Pool.open(path, readonly=True)


def test_manifest_written_through_a_unique_temp_file(tmp_path: Path) -> None:
    """A planted pool.json.tmp symlink (the old fixed temp name) is never followed."""
    path = _pool(tmp_path)
    victim = tmp_path / "victim"
    victim.write_text("precious")
    os.symlink(victim, path / "pool.json.tmp")
    with Pool.open(path) as p:
        p.create_thin(2, CH)
    assert victim.read_text() == "precious"
    assert [n for n in os.listdir(path) if n.endswith(".tmp") and n != "pool.json.tmp"] == []


# --- hostile pool files ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["metadata", "data", "pool.json"])
def test_symlinked_pool_file_is_refused(tmp_path: Path, name: str) -> None:
    path = _pool(tmp_path)
    real = tmp_path / f"elsewhere-{name}"
    os.rename(path / name, real)
    os.symlink(real, path / name)
    before = real.read_bytes()
    with pytest.raises(UnsafePoolFile, match="symbolic link"):
        Pool.open(path)
    assert real.read_bytes() == before


def test_fifo_manifest_does_not_hang(tmp_path: Path) -> None:
    path = _pool(tmp_path)
    (path / "pool.json").unlink()
    os.mkfifo(path / "pool.json")
    with pytest.raises(UnsafePoolFile, match="not a regular file"):
        Pool.open(path, readonly=True)


def test_short_data_file_is_refused(tmp_path: Path) -> None:
    path = _pool(tmp_path)
    os.truncate(path / "data", 8 * CH)
    with pytest.raises(UnsafePoolFile, match="fewer than the metadata's 16 chunks"):
        Pool.open(path)


def test_create_refuses_a_directory_with_user_files(tmp_path: Path) -> None:
    d = tmp_path / "mine"
    d.mkdir()
    (d / "data").write_bytes(b"my thesis")
    with pytest.raises(NotEmptyDirectory):
        Pool.create(d, data_size=16 * CH)
    assert (d / "data").read_bytes() == b"my thesis" and sorted(os.listdir(d)) == ["data"]
    with pytest.raises(NotEmptyDirectory, match="root directory|not empty"):
        Pool.create("/", data_size=16 * CH)
    with pytest.raises(InvalidArgument, match="already holds a pool"):
        Pool.create(_pool(tmp_path), data_size=16 * CH)


def test_external_origin_relative_to_the_pool_and_regular_only(tmp_path: Path) -> None:
    path = _pool(tmp_path)
    (path / "base.img").write_bytes(pattern(CH, 7))
    m = json.loads((path / "pool.json").read_text())
    with Pool.open(path) as p:
        p.create_thin(3, CH, origin=str(path / "base.img"))
    m = json.loads((path / "pool.json").read_text())
    m["devices"]["3"]["origin"] = "base.img"  # relative: resolved against the pool, not the cwd
    (path / "pool.json").write_text(json.dumps(m))
    with Pool.open(path, readonly=True) as p:
        assert p.device(3).read(0, CH) == pattern(CH, 7)
    os.mkfifo(tmp_path / "fifo")
    with Pool.open(path) as p, pytest.raises(UnsafePoolFile, match="regular file"):
        p.create_thin(4, CH, origin=str(tmp_path / "fifo"))


# --- locks -------------------------------------------------------------------------------------------------------
def _child_open(path: Path, *args: str) -> str:
    code = ("import sys; from thinpool.pool import Pool; from thinpool.errors import PoolLocked\n"
            "try:\n"
            f"    Pool.open({str(path)!r}, {', '.join(args)}).close(); print('OPENED')\n"
            "except PoolLocked as e: print('LOCKED', e.holder)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_lock_survives_unlinking_lock_files(tmp_path: Path) -> None:
    path = _pool(tmp_path)
    (path / "lock").write_text("")  # an older pool's lock file
    with Pool.open(path):
        (path / "lock").unlink()  # a "stale lock" clean-up
        assert _child_open(path) == "LOCKED writer or reader"
        with pytest.raises(PoolLocked):
            Pool.open(path)


def test_readers_share_the_lock_and_keep_writers_out(tmp_path: Path) -> None:
    path = _pool(tmp_path)
    with Pool.open(path, readonly=True) as r1, Pool.open(path, readonly=True) as r2:
        assert r1.device(1).read(0, CH) == r2.device(1).read(0, CH)
        assert _child_open(path) == "LOCKED writer or reader"
        assert _child_open(path, "readonly=True") == "OPENED"
    with Pool.open(path):
        assert _child_open(path, "readonly=True") == "LOCKED writer"
        assert _child_open(path, "readonly=True", "lock='none'") == "OPENED"


# --- a failing operation changes nothing / fails the pool -------------------------------------------------------
def test_set_transaction_id_out_of_range_changes_nothing(tmp_path: Path) -> None:
    path = _pool(tmp_path)
    before = _files(path)
    for new in (1 << 64, -1):
        with pytest.raises(InvalidArgument, match="out of range"), Pool.open(path) as p:
            p.set_transaction_id(p.md.trans_id, new)
    assert _files(path) == before


def test_exit_with_a_failing_abort_never_commits_the_body(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _pool(tmp_path)
    before = _files(path)
    with pytest.raises(RuntimeError, match="body"):
        with Pool.open(path) as p:
            p.create_thin(2, CH)  # committed on its own
            committed = _files(path)
            assert committed != before
            p.device(2).write(0, b"new")  # not committed

            def bad_abort() -> None:
                raise StoreIOError(what="metadata", op="abort", reason="EIO")

            monkeypatch.setattr(p.md, "abort", bad_abort)
            raise RuntimeError("body")
    assert p.failed and "abort" in (p.failure or "")
    assert _files(path)["pool.json"] == committed["pool.json"]
    with Pool.open(path, readonly=True) as p:  # the failed pool is flagged; the body's write was never committed
        assert p.md.needs_check and p.md.trans_id == 2 and p.device(2).read(0, 3) == bytes(3)


def test_failed_body_that_overwrote_committed_data_fails_the_pool(tmp_path: Path) -> None:
    path = _pool(tmp_path)
    with pytest.raises(RuntimeError):
        with Pool.open(path) as p:
            p.device(1).write(0, b"X" * 100)  # in place, into a committed chunk: no abort can undo it
            raise RuntimeError("later failure")
    assert p.failed
    with Pool.open(path, allow_needs_check=True) as p:
        assert p.md.needs_check
    # nothing in place: a clean abort, the pool stays healthy
    path2 = _pool(tmp_path / "b")
    with pytest.raises(RuntimeError):
        with Pool.open(path2) as p:
            p.device(1).write(3 * CH, b"Y" * 100)  # a new chunk
            raise RuntimeError("later failure")
    assert not p.failed
    with Pool.open(path2) as p:
        assert not p.md.needs_check and p.device(1).read(3 * CH, 100) == bytes(100)


@pytest.mark.parametrize("kind,error", [("eio", StoreIOError), ("enospc", HostNoSpace)])
def test_failed_commit_fails_the_pool(tmp_path: Path, kind: str, error: type) -> None:
    """dm-thin's metadata_operation_failed: abort, needs_check, every later write and flush fails."""
    path = _pool(tmp_path)
    with Pool.open(path) as p:
        install(p, FaultPlan(kind=kind, at=1, ops=("sync",), stores=("data",)))  # the next data sync fails
        p.device(1).write(3 * CH, b"acknowledged")
        with pytest.raises(error) as ei:
            p.commit()
        if kind == "enospc":
            assert isinstance(ei.value, NoSpace) and ei.value.exit_code == 3
        assert p.failed and p.status().mode == "ro" and p.md.needs_check
        for op in (lambda: p.device(1).write(0, b"x"), p.commit, lambda: p.create_thin(5, CH),
                   lambda: p.device(1).discard(0, CH)):
            with pytest.raises(PoolFailed):
                op()
        assert p.device(1).read(0, 2 * CH) == pattern(2 * CH, 1)  # committed data stays readable
    with Pool.open(path, readonly=True) as p:
        assert p.md.needs_check and p.device(1).read(0, 2 * CH) == pattern(2 * CH, 1)
    check_pool(path)


# --- space --------------------------------------------------------------------------------------------------------
def test_check_space_covers_the_whole_request(tmp_path: Path) -> None:
    path = _pool(tmp_path, nr_chunks=4)  # 2 of 4 chunks used
    with Pool.open(path) as p:
        assert p.chunks_needed(1, 0, 4 * CH) == 2
        assert p.chunks_needed(1, CH + 1, 10) == 0
        assert p.blocks_needed(1, [0, 1, 2, 3, 3]) == 2
        p.check_space(1, 0, 4 * CH)
        p.create_snap(2, 1)
        assert p.chunks_needed(1, 0, 4 * CH) == 4  # shared now: a write breaks sharing
        with pytest.raises(NoDataSpace) as ei:
            p.check_space(1, 0, 4 * CH)
        assert ei.value.requested == 4
        assert p.device(1).read(0, 2 * CH) == pattern(2 * CH, 1)


def test_queue_if_no_space_waits_for_a_grown_data_file(tmp_path: Path) -> None:
    """The write waits (on_queue says so); another process grows the data file; the write completes."""
    path = _pool(tmp_path, nr_chunks=2, no_space="queue", no_space_timeout=0)
    queued = threading.Event()
    with Pool.open(path) as p:
        assert p.no_space_timeout == 0  # from the manifest: forever
        p.on_queue = lambda pool, need, timeout: queued.set()
        done: list[BaseException | None] = []

        def writer() -> None:
            try:
                p.device(1).write(2 * CH, pattern(2 * CH, 3))
                done.append(None)
            except BaseException as e:
                done.append(e)

        t = threading.Thread(target=writer)
        t.start()
        assert queued.wait(60)
        code = f"from thinpool.pool import Pool; print(Pool.grow_data_file({str(path)!r}, {8 * CH}))"
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert r.stdout.strip() == "8", r.stderr
        t.join(120)
        assert done == [None]
        assert p.status().total_data_blocks == 8
    with Pool.open(path) as p:
        assert p.device(1).read(2 * CH, 2 * CH) == pattern(2 * CH, 3)
    check_pool(path)


def test_queue_times_out_with_no_space(tmp_path: Path) -> None:
    path = _pool(tmp_path, nr_chunks=2, no_space="queue", no_space_timeout=0.2)
    calls = []
    with Pool.open(path) as p:
        p.on_queue = lambda pool, need, timeout: calls.append((need, timeout))
        with pytest.raises(NoDataSpace):
            p.device(1).write(2 * CH, b"x" * (2 * CH))
        assert calls == [(2, 0.2)]


# --- lineage ------------------------------------------------------------------------------------------------------
def test_lineage_survives_deleting_an_ancestor(tmp_path: Path) -> None:
    path = _pool(tmp_path)
    with Pool.open(path) as p:
        p.create_snap(2, 1, name="s1")
        p.create_snap(3, 2, name="s2")
        assert p.origin_of(1) is None and p.origin_of(3) == 2
        assert p.lineage(3) == [1, 2, 3]
        assert p.created_at(3) is not None and p.created_at(3) >= p.created_at(1)
        p.delete_thin(2)
    with Pool.open(path) as p:
        assert p.origin_of(3) == 2 and not p.is_live(2)
        assert p.lineage(3) == [1, 2, 3]
        assert [a["name"] for a in p.ancestors(3)] == ["vol", "s1"]
        p.create_thin(2, CH, name="reused")  # the id comes back: the history does not change
        assert p.lineage(3) == [1, 2, 3] and p.ancestors(3)[-1]["name"] == "s1"


def test_public_api_exports() -> None:
    assert thinpool.Pool is Pool
    from thinpool import HostNoSpace as H  # noqa: F401
    from thinpool import ThinDevice
    assert H is HostNoSpace and issubclass(thinpool.DeviceNotFound, LookupError)


def test_a_mapping_past_the_data_file_never_grows_it(tmp_path: Path) -> None:
    from thinpool.io.data_store import DataStore

    f = tmp_path / "data"
    f.write_bytes(bytes(4 * CH))
    ds = DataStore(str(f), CH)
    ds.pwrite(3 * CH, b"ok")
    with pytest.raises(StoreIOError, match="past the end of the data file"):
        ds.pwrite(1000 * CH, b"x")  # what a mapping to data block 1000 would do
    assert f.stat().st_size == 4 * CH
    os.truncate(f, 8 * CH)  # grown by another process (grow_data_file): taken up
    ds.pwrite(7 * CH, b"y")
    ds.close()


def test_metadata_snapshot_view_beside_later_changes(tmp_path: Path) -> None:
    path = _pool(tmp_path)
    with Pool.open(path) as p:
        p.create_thin(2, 2 * CH, name="gone").write(0, pattern(CH, 5))
        p.reserve_metadata_snap()
        p.delete_thin(2)  # after the snapshot: the manifest no longer knows device 2
        p.create_thin(3, CH)
        with Pool.open(path, use_metadata_snap=True) as snap:
            assert snap.list_devices() == [1, 2]
            assert snap.device(2).read(0, CH) == pattern(CH, 5) and snap.device_label(2) is None
            assert snap.device(1).read(0, 2 * CH) == pattern(2 * CH, 1)
        p.release_metadata_snap()
