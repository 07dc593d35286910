"""`thinpool bench --only scale`: what an operation costs as the pool, the mapping count and the device count grow,
with the C++ (0.9.0) and the Rust (pdata_tools 1.x) metadata tools on the same metadata in the same run.

Layer: tooling above the library (used by ``thinpool_bench.suite.run_all`` and the ``bench`` command). May import:
everything in thinpool (a bulk-built fixture reaches ``Pool.md``, as benchmarks/ do).

Three parts, every number measured in this run on this machine:

- **pool size**: the same commands (pool create, thin create, thin write 4 KiB (+ commit), thin read 4 KiB, thin
  snap, pool status) on an empty pool of 1 GiB, 1 TiB and (without ``--quick``) 8 TiB, each a whole ``thinpool``
  process; time ratio to 1 GiB and peak RSS (``os.wait4``'s rusage of that child alone). Rounds interleave the
  sizes; medians.
- **mappings**: a pool whose device 1 maps N chunks to data blocks in random order (every mapping its own run:
  thin_dump's worst case) and device 2, a snapshot of it with 1 % of its chunks rewritten; N = 10k and 100k with
  ``--quick``, 10k / 1M / 4M without. Whole processes: open + read, write + commit, snapshot, status, then check,
  dump, ls (default fields and EXCLUSIVE/SHARED), delta 1 2, rmap of a quarter of the data blocks, restore (of
  thin_dump's XML) and repair, thinpool, the C++ tool and the Rust tool interleaved per round; thinpool's output
  compared with the C++ tool's byte for byte (restore: both results dumped; repair: their mappings) and with the
  Rust tool's as far as their formats agree (dump: the same mappings per device, 1.x writing shared subtrees once
  as <def>/<ref>; ls: ``0b`` for ``0``; delta: no final newline; rmap: the same lines in another order; restore and
  repair as for C++); last the deletes of the snapshot and of the origin, and both thin_checks of what they left.
  A command whose first round takes over a minute is not repeated (0.9.0's thin_restore/thin_repair at 4M).
- **devices**: ``Pool.create_snap`` and ``delete_thin`` (in process) in a pool of 1 / 1,000 / 10,000 devices
  (1 / 100 / 1,000 with ``--quick``).

The Rust tools are looked for in $THINPOOL_RUST_TOOLS (default /opt/thin-provisioning-tools-rust/usr/sbin, where
.ci/run unpacks Debian trixie's thin-provisioning-tools 1.1.0); without them their column says "not installed".
Rust thin_check 1.1.0 never takes less than 0.5 s: its progress thread sleeps 500 ms and is joined at the end.

``python -m thinpool_bench.scale --only-tools --mappings 4000000 --results benchmarks/RESULTS-scale.md`` runs only
the mappings part (its pool steps, the metadata tools, the deletes; no pool-size or devices part) and writes its
report on top of the existing one, which it keeps below.
"""

from __future__ import annotations

import filecmp
import hashlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from thinpool.pool import Pool

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
CH = 64 * KiB
Progress = Callable[[str], None]

POOL_SIZES_QUICK = (GiB, TiB)
POOL_SIZES = (GiB, TiB, 8 * TiB)
MAPPINGS_QUICK = (10_000, 100_000)
MAPPINGS = (10_000, 1_000_000, 4_000_000)
DEVICES_QUICK = (1, 10, 100, 1000)
DEVICES = (1, 10, 1000, 10_000)  # the goal's baseline is 10 devices (issue 13); 1 is reported beside it
RSS_GOAL_MB = 100.0
SPEED_GOALS = ("check", "dump", "ls", "ls EXCLUSIVE,SHARED", "delta 1 2")  # to beat the C++ tools at
RUST_TOOLS_DEFAULT = "/opt/thin-provisioning-tools-rust/usr/sbin"
SLOW_ROUND_S = 60.0  # a command whose first round took longer is not repeated


def _noop(_: str) -> None:
    pass


def which(name: str) -> str | None:
    """A program on PATH, or in /usr/sbin or /sbin (where Debian puts the thin_* tools)."""
    found = shutil.which(name)
    if found:
        return found
    for d in ("/usr/sbin", "/sbin"):
        p = os.path.join(d, name)
        if os.access(p, os.X_OK):
            return p
    return None


def rust_dir() -> Path:
    return Path(os.environ.get("THINPOOL_RUST_TOOLS") or RUST_TOOLS_DEFAULT)


def rust_which(name: str) -> str | None:
    """A Rust pdata_tools program (thin_check, ...) in $THINPOOL_RUST_TOOLS, if it is there and is 1.x."""
    p = rust_dir() / name
    if not os.access(p, os.X_OK) or _rust_version() is None:
        return None
    return str(p)


def _rust_version() -> str | None:
    p = rust_dir() / "thin_check"
    if not os.access(p, os.X_OK):
        return None
    r = subprocess.run([str(p), "-V"], capture_output=True, text=True)
    v = (r.stdout or r.stderr).strip()
    return None if not v or v.startswith("0.") else v


