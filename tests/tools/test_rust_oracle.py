"""The Rust thin-provisioning-tools 1.1.0 (pdata_tools) as the second oracle beside the C++ 0.9.0 tools.

thinpool's tools stay byte-for-byte equal to C++ 0.9.0's (the reference). Each Rust tool is compared with thinpool on
the same metadata, and where its output differs from 0.9.0's only in form, the difference is written down here and
the comparison normalises exactly that:

- thin_check: the same verdicts on what thinpool writes; METADATA_FREE_BLOCKS= is the real free count (0.9.0 prints
  the metadata blocks minus the superblock; thinpool prints 0.9.0's, and ``check --json`` the real count); errors
  exit 64, not 1. Stricter than 0.9.0: data reference counts and leaks (thinpool too). Laxer than the kernel: the
  superblock's magic and blocknr are not checked (thinpool and the kernel's sb_check refuse them).
- thin_dump: no ``flags`` attribute when the flags are 0, no newline at the end, and a subtree shared by several
  devices written once as ``<def name="BLOCK">`` at the top with ``<ref name="BLOCK"/>`` in each device (its runs
  end at the shared leaf's edges).
- thin_ls: a zero size in a human-readable column is ``0b`` (0.9.0 and thinpool: ``0``).
- thin_delta: no newline at the end; with ``--verbose``, adjacent thin blocks of the same kind are merged into one
  range even where their data blocks are not consecutive (src/thin/delta_visitor.rs joins runs on thin_begin alone),
  so only the first block of such a range has the data block written; 0.9.0 and thinpool split the range there.
- thin_rmap: the same lines, ordered by (data begin, data end, thin device) rather than 0.9.0's order (thinpool's
  ``rmap --order sorted`` prints exactly 1.1.0's).
- thin_restore / thin_repair: what they write from thinpool's dump / metadata opens in thinpool with the same dump,
  except that both write needs_check clear and version 2 (thin_restore 0.9.0 and thinpool's restore keep the XML's;
  `thinpool pool repair` writes a fresh superblock too), and thin_repair 1.1.0 fails on a pool without devices ("no
  compatible roots found"; 0.9.0 and `thinpool pool repair` repair it). thinpool restores 1.1.0's XML (<def>/<ref>).
"""

from __future__ import annotations

import random
import re
import shutil
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from oracles import (
    CXX_CHECK,
    RUST,
    RUST_CHECK,
    RUST_TOOLS,
    assert_thin_check,
    checkers_verdict,
    collect,
    need_tool,
    run_checker,
    run_tool,
    tool_path,
)

from thinpool.io.block_store import FileBlockStore
from thinpool.metadata.pool_metadata import PoolMetadata
from thinpool.pool import Pool

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cli"))
from cli_helpers import random_pool  # noqa: E402

pytestmark = pytest.mark.external

REPO = Path(__file__).resolve().parent.parent.parent
IMAGES = REPO / "images"
IMAGE_NAMES = sorted(p.name[:-len(".bin.gz")] for p in IMAGES.glob("*.bin.gz"))
CH = 64 * 1024
ALL_LS_FIELDS = ("DEV,MAPPED_BLOCKS,EXCLUSIVE_BLOCKS,SHARED_BLOCKS,MAPPED_SECTORS,EXCLUSIVE_SECTORS,SHARED_SECTORS,"
                 "MAPPED_BYTES,EXCLUSIVE_BYTES,SHARED_BYTES,MAPPED,EXCLUSIVE,SHARED,TRANSACTION,CREATE_TIME,SNAP_TIME")


def rust(name: str) -> str:
    return RUST + name


def tp(*args: object) -> str:
    """thinpool's CLI in process; its stdout (exit 0 required)."""
    from click.testing import CliRunner

    from thinpool_cli.main import cli
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert r.exit_code == 0, (args, r.output)
    return r.stdout


