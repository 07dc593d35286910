"""Round trips against a real one-node Ceph cluster (rbd 16.2.15): thinpool -> rbd import-diff / import, and
rbd export-diff / export -> thinpool, compared byte for byte with ``rbd export`` and ``thinpool thin export``."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys

import pytest
from conftest import REQUIRE_EXTERNAL, need_tool
from rbd_helpers import KiB, MiB, build_chain, device_bytes, ok, pattern

from thinpool.pool import Pool
from thinpool.rbd import scan_image, validate_diff

pytestmark = pytest.mark.external


def rbd_image(ceph, spec: str, tmp_path) -> bytes:
    out = tmp_path / ("export-" + spec.replace("/", "_").replace("@", "_"))
    if out.exists():
        out.unlink()
    ceph.rbd("export", "--no-progress", spec, str(out))
    data = out.read_bytes()
    out.unlink()
    return data


def thin_image(pool, ref: str, tmp_path) -> bytes:
    out = tmp_path / f"thin-{ref}.img"
    ok("thin", "export", ref, out, "--force", "-p", pool)
    data = out.read_bytes()
    out.unlink()
    return data


def ship_chain(ceph, pool, img: str, tmp_path) -> None:
    """s1 in full, then s2, s3 and HEAD incrementally (--from), each through rbd import-diff."""
    ceph.rbd("create", "-s", "1M", f"rbd/{img}")
    prev = None
    for name in ["s1", "s2", "s3", "vol"]:
        f = tmp_path / f"{img}-{name}.diff"
        args = ["export-diff", name, "-o", f, "--force", "-p", pool] + (["--from", prev] if prev else [])
        if name == "vol":
            args.append("--no-to-snap")
        ok(*args)
        ceph.rbd("import-diff", "--no-progress", str(f), f"rbd/{img}")
        prev = name


@pytest.mark.parametrize("chunk", [64 * KiB, 1 * MiB], ids=["64k", "1m"])
def test_snapshot_chain_shipped_incrementally(ceph, image_name, tmp_path, chunk):
    pool = tmp_path / "pool"
    model = build_chain(pool, chunk=chunk)  # discards, write_zeroes, all-zero writes, size not chunk-aligned
    ship_chain(ceph, pool, image_name, tmp_path)
    snaps = json.loads(ceph.rbd("snap", "ls", "--format", "json", f"rbd/{image_name}").stdout)
    assert [s["name"] for s in snaps] == ["s1", "s2", "s3"]
    for name in ["s1", "s2", "s3"]:
        got = rbd_image(ceph, f"rbd/{image_name}@{name}", tmp_path)
        assert got == thin_image(pool, name, tmp_path) == model[name], name
    assert rbd_image(ceph, f"rbd/{image_name}", tmp_path) == model["vol"]
    # what Ceph now says changed between s1 and s2 covers what thinpool says changed
    ext = json.loads(ceph.rbd("diff", "--format", "json", "--from-snap", "s1", f"rbd/{image_name}@s2").stdout)
    assert ext and all(e["offset"] + e["length"] <= len(model["s2"]) for e in ext)
    ceph.rbd("snap", "purge", "--no-progress", f"rbd/{image_name}", check=False)
    ceph.rbd("rm", "--no-progress", f"rbd/{image_name}", check=False)


def test_device_with_an_external_origin(ceph, image_name, tmp_path):
    origin = tmp_path / "origin.img"
    origin.write_bytes(pattern(42, 5 * MiB + 1234))  # shorter than the device, not sector aligned
    pool = tmp_path / "pool"
    model = build_chain(pool, chunk=64 * KiB, origin=str(origin))
    ship_chain(ceph, pool, image_name, tmp_path)
    for name in ["s1", "s2", "s3"]:
        assert rbd_image(ceph, f"rbd/{image_name}@{name}", tmp_path) == model[name], name
    assert rbd_image(ceph, f"rbd/{image_name}", tmp_path) == model["vol"]
    ceph.rbd("snap", "purge", "--no-progress", f"rbd/{image_name}", check=False)
    ceph.rbd("rm", "--no-progress", f"rbd/{image_name}", check=False)


def need_qemu_rbd() -> None:
    """qemu's rbd block driver (package qemu-block-extra): skip locally, fail in CI, when it is missing."""
    need_tool("qemu-img", "qemu-io")
    out = subprocess.run(["qemu-img", "--help"], capture_output=True, text=True).stdout
    formats = next((ln for ln in out.splitlines() if ln.startswith("Supported formats:")), "").split()
    if "rbd" not in formats:
        msg = "qemu-img has no rbd block driver (install qemu-block-extra)"
        if REQUIRE_EXTERNAL:
            pytest.fail(msg + " (THINPOOL_REQUIRE_EXTERNAL=1: CI must not skip)")
        pytest.skip(msg)


