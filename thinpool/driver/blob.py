"""Layer blobs: decompression by magic number (gzip, zstd), a reader that hashes what passes (the DiffID).

Layer: driver. May import: thinpool.errors.

moby's ``DecompressStream`` picks the decompressor from the first bytes, not from the media type; the same here.
zstd needs the ``zstandard`` package; without it a zstd layer is refused with :class:`MissingDependency`.
"""

from __future__ import annotations

import gzip
import hashlib
from typing import IO, Any

from thinpool.errors import MissingDependency

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
IO_CHUNK = 1 << 20  # bytes per read when draining a stream


def compression_of(head: bytes) -> str:
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    return "none"


def decompressed(f: IO[bytes] | Any, head: bytes | None = None) -> IO[bytes]:
    """``f`` uncompressed; ``head`` is its first bytes if already read (else ``f`` must be seekable, at its start).

    Raises:
        MissingDependency: a zstd stream and no ``zstandard`` package.
    """
    if head is None:
        head = f.read(4)
        f.seek(0)
    kind = compression_of(head)
    if kind == "gzip":
        return gzip.GzipFile(fileobj=f, mode="rb")  # type: ignore[return-value]
    if kind == "zstd":
        try:
            import zstandard
        except ImportError:
            raise MissingDependency(what="a zstd-compressed layer", package="zstandard") from None
        return zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)
    return f


class HashingReader:
    """Reads through ``f``, hashing every byte (sha256) and counting them."""

    def __init__(self, f: IO[bytes] | Any) -> None:
        self.f = f
        self.h = hashlib.sha256()
        self.nr_bytes = 0

    def read(self, n: int = -1) -> bytes:
        b: bytes = self.f.read(n)
        self.h.update(b)
        self.nr_bytes += len(b)
        return b

    def drain(self) -> None:
        """Read (and hash) the rest: the tar's end-of-archive blocks, or whatever follows them."""
        while self.read(IO_CHUNK):
            pass

    @property
    def digest(self) -> str:
        return "sha256:" + self.h.hexdigest()


class EofPadded:
    """Reads ``f`` and, at its end, the zeros a complete tar would have: the last member's padding to 512 bytes
    and the two end-of-archive blocks. umoci 0.4.7's ``insert`` leaves both out (umoci#436); Go's reader accepts
    that, Python's ``tarfile`` would not. The padding never reaches a hash taken inside ``f``."""

    def __init__(self, f: IO[bytes] | Any) -> None:
        self.f = f
        self.pos = 0
        self.tail: bytes | None = None

    def read(self, n: int = -1) -> bytes:
        if self.tail is None:
            b: bytes = self.f.read(n)
            if b or n == 0:
                self.pos += len(b)
                return b
            self.tail = bytes(-self.pos % 512 + 1024)
        n = len(self.tail) if n < 0 else n
        b, self.tail = self.tail[:n], self.tail[n:]
        return b


def sha256_file(f: IO[bytes]) -> str:
    h = hashlib.sha256()
    while True:
        b = f.read(IO_CHUNK)
        if not b:
            return "sha256:" + h.hexdigest()
        h.update(b)


def chain_ids(diff_ids: list[str]) -> list[str]:
    """ChainID(L0) = DiffID(L0); ChainID(Ln) = sha256(ChainID(Ln-1) + " " + DiffID(Ln)) (OCI image-spec)."""
    out: list[str] = []
    for d in diff_ids:
        out.append(d if not out else "sha256:" + hashlib.sha256(f"{out[-1]} {d}".encode()).hexdigest())
    return out
