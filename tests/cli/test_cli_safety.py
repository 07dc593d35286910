"""Issue 11 through the command line: a failing command changes nothing (or fails the pool, reported), with the
README's exit status and one stderr line; the acceptance test injects EIO / ENOSPC into every write and sync of
the CLI's write paths."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import fails, fingerprint, ok, run

from thinpool.pool import Pool

CH = 64 * 1024
MAIN = "import sys; from thinpool_cli.main import main; sys.argv[0] = 'thinpool'; main()"


def _small_pool(tmp_path: Path, size: str = "1M", *extra: str) -> Path:
    p = tmp_path / "pool"
    ok("pool", "create", p, "--size", size, *extra)
    ok("thin", "create", "1", "--size", "8M", "--name", "vol", "-p", p)
    ok("thin", "write", "vol", "-", "-p", p, input=b"A" * (3 * CH))
    return p


def test_write_larger_than_the_free_space_changes_nothing(tmp_path: Path) -> None:
    p = _small_pool(tmp_path)  # 16 chunks, 3 used
    src = tmp_path / "big"
    src.write_bytes(b"B" * (3 << 20))
    before = fingerprint(p)
    r = fails(3, "thin", "write", "vol", src, "-p", p)
    assert "no data space" in r.stderr
    r = fails(3, "thin", "write", "vol", "-", "-p", p, input=b"C" * (3 << 20))  # a pipe: spooled, then checked
    assert fingerprint(p) == before
    assert ok("thin", "read", "vol", "--length", str(3 * CH), "-p", p).stdout_bytes == b"A" * (3 * CH)


def test_import_too_big_leaves_no_device(tmp_path: Path) -> None:
    p = _small_pool(tmp_path)
    img = tmp_path / "disk.raw"
    img.write_bytes(os.urandom(2 << 20))
    before = fingerprint(p)
    fails(3, "thin", "import", "7", img, "-p", p)
    assert fingerprint(p) == before
    assert [d["dev_id"] for d in json.loads(ok("thin", "list", "--json", "-p", p).stdout)] == [1]


def test_failed_import_removes_the_new_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from thinpool.errors import StoreIOError
    from thinpool.thin import ThinDevice

    p = _small_pool(tmp_path, "8M")
    img = tmp_path / "disk.raw"
    img.write_bytes(os.urandom(4 * CH))
    real = ThinDevice.write
    calls = []

    def flaky(self, offset, data):
        calls.append(offset)
        if len(calls) == 3:
            raise StoreIOError(what="data", op="write", reason="Input/output error")
        return real(self, offset, data)

    monkeypatch.setattr(ThinDevice, "write", flaky)
    r = fails(1, "thin", "import", "7", img, "-p", p)
    assert "Input/output error" in r.stderr
    monkeypatch.undo()
    assert [d["dev_id"] for d in json.loads(ok("thin", "list", "--json", "-p", p).stdout)] == [1]
    ok("check", p)


def test_import_from_stdin(tmp_path: Path) -> None:
    p = _small_pool(tmp_path, "8M")
    data = bytes(CH) + b"x" * 1000 + bytes(CH)
    ok("thin", "import", "4", "-", "--name", "piped", "-p", p, input=data)
    out = ok("thin", "read", "piped", "-p", p).stdout_bytes
    assert out[:len(data)] == data and not any(out[len(data):])
    assert json.loads(ok("thin", "list", "--json", "-p", p).stdout)[1]["mapped"] == CH


def test_export_to_stdout(tmp_path: Path) -> None:
    p = _small_pool(tmp_path, "8M")
    out = ok("thin", "export", "vol", "-", "-p", p).stdout_bytes
    assert len(out) == 8 << 20 and out[:3 * CH] == b"A" * (3 * CH) and not any(out[3 * CH:])


def test_import_seek_data_error_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    p = _small_pool(tmp_path, "8M")
    img = tmp_path / "disk.raw"
    img.write_bytes(b"z" * CH)
    real = os.lseek

    def lseek(fd, pos, how):
        if how == os.SEEK_DATA:
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, pos, how)

    monkeypatch.setattr(os, "lseek", lseek)
    r = fails(1, "thin", "import", "5", img, "-p", p)
    monkeypatch.undo()
    assert "SEEK_DATA" in r.stderr
    assert [d["dev_id"] for d in json.loads(ok("thin", "list", "--json", "-p", p).stdout)] == [1]


def test_pool_create_never_overwrites_user_files(tmp_path: Path) -> None:
    d = tmp_path / "mine"
    d.mkdir()
    (d / "data").write_bytes(b"thesis")
    r = fails(1, "pool", "create", d, "--size", "1M")
    assert "is not empty" in r.stderr and (d / "data").read_bytes() == b"thesis"
    fails(1, "pool", "create", "--size", "1M", env={"THINPOOL_POOL": "/"})
    r = fails(2, "pool", "create", tmp_path / "x", "--pool", tmp_path / "y", "--size", "1M")
    assert "disagree" in r.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_empty_and_bad_names_refused(tmp_path: Path) -> None:
    p = _small_pool(tmp_path, "8M")
    before = fingerprint(p)
    for name in ("", "a b", "a/b", "x\x01", "12"):
        fails(1, "thin", "create", "3", "--size", "1M", "--name", name, "-p", p)
    assert fingerprint(p) == before
    ok("thin", "create", "3", "--size", "1M", "-p", p)
    rows = json.loads(ok("thin", "list", "--json", "-p", p).stdout)
    assert rows[1]["name"] is None  # unnamed: listed without a name


def test_set_transaction_id_huge_value_is_a_clean_error(tmp_path: Path) -> None:
    p = _small_pool(tmp_path)
    tid = json.loads(ok("pool", "status", "--json", "-p", p).stdout)["transaction_id"]
    before = fingerprint(p)
    r = fails(1, "pool", "set-transaction-id", tid, 1 << 70, "-p", p)
    assert "out of range" in r.stderr
    assert fingerprint(p) == before


def test_repair_refuses_existing_dst_and_locked_pool(tmp_path: Path) -> None:
    src = _small_pool(tmp_path)
    dst = tmp_path / "fixed"
    dst.write_bytes(b"keep me" + bytes(4 << 20))
    r = fails(2, "pool", "repair", src, dst)
    assert "--force" in r.stderr and dst.read_bytes()[:7] == b"keep me"
    ok("pool", "repair", src, dst, "--force")
    live = tmp_path / "live"
    ok("pool", "create", live, "--size", "1M")
    with Pool.open(live):
        before = fingerprint(live)
        r = fails(1, "pool", "repair", src, live, "--force")
        assert "in use" in r.stderr
        assert fingerprint(live) == before


def test_missing_manifest_one_line_and_rebuild(tmp_path: Path) -> None:
    p = _small_pool(tmp_path)
    (p / "pool.json").unlink()
    r = fails(4, "pool", "status", "-p", p)
    assert "rebuild-manifest" in r.stderr
    fails(4, "thin", "write", "1", "-", "-p", p, input=b"x")
    assert not (p / "pool.json").exists()
    ok("pool", "rebuild-manifest", p, "--device", "1:8M:vol")
    assert json.loads(ok("thin", "list", "--json", "-p", p).stdout)[0]["name"] == "vol"


def test_lineage_in_list_and_status(tmp_path: Path) -> None:
    p = _small_pool(tmp_path, "8M")
    ok("thin", "snap", "2", "vol", "--name", "s1", "-p", p)
    ok("thin", "snap", "3", "s1", "--name", "s2", "-p", p)
    ok("thin", "delete", "s1", "--force", "-p", p)
    rows = json.loads(ok("thin", "list", "--json", "-p", p).stdout)
    s2 = [d for d in rows if d["dev_id"] == 3][0]
    assert s2["snapshot_of"] == 2 and s2["snapshot_of_deleted"] and s2["lineage"] == [1, 2, 3]
    assert s2["created_at"].endswith("+00:00")
    text = ok("thin", "list", "-p", p).stdout
    assert "[2]" in text  # a deleted origin in brackets, as lvs
    st = json.loads(ok("pool", "status", "--json", "-p", p).stdout)
    assert [d["snapshot_of"] for d in st["devices"]] == [None, 2]


@pytest.mark.timeout(180)
def test_queue_if_no_space_says_so_and_a_resize_from_another_shell_releases_it(tmp_path: Path) -> None:
    p = tmp_path / "pool"
    ok("pool", "create", p, "--size", "128k", "--queue-if-no-space", "--no-space-timeout", "0")
    ok("thin", "create", "1", "--size", "1M", "--name", "vol", "-p", p)
    env = dict(os.environ, THINPOOL_POOL=str(p))
    w = subprocess.Popen([sys.executable, "-c", MAIN, "thin", "write", "vol", "-"],
                         stdin=subprocess.PIPE, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env)
    try:
        assert w.stdin is not None and w.stderr is not None
        w.stdin.write(b"Q" * (4 * CH))
        w.stdin.close()
        line = w.stderr.readline().decode()
        assert "out of data space" in line and "waits until space is added" in line and "pool resize" in line
        r = subprocess.run([sys.executable, "-c", MAIN, "pool", "resize", "--size", "1M"],
                           capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == 0 and "grew its data file" in r.stderr, r.stderr
        assert w.wait(120) == 0, w.stderr.read()
    finally:
        if w.poll() is None:
            w.kill()
            w.wait()
    assert ok("thin", "read", "vol", "--length", str(4 * CH), "-p", p).stdout_bytes == b"Q" * (4 * CH)
    ok("check", p)


def test_queue_timeout_gives_no_space(tmp_path: Path) -> None:
    p = tmp_path / "pool"
    ok("pool", "create", p, "--size", "128k", "--queue-if-no-space", "--no-space-timeout", "0.2")
    ok("thin", "create", "1", "--size", "1M", "-p", p)
    r = run("thin", "write", "1", "-", "-p", p, input=b"q" * (4 * CH))
    assert r.exit_code == 3
    lines = r.stderr.splitlines()
    assert "waits up to 0.2 s" in lines[0] and lines[1].startswith("thinpool: error: no data space")


# --- acceptance: faults at every write and sync of the CLI's write paths ------------------------------------------
def _state(p: Path) -> tuple:
    """What a user can observe: devices (name, size, content hash), needs_check (the transaction id may move on:
    a failed import that removed its new device took two transactions)."""
    with Pool.open(p, readonly=True, lock="none", allow_needs_check=True) as pool:
        devs = tuple((d, pool.device_label(d), pool.device_size(d),
                      hashlib.sha256(pool.device(d).read(0, pool.device_size(d))).hexdigest())
                     for d in pool.list_devices())
        return devs, pool.md.needs_check, pool.md.nr_data_blocks, pool.md.trans_id


def _commands(tmp: Path) -> dict[str, list[str]]:
    src = tmp / "src.bin"
    src.write_bytes(os.urandom(3 * CH + 100))
    img = tmp / "img.raw"
    with open(img, "wb") as f:
        f.write(os.urandom(CH))
        f.seek(3 * CH)
        f.write(os.urandom(CH // 2))
    return {
        "write": ["thin", "write", "vol", "--offset", "32k", str(src)],
        "import-existing": ["thin", "import", "vol", str(img)],
        "import-new": ["thin", "import", "9", str(img), "--name", "img"],
        "create": ["thin", "create", "5", "--size", "1M"],
        "snap": ["thin", "snap", "6", "vol", "--name", "s"],
        "delete": ["thin", "delete", "old", "--force"],
        "resize": ["pool", "resize", "--size", "4M"],
        "set-transaction-id": ["pool", "set-transaction-id", "TID", "99"],
    }


@pytest.mark.timeout(900)
@pytest.mark.parametrize("kind", ["eio", "enospc"])
def test_faults_at_every_event_of_the_cli_write_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      kind: str) -> None:
    from thinpool.testing.faulty import FaultPlan, install

    base = tmp_path / "base"
    ok("pool", "create", base, "--size", "2M")
    ok("thin", "create", "1", "--size", "1M", "--name", "vol", "-p", base)
    ok("thin", "write", "vol", "-", "-p", base, input=os.urandom(2 * CH))
    ok("thin", "create", "2", "--size", "1M", "--name", "old", "-p", base)
    ok("thin", "write", "old", "-", "-p", base, input=os.urandom(CH))
    with Pool.open(base, readonly=True) as pool:
        tid = pool.md.trans_id
    commands = _commands(tmp_path)
    real_open = Pool.open.__func__  # type: ignore[attr-defined]
    plans: list[FaultPlan] = []

    def faulty_open(cls, *a, **k):
        pool = real_open(cls, *a, **k)
        if not pool.readonly and plans:
            install(pool, plans[-1])
        return pool

    totals = {"ok": 0, "unchanged": 0, "failed": 0}
    for name, args in commands.items():
        args = [str(tid) if a == "TID" else a for a in args]
        work = tmp_path / "work"
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(base, work)
        pre = _state(work)
        plans[:] = [FaultPlan(at=None, kind=kind)]
        monkeypatch.setattr(Pool, "open", classmethod(faulty_open))
        ok(*args, "-p", work)
        monkeypatch.undo()
        post, events = _state(work), plans[-1].events
        assert events > 0 and post != pre, name
        for n in range(1, events + 1):
            shutil.rmtree(work)
            shutil.copytree(base, work)
            plans[:] = [FaultPlan(at=n, kind=kind)]
            monkeypatch.setattr(Pool, "open", classmethod(faulty_open))
            r = run(*args, "-p", work)
            monkeypatch.undo()
            after = _state(work)
            assert "Traceback" not in r.stderr, (name, n, r.stderr)
            if r.exit_code == 0:
                assert after == post, (name, n)
                totals["ok"] += 1
                continue
            lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
            assert len(lines) == 1 and lines[0].startswith("thinpool: error: "), (name, n, r.stderr)
            assert r.exit_code == (3 if kind == "enospc" else 1) or after[1], (name, n, r.exit_code, r.stderr)
            if after[1]:  # failed: needs_check set, the error was reported
                totals["failed"] += 1
            else:
                # a failed import removed its new device: two more transactions, the same devices
                assert after[:3] == pre[:3] and (after[3] == pre[3] or name == "import-new"), (name, n, r.stderr)
                totals["unchanged"] += 1
    print(f"\n[cli faults {kind}] {totals}")
    assert totals["unchanged"] and totals["failed"]