def qemu_io(ceph, img: str, *cmds: str) -> None:
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    args.append(f"rbd:rbd/{img}:conf={ceph.conf}")
    p = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "error" not in p.stdout.lower(), p.stdout + p.stderr


@pytest.fixture
def rbd_chain(ceph, image_name, tmp_path):
    """An RBD image written by qemu-io through librbd: snapshots a, b, c with writes, discards, zero writes and a
    resize; returns the image name and the raw image of every snapshot."""
    need_qemu_rbd()
    img = image_name
    ceph.rbd("create", "-s", "6M", f"rbd/{img}")
    qemu_io(ceph, img, "write -P 0x61 0 100k", "write -P 0x62 4092k 8k", "write -z 1M 64k",
            "write -P 0x63 5M 1M")
    ceph.rbd("snap", "create", f"rbd/{img}@a")
    qemu_io(ceph, img, "write -P 0x64 8k 4k", "discard 5M 512k", "write -z 4092k 4k")
    ceph.rbd("snap", "create", f"rbd/{img}@b")
    ceph.rbd("resize", "--no-progress", "-s", "7M", f"rbd/{img}")
    qemu_io(ceph, img, "write -P 0x65 6500k 100k", "discard 0 64k")
    ceph.rbd("snap", "create", f"rbd/{img}@c")
    images = {s: rbd_image(ceph, f"rbd/{img}@{s}", tmp_path) for s in "abc"}
    yield img, images
    ceph.rbd("snap", "purge", "--no-progress", f"rbd/{img}", check=False)
    ceph.rbd("rm", "--no-progress", f"rbd/{img}", check=False)


def test_rbd_export_diff_into_thinpool(ceph, rbd_chain, tmp_path):
    img, images = rbd_chain
    q = tmp_path / "q"
    ok("pool", "create", q, "--size", "64M", "--chunk-size", "64k")
    ok("thin", "create", "1", "--size", "512", "--name", img, "-p", q)
    prev = None
    for s in "abc":
        f = tmp_path / f"{s}.diff"
        args = ["export-diff", "--no-progress"] + (["--from-snap", prev] if prev else []) + [f"rbd/{img}@{s}", str(f)]
        ceph.rbd(*args)
        with open(f, "rb") as fh:
            v = validate_diff(fh)  # Ceph's streams pass thinpool's validator
        assert v.header.to_snap == s and v.header.from_snap == prev
        ok("import-diff", f, img, "-p", q)
        prev = s
    with Pool.open(q, readonly=True) as p:
        for s in "abc":
            assert device_bytes(p, s) == images[s], s
        assert device_bytes(p, img) == images["c"]
    for s in "abc":
        assert thin_image(q, s, tmp_path) == images[s]


def test_export_format_2_to_ceph(ceph, image_name, tmp_path):
    pool = tmp_path / "pool"
    model = build_chain(pool, chunk=64 * KiB)
    f = tmp_path / "vol.rbd2"
    ok("export", "vol", "--export-format", "2", "-o", f, "-p", pool)  # the chain: vol's recorded snapshots
    ceph.rbd("import", "--no-progress", "--export-format", "2", str(f), f"rbd/{image_name}")
    snaps = json.loads(ceph.rbd("snap", "ls", "--format", "json", f"rbd/{image_name}").stdout)
    assert [s["name"] for s in snaps] == ["s1", "s2", "s3"]
    for name in ["s1", "s2", "s3"]:
        assert rbd_image(ceph, f"rbd/{image_name}@{name}", tmp_path) == model[name], name
    assert rbd_image(ceph, f"rbd/{image_name}", tmp_path) == model["vol"]
    ceph.rbd("snap", "purge", "--no-progress", f"rbd/{image_name}", check=False)
    ceph.rbd("rm", "--no-progress", f"rbd/{image_name}", check=False)


