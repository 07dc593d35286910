"""The metadata tools in the manner of thin-provisioning-tools: check, dump, restore, ls, delta, rmap, map.

Layer: cli. May import: click, thinpool (numpy, matplotlib and the library only inside the commands).

Each tool takes a pool directory OR a bare metadata file or device (so it also works on metadata copied from a
real LVM pool), as TARGET, --pool or $THINPOOL_POOL. Read-only tools take no lock: they read the last commit.
The text output of dump, ls, delta and rmap is byte for byte that of thin-provisioning-tools 0.9.0.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import IO, Any

import click
from thinpool_cli.output import echo_json, progress, table
from thinpool_cli.params import (
    F,
    device_ref,
    is_pool_dir,
    is_target,
    json_option,
    metadata_path,
    parse_region,
    pool_option,
)

BIG_MAPPINGS = 1 << 20  # mapped blocks above which dump/check show a progress bar (stderr on a terminal only)


def target_option(f: F) -> F:
    """An optional positional TARGET (pool directory or metadata file) plus --pool / $THINPOOL_POOL."""
    return pool_option(click.argument("target", required=False, metavar="[TARGET]")(f))


@contextmanager
def open_metadata(target: str | None, *, use_metadata_snap: bool = False) -> Iterator[Any]:
    """Open a pool directory's or a bare file's metadata read-only (superblock, details and mappings only)."""
    from thinpool.io.block_store import FileBlockStore
    from thinpool.metadata.pool_metadata import PoolMetadata

    store = FileBlockStore(metadata_path(target), readonly=True)
    try:
        yield PoolMetadata.open(store, readonly=True, space_maps=False, use_metadata_snap=use_metadata_snap)
    finally:
        store.close()


@contextmanager
def _output(path: str | None) -> Iterator[IO[str]]:
    """stdout, or FILE written through a temporary name and renamed when complete (no half-written FILE)."""
    if path is None:
        yield sys.stdout
        return
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# --- check ------------------------------------------------------------------------------------------------------
_STEPS = ("examining superblock", "examining devices tree", "examining mapping tree", "checking space map counts")


def _step(section: str) -> int:
    if section.startswith("superblock"):
        return 0
    if section.startswith("devices tree"):
        return 1
    if section.startswith("space map"):
        return 3
    return 2  # mapping tree, metadata snapshot, mapping times


@click.command("check")
@target_option
@click.option("-q", "--quiet", is_flag=True, help="No output; just the exit status.")
@click.option("--super-block-only", is_flag=True, help="Only check the superblock.")
@click.option("--skip-mappings", is_flag=True, help="Do not walk the bottom-level mapping trees.")
@click.option("--ignore-non-fatal-errors", is_flag=True, help="Leaked blocks do not fail the check.")
@click.option("--clear-needs-check-flag", is_flag=True, help="Clear NEEDS_CHECK when the check passes.")
@click.option("-m", "--metadata-snap", is_flag=True, help="Check through the held metadata snapshot.")
@json_option
def check(target: str | None, pool_path: str | None, quiet: bool, super_block_only: bool, skip_mappings: bool,
          ignore_non_fatal_errors: bool, clear_needs_check_flag: bool, metadata_snap: bool, as_json: bool) -> None:
    """Check metadata like thin_check: exit 0 when consistent, 1 when not.

    Prints thin_check's steps on stderr and TRANSACTION_ID= / METADATA_FREE_BLOCKS= on stdout (as thin_check
    0.9.0, METADATA_FREE_BLOCKS is the metadata device's blocks minus the superblock; --json gives the real count).

    Example: thinpool check mypool   (or: thinpool check mypool/metadata)
    """
    from thinpool.io.block_store import FileBlockStore
    from thinpool.metadata.check import check_metadata

    path = metadata_path(target or pool_path)
    store = FileBlockStore(path, readonly=True)
    try:
        with _spinner("checking metadata", store.nr_blocks):
            report = check_metadata(store, use_metadata_snap=metadata_snap, skip_mappings=skip_mappings)
        nr_blocks = store.nr_blocks
    finally:
        store.close()
    sb_problems = [p for p in report.problems if _step(p.section) == 0]
    problems = sb_problems if super_block_only else report.problems
    failed = any(p.fatal for p in problems) or (not ignore_non_fatal_errors and any(
        not p.fatal and not p.warning for p in problems))
    cleared = False
    if clear_needs_check_flag and not failed and report.needs_check:
        _clear_needs_check(target or pool_path or path, path)
        cleared = True
    if as_json:
        echo_json(_check_json(report, problems, failed, cleared))
    elif not quiet:
        _print_check(report, problems, 0 if super_block_only else 3, nr_blocks, cleared)
    if failed:
        raise click.exceptions.Exit(1)


def _check_json(report: Any, problems: list[Any], failed: bool, cleared: bool) -> dict[str, Any]:
    return {"ok": not failed, "transaction_id": report.transaction_id, "needs_check": report.needs_check,
            "needs_check_cleared": cleared, "metadata_blocks": report.metadata_blocks,
            "metadata_free_blocks": report.metadata_free_blocks, "data_blocks": report.data_blocks,
            "data_used_blocks": report.data_used_blocks, "devices": report.devices, "mappings": report.mappings,
            "errors": [_problem(p) for p in problems if p.fatal],
            "leaks": [_problem(p) for p in problems if not p.fatal and not p.warning],
            "warnings": [_problem(p) for p in problems if p.warning]}


def _print_check(report: Any, problems: list[Any], last_step: int, nr_blocks: int, cleared: bool) -> None:
    """thin_check 0.9.0's layout: steps on stderr with their problems indented, the two KEY=VALUE lines on stdout
    once the superblock is good, and no further steps after one that found errors."""
    err = sys.stderr
    for i, title in enumerate(_STEPS[:last_step + 1]):
        err.write(title + "\n")
        here = [p for p in problems if _step(p.section) == i]
        for p in here:
            tag = "(warning) " if p.warning else "(leak) " if not p.fatal else ""
            err.write(f"  {tag}{p}\n")
        if i == 0 and not here:
            click.echo(f"TRANSACTION_ID={report.transaction_id}")
            click.echo(f"METADATA_FREE_BLOCKS={max(nr_blocks - 1, 0)}")
        if any(p.fatal for p in here):
            break
    if cleared:
        err.write("cleared needs_check flag\n")
    err.flush()


def _problem(p: Any) -> dict[str, Any]:
    return {"section": p.section, "message": p.message, "block": p.block}


def _clear_needs_check(target: str, md_path: str) -> None:
    """Clear NEEDS_CHECK and commit (taking the pool's lock when the target is a pool directory)."""
    from pathlib import Path

    from thinpool.io.block_store import FileBlockStore
    from thinpool.metadata.pool_metadata import PoolMetadata
    from thinpool.pool import Pool

    lock_fd = Pool._take_lock(Path(target)) if is_pool_dir(target) else None
    try:
        md = PoolMetadata.open(FileBlockStore(md_path), allow_needs_check=True)
        try:
            md.clear_needs_check()
            md.commit()
        finally:
            md.close()
    finally:
        if lock_fd is not None:
            os.close(lock_fd)


@contextmanager
def _spinner(text: str, nr_metadata_blocks: int) -> Iterator[None]:
    """An indeterminate progress display on stderr for long checks of large metadata (terminals only)."""
    if not sys.stderr.isatty() or nr_metadata_blocks < 65536:
        yield
        return
    from rich.console import Console

    with Console(file=sys.stderr).status(text):
        yield


# --- dump -------------------------------------------------------------------------------------------------------
@click.command("dump")
@target_option
@click.option("-o", "--output", "output", type=click.Path(dir_okay=False), help="Write to FILE instead of stdout.")
@click.option("-f", "--format", "fmt", type=click.Choice(["xml", "human_readable"]), default="xml",
              show_default=True, help="Output format (thin_dump's -f).")
@click.option("-m", "--metadata-snap", is_flag=True, help="Dump through the held metadata snapshot.")
@click.option("--dev-id", type=int, help="Only this device.")
@click.option("--skip-mappings", is_flag=True, help="Devices without their mappings.")
@json_option
def dump(target: str | None, pool_path: str | None, output: str | None, fmt: str, metadata_snap: bool,
         dev_id: int | None, skip_mappings: bool, as_json: bool) -> None:
    """Dump metadata as thin_dump's XML (byte for byte), its human-readable form, or JSON.

    Example: thinpool dump mypool -o mypool.xml
    """
    from thinpool.metadata.dump import dump_dict, dump_human, dump_xml

    with open_metadata(target or pool_path, use_metadata_snap=metadata_snap) as pmd:
        if dev_id is not None and dev_id not in pmd.devices:
            from thinpool.errors import DeviceNotFound

            raise DeviceNotFound(dev_id=dev_id)
        with _output(output) as out:
            if as_json:
                d = dump_dict(pmd, skip_mappings=skip_mappings)
                if dev_id is not None:
                    d["devices"] = [x for x in d["devices"] if x["dev_id"] == dev_id]  # type: ignore[attr-defined]
                out.write(json.dumps(d, indent=2) + "\n")
            elif fmt == "human_readable":
                dump_human(pmd, out)
            else:
                devs = [dev_id] if dev_id is not None else pmd.device_ids()
                total = sum(pmd.devices[d].mapped_blocks for d in devs)
                with progress("dumping", len(devs), min_total=1 if total >= BIG_MAPPINGS else 1 << 62) as bar:
                    dump_xml(pmd, out, dev_id=dev_id, skip_mappings=skip_mappings,
                             progress=lambda _dev: bar.advance(1))


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
    import pathlib

    from thinpool.metadata.restore import parse_xml
    from thinpool.pool import Pool

    ir = parse_xml(xml_path)
    chunk = _validate_ir(ir)
    pool_dir = os.path.isdir(output)
    md_path = os.path.join(output, "metadata") if pool_dir else output
    lock_fd = Pool._take_lock(pathlib.Path(output)) if pool_dir else None
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
        _, data_blocks, _ = dev.arrays()
        if len(data_blocks) and int(data_blocks.max()) >= ir.nr_data_blocks:
            raise InvalidArgument(reason=f"device {dev.dev_id}: mapping beyond end of data device "
                                         f"({int(data_blocks.max())} >= {ir.nr_data_blocks})")
    return chunk


def _restore_file(ir: Any, chunk: int, md_path: str, force: bool) -> None:
    """Build the metadata in memory (a failure leaves the target untouched), then write it, superblock last."""
    from thinpool.errors import InvalidArgument
    from thinpool.io.block_store import FileBlockStore, MemoryBlockStore
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
    mem = MemoryBlockStore(nr_blocks)
    do_restore(ir, mem)
    if not os.path.exists(md_path):
        with open(md_path, "wb") as f:
            f.truncate(nr_blocks * 4096)
    store = FileBlockStore(md_path)
    try:
        for b in sorted(mem.blocks):
            if b:
                store.write_block(b, mem.blocks[b])
        store.sync()
        store.write_block(0, mem.blocks[0])
        store.sync()
    finally:
        store.close()
    PoolMetadata.open(FileBlockStore(md_path, readonly=True), readonly=True).close()


def _write_restored_manifest(pool_dir: str, ir: Any, chunk: int) -> None:
    """pool.json for restored metadata: existing entries kept for surviving devices, new ones sized to their
    highest mapped chunk (the metadata wins, as on Pool.open)."""
    path = os.path.join(pool_dir, "pool.json")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        manifest = {"format": 1, "options": {}}
    old = manifest.get("devices", {}) if isinstance(manifest.get("devices"), dict) else {}
    devices = {}
    for dev in ir.devices:
        thin, _, _ = dev.arrays()
        need = (int(thin.max()) + 1) * chunk if len(thin) else chunk
        e = old.get(str(dev.dev_id)) or {"name": str(dev.dev_id), "origin": None, "size": 0}
        e["size"] = max(int(e.get("size", 0)), need)
        devices[str(dev.dev_id)] = e
    manifest["devices"] = devices
    manifest["transaction_id"] = ir.transaction
    manifest.setdefault("format", 1)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


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


# --- ls ---------------------------------------------------------------------------------------------------------
LS_FIELDS = ("DEV", "MAPPED_BLOCKS", "EXCLUSIVE_BLOCKS", "SHARED_BLOCKS", "MAPPED_SECTORS", "EXCLUSIVE_SECTORS",
             "SHARED_SECTORS", "MAPPED_BYTES", "EXCLUSIVE_BYTES", "SHARED_BYTES", "MAPPED", "EXCLUSIVE", "SHARED",
             "TRANSACTION", "CREATE_TIME", "SNAP_TIME", "HIGHEST_BLOCK")
LS_DEFAULT = ("DEV", "MAPPED", "CREATE_TIME", "SNAP_TIME")


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


def ls_rows(pmd: Any) -> list[dict[str, Any]]:
    """Per device: mapped / exclusive / shared blocks (a data block mapped more than once is shared)."""
    import numpy as np

    per_dev = {d: pmd.mappings(d) for d in pmd.device_ids()}
    blocks = [db.astype(np.int64) for _, db, _ in per_dev.values() if len(db)]
    counts = np.bincount(np.concatenate(blocks)) if blocks else np.zeros(0, dtype=np.int64)
    bs = pmd.data_block_size  # sectors
    rows = []
    for dev_id, (tb, db, _) in per_dev.items():
        d = pmd.devices[dev_id]
        excl = int(np.count_nonzero(counts[db.astype(np.int64)] == 1)) if len(db) else 0
        mapped = d.mapped_blocks
        shared = mapped - excl
        rows.append({
            "DEV": dev_id, "MAPPED_BLOCKS": mapped, "EXCLUSIVE_BLOCKS": excl, "SHARED_BLOCKS": shared,
            "MAPPED_SECTORS": mapped * bs, "EXCLUSIVE_SECTORS": excl * bs, "SHARED_SECTORS": shared * bs,
            "MAPPED_BYTES": mapped * bs * 512, "EXCLUSIVE_BYTES": excl * bs * 512, "SHARED_BYTES": shared * bs * 512,
            "MAPPED": disk_unit(mapped * bs * 512), "EXCLUSIVE": disk_unit(excl * bs * 512),
            "SHARED": disk_unit(shared * bs * 512), "TRANSACTION": d.transaction_id,
            "CREATE_TIME": d.creation_time, "SNAP_TIME": d.snapshotted_time,
            "HIGHEST_BLOCK": int(tb[-1]) if len(tb) else None,
        })
    return rows


def render_grid(rows: Sequence[Sequence[str]]) -> str:
    """thin_ls's grid: every column right-justified to its widest cell, each cell followed by a space."""
    if not rows:
        return ""
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(max(len(r) for r in rows))]
    return "".join("".join(c.rjust(widths[i]) + " " for i, c in enumerate(r)) + "\n" for r in rows)


