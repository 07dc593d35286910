"""thin_ls as a library call: one row per device with the fields asked for, computed only when asked for.

Layer: tools. May import: thinpool.metadata, thinpool.tools.sharing.

The default fields (DEV, MAPPED, CREATE_TIME, SNAP_TIME) and every MAPPED_* / time / TRANSACTION field come
from the device-details tree alone, as thin_ls computes them, so listing 10,000 snapshots reads no mapping
tree, and a ``metadata.readonly.ReadOnlyMetadata`` view (no space map, no transaction manager, no numpy) serves
them (``needs_mappings`` says when a full ``PoolMetadata`` is needed). EXCLUSIVE_* / SHARED_* walk the mapping
trees once (``tools.sharing``: bit maps over the data device, no per-mapping memory); HIGHEST_BLOCK descends one
spine per device.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from thinpool.errors import InvalidArgument

if TYPE_CHECKING:
    from thinpool.metadata.pool_metadata import PoolMetadata
    from thinpool.metadata.readonly import ReadOnlyMetadata
    from thinpool.tools.sharing import Sharing

LS_FIELDS = ("DEV", "MAPPED_BLOCKS", "EXCLUSIVE_BLOCKS", "SHARED_BLOCKS", "MAPPED_SECTORS", "EXCLUSIVE_SECTORS",
             "SHARED_SECTORS", "MAPPED_BYTES", "EXCLUSIVE_BYTES", "SHARED_BYTES", "MAPPED", "EXCLUSIVE", "SHARED",
             "TRANSACTION", "CREATE_TIME", "SNAP_TIME", "HIGHEST_BLOCK")
LS_DEFAULT = ("DEV", "MAPPED", "CREATE_TIME", "SNAP_TIME")
SIZE_FIELDS = ("MAPPED", "EXCLUSIVE", "SHARED")  # human sizes in text; numbers (bytes, blocks) in JSON
_NEEDS_SHARING = frozenset(f for f in LS_FIELDS if f.startswith(("EXCLUSIVE", "SHARED")))
_NEEDS_MAPPINGS = _NEEDS_SHARING | {"HIGHEST_BLOCK"}

Value = int | str | None
_U64 = (1 << 64) - 1  # thin_ls computes sizes in uint64_t: a damaged count wraps there as here (not an IndexError)


def disk_unit(nbytes: int) -> str:
    """thin-provisioning-tools' format_disk_unit: 0, 512, 384KiB, 38MiB (rounded)."""
    units = ("", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
    i = 0
    while nbytes > 1024 * 1024:
        nbytes //= 1024
        i += 1
    if nbytes > 8 * 1024:
        nbytes = (nbytes + 512) // 1024  # C round(): halves away from zero (312.5 -> 313), not Python's to-even
        i += 1
    return f"{nbytes}{units[i]}"


def check_fields(fields: Sequence[str]) -> list[str]:
    """The fields, validated. Raises InvalidArgument naming the first unknown one."""
    chosen = [f.strip().upper() for f in fields if f.strip()]
    bad = [f for f in chosen if f not in LS_FIELDS]
    if bad or not chosen:
        raise InvalidArgument(reason=f"unknown field {bad[0] if bad else ''!r}; use: {', '.join(LS_FIELDS)}")
    return chosen


def needs_mappings(fields: Iterable[str]) -> bool:
    """Whether some of ``fields`` (validated names) read the mapping trees, so that ``ls_rows`` needs a
    ``PoolMetadata`` rather than a ``ReadOnlyMetadata`` view."""
    return not _NEEDS_MAPPINGS.isdisjoint(fields)


def ls_rows(md: PoolMetadata | ReadOnlyMetadata, fields: Sequence[str] = LS_FIELDS) -> list[dict[str, Value]]:
    """Per device (ascending id): the requested fields (names in ``LS_FIELDS``), plus the raw numbers behind
    them. ``md`` may be a ``ReadOnlyMetadata`` view unless ``needs_mappings(fields)``. Sizes: *_BLOCKS in data
    blocks, *_SECTORS in 512-byte sectors, *_BYTES in bytes, MAPPED/EXCLUSIVE/SHARED as thin_ls prints them
    (``disk_unit``). HIGHEST_BLOCK is None for a device with no mappings.

    Raises:
        InvalidArgument (unknown field; or a field that reads mappings asked of a view), MetadataCorrupt.
    """
    chosen = set(check_fields(fields))
    full: PoolMetadata | None = None
    if needs_mappings(chosen):
        from thinpool.metadata.pool_metadata import PoolMetadata

        if not isinstance(md, PoolMetadata):
            raise InvalidArgument(reason=f"fields {sorted(chosen & _NEEDS_MAPPINGS)} read the mapping trees: "
                                         "open the metadata as PoolMetadata")
        full = md
    sharing: Sharing | None = None
    if full is not None and chosen & _NEEDS_SHARING:  # imported here: the default fields need neither it nor numpy
        from thinpool.tools.sharing import Sharing

        sharing = Sharing(full)
    bs = md.data_block_size  # sectors
    rows: list[dict[str, Value]] = []
    for dev_id in md.device_ids():
        d = md.get_device(dev_id)
        mapped = d.mapped_blocks
        row: dict[str, Value] = {"DEV": dev_id, "MAPPED_BLOCKS": mapped, "MAPPED_SECTORS": mapped * bs & _U64,
                                 "MAPPED_BYTES": mapped * bs * 512 & _U64,
                                 "MAPPED": disk_unit(mapped * bs * 512 & _U64),
                                 "TRANSACTION": d.transaction_id, "CREATE_TIME": d.creation_time,
                                 "SNAP_TIME": d.snapshotted_time}
        if sharing is not None:
            excl = sharing.exclusive_blocks(dev_id)
            shared = mapped - excl & _U64
            row.update({"EXCLUSIVE_BLOCKS": excl, "SHARED_BLOCKS": shared, "EXCLUSIVE_SECTORS": excl * bs,
                        "SHARED_SECTORS": shared * bs & _U64, "EXCLUSIVE_BYTES": excl * bs * 512,
                        "SHARED_BYTES": shared * bs * 512 & _U64, "EXCLUSIVE": disk_unit(excl * bs * 512),
                        "SHARED": disk_unit(shared * bs * 512 & _U64)})
        if full is not None and "HIGHEST_BLOCK" in chosen:
            row["HIGHEST_BLOCK"] = full.highest_mapped(dev_id)
        rows.append(row)
    return rows


def ls_json(rows: Sequence[dict[str, Value]], fields: Sequence[str]) -> list[dict[str, Value]]:
    """JSON records: lower-case field names; the human size fields become numbers, ``<field>_bytes`` and
    ``<field>_blocks`` (``"mapped": "192KiB"`` becomes ``"mapped_bytes": 196608, "mapped_blocks": 3``)."""
    out = []
    for r in rows:
        rec: dict[str, Value] = {}
        for f in check_fields(fields):
            if f in SIZE_FIELDS:
                rec[f"{f.lower()}_bytes"] = r[f"{f}_BYTES"]
                rec[f"{f.lower()}_blocks"] = r[f"{f}_BLOCKS"]
            else:
                rec[f.lower()] = r[f]
        out.append(rec)
    return out


def render_grid(rows: Sequence[Sequence[str]]) -> str:
    """thin_ls's grid: every column right-justified to its widest cell, each cell followed by a space."""
    if not rows:
        return ""
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(max(len(r) for r in rows))]
    return "".join("".join(c.rjust(widths[i]) + " " for i, c in enumerate(r)) + "\n" for r in rows)


def ls_text(rows: Sequence[dict[str, Value]], fields: Sequence[str], *, headers: bool = True) -> str:
    """thin_ls's output, byte for byte ("-" where a value is absent)."""
    chosen = check_fields(fields)
    grid = [list(chosen)] if headers else []
    grid += [["-" if r[f] is None else str(r[f]) for f in chosen] for r in rows]
    return render_grid(grid)
