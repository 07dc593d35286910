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
from cli_helpers import fails, fingerprint, ok, read_pty, run
from oracles import assert_thin_check

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


# --- issue 16: status as the kernel prints it, metadata-size as thin_metadata_size -------------------------------
@pytest.mark.external
def test_pool_status_is_the_kernels_line_on_thin_restore_metadata(tmp_path: Path) -> None:
    """Metadata written by the real thin_restore; the expected line is built from its raw superblock with the
    kernel's rules (dm-thin.c pool_status; the reserve of dm-thin-metadata.c __set_metadata_reserve, the
    low-water mark of calc_metadata_threshold), independently of thinpool's parser."""
    import struct
    import xml.etree.ElementTree as ET

    from conftest import need_tool, run_tool

    need_tool("thin_restore")
    xml = Path(__file__).resolve().parents[2] / "images" / "f3_snapshot.xml"
    sb = ET.parse(xml).getroot()
    chunk = int(sb.get("data_block_size")) * 512
    nr_data = int(sb.get("nr_data_blocks"))
    p = tmp_path / "pool"
    p.mkdir()
    with open(p / "metadata", "wb") as f:
        f.truncate(8 << 20)
    run_tool("thin_restore", "-i", str(xml), "-o", str(p / "metadata"))
    with open(p / "data", "wb") as f:
        f.truncate(nr_data * chunk)
    devices = []
    for d in sb.iter("device"):
        hi = [int(m.get("origin_block")) for m in d.iter("single_mapping")] + \
             [int(m.get("origin_begin")) + int(m.get("length")) - 1 for m in d.iter("range_mapping")]
        devices += ["--device", f"{d.get('dev_id')}:{(max(hi) + 1) * chunk if hi else chunk}"]
    ok("pool", "rebuild-manifest", p, *devices)
    raw = (p / "metadata").read_bytes()[:4096]
    trans_id, held = struct.unpack_from("<QQ", raw, 48)
    data_nr, data_alloc = struct.unpack_from("<QQ", raw, 64)
    meta_nr, meta_alloc = struct.unpack_from("<QQ", raw, 192)
    used_meta = min(meta_nr, meta_alloc + min(4096, meta_nr // 10))
    want = (f"{trans_id} {used_meta}/{meta_nr} {data_alloc}/{data_nr} {held or '-'} rw discard_passdown "
            f"error_if_no_space - {min(1024, meta_nr // 4)}")
    assert ok("pool", "status", p, "--dmsetup").stdout == f"0 {nr_data * chunk // 512} thin-pool {want}\n"
    st = json.loads(ok("pool", "status", "--json", "-p", p).stdout)
    assert st["dm_status"] == want and st["kernel_used_metadata_blocks"] == used_meta
    assert st["data_percent"] == round(100 * data_alloc / data_nr, 2)
    assert st["metadata_percent"] == round(100 * used_meta / meta_nr, 2)


@pytest.mark.external
@pytest.mark.parametrize("args", [
    "-b 64k -s 1t -m 1000", "-b 64k -s 8064k -m 2 -u k", "-b 64 -s 1g -m 1", "-b 64k -s 1g -m 1 -u g",
    "-b 64k -s 1t -m 1k -u K", "-b 1m -s 1t -m 100 -n", "-b 64k -s 1g -m 1 -u m -n", "-b 4k -s 1t -m 1 -u b",
    "-b 1m -s 10T -m 50 -u G", "-b 64k -s 1t -m 5 -u t"])
def test_metadata_size_matches_thin_metadata_size(args: str) -> None:
    from conftest import need_tool, run_tool

    need_tool("thin_metadata_size")
    want = run_tool("thin_metadata_size", *args.split()).stdout
    got = ok("metadata-size", *args.split()).stdout
    assert got == want.replace("thin_metadata_size - ", "thinpool metadata-size - ")


@pytest.mark.parametrize("args,msg", [("-b 3k -s 1t -m 1", "block size must be 2^^N"),
                                      ("-b 64k -s 64k -m 1", "pool size must be larger than block size"),
                                      ("-b 64k -s 1t", "max thins required!"),
                                      ("-b 64k -s 1t -m 1 -u x", "output unit specifier invalid!")])
def test_metadata_size_errors(args: str, msg: str) -> None:
    assert msg in fails(1, "metadata-size", *args.split()).stderr


@pytest.mark.external
def test_thin_resize_rename_discard_trim(tmp_path: Path) -> None:
    from conftest import need_tool, run_tool

    p = _small_pool(tmp_path, "8M")  # vol: 8M with 3 chunks of "A"
    model = bytearray(b"A" * (3 * CH) + bytes((8 << 20) - 3 * CH))
    r = fails(2, "thin", "resize", "vol", "--size", "128k", "-p", p)
    assert "--force" in r.stderr
    ok("thin", "resize", "vol", "--size", str(CH + 4096), "--force", "-p", p)
    ok("thin", "resize", "vol", "--size", "1M", "-p", p)
    model = model[:CH + 4096] + bytes((1 << 20) - CH - 4096)  # the grown part reads as zeros, the old tail too
    assert ok("thin", "read", "vol", "-p", p).stdout_bytes == bytes(model)
    ok("thin", "rename", "vol", "data", "-p", p)
    fails(5, "thin", "read", "vol", "-p", p)
    ok("thin", "write", "data", "--offset", "256k", "-", "-p", p, input=b"Z" * (2 * CH))
    model[256 << 10:(256 << 10) + 2 * CH] = b"Z" * (2 * CH)
    ok("thin", "discard", "data", "--offset", str(256 * 1024 + 100), "--length", str(2 * CH), "-p", p)
    model[(256 << 10) + CH:(256 << 10) + 2 * CH] = bytes(CH)  # only the whole chunk inside the range
    assert ok("thin", "read", "data", "-p", p).stdout_bytes == bytes(model)
    ok("pool", "trim", p)
    assert ok("thin", "read", "data", "-p", p).stdout_bytes == bytes(model)
    ok("check", p)
    need_tool("thin_check")
    assert_thin_check(str(p / "metadata"))


@pytest.mark.external
@pytest.mark.parametrize("op", ["merge", "rollback"])
def test_merge_and_rollback_against_a_byte_model(tmp_path: Path, op: str) -> None:
    from conftest import need_tool, run_tool

    p = _small_pool(tmp_path, "8M")
    size = 8 << 20
    vol = bytearray(b"A" * (3 * CH) + bytes(size - 3 * CH))
    ok("thin", "snap", "2", "vol", "--name", "snap", "-p", p)
    ok("thin", "snap", "3", "vol", "--name", "other", "-p", p)  # another snapshot of the origin: untouched
    snap, other = bytearray(vol), bytes(vol)
    ok("thin", "write", "vol", "--offset", str(CH), "-", "-p", p, input=b"V" * 5000)
    vol[CH:CH + 5000] = b"V" * 5000
    ok("thin", "write", "snap", "--offset", str(2 * CH + 10), "-", "-p", p, input=b"S" * (2 * CH))
    snap[2 * CH + 10:4 * CH + 10] = b"S" * (2 * CH)
    used_before = json.loads(ok("pool", "status", "--json", "-p", p).stdout)["used_data_blocks"]
    if op == "merge":
        ok("thin", "merge", "snap", "-p", p)
        ids = [d["dev_id"] for d in json.loads(ok("thin", "list", "--json", "-p", p).stdout)]
        assert ids == [1, 3]
        fails(5, "thin", "read", "snap", "-p", p)
    else:
        ok("thin", "rollback", "vol", "snap", "-p", p)
        assert ok("thin", "read", "snap", "-p", p).stdout_bytes == bytes(snap)
    assert ok("thin", "read", "vol", "-p", p).stdout_bytes == bytes(snap)
    assert ok("thin", "read", "other", "-p", p).stdout_bytes == other
    used_after = json.loads(ok("pool", "status", "--json", "-p", p).stdout)["used_data_blocks"]
    assert used_after < used_before  # the origin's own chunk was freed
    # later writes break sharing as usual
    ok("thin", "write", "vol", "-", "-p", p, input=b"W" * 100)
    if op == "rollback":
        assert ok("thin", "read", "snap", "--length", "100", "-p", p).stdout_bytes == bytes(snap[:100])
    ok("check", p)
    need_tool("thin_check")
    assert_thin_check(str(p / "metadata"))


def test_merge_needs_a_live_origin(tmp_path: Path) -> None:
    p = _small_pool(tmp_path, "8M")
    ok("thin", "snap", "2", "vol", "--name", "snap", "-p", p)
    ok("thin", "delete", "vol", "--force", "-p", p)
    before = fingerprint(p)
    assert "was deleted" in fails(1, "thin", "merge", "snap", "-p", p).stderr
    fails(1, "thin", "merge", "snap", "-p", p)
    assert fingerprint(p) == before


def test_quickstart_transcript_replays_as_written(tmp_path: Path) -> None:
    """Every `$ ...` line of the quickstart is a shell command; run in order in a fresh directory they build the
    same pool (devices, contents, mappings)."""
    first = tmp_path / "a"
    first.mkdir()
    out = ok("quickstart", first / "thinpool-demo", "--no-png").stdout
    cmds = [ln[2:] for ln in out.splitlines() if ln.startswith("$ ")]
    assert len(cmds) >= 8 and not any("..." in c for c in cmds)
    replay = tmp_path / "b"
    replay.mkdir()
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    env.pop("THINPOOL_POOL", None)
    demo = str(first / "thinpool-demo")
    for c in cmds:
        c = c.replace(demo, "thinpool-demo")
        r = subprocess.run(["bash", "-o", "pipefail", "-c", c], cwd=replay, env=env, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, (c, r.stderr)

    def view(p: Path) -> list:
        with Pool.open(p, readonly=True) as pool:
            return [(d, pool.device_label(d), pool.device_size(d), pool.device(d).read(0, pool.device_size(d)),
                     [a.tolist() for a in pool.md.mappings(d)[:2]]) for d in pool.list_devices()]

    assert view(replay / "thinpool-demo") == view(first / "thinpool-demo")


def test_binary_read_to_a_terminal_warns(tmp_path: Path) -> None:
    import pty

    p = _small_pool(tmp_path, "8M")
    master, slave = pty.openpty()
    try:
        r = subprocess.run([sys.executable, "-c", MAIN, "thin", "read", "vol", "--length", "16", "-p", str(p)],
                           stdout=slave, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(slave)
        os.close(master)
    assert r.returncode == 0 and "binary data to a terminal" in r.stderr
    # not to a pipe
    r = subprocess.run([sys.executable, "-c", MAIN, "thin", "read", "vol", "--length", "16", "-p", str(p)],
                       capture_output=True, timeout=60)
    assert r.returncode == 0 and r.stderr == b"" and r.stdout == b"A" * 16


def test_metadata_size_over_the_usable_maximum_warns(tmp_path: Path) -> None:
    r = ok("pool", "create", tmp_path / "p", "--size", "1M", "--metadata-size", "17G")
    assert "more than dm-thin can use" in r.stderr
    assert (tmp_path / "p" / "metadata").stat().st_size == 255 * 16320 * 4096


def test_progress_bar_on_a_terminal_for_a_job_that_runs_long(tmp_path: Path) -> None:
    """On a pty, a job that has run longer than $THINPOOL_PROGRESS_DELAY seconds (0 here, so the test does not
    depend on timing) shows its bar however small it is; not on a pipe."""
    import pty

    p = _small_pool(tmp_path, "8M")
    src = tmp_path / "src"
    src.write_bytes(b"P" * (2 * CH))

    def stderr_of(on_pty: bool) -> bytes:
        env = dict(os.environ, THINPOOL_PROGRESS_DELAY="0", COLUMNS="100")
        master, slave = pty.openpty()
        err = slave if on_pty else subprocess.PIPE
        proc = subprocess.Popen([sys.executable, "-c", MAIN, "thin", "write", "vol", str(src), "-p", str(p)],
                                stderr=err, stdout=subprocess.DEVNULL, env=env)
        os.close(slave)
        if on_pty:
            out = read_pty(master, 60)
        else:
            assert proc.stderr is not None
            out = proc.stderr.read()
        assert proc.wait(60) == 0
        os.close(master)
        return out

    assert b"writing device 1" in stderr_of(True)
    assert b"writing device 1" not in stderr_of(False)