@click.command("ls")
@target_option
@click.option("-o", "--format", "fields", metavar="FIELDS",
              help=f"Comma-separated fields: {', '.join(LS_FIELDS)}. Default: {','.join(LS_DEFAULT)}.")
@click.option("--no-headers", is_flag=True, help="No header line.")
@click.option("-m", "--metadata-snap", is_flag=True, help="Read through the held metadata snapshot.")
@json_option
def ls(target: str | None, pool_path: str | None, fields: str | None, no_headers: bool, metadata_snap: bool,
       as_json: bool) -> None:
    """List thin devices like thin_ls: mapped, exclusive and shared space, times.

    Example: thinpool ls mypool -o DEV,MAPPED,EXCLUSIVE,SHARED
    """
    chosen = list(LS_DEFAULT)
    if fields is not None:
        chosen = [f.strip() for f in fields.split(",") if f.strip()]
        bad = [f for f in chosen if f not in LS_FIELDS]
        if bad or not chosen:
            raise click.BadParameter(f"unknown field {bad[0] if bad else fields!r}; use: {', '.join(LS_FIELDS)}",
                                     param_hint="'-o'")
    with open_metadata(target or pool_path, use_metadata_snap=metadata_snap) as pmd:
        rows = ls_rows(pmd)
    if as_json:
        echo_json([{f.lower(): r[f] for f in chosen} for r in rows])
        return
    grid = [] if no_headers else [list(chosen)]
    grid += [["-" if r[f] is None else str(r[f]) for f in chosen] for r in rows]
    click.echo(render_grid(grid), nl=False)


