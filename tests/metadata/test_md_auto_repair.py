"""`check --auto-repair` (leaked blocks only, one transaction, then a re-check) and `pool repair` keeping the held
metadata snapshot; every result is judged by the real thin_check / thin_dump 0.9.0."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import need_tool, run_tool
from oracles import CXX_CHECK, RUST_CHECK, assert_thin_check, checkers_verdict, run_checker

from thinpool.io.block_store import FileBlockStore
from thinpool.metadata.check import check_metadata, repair_leaks
from thinpool.metadata.pool_metadata import PoolMetadata
from thinpool.metadata.repair import repair_file
from thinpool.pool import Pool
from thinpool_cli.main import cli

pytestmark = pytest.mark.external

_OVERLAP = """\
<superblock uuid="" time="1" transaction="3" flags="0" version="2" data_block_size="128" \
nr_data_blocks="1024">
  <device dev_id="1" mapped_blocks="12" transaction="0" creation_time="0" snap_time="0">
    <range_mapping origin_begin="0" data_begin="0" length="10" time="0"/>
    <range_mapping origin_begin="5" data_begin="100" length="7" time="1"/>
  </device>
  <device dev_id="2" mapped_blocks="3" transaction="0" creation_time="0" snap_time="0">
    <range_mapping origin_begin="0" data_begin="200" length="3" time="0"/>
  </device>
