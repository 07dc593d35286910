"""rbd diff streams without a cluster: what thinpool writes passes the project's validator and the real, offline
``rbd merge-diff``; round trips inside thinpool; malformed streams are refused whole with the byte offset."""

from __future__ import annotations

import io
import json
import struct

import pytest
from conftest import need_tool
from rbd_cluster import measure
from rbd_helpers import KiB, MiB, build_chain, device_bytes, fails, fingerprint, merge_diff, ok, pattern

from thinpool.errors import InvalidArgument, RbdStreamError
from thinpool.pool import Pool
from thinpool.rbd import DiffWriter, StreamReader, export_diff, import_diff, scan_image, validate_diff
from thinpool.rbd.stream import OBJECT_SIZE, Extent, iter_diff

CHAIN = ["s1", "s2", "s3", "vol"]


@pytest.fixture(scope="module", params=[64 * KiB, 1 * MiB], ids=["64k", "1m"])
def chain(request, tmp_path_factory):
    """A pool with vol and snapshots s1..s3, the model, and the four diffs thinpool exports of it."""
    d = tmp_path_factory.mktemp(f"chain{request.param}")
    pool = d / "pool"
    model = build_chain(pool, chunk=request.param)
    diffs = {}
    prev = None
    for name in CHAIN:
        out = d / f"{name}.diff"
        args = ["export-diff", name, "-o", out, "-p", pool] + (["--from", prev] if prev else [])
        ok(*args)
        diffs[name] = out
        prev = name
    return {"dir": d, "pool": pool, "model": model, "diffs": diffs, "chunk": request.param}


def records(path):
    with open(path, "rb") as f:
        return [r for r in iter_diff(StreamReader(f)) if isinstance(r, Extent)]


def test_streams_pass_own_validator_and_follow_ceph_record_rules(chain):
    size = len(chain["model"]["vol"])
    prev = None
    for name in CHAIN:
        with open(chain["diffs"][name], "rb") as f:
            s = validate_diff(f)
        assert s.header.to_snap == name and s.header.from_snap == prev and s.header.size == size
        recs = records(chain["diffs"][name])
        assert recs, name
        end = 0
        for r in recs:
            assert r.length > 0 and r.offset >= end and r.offset + r.length <= size
            # never across a 4 MiB object boundary (Ceph's diff_iterate is per object)
            assert r.offset // OBJECT_SIZE == (r.offset + r.length - 1) // OBJECT_SIZE
            if r.kind == "w":  # whole chunks, except the last one cut at the size
                assert r.offset % chain["chunk"] == 0
                assert (r.offset + r.length) % chain["chunk"] == 0 or r.offset + r.length == size \
                    or (r.offset + r.length) % OBJECT_SIZE == 0
            end = r.offset + r.length
        prev = name


def test_all_zero_data_travels_as_zero_records(chain):
    # s1 wrote three all-zero chunks at 6 MiB: the full diff carries them as no data at all
    recs = records(chain["diffs"]["s1"])
    for r in recs:
        if r.kind == "w":
            assert not (r.offset <= 6 * MiB < r.offset + r.length)
    with open(chain["diffs"]["s1"], "rb") as f:
        data = f.read()
    for r in recs:
        if r.kind == "w":
            assert any(data[r.data_pos:r.data_pos + r.length])
    # s2 discarded the first chunk(s) s1 had: a z record covers them
    z = [r for r in records(chain["diffs"]["s2"]) if r.kind == "z"]
    assert any(r.offset == 0 and r.length >= chain["chunk"] for r in z)