# --- delta ------------------------------------------------------------------------------------------------------
def _split_target(args: Sequence[str]) -> tuple[list[str], str | None]:
    """Positional arguments -> (the others, the target): the last one is the target when it names a path."""
    rest = list(args)
    if rest and is_target(rest[-1]):
        return rest[:-1], rest[-1]
    return rest, None


def _pool_device_names(target: str | None) -> dict[str, int]:
    if target and os.path.isdir(target):
        try:
            with open(os.path.join(target, "pool.json")) as f:
                m = json.load(f)
            return {str(e.get("name")): int(k) for k, e in m.get("devices", {}).items()}
        except (OSError, ValueError):
            return {}
    return {}


def _dev_id(ref: str, names: dict[str, int], what: str) -> int:
    v = device_ref(ref)
    if isinstance(v, int):
        return v
    if v in names:
        return names[v]
    from thinpool.errors import DeviceNotFound

    raise DeviceNotFound(dev_id=ref)


@click.command("delta")
@click.argument("args", nargs=-1, metavar="[ID1 ID2] [TARGET]")
@click.option("--snap1", "--thin1", "snap1", help="The left device (id or name).")
@click.option("--snap2", "--thin2", "snap2", help="The right device (id or name).")
@click.option("--verbose", is_flag=True, help="Show data block numbers.")
@click.option("-m", "--metadata-snap", is_flag=True, help="Read through the held metadata snapshot.")
@pool_option
@json_option
def delta(args: tuple[str, ...], snap1: str | None, snap2: str | None, verbose: bool, metadata_snap: bool,
          pool_path: str | None, as_json: bool) -> None:
    """Differences between two thin devices' mappings, like thin_delta (XML).

    Example: thinpool delta 1 2 mypool   (or: thinpool delta --snap1 1 --snap2 2 mypool/metadata)
    """
    rest, target = _split_target(args)
    ids = [s for s in (snap1, snap2) if s is not None] + rest
    if len(ids) != 2 or (snap1 is None) != (snap2 is None):
        raise click.UsageError("give two devices: ID1 ID2, or --snap1 ID1 --snap2 ID2")
    target = target or pool_path
    names = _pool_device_names(target)
    a, b = _dev_id(ids[0], names, "snap1"), _dev_id(ids[1], names, "snap2")
    with open_metadata(target, use_metadata_snap=metadata_snap) as pmd:
        for d in (a, b):
            if d not in pmd.devices:
                from thinpool.errors import DeviceNotFound

                raise DeviceNotFound(dev_id=d)
        from thinpool.tools.delta import delta_runs, write_delta_xml

        runs = delta_runs(pmd, a, b)
        if as_json:
            echo_json({"left": a, "right": b, "data_block_size": pmd.data_block_size,
                       "ranges": [{"kind": r.kind, "begin": r.begin, "length": r.length,
                                   **({"left_data_begin": r.left_data} if r.left_data is not None else {}),
                                   **({"right_data_begin": r.right_data} if r.kind != "same"
                                      and r.right_data is not None else {})}
                                  for r in runs]})
            return
        nr_data = 0 if metadata_snap else pmd.sb.data_sm_root.nr_blocks
        # through the snapshot, the superblock shown is the snapshot's copy, which holds no snapshot itself
        write_delta_xml(sys.stdout, pmd, a, b, runs, verbose=verbose, nr_data_blocks=nr_data,
                        held_root=0 if metadata_snap else pmd.held_root)


