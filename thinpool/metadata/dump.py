"""thin_dump's XML (and human-readable) output, character for character as thin-provisioning-tools 0.9.0
prints it, plus a JSON form.

Layer: metadata. May import: metadata.pool_metadata, numpy.

Runs: consecutive mappings merge into one range_mapping while the thin block and the data block both grow by
one and the time stays the same; a run of one is a single_mapping.
"""

from __future__ import annotations

from typing import IO, Iterator

import numpy as np

from thinpool.metadata.pool_metadata import PoolMetadata


def runs(thin: np.ndarray, data: np.ndarray, times: np.ndarray) -> Iterator[tuple[int, int, int, int]]:
    """(thin_begin, data_begin, length, time) runs of sorted mappings."""
    n = len(thin)
    if n == 0:
        return
    t = thin.astype(np.int64)
    d = data.astype(np.int64)
    brk = np.ones(n, dtype=bool)
    brk[1:] = (np.diff(t) != 1) | (np.diff(d) != 1) | (times[1:] != times[:-1])
    starts = np.flatnonzero(brk)
    ends = np.append(starts[1:], n)
    for s, e in zip(starts.tolist(), ends.tolist()):
        yield int(t[s]), int(d[s]), e - s, int(times[s])


def superblock_attrs(pmd: PoolMetadata, *, nr_data_blocks: int | None = None) -> dict[str, int | str]:
    return {"uuid": "", "time": pmd.time, "transaction": pmd.trans_id, "flags": pmd.flags,
            "version": pmd.sb.version, "data_block_size": pmd.data_block_size,
            "nr_data_blocks": pmd.sb.data_sm_root.nr_blocks if nr_data_blocks is None else nr_data_blocks}


def dump_xml(pmd: PoolMetadata, out: IO[str], *, dev_id: int | None = None, skip_mappings: bool = False,
             progress: object | None = None) -> None:
    """Write thin_dump 0.9.0's XML for ``pmd`` to ``out``."""
    a = superblock_attrs(pmd)
    out.write('<superblock uuid="{uuid}" time="{time}" transaction="{transaction}" flags="{flags}" '
              'version="{version}" data_block_size="{data_block_size}" nr_data_blocks="{nr_data_blocks}">\n'
              .format(**a))
    for dev in pmd.device_ids():
        if dev_id is not None and dev != dev_id:
            continue
        d = pmd.devices[dev]
        out.write(f'  <device dev_id="{dev}" mapped_blocks="{d.mapped_blocks}" transaction="{d.transaction_id}" '
                  f'creation_time="{d.creation_time}" snap_time="{d.snapshotted_time}">\n')
        if not skip_mappings:
            lines = []
            for tb, db, length, t in runs(*pmd.mappings(dev)):
                if length == 1:
                    lines.append(f'    <single_mapping origin_block="{tb}" data_block="{db}" time="{t}"/>\n')
                else:
                    lines.append(f'    <range_mapping origin_begin="{tb}" data_begin="{db}" length="{length}" '
                                 f'time="{t}"/>\n')
                if len(lines) >= 4096:
                    out.write("".join(lines))
                    lines = []
            out.write("".join(lines))
        out.write("  </device>\n")
        if progress is not None:
            progress(dev)  # type: ignore[operator]
    out.write("</superblock>\n")


def dump_human(pmd: PoolMetadata, out: IO[str]) -> None:
    """thin_dump -f human_readable."""
    a = superblock_attrs(pmd)
    out.write(f'begin superblock: "", {a["time"]}, {a["transaction"]}, {a["flags"]}, {a["version"]}, '
              f'{a["data_block_size"]}, {a["nr_data_blocks"]}\n')
    for dev in pmd.device_ids():
        d = pmd.devices[dev]
        out.write(f"device: {dev}\nmapped_blocks: {d.mapped_blocks}\ntransaction: {d.transaction_id}\n"
                  f"creation time: {d.creation_time}\nsnap time: {d.snapshotted_time}\n")
        for tb, db, length, t in runs(*pmd.mappings(dev)):
            if length == 1:
                out.write(f"    {tb} -> {db}, {t}\n")
            else:
                out.write(f"    ({tb}..{tb + length - 1}) -> ({db}..{db + length - 1}), {t}\n")
        out.write("\n")
    out.write("end superblock\n")


def dump_dict(pmd: PoolMetadata, *, skip_mappings: bool = False) -> dict[str, object]:
    """The same content as a JSON-ready dict."""
    devs = []
    for dev in pmd.device_ids():
        d = pmd.devices[dev]
        entry: dict[str, object] = {"dev_id": dev, "mapped_blocks": d.mapped_blocks,
                                    "transaction": d.transaction_id, "creation_time": d.creation_time,
                                    "snap_time": d.snapshotted_time}
        if not skip_mappings:
            entry["mappings"] = [{"origin_begin": tb, "data_begin": db, "length": n, "time": t}
                                 for tb, db, n, t in runs(*pmd.mappings(dev))]
        devs.append(entry)
    sb = superblock_attrs(pmd)
    sb.pop("uuid")
    return {"superblock": sb, "devices": devs}
