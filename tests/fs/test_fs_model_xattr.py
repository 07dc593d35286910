"""Random sequences of mknod, extended-attribute, write, link and unlink calls against a model, with remounts;
``e2fsck -fn`` after each remount and at the end, where ``debugfs ea_list`` must show the model's attributes."""

from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile

import pytest
from fs_helpers import debugfs, e2fsck
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from thinpool.errors import FileExists, FsNoSpace, XattrNotFound
from thinpool.fs import Filesystem
from thinpool.fs import xattr as X
from thinpool.io.device import FileDevice

pytestmark = pytest.mark.external
MiB = 2**20
NAMES = st.sampled_from(["a", "b", "c", "fifo", "dev"])
XNAMES = st.sampled_from(["user.a", "user.bb", "trusted.overlay.opaque", "security.capability", "user." + "n" * 60])
VALUES = st.one_of(st.binary(max_size=40), st.binary(min_size=900, max_size=1800))
KINDS = st.sampled_from([(stat.S_IFIFO, 0), (stat.S_IFSOCK, 0), (stat.S_IFCHR, os.makedev(1, 3)),
                         (stat.S_IFBLK, os.makedev(259, 65536 + 7)), (stat.S_IFCHR, os.makedev(4095, 1 << 19))])


class XattrModel(RuleBasedStateMachine):
    """Model: ``entries`` path -> node, ``kinds`` node -> (mode, rdev), ``attrs`` node -> {name: value}."""

    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="fsxattr")
        self.image = os.path.join(self.tmp, "x.img")
        with open(self.image, "wb") as f:
            f.truncate(16 * MiB)
        self.dev = FileDevice(self.image)
        self.fs = Filesystem.mkfs(self.dev)
        self.entries: dict[str, int] = {"/": 0}
        self.kinds: dict[int, tuple[int, int]] = {0: (stat.S_IFDIR | 0o755, 0)}
        self.attrs: dict[int, dict[str, bytes]] = {0: {}}
        self.next_node = 1

    def _new(self, path: str, mode: int, rdev: int) -> None:
        self.entries[path] = self.next_node
        self.kinds[self.next_node] = (mode, rdev)
        self.attrs[self.next_node] = {}
        self.next_node += 1

    @rule(name=NAMES, kind=KINDS)
    def mknod(self, name, kind):
        p = "/" + name
        mode = kind[0] | 0o640
        if p in self.entries:
            with pytest.raises(FileExists):
                self.fs.mknod(p, mode, kind[1])
            return
        self.fs.mknod(p, mode, kind[1])
        self._new(p, mode, kind[1] if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else 0)

    @rule(name=NAMES, content=st.binary(max_size=5000))
    def write_file(self, name, content):
        p = "/" + name
        if p in self.entries and not stat.S_ISREG(self.kinds[self.entries[p]][0]):
            return
        self.fs.write_file(p, content)
        if p not in self.entries:
            self._new(p, stat.S_IFREG | 0o644, 0)

    @rule(name=NAMES)
    def symlink(self, name):
        p = "/" + name
        if p in self.entries:
            return
        self.fs.symlink("target-" + name, p)
        self._new(p, stat.S_IFLNK | 0o777, 0)

    @precondition(lambda self: len(self.entries) > 1)
    @rule(data=st.data(), name=NAMES)
    def hard_link(self, data, name):
        src = data.draw(st.sampled_from(sorted(set(self.entries) - {"/"})))
        p = "/" + name + "-link"
        if p in self.entries:
            return
        self.fs.link(src, p)
        self.entries[p] = self.entries[src]

    @precondition(lambda self: len(self.entries) > 1)
    @rule(data=st.data())
    def unlink(self, data):
        p = data.draw(st.sampled_from(sorted(set(self.entries) - {"/"})))
        self.fs.unlink(p)
        node = self.entries.pop(p)
        if node not in self.entries.values():
            del self.kinds[node], self.attrs[node]

    @rule(data=st.data(), name=XNAMES, value=VALUES)
    def setxattr(self, data, name, value):
        p = data.draw(st.sampled_from(sorted(self.entries)))
        node = self.entries[p]
        want = {**self.attrs[node], name: value}
        if not X.block_fits({X.split_name(k): v for k, v in want.items()}, 4096):
            with pytest.raises(FsNoSpace):
                self.fs.setxattr(p, name, value)
            return
        self.fs.setxattr(p, name, value)
        self.attrs[node] = want

    @rule(data=st.data(), name=XNAMES)
    def removexattr(self, data, name):
        p = data.draw(st.sampled_from(sorted(self.entries)))
        node = self.entries[p]
        if name not in self.attrs[node]:
            with pytest.raises(XattrNotFound):
                self.fs.removexattr(p, name)
            return
        self.fs.removexattr(p, name)
        del self.attrs[node][name]

    @rule()
    def remount(self):
        self.fs.flush()
        e2fsck(self.image)
        self.fs = Filesystem.mount(self.dev)

    @invariant()
    def attributes_and_kinds_match(self):
        for p, node in self.entries.items():
            st_ = self.fs.lstat(p)
            mode, rdev = self.kinds[node]
            assert (st_.st_mode, st_.st_rdev) == (mode, rdev), p
            assert sorted(self.fs.listxattr(p)) == sorted(self.attrs[node]), p
            for name, value in self.attrs[node].items():
                assert self.fs.getxattr(p, name) == value

    def teardown(self):
        try:
            self.fs.flush()
            e2fsck(self.image)
            for p, node in sorted(self.entries.items())[:4]:
                out = debugfs(self.image, f'ea_list "{p}"')
                listed = dict(re.findall(r"^  (\S+) \((\d+)\)", out, re.M))
                assert listed == {n: str(len(v)) for n, v in self.attrs[node].items()}, (p, out)
        finally:
            self.dev.close()
            shutil.rmtree(self.tmp, ignore_errors=True)


XattrModel.TestCase.settings = settings(settings(), stateful_step_count=30)
test_xattrs_and_special_files_against_model = XattrModel.TestCase