# --- rmap -------------------------------------------------------------------------------------------------------
def std_sort(a: list[Any], less: Callable[[Any, Any], bool]) -> None:
    """libstdc++'s std::sort (introsort: median-of-three quicksort, heapsort fallback, final insertion sort), so
    that elements with equal keys end up in the same order as thin_rmap (C++) leaves them."""
    n = len(a)
    if n < 2:
        return
    _introsort_loop(a, 0, n, 2 * (n.bit_length() - 1), less)
    _final_insertion_sort(a, 0, n, less)


_THRESHOLD = 16


def _introsort_loop(a: list[Any], first: int, last: int, depth: int, less: Callable[[Any, Any], bool]) -> None:
    while last - first > _THRESHOLD:
        if depth == 0:
            _heap_sort(a, first, last, less)
            return
        depth -= 1
        mid = first + (last - first) // 2
        _move_median_to_first(a, first, first + 1, mid, last - 1, less)
        cut = _unguarded_partition(a, first + 1, last, first, less)
        _introsort_loop(a, cut, last, depth, less)
        last = cut


def _move_median_to_first(a: list[Any], result: int, x: int, y: int, z: int, less: Callable[[Any, Any], bool]) -> None:
    if less(a[x], a[y]):
        if less(a[y], a[z]):
            m = y
        elif less(a[x], a[z]):
            m = z
        else:
            m = x
    elif less(a[x], a[z]):
        m = x
    elif less(a[y], a[z]):
        m = z
    else:
        m = y
    a[result], a[m] = a[m], a[result]


