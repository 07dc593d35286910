"""Random operation sequences checked against a model of the tree (paths -> bytes), and e2fsck after each run."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile

import pytest
from fs_helpers import debugfs_cat, debugfs_ls, e2fsck
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from thinpool.errors import DirectoryNotEmpty, FileExists, FsError, IsADirectory, NotADirectory
from thinpool.fs import Filesystem
from thinpool.io.device import FileDevice

pytestmark = pytest.mark.external
MiB = 2**20
NAMES = st.sampled_from(["a", "b", "c", "d", "long-" + "n" * 40])
OFFSETS = st.one_of(st.integers(0, 20_000), st.integers(0, 6 * MiB))  # direct .. double indirect
DATA = st.binary(min_size=0, max_size=9000)


class Ext2Model(RuleBasedStateMachine):
    """Model: ``files`` path -> node id, ``nodes`` node id -> bytearray (hard links share a node), ``dirs``,
    ``links`` path -> symlink target."""

    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="fsmodel")
        self.image = os.path.join(self.tmp, "model.img")
        with open(self.image, "wb") as f:
            f.truncate(24 * MiB)
        self.dev = FileDevice(self.image)
        self.fs = Filesystem.mkfs(self.dev)
        self.files: dict[str, int] = {}
        self.nodes: dict[int, bytearray] = {}
        self.dirs: set[str] = {"/", "/lost+found"}
        self.links: dict[str, str] = {}
        self.next_node = 0

    # --- helpers ----------------------------------------------------------------------------------------------
    def _children(self, d: str) -> set[str]:
        pre = d.rstrip("/") + "/"
        everything = set(self.files) | self.dirs | set(self.links)
        return {p[len(pre):] for p in everything if p.startswith(pre) and p != d and "/" not in p[len(pre):]}

    def _exists(self, p: str) -> bool:
        return p in self.files or p in self.dirs or p in self.links

    @staticmethod
    def _join(d: str, name: str) -> str:
        return d.rstrip("/") + "/" + name

    # --- rules ------------------------------------------------------------------------------------------------
    @rule(data=st.data(), name=NAMES, content=DATA)
    def write_file(self, data, name, content):
        d = data.draw(st.sampled_from(sorted(self.dirs)))
        p = self._join(d, name)
        if p in self.dirs:
            with pytest.raises(IsADirectory):
                self.fs.write_file(p, content)
            return
        if p in self.links:
            return
        self.fs.write_file(p, content)
        if p not in self.files:
            self.files[p] = self.next_node
            self.next_node += 1
        self.nodes[self.files[p]] = bytearray(content)

    @precondition(lambda self: self.files)
    @rule(data=st.data(), offset=OFFSETS, content=DATA)
    def pwrite(self, data, offset, content):
        p = data.draw(st.sampled_from(sorted(self.files)))
        with self.fs.open(p, "r+b") as f:
            f.seek(offset)
            f.write(content)
        buf = self.nodes[self.files[p]]
        if content:
            if len(buf) < offset:
                buf.extend(bytes(offset - len(buf)))
            buf[offset:offset + len(content)] = content

    @precondition(lambda self: self.files)
    @rule(data=st.data(), size=OFFSETS)
    def truncate(self, data, size):
        p = data.draw(st.sampled_from(sorted(self.files)))
        self.fs.truncate(p, size)
        buf = self.nodes[self.files[p]]
        if size < len(buf):
            del buf[size:]
        else:
            buf.extend(bytes(size - len(buf)))

    @precondition(lambda self: self.files)
    @rule(data=st.data())
    def unlink(self, data):
        p = data.draw(st.sampled_from(sorted(self.files)))
        self.fs.unlink(p)
        node = self.files.pop(p)
        if node not in self.files.values():
            del self.nodes[node]

    @rule(data=st.data(), name=NAMES)
    def mkdir(self, data, name):
        d = data.draw(st.sampled_from(sorted(self.dirs)))
        p = self._join(d, name)
        if self._exists(p):
            with pytest.raises(FileExists):
                self.fs.mkdir(p)
            return
        self.fs.mkdir(p)
        self.dirs.add(p)

    @precondition(lambda self: len(self.dirs) > 2)
    @rule(data=st.data())
    def rmdir(self, data):
        p = data.draw(st.sampled_from(sorted(self.dirs - {"/", "/lost+found"})))
        if self._children(p):
            with pytest.raises(DirectoryNotEmpty):
                self.fs.rmdir(p)
            return
        self.fs.rmdir(p)
        self.dirs.remove(p)

    @precondition(lambda self: self.files)
    @rule(data=st.data(), name=NAMES)
    def hard_link(self, data, name):
        src = data.draw(st.sampled_from(sorted(self.files)))
        d = data.draw(st.sampled_from(sorted(self.dirs)))
        p = self._join(d, name)
        if self._exists(p):
            with pytest.raises(FileExists):
                self.fs.link(src, p)
            return
        self.fs.link(src, p)
        self.files[p] = self.files[src]

    @rule(data=st.data(), name=NAMES, link_to=st.sampled_from(["a", "../b", "x" * 59, "/" + "y" * 70]))
    def symlink(self, data, name, link_to):
        d = data.draw(st.sampled_from(sorted(self.dirs)))
        p = self._join(d, name)
        if self._exists(p):
            with pytest.raises(FileExists):
                self.fs.symlink(link_to, p)
            return
        self.fs.symlink(link_to, p)
        self.links[p] = link_to

    @precondition(lambda self: len(self._children("/")) > 1)
    @rule(data=st.data(), name=NAMES)
    def rename(self, data, name):
        movable = sorted((set(self.files) | self.dirs | set(self.links)) - {"/", "/lost+found"})
        src = data.draw(st.sampled_from(movable))
        d = data.draw(st.sampled_from(sorted(self.dirs)))
        dst = self._join(d, name)
        if src in self.dirs and (dst == src or dst.startswith(src + "/")):
            if dst != src:
                with pytest.raises(FsError) as e:
                    self.fs.rename(src, dst)
                assert e.value.errno == errno.EINVAL
            return
        if dst == src or (src in self.files and dst in self.files and self.files[src] == self.files[dst]):
            self.fs.rename(src, dst)
            return
        if self._exists(dst):
            if src in self.dirs and dst not in self.dirs:
                with pytest.raises(NotADirectory):
                    self.fs.rename(src, dst)
                return
            if src not in self.dirs and dst in self.dirs:
                with pytest.raises(IsADirectory):
                    self.fs.rename(src, dst)
                return
            if dst in self.dirs and self._children(dst):
                with pytest.raises(DirectoryNotEmpty):
                    self.fs.rename(src, dst)
                return
        self.fs.rename(src, dst)
        # apply to the model: drop whatever dst was, then move src (and its subtree) to dst
        if dst in self.files:
            node = self.files.pop(dst)
            if node not in self.files.values():
                del self.nodes[node]
        self.links.pop(dst, None)
        self.dirs.discard(dst)
        for table in (self.files, self.links):
            for p in [p for p in table if p == src or p.startswith(src + "/")]:
                table[dst + p[len(src):]] = table.pop(p)
        for p in [p for p in self.dirs if p == src or p.startswith(src + "/")]:
            self.dirs.remove(p)
            self.dirs.add(dst + p[len(src):])

    @rule()
    def remount(self):
        self.fs.flush()
        e2fsck(self.image)
        self.fs = Filesystem.mount(self.dev)

    # --- invariants -------------------------------------------------------------------------------------------
    @invariant()
    def directory_listings_match(self):
        for d in self.dirs:
            assert set(self.fs.listdir(d)) == self._children(d), d

    def _check_contents(self):
        for p, node in self.files.items():
            assert self.fs.read_file(p) == self.nodes[node], p
            assert self.fs.stat(p).nlink == sum(1 for n in self.files.values() if n == node)
        for p, target in self.links.items():
            assert self.fs.readlink(p) == target

    def teardown(self):
        try:
            self._check_contents()
            self.fs.flush()
            e2fsck(self.image)
            # what debugfs sees: names in the root and the bytes of a few small files
            assert set(debugfs_ls(self.image, "/")) == self._children("/")
            small = [p for p, n in sorted(self.files.items()) if len(self.nodes[n]) < 30_000][:3]
            for p in small:
                assert debugfs_cat(self.image, p) == self.nodes[self.files[p]]
        finally:
            self.dev.close()
            shutil.rmtree(self.tmp, ignore_errors=True)


Ext2Model.TestCase.settings = settings(settings(), stateful_step_count=25)
test_ext2_against_model = Ext2Model.TestCase
