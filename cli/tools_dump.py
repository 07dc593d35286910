"""thin_dump and thin_restore as commands: `thinpool dump`, `thinpool restore`.

Layer: cli. May import: click, thinpool (the library only inside the commands).

dump's XML and human-readable output are byte for byte thin_dump 0.9.0's; it streams (one leaf of mappings in
memory) and shows a progress bar on a terminal for large pools. restore parses and checks the XML, builds the
metadata in memory, and only then writes the target (superblock last).
"""

from __future__ import annotations

import os
from typing import Any

import click

from thinpool_cli.params import json_option
from thinpool_cli.tools_common import (
    busy,
    mapping_progress,
    open_metadata,
    output_file,
    require_metadata_snap,
    resolve_device,
    target_option,
)


# --- dump -------------------------------------------------------------------------------------------------------
@click.command("dump")
@target_option
@click.option("-o", "--output", "output", type=click.Path(dir_okay=False), help="Write to FILE instead of stdout.")
@click.option("-f", "--format", "fmt", type=click.Choice(["xml", "human_readable"]), default="xml",
              show_default=True, help="Output format (thin_dump's -f).")
@click.option("-m", "--metadata-snap", is_flag=True, help="Dump through the held metadata snapshot.")
@click.option("--dev-id", "dev_ref", metavar="ID|NAME", help="Only this device (an id, or a name from pool.json).")
@click.option("--skip-mappings", is_flag=True, help="Devices without their mappings.")
@json_option
def dump(target: str | None, pool_path: str | None, output: str | None, fmt: str, metadata_snap: bool,
         dev_ref: str | None, skip_mappings: bool, as_json: bool) -> None:
    """Dump metadata as thin_dump's XML (byte for byte), its human-readable form, or JSON.

    Example: thinpool dump mypool -o mypool.xml
    """
    from thinpool.metadata.dump import HumanWriter, JsonWriter, XmlWriter
    from thinpool.metadata.dump import dump as dump_ir

    target = target or pool_path
    dev_id = None if dev_ref is None else resolve_device(dev_ref, target)
    if metadata_snap:
        require_metadata_snap(target)
    with open_metadata(target, use_metadata_snap=metadata_snap) as pmd:
        ids = pmd.device_ids() if dev_id is None else [dev_id]
        if dev_id is not None:
            pmd.get_device(dev_id)  # DeviceNotFound before any output
        total = 0 if skip_mappings else sum(pmd.devices[d].mapped_blocks for d in ids)
        with output_file(output) as out, mapping_progress("dumping", total) as bar:
            writer = JsonWriter(out, skip_mappings=skip_mappings) if as_json else \
                HumanWriter(out) if fmt == "human_readable" else XmlWriter(out)
            dump_ir(pmd, writer, dev_ids=ids, skip_mappings=skip_mappings, progress=bar.advance)


# --- restore ----------------------------------------------------------------------------------------------------
@click.command("restore")
@click.option("-i", "--input", "xml_path", type=click.Path(exists=True, dir_okay=False), required=True,
              help="thin_dump XML to restore.")
@click.option("-o", "--output", "output", required=True, type=click.Path(),
              help="A metadata file or device, or a pool directory (its metadata and data files are set up).")