# --- pools ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pools(tmp_path_factory) -> dict[str, tuple[Path, list[int]]]:
    """Metadata files to compare on: the golden images and random pools (one with multi-level shared trees)."""
    import gzip

    base = tmp_path_factory.mktemp("rust-oracle")
    out: dict[str, tuple[Path, list[int]]] = {}
    for name in IMAGE_NAMES:
        dest = base / f"{name}.bin"
        with gzip.open(IMAGES / f"{name}.bin.gz", "rb") as src, open(dest, "wb") as dst:
            shutil.copyfileobj(src, dst)
        md = PoolMetadata.open(FileBlockStore(dest, readonly=True), readonly=True, space_maps=False)
        try:
            devs = sorted(md.device_ids())
        finally:
            md.close()
        out[name] = (dest, devs)
    for seed, chunks in ((1, 64), (3, 1024), (4, 1024)):
        live = random_pool(base / f"rnd{seed}", seed, chunks)
        out[f"rnd{seed}"] = (base / f"rnd{seed}" / "metadata", sorted(live))
    return out


# --- the oracle helper itself ------------------------------------------------------------------------------------
def test_need_tool_finds_the_rust_tools_and_skips_or_fails_without_them(monkeypatch, tmp_path) -> None:
    need_tool(rust("thin_check"), rust("thin_dump"), rust("thin_ls"), rust("thin_delta"), rust("thin_rmap"),
              rust("thin_restore"), rust("thin_repair"))
    assert tool_path(rust("thin_check")) == str(RUST_TOOLS / "thin_check")
    assert run_tool(rust("thin_check"), "-V").stdout.strip() == "1.1.0"
    assert run_tool("thin_check", "-V").stdout.strip() == "0.9.0"
    import oracles
    monkeypatch.setattr(oracles._conftest, "RUST_TOOLS", tmp_path)  # an empty directory: no Rust tools
    assert tool_path(rust("thin_check")) is None
    want = pytest.fail.Exception if oracles._conftest.REQUIRE_EXTERNAL else pytest.skip.Exception
    with pytest.raises(want, match="rust:thin_check"):
        need_tool(rust("thin_check"))


def _leaky_pool(path: Path) -> Path:
    """A pool whose data space map counts one reference to a free block: 0.9.0 passes it, 1.1.0 does not."""
    with Pool.create(path, data_size=64 << 20) as pool:
        pool.create_thin(1, 8 << 20).write(0, b"A" * (1 << 20))
    meta = path / "metadata"
    md = PoolMetadata.open(FileBlockStore(meta))
    md.data_sm.inc(500)
    md.commit()
    md.close()
    return meta


def test_the_background_rust_check_reports_what_only_it_rejects(tmp_path) -> None:
    """assert_thin_check passes the C++ verdict at once and the Rust one at the test's end: a Rust-only rejection
    is reported (with both outputs), and a file changed after the call is judged as it was at the call."""
    meta = _leaky_pool(tmp_path / "p")
    assert collect(wait=True) == []
    assert_thin_check(meta)  # C++ 0.9.0 does not see the leak
    assert checkers_verdict(meta) is True  # 0.9.0's verdict; 1.1.0 must agree, and does not
    meta.write_bytes(b"")  # too late to matter: the Rust checks run on copies
    failures = collect(wait=True)
    assert len(failures) == 2, failures
    assert all("1 data blocks have leaked." in f and "--- thin_check exit 0" in f for f in failures)
    assert "did not accept it" in failures[0] and "disagrees with thin_check 0.9.0, which accepted it" in failures[1]


