"""Every exception thinpool raises, in one hierarchy.

Layer: bottom. May import: nothing from thinpool.

Constructors take keyword fields; ``__str__`` fills the class ``message`` template from them, so tests can
assert on fields and the CLI can print one clear line.
"""

from __future__ import annotations

import errno as _errno
from typing import Any


class ThinpoolError(Exception):
    """Base of every thinpool error."""

    message = "thinpool error"
    exit_code = 1

    def __init__(self, message: str | None = None, **fields: Any) -> None:
        self.fields = fields
        for k, v in fields.items():
            setattr(self, k, v)
        if message is not None:
            self.message = message
        super().__init__(self.__str__())

    def __str__(self) -> str:
        try:
            return self.message.format(**self.fields)
        except (KeyError, IndexError, ValueError):
            return self.message


# --- metadata -------------------------------------------------------------------------------------------------
class MetadataError(ThinpoolError):
    message = "metadata error"
    exit_code = 4


class MetadataCorrupt(MetadataError):
    """Damaged metadata; ``block`` is the metadata block number where it was found."""

    message = "metadata corrupt at block {block}: {reason}"

    def __init__(self, message: str | None = None, *, block: int | None, reason: str, path: tuple[int, ...] = (),
                 **kw: Any) -> None:
        super().__init__(message, block=block, reason=reason, path=tuple(path), **kw)


class ChecksumError(MetadataCorrupt):
    message = ("metadata corrupt at block {block}: bad checksum in {block_type} "
               "(stored {stored:#010x}, computed {computed:#010x})")

    def __init__(self, *, block: int, block_type: str, stored: int, computed: int) -> None:
        super().__init__(block=block, reason="bad checksum", block_type=block_type, stored=stored,
                         computed=computed)


class UnsupportedMetadata(MetadataError):
    message = "unsupported metadata: {feature}"


class NeedsCheck(MetadataError):
    message = "metadata has the needs_check flag set: run check (and repair) before writing"


# --- space ----------------------------------------------------------------------------------------------------
class NoSpace(ThinpoolError):
    message = "no {kind} space left ({requested} block(s) requested)"
    exit_code = 3


class NoDataSpace(NoSpace):
    def __init__(self, message: str | None = None, *, requested: int = 1, **kw: Any) -> None:
        super().__init__(message, kind="data", requested=requested, **kw)


class NoMetadataSpace(NoSpace):
    def __init__(self, message: str | None = None, *, requested: int = 1, **kw: Any) -> None:
        super().__init__(message, kind="metadata", requested=requested, **kw)


# --- devices --------------------------------------------------------------------------------------------------
class DeviceError(ThinpoolError):
    message = "device {dev_id}: error"
    exit_code = 5


class DeviceExists(DeviceError):
    message = "device {dev_id} already exists"


class DeviceNotFound(DeviceError, LookupError):
    message = "device {dev_id} does not exist"


class DeviceBusy(DeviceError):
    message = "device {dev_id} is busy"


class BadDeviceId(DeviceError, ValueError):
    message = "bad device id {dev_id}: must be 0..16777215"


# --- transactions / pool state --------------------------------------------------------------------------------
class TransactionError(ThinpoolError):
    message = "transaction error"


class TransactionIdMismatch(TransactionError):
    message = "transaction id mismatch: pool has {current}, caller said {given}"


class PoolFailed(TransactionError):
    """A commit (or the abort after it) failed: as dm-thin's metadata_operation_failed, the pool went read-only
    with needs_check set; every later write and flush fails until the operator checks it. ``reason`` is the first
    failure."""

    message = "pool has failed ({reason}): it is read-only with needs_check set; run `thinpool check` (and " \
              "`thinpool pool repair`) before writing again"
    exit_code = 4

    def __init__(self, message: str | None = None, *, reason: str = "an earlier operation failed",
                 **kw: Any) -> None:
        super().__init__(message, reason=reason, **kw)


class ReadOnly(ThinpoolError):
    message = "pool is read-only"


class PoolLocked(ThinpoolError):
    message = "pool {path} is in use by another {holder} (lock held on {lockfile})"

    def __init__(self, message: str | None = None, *, path: str, lockfile: str, holder: str = "writer",
                 **kw: Any) -> None:
        super().__init__(message, path=path, lockfile=lockfile, holder=holder, **kw)


