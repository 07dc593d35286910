"""`thinpool pool ...`: create a pool, show its status, resize it, and send it dm-thin's pool messages.

Layer: cli. May import: click, thinpool (the library only inside the commands).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterator

import click
from thinpool_cli.output import echo_json, kv_table, table
from thinpool_cli.params import CHUNK_SIZE, SIZE, json_option, open_pool, pool_option, require_pool


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
    """One dict per thin device: id, name, size, mapped bytes, highest mapped sector, external origin."""
    out = []
    for dev_id in p.list_devices():
        dev = p.device(dev_id)
        mapped_sectors, highest = dev.status()
        out.append({"dev_id": dev_id, "name": dev.name, "size": dev.size, "mapped": mapped_sectors * 512,
                    "highest_sector": highest, "origin": p.manifest["devices"][str(dev_id)].get("origin")})
    return out


def show_status(p: Any, as_json: bool) -> None:
    from thinpool.units import format_size

    st = p.status()
    if p.readonly and st.mode == "ro" and not st.needs_check:
        st.mode = "rw"  # opened read-only just to look: the pool itself is writable
    devs = device_rows(p)
    if as_json:
        d = st.to_dict()
        d["path"] = str(p.path)
        d["nr_devices"] = d.pop("devices")
        d["devices"] = devs
        echo_json(d)
        return
    click.echo(f"{p.path}: {st.dm_line()}")
    kv_table(None, [
        ("transaction id", st.transaction_id),
        ("data", f"{st.used_data_blocks}/{st.total_data_blocks} chunks "
                 f"({format_size(st.used_data_blocks * st.chunk_size)} of "
                 f"{format_size(st.total_data_blocks * st.chunk_size)})"),
        ("metadata", f"{st.used_metadata_blocks}/{st.total_metadata_blocks} blocks "
                     f"({format_size(st.used_metadata_blocks * 4096)} of "
                     f"{format_size(st.total_metadata_blocks * 4096)})"),
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
        table("thin devices", ["id", "name", "size", "mapped", "highest sector", "origin"],
              [(d["dev_id"], d["name"], format_size(d["size"]), format_size(d["mapped"]),
                "-" if d["highest_sector"] is None else d["highest_sector"], d["origin"] or "-") for d in devs],
              right=["id", "size", "mapped", "highest sector"])


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
@click.option("--low-water-mark", type=int, default=0, show_default=True, help="Free-chunk threshold for an event.")
@json_option
def pool_create(path: str | None, pool_path: str | None, size: int, chunk_size: int, metadata_size: int | None,
                no_zero: bool, discard: str, error_if_no_space: bool, low_water_mark: int, as_json: bool) -> None:
    """Create a pool directory PATH (or --pool / $THINPOOL_POOL).

    Example: thinpool pool create mypool --size 1G --chunk-size 64k
    """
    from thinpool.pool import Pool

    target = path or require_pool(pool_path)
    if size % chunk_size:
        raise click.BadParameter(f"data size {size} bytes is not a multiple of the chunk size ({chunk_size} bytes)",
                                 param_hint="'--size'")
    # the data space map alone needs one 4 KiB bitmap per 16320 chunks, plus index and tree blocks
    min_metadata = max(64 * 1024, (-(-(size // chunk_size) // 16320) + 64) * 4096)
    if metadata_size is not None and (metadata_size % 4096 or metadata_size < min_metadata):
        raise click.BadParameter(f"metadata size {metadata_size} bytes: must be a multiple of 4k and at least "
                                 f"{min_metadata} bytes for {size // chunk_size} chunks",
                                 param_hint="'--metadata-size'")
    with _undo_on_failure(target):
        p = Pool.create(target, data_size=size, chunk_size=chunk_size, metadata_size=metadata_size,
                        zero=not no_zero, discard=discard, no_space="error" if error_if_no_space else "queue",
                        low_water_mark=low_water_mark)
    with p:
        if as_json:
            show_status(p, True)
        else:
            click.echo(f"created pool {target}: {size // chunk_size} chunks of {chunk_size // 1024}KiB, "
                       f"{p.md.nr_metadata_blocks} metadata blocks")


@contextmanager
def _undo_on_failure(target: str) -> Iterator[None]:
    """Remove what a failed pool creation left behind (files it made, the directory if it made it)."""
    existed = os.path.isdir(target)
    before = set(os.listdir(target)) if existed else set()
    try:
        yield
    except BaseException:
        if os.path.isdir(target):
            for name in set(os.listdir(target)) - before:
                try:
                    os.unlink(os.path.join(target, name))
                except OSError:
                    pass
            if not existed:
                try:
                    os.rmdir(target)
                except OSError:
                    pass
        raise


@pool.command("status")
@pool_option
@json_option
def pool_status(pool_path: str | None, as_json: bool) -> None:
    """The dm-thin status line, a readable table and the thin devices.

    Example: thinpool pool status --pool mypool
    """
    with open_pool(pool_path, readonly=True) as p:
        show_status(p, as_json)


@pool.command("resize")
@pool_option
@click.option("-s", "--size", type=SIZE, help="New data size (grow only; a multiple of the chunk size).")
@click.option("--metadata-size", type=SIZE, help="New metadata size (grow only).")
@json_option
def pool_resize(pool_path: str | None, size: int | None, metadata_size: int | None, as_json: bool) -> None:
    """Grow the data device and/or the metadata device.

    Example: thinpool pool resize --size 20G
    """
    if size is None and metadata_size is None:
        raise click.UsageError("give --size and/or --metadata-size")
    with open_pool(pool_path) as p:
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
        click.echo(f"committed transaction {p.md.trans_id}", err=True)


@pool.command("repair")
@click.argument("src", type=click.Path(exists=True))
@click.argument("dst", type=click.Path())
@json_option
def pool_repair(src: str, dst: str, as_json: bool) -> None:
    """Salvage readable devices and mappings from SRC's metadata into fresh metadata at DST (like thin_repair).

    SRC is a pool directory or a metadata file; DST is a new metadata file (or a directory, which receives a file
    named "metadata"). Never works in place.

    \b
    Example:
      thinpool pool repair mypool /tmp/repaired-metadata && thin_check /tmp/repaired-metadata
    """
    from thinpool.metadata.repair import repair_file

    src_file = os.path.join(src, "metadata") if os.path.isdir(src) else src
    dst_file = os.path.join(dst, "metadata") if os.path.isdir(dst) else dst
    rep = repair_file(src_file, dst_file)
    if as_json:
        echo_json({"destination": dst_file, "devices": rep.devices, "mappings": rep.mappings,
                   "dropped_devices": rep.dropped_devices, "skipped_blocks": rep.skipped_blocks,
                   "dropped_mappings": rep.dropped_mappings, "problems": rep.problems,
                   "transaction_id": rep.transaction_id})
        return
    click.echo(f"repaired into {dst_file}: {rep.devices} device(s), {rep.mappings} mapping(s); "
               f"skipped {rep.skipped_blocks} unreadable block(s), dropped {rep.dropped_mappings} mapping(s)"
               + (f", dropped devices {rep.dropped_devices}" if rep.dropped_devices else ""))
    for p in rep.problems[:20]:
        click.echo(f"  {p}", err=True)