def _unguarded_partition(a: list[Any], first: int, last: int, pivot: int, less: Callable[[Any, Any], bool]) -> int:
    while True:
        while less(a[first], a[pivot]):
            first += 1
        last -= 1
        while less(a[pivot], a[last]):
            last -= 1
        if not first < last:
            return first
        a[first], a[last] = a[last], a[first]
        first += 1


def _final_insertion_sort(a: list[Any], first: int, last: int, less: Callable[[Any, Any], bool]) -> None:
    if last - first > _THRESHOLD:
        _insertion_sort(a, first, first + _THRESHOLD, less)
        for i in range(first + _THRESHOLD, last):
            _unguarded_linear_insert(a, i, less)
    else:
        _insertion_sort(a, first, last, less)


def _insertion_sort(a: list[Any], first: int, last: int, less: Callable[[Any, Any], bool]) -> None:
    for i in range(first + 1, last):
        if less(a[i], a[first]):
            v = a[i]
            a[first + 1:i + 1] = a[first:i]
            a[first] = v
        else:
            _unguarded_linear_insert(a, i, less)


def _unguarded_linear_insert(a: list[Any], last: int, less: Callable[[Any, Any], bool]) -> None:
    v = a[last]
    nxt = last - 1
    while less(v, a[nxt]):
        a[last] = a[nxt]
        last = nxt
        nxt -= 1
    a[last] = v


