"""`thinpool quickstart [DIR]`: a demo pool in a local directory, showing provisioning, snapshots and copy-on-write.

Layer: cli. May import: click, thinpool (the library only inside the command).
"""

from __future__ import annotations

import os
import shlex
import shutil

import click

POOL_FILES = {"metadata", "data", "pool.json", "pool.json.journal", "pool.json.tmp", "lock"}


def _is_thinpool_dir(path: str) -> bool:
    """A directory that holds a thinpool pool and nothing else (safe to remove and recreate)."""
    names = {n for n in os.listdir(path) if not (n.startswith(".pool.json.") and n.endswith(".tmp"))}
    return "metadata" in names and names <= POOL_FILES | {"map.png"}


@click.command("quickstart")
@click.argument("directory", metavar="[DIR]", default="thinpool-demo", type=click.Path(file_okay=False))
@click.option("--png/--no-png", default=True, help="Also draw the block map into DIR/map.png (needs matplotlib).")
def quickstart(directory: str, png: bool) -> None:
    """A demo pool in DIR (default ./thinpool-demo): a thin device, writes, a snapshot, an overwrite that breaks
    sharing, then the pool status and the block map. Re-runnable: a previous demo pool in DIR is replaced.

    Example: thinpool quickstart && thinpool pool status --pool thinpool-demo
    """
    from thinpool.errors import InvalidArgument
    from thinpool.pool import Pool
    from thinpool_cli.pool_cmds import show_status
    from thinpool_cli.tools_cmds import ls

    if os.path.exists(directory):
        if not os.path.isdir(directory):
            raise InvalidArgument(reason=f"{directory} exists and is not a directory")
        if os.listdir(directory):
            if not _is_thinpool_dir(directory):
                raise InvalidArgument(reason=f"{directory} is not empty and is not a thinpool demo pool: "
                                             "choose another DIR")
            shutil.rmtree(directory)
            click.echo(f"removed the previous demo pool in {directory}")

    def step(text: str) -> None:
        click.secho(f"\n$ {text}", bold=True)

    chunk = 64 * 1024
    d = shlex.quote(directory)
    # every step prints the shell command that does the same (a replayable transcript: the data comes from
    # printf / head | tr, no file is assumed)
    step(f"thinpool pool create {d} --size 64M --chunk-size 64k")
    with Pool.create(directory, data_size=64 << 20, chunk_size=chunk) as p:
        click.echo(f"pool {directory}: {p.nr_data_blocks} chunks of 64KiB, nothing allocated")

        step(f"thinpool thin create 1 --size 4M --name vol --pool {d}")
        vol = p.create_thin(1, 4 << 20, name="vol")
        click.echo("device 1 (vol): 4MiB virtual (64 chunks), 0 bytes allocated")

        step(f"head -c 262144 /dev/zero | tr '\\0' A | thinpool thin write vol --pool {d} -    # 256 KiB of 'A'")
        vol.write(0, b"A" * (4 * chunk))
        step(f"printf 'hello, thin world' | thinpool thin write vol --offset 1M --pool {d} -")
        vol.write(1 << 20, b"hello, thin world")
        click.echo(f"{p.nr_allocated_data_blocks} chunks allocated: 4 for the 256 KiB, 1 for the small write "
                   "(the rest of that chunk is zeroed)")

        step(f"thinpool thin snap 2 vol --name vol-snap --pool {d}")
        p.create_snap(2, 1, name="vol-snap")
        click.echo("snapshot 2 (vol-snap) shares all 5 chunks with vol: no data copied")

        step(f"head -c 4096 /dev/zero | tr '\\0' B | thinpool thin write vol --offset 64k --pool {d} -    "
             "# overwrite 4 KiB with 'B'")
        vol.write(chunk, b"B" * 4096)
        snap = p.device(2)
        click.echo(f"copy-on-write: chunk 1 of vol now has its own data block; {p.nr_allocated_data_blocks} chunks "
                   "allocated")
        click.echo(f"vol reads {vol.read(chunk, 4)!r}..., vol-snap still reads {snap.read(chunk, 4)!r}...")
        p.commit()

        step(f"thinpool pool status --pool {d}")
        show_status(p, False)
    step(f"thinpool ls {d} -o DEV,MAPPED,EXCLUSIVE,SHARED")
    ctx = click.get_current_context()
    ctx.invoke(ls, target=directory, pool_path=None, fields="DEV,MAPPED,EXCLUSIVE,SHARED", no_headers=False,
               metadata_snap=False, as_json=False)
    _show_map(directory, png)
    click.echo(f"\nNext: export THINPOOL_POOL={directory}; thinpool thin list; thinpool map vol; "
               f"thinpool delta vol vol-snap; thinpool dump; thinpool check")


def _show_map(directory: str, png: bool) -> None:
    from thinpool_cli.tools_cmds import map_cmd

    png_path = None
    if png:
        try:
            import matplotlib  # noqa: F401

            png_path = os.path.join(directory, "map.png")
        except ImportError:
            click.echo("(matplotlib is not installed: no map.png; pip install 'thinpool[plot]')")
    step_text = f"thinpool map vol vol-snap --pool {shlex.quote(directory)}" + \
        (f" --png {shlex.quote(png_path)}" if png_path else "")
    click.secho(f"\n$ {step_text}", bold=True)
    ctx = click.get_current_context()
    ctx.invoke(map_cmd, args=("vol", "vol-snap"), metadata_snap=False, png=png_path, pool_path=directory,
               as_json=False)



