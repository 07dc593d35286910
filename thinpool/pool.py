"""Pool: a directory holding dm-thin ``metadata``, a sparse ``data`` file and ``pool.json`` (the manifest).

Layer: pool. May import: everything below (errors, units, io, metadata, manifest, thin).

The manifest (``thinpool.manifest``) keeps what dm-thin leaves to its user (device names, virtual sizes, external
origins, lineage, options), in step with the metadata through the transaction id, as LVM does. It is validated at
open like the metadata: a missing or inconsistent one is refused, never guessed and written back. A device change
appends two small records to ``pool.json.journal`` (O(1) in the device count); the journal is folded into
``pool.json`` when it outgrows it and when the pool closes.

Discard passdown after a commit punches the freed data blocks as merged runs (one ``fallocate`` per run).

Durability: ``commit`` syncs the data file before the metadata that points into it; a crash loses only what came
after the last commit.

Failure (dm-thin's ``metadata_operation_failed``): when a commit fails (the data sync or the metadata write), the
pool aborts to the last commit, sets needs_check and becomes read-only; every later write, discard and flush raises
``PoolFailed`` until the operator checks it (``thinpool check``). A full host filesystem is reported as
``HostNoSpace`` (a NoSpace, ENOSPC), not as an I/O error. A command whose body fails (``Pool.__exit__`` with an
exception, ``abort_command``) is aborted; if it had already overwritten committed chunks in place (which no abort
can undo) the pool is failed the same way, so the change is never silent.

Space: ``check_space(dev_id, offset, length)`` refuses (or, with queue-if-no-space, waits for) a whole request
before its first byte is written; the fs, NBD and FUSE layers call it for each request they split into pieces.
With queue-if-no-space a write waits up to ``no_space_timeout`` seconds (dm-thin's default 60, 0 = forever) for
more data space: a ``resize`` from another thread, or the data file grown by another process (``grow_data_file``,
what ``thinpool pool resize`` does while a writer holds the pool), as a dm-thin table reload would.

Locks (flock on the pool directory itself, so deleting a file cannot defeat them; ``lock`` files of older pools are
ignored):

- ``Pool.open(path)``: exclusive. Refused (PoolLocked) while any other writer or reader holds the pool.
- ``Pool.open(path, readonly=True)``: shared (the default ``lock="shared"``). Readers coexist; a writer is refused
  while they hold it, so a reader never sees mappings change under it (what ``serve --read-only`` needs).
- ``Pool.open(path, readonly=True, lock="none")``: no lock, the last commit as it is on disk. For quick views of
  the device table and status beside a running writer (``pool status``, ``thin list``); data read this way may be
  stale or already reused by the writer.
- ``Pool.open(path, use_metadata_snap=True)``: no lock, through the held metadata snapshot, which does not change
  while it is held (``reserve_metadata_snap``), as with a live dm-thin pool.
"""

from __future__ import annotations

import copy
import errno
import fcntl
import logging
import os
import stat
import threading
import time as _time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from thinpool import manifest as mf
from thinpool.errors import (
    DeviceExists,
    DeviceNotFound,
    InvalidArgument,
    NoDataSpace,
    NoMetadataSpace,
    NoSpace,
    NotEmptyDirectory,
    PoolFailed,
    PoolLocked,
    PoolNotFound,
    ReadOnly,
    StoreIOError,
    ThinpoolError,
    UnsafePoolFile,
)
from thinpool.io.block_store import FileBlockStore
from thinpool.io.data_store import DataStore
from thinpool.io.safe_open import open_pool_file, open_regular
from thinpool.metadata.pool_metadata import FreedBlocks, PoolMetadata, sorted_unique
from thinpool.thin import ThinDevice, complete_pending
from thinpool.units import DEFAULT_DATA_BLOCK_SIZE, MAX_METADATA_BLOCKS, SECTOR_SIZE, check_data_block_size, lazy_module

if TYPE_CHECKING:
    import numpy as np
else:
    np = lazy_module("numpy")

log = logging.getLogger(__name__)

MANIFEST = mf.MANIFEST
DISCARD_MODES = mf.DISCARD_MODES
NO_SPACE_POLICIES = mf.NO_SPACE_POLICIES
POOL_FILES = ("metadata", "data", MANIFEST)
LOCK_MODES = ("exclusive", "shared", "none")
PASSDOWN_MAX_BYTES = 64 << 20  # the longest single punch of a passdown (bounds a written-zeros fallback's buffer)
QUEUE_POLL_S = 0.5  # how often a queued write looks for a data file grown by another process