def thinpool_cmd() -> list[str]:
    """The ``thinpool`` command of this interpreter's environment."""
    exe = Path(sys.executable).parent / "thinpool"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("thinpool")
    return [found] if found else [sys.executable, "-c", "from thinpool_cli.main import main; main()"]


GNU_TIME = "/usr/bin/time"


def run_measured(cmd: Sequence[str], *, stdout: Path | None = None, stdin: Path | None = None) -> dict[str, Any]:
    """Run ``cmd`` to completion: wall seconds, its peak RSS (MB) and its exit status.

    The RSS comes from GNU time (``%M``) when installed: a child forked from this (large) process carries this
    process's resident set until it execs, and wait4's ru_maxrss keeps that high-water mark, so wait4 alone
    overstates small tools (thin_ls's 5 MB read as ~45 MB). Without GNU time, wait4's figure is reported, marked
    as an upper bound.
    """
    out = open(stdout, "wb") if stdout is not None else subprocess.DEVNULL
    inp = open(stdin, "rb") if stdin is not None else subprocess.DEVNULL
    gnu = os.access(GNU_TIME, os.X_OK)
    rss_file = Path(tempfile.mkstemp(prefix="thinpool-rss-")[1]) if gnu else None
    full = [GNU_TIME, "-f", "%M", "-o", str(rss_file), *cmd] if rss_file is not None else list(cmd)
    try:
        t0 = time.perf_counter()
        p = subprocess.Popen(full, stdout=out, stdin=inp, stderr=subprocess.PIPE)
        assert p.stderr is not None
        err = p.stderr.read()
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        p.stderr.close()
        rss_mb = usage.ru_maxrss / 1024
        if rss_file is not None:
            lines = rss_file.read_text().split()
            if lines and lines[-1].isdigit():
                rss_mb = int(lines[-1]) / 1024
    finally:
        for f in (out, inp):
            if not isinstance(f, int):
                f.close()
        if rss_file is not None:
            rss_file.unlink(missing_ok=True)
    return {"s": wall, "rss_mb": rss_mb, "rss_exact": gnu, "rc": p.returncode,
            "stderr": err.decode(errors="replace").strip().splitlines()[-1:] if p.returncode else []}


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"s": statistics.median(r["s"] for r in runs), "rss_mb": max(r["rss_mb"] for r in runs),
            "rss_exact": all(r["rss_exact"] for r in runs), "rounds": len(runs),
            "failed": [r["stderr"] for r in runs if r["rc"] != 0]}


def _size_label(n: int) -> str:
    return f"{n // TiB} TiB" if n >= TiB else f"{n // GiB} GiB"


# --- pool size ------------------------------------------------------------------------------------------------
POOL_STEPS = ("pool create", "thin create", "thin write 4 KiB + commit", "thin read 4 KiB", "thin snap",
              "pool status")


def pool_size_part(wd: Path, sizes: Sequence[int], rounds: int, progress: Progress) -> dict[str, Any]:
    tp = thinpool_cmd()
    src = wd / "4k.bin"
    src.write_bytes(os.urandom(4 * KiB))
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {_size_label(s): {k: [] for k in POOL_STEPS} for s in sizes}
    for r in range(rounds):
        for size in sizes:
            label = _size_label(size)
            progress(f"scale: pool size {label}, round {r + 1}/{rounds}")
            d = wd / f"pool-{size}"
            cmds = {"pool create": [*tp, "pool", "create", str(d), "--size", str(size)],
                    "thin create": [*tp, "thin", "create", "1", "--size", "1G", "-p", str(d)],
                    "thin write 4 KiB + commit": [*tp, "thin", "write", "1", str(src), "--offset", "64k", "-p",
                                                  str(d)],
                    "thin read 4 KiB": [*tp, "thin", "read", "1", "--offset", "64k", "--length", "4k",
                                        "--output", os.devnull, "-p", str(d)],
                    "thin snap": [*tp, "thin", "snap", "2", "1", "-p", str(d)],
                    "pool status": [*tp, "pool", "status", str(d)]}
            try:
                for step in POOL_STEPS:
                    runs[label][step].append(run_measured(cmds[step]))
            finally:
                shutil.rmtree(d, ignore_errors=True)
    table: dict[str, Any] = {}
    base = _size_label(sizes[0])
    for label, steps in runs.items():
        table[label] = {}
        for step, rs in steps.items():
            m = _median(rs)
            b = statistics.median(x["s"] for x in runs[base][step])
            m["ratio"] = m["s"] / b if b else None
            table[label][step] = m
    return {"sizes": [_size_label(s) for s in sizes], "steps": list(POOL_STEPS), "table": table}


