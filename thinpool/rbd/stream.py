"""Ceph RBD stream formats: ``rbd diff v1`` / ``v2`` records and the ``--export-format 2`` image container.

Layer: rbd. May import: errors.

Facts from Ceph's ``doc/dev/rbd-diff.rst`` and ``doc/dev/rbd-export.rst`` (checked against pacific 16.2.15 output;
see docs/ceph-rbd.md). Integers are little-endian; a string is a le32 length and the bytes (no NUL).

rbd diff v1::

    "rbd diff v1\\n"                          12-byte banner
    'f' le32 n, name                          from-snapshot (optional)
    't' le32 n, name                          to-snapshot (optional)
    's' le64                                  image size (bytes) at the end of the diff
    'w' le64 offset, le64 length, data        data (bytes)
    'z' le64 offset, le64 length              zeros (bytes)
    'e'                                       end

rbd diff v2 (inside export-format 2): banner ``"rbd diff v2\\n"``; every record but ``e`` is the tag, a le64 payload
length and the payload; a ``p`` record (1 byte: the snapshot is protected) may follow ``t`` (pacific announces a
length of 8 for it but writes 1 byte, so a reader reads exactly 1).

export-format 2: ``"rbd image v2\\n"``; ``O`` order, ``T`` features, ``U`` stripe unit, ``C`` stripe count (le64
each), ``M`` metadata (le32 klen, key, le32 vlen, value), each tag + le64 length + payload; ``E``;
``"rbd image diffs v2\\n"``; le64 N; N v2 diffs (the first without ``f``, the last is HEAD, without ``t``).

The parser is strict where Ceph's writers are regular (what ``rbd merge-diff`` also insists on): header records
(f, t, p, s; each at most once, ``s`` required) come before any extent, extents are ascending, non-overlapping,
not empty and inside the size, and ``e`` ends the stream. Every error names the byte offset where the stream
broke (``RbdStreamError``).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO, Final

from thinpool.errors import InvalidArgument, RbdStreamError

DIFF_BANNER_V1: Final = b"rbd diff v1\n"
DIFF_BANNER_V2: Final = b"rbd diff v2\n"
IMAGE_BANNER_V2: Final = b"rbd image v2\n"
IMAGE_DIFFS_BANNER_V2: Final = b"rbd image diffs v2\n"

TAG_FROM: Final = b"f"
TAG_TO: Final = b"t"
TAG_PROTECTED: Final = b"p"
TAG_SIZE: Final = b"s"
TAG_WRITE: Final = b"w"
TAG_ZERO: Final = b"z"
TAG_END: Final = b"e"

IMG_ORDER: Final = b"O"
IMG_FEATURES: Final = b"T"
IMG_STRIPE_UNIT: Final = b"U"
IMG_STRIPE_COUNT: Final = b"C"
IMG_META: Final = b"M"
IMG_END: Final = b"E"

DEFAULT_ORDER: Final = 22  # RBD_DEFAULT_OBJ_ORDER: 4 MiB objects
OBJECT_SIZE: Final = 1 << DEFAULT_ORDER  # bytes; Ceph's export-diff never lets a record cross an object boundary
# pacific's rbd_default_features: layering, exclusive-lock, object-map, fast-diff, deep-flatten
DEFAULT_FEATURES: Final = 1 | 4 | 8 | 16 | 32
MAX_NAME: Final = 4096  # bytes; Ceph's read_string limit for snapshot names

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_EXTENT = struct.Struct("<QQ")


# --- records --------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class DiffHeader:
    """What a diff says before its extents."""

    from_snap: str | None
    to_snap: str | None
    size: int  # bytes, the image size at the end of the diff
    protected: bool = False


@dataclass(frozen=True, slots=True)
class Extent:
    """One ``w`` or ``z`` record; ``data_pos`` is the stream byte offset of a ``w`` record's data."""

    kind: str  # "w" | "z"
    offset: int  # bytes
    length: int  # bytes
    data_pos: int = -1


@dataclass(slots=True)
class DiffSummary:
    """A validated diff: its header, record counts and where it lies in the stream (byte offsets)."""

    header: DiffHeader
    version: int
    start: int
    end: int
    writes: int = 0
    zeros: int = 0
    data_bytes: int = 0
    zero_bytes: int = 0

    @property
    def records(self) -> int:
        return self.writes + self.zeros


@dataclass(slots=True)
class ImageSummary:
    """A validated export-format 2 stream."""

    order: int
    features: int
    stripe_unit: int
    stripe_count: int
    meta: dict[str, str] = field(default_factory=dict)
    diffs: list[DiffSummary] = field(default_factory=list)
    end: int = 0


