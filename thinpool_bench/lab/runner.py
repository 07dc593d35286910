"""The storage-driver lab's workloads: one image, every driver, the same measurements in the same run.

Layer: tooling (thinpool_bench). May import: everything in thinpool.

Metric names carry their unit (``_s`` seconds, ``_us`` microseconds, ``_bytes``, ``_per_s``, ``_inodes``); the
result's ``units`` map says so too. A driver this machine cannot run is ``{"unavailable": "<reason>"}``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from thinpool_bench.lab import drivers as D
from thinpool_bench.lab import image as I

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
Progress = Callable[[str], None]

# a key's unit is that of its longest matching suffix: ``throughput_bytes_per_s`` is bytes per second
UNITS = {"_s": "seconds", "_us": "microseconds", "_bytes": "bytes", "_per_s": "operations per second",
         "_bytes_per_s": "bytes per second", "_inodes": "inodes", "_count": "count",
         "_ratio": "ratio (dimensionless)"}


def _noop(_: str) -> None:
    pass


@dataclass(frozen=True)
class LabConfig:
    """What one run measures; ``quick`` is the under-3-minutes variant."""

    quick: bool
    containers: tuple[int, ...] = (1, 10, 100)
    vfs_max_containers: int = 10  # a full copy each: 100 would be 100 copies of the image
    rewrites: int = 300
    appends: int = 256
    append_bytes: int = 4 * KiB
    page_cache_n: tuple[int, ...] = (1, 2, 4, 10)
    depths: tuple[int, ...] = (1, 2, 5, 10, 20, 50, 100)
    nr_probes: int = 50
    # quick mode measures what does not depend on the chunk size (N=100, lookup depth) on the 64 KiB pool only:
    # thinpool.driver's create/rm make moby's fsync'd records and several pool commits each
    secondary_max_containers: int | None = None
    secondary_lookup: bool = True

    @classmethod
    def make(cls, quick: bool) -> LabConfig:
        """The quick (under 3 minutes) or the full configuration."""
        if quick:
            return cls(True, rewrites=100, appends=64, page_cache_n=(1, 4), depths=(1, 10, 50, 100), nr_probes=30,
                       secondary_max_containers=10, secondary_lookup=False)
        return cls(False)


def all_drivers(workdir: Path, quick: bool) -> list[D.Driver]:
    data = (8 if quick else 24) * GiB
    base = (2 if quick else 8) * GiB
    thin = D.ThinpoolMobyDM if D.moby_driver_available() else D.ThinpoolDM
    secondary = thin(workdir, 512 * KiB, data, base)
    secondary.secondary = True
    return [thin(workdir, 64 * KiB, data, base), secondary,
            D.Overlay(workdir), D.Btrfs(workdir, (4 if quick else 16) * GiB), D.Vfs(workdir), D.AufsLike(workdir)]


def _delta(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: b[k] - a[k] for k in a if k in b}


def measure(drv: D.Driver, img: I.Image, cfg: LabConfig, ref: tuple[I.Tree, set[frozenset[str]]],
            progress: Progress = _noop) -> dict[str, Any]:
    """Every workload on one driver; the driver is torn down afterwards whatever happens."""
    out: dict[str, Any] = {"backend": drv.backend} if hasattr(drv, "backend") else {}
    phases: dict[str, float] = {}
    clock: list[Any] = [time.perf_counter(), "setup"]

    def say(what: str) -> None:
        now = time.perf_counter()
        phases[str(clock[1])] = phases.get(str(clock[1]), 0.0) + now - float(clock[0])
        clock[:] = [now, what.split(",")[0].split(" containers")[0] if what[0].isdigit() else what]
        progress(f"{drv.name}: {what}")

    out["phase_wall_s"] = phases
    try:
        drv.setup()
        u0 = drv.usage()
        say("import")
        t0 = time.perf_counter()
        ids = drv.import_layers("img", img.layers)
        out["import_time_s"] = time.perf_counter() - t0
        u1 = drv.usage()
        out["import_space_bytes"] = u1["space_bytes"] - u0["space_bytes"]
        out["import_host_inodes"] = u1["host_inodes"]
        top = ids[-1]

        # containers: N = 1, 10, 100 (cumulative)
        made: list[str] = []
        out["containers"] = {}
        secondary = getattr(drv, "secondary", False)
        cap = (cfg.vfs_max_containers if isinstance(drv, D.Vfs) else
               cfg.secondary_max_containers or max(cfg.containers) if secondary else max(cfg.containers))
        for n in cfg.containers:
            if n > cap:
                why = (f"{drv.name} makes a full copy of the image per container; capped at {cap}"
                       if isinstance(drv, D.Vfs) else f"quick mode: N={n} is measured on the 64 KiB pool only")
                out["containers"][str(n)] = {"not_measured": why}
                continue
            say(f"{n} containers")
            t0 = time.perf_counter()
            before = len(made)
            while len(made) < n:
                cid = f"c{len(made):03d}"
                drv.create_container(cid, top)
                made.append(cid)
            secs = time.perf_counter() - t0
            u = drv.usage()
            out["containers"][str(n)] = {"create_time_s": secs, "space_bytes": u["space_bytes"],
                                         "space_over_image_bytes": u["space_bytes"] - u1["space_bytes"],
                                         "host_inodes": u["host_inodes"], "created_count": n - before}
        prev = 0
        for n in cfg.containers:  # per-container create time of each batch
            c = out["containers"][str(n)]
            if "create_time_s" in c:
                c["create_time_per_container_s"] = c["create_time_s"] / (n - prev)
                prev = n

        # every container shows the image
        say("tree check")
        view = drv.view(made[0])
        try:
            got, groups = view.tree()
        finally:
            view.close()
        want, want_groups = ref
        diffs = I.diff_trees(want, got)
        if groups != want_groups:
            diffs.append(f"hard-link groups differ: want {sorted(map(sorted, want_groups))}, "
                         f"got {sorted(map(sorted, groups))}")
        out["tree_equal"] = not diffs
        out["tree_entries_count"] = len(got)
        out["tree_diffs"] = diffs[:10]

        c0 = made[0]
        say("first writes")
        out["first_write"] = first_writes(drv, made[1:], img)
        say("small-file rewrites")
        out["rewrite"] = rewrite_loop(drv, c0, img, cfg)
        say("allocate on demand")
        out["alloc_on_demand"] = alloc_on_demand(drv, c0, cfg)
        say("lower read")
        out["lower_read"] = lower_read(drv, made[-1], img)
        out["page_cache"] = {}
        for n in cfg.page_cache_n:
            say(f"page cache, {n} containers")
            cids = made[:n]
            if len(cids) < n:
                out["page_cache"][str(n)] = {"not_measured": f"only {len(made)} containers"}
                continue
            try:
                out["page_cache"][str(n)] = drv.page_cache(cids, img.shared_file)
            except (OSError, RuntimeError) as e:
                out["page_cache"][str(n)] = {"unavailable": f"{type(e).__name__}: {e}"[:300]}
        say("lookup depth")
        if secondary and not cfg.secondary_lookup:
            out["lookup"] = {"not_measured": "quick mode: lookup depth is measured on the 64 KiB pool only"}
        else:
            out["lookup"] = lookup_depth(drv, cfg)
        say("delete")
        u_before = drv.usage()
        t0 = time.perf_counter()
        for cid in made:
            drv.delete_container(cid)
        secs = time.perf_counter() - t0
        u_after = drv.usage()
        out["delete"] = {"containers_count": len(made), "time_s": secs, "time_per_container_s": secs / len(made),
                         "space_before_bytes": u_before["space_bytes"], "space_after_bytes": u_after["space_bytes"],
                         "space_returned_bytes": u_before["space_bytes"] - u_after["space_bytes"],
                         "after_delete_host_inodes": u_after["host_inodes"]}
    except Exception as e:  # noqa: BLE001 - one driver's failure is reported, the others still run
        out["error"] = f"{type(e).__name__}: {e}"[:500]
        out["traceback"] = traceback.format_exc()[-2000:]
    finally:
        say("teardown")
        drv.teardown()
        say("done")
    return out


def first_writes(drv: D.Driver, cids: list[str], img: I.Image) -> dict[str, Any]:
    """1 byte written in the middle of each sized file (a lower-layer file), made durable; each size in its own
    fresh container, so every write is that container's first."""
    res: dict[str, Any] = {}
    for cid, (size, path) in zip(cids, sorted(img.sized_files.items())):
        view = drv.view(cid)
        try:
            mid: dict[str, int] = {}
            thin = isinstance(drv, D.ThinpoolDM)
            if thin:
                view.fs.flush()  # what mounting dirtied is not the write's
                view.after_write = lambda mid=mid: mid.update(drv.counters())  # type: ignore[attr-defined]
            u0 = drv.usage()
            t0 = time.perf_counter()
            view.write_at(path, size // 2, b"!")
            secs = time.perf_counter() - t0
            u1 = drv.usage()
        finally:
            view.close()
        r = {"latency_s": secs, "allocated_bytes": u1["space_bytes"] - u0["space_bytes"]}
        if thin:
            # chunks copied by the write itself (the one under the byte) vs by the ext2's write-back of its own
            # metadata (the inode's new mtime lives in another chunk), and the pool's metadata blocks
            r["data_copied_bytes"] = mid["allocated_bytes"] - u0["allocated_bytes"]
            r["fs_metadata_copied_bytes"] = u1["allocated_bytes"] - mid["allocated_bytes"]
            r["pool_metadata_written_bytes"] = u1["metadata_written_bytes"] - u0["metadata_written_bytes"]
            r["data_store_written_bytes"] = u1["data_written_bytes"] - u0["data_written_bytes"]
            r["copied_bytes"] = r["data_copied_bytes"] + r["fs_metadata_copied_bytes"]
        else:
            r["copied_bytes"] = max(0, r["allocated_bytes"])
        if "fs_used_bytes" in u0:
            r["fs_used_bytes"] = u1["fs_used_bytes"] - u0["fs_used_bytes"]
        res[str(size)] = r
    return res


def rewrite_loop(drv: D.Driver, cid: str, img: I.Image, cfg: LabConfig) -> dict[str, Any]:
    """A 16 KiB file of the image rewritten whole, durably, many times (the first one copies it up)."""
    view = drv.view(cid)
    size = 16 * KiB
    bufs = [os.urandom(size) for _ in range(4)]
    try:
        t0 = time.perf_counter()
        for i in range(cfg.rewrites):
            view.rewrite(img.rewrite_file, bufs[i % 4])
        secs = time.perf_counter() - t0
    finally:
        view.close()
    return {"file_bytes": size, "rewrites_count": cfg.rewrites, "time_s": secs,
            "throughput_per_s": cfg.rewrites / secs, "throughput_bytes_per_s": cfg.rewrites * size / secs}


def alloc_on_demand(drv: D.Driver, cid: str, cfg: LabConfig, reps: int = 3) -> dict[str, Any]:
    """Small durable appends to a new file vs to a preallocated one (median of ``reps`` files each); for
    thinpool also what the appends allocated and how much pool metadata they wrote."""
    view = drv.view(cid)
    piece = os.urandom(cfg.append_bytes)
    thin = isinstance(drv, D.ThinpoolDM)
    times: dict[bool, list[float]] = {False: [], True: []}
    work: dict[bool, dict[str, int]] = {False: {}, True: {}}
    try:
        for rep in range(reps):
            for pre in (False, True):
                marks: list[dict[str, int]] = []
                mark = (lambda marks=marks: marks.append(drv.counters())) if thin else None  # type: ignore[attr-defined]
                times[pre].append(view.appends(f"/data/aod-{'pre' if pre else 'new'}{rep}", piece, cfg.appends,
                                               pre, mark))
                if thin:
                    d = _delta(marks[0], drv.counters())  # type: ignore[attr-defined]
                    for k, v in d.items():
                        work[pre][k] = work[pre].get(k, 0) + v
    finally:
        view.close()
    t_new, t_pre = float(np.median(times[False])), float(np.median(times[True]))
    r: dict[str, Any] = {"appends_count": cfg.appends, "append_bytes": cfg.append_bytes, "files_count": reps,
                         "new_file_per_s": cfg.appends / t_new, "preallocated_per_s": cfg.appends / t_pre,
                         "new_over_preallocated_time_ratio": t_new / t_pre}
    if thin:
        n = reps * cfg.appends
        r["new_file_pool_allocated_per_append_bytes"] = work[False]["allocated_bytes"] / n
        r["preallocated_pool_allocated_per_append_bytes"] = work[True]["allocated_bytes"] / n
        r["new_file_pool_metadata_per_append_bytes"] = work[False]["metadata_written_bytes"] / n
        r["preallocated_pool_metadata_per_append_bytes"] = work[True]["metadata_written_bytes"] / n
    return r


def lower_read(drv: D.Driver, cid: str, img: I.Image) -> dict[str, Any]:
    """Read a lower-layer file whole through a container: what does the read copy or allocate?"""
    view = drv.view(cid)
    try:
        if isinstance(view, D.ThinView):
            view.fs.flush()  # what mounting dirtied is not the read's
        u0 = drv.usage()
        t0 = time.perf_counter()
        n = view.read(img.lower_read_file)
        secs = time.perf_counter() - t0
        u1 = drv.usage()
    finally:
        view.close()
    r = {"file_bytes": n, "time_s": secs, "allocated_bytes": u1["space_bytes"] - u0["space_bytes"]}
    if isinstance(drv, D.ThinpoolDM):
        # every write to the data device counts here: a CoW on read would show as a chunk written
        r["copied_bytes"] = u1["data_written_bytes"] - u0["data_written_bytes"]
        r["pool_allocated_bytes"] = u1["allocated_bytes"] - u0["allocated_bytes"]
    else:
        r["copied_bytes"] = max(0, r["allocated_bytes"])
    if "fs_used_bytes" in u0:
        r["fs_used_bytes"] = u1["fs_used_bytes"] - u0["fs_used_bytes"]
    return r


def lookup_depth(drv: D.Driver, cfg: LabConfig) -> dict[str, Any]:
    """lstat of files that live only in the bottom layer, through a container at each layer depth; each probe
    is looked up once per container (a cold name lookup in that container)."""
    layers = I.depth_layers(max(cfg.depths), cfg.nr_probes)
    ids = drv.import_layers("depth", layers)
    res: dict[str, Any] = {}
    for d in cfg.depths:
        cid = f"depth{d:03d}"
        drv.create_container(cid, ids[d - 1])
        view = drv.view(cid)
        lat = []
        try:
            for i in range(cfg.nr_probes):
                t0 = time.perf_counter_ns()
                view.lstat(f"/probe/p{i:04d}")
                lat.append(time.perf_counter_ns() - t0)
        finally:
            view.close()
        drv.delete_container(cid)
        a = np.array(lat) / 1000
        res[str(d)] = {"median_us": float(np.median(a)), "p90_us": float(np.percentile(a, 90)),
                       "probes_count": cfg.nr_probes}
    return res


TINY = LabConfig(True, containers=(1, 6), vfs_max_containers=6, rewrites=3, appends=4, page_cache_n=(1, 2),
                 depths=(1, 4), nr_probes=5)  # for tests: every workload, in seconds


def run_lab(*, quick: bool = False, workdir: str | None = None, only: tuple[str, ...] = (),
            progress: Progress = _noop, cfg: LabConfig | None = None, img: I.Image | None = None) -> dict[str, Any]:
    """The whole lab: every available driver measured, the unavailable ones named with the reason."""
    from thinpool_bench.suite import machine_info

    cfg = cfg or LabConfig.make(quick)
    img = img or I.build_image(quick=quick)
    t_start = time.perf_counter()
    progress("reference tree")
    ref = I.reference_tree(img.layers + [I.init_layer()])
    result: dict[str, Any] = {"machine": machine_info(), "quick": quick, "units": UNITS,
                              "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
                              "image": {"layers_count": len(img.layers), "files_count": img.nr_files,
                                        "total_bytes": img.bytes_total, "sized_files": img.sized_files,
                                        "shared_file": img.shared_file, "shared_file_bytes": img.shared_bytes,
                                        "reference_entries_count": len(ref[0])},
                              "drivers": {}}
    with tempfile.TemporaryDirectory(prefix="thinpool-lab-", dir=workdir) as tmp:
        wd = Path(tmp)
        result["machine"]["workdir_fs"] = D.run(["stat", "-f", "-c", "%T", str(wd)]).strip()
        for drv in all_drivers(wd, quick):
            if only and drv.name not in only:
                continue
            reason = drv.unavailable()
            if reason:
                result["drivers"][drv.name] = {"unavailable": reason}
                continue
            t0 = time.perf_counter()
            r = measure(drv, img, cfg, ref, progress)
            r["wall_s"] = time.perf_counter() - t0
            result["drivers"][drv.name] = r
        shutil.rmtree(wd, ignore_errors=True)
        os.makedirs(wd, exist_ok=True)
    for name, reason in D.unavailable_kernel_drivers().items():
        result["drivers"].setdefault(name, {"unavailable": reason})
    result["wall_s"] = time.perf_counter() - t_start
    return result