# --- thin_check --------------------------------------------------------------------------------------------------
def test_thin_check_both_pass_and_agree_on_the_transaction_and_free_blocks(pools) -> None:
    """1.1.0's METADATA_FREE_BLOCKS is the metadata space-map root's nr_blocks - nr_allocated (the kernel's free
    count, as in `dmsetup status`); thinpool's `check --json` counts the zero entries of the bitmaps. They differ
    only where the root's nr_allocated disagrees with its bitmaps: in the golden images thin_restore 0.9.0 counted
    its spare empty leaf (block 8) in nr_allocated but not in the bitmap when no device uses it (f1: 10 vs 9);
    never in what thinpool writes."""
    import json

    for name, (meta, _) in pools.items():
        ours = json.loads(tp("check", "--json", meta))
        cxx, rs = run_checker(CXX_CHECK, meta), run_checker(RUST_CHECK, meta)
        assert cxx.ok and rs.ok and not cxx.odd_stderr() and not rs.odd_stderr(), (name, cxx, rs)
        assert tp("check", meta) == cxx.stdout, name  # thinpool prints 0.9.0's lines
        md = PoolMetadata.open(FileBlockStore(meta, readonly=True), readonly=True, space_maps=False)
        root = md.sb.metadata_sm_root
        md.close()
        assert rs.stdout == (f"TRANSACTION_ID={ours['transaction_id']}\n"
                             f"METADATA_FREE_BLOCKS={root.nr_blocks - root.nr_allocated}\n"), name
        counted = ours["metadata_free_blocks"]
        assert counted - (root.nr_blocks - root.nr_allocated) in ((0,) if name.startswith("rnd") else (0, 1)), name


def _restamp_superblock(meta: Path, offset: int, value: int) -> None:
    import struct

    from thinpool.checksum import BlockType, stamp
    with open(meta, "r+b") as f:
        buf = bytearray(f.read(4096))
        struct.pack_into("<Q", buf, offset, value)
        stamp(buf, BlockType.SUPERBLOCK)
        f.seek(0)
        f.write(buf)


def _base_pool(path: Path) -> tuple[Path, int]:
    with Pool.create(path, data_size=64 << 20) as pool:
        pool.create_thin(1, 8 << 20).write(0, b"A" * (1 << 20))
        pool.create_snap(2, 1)
        leaf = pool.md.device_root(1)
    return path / "metadata", leaf


@pytest.mark.parametrize("damage", ["data_leak", "data_count_raised", "data_count_lowered", "metadata_leak",
                                    "metadata_count_raised", "sb_magic", "sb_blocknr"])
def test_check_verdicts_on_damage_classes(tmp_path, damage: str) -> None:
    """What each checker says about one kind of damage, and who is right:

    - space-map counts: 1.1.0 and thinpool reject every mismatch (0.9.0 misses the data ones). 1.1.0 calls only a
      count of 1 on an unreferenced block a leak (non-fatal); a count above the references of a used block is a
      fatal "Bad reference count" to it, a (repairable) leak to thinpool and to 0.9.0 (metadata). Above the real
      count the block can never be freed, but no data is at risk: thinpool keeps 0.9.0's classification, so with
      --ignore-non-fatal-errors only 1.1.0 fails those two.
    - superblock magic or blocknr wrong under a valid checksum: both tools accept it, thinpool refuses it as the
      kernel's sb_check does (-EILSEQ / -ENOTBLK): thinpool is right.
    """
    import numpy as np

    meta, leaf = _base_pool(tmp_path / "p")
    if damage.startswith("sb_"):
        _restamp_superblock(meta, 32 if damage == "sb_magic" else 8, 12345 if damage == "sb_magic" else 7)
    else:
        md = PoolMetadata.open(FileBlockStore(meta))
        mapped = int(md.mappings(1)[1][0])  # count 1: the leaf is shared with the snapshot, not the block
        if damage == "data_leak":
            md.data_sm.inc(500)
        elif damage == "data_count_raised":
            md.data_sm.inc(mapped)
        elif damage == "data_count_lowered":
            md.data_sm.dec(mapped)
        elif damage == "metadata_leak":
            md.meta_disk.core.inc(int(np.flatnonzero(md.meta_disk.core.counts == 0)[-1]))
        else:
            md.meta_disk.core.inc(leaf)
        md.commit()
        md.close()
    cxx, rs = run_checker(CXX_CHECK, meta), run_checker(RUST_CHECK, meta)
    ours = tp_exit("check", meta)
    want = {  # (C++ ok, Rust ok, thinpool ok), then the same with --ignore-non-fatal-errors
        "data_leak": ((True, False, False), (True, True, True)),
        "data_count_raised": ((True, False, False), (True, False, True)),
        "data_count_lowered": ((True, False, False), (True, False, False)),
        "metadata_leak": ((False, False, False), (True, True, True)),
        "metadata_count_raised": ((False, False, False), (True, False, True)),
        "sb_magic": ((True, True, False), (True, True, False)),
        "sb_blocknr": ((True, True, False), (True, True, False)),
    }[damage]
    assert (cxx.ok, rs.ok, ours == 0) == want[0], (cxx, rs, ours)
    if not rs.ok:
        assert rs.returncode == 64
    ign = "--ignore-non-fatal-errors"
    got = (run_checker(CXX_CHECK, meta, ign).ok, run_checker(RUST_CHECK, meta, ign).ok, tp_exit("check", ign, meta) == 0)
    assert got == want[1]
    if damage == "data_leak":
        assert "1 data blocks have leaked." in rs.stderr.splitlines()


