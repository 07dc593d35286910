"""`thinpool fs ...`: an ext2 file system on a thin device (mkfs, ls, tree, put, get, cat, rm, mkdir, mv, stat, df,
trim).

Layer: cli. May import: click, thinpool (the library only inside the commands).

Every command takes the pool (``--pool PATH`` or $THINPOOL_POOL) and a device (id or name) as its first argument.
Commands that change the file system flush it at the end, which commits the pool; read-only commands open the
pool read-only. Errors (no such file, not a directory, no space, corrupt file system) reach the one error handler
in main.py and print one line.
"""

from __future__ import annotations

import os
import stat as statmod
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from thinpool_cli.output import echo_json, kv_table, table
from thinpool_cli.params import POOL_ENVVAR, device_ref, json_option, open_pool, pool_option

DEV_ARG = click.argument("dev", metavar="DEV")


@click.group("fs")
def fs() -> None:
    """An ext2 file system on a thin device: make it, then copy files in and out.

    The image is real ext2 (revision 1, 4 KiB blocks): e2fsck, debugfs and the Linux kernel read it.

    \b
    Examples:
      thinpool fs mkfs vol
      thinpool fs put vol ./notes.txt /notes.txt
      thinpool fs ls vol / -l
      thinpool fs get vol /notes.txt copy.txt
      thinpool fs df vol
    """


@contextmanager
def _mounted(pool_path: str | None, dev: str, *, write: bool) -> Iterator[Any]:
    """Open the pool and the file system on device ``dev``; flush (and so commit) after a writing command."""
    from thinpool.errors import NoFilesystem
    from thinpool.fs import Filesystem

    with open_pool(pool_path, readonly=not write) as p:
        device = p.device(int(p.find_device(device_ref(dev))))
        try:
            filesystem = Filesystem.mount(device, readonly=not write)
        except NoFilesystem as e:
            why = e.fields.get("reason", "")
            raise NoFilesystem(f"no ext2 file system on device {dev} ({why}); make one with: "
                               f"thinpool fs mkfs {dev}", reason=why, block=0) from e
        yield filesystem
        if write:
            filesystem.flush()


def _kind(mode: int) -> str:
    return statmod.filemode(mode)