def _adjust_heap(a: list[Any], first: int, hole: int, length: int, value: Any,
                 less: Callable[[Any, Any], bool]) -> None:
    top = hole
    child = hole
    while child < (length - 1) // 2:
        child = 2 * (child + 1)
        if less(a[first + child], a[first + child - 1]):
            child -= 1
        a[first + hole] = a[first + child]
        hole = child
    if length % 2 == 0 and child == (length - 2) // 2:
        child = 2 * (child + 1)
        a[first + hole] = a[first + child - 1]
        hole = child - 1
    parent = (hole - 1) // 2
    while hole > top and less(a[first + parent], value):
        a[first + hole] = a[first + parent]
        hole = parent
        parent = (hole - 1) // 2
    a[first + hole] = value


def _heap_sort(a: list[Any], first: int, last: int, less: Callable[[Any, Any], bool]) -> None:
    length = last - first
    if length >= 2:
        parent = (length - 2) // 2
        while True:
            _adjust_heap(a, first, parent, length, a[first + parent], less)
            if parent == 0:
                break
            parent -= 1
    while last - first > 1:
        last -= 1
        value = a[last]
        a[last] = a[first]
        _adjust_heap(a, first, 0, last - first, value, less)


def _leaves_unseen(pmd: Any, root: int, seen: set[int]) -> Iterator[tuple[Any, Any]]:
    """(thin blocks, data blocks) of each leaf of a device's mapping tree, depth first, skipping every node
    already visited in this walk: thin_rmap's btree_damage_visitor avoids repeated visits, so a subtree shared by
    a snapshot is reported once, for the lowest device id that reaches it."""
    import numpy as np

    from thinpool.btree.node import decode_node

    stack = [root]
    while stack:
        b = stack.pop()
        if b in seen:
            continue
        seen.add(b)
        node = decode_node(pmd.store.read_block(b), b, 8)
        if node.is_leaf:
            if node.nr_entries:
                keys = np.frombuffer(node.keys, dtype="<u8").astype(np.int64)
                vals = (np.frombuffer(node.values, dtype="<u8") >> np.uint64(24)).astype(np.int64)  # type: ignore[arg-type]
                yield keys, vals
        else:
            stack.extend(reversed([int(v) for v in node.values]))


def rmap_regions(pmd: Any, regions: Sequence[tuple[int, int]]) -> list[tuple[int, int, int, int]]:
    """thin_rmap: (data_begin, data_end, dev_id, thin_begin) runs for data blocks in ``regions``, in thin_rmap's
    order (visited by device then thin block, shared nodes once, then std::sort by data_begin)."""
    import numpy as np

    out: list[list[int]] = []
    cur: list[int] | None = None  # [data_begin, data_end, dev, thin_begin]
    seen: set[int] = set()
    for dev_id in pmd.device_ids():
        for t, d in _leaves_unseen(pmd, pmd.device_root(dev_id), seen):
            keep = np.zeros(len(d), dtype=bool)
            for lo, hi in regions:
                keep |= (d >= lo) & (d < hi)
            for thin_block, data_block in zip(t[keep].tolist(), d[keep].tolist()):
                if cur is not None and cur[2] == dev_id and data_block == cur[1] \
                        and thin_block == cur[3] + (cur[1] - cur[0]):
                    cur[1] += 1
                else:
                    if cur is not None:
                        out.append(cur)
                    cur = [data_block, data_block + 1, dev_id, thin_block]
    if cur is not None:
        out.append(cur)
    std_sort(out, lambda x, y: x[0] < y[0])
    return [(a, b, dev, tb) for a, b, dev, tb in out]


@click.command("rmap")
@click.argument("args", nargs=-1, metavar="[REGION...] [TARGET]")
@click.option("--region", "regions", multiple=True, metavar="BEGIN..END",
              help="Data blocks BEGIN..END (END excluded); repeatable.")