@pytest.mark.external
def test_rbd_merge_diff_accepts_and_composes_the_chain(chain, tmp_path):
    need_tool("rbd")
    d = chain["diffs"]
    m12 = tmp_path / "m12"
    r = merge_diff(d["s1"], d["s2"], out=m12)
    assert r.returncode == 0, r.stderr
    m123 = tmp_path / "m123"
    r = merge_diff(m12, d["s3"], out=m123)
    assert r.returncode == 0, r.stderr
    m = tmp_path / "mall"
    assert merge_diff(m123, d["vol"], out=m).returncode == 0
    # Ceph's own composition of thinpool's diffs, applied by thinpool, gives s3 (and HEAD)
    with Pool.create(tmp_path / "q", data_size=64 * MiB, chunk_size=chain["chunk"]) as q:
        q.create_thin(1, 512, name="img")
        with open(m123, "rb") as f:
            validate_diff(f)
            f.seek(0)
            import_diff(q, 1, f)
        assert device_bytes(q, "s3") == chain["model"]["s3"]
        assert device_bytes(q, "img") == chain["model"]["s3"]
    with Pool.create(tmp_path / "q2", data_size=64 * MiB, chunk_size=chain["chunk"]) as q:
        q.create_thin(1, 512, name="img")
        with open(m, "rb") as f:
            import_diff(q, 1, f)
        assert device_bytes(q, "img") == chain["model"]["vol"]


def test_import_diff_chain_round_trip_cli(chain, tmp_path):
    q = tmp_path / "q"
    ok("pool", "create", q, "--size", "64M", "--chunk-size", "64k")
    ok("thin", "create", "1", "--size", "1M", "--name", "img", "-p", q)
    for name in CHAIN:
        r = ok("import-diff", chain["diffs"][name], "img", "-p", q, "--json")
        s = json.loads(r.stdout)
        assert s["records"] > 0 and s["bytes_written"] > 0
        assert [(x["name"], x["size"]) for x in s["snapshots"]] == [(name, len(chain["model"][name]))]
    with Pool.open(q, readonly=True) as p:
        for name in ["s1", "s2", "s3"]:
            assert device_bytes(p, name) == chain["model"][name]
        assert device_bytes(p, "img") == chain["model"]["vol"]


def test_stdin_and_stdout(chain, tmp_path):
    r = ok("export-diff", "s2", "--from", "s1", "-p", chain["pool"])
    assert r.stdout_bytes == chain["diffs"]["s2"].read_bytes()
    q = tmp_path / "q"
    ok("pool", "create", q, "--size", "64M")
    ok("thin", "create", "1", "--size", "1M", "--name", "img", "-p", q)
    ok("import-diff", "-", "img", "-p", q, input=chain["diffs"]["s1"].read_bytes())
    ok("import-diff", "-", "img", "-p", q, input=r.stdout_bytes)
    with Pool.open(q, readonly=True) as p:
        assert device_bytes(p, "s2") == chain["model"]["s2"]


def test_export_format_2_round_trip_inside_thinpool(chain, tmp_path):
    f = tmp_path / "vol.rbd2"
    ok("export", "vol", "--export-format", "2", "-o", f, "--snap", "s1", "--snap", "s2", "--snap", "s3",
       "-p", chain["pool"])
    with open(f, "rb") as fh:
        img = scan_image(fh)
    assert [d.header.to_snap for d in img.diffs] == ["s1", "s2", "s3", None]
    q = tmp_path / "q"
    ok("pool", "create", q, "--size", "64M", "--chunk-size", "64k")
    r = ok("import", "--export-format", "2", f, "copy", "--snap-prefix", "copy-", "-p", q, "--json")
    assert [s["name"] for s in json.loads(r.stdout)["snapshots"]] == ["copy-s1", "copy-s2", "copy-s3"]
    with Pool.open(q, readonly=True) as p:
        for name in ["s1", "s2", "s3"]:
            assert device_bytes(p, "copy-" + name) == chain["model"][name]
        assert device_bytes(p, "copy") == chain["model"]["vol"]


# --- malformed streams ----------------------------------------------------------------------------------------
def _stream(size=4 * MiB, recs=(("w", 0, b"x" * 4096), ("z", 65536, 4096)), frm=None, to="t1",
            banner=None) -> bytes:
    b = io.BytesIO()
    w = DiffWriter(b)
    w.header(size=size, from_snap=frm, to_snap=to)
    for kind, off, arg in recs:
        w.write(off, arg) if kind == "w" else w.zero(off, arg)
    w.end()
    data = b.getvalue()
    if banner is not None:
        data = banner + data[12:]
    return data


