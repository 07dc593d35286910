"""Containers: the ``NAME-init`` snapshot with moby's initlayer, the rw snapshot ``NAME``; cp, diff, commit, export, rm.

Layer: driver. May import: thinpool.errors, thinpool.fs, thinpool.driver.*.

As moby's layer store does for a container: ``NAME-init`` is a snapshot of the image's top layer (the base device
for an image without layers) with ``daemon/initlayer``'s entries written into its rootfs, and ``NAME`` a snapshot
of that. A container's diff is ``NAME`` against ``NAME-init`` (moby's naive diff), its commit that diff as a new
layer on the image, its removal a discard of both devices and then their deletion. Records live in
``<pool>/driver/containers/NAME.json``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import secrets
import stat as S
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from thinpool.driver.apply import LayerApplier
from thinpool.driver.blockdiff import remove_index, save_index
from thinpool.driver.changes import Change, changes_dirs, export_changes
from thinpool.driver.rootfs import ROOTFS, export_tree, lstat, resolve, tar_info, walk
from thinpool.driver.state import DeviceSet, atomic_output, go_json, write_meta_file
from thinpool.driver.store import ImageStore, driver_get, mounted
from thinpool.errors import ContainerExists, ContainerNotFound, DriverError, FileNotFound
from thinpool.fs.filesystem import Filesystem

NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]+$")  # moby's validContainerNamePattern (without the "/")

# daemon/initlayer/setup_unix.go: path -> "dir", "file" or a symlink target
INIT_LAYER: tuple[tuple[str, str], ...] = (
    ("/dev/pts", "dir"), ("/dev/shm", "dir"), ("/proc", "dir"), ("/sys", "dir"),
    ("/.dockerenv", "file"), ("/etc/resolv.conf", "file"), ("/etc/hosts", "file"), ("/etc/hostname", "file"),
    ("/dev/console", "file"), ("/etc/mtab", "/proc/mounts"),
)


def setup_init_layer(fs: Filesystem, root: str = ROOTFS) -> None:
    """``setupInitLayer``: unlink every prefix of each path that is not a directory, then create what is
    missing: parents 0755 root, directories 0755, empty files 0755 root, the ``/etc/mtab`` symlink."""
    for pth, typ in INIT_LAYER:
        prev = ""
        for part in pth.strip("/").split("/"):
            prev += "/" + part
            p = resolve(fs, root, prev)
            st = lstat(fs, p)
            if st is not None and not S.S_ISDIR(st.mode):
                fs.unlink(p)
        target = resolve(fs, root, pth, follow_last=True)
        if lstat(fs, target) is not None:
            continue
        _mkdir_all_new(fs, root, os.path.dirname(pth))
        path = resolve(fs, root, pth)
        if typ == "dir":
            _mkdir_all_new(fs, root, pth)
        elif typ == "file":
            fs.open(path, "wb").close()
            fs.chmod(path, 0o755)
            fs.chown(path, 0, 0)
        else:
            fs.symlink(typ, path)


def _mkdir_all_new(fs: Filesystem, root: str, rel: str) -> None:
    """``MkdirAllAndChownNew(path, 0755, root)``: create the missing components, owned by root."""
    cur = ""
    for part in rel.strip("/").split("/"):
        if not part:
            continue
        cur += "/" + part
        p = resolve(fs, root, cur, follow_last=True)
        if lstat(fs, p) is None:
            fs.mkdir(p, 0o755)
            fs.chown(p, 0, 0)


class Containers:
    """The containers of one driver."""

    def __init__(self, ds: DeviceSet, store: ImageStore) -> None:
        self.ds = ds
        self.store = store
        self.dir = ds.root / "containers"

    def _path(self, name: str) -> Path:
        return self.dir / f"{name}.json"

    def all(self) -> list[dict[str, Any]]:
        if not self.dir.is_dir():
            return []
        return [json.loads(p.read_bytes()) for p in sorted(self.dir.glob("*.json"))
                if not p.name.endswith(".inodes.json")]

    def get(self, name: str) -> dict[str, Any]:
        try:
            return json.loads(self._path(name).read_bytes())  # type: ignore[no-any-return]
        except FileNotFoundError:
            for c in self.all():
                if c["ID"].startswith(name) and len(name) >= 4:
                    return c
            raise ContainerNotFound(name=name) from None

    def in_use(self, image_id: str) -> str | None:
        for c in self.all():
            if c["Image"] == image_id:
                return str(c["Name"])
        return None

    # --- create / remove --------------------------------------------------------------------------------------
    def create(self, image_ref: str, name: str | None = None) -> dict[str, Any]:
        """``docker create``: the init device (initlayer entries), then the rw device.

        Raises:
            ImageNotFound, ContainerExists, DriverError (bad name), PoolLowOnSpace (min free space).
        """
        image_id = self.store.resolve(image_ref)
        cid = secrets.token_hex(32)
        name = name or f"c-{cid[:12]}"
        if not NAME_RE.match(name):
            raise DriverError(reason=f"invalid container name {name!r}: only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed")
        if self._path(name).exists():
            raise ContainerExists(name=name)
        if name.isdigit():
            raise DriverError(reason=f"invalid container name {name!r}: thinpool takes a number for a device id")
        pool = self.ds.pool
        taken = {pool.device_label(i) for i in pool.list_devices()}
        for dev in (name, name + "-init"):
            if dev in taken:
                raise ContainerExists(name=name, reason=f"a device named {dev} exists")
        parent = self.store.device_hash(self.store.top_layer(image_id))
        init = name + "-init"
        self.ds.add_device(init, parent, init)
        try:
            with mounted(self.ds, init, write=True) as fs:
                driver_get(fs, init)
                setup_init_layer(fs)
            self.dir.mkdir(parents=True, exist_ok=True)
            with mounted(self.ds, init, write=False) as fs:
                save_index(fs, self.dir, name)  # for diff --blocks: -init never changes
            self.ds.add_device(name, init, name)
        except BaseException:
            self.ds.delete_device(init)
            remove_index(self.dir, name)
            raise
        rec = {"ID": cid, "Name": name, "Image": image_id, "ImageRef": image_ref,
               "Created": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
               "InitDevice": init, "Device": name}
        self.dir.mkdir(parents=True, exist_ok=True)
        write_meta_file(self._path(name), go_json(rec))
        return rec

    def remove(self, name: str) -> None:
        """``docker rm``: discard and delete the rw device and the init device, then the record."""
        rec = self.get(name)
        for h in (rec["Device"], rec["InitDevice"]):
            if self.ds.lookup(h) is not None:
                self.ds.delete_device(h)
        os.unlink(self._path(rec["Name"]))
        remove_index(self.dir, rec["Name"])

    # --- content ----------------------------------------------------------------------------------------------
    def diff(self, name: str) -> list[Change]:
        rec = self.get(name)
        with mounted(self.ds, rec["Device"], write=False) as new, \
                mounted(self.ds, rec["InitDevice"], write=False) as old:
            return changes_dirs(new, ROOTFS, old, ROOTFS)

    def export(self, name: str, out: str) -> None:
        """``docker export``: a flat tar of the container's rootfs."""
        rec = self.get(name)
        with atomic_output(out) as tmp, mounted(self.ds, rec["Device"], write=False) as fs, \
                tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tw:
            export_tree(fs, ROOTFS, tw)

    def commit(self, name: str, ref: str) -> str:
        """``docker commit``: the naive diff as a new layer on the container's image, tagged ``ref``."""
        rec = self.get(name)
        changes = self.diff(name)
        with tempfile.NamedTemporaryFile(dir=self.ds.root, prefix=".commit-", suffix=".tar") as tmp:
            with mounted(self.ds, rec["Device"], write=False) as fs, \
                    tarfile.open(fileobj=tmp, mode="w", format=tarfile.PAX_FORMAT) as tw:
                export_changes(fs, ROOTFS, changes, tw)
            tmp.flush()
            image_id = self.store.commit_image(rec["Image"], tmp.name, f"thinpool container commit {rec['Name']}")
        self.store.tag(image_id, ref)
        return image_id

    def cp_in(self, name: str, src: str, dst: str, *, archive: bool = False) -> None:
        """``docker cp SRC NAME:DST``: ownership root:root unless ``archive``; modes and mtimes kept; a
        directory DST receives SRC under its own name (``SRC/.``: its content)."""
        rec = self.get(name)
        contents_only = src.rstrip("/").endswith("/.") or src.rstrip("/") == "."
        src_path = os.path.normpath(src)
        if not os.path.lexists(src_path):
            raise DriverError(reason=f"no such file or directory: {src}")
        with mounted(self.ds, rec["Device"], write=True) as fs:
            target = resolve(fs, ROOTFS, dst, follow_last=True)
            tst = lstat(fs, target)
            src_is_dir = os.path.isdir(src_path) and not os.path.islink(src_path)
            if tst is not None and S.S_ISDIR(tst.mode):
                dest_dir, arcname = target, (None if contents_only else os.path.basename(src_path))
            else:
                if dst.endswith("/"):
                    raise DriverError(reason=f"no such directory: {dst}")
                parent = target.rsplit("/", 1)[0] or "/"
                pst = lstat(fs, parent)
                if pst is None or not S.S_ISDIR(pst.mode):
                    raise DriverError(reason=f"no such directory: {os.path.dirname(dst) or '/'}")
                if tst is not None and src_is_dir:
                    raise DriverError(reason=f"cannot copy a directory to a file: {dst}")
                dest_dir, arcname = parent, target.rsplit("/", 1)[1]
                if contents_only:
                    fs.mkdir(target, 0o755)
                    dest_dir, arcname = target, None
            untar_host(fs, dest_dir, src_path, arcname, archive=archive)

    def cp_out(self, name: str, src: str, dst: str) -> None:
        """``docker cp NAME:SRC DST``: the entry (a directory with everything below) to the host; host
        ownership is the caller's, modes and mtimes are kept."""
        rec = self.get(name)
        with mounted(self.ds, rec["Device"], write=False) as fs:
            path = resolve(fs, ROOTFS, src, follow_last=src.endswith("/.") or src.endswith("/"))
            st = lstat(fs, path)
            if st is None:
                raise FileNotFound(path=src)
            if os.path.isdir(dst):
                out_dir, base = dst, os.path.basename(path.rstrip("/")) or "rootfs"
            else:
                out_dir, base = os.path.dirname(os.path.abspath(dst)), os.path.basename(dst)
                if not os.path.isdir(out_dir):
                    raise DriverError(reason=f"no such directory: {out_dir}")
            with tempfile.TemporaryFile() as tmp:
                with tarfile.open(fileobj=tmp, mode="w", format=tarfile.PAX_FORMAT) as tw:
                    seen: dict[int, str] = {}
                    tar_info(fs, path, base, st, seen).write(fs, tw)
                    if S.S_ISDIR(st.mode):
                        for p, cst in walk(fs, path):
                            tar_info(fs, p, base + p[len(path):], cst, seen).write(fs, tw)
                tmp.seek(0)
                with tarfile.open(fileobj=tmp, mode="r") as tr:
                    tr.chown = lambda *a, **k: None  # type: ignore[method-assign]  # NoLchown, as the docker CLI
                    tr.extractall(out_dir, filter="fully_trusted")


def untar_host(fs: Filesystem, dest_dir: str, src: str, arcname: str | None, *, archive: bool) -> None:
    """Extract host ``src`` into ``dest_dir`` of ``fs`` as moby's ``Untar`` does (existing entries replaced
    unless both are directories; directory times last)."""
    with tempfile.TemporaryFile() as tmp:
        with tarfile.open(fileobj=tmp, mode="w", format=tarfile.PAX_FORMAT) as tw:
            def own(ti: tarfile.TarInfo) -> tarfile.TarInfo:
                if not archive:
                    ti.uid = ti.gid = 0
                ti.uname = ti.gname = ""
                return ti

            if arcname is None:
                for n in sorted(os.listdir(src)):
                    tw.add(os.path.join(src, n), arcname=n, filter=own)
            else:
                tw.add(src, arcname=arcname, filter=own)
        tmp.seek(0)
        applier = LayerApplier(fs, dest_dir, source=src, whiteouts=False)
        applier.apply(tmp)


def container_rows(containers: Containers) -> list[dict[str, Any]]:
    return [{"name": c["Name"], "id": c["ID"], "image": c.get("ImageRef", c["Image"]), "created": c["Created"],
             "devices": [c["InitDevice"], c["Device"]]} for c in containers.all()]