def tp_exit(*args: object) -> int:
    from click.testing import CliRunner

    from thinpool_cli.main import cli
    return CliRunner().invoke(cli, [str(a) for a in args]).exit_code


# --- thin_dump ---------------------------------------------------------------------------------------------------
def dump_model(text: str) -> tuple[dict[str, str], dict[int, tuple[dict[str, str], list[tuple[int, int, int]]]]]:
    """A dump as (superblock attributes, {dev_id: (device attributes, [(thin, data, time) per block])}), with
    1.1.0's <def>/<ref> expanded and a missing flags attribute read as 0."""
    root = ET.fromstring(text)
    assert root.tag == "superblock"
    sb = dict(root.attrib)
    sb.setdefault("flags", "0")
    defs = {d.get("name"): d for d in root.findall("def")}

    def blocks(el: ET.Element) -> list[tuple[int, int, int]]:
        out: list[tuple[int, int, int]] = []
        for m in el:
            if m.tag == "ref":
                out += blocks(defs[m.get("name")])
            elif m.tag == "range_mapping":
                ob, db, n, t = (int(m.get(a)) for a in ("origin_begin", "data_begin", "length", "time"))
                out += [(ob + i, db + i, t) for i in range(n)]
            else:
                assert m.tag == "single_mapping", m.tag
                out.append((int(m.get("origin_block")), int(m.get("data_block")), int(m.get("time"))))
        return out

    devices = {int(d.get("dev_id")): (dict(d.attrib), blocks(d)) for d in root.findall("device")}
    return sb, devices


def test_dump_agrees_with_rust_thin_dump(pools) -> None:
    saw_def = False
    for name, (meta, _) in pools.items():
        ours = tp("dump", meta)
        assert ours == run_tool("thin_dump", str(meta)).stdout, name  # byte for byte with 0.9.0
        theirs = run_tool(rust("thin_dump"), str(meta)).stdout
        assert not theirs.endswith("\n") and ours.endswith("</superblock>\n")
        assert dump_model(theirs) == dump_model(ours), name
        saw_def = saw_def or "<def " in theirs
        if ' flags="0"' in ours:
            assert " flags=" not in theirs.splitlines()[0]
    assert saw_def  # the snapshots' shared leaves were written once


# --- thin_ls -----------------------------------------------------------------------------------------------------
def _ls_tokens(text: str) -> list[list[str]]:
    return [["0" if tok == "0b" else tok for tok in ln.split()] for ln in text.splitlines()]


def test_ls_agrees_with_rust_thin_ls(pools) -> None:
    saw_0b = False
    for name, (meta, _) in pools.items():
        for args in ([], ["-o", ALL_LS_FIELDS], ["--no-headers", "-o", "DEV,MAPPED,EXCLUSIVE_BLOCKS,SHARED"]):
            ours = tp("ls", *args, meta)
            assert ours == run_tool("thin_ls", *args, str(meta)).stdout, (name, args)
            theirs = run_tool(rust("thin_ls"), *args, str(meta)).stdout
            assert _ls_tokens(theirs) == _ls_tokens(ours), (name, args)
            saw_0b = saw_0b or " 0b" in theirs
    assert saw_0b