@pool_option
@json_option
def rmap(args: tuple[str, ...], regions: tuple[str, ...], pool_path: str | None, as_json: bool) -> None:
    """Which thin blocks map the data blocks of REGION (BEGIN..END), like thin_rmap.

    Example: thinpool rmap 0..100 mypool   (or: thinpool rmap --region 0..100 mypool/metadata)
    """
    rest, target = _split_target(args)
    parsed = [parse_region(r) for r in list(regions) + rest]
    if not parsed:
        raise click.UsageError("no regions given (e.g. 0..100, or --region 0..100)")
    with open_metadata(target or pool_path) as pmd:
        runs = rmap_regions(pmd, parsed)
    if as_json:
        echo_json([{"data_begin": a, "data_end": b, "dev_id": dev, "thin_begin": tb, "thin_end": tb + (b - a)}
                   for a, b, dev, tb in runs])
        return
    click.echo("".join(f"data {a}..{b} -> thin({dev}) {tb}..{tb + (b - a)}\n" for a, b, dev, tb in runs), nl=False)


# --- map --------------------------------------------------------------------------------------------------------
def device_map(pmd: Any, dev_id: int, size: int, counts: Any, origin_size: int = 0) -> list[dict[str, Any]]:
    """qemu-img map --output=json entries for one device (bytes), plus ``shared``: data runs (contiguous in the
    device and in the data device, one sharing state), holes (or the external origin, depth 1) in between."""
    import numpy as np

    ch = pmd.data_block_size * 512
    tb, db, _ = pmd.mappings(dev_id)
    t = tb.astype(np.int64)
    d = db.astype(np.int64)
    shared = counts[d] > 1 if len(d) else np.zeros(0, dtype=bool)
    out: list[dict[str, Any]] = []

    def gap(a: int, b: int) -> None:
        b = min(b, size)
        if b <= a:
            return
        o = min(max(origin_size, a), b)
        if o > a:
            out.append({"start": a, "length": o - a, "depth": 1, "present": True, "zero": False, "data": True,
                        "offset": a, "shared": False})
        if b > o:
            out.append({"start": o, "length": b - o, "depth": 0, "present": False, "zero": True, "data": False,
                        "shared": False})

    pos = 0
    if len(t):
        brk = np.flatnonzero((np.diff(t) != 1) | (np.diff(d) != 1) | (shared[1:] != shared[:-1])) + 1
        starts = np.concatenate([[0], brk]).tolist()
        ends = np.concatenate([brk, [len(t)]]).tolist()
        for s, e in zip(starts, ends):
            a = int(t[s]) * ch
            if a >= size:
                break
            gap(pos, a)
            n = min((e - s) * ch, size - a)
            out.append({"start": a, "length": n, "depth": 0, "present": True, "zero": False, "data": True,
                        "offset": int(d[s]) * ch, "shared": bool(shared[s])})
            pos = a + n
    gap(pos, size)
    return out


def _map_inputs(target: str | None, pmd: Any) -> dict[int, tuple[str, int, int]]:
    """dev_id -> (name, size bytes, external origin size): from pool.json for a pool, else from the mappings."""
    ch = pmd.data_block_size * 512
    manifest: dict[str, Any] = {}
    if target and os.path.isdir(target):
        try:
            with open(os.path.join(target, "pool.json")) as f:
                manifest = json.load(f).get("devices", {})
        except (OSError, ValueError):
            manifest = {}
    out = {}
    for dev_id in pmd.device_ids():
        e = manifest.get(str(dev_id))
        if e is not None:
            origin = e.get("origin")
            osize = os.path.getsize(origin) if origin and os.path.exists(origin) else 0
            out[dev_id] = (str(e.get("name", dev_id)), int(e["size"]), osize)
        else:
            hi = pmd.highest_mapped(dev_id)
            out[dev_id] = (str(dev_id), 0 if hi is None else (hi + 1) * ch, 0)
    return out


def _human(n: int) -> str:
    from thinpool.units import format_size

    return format_size(n)