@click.option("-f", "--force", is_flag=True, help="Overwrite a target that already holds valid metadata.")
@click.option("-q", "--quiet", is_flag=True, help="No output.")
def restore(xml_path: str, output: str, force: bool, quiet: bool) -> None:
    """Build fresh metadata from thin_dump XML, like thin_restore (the result passes thin_check).

    The XML is parsed and checked before anything is written; nothing changes on bad input.

    Example: thinpool restore -i mypool.xml -o copy.bin
    """
    from thinpool.metadata.restore import parse_xml
    from thinpool.pool import lock_pool_dir

    with busy("reading XML", os.path.getsize(xml_path) // 64):  # about 64 bytes of XML per mapping
        ir = parse_xml(xml_path)
    chunk = _validate_ir(ir)
    pool_dir = os.path.isdir(output)
    md_path = os.path.join(output, "metadata") if pool_dir else output
    lock_fd = lock_pool_dir(output) if pool_dir else None
    try:
        _restore_file(ir, chunk, md_path, force)
        if pool_dir:
            data = os.path.join(output, "data")
            with open(data, "ab") as f:
                if os.path.getsize(data) < ir.nr_data_blocks * chunk:
                    f.truncate(ir.nr_data_blocks * chunk)
            _write_restored_manifest(output, ir, chunk)
    finally:
        if lock_fd is not None:
            os.close(lock_fd)
    if not quiet:
        click.echo(f"restored {len(ir.devices)} device(s), transaction {ir.transaction}, to {md_path}", err=True)


def _validate_ir(ir: Any) -> int:
    """Everything restore could fail on after it started writing, checked first. Returns the chunk in bytes."""
    from thinpool.errors import InvalidArgument
    from thinpool.units import SECTOR_SIZE, check_data_block_size

    chunk = int(ir.data_block_size) * SECTOR_SIZE
    check_data_block_size(chunk)
    for dev in ir.devices:
        hi = dev.highest_data()
        if hi is not None and hi >= ir.nr_data_blocks:
            raise InvalidArgument(reason=f"device {dev.dev_id}: mapping beyond end of data device "
                                         f"({hi} >= {ir.nr_data_blocks})")
    return chunk


def _restore_file(ir: Any, chunk: int, md_path: str, force: bool) -> None:
    """Build the metadata in memory (a failure leaves the target untouched), then write it, superblock last."""
    from thinpool.errors import InvalidArgument
    from thinpool.io.block_store import FileBlockStore
    from thinpool.metadata.pool_metadata import PoolMetadata
    from thinpool.metadata.restore import restore as do_restore
    from thinpool.pool import metadata_size_for

    if os.path.exists(md_path):
        if not force and _has_metadata(md_path):
            raise click.UsageError(f"{md_path} already holds thin metadata: use --force to overwrite it")
        probe = FileBlockStore(md_path, readonly=True)  # seeks to the end: works for block devices too
        nr_blocks = probe.nr_blocks
        probe.close()
        if nr_blocks < 8:
            raise InvalidArgument(reason=f"{md_path}: output file too small (need at least 32 KiB)")
    else:
        nr_blocks = metadata_size_for(max(ir.nr_data_blocks, 1) * chunk, chunk) // 4096
    scratch, written = _scratch_store(md_path, nr_blocks)
    try:
        do_restore(ir, scratch)
        scratch.sync()
        if not os.path.exists(md_path):
            with open(md_path, "wb") as f:
                f.truncate(nr_blocks * 4096)
        store = FileBlockStore(md_path)
        try:
            for b in sorted(written):
                if b:
                    store.write_block(b, scratch.read_block(b))
            store.sync()
            store.write_block(0, scratch.read_block(0))
            store.sync()
        finally:
            store.close()
    finally:
        scratch.close()
    PoolMetadata.open(FileBlockStore(md_path, readonly=True), readonly=True).close()


def _scratch_store(md_path: str, nr_blocks: int) -> tuple[Any, set[int]]:
    """Where restore builds the metadata before copying it to the target (a failure leaves the target as it
    was): a sparse scratch file beside the target (or in $TMPDIR), unlinked at once, so memory does not grow
    with the mapping count. Returns the store and the set of blocks written to it."""
    import tempfile

    from thinpool.io.block_store import FileBlockStore

    written: set[int] = set()

    class Scratch(FileBlockStore):
        def write_block(self, b: int, data: bytes | bytearray) -> None:
            written.add(b)
            super().write_block(b, data)

    for d in (os.path.dirname(os.path.abspath(md_path)), None):
        try:
            fd, tmp = tempfile.mkstemp(prefix=".thinpool-restore-", dir=d)
        except OSError:
            if d is None:
                raise
            continue
        try:
            os.ftruncate(fd, nr_blocks * 4096)
            store = Scratch(tmp)
        finally:
            os.close(fd)
            os.unlink(tmp)
        return store, written
    raise AssertionError("unreachable")


def _write_restored_manifest(pool_dir: str, ir: Any, chunk: int) -> None:
    """pool.json for restored metadata (through thinpool.manifest): existing entries kept for surviving devices,
    each sized to at least its highest mapped chunk; new devices unnamed (the metadata wins, as on Pool.open)."""
    from thinpool import manifest as mf
    from thinpool.errors import ThinpoolError

    try:
        m = mf.read_manifest(pool_dir)
    except ThinpoolError:  # missing or damaged: restore writes a fresh one
        m = mf.new_manifest(transaction_id=ir.transaction, options={})
    old = m["devices"]
    devices = {}
    for dev in ir.devices:
        hi = dev.highest_thin()
        need = (hi + 1) * chunk if hi is not None else chunk
        e = dict(old.get(str(dev.dev_id)) or {"name": None, "origin": None, "size": need})
        e["size"] = max(int(e["size"]), need)
        devices[str(dev.dev_id)] = e
    m["devices"] = devices
    m["transaction_id"] = ir.transaction
    m.pop("previous_transaction_id", None)
    mf.write_manifest(pool_dir, m)


def _has_metadata(path: str) -> bool:
    from thinpool.io.block_store import FileBlockStore
    from thinpool.metadata.pool_metadata import PoolMetadata

    try:
        store = FileBlockStore(path, readonly=True)
    except Exception:
        return False
    try:
        if store.nr_blocks < 1:
            return False
        PoolMetadata.read_superblock(store)
        return True
    except Exception:
        return False
    finally:
        store.close()


