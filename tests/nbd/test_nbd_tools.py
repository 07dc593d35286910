"""The NBD server against real clients: nbdinfo, nbdcopy, qemu-img, qemu-io, fio (nbd engine)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import pytest
from conftest import need_tool, run_tool
from sparse_device import SparseDevice

from thinpool.nbd import ServerThread

pytestmark = pytest.mark.external

MiB = 1 << 20
SIZE = 32 * MiB


@pytest.fixture
def workdir():
    d = tempfile.mkdtemp(prefix="tpnbdt", dir="/tmp")  # short: unix socket paths are limited to 108 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def server(workdir):
    devs = {"disk": SparseDevice(SIZE), "empty": SparseDevice(SIZE), "tiny": SparseDevice(MiB)}
    srv = ServerThread(devs, unix_path=os.path.join(workdir, "nbd.sock"))
    srv.devs = devs
    with srv:
        yield srv


def make_sparse_image(path: str, size: int = SIZE) -> list[tuple[int, int]]:
    """A sparse file with a few data regions (aligned and unaligned); returns the regions written."""
    regions = [(0, 4096), (MiB + 123, 70_000), (5 * MiB, 3 * MiB), (SIZE - 65536, 65536)]
    with open(path, "wb") as f:
        f.truncate(size)
        for off, n in regions:
            f.seek(off)
            f.write(os.urandom(n))
    return regions


def nbdinfo_map(uri: str) -> list[tuple[int, int, int]]:
    out = run_tool("nbdinfo", "--map", uri, timeout=30).stdout
    rows = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 3:
            rows.append((int(parts[0]), int(parts[1]), int(parts[2])))
    return rows


def data_ranges(rows) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for off, n, kind in rows:
        if kind == 0:
            if out and out[-1][0] + out[-1][1] == off:
                out[-1][1] += n
            else:
                out.append([off, n])
    return [(a, b) for a, b in out]


def test_nbdinfo_map_equals_mapped_ranges(server):
    need_tool("nbdinfo")
    dev = server.devs["disk"]
    dev.write(0, b"a" * 10)
    dev.write(3 * MiB + 5, os.urandom(200_000))
    dev.write(SIZE - 1, b"z")
    rows = nbdinfo_map(server.uri("disk"))
    assert sum(n for _o, n, _k in rows) == SIZE
    assert data_ranges(rows) == dev.mapped_ranges()
    assert all(kind in (0, 3) for _o, _n, kind in rows)
    assert nbdinfo_map(server.uri("empty")) == [(0, SIZE, 3)]
    out = run_tool("nbdinfo", "--json", server.uri("disk"), timeout=30).stdout
    info = json.loads(out)
    exp = info["exports"][0]
    assert exp["export-size"] == SIZE and "base:allocation" in exp["contexts"]
    assert exp["can_trim"] and exp["can_zero"] and exp["can_fua"] and exp["can_flush"]
    listed = run_tool("nbdinfo", "--list", "--json", server.uri(), timeout=30).stdout
    assert [e["export-name"] for e in json.loads(listed)["exports"]] == ["disk", "empty", "tiny"]


def test_nbdcopy_round_trips_sparse_image(server, workdir):
    need_tool("nbdcopy", "nbdinfo")
    src, dst = os.path.join(workdir, "src.img"), os.path.join(workdir, "dst.img")
    regions = make_sparse_image(src)
    dev = server.devs["empty"]
    run_tool("nbdcopy", src, server.uri("empty"), timeout=60)
    with open(src, "rb") as f:
        assert dev.getvalue() == f.read()
    # only chunks touched by data got allocated (64 KiB granularity of the test device)
    mapped = sum(n for _o, n in dev.mapped_ranges())
    assert mapped <= sum(n for _o, n in regions) + 8 * 65536
    assert data_ranges(nbdinfo_map(server.uri("empty"))) == dev.mapped_ranges()
    with open(dst, "wb") as f:
        f.truncate(SIZE)
    run_tool("nbdcopy", server.uri("empty"), dst, timeout=60)
    run_tool("cmp", src, dst)
    assert os.stat(dst).st_blocks * 512 < 8 * MiB  # the copy out stayed sparse


def test_qemu_img_convert_compare_map(server, workdir):
    need_tool("qemu-img")
    src, qcow = os.path.join(workdir, "src.img"), os.path.join(workdir, "out.qcow2")
    make_sparse_image(src)
    uri = server.uri("empty")
    info = json.loads(run_tool("qemu-img", "info", "--output=json", uri, timeout=30).stdout)
    assert info["virtual-size"] == SIZE
    run_tool("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, uri, timeout=60)
    run_tool("qemu-img", "compare", "-f", "raw", "-F", "raw", src, uri, timeout=60)
    run_tool("qemu-img", "convert", "-f", "raw", "-O", "qcow2", uri, qcow, timeout=60)
    run_tool("qemu-img", "compare", "-f", "raw", "-F", "qcow2", uri, qcow, timeout=60)
    # a difference is detected (exit 1)
    server.devs["empty"].write(10 * MiB, b"different")
    r = run_tool("qemu-img", "compare", "-f", "raw", "-F", "qcow2", uri, qcow, check=False, timeout=60)
    assert r.returncode == 1, r.stdout + r.stderr
    entries = json.loads(run_tool("qemu-img", "map", "-f", "raw", "--output=json", uri, timeout=30).stdout)
    assert sum(e["length"] for e in entries) == SIZE
    data = [(e["start"], e["length"]) for e in entries if e["data"]]
    merged: list[list[int]] = []
    for s, n in data:
        if merged and merged[-1][0] + merged[-1][1] == s:
            merged[-1][1] += n
        else:
            merged.append([s, n])
    assert [tuple(m) for m in merged] == server.devs["empty"].mapped_ranges()
    assert all(e["zero"] for e in entries if not e["data"])


def test_qemu_io_patterns(server):
    need_tool("qemu-io")
    dev = server.devs["disk"]
    cmds = ["write -P 0xcd 1M 64k", "read -P 0xcd 1M 64k", "write -P 0x11 1000 3000", "read -P 0x11 1000 3000",
            "write -z 1M 64k", "read -P 0 1M 64k", "write -P 0x77 3M 128k", "discard 3M 64k", "read -P 0 3M 64k",
            "read -P 0x77 3136k 64k", "aio_write -P 0x42 8M 4k", "aio_flush", "read -P 0x42 8M 4k",
            "write -f -P 0x99 9M 4k", "read -P 0x99 9M 4k", "flush"]
    args = ["qemu-io", "-f", "raw", server.uri("disk")]
    for c in cmds:
        args += ["-c", c]
    flushes = dev.flushes
    r = run_tool(*args, timeout=60)
    assert "fail" not in (r.stdout + r.stderr).lower(), r.stdout + r.stderr
    assert dev.read(1000, 3000) == b"\x11" * 3000
    assert dev.read(MiB, 65536) == bytes(65536)
    assert dev.read(3 * MiB, 65536) == bytes(65536)
    assert dev.read(3 * MiB + 65536, 65536) == b"\x77" * 65536
    assert dev.discards >= 1 and dev.flushes > flushes
    # a failing verify is reported as such (the check above is not vacuous)
    r = run_tool("qemu-io", "-f", "raw", server.uri("disk"), "-c", "read -P 0x55 1M 4k", check=False, timeout=60)
    assert "Pattern verification failed" in r.stdout + r.stderr


def test_qemu_io_past_the_end_fails_cleanly(server):
    need_tool("qemu-io")
    r = run_tool("qemu-io", "-f", "raw", server.uri("tiny"), "-c", "write -P 1 1M 4k", check=False, timeout=60)
    assert "error" in (r.stdout + r.stderr).lower() or r.returncode != 0
    run_tool("qemu-io", "-f", "raw", server.uri("tiny"), "-c", "write -P 1 0 4k", "-c", "read -P 1 0 4k",
             timeout=60)


def test_fio_nbd_verify(server):
    need_tool("fio")
    if "nbd" not in run_tool("fio", "--enghelp", check=False).stdout:
        pytest.fail("fio was built without the nbd engine")
    r = run_tool("fio", "--name=verify", "--ioengine=nbd", f"--uri={server.uri('disk')}", "--rw=randwrite",
                 "--bs=4k", "--iodepth=16", "--size=8M", "--verify=crc32c", "--do_verify=1",
                 "--verify_fatal=1", "--verify_state_save=0", "--output-format=json", timeout=120, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    text = r.stdout
    res, _ = json.JSONDecoder().raw_decode(text[text.index("{"):])
    job = res["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == 8 * MiB and job["read"]["io_bytes"] == 8 * MiB
    r = run_tool("fio", "--name=seq", "--ioengine=nbd", f"--uri={server.uri('empty')}", "--rw=write",
                 "--bs=1M", "--iodepth=4", "--size=16M", "--verify=md5", "--do_verify=1", "--verify_fatal=1",
                 "--verify_state_save=0",
                 timeout=120, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
