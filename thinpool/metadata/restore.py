"""Restore metadata from thin_dump XML (thin_restore): the XML is parsed into the metadata IR (``metadata/ir.py``)
and a builder visitor turns any IR stream (parsed XML, a collected ``MetadataIR``, repair's salvage) into fresh
metadata.

Layer: metadata. May import: metadata.ir, metadata.pool_metadata, io, formats.

Accepted input is thin_dump 0.9.0's grammar (superblock / device / range_mapping / single_mapping). Unlike
thin_restore 0.9.0, an overlapping mapping replaces the earlier one without leaving a stale data reference, and
the data space map counts one reference per mapping.

Memory: the IR keeps mappings as runs (four integers per range_mapping); the builder expands one device at a time
into numpy arrays for the bulk tree build.
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO

import numpy as np

from thinpool.errors import InvalidArgument
from thinpool.formats.device_details import MAX_DATA_BLOCK, TIME_MASK, DeviceDetails
from thinpool.io.block_store import BlockStore
from thinpool.metadata.ir import DeviceDetailsIR, MetadataVisitor, Runs, SuperblockIR
from thinpool.metadata.pool_metadata import PoolMetadata

_SB_REQUIRED = ("uuid", "time", "transaction", "data_block_size", "nr_data_blocks")
_DEV_REQUIRED = ("dev_id", "mapped_blocks", "transaction", "creation_time", "snap_time")
_RANGE_REQUIRED = ("origin_begin", "data_begin", "length", "time")
_SINGLE_REQUIRED = ("origin_block", "data_block", "time")
_BATCH = 65536  # runs per map() call from the XML parser


def expand_runs(thin_begin: np.ndarray, data_begin: np.ndarray, lengths: np.ndarray,
                times: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs -> one entry per mapping (uint64 thin blocks, data blocks, times), in the runs' order."""
    lengths = lengths.astype(np.int64)
    total = int(lengths.sum()) if len(lengths) else 0
    if total == 0:
        z = np.zeros(0, dtype=np.uint64)
        return z, z, z
    offs = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    t = (np.repeat(thin_begin.astype(np.int64), lengths) + offs).astype(np.uint64)
    d = (np.repeat(data_begin.astype(np.int64), lengths) + offs).astype(np.uint64)
    return t, d, np.repeat(times.astype(np.uint64), lengths)


