"""Benchmarks as a library: the device matrix, the CoW lab (block CoW vs file copy-up), the qcow2 peer and the
snapshot-flatness series, each measured against a baseline taken in the same run; plus RESULTS.md and plots.

Layer: tooling above the library (used by the CLI's ``bench`` command and by benchmarks/). May import: everything in
thinpool; matplotlib lazily.

Every number is measured here, on this machine, in this run: ratios are thinpool / raw sparse file for the same
pattern, never against remembered figures.
"""

from __future__ import annotations

import json
import os
import platform
import random
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from thinpool.pool import Pool

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
PHASES = ("provision", "overwrite", "snapshot-break", "already-broken", "read-own", "read-snapshot",
          "read-snap-chain", "read-unprovisioned")
READ_PHASES = ("read-own", "read-snapshot", "read-snap-chain", "read-unprovisioned")
Progress = Callable[[str], None]

# The kernel's dm-thin on the same phases, thinpool-style ratio (dm-thin / raw), as issue 15 quotes it: a reference
# column, NOT measured by this run. (io size, phase) -> (low, high).
KERNEL_ANCHORS: dict[tuple[int, str], tuple[float, float]] = {
    (4 * KiB, "overwrite"): (0.75, 0.75),
    (4 * KiB, "snapshot-break"): (0.66, 0.66),
    (4 * KiB, "provision"): (0.65, 0.65),
    (1 * MiB, "overwrite"): (0.65, 0.79),
}
KERNEL_METHOD = ("Kernel dm-thin reference (not measured in this run; the figures issue 15 quotes): the kernel's "
                 "dm-thin target in a VM under TCG emulation, the same phases, queue depth 1, zeroing on, as a ratio "
                 "to a raw device in the same VM (4 KiB overwrite 0.75, 4 KiB snapshot-break 0.66, 4 KiB provision "
                 "0.65, 1 MiB overwrite 0.65-0.79). Shown next to the cells of the same io size and phase.")

# Issue 15's acceptance goals for the goal cells (thinpool / raw in the same run, median of the rounds).
GOALS: dict[str, float] = {
    **{f"{io} {pat} {ph}": 0.8 for io, pat in (("4K", "rand"), ("1M", "seq")) for ph in READ_PHASES},
    "4K rand overwrite": 0.9,
    "4K rand snapshot-break": 0.75,
    "1M seq provision": 0.9,
    "1M seq overwrite": 0.9,
    "1M seq snapshot-break": 0.6,
}


def _noop(_: str) -> None:
    pass


def kernel_anchor(io_size: int, phase: str) -> str:
    """The kernel dm-thin reference ratio for an io size and phase as text ('' when there is none)."""
    a = KERNEL_ANCHORS.get((io_size, phase))
    if a is None:
        return ""
    return f"{a[0]:.2f}" if a[0] == a[1] else f"{a[0]:.2f}-{a[1]:.2f}"


# ---------------------------------------------------------------------------------------------------------------
# device matrix
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Cell:
    io_size: int
    pattern: str
    phase: str
    chunk: int
    zero: bool
    ops: int
    seconds: float
    raw_seconds: float
    p50_us: float
    p99_us: float
    raw_p50_us: float
    raw_p99_us: float
    write_amp: float
    meta_blocks_per_op: float
    space_used: int
    copied_per_byte: float = 0.0  # bytes copied by copy-on-write per byte written
    ratios: list[float] = field(default_factory=list)  # every round's ratio (this cell is the median round)

    @property
    def iops(self) -> float:
        return self.ops / self.seconds if self.seconds else 0.0

    @property
    def raw_iops(self) -> float:
        return self.ops / self.raw_seconds if self.raw_seconds else 0.0

    @property
    def mbps(self) -> float:
        return self.ops * self.io_size / self.seconds / 1e6 if self.seconds else 0.0

    @property
    def ratio(self) -> float:
        return self.raw_seconds / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(iops=self.iops, raw_iops=self.raw_iops, mbps=self.mbps, ratio=self.ratio)
        return d


def offsets(span: int, io_size: int, pattern: str, seed: int = 1) -> list[int]:
    offs = list(range(0, span, io_size))
    if pattern == "rand":
        random.Random(seed).shuffle(offs)
    return offs


def _timed(ops: Iterable[int], fn: Callable[[int], Any], final: Callable[[], Any]) -> tuple[float, np.ndarray]:
    lat = []
    pc = time.perf_counter_ns
    t0 = pc()
    for off in ops:
        s = pc()
        fn(off)
        lat.append(pc() - s)
    final()
    return (pc() - t0) / 1e9, np.array(lat, dtype=np.int64)


def _pct(lat: np.ndarray, q: float) -> float:
    return float(np.percentile(lat, q) / 1000) if len(lat) else 0.0