class PoolNotFound(ThinpoolError, FileNotFoundError):
    message = "no pool at {path}"


class OutOfBounds(ThinpoolError, ValueError):
    message = "I/O out of bounds: offset {offset} length {length} on a device of {size} bytes"


class InvalidArgument(ThinpoolError, ValueError):
    message = "{reason}"


class StoreIOError(ThinpoolError, OSError):
    message = "I/O error on {what} during {op}: {reason}"


# --- filesystem -----------------------------------------------------------------------------------------------
class FsError(ThinpoolError):
    message = "filesystem error: {reason}"
    errno: int = _errno.EIO

    def __init__(self, message: str | None = None, **fields: Any) -> None:
        fields.setdefault("reason", message or self.message)
        fields.setdefault("path", "")
        super().__init__(message, **fields)


class FileNotFound(FsError, FileNotFoundError):
    message = "no such file or directory: {path}"
    errno = _errno.ENOENT


class FileExists(FsError, FileExistsError):
    message = "file exists: {path}"
    errno = _errno.EEXIST


class NotADirectory(FsError, NotADirectoryError):
    message = "not a directory: {path}"
    errno = _errno.ENOTDIR


class IsADirectory(FsError, IsADirectoryError):
    message = "is a directory: {path}"
    errno = _errno.EISDIR


class DirectoryNotEmpty(FsError):
    message = "directory not empty: {path}"
    errno = _errno.ENOTEMPTY


class NameTooLong(FsError):
    message = "file name too long: {path}"
    errno = _errno.ENAMETOOLONG


class FsCorrupt(FsError):
    message = "filesystem corrupt: {reason}"


class FsNoSpace(FsError, NoSpace):
    message = "no space left on filesystem: {reason}"
    errno = _errno.ENOSPC
    exit_code = 3


# --- safety (pool files, manifest, locks, host space) -----------------------------------------------------------
class ManifestError(MetadataError):
    """pool.json is missing, unreadable or disagrees with the metadata. ``path`` is the manifest, ``reason`` what is
    wrong; the message says how to recover (nothing is guessed or written back)."""

    message = "{path}: {reason}; restore pool.json from a backup, or rebuild it from the metadata with " \
              "`thinpool pool rebuild-manifest {pool} --device ID:SIZE[:NAME] ...` (one per thin device)"

    def __init__(self, message: str | None = None, *, path: str, reason: str, pool: str = "POOL",
                 **kw: Any) -> None:
        super().__init__(message, path=path, reason=reason, pool=pool, **kw)


class UnsafePoolFile(ThinpoolError):
    """A pool file is a symlink, not a regular file, or the wrong size (a planted or damaged pool directory)."""

    message = "refusing {path}: {reason}"


class HostNoSpace(NoSpace, StoreIOError):
    """The host filesystem under the pool is full (ENOSPC/EDQUOT from the OS), reported as no space, not EIO."""

    message = "no space left on the host filesystem: {op} of {what} failed"

    def __init__(self, message: str | None = None, *, what: str, op: str, **kw: Any) -> None:
        kw.setdefault("kind", "host filesystem")
        kw.setdefault("requested", 0)
        super().__init__(message, what=what, op=op, **kw)
        self.errno = _errno.ENOSPC


class NotEmptyDirectory(InvalidArgument):
    """``pool create`` was pointed at a directory that holds something other than a pool."""

    message = "{path} is not empty ({entries}): a pool is created only in a new or empty directory"


# --- fs (helper fs): extended attributes, unformatted devices ------------------------------------------------
class XattrNotFound(FsError, LookupError):
    message = "no such extended attribute {name}: {path}"
    errno = _errno.ENODATA


class NoFilesystem(FsCorrupt):
    message = "no ext2 file system on the device: {reason}"


class LocalFileError(ThinpoolError, OSError):
    """A file on the host (the source of ``fs put``, the target of ``fs get``) could not be read or written."""

    message = "{path}: {reason}"


