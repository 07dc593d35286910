"""A sparse, chunked in-memory BlockDevice for the NBD/FUSE tests: discard drops whole chunks (zeroing the
partial edges), ``mapped_ranges`` reports the chunks present. Stands in for the thin device."""

from __future__ import annotations

import threading

from thinpool.io.device import check_bounds

CHUNK = 64 * 1024


class SparseDevice:
    def __init__(self, size: int, chunk: int = CHUNK) -> None:
        self._size = size
        self.chunk = chunk
        self.chunks: dict[int, bytearray] = {}
        self.flushes = 0
        self.discards = 0
        self.discarded_bytes = 0
        self.calls = 0
        self._busy = threading.Lock()  # detects unserialized concurrent use

    def _enter(self) -> None:
        if not self._busy.acquire(blocking=False):
            raise AssertionError("SparseDevice used concurrently: callers must serialize device calls")
        self.calls += 1

    @property
    def size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        check_bounds(self._size, offset, length)
        self._enter()
        try:
            out = bytearray(length)
            pos, end, c = offset, offset + length, self.chunk
            while pos < end:
                idx, within = divmod(pos, c)
                n = min(c - within, end - pos)
                blk = self.chunks.get(idx)
                if blk is not None:
                    out[pos - offset:pos - offset + n] = blk[within:within + n]
                pos += n
            return bytes(out)
        finally:
            self._busy.release()

    def write(self, offset: int, data) -> None:
        data = memoryview(data).cast("B")
        check_bounds(self._size, offset, len(data))
        self._enter()
        try:
            pos, end, c = offset, offset + len(data), self.chunk
            while pos < end:
                idx, within = divmod(pos, c)
                n = min(c - within, end - pos)
                blk = self.chunks.get(idx)
                if blk is None:
                    blk = self.chunks[idx] = bytearray(min(c, self._size - idx * c))
                blk[within:within + n] = data[pos - offset:pos - offset + n]
                pos += n
        finally:
            self._busy.release()

    def _unmap(self, offset: int, length: int) -> None:
        pos, end, c = offset, offset + length, self.chunk
        while pos < end:
            idx, within = divmod(pos, c)
            n = min(c - within, end - pos)
            blk = self.chunks.get(idx)
            if blk is not None:
                if n >= len(blk) or (within == 0 and n == len(blk)):
                    del self.chunks[idx]
                else:
                    blk[within:within + n] = bytes(n)
            pos += n

    def discard(self, offset: int, length: int) -> None:
        check_bounds(self._size, offset, length)
        self._enter()
        try:
            self.discards += 1
            self.discarded_bytes += length
            self._unmap(offset, length)
        finally:
            self._busy.release()

    def write_zeroes(self, offset: int, length: int) -> None:
        check_bounds(self._size, offset, length)
        self._enter()
        try:
            self._unmap(offset, length)
        finally:
            self._busy.release()

    def flush(self) -> None:
        self._enter()
        try:
            self.flushes += 1
        finally:
            self._busy.release()

    def mapped_ranges(self, offset: int = 0, length: int | None = None) -> list[tuple[int, int]]:
        if length is None:
            length = self._size - offset
        end = offset + length
        out: list[list[int]] = []
        for idx in sorted(self.chunks):
            s = max(idx * self.chunk, offset)
            e = min(idx * self.chunk + len(self.chunks[idx]), end)
            if e <= s:
                continue
            if out and out[-1][0] + out[-1][1] == s:
                out[-1][1] += e - s
            else:
                out.append([s, e - s])
        return [(s, n) for s, n in out]

    def getvalue(self) -> bytes:
        return self.read(0, self._size)
