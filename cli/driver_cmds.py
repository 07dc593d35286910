"""`thinpool driver|image|container ...`: Docker's devicemapper storage driver, emulated on a pool.

Layer: cli. May import: click, thinpool (the library only inside the commands).

Every command takes the pool (``--pool PATH`` or $THINPOOL_POOL). Changing commands open the pool writable (and
roll back a driver transaction a crash left open); ``info``, ``ls``, ``diff``, ``export``, ``save`` and
``cp NAME:PATH DEST`` open it read-only. Errors reach the one handler in main.py and print one line.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from thinpool_cli.output import echo_json, table
from thinpool_cli.params import SizeParam, json_option, open_pool, pool_option

BASE_SIZE = SizeParam(multiple_of=4096)


@contextmanager
def _driver(pool_path: str | None, *, write: bool) -> Iterator[Any]:
    from thinpool.driver import DeviceSet, Driver

    with open_pool(pool_path, readonly=not write) as p:
        yield Driver(DeviceSet.open(p))


def _percent(value: str) -> int:
    v = value.strip().rstrip("%")
    if not v.isdigit() or not 0 <= int(v) <= 99:
        raise click.BadParameter(f"{value!r} is not a percentage 0..99 (e.g. 10%)")
    return int(v)


# ================================================================================================== driver
@click.group("driver")
def driver() -> None:
    """Docker's devicemapper driver on this pool: a base device, layers as snapshots, containers on top.

    \b
    Examples:
      thinpool pool create dm --size 20G && export THINPOOL_POOL=dm
      thinpool driver init --base-size 10G
      thinpool driver info
    """


@driver.command("init")
@click.option("--base-size", type=BASE_SIZE, default="10G", show_default=True,
              help="Virtual size of the base device (dm.basesize); every layer and container has it.")
@click.option("--min-free-space", "min_free", default="10%", show_default=True,
              help="Refuse new layers/containers below this free share of data or metadata (dm.min_free_space).")
@pool_option
def driver_init(base_size: int, min_free: str, pool_path: str | None) -> None:
    """Create the base device (a thin device with an ext2, as moby's createBaseImage) and the driver's records.

    Example: thinpool driver init --base-size 10G --min-free-space 10%
    """
    from thinpool.driver import DeviceSet

    pct = _percent(min_free)
    with open_pool(pool_path) as p:
        ds = DeviceSet.init(p, base_size=base_size, min_free_percent=pct)
        click.echo(f"base device {ds.device_name(ds.get(''))} (id {ds.get('').device_id}), "
                   f"{base_size} bytes, {ds.base_fs}")


@driver.command("info")
@json_option
@pool_option
def driver_info(as_json: bool, pool_path: str | None) -> None:
    """The fields `docker info` printed for devicemapper (go-units sizes; Available = min(pool, host fs) free).

    Example: thinpool driver info --json
    """
    with _driver(pool_path, write=False) as d:
        rows = d.ds.status()
        rows.insert(0, ("Storage Driver", "devicemapper"))
        if as_json:
            echo_json(dict(rows))
            return
        click.echo("Storage Driver: devicemapper")
        for k, v in rows[1:]:
            click.echo(f" {k}: {v}")


# ================================================================================================== image
@click.group("image")
def image() -> None:
    """Images as snapshot chains: every layer a snapshot of its parent, keyed by ChainID and shared.

    \b
    Examples:
      thinpool image load ./oci-layout-dir:latest
      thinpool image load saved.tar
      thinpool image ls
      thinpool image save app:1 out-dir --format oci
    """


@image.command("load")
@click.argument("source")
@click.option("--tag", "tag", metavar="NAME:TAG", help="Reference to give the image (one image only).")
@pool_option
def image_load(source: str, tag: str | None, pool_path: str | None) -> None:
    """Load an OCI image layout (DIR or DIR:TAG) or a docker-archive tar (gzip/zstd layers), as `docker load`.

    Example: thinpool image load img:base --tag app:1
    """
    with _driver(pool_path, write=True) as d:
        for line in d.images.load(source, tag):
            click.echo(line)


@image.command("ls")
@json_option
@pool_option
def image_ls(as_json: bool, pool_path: str | None) -> None:
    """List images: reference, id, layers, size (sum of the layers' entry sizes), top layer device.

    Example: thinpool image ls --json
    """
    from thinpool.driver.state import human_size

    with _driver(pool_path, write=False) as d:
        rows = d.images.ls()
    if as_json:
        echo_json(rows)
        return
    table(None, ["REPOSITORY", "TAG", "IMAGE ID", "LAYERS", "SIZE", "DEVICE"],
          [(r["repository"], r["tag"], r["id"][7:19], r["layers"], human_size(r["size"]), r["device"])
           for r in rows])


@image.command("rm")
@click.argument("ref", metavar="IMAGE")
@pool_option
def image_rm(ref: str, pool_path: str | None) -> None:
    """Untag an image; with its last reference it goes, and every layer nothing uses any more (device too).

    Example: thinpool image rm app:1
    """
    with _driver(pool_path, write=True) as d:
        for line in d.images.remove(ref, d.containers.in_use):
            click.echo(line)


@image.command("save")
@click.argument("ref", metavar="IMAGE")
@click.argument("out", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["oci", "docker"]), default="oci", show_default=True,
              help="oci: an OCI image layout directory (the index carries the tag); docker: a docker-archive tar.")
@pool_option
def image_save(ref: str, out: str, fmt: str, pool_path: str | None) -> None:
    """Save an image, its layers rebuilt byte for byte from the layer devices (same DiffIDs, same image id).

    Example: thinpool image save app:1 app-oci --format oci && umoci unpack --image app-oci:1 bundle
    """
    with _driver(pool_path, write=False) as d:
        click.echo(d.images.save(ref, out, fmt))


# ================================================================================================== container
@click.group("container")
def container() -> None:
    """Containers: NAME-init (moby's initlayer) and NAME (read-write), two snapshots on the image's top layer.

    \b
    Examples:
      thinpool container create app:1 --name web
      thinpool container cp ./index.html web:/srv/
      thinpool container diff web
      thinpool container commit web app:2
      thinpool container export web web.tar
      thinpool container rm web
    """


@container.command("create")
@click.argument("ref", metavar="IMAGE")
@click.option("--name", help="Container name (also the rw device's name; NAME-init is the init device).")
@pool_option
def container_create(ref: str, name: str | None, pool_path: str | None) -> None:
    """Create a container from IMAGE (refused below the minimum free space, as moby refuses); prints its id.

    Example: thinpool container create app:1 --name web
    """
    with _driver(pool_path, write=True) as d:
        rec = d.containers.create(ref, name)
        click.echo(rec["ID"])


@container.command("ls")
@json_option
@pool_option
def container_ls(as_json: bool, pool_path: str | None) -> None:
    """List containers: name, id, image, created, devices.

    Example: thinpool container ls
    """
    from thinpool.driver.container import container_rows

    with _driver(pool_path, write=False) as d:
        rows = container_rows(d.containers)
    if as_json:
        echo_json(rows)
        return
    table(None, ["NAME", "CONTAINER ID", "IMAGE", "CREATED", "DEVICES"],
          [(r["name"], r["id"][:12], r["image"], r["created"], " ".join(r["devices"])) for r in rows])


@container.command("cp")
@click.argument("src")
@click.argument("dst")
@click.option("-a", "--archive", is_flag=True, help="Keep uid/gid of host files (default: root:root).")
@pool_option
def container_cp(src: str, dst: str, archive: bool, pool_path: str | None) -> None:
    """Copy between the host and a container, as `docker cp`: SRC NAME:PATH or NAME:PATH DEST.

    Example: thinpool container cp ./conf web:/etc/app/
    """
    def split(arg: str) -> tuple[str, str] | None:
        name, sep, path = arg.partition(":")
        return (name, path) if sep and name and "/" not in name else None

    into, out = split(dst), split(src)
    if (into is None) == (out is None):
        raise click.UsageError("exactly one of SRC and DEST must be NAME:PATH")
    with _driver(pool_path, write=into is not None) as d:
        if into is not None:
            d.containers.cp_in(into[0], src, into[1] or "/", archive=archive)
        else:
            assert out is not None
            d.containers.cp_out(out[0], out[1] or "/", dst)


@container.command("diff")
@click.argument("name")
@click.option("--blocks", is_flag=True, help="From the block-level delta of NAME against NAME-init instead.")
@json_option
@pool_option
def container_diff(name: str, blocks: bool, as_json: bool, pool_path: str | None) -> None:
    """Changes of the container against its image, as `docker diff` (A added, C changed, D deleted).

    Without --blocks: moby's naive diff (metadata, second-precision mtime, parents of changes). With --blocks:
    the files whose blocks differ, found from the pool's block delta in time proportional to the change.

    Example: thinpool container diff web
    """
    with _driver(pool_path, write=False) as d:
        if blocks:
            from thinpool.driver.blockdiff import block_diff

            changes = block_diff(d.containers, name)
        else:
            changes = d.containers.diff(name)
    if as_json:
        echo_json([{"Path": c.path, "Kind": c.kind} for c in changes])
        return
    for c in changes:
        click.echo(str(c))


@container.command("commit")
@click.argument("name")
@click.argument("ref", metavar="IMAGE:TAG")
@pool_option
def container_commit(name: str, ref: str, pool_path: str | None) -> None:
    """A new image: the container's naive diff as one more layer (whole changed files, .wh. whiteouts).

    Example: thinpool container commit web app:2
    """
    with _driver(pool_path, write=True) as d:
        click.echo(d.containers.commit(name, ref))


@container.command("export")
@click.argument("name")
@click.argument("out", type=click.Path(dir_okay=False))
@pool_option
def container_export(name: str, out: str, pool_path: str | None) -> None:
    """The container's filesystem as a flat tar, as `docker export`.

    Example: thinpool container export web web.tar
    """
    with _driver(pool_path, write=False) as d:
        d.containers.export(name, out)


@container.command("rm")
@click.argument("name")
@pool_option
def container_rm(name: str, pool_path: str | None) -> None:
    """Remove a container: both devices are discarded first (the space returns to the host), then deleted.

    Example: thinpool container rm web
    """
    with _driver(pool_path, write=True) as d:
        d.containers.remove(name)
        click.echo(name)