# --- Ceph RBD streams (helper rbd) ----------------------------------------------------------------------------
class RbdStreamError(ThinpoolError, ValueError):
    """A malformed or truncated rbd diff / export-format 2 stream; ``offset`` is the byte where it broke."""

    message = "bad {kind} stream at byte {offset}: {reason}"

    def __init__(self, message: str | None = None, *, offset: int, reason: str, kind: str = "rbd diff",
                 **kw: Any) -> None:
        super().__init__(message, offset=offset, reason=reason, kind=kind, **kw)


class SnapshotNotFound(DeviceError, LookupError):
    """The from-snapshot a diff starts at is not a device of the pool (rbd import-diff: ENOENT/EINVAL)."""

    message = "from-snapshot {name!r} does not exist in the pool: apply the earlier diffs first"


class SnapshotExists(DeviceError):
    """The to-snapshot a diff would create is already a device name (rbd import-diff: EEXIST)."""

    message = "to-snapshot {name!r} already exists in the pool"


# --- Docker devicemapper driver (helper driver) ----------------------------------------------------------------
class DriverError(ThinpoolError):
    """A refused driver, image or container operation (``reason`` says why)."""

    message = "{reason}"


# --- servers (helper: servers) --------------------------------------------------------------------------------
class ServerError(ThinpoolError):
    """A server (NBD, FUSE, control channel) could not be set up or refused an operator request."""

    message = "{reason}"


class AddressInUse(ServerError):
    message = "{address} is in use by a running server (stop it first; a live socket is never taken over)"


class ListenError(ServerError):
    message = "cannot listen on {address}: {reason}"


class TlsConfigError(ServerError):
    message = "TLS: {reason}"


class ServedPoolFailed(TransactionError):
    """A served pool stopped accepting writes after a failed commit (dm-thin's metadata_operation_failed)."""

    message = "pool failed after an error ({reason}): writes and flushes are refused until it is checked"
    exit_code = 4


class ControlError(ServerError):
    """A request sent through a running server's control channel failed (transport or protocol level)."""

    message = "control channel {path}: {reason}"


# --- metadata tools (helper tools) ------------------------------------------------------------------------------
class DeviceNameNeedsPool(DeviceError, LookupError):
    """A device named (not numbered) for a bare metadata file: names live in a pool directory's pool.json."""

    message = ("device {dev_id!r}: names live in a pool directory's pool.json, and {path} is a bare metadata "
               "file: give the device id (`thinpool ls {path}` lists the ids)")


class MissingExtra(ThinpoolError):
    """An optional feature whose extra dependencies are not installed."""

    message = "{feature} needs {module}: pip install 'thinpool[{extra}]'"


class DriverNotInitialized(DriverError):
    message = "pool {path} has no devicemapper driver: run thinpool driver init"


class ImageNotFound(DriverError, LookupError):
    message = "no such image: {ref}"


class AmbiguousImage(DriverError):
    message = "image reference {ref} is ambiguous: it matches {matches}"


class ImageFormatError(DriverError, ValueError):
    message = "bad image {source}: {reason}"


class ImageInUse(DriverError):
    message = "unable to remove image {ref}: it is used by container {container}"


class ContainerNotFound(DriverError, LookupError):
    message = "no such container: {name}"


class ContainerExists(DriverError):
    message = "container name {name} is already in use"


class MissingDependency(DriverError):
    message = "{what} needs the Python package {package}: pip install {package}"


class PoolLowOnSpace(NoSpace):
    """moby's poolHasFreeSpace refusal (dm.min_free_space)."""

    message = ("Thin Pool has {free} free {kind} blocks which is less than minimum required {minimum} free {kind} "
               "blocks. Create more free space in thin pool or use --min-free-space to change behavior")


# --- check --auto-repair (helper repair) ------------------------------------------------------------------------
class LeakRepairRefused(MetadataError):
    """``check --auto-repair`` repairs leaked blocks only; any other error refuses it (nothing is changed)."""

    message = ("{path}: not repairing: the metadata has {count} error(s) besides leaked blocks (first: {first}); "
               "use `thinpool pool repair` to salvage it into new metadata")
    exit_code = 1
    report: Any  # the check's CheckReport (thinpool.metadata.check), for the CLI to print its findings