def sorted_mappings(thin: np.ndarray, data: np.ndarray,
                    times: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted by thin block; for a thin block given twice, the later mapping wins."""
    order = np.argsort(thin, kind="stable")
    t, d, tm = thin[order], data[order], times[order]
    keep = np.ones(len(t), dtype=bool)
    keep[:-1] = t[1:] != t[:-1]  # keep the last of equal keys
    return t[keep], d[keep], tm[keep]


@dataclass
class DeviceIR:
    """One device of a collected IR: its details and its mappings as batches of runs."""

    dev_id: int
    transaction: int
    creation_time: int
    snap_time: int
    mapped_blocks: int
    runs: list[Runs] = field(default_factory=list)

    def details(self) -> DeviceDetailsIR:
        return DeviceDetailsIR(self.dev_id, self.mapped_blocks, self.transaction, self.creation_time,
                               self.snap_time)

    def highest_thin(self) -> int | None:
        """The highest thin block mapped (None without mappings); from the runs, without expanding them."""
        return max((int((r.steps[0] + r.lengths - 1).max()) for r in self.runs if len(r)), default=None)

    def highest_data(self) -> int | None:
        """The highest data block mapped (None without mappings)."""
        return max((int((r.steps[1] + r.lengths - 1).max()) for r in self.runs if len(r)), default=None)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(thin, data, times) uint64, sorted by thin block; for a thin block given twice, the later wins."""
        if not self.runs:
            z = np.zeros(0, dtype=np.uint64)
            return z, z, z
        cat = [np.concatenate(c) for c in zip(*((r.steps[0], r.steps[1], r.lengths, r.equals[0])
                                               for r in self.runs))]
        return sorted_mappings(*expand_runs(cat[0], cat[1], cat[2], cat[3]))


@dataclass
class MetadataIR:
    """A whole IR collected in memory (runs, not mappings): what ``parse_xml`` returns and ``restore`` replays."""

    time: int
    transaction: int
    flags: int
    version: int
    data_block_size: int
    nr_data_blocks: int
    devices: list[DeviceIR] = field(default_factory=list)

    def superblock(self) -> SuperblockIR:
        return SuperblockIR("", self.time, self.transaction, self.flags, self.version, self.data_block_size,
                            self.nr_data_blocks)

    def replay(self, visitor: MetadataVisitor) -> None:
        """Feed the collected IR to ``visitor``."""
        visitor.superblock_b(self.superblock())
        for dev in self.devices:
            visitor.device_b(dev.details())
            for r in dev.runs:
                visitor.map(r)
            visitor.device_e()
        visitor.superblock_e()
        visitor.eof()


class IRCollector:
    """A visitor that collects the IR it is fed into a ``MetadataIR`` (``.ir`` once ``eof`` is seen)."""

    def __init__(self) -> None:
        self.ir: MetadataIR | None = None
        self._dev: DeviceIR | None = None

    def superblock_b(self, sb: SuperblockIR) -> None:
        self.ir = MetadataIR(sb.time, sb.transaction, sb.flags, sb.version, sb.data_block_size, sb.nr_data_blocks)

    def device_b(self, d: DeviceDetailsIR) -> None:
        self._dev = DeviceIR(d.dev_id, d.transaction, d.creation_time, d.snap_time, d.mapped_blocks)

    def map(self, runs: Runs) -> None:
        assert self._dev is not None
        self._dev.runs.append(runs)

    def device_e(self) -> None:
        assert self.ir is not None and self._dev is not None
        self.ir.devices.append(self._dev)
        self._dev = None

    def superblock_e(self) -> None:
        pass

    def eof(self) -> None:
        pass


def _int_or(el: ET.Element, name: str, default: int) -> int:
    """An optional numeric attribute (``default`` when absent), checked as ``_int`` checks a required one."""
    return default if el.get(name) is None else _int(el, name)


def _int(el: ET.Element, name: str) -> int:
    v = el.get(name)
    if v is None:
        raise InvalidArgument(reason=f"could not find attribute: {name} (in <{el.tag}>)")
    try:
        n = int(v)
    except ValueError:
        raise InvalidArgument(reason=f"attribute {name}={v!r} of <{el.tag}> is not a number") from None
    if n < 0:
        raise InvalidArgument(reason=f"attribute {name}={v!r} of <{el.tag}> is negative")
    return n


def _fit(*fields: tuple[str, int, int]) -> None:
    """Refuse a number too wide for its on-disk field (name, value, bits) with a typed error."""
    for name, v, bits in fields:
        if not 0 <= int(v) < 1 << bits:
            raise InvalidArgument(reason=f"{name} {v} does not fit in its {bits}-bit field")


class _RunBuffer:
    """Runs of one device collected from XML elements, handed over in batches."""

    def __init__(self, visitor: MetadataVisitor) -> None:
        self.visitor = visitor
        self.cols: tuple[list[int], list[int], list[int], list[int]] = ([], [], [], [])

    def add(self, thin_begin: int, data_begin: int, length: int, time: int) -> None:
        if data_begin + length > MAX_DATA_BLOCK + 1 or thin_begin + length > 1 << 63:
            raise InvalidArgument(reason=f"mapping of thin block {thin_begin} to data block {data_begin} (length "
                                         f"{length}) is out of range")
        for c, v in zip(self.cols, (thin_begin, data_begin, time, length)):
            c.append(v)
        if len(self.cols[0]) >= _BATCH:
            self.flush()

    def flush(self) -> None:
        if self.cols[0]:
            a = [np.array(c, dtype=np.int64) for c in self.cols]
            self.visitor.map(Runs((a[0], a[1]), (a[2],), a[3]))
            for c in self.cols:
                c.clear()


class _CountingReader:
    """A binary file that reports how far it has been read (``progress(bytes read)``)."""

    def __init__(self, f: IO[bytes], progress: Callable[[int], None]) -> None:
        self.f, self.progress, self.done = f, progress, 0

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        self.done += len(b)
        self.progress(self.done)
        return b


def read_xml(src: IO[bytes] | IO[str] | str, visitor: MetadataVisitor, *,
             progress: Callable[[int], None] | None = None) -> None:
    """Parse thin_dump XML, feeding the IR to ``visitor`` as it goes (each element is checked first).
    ``progress`` (a file path only) gets the bytes read so far.

    Raises:
        InvalidArgument with a clear message on bad input (the visitor may have seen a prefix).
    """
    if progress is not None and isinstance(src, str):
        with open(src, "rb") as f:
            read_xml(_CountingReader(f, progress), visitor)  # type: ignore[arg-type]
        return
    in_sb = saw_sb = False
    in_dev = False
    seen: set[int] = set()
    buf = _RunBuffer(visitor)
    # thin_dump 1.x writes a subtree shared by several devices once, as <def name=...> before the devices, and
    # <ref name=.../> where each device has it: the def's runs are kept and replayed at each ref.
    defs: dict[str, list[tuple[int, int, int, int]]] = {}
    in_def: list[tuple[int, int, int, int]] | None = None
    try:
        for event, el in ET.iterparse(src, events=("start", "end")):
            tag = el.tag
            if event == "start":
                if tag == "superblock":
                    for a in _SB_REQUIRED:
                        if el.get(a) is None:
                            raise InvalidArgument(reason=f"could not find attribute: {a}")
                    visitor.superblock_b(SuperblockIR(el.get("uuid", ""), _int(el, "time"), _int(el, "transaction"),
                                                      _int_or(el, "flags", 0), _int_or(el, "version", 2),
                                                      _int(el, "data_block_size"), _int(el, "nr_data_blocks")))
                    in_sb = saw_sb = True
                elif tag == "device":
                    if not in_sb or in_dev:
                        raise InvalidArgument(reason="<device> outside <superblock>")
                    for a in _DEV_REQUIRED:
                        _int(el, a)
                    dev_id = _int(el, "dev_id")
                    if dev_id in seen:
                        raise InvalidArgument(reason=f"Device already exists: {dev_id}")
                    seen.add(dev_id)
                    visitor.device_b(DeviceDetailsIR(dev_id, _int(el, "mapped_blocks"), _int(el, "transaction"),
                                                     _int(el, "creation_time"), _int(el, "snap_time")))
                    in_dev = True
                elif tag == "def":
                    name = el.get("name")
                    if not in_sb or in_dev or in_def is not None or name is None or name in defs:
                        raise InvalidArgument(reason=f"misplaced or duplicate <def name={name!r}>")
                    in_def = defs[name] = []
                elif tag == "ref":
                    name = el.get("name")
                    if not in_dev or in_def is not None:
                        # as Rust thin_restore; a <ref> inside a <def> would also let nested defs grow exponentially
                        # (ten refs to the def before, level after level: 10^n runs held in memory)
                        raise InvalidArgument(reason="<ref> outside <device> (as Rust thin_restore: <ref> tags may "
                                                     "only occur within <device> sections)")
                    if name not in defs:
                        raise InvalidArgument(reason=f"<ref name={name!r}> to no <def> before it")
                    for run in defs[name]:
                        buf.add(*run)
                elif tag in ("range_mapping", "single_mapping"):
                    if not in_dev and in_def is None:
                        raise InvalidArgument(reason=f"<{tag}> outside <device>")
                    if tag == "range_mapping":
                        ob, db, n, t = (_int(el, a) for a in _RANGE_REQUIRED)
                    else:
                        ob, db, t = (_int(el, a) for a in _SINGLE_REQUIRED)
                        n = 1
                    if t > TIME_MASK:
                        raise InvalidArgument(reason=f"mapping time {t} does not fit in 24 bits")
                    if n and in_def is not None:
                        in_def.append((ob, db, n, t))
                    elif n:
                        buf.add(ob, db, n, t)
                else:
                    raise InvalidArgument(reason=f"unknown tag type: <{tag}>")
            else:
                if tag == "def":
                    in_def = None
                elif tag == "device":
                    buf.flush()
                    visitor.device_e()
                    in_dev = False
                elif tag == "superblock":
                    visitor.superblock_e()
                    in_sb = False
                el.clear()
    except ET.ParseError as e:
        raise InvalidArgument(reason=f"malformed XML: {e}") from None
    if not saw_sb:
        raise InvalidArgument(reason="no <superblock> element in the XML")
    visitor.eof()


# --- a fast path for thin_dump's own layout -----------------------------------------------------------------
# thin_dump writes one element per line with fixed indentation and attribute order. A file in exactly that layout
# is parsed a chunk of lines at a time with numpy (the mapping lines' skeletons checked with their digits deleted,
# the numbers read in one pass); anything else (another layout, a comment, an entity, bad data) makes the fast path
# give up, and the ElementTree parser above reads the file from the start, with its checks and messages.
_FAST_SB = re.compile(rb'<superblock uuid="([^"&<>]*)" time="(\d{1,18})" transaction="(\d{1,18})" flags="(\d{1,18})" '
                      rb'version="(\d{1,18})" data_block_size="(\d{1,18})" nr_data_blocks="(\d{1,18})">\n')
_FAST_DEV = re.compile(rb'  <device dev_id="(\d{1,18})" mapped_blocks="(\d{1,18})" transaction="(\d{1,18})" '
                       rb'creation_time="(\d{1,18})" snap_time="(\d{1,18})">\n')
_SINGLE_SKEL = b'    <single_mapping origin_block="" data_block="" time=""/>'
_RANGE_SKEL = b'    <range_mapping origin_begin="" data_begin="" length="" time=""/>'
_SINGLE_LINE = _SINGLE_SKEL + b"\n"
_RANGE_LINE = _RANGE_SKEL + b"\n"
_DIGITS = b"0123456789"
_DIGITS_TO_9 = bytes(57 if 48 <= c <= 57 else c for c in range(256))
_TO_SPACES = bytes(c if 48 <= c <= 57 else 32 for c in range(256))
_FAST_CHUNK = 1 << 20  # bytes of XML per step (larger steps cost more memory and run slower: cache)


class _NotFast(Exception):
    """The file is not in thin_dump's exact layout: use the general parser."""


def _fast_runs(seg: bytes) -> Runs:
    """The runs of a stretch of mapping lines (each ending in a newline). Raises _NotFast."""
    n = seg.count(b"\n")
    skel = seg.translate(None, _DIGITS)
    if skel == _SINGLE_LINE * n:
        kind = "single"
    elif skel == _RANGE_LINE * n:
        kind = "range"
    else:
        lines = skel.split(b"\n")
        kinds = set(lines[:-1])
        if lines[-1] or not kinds <= {_SINGLE_SKEL, _RANGE_SKEL}:
            raise _NotFast
        kind = "mixed"
    if seg.translate(_DIGITS_TO_9).find(b"9" * 19) >= 0:
        raise _NotFast  # a number too long for int64: the general parser's business
    nums = np.fromstring(seg.translate(_TO_SPACES), dtype=np.int64, sep=" ")
    if kind == "single":
        if len(nums) != 3 * n:
            raise _NotFast
        v = nums.reshape(n, 3)
        tb, db, t, ln = v[:, 0], v[:, 1], v[:, 2], np.ones(n, dtype=np.int64)
    elif kind == "range":
        if len(nums) != 4 * n:
            raise _NotFast
        v = nums.reshape(n, 4)
        tb, db, ln, t = v[:, 0], v[:, 1], v[:, 2], v[:, 3]
    else:
        a = np.frombuffer(seg, dtype=np.uint8)
        starts = np.zeros(n, dtype=np.int64)
        starts[1:] = np.flatnonzero(a == 10)[:-1] + 1
        is_range = a[starts + 5] == ord("r")  # "    <r"
        first = np.zeros(n, dtype=np.int64)
        np.cumsum((3 + is_range.astype(np.int64))[:-1], out=first[1:])
        if len(nums) != 3 * n + int(np.count_nonzero(is_range)):
            raise _NotFast
        tb, db = nums[first], nums[first + 1]
        ln = np.where(is_range, nums[first + 2], 1)
        t = np.where(is_range, nums[np.minimum(first + 3, len(nums) - 1)], nums[first + 2])
    if len(t) and int(t.max()) > TIME_MASK:
        raise _NotFast  # the general parser reports it
    keep = ln != 0
    if not keep.all():
        tb, db, t, ln = tb[keep], db[keep], t[keep], ln[keep]
    return Runs((np.ascontiguousarray(tb), np.ascontiguousarray(db)), (np.ascontiguousarray(t),),
                np.ascontiguousarray(ln))


def _read_fast(path: str | os.PathLike[str], visitor: MetadataVisitor,
               progress: Callable[[int], None] | None = None) -> bool:
    """``read_xml`` of a file in thin_dump's exact layout; False (the visitor may have seen a prefix, and is to be
    fed again from its superblock_b) when the file is in any other. ``progress`` gets the bytes read so far."""
    try:
        with open(path, "rb") as f:
            m = _FAST_SB.fullmatch(f.readline())
            if m is None:
                return False
            uuid = m.group(1).decode()
            time_, trans, flags, version, dbs, nr_data = (int(x) for x in m.groups()[1:])
            visitor.superblock_b(SuperblockIR(uuid, time_, trans, flags, version, dbs, nr_data))
            in_dev = False
            seen: set[int] = set()
            while True:
                chunk = f.read(_FAST_CHUNK)
                if not chunk:
                    return False  # no </superblock>
                if not chunk.endswith(b"\n"):
                    chunk += f.readline()
                if progress is not None:
                    progress(f.tell())
                data = b"\n" + chunk
                i = 0  # data[i] is the newline before the next line
                while i < len(data) - 1:
                    # the next line indented by two (a device tag) or not at all (only </superblock>, the last
                    # line: looked for near the end; one elsewhere fails the mapping lines' check)
                    j1, j2 = data.find(b"\n  <", i), data.find(b"\n<", max(i, len(data) - 64))
                    j = min(x for x in (j1, j2, len(data) - 1) if x >= 0)
                    if j > i:  # mapping lines
                        if not in_dev:
                            return False
                        runs = _fast_runs(data[i + 1:j + 1])
                        if len(runs):
                            visitor.map(runs)
                    if j >= len(data) - 1:
                        break
                    k = data.index(b"\n", j + 1)
                    line = data[j + 1:k + 1]
                    i = k
                    if line == b"  </device>\n" and in_dev:
                        visitor.device_e()
                        in_dev = False
                    elif line == b"</superblock>\n" and not in_dev:
                        if data[k + 1:].strip() or f.read(1 << 16).strip():
                            return False
                        visitor.superblock_e()
                        visitor.eof()
                        return True
                    elif (d := _FAST_DEV.fullmatch(line)) is not None and not in_dev:
                        dev_id, mapped, dtrans, ctime, stime = (int(x) for x in d.groups())
                        if dev_id in seen:
                            return False
                        seen.add(dev_id)
                        visitor.device_b(DeviceDetailsIR(dev_id, mapped, dtrans, ctime, stime))
                        in_dev = True
                    else:
                        return False
    except (_NotFast, ValueError, OverflowError):
        return False


def _parse_fast(path: str | os.PathLike[str]) -> MetadataIR | None:
    """``parse_xml`` by the fast path, or None when the file is not in thin_dump's exact layout."""
    col = IRCollector()
    return col.ir if _read_fast(path, col) else None


def restore_xml(src: IO[bytes] | IO[str] | str, visitor: MetadataVisitor, *,
                progress: Callable[[int], None] | None = None) -> None:
    """Feed thin_dump XML to ``visitor`` (a ``MetadataBuilder``, say) as it is parsed: memory holds one batch of
    runs, not the document. A file path in thin_dump's own layout takes the fast path; if that gives up midway,
    the general parser feeds ``visitor`` again from its ``superblock_b``. ``progress`` (a file path only) gets
    the bytes of XML read so far (from 0 again if the general parser starts over).

    Raises:
        InvalidArgument with a clear message on bad input.
    """
    if isinstance(src, str) and os.path.isfile(src) and _read_fast(src, visitor, progress):
        return
    read_xml(src, visitor, progress=progress)


def parse_xml(src: IO[bytes] | IO[str] | str) -> MetadataIR:
    """Parse thin_dump XML into a collected IR. Raises InvalidArgument with a clear message on bad input.

    A file path in thin_dump's own layout takes a numpy fast path (``_parse_fast``: the same IR)."""
    if isinstance(src, str) and os.path.isfile(src):
        fast = _parse_fast(src)
        if fast is not None:
            return fast
    col = IRCollector()
    read_xml(src, col)
    if col.ir is None:
        raise InvalidArgument(reason="no <superblock> element in the XML")
    return col.ir


SPILL_MEMORY_BYTES = 4 << 20  # runs of one device kept in memory before they go to a temporary file
BUILD_CHUNK_MAPPINGS = 1 << 16  # mappings expanded and added to the tree at once


class RunSpill:
    """The runs of one device as they arrive (thin begin, data begin, length, time: 32 bytes a run), in memory up
    to SPILL_MEMORY_BYTES, then in an unlinked temporary file; read back in chunks. Memory: one chunk."""

    def __init__(self) -> None:
        self._mem: list[np.ndarray] = []
        self._mem_bytes = 0
        self._file: IO[bytes] | None = None
        self.nr_runs = 0

    def append(self, thin: np.ndarray, data: np.ndarray, lengths: np.ndarray, times: np.ndarray) -> None:
        if not len(lengths):
            return
        rows = np.empty((len(lengths), 4), dtype=np.int64)
        rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3] = thin, data, lengths, times
        self.nr_runs += len(rows)
        if self._file is None and self._mem_bytes + rows.nbytes <= SPILL_MEMORY_BYTES:
            self._mem.append(rows)
            self._mem_bytes += rows.nbytes
            return
        if self._file is None:
            import tempfile

            self._file = tempfile.TemporaryFile(prefix="thinpool-spill-")
            for m in self._mem:
                self._file.write(m.tobytes())
            self._mem, self._mem_bytes = [], 0
        self._file.write(rows.tobytes())

    def chunks(self, nr_runs: int | None = None) -> Iterator[np.ndarray]:
        """The runs in arrival order, as (k, 4) int64 arrays of at most ``nr_runs`` rows (BUILD_CHUNK_MAPPINGS)."""
        nr_runs = nr_runs or BUILD_CHUNK_MAPPINGS
        if self._file is None:
            for m in self._mem:
                for lo in range(0, len(m), nr_runs):
                    yield m[lo:lo + nr_runs]
            return
        f = self._file
        f.flush()
        f.seek(0)
        while True:
            a = np.fromfile(f, dtype=np.int64, count=4 * nr_runs)
            if not len(a):
                return
            yield a.reshape(-1, 4)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._mem, self._mem_bytes, self.nr_runs = [], 0, 0