@click.command("map")
@click.argument("args", nargs=-1, metavar="[ID...] [TARGET]")
@click.option("-m", "--metadata-snap", is_flag=True, help="Read through the held metadata snapshot.")
@click.option("--png", "png", type=click.Path(dir_okay=False), help="Draw the devices' chunks side by side here.")
@pool_option
@json_option
def map_cmd(args: tuple[str, ...], metadata_snap: bool, png: str | None, pool_path: str | None,
            as_json: bool) -> None:
    """Block map of thin devices: virtual -> data ranges, shared or exclusive, and holes.

    --json prints `qemu-img map --output=json` entries (start, length, depth, present, zero, data, offset in the
    data file) plus "shared"; with several devices, an object keyed by device id. Default: every device.

    Example: thinpool map vol vol-snap --png map.png
    """
    import numpy as np

    rest, target = _split_target(args)
    target = target or pool_path
    names = _pool_device_names(target)
    with open_metadata(target, use_metadata_snap=metadata_snap) as pmd:
        ids = [_dev_id(r, names, "device") for r in rest] or pmd.device_ids()
        for d in ids:
            if d not in pmd.devices:
                from thinpool.errors import DeviceNotFound

                raise DeviceNotFound(dev_id=d)
        inputs = _map_inputs(target, pmd)
        blocks = [pmd.mappings(d)[1].astype(np.int64) for d in pmd.device_ids()]
        allb = np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.int64)
        counts = np.bincount(allb) if len(allb) else np.zeros(1, dtype=np.int64)
        maps = {d: device_map(pmd, d, inputs[d][1], counts, inputs[d][2]) for d in ids}
        ch = pmd.data_block_size * 512
    if png:
        draw_png(png, maps, inputs, ch)
    if as_json:
        echo_json(maps[ids[0]] if len(ids) == 1 and rest else {str(d): m for d, m in maps.items()})
        return
    for d in ids:
        name, size, _ = inputs[d]
        entries = maps[d]
        mapped = sum(e["length"] for e in entries if e["data"] and e["depth"] == 0)
        shared = sum(e["length"] for e in entries if e["shared"])
        click.echo(f"device {d} ({name}): {_human(size)}, chunk {_human(ch)}, mapped {_human(mapped)} "
                   f"(exclusive {_human(mapped - shared)}, shared {_human(shared)})")
        rows = []
        for e in entries:
            a, n = e["start"], e["length"]
            virt = f"{a // ch}..{(a + n - 1) // ch}"
            if e["data"] and e["depth"] == 0:
                data = f"{e['offset'] // ch}..{(e['offset'] + n - 1) // ch}"
                state = "shared" if e["shared"] else "exclusive"
            elif e["data"]:
                data, state = "-", "origin"
            else:
                data, state = "-", "hole"
            rows.append((a, n, virt, data, state))
        table(None, ["start", "length", "virtual chunks", "data chunks", "state"], rows,
              right=["start", "length"])
    if png:
        click.echo(f"wrote {png}", err=True)


COLOURS = {"exclusive": "#1f77b4", "shared": "#ff7f0e", "origin": "#9aa0a6", "hole": "#eeeeee"}


def draw_png(path: str, maps: dict[int, list[dict[str, Any]]], inputs: dict[int, tuple[str, int, int]],
             ch: int) -> None:
    """The devices' chunks side by side (one row each); shared chunks in orange, exclusive in blue."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    ids = list(maps)
    width = max([inputs[d][1] for d in ids] + [ch])
    fig, ax = plt.subplots(figsize=(10, 1.4 + 0.45 * len(ids)), dpi=100)
    for row, d in enumerate(ids):
        bars: dict[str, list[tuple[float, float]]] = {k: [] for k in COLOURS}
        for e in maps[d]:
            kind = ("shared" if e["shared"] else "exclusive") if e["data"] and e["depth"] == 0 else \
                "origin" if e["data"] else "hole"
            bars[kind].append((e["start"] / ch, e["length"] / ch))
        for kind, spans in bars.items():
            if spans:
                ax.broken_barh(spans, (row - 0.4, 0.8), facecolors=COLOURS[kind], linewidth=0)
    ax.set_yticks(range(len(ids)))
    ax.set_yticklabels([f"{d} {inputs[d][0]}" if inputs[d][0] != str(d) else str(d) for d in ids])
    ax.set_xlim(0, width / ch)
    ax.set_ylim(len(ids) - 0.5, -0.5)
    ax.set_xlabel(f"virtual chunk ({ch // 1024} KiB each)")
    ax.set_title("thin device block map", loc="left")
    ax.legend(handles=[Patch(color=c, label=k) for k, c in COLOURS.items()], loc="lower right",
              bbox_to_anchor=(1.0, 1.0), fontsize="small", ncol=4, frameon=False)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


TOOLS = (check, dump, restore, ls, delta, rmap, map_cmd)
