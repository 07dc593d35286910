"""A model-checked driver for PoolMetadata on a file: every operation is applied to the pool and to a plain
dict model; ``verify`` commits and compares the pool with the model, our checker, and the real tools."""

from __future__ import annotations

import random
from pathlib import Path

from md_helpers import (
    need_tool,
    new_pool_file,
    our_dump,
    our_dump_file,
    real_thin_check,
    real_thin_dump,
)

from thinpool.io.block_store import FileBlockStore
from thinpool.metadata.check import check_metadata
from thinpool.metadata.pool_metadata import PoolMetadata

MAX_CHAIN = 50


class Harness:
    def __init__(self, path: Path, *, nr_meta_blocks: int = 4096, nr_data_blocks: int = 200_000,
                 real_tools: bool = True) -> None:
        self.path = path
        self.pmd = new_pool_file(path, nr_meta_blocks=nr_meta_blocks, nr_data_blocks=nr_data_blocks)
        self.model: dict[int, dict[int, tuple[int, int]]] = {}
        self.depth: dict[int, int] = {}
        self.snap_dump: str | None = None  # our dump at the time the metadata snapshot was reserved
        self.real_tools = real_tools
        self.verified = 0

    # --- operations (pool and model in step) ----------------------------------------------------------------
    def create(self, dev: int) -> None:
        self.pmd.create_thin(dev)
        self.model[dev] = {}
        self.depth[dev] = 0

    def snapshot(self, dev: int, origin: int) -> None:
        self.pmd.create_snap(dev, origin)
        self.model[dev] = dict(self.model[origin])
        self.depth[dev] = self.depth[origin] + 1

    def delete(self, dev: int) -> None:
        self.pmd.delete_thin(dev)
        del self.model[dev]
        del self.depth[dev]

    def map(self, dev: int, thin: int) -> None:
        data = self.pmd.alloc_data_block()
        self.pmd.insert(dev, thin, data)
        self.model[dev][thin] = (data, self.pmd.time)

    def map_range(self, dev: int, start: int, n: int) -> None:
        for t in range(start, start + n):
            self.map(dev, t)

    def unmap(self, dev: int, thin: int) -> None:
        was = self.pmd.remove(dev, thin)
        assert was == (thin in self.model[dev])
        self.model[dev].pop(thin, None)

    def reserve(self) -> None:
        self.pmd.reserve_metadata_snap()  # commits first
        self.snap_dump = our_dump(self.pmd)

    def release(self) -> None:
        self.pmd.release_metadata_snap()
        self.snap_dump = None

    # --- verification -----------------------------------------------------------------------------------------
    def check_model(self) -> None:
        assert self.pmd.device_ids() == sorted(self.model)
        for dev, m in self.model.items():
            k, d, t = self.pmd.mappings(dev)
            assert k.tolist() == sorted(m)
            assert list(zip(d.tolist(), t.tolist())) == [m[x] for x in sorted(m)]
            assert self.pmd.get_device(dev).mapped_blocks == len(m)

    def verify(self) -> None:
        """Commit; then: model == pool; our checker clean (no warnings); reopen == committed; the real
        thin_check passes with nothing alarming and the real thin_dump prints exactly our dump."""
        self.pmd.commit()
        self.check_model()
        mine = our_dump(self.pmd)
        report = check_metadata(FileBlockStore(self.path, readonly=True))
        assert report.problems == [], [str(p) for p in report.problems]
        assert our_dump_file(self.path) == mine
        if self.snap_dump is not None:
            snap = PoolMetadata.open(FileBlockStore(self.path, readonly=True), use_metadata_snap=True)
            assert _strip_nr_data(our_dump(snap)) == _strip_nr_data(self.snap_dump)
        if self.real_tools:
            need_tool("thin_dump")
            real_thin_check(self.path)
            assert real_thin_dump(self.path) == mine
            if self.snap_dump is not None:
                assert _strip_nr_data(real_thin_dump(self.path, "-m")) == _strip_nr_data(self.snap_dump)
        self.verified += 1

    # --- random driver ----------------------------------------------------------------------------------------
    def random_step(self, rng: random.Random, next_id: list[int]) -> str:
        devs = sorted(self.model)
        ops = ["create", "map", "map", "map_range", "unmap", "unmap_range", "snapshot", "chain", "delete",
               "reserve_release"]
        op = rng.choice(ops) if devs else "create"
        if op == "create":
            dev = next_id[0] if rng.random() < 0.9 else rng.choice([2**24 - 1, 2**24 - 2 - len(devs)])
            next_id[0] += 1
            if dev not in self.model:
                self.create(dev)
        elif op == "map":
            dev = rng.choice(devs)
            for _ in range(rng.randint(1, 30)):
                self.map(dev, rng.randrange(0, 3000))
        elif op == "map_range":
            self.map_range(rng.choice(devs), rng.randrange(0, 5000), rng.randint(100, 700))
        elif op == "unmap":
            dev = rng.choice(devs)
            keys = sorted(self.model[dev])
            for _ in range(rng.randint(1, 30)):
                self.unmap(dev, rng.choice(keys) if keys and rng.random() < 0.8 else rng.randrange(0, 6000))
        elif op == "unmap_range":
            dev = rng.choice(devs)
            keys = sorted(self.model[dev])
            if keys:
                lo = rng.randrange(len(keys))
                for t in keys[lo:lo + rng.randint(50, 600)]:
                    self.unmap(dev, t)
        elif op in ("snapshot", "chain"):
            origin = rng.choice(devs)
            for _ in range(1 if op == "snapshot" else rng.randint(2, 12)):
                if self.depth[origin] >= MAX_CHAIN:
                    break
                dev = next_id[0]
                next_id[0] += 1
                self.snapshot(dev, origin)
                if rng.random() < 0.5:  # write to the new snapshot or to its origin
                    self.map(rng.choice([dev, origin]), rng.randrange(0, 3000))
                origin = dev
        elif op == "delete":
            self.delete(rng.choice(devs))
        elif op == "reserve_release":
            if self.pmd.held_root:
                self.release()
            else:
                self.reserve()
        return op


def _strip_nr_data(xml: str) -> str:
    """thin_dump -m prints nr_data_blocks="0" (the snapshot superblock has zeroed space-map roots)."""
    import re
    return re.sub(r' nr_data_blocks="\d+"', "", xml, count=1)


def run_random(path: Path, seed: int, steps: int, *, real_tools: bool = True) -> Harness:
    rng = random.Random(seed)
    h = Harness(path, real_tools=real_tools)
    next_id = [rng.randrange(0, 100)]
    for _ in range(steps):
        h.random_step(rng, next_id)
        h.verify()
    if h.pmd.held_root:
        h.release()
        h.verify()
    return h
