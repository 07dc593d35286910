"""The driver's device set inside a pool: moby's devmapper records, its transaction protocol, the base device, info.

Layer: driver. May import: thinpool.errors, thinpool.pool, thinpool.thin, thinpool.fs.

moby's ``daemon/graphdriver/devmapper/deviceset.go`` keeps, next to the thin pool, a directory ``metadata/`` with
one JSON file per device (``metadata/<hash>``, ``metadata/base`` for the base device whose hash is ""),
``deviceset-metadata`` and ``transaction-metadata``; every file is written to a temporary file, fsynced and renamed
over the old one (``writeMetaFile``). Here that directory is ``<pool>/driver/metadata``.

Each device creation or deletion is one moby transaction:

1. ``openTransaction``: ``open_transaction_id = pool transaction id + 1`` with the device's hash and id, persisted;
2. the dm message (``create_thin``, ``create_snap`` or ``delete``), committed by the pool as dm-thin commits
   after every message, without moving the pool's transaction id;
3. ``registerDevice`` / ``unregisterDevice``: the device's JSON file;
4. ``closeTransaction``: ``set_transaction_id OLD NEW`` on the pool.

At the next writable open (moby's ``processPendingTransaction``) an open transaction whose id differs from the
pool's is rolled back: the device is deleted (if it exists) and its JSON file removed.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata as _importlib_metadata
from pathlib import Path
from typing import Any

from thinpool.errors import DriverError, DriverNotInitialized, PoolLowOnSpace
from thinpool.fs.filesystem import Filesystem
from thinpool.pool import Pool
from thinpool.thin import ThinDevice

log = logging.getLogger(__name__)

DRIVER_DIR = "driver"
MAX_DEVICE_ID = 0xFFFFFF  # 24-bit dm-thin device ids (moby's maxDeviceID)
DEFAULT_BASE_SIZE = 10 * 1024 ** 3  # bytes (dm.basesize: 10 GiB)
DEFAULT_MIN_FREE_PERCENT = 10  # dm.min_free_space
BASE_DEVICE_NAME = "base"
BACKING_FS = "ext2"
_DECIMAL_UNITS = ("B", "kB", "MB", "GB", "TB", "PB", "EB", "ZB", "YB")


def human_size(size: float) -> str:
    """go-units ``HumanSize``: decimal units, 4 significant digits (``65.54kB``, ``10.74GB``)."""
    i = 0
    while size >= 1000.0 and i < len(_DECIMAL_UNITS) - 1:
        size /= 1000.0
        i += 1
    return f"{size:.4g}{_DECIMAL_UNITS[i]}"


def write_meta_file(path: Path, data: bytes) -> None:
    """moby's ``writeMetaFile``: a temporary file in the same directory, written, fsynced, renamed over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


@contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[str]:
    """A temporary name next to ``path``, renamed over it on success and removed on failure (a failing command
    leaves no half-written output)."""
    target = os.fspath(path)
    tmp = os.path.join(os.path.dirname(os.path.abspath(target)), f".{os.path.basename(target)}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def go_json(obj: Any) -> bytes:
    """JSON as Go's ``json.Marshal`` writes it (compact, fields in the given order)."""
    return json.dumps(obj, separators=(",", ":")).encode()


@dataclass(slots=True)
class DevInfo:
    """moby's ``devInfo`` (the JSON fields plus the hash, which names the file)."""

    hash: str
    device_id: int
    size: int  # bytes
    transaction_id: int
    initialized: bool = False
    deleted: bool = False

    def to_json(self) -> bytes:
        return go_json({"device_id": self.device_id, "size": self.size, "transaction_id": self.transaction_id,
                        "initialized": self.initialized, "deleted": self.deleted})


class DeviceSet:
    """The driver's state in one open pool (moby's ``DeviceSet``). Use :meth:`init` or :meth:`open`."""

    def __init__(self, pool: Pool, options: dict[str, Any]) -> None:
        self.pool = pool
        self.root = pool.path / DRIVER_DIR
        self.metadata_dir = self.root / "metadata"
        self.options = options
        self.min_free_percent = int(options.get("min_free_space_percent", DEFAULT_MIN_FREE_PERCENT))
        self.devices: dict[str, DevInfo] = {}
        self.next_device_id = 0
        self.base_uuid = ""
        self.base_fs = ""
        self.open_transaction_id = pool.transaction_id
        self.transaction_hash = ""
        self.transaction_device_id = 0

    # --- lifecycle --------------------------------------------------------------------------------------------
    @classmethod
    def init(cls, pool: Pool, *, base_size: int = DEFAULT_BASE_SIZE,
             min_free_percent: int = DEFAULT_MIN_FREE_PERCENT) -> DeviceSet:
        """Set up the driver in ``pool``: records, then the base device (moby's ``createBaseImage``)."""
        root = pool.path / DRIVER_DIR
        if (root / "driver.json").exists():
            raise DriverError(reason=f"pool {pool.path} already has a devicemapper driver")
        if base_size <= 0 or base_size % 4096:
            raise DriverError(reason=f"base size {base_size} must be a positive multiple of 4096 bytes")
        if not 0 <= min_free_percent <= 99:
            raise DriverError(reason=f"minimum free space {min_free_percent}% must be 0..99")
        if BASE_DEVICE_NAME in {pool.device_label(i) for i in pool.list_devices()}:
            raise DriverError(reason=f"pool {pool.path} already has a device named {BASE_DEVICE_NAME!r}")
        (root / "metadata").mkdir(parents=True, exist_ok=True)
        options = {"base_size": base_size, "min_free_space_percent": min_free_percent}
        ds = cls(pool, options)
        ds._save_transaction()
        ds._save_deviceset()
        info = ds._create_register_device("", BASE_DEVICE_NAME, base_size)
        dev = ds.thin(info)
        fs = Filesystem.mkfs(dev)
        ds.base_uuid = str(_uuid_of(fs))
        fs.close()
        info.initialized = True
        ds._save_info(info)
        ds.base_fs = BACKING_FS
        ds._save_deviceset()
        # driver.json last: a crash before it leaves no driver, and init can be run again after the rollback
        write_meta_file(root / "driver.json", go_json(options))
        return ds

    @classmethod
    def open(cls, pool: Pool) -> DeviceSet:
        """Load the records; on a writable pool roll back an open transaction (``processPendingTransaction``)."""
        root = pool.path / DRIVER_DIR
        try:
            options = json.loads((root / "driver.json").read_bytes())
        except FileNotFoundError:
            raise DriverNotInitialized(path=str(pool.path)) from None
        ds = cls(pool, options)
        ds._load()
        if not pool.readonly:
            ds._process_pending_transaction()
        return ds

    def _load(self) -> None:
        for p in sorted(self.metadata_dir.iterdir()):
            if p.name in ("deviceset-metadata", "transaction-metadata") or p.name.startswith("."):
                continue
            d = json.loads(p.read_bytes())
            h = "" if p.name == "base" else p.name
            self.devices[h] = DevInfo(h, int(d["device_id"]), int(d["size"]), int(d["transaction_id"]),
                                      bool(d.get("initialized")), bool(d.get("deleted")))
        ds = _read_json(self.metadata_dir / "deviceset-metadata")
        self.next_device_id = int(ds.get("next_device_id", 0))
        self.base_uuid = ds.get("BaseDeviceUUID", "")
        self.base_fs = ds.get("BaseDeviceFilesystem", "")
        tx = _read_json(self.metadata_dir / "transaction-metadata")
        self.open_transaction_id = int(tx.get("open_transaction_id", self.pool.transaction_id))
        self.transaction_hash = tx.get("device_hash", "")
        self.transaction_device_id = int(tx.get("device_id", 0))

    def _process_pending_transaction(self) -> None:
        pool_tid = self.pool.transaction_id
        if self.open_transaction_id == pool_tid:
            return
        if self.open_transaction_id < pool_tid:
            log.error("open transaction id %s is less than pool transaction id %s", self.open_transaction_id,
                      pool_tid)
            return
        log.warning("rolling back open transaction %s: hash=%r device_id=%s", self.open_transaction_id,
                    self.transaction_hash, self.transaction_device_id)
        if self.transaction_device_id in self.pool.list_devices():
            self._dm_delete(self.transaction_device_id)
        self._remove_info(self.transaction_hash)
        self.open_transaction_id = pool_tid
        self._save_transaction()

    # --- records ----------------------------------------------------------------------------------------------
    def _info_path(self, h: str) -> Path:
        return self.metadata_dir / (h or "base")

    def _save_info(self, info: DevInfo) -> None:
        write_meta_file(self._info_path(info.hash), info.to_json())

    def _remove_info(self, h: str) -> None:
        self.devices.pop(h, None)
        try:
            os.unlink(self._info_path(h))
        except FileNotFoundError:
            pass

    def _save_transaction(self) -> None:
        write_meta_file(self.metadata_dir / "transaction-metadata",
                        go_json({"open_transaction_id": self.open_transaction_id,
                                 "device_hash": self.transaction_hash, "device_id": self.transaction_device_id}))

    def _save_deviceset(self) -> None:
        write_meta_file(self.metadata_dir / "deviceset-metadata",
                        go_json({"next_device_id": self.next_device_id, "BaseDeviceUUID": self.base_uuid,
                                 "BaseDeviceFilesystem": self.base_fs}))

    def _open_transaction(self, h: str, device_id: int) -> None:
        self.open_transaction_id = self.pool.transaction_id + 1
        self.transaction_hash = h
        self.transaction_device_id = device_id
        self._save_transaction()

    def _close_transaction(self) -> None:
        self.pool.set_transaction_id(self.pool.transaction_id, self.open_transaction_id)

    def _next_free_device_id(self) -> int:
        used = set(self.pool.list_devices()) | {d.device_id for d in self.devices.values()}
        for _ in range(MAX_DEVICE_ID + 1):
            self.next_device_id = (self.next_device_id + 1) & MAX_DEVICE_ID
            if self.next_device_id not in used:
                self._save_deviceset()
                return self.next_device_id
        raise DriverError(reason="unable to find a free device id")

    # --- dm messages (each committed, none moves the pool's transaction id) -----------------------------------
    # Pool's public create/delete with keep_transaction_id=True: the bare dm message, committed, the pool's
    # manifest (names, sizes, lineage) kept in step with the metadata; the driver moves the transaction id itself
    # with set_transaction_id, as moby does.
    def _dm_create(self, device_id: int, origin_id: int | None, name: str, size: int) -> None:
        pool = self.pool
        if any(pool.device_label(i) == name for i in pool.list_devices()):
            raise DriverError(reason=f"a device named {name!r} already exists in the pool")
        if origin_id is None:
            pool.create_thin(device_id, size, name=name, keep_transaction_id=True)
        else:
            pool.create_snap(device_id, origin_id, name=name, size=size, keep_transaction_id=True)

    def _dm_delete(self, device_id: int) -> None:
        self.pool.delete_thin(device_id, keep_transaction_id=True)

    # --- devices ----------------------------------------------------------------------------------------------
    def lookup(self, h: str) -> DevInfo | None:
        return self.devices.get(h)

    def get(self, h: str) -> DevInfo:
        info = self.devices.get(h)
        if info is None:
            raise DriverError(reason=f"unknown device {h or 'base'}")
        return info

    def thin(self, info: DevInfo) -> ThinDevice:
        return self.pool.device(info.device_id)

    def _create_register_device(self, h: str, name: str, size: int, origin: DevInfo | None = None) -> DevInfo:
        """``createRegisterDevice`` / ``createRegisterSnapDevice``: the four steps of one transaction."""
        device_id = self._next_free_device_id()
        self._open_transaction(h, device_id)
        self._dm_create(device_id, None if origin is None else origin.device_id, name, size)
        info = DevInfo(h, device_id, size, self.open_transaction_id)
        try:
            self._save_info(info)
        except BaseException:
            self._dm_delete(device_id)
            raise
        self.devices[h] = info
        self._close_transaction()
        return info

    def pool_has_free_space(self) -> None:
        """moby's ``poolHasFreeSpace``: refuse when less than min_free_space % of data or metadata is free."""
        if self.min_free_percent == 0:
            return
        st = self.pool.status()
        for kind, used, total in (("data", st.used_data_blocks, st.total_data_blocks),
                                  ("metadata", st.used_metadata_blocks, st.total_metadata_blocks)):
            minimum = max(1, total * self.min_free_percent // 100)
            if total - used < minimum:
                raise PoolLowOnSpace(kind=kind, free=total - used, minimum=minimum, requested=0)

    def add_device(self, h: str, base_hash: str, name: str, size: int | None = None) -> DevInfo:
        """``AddDevice``: a snapshot of ``base_hash`` named ``name`` (size at least the parent's)."""
        base = self.get(base_hash)
        if h in self.devices:
            raise DriverError(reason=f"device {h} already exists")
        size = base.size if size is None else size
        if size < base.size:
            raise DriverError(reason=f"container size cannot be smaller than {human_size(base.size)}")
        if size != base.size:
            raise DriverError(reason="growing a device's filesystem is not supported")
        self.pool_has_free_space()
        return self._create_register_device(h, name, size, base)

    def delete_device(self, h: str, *, discard: bool = True) -> None:
        """``DeleteDevice``: discard the whole device first (returns the space to the host), then the delete
        transaction."""
        info = self.get(h)
        if discard:
            dev = self.thin(info)
            dev.discard(0, dev.size)
            self.pool.commit()
        self._open_transaction(h, info.device_id)
        self._dm_delete(info.device_id)
        self._remove_info(h)
        self._close_transaction()

    def device_name(self, info: DevInfo) -> str:
        return self.pool.device_name(info.device_id)

    # --- status -----------------------------------------------------------------------------------------------
    def status(self) -> list[tuple[str, str]]:
        """The rows ``docker info`` printed for devicemapper (``Driver.Status``), in its order."""
        st = self.pool.status()
        block = st.chunk_size
        data_used = st.used_data_blocks * block
        data_total = st.total_data_blocks * block
        md_used = st.used_metadata_blocks * 4096
        md_total = st.total_metadata_blocks * 4096
        data_file = str((self.pool.path / "data").resolve())
        md_file = str((self.pool.path / "metadata").resolve())
        data_avail = min(data_total - data_used, _fs_free(data_file))
        md_avail = min(md_total - md_used, _fs_free(md_file))
        min_free = st.total_data_blocks * self.min_free_percent // 100 * block
        base = self.devices.get("")
        deleted = sum(1 for d in self.devices.values() if d.deleted)
        return [
            ("Pool Name", self.pool_name()),
            ("Pool Blocksize", human_size(block)),
            ("Base Device Size", human_size(base.size if base else 0)),
            ("Backing Filesystem", self.base_fs),
            ("Udev Sync Supported", "false"),
            ("Data file", data_file),
            ("Metadata file", md_file),
            ("Data loop file", data_file),
            ("Metadata loop file", md_file),
            ("Data Space Used", human_size(data_used)),
            ("Data Space Total", human_size(data_total)),
            ("Data Space Available", human_size(data_avail)),
            ("Metadata Space Used", human_size(md_used)),
            ("Metadata Space Total", human_size(md_total)),
            ("Metadata Space Available", human_size(md_avail)),
            ("Thin Pool Minimum Free Space", human_size(min_free)),
            ("Deferred Removal Enabled", "false"),
            ("Deferred Deletion Enabled", "false"),
            ("Deferred Deleted Device Count", str(deleted)),
            ("Library Version", f"thinpool {_version()}"),
        ]

    def pool_name(self) -> str:
        """``docker-MAJ:MIN-INODE-pool`` of the pool directory, as moby names the pool after its home."""
        st = os.stat(self.pool.path)
        return f"docker-{os.major(st.st_dev)}:{os.minor(st.st_dev)}-{st.st_ino}-pool"


def _fs_free(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _read_json(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    return d if isinstance(d, dict) else {}


def _uuid_of(fs: Filesystem) -> str:
    return fs.uuid


def _version() -> str:
    try:
        return _importlib_metadata.version("thinpool")
    except _importlib_metadata.PackageNotFoundError:
        return "unknown"

