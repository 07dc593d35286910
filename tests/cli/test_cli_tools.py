"""check / dump / restore / ls / delta / rmap / map against the real thin-provisioning-tools, on the golden images
(made by thin_restore) and on pools made by thinpool."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from cli_helpers import (  # noqa: F401
    IMAGE_NAMES,
    IMAGES,
    busy_pool,
    fails,
    file_hash,
    fingerprint,
    ok,
    pool,
    random_pool,
    run,
    unpack_image,
)
from conftest import need_tool, run_tool
from oracles import RUST_CHECK, assert_thin_check, checkers_verdict, run_checker

ALL_LS_FIELDS = ("DEV,MAPPED_BLOCKS,EXCLUSIVE_BLOCKS,SHARED_BLOCKS,MAPPED_SECTORS,EXCLUSIVE_SECTORS,SHARED_SECTORS,"
                 "MAPPED_BYTES,EXCLUSIVE_BYTES,SHARED_BYTES,MAPPED,EXCLUSIVE,SHARED,TRANSACTION,CREATE_TIME,SNAP_TIME")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("images")
    return {n: unpack_image(n, d) for n in IMAGE_NAMES}


def metadata_of(target: Path) -> Path:
    return target / "metadata" if target.is_dir() else target


def targets(images: dict[str, Path], busy: Path) -> list[Path]:
    return [*images.values(), busy]


# --- dump -------------------------------------------------------------------------------------------------------
@pytest.mark.external
def test_dump_equals_thin_dump(images, busy_pool: Path, tmp_path: Path):
    need_tool("thin_dump")
    for t in targets(images, busy_pool):
        md = str(metadata_of(t))
        assert ok("dump", t).stdout == run_tool("thin_dump", md).stdout, t
        assert ok("dump", "-f", "human_readable", t).stdout == \
            run_tool("thin_dump", "-f", "human_readable", md).stdout, t
        assert ok("dump", "--skip-mappings", t).stdout == run_tool("thin_dump", "--skip-mappings", md).stdout, t
    # the image's own recorded thin_dump output, too
    for name, path in images.items():
        assert ok("dump", path).stdout == (IMAGES / f"{name}.thin_dump.xml").read_text()
    md = str(busy_pool / "metadata")
    for dev in ("1", "2", "5"):
        assert ok("dump", "--dev-id", dev, busy_pool).stdout == run_tool("thin_dump", "--dev-id", dev, md).stdout
    assert ok("dump", "-m", busy_pool).stdout == run_tool("thin_dump", "-m", md).stdout
    out = tmp_path / "d.xml"
    ok("dump", "-o", out, "--pool", busy_pool)
    assert out.read_text() == run_tool("thin_dump", md).stdout


def test_dump_json_matches_xml(busy_pool: Path):
    d = json.loads(ok("dump", "--json", busy_pool).stdout)
    xml = ok("dump", busy_pool).stdout
    assert d["superblock"]["transaction"] == int(re.search(r'transaction="(\d+)"', xml).group(1))
    n_runs = xml.count("_mapping ")
    assert sum(len(dev["mappings"]) for dev in d["devices"]) == n_runs
    assert [dev["dev_id"] for dev in d["devices"]] == [1, 2, 5]


# --- ls / delta / rmap ------------------------------------------------------------------------------------------
@pytest.mark.external
def test_ls_equals_thin_ls(images, busy_pool: Path):
    need_tool("thin_ls")
    for t in targets(images, busy_pool):
        md = str(metadata_of(t))
        assert ok("ls", t).stdout == run_tool("thin_ls", md).stdout, t
        assert ok("ls", "-o", ALL_LS_FIELDS, t).stdout == run_tool("thin_ls", "-o", ALL_LS_FIELDS, md).stdout, t
        assert ok("ls", "--no-headers", t).stdout == run_tool("thin_ls", "--no-headers", md).stdout, t
    md = str(busy_pool / "metadata")
    assert ok("ls", "-m", "-o", ALL_LS_FIELDS, busy_pool).stdout == \
        run_tool("thin_ls", "-m", "-o", ALL_LS_FIELDS, md).stdout


def test_ls_json_and_errors(busy_pool: Path):
    rows = json.loads(ok("ls", "--json", "-o", "DEV,EXCLUSIVE_BLOCKS,SHARED_BLOCKS,HIGHEST_BLOCK", busy_pool).stdout)
    assert rows[0]["dev"] == 1 and rows[0]["exclusive_blocks"] + rows[0]["shared_blocks"] > 0
    assert rows[2]["highest_block"] is None
    assert "unknown field 'BOGUS'" in fails(2, "ls", "-o", "DEV,BOGUS", busy_pool).stderr


DELTA_PAIRS = {"f3_snapshot": [(1, 2), (2, 1), (7, 8), (1, 7)],
               "f4_refcount_multilevel": [(1, 10), (10, 1), (1, 2), (10, 3)],
               "f6_snapshots_5000": [(1, 2), (2, 3), (6, 1)],
               "f7_many_devices": [(0, 3), (3, 6), (6, 1197), (12, 0)]}


@pytest.mark.external
def test_delta_equals_thin_delta(images, busy_pool: Path):
    need_tool("thin_delta")
    cases = [(images[n], a, b) for n, pairs in DELTA_PAIRS.items() for a, b in pairs]
    cases += [(busy_pool, 1, 2), (busy_pool, 2, 1), (busy_pool, 1, 5), (busy_pool, 5, 2)]
    for t, a, b in cases:
        md = str(metadata_of(t))
        for verbose in ([], ["--verbose"]):
            want = run_tool("thin_delta", *verbose, "--snap1", str(a), "--snap2", str(b), md).stdout
            assert ok("delta", *verbose, a, b, t).stdout == want, (t, a, b, verbose)
    want = run_tool("thin_delta", "--snap1", "1", "--snap2", "10", str(images["f4_refcount_multilevel"])).stdout
    assert ok("delta", "--snap1", "1", "--snap2", "10", images["f4_refcount_multilevel"]).stdout == want
    md = str(busy_pool / "metadata")
    assert ok("delta", "-m", "--verbose", "vol", "snap", "--pool", busy_pool).stdout == \
        run_tool("thin_delta", "-m", "--verbose", "--snap1", "1", "--snap2", "2", md).stdout


def test_delta_json_and_errors(busy_pool: Path):
    d = json.loads(ok("delta", "1", "2", busy_pool, "--json").stdout)
    kinds = {r["kind"] for r in d["ranges"]}
    assert {"same", "different"} <= kinds
    assert "does not exist" in fails(5, "delta", "1", "77", busy_pool).stderr
    fails(2, "delta", "1", busy_pool)
    fails(2, "delta", "--snap1", "1", "2", "3", busy_pool)


RMAP_REGIONS = [["0..100000"], ["0..3"], ["10..12"], ["1..2"], ["2990..3100"], ["0..10", "3000..3500"],
                ["5000..6000"]]


@pytest.mark.external
def test_rmap_equals_thin_rmap(images, busy_pool: Path):
    need_tool("thin_rmap")
    for t in targets(images, busy_pool):
        md = str(metadata_of(t))
        for regions in RMAP_REGIONS:
            want = run_tool("thin_rmap", *[a for r in regions for a in ("--region", r)], md).stdout
            assert ok("rmap", *regions, t).stdout == want, (t, regions)
    want = run_tool("thin_rmap", "--region", "0..10", "--region", "3000..3500", str(images["f6_snapshots_5000"])).stdout
    assert ok("rmap", "--region", "0..10", "--region", "3000..3500", "--pool", images["f6_snapshots_5000"]).stdout \
        == want


def test_rmap_errors(busy_pool: Path):
    assert "end <= begin" in fails(2, "rmap", "5..3", busy_pool).stderr
    assert "badly formed region" in fails(2, "rmap", "--region", "x..3", busy_pool).stderr
    assert "no regions" in fails(2, "rmap", busy_pool).stderr
    runs = json.loads(ok("rmap", "0..1000", busy_pool, "--json").stdout)
    assert {r["dev_id"] for r in runs} == {1, 2}


# --- check ------------------------------------------------------------------------------------------------------
def check_steps(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if "(warning)" not in ln]


@pytest.mark.external
def test_check_mirrors_thin_check(images, busy_pool: Path):
    need_tool("thin_check")
    for t in targets(images, busy_pool):
        real = run_tool("thin_check", str(metadata_of(t)), check=False)
        ours = run("check", t)
        assert (ours.exit_code, ours.stdout) == (real.returncode, real.stdout), t
        assert check_steps(ours.stderr) == real.stderr.splitlines(), t
        assert run_checker(RUST_CHECK, metadata_of(t)).ok == (ours.exit_code == 0), t  # and the Rust verdict
    assert run("check", "-q", busy_pool).output == ""
    report = json.loads(ok("check", "--json", busy_pool).stdout)
    assert report["ok"] and report["devices"] == 3 and report["errors"] == []


@pytest.mark.external
def test_check_finds_corruption(images, tmp_path: Path):
    need_tool("thin_check")
    bad = tmp_path / "bad.bin"
    shutil.copy(images["f3_snapshot"], bad)
    with open(bad, "r+b") as f:  # damage a bottom-level leaf (block 10)
        f.seek(10 * 4096 + 100)
        f.write(b"\xff\xff")
    real = run_tool("thin_check", str(bad), check=False)
    ours = run("check", bad)
    assert ours.exit_code == real.returncode == 1
    assert not run_checker(RUST_CHECK, bad).ok  # (1.1.0 exits 64 on errors)
    assert ours.stdout == real.stdout  # the superblock is fine: TRANSACTION_ID= and METADATA_FREE_BLOCKS=
    assert "examining mapping tree" in ours.stderr and "checking space map counts" not in ours.stderr
    assert "block 10" in ours.stderr
    report = json.loads(run("check", "--json", bad).stdout)
    assert not report["ok"] and report["errors"][0]["block"] == 10
    assert "metadata corrupt at block 10" in fails(4, "dump", bad).stderr
    # as thin_ls: the default fields come from the device details alone, so they still list; fields that need the
    # mapping trees fail on the damaged leaf
    need_tool("thin_ls")
    assert ok("ls", bad).stdout == run_tool("thin_ls", str(bad)).stdout
    assert run_tool("thin_ls", "-o", "DEV,EXCLUSIVE_BLOCKS", str(bad), check=False).returncode == 1
    assert "metadata corrupt" in fails(4, "ls", "-o", "DEV,EXCLUSIVE_BLOCKS", bad).stderr


@pytest.mark.external
def test_check_clear_needs_check_flag(images, tmp_path: Path):
    need_tool("thin_dump")
    f5 = tmp_path / "f5.bin"
    shutil.copy(images["f5_needs_check_v1"], f5)
    assert 'flags="1"' in ok("dump", f5).stdout
    r = ok("check", "--clear-needs-check-flag", f5)
    assert "cleared needs_check flag" in r.stderr
    assert 'flags="0"' in run_tool("thin_dump", str(f5)).stdout
    assert_thin_check(str(f5))


def test_check_needs_check_on_pool_dir_then_clear(busy_pool: Path):
    from thinpool.io.block_store import FileBlockStore
    from thinpool.metadata.pool_metadata import PoolMetadata

    md = PoolMetadata.open(FileBlockStore(busy_pool / "metadata"))
    md.set_needs_check()
    md.close()
    r = fails(4, "thin", "create", "9", "--size", "1M", "-p", busy_pool)
    assert "needs_check" in r.stderr
    assert json.loads(ok("check", "--json", busy_pool).stdout)["needs_check"] is True
    ok("check", "--clear-needs-check-flag", busy_pool)
    ok("thin", "create", "9", "--size", "1M", "-p", busy_pool)


# --- restore ----------------------------------------------------------------------------------------------------
@pytest.mark.external
def test_restore_passes_thin_check(tmp_path: Path):
    need_tool("thin_check", "thin_dump")
    for name in IMAGE_NAMES:
        out = tmp_path / f"{name}.bin"
        ok("restore", "-i", IMAGES / f"{name}.xml", "-o", out)
        assert_thin_check(out, what=name)
        assert run_tool("thin_dump", str(out)).stdout == (IMAGES / f"{name}.xml").read_text(), name


@pytest.mark.external
def test_restore_round_trip_of_a_thinpool_pool(busy_pool: Path, tmp_path: Path):
    need_tool("thin_check", "thin_dump", "thin_restore")
    xml = tmp_path / "busy.xml"
    ok("dump", busy_pool, "-o", xml)
    out = tmp_path / "copy.bin"
    out.write_bytes(bytes(1 << 20))  # an existing, zeroed target (as thin_restore wants)
    ok("restore", "-i", xml, "-o", out)
    assert_thin_check(str(out))
    assert run_tool("thin_dump", str(out)).stdout == xml.read_text()
    # and what the real thin_restore makes from our dump opens in thinpool the same way
    real = tmp_path / "real.bin"
    real.write_bytes(bytes(1 << 20))
    run_tool("thin_restore", "-i", str(xml), "-o", str(real))
    assert ok("dump", real).stdout == xml.read_text()


@pytest.mark.external
def test_restore_into_a_pool_directory(busy_pool: Path, tmp_path: Path):
    xml = tmp_path / "busy.xml"
    ok("dump", busy_pool, "-o", xml)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    ok("restore", "-i", xml, "-o", fresh)
    assert ok("dump", fresh).stdout == xml.read_text()
    need_tool("thin_check")
    assert_thin_check(str(fresh / "metadata"))
    names = {d["dev_id"] for d in json.loads(ok("thin", "list", "--json", "-p", fresh).stdout)}
    assert names == {1, 2, 5}
    ok("thin", "write", "1", "-", "-p", fresh, input=b"again")  # the restored pool is usable
    assert ok("thin", "read", "1", "-l", "5", "-p", fresh).stdout_bytes == b"again"


def test_restore_errors_change_nothing(busy_pool: Path, tmp_path: Path):
    before = fingerprint(busy_pool)
    bad = tmp_path / "bad.xml"
    bad.write_text("<superblock>")
    assert "could not find attribute: uuid" in fails(1, "restore", "-i", bad, "-o", busy_pool).stderr
    bad.write_text('<superblock uuid="" time="0" transaction="1" data_block_size="128" nr_data_blocks="10">\n'
                   '  <device dev_id="1" mapped_blocks="1" transaction="0" creation_time="0" snap_time="0">\n'
                   '    <single_mapping origin_block="0" data_block="99" time="0"/>\n  </device>\n</superblock>\n')
    assert "mapping beyond end of data device (99 >= 10)" in \
        fails(1, "restore", "-i", bad, "-o", busy_pool, "--force").stderr
    bad.write_text("<superblock uuid='' time='0' transaction='1' data_block_size='128' nr_data_blocks='10'><oops/>"
                   "</superblock>")
    assert "unknown tag" in fails(1, "restore", "-i", bad, "-o", busy_pool, "--force").stderr
    good = IMAGES / "f3_snapshot.xml"
    assert "--force" in fails(2, "restore", "-i", good, "-o", busy_pool).stderr
    assert fingerprint(busy_pool) == before
    small = tmp_path / "small.bin"
    small.write_bytes(bytes(8192))
    assert "too small" in fails(1, "restore", "-i", good, "-o", small).stderr
    assert small.read_bytes() == bytes(8192)
    fails(2, "restore", "-i", tmp_path / "missing.xml", "-o", small)


# --- map --------------------------------------------------------------------------------------------------------
def mappings_from_dump(xml: str) -> dict[int, dict[int, int]]:
    out: dict[int, dict[int, int]] = {}
    dev = None
    for line in xml.splitlines():
        if m := re.search(r'<device dev_id="(\d+)"', line):
            dev = int(m.group(1))
            out[dev] = {}
        elif m := re.search(r'origin_begin="(\d+)" data_begin="(\d+)" length="(\d+)"', line):
            a, d, n = map(int, m.groups())
            out[dev].update({a + i: d + i for i in range(n)})
        elif m := re.search(r'origin_block="(\d+)" data_block="(\d+)"', line):
            out[dev][int(m.group(1))] = int(m.group(2))
    return out


def mappings_from_map(entries: list[dict], chunk: int) -> dict[int, int]:
    out = {}
    pos = 0
    for e in entries:
        assert e["start"] == pos and e["length"] > 0  # qemu-img map: contiguous, no overlaps
        assert set(e) >= {"start", "length", "depth", "present", "zero", "data"}
        pos += e["length"]
        if e["data"] and e["depth"] == 0:
            assert e["present"] and not e["zero"] and e["start"] % chunk == 0 and e["offset"] % chunk == 0
            for i in range(-(-e["length"] // chunk)):
                out[e["start"] // chunk + i] = e["offset"] // chunk + i
        else:
            assert "offset" not in e and e["zero"] and not e["present"]
    return out


def test_map_json_agrees_with_dump(images, busy_pool: Path):
    for t in [images["f3_snapshot"], images["f4_refcount_multilevel"], images["f6_snapshots_5000"], busy_pool]:
        xml = ok("dump", t).stdout
        chunk = int(re.search(r'data_block_size="(\d+)"', xml).group(1)) * 512
        want = mappings_from_dump(xml)
        got = json.loads(ok("map", "--json", t).stdout)
        assert sorted(int(k) for k in got) == sorted(want)
        counts: dict[int, int] = {}
        for m in want.values():
            for d in m.values():
                counts[d] = counts.get(d, 0) + 1
        for dev, entries in got.items():
            assert mappings_from_map(entries, chunk) == want[int(dev)], (t, dev)
            for e in entries:
                if e["data"]:
                    assert e["shared"] == (counts[e["offset"] // chunk] > 1)
    sizes = {d["dev_id"]: d["size"] for d in json.loads(ok("thin", "list", "--json", "-p", busy_pool).stdout)}
    one = json.loads(ok("map", "vol", "--json", "-p", busy_pool).stdout)
    assert isinstance(one, list) and sum(e["length"] for e in one) == sizes[1]


def test_map_text_and_png(busy_pool: Path, tmp_path: Path):
    text = ok("map", "1", "2", "-p", busy_pool).stdout
    assert "device 1 (vol)" in text and "device 2 (snap)" in text
    assert "shared" in text and "exclusive" in text and "hole" in text
    pytest.importorskip("matplotlib")
    png = tmp_path / "map.png"
    ok("map", "--png", png, "-p", busy_pool)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- tool arguments and errors ----------------------------------------------------------------------------------
def test_tools_read_a_bare_metadata_file_and_take_no_lock(busy_pool: Path, tmp_path: Path):
    copy = tmp_path / "meta.bin"
    shutil.copy(busy_pool / "metadata", copy)
    for cmd in (["dump"], ["ls"], ["check"], ["rmap", "0..10"], ["delta", "1", "2"], ["map"]):
        assert ok(*cmd, copy).stdout == ok(*cmd, busy_pool).stdout.replace(str(busy_pool), str(copy)) or \
            cmd == ["map"], cmd
    h = file_hash(copy)
    ok("dump", copy)
    assert file_hash(copy) == h


def test_tool_target_errors(tmp_path: Path):
    for cmd in (["dump"], ["ls"], ["check"], ["rmap", "0..1"], ["map"], ["delta", "1", "2"]):
        assert "no pool at" in fails(1, *cmd, "--pool", tmp_path / "missing").stderr, cmd
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    assert "no pool at" in fails(1, "dump", empty_dir).stderr
    assert "THINPOOL_POOL" in fails(2, "dump").stderr
    junk = tmp_path / "junk.bin"
    junk.write_bytes(bytes(64 * 4096))
    assert "unformatted" in fails(4, "dump", junk).stderr
    r = run("check", junk)
    assert r.exit_code == 1 and r.stdout == ""


@pytest.mark.external
@pytest.mark.parametrize("seed,dev_chunks", [(1, 64), (2, 64), (3, 1024), (4, 1024)])
def test_random_pools_agree_with_the_real_tools(tmp_path: Path, seed: int, dev_chunks: int):
    """Pools built by random writes, snapshots of snapshots, overwrites and deletes: dump, ls, delta and rmap equal
    thin_dump, thin_ls, thin_delta and thin_rmap, and the pool passes thin_check."""
    need_tool("thin_dump", "thin_ls", "thin_delta", "thin_rmap", "thin_check")
    path = tmp_path / "rnd"
    live = random_pool(path, seed, dev_chunks)
    md = str(path / "metadata")
    assert_thin_check(md)
    assert ok("dump", path).stdout == run_tool("thin_dump", md).stdout
    assert ok("ls", "-o", ALL_LS_FIELDS, path).stdout == run_tool("thin_ls", "-o", ALL_LS_FIELDS, md).stdout
    assert ok("rmap", "0..4096", path).stdout == run_tool("thin_rmap", "--region", "0..4096", md).stdout
    assert ok("rmap", "3..40", "100..200", path).stdout == \
        run_tool("thin_rmap", "--region", "3..40", "--region", "100..200", md).stdout
    for a in live[:4]:
        for b in live[-3:]:
            assert ok("delta", "--verbose", a, b, path).stdout == \
                run_tool("thin_delta", "--verbose", "--snap1", str(a), "--snap2", str(b), md).stdout


@pytest.mark.external
def test_damaged_metadata_never_gives_a_traceback_and_check_agrees_with_thin_check(busy_pool: Path,
                                                                                   tmp_path: Path):
    """Bytes of random metadata blocks overwritten: every tool answers with one error line (or a result), never a
    traceback, and `check` passes or fails exactly when the real thin_check does."""
    import random

    need_tool("thin_check")
    orig = (busy_pool / "metadata").read_bytes()
    rng = random.Random(7)
    bad = tmp_path / "damaged.bin"
    for _ in range(15):
        data = bytearray(orig)
        off = rng.randrange(0, 16) * 4096 + rng.choice([0, 8, 16, 24, 32, 40, 100, 1000, 4000])
        data[off:off + 4] = bytes(rng.randrange(256) for _ in range(4))
        bad.write_bytes(bytes(data))
        assert (run("check", bad).exit_code == 0) == checkers_verdict(bad), off
        for args in (["dump"], ["ls", "-o", "DEV,EXCLUSIVE,SHARED"], ["rmap", "0..1000"], ["delta", "1", "2"],
                     ["map"]):
            r = run(*args, bad)
            assert r.exit_code in (0, 1, 4, 5) and "Traceback" not in r.stderr, (off, args)
            if r.exit_code:
                assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("thinpool: error: ")