def expand_bounded(rows: np.ndarray, limit: int | None = None
                   ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``expand_runs`` of spilled rows (thin, data, length, time) in pieces of at most ``limit`` mappings
    (BUILD_CHUNK_MAPPINGS; a run longer than that is cut), so memory follows ``limit``, not the runs' lengths."""
    limit = limit or BUILD_CHUNK_MAPPINGS
    tb, db, ln, t = rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3]
    cum = np.cumsum(ln)
    i, n = 0, len(ln)
    while i < n:
        base = int(cum[i - 1]) if i else 0
        j = int(np.searchsorted(cum, base + limit, side="right"))
        if j > i:
            yield expand_runs(tb[i:j], db[i:j], ln[i:j], t[i:j])
            i = j
            continue
        length, off = int(ln[i]), 0  # run i alone is longer than limit
        while off < length:
            m = min(limit, length - off)
            r = np.arange(off, off + m, dtype=np.uint64)
            yield (r + np.uint64(tb[i]), r + np.uint64(db[i]), np.full(m, t[i], dtype=np.uint64))
            off += m
        i += 1


class MetadataBuilder:
    """A visitor that writes fresh metadata onto ``store`` from the IR it is fed: the store is formatted at
    ``superblock_b``, each device is built at ``device_e`` and everything is committed at ``superblock_e``
    (nothing is committed before).  ``.md`` is the open result.

    Producers: ``read_xml`` (restore), ``MetadataIR.replay``, and repair: a salvager calls superblock_b with the
    pool's geometry, then per device device_b / map_arrays (or map) / device_e, then superblock_e and eof.

    Memory: a device's runs go to a ``RunSpill`` as they arrive (checked, and watched for order); at device_e a
    device given in thin block order (thin_dump's) is built by streaming the spill through a ``DeviceBuilder``
    (one pending node per tree level), so memory does not follow the mapping count. A device given out of
    order (overlapping mappings: the later wins) is sorted in memory.

    Raises (from the calls): InvalidArgument for mappings beyond the data device or a bad geometry.
    """

    def __init__(self, store: BlockStore, *, grow: bool = False) -> None:
        if store.nr_blocks < 8:
            raise InvalidArgument(reason="output too small (need at least 32 KiB)")
        self.store = store
        self.grow = grow  # grow the metadata device (and ``store``) as the devices need it (a new output)
        self.nr_mappings = 0  # mappings of the devices built so far
        self.resized = 0  # times the metadata device was grown (tests)
        self.md: PoolMetadata | None = None
        self._sb: SuperblockIR | None = None
        self._dev: DeviceDetailsIR | None = None
        self._spill = RunSpill()
        self._in_order = True
        self._next = 0  # the lowest thin block the next mapping may have, while in order
        self._count = 0  # mappings given (while in order: the device's mapping count)
        self.max_nodes_held = 0  # most tree nodes held at once by a device build (tests)

    def superblock_b(self, sb: SuperblockIR) -> None:
        _fit(("time", sb.time, 32), ("transaction", sb.transaction, 64), ("flags", sb.flags, 32),
             ("version", sb.version, 32), ("data_block_size", sb.data_block_size, 32),
             ("nr_data_blocks", sb.nr_data_blocks, 64))
        self._sb = sb
        self.md = PoolMetadata.format(self.store, data_block_size=sb.data_block_size,
                                      nr_data_blocks=max(sb.nr_data_blocks, 1))

    def device_b(self, d: DeviceDetailsIR) -> None:
        _fit(("mapped_blocks", d.mapped_blocks, 64), ("transaction", d.transaction, 64),
             ("creation_time", d.creation_time, 32), ("snap_time", d.snap_time, 32))
        self._dev = d
        self._spill.close()
        self._in_order, self._next, self._count = True, 0, 0

    def _take(self, thin: np.ndarray, data: np.ndarray, lengths: np.ndarray, times: np.ndarray) -> None:
        """Check a batch of runs against the data device, note whether the device is still in order, spill it."""
        assert self._sb is not None
        if not len(lengths):
            return
        ends = data.astype(np.int64) + lengths.astype(np.int64)
        end = int(ends.max())
        if end > self._sb.nr_data_blocks:  # refused before it is expanded (a length is a number in the input)
            raise InvalidArgument(reason=f"mapping beyond end of data device ({end - 1} >= "
                                         f"{self._sb.nr_data_blocks})")
        if end - 1 > MAX_DATA_BLOCK:
            raise InvalidArgument(reason="data block does not fit in 40 bits")
        if self._in_order:
            tb = thin.astype(np.int64)
            tend = tb + lengths.astype(np.int64)
            self._in_order = int(tb[0]) >= self._next and bool((tb[1:] >= tend[:-1]).all())
            self._next = int(tend[-1])
        self._count += int(lengths.sum())
        self._spill.append(thin, data, lengths, times)

    def map(self, runs: Runs) -> None:
        self._take(runs.steps[0], runs.steps[1], runs.lengths, runs.equals[0])

    def map_arrays(self, thin: np.ndarray, data: np.ndarray, times: np.ndarray) -> None:
        """Mappings given one per entry (any order; for a thin block given twice the later wins)."""
        self._take(thin, data, np.ones(len(thin), dtype=np.int64), times)

    def device_e(self) -> None:
        from thinpool.metadata.builder import DeviceBuilder

        assert self.md is not None and self._sb is not None and self._dev is not None
        d = self._dev
        self.nr_mappings += self._count
        if self.grow:
            self._make_room(self._count)
        try:
            if self._in_order:
                b = DeviceBuilder(self.md, d.dev_id, self._count,
                                  DeviceDetails(self._count, d.transaction, d.creation_time, d.snap_time))
                for rows in self._spill.chunks():
                    for thin, data, times in expand_bounded(rows):
                        b.add(thin, data, times)
                        self.max_nodes_held = max(self.max_nodes_held, b.tree.max_held)
                b.finish()
            else:  # overlapping or unsorted mappings: sorted in memory, the later mapping of a block winning
                rows = np.concatenate(list(self._spill.chunks())) if self._spill.nr_runs else \
                    np.zeros((0, 4), dtype=np.int64)
                self._spill.close()
                thin, data, times = sorted_mappings(*expand_runs(rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3]))
                del rows
                self.md.build_device(d.dev_id, thin, data, times,
                                     DeviceDetails(len(thin), d.transaction, d.creation_time, d.snap_time))
        finally:
            self._spill.close()
        self._dev = None

    def _make_room(self, count: int) -> None:
        """Grow the metadata device, if need be, so that a device of ``count`` mappings and the commit after it
        fit: its tree (full leaves, as the bulk build makes them), the ref-count tree built anew beside the old one
        (at most a third of the mappings so far can have count >= 3), the data bitmaps it relocates, the metadata
        space map's own bitmaps and a few nodes of the details and top-level trees."""
        from thinpool.btree.bulk import level_plan
        from thinpool.formats.btree_node import calc_max_entries
        from thinpool.formats.space_map import MAX_METADATA_BITMAPS
        from thinpool.spacemap.paged import nr_bitmaps
        from thinpool.units import MAX_METADATA_BLOCKS

        assert self.md is not None
        md = self.md
        leaf, rc_leaf = calc_max_entries(8), calc_max_entries(4)
        nr_data = md.data_sm.nr_blocks
        rc_entries = min(self.nr_mappings // 3, nr_data)
        need = (sum(level_plan(count, leaf, leaf)) if count else 1) + \
            2 * (sum(level_plan(rc_entries, rc_leaf, leaf)) if rc_entries else 1) + \
            min(count, nr_bitmaps(nr_data)) + MAX_METADATA_BITMAPS + 64
        sm = md.tm.sm
        free = sm.nr_blocks - sm.nr_allocated()  # (the CLI commits after each device: nothing freed is held)
        if free < need and sm.nr_blocks < MAX_METADATA_BLOCKS:
            md.resize_metadata(min(sm.nr_blocks + need - free, MAX_METADATA_BLOCKS))
            self.resized += 1

    def size_with_headroom(self) -> None:
        """Grow the metadata device to at least the blocks in use plus the mapping trees once more (the headroom
        thin_metadata_size allows: it sizes mapping leaves half full, where a restore writes them full) plus 1,000
        blocks (its default of 1,000 thin roots); never shrunk. For a new output, after the last commit (commit
        again to make it durable)."""
        from thinpool.formats.btree_node import calc_max_entries
        from thinpool.units import MAX_METADATA_BLOCKS

        assert self.md is not None
        sm = self.md.tm.sm
        want = min(sm.nr_allocated() + -(-self.nr_mappings // calc_max_entries(8)) + 1000, MAX_METADATA_BLOCKS)
        if want > sm.nr_blocks:
            self.md.resize_metadata(want)

    def superblock_e(self) -> None:
        assert self.md is not None and self._sb is not None
        self.md.time = self._sb.time
        self.md.trans_id = self._sb.transaction
        self.md.flags = self._sb.flags
        self.md.sb = self.md.sb.replace(version=self._sb.version)
        self.md.commit()

    def eof(self) -> None:
        pass

    def close(self) -> None:
        """Drop a device's spilled runs (a parse that gave up midway; ``device_e`` drops them itself)."""
        self._spill.close()


def restore(ir: MetadataIR, store: BlockStore) -> PoolMetadata:
    """Write fresh metadata holding ``ir`` onto ``store`` (which is overwritten) and commit it."""
    builder = MetadataBuilder(store)
    ir.replay(builder)
    assert builder.md is not None
    return builder.md
