"""FUSE files report holes: lseek SEEK_DATA/SEEK_HOLE, so `cp --sparse` and `qemu-img map` see them."""

from __future__ import annotations

import errno
import json
import os

import pytest
from conftest import need_tool, run_tool
from test_fuse_export import fuse_mount  # noqa: F401  (the fixture)

MiB = 1 << 20
pytestmark = pytest.mark.root


def test_seek_data_and_hole(fuse_mount):  # noqa: F811
    m = fuse_mount(disk=64 * MiB)
    path = m.path("disk")
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, b"\x11" * 65536, MiB)
        os.pwrite(fd, b"\x22" * 131072, 10 * MiB)
        assert os.lseek(fd, 0, os.SEEK_DATA) == MiB
        assert os.lseek(fd, MiB, os.SEEK_HOLE) == MiB + 65536
        assert os.lseek(fd, MiB + 65536, os.SEEK_DATA) == 10 * MiB
        assert os.lseek(fd, 10 * MiB + 5, os.SEEK_DATA) == 10 * MiB + 5
        assert os.lseek(fd, 10 * MiB, os.SEEK_HOLE) == 10 * MiB + 131072
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 0
        with pytest.raises(OSError) as ei:
            os.lseek(fd, 11 * MiB, os.SEEK_DATA)
        assert ei.value.errno == errno.ENXIO
        assert os.lseek(fd, 11 * MiB, os.SEEK_HOLE) == 11 * MiB
    finally:
        os.close(fd)


@pytest.mark.external
def test_cp_sparse_and_qemu_img_map_see_holes(fuse_mount):  # noqa: F811
    need_tool("qemu-img", "cp")
    m = fuse_mount(disk=32 * MiB)
    path = m.path("disk")
    with open(path, "r+b") as f:
        for off in (0, 5 * MiB, 20 * MiB + 65536):
            f.seek(off)
            f.write(os.urandom(65536))
        f.flush()
        os.fsync(f.fileno())
    entries = json.loads(run_tool("qemu-img", "map", "-f", "raw", "--output=json", path, timeout=60).stdout)
    data = [(e["start"], e["length"]) for e in entries if e["data"]]
    assert data == [(0, 65536), (5 * MiB, 65536), (20 * MiB + 65536, 65536)]
    dst = os.path.join(m.tmp, "copy.img")
    run_tool("cp", "--sparse=auto", path, dst, timeout=60)
    run_tool("cmp", path, dst, timeout=60)
    assert os.stat(dst).st_blocks * 512 <= 3 * 65536 + 3 * 4096