class RawFile:
    """The physical limit: the same pattern on a plain sparse file (pwrite/pread, fdatasync at the end)."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        with open(path, "wb") as f:
            f.truncate(size)
        self.fd = os.open(path, os.O_RDWR)

    def write(self, off: int, buf: bytes) -> None:
        os.pwrite(self.fd, buf, off)

    def read(self, off: int, n: int) -> bytes:
        return os.pread(self.fd, n, off)

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


def device_series(workdir: Path, io_size: int, pattern: str, chunk: int, zero: bool, span: int,
                  chain_depth: int = 8) -> list[Cell]:
    """Run every phase of one (io size, pattern, chunk, zeroing) combination, thinpool and raw side by side.

    Writes: provision (fresh device), overwrite (its own chunks), snapshot-break (after a snapshot), already-broken.
    Reads: read-own (the device's own chunks), read-snapshot (a new snapshot of it: shared chunks),
    read-snap-chain (the newest of a chain of ``chain_depth`` snapshots, each link having overwritten 1/16 of the
    chunks with 4 KiB, so its chunks are physically scattered), read-unprovisioned (a device never written).
    Each phase runs on thinpool, then the same offsets on a raw file (a read phase after one untimed pass of
    both, so each reads from the page cache)."""
    pool_dir = workdir / f"pool-{io_size}-{pattern}-{chunk}-{int(zero)}"
    shutil.rmtree(pool_dir, ignore_errors=True)
    raw_fresh = RawFile(workdir / "raw-fresh.img", span)
    raw = RawFile(workdir / "raw.img", span)
    buf = os.urandom(io_size)
    ops = offsets(span, io_size, pattern)
    cells: list[Cell] = []
    data_size = span * 4 + chunk * 4
    with Pool.create(pool_dir, data_size=data_size, chunk_size=chunk, zero=zero) as pool:
        dev = pool.create_thin(1, span)
        fresh = pool.create_thin(2, span)
        next_id = 3

        def measure(phase: str, fn: Callable[[int], Any], raw_fn: Callable[[int], Any], raw_final: Callable[[], Any],
                    final: Callable[[], Any]) -> None:
            if phase[:4] == "read":  # one untimed pass on both sides first: both then read from the page cache
                for off in ops:
                    fn(off)
                    raw_fn(off)
            w0, m0 = pool.data.bytes_written, pool.metadata_blocks_written
            c0 = pool.stats["cow_bytes"]
            secs, lat = _timed(ops, fn, final)
            written = len(ops) * io_size
            wa = (pool.data.bytes_written - w0) / written if phase[:4] != "read" else 0.0
            copied = (pool.stats["cow_bytes"] - c0) / written if phase[:4] != "read" else 0.0
            mb = (pool.metadata_blocks_written - m0) / len(ops)
            rsecs, rlat = _timed(ops, raw_fn, raw_final)
            cells.append(Cell(io_size, pattern, phase, chunk, zero, len(ops), secs, rsecs, _pct(lat, 50),
                              _pct(lat, 99), _pct(rlat, 50), _pct(rlat, 99), wa, mb,
                              pool.nr_allocated_data_blocks * chunk, copied))

        def w(off: int) -> None:
            dev.write(off, buf)

        def rw(off: int) -> None:
            raw.write(off, buf)

        def reads(d: Any) -> Callable[[int], Any]:
            return lambda o: d.read(o, io_size)

        def raw_reads(r: RawFile) -> Callable[[int], Any]:
            return lambda o: r.read(o, io_size)

        def nothing() -> None:
            pass

        measure("provision", w, rw, raw.sync, pool.commit)
        measure("overwrite", w, rw, raw.sync, pool.commit)
        pool.create_snap(next_id, 1)
        next_id += 1
        measure("snapshot-break", w, rw, raw.sync, pool.commit)
        measure("already-broken", w, rw, raw.sync, pool.commit)
        measure("read-own", reads(dev), raw_reads(raw), nothing, nothing)
        snap = pool.create_snap(next_id, 1)
        next_id += 1
        measure("read-snapshot", reads(snap), raw_reads(raw), nothing, nothing)
        top = 1
        small = buf[:4096] if io_size >= 4096 else buf
        for _ in range(chain_depth):
            pool.create_snap(next_id, top)
            top = next_id
            next_id += 1
            link = pool.device(top)
            for off in range(0, span, chunk * 16):
                link.write(off + (top % 16) * chunk, small)
        pool.commit()
        measure("read-snap-chain", reads(pool.device(top)), raw_reads(raw), nothing, nothing)
        measure("read-unprovisioned", reads(fresh), raw_reads(raw_fresh), nothing, nothing)
    raw.close()
    raw_fresh.close()
    shutil.rmtree(pool_dir, ignore_errors=True)
    return cells


def series_rounds(workdir: Path, io_size: int, pattern: str, chunk: int, zero: bool, span: int, rounds: int,
                  chain_depth: int = 8) -> list[Cell]:
    """``device_series`` ``rounds`` times; per phase the round with the median ratio, carrying every round's
    ratio (a shared machine's noise shows as their spread)."""
    runs = [device_series(workdir, io_size, pattern, chunk, zero, span, chain_depth) for _ in range(rounds)]
    out = []
    for i in range(len(runs[0])):
        same = sorted((r[i] for r in runs), key=lambda c: c.ratio)
        cell = same[len(same) // 2]
        cell.ratios = [r[i].ratio for r in runs]
        out.append(cell)
    return out


def device_matrix(workdir: Path, *, quick: bool = False, progress: Progress = _noop) -> list[Cell]:
    span = 4 * MiB if quick else 16 * MiB
    rounds = 1 if quick else 3
    cells: list[Cell] = []
    for chunk in (64 * KiB, 256 * KiB, 1 * MiB):
        for zero in (True, False):
            for io_size in (4 * KiB, 64 * KiB, 1 * MiB):
                for pattern in ("seq", "rand"):
                    progress(f"device io={io_size // KiB}K {pattern} chunk={chunk // KiB}K zero={int(zero)}")
                    cells += series_rounds(workdir, io_size, pattern, chunk, zero, span, rounds)
    return cells


# ---------------------------------------------------------------------------------------------------------------
# goals (larger spans for the cells the goals name)
# ---------------------------------------------------------------------------------------------------------------
def goal_cells(workdir: Path, *, quick: bool = False, progress: Progress = _noop) -> dict[str, Cell]:
    """The cells issue 15's goals name (64 KiB chunks, zeroing on), each the median of several rounds."""
    out: dict[str, Cell] = {}
    rounds = 1 if quick else 5
    progress("goals: 1 MiB sequential")
    for c in series_rounds(workdir, MiB, "seq", 64 * KiB, True, (64 if quick else 256) * MiB, rounds):
        out[f"1M seq {c.phase}"] = c
    progress("goals: 4 KiB random")
    for c in series_rounds(workdir, 4 * KiB, "rand", 64 * KiB, True, (16 if quick else 64) * MiB, rounds):
        out[f"4K rand {c.phase}"] = c
    return out


# ---------------------------------------------------------------------------------------------------------------
# snapshot creation time vs mapped chunks
# ---------------------------------------------------------------------------------------------------------------
def snapshot_series(workdir: Path, sizes: Iterable[int] = (1, 1000, 10_000, 100_000, 1_000_000),
                    progress: Progress = _noop, trials: int = 5) -> list[dict[str, float]]:
    from thinpool.io.block_store import FileBlockStore
    from thinpool.metadata.pool_metadata import PoolMetadata

    rows = []
    for n in sizes:
        progress(f"snapshot of a device with {n} mappings")
        path = workdir / f"snapmeta-{n}.bin"
        with open(path, "wb") as f:
            f.truncate(64 * MiB)
        md = PoolMetadata.format(FileBlockStore(path), data_block_size=128, nr_data_blocks=max(n, 16))
        k = np.arange(n, dtype=np.uint64)
        md.build_device(1, k, k, np.zeros(n, dtype=np.uint64))
        md.commit()
        times = []
        for t in range(trials):
            t0 = time.perf_counter()
            md.create_snap(100 + t, 1)
            md.commit()
            times.append(time.perf_counter() - t0)
        md.close()
        path.unlink()
        rows.append({"mappings": n, "median_s": float(np.median(times)), "min_s": float(min(times))})
    return rows


# ---------------------------------------------------------------------------------------------------------------
# CoW lab: 1-byte change in a file after a snapshot vs file-level copy-up
# ---------------------------------------------------------------------------------------------------------------
COW_SIZES = (4 * KiB, 64 * KiB, 1 * MiB, 16 * MiB, 256 * MiB)


def _cow_thinpool(workdir: Path, size: int, trials: int) -> tuple[float, int]:
    from thinpool import fs as tfs

    pool_dir = workdir / "cowlab-pool"
    shutil.rmtree(pool_dir, ignore_errors=True)
    dev_size = max(64 * MiB, 2 * size + 32 * MiB)
    times, copied = [], []
    with Pool.create(pool_dir, data_size=dev_size * 2 + 16 * MiB * trials, chunk_size=64 * KiB) as pool:
        dev = pool.create_thin(1, dev_size)
        fsys = tfs.mkfs(dev)
        fsys.write_file("/file", os.urandom(size))
        fsys.flush()
        fsys.close()
        for t in range(trials):
            pool.create_snap(10 + t, 1)
            fsys = tfs.mount(pool.device(1))
            w0 = pool.data.bytes_written
            t0 = time.perf_counter()
            with fsys.open("/file", "r+b") as f:
                f.seek(size // 2)
                f.write(b"!")
            fsys.flush()
            times.append(time.perf_counter() - t0)
            copied.append(pool.data.bytes_written - w0)
            fsys.close()
    shutil.rmtree(pool_dir, ignore_errors=True)
    return float(np.median(times)), int(np.median(copied))


def _lower_layer(base: Path, size: int) -> tuple[Path, Path]:
    """A fresh ``base`` holding ``lower/file`` of ``size`` random bytes, synced."""
    shutil.rmtree(base, ignore_errors=True)
    lower = base / "lower"
    lower.mkdir(parents=True)
    with open(lower / "file", "wb") as f:
        f.write(os.urandom(size))
        os.fsync(f.fileno())
    return base, lower


def _cow_copyup(workdir: Path, size: int, trials: int) -> tuple[float, int]:
    """aufs/overlayfs-style copy-up done by hand: copy the whole file from lower to upper, then write."""
    base, lower = _lower_layer(workdir / "copyup", size)
    times = []
    for _ in range(trials):
        upper = base / "upper"
        shutil.rmtree(upper, ignore_errors=True)
        upper.mkdir()
        t0 = time.perf_counter()
        shutil.copyfile(lower / "file", upper / "file")  # copy-up
        with open(upper / "file", "r+b") as f:
            f.seek(size // 2)
            f.write(b"!")
            f.flush()
            os.fsync(f.fileno())
        times.append(time.perf_counter() - t0)
    shutil.rmtree(base, ignore_errors=True)
    return float(np.median(times)), size


def copyup_delete(lower: Path, upper: Path, name: str) -> None:
    """Deleting a lower file in a copy-up union: an aufs-style whiteout marker in the upper layer."""
    (upper / f".wh.{name}").touch()
    (upper / name).unlink(missing_ok=True)


def overlay_available() -> str | None:
    """None if the kernel overlayfs can be used here, else the reason."""
    if os.geteuid() != 0:
        return "not root"
    try:
        with open("/proc/filesystems") as f:
            if "overlay" not in f.read():
                return "overlay not in /proc/filesystems"
    except OSError as e:
        return str(e)
    return None


def _cow_overlay(workdir: Path, size: int, trials: int) -> tuple[float, int]:
    base, lower = _lower_layer(workdir / "ovl", size)
    times, copied = [], []
    for _ in range(trials):
        upper, work, merged = base / "upper", base / "work", base / "merged"
        for d in (upper, work, merged):
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir()
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={lower},upperdir={upper},workdir={work}", str(merged)], check=True,
                       capture_output=True)
        try:
            t0 = time.perf_counter()
            with open(merged / "file", "r+b") as f:
                f.seek(size // 2)
                f.write(b"!")
                f.flush()
                os.fsync(f.fileno())
            times.append(time.perf_counter() - t0)
        finally:
            subprocess.run(["umount", str(merged)], check=False, capture_output=True)
        copied.append(os.stat(upper / "file").st_size)
    shutil.rmtree(base, ignore_errors=True)
    return float(np.median(times)), int(np.median(copied))


def cow_lab(workdir: Path, *, sizes: Iterable[int] = COW_SIZES, trials: int = 3,
            progress: Progress = _noop) -> dict[str, Any]:
    rows = []
    ovl_reason = overlay_available()
    for size in sizes:
        progress(f"cow lab: {size // KiB} KiB file")
        t_thin, b_thin = _cow_thinpool(workdir, size, trials)
        t_cu, b_cu = _cow_copyup(workdir, size, trials)
        row: dict[str, Any] = {"size": size, "thinpool_s": t_thin, "thinpool_bytes": b_thin,
                               "copyup_s": t_cu, "copyup_bytes": b_cu}
        if ovl_reason is None:
            try:
                row["overlay_s"], row["overlay_bytes"] = _cow_overlay(workdir, size, trials)
            except (subprocess.CalledProcessError, OSError) as e:
                ovl_reason = f"overlay mount failed: {e}"
        rows.append(row)
    crossover = next((r["size"] for r in rows if r["thinpool_s"] < r["copyup_s"]), None)
    return {"rows": rows, "crossover_size": crossover, "overlay_skipped": ovl_reason}


# ---------------------------------------------------------------------------------------------------------------
# qcow2 peer
# ---------------------------------------------------------------------------------------------------------------
def _qemu_bench(img: Path, count: int, cache: str) -> float:
    out = subprocess.run(["qemu-img", "bench", "-f", "qcow2", "-w", "-t", cache, "-s", "4096", "-S", "65536",
                          "-c", str(count), "-d", "1", str(img)], check=True, capture_output=True, text=True).stdout
    m = re.search(r"Run completed in ([\d.]+) seconds", out)
    if not m:
        raise RuntimeError(f"unexpected qemu-img bench output: {out!r}")
    return float(m.group(1))


def qcow2_peer(workdir: Path, *, span: int = 64 * MiB, progress: Progress = _noop) -> dict[str, Any] | None:
    """4 KiB, one write per 64 KiB cluster: fresh / allocated / CoW from a backing file, qcow2 vs thinpool."""
    if shutil.which("qemu-img") is None:
        return None
    count = span // (64 * KiB)
    base = workdir / "qcow"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir()
    res: dict[str, Any] = {"span": span, "writes": count}
    progress("qcow2 peer")
    backing = base / "base.raw"
    with open(backing, "wb") as f:
        for _ in range(span // MiB):
            f.write(os.urandom(MiB))
    for cache in ("writeback", "none"):
        img = base / f"img-{cache}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=64k", str(img), str(span)],
                       check=True)
        fresh = _qemu_bench(img, count, cache)
        alloc = _qemu_bench(img, count, cache)
        cow = base / f"cow-{cache}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=64k", "-b", str(backing),
                        "-F", "raw", str(cow), str(span)], check=True)
        cowt = _qemu_bench(cow, count, cache)
        res[f"qcow2_{cache}"] = {"fresh_iops": count / fresh, "allocated_iops": count / alloc,
                                 "cow_iops": count / cowt}
    pool_dir = base / "pool"
    buf = os.urandom(4096)
    ops = list(range(0, span, 64 * KiB))
    with Pool.create(pool_dir, data_size=span * 3, chunk_size=64 * KiB) as pool:
        dev = pool.create_thin(1, span)
        tp = {}
        for phase in ("fresh", "allocated", "cow"):
            if phase == "cow":
                pool.create_snap(2, 1)
            secs, _ = _timed(ops, lambda o: dev.write(o, buf), pool.commit)
            tp[f"{phase}_iops"] = count / secs
        res["thinpool"] = tp
    shutil.rmtree(base, ignore_errors=True)
    return res


# ---------------------------------------------------------------------------------------------------------------
# the whole run, RESULTS.md and plots
# ---------------------------------------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            mem = int(next(ln.split()[1] for ln in f if ln.startswith("MemTotal"))) * 1024
    except (OSError, StopIteration):
        pass
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "cores": os.cpu_count(), "memory_bytes": mem, "numpy": np.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


@dataclass
class BenchRun:
    machine: dict[str, Any]
    cells: list[Cell] = field(default_factory=list)
    goals: dict[str, Cell] = field(default_factory=dict)
    snapshots: list[dict[str, float]] = field(default_factory=list)
    cowlab: dict[str, Any] | None = None
    qcow2: dict[str, Any] | None = None
    scale: dict[str, Any] | None = None  # thinpool_bench.scale (its own RESULTS-scale.md)
    nbd: dict[str, Any] | None = None  # thinpool_bench.nbd_peers: fio over NBD vs C servers (RESULTS-nbd.md)

    def to_dict(self) -> dict[str, Any]:
        return {"machine": self.machine, "cells": [c.to_dict() for c in self.cells],
                "goals": {k: c.to_dict() for k, c in self.goals.items()}, "snapshots": self.snapshots,
                "cowlab": self.cowlab, "qcow2": self.qcow2, "scale": self.scale, "nbd": self.nbd,
                "claims": claims(self)}


SUITE_PARTS = ("device", "goals", "snapshot", "cowlab", "qcow2", "scale", "nbd")


def run_all(*, quick: bool = False, parts: Iterable[str] = ("device", "goals", "snapshot", "cowlab", "qcow2"),
            workdir: str | None = None, progress: Progress = _noop) -> BenchRun:
    parts = set(parts)
    run = BenchRun(machine_info())
    with tempfile.TemporaryDirectory(prefix="thinpool-bench-", dir=workdir) as tmp:
        wd = Path(tmp)
        run.machine["workdir_fs"] = _fs_type(wd)
        if "device" in parts:
            run.cells = device_matrix(wd, quick=quick, progress=progress)
        if "goals" in parts:
            run.goals = goal_cells(wd, quick=quick, progress=progress)
        if "snapshot" in parts:
            sizes = (1, 1000, 10_000, 100_000) if quick else (1, 1000, 10_000, 100_000, 1_000_000)
            run.snapshots = snapshot_series(wd, sizes, progress=progress)
        if "cowlab" in parts:
            sizes = COW_SIZES[:4] if quick else COW_SIZES
            run.cowlab = cow_lab(wd, sizes=sizes, trials=2 if quick else 3, progress=progress)
        if "qcow2" in parts:
            run.qcow2 = qcow2_peer(wd, span=(16 if quick else 64) * MiB, progress=progress)
        if "scale" in parts:
            from thinpool_bench import scale

            run.scale = scale.run_scale(wd, quick=quick, progress=progress)
        if "nbd" in parts:
            from thinpool_bench import nbd_peers

            run.nbd = nbd_peers.run(wd, quick=quick, progress=progress)
    return run


def _fs_type(p: Path) -> str:
    try:
        out = subprocess.run(["stat", "-f", "-c", "%T", str(p)], capture_output=True, text=True).stdout.strip()
        return out or "?"
    except OSError:
        return "?"


def claims(run: BenchRun) -> list[dict[str, Any]]:
    """The claims the project makes, each with the value measured in this run and a verdict."""
    out: list[dict[str, Any]] = []

    def add(claim: str, value: float | None, goal: float, fmt: str = "{:.2f}x") -> None:
        if value is None:
            out.append({"claim": claim, "measured": "not measured", "verdict": "n/a"})
        else:
            out.append({"claim": claim, "measured": fmt.format(value), "value": value,
                        "verdict": "met" if value >= goal else "missed"})

    if run.scale is not None and not (run.cells or run.goals or run.snapshots or run.cowlab or run.qcow2):
        return list(run.scale["claims"])  # a scale-only run: its own goals
    nbd_claims = [] if run.nbd is None else [
        {"claim": c["claim"], "measured": f"{c['ratio']:.2f}x", "value": c["ratio"], "verdict": c["verdict"]}
        for c in run.nbd["claims"]]
    if nbd_claims and not (run.cells or run.goals or run.snapshots or run.cowlab or run.qcow2):
        return nbd_claims  # an nbd-only run: its own goals
    g = run.goals
    for name, goal in GOALS.items():
        c = g.get(name)
        add(f"{name} >= {goal:.2f}x raw", c.ratio if c is not None else None, goal)
    for (io_size, phase), (_, high) in KERNEL_ANCHORS.items():
        name = f"{'4K rand' if io_size == 4 * KiB else '1M seq'} {phase}"
        c = g.get(name)
        add(f"{name} >= the kernel dm-thin ratio ({kernel_anchor(io_size, phase)})", c.ratio if c is not None else None,
            high)
    if run.qcow2:
        q = run.qcow2["qcow2_writeback"]["cow_iops"]
        add("snapshot-break 4 KiB writes >= 1.0x qcow2 CoW-from-backing IOPS (writeback cache)",
            run.qcow2["thinpool"]["cow_iops"] / q, 1.0)
    else:
        add("snapshot-break 4 KiB writes >= 1.0x qcow2 CoW-from-backing IOPS", None, 1.0)
    if run.snapshots:
        base = run.snapshots[0]["median_s"]
        worst = max(r["median_s"] for r in run.snapshots)
        out.append({"claim": f"snapshot create time flat from 1 to {run.snapshots[-1]['mappings']:,} mapped chunks "
                             "(largest / smallest <= 2x)",
                    "measured": f"{worst / base:.2f}x", "value": worst / base,
                    "verdict": "met" if worst / base <= 2.0 else "missed"})
    if run.cowlab:
        rows = run.cowlab["rows"]
        small, large = rows[0], rows[-1]
        out.append({"claim": "small files rewritten favour copy-up (copy-up faster at the smallest size)",
                    "measured": f"copy-up {small['copyup_s'] * 1e3:.2f} ms vs thinpool "
                                f"{small['thinpool_s'] * 1e3:.2f} ms "
                                f"at {small['size'] // KiB} KiB",
                    "verdict": "holds" if small["copyup_s"] < small["thinpool_s"] else "does not hold"})
        out.append({"claim": "large files favour block CoW (thinpool faster at the largest size)",
                    "measured": f"copy-up {large['copyup_s'] * 1e3:.1f} ms vs thinpool "
                                f"{large['thinpool_s'] * 1e3:.1f} ms "
                                f"at {large['size'] // KiB} KiB",
                    "verdict": "holds" if large["thinpool_s"] < large["copyup_s"] else "does not hold"})
    return out + nbd_claims


def _size(n: int) -> str:
    return f"{n // MiB}M" if n >= MiB else f"{n // KiB}K"


def write_results(run: BenchRun, md_path: Path, png_dir: Path | None = None) -> None:
    """RESULTS.md (tables, machine, claims) and PNG plots; a scale part goes to RESULTS-scale.md beside it."""
    if run.scale is not None:
        from thinpool_bench import scale

        scale.write_results(run.scale, md_path.with_name("RESULTS-scale.md"))
        if not (run.cells or run.goals or run.snapshots or run.cowlab or run.qcow2 or run.nbd):
            return  # a scale-only run leaves RESULTS.md alone
    if run.nbd is not None:
        from thinpool_bench import nbd_peers

        nbd_md = md_path.with_name("RESULTS-nbd.md")
        nbd_md.write_text(nbd_peers.report(run.nbd))
        nbd_md.with_suffix(".json").write_text(json.dumps(run.nbd, indent=1))
        if not (run.cells or run.goals or run.snapshots or run.cowlab or run.qcow2):
            return  # an nbd-only run leaves RESULTS.md alone
    lines = ["# thinpool benchmark results", "",
             "Regenerate with `thinpool bench --results benchmarks/RESULTS.md --png benchmarks/results` "
             "(add `--quick` for a short run). Every ratio is thinpool / the same pattern on a raw sparse file "
             "(pwrite/pread, one fdatasync at the end) measured in the same run; thinpool's time includes its "
             "final commit.", "", "## Machine", ""]
    for k, v in run.machine.items():
        lines.append(f"- {k}: {v}")
    lines += ["", "## Claims and verdicts", "", "| claim | measured | verdict |", "|---|---|---|"]
    for cl in claims(run):
        lines.append(f"| {cl['claim']} | {cl['measured']} | {cl['verdict']} |")
    if run.goals:
        rounds = max(len(c.ratios) for c in run.goals.values()) or 1
        lines += ["", "## Goal cells", "",
                  f"64 KiB chunks, zeroing on; each cell is the median of {rounds} rounds (every round: the phase on "
                  "thinpool, then the same offsets on the raw file), the range shows all rounds. Writes include the "
                  "final commit (thinpool) / fdatasync (raw); reads follow one untimed pass over the same offsets "
                  "on both sides. 4 KiB cells: random offsets over the span; 1 MiB cells: sequential. `ratio` (the "
                  "verdict's) is raw time / thinpool time for the whole phase; `p50 ratio` compares the median "
                  "operation, which a shared machine's stalls move less. `copied/B`: bytes copied by copy-on-write "
                  "per byte written.", "",
                  "| cell | goal | kernel dm-thin | ratio | ratio range | verdict | p50 ratio | thinpool p50 µs | "
                  "raw p50 µs | ops | copied/B | write amp | meta blocks/op |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, c in run.goals.items():
            goal = GOALS.get(name)
            verdict = "" if goal is None else "met" if c.ratio >= goal else "missed"
            rng = f"{min(c.ratios):.2f}-{max(c.ratios):.2f}" if c.ratios else ""
            lines.append(f"| {name} | {'' if goal is None else f'{goal:.2f}'} | {kernel_anchor(c.io_size, c.phase)} | "
                         f"{c.ratio:.2f} | {rng} | {verdict} | {c.raw_p50_us / c.p50_us if c.p50_us else 0:.2f} | "
                         f"{c.p50_us:.1f} | {c.raw_p50_us:.1f} | {c.ops} | "
                         f"{c.copied_per_byte:.2f} | {c.write_amp:.2f} | {c.meta_blocks_per_op:.3f} |")
        lines += ["", KERNEL_METHOD]
    if run.qcow2:
        q = run.qcow2
        lines += ["", f"## qcow2 peer (4 KiB, one write per 64 KiB cluster, {q['writes']} writes)", "",
                  "| target | fresh IOPS | allocated IOPS | CoW IOPS |", "|---|---|---|---|"]
        for name in ("thinpool", "qcow2_writeback", "qcow2_none"):
            r = q[name]
            lines.append(f"| {name} | {r['fresh_iops']:,.0f} | {r['allocated_iops']:,.0f} | {r['cow_iops']:,.0f} |")
        lines.append("")
        lines.append("thinpool's figures include a final commit (fdatasync of data and metadata); qemu-img bench "
                     "flushes when it closes the image. `qcow2_none` uses O_DIRECT (cache=none).")
    if run.snapshots:
        lines += ["", "## Snapshot creation time vs mapped chunks (create_snap + commit, median)", "",
                  "| mappings | median ms | min ms |", "|---|---|---|"]
        for r in run.snapshots:
            lines.append(f"| {r['mappings']:,} | {r['median_s'] * 1e3:.2f} | {r['min_s'] * 1e3:.2f} |")
    if run.cowlab:
        cl = run.cowlab
        lines += ["", "## CoW lab: change 1 byte in a file after a snapshot", "",
                  "(a) thinpool: the file on an ext2 filesystem on a thin device, snapshot, 1-byte write + flush "
                  "(commit); (b) copy-up done by hand as aufs/overlayfs do it (whole file to the upper layer, then "
                  "the write + fsync); (c) the kernel overlayfs.", "",
                  "| file size | thinpool ms | thinpool bytes copied | copy-up ms | copy-up bytes | overlayfs ms |",
                  "|---|---|---|---|---|---|"]
        for r in cl["rows"]:
            ov = f"{r['overlay_s'] * 1e3:.2f}" if "overlay_s" in r else "skipped"
            lines.append(f"| {_size(r['size'])} | {r['thinpool_s'] * 1e3:.2f} | {r['thinpool_bytes']:,} | "
                         f"{r['copyup_s'] * 1e3:.2f} | {r['copyup_bytes']:,} | {ov} |")
        lines.append("")
        lines.append(f"Crossover (smallest size where thinpool is faster than copy-up): "
                     f"{_size(cl['crossover_size']) if cl['crossover_size'] else 'none in this range'}.")
        if cl.get("overlay_skipped"):
            lines.append(f"Kernel overlayfs skipped: {cl['overlay_skipped']}.")
    if run.cells:
        rounds = max(len(c.ratios) for c in run.cells) or 1
        lines += ["", "## Device matrix", "",
                  f"Each row is the median of {rounds} round(s) by ratio. `kernel`: the kernel dm-thin reference for "
                  "the same io size and phase (see the goal cells; not measured here). `copied/B`: bytes copied by "
                  "copy-on-write per byte written.", "",
                  "| chunk | zero | io | pattern | phase | IOPS | raw IOPS | ratio | kernel | MB/s | p50 µs | p99 µs | "
                  "write amp | copied/B | meta blk/op | space used |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for c in run.cells:
            kern = kernel_anchor(c.io_size, c.phase) if c.chunk == 64 * KiB and c.zero else ""
            lines.append(f"| {_size(c.chunk)} | {'on' if c.zero else 'off'} | {_size(c.io_size)} | {c.pattern} | "
                         f"{c.phase} | {c.iops:,.0f} | {c.raw_iops:,.0f} | {c.ratio:.2f} | {kern} | {c.mbps:,.0f} | "
                         f"{c.p50_us:.1f} | {c.p99_us:.1f} | {c.write_amp:.2f} | {c.copied_per_byte:.2f} | "
                         f"{c.meta_blocks_per_op:.3f} | {_size(c.space_used) if c.space_used else 0} |")
    if png_dir is not None:
        pngs = plot(run, png_dir)
        if pngs:
            lines += ["", "## Plots", ""]
            rel = os.path.relpath(png_dir, md_path.parent)
            lines += [f"![{p.stem}]({rel}/{p.name})" for p in pngs]
    md_path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines) + "\n"
    if md_path.exists():  # keep the storage-driver lab's section (thinpool bench --only drivers writes it)
        from thinpool_bench.lab.report import BEGIN, END

        old = md_path.read_text()
        if BEGIN in old and END in old:
            text += "\n" + BEGIN + old.split(BEGIN, 1)[1].split(END, 1)[0] + END + "\n"
    md_path.write_text(text)
    (md_path.with_suffix(".json")).write_text(json.dumps(run.to_dict(), indent=1))


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def robust_top(values: list[float], *, floor: float = 1.2) -> float:
    """A y-axis top that one outlier cannot flatten: at most 3x the median (bars above it are cut and labelled)."""
    if not values:
        return floor
    ordered = sorted(values)
    median = ordered[len(ordered) // 2]
    return max(floor, min(max(values), 3 * median) * 1.05)


def snapshot_title(run: BenchRun) -> str:
    """The snapshot plot's title says what the same run's claim says (flat or not), never a fixed 'O(1)'."""
    base = run.snapshots[0]["median_s"]
    worst = max(r["median_s"] for r in run.snapshots)
    ratio = worst / base if base else float("inf")
    verdict = "flat (O(1)): goal met" if ratio <= 2.0 else "not flat: goal missed"
    return f"Snapshot creation, largest / smallest {ratio:.2f}x: {verdict}"


def plot(run: BenchRun, png_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    png_dir.mkdir(parents=True, exist_ok=True)
    out = []
    if run.cells:
        sel = [c for c in run.cells if c.chunk == 64 * KiB and c.zero]
        fig, ax = plt.subplots(figsize=(11, 4.5))
        labels = [f"{_size(c.io_size)} {c.pattern}\n{c.phase}" for c in sel]
        ratios = [c.ratio for c in sel]
        ax.bar(range(len(sel)), ratios, color=["C0" if c.pattern == "seq" else "C1" for c in sel])
        top = robust_top(ratios)
        ax.set_ylim(0, top)
        for i, r in enumerate(ratios):  # a bar past the scale is cut, with its value written on it
            if r > top:
                ax.text(i, top * 0.97, f"{r:.1f}", ha="center", va="top", fontsize=6, rotation=90)
        ax.axhline(1.0, color="k", lw=0.8)
        from matplotlib.patches import Patch

        ax.legend(handles=[Patch(color="C0", label="sequential"), Patch(color="C1", label="random")], fontsize=7)
        ax.set_xticks(range(len(sel)))
        ax.set_xticklabels(labels, rotation=90, fontsize=6)
        ax.set_ylabel("thinpool / raw (higher is better)")
        ax.set_title("Device matrix, 64 KiB chunks, zeroing on")
        out.append(_save(plt, fig, png_dir / "device_matrix.png"))
    if run.cowlab:
        rows = run.cowlab["rows"]
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [r["size"] for r in rows]
        ax.loglog(xs, [r["thinpool_s"] * 1e3 for r in rows], "o-", label="thinpool (block CoW, 64 KiB)")
        ax.loglog(xs, [r["copyup_s"] * 1e3 for r in rows], "s-", label="copy-up (by hand)")
        if all("overlay_s" in r for r in rows):
            ax.loglog(xs, [r["overlay_s"] * 1e3 for r in rows], "^-", label="kernel overlayfs")
        ax.set_xlabel("file size (bytes)")
        ax.set_ylabel("1-byte change after snapshot (ms)")
        ax.legend()
        ax.set_title("Small vs large: block CoW vs copy-up")
        out.append(_save(plt, fig, png_dir / "cowlab.png"))
    if run.snapshots:
        fig, ax = plt.subplots(figsize=(6, 4))
        ms = [r["median_s"] * 1e3 for r in run.snapshots]
        ax.semilogx([max(r["mappings"], 1) for r in run.snapshots], ms, "o-", label="median create_snap + commit")
        ax.set_xlabel("mapped chunks in the origin")
        ax.set_ylabel("create_snap + commit (ms)")
        ax.set_ylim(0, robust_top(ms, floor=2 * ms[0]))
        ax.axhline(2 * ms[0], color="C3", lw=0.8, ls="--", label="goal: <= 2x the smallest")
        ax.legend(fontsize=7)
        ax.set_title(snapshot_title(run))
        out.append(_save(plt, fig, png_dir / "snapshot.png"))
    return out