def _when(t: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


@fs.command("mkfs")
@DEV_ARG
@click.option("-L", "--label", default="", help="Volume label (up to 16 bytes).")
@click.option("-f", "--force", is_flag=True, help="Overwrite an existing ext2 file system.")
@pool_option
def fs_mkfs(dev: str, label: str, force: bool, pool_path: str | None) -> None:
    """Make an empty ext2 file system on device DEV (like mkfs.ext2 -b 4096 -O none,filetype -I 128 -m 0).

    Example: thinpool fs mkfs vol
    """
    from thinpool.errors import FsError
    from thinpool.fs import Filesystem

    with open_pool(pool_path) as p:
        device = p.device(int(p.find_device(device_ref(dev))))
        if not force and device.size >= 2048 and device.read(1024 + 56, 2) == b"\x53\xef":
            raise FsError(reason=f"device {dev} already holds an ext2 file system (use --force to overwrite)")
        f = Filesystem.mkfs(device, label=label)
        s = f.statfs()
        click.echo(f"made ext2 on device {dev}: {s.nr_blocks} blocks of {s.block_size} bytes, "
                   f"{s.nr_inodes} inodes, {s.nr_groups} block group(s)")


@fs.command("ls")
@DEV_ARG
@click.argument("path", default="/")
@click.option("-l", "long", is_flag=True, help="Long listing: mode, links, owner, size, time.")
@click.option("-a", "--all", "show_all", is_flag=True, help="Include lost+found at the root.")
@pool_option
@json_option
def fs_ls(dev: str, path: str, long: bool, show_all: bool, pool_path: str | None, as_json: bool) -> None:
    """List directory PATH (default /), or show one file.

    Example: thinpool fs ls vol /docs -l
    """
    with _mounted(pool_path, dev, write=False) as f:
        st = f.stat(path)
        if st.is_dir:
            names = [e.name for e in f.scandir(path)]
            if path.strip("/") == "" and not show_all:
                names = [n for n in names if n != "lost+found"]
            base = path.rstrip("/")
            entries = [(n, f.lstat(f"{base}/{n}")) for n in sorted(names)]
        else:
            entries = [(path, st)]
        _render_ls(f, path, st.is_dir, entries, long, as_json)


def _render_ls(f: Any, path: str, is_dir: bool, entries: list[tuple[str, Any]], long: bool, as_json: bool) -> None:
    if as_json:
        echo_json([{"name": n, "ino": s.ino, "mode": s.mode, "mode_string": _kind(s.mode), "nlink": s.nlink,
                    "uid": s.uid, "gid": s.gid, "size": s.size, "mtime": s.mtime} for n, s in entries])
    elif long:
        rows = []
        for n, s in entries:
            full = path.rstrip("/") + "/" + n if is_dir else n
            name = n + (f" -> {f.readlink(full)}" if s.is_symlink else "")
            size = f"{os.major(s.rdev)}, {os.minor(s.rdev)}" if s.rdev else s.size  # as ls -l shows devices
            rows.append((_kind(s.mode), s.nlink, s.uid, s.gid, size, _when(s.mtime), name))
        table(None, ["mode", "links", "uid", "gid", "size", "modified", "name"], rows,
              right=["links", "uid", "gid", "size"])
    else:
        for n, s in entries:
            click.echo(n + ("/" if s.is_dir else ""))


@fs.command("tree")
@DEV_ARG
@click.argument("path", default="/")
@pool_option
def fs_tree(dev: str, path: str, pool_path: str | None) -> None:
    """Show the tree under PATH (default /) with file sizes.

    Example: thinpool fs tree vol
    """
    with _mounted(pool_path, dev, write=False) as f:
        click.echo(path)
        counts = [0, 0]

        def walk(d: str, prefix: str) -> None:
            entries = sorted(f.scandir(d), key=lambda e: e.name)
            for i, e in enumerate(entries):
                last = i == len(entries) - 1
                p = d.rstrip("/") + "/" + e.name
                s = f.lstat(p)
                label = e.name + ("/" if s.is_dir else f" -> {f.readlink(p)}" if s.is_symlink else
                                  f"  ({_type_name(s.mode)})" if s.is_special else f"  ({s.size})")
                click.echo(prefix + ("└── " if last else "├── ") + label)
                if s.is_dir:
                    counts[0] += 1
                    walk(p, prefix + ("    " if last else "│   "))
                else:
                    counts[1] += 1

        walk(path, "")
        click.echo(f"\n{counts[0]} directories, {counts[1]} files")


@fs.command("put")
@DEV_ARG
@click.argument("src", type=click.Path(allow_dash=True))
@click.argument("dst")
@click.option("-a", "--archive", is_flag=True, help="Also copy owner, group and extended attributes (as cp -a).")
@pool_option
def fs_put(dev: str, src: str, dst: str, archive: bool, pool_path: str | None) -> None:
    """Copy local file, directory, symlink or special file SRC ('-' for stdin) to DST (into DST if it is a
    directory). Holes stay holes; FIFOs and device nodes are made with mknod, never opened; a replaced file
    stays intact if the copy fails.

    Example: thinpool fs put vol ./photos /photos
    """
    from thinpool.fs import host

    if src != "-" and not os.path.lexists(src):
        raise click.BadParameter(f"{src}: no such file or directory", param_hint="SRC")
    with _mounted(pool_path, dev, write=True) as f:
        if src != "-" and f.isdir(dst):
            dst = dst.rstrip("/") + "/" + os.path.basename(os.path.normpath(src))
        if src == "-":
            click.echo(f"put {host.put_stream(f, sys.stdin.buffer, dst)} bytes into {dst}")
            return
        st = host.put(f, src, dst, archive=archive)
        if os.path.isdir(src) and not os.path.islink(src):
            click.echo(f"put {st.nr_entries} file(s), {st.nr_bytes} bytes into {dst}")
        elif os.path.islink(src):
            click.echo(f"put symlink {dst}")
        else:
            click.echo(f"put {st.nr_bytes} bytes into {dst}")


@fs.command("get")
@DEV_ARG
@click.argument("src")
@click.argument("dst", type=click.Path(allow_dash=True))
@click.option("-a", "--archive", is_flag=True, help="Also copy owner, group and extended attributes (as cp -a).")
@pool_option
def fs_get(dev: str, src: str, dst: str, archive: bool, pool_path: str | None) -> None:
    """Copy SRC (a file, directory, symlink or special file) out of the file system to local DST ('-' for
    stdout). Holes stay holes.

    Example: thinpool fs get vol /photos ./photos-copy
    """
    from thinpool.fs import host

    with _mounted(pool_path, dev, write=False) as f:
        st = f.stat(src)
        if dst == "-":
            if st.is_dir:
                raise click.BadParameter("cannot write a directory to stdout", param_hint="DST")
            host.get_stream(f, src, sys.stdout.buffer)
            return
        if os.path.isdir(dst):
            dst = os.path.join(dst, os.path.basename(src.rstrip("/")) or "root")
        got = host.get(f, src, dst, archive=archive)
        if st.is_dir:
            click.echo(f"got {got.nr_entries} file(s), {got.nr_bytes} bytes into {dst}")
        else:
            click.echo(f"got {got.nr_bytes} bytes into {dst}")


@fs.command("cat")
@DEV_ARG
@click.argument("paths", nargs=-1, required=True)
@pool_option
def fs_cat(dev: str, paths: tuple[str, ...], pool_path: str | None) -> None:
    """Write the contents of files to stdout.

    Example: thinpool fs cat vol /notes.txt
    """
    with _mounted(pool_path, dev, write=False) as f:
        from thinpool.fs import host

        for p in paths:
            host.get_stream(f, p, sys.stdout.buffer)
        sys.stdout.buffer.flush()


@fs.command("rm")
@DEV_ARG
@click.argument("paths", nargs=-1, required=True)
@click.option("-r", "--recursive", is_flag=True, help="Remove directories and their contents.")
@click.option("-f", "--force", is_flag=True, help="Ignore paths that do not exist.")
@pool_option
def fs_rm(dev: str, paths: tuple[str, ...], recursive: bool, force: bool, pool_path: str | None) -> None:
    """Remove files (and, with -r, directories).

    Example: thinpool fs rm vol -r /old
    """
    from thinpool.errors import FileNotFound, IsADirectory

    with _mounted(pool_path, dev, write=True) as f:
        for p in paths:
            try:
                st = f.lstat(p)
            except FileNotFound:
                if force:
                    continue
                raise
            if st.is_dir:
                if not recursive:
                    raise IsADirectory(path=p, reason=f"{p} is a directory (use -r)")
                f.rmtree(p)
            else:
                f.unlink(p)


@fs.command("mkdir")
@DEV_ARG
@click.argument("paths", nargs=-1, required=True)
@click.option("-p", "--parents", is_flag=True, help="Make parent directories as needed; no error if existing.")
@click.option("-m", "--mode", default="755", help="Permission bits in octal (default 755).")
@click.option("--pool", "pool_path", envvar=POOL_ENVVAR, metavar="PATH", type=click.Path(),
              help=f"Pool directory (default: ${POOL_ENVVAR}); -p means --parents here.")
def fs_mkdir(dev: str, paths: tuple[str, ...], parents: bool, mode: str, pool_path: str | None) -> None:
    """Make directories.

    Example: thinpool fs mkdir vol -p /a/b/c
    """
    try:
        bits = int(mode, 8)
    except ValueError:
        raise click.BadParameter(f"{mode!r} is not an octal mode", param_hint="--mode") from None
    with _mounted(pool_path, dev, write=True) as f:
        for p in paths:
            f.mkdir(p, bits, parents=parents)


@fs.command("mv")
@DEV_ARG
@click.argument("src")
@click.argument("dst")
@pool_option
def fs_mv(dev: str, src: str, dst: str, pool_path: str | None) -> None:
    """Rename or move SRC to DST (into DST if it is a directory).

    Example: thinpool fs mv vol /draft.txt /docs/
    """
    with _mounted(pool_path, dev, write=True) as f:
        if f.isdir(dst):  # like mv(1): into an existing directory
            dst = dst.rstrip("/") + "/" + src.rstrip("/").rsplit("/", 1)[-1]
        f.rename(src, dst)


@fs.command("stat")
@DEV_ARG
@click.argument("path")
@pool_option
@json_option
def fs_stat(dev: str, path: str, pool_path: str | None, as_json: bool) -> None:
    """Show the inode of PATH (a final symlink is not followed).

    Example: thinpool fs stat vol /notes.txt
    """
    with _mounted(pool_path, dev, write=False) as f:
        s = f.lstat(path)
        d: dict[str, Any] = {"path": path, "ino": s.ino, "type": _type_name(s.mode), "mode": s.mode,
                             "mode_string": _kind(s.mode), "nlink": s.nlink, "uid": s.uid, "gid": s.gid,
                             "size": s.size, "blocks_512": s.blocks, "atime": s.atime, "mtime": s.mtime,
                             "ctime": s.ctime}
        if s.is_symlink:
            d["target"] = f.readlink(path)
        if s.rdev:
            d["rdev"] = f"{os.major(s.rdev)}:{os.minor(s.rdev)}"
        if f.listxattr(path):
            d["xattrs"] = {n: f.getxattr(path, n).hex() for n in f.listxattr(path)}
        if as_json:
            echo_json(d)
        else:
            rows = [(k, _when(v) if k.endswith("time") else f"{v:#o}" if k == "mode" else v)
                    for k, v in d.items() if k not in ("path", "xattrs")]
            rows += [(f"xattr {n}", v) for n, v in d.get("xattrs", {}).items()]
            kv_table(path, rows)


def _type_name(mode: int) -> str:
    return {statmod.S_IFREG: "file", statmod.S_IFDIR: "directory", statmod.S_IFLNK: "symlink",
            statmod.S_IFIFO: "fifo", statmod.S_IFSOCK: "socket", statmod.S_IFCHR: "character device",
            statmod.S_IFBLK: "block device"}.get(statmod.S_IFMT(mode), "special")


@fs.command("df")
@DEV_ARG
@pool_option
@json_option
def fs_df(dev: str, pool_path: str | None, as_json: bool) -> None:
    """Show the size, used and free space and inodes of the file system.

    Example: thinpool fs df vol
    """
    from thinpool.units import format_size

    with _mounted(pool_path, dev, write=False) as f:
        s = f.statfs()
        used = s.nr_blocks - s.free_blocks
        d = {"block_size": s.block_size, "blocks": s.nr_blocks, "used_blocks": used, "free_blocks": s.free_blocks,
             "size": s.size, "used": used * s.block_size, "free": s.free_bytes, "inodes": s.nr_inodes,
             "used_inodes": s.nr_inodes - s.free_inodes, "free_inodes": s.free_inodes, "groups": s.nr_groups}
        if as_json:
            echo_json(d)
            return
        pct = f"{100 * used / s.nr_blocks:.0f}%" if s.nr_blocks else "-"
        table(None, ["size", "used", "free", "use%", "inodes", "iused", "ifree"],
              [(format_size(s.size), format_size(used * s.block_size), format_size(s.free_bytes), pct,
                s.nr_inodes, s.nr_inodes - s.free_inodes, s.free_inodes)],
              right=["size", "used", "free", "use%", "inodes", "iused", "ifree"])


@fs.command("trim")
@DEV_ARG
@pool_option
def fs_trim(dev: str, pool_path: str | None) -> None:
    """Give the file system's free space back to the pool (like fstrim): discard every free block.

    Example: thinpool fs trim vol
    """
    from thinpool.units import format_size

    with _mounted(pool_path, dev, write=True) as f:
        click.echo(f"trimmed {format_size(f.trim())} on device {dev}")