def _raw(*parts: bytes) -> bytes:
    return b"".join(parts)


def _u64(*v: int) -> bytes:
    return struct.pack(f"<{len(v)}Q", *v)


def _u32s(s: bytes) -> bytes:
    return struct.pack("<I", len(s)) + s


BAD = {
    "wrong banner": (_stream(banner=b"rbd diff v9\n"), 0),
    "v2 banner": (_stream(banner=b"rbd diff v2\n"), 0),
    "not a diff": (b"hello world, not a diff at all", 0),
    "empty": (b"", 0),
    "out of order": (_raw(b"rbd diff v1\n", b"s", _u64(1 << 20), b"w", _u64(8192, 512), b"a" * 512,
                          b"z", _u64(0, 512), b"e"), 12 + 9 + 17 + 512),
    "overlapping": (_raw(b"rbd diff v1\n", b"s", _u64(1 << 20), b"z", _u64(0, 8192), b"z", _u64(4096, 512), b"e"),
                    12 + 9 + 17),
    "past the size": (_raw(b"rbd diff v1\n", b"s", _u64(1 << 20), b"w", _u64((1 << 20) - 512, 1024),
                           b"a" * 1024, b"e"), 21),
    "zero length": (_raw(b"rbd diff v1\n", b"s", _u64(1 << 20), b"z", _u64(0, 0), b"e"), 21),
    "no size": (_raw(b"rbd diff v1\n", b"t", _u32s(b"x"), b"w", _u64(0, 512), b"a" * 512, b"e"), 18),
    "unknown tag": (_raw(b"rbd diff v1\n", b"s", _u64(1 << 20), b"q", _u64(0, 512), b"e"), 21),
    "repeated size": (_raw(b"rbd diff v1\n", b"s", _u64(1 << 20), b"s", _u64(1 << 20), b"e"), 21),
    "trailing data": (_stream() + b"junk", len(_stream())),
}


@pytest.mark.parametrize("case", list(BAD))
def test_malformed_streams_refused_with_offset_nothing_changed(case, tmp_path):
    data, offset = BAD[case]
    with pytest.raises(RbdStreamError) as ei:
        validate_diff(io.BytesIO(data))
    assert ei.value.offset == offset, str(ei.value)
    q = tmp_path / "q"
    ok("pool", "create", q, "--size", "16M")
    ok("thin", "create", "1", "--size", "2M", "--name", "img", "-p", q)
    ok("thin", "write", "img", "-", "-p", q, input=b"keep" * 1000)
    before = fingerprint(q)
    f = tmp_path / "bad.diff"
    f.write_bytes(data)
    r = fails(1, "import-diff", f, "img", "-p", q)
    assert f"at byte {offset}" in r.stderr
    assert fingerprint(q) == before


@pytest.mark.external
@pytest.mark.parametrize("case", ["v2 banner", "out of order", "zero length"])
def test_rbd_merge_diff_refuses_them_too(case, tmp_path):
    """The malformed streams are malformed for Ceph as well (so the cases test the real rules)."""
    need_tool("rbd")
    data, _ = BAD[case]
    a = tmp_path / "a"
    a.write_bytes(data)
    b = tmp_path / "b"
    b.write_bytes(_stream(frm="t1", to="t2", size=1 << 20, recs=()))
    r = merge_diff(a, b, out=tmp_path / "m")
    assert r.returncode != 0


