"""The dump writers: thin_dump's XML and human-readable forms (character for character as thin-provisioning-tools
0.9.0 prints them) and a JSON form, each a visitor of the metadata IR (``metadata/ir.py``).

Layer: metadata. May import: metadata.ir, metadata.pool_metadata, numpy.

Every writer streams: it formats each batch of runs as the emitter hands it over, so a dump holds one leaf of
mappings in memory whatever the pool's size. Runs: consecutive mappings merge into one range_mapping while the
thin block and the data block both grow by one and the time stays the same; a run of one is a single_mapping.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from typing import IO

import numpy as np

from thinpool.metadata.ir import DeviceDetailsIR, MetadataVisitor, Runs, SuperblockIR, emit, sorted_runs
from thinpool.metadata.pool_metadata import PoolMetadata


def runs(thin: np.ndarray, data: np.ndarray, times: np.ndarray) -> Iterator[tuple[int, int, int, int]]:
    """(thin_begin, data_begin, length, time) runs of sorted mappings."""
    r = sorted_runs((thin, data), (times,))
    for tb, db, t, n in r.rows():
        yield tb, db, n, t


_SINGLE = '    <single_mapping origin_block="%d" data_block="%d" time="%d"/>\n'
_RANGE = '    <range_mapping origin_begin="%d" data_begin="%d" length="%d" time="%d"/>\n'


class XmlWriter:
    """thin_dump 0.9.0's XML (``skip_mappings`` is the emitter's business: devices then have no children)."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out

    def superblock_b(self, sb: SuperblockIR) -> None:
        self.out.write(f'<superblock uuid="{sb.uuid}" time="{sb.time}" transaction="{sb.transaction}" '
                       f'flags="{sb.flags}" version="{sb.version}" data_block_size="{sb.data_block_size}" '
                       f'nr_data_blocks="{sb.nr_data_blocks}">\n')

    def device_b(self, d: DeviceDetailsIR) -> None:
        self.out.write(f'  <device dev_id="{d.dev_id}" mapped_blocks="{d.mapped_blocks}" '
                       f'transaction="{d.transaction}" creation_time="{d.creation_time}" '
                       f'snap_time="{d.snap_time}">\n')

    def map(self, runs: Runs) -> None:
        # one printf-style format of the whole batch (C does the per-row work): ~1.5x the f-string per row
        tb, db = runs.steps
        t, n = runs.equals[0], runs.lengths
        k = len(n)
        if not k:
            return
        single = n == 1
        if bool(single.all()):
            self.out.write((_SINGLE * k) % tuple(np.stack([tb, db, t], axis=1).ravel().tolist()))
        elif not bool(single.any()):
            self.out.write((_RANGE * k) % tuple(np.stack([tb, db, n, t], axis=1).ravel().tolist()))
        else:
            template = "".join([_SINGLE if one else _RANGE for one in single.tolist()])
            cols = np.stack([tb, db, np.where(single, t, n), t], axis=1)
            used = np.ones((k, 4), dtype=bool)
            used[single, 3] = False  # a single_mapping has three numbers
            self.out.write(template % tuple(cols[used].tolist()))

    def device_e(self) -> None:
        self.out.write("  </device>\n")

    def superblock_e(self) -> None:
        self.out.write("</superblock>\n")

    def eof(self) -> None:
        pass


