"""``thinpool ls`` with its default fields through the read-only metadata view (issue 13: ls start-up).

The view (``metadata/readonly.py``) must give what ``PoolMetadata`` gives (details, roots, the snapshot view, the
same errors on damage), read no more than the superblock and the two small trees, and the command must load no
space map, transaction manager, numpy nor the other tools' command modules (asserted on ``sys.modules``, never on
time).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import need_tool, run_tool
from tools_helpers import CountingStore, random_pool, reopen

from thinpool import checksum
from thinpool.checksum import BlockType
from thinpool.errors import ChecksumError, InvalidArgument, MetadataCorrupt
from thinpool.formats.device_details import build_device_details
from thinpool.io.block_store import MemoryBlockStore
from thinpool.metadata.readonly import ReadOnlyMetadata
from thinpool.tools.ls import LS_DEFAULT, LS_FIELDS, ls_rows, ls_text, needs_mappings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cli"))
from cli_helpers import busy_pool, fails, ok  # noqa: E402, F401


def view_of(store: MemoryBlockStore, *, snap: bool = False) -> ReadOnlyMetadata:
    return ReadOnlyMetadata.open(store, use_metadata_snap=snap)


@pytest.mark.parametrize("seed", range(3))
def test_the_view_gives_what_pool_metadata_gives(seed: int) -> None:
    store, _ = random_pool(seed, nr_devices=5)
    md, view = reopen(store), view_of(store)
    assert view.device_ids() == md.device_ids()
    for d in md.device_ids():
        assert view.device_root(d) == md.device_root(d)
        full = md.get_device(d)
        got = view.get_device(d)
        assert (got.mapped_blocks, got.transaction_id, got.creation_time, got.snapshotted_time) == \
            (full.mapped_blocks, full.transaction_id, full.creation_time, full.snapshotted_time)
    assert view.data_block_size == md.data_block_size and view.held_root == md.held_root
    assert ls_text(ls_rows(view, LS_DEFAULT), LS_DEFAULT) == ls_text(ls_rows(md, LS_DEFAULT), LS_DEFAULT)


def test_the_view_reads_the_superblock_and_the_two_trees_only() -> None:
    store, md = random_pool(1, nr_devices=5)
    counting = CountingStore(store)
    view_of(counting)  # type: ignore[arg-type]
    # one leaf each: the details tree and the top level of the mapping tree (6 devices)
    assert counting.read_set == {0, md.details_root, md.mapping_root}


def test_the_view_through_the_held_snapshot_sees_the_snapshot() -> None:
    store, md = random_pool(2, nr_devices=3)
    before = {d: md.get_device(d).mapped_blocks for d in md.device_ids()}
    md.reserve_metadata_snap()
    md.commit()
    md.create_thin(50)
    md.insert(50, 7, md.alloc_data_block())
    md.insert(0, 123_456, md.alloc_data_block())
    md.commit()
    snap = view_of(store, snap=True)
    assert {d: snap.get_device(d).mapped_blocks for d in snap.device_ids()} == before
    now = view_of(store)
    assert 50 in now.devices and now.get_device(0).mapped_blocks == before[0] + 1
    full = reopen(store)
    assert full.get_device(0).mapped_blocks == before[0] + 1


def test_the_view_refuses_a_snapshot_that_is_not_held() -> None:
    store, _ = random_pool(0, nr_devices=2)
    with pytest.raises(InvalidArgument):
        view_of(store, snap=True)


def test_a_damaged_details_node_is_refused_naming_it() -> None:
    store, md = random_pool(0, nr_devices=2)
    buf = bytearray(store.read_block(md.details_root))
    buf[100] ^= 0xFF
    store.write_block(md.details_root, bytes(buf))
    with pytest.raises(ChecksumError) as e:
        view_of(store)
    assert e.value.fields["block"] == md.details_root


def test_details_and_mapping_tree_disagreeing_is_refused_as_the_full_open_refuses() -> None:
    store, md = random_pool(0, nr_devices=3)
    # rewrite the details leaf with one device more than the mapping tree holds (checksummed: only the
    # disagreement is wrong)
    from thinpool.btree.node import decode_node

    node = decode_node(store.read_block(md.details_root), md.details_root, 24)
    node.keys.append(max(node.keys) + 1)
    node.values.append(build_device_details(md.get_device(0).to_disk()))
    buf = node.encode()
    checksum.stamp(buf, BlockType.BTREE_NODE)
    store.write_block(md.details_root, bytes(buf))
    with pytest.raises(MetadataCorrupt) as full:
        reopen(store)
    with pytest.raises(MetadataCorrupt) as mine:
        view_of(store)
    assert mine.value.fields["block"] == full.value.fields["block"] == md.details_root


def test_fields_that_read_mappings_need_the_full_metadata() -> None:
    store, _ = random_pool(0, nr_devices=2)
    assert not needs_mappings(LS_DEFAULT)
    assert not needs_mappings(["DEV", "MAPPED_BYTES", "TRANSACTION", "SNAP_TIME"])
    assert needs_mappings(["DEV", "HIGHEST_BLOCK"]) and needs_mappings(["SHARED_SECTORS"])
    with pytest.raises(InvalidArgument):
        ls_rows(view_of(store), LS_FIELDS)


PROBE = r"""
import json, sys
before = set(sys.modules)
sys.argv = ["thinpool"] + json.loads(sys.argv[1])
from thinpool_cli.main import main
try:
    main()
