"""`thinpool pool ...`: create a pool, show its status, resize it, and send it dm-thin's pool messages.

Layer: cli. May import: click, thinpool (the library only inside the commands).
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from typing import Any

import click

from thinpool_cli.output import echo_json, kv_table, table
from thinpool_cli.params import CHUNK_SIZE, SIZE, json_option, open_pool, pool_option, require_pool
from thinpool_cli.tools_common import mapping_progress

MAX_METADATA_BYTES = 255 * 16320 * 4096  # dm-thin's usable maximum: 255 bitmaps of 16320 blocks (~15.9 GiB)


@click.group("pool")
def pool() -> None:
    """Create a pool, show its status, resize it, transaction ids, metadata snapshots.

    \b
    Examples:
      thinpool pool create mypool --size 10G --chunk-size 64k
      export THINPOOL_POOL=mypool
      thinpool pool status
    """


def device_rows(p: Any) -> list[dict[str, Any]]:
    """One dict per thin device: id, name (None if unnamed), size, mapped bytes, highest mapped sector, external
    origin, and the lineage (the device it was snapshotted from, which may be deleted, its ancestors, created)."""
    out = []
    for dev_id in p.list_devices():
        dev = p.device(dev_id)
        mapped_sectors, highest = dev.status()
        snap_of = p.origin_of(dev_id)
        out.append({"dev_id": dev_id, "name": p.device_label(dev_id), "size": dev.size, "mapped": mapped_sectors * 512,
                    "highest_sector": highest, "origin": p.origin_path(dev_id), "snapshot_of": snap_of,
                    "snapshot_of_deleted": snap_of is not None and not p.is_live(snap_of),
                    "lineage": p.lineage(dev_id), "created_at": _iso(p.created_at(dev_id))})
    return out


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    import datetime

    return datetime.datetime.fromtimestamp(t, datetime.UTC).isoformat(timespec="seconds")


def snapshot_of_text(d: dict[str, Any]) -> str:
    """The origin column: the id, in brackets when the origin was deleted (as lvs shows a removed origin)."""
    if d["snapshot_of"] is None:
        return "-"
    return f"[{d['snapshot_of']}]" if d["snapshot_of_deleted"] else str(d["snapshot_of"])


def device_table(title: str | None, devs: list[dict[str, Any]]) -> None:
    from thinpool.units import format_size

    table(title, ["id", "name", "size", "mapped", "highest sector", "snapshot of", "created", "origin"],
          [(d["dev_id"], d["name"] or "", format_size(d["size"]), format_size(d["mapped"]),
            "-" if d["highest_sector"] is None else d["highest_sector"], snapshot_of_text(d),
            (d["created_at"] or "-").replace("+00:00", "Z"), d["origin"] or "-") for d in devs],
          right=["id", "size", "mapped", "highest sector"])


def show_status(p: Any, as_json: bool) -> None:
    from thinpool.units import format_size

    st = p.status()
    devs = device_rows(p)
    if as_json:
        d = st.to_dict()
        d["path"] = str(p.path)
        d["nr_devices"] = d.pop("devices")
        d["devices"] = devs
        echo_json(d)
        return
    click.echo(f"{p.path}: {st.dm_line()}")  # pool status PATH --dmsetup prints the dmsetup form alone
    kv_table(None, [
        ("transaction id", st.transaction_id),
        ("data", f"{st.used_data_blocks}/{st.total_data_blocks} chunks "
                 f"({format_size(st.used_data_blocks * st.chunk_size)} of "
                 f"{format_size(st.total_data_blocks * st.chunk_size)})"),
        ("Data%", f"{st.data_percent:.2f}"),
        ("metadata", f"{st.used_metadata_blocks}/{st.total_metadata_blocks} blocks allocated "
                     f"({format_size(st.used_metadata_blocks * 4096)} of "
                     f"{format_size(st.total_metadata_blocks * 4096)}), {st.metadata_reserve_blocks} reserved"),
        ("Meta%", f"{st.metadata_percent:.2f}"),
        ("metadata low-water mark", f"{st.metadata_low_water_blocks} blocks"),
        ("chunk size", format_size(st.chunk_size)),
        ("held metadata root", "-" if st.held_metadata_root is None else st.held_metadata_root),
        ("mode", st.mode),
        ("discard", st.discard),
        ("when out of space", st.no_space_policy),
        ("zero new chunks", "yes" if st.zero else "no"),
        ("needs_check", "yes" if st.needs_check else "no"),
        ("thin devices", st.devices),
    ])
    if devs:
        device_table("thin devices", devs)


@pool.command("create")
@click.argument("path", required=False)
@pool_option
@click.option("-s", "--size", "size", type=SIZE, required=True,
              help="Data size (e.g. 10G); a multiple of the chunk size.")
@click.option("-c", "--chunk-size", type=CHUNK_SIZE, default="64k", show_default=True,
              help="Chunk (data block) size: 64k..1G in 64k steps.")
@click.option("--metadata-size", type=SIZE, help="Metadata size (default: estimated like thin_metadata_size, >= 4M).")
@click.option("--no-zero", is_flag=True, help="Do not zero the unwritten part of newly provisioned chunks.")
@click.option("--discard", type=click.Choice(["passdown", "nopassdown", "ignore"]), default="passdown",
              show_default=True, help="What discards do (dm-thin's discard modes).")
@click.option("--error-if-no-space/--queue-if-no-space", "error_if_no_space", default=True,
              help="When the data is full: fail writes at once (default) or queue them until a resize.")
@click.option("--no-space-timeout", type=click.FloatRange(min=0), default=60.0, show_default=True,
              help="With --queue-if-no-space: seconds a write waits for more space (0 = forever).")
@click.option("--low-water-mark", type=click.IntRange(min=0), default=0, show_default=True,
              help="Free-chunk threshold for an event.")
@json_option
def pool_create(path: str | None, pool_path: str | None, size: int, chunk_size: int, metadata_size: int | None,
                no_zero: bool, discard: str, error_if_no_space: bool, no_space_timeout: float, low_water_mark: int,
                as_json: bool) -> None:
    """Create a pool in directory PATH (or --pool / $THINPOOL_POOL), which must be new or empty.

    Example: thinpool pool create mypool --size 1G --chunk-size 64k
    """
    from thinpool.pool import Pool

    target = _one_pool(path, pool_path)
    if size % chunk_size:
        raise click.BadParameter(f"data size {size} bytes is not a multiple of the chunk size ({chunk_size} bytes)",
                                 param_hint="'--size'")
    # the data space map alone needs one 4 KiB bitmap per 16320 chunks, plus index and tree blocks
    min_metadata = max(64 * 1024, (-(-(size // chunk_size) // 16320) + 64) * 4096)
    if metadata_size is not None and (metadata_size % 4096 or metadata_size < min_metadata):
        raise click.BadParameter(f"metadata size {metadata_size} bytes: must be a multiple of 4k and at least "
                                 f"{min_metadata} bytes for {size // chunk_size} chunks",
                                 param_hint="'--metadata-size'")
    usable = min(metadata_size, MAX_METADATA_BYTES) if metadata_size else None
    if metadata_size is not None and usable is not None and metadata_size > usable:
        click.echo(f"thinpool: warning: --metadata-size {metadata_size} bytes is more than dm-thin can use "
                   f"({usable} bytes, 255 space-map bitmaps): the rest is never used", err=True)
        metadata_size = usable
    p = Pool.create(target, data_size=size, chunk_size=chunk_size, metadata_size=metadata_size,
                    zero=not no_zero, discard=discard, no_space="error" if error_if_no_space else "queue",
                    low_water_mark=low_water_mark, no_space_timeout=no_space_timeout)
    with p:
        if as_json:
            show_status(p, True)
        else:
            click.echo(f"created pool {target}: {size // chunk_size} chunks of {chunk_size // 1024}KiB, "
                       f"{p.nr_metadata_blocks} metadata blocks")


@pool.command("status")
@click.argument("path", required=False)
@pool_option
@click.option("--dmsetup", is_flag=True, help="Print only the line `dmsetup status` prints: 0 LENGTH thin-pool ...")
@json_option
def pool_status(path: str | None, pool_path: str | None, dmsetup: bool, as_json: bool) -> None:
    """The kernel's status line, a readable table (with lvs's Data% and Meta%) and the thin devices.

    The status line is dm-thin's: the used metadata blocks include the kernel's metadata reserve, and the last
    field is the metadata low-water mark. Reads the last commit without a lock (works beside a running writer).

    Example: thinpool pool status mypool
    """
    target = _one_pool(path, pool_path)
    with open_pool(target, readonly=True, lock="none") as p:
        if dmsetup:
            click.echo(p.status().dmsetup_line())
            return
        show_status(p, as_json)


def _one_pool(path: str | None, pool_path: str | None) -> str:
    """The pool from a PATH argument or --pool / $THINPOOL_POOL; a PATH and an explicit --pool must agree."""
    if path and pool_path and os.path.abspath(path) != os.path.abspath(pool_path):
        src = click.get_current_context().get_parameter_source("pool_path")
        if src is not None and src.name == "COMMANDLINE":
            raise click.UsageError(f"PATH {path!r} and --pool {pool_path!r} disagree: give one of them")
    return path or require_pool(pool_path)


@pool.command("resize")
@pool_option
@click.option("-s", "--size", type=SIZE, help="New data size (grow only; a multiple of the chunk size).")
@click.option("--metadata-size", type=SIZE, help="New metadata size (grow only).")
@json_option
def pool_resize(pool_path: str | None, size: int | None, metadata_size: int | None, as_json: bool) -> None:
    """Grow the data device and/or the metadata device.

    Example: thinpool pool resize --size 20G
    """
    from thinpool.errors import PoolLocked
    from thinpool.pool import Pool

    if size is None and metadata_size is None:
        raise click.UsageError("give --size and/or --metadata-size")
    with ExitStack() as stack:
        try:
            p = stack.enter_context(open_pool(pool_path))
        except PoolLocked:
            if size is None or metadata_size is not None:
                raise
            # a writer holds the pool (e.g. one queued for space): grow the data file, which it takes up when it
            # next runs out of space, as dm-thin after a table reload
            nr = Pool.grow_data_file(require_pool(pool_path), size)
            click.echo(f"pool {pool_path} is in use: grew its data file to {nr} chunks; the running writer takes "
                       "them up when it next needs space (a queued write resumes)", err=True)
            return
        if size is not None:
            if size % p.chunk_bytes:
                raise click.BadParameter(f"data size {size} bytes is not a multiple of the chunk size "
                                         f"({p.chunk_bytes} bytes)", param_hint="'--size'")
            p.resize(size)
        if metadata_size is not None:
            if metadata_size % 4096:
                raise click.BadParameter(f"metadata size {metadata_size} is not a multiple of 4k",
                                         param_hint="'--metadata-size'")
            p.resize_metadata(metadata_size)
        show_status(p, as_json) if as_json else click.echo(p.status().dm_line())


@pool.command("set-transaction-id")
@click.argument("current", type=int)
@click.argument("new", type=int)
@pool_option
@json_option
def pool_set_transaction_id(current: int, new: int, pool_path: str | None, as_json: bool) -> None:
    """Compare-and-swap the pool's transaction id (dm-thin's set_transaction_id message).

    Example: thinpool pool set-transaction-id 4 5
    """
    with open_pool(pool_path) as p:
        p.set_transaction_id(current, new)
    if as_json:
        echo_json({"transaction_id": new, "previous": current})
    else:
        click.echo(f"transaction id {current} -> {new}")


@pool.command("reserve-metadata-snap")
@pool_option
@json_option
def pool_reserve_metadata_snap(pool_path: str | None, as_json: bool) -> None:
    """Take a metadata snapshot (read it with dump -m / ls -m / delta -m).

    Example: thinpool pool reserve-metadata-snap && thinpool dump -m
    """
    with open_pool(pool_path) as p:
        b = p.reserve_metadata_snap()
    if as_json:
        echo_json({"held_metadata_root": b})
    else:
        click.echo(f"metadata snapshot held at block {b}")


@pool.command("release-metadata-snap")
@pool_option
def pool_release_metadata_snap(pool_path: str | None) -> None:
    """Drop the metadata snapshot.

    Example: thinpool pool release-metadata-snap
    """
    with open_pool(pool_path) as p:
        p.release_metadata_snap()
        click.echo("metadata snapshot released")


@pool.command("commit")
@pool_option
def pool_commit(pool_path: str | None) -> None:
    """Commit the pool: data first, then the metadata (every command already commits when it finishes).

    Example: thinpool pool commit
    """
    with open_pool(pool_path) as p:
        p.commit()
        click.echo(f"committed transaction {p.transaction_id}", err=True)


@pool.command("repair")
@click.argument("src", type=click.Path(exists=True))
@click.argument("dst", type=click.Path())
@click.option("-f", "--force", is_flag=True, help="Overwrite an existing DST.")
@json_option
def pool_repair(src: str, dst: str, force: bool, as_json: bool) -> None:
    """Salvage readable devices and mappings from SRC's metadata into fresh metadata at DST (like thin_repair).

    SRC is a pool directory or a metadata file; DST is a new metadata file (or a directory, which receives a file
    named "metadata"). Never works in place.

    \b
    Example:
      thinpool pool repair mypool /tmp/repaired-metadata && thin_check /tmp/repaired-metadata
    """
    from thinpool.metadata.repair import repair_file
    from thinpool.pool import lock_pool_dir

    src_file = os.path.join(src, "metadata") if os.path.isdir(src) else src
    dst_file = os.path.join(dst, "metadata") if os.path.isdir(dst) else dst
    if os.path.exists(dst_file) and os.path.samefile(dst_file, src_file):
        from thinpool.errors import InvalidArgument

        raise InvalidArgument(reason="DST is SRC: repair never works in place")
    if os.path.lexists(dst_file) and not force:
        raise click.UsageError(f"{dst_file} exists: use --force to overwrite it")
    locks = [lock_pool_dir(d) for d in (dst, os.path.dirname(os.path.abspath(dst_file)))
             if os.path.isdir(d) and os.path.exists(os.path.join(d, "metadata"))][:1]
    try:
        # a bar on a terminal: mappings salvaged, then written (the total known once the details are read)
        with ExitStack() as stack:
            bar: Any = None

            def on_progress(done: int, total: int) -> None:
                nonlocal bar
                if bar is None:
                    bar = stack.enter_context(mapping_progress("repairing metadata", total))
                bar.update(done)

            rep = repair_file(src_file, dst_file, progress=on_progress)
    finally:
        for fd in locks:
            if fd is not None:
                os.close(fd)
    if as_json:
        echo_json({"destination": dst_file, "devices": rep.devices, "mappings": rep.mappings,
                   "dropped_devices": rep.dropped_devices, "skipped_blocks": rep.skipped_blocks,
                   "dropped_mappings": rep.dropped_mappings, "problems": rep.problems,
                   "transaction_id": rep.transaction_id, "held_snapshot": rep.held_snapshot,
                   "held_devices": rep.held_devices, "held_mappings": rep.held_mappings})
        return
    click.echo(f"repaired into {dst_file}: {rep.devices} device(s), {rep.mappings} mapping(s); "
               f"skipped {rep.skipped_blocks} unreadable block(s), dropped {rep.dropped_mappings} mapping(s)"
               + (f", dropped devices {rep.dropped_devices}" if rep.dropped_devices else ""))
    for p in rep.problems[:20]:
        click.echo(f"  {p}", err=True)


@pool.command("trim")
@click.argument("path", required=False)
@pool_option
def pool_trim(path: str | None, pool_path: str | None) -> None:
    """Punch a hole in the data file for every chunk no device maps, as thin_trim (offline: takes the pool).

    Example: thinpool pool trim mypool
    """
    with open_pool(_one_pool(path, pool_path)) as p:
        n = p.trim()
        click.echo(f"trimmed {n} unused chunk(s) of {p.nr_data_blocks}", err=True)


@pool.command("rebuild-manifest")
@click.argument("path", required=False)
@pool_option
@click.option("-d", "--device", "devices", multiple=True, metavar="ID:SIZE[:NAME]", required=True,
              help="A thin device of the metadata with its virtual size (and name); give every device.")
@click.option("-f", "--force", is_flag=True, help="Replace a pool.json that is valid.")
def pool_rebuild_manifest(path: str | None, pool_path: str | None, devices: tuple[str, ...], force: bool) -> None:
    """Write a new pool.json for the pool's metadata when it was lost or damaged: every thin device with its
    size (nothing is guessed). External origins and lineage are not recoverable; options fall back to defaults.

    Example: thinpool pool rebuild-manifest mypool --device 1:1G:vol --device 2:1G:vol-snap
    """
    from thinpool.pool import Pool

    entries: dict[int, tuple[int, str | None]] = {}
    for spec in devices:
        parts = spec.split(":", 2)
        if len(parts) < 2 or not parts[0].isdigit():
            raise click.BadParameter(f"{spec!r}: use ID:SIZE[:NAME], e.g. 1:1G:vol", param_hint="'--device'")
        size = SIZE.convert(parts[1], None, None)
        if size % 512:
            raise click.BadParameter(f"{spec!r}: the size must be a multiple of 512", param_hint="'--device'")
        entries[int(parts[0])] = (size, parts[2] if len(parts) == 3 else None)
    target = path or require_pool(pool_path)
    m = Pool.rebuild_manifest(target, entries, force=force)
    click.echo(f"wrote {os.path.join(target, 'pool.json')}: {len(m['devices'])} device(s), transaction "
               f"{m['transaction_id']}", err=True)