class HumanWriter:
    """thin_dump -f human_readable."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out

    def superblock_b(self, sb: SuperblockIR) -> None:
        self.out.write(f'begin superblock: "{sb.uuid}", {sb.time}, {sb.transaction}, {sb.flags}, {sb.version}, '
                       f'{sb.data_block_size}, {sb.nr_data_blocks}\n')

    def device_b(self, d: DeviceDetailsIR) -> None:
        self.out.write(f"device: {d.dev_id}\nmapped_blocks: {d.mapped_blocks}\ntransaction: {d.transaction}\n"
                       f"creation time: {d.creation_time}\nsnap time: {d.snap_time}\n")

    def map(self, runs: Runs) -> None:
        self.out.write("".join(
            f"    {tb} -> {db}, {t}\n" if n == 1 else f"    ({tb}..{tb + n - 1}) -> ({db}..{db + n - 1}), {t}\n"
            for tb, db, t, n in runs.rows()))

    def device_e(self) -> None:
        self.out.write("\n")

    def superblock_e(self) -> None:
        self.out.write("end superblock\n")

    def eof(self) -> None:
        pass


class JsonWriter:
    """The dump as JSON, streamed, laid out as ``json.dumps(..., indent=2)`` lays out
    ``{"superblock": {...}, "devices": [{..., "mappings": [{origin_begin, data_begin, length, time}]}]}``."""

    def __init__(self, out: IO[str], *, skip_mappings: bool = False) -> None:
        self.out = out
        self.skip_mappings = skip_mappings
        self._nr_devices = 0
        self._nr_runs = 0

    def superblock_b(self, sb: SuperblockIR) -> None:
        attrs = {"time": sb.time, "transaction": sb.transaction, "flags": sb.flags, "version": sb.version,
                 "data_block_size": sb.data_block_size, "nr_data_blocks": sb.nr_data_blocks}
        body = json.dumps(attrs, indent=2).replace("\n", "\n  ")
        self.out.write('{\n  "superblock": ' + body + ',\n  "devices": [')

    def device_b(self, d: DeviceDetailsIR) -> None:
        attrs = {"dev_id": d.dev_id, "mapped_blocks": d.mapped_blocks, "transaction": d.transaction,
                 "creation_time": d.creation_time, "snap_time": d.snap_time}
        body = json.dumps(attrs, indent=2).replace("\n", "\n    ")[:-6]  # drop the closing "\n    }"
        self.out.write(("," if self._nr_devices else "") + "\n    " + body)
        if not self.skip_mappings:
            self.out.write(',\n      "mappings": [')
        self._nr_devices += 1
        self._nr_runs = 0

    def map(self, runs: Runs) -> None:
        ind = "\n" + " " * 10
        parts = []
        for tb, db, t, n in runs.rows():
            parts.append(("," if self._nr_runs else "") + "\n        {" + ind + f'"origin_begin": {tb},' + ind +
                         f'"data_begin": {db},' + ind + f'"length": {n},' + ind + f'"time": {t}' + "\n        }")
            self._nr_runs += 1
        self.out.write("".join(parts))

    def device_e(self) -> None:
        if not self.skip_mappings:
            self.out.write("\n      ]" if self._nr_runs else "]")
        self.out.write("\n    }")

    def superblock_e(self) -> None:
        self.out.write("\n  ]\n}\n" if self._nr_devices else "]\n}\n")

    def eof(self) -> None:
        pass


def dump(pmd: PoolMetadata, visitor: MetadataVisitor, *, dev_ids: Sequence[int] | None = None,
         skip_mappings: bool = False, progress: Callable[[int], None] | None = None) -> None:
    """Feed ``visitor`` the IR of ``pmd`` (thin_dump's selection: every device, or ``dev_ids``)."""
    emit(pmd, visitor, dev_ids=dev_ids, skip_mappings=skip_mappings, progress=progress)


def dump_xml(pmd: PoolMetadata, out: IO[str], *, dev_id: int | None = None, skip_mappings: bool = False,
             progress: Callable[[int], None] | None = None) -> None:
    """Write thin_dump 0.9.0's XML for ``pmd`` to ``out``."""
    dump(pmd, XmlWriter(out), dev_ids=None if dev_id is None else [dev_id], skip_mappings=skip_mappings,
         progress=progress)


def dump_human(pmd: PoolMetadata, out: IO[str], *, dev_id: int | None = None, skip_mappings: bool = False) -> None:
    """thin_dump -f human_readable."""
    dump(pmd, HumanWriter(out), dev_ids=None if dev_id is None else [dev_id], skip_mappings=skip_mappings)


def dump_json(pmd: PoolMetadata, out: IO[str], *, dev_id: int | None = None, skip_mappings: bool = False,
              progress: Callable[[int], None] | None = None) -> None:
    """The JSON form, streamed to ``out``."""
    dump(pmd, JsonWriter(out, skip_mappings=skip_mappings), dev_ids=None if dev_id is None else [dev_id],
         skip_mappings=skip_mappings, progress=progress)


def dump_dict(pmd: PoolMetadata, *, skip_mappings: bool = False) -> dict[str, object]:
    """The JSON form as a dict (small metadata only: it holds every run)."""
    import io

    buf = io.StringIO()
    dump_json(pmd, buf, skip_mappings=skip_mappings)
    return json.loads(buf.getvalue())  # type: ignore[no-any-return]