def test_export_format_2_from_ceph(ceph, rbd_chain, tmp_path):
    img, images = rbd_chain
    f = tmp_path / "img.rbd2"
    ceph.rbd("export", "--no-progress", "--export-format", "2", f"rbd/{img}", str(f))
    with open(f, "rb") as fh:
        s = scan_image(fh)
    assert [d.header.to_snap for d in s.diffs] == ["a", "b", "c", None]
    q = tmp_path / "q"
    ok("pool", "create", q, "--size", "64M")
    r = ok("import", "--export-format", "2", f, "back", "-p", q, "--json")
    assert [x["name"] for x in json.loads(r.stdout)["snapshots"]] == ["a", "b", "c"]
    with Pool.open(q, readonly=True) as p:
        for name in "abc":
            assert device_bytes(p, name) == images[name], name
        assert device_bytes(p, "back") == rbd_image(ceph, f"rbd/{img}", tmp_path)


def test_round_trip_thinpool_ceph_thinpool_random(ceph, image_name, tmp_path):
    """Random writes, discards and zeroes over 3 snapshots: thinpool -> Ceph -> (rbd export-diff) -> thinpool."""
    rnd = random.Random(7)
    size = 5 * MiB + 512 * 7
    src = tmp_path / "src"
    with Pool.create(src, data_size=64 * MiB, chunk_size=128 * KiB) as p:
        d = p.create_thin(1, size, name="vol")
        for snap in ("r1", "r2", "r3"):
            for _ in range(12):
                off = rnd.randrange(0, size - 1)
                n = min(rnd.randrange(1, 300 * KiB), size - off)
                op = rnd.random()
                if op < 0.6:
                    d.write(off, pattern(rnd.randrange(1 << 30), n))
                elif op < 0.8:
                    d.discard(off, n)
                else:
                    d.write_zeroes(off, n)
            p.create_snap(p.list_devices()[-1] + 1, 1, name=snap)
        want = {s: device_bytes(p, s) for s in ("r1", "r2", "r3")}
    ceph.rbd("create", "-s", "1M", f"rbd/{image_name}")
    prev = None
    for s in ("r1", "r2", "r3"):
        f = tmp_path / f"{s}.diff"
        ok("export-diff", s, "-o", f, "-p", src, *(["--from", prev] if prev else []))
        ceph.rbd("import-diff", "--no-progress", str(f), f"rbd/{image_name}")
        prev = s
    dst = tmp_path / "dst"
    ok("pool", "create", dst, "--size", "64M")
    ok("thin", "create", "1", "--size", "512", "--name", "copy", "-p", dst)
    prev = None
    for s in ("r1", "r2", "r3"):
        f = tmp_path / f"back-{s}.diff"
        ceph.rbd("export-diff", "--no-progress", *(["--from-snap", prev] if prev else []),
                 f"rbd/{image_name}@{s}", str(f))
        ok("import-diff", f, "copy", "-p", dst)
        prev = s
    with Pool.open(dst, readonly=True) as p:
        for s in ("r1", "r2", "r3"):
            assert device_bytes(p, s) == want[s], s
    ceph.rbd("snap", "purge", "--no-progress", f"rbd/{image_name}", check=False)
    ceph.rbd("rm", "--no-progress", f"rbd/{image_name}", check=False)


def test_nbd_route_qemu_img_convert_both_ways(ceph, image_name, tmp_path):
    """The README's route that needs no thinpool code: `thinpool serve` + `qemu-img convert` nbd <-> rbd."""
    need_qemu_rbd()
    pool = tmp_path / "pool"
    model = build_chain(pool, chunk=64 * KiB)
    sock = tmp_path / "tp.sock"
    srv = subprocess.Popen([sys.executable, "-m", "thinpool_cli.serve_cmds", "serve", "--pool", str(pool),
                            "--socket", str(sock), "--export", "vol", "--export", "s2:rw"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(2):
            line = srv.stdout.readline()
            assert line.startswith("serving "), line + srv.stderr.read()
        rbd_spec = f"rbd:rbd/{image_name}:conf={ceph.conf}"
        p = subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", f"nbd+unix:///vol?socket={sock}",
                            rbd_spec], capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        assert rbd_image(ceph, f"rbd/{image_name}", tmp_path) == model["vol"]
        # and back: the RBD image over the s2 device (same size), through NBD
        p = subprocess.run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", rbd_spec,
                            f"nbd+unix:///s2?socket={sock}"], capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
    finally:
        srv.send_signal(signal.SIGTERM)
        try:
            srv.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            srv.kill()
            srv.communicate()
    with Pool.open(pool, readonly=True) as p:
        assert device_bytes(p, "s2") == model["vol"]
    ceph.rbd("rm", "--no-progress", f"rbd/{image_name}", check=False)


