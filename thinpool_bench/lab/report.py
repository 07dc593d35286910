"""The lab's claims table (each claim of the seed text, the numbers per driver, a verdict), its RESULTS.md
section and its plots.

Layer: tooling (thinpool_bench). May import: everything in thinpool; matplotlib lazily.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

KiB, MiB = 1 << 10, 1 << 20
BEGIN, END = "<!-- lab:begin -->", "<!-- lab:end -->"
THIN = ("thinpool-dm-64k", "thinpool-dm-512k")


def _size(n: float) -> str:
    n = float(n)
    for unit, f in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= f:
            v = n / f
            return f"{v:.3g} {unit}" if abs(v) < 1000 else f"{v:.0f} {unit}"  # never 1.01e+03
    return f"{n:.0f} B"


def _ok(d: dict[str, Any]) -> bool:
    return "unavailable" not in d and "error" not in d


def measured(res: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in res["drivers"].items() if _ok(v)}


def _get(d: dict[str, Any], *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def claims(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Each claim of the seed text (as issue 18 lists them) against this run's numbers."""
    m = measured(res)
    out: list[dict[str, Any]] = []

    def per(fn: Any) -> dict[str, str]:
        vals = {}
        for name, d in m.items():
            try:
                v = fn(d)
            except (KeyError, TypeError, ZeroDivisionError):
                v = None
            if v is not None:
                vals[name] = v
        return vals

    def add(claim: str, numbers: dict[str, str], verdict: str, why: str) -> None:
        out.append({"claim": claim, "measured": numbers, "verdict": verdict, "why": why})

    # 1. block CoW copies a chunk whatever the file size; union drivers copy the whole file
    def fw(d: dict[str, Any]) -> str:
        rows = sorted(d["first_write"].items(), key=lambda kv: int(kv[0]))
        return ", ".join(f"{_size(int(s))}: {_size(r['copied_bytes'])}" for s, r in rows)

    fwn = per(fw)
    thin_const = all(len({r["copied_bytes"] for r in m[t]["first_write"].values()}) == 1 for t in THIN if t in m)
    ovl_grows = "overlayfs" in m and _grows(m["overlayfs"])
    thin_split = ""
    if "thinpool-dm-64k" in m:
        r = next(iter(m["thinpool-dm-64k"]["first_write"].values()))
        thin_split = (f"thinpool-dm-64k copies {_size(r['data_copied_bytes'])} of file data and "
                      f"{_size(r['fs_metadata_copied_bytes'])} for the ext2's inode-table chunk (the new mtime), "
                      f"and writes {_size(r['pool_metadata_written_bytes'])} of pool metadata")
    add("devicemapper copies 64 KiB blocks whatever the file size; aufs/overlayfs copy whole files", fwn,
        "holds with a condition" if thin_const and ovl_grows else "does not hold",
        f"copied bytes for a 1-byte write are constant for thinpool and grow with the file for overlayfs and "
        f"aufs-like. Condition: a chunk is the pool's chunk size (512 KiB pools copy 512 KiB), and the filesystem's "
        f"own metadata write copies a second chunk: {thin_split}.")

    # 2. allocate-on-demand hurts frequent small writes
    aod = per(lambda d: f"{d['alloc_on_demand']['new_over_preallocated_time_ratio']:.2f}x "
                        f"({d['alloc_on_demand']['new_file_per_s']:.0f} vs "
                        f"{d['alloc_on_demand']['preallocated_per_s']:.0f} appends/s)"
                        + (f"; per append: {_size(d['alloc_on_demand']['new_file_pool_metadata_per_append_bytes'])}"
                           f" vs {_size(d['alloc_on_demand']['preallocated_pool_metadata_per_append_bytes'])} "
                           f"pool metadata, {_size(d['alloc_on_demand']['new_file_pool_allocated_per_append_bytes'])}"
                           f" vs {_size(d['alloc_on_demand']['preallocated_pool_allocated_per_append_bytes'])} "
                           "allocated" if "new_file_pool_metadata_per_append_bytes" in d["alloc_on_demand"] else ""))
    thin_r = [m[t]["alloc_on_demand"]["new_over_preallocated_time_ratio"] for t in THIN if t in m]
    thin_meta = [m[t]["alloc_on_demand"]["new_file_pool_metadata_per_append_bytes"]
                 > m[t]["alloc_on_demand"]["preallocated_pool_metadata_per_append_bytes"] for t in THIN if t in m]
    if thin_r and min(thin_r) > 1.2:
        verdict = "holds"
    elif thin_meta and all(thin_meta):
        verdict = "holds with a condition"
    else:
        verdict = "does not hold" if thin_r else "not measured"
    ratios = {n: d["alloc_on_demand"]["new_over_preallocated_time_ratio"] for n, d in m.items()
              if isinstance(_get(d, "alloc_on_demand", "new_over_preallocated_time_ratio"), float | int)}
    others = sorted(n for n, r in ratios.items() if n not in THIN and r > 1.2)
    why = ("median time of durable 4 KiB appends to a new file / to a preallocated one (3 files each); above 1 "
           "means allocation costs. For thinpool each append to a new file also allocates ext2 blocks and, every "
           "chunk, a pool chunk, and its commit writes more pool metadata than an append into preallocated "
           "space.")
    if verdict == "holds with a condition":
        low = ", ".join(f"{t} {ratios[t]:.2f}x" for t in THIN if t in ratios and ratios[t] <= 1.2)
        why += (f" Condition: in time the cost is not clear ({low}: at or under 1.2x, within the run-to-run "
                "spread of fsync on this shared disk); it shows in the pool metadata written per append.")
    if others:
        why += (" Not devicemapper's alone: " + ", ".join(f"{n} {ratios[n]:.2f}x" for n in others)
                + " in the same run.")
    add("frequent small writes suffer from allocate-on-demand (devicemapper)", aod, verdict, why)

    # 3. small-file rewrites slower on devicemapper than on aufs
    rw = per(lambda d: f"{d['rewrite']['throughput_per_s']:.0f}/s")
    t64 = _get(m, "thinpool-dm-64k", "rewrite", "throughput_per_s")
    au = _get(m, "aufs-like", "rewrite", "throughput_per_s")
    ov = _get(m, "overlayfs", "rewrite", "throughput_per_s")
    verdict = "not measured"
    if t64 and au:
        # fsync-bound loops on a shared disk vary by tens of percent from run to run: call only clear gaps
        verdict = ("holds with a condition" if t64 < 0.75 * au else "does not hold" if t64 > 1.33 * au
                   else "does not hold (no clear difference)")
    add("small-file rewrites are slower on devicemapper than on aufs", rw, verdict,
        f"16 KiB file rewritten whole with fsync, {_get(next(iter(m.values()), {}), 'rewrite', 'rewrites_count')} "
        f"times. thinpool {t64 or 0:.0f}/s vs aufs-like {au or 0:.0f}/s, overlayfs {ov or 0:.0f}/s (a gap under "
        "25% is called no clear difference: these fsync-bound loops vary that much between runs here). Note: "
        "thinpool's block layer and ext2 run in Python in user space while the union drivers' writes go to "
        "the host kernel's filesystem, so this measures the implementation as much as the design; after the "
        "first copy-up the union drivers rewrite a plain host file.")

    # 4. page cache: n devicemapper containers keep n copies; overlayfs shares one
    def pc(d: dict[str, Any]) -> str | None:
        rows = [(int(n), r) for n, r in d["page_cache"].items() if "resident_bytes" in r]
        if not rows:
            return None
        return ", ".join(f"N={n}: {_size(r['resident_bytes'])}" for n, r in sorted(rows))

    pcn = per(pc)
    nmax = max((int(n) for d in m.values() for n, r in d.get("page_cache", {}).items() if "resident_bytes" in r),
               default=0)
    t_pc = _get(m, "thinpool-dm-64k", "page_cache", str(nmax), "ext2_files_bytes")
    o_pc = _get(m, "overlayfs", "page_cache", str(nmax), "resident_bytes")
    verdict = "not measured"
    if t_pc is not None and o_pc is not None:
        one = res["image"]["shared_file_bytes"]
        verdict = "holds" if t_pc >= 0.9 * nmax * one and o_pc <= 1.1 * one else "does not hold"
    one = res["image"]["shared_file_bytes"]
    b_pc = _get(m, "btrfs", "page_cache", str(nmax), "container_files_bytes")
    btrfs_txt = "" if b_pc is None or not nmax else (
        f" btrfs snapshots, though they share extents on disk, cache {b_pc / one:.1f} copies for N={nmax}.")
    add("n identical devicemapper containers keep n copies in the page cache; overlayfs shares one", pcn, verdict,
        f"the same {_size(one)} file read in N containers through the kernel, "
        f"resident bytes summed with fincore over "
        f"the files that hold it. thinpool: N kernel ext2 mounts on loop devices over its FUSE export, each "
        f"caching its own copy (plus what the pool's data file holds, read by the FUSE daemon); overlayfs: the "
        f"one lower file." + btrfs_txt)

    # 5. overlay consumes many inodes
    ino = per(lambda d: f"import {d['import_host_inodes']}, "
                        + ", ".join(f"N={n}: {c['host_inodes']}" for n, c in d["containers"].items()
                                    if "host_inodes" in c))
    o_i = _get(m, "overlayfs", "import_host_inodes")
    t_i = _get(m, "thinpool-dm-64k", "import_host_inodes")
    b_i = _get(m, "btrfs", "import_host_inodes")
    verdict = "not measured" if o_i is None else ("holds with a condition" if t_i is None or o_i > 10 * t_i
                                                  else "does not hold")
    add("overlay consumes many inodes", ino, verdict,
        "host inodes (on the filesystem holding the driver's files) after import and N containers. Condition: "
        "overlayfs needs one host inode per file per layer plus a few per container (upper, work, init), so the "
        "count grows with the image, not much with N. thinpool-devicemapper keeps the image in a few pool files; "
        "with thinpool.driver it adds moby's records (metadata/<hash> per device, a JSON per container), a few "
        "inodes per container whatever the image"
        + (f"; btrfs on a loop file uses {b_i} host inodes in all." if b_i is not None else "."))

    # 6. aufs lookups slower with depth
    lk = per(lambda d: None if "not_measured" in d["lookup"] else
             ", ".join(f"d={k}: {v['median_us']:.1f} µs" for k, v in
                       sorted(d["lookup"].items(), key=lambda kv: int(kv[0]))))
    a = _get(m, "aufs-like", "lookup")
    verdict = "not measured"
    if a:
        ds = sorted(a, key=int)
        verdict = "holds" if a[ds[-1]]["median_us"] > 3 * a[ds[0]]["median_us"] else "does not hold"
    add("aufs lookups get slower with layer depth", lk, verdict,
        "lstat of a file that exists only in the bottom layer, once per name, through a container at each depth. "
        "aufs is emulated (a lookup that walks the branches, checking whiteouts at each); the kernel overlayfs "
        "also grows with depth; block drivers (thinpool snapshots, btrfs) and vfs stay flat: a snapshot chain "
        "does not lengthen the lookup.")

    # 7. container start is fast with layered drivers
    st = per(lambda d: ", ".join(f"N={n}: {c['create_time_per_container_s'] * 1e3:.1f} ms" for n, c in
                                 d["containers"].items() if "create_time_per_container_s" in c))
    layered = [n for n in ("overlayfs", "aufs-like", "btrfs") if n in m]
    vfs = _get(m, "vfs", "containers", "1", "create_time_per_container_s")
    worst_layered = max((m[n]["containers"]["1"]["create_time_per_container_s"] for n in layered), default=None)
    verdict = "not measured"
    if worst_layered is not None and vfs is not None:
        verdict = "holds" if worst_layered * 5 < vfs else "does not hold"

    def per_container(name: str) -> list[tuple[int, float]]:
        return sorted((int(n), c["create_time_per_container_s"]) for n, c in
                      (_get(m, name, "containers") or {}).items() if "create_time_per_container_s" in c)

    why = ("time to create a container (an -init layer with moby's initlayer entries, then the rw layer; "
           "overlayfs includes the mount).")
    worst_any = max((t for n in layered for _, t in per_container(n)), default=None)
    if worst_any is not None:
        why += f" {', '.join(layered)}: at most {worst_any * 1e3:.1f} ms per container at any N"
        why += f"; vfs {vfs * 1e3:.0f} ms at N=1 (it copies the image twice, init and rw)." if vfs else "."
    for t in THIN:
        rows = per_container(t)
        if rows:
            (n0, a), (n1, b) = rows[0], rows[-1]
            why += (f" {t}: {a * 1e3:.0f} ms at N={n0}, {b * 1e3:.0f} ms at N={n1}"
                    + (f" ({b / a:.1f}x: the create time grows with the number of devices)" if b > 1.5 * a else "")
                    + ".")
    why += (" A dm-thin snapshot is O(1) in metadata (it shares the origin's mapping tree); a create through "
            "thinpool.driver also mounts the -init device's ext2 in Python, writes the initlayer entries and moby's "
            "records with fsync and commits the pool several times (moby's transaction protocol).")
    add("container start is fast with layered drivers", st, verdict, why)

    # 8. devicemapper copies a block on read
    rd = per(lambda d: f"{_size(d['lower_read']['copied_bytes'])} copied, "
                       f"{_size(d['lower_read']['allocated_bytes'])} allocated")
    t_rd = [m[t]["lower_read"]["copied_bytes"] for t in THIN if t in m]
    verdict = "not measured" if not t_rd else ("does not hold" if max(t_rd) == 0 else "holds")
    add("devicemapper copies a block on read", rd, verdict,
        "a 1 MiB lower-layer file read whole through a container: dm-thin (and thinpool) maps reads of shared "
        "chunks to the shared data; nothing is written or allocated. (btrfs's host space can grow on a first "
        "read: relatime updates the atime, a metadata CoW.)")
    return out