# --- mappings -------------------------------------------------------------------------------------------------
def build_mapping_pool(path: Path, n: int, seed: int = 1) -> None:
    """Device 1 maps thin blocks 0..n-1 to a random permutation of data blocks; device 2 is a snapshot of it with
    1 % of its blocks (at random) remapped to new data blocks. Built in bulk through the metadata."""
    rng = np.random.default_rng(seed)
    extra = max(n // 100, 1)
    # metadata for two full trees (the snapshot's rewrites copy nearly every leaf) and room to change them
    md_bytes = -(-(n * 128 + (16 << 20)) // 4096) * 4096
    with Pool.create(path, data_size=(n + extra + 1024) * CH, chunk_size=CH, metadata_size=md_bytes) as p:
        p.create_thin(1, n * CH)
        md = p.md
        md.delete_thin(1)  # the manifest entry stays; the tree is rebuilt in bulk under the same id
        md.build_device(1, np.arange(n, dtype=np.uint64), rng.permutation(n).astype(np.uint64),
                        np.zeros(n, dtype=np.uint64))
        p.commit()
        p.create_snap(2, 1)
        for tb in np.sort(rng.choice(n, extra, replace=False)).tolist():
            md.insert(2, tb, md.alloc_data_block())
        p.commit()


Compare = Callable[[Path, Path], "bool | None"]


def _same_stdout(a: Path, b: Path) -> bool:
    return filecmp.cmp(a, b, shallow=False)


def _dump_digest(md: Path, *, mappings_only: bool = False) -> str | None:
    """sha256 of thin_dump's XML of ``md`` (only its mapping lines with ``mappings_only``); None without
    thin_dump or when it fails."""
    exe = which("thin_dump")
    if exe is None:
        return None
    h = hashlib.sha256()
    with subprocess.Popen([exe, str(md)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) as p:
        assert p.stdout is not None
        for line in p.stdout:
            if not mappings_only or b"_mapping " in line:
                h.update(line)
    return h.hexdigest() if p.returncode == 0 else None


# --- comparing with the Rust tools' output (their formats differ from 0.9.0's in the ways listed above) --------
_XML_ATTR = re.compile(rb'(\w+)="([^"]*)"')
_M64 = (1 << 64) - 1


_SINGLE_RE = re.compile(rb'<single_mapping origin_block="(\d+)" data_block="(\d+)" time="(\d+)"/>')
_RANGE_RE = re.compile(rb'<range_mapping origin_begin="(\d+)" data_begin="(\d+)" length="(\d+)" time="(\d+)"/>')
_FLUSH = 1 << 20  # mappings parsed per numpy step


def _mix(thin: np.ndarray, data: np.ndarray, times: np.ndarray) -> int:
    """An order-free digest of mappings: the sum (mod 2**64) of a 64-bit mix of each (thin, data, time)."""
    with np.errstate(over="ignore"):
        x = thin * np.uint64(0x9E3779B97F4A7C15) ^ data * np.uint64(0xC2B2AE3D27D4EB4F) ^ \
            times * np.uint64(0x165667B19E3779F9)
        x ^= x >> np.uint64(29)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(32)
        return int(x.sum(dtype=np.uint64))


class _Acc:
    """The running digest of one device's (or <def>'s) mappings, parsed a batch at a time."""

    def __init__(self) -> None:
        self.total = 0
        self.singles: list[bytes] = []
        self.ranges: list[tuple[int, int, int, int]] = []

    def flush(self) -> int:
        if self.singles:
            v = np.array(self.singles, dtype=np.uint64).reshape(-1, 3)
            self.total += _mix(v[:, 0], v[:, 1], v[:, 2])
            self.singles.clear()
        for o, d, n, t in self.ranges:
            r = np.arange(n, dtype=np.uint64)
            self.total += _mix(r + np.uint64(o), r + np.uint64(d), np.full(n, t, dtype=np.uint64))
        self.ranges.clear()
        self.total &= _M64
        return self.total


def _xml_digest(path: Path) -> str:
    """A digest of a thin_dump XML file that both tools' layouts give alike: the superblock's and each device's
    attributes (flags="0" written or not) and each device's set of (thin, data, time) blocks, with 1.x's <def>
    subtrees counted at each <ref>. Memory: one integer per <def>, and a batch of parsed mappings."""
    h = hashlib.sha256()
    defs: dict[bytes, int] = {}
    acc = _Acc()
    def_name: bytes | None = None
    devices: list[tuple[bytes, int]] = []
    dev_head = b""
    with open(path, "rb") as f:
        for line in f:
            m = _SINGLE_RE.search(line)
            if m is not None:
                acc.singles += m.groups()
                if len(acc.singles) >= 3 * _FLUSH:
                    acc.flush()
                continue
            m = _RANGE_RE.search(line)
            if m is not None:
                o, d, n, t = (int(x) for x in m.groups())
                acc.ranges.append((o, d, n, t))
                if len(acc.ranges) >= 1024:
                    acc.flush()
                continue
            s = line.strip()
            attrs = dict(_XML_ATTR.findall(s))
            if s.startswith(b"<ref "):
                acc.total = (acc.total + defs[attrs[b"name"]]) & _M64
            elif s.startswith(b"<def "):
                def_name, acc = attrs[b"name"], _Acc()
            elif s.startswith(b"</def>"):
                assert def_name is not None
                defs[def_name], def_name = acc.flush(), None
            elif s.startswith(b"<device "):
                dev_head, acc = b" ".join(k + b"=" + v for k, v in sorted(attrs.items())), _Acc()
            elif s.startswith(b"</device>"):
                devices.append((dev_head, acc.flush()))
            elif s.startswith(b"<superblock "):
                attrs.setdefault(b"flags", b"0")
                h.update(b" ".join(k + b"=" + v for k, v in sorted(attrs.items())) + b"\n")
            elif s and not s.startswith(b"</superblock>"):
                raise ValueError(f"unexpected line in thin_dump XML: {s[:80]!r}")
    for head, total in sorted(devices):
        h.update(head + b" %d\n" % total)
    return h.hexdigest()


def _same_dump_rust(a: Path, b: Path) -> bool:
    return _xml_digest(a) == _xml_digest(b)


def _same_ls_rust(a: Path, b: Path) -> bool:
    def tokens(p: Path) -> list[list[bytes]]:
        return [[b"0" if t == b"0b" else t for t in ln.split()] for ln in p.read_bytes().splitlines()]
    return tokens(a) == tokens(b)


def _same_delta_rust(a: Path, b: Path) -> bool:
    return a.read_bytes() == b.read_bytes() + b"\n"


def _same_rmap_rust(a: Path, b: Path) -> bool:
    return sorted(a.read_bytes().splitlines()) == sorted(b.read_bytes().splitlines())


@dataclass(frozen=True)
class ToolCase:
    """One tool: thinpool's command, the C++ and Rust tools' (None when not installed), how to compare outputs."""

    name: str
    ours: list[str]
    cpp: list[str] | None
    rust: list[str] | None
    cmp_cpp: Compare | None
    cmp_rust: Compare | None


def _tool_cases(tp: list[str], md: str, wd: Path, n: int) -> list[ToolCase]:
    """Every tool of the mappings part, on the metadata ``md``."""
    names = ("thin_check", "thin_dump", "thin_ls", "thin_delta", "thin_rmap", "thin_restore", "thin_repair")
    cc = {t: which(t) for t in names}
    rr = {t: rust_which(t) for t in names}

    def real(tool: str, *args: str) -> list[str] | None:
        exe = cc[tool]
        return [exe, *args] if exe else None

    def rust(tool: str, *args: str) -> list[str] | None:
        exe = rr[tool]
        return [exe, *args] if exe else None

    xml, mine, theirs, rust_out, rep_mine, rep_theirs, rep_rust = (
        str(wd / x) for x in ("src.xml", "restored-ours.bin", "restored-cpp.bin", "restored-rust.bin",
                              "repaired-ours.bin", "repaired-cpp.bin", "repaired-rust.bin"))
    with open(xml, "wb") as f:  # the restore input: the same XML for all (not timed)
        subprocess.run(real("thin_dump", md) or [*tp, "dump", md], stdout=f, check=True)
    size = os.path.getsize(md)
    for out in (mine, theirs, rust_out, rep_mine, rep_theirs, rep_rust):
        with open(out, "wb") as f:
            f.truncate(size)

    def same_digest(x: str | None, y: str | None) -> bool | None:
        return None if x is None or y is None else x == y

    def restored_same(other: str) -> Compare:
        return lambda _a, _b: same_digest(_dump_digest(Path(mine)), _dump_digest(Path(other)))

    def repaired_same(other: str) -> Compare:
        # repair marks devices sharing data with a newer snapshot time (on purpose): the mappings must match
        return lambda _a, _b: same_digest(_dump_digest(Path(rep_mine), mappings_only=True),
                                          _dump_digest(Path(other), mappings_only=True))

    region = f"0..{max(n // 4, 1)}"
    ls_fields = ("-o", "DEV,MAPPED,EXCLUSIVE,SHARED")
    return [ToolCase("check", [*tp, "check", md], real("thin_check", md), rust("thin_check", md), None, None),
            ToolCase("dump", [*tp, "dump", md], real("thin_dump", md), rust("thin_dump", md), _same_stdout,
                     _same_dump_rust),
            ToolCase("ls", [*tp, "ls", md], real("thin_ls", md), rust("thin_ls", md), _same_stdout, _same_ls_rust),
            ToolCase("ls EXCLUSIVE,SHARED", [*tp, "ls", *ls_fields, md], real("thin_ls", *ls_fields, md),
                     rust("thin_ls", *ls_fields, md), _same_stdout, _same_ls_rust),
            ToolCase("delta 1 2", [*tp, "delta", "1", "2", md], real("thin_delta", "--snap1", "1", "--snap2", "2", md),
                     rust("thin_delta", "--snap1", "1", "--snap2", "2", md), _same_stdout, _same_delta_rust),
            ToolCase(f"rmap {region}", [*tp, "rmap", "--region", region, md],
                     real("thin_rmap", "--region", region, md), rust("thin_rmap", "--region", region, md),
                     _same_stdout, _same_rmap_rust),
            ToolCase("restore", [*tp, "restore", "-i", xml, "-o", mine, "-q", "-f"],
                     real("thin_restore", "-i", xml, "-o", theirs, "-q"),
                     rust("thin_restore", "-i", xml, "-o", rust_out, "-q"), restored_same(theirs),
                     restored_same(rust_out)),
            ToolCase("repair", [*tp, "pool", "repair", md, rep_mine, "-f"],
                     real("thin_repair", "-i", md, "-o", rep_theirs), rust("thin_repair", "-i", md, "-o", rep_rust),
                     repaired_same(rep_theirs), repaired_same(rep_rust))]


_SCRATCH = ("src.xml", "restored-ours.bin", "restored-cpp.bin", "restored-rust.bin", "repaired-ours.bin",
            "repaired-cpp.bin", "repaired-rust.bin")


def _measure_tool(case: ToolCase, wd: Path, rounds: int, label: str, progress: Progress) -> dict[str, Any]:
    """thinpool, the C++ and the Rust tool interleaved for ``rounds`` rounds (one if the first took over a minute);
    medians, and whether the outputs agree (stdout compared every round, restore/repair once, at the end)."""
    runs: dict[str, list[dict[str, Any]]] = {"thinpool": [], "cpp": [], "rust": []}
    same: dict[str, bool | None] = {"cpp": None, "rust": None}
    cmds = {"thinpool": case.ours, "cpp": case.cpp, "rust": case.rust}
    cmps = {"cpp": case.cmp_cpp, "rust": case.cmp_rust}
    r = 0
    while r < rounds:
        progress(f"scale: {label}: {case.name}, round {r + 1}/{rounds}")
        outs = {k: wd / f"{k}.out" for k in cmds}
        for k, cmd in cmds.items():
            if cmd is not None:
                runs[k].append(run_measured(cmd, stdout=outs[k]))
        slow = any(rs and rs[-1]["s"] > SLOW_ROUND_S for rs in runs.values())
        last = r == rounds - 1 or slow
        for k in ("cpp", "rust"):
            cmp = cmps[k]
            # byte comparisons every round; the others (digests, sorting, dumping restored metadata) at the end
            if cmds[k] is not None and cmp is not None and (cmp is _same_stdout or last):
                ok = cmp(outs["thinpool"], outs[k])
                same[k] = ok if same[k] is None or ok is None else same[k] and ok
        for f in outs.values():
            f.unlink(missing_ok=True)
        r += 1
        if slow:
            break
    t: dict[str, Any] = {"thinpool": _median(runs["thinpool"]),
                         "cpp": _median(runs["cpp"]) if runs["cpp"] else None,
                         "rust": _median(runs["rust"]) if runs["rust"] else None,
                         "identical": same["cpp"], "rust_same": same["rust"]}
    if t["cpp"]:
        t["ratio"] = t["thinpool"]["s"] / t["cpp"]["s"]
    if t["rust"]:
        t["rust_ratio"] = t["thinpool"]["s"] / t["rust"]["s"]
    return t


def mappings_part(wd: Path, counts: Sequence[int], rounds: int, progress: Progress) -> list[dict[str, Any]]:
    """The mappings part: the pool steps (which leave device 3, a snapshot of 1), the tools, the deletes."""
    tp = thinpool_cmd()
    src = wd / "4k.bin"
    if not src.exists():
        src.write_bytes(os.urandom(4 * KiB))
    out: list[dict[str, Any]] = []
    for n in counts:
        d = wd / f"maps-{n}"
        progress(f"scale: building {n:,} mappings")
        t0 = time.perf_counter()
        build_mapping_pool(d, n)
        row: dict[str, Any] = {"mappings": n, "build_s": time.perf_counter() - t0, "steps": {}, "tools": {}}
        try:
            p = str(d)
            pool_steps = {"open + read 4 KiB": [*tp, "thin", "read", "1", "--offset", "0", "--length", "4k",
                                                "--output", os.devnull, "-p", p],
                          "write 4 KiB + commit": [*tp, "thin", "write", "1", str(src), "--offset", "64k", "-p", p],
                          "snapshot": [*tp, "thin", "snap", "3", "1", "-p", p],
                          "pool status": [*tp, "pool", "status", p]}
            for step, cmd in pool_steps.items():
                progress(f"scale: {n:,} mappings: {step}")
                row["steps"][step] = _median([run_measured(cmd)])
            md = str(d / "metadata")
            for case in _tool_cases(tp, md, wd, n):
                row["tools"][case.name] = _measure_tool(case, wd, rounds, f"{n:,} mappings", progress)
            for step, cmd in (("delete snapshot (1 % own)", [*tp, "thin", "delete", "2", "--force", "-p", p]),
                              ("delete origin", [*tp, "thin", "delete", "1", "--force", "-p", p])):
                progress(f"scale: {n:,} mappings: {step}")
                row["steps"][step] = _median([run_measured(cmd)])
            # what the deletes left must pass the real checkers
            tc, rc = which("thin_check"), rust_which("thin_check")
            row["thin_check_after_deletes"] = None if tc is None else run_measured([tc, md])["rc"] == 0
            row["rust_thin_check_after_deletes"] = None if rc is None else run_measured([rc, md])["rc"] == 0
        finally:
            shutil.rmtree(d, ignore_errors=True)
            for x in _SCRATCH:
                (wd / x).unlink(missing_ok=True)
            out.append(row)
    return out


# --- devices --------------------------------------------------------------------------------------------------
def build_device_pool(path: Path, devices: int) -> None:
    """A pool of ``devices`` devices: a base and its snapshots, all named, built in bulk."""
    from thinpool.manifest import write_manifest

    with Pool.create(path, data_size=1024 * CH, chunk_size=CH) as p:
        p.create_thin(0, 64 * CH, name="base")
        src = p.manifest["devices"]["0"]
        anc = [{"dev_id": 0, "name": "base", "created_at": src["created_at"]}]
        now = time.time()
        for i in range(1, devices):
            p.md.create_snap(i, 0)
            p.manifest["devices"][str(i)] = {"name": f"s{i}", "size": src["size"], "origin": None,
                                             "snapshot_of": 0, "ancestors": anc, "created_at": now}
        p.md.set_transaction_id(p.md.trans_id, p.md.trans_id + 1)
        p.manifest["transaction_id"] = p.md.trans_id
        p.commit()
        write_manifest(p.path, p.manifest)


def devices_part(wd: Path, counts: Sequence[int], rounds: int, progress: Progress) -> list[dict[str, Any]]:
    out = []
    for n in counts:
        progress(f"scale: create_snap at {n:,} devices")
        d = wd / f"devs-{n}"
        try:
            build_device_pool(d, n)
            snap: list[float] = []
            delete: list[float] = []
            with Pool.open(d) as pool:
                for _ in range(rounds):
                    t0 = time.perf_counter()
                    pool.create_snap(n, 0, name="x")
                    t1 = time.perf_counter()
                    pool.delete_thin(n)
                    t2 = time.perf_counter()
                    snap.append(t1 - t0)
                    delete.append(t2 - t1)
            out.append({"devices": n, "create_snap_ms": statistics.median(snap) * 1e3,
                        "delete_ms": statistics.median(delete) * 1e3, "rounds": rounds})
        finally:
            shutil.rmtree(d, ignore_errors=True)
    return out


# --- the whole part -------------------------------------------------------------------------------------------
def run_scale(wd: Path, *, quick: bool = False, progress: Progress = _noop, tools_only: bool = False,
              mappings: Sequence[int] | None = None, rounds: int | None = None) -> dict[str, Any]:
    """Measure the three parts in ``wd`` (scratch pools are removed as they are done). ``tools_only``: only the
    mappings part (with the metadata tools); ``mappings`` and ``rounds`` override that part's counts and rounds."""
    wd = Path(wd) / "scale"
    wd.mkdir(parents=True, exist_ok=True)
    try:
        # partial: the mapping counts overridden (the report keeps the earlier one below, as a tools-only run's)
        result: dict[str, Any] = {"quick": quick, "tools_only": tools_only, "partial": mappings is not None}
        if not tools_only:
            result["pool_size"] = pool_size_part(wd, POOL_SIZES_QUICK if quick else POOL_SIZES, 2 if quick else 3,
                                                 progress)
        result["mappings"] = mappings_part(wd, mappings or (MAPPINGS_QUICK if quick else MAPPINGS),
                                           rounds or (1 if quick else 3), progress)
        if not tools_only:
            result["devices"] = devices_part(wd, DEVICES_QUICK if quick else DEVICES, 5 if quick else 20, progress)
        result["cpp_version"] = _cpp_version()
        result["rust_version"] = _rust_version()
        result["rust_dir"] = str(rust_dir())
        result["rss_source"] = "GNU time's %M" if os.access(GNU_TIME, os.X_OK) else \
            "wait4's ru_maxrss (an upper bound: it includes this forking process's resident set)"
        result["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        result["claims"] = claims(result)
        return result
    finally:
        shutil.rmtree(wd, ignore_errors=True)


def _cpp_version() -> str | None:
    exe = which("thin_check")
    if exe is None:
        return None
    r = subprocess.run([exe, "-V"], capture_output=True, text=True)
    return (r.stdout or r.stderr).strip() or None


def claims(res: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's goals, each with this run's value and a verdict."""
    out: list[dict[str, Any]] = []
    ps = res.get("pool_size")
    if ps:
        big = ps["sizes"][-1]
        worst = max(ps["table"][big].values(), key=lambda m: m["ratio"] or 0)
        ratio = max(m["ratio"] or 0 for m in ps["table"][big].values())
        rss = max(m["rss_mb"] for m in ps["table"][big].values())
        name = next(k for k, m in ps["table"][big].items() if m is worst)
        out.append({"claim": f"every command at {big} within 1.5x of 1 GiB", "measured": f"{ratio:.2f}x ({name})",
                    "verdict": "met" if ratio <= 1.5 else "missed"})
        out.append({"claim": f"every command at {big} under {RSS_GOAL_MB:.0f} MiB RSS", "measured": f"{rss:.0f} MB",
                    "verdict": "met" if rss < RSS_GOAL_MB else "missed"})
    maps = res.get("mappings") or []
    if maps:
        top = maps[-1]
        for name, t in top["tools"].items():
            fast = name in SPEED_GOALS  # the others' goal is bounded memory
            what = (f"faster than the C++ tool, RSS < {RSS_GOAL_MB:.0f} MiB, same output" if fast else
                    f"RSS < {RSS_GOAL_MB:.0f} MiB (bounded memory), same result")
            claim = f"{name} at {top['mappings']:,} mappings {what}"
            if t["cpp"] is None:
                out.append({"claim": claim, "measured": "C++ tool not installed", "verdict": "n/a"})
                continue
            ok = t["thinpool"]["rss_mb"] < RSS_GOAL_MB and t["identical"] is not False and \
                (t["ratio"] < 1.0 or not fast) and not t["thinpool"]["failed"]
            rust = "" if not t.get("rust") else \
                f"; Rust {t['rust']['s']:.2f} s / {t['rust']['rss_mb']:.0f} MB ({t['rust_ratio']:.2f}x)"
            out.append({"claim": claim,
                        "measured": f"{t['thinpool']['s']:.2f} s / {t['thinpool']['rss_mb']:.0f} MB vs C++ "
                                    f"{t['cpp']['s']:.2f} s / {t['cpp']['rss_mb']:.0f} MB ({t['ratio']:.2f}x){rust}",
                        "verdict": "met" if ok else "missed"})
        d = top["steps"].get("delete origin")
        if d:
            out.append({"claim": f"delete of a {top['mappings']:,}-mapping device under 2 s (whole process)",
                        "measured": f"{d['s']:.2f} s", "verdict": "met" if d["s"] < 2.0 else "missed"})
    devs = res.get("devices") or []
    if len(devs) > 1:
        # the baseline: 10 devices (the first count measured when 10 is not)
        base = next((d for d in devs if d["devices"] == 10), devs[0])
        r = devs[-1]["create_snap_ms"] / base["create_snap_ms"]
        one = "" if base is devs[0] else f"; of at {devs[0]['devices']}: " \
            f"{devs[-1]['create_snap_ms'] / devs[0]['create_snap_ms']:.2f}x"
        out.append({"claim": f"create_snap at {devs[-1]['devices']:,} devices within 2x of at {base['devices']}",
                    "measured": f"{r:.2f}x{one}", "verdict": "met" if r <= 2.0 else "missed"})
    return out


def _cell(m: dict[str, Any] | None) -> str:
    if m is None:
        return "not installed"
    fail = " FAILED" if m.get("failed") else ""
    return f"{m['s']:.2f} s / {m['rss_mb']:.0f} MB{fail}"


def report_lines(res: dict[str, Any]) -> list[str]:
    """The markdown tables of one scale run."""
    lines = ["# thinpool scale benchmark", "",
             "Regenerate with `thinpool bench --only scale --results benchmarks/RESULTS.md` (writes this file beside "
             "it; `--quick` for a short run). Every number is from one run on this machine: whole `thinpool` "
             "processes (wall time, the child's own peak RSS from `wait4`), medians over the rounds shown; the C++ "
             "tools run on the same metadata in the same rounds, interleaved. Peak RSS: "
             f"{res.get('rss_source', '?')}.", ""]
    if res.get("tools_only"):
        counts = " ".join(f"--mappings {row['mappings']}" for row in res.get("mappings") or [])
        lines[2] = ("A tools-only run (`python -m thinpool_bench.scale --only-tools " + counts +
                    " --results benchmarks/RESULTS-scale.md`): only the mappings part (pool steps, the metadata "
                    "tools, the deletes), on this run's freshly built pool. Every number is from this run on this "
                    "machine: whole processes (wall time, peak RSS), medians over the rounds shown; thinpool, the "
                    "C++ and the Rust tools "
                    "interleaved on the same metadata. Peak RSS: " + f"{res.get('rss_source', '?')}.")
    elif res.get("partial"):
        counts = " ".join(f"--mappings {row['mappings']}" for row in res.get("mappings") or [])
        lines[2] = ("Every part, the mappings part at the counts given (`python -m thinpool_bench.scale " + counts +
                    " --results benchmarks/RESULTS-scale.md`; an earlier report is kept below). Every number is "
                    "from this run on this machine: whole processes (wall time, peak RSS), medians over the rounds "
                    "shown; thinpool, the C++ and the Rust tools interleaved on the same metadata. Peak RSS: " +
                    f"{res.get('rss_source', '?')}.")
    if res.get("quick"):
        lines += ["**Quick run**: small sizes, few rounds; the numbers are noisy.", ""]
    ps = res.get("pool_size")
    if ps:
        sizes = ps["sizes"]
        lines += ["## Same commands, empty pool of growing size (64 KiB chunks)", "",
                  "| command | " + " | ".join(sizes) + " |", "|---" * (len(sizes) + 1) + "|"]
        for step in ps["steps"]:
            cells = []
            for s in sizes:
                m = ps["table"][s][step]
                ratio = "" if s == sizes[0] else f" ({m['ratio']:.2f}x)"
                cells.append(f"{m['s']:.3f} s{ratio}, {m['rss_mb']:.0f} MB" + (" FAILED" if m["failed"] else ""))
            lines.append(f"| {step} | " + " | ".join(cells) + " |")
        lines.append("")
    maps = res.get("mappings") or []
    if maps:
        rust = f"Rust pdata_tools {res['rust_version']} ({res.get('rust_dir')})" if res.get("rust_version") else \
            f"Rust pdata_tools not installed (looked in {res.get('rust_dir')})"
        lines += ["## Mappings: device 1 maps N chunks (random data order), device 2 a snapshot with 1 % rewritten",
                  "", "The pool steps below make device 3, a snapshot of device 1, before the tools run (it shares "
                  "device 1's tree): the dump restore reads maps most data blocks three times, so restore and "
                  "repair write metadata in which most counts are 3 (held by the ref-count tree). "
                  f"C++ tools: {res.get('cpp_version') or 'not installed'}. {rust}. Output: thinpool's compared "
                  "with the C++ tool's byte for byte (restore: the results' dumps; repair: their mappings), and with "
                  "the Rust tool's as far as the formats agree (see thinpool_bench/scale.py). Rust thin_check 1.1.0 "
                  "takes at least 0.5 s (its progress thread sleeps 500 ms). Rounds: a command whose first round "
                  f"took over {SLOW_ROUND_S:.0f} s ran once.", "",
                  "| mappings | tool | thinpool | C++ | Rust | thinpool / C++ | thinpool / Rust | rounds | output |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in maps:
            for name, t in row["tools"].items():
                ratio = f"{t['ratio']:.2f}x" if t.get("ratio") is not None else "-"
                rratio = f"{t['rust_ratio']:.2f}x" if t.get("rust_ratio") is not None else "-"
                same = {True: "identical", False: "DIFFERENT", None: "-"}[t["identical"]]
                rsame = {True: "same", False: "DIFFERENT", None: "-"}[t.get("rust_same")]
                lines.append(f"| {row['mappings']:,} | {name} | {_cell(t['thinpool'])} | {_cell(t['cpp'])} | "
                             f"{_cell(t.get('rust'))} | {ratio} | {rratio} | {t['thinpool']['rounds']} | "
                             f"C++: {same}, Rust: {rsame} |")
        if maps[0]["steps"]:
            lines += ["", "| mappings | build (in process) | " + " | ".join(maps[0]["steps"]) +
                      " | thin_check (C++ / Rust) after the deletes |", "|---" * (len(maps[0]["steps"]) + 3) + "|"]
            for row in maps:
                tc = {True: "passes", False: "FAILS", None: "-"}
                lines.append(f"| {row['mappings']:,} | {row['build_s']:.1f} s | " +
                             " | ".join(_cell(m) for m in row["steps"].values()) +
                             f" | {tc[row.get('thin_check_after_deletes')]} / "
                             f"{tc[row.get('rust_thin_check_after_deletes')]} |")
        lines.append("")
    devs = res.get("devices") or []
    if devs:
        lines += ["## Devices: create_snap and delete_thin in process (pool.json journal, metadata commit)", "",
                  "| devices | create_snap | delete_thin | rounds |", "|---|---|---|---|"]
        for r in devs:
            lines.append(f"| {r['devices']:,} | {r['create_snap_ms']:.2f} ms | {r['delete_ms']:.2f} ms | "
                         f"{r['rounds']} |")
        lines.append("")
    cl = res.get("claims") or claims(res)
    if cl:
        lines += ["## Goals", "", "| goal | measured | verdict |", "|---|---|---|"]
        lines += [f"| {c['claim']} | {c['measured']} | {c['verdict']} |" for c in cl]
        lines.append("")
    return lines


PREVIOUS = "<!-- the report of an earlier run follows, unchanged -->"


def write_results(res: dict[str, Any], path: Path) -> None:
    """Write the scale report (markdown) to ``path``. A tools-only run's report goes on top of the existing
    report's (of an earlier full run), which is kept below, unchanged, under its own heading."""
    path = Path(path)
    lines = report_lines(res)
    if res.get("tools_only") or res.get("partial"):
        lines[0] = f"# thinpool scale benchmark: the metadata tools ({res.get('date', '?')})" if \
            res.get("tools_only") else f"# thinpool scale benchmark ({res.get('date', '?')})"
        if path.exists():
            old = path.read_text()
            if PREVIOUS in old:  # kept as it was (its headings already one level down)
                old_lines = old.split(PREVIOUS, 1)[1].strip("\n").splitlines()
            else:
                old_lines = ["#" + ln if ln.startswith("#") else ln for ln in old.strip("\n").splitlines()]
            lines += ["", PREVIOUS, ""] + old_lines
    path.write_text("\n".join(lines) + ("\n" if res.get("tools_only") or res.get("partial") else ""))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m thinpool_bench.scale``: the scale part alone (``--only-tools``: only the metadata tools)."""
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m thinpool_bench.scale", description=main.__doc__)
    ap.add_argument("--only-tools", action="store_true", help="only the mappings part (with the metadata tools)")
    ap.add_argument("--mappings", type=int, action="append", help="mapping counts (repeatable)")
    ap.add_argument("--rounds", type=int, help="rounds of the mappings part")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    ap.add_argument("--results", type=Path, help="write the markdown report here")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    a = ap.parse_args(argv)
    res = run_scale(a.workdir, quick=a.quick, tools_only=a.only_tools, mappings=a.mappings, rounds=a.rounds,
                    progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    if a.results:
        write_results(res, a.results)
    if a.json:
        print(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
