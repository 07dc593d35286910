"""thin_dump and thin_restore as commands: `thinpool dump`, `thinpool restore`.

Layer: cli. May import: click, thinpool (the library only inside the commands).

dump's XML and human-readable output are byte for byte thin_dump 0.9.0's; it streams (one leaf of mappings in
memory) and shows a progress bar on a terminal for large pools. restore parses and checks the XML as it streams,
builds the metadata in a scratch file (memory independent of the mapping count), and only then writes the target
(superblock last); a bar of the XML read shows on a terminal.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import click

from thinpool_cli.output import progress
from thinpool_cli.params import json_option
from thinpool_cli.tools_common import (
    mapping_progress,
    open_metadata,
    output_file,
    progress_threshold,
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
    from thinpool.errors import InvalidArgument
    from thinpool.metadata.restore import restore_xml
    from thinpool.pool import lock_pool_dir

    pool_dir = os.path.isdir(output)
    md_path = os.path.join(output, "metadata") if pool_dir else output
    sink = _RestoreSink(md_path)
    try:
        # parsed, checked and built into a scratch file as it streams: nothing is written to the target yet. A bar
        # of the XML read on a terminal, from about 64 bytes of XML a mapping times the threshold in mappings
        # A new output starts at the thin_metadata_size estimate for its data device and grows as the devices
        # need (MetadataBuilder grow: devices sharing blocks need more than one mapping per data block), ending
        # at what the restore used plus the headroom thin_metadata_size allows (MetadataBuilder.size_with_headroom).
        # An existing output keeps its size, as thin_restore's does: too small is "no metadata space" (exit 3),
        # the target untouched.
        size = os.path.getsize(xml_path)
        with progress("restoring", size, min_total=max(progress_threshold(), 1) * 64) as bar:
            restore_xml(xml_path, sink, progress=bar.update)
        if sink.summary is None:
            raise InvalidArgument(reason="no <superblock> element in the XML")
        ir, chunk = sink.summary, sink.chunk
        lock_fd = lock_pool_dir(output) if pool_dir else None
        try:
            _restore_file(sink, md_path, force)
            if pool_dir:
                data = os.path.join(output, "data")
                with open(data, "ab") as f:
                    if os.path.getsize(data) < ir.nr_data_blocks * chunk:
                        f.truncate(ir.nr_data_blocks * chunk)
                _write_restored_manifest(output, ir, chunk)
        finally:
            if lock_fd is not None:
                os.close(lock_fd)
    finally:
        sink.close()
    if not quiet:
        click.echo(f"restored {len(ir.devices)} device(s), transaction {ir.transaction}, to {md_path}", err=True)


@dataclass
class _RestoredDevice:
    dev_id: int
    hi_thin: int | None

    def highest_thin(self) -> int | None:
        return self.hi_thin


@dataclass
class _Restored:
    """What pool.json and the closing line need from a restore: the devices, transaction and data size."""

    transaction: int
    nr_data_blocks: int
    devices: list[_RestoredDevice] = field(default_factory=list)


class _RestoreSink:
    """The IR visitor restore streams the XML into: it checks the geometry and that no mapping lies beyond the
    data device (as soon as a device ends), keeps a line per device for pool.json, and feeds a MetadataBuilder
    over an unlinked scratch file (memory: a chunk of runs and one pending node per tree level, whatever the
    mapping count; a device's runs spill to a temporary file until it ends). A parse restarted
    from superblock_b (the fast path giving up) starts it afresh."""

    def __init__(self, md_path: str) -> None:
        self.md_path = md_path
        self.summary: _Restored | None = None
        self.chunk = 0
        self.scratch: Any = None
        self.scratch_fd = -1
        self.written = bytearray()
        self.builder: Any = None
        self._hi: tuple[int | None, int | None] = (None, None)
        self._dev = 0
        self.estimated = False  # a new output: sized by the estimate, grown as needed (not an existing output's)
        self.nr_blocks = 0

    def close(self) -> None:
        if self.builder is not None:
            self.builder.close()
        if self.scratch is not None:
            self.scratch.close()
            self.scratch = None
        if self.scratch_fd >= 0:
            os.close(self.scratch_fd)
            self.scratch_fd = -1

    def superblock_b(self, sb: Any) -> None:
        from thinpool.errors import InvalidArgument
        from thinpool.io.block_store import FileBlockStore
        from thinpool.metadata.restore import MetadataBuilder
        from thinpool.pool import metadata_size_for
        from thinpool.units import SECTOR_SIZE, check_data_block_size

        self.chunk = int(sb.data_block_size) * SECTOR_SIZE
        check_data_block_size(self.chunk)
        if os.path.exists(self.md_path):
            probe = FileBlockStore(self.md_path, readonly=True)  # seeks to the end: works for block devices too
            nr_blocks = probe.nr_blocks
            probe.close()
            if nr_blocks < 8:
                raise InvalidArgument(reason=f"{self.md_path}: output file too small (need at least 32 KiB)")
        else:
            from thinpool.units import MAX_METADATA_BLOCKS

            nr_blocks = min(metadata_size_for(max(sb.nr_data_blocks, 1) * self.chunk, self.chunk) // 4096,
                            MAX_METADATA_BLOCKS)
            self.estimated = True
        self.nr_blocks = nr_blocks
        self.close()
        self.scratch, self.written, self.scratch_fd = _scratch_store(self.md_path, nr_blocks)
        self.summary = _Restored(sb.transaction, sb.nr_data_blocks)
        self.builder = MetadataBuilder(self.scratch, grow=self.estimated)
        self.builder.superblock_b(sb)

    def device_b(self, d: Any) -> None:
        self._dev = d.dev_id
        self._hi = (None, None)
        self.builder.device_b(d)

    def map(self, runs: Any) -> None:
        if len(runs):
            ends = runs.lengths - 1
            ht, hd = int((runs.steps[0] + ends).max()), int((runs.steps[1] + ends).max())
            t, d = self._hi
            self._hi = (ht if t is None else max(t, ht), hd if d is None else max(d, hd))
        self.builder.map(runs)

    def device_e(self) -> None:
        from thinpool.errors import InvalidArgument

        assert self.summary is not None
        hi_thin, hi_data = self._hi
        nr = self.summary.nr_data_blocks
        if hi_data is not None and hi_data >= nr:
            raise InvalidArgument(reason=f"device {self._dev}: mapping beyond end of data device ({hi_data} >= {nr})")
        self.summary.devices.append(_RestoredDevice(self._dev, hi_thin))
        self.builder.device_e()
        self.builder.md.commit()  # the scratch only (never synced): details and dirty bitmaps written per device

    def superblock_e(self) -> None:
        self.builder.superblock_e()
        if self.estimated:
            before = self.scratch.nr_blocks
            self.builder.size_with_headroom()
            if self.scratch.nr_blocks != before:
                self.builder.md.commit()
        self.nr_blocks = self.scratch.nr_blocks

    def eof(self) -> None:
        self.builder.eof()


def _restore_file(sink: _RestoreSink, md_path: str, force: bool) -> None:
    """Copy the metadata built in the scratch file to the target, superblock last (a failure before this left
    the target untouched)."""
    from thinpool.io.block_store import FileBlockStore
    from thinpool.metadata.pool_metadata import PoolMetadata

    if os.path.exists(md_path) and not force and _has_metadata(md_path):
        raise click.UsageError(f"{md_path} already holds thin metadata: use --force to overwrite it")
    scratch = sink.scratch
    nr_blocks = scratch.nr_blocks
    if not os.path.exists(md_path):
        with open(md_path, "wb") as f:
            f.truncate(nr_blocks * 4096)
    store = FileBlockStore(md_path)
    try:
        for b, blocks in _written_runs(sink):
            store.write_run(b, blocks)
        store.sync()
        store.write_block(0, scratch.read_block(0))
        store.sync()
    finally:
        store.close()
    PoolMetadata.open(FileBlockStore(md_path, readonly=True), readonly=True).close()


def _written_runs(sink: _RestoreSink) -> Any:
    """(first block, [blocks]) for each run of at most 256 consecutive blocks written to the scratch file,
    block 0 (the superblock, copied last) left out. Memory: one run."""
    import numpy as np

    w = np.zeros(len(sink.written) + 2, dtype=np.int8)  # a byte per block, a zero either side
    w[1:-1] = np.frombuffer(sink.written, dtype=np.int8)
    w[1] = 0
    edges = np.flatnonzero(np.diff(w))
    for lo, hi in zip(edges[0::2].tolist(), edges[1::2].tolist()):
        for b in range(lo, hi, 256):
            n = min(256, hi - b)
            raw = os.pread(sink.scratch_fd, n * 4096, b * 4096)
            yield b, [raw[i * 4096:(i + 1) * 4096] for i in range(n)]


def _scratch_store(md_path: str, nr_blocks: int) -> tuple[Any, bytearray, int]:
    """Where restore builds the metadata before copying it to the target (a failure leaves the target as it
    was): a sparse scratch file beside the target (or in $TMPDIR), unlinked at once, so memory does not grow
    with the mapping count. Returns the store, a byte per block set when the block is written, and a file
    descriptor of the scratch file to read it back."""
    import tempfile

    from thinpool.io.block_store import FileBlockStore

    written = bytearray(nr_blocks)

    class Scratch(FileBlockStore):
        def grow(self, n: int) -> None:
            super().grow(n)
            if len(written) < self.nr_blocks:
                written.extend(bytes(self.nr_blocks - len(written)))

        def write_block(self, b: int, data: bytes | bytearray) -> None:
            written[b] = 1
            super().write_block(b, data)

        def write_run(self, b: int, datas: list[bytes | bytearray]) -> None:
            written[b:b + len(datas)] = b"\x01" * len(datas)
            super().write_run(b, datas)

        @classmethod
        def writes_runs(cls) -> bool:
            return True  # both writes are counted

        def sync(self) -> None:
            pass  # nothing here needs to be durable: the copy to the target syncs (the scratch is unlinked)

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
        except BaseException:
            os.close(fd)
            raise
        finally:
            os.unlink(tmp)
        return store, written, fd
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