# --- thin_delta --------------------------------------------------------------------------------------------------
def _delta_blocks(text: str) -> tuple[set[tuple[str, int]], dict[tuple[str, int], tuple[int, ...]]]:
    """Per thin block: its kind, and the data block(s) at each range's first block."""
    root = ET.fromstring(text)
    kinds: set[tuple[str, int]] = set()
    firsts: dict[tuple[str, int], tuple[int, ...]] = {}
    data_attrs = ("data_begin", "left_data_begin", "right_data_begin")
    for section in root.find("diff"):
        for r in section:
            b, n = int(r.get("begin")), int(r.get("length"))
            kinds |= {(section.tag, b + i) for i in range(n)}
            firsts[(section.tag, b)] = tuple(int(r.get(a)) for a in data_attrs if r.get(a) is not None)
    return kinds, firsts


def test_delta_agrees_with_rust_thin_delta(pools) -> None:
    merged = 0
    for name, (meta, devs) in pools.items():
        if len(devs) < 2:
            continue
        pairs = {(devs[0], devs[1]), (devs[0], devs[-1]), (devs[-2], devs[-1])}
        for a, b in sorted(pairs):
            for verbose in ([], ["--verbose"]):
                ours = tp("delta", *verbose, a, b, meta)
                assert ours == run_tool("thin_delta", *verbose, "--snap1", str(a), "--snap2", str(b),
                                        str(meta)).stdout, (name, a, b)
                theirs = run_tool(rust("thin_delta"), *verbose, "--snap1", str(a), "--snap2", str(b),
                                  str(meta)).stdout
                if not verbose:
                    assert theirs + "\n" == ours, (name, a, b)
                    continue
                our_kinds, our_firsts = _delta_blocks(ours)
                their_kinds, their_firsts = _delta_blocks(theirs)
                assert their_kinds == our_kinds, (name, a, b)
                # every 1.1.0 range starts where one of ours does, with the same data block(s) ...
                assert all(our_firsts.get(k) == v for k, v in their_firsts.items()), (name, a, b)
                merged += len(our_firsts) - len(their_firsts)  # ... and ours split some of its ranges
    assert merged > 0


# --- thin_rmap ---------------------------------------------------------------------------------------------------
_RMAP = re.compile(r"data (\d+)\.\.(\d+) -> thin\((\d+)\) (\d+)\.\.(\d+)")


def test_rmap_agrees_with_rust_thin_rmap(pools) -> None:
    for name, (meta, _) in pools.items():
        nr = int(dump_model(tp("dump", meta))[0]["nr_data_blocks"])
        for region in (f"0..{nr}", f"{nr // 3}..{nr // 2 + 1}"):
            ours = tp("rmap", region, meta)
            assert ours == run_tool("thin_rmap", "--region", region, str(meta)).stdout, (name, region)
            theirs = run_tool(rust("thin_rmap"), "--region", region, str(meta)).stdout.splitlines()
            assert sorted(theirs) == sorted(ours.splitlines()), (name, region)

            def key(ln: str) -> tuple[int, int, int]:
                m = _RMAP.fullmatch(ln)
                assert m is not None, ln
                return int(m[1]), int(m[2]), int(m[3])
            assert theirs == sorted(theirs, key=key), (name, region)
            # and thinpool's --order sorted prints 1.1.0's order, byte for byte
            assert tp("rmap", "--order", "sorted", region, meta).splitlines() == theirs, (name, region)