except SystemExit as e:
    code = e.code
else:
    code = 0
print(json.dumps({"code": code, "loaded": sorted(set(sys.modules) - before)}), file=sys.stderr)
"""

# what `thinpool ls` with the details alone must not load
NOT_FOR_LS = ("numpy", "thinpool.tx", "thinpool.spacemap", "thinpool.btree.spine", "thinpool.btree.btree",
              "thinpool.metadata.pool_metadata", "thinpool.pool", "thinpool_cli.tools_check",
              "thinpool_cli.tools_dump", "thinpool_cli.tools_map", "thinpool_cli.output", "rich")


def loaded_by(args: list[str]) -> list[str]:
    r = subprocess.run([sys.executable, "-c", PROBE, json.dumps(args)], capture_output=True, text=True,
                       timeout=120, env=dict(os.environ))
    out = json.loads(r.stderr.strip().splitlines()[-1])
    assert out["code"] in (0, None), r.stderr
    return list(out["loaded"])


def heavy(loaded: list[str]) -> list[str]:
    return [m for m in loaded if any(m == h or m.startswith(h + ".") for h in NOT_FOR_LS)]


def test_ls_default_fields_load_no_space_map_transaction_manager_or_numpy(busy_pool: Path) -> None:
    loaded = loaded_by(["ls", str(busy_pool)])
    assert "thinpool.metadata.readonly" in loaded  # the probe really ran the listing
    assert heavy(loaded) == []
    assert heavy(loaded_by(["ls", "-m", "-o", "DEV,MAPPED_BYTES,TRANSACTION", str(busy_pool / "metadata")])) == []
    # fields that walk the mappings open the full metadata
    loaded = loaded_by(["ls", "-o", "DEV,SHARED", str(busy_pool)])
    assert "thinpool.metadata.pool_metadata" in loaded and "numpy" in loaded


@pytest.mark.external
def test_ls_through_the_view_equals_thin_ls(busy_pool: Path, tmp_path: Path) -> None:
    need_tool("thin_ls")
    md = str(busy_pool / "metadata")
    for fields in (None, "DEV,MAPPED_BLOCKS,MAPPED_SECTORS,MAPPED_BYTES,TRANSACTION,CREATE_TIME,SNAP_TIME"):
        opts = ["-o", fields] if fields else []
        assert ok("ls", *opts, md).stdout == run_tool("thin_ls", *opts, md).stdout
        assert ok("ls", *opts, "--no-headers", md).stdout == run_tool("thin_ls", *opts, "--no-headers", md).stdout
        # through the held metadata snapshot (busy_pool holds one, taken before its last write)
        snap = ok("ls", *opts, "-m", md).stdout
        assert snap == run_tool("thin_ls", *opts, "-m", md).stdout and snap != ok("ls", *opts, md).stdout


def test_ls_on_a_damaged_details_tree_is_one_error_line(busy_pool: Path, tmp_path: Path) -> None:
    from thinpool.io.block_store import FileBlockStore
    from thinpool.metadata.readonly import read_superblock

    copy = tmp_path / "metadata"
    copy.write_bytes((busy_pool / "metadata").read_bytes())
    s = FileBlockStore(copy, readonly=True)
    root = read_superblock(s).device_details_root
    s.close()
    with open(copy, "r+b") as f:
        f.seek(root * 4096 + 64)
        f.write(b"\xff" * 8)
    r = fails(4, "ls", str(copy))
    assert r.stderr.startswith("thinpool: error:") and "Traceback" not in r.stderr
    assert str(root) in r.stderr