def test_every_truncation_refused_and_nothing_changed(tmp_path):
    data = _stream(recs=(("w", 0, pattern(1, 700)), ("z", 65536, 4096), ("w", 1 << 20, pattern(2, 300))))
    q = tmp_path / "q"
    with Pool.create(q, data_size=16 * MiB) as p:
        p.create_thin(1, 2 * MiB, name="img").write(0, b"keep" * 1000)
    before = fingerprint(q)
    for cut in range(len(data)):
        with pytest.raises(RbdStreamError) as ei:
            validate_diff(io.BytesIO(data[:cut]))
        assert ei.value.offset <= cut
        assert "truncated" in str(ei.value) or cut < 12
    for cut in (len(data) // 2, len(data) - 1):
        f = tmp_path / "cut.diff"
        f.write_bytes(data[:cut])
        r = fails(1, "import-diff", f, "img", "-p", q)
        assert "at byte" in r.stderr
    assert fingerprint(q) == before


def test_missing_from_snapshot_and_existing_to_snapshot(tmp_path):
    q = tmp_path / "q"
    ok("pool", "create", q, "--size", "16M")
    ok("thin", "create", "1", "--size", "2M", "--name", "img", "-p", q)
    before = fingerprint(q)
    f = tmp_path / "a.diff"
    f.write_bytes(_stream(frm="nosuch", to="t2"))
    r = fails(5, "import-diff", f, "img", "-p", q)
    assert "'nosuch' does not exist" in r.stderr
    assert fingerprint(q) == before
    f.write_bytes(_stream(to="img"))
    r = fails(5, "import-diff", f, "img", "-p", q)
    assert "'img' already exists" in r.stderr
    assert fingerprint(q) == before
    f.write_bytes(_stream(size=1000, recs=()))  # rbd allows any size; thin devices are whole sectors
    fails(1, "import-diff", f, "img", "-p", q)
    assert fingerprint(q) == before


def test_not_enough_space_refused_before_anything_changes(tmp_path):
    q = tmp_path / "q"
    ok("pool", "create", q, "--size", "1M", "--chunk-size", "64k")
    ok("thin", "create", "1", "--size", "2M", "--name", "img", "-p", q)
    before = fingerprint(q)
    f = tmp_path / "a.diff"
    f.write_bytes(_stream(size=8 * MiB, recs=(("w", 0, pattern(3, 2 * MiB)),)))
    fails(3, "import-diff", f, "img", "-p", q)
    assert fingerprint(q) == before


def test_writer_refuses_what_readers_reject():
    w = DiffWriter(io.BytesIO())
    w.header(size=1 << 20)
    w.write(4096, b"a")
    for off, n in ((0, 10), (4097, 0), ((1 << 20) - 1, 2)):
        with pytest.raises(InvalidArgument):
            w.zero(off, n)


def test_shrink_and_grow_follow_s(tmp_path):
    q = tmp_path / "q"
    with Pool.create(q, data_size=16 * MiB) as p:
        d = p.create_thin(1, 4 * MiB, name="img")
        d.write(3 * MiB, pattern(9, 4096))
        import_diff(p, 1, io.BytesIO(_stream(size=1 * MiB, recs=(("w", 0, b"y" * 512),), to="small")))
        assert p.device_size(1) == 1 * MiB
        assert device_bytes(p, "small")[:513] == b"y" * 512 + b"\0"
        import_diff(p, 1, io.BytesIO(_stream(size=8 * MiB, recs=(("w", 7 * MiB, b"z" * 512),), frm="small",
                                             to="big")))
        big = device_bytes(p, "big")
        assert len(big) == 8 * MiB and big[3 * MiB:3 * MiB + 4096] == bytes(4096)  # shrunk away, grown as zeros
        assert big[7 * MiB:7 * MiB + 512] == b"z" * 512


def test_bounded_memory_on_a_huge_sparse_device(tmp_path):
    """export-diff and import-diff of a 64 TiB sparse device with a few chunks of data: the cost follows the
    data, not the size (this would need terabytes if anything scaled with the size)."""
    q = tmp_path / "q"
    size = 64 << 40
    with Pool.create(q, data_size=16 * MiB) as p:
        d = p.create_thin(1, size, name="huge")
        for i, off in enumerate((0, 1 << 40, 17 << 40, size - 65536)):
            d.write(off, pattern(i, 65536))
        p.create_snap(2, 1, name="huge-s1")
        d.write(33 << 40, pattern(9, 4096))
        buf = io.BytesIO()
        s = export_diff(p, 2, buf)
        assert s.write_records == 4 and s.data_bytes == 4 * 65536
        inc = io.BytesIO()
        s = export_diff(p, 1, inc, from_id=2)
        assert s.write_records == 1 and s.data_bytes == 65536
        p.create_thin(3, 512, name="copy")
        buf.seek(0)
        import_diff(p, 3, buf, snap_prefix="c-")
        inc.seek(0)
        import_diff(p, 3, inc, snap_prefix="c-")
        assert p.device_size(3) == size
        for off in (0, 1 << 40, 17 << 40, 33 << 40, size - 65536):
            assert p.device(3).read(off, 65536) == p.device(1).read(off, 65536)


def _peak_rss(args: list[str], stdin: bytes | None = None) -> int:
    """Peak RSS (bytes) of one CLI run in a child process (spawned from a small launcher, see rbd_cluster)."""
    import sys

    return measure([sys.executable, "-c", "from thinpool_cli.main import main; main()", *args], stdin=stdin)[1]


def test_rss_does_not_follow_the_device_size(tmp_path):
    """The same 8 MiB of data on a 1 GiB and on a 64 TiB device: export-diff (full and --from) and import-diff
    peak at the same RSS (within 16 MiB), and the 64 TiB stream is no bigger."""
    rss = {}
    for size in (1 << 30, 64 << 40):
        q = tmp_path / f"p{size}"
        with Pool.create(q, data_size=64 * MiB) as p:
            d = p.create_thin(1, size, name="vol")
            for i in range(8):
                d.write(i * (size // 8), pattern(i, MiB))
            p.create_snap(2, 1, name="s1")
            d.write(size // 2 + 4096, pattern(99, 8192))
        full, inc = tmp_path / f"full{size}", tmp_path / f"inc{size}"
        r_full = _peak_rss(["export-diff", "s1", "-o", str(full), "-p", str(q)])
        r_inc = _peak_rss(["export-diff", "vol", "--from", "s1", "-o", str(inc), "-p", str(q)])
        ok("thin", "create", "9", "--size", "512", "--name", "copy", "-p", q)
        r_imp = _peak_rss(["import-diff", "-", "copy", "--snap-prefix", "c-", "-p", str(q)], stdin=full.read_bytes())
        rss[size] = (r_full, r_inc, r_imp, full.stat().st_size)
    small, big = rss[1 << 30], rss[64 << 40]
    print("peak RSS (full, --from, import) and stream bytes, 1 GiB vs 64 TiB:", small, big)
    for a, b in zip(small[:3], big[:3]):
        assert b - a < 16 * MiB, (small, big)
    assert big[3] == small[3]  # same records, same data


def _on_pty(args: list[str]) -> str:
    """The CLI with stderr on a pseudo-terminal; what the terminal got."""
    import os
    import pty
    import subprocess
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cli"))
    from cli_helpers import read_pty

    env = dict(os.environ, COLUMNS="100", TERM="xterm")
    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, "-c", "from thinpool_cli.main import main; main()", *args], stdin=slave,
                         stdout=subprocess.DEVNULL, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    out = read_pty(master, 60)
    p.wait(timeout=120)
    os.close(master)
    assert p.returncode == 0, out
    return out.decode(errors="replace")


def test_progress_bars_on_a_terminal_only(tmp_path):
    q = tmp_path / "q"
    with Pool.create(q, data_size=256 * MiB) as p:
        d = p.create_thin(1, 1 << 30, name="vol")
        for i in range(40):  # 80 MiB of data: over the bars' 64 MiB threshold
            d.write(i * 24 * MiB, pattern(i, 2 * MiB))
    f = tmp_path / "vol.diff"
    seen = _on_pty(["export-diff", "vol", "-o", str(f), "-p", str(q)])
    assert "export-diff vol" in seen
    ok("thin", "create", "2", "--size", "512", "--name", "copy", "-p", q)
    seen = _on_pty(["import-diff", str(f), "copy", "--snap-prefix", "c-", "-p", str(q)])
    assert "import-diff into copy" in seen
    r = ok("export-diff", "vol", "--from", "c-vol", "-p", q, "-o", tmp_path / "x.diff")
    assert "export-diff vol" not in r.stderr  # not a terminal: one summary line only


def test_export_format_2_malformed_refused_nothing_changed(chain, tmp_path):
    f = tmp_path / "vol.rbd2"
    ok("export", "vol", "-o", f, "--snap", "s1", "--snap", "s2", "-p", chain["pool"])
    data = f.read_bytes()
    q = tmp_path / "q"
    ok("pool", "create", q, "--size", "64M")
    ok("thin", "create", "1", "--size", "1M", "--name", "keep", "-p", q)
    before = fingerprint(q)
    bad = tmp_path / "bad.rbd2"
    for cut in (0, 5, 13, 60, 120, len(data) // 2, len(data) - 1):
        bad.write_bytes(data[:cut])
        r = fails(1, "import", "--export-format", "2", bad, "img", "-p", q)
        assert "export-format 2 stream at byte" in r.stderr
    # a broken chain: the second diff's from-snapshot renamed
    with open(f, "rb") as fh:
        img = scan_image(fh)
    second = img.diffs[1].start
    i = data.index(b"f", second + 12)
    broken = bytearray(data)
    assert broken[i + 13:i + 15] == b"s1"
    broken[i + 13:i + 15] = b"sX"
    bad.write_bytes(bytes(broken))
    r = fails(1, "import", "--export-format", "2", bad, "img", "-p", q)
    assert "starts at snapshot 'sX', expected 's1'" in r.stderr
    # names that are taken
    r = fails(5, "import", "--export-format", "2", f, "keep", "-p", q)
    ok("thin", "create", "2", "--size", "1M", "--name", "s2", "-p", q)
    before = fingerprint(q)
    r = fails(5, "import", "--export-format", "2", f, "img", "-p", q)
    assert "'s2' already exists" in r.stderr
    assert fingerprint(q) == before
    ok("import", "--export-format", "2", f, "img", "--snap-prefix", "img-", "-p", q)
    with Pool.open(q, readonly=True) as p:
        assert device_bytes(p, "img-s1") == chain["model"]["s1"]
        assert device_bytes(p, "img-s2") == chain["model"]["s2"]
        assert device_bytes(p, "img") == chain["model"]["vol"]


def test_cli_usage_errors(chain, tmp_path):
    out = tmp_path / "x.diff"
    out.write_bytes(b"keep")
    from rbd_helpers import run

    r = run("export-diff", "vol", "-o", out, "-p", chain["pool"])
    assert r.exit_code == 2 and "--force" in r.stderr
    assert out.read_bytes() == b"keep"
    r = run("import", "--export-format", "2", "-", "-p", chain["pool"], input=b"")
    assert r.exit_code == 2 and "NAME is required" in r.stderr
    fails(5, "export-diff", "nosuch", "-o", tmp_path / "y.diff", "-p", chain["pool"])
    assert not (tmp_path / "y.diff").exists()  # a failed export leaves no file behind
    fails(1, "export-diff", "vol", "--from", "vol", "-o", tmp_path / "y.diff", "-p", chain["pool"])
    assert not (tmp_path / "y.diff").exists()


def test_grown_range_reads_zeros_even_over_an_old_partial_chunk(tmp_path):
    with Pool.create(tmp_path / "q", data_size=16 * MiB) as p:
        d = p.create_thin(1, 128 * KiB, name="img")
        d.write(0, pattern(5, 128 * KiB))
        p.resize_device(1, 64 * KiB + 512)  # the chunk at 64 KiB stays mapped, its tail hidden
        import_diff(p, 1, io.BytesIO(_stream(size=128 * KiB, recs=(), to="grown")))
        got = device_bytes(p, "grown")
        assert got[:64 * KiB + 512] == pattern(5, 128 * KiB)[:64 * KiB + 512]
        assert got[64 * KiB + 512:] == bytes(64 * KiB - 512)


def test_export_default_chain_from_recorded_origins(chain, tmp_path):
    """Without --snap, the snapshots are the devices the pool records as snapshots of DEV, oldest first."""
    f = tmp_path / "vol.rbd2"
    ok("export", "vol", "-o", f, "-p", chain["pool"])
    with open(f, "rb") as fh:
        assert [d.header.to_snap for d in scan_image(fh).diffs] == ["s1", "s2", "s3", None]
    # a snapshot of a snapshot is not in vol's chain; s1's own chain is that snapshot
    with Pool.open(chain["pool"]) as p:
        p.create_snap(50, p.find_device("s1"), name="s1-child")
        try:
            from thinpool.rbd import snapshot_chain

            assert snapshot_chain(p, 1) == [p.find_device(n) for n in ("s1", "s2", "s3")]
            assert snapshot_chain(p, p.find_device("s1")) == [50]
        finally:
            p.delete_thin(50)
    # after an import, the snapshots it made are the chain again (round trip without --snap)
    q = tmp_path / "q"
    ok("pool", "create", q, "--size", "64M")
    ok("import", f, "copy", "--snap-prefix", "c-", "-p", q)
    g = tmp_path / "copy.rbd2"
    ok("export", "copy", "-o", g, "-p", q)
    with open(g, "rb") as fh:
        assert [d.header.to_snap for d in scan_image(fh).diffs] == ["c-s1", "c-s2", "c-s3", None]


def test_v2_protection_record_is_one_byte_whatever_its_length_says():
    """Pacific announces 8 bytes for `p` and writes 1 (docs/ceph-rbd.md): read exactly one."""
    from thinpool.rbd.stream import DiffHeader

    for announced in (1, 8):
        raw = _raw(b"rbd diff v2\n", b"t", _u64(6), _u32s(b"sn"), b"p", _u64(announced), b"\x01",
                   b"s", _u64(8), _u64(1 << 20), b"z", _u64(16), _u64(0, 4096), b"e")
        recs = list(iter_diff(StreamReader(io.BytesIO(raw)), 2))
        assert recs[0] == DiffHeader(from_snap=None, to_snap="sn", size=1 << 20, protected=True)
        assert recs[1] == Extent("z", 0, 4096)


def test_io_failure_while_applying_changes_nothing(tmp_path, monkeypatch):
    """A valid stream whose second write fails (an I/O error): the open transaction is dropped, the size is the
    old one, no snapshot is made; the metadata and pool.json are as before."""
    from thinpool.errors import StoreIOError
    from thinpool.thin import ThinDevice

    q = tmp_path / "q"
    with Pool.create(q, data_size=16 * MiB) as p:
        p.create_thin(1, 1 * MiB, name="img").write(0, b"keep" * 1000)
    before = fingerprint(q)
    data = _stream(size=4 * MiB, recs=(("w", 1 * MiB, pattern(1, 70000)), ("w", 3 * MiB, pattern(2, 5000))))
    real = ThinDevice.write
    calls = []

    def flaky(self, offset, buf):
        calls.append(offset)
        if len(calls) == 2:
            raise StoreIOError(what="data", op="write", reason="injected")
        return real(self, offset, buf)

    monkeypatch.setattr(ThinDevice, "write", flaky)
    with pytest.raises(StoreIOError):
        with Pool.open(q) as p:
            import_diff(p, 1, io.BytesIO(data))
    monkeypatch.undo()
    after = fingerprint(q)
    assert after["metadata"] == before["metadata"] and after["pool.json"] == before["pool.json"]
    with Pool.open(q, readonly=True) as p:
        assert p.device_size(1) == 1 * MiB and p.list_devices() == [1]
        assert p.device(1).read(0, 4000) == b"keep" * 1000
