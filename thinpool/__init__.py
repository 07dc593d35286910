"""thinpool: a thin-provisioned block device emulator with Linux dm-thin on-disk metadata.

Public API: ``Pool`` and ``ThinDevice`` (loaded on first use, so ``import thinpool`` and ``thinpool --help`` stay
light) and every exception of ``thinpool.errors``::

    from thinpool import Pool, ThinDevice, NoDataSpace
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from thinpool import errors as _errors
from thinpool.errors import (
    BadDeviceId,
    ChecksumError,
    DeviceBusy,
    DeviceError,
    DeviceExists,
    DeviceNotFound,
    DirectoryNotEmpty,
    FileExists,
    FileNotFound,
    FsCorrupt,
    FsError,
    FsNoSpace,
    HostNoSpace,
    InvalidArgument,
    IsADirectory,
    ManifestError,
    MetadataCorrupt,
    MetadataError,
    NameTooLong,
    NeedsCheck,
    NoDataSpace,
    NoMetadataSpace,
    NoSpace,
    NotADirectory,
    NotEmptyDirectory,
    OutOfBounds,
    PoolFailed,
    PoolLocked,
    PoolNotFound,
    ReadOnly,
    StoreIOError,
    ThinpoolError,
    TransactionError,
    TransactionIdMismatch,
    UnsafePoolFile,
    UnsupportedMetadata,
)

# classes other modules add to thinpool.errors later are re-exported too
for _name, _obj in vars(_errors).items():
    if isinstance(_obj, type) and issubclass(_obj, BaseException) and _obj.__module__ == _errors.__name__:
        globals().setdefault(_name, _obj)

if TYPE_CHECKING:
    from thinpool.pool import Pool
    from thinpool.thin import ThinDevice

__version__ = "0.1.0"

__all__ = ["Pool", "ThinDevice", "__version__",
           "BadDeviceId",
           "ChecksumError",
           "DeviceBusy",
           "DeviceError",
           "DeviceExists",
           "DeviceNotFound",
           "DirectoryNotEmpty",
           "FileExists",
           "FileNotFound",
           "FsCorrupt",
           "FsError",
           "FsNoSpace",
           "HostNoSpace",
           "InvalidArgument",
           "IsADirectory",
           "ManifestError",
           "MetadataCorrupt",
           "MetadataError",
           "NameTooLong",
           "NeedsCheck",
           "NoDataSpace",
           "NoMetadataSpace",
           "NoSpace",
           "NotADirectory",
           "NotEmptyDirectory",
           "OutOfBounds",
           "PoolFailed",
           "PoolLocked",
           "PoolNotFound",
           "ReadOnly",
           "StoreIOError",
           "ThinpoolError",
           "TransactionError",
           "TransactionIdMismatch",
           "UnsafePoolFile",
           "UnsupportedMetadata"]


def __getattr__(name: str) -> Any:
    if name == "Pool":
        from thinpool.pool import Pool

        return Pool
    if name == "ThinDevice":
        from thinpool.thin import ThinDevice

        return ThinDevice
    raise AttributeError(f"module 'thinpool' has no attribute {name!r}")