# --- thin_restore / thin_repair ------------------------------------------------------------------------------------
def test_rust_restore_and_repair_output_opens_in_thinpool(pools, tmp_path) -> None:
    for name, (meta, _) in pools.items():
        ours = tp("dump", meta)
        xml = tmp_path / f"{name}.xml"
        xml.write_text(ours)
        restored = tmp_path / f"{name}.restored"
        with open(restored, "wb") as f:
            f.truncate(8 << 20)
        run_tool(rust("thin_restore"), "-i", str(xml), "-o", str(restored))
        if name == "f5_needs_check_v1":
            # 1.1.0's thin_restore always writes needs_check clear and version 2 (src/thin/restore.rs); 0.9.0 and
            # thinpool restore the XML's flags and version
            ours = ours.replace(' flags="1" version="1" ', ' flags="0" version="2" ')
        assert tp("dump", restored) == ours, name
        assert tp_exit("check", restored) == 0, name
        assert_thin_check(restored, what=name)
        repaired = tmp_path / f"{name}.repaired"
        with open(repaired, "wb") as f:
            f.truncate(8 << 20)
        r = run_tool(rust("thin_repair"), "-i", str(meta), "-o", str(repaired), check=False)
        if name == "f1_empty_pool":
            # 1.1.0 cannot repair a pool without devices (0.9.0's thin_repair and `thinpool pool repair` can)
            assert r.returncode == 64 and "no compatible roots found" in r.stderr, r
            continue
        assert r.returncode == 0, (name, r.stderr)
        if name == "f5_needs_check_v1":  # 1.1.0 and `thinpool pool repair` write a fresh superblock (0.9.0 copies)
            assert tp("dump", repaired) == tp("dump", tp_repair(meta, tmp_path / "ours.repaired"))
        assert tp("dump", repaired) == ours, name
        assert tp_exit("check", repaired) == 0, name
        assert_thin_check(repaired, what=name)


def tp_repair(src: Path, out: Path) -> Path:
    tp("pool", "repair", src, out)
    return out


def test_thinpool_restores_rust_thin_dump_output(pools, tmp_path) -> None:
    """1.1.0's XML (no flags when 0, no final newline, shared subtrees as <def>/<ref>) restores in thinpool to the
    same metadata, as far as any dump can tell."""
    for name, (meta, _) in pools.items():
        xml = tmp_path / f"{name}.rust.xml"
        xml.write_text(run_tool(rust("thin_dump"), str(meta)).stdout)
        out = tmp_path / f"{name}.bin"
        with open(out, "wb") as f:
            f.truncate(8 << 20)
        tp("restore", "-i", xml, "-o", out)
        assert tp("dump", out) == tp("dump", meta), name
        assert_thin_check(out, what=name)


@pytest.mark.parametrize("body,what", [
    ('<device dev_id="1" mapped_blocks="1" transaction="0" creation_time="0" snap_time="0"><ref name="9"/></device>',
     "<ref name='9'> to no <def>"),
    ('<ref name="9"/>', "<ref> outside"),
    ('<def name="9"></def><def name="9"></def>', "duplicate <def"),
    ('<device dev_id="1" mapped_blocks="0" transaction="0" creation_time="0" snap_time="0"><def name="9"/></device>',
     "misplaced"),
])
def test_restore_refuses_bad_def_and_ref(tmp_path, body: str, what: str) -> None:
    from click.testing import CliRunner

    from thinpool_cli.main import cli
    xml = tmp_path / "bad.xml"
    xml.write_text(f'<superblock uuid="" time="0" transaction="1" data_block_size="128" nr_data_blocks="100">{body}'
                   '</superblock>')
    out = tmp_path / "out.bin"
    out.write_bytes(bytes(1 << 20))
    r = CliRunner().invoke(cli, ["restore", "-i", str(xml), "-o", str(out)])
    assert r.exit_code != 0 and r.stderr.startswith("thinpool: error: ") and what in r.stderr, r.output
    assert len(r.stderr.strip().splitlines()) == 1 and out.read_bytes() == bytes(1 << 20)