def _grows(d: dict[str, Any]) -> bool:
    rows = sorted(((int(s), r["copied_bytes"]) for s, r in d["first_write"].items()))
    return all(b >= s for s, b in rows) and rows[-1][1] > 10 * rows[0][1]


def markdown(res: dict[str, Any], png_rel: str | None = None) -> str:
    m = measured(res)
    mach = res["machine"]
    img = res["image"]
    lines = [BEGIN, "", "## Storage-driver lab (issue 18)", "",
             f"Regenerate with `thinpool bench --only drivers{' --quick' if res['quick'] else ''} "
             "--results benchmarks/RESULTS.md --png benchmarks/results` (root for the kernel drivers). "
             f"Run of {mach.get('date')} on {mach.get('cores')} cores ({mach.get('cpu')}), work directory on "
             f"{mach.get('workdir_fs')}, {'quick' if res['quick'] else 'full'} mode, {res['wall_s']:.0f} s in all. "
             f"One image: {img['layers_count']} layers, {img['files_count']:,} files, {_size(img['total_bytes'])} "
             "(small files, files of "
             + ", ".join(_size(int(s)) for s in img["sized_files"])
             + ", hard links, symlinks, whiteouts, an opaque directory, a deleted directory).", "",
             "| driver | status |", "|---|---|"]
    for name, d in res["drivers"].items():
        if "unavailable" in d:
            lines.append(f"| {name} | unavailable: {d['unavailable']} |")
        elif "error" in d:
            lines.append(f"| {name} | failed: {d['error']} |")
        else:
            lines.append(f"| {name} | measured; container tree equals the image's reference tree: "
                         f"{'yes' if d['tree_equal'] else 'NO'} ({d['tree_entries_count']} entries) |")
    lines += ["", "### Claims of the seed text", "", "| claim | measured | verdict |", "|---|---|---|"]
    for c in claims(res):
        meas = "<br>".join(f"{k}: {v}" for k, v in c["measured"].items())
        lines.append(f"| {c['claim']} | {meas} | **{c['verdict']}**: {c['why']} |")
    lines += ["", "### Numbers per driver", "",
              "| driver | import s | import space | host inodes | create ms per container (N=1/10/100) "
              "| space over image "
              "| rewrite 16K /s | lower read copied | delete ms | space returned |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for name, d in m.items():
        cr = "/".join(f"{c['create_time_per_container_s'] * 1e3:.1f}" if "create_time_per_container_s" in c
                      else "-" for c in d["containers"].values())
        big_n = max(int(n) for n, c in d["containers"].items() if "space_over_image_bytes" in c)
        big = d["containers"][str(big_n)]
        lines.append(f"| {name} | {d['import_time_s']:.2f} | {_size(d['import_space_bytes'])} | "
                     f"{d['import_host_inodes']} | {cr} | {_size(big['space_over_image_bytes'])} (N={big_n}) | "
                     f"{d['rewrite']['throughput_per_s']:.0f} | {_size(d['lower_read']['copied_bytes'])} | "
                     f"{d['delete']['time_per_container_s'] * 1e3:.1f} | "
                     f"{_size(d['delete']['space_returned_bytes'])} |")
    lines += ["", "First write of 1 byte (latency ms / bytes copied):", "",
              "| driver | " + " | ".join(_size(int(s)) for s in img["sized_files"]) + " |",
              "|---|" + "---|" * len(img["sized_files"])]
    for name, d in m.items():
        cells = [f"{r['latency_s'] * 1e3:.2f} / {_size(r['copied_bytes'])}"
                 for _, r in sorted(d["first_write"].items(), key=lambda kv: int(kv[0]))]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if png_rel is not None:
        lines += ["", "### Plots", ""] + [f"![{p}]({png_rel}/lab_{p}.png)" for p in
                                          ("first_write", "page_cache", "space", "lookup")]
    lines += ["", "Every number above was measured in this run on this machine, while other work shared it; "
              "RESULTS-drivers.json beside this file holds them all, with units in the key names.", "", END]
    return "\n".join(lines)


def write(res: dict[str, Any], md_path: Path, png_dir: Path | None = None) -> None:
    """Put the lab section into ``md_path`` (replacing an earlier one, keeping the rest), the JSON beside it,
    and the plots into ``png_dir``."""
    rel = None
    if png_dir is not None:
        plot(res, png_dir)
        rel = os.path.relpath(png_dir, md_path.parent)
    section = markdown(res, rel)
    text = md_path.read_text() if md_path.exists() else "# thinpool benchmark results\n"
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(replace_section(text, section))
    (md_path.parent / "RESULTS-drivers.json").write_text(json.dumps(res, indent=1, default=str) + "\n")


def replace_section(text: str, section: str) -> str:
    if BEGIN in text and END in text:
        pre, rest = text.split(BEGIN, 1)
        post = rest.split(END, 1)[1]
        return pre + section + post
    return text.rstrip("\n") + "\n\n" + section + "\n"


def plot(res: dict[str, Any], png_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    png_dir.mkdir(parents=True, exist_ok=True)
    m = measured(res)
    out = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        p = png_dir / f"lab_{name}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        out.append(p)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, d in m.items():
        rows = sorted((int(s), r) for s, r in d["first_write"].items())
        xs = [s for s, _ in rows]
        ax1.loglog(xs, [r["latency_s"] * 1e3 for _, r in rows], "o-", label=name)
        ax2.loglog(xs, [max(r["copied_bytes"], 1) for _, r in rows], "o-", label=name)
    ax1.set(xlabel="file size (bytes)", ylabel="1-byte first write, durable (ms)", title="First-write latency")
    ax2.set(xlabel="file size (bytes)", ylabel="bytes copied (log; 1 = none)", title="Bytes copied by it")
    ax1.legend(fontsize=7)
    save(fig, "first_write")

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, d in m.items():
        rows = sorted((int(n), r["resident_bytes"]) for n, r in d["page_cache"].items() if "resident_bytes" in r)
        if rows:
            ax.plot([n for n, _ in rows], [b / MiB for _, b in rows], "o-", label=name)
    ax.set(xlabel="containers reading the same 32 MiB file", ylabel="resident page cache (MiB)",
           title="Page cache vs N")
    ax.legend(fontsize=7)
    save(fig, "page_cache")

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, d in m.items():
        rows = [(0, d["import_space_bytes"])] + sorted(
            (int(n), d["import_space_bytes"] + c["space_over_image_bytes"]) for n, c in d["containers"].items()
            if "space_over_image_bytes" in c)
        ax.plot([n for n, _ in rows], [b / MiB for _, b in rows], "o-", label=name)
    ax.set(xlabel="containers", ylabel="host space used (MiB)", yscale="log", title="Space vs N (image + containers)")
    ax.legend(fontsize=7)
    save(fig, "space")

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, d in m.items():
        if "not_measured" in d["lookup"]:
            continue
        rows = sorted((int(k), v["median_us"]) for k, v in d["lookup"].items())
        ax.plot([k for k, _ in rows], [v for _, v in rows], "o-", label=name)
    ax.set(xlabel="layer depth", ylabel="lstat, first lookup (µs, median)", yscale="log",
           title="Lookup latency vs depth")
    ax.legend(fontsize=7)
    save(fig, "lookup")
    return out