def metadata_size_for(data_size: int, chunk_bytes: int, max_thins: int = 1000) -> int:
    """Metadata bytes as thin_metadata_size estimates them (mapping leaves half full, one root per thin),
    at least 4 MiB and at most the 255-bitmap limit."""
    nr_blocks = -(-data_size // chunk_bytes)
    blocks = -(-nr_blocks // 126) + max_thins
    return min(max(blocks * 4096, 4 << 20), MAX_METADATA_BLOCKS * 4096)


@dataclass
class PoolStatus:
    """A pool's state. ``used_metadata_blocks`` counts the allocated metadata blocks; the kernel's status line
    (``dm_line``) also counts dm-thin's metadata reserve as used (``__set_metadata_reserve``:
    min(4096, nr_blocks / 10)) and ends with the metadata low-water mark (``calc_metadata_threshold``:
    min(1024, nr_blocks / 4)), so ``dm_line`` equals what ``dmsetup status`` prints for the same metadata."""

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

    @property
    def metadata_reserve_blocks(self) -> int:
        return min(4096, self.total_metadata_blocks // 10)

    @property
    def metadata_low_water_blocks(self) -> int:
        return min(1024, self.total_metadata_blocks // 4)

    @property
    def kernel_used_metadata_blocks(self) -> int:
        """Used metadata blocks as the kernel reports them (the reserve counted as used)."""
        return min(self.total_metadata_blocks, self.used_metadata_blocks + self.metadata_reserve_blocks)

    @property
    def data_percent(self) -> float:
        """lvs's Data%."""
        return 100.0 * self.used_data_blocks / self.total_data_blocks if self.total_data_blocks else 0.0

    @property
    def metadata_percent(self) -> float:
        """lvs's Meta% (from the kernel's used count, the reserve included)."""
        t = self.total_metadata_blocks
        return 100.0 * self.kernel_used_metadata_blocks / t if t else 0.0

    def dm_line(self) -> str:
        """The dm-thin pool status line (dm-thin.c pool_status, STATUSTYPE_INFO)."""
        if self.mode == "failed":
            return "Fail"
        held = "-" if self.held_metadata_root is None else str(self.held_metadata_root)
        discard = {"passdown": "discard_passdown", "nopassdown": "no_discard_passdown",
                   "ignore": "ignore_discard"}.get(self.discard, "no_discard_passdown")
        return (f"{self.transaction_id} {self.kernel_used_metadata_blocks}/{self.total_metadata_blocks} "
                f"{self.used_data_blocks}/{self.total_data_blocks} {held} {self.mode} {discard} "
                f"{self.no_space_policy}_if_no_space {'needs_check' if self.needs_check else '-'} "
                f"{self.metadata_low_water_blocks}")

    def dmsetup_line(self) -> str:
        """``dmsetup status`` form: ``<start> <length in sectors> thin-pool <status line>``."""
        return f"0 {self.total_data_blocks * self.chunk_size // 512} thin-pool {self.dm_line()}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["dm_status"] = self.dm_line()
        d["dmsetup_status"] = self.dmsetup_line()
        d["metadata_reserve_blocks"] = self.metadata_reserve_blocks
        d["kernel_used_metadata_blocks"] = self.kernel_used_metadata_blocks
        d["metadata_low_water_blocks"] = self.metadata_low_water_blocks
        d["data_percent"] = round(self.data_percent, 2)
        d["metadata_percent"] = round(self.metadata_percent, 2)
        return d


class ExternalOrigin:
    """A read-only regular file that shows through a thin device's unprovisioned chunks. A FIFO, device or
    directory is refused at open (without blocking)."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self.fd = open_regular(path, os.O_RDONLY, what="an external origin")
        except OSError as e:
            raise StoreIOError(what=path, op="open external origin", reason=e.strerror or str(e)) from e
        self.size = os.fstat(self.fd).st_size

    def read_at(self, offset: int, length: int) -> bytes:
        if offset >= self.size:
            return bytes(length)
        try:
            data = os.pread(self.fd, min(length, self.size - offset), offset)
        except OSError as e:
            raise StoreIOError(what=self.path, op="read of external origin", reason=e.strerror or str(e)) from e
        return data + bytes(length - len(data))

    def close(self) -> None:
        os.close(self.fd)


def lock_pool_dir(path: str | os.PathLike[str], mode: str = "exclusive") -> int | None:
    """Take the pool's lock: flock on the directory itself (``exclusive`` or ``shared``, never waiting); returns
    the fd to close to release it, None for mode ``none``. Raises PoolLocked, PoolNotFound."""
    if mode not in LOCK_MODES:
        raise InvalidArgument(reason=f"lock mode {mode!r}: use one of {', '.join(LOCK_MODES)}")
    if mode == "none":
        return None
    p = os.fspath(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        raise PoolNotFound(path=p) from None
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if mode == "exclusive" else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise PoolLocked(path=p, lockfile=f"the directory {p}",
                         holder="writer or reader" if mode == "exclusive" else "writer") from None
    # the path must still name the directory we locked (not one renamed away and replaced meanwhile)
    try:
        same = os.path.samestat(os.fstat(fd), os.stat(p))
    except OSError:
        same = False
    if not same:
        os.close(fd)
        raise PoolLocked(path=p, lockfile=f"the directory {p}", holder="process (the directory was replaced)")
    return fd


def _write_manifest(p: Path, manifest: dict[str, Any], *, validated: bool = False) -> None:
    """The one call through which the pool writes pool.json whole (tests patch it to crash in between)."""
    mf.write_manifest(p, manifest, validated=validated)


def _append_manifest(p: Path, record: dict[str, Any]) -> int:
    """The one call through which the pool appends a device change to the manifest journal (tests patch it to
    crash in between). Returns the journal's size."""
    return mf.append_journal(p, record)


JOURNAL_COMPACT_BYTES = 64 << 10  # the journal is folded into pool.json past max(this, pool.json's size)


class Pool:
    """An open pool. Use ``Pool.create`` / ``Pool.open`` (both context managers)."""

    def __init__(self, path: Path, md: PoolMetadata, data: DataStore, manifest: dict[str, Any], *,
                 readonly: bool, lock_fd: int | None) -> None:
        self.path = Path(path)
        self.md = md
        self.data = data
        self._set_manifest(mf.validate(manifest, str(self.path / MANIFEST), str(self.path)))
        self.readonly = readonly
        self._lock_fd = lock_fd
        self.lock = threading.RLock()
        self.chunk_bytes = md.data_block_size * SECTOR_SIZE
        opts = self.manifest["options"]
        self.zero_blocks: bool = opts["zero"]
        self.discard_mode: str = opts["discard"]
        self.no_space_policy: str = opts["no_space"]
        self.no_space_timeout: float = float(opts["no_space_timeout"])
        self.low_water_mark: int = opts["low_water_mark"]  # data blocks
        self.low_water_callback: Callable[[Pool], None] | None = None
        # called (once per wait, pool lock held) when a write starts waiting for data space (queue-if-no-space):
        # the CLI prints that the write waits and how to resize
        self.on_queue: Callable[[Pool, int, float], None] | None = None
        self._low_water_fired = False
        self._low_water_pending = False
        self.out_of_data_space = False
        # cow_copies: chunks copied (whole or in part) by copy-on-write; cow_bytes: the bytes those copies moved
        self.stats = {"cow_copies": 0, "cow_bytes": 0, "commits": 0}
        self._origins: dict[int, ExternalOrigin | None] = {}
        self._space_cv = threading.Condition(self.lock)
        self.closed = False
        # "neither the pool nor its metadata is read-only, the pool is open and has not failed": the data path's
        # one-attribute form of those four tests (readonly is fixed at open; _release and _fail clear it)
        self._rw = not readonly and not md.readonly
        self.auto_commit_interval: float | None = None
        self._last_commit = _time.monotonic()
        self._failure: str | None = None  # why the pool failed (metadata_operation_failed), None while healthy
        self._manifest_bytes = _file_size(self.path / MANIFEST)  # pool.json's size (when to compact the journal)

    # --- lifecycle --------------------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike[str], *, data_size: int, chunk_size: int = DEFAULT_DATA_BLOCK_SIZE,
               metadata_size: int | None = None, zero: bool = True, discard: str = "passdown",
               no_space: str = "error", low_water_mark: int = 0,
               no_space_timeout: float = mf.DEFAULT_NO_SPACE_TIMEOUT) -> Pool:
        """Create a new pool in directory ``path``, which must not exist or be empty (never the root directory,
        never a directory holding anything): no existing file is ever truncated. Raises NotEmptyDirectory,
        InvalidArgument."""
        p = Path(path)
        sectors = check_data_block_size(chunk_size)
        if discard not in DISCARD_MODES:
            raise InvalidArgument(reason=f"discard mode {discard!r}: use one of {', '.join(DISCARD_MODES)}")
        if no_space not in NO_SPACE_POLICIES:
            raise InvalidArgument(reason=f"no-space policy {no_space!r}: use error or queue")
        if not (isinstance(no_space_timeout, (int, float)) and 0 <= no_space_timeout < float("inf")):
            raise InvalidArgument(reason=f"no-space timeout {no_space_timeout!r}: seconds >= 0 (0 = forever)")
        nr_data = data_size // chunk_size
        if nr_data < 1:
            raise InvalidArgument(reason=f"data size {data_size} is smaller than one chunk ({chunk_size} bytes)")
        _check_new_pool_dir(p)
        made_dir = not p.exists()
        p.mkdir(mode=POOL_DIR_MODE, parents=True, exist_ok=True)
        msize = metadata_size or metadata_size_for(data_size, chunk_size)
        lock_fd = Pool._take_lock(p)
        made: list[str] = []
        try:
            _check_new_pool_dir(p)  # again, under the lock
            for name, size in (("metadata", msize - msize % 4096), ("data", nr_data * chunk_size)):
                fd = _create_pool_file(p / name)
                made.append(name)
                try:
                    os.ftruncate(fd, size)
                finally:
                    os.close(fd)
            md = PoolMetadata.format(FileBlockStore(p / "metadata", pool_file=True), data_block_size=sectors,
                                     nr_data_blocks=nr_data)
            manifest = mf.new_manifest(transaction_id=md.trans_id, options={
                "zero": zero, "discard": discard, "no_space": no_space, "low_water_mark": low_water_mark,
                "no_space_timeout": no_space_timeout})
            _write_manifest(p, manifest)
            made.append(MANIFEST)
            return cls(p, md, DataStore(str(p / "data"), chunk_size), manifest, readonly=False, lock_fd=lock_fd)
        except BaseException:
            for name in made:
                try:
                    os.unlink(p / name)
                except OSError:
                    pass
            if made_dir:
                try:
                    os.rmdir(p)
                except OSError:
                    pass
            os.close(lock_fd)
            raise

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, readonly: bool = False, use_metadata_snap: bool = False,
             allow_needs_check: bool = False, lock: str | None = None) -> Pool:
        """Open a pool (see the module docstring for the lock modes: writers ``exclusive``; readers ``shared``
        by default or ``none``; ``use_metadata_snap`` takes no lock). The manifest is validated against the
        metadata and the data file must hold every data block the metadata has.

        Raises PoolNotFound, PoolLocked, UnsafePoolFile (a symlink or non-regular pool file, a short data file),
        ManifestError, MetadataError."""
        p = Path(path)
        if not p.is_dir() or not all(os.path.lexists(p / n) for n in ("metadata", "data")):
            raise PoolNotFound(path=str(p))
        if use_metadata_snap:
            readonly = True
        if lock is None:
            lock = "none" if use_metadata_snap else "shared" if readonly else "exclusive"
        if not readonly and lock != "exclusive":
            raise InvalidArgument(reason="a writable pool needs the exclusive lock")
        lock_fd = lock_pool_dir(p, lock)
        md = data = None
        try:
            md = PoolMetadata.open(FileBlockStore(p / "metadata", readonly=readonly, pool_file=True),
                                   readonly=readonly, use_metadata_snap=use_metadata_snap,
                                   allow_needs_check=allow_needs_check)
            manifest = mf.read_manifest(p)
            chunk = md.data_block_size * SECTOR_SIZE
            if use_metadata_snap:
                manifest = _snapshot_manifest(manifest, md, chunk)
            else:
                manifest = mf.reconcile(manifest, device_ids=md.device_ids(), trans_id=md.trans_id,
                                        path=str(p / MANIFEST), pool=str(p))
            data = DataStore(str(p / "data"), chunk, readonly=readonly)
            if data.size < md.nr_data_blocks * chunk:
                raise UnsafePoolFile(path=str(p / "data"), reason=f"the data file has {data.size} bytes, fewer than "
                                     f"the metadata's {md.nr_data_blocks} chunks of {chunk} bytes (dm-thin refuses "
                                     "a data device that is too small): restore the data file")
            return cls(p, md, data, manifest, readonly=readonly, lock_fd=lock_fd)
        except BaseException:
            for o in (data, md):
                if o is not None:
                    o.close()
            if lock_fd is not None:
                os.close(lock_fd)
            raise

    @staticmethod
    def _take_lock(p: Path) -> int:
        """The exclusive pool lock as an fd (kept for the tools; prefer ``lock_pool_dir``)."""
        fd = lock_pool_dir(p, "exclusive")
        assert fd is not None
        return fd

    @classmethod
    def rebuild_manifest(cls, path: str | os.PathLike[str], devices: dict[int, tuple[int, str | None]], *,
                         force: bool = False) -> dict[str, Any]:
        """Write a new pool.json for the pool's metadata from explicit ``{dev_id: (size bytes, name)}`` (one
        entry for every thin device of the metadata, none more): the recovery for a lost or damaged manifest.
        Refuses a valid existing manifest unless ``force``. Options fall back to the defaults. Takes the
        exclusive lock. Raises InvalidArgument, ManifestError."""
        p = Path(path)
        lock_fd = lock_pool_dir(p)
        try:
            md = PoolMetadata.open(FileBlockStore(p / "metadata", readonly=True, pool_file=True), readonly=True,
                                   allow_needs_check=True)
            try:
                ids = md.device_ids()
                tid = md.trans_id
            finally:
                md.close()
            options: dict[str, Any] = {}
            try:
                old = mf.read_manifest(p)
                options = old["options"]
                if not force:
                    mf.reconcile(old, device_ids=ids, trans_id=tid, path=str(p / MANIFEST), pool=str(p))
                    raise InvalidArgument(reason=f"{p / MANIFEST} is valid: use --force to replace it")
            except ThinpoolError as e:
                if isinstance(e, InvalidArgument):
                    raise
            missing = sorted(set(ids) - set(devices))
            extra = sorted(set(devices) - set(ids))
            if missing or extra:
                raise InvalidArgument(reason=(f"give every thin device of the metadata: missing {missing}" if missing
                                              else f"devices {extra} are not in the metadata"))
            m = mf.new_manifest(transaction_id=tid, options=options)
            now = _time.time()
            for dev_id, (size, name) in devices.items():
                if name is not None:
                    mf.check_name(name)
                m["devices"][str(dev_id)] = {"name": name, "size": size, "origin": None, "created_at": now}
            m = mf.validate(m, str(p / MANIFEST), str(p))
            _write_manifest(p, m)
            return m
        finally:
            if lock_fd is not None:
                os.close(lock_fd)

    @staticmethod
    def grow_data_file(path: str | os.PathLike[str], size: int) -> int:
        """Grow the data file of a pool that another process holds open (it takes the new chunks up when it next
        runs out of space, as dm-thin does after a table reload). Takes no lock; never shrinks. Returns the new
        number of data blocks. Raises InvalidArgument (not a whole number of chunks, or smaller)."""
        p = Path(path)
        store = FileBlockStore(p / "metadata", readonly=True, pool_file=True)
        try:
            sb = PoolMetadata.read_superblock(store)
        finally:
            store.close()
        chunk = sb.data_block_size * SECTOR_SIZE
        if size % chunk:
            raise InvalidArgument(reason=f"data size {size} bytes is not a multiple of the chunk size ({chunk} bytes)")
        fd = open_pool_file(p / "data", os.O_RDWR)
        try:
            cur = os.fstat(fd).st_size
            if size < cur:
                raise InvalidArgument(reason=f"cannot shrink the pool data from {cur // chunk} to {size // chunk} "
                                             "chunks (dm-thin cannot either)")
            try:
                os.ftruncate(fd, size)
            except OSError as e:
                raise StoreIOError(what=str(p / "data"), op="grow", reason=e.strerror or str(e)) from e
        finally:
            os.close(fd)
        return size // chunk

    def close(self) -> None:
        """Commit (when writable and healthy) and release everything."""
        if self.closed:
            return
        try:
            if not self.readonly and not self.failed and not self.md.needs_check and not self._unchanged():
                self.commit()
            self._compact_manifest()
        finally:
            self._release()

    def _unchanged(self) -> bool:
        """Nothing since the last commit: no metadata block shadowed, no device detail or superblock field
        changed, no data written (closing then writes nothing, so the files stay byte for byte as they were)."""
        md = self.md
        tm = md.tm
        if getattr(tm, "dirty", True) or getattr(tm, "dirty_raw", True):
            return False
        if md.details_changed():
            return False
        sb = md.sb
        if (md.trans_id, md.time, md.held_root, md.flags) != (sb.trans_id, sb.time, sb.held_root, sb.flags):
            return False
        if md.mapping_root != sb.data_mapping_root or md.details_root != sb.device_details_root:
            return False
        if md.nr_data_blocks != sb.data_sm_root.nr_blocks:
            return False
        return not getattr(self.data, "dirty", True)

    def _release(self) -> None:
        self.closed = True
        self._rw = False
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

    def crash_close(self) -> None:
        """Drop the pool as a crash would: release the files and the lock WITHOUT committing (tests, fault
        injection). What was written since the last commit may or may not survive; committed state does."""
        if not self.closed:
            self._release()

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
            return
        # a failed body: its writes are never committed
        try:
            if not self.readonly and not self.closed:
                self.abort_command(exc if isinstance(exc, BaseException) else None)
                if not self.md.needs_check:
                    self._compact_manifest()  # the manifest as reloaded for the last commit: no journal at rest
        finally:
            self._release()

    def abort_command(self, exc: BaseException | None = None) -> None:
        """A command (or request) failed: drop its uncommitted work. If it already overwrote committed chunks in
        place, or the abort itself fails, the pool fails (needs_check, read-only) so the change is never silent.
        The pool stays open; it is not committed."""
        with self.lock:
            if self.readonly or self.closed or self.failed:
                return
            overwrote = self._overwrote_committed()
            try:
                self.md.abort()
            except BaseException as e:
                self._fail(f"abort after {exc or 'a failure'} failed: {e}", abort=False)
                return
            self._reload_manifest()
            if overwrote:
                self._fail(f"{exc or 'a failed command'} after committed data was partly overwritten in place",
                           abort=False)

    def _overwrote_committed(self) -> bool:
        """Whether data written since the last sync lies in chunks the last commit maps (in-place overwrites)."""
        dirty = getattr(self.data, "dirty", None)
        if not dirty:
            return False
        sm = self.md.data_sm
        ch = self.chunk_bytes
        for start, end in dirty:
            a, b = start // ch, min(-(-end // ch), sm.nr_blocks)
            if b > a and sm.any_committed(a, b):  # reads only the bitmaps covering [a, b)
                return True
        return False

    def _reload_manifest(self) -> None:
        try:
            m = mf.read_manifest(self.path)
            self._set_manifest(mf.reconcile(m, device_ids=self.md.device_ids(), trans_id=self.md.trans_id,
                                            path=str(self.path / MANIFEST), pool=str(self.path)))
        except ThinpoolError:
            pass  # the in-memory copy stays (it matched the last commit)
        for o in self._origins.values():
            if o is not None:
                o.close()
        self._origins.clear()

    # --- state ------------------------------------------------------------------------------------------------
    @property
    def failed(self) -> bool:
        """The pool failed (a commit or an abort failed): read-only until checked."""
        return self._failure is not None or self.md.failed

    @property
    def failure(self) -> str | None:
        """Why the pool failed, or None."""
        if self._failure is None and self.md.failed:
            return "a metadata commit failed"
        return self._failure

    def fail(self, reason: str) -> None:
        """Fail the pool from outside (a server whose commit failed): as dm-thin's metadata_operation_failed, back
        to the last commit, needs_check set (best effort), read-only; every later write and flush raises
        PoolFailed."""
        with self.lock:
            self._fail(reason)

    # --- what callers above the pool may read (so nothing outside reaches into the metadata) -------------------
    @property
    def transaction_id(self) -> int:
        """The metadata's transaction id (dm-thin's; moves with every committed device change)."""
        return int(self.md.trans_id)

    @property
    def nr_data_blocks(self) -> int:
        """Chunks of the data device."""
        return int(self.md.nr_data_blocks)

    @property
    def nr_metadata_blocks(self) -> int:
        """4 KiB blocks of the metadata device."""
        return int(self.md.nr_metadata_blocks)

    @property
    def nr_allocated_data_blocks(self) -> int:
        """Chunks in use now (this transaction included)."""
        return int(self.md.data_sm.nr_allocated())

    def has_free_data_blocks(self, n: int) -> bool:
        """At least ``n`` chunks are free now."""
        return bool(self.md.data_sm.has_free(n))

    @property
    def metadata_blocks_written(self) -> int:
        """Metadata blocks written since the pool was opened (benchmarks count the metadata cost of a write)."""
        return int(self.md.tm.blocks_written)

    def _fail(self, reason: str, *, abort: bool = True) -> None:
        """dm-thin's metadata_operation_failed: abort to the last commit, set needs_check, go read-only.
        Every later write and flush raises PoolFailed."""
        if self._failure is None:
            self._failure = reason
        self._rw = False  # the data path's inline check (ThinDevice.write) now takes the slow one
        if abort and not self.md.failed:
            try:
                self.md.abort()
            except BaseException:
                self.md.failed = True
        # needs_check goes onto the last committed superblock even when the new superblock's write failed: whether
        # or not that one landed, the old commit's blocks are intact (shadowing never overwrites them), so the
        # disk then holds the old commit flagged, never a state a later crash could mix
        try:
            self.md.set_needs_check()
        except BaseException:
            pass  # the flag could not be written (the device is failing): the pool stays failed in memory
        self.out_of_data_space = False
        self._space_cv.notify_all()

    def check_writable(self) -> None:
        """Raise unless the pool takes writes now: closed -> InvalidArgument, failed -> PoolFailed, read-only or
        needs_check -> ReadOnly. The healthy case is one expression (plain attributes and one property: it
        runs on every 4 KiB write)."""
        md = self.md
        if not (self._failure is not None or self.closed or self.readonly or md.failed or md.readonly
                or md.needs_check):
            return
        self._check_writable_slow()

    def _check_writable_slow(self) -> None:
        if self.closed:
            raise InvalidArgument(reason="pool is closed")
        if self.failed:
            raise PoolFailed(reason=self.failure or "an earlier operation failed")
        if self.readonly or self.md.readonly:
            raise ReadOnly()
        if self.md.needs_check:
            raise ReadOnly("pool is read-only: metadata needs_check is set (run check / repair)")
        self.md._check_writable()

    def status(self) -> PoolStatus:
        with self.lock:
            md = self.md
            # the pool's own mode (a read-only opener only observes it): ro once needs_check is set or it failed
            mode = "failed" if md.failed else "ro" if (md.needs_check or self.failed) else \
                "out_of_data_space" if self.out_of_data_space else "rw"
            return PoolStatus(
                transaction_id=md.trans_id, used_metadata_blocks=md.tm.sm.nr_allocated(),
                total_metadata_blocks=md.nr_metadata_blocks, used_data_blocks=md.data_sm.nr_allocated(),
                total_data_blocks=md.nr_data_blocks, held_metadata_root=md.held_root or None, mode=mode,
                discard=self.discard_mode, no_space_policy=self.no_space_policy, needs_check=md.needs_check,
                chunk_size=self.chunk_bytes, zero=self.zero_blocks, devices=len(md.devices))

    @property
    def queue_timeout(self) -> float:
        """Earlier name of ``no_space_timeout``."""
        return self.no_space_timeout

    @queue_timeout.setter
    def queue_timeout(self, value: float) -> None:
        self.no_space_timeout = value

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
        """The device's name, or its id as text for an unnamed device (what exports and messages show)."""
        name = self._entry(dev_id)["name"]
        return str(dev_id) if name is None else str(name)

    def device_label(self, dev_id: int) -> str | None:
        """The name given to the device, None for an unnamed one."""
        name = self._entry(dev_id)["name"]
        return None if name is None else str(name)

    def find_device(self, ref: str | int) -> int:
        """A device id from an id or a name."""
        if isinstance(ref, int) or str(ref).isdigit():
            dev_id = int(ref)
            self._entry(dev_id)
            return dev_id
        key = self._names.get(ref)
        if key is not None and key in self.manifest["devices"]:
            return int(key)
        raise DeviceNotFound(dev_id=ref)

    def origin_path(self, dev_id: int) -> str | None:
        """The external origin file of a device (relative paths resolve against the pool directory), or None."""
        path = self._entry(dev_id).get("origin")
        if not path:
            return None
        return path if os.path.isabs(path) else str(self.path / path)

    def external_origin(self, dev_id: int) -> ExternalOrigin | None:
        o = self._origins.get(dev_id, False)
        if o is False:
            e = self.manifest["devices"].get(str(dev_id))
            path = self.origin_path(dev_id) if e is not None and e.get("origin") else None
            o = ExternalOrigin(path) if path else None
            self._origins[dev_id] = o
        return o  # type: ignore[return-value]

    # --- lineage ----------------------------------------------------------------------------------------------
    def origin_of(self, dev_id: int) -> int | None:
        """The id of the device ``dev_id`` was snapshotted from (it may have been deleted since), or None."""
        return self._entry(dev_id).get("snapshot_of")

    def lineage(self, dev_id: int) -> list[int]:
        """The snapshot chain from the oldest recorded ancestor to ``dev_id`` (ancestors may be deleted)."""
        return [a["dev_id"] for a in self._entry(dev_id).get("ancestors", [])] + [dev_id]

    def ancestors(self, dev_id: int) -> list[dict[str, Any]]:
        """The recorded ancestors of ``dev_id``, oldest first: ``{"dev_id", "name", "created_at"}`` each, as
        they were when the snapshot was taken (kept when an ancestor is deleted)."""
        return copy.deepcopy(self._entry(dev_id).get("ancestors", []))

    def created_at(self, dev_id: int) -> float | None:
        """When the device was created (seconds since the epoch), None for devices made before this was kept."""
        return self._entry(dev_id).get("created_at")

    def is_live(self, dev_id: int) -> bool:
        return dev_id in self.md.devices and str(dev_id) in self.manifest["devices"]

    # --- changes of the device set (manifest and metadata in step) --------------------------------------------
    def _change(self, md_op: Callable[[], Any] | None, *, sets: dict[str, dict[str, Any]] | None = None,
                dels: tuple[str, ...] = (), new_tid: int | None = None) -> None:
        """Apply a change of the device table: entries ``sets`` added or replaced, ``dels`` removed. The manifest
        with the union of old and new entries and both transaction ids, then the metadata op + new transaction id
        + commit, then the final manifest (see thinpool.manifest), each as one journal record: O(changed entries)
        in validation and on disk, not O(devices). Must hold the lock; the pool must be writable."""
        sets = sets or {}
        complete_pending(self)  # a snapshot, delete, merge... shares or drops the chunks: their copies first
        old_tid = self.md.trans_id
        tid = old_tid + 1 if new_tid is None else new_tid
        if not 0 <= tid <= mf.MAX_TRANSACTION_ID:
            raise InvalidArgument(reason=f"transaction id {tid} is out of range (0..2^64-1)")
        cur = self.manifest["devices"]
        path, pool = str(self.path / MANIFEST), str(self.path)
        head = {k: v for k, v in self.manifest.items() if k not in ("devices", "previous_transaction_id")}
        # the devices dict is copied once a change at most (a create: the union, shared by pending and final; a
        # delete: final without the entry, pending sharing the current one), never changed in place
        pending = dict(head, devices=cur | sets if sets else cur, transaction_id=tid, previous_transaction_id=old_tid)
        # only the changed entries are validated (the rest were, at open or at their own change); names against
        # the index of the current ones
        pending = mf.validate_changed(pending, list(sets), path, pool, names=self._names, in_place=bool(sets))
        sets = {k: pending["devices"][k] for k in sets}
        final_devs = pending["devices"]
        if any(k in final_devs for k in dels):
            final_devs = dict(final_devs)
            for k in dels:
                final_devs.pop(k, None)
        final = dict(pending, devices=final_devs)
        del final["previous_transaction_id"]
        rec: dict[str, Any] = {"transaction_id": tid, "previous_transaction_id": old_tid}
        if sets:
            rec["set"] = sets
        _append_manifest(self.path, rec)
        try:
            if md_op is not None:
                self._guard_metadata(md_op)
            self.md.set_transaction_id(old_tid, tid)
        except BaseException:
            if not self.failed:
                try:
                    self.md.abort()
                except BaseException:
                    self._fail("abort of a failed device change failed", abort=False)
            raise
        before = self.manifest
        self._set_manifest(pending, changed=list(sets), old=before)  # on disk now; the commit makes the metadata match
        self.commit()
        self._set_manifest(final, changed=list(dels), old=pending)
        rec = {"transaction_id": tid}
        if dels:
            rec["del"] = list(dels)
        size = _append_manifest(self.path, rec)
        if size > max(JOURNAL_COMPACT_BYTES, self._manifest_bytes):
            self._compact_manifest()

    def _compact_manifest(self) -> None:
        """Fold the journal into pool.json (amortised O(1) per change: it runs once the journal outgrows pool.json).
        Only with the metadata and the manifest in step (never mid-change, never on a failed pool)."""
        if self.readonly or self.failed or not os.path.lexists(self.path / mf.JOURNAL):
            return
        try:
            mf.compact(self.path, self.manifest)
        except (StoreIOError, NoSpace) as e:  # the journal stays and stays right: the change itself is durable
            log.warning("compaction of %s failed (the journal is kept): %s", self.path / mf.JOURNAL, e)
            return
        self._manifest_bytes = _file_size(self.path / MANIFEST)

    def _set_manifest(self, m: dict[str, Any], *, changed: list[str] | None = None,
                      old: dict[str, Any] | None = None) -> None:
        """Make ``m`` the manifest in memory and keep the name index (name -> key) in step: updated for the
        ``changed`` keys (their entries in ``old`` and ``m``), rebuilt when none are given."""
        devs = m["devices"]
        if changed is None or old is None:
            self._names = {e["name"]: k for k, e in devs.items() if e.get("name") is not None}
        else:
            for k in changed:
                e = old["devices"].get(k)
                if e is not None and e.get("name") is not None and self._names.get(e["name"]) == k:
                    del self._names[e["name"]]
            for k in changed:
                e = devs.get(k)
                if e is not None and e.get("name") is not None:
                    self._names[e["name"]] = k
        self.manifest = m

    def create_thin(self, dev_id: int, size: int, *, name: str | None = None, origin: str | None = None,
                    keep_transaction_id: bool = False) -> ThinDevice:
        """A new thin device of ``size`` bytes (a multiple of 512), optionally over an external origin file
        (a regular file; a relative path is taken relative to the current directory and stored absolute).
        ``keep_transaction_id``: the bare dm message, which leaves the transaction id alone (the caller moves it
        with set_transaction_id, as docker's devicemapper driver does); the manifest still follows safely."""
        with self.lock:
            self.check_writable()
            self._check_new(dev_id, size, name)
            if origin is not None:
                ExternalOrigin(origin).close()
                origin = os.path.abspath(origin)
            entry = {"name": name, "size": size, "origin": origin, "created_at": _time.time()}
            self._change(lambda: self.md.create_thin(dev_id), sets={str(dev_id): entry},
                         new_tid=self.md.trans_id if keep_transaction_id else None)
            return ThinDevice(self, dev_id)

    def create_snap(self, dev_id: int, origin_id: int, *, name: str | None = None,
                    size: int | None = None, keep_transaction_id: bool = False) -> ThinDevice:
        """Snapshot ``origin_id`` as ``dev_id`` in O(1) (the origin's mapping tree is shared); the lineage
        (origin, ancestors, creation time) is recorded."""
        with self.lock:
            self.check_writable()
            src = self._entry(origin_id)
            size = src["size"] if size is None else size
            self._check_new(dev_id, size, name)
            ancestors = list(src.get("ancestors", [])) + [
                {"dev_id": origin_id, "name": src.get("name"), "created_at": src.get("created_at")}]
            entry = {"name": name, "size": size, "origin": src.get("origin"), "snapshot_of": origin_id,
                     "ancestors": ancestors, "created_at": _time.time()}
            self._change(lambda: self.md.create_snap(dev_id, origin_id), sets={str(dev_id): entry},
                         new_tid=self.md.trans_id if keep_transaction_id else None)
            return ThinDevice(self, dev_id)

    def _check_new(self, dev_id: int, size: int, name: str | None) -> None:
        if dev_id in self.md.devices:
            raise DeviceExists(dev_id=dev_id)
        if not isinstance(size, int) or size <= 0 or size % SECTOR_SIZE:
            raise InvalidArgument(reason=f"device size {size} must be a positive multiple of 512 bytes")
        if name is not None:
            self._check_name_free(name, dev_id)

    def _check_name_free(self, name: str, dev_id: int) -> None:
        mf.check_name(name)
        key = self._names.get(name)  # O(1): the name index kept by _set_manifest
        if key is not None and int(key) != dev_id and int(key) in self.md.devices:
            raise InvalidArgument(reason=f"a device named {name!r} already exists")

    def delete_thin(self, dev_id: int, *, keep_transaction_id: bool = False) -> None:
        """Delete a thin device (its lineage stays recorded in its descendants)."""
        with self.lock:
            self.check_writable()
            if dev_id not in self.md.devices:
                from thinpool.errors import DeviceNotFound as _NotFound

                raise _NotFound(dev_id=dev_id)
            self._change(lambda: self.md.delete_thin(dev_id), dels=(str(dev_id),),
                         new_tid=self.md.trans_id if keep_transaction_id else None)
            o = self._origins.pop(dev_id, None)
            if o is not None:
                o.close()

    def merge_snapshot(self, snap_id: int) -> int:
        """Merge a snapshot into its origin, as ``lvconvert --merge`` does for thin snapshots: the origin takes
        the snapshot's mappings (and size), the snapshot goes away. One transaction; the metadata work is the
        deletion of the origin's old tree (its unshared blocks) plus O(1): the origin's id is re-pointed at the
        snapshot's tree (dm-thin's create_snap) and the snapshot's own reference dropped. Returns the origin's id.
        Raises InvalidArgument when the snapshot's origin is not recorded or no longer exists."""
        with self.lock:
            self.check_writable()
            e = self._entry(snap_id)
            origin_id = e.get("snapshot_of")
            if origin_id is None or not self.is_live(origin_id):
                raise InvalidArgument(reason=f"device {snap_id} has no live origin to merge into"
                                      + (f" (its origin {origin_id} was deleted)" if origin_id is not None else ""))
            sets = {str(origin_id): dict(self._entry(origin_id), size=e["size"])}
            md = self.md

            def op() -> None:
                md.delete_thin(origin_id)
                md.create_snap(origin_id, snap_id)
                md.delete_thin(snap_id)

            self._change(op, sets=sets, dels=(str(snap_id),))
            self._drop_origin(origin_id)
            self._drop_origin(snap_id)
            return int(origin_id)

    def rollback_to_snapshot(self, origin_id: int, snap_id: int) -> None:
        """Make ``origin_id`` a copy of ``snap_id`` (``rbd snap rollback``): the origin's tree is replaced by a
        share of the snapshot's (O(1) plus the deletion of the origin's old tree); the snapshot stays, and
        later writes to either break sharing as usual. The origin takes the snapshot's size."""
        with self.lock:
            self.check_writable()
            o, e = self._entry(origin_id), self._entry(snap_id)
            if origin_id == snap_id:
                raise InvalidArgument(reason="rollback needs two different devices")
            sets = {str(origin_id): dict(o, size=e["size"])}
            md = self.md

            def op() -> None:
                md.delete_thin(origin_id)
                md.create_snap(origin_id, snap_id)

            self._change(op, sets=sets)
            self._drop_origin(origin_id)

    def _drop_origin(self, dev_id: int) -> None:
        o = self._origins.pop(dev_id, None)
        if o is not None:
            o.close()

    def rename_device(self, dev_id: int, name: str | None) -> None:
        """Give a device a new name (None: unnamed). Raises InvalidArgument for a bad or taken name."""
        with self.lock:
            self.check_writable()
            e = self._entry(dev_id)
            if name is not None:
                self._check_name_free(name, dev_id)
            self._change(None, sets={str(dev_id): dict(e, name=name)})

    def resize_device(self, dev_id: int, size: int) -> None:
        """Change a device's virtual size. Shrinking unmaps every chunk wholly past the new end; growing makes
        the new range read as zeros (mappings left past an old end are removed, the old last chunk's tail
        zeroed)."""
        with self.lock:
            self.check_writable()
            e = self._entry(dev_id)
            if not isinstance(size, int) or size <= 0 or size % SECTOR_SIZE:
                raise InvalidArgument(reason=f"device size {size} must be a positive multiple of 512 bytes")
            old = e["size"]
            ch = self.chunk_bytes
            sets = {str(dev_id): dict(e, size=size)}
            dev = ThinDevice(self, dev_id)

            def op() -> None:
                if size < old:
                    dev._unmap(-(-size // ch), max(-(-old // ch), (self.md.highest_mapped(dev_id) or 0) + 1))
                elif size > old:
                    hi = self.md.highest_mapped(dev_id)
                    if hi is not None and hi >= -(-old // ch):
                        dev._unmap(-(-old // ch), hi + 1)
                    tail_end = min(-(-old // ch) * ch, size)
                    if old % ch and self.md.lookup(dev_id, old // ch) is not None and tail_end > old:
                        e["size"] = size  # bounds for the zeroing; restored by abort on failure
                        try:
                            dev.write_zeroes(old, tail_end - old)
                        finally:
                            e["size"] = old
                            # a handle that re-read the size inside this window holds the provisional one
                            # against the current manifest object: a new object makes every handle re-read it
                            self.manifest = dict(self.manifest)

            self._change(op, sets=sets)

    def trim(self) -> int:
        """Offline trim of the data file (thin_trim): punch a hole in every data block no device maps. Must be
        called with nothing uncommitted. Returns the number of chunks punched. O(nr_data_blocks) in numpy."""
        with self.lock:
            self.check_writable()
            self.commit()  # only blocks free in the committed state too (and no deferred copy left to read them)
            counts = np.asarray(self.md.data_sm.counts)
            free = np.concatenate([[False], counts == 0, [False]])
            edges = np.flatnonzero(np.diff(free.astype(np.int8)))
            starts, ends = edges[0::2], edges[1::2]
            ch = self.chunk_bytes
            n = 0
            for a, b in zip(starts.tolist(), ends.tolist()):
                self.data.punch(a * ch, (b - a) * ch)
                n += b - a
            self.data.sync()
            return n

    # --- data allocation and space ----------------------------------------------------------------------------
    def alloc_data_block(self) -> int:
        try:
            b = self.md.alloc_data_block()
        except NoDataSpace:
            self.no_data_space(1)
            b = self.md.alloc_data_block()
        self._check_low_water()
        return b

    def alloc_data_blocks(self, n: int) -> list[int]:
        """``n`` data blocks (each with one reference, owned by the caller until mapped or released), taken from
        the data space map's allocator in one go: one writable check and one low-water check for the batch (a
        1 MiB provision takes 16). Out of space part way: the blocks taken are given back, then the no-space
        policy applies to the whole batch (raise NoDataSpace, or queue and start again), so no block is held
        unmapped while the pool lock is released."""
        while True:
            self.check_writable()
            md = self.md
            new_block = md.data_sm.new_block
            out: list[int] = []
            try:
                for _ in range(n):
                    out.append(new_block())
            except BaseException as e:
                for b in out:
                    md.data_sm.dec(b)
                if not isinstance(e, NoDataSpace):
                    raise
                self.no_data_space(n)  # raises, or waits until n blocks are free
                continue
            self._check_low_water()
            return out

    def chunks_needed(self, dev_id: int, offset: int, length: int) -> int:
        """Data blocks a write of [offset, offset+length) to ``dev_id`` would allocate now: the chunks it touches
        that are unmapped or may be shared (dm-thin's __snapshotted_since). O(chunks in the range)."""
        if length <= 0:
            return 0
        ch = self.chunk_bytes
        first, last = offset // ch, (offset + length - 1) // ch
        with self.lock:
            self._entry(dev_id)
            snap = self.md.devices[dev_id].snapshotted_time
            if first == last:  # one chunk (a 4 KiB write): one lookup, no arrays (and no numpy at start-up)
                m = self.md.lookup(dev_id, first)
                return int(m is None or m[1] < snap)
            k, _, t = self.md.mappings(dev_id, first, last + 1)
            return int((last - first + 1) - len(k) + int(np.count_nonzero(t < snap)))

    def blocks_needed(self, dev_id: int, thin_blocks: Any) -> int:
        """Data blocks writes to the given thin blocks (chunk indexes, any order) would allocate now."""
        tb = sorted_unique(np.asarray(thin_blocks, dtype=np.int64))
        if not len(tb):
            return 0
        with self.lock:
            self._entry(dev_id)
            k, _, t = self.md.mappings(dev_id, int(tb[0]), int(tb[-1]) + 1)
            snap = self.md.devices[dev_id].snapshotted_time
            unshared = np.asarray(k, dtype=np.int64)[np.asarray(t) >= snap]
            return int(len(tb) - np.count_nonzero(np.isin(tb, unshared)))

    def check_space(self, dev_id: int, offset: int, length: int) -> None:
        """Make sure a whole request fits before its first byte is written: raises NoDataSpace (or, with
        queue-if-no-space, waits up to no_space_timeout). The caller must hold ``pool.lock`` across the check and
        the writes when other threads write to the pool."""
        with self.lock:
            self.check_writable()
            self.ensure_free(self.chunks_needed(dev_id, offset, length))

    def ensure_free(self, need: int) -> None:
        """At least ``need`` free data blocks, or NoDataSpace (after queueing, per the policy)."""
        with self.lock:
            if need > 0 and not self.md.data_sm.has_free(need):
                self._take_up_grown_data()
                if not self.md.data_sm.has_free(need):
                    self.no_data_space(need)

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

    def _take_up_grown_data(self) -> bool:
        """If another process grew the data file (``grow_data_file``), extend the data space map to it (in the
        open transaction), as dm-thin's preresume does after a table reload. True if it grew."""
        if self.readonly or self.failed:
            return False
        try:
            nr = self.data.size // self.chunk_bytes
        except (OSError, AttributeError):
            return False
        if nr <= self.md.nr_data_blocks:
            return False
        self._guard_metadata(lambda: self.md.resize_data(nr))
        self._low_water_fired = False
        return True

    def no_data_space(self, need: int, replan: Callable[[], int] | None = None) -> None:
        """Out of data space: queue (wait for a resize, up to no_space_timeout seconds; 0 = forever) or refuse
        with NoDataSpace. ``replan``: what the waiting I/O needs now, asked again after every wake (other
        writers run while it waits and may have provisioned or broken some of its chunks, or discarded some:
        waiting for the first figure could wait for space it no longer needs, forever with no timeout)."""
        if self._take_up_grown_data() and self.md.data_sm.has_free(need):
            return
        if self.no_space_policy == "queue" and not self.failed:
            timeout = self.no_space_timeout
            deadline = None if timeout == 0 else _time.monotonic() + timeout
            self.out_of_data_space = True
            if self.on_queue is not None:
                self.on_queue(self, need, timeout)
            committed = False
            while not self.md.data_sm.has_free(need) and not self.failed:
                if not committed and self.md.data_sm.nr_free() >= need:
                    # blocks freed in this transaction (a discard, a delete) are allocatable once it commits:
                    # commit now, as dm-thin's periodic commit does before it requeues the bios it held
                    self.commit()
                    committed = True
                    if replan is not None:
                        need = replan()
                    continue
                remaining = QUEUE_POLL_S if deadline is None else min(QUEUE_POLL_S, deadline - _time.monotonic())
                if remaining <= 0:
                    break
                self._space_cv.wait(remaining)
                committed = False
                self._take_up_grown_data()
                if replan is not None and not self.failed:
                    need = replan()
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
        """Data first (fdatasync), then the metadata (two-phase commit); passdown discards afterwards.

        A failure fails the pool (abort, needs_check, read-only; see the module docstring) and raises the
        original error (HostNoSpace for a full host filesystem); later calls raise PoolFailed."""
        with self.lock:
            if self.readonly:
                return
            self.check_writable()
            try:
                # deferred copy-on-writes complete before the commit that makes their mappings durable
                complete_pending(self)
                # a failed fdatasync may have dropped data written since the last commit (Linux marks the pages
                # clean): never commit mappings to it
                self.data.sync()
                # an empty commit writes nothing: skipped here, so that it builds no (numpy) array of freed blocks
                freed = self.md.commit() if self.md.has_changes() else FreedBlocks([])
            except NoMetadataSpace:
                # dm-thin's out-of-metadata-space mode: back to the last commit, read-only with needs_check
                if not self.md.failed:
                    self._guard_metadata(lambda: self.md.abort())
                    self.md.set_needs_check()
                raise
            except BaseException as e:
                self._fail(f"commit failed: {e}")
                raise
            self.stats["commits"] += 1
            self._last_commit = _time.monotonic()
            if self.discard_mode == "passdown" and len(freed):
                self._passdown(freed)

    def _passdown(self, freed: FreedBlocks) -> None:
        """Punch the data blocks the last commit freed (``PoolMetadata.commit`` returns only blocks whose count is
        0 after it, and nothing can change them under the pool lock), merged into runs of consecutive blocks:
        one ``fallocate`` per run (at most PASSDOWN_MAX_BYTES each), found with numpy a bitmap at a time
        (``FreedBlocks.runs``), so a delete of N mappings costs O(N) in numpy plus one call per run, and holds
        the freed blocks at 2 bytes each, never an array of all of them or of all their runs. The commit is
        durable: a failing punch must not make it look failed (the blocks are free in the metadata either way;
        their old bytes stay in the data file), as dm-thin only logs a failed passdown."""
        ch = self.chunk_bytes
        step = max(1, PASSDOWN_MAX_BYTES // ch)
        for a, b in freed.runs():
            for lo in range(a, b, step):
                try:
                    self.data.punch(lo * ch, (min(b, lo + step) - lo) * ch)
                except StoreIOError as e:
                    log.warning("discard passdown to %s failed after commit: %s", self.data.path, e)
                    return

    def maybe_commit(self) -> None:
        """Commit if auto_commit_interval seconds have passed (long-running servers)."""
        if self.auto_commit_interval is not None and _time.monotonic() - self._last_commit >= self.auto_commit_interval:
            self.commit()

    def abort(self) -> None:
        """Back to the last commit (the kernel's abort_transaction). A failing abort fails the pool."""
        with self.lock:
            try:
                self.md.abort()
            except BaseException as e:
                self._fail(f"abort failed: {e}", abort=False)
                raise
            self._reload_manifest()

    def set_transaction_id(self, current: int, new: int) -> None:
        """Compare-and-swap of the transaction id (dm-thin's message). Raises TransactionIdMismatch or
        InvalidArgument (``new`` outside 0..2^64-1) before anything is written."""
        with self.lock:
            self.check_writable()
            if not isinstance(new, int) or not 0 <= new <= mf.MAX_TRANSACTION_ID:
                raise InvalidArgument(reason=f"transaction id {new} is out of range (0..2^64-1)")
            if current != self.md.trans_id:
                from thinpool.errors import TransactionIdMismatch

                raise TransactionIdMismatch(current=self.md.trans_id, given=current)
            self._change(None, new_tid=new)

    def reserve_metadata_snap(self) -> int:
        with self.lock:
            self.check_writable()
            try:
                complete_pending(self)  # the metadata snapshot commits: deferred copies first, as in commit
                self.data.sync()
            except BaseException as e:
                self._fail(f"data sync failed: {e}")  # as in commit: never commit mappings to dropped data
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


def _file_size(path: Path) -> int:
    try:
        return os.lstat(path).st_size
    except OSError:
        return 0


def block_runs(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The runs of consecutive values in sorted, unique ``blocks``: (starts, ends), ends exclusive."""
    if not len(blocks):
        return blocks[:0], blocks[:0]
    cuts = np.flatnonzero(np.diff(blocks) != 1) + 1
    starts = blocks[np.concatenate([[0], cuts])]
    ends = blocks[np.concatenate([cuts - 1, [len(blocks) - 1]])] + 1
    return starts, ends


def _snapshot_manifest(m: dict[str, Any], md: PoolMetadata, chunk: int) -> dict[str, Any]:
    """The manifest for a read-only view through the held metadata snapshot: the snapshot is older than the
    manifest, so its transaction id is not compared; a device deleted since has no entry any more and is shown
    unnamed, sized to its highest mapped chunk (in memory only: a snapshot view never writes)."""
    out = copy.deepcopy(m)
    out.pop("previous_transaction_id", None)
    out["transaction_id"] = md.trans_id
    devs = {}
    for dev_id in md.device_ids():
        e = m["devices"].get(str(dev_id))
        if e is None:
            hi = md.highest_mapped(dev_id)
            e = {"name": None, "size": (1 if hi is None else hi + 1) * chunk, "origin": None}
        devs[str(dev_id)] = e
    out["devices"] = devs
    return out


def _check_new_pool_dir(p: Path) -> None:
    """A new pool goes into a missing or empty directory only (never ``/``, never over a user's files)."""
    if p.is_symlink() and not p.exists():
        raise UnsafePoolFile(path=str(p), reason="it is a dangling symbolic link")
    if p.exists():
        if not p.is_dir():
            raise NotEmptyDirectory(path=str(p), entries="it is not a directory")
        if p.resolve() == Path(p.resolve().anchor):
            raise NotEmptyDirectory(path=str(p), entries="the root directory")
        names = sorted(os.listdir(p))
        if names:
            if MANIFEST in names or "metadata" in names:
                raise InvalidArgument(reason=f"{p} already holds a pool")
            shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            raise NotEmptyDirectory(path=str(p), entries=shown)


# A pool holds every device's data: its files are the owner's alone (0600; the umask may only narrow it), and a
# directory made for it is 0750 (the control socket takes the directory's mode).
POOL_FILE_MODE = 0o600
POOL_DIR_MODE = 0o750


def _create_pool_file(path: Path) -> int:
    """Create a new pool file: O_EXCL | O_NOFOLLOW, so nothing existing (or behind a symlink) is truncated."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                       POOL_FILE_MODE)
    except FileExistsError:
        raise UnsafePoolFile(path=str(path), reason="it already exists") from None
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            from thinpool.errors import HostNoSpace

            raise HostNoSpace(what=str(path), op="create") from e
        raise StoreIOError(what=str(path), op="create", reason=e.strerror or str(e)) from e


def pool_file_kind(path: str | os.PathLike[str]) -> str:
    """'regular', 'symlink', 'missing' or 'other' for a pool file (diagnostics)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "missing"
    if stat.S_ISLNK(st.st_mode):
        return "symlink"
    return "regular" if stat.S_ISREG(st.st_mode) else "other"
