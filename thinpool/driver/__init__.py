"""Docker's devicemapper storage driver, emulated on a thin pool: a base device, image layers as snapshot chains,
containers as two snapshots on top (``NAME-init`` and ``NAME``).

Layer: driver. May import: thinpool.errors, thinpool.pool, thinpool.thin, thinpool.fs, thinpool.tools.

Modules: ``state`` (moby's devmapper records and transaction protocol, the base device, info), ``source`` (OCI
layouts and docker archives), ``blob`` (decompression, DiffIDs, ChainIDs), ``apply`` (moby's UnpackLayer),
``rootfs`` (chroot paths, tar entries), ``store`` (layers, images, references, load and save), ``changes``
(moby's naive diff), ``container`` (create, cp, diff, commit, export, rm), ``blockdiff`` (diff from the
block-level delta).
"""

from __future__ import annotations

from thinpool.driver.container import Containers
from thinpool.driver.state import DeviceSet
from thinpool.driver.store import ImageStore

__all__ = ["Containers", "DeviceSet", "ImageStore", "Driver"]


class Driver:
    """The whole driver of one open pool: its device set, image store and containers."""

    def __init__(self, ds: DeviceSet) -> None:
        self.ds = ds
        self.images = ImageStore(ds)
        self.containers = Containers(ds, self.images)
