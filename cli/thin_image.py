"""`thinpool thin import` / `thinpool thin export`: raw images in and out of a thin device, sparse both ways.

Layer: cli. Part of the `thin` group (cli/thin_cmds.py adds these commands by importing this module).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from thinpool_cli.output import echo_json, progress
from thinpool_cli.params import device_ref, json_option, open_pool, pool_option
from thinpool_cli.thin_cmds import IO_CHUNK, _resolve, _stream, thin


@thin.command("import")
@click.argument("ref", metavar="ID")
@click.argument("image", metavar="IMAGE|-", type=click.Path(allow_dash=True, dir_okay=False))
@click.option("-n", "--name", help="Name for a device created by the import.")
@pool_option
@json_option
def thin_import(ref: str, image: str, name: str | None, pool_path: str | None, as_json: bool) -> None:
    """Copy raw IMAGE (or stdin, '-') into device ID, skipping holes and all-zero chunks.

    The device is created (its size rounded up to 512 bytes) when ID is a number that does not exist yet; it
    then equals the image: chunks that are zero in the image are unmapped in the device. The space for the whole
    image is checked first; a failed import changes nothing (a device it created is removed).

    Example: thinpool thin import 3 disk.raw --name disk
    """
    from thinpool.errors import OutOfBounds

    with _image_fd(image) as (fd, size), open_pool(pool_path) as p:
        ref_v = device_ref(ref)
        created = isinstance(ref_v, int) and ref_v not in p.list_devices()
        if not created:
            dev = p.device(_resolve(p, ref))
            if size > dev.size:
                raise OutOfBounds(offset=0, length=size, size=dev.size)
        extents = _data_extents(fd, size, image)
        ch = p.chunk_bytes
        if created:
            # whole chunks the image has data in: an upper bound of what the import allocates
            upper = sum(-(-e // ch) - s // ch for s, e in extents)
            if not p.has_free_data_blocks(upper):
                p.ensure_free(len(_nonzero_chunks(fd, size, extents, ch)))
            assert isinstance(ref_v, int)
            dev = p.create_thin(ref_v, max(512, -(-size // 512) * 512), name=name)
        try:
            if not created:
                chunks = _nonzero_chunks(fd, size, extents, ch)
                origin = p.external_origin(dev.dev_id)
                if origin is not None:  # zeros written over the origin's extent allocate too
                    chunks += range(-(-min(origin.size, dev.size) // ch))
                p.ensure_free(p.blocks_needed(dev.dev_id, chunks))
            written = _import_image(p, dev, fd, size, extents, image)
            p.commit()
        except BaseException:
            if created:
                _remove_created(p, dev.dev_id)
            raise
        mapped = dev.status()[0] * 512
    if as_json:
        echo_json({"dev_id": dev.dev_id, "image_size": size, "written": written, "mapped": mapped})
    else:
        click.echo(f"imported {size} bytes ({written} in non-zero chunks) into device {dev.dev_id}", err=True)


def _remove_created(p: Any, dev_id: int) -> None:
    """A failed import removes the device it created (the error that made it fail is what the user sees)."""
    p.abort_command()
    if not p.failed:
        try:
            p.delete_thin(dev_id)
        except Exception:
            pass


@contextmanager
def _image_fd(image: str) -> Iterator[tuple[int, int]]:
    """(fd, size) of a regular image file; stdin ('-') is first copied to a sparse temporary file."""
    import stat
    import tempfile

    from thinpool.errors import UnsafePoolFile

    if image != "-":
        fd = os.open(image, os.O_RDONLY | os.O_NONBLOCK)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise UnsafePoolFile(path=image, reason="an image must be a regular file (use - for a pipe)")
            os.set_blocking(fd, True)
            yield fd, os.fstat(fd).st_size
        finally:
            os.close(fd)
        return
    src = sys.stdin.buffer
    with tempfile.TemporaryFile() as tmp:
        size = 0
        while True:
            buf = src.read(IO_CHUNK)
            if not buf:
                break
            if any(buf):
                os.pwrite(tmp.fileno(), buf, size)
            size += len(buf)
        os.ftruncate(tmp.fileno(), size)
        yield tmp.fileno(), size


def _nonzero_chunks(fd: int, size: int, extents: list[tuple[int, int]], ch: int) -> list[int]:
    """The chunks of the image that hold a non-zero byte (within its data extents)."""
    import numpy as np

    out: list[int] = []
    for start, end in extents:
        for c in range(start // ch, -(-end // ch)):
            if not out or out[-1] != c:
                buf = os.pread(fd, min(ch, size - c * ch), c * ch)
                if np.frombuffer(buf, dtype=np.uint8).any():
                    out.append(c)
    return out


def _import_image(p: Any, dev: Any, fd: int, size: int, extents: list[tuple[int, int]], image: str) -> int:
    """Make ``dev`` equal the raw image: chunks with data are written, all-zero chunks and the image's holes
    end up unmapped (or zeroed where an external origin shows). Returns the bytes written."""
    import bisect

    import numpy as np

    ch, dev_size = dev.chunk, dev.size
    written = 0
    done: list[tuple[int, int]] = []  # chunk intervals [a, b) already made equal to the image
    with progress(f"importing into device {dev.dev_id}", size, min_total=64 << 20) as bar:
        next_chunk = 0
        for start, end in extents:
            first, last = max(start // ch, next_chunk), -(-end // ch)
            for c in range(first, last):
                lo, hi = c * ch, min((c + 1) * ch, dev_size)
                try:
                    buf = os.pread(fd, min(hi, size) - lo, lo)
                except OSError as e:
                    from thinpool.errors import StoreIOError

                    raise StoreIOError(what=image, op="read", reason=e.strerror or str(e)) from e
                if np.frombuffer(buf, dtype=np.uint8).any():
                    dev.write(lo, buf + bytes(hi - lo - len(buf)))
                    written += len(buf)
                elif dev.mapped_ranges(lo, hi - lo):  # provisioned, or showing the external origin
                    dev.write_zeroes(lo, hi - lo)
                bar.update(min(hi, size))
            if last > first:
                done.append((first, last))
            next_chunk = max(next_chunk, last)
    # chunks holding data (mapped, or showing the external origin) that lie wholly in holes of the image (or
    # beyond its end) must read as zeros too
    starts = [a for a, _ in done]
    for off, n in dev.mapped_ranges():
        for c in range(off // ch, -(-(off + n) // ch)):
            i = bisect.bisect_right(starts, c) - 1
            if i < 0 or not done[i][0] <= c < done[i][1]:
                dev.write_zeroes(c * ch, min(ch, dev_size - c * ch))
    return written


def _data_extents(fd: int, size: int, image: str = "image") -> list[tuple[int, int]]:
    """The data extents of a file (SEEK_DATA/SEEK_HOLE; the whole file where the filesystem cannot tell).
    ENXIO means no more data; any other error (EIO, ...) is an error, never "no data"."""
    import errno

    from thinpool.errors import StoreIOError

    out: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                break  # no data after pos
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP) and not out and pos == 0:
                return [(0, size)] if size else []  # no SEEK_DATA here: treat everything as data
            raise StoreIOError(what=image, op="SEEK_DATA", reason=e.strerror or str(e)) from e
        try:
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        except OSError as e:
            raise StoreIOError(what=image, op="SEEK_HOLE", reason=e.strerror or str(e)) from e
        if start >= size:
            break
        out.append((start, end))
        pos = end
    return out


@thin.command("export")
@click.argument("ref", metavar="ID")
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("-f", "--force", is_flag=True, help="Overwrite IMAGE if it exists.")
@pool_option
@json_option
def thin_export(ref: str, image: str, force: bool, pool_path: str | None, as_json: bool) -> None:
    """Write device ID to the raw IMAGE file, sparse: unwritten and all-zero chunks stay holes ('-': stdout).

    Example: thinpool thin export vol vol.img
    """
    import numpy as np

    if image == "-":
        _export_stdout(ref, pool_path)
        return
    if os.path.lexists(image) and not force:
        raise click.UsageError(f"{image} exists: use --force to overwrite it")
    with open_pool(pool_path, readonly=True) as p:
        dev = p.device(_resolve(p, ref))
        ranges = dev.mapped_ranges()
        total = sum(n for _, n in ranges)
        ch = dev.chunk
        copied = 0
        with open(image, "wb") as f, progress(f"exporting device {dev.dev_id}", total, min_total=64 << 20) as bar:
            f.truncate(0)
            f.truncate(dev.size)
            fd = f.fileno()
            for start, n in ranges:
                pos = start
                while pos < start + n:
                    m = min(ch - pos % ch, start + n - pos)
                    buf = dev.read(pos, m)
                    if np.frombuffer(buf, dtype=np.uint8).any():
                        os.pwrite(fd, buf, pos)
                        copied += m
                    pos += m
                    bar.advance(m)
        size = dev.size
    if as_json:
        echo_json({"dev_id": dev.dev_id, "size": size, "data": copied, "image": image})
    else:
        click.echo(f"exported device {dev.dev_id}: {size} bytes, {copied} bytes of data", err=True)


def _export_stdout(ref: str, pool_path: str | None) -> None:
    """The whole device to stdout (holes as zeros), refusing a terminal."""
    out = sys.stdout.buffer
    if out.isatty():
        raise click.UsageError("refusing to write a binary image to a terminal: redirect stdout or give a file")
    with open_pool(pool_path, readonly=True) as p:
        dev = p.device(_resolve(p, ref))
        _stream(dev, 0, dev.size, out)
