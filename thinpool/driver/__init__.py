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
        if not ds.pool.readonly:
            self.remove_orphans()

    def remove_orphans(self) -> list[str]:
        """Delete the devices a crash left behind: registered with the device set, but neither the base, a
        registered layer nor a container's (moby's layer store drops such incomplete layers at start too)."""
        used = {""} | {layer.cache_id for layer in self.images.layers.values()}
        for c in self.containers.all():
            used.update((c["Device"], c["InitDevice"]))
        orphans = sorted(set(self.ds.devices) - used)
        for h in orphans:
            self.ds.delete_device(h)
        for d in list(self.images.layerdb.iterdir()) if self.images.layerdb.is_dir() else []:
            if not (d / "cache-id").exists():
                for f in d.iterdir():
                    f.unlink()
                d.rmdir()
        return orphans
