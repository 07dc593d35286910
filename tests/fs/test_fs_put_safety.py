"""`thinpool fs put` / `fs get` as issue 11 and 17 want them: a failed replacement keeps the old file, a re-put
replaces symlinks, special files are made with mknod (never opened), holes stay holes both ways, hard links stay
links. Each case runs the real CLI in a subprocess (a hang is a failure, not a stuck test run), and the device
passes ``e2fsck -fn`` afterwards."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from fs_helpers import debugfs, e2fsck, export_thin

MiB = 2**20


def thinpool(*args: object, env: dict[str, str], input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    exe = shutil.which("thinpool") or str(Path(sys.executable).parent / "thinpool")
    return subprocess.run([exe, *map(str, args)], capture_output=True, env={**os.environ, **env}, input=input,
                          timeout=120)


def ok(*args: object, env: dict[str, str], input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    r = thinpool(*args, env=env, input=input)
    assert r.returncode == 0, r.stderr.decode()
    return r


def make_pool(tmp_path: Path, *, data: str = "128M", dev_size: str = "64M") -> dict[str, str]:
    env = {"THINPOOL_POOL": str(tmp_path / "pool")}
    ok("pool", "create", "--size", data, env=env)
    ok("thin", "create", "1", "--size", dev_size, "--name", "vol", env=env)
    ok("fs", "mkfs", "vol", env=env)
    return env


def fs_image(tmp_path: Path, env: dict[str, str]) -> Path:
    img = export_thin(Path(env["THINPOOL_POOL"]), 1, tmp_path / "vol.img")
    e2fsck(img)
    return img


def test_a_failed_replacement_on_a_full_filesystem_keeps_the_old_file(tmp_path):
    env = make_pool(tmp_path, dev_size="8M")
    old = os.urandom(1 * MiB)
    (tmp_path / "old").write_bytes(old)
    ok("fs", "put", "vol", tmp_path / "old", "/f", env=env)
    (tmp_path / "big").write_bytes(os.urandom(12 * MiB))
    r = thinpool("fs", "put", "vol", tmp_path / "big", "/f", env=env)
    assert r.returncode == 3 and r.stderr.decode().startswith("thinpool: error: no space left on filesystem")
    assert "/f" in r.stderr.decode() and b"Traceback" not in r.stderr
    assert ok("fs", "cat", "vol", "/f", env=env).stdout == old
    assert json.loads(ok("fs", "ls", "vol", "--json", env=env).stdout)[0]["size"] == len(old)
    fs_image(tmp_path, env)


def test_a_failed_replacement_on_a_full_pool_keeps_the_old_file(tmp_path):
    """The pool runs out of data space midway: the old file's blocks were never overwritten in place."""
    env = make_pool(tmp_path, data="4M", dev_size="64M")
    old = os.urandom(1 * MiB)
    (tmp_path / "old").write_bytes(old)
    ok("fs", "put", "vol", tmp_path / "old", "/f", env=env)
    (tmp_path / "big").write_bytes(os.urandom(8 * MiB))
    r = thinpool("fs", "put", "vol", tmp_path / "big", "/f", env=env)
    assert r.returncode == 3 and b"Traceback" not in r.stderr, r.stderr.decode()
    assert ok("fs", "cat", "vol", "/f", env=env).stdout == old
    fs_image(tmp_path, env)


def test_a_second_put_of_a_tree_replaces_files_and_symlinks(tmp_path):
    env = make_pool(tmp_path)
    src = tmp_path / "tree"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "a.txt").write_bytes(b"first")
    os.symlink("a.txt", src / "sub" / "link")
    os.symlink("sub", src / "dirlink")
    ok("fs", "put", "vol", src, "/", env=env)  # into the root directory: /tree
    (src / "sub" / "a.txt").write_bytes(b"second, longer")
    os.unlink(src / "sub" / "link")
    os.symlink("elsewhere", src / "sub" / "link")
    os.unlink(src / "dirlink")
    (src / "dirlink").write_bytes(b"now a file")
    ok("fs", "put", "vol", src, "/", env=env)  # again: merged into /tree, each entry replaced
    assert ok("fs", "cat", "vol", "/tree/sub/a.txt", env=env).stdout == b"second, longer"
    st = json.loads(ok("fs", "stat", "vol", "/tree/sub/link", "--json", env=env).stdout)
    assert st["type"] == "symlink" and st["target"] == "elsewhere"
    assert ok("fs", "cat", "vol", "/tree/dirlink", env=env).stdout == b"now a file"
    names = [e["name"] for e in json.loads(ok("fs", "ls", "vol", "/tree/sub", "--json", env=env).stdout)]
    assert names == ["a.txt", "link"]  # no temporary names left behind
    fs_image(tmp_path, env)


