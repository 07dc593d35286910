"""Pool: a directory holding dm-thin ``metadata``, a sparse ``data`` file and ``pool.json`` (the manifest).

Layer: pool. May import: everything below (errors, units, io, metadata, thin).

The manifest keeps what dm-thin leaves to its user (device names, virtual sizes, external origins, options), in
step with the metadata through the transaction id, as LVM does: every change of the device set bumps the
metadata transaction id with set_transaction_id and records the new id in the manifest. On open the manifest is
reconciled with the metadata (the metadata wins).

Durability: ``commit`` syncs the data file before the metadata that points into it; a crash loses only what came
after the last commit. One writer at a time (an exclusive flock on ``lock``); read-only opens take no lock and
can read through a held metadata snapshot while a writer works.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time as _time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from thinpool.errors import (DeviceExists, DeviceNotFound, InvalidArgument, NoDataSpace, NoMetadataSpace,
                             PoolLocked, PoolNotFound, ReadOnly, StoreIOError)
from thinpool.io.block_store import FileBlockStore
from thinpool.io.data_store import DataStore
from thinpool.metadata.pool_metadata import PoolMetadata
from thinpool.thin import ThinDevice
from thinpool.units import DEFAULT_DATA_BLOCK_SIZE, MAX_METADATA_BLOCKS, SECTOR_SIZE, check_data_block_size

MANIFEST = "pool.json"
DISCARD_MODES = ("passdown", "nopassdown", "ignore")
NO_SPACE_POLICIES = ("error", "queue")


def metadata_size_for(data_size: int, chunk_bytes: int, max_thins: int = 1000) -> int:
    """Metadata bytes as thin_metadata_size estimates them (mapping leaves half full, one root per thin),
    at least 4 MiB and at most the 255-bitmap limit."""
    nr_blocks = -(-data_size // chunk_bytes)
    blocks = -(-nr_blocks // 126) + max_thins
    return min(max(blocks * 4096, 4 << 20), MAX_METADATA_BLOCKS * 4096)


@dataclass
class PoolStatus:
    transaction_id: int
    used_metadata_blocks: int
    total_metadata_blocks: int
    used_data_blocks: int
    total_data_blocks: int
    held_metadata_root: int | None
    mode: str  # rw | ro | out_of_data_space | failed
    discard: str
    no_space_policy: str
    needs_check: bool
    chunk_size: int  # bytes
    zero: bool
    devices: int

    def dm_line(self) -> str:
        """The dm-thin pool status line."""
        held = "-" if self.held_metadata_root is None else str(self.held_metadata_root)
        discard = "discard_passdown" if self.discard == "passdown" else "no_discard_passdown"
        return (f"{self.transaction_id} {self.used_metadata_blocks}/{self.total_metadata_blocks} "
                f"{self.used_data_blocks}/{self.total_data_blocks} {held} {self.mode} {discard} "
                f"{self.no_space_policy}_if_no_space {'needs_check' if self.needs_check else '-'}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["dm_status"] = self.dm_line()
        return d


class ExternalOrigin:
    """A read-only file that shows through a thin device's unprovisioned chunks."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise StoreIOError(what=path, op="open external origin", reason=e.strerror or str(e)) from e
        self.size = os.fstat(self.fd).st_size

    def read_at(self, offset: int, length: int) -> bytes:
        if offset >= self.size:
            return bytes(length)
        data = os.pread(self.fd, min(length, self.size - offset), offset)
        return data + bytes(length - len(data))

    def close(self) -> None:
        os.close(self.fd)