def test_held_metadata_snapshot_checks_and_dumps_agree(tmp_path) -> None:
    """With a held metadata snapshot: both checkers pass the live metadata and (-m) the snapshot, and 1.1.0's
    thin_dump -m holds the same mappings as thinpool's (and 0.9.0's, byte for byte). thin_check -m prints the
    snapshot superblock's TRANSACTION_ID in 0.9.0 (and thinpool's check -m), the live one in 1.1.0."""
    with Pool.create(tmp_path / "p", data_size=64 << 20) as p:
        a = p.create_thin(1, 8 << 20)
        a.write(0, b"A" * (1 << 20))
        p.create_snap(2, 1)
        p.md.reserve_metadata_snap()
        snap_tid = p.md.trans_id
        a.write(1 << 20, b"C" * (1 << 20))
        p.delete_thin(2)
        p.create_thin(4, 8 << 20).write(0, b"D" * CH)
        p.set_transaction_id(p.md.trans_id, p.md.trans_id + 5)
        live_tid = p.md.trans_id
    meta = tmp_path / "p" / "metadata"
    assert_thin_check(meta)
    cxx = assert_thin_check(meta, "-m")
    rs = run_checker(RUST_CHECK, meta, "-m")
    assert rs.ok and not rs.odd_stderr(), rs.describe()
    assert f"TRANSACTION_ID={snap_tid}\n" in cxx.stdout and f"TRANSACTION_ID={live_tid}\n" in rs.stdout
    assert tp("check", "-m", meta) == cxx.stdout  # thinpool prints 0.9.0's (the snapshot's)
    assert tp("check", meta).startswith(f"TRANSACTION_ID={live_tid}\n")
    ours = tp("dump", "-m", meta)
    assert ours == run_tool("thin_dump", "-m", str(meta)).stdout
    theirs = run_tool(rust("thin_dump"), "-m", str(meta)).stdout
    assert dump_model(theirs) == dump_model(ours) and 'dev_id="2"' in ours and 'dev_id="4"' not in ours


def _patch_image(name: str, dest: Path, block: int, offset: int, fmt: str, value: int, block_type: str) -> Path:
    import gzip
    import struct

    from thinpool.checksum import BlockType, stamp
    raw = bytearray(gzip.open(IMAGES / f"{name}.bin.gz").read())
    buf = bytearray(raw[block * 4096:(block + 1) * 4096])
    if offset < 0:  # the first value of a btree node: after max_entries keys
        max_entries = struct.unpack_from("<I", buf, 20)[0]
        offset = 32 + 8 * max_entries + (-offset - 1)
    struct.pack_into(fmt, buf, offset, value)
    stamp(buf, BlockType[block_type])
    raw[block * 4096:(block + 1) * 4096] = buf
    dest.write_bytes(bytes(raw))
    return dest


@pytest.mark.parametrize("case", ["bitmap_blocknr", "root_pointer_high_bits"])
def test_damage_only_rust_thin_check_misses(tmp_path, case: str) -> None:
    """Two kinds of damage under valid checksums that 0.9.0, thinpool and the kernel refuse and 1.1.0's thin_check
    passes (exit 0), found by fuzzing both checkers against ours:

    - a data-space-map bitmap whose blocknr is not its own location (f1_empty_pool block 9): the kernel's bitmap
      validator (dm-space-map-common.c, bitmap_check) fails it with -ENOTBLK;
    - a device's root in the top-level mapping tree with high bits set, 2**38 + 10 on a 64-block device
      (f5_needs_check_v1 block 7): a block past the end of the device. 1.1.0's check still walks block 10 (the
      low 32 bits) and finds nothing wrong, while its own thin_dump fails on the same file ("io error").
    """
    if case == "bitmap_blocknr":
        meta = _patch_image("f1_empty_pool", tmp_path / "bad.bin", 9, 8, "<Q", 7, "BITMAP")
    else:
        meta = _patch_image("f5_needs_check_v1", tmp_path / "bad.bin", 7, -5, "<I", 64, "BTREE_NODE")
    cxx, rs = run_checker(CXX_CHECK, meta), run_checker(RUST_CHECK, meta)
    assert not cxx.ok and rs.ok, (cxx.describe(), rs.describe())
    assert tp_exit("check", meta) == 1
    if case == "root_pointer_high_bits":
        assert "block out of bounds (274877906954 >= 64)" in cxx.stderr
        assert run_tool(rust("thin_dump"), str(meta), check=False).returncode != 0