# --- reading --------------------------------------------------------------------------------------------------
class StreamReader:
    """Position-tracking reads from a seekable binary file; every short read is an ``RbdStreamError``."""

    def __init__(self, f: BinaryIO, *, kind: str = "rbd diff") -> None:
        self.f = f
        self.kind = kind
        self.pos = f.tell()
        end = f.seek(0, os.SEEK_END)
        f.seek(self.pos)
        self.size = end

    def fail(self, reason: str, offset: int | None = None) -> RbdStreamError:
        return RbdStreamError(offset=self.pos if offset is None else offset, reason=reason, kind=self.kind)

    def read(self, n: int, what: str) -> bytes:
        at = self.pos
        if at + n > self.size:
            raise self.fail(f"truncated in {what} (needs {n} bytes, {max(self.size - at, 0)} left)", at)
        self.f.seek(at)
        b = self.f.read(n)
        if len(b) != n:
            raise self.fail(f"truncated in {what} (needs {n} bytes, read {len(b)})", at)
        self.pos = at + n
        return b

    def skip(self, n: int, what: str) -> int:
        """Skip ``n`` bytes without reading them; returns where they start."""
        at = self.pos
        if at + n > self.size:
            raise self.fail(f"truncated in {what} (needs {n} bytes, {max(self.size - at, 0)} left)", at)
        self.pos = at + n
        return at

    def u64(self, what: str) -> int:
        return int(_U64.unpack(self.read(8, what))[0])

    def string(self, what: str, limit: int = MAX_NAME) -> str:
        at = self.pos
        n = int(_U32.unpack(self.read(4, what + " length"))[0])
        if n > limit:
            raise self.fail(f"{what} length {n} is over the {limit}-byte limit", at)
        raw = self.read(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8", at + 4) from None

    def pread(self, pos: int, n: int) -> bytes:
        self.f.seek(pos)
        b = self.f.read(n)
        if len(b) != n:
            raise self.fail(f"truncated data (needs {n} bytes at {pos})", pos)
        return b


def iter_diff(r: StreamReader, version: int = 1) -> Iterator[DiffHeader | Extent]:
    """Parse one diff at the reader's position: yields its ``DiffHeader`` (before the first extent), then each
    ``Extent`` in stream order; returns after ``e``. Data is skipped, not read (``Extent.data_pos`` says where).

    Raises:
        RbdStreamError: bad banner, unknown or repeated tag, bad length, an extent out of order, empty or past
            the size, a truncated stream (the ``offset`` is where it broke).
    """
    banner = DIFF_BANNER_V1 if version == 1 else DIFF_BANNER_V2
    at = r.pos
    got = r.read(len(banner), "banner") if r.pos + len(banner) <= r.size else r.read(r.size - r.pos, "banner")
    if got != banner:
        if got.startswith(b"rbd diff v"):
            raise r.fail(f"unsupported banner {got!r} (expected {banner!r})", at)
        raise r.fail(f"not an rbd diff: banner {got!r} (expected {banner!r})", at)
    seen: dict[bytes, object] = {}
    header: DiffHeader | None = None
    prev_end = 0
    while True:
        tag_at = r.pos
        tag = r.read(1, "record tag")
        if tag == TAG_END:
            if header is None:
                if TAG_SIZE not in seen:
                    raise r.fail("end record before the image size record 's'", tag_at)
                yield _header(seen)
            return
        length = r.u64(f"length of record {tag.decode('latin-1')!r}") if version == 2 else -1
        if tag in (TAG_FROM, TAG_TO, TAG_SIZE, TAG_PROTECTED):
            if header is not None:
                raise r.fail(f"header record {tag.decode()!r} after the first extent", tag_at)
            if tag in seen:
                raise r.fail(f"record {tag.decode()!r} repeated", tag_at)
            body_at = r.pos
            if tag == TAG_SIZE:
                seen[tag] = r.u64("image size")
            elif tag == TAG_PROTECTED:
                seen[tag] = r.read(1, "protection status")[0] != 0
            else:
                seen[tag] = r.string("from-snapshot name" if tag == TAG_FROM else "to-snapshot name")
            if version == 2 and tag != TAG_PROTECTED and r.pos - body_at != length:
                raise r.fail(f"record {tag.decode()!r} says {length} bytes, holds {r.pos - body_at}", tag_at)
            continue
        if tag in (TAG_WRITE, TAG_ZERO):
            if header is None:
                if TAG_SIZE not in seen:
                    raise r.fail("extent before the image size record 's'", tag_at)
                header = _header(seen)
                yield header
            offset, n = _EXTENT.unpack(r.read(16, "extent offset and length"))
            if version == 2:
                want = 16 + (n if tag == TAG_WRITE else 0)
                if length != want:
                    raise r.fail(f"record {tag.decode()!r} says {length} bytes, holds {want}", tag_at)
            if n == 0:
                raise r.fail(f"zero-length {tag.decode()!r} record at image offset {offset}", tag_at)
            if offset < prev_end:
                raise r.fail(f"{tag.decode()!r} record at image offset {offset} is out of order "
                             f"(previous record ends at {prev_end})", tag_at)
            if offset + n > header.size:
                raise r.fail(f"{tag.decode()!r} record {offset}+{n} goes past the image size {header.size}", tag_at)
            prev_end = offset + n
            if tag == TAG_WRITE:
                yield Extent("w", offset, n, r.skip(n, "write data"))
            else:
                yield Extent("z", offset, n)
            continue
        if version == 2:  # as Ceph: skip a tag it does not know, by its length
            r.skip(length, f"unknown record {tag!r}")
            continue
        raise r.fail(f"unknown record tag {tag!r}", tag_at)


def _header(seen: dict[bytes, object]) -> DiffHeader:
    return DiffHeader(from_snap=seen.get(TAG_FROM), to_snap=seen.get(TAG_TO),  # type: ignore[arg-type]
                      size=int(seen[TAG_SIZE]), protected=bool(seen.get(TAG_PROTECTED, False)))  # type: ignore[call-overload]


def scan_diff(r: StreamReader, version: int = 1) -> DiffSummary:
    """Validate one diff's framing (O(records); data is skipped) and count what it holds."""
    start = r.pos
    summary: DiffSummary | None = None
    for rec in iter_diff(r, version):
        if isinstance(rec, DiffHeader):
            summary = DiffSummary(rec, version, start, 0)
        elif summary is not None:
            if rec.kind == "w":
                summary.writes += 1
                summary.data_bytes += rec.length
            else:
                summary.zeros += 1
                summary.zero_bytes += rec.length
    assert summary is not None
    summary.end = r.pos
    return summary


def validate_diff(f: BinaryIO) -> DiffSummary:
    """Validate a whole v1 diff stream from its start (nothing may follow ``e``)."""
    r = StreamReader(f)
    s = scan_diff(r, 1)
    if r.pos != r.size:
        raise r.fail(f"{r.size - r.pos} bytes of trailing data after the end record")
    return s


def scan_image(f: BinaryIO) -> ImageSummary:
    """Validate a whole export-format 2 stream: header, every diff, and the snapshot chain.

    Raises:
        RbdStreamError: as ``iter_diff``, plus a broken chain (a diff's from-snapshot is not the previous diff's
            to-snapshot, the first diff has a from-snapshot, the last has a to-snapshot).
    """
    r = StreamReader(f, kind="rbd export-format 2")
    at = r.pos
    got = r.read(min(len(IMAGE_BANNER_V2), r.size - r.pos), "image banner")
    if got != IMAGE_BANNER_V2:
        raise r.fail(f"not an rbd export-format 2 image: banner {got!r} (expected {IMAGE_BANNER_V2!r})", at)
    img = ImageSummary(order=DEFAULT_ORDER, features=DEFAULT_FEATURES, stripe_unit=OBJECT_SIZE, stripe_count=1)
    while True:
        tag_at = r.pos
        tag = r.read(1, "image record tag")
        if tag == IMG_END:
            break
        length = r.u64(f"length of image record {tag!r}")
        body_at = r.pos
        if tag in (IMG_ORDER, IMG_FEATURES, IMG_STRIPE_UNIT, IMG_STRIPE_COUNT):
            if length != 8:
                raise r.fail(f"image record {tag.decode()!r} says {length} bytes, expected 8", tag_at)
            v = r.u64(f"image record {tag.decode()!r}")
            if tag == IMG_ORDER:
                if not 12 <= v <= 26:
                    raise r.fail(f"object order {v} out of range 12..26", body_at)
                img.order = v
            elif tag == IMG_FEATURES:
                img.features = v
            elif tag == IMG_STRIPE_UNIT:
                img.stripe_unit = v
            else:
                img.stripe_count = v
        elif tag == IMG_META:
            key = r.string("metadata key", limit=1 << 20)
            val = r.string("metadata value", limit=1 << 24)
            if r.pos - body_at != length:
                raise r.fail(f"metadata record says {length} bytes, holds {r.pos - body_at}", tag_at)
            img.meta[key] = val
        else:
            r.skip(length, f"unknown image record {tag!r}")
    at = r.pos
    got = r.read(min(len(IMAGE_DIFFS_BANNER_V2), r.size - r.pos), "diffs banner")
    if got != IMAGE_DIFFS_BANNER_V2:
        raise r.fail(f"bad diffs banner {got!r} (expected {IMAGE_DIFFS_BANNER_V2!r})", at)
    at = r.pos
    n = r.u64("number of diffs")
    if n == 0 or n > 1 << 20:
        raise r.fail(f"implausible number of diffs {n}", at)
    prev: str | None = None
    for i in range(n):
        s = scan_diff(r, 2)
        h = s.header
        if h.from_snap != prev:
            raise r.fail(f"diff {i + 1} of {n} starts at snapshot {h.from_snap!r}, expected {prev!r}", s.start)
        if i < n - 1 and h.to_snap is None:
            raise r.fail(f"diff {i + 1} of {n} has no to-snapshot (only the last, HEAD, may lack one)", s.start)
        if i == n - 1 and h.to_snap is not None:
            raise r.fail(f"the last diff (HEAD) names a to-snapshot {h.to_snap!r}", s.start)
        prev = h.to_snap
        img.diffs.append(s)
    if r.pos != r.size:
        raise r.fail(f"{r.size - r.pos} bytes of trailing data after the last diff")
    img.end = r.pos
    return img


# --- writing --------------------------------------------------------------------------------------------------
class DiffWriter:
    """Writes one diff (v1, or v2 inside export-format 2) to a binary file, enforcing what readers require:
    extents ascending, non-overlapping, not empty, inside the size. Counts records and bytes."""

    def __init__(self, out: BinaryIO, *, version: int = 1) -> None:
        self.out = out
        self.version = version
        self.size = -1
        self.next_offset = 0
        self.bytes_out = 0
        self.writes = 0
        self.zeros = 0
        self.data_bytes = 0
        self.zero_bytes = 0
        self.ended = False

    def _put(self, b: bytes | memoryview) -> None:
        self.out.write(b)
        self.bytes_out += len(b)

    def _record(self, tag: bytes, payload: bytes) -> None:
        if self.version == 2:
            self._put(tag + _U64.pack(len(payload)) + payload)
        else:
            self._put(tag + payload)

    def header(self, *, size: int, from_snap: str | None = None, to_snap: str | None = None,
               protected: bool = False) -> None:
        self._put(DIFF_BANNER_V1 if self.version == 1 else DIFF_BANNER_V2)
        for tag, name in ((TAG_FROM, from_snap), (TAG_TO, to_snap)):
            if name is not None:
                raw = name.encode("utf-8")
                if len(raw) > MAX_NAME:
                    raise InvalidArgument(reason=f"snapshot name {name!r} is longer than {MAX_NAME} bytes")
                self._record(tag, _U32.pack(len(raw)) + raw)
        if to_snap is not None and self.version == 2:
            self._record(TAG_PROTECTED, b"\x01" if protected else b"\x00")
        self._record(TAG_SIZE, _U64.pack(size))
        self.size = size

    def _check(self, offset: int, length: int) -> None:
        if self.size < 0 or self.ended:
            raise InvalidArgument(reason="diff extent outside header..end")
        if length <= 0 or offset < self.next_offset or offset + length > self.size:
            raise InvalidArgument(reason=f"diff extent {offset}+{length} is empty, out of order or past the size "
                                         f"{self.size} (next offset {self.next_offset})")
        self.next_offset = offset + length

    def write(self, offset: int, data: bytes | memoryview) -> None:
        n = len(data)
        self._check(offset, n)
        if self.version == 2:
            self._put(TAG_WRITE + _U64.pack(16 + n) + _EXTENT.pack(offset, n))
        else:
            self._put(TAG_WRITE + _EXTENT.pack(offset, n))
        self._put(data)
        self.writes += 1
        self.data_bytes += n

    def zero(self, offset: int, length: int) -> None:
        self._check(offset, length)
        self._record(TAG_ZERO, _EXTENT.pack(offset, length))
        self.zeros += 1
        self.zero_bytes += length

    def end(self) -> None:
        self._put(TAG_END)
        self.ended = True

    @property
    def records(self) -> int:
        return self.writes + self.zeros


def write_image_header(out: BinaryIO, *, order: int = DEFAULT_ORDER, features: int = DEFAULT_FEATURES,
                       stripe_unit: int = OBJECT_SIZE, stripe_count: int = 1, meta: dict[str, str] | None = None,
                       nr_diffs: int) -> int:
    """The export-format 2 prefix up to and including the number of diffs; returns the bytes written."""
    parts = [IMAGE_BANNER_V2]
    for tag, num in ((IMG_ORDER, order), (IMG_FEATURES, features), (IMG_STRIPE_UNIT, stripe_unit),
                     (IMG_STRIPE_COUNT, stripe_count)):
        parts.append(tag + _U64.pack(8) + _U64.pack(num))
    for k, v in sorted((meta or {}).items()):
        kb, vb = k.encode(), v.encode()
        body = _U32.pack(len(kb)) + kb + _U32.pack(len(vb)) + vb
        parts.append(IMG_META + _U64.pack(len(body)) + body)
    parts.append(IMG_END)
    parts.append(IMAGE_DIFFS_BANNER_V2)
    parts.append(_U64.pack(nr_diffs))
    b = b"".join(parts)
    out.write(b)
    return len(b)