</superblock>
"""


def _restored_with_leaks(tmp_path):
    """thin_restore 0.9.0 keeps the data reference of a mapping an overlapping later one replaces."""
    meta = tmp_path / "meta.bin"
    xml = tmp_path / "in.xml"
    xml.write_text(_OVERLAP)
    with open(meta, "wb") as f:
        f.truncate(4 << 20)
    run_tool("thin_restore", "-i", str(xml), "-o", str(meta))
    return meta


def _counts(meta, blocks):
    store = FileBlockStore(meta, readonly=True)
    md = PoolMetadata.open(store, readonly=True)
    try:
        return [md.data_sm.count(b) for b in blocks]
    finally:
        md.close()


def test_auto_repair_fixes_thin_restore_leaks(tmp_path) -> None:
    need_tool("thin_restore", "thin_check", "thin_dump")
    meta = _restored_with_leaks(tmp_path)
    assert run_checker(CXX_CHECK, meta).ok  # 0.9.0 does not see them; 1.1.0 does, as our check does
    rust = run_checker(RUST_CHECK, meta)
    assert not rust.ok and "5 data blocks have leaked." in rust.stderr.splitlines(), rust.describe()
    report = check_metadata(FileBlockStore(meta, readonly=True))
    assert not report.errors
    assert [b for b, _, _ in report.leaked_data] == [5, 6, 7, 8, 9]
    assert all((s, e) == (1, 0) for _, s, e in report.leaked_data)
    dump_before = run_tool("thin_dump", str(meta)).stdout
    assert CliRunner().invoke(cli, ["check", str(meta)]).exit_code == 1

    r = CliRunner().invoke(cli, ["check", "--auto-repair", str(meta), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["ok"] and out["leaks"] == [] and out["errors"] == []
    assert out["repaired"]["data_blocks"] == 5 and out["repaired"]["data_blocks_freed"] == 5
    assert out["repaired"]["metadata_blocks"] == 0
    assert out["data_used_blocks"] == 10 + 7 + 3 - 5
    assert _counts(meta, [4, 5, 9, 100, 200]) == [1, 0, 0, 1, 1]
    assert_thin_check(str(meta))
    assert CliRunner().invoke(cli, ["check", str(meta)]).exit_code == 0
    assert run_tool("thin_dump", str(meta)).stdout == dump_before
    # nothing left to repair: a second run changes nothing
    data = meta.read_bytes()
    r = CliRunner().invoke(cli, ["check", "--auto-repair", str(meta)])
    assert r.exit_code == 0, r.output
    assert meta.read_bytes() == data


def test_auto_repair_lowers_raised_data_and_metadata_counts(tmp_path) -> None:
    need_tool("thin_check", "thin_dump")
    with Pool.create(tmp_path / "p", data_size=64 << 20) as pool:
        a = pool.create_thin(1, 8 << 20)
        a.write(0, b"A" * (1 << 20))
        pool.create_snap(2, 1)
    meta = tmp_path / "p" / "metadata"
    store = FileBlockStore(meta)
    md = PoolMetadata.open(store)
    mapped = int(md.mappings(1)[1][0])
    free_data = 500
    used_meta = md.device_root(1)
    free_meta = int(np.flatnonzero(md.meta_disk.core.counts == 0)[-1])
    base = md.data_sm.count(mapped), md.meta_disk.core.count(used_meta)
    md.data_sm.inc(mapped, 2)
    md.data_sm.inc(free_data)
    md.meta_disk.core.inc(used_meta)
    md.meta_disk.core.inc(free_meta)
    md.commit()
    md.close()
    dump_before = run_tool("thin_dump", str(meta)).stdout
    report = check_metadata(FileBlockStore(meta, readonly=True))
    assert not report.errors and len(report.leaks) == 4
    assert sorted(b for b, _, _ in report.leaked_data) == [mapped, free_data]
    assert sorted(b for b, _, _ in report.leaked_metadata) == sorted([used_meta, free_meta])

    r = CliRunner().invoke(cli, ["check", "--auto-repair", str(tmp_path / "p")])
    assert r.exit_code == 0, r.output
    assert "repairing leaks: lowered the counts of 2 data block(s) (1 now free) and 2 metadata block(s) " \
           "(1 now free)" in r.stderr
    assert_thin_check(str(meta))
    assert CliRunner().invoke(cli, ["check", str(meta)]).exit_code == 0
    assert run_tool("thin_dump", str(meta)).stdout == dump_before
    store = FileBlockStore(meta, readonly=True)
    md = PoolMetadata.open(store)
    try:
        assert (md.data_sm.count(mapped), md.data_sm.count(free_data)) == (base[0], 0)
        assert md.meta_disk.core.count(free_meta) == 0
    finally:
        md.close()
    with Pool.open(tmp_path / "p") as pool:  # the pool still reads its data
        assert pool.device(2).read(0, 4096) == b"A" * 4096


def test_auto_repair_refuses_other_errors_and_changes_nothing(tmp_path) -> None:
    need_tool("thin_check")
    with Pool.create(tmp_path / "p", data_size=64 << 20) as pool:
        a = pool.create_thin(1, 8 << 20)
        a.write(0, b"A" * (1 << 20))
        leaf = pool.md.device_root(1)
    meta = tmp_path / "p" / "metadata"
    store = FileBlockStore(meta)
    md = PoolMetadata.open(store)
    md.data_sm.inc(900)  # a leak as well: still refused because of the damaged leaf
    md.commit()
    md.close()
    with open(meta, "r+b") as f:
        f.seek(leaf * 4096 + 100)
        f.write(struct.pack("<Q", 0xDEADBEEF))
    before = meta.read_bytes()
    r = CliRunner().invoke(cli, ["check", "--auto-repair", str(tmp_path / "p")])
    assert r.exit_code == 1
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("thinpool: error:")]
    assert len(lines) == 1 and "not repairing" in lines[0] and "Traceback" not in r.output
    assert meta.read_bytes() == before
    assert not checkers_verdict(meta)
    with pytest.raises(Exception) as e:
        repair_leaks(FileBlockStore(meta), name=str(meta))
    assert type(e.value).__name__ == "LeakRepairRefused" and e.value.exit_code == 1
    assert meta.read_bytes() == before


def test_auto_repair_usage(tmp_path) -> None:
    with Pool.create(tmp_path / "p", data_size=16 << 20):
        pass
    for flag in ("-m", "--skip-mappings", "--super-block-only"):
        r = CliRunner().invoke(cli, ["check", "--auto-repair", flag, str(tmp_path / "p")])
        assert r.exit_code == 2 and "--auto-repair" in r.output


def test_repair_keeps_the_held_metadata_snapshot(tmp_path) -> None:
    need_tool("thin_check", "thin_dump")
    with Pool.create(tmp_path / "p", data_size=64 << 20) as pool:
        a = pool.create_thin(1, 8 << 20)
        a.write(0, b"A" * (1 << 20))
        b = pool.create_thin(2, 8 << 20)
        b.write(0, b"B" * (256 << 10))
        pool.create_snap(3, 1)
        pool.md.reserve_metadata_snap()
        a.write(1 << 20, b"C" * (1 << 20))  # device 1 differs from the snapshot, 2 and 3 do not
        pool.delete_thin(3)
        pool.create_thin(4, 8 << 20).write(0, b"D" * 65536)  # only in the live metadata
    src = tmp_path / "p" / "metadata"
    out = tmp_path / "out.bin"
    rep = repair_file(src, out)
    assert rep.held_snapshot and rep.held_devices == 3 and rep.devices == 3
    assert_thin_check(str(out))
    assert check_metadata(FileBlockStore(out, readonly=True)).ok
    held_src = run_tool("thin_dump", "-m", str(src)).stdout
    held_out = run_tool("thin_dump", "-m", str(out)).stdout
    assert 'dev_id="3"' in held_out and 'dev_id="4"' not in held_out
    assert held_out == held_src
    assert run_tool("thin_dump", str(out)).stdout == run_tool("thin_dump", str(src)).stdout
    # a device unchanged since the snapshot still shares its tree with it
    ro = PoolMetadata.open(FileBlockStore(out, readonly=True), readonly=True)
    snap = PoolMetadata.open(FileBlockStore(out, readonly=True), readonly=True, use_metadata_snap=True)
    try:
        assert ro.device_root(2) == snap.device_root(2)
        assert ro.device_root(1) != snap.device_root(1)
    finally:
        ro.close()
        snap.close()


def test_repair_drops_an_unreadable_snapshot_but_keeps_the_live_devices(tmp_path) -> None:
    need_tool("thin_check", "thin_dump")
    with Pool.create(tmp_path / "p", data_size=64 << 20) as pool:
        pool.create_thin(1, 8 << 20).write(0, b"A" * (1 << 20))
        held = pool.md.reserve_metadata_snap()
    src = tmp_path / "p" / "metadata"
    with open(src, "r+b") as f:
        f.seek(held * 4096 + 200)
        f.write(b"\xff" * 8)
    out = tmp_path / "out.bin"
    rep = repair_file(src, out)
    assert not rep.held_snapshot and any("metadata snapshot" in p for p in rep.problems)
    assert_thin_check(str(out))
    assert 'dev_id="1" mapped_blocks="16"' in run_tool("thin_dump", str(out)).stdout