@pytest.mark.root
def test_a_tree_with_special_files_is_made_with_mknod(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("making device nodes on the host needs root")
    env = make_pool(tmp_path)
    src = tmp_path / "special"
    src.mkdir()
    os.mkfifo(src / "fifo", 0o640)
    os.mknod(src / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(src / "disk", stat.S_IFBLK | 0o660, os.makedev(259, 70000))
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(src / "sock"))
    s.close()
    ok("fs", "put", "vol", src, "/", env=env)  # on today's main this hangs opening the FIFO
    ok("fs", "put", "vol", src, "/", env=env)  # and a second put replaces each one
    img = fs_image(tmp_path, env)
    assert "Type: FIFO" in debugfs(img, "stat /special/fifo") and "Type: socket" in debugfs(img, "stat /special/sock")
    assert "Device major/minor number: 01:03" in debugfs(img, "stat /special/null")
    assert "259:70000" in debugfs(img, "stat /special/disk")
    listing = ok("fs", "ls", "vol", "/special", "-l", env=env).stdout.decode()
    assert "259, 70000" in listing and "1, 3" in listing and "| prw" in listing
    assert "fifo  (fifo)" in ok("fs", "tree", "vol", "/special", env=env).stdout.decode()
    st = json.loads(ok("fs", "stat", "vol", "/special/disk", "--json", env=env).stdout)
    assert st["type"] == "block device" and st["rdev"] == "259:70000" and st["mode"] == os.lstat(src / "disk").st_mode
    out = tmp_path / "out"
    ok("fs", "get", "vol", "/special", out, env=env)
    assert stat.S_ISFIFO(os.lstat(out / "fifo").st_mode) and os.lstat(out / "disk").st_rdev == os.makedev(259, 70000)
    assert stat.S_ISSOCK(os.lstat(out / "sock").st_mode)


def test_holes_stay_holes_through_put_and_get(tmp_path):
    env = make_pool(tmp_path)
    sparse = tmp_path / "sparse"
    with open(sparse, "wb") as f:
        f.truncate(40 * MiB)
        f.seek(20 * MiB)
        f.write(b"middle")
    before = json.loads(ok("fs", "df", "vol", "--json", env=env).stdout)["used_blocks"]
    ok("fs", "put", "vol", sparse, "/sparse", env=env)
    img = fs_image(tmp_path, env)
    out = debugfs(img, "stat /sparse")
    assert "Size: 41943040" in out and "Blockcount: 24" in out  # one data block + its two indirect blocks
    back = tmp_path / "back"
    ok("fs", "get", "vol", "/sparse", back, env=env)
    assert back.read_bytes() == sparse.read_bytes()
    assert os.stat(back).st_blocks * 512 <= 64 * 1024  # the host file is sparse too
    df = json.loads(ok("fs", "df", "vol", "--json", env=env).stdout)
    assert df["used_blocks"] == before + 3


def test_hard_links_in_a_tree_stay_hard_links(tmp_path):
    env = make_pool(tmp_path)
    src = tmp_path / "links"
    src.mkdir()
    (src / "a").write_bytes(b"shared")
    os.link(src / "a", src / "b")
    ok("fs", "put", "vol", src, "/", env=env)
    ok("fs", "put", "vol", src, "/", env=env)  # a second put replaces both names, and they stay one inode
    a = json.loads(ok("fs", "stat", "vol", "/links/a", "--json", env=env).stdout)
    b = json.loads(ok("fs", "stat", "vol", "/links/b", "--json", env=env).stdout)
    assert a["ino"] == b["ino"] and a["nlink"] == 2
    names = [e["name"] for e in json.loads(ok("fs", "ls", "vol", "/links", "--json", env=env).stdout)]
    assert names == ["a", "b"]
    fs_image(tmp_path, env)


@pytest.mark.root
def test_archive_copies_owner_and_xattrs_both_ways(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("chown and trusted.* xattrs on the host need root")
    env = make_pool(tmp_path)
    src = tmp_path / "arch"
    src.mkdir()
    (src / "f").write_bytes(b"data")
    os.chown(src / "f", 1234, 5678)
    os.setxattr(src / "f", "user.note", b"kept")
    os.setxattr(src / "f", "trusted.overlay.opaque", b"y")
    os.symlink("f", src / "l")
    os.chown(src / "l", 42, 43, follow_symlinks=False)
    ok("fs", "put", "-a", "vol", src, "/", env=env)
    st = json.loads(ok("fs", "stat", "vol", "/arch/f", "--json", env=env).stdout)
    assert (st["uid"], st["gid"]) == (1234, 5678)
    assert st["xattrs"] == {"user.note": b"kept".hex(), "trusted.overlay.opaque": b"y".hex()}
    ls = json.loads(ok("fs", "stat", "vol", "/arch/l", "--json", env=env).stdout)
    assert (ls["uid"], ls["gid"]) == (42, 43)
    img = fs_image(tmp_path, env)
    assert 'user.note (4) = "kept"' in debugfs(img, "ea_list /arch/f")
    out = tmp_path / "out"
    ok("fs", "get", "-a", "vol", "/arch", out, env=env)
    assert os.getxattr(out / "f", "user.note") == b"kept" and os.getxattr(out / "f", "trusted.overlay.opaque") == b"y"
    assert (os.lstat(out / "f").st_uid, os.lstat(out / "l").st_uid) == (1234, 42)


def test_ls_json_gives_modes_as_numbers_and_symbols(tmp_path):
    env = make_pool(tmp_path)
    ok("fs", "mkdir", "vol", "/d", env=env)
    ok("fs", "put", "vol", "-", "/f", env=env, input=b"x")
    rows = json.loads(ok("fs", "ls", "vol", "--json", env=env).stdout)
    assert [(r["name"], r["mode"], r["mode_string"]) for r in rows] == [
        ("d", stat.S_IFDIR | 0o755, "drwxr-xr-x"), ("f", stat.S_IFREG | 0o644, "-rw-r--r--")]


def test_ls_on_an_unformatted_device_points_at_mkfs(tmp_path):
    env = {"THINPOOL_POOL": str(tmp_path / "pool")}
    ok("pool", "create", "--size", "64M", env=env)
    ok("thin", "create", "1", "--size", "16M", "--name", "blank", env=env)
    r = thinpool("fs", "ls", "blank", env=env)
    err = r.stderr.decode()
    assert r.returncode == 1 and err.count("\n") == 1 and err.startswith("thinpool: error: no ext2 file system")
    assert "thinpool fs mkfs blank" in err


def test_errors_name_the_path(tmp_path):
    env = make_pool(tmp_path)
    r = thinpool("fs", "cat", "vol", "/nope/x", env=env)
    assert r.returncode == 1 and "/nope/x" in r.stderr.decode()
    ok("fs", "put", "vol", "-", "/f", env=env, input=b"x")
    r = thinpool("fs", "get", "vol", "/f", tmp_path / "no" / "such" / "f", env=env)
    local = tmp_path / "no" / "such" / "f"
    assert (r.returncode, r.stderr.decode()) == (1, f"thinpool: error: {local}: No such file or directory\n")
    r = thinpool("fs", "put", "vol", "-", "/f/under-a-file", env=env, input=b"x")
    assert r.returncode == 1 and "/f/under-a-file" in r.stderr.decode()