def test_pipes_both_ways(ceph, image_name, tmp_path):
    """`thinpool export-diff ... | rbd import-diff - ...` and `rbd export-diff ... - | thinpool import-diff - ...`
    as the README shows them."""
    pool = tmp_path / "pool"
    model = build_chain(pool, chunk=64 * KiB)
    tp = f"{sys.executable} -c 'from thinpool_cli.main import main; main()'"
    ceph.rbd("create", "-s", "1M", f"rbd/{image_name}")
    env = dict(ceph.env)
    for cmd in (f"{tp} export-diff s1 -p {pool} | rbd import-diff --no-progress - rbd/{image_name}",
                f"{tp} export-diff s2 --from s1 -p {pool} | rbd import-diff --no-progress - rbd/{image_name}"):
        p = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, env=env,
                           timeout=300)
        assert p.returncode == 0, p.stderr
    assert rbd_image(ceph, f"rbd/{image_name}@s2", tmp_path) == model["s2"]
    ok("thin", "create", "20", "--size", "512", "--name", "back", "-p", pool)
    for cmd in (f"rbd export-diff --no-progress rbd/{image_name}@s1 - | {tp} import-diff - back "
                f"--snap-prefix back- -p {pool}",
                f"rbd export-diff --no-progress --from-snap s1 rbd/{image_name}@s2 - | {tp} import-diff - back "
                f"--snap-prefix back- -p {pool}"):
        p = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, env=env,
                           timeout=300)
        assert p.returncode == 0, p.stderr
    with Pool.open(pool, readonly=True) as p:
        assert device_bytes(p, "back-s1") == model["s1"]
        assert device_bytes(p, "back-s2") == device_bytes(p, "back") == model["s2"]
    # export-format 2 through pipes, both ways
    img2 = image_name + "-v2"
    for cmd in (f"{tp} export vol --snap s1 --snap s3 -o - -p {pool} | "
                f"rbd import --no-progress --export-format 2 - rbd/{img2}",
                f"rbd export --no-progress --export-format 2 rbd/{img2} - | "
                f"{tp} import --export-format 2 - vol2 --snap-prefix vol2- -p {pool}"):
        p = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, env=env,
                           timeout=300)
        assert p.returncode == 0, p.stderr
    assert rbd_image(ceph, f"rbd/{img2}@s3", tmp_path) == model["s3"]
    with Pool.open(pool, readonly=True) as p:
        assert device_bytes(p, "vol2-s1") == model["s1"]
        assert device_bytes(p, "vol2-s3") == model["s3"]
        assert device_bytes(p, "vol2") == model["vol"]
    for img in (image_name, img2):
        ceph.rbd("snap", "purge", "--no-progress", f"rbd/{img}", check=False)
        ceph.rbd("rm", "--no-progress", f"rbd/{img}", check=False)


def test_resized_device_grow_then_shrink(ceph, image_name, tmp_path):
    """`s` carries each snapshot's size: rbd import-diff grows and shrinks the image to match."""
    pool = tmp_path / "pool"
    want = {}
    with Pool.create(pool, data_size=64 * MiB, chunk_size=64 * KiB) as p:
        d = p.create_thin(1, 3 * MiB, name="vol")
        d.write(100, pattern(1, 2 * MiB))
        p.create_snap(2, 1, name="s1")
        p.resize_device(1, 5 * MiB + 512)
        d.write(5 * MiB - 1000, pattern(2, 1512))
        p.create_snap(3, 1, name="s2")
        p.resize_device(1, 2 * MiB + 1024)
        d.write(2 * MiB, pattern(3, 1024))
        p.create_snap(4, 1, name="s3")
        for s in ("s1", "s2", "s3", "vol"):
            want[s] = device_bytes(p, s)
    assert [len(want[s]) for s in ("s1", "s2", "s3")] == [3 * MiB, 5 * MiB + 512, 2 * MiB + 1024]
    ship_chain(ceph, pool, image_name, tmp_path)
    for s in ("s1", "s2", "s3"):
        assert rbd_image(ceph, f"rbd/{image_name}@{s}", tmp_path) == want[s], s
    ceph.rbd("snap", "purge", "--no-progress", f"rbd/{image_name}", check=False)
    ceph.rbd("rm", "--no-progress", f"rbd/{image_name}", check=False)