class Pool:
    """An open pool. Use ``Pool.create`` / ``Pool.open`` (both context managers)."""

    def __init__(self, path: Path, md: PoolMetadata, data: DataStore, manifest: dict[str, Any], *,
                 readonly: bool, lock_fd: int | None) -> None:
        self.path = path
        self.md = md
        self.data = data
        self.manifest = manifest
        self.readonly = readonly
        self._lock_fd = lock_fd
        self.lock = threading.RLock()
        self.chunk_bytes = md.data_block_size * SECTOR_SIZE
        opts = manifest.setdefault("options", {})
        self.zero_blocks: bool = opts.get("zero", True)
        self.discard_mode: str = opts.get("discard", "passdown")
        self.no_space_policy: str = opts.get("no_space", "error")
        self.queue_timeout: float = opts.get("queue_timeout", 60.0)
        self.low_water_mark: int = opts.get("low_water_mark", 0)  # data blocks
        self.low_water_callback: Callable[[Pool], None] | None = None
        self._low_water_fired = False
        self._low_water_pending = False
        self.out_of_data_space = False
        self.stats = {"cow_copies": 0, "commits": 0}
        self._origins: dict[int, ExternalOrigin | None] = {}
        self._space_cv = threading.Condition(self.lock)
        self.closed = False
        self.auto_commit_interval: float | None = None
        self._last_commit = _time.monotonic()

    # --- lifecycle --------------------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike[str], *, data_size: int, chunk_size: int = DEFAULT_DATA_BLOCK_SIZE,
               metadata_size: int | None = None, zero: bool = True, discard: str = "passdown",
               no_space: str = "error", low_water_mark: int = 0) -> Pool:
        """Create a new pool directory (it may exist but must not hold a pool)."""
        p = Path(path)
        sectors = check_data_block_size(chunk_size)
        if discard not in DISCARD_MODES:
            raise InvalidArgument(reason=f"discard mode {discard!r}: use one of {', '.join(DISCARD_MODES)}")
        if no_space not in NO_SPACE_POLICIES:
            raise InvalidArgument(reason=f"no-space policy {no_space!r}: use error or queue")
        nr_data = data_size // chunk_size
        if nr_data < 1:
            raise InvalidArgument(reason=f"data size {data_size} is smaller than one chunk ({chunk_size} bytes)")
        if (p / MANIFEST).exists() or (p / "metadata").exists():
            raise InvalidArgument(reason=f"{p} already holds a pool")
        p.mkdir(parents=True, exist_ok=True)
        msize = metadata_size or metadata_size_for(data_size, chunk_size)
        lock_fd = cls._take_lock(p)
        try:
            with open(p / "metadata", "wb") as f:
                f.truncate(msize - msize % 4096)
            with open(p / "data", "wb") as f:
                f.truncate(nr_data * chunk_size)
            md = PoolMetadata.format(FileBlockStore(p / "metadata"), data_block_size=sectors, nr_data_blocks=nr_data)
            manifest = {"format": 1, "transaction_id": md.trans_id, "devices": {},
                        "options": {"zero": zero, "discard": discard, "no_space": no_space,
                                    "low_water_mark": low_water_mark}}
            _write_manifest(p, manifest)
            return cls(p, md, DataStore(str(p / "data"), chunk_size), manifest, readonly=False, lock_fd=lock_fd)
        except BaseException:
            os.close(lock_fd)
            raise

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, readonly: bool = False, use_metadata_snap: bool = False,
             allow_needs_check: bool = False) -> Pool:
        p = Path(path)
        if not (p / "metadata").exists() or not (p / "data").exists():
            raise PoolNotFound(path=str(p))
        if use_metadata_snap:
            readonly = True
        lock_fd = None if readonly else cls._take_lock(p)
        try:
            md = PoolMetadata.open(FileBlockStore(p / "metadata", readonly=readonly), readonly=readonly,
                                   use_metadata_snap=use_metadata_snap, allow_needs_check=allow_needs_check)
            manifest = _read_manifest(p)
            pool = cls(p, md, DataStore(str(p / "data"), md.data_block_size * SECTOR_SIZE, readonly=readonly),
                       manifest, readonly=readonly, lock_fd=lock_fd)
            pool._reconcile()
            return pool
        except BaseException:
            if lock_fd is not None:
                os.close(lock_fd)
            raise

    @staticmethod
    def _take_lock(p: Path) -> int:
        lockfile = p / "lock"
        fd = os.open(lockfile, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise PoolLocked(path=str(p), lockfile=str(lockfile)) from None
        return fd

    def _reconcile(self) -> None:
        """Make the manifest describe exactly the metadata's devices (the metadata wins)."""
        devs = self.manifest.setdefault("devices", {})
        changed = False
        for key in list(devs):
            if int(key) not in self.md.devices:
                del devs[key]
                changed = True
        for dev_id in self.md.device_ids():
            if str(dev_id) not in devs:
                hi = self.md.highest_mapped(dev_id)
                devs[str(dev_id)] = {"name": str(dev_id), "size": (0 if hi is None else hi + 1) * self.chunk_bytes,
                                     "origin": None}
                changed = True
        if self.manifest.get("transaction_id") != self.md.trans_id:
            self.manifest["transaction_id"] = self.md.trans_id
            changed = True
        if changed and not self.readonly:
            _write_manifest(self.path, self.manifest)

    def close(self) -> None:
        """Commit (when writable) and release everything."""
        if self.closed:
            return
        try:
            if not self.readonly and not self.md.failed and not self.md.needs_check:
                self.commit()
        finally:
            self.closed = True
            self.md.close()
            self.data.close()
            for o in self._origins.values():
                if o is not None:
                    o.close()
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    def crash_close(self) -> None:
        """Drop the pool as a crash would: release the files and the lock WITHOUT committing (tests, fault
        injection). What was written since the last commit may or may not survive; committed state does."""
        if self.closed:
            return
        self.closed = True
        for close in (self.md.close, self.data.close):
            try:
                close()
            except Exception:
                pass
        for o in self._origins.values():
            if o is not None:
                o.close()
        self._origins.clear()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None and not self.readonly and not self.closed:
            # keep what was committed; drop the failed transaction's half-done work
            try:
                self.md.abort()
            except Exception:
                pass
        self.close()

    # --- state ------------------------------------------------------------------------------------------------
    def check_writable(self) -> None:
        if self.closed:
            raise InvalidArgument(reason="pool is closed")
        if self.readonly or self.md.readonly:
            raise ReadOnly()
        if self.md.needs_check:
            raise ReadOnly("pool is read-only: metadata needs_check is set (run check / repair)")
        self.md._check_writable()

    def status(self) -> PoolStatus:
        with self.lock:
            md = self.md
            mode = "failed" if md.failed else "ro" if (self.readonly or md.needs_check) else \
                "out_of_data_space" if self.out_of_data_space else "rw"
            return PoolStatus(
                transaction_id=md.trans_id, used_metadata_blocks=md.tm.sm.nr_allocated(),
                total_metadata_blocks=md.nr_metadata_blocks, used_data_blocks=md.data_sm.nr_allocated(),
                total_data_blocks=md.nr_data_blocks, held_metadata_root=md.held_root or None, mode=mode,
                discard=self.discard_mode, no_space_policy=self.no_space_policy, needs_check=md.needs_check,
                chunk_size=self.chunk_bytes, zero=self.zero_blocks, devices=len(md.devices))

    # --- devices ----------------------------------------------------------------------------------------------
    def list_devices(self) -> list[int]:
        return self.md.device_ids()

    def _entry(self, dev_id: int) -> dict[str, Any]:
        e = self.manifest["devices"].get(str(dev_id))
        if e is None or dev_id not in self.md.devices:
            raise DeviceNotFound(dev_id=dev_id)
        return e  # type: ignore[no-any-return]

    def device(self, dev_id: int) -> ThinDevice:
        self._entry(dev_id)
        return ThinDevice(self, dev_id)

    def device_size(self, dev_id: int) -> int:
        return int(self._entry(dev_id)["size"])

    def device_name(self, dev_id: int) -> str:
        return str(self._entry(dev_id)["name"])

    def find_device(self, ref: str | int) -> int:
        """A device id from an id or a name."""
        if isinstance(ref, int) or str(ref).isdigit():
            dev_id = int(ref)
            self._entry(dev_id)
            return dev_id
        for key, e in self.manifest["devices"].items():
            if e.get("name") == ref:
                return int(key)
        raise DeviceNotFound(dev_id=ref)

    def external_origin(self, dev_id: int) -> ExternalOrigin | None:
        o = self._origins.get(dev_id, False)
        if o is False:
            path = self.manifest["devices"].get(str(dev_id), {}).get("origin")
            o = ExternalOrigin(path) if path else None
            self._origins[dev_id] = o
        return o  # type: ignore[return-value]

    def _bump_transaction(self) -> None:
        """LVM style: a new transaction id for every change of the device set, recorded in both places."""
        new = self.md.trans_id + 1
        self.md.set_transaction_id(self.md.trans_id, new)
        self.manifest["transaction_id"] = new
        _write_manifest(self.path, self.manifest)

    def create_thin(self, dev_id: int, size: int, *, name: str | None = None, origin: str | None = None) -> ThinDevice:
        """A new thin device of ``size`` bytes (a multiple of 512), optionally over an external origin file."""
        with self.lock:
            self.check_writable()
            self._check_new(dev_id, size, name)
            if origin is not None:
                ExternalOrigin(origin).close()
                origin = os.path.abspath(origin)
            self._guard_metadata(lambda: self.md.create_thin(dev_id))
            self.manifest["devices"][str(dev_id)] = {"name": name or str(dev_id), "size": size, "origin": origin}
            self._bump_transaction()
            self.commit()
            return ThinDevice(self, dev_id)

    def create_snap(self, dev_id: int, origin_id: int, *, name: str | None = None, size: int | None = None) -> ThinDevice:
        """Snapshot ``origin_id`` as ``dev_id`` in O(1) (the origin's mapping tree is shared)."""
        with self.lock:
            self.check_writable()
            src = self._entry(origin_id)
            size = src["size"] if size is None else size
            self._check_new(dev_id, size, name)
            self._guard_metadata(lambda: self.md.create_snap(dev_id, origin_id))
            self.manifest["devices"][str(dev_id)] = {"name": name or str(dev_id), "size": size,
                                                     "origin": src.get("origin")}
            self._bump_transaction()
            self.commit()
            return ThinDevice(self, dev_id)

    def _check_new(self, dev_id: int, size: int, name: str | None) -> None:
        if dev_id in self.md.devices:
            raise DeviceExists(dev_id=dev_id)
        if size <= 0 or size % SECTOR_SIZE:
            raise InvalidArgument(reason=f"device size {size} must be a positive multiple of 512 bytes")
        if name is not None:
            if name.isdigit():
                raise InvalidArgument(reason=f"device name {name!r} must not be a number")
            if any(e.get("name") == name for e in self.manifest["devices"].values()):
                raise InvalidArgument(reason=f"a device named {name!r} already exists")

    def delete_thin(self, dev_id: int) -> None:
        with self.lock:
            self.check_writable()
            self._entry(dev_id)
            self._guard_metadata(lambda: self.md.delete_thin(dev_id))
            # the metadata first, then the manifest: a crash in between leaves a manifest entry the metadata no
            # longer has (dropped on open), never a device whose name and size the manifest has forgotten
            new = self.md.trans_id + 1
            self.md.set_transaction_id(self.md.trans_id, new)
            self.commit()
            del self.manifest["devices"][str(dev_id)]
            self.manifest["transaction_id"] = new
            _write_manifest(self.path, self.manifest)
            o = self._origins.pop(dev_id, None)
            if o is not None:
                o.close()

    def resize_device(self, dev_id: int, size: int) -> None:
        with self.lock:
            self.check_writable()
            e = self._entry(dev_id)
            if size <= 0 or size % SECTOR_SIZE:
                raise InvalidArgument(reason=f"device size {size} must be a positive multiple of 512 bytes")
            if size < e["size"]:
                dev = ThinDevice(self, dev_id)
                dev._unmap(-(-size // self.chunk_bytes), -(-e["size"] // self.chunk_bytes))
            e["size"] = size
            self._bump_transaction()
            self.commit()

    # --- data allocation and space ----------------------------------------------------------------------------
    def alloc_data_block(self) -> int:
        try:
            b = self.md.alloc_data_block()
        except NoDataSpace:
            self.no_data_space(1)
            b = self.md.alloc_data_block()
        self._check_low_water()
        return b

    def _check_low_water(self) -> None:
        """Note that the free data blocks reached the low-water mark; the callback runs from
        ``fire_low_water`` once the I/O that allocated is complete (like dm-thin's event, it is not delivered in
        the middle of a bio: a callback that commits must not see blocks allocated but not yet mapped)."""
        if self.low_water_mark and not self._low_water_fired:
            free = self.md.data_sm.nr_blocks - self.md.data_sm.nr_allocated()
            if free <= self.low_water_mark:
                self._low_water_fired = True
                self._low_water_pending = True

    def fire_low_water(self) -> None:
        """Run the low-water callback if the mark was reached (called by the data path after each I/O)."""
        if self._low_water_pending:
            self._low_water_pending = False
            if self.low_water_callback is not None:
                self.low_water_callback(self)

    def no_data_space(self, need: int) -> None:
        """Out of data space: queue (wait for a resize) or refuse with NoDataSpace."""
        if self.no_space_policy == "queue":
            deadline = _time.monotonic() + self.queue_timeout
            self.out_of_data_space = True
            while not self.md.data_sm.has_free(need):
                remaining = deadline - _time.monotonic()
                if remaining <= 0:
                    break
                self._space_cv.wait(remaining)
            if self.md.data_sm.has_free(need):
                self.out_of_data_space = False
                return
        self.out_of_data_space = True
        raise NoDataSpace(requested=need)

    def resize(self, data_size: int) -> None:
        """Grow the data device (the data file and the data space map)."""
        with self.lock:
            self.check_writable()
            nr = data_size // self.chunk_bytes
            if nr < self.md.nr_data_blocks:
                raise InvalidArgument(reason=f"cannot shrink the pool data from {self.md.nr_data_blocks} to {nr} "
                                             "chunks (dm-thin cannot either)")
            self.data.resize(nr * self.chunk_bytes)
            self._guard_metadata(lambda: self.md.resize_data(nr))
            self.commit()
            self.out_of_data_space = False
            self._low_water_fired = False
            self._space_cv.notify_all()

    def resize_metadata(self, size: int) -> None:
        with self.lock:
            self.check_writable()
            self._guard_metadata(lambda: self.md.resize_metadata(size // 4096))
            self.commit()

    def _guard_metadata(self, op: Callable[[], Any]) -> Any:
        """Run a metadata operation; exhaustion of metadata space aborts the transaction and puts the pool in
        read-only mode with needs_check set, as dm-thin does."""
        try:
            return op()
        except NoMetadataSpace:
            self.md.abort()
            self.md.set_needs_check()
            raise

    # --- transactions -----------------------------------------------------------------------------------------
    def commit(self) -> None:
        """Data first (fdatasync), then the metadata (two-phase commit); passdown discards afterwards."""
        with self.lock:
            if self.readonly:
                return
            self.check_writable()
            try:
                self.data.sync()
            except StoreIOError:
                # a failed fdatasync may have dropped data written since the last commit (Linux marks the pages
                # clean): never commit mappings to it; back to the last commit, the pool stays usable
                self.md.abort()
                raise
            try:
                freed = self.md.commit()
            except NoMetadataSpace:
                self.md.set_needs_check()
                raise
            self.stats["commits"] += 1
            self._last_commit = _time.monotonic()
            if self.discard_mode == "passdown":
                for b in sorted(freed):
                    if self.md.data_sm.count(b) == 0:
                        self.data.punch(b * self.chunk_bytes, self.chunk_bytes)

    def maybe_commit(self) -> None:
        """Commit if auto_commit_interval seconds have passed (long-running servers)."""
        if self.auto_commit_interval is not None and _time.monotonic() - self._last_commit >= self.auto_commit_interval:
            self.commit()

    def abort(self) -> None:
        with self.lock:
            self.md.abort()
            self.manifest = _read_manifest(self.path)
            self._reconcile()

    def set_transaction_id(self, current: int, new: int) -> None:
        with self.lock:
            self.check_writable()
            self.md.set_transaction_id(current, new)
            self.manifest["transaction_id"] = new
            _write_manifest(self.path, self.manifest)
            self.commit()

    def reserve_metadata_snap(self) -> int:
        with self.lock:
            self.check_writable()
            try:
                self.data.sync()
            except StoreIOError:
                self.md.abort()  # as in commit: never commit mappings to data a failed writeback dropped
                raise
            return int(self._guard_metadata(self.md.reserve_metadata_snap))

    def release_metadata_snap(self) -> None:
        with self.lock:
            self.check_writable()
            self._guard_metadata(self.md.release_metadata_snap)
            self.commit()

    def devices(self) -> Iterator[ThinDevice]:
        for d in self.list_devices():
            yield ThinDevice(self, d)


def _read_manifest(p: Path) -> dict[str, Any]:
    try:
        with open(p / MANIFEST) as f:
            m = json.load(f)
    except FileNotFoundError:
        return {"format": 1, "devices": {}, "options": {}}
    except (json.JSONDecodeError, OSError) as e:
        raise InvalidArgument(reason=f"cannot read {p / MANIFEST}: {e}") from None
    if not isinstance(m, dict) or not isinstance(m.get("devices", {}), dict):
        raise InvalidArgument(reason=f"{p / MANIFEST} is not a thinpool manifest")
    return m


def _write_manifest(p: Path, manifest: dict[str, Any]) -> None:
    tmp = p / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p / MANIFEST)
