"""ThinDevice: byte-addressed I/O on one thin device with dm-thin's data-path semantics.

Layer: thin. May import: errors, units, io, metadata.

The device reaches the metadata only through its per-device handle (metadata/thin_device.py, the kernel's
dm_thin_device) and allocates data blocks through the pool (the DataAllocator of that module).

- Unprovisioned chunks read as zeros (or the external origin's bytes); reads never allocate or copy.
- The first write to a chunk allocates one; the part of the chunk not written is zeroed unless zeroing is off
  (a hole is punched, which reads as zeros and keeps the data file sparse); a whole-chunk write needs no zeroing.
- A write to a chunk that may be shared (the mapping's time is older than the device's snapshotted_time, the
  kernel's __snapshotted_since) copies the chunk to a new one, applies the write and remaps; the old chunk loses
  a reference.
- Deferred copy-on-write: a sector-aligned write inside one shared chunk allocates the new block, writes only
  its own bytes there and remaps at once, recording the chunk as pending (PoolMetadata.pending_copies: the shared
  block and a bitmap of the 512-byte sectors written since). Later writes to it add their sectors; once every
  sector was written the copy is dropped (a whole-chunk overwrite copies nothing, as dm-thin's). The sectors never
  written are copied from the shared block (one copy_file_range per gap run) before anything else may see the
  new block: a read of the chunk, the commit that makes its mapping durable (so every FLUSH/FUA), any change of
  the device table (snapshot, delete, merge...), or an unaligned write into it. A break that finds the
  device's table of pending chunks full is not deferred (it copies around its piece at once). Until that
  commit a crash leaves the old mapping, whose block is intact: a block the last commit references is not
  reused, nor punched, before the next commit. A discard or delete of a pending chunk drops it (its mapping and
  new block go away).
- discard unmaps whole chunks inside the range (a partial chunk is left alone, as dm-thin does); with passdown,
  chunks whose count reaches 0 get a hole punched at the next commit.
- A write that would need more chunks than are free is refused whole (NoDataSpace) before anything changes.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from typing import TYPE_CHECKING, cast

from thinpool.errors import DeviceNotFound, InvalidArgument, NoMetadataSpace
from thinpool.io.data_store import DataStore
from thinpool.io.device import check_bounds, new_bytes, zero_fill
from thinpool.units import SECTOR_SIZE, lazy_module

if TYPE_CHECKING:
    import numpy as np

    from thinpool.metadata.thin_device import MappingCache
    from thinpool.pool import Pool
else:
    np = lazy_module("numpy")


_SCRATCH_MAX_BYTES = 4 << 20  # read() gathers scattered pieces of reads up to this size in a kept buffer
_GATHER_IN_PLACE_BYTES = 128 << 10  # a scattered read from this size on fills its bytes object in place
_PLAN_CACHED_CHUNKS = 64  # a read of up to this many chunks looks each one up in the mapping cache
PENDING_MAX_BYTES = 256 << 20  # chunks whose copy a device defers, in bytes of chunks (at least one chunk)
DEFER_COPIES = True  # defer the copy of a shared chunk a sector-aligned write breaks (module docstring)
_WHOLE_FIRST_WRITE_BYTES = 128 << 10  # chunks up to this size take a deferred break's first write whole
_SECTOR_MASK = SECTOR_SIZE - 1
_MASKS: dict[int, list[int]] = {}  # chunk bytes -> _four_k_masks (shared by the devices of every pool)


def _four_k_masks(chunk: int) -> list[int] | None:
    """The pending-chunk bits of a 4 KiB write at each sector of a chunk (entry i: sectors i..i+7; past the end of
    the chunk: never used), for chunks up to _WHOLE_FIRST_WRITE_BYTES; None for larger chunks (the table would
    grow as the square of the chunk: the bits are then computed per write)."""
    if chunk > _WHOLE_FIRST_WRITE_BYTES:
        return None
    m = _MASKS.get(chunk)
    if m is None:
        m = _MASKS[chunk] = [0xFF << i for i in range(chunk // SECTOR_SIZE)]
    return m


class ThinDevice:
    """A thin device of ``size`` bytes in ``pool`` (implements thinpool.io.device.BlockDevice)."""

    def __init__(self, pool: Pool, dev_id: int) -> None:
        self.pool = pool
        self.dev_id = dev_id
        self.chunk = pool.chunk_bytes
        self.md = pool.md.device(dev_id)
        # how a mapping-cache value packs (data block << bits | time), as instance attributes: the I/O paths read
        # them on every call, and a class attribute read through an instance is a type lookup each time (3.11)
        self._tbits, self._tmask = self.md.TIME_BITS, self.md.TIME_MASK
        self._lock_acquire, self._lock_release = pool.lock.acquire, pool.lock.release
        self._pend = pool.md.pending_copies(dev_id)  # the deferred copies (see the module docstring)
        self._pend_max = max(1, PENDING_MAX_BYTES // self.chunk)
        self._full = (1 << (self.chunk // SECTOR_SIZE)) - 1  # every sector of a chunk
        self._m4 = _four_k_masks(self.chunk)  # the sectors of a 4 KiB write at each sector (small chunks only)
        self._scratch: bytearray | None = None  # read()'s gather buffer (used under the pool lock)
        self._zbuf: bytearray | None = None  # a chunk of zeros for a deferred break's first write (pool lock)
        self._mc: MappingCache | None = None  # the device's mapping cache while it stays valid
        self._manifest: object = None  # the pool manifest ``_size`` was read from
        self._size = 0

    def __repr__(self) -> str:
        return f"ThinDevice(dev_id={self.dev_id}, size={self.size})"

    @property
    def size(self) -> int:
        return self.pool.device_size(self.dev_id)

    @property
    def name(self) -> str:
        return self.pool.device_name(self.dev_id)

    # --- reading ----------------------------------------------------------------------------------------------
    def _cache(self) -> MappingCache:
        """The device's mapping cache, fetched again once the metadata dropped the one held."""
        mc = self._mc
        if mc is None or not mc.valid:
            mc = self._mc = self.md.cache()
        return mc

    def _size_now(self) -> int:
        """The device's size; re-read only when the pool's manifest changed (every change of the device table
        installs a new manifest object), so the I/O paths do not walk the manifest on every call."""
        m = self.pool.manifest
        if m is not self._manifest:
            self._size = self.pool.device_size(self.dev_id)
            self._manifest = m
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        """The bytes of [offset, offset+length). Inside one chunk: a mapping-cache hit (no tree walk) and one
        pread; wider: one range lookup, and a range that is one physically contiguous run (or one hole) is a
        single pread (or one zeroed allocation) with no further copy."""
        pool = self.pool
        size = self._size if pool.manifest is self._manifest else self._size_now()
        if offset < 0 or length <= 0 or offset + length > size:
            check_bounds(size, offset, length)
            return b""
        ch = self.chunk
        first = offset // ch
        if (offset + length - 1) // ch == first:
            mc = self._mc
            if mc is not None and mc.valid:
                # Optimistic, without the pool lock (a seqlock): read through the cached mapping, then keep the
                # bytes only if nothing could have given the block to someone else meanwhile. A data block is
                # reused only after its mapping went away (remove_range, delete, abort: each drops the cache, so
                # ``valid`` is False) or after a commit (a new ``pmd.sb``); both are done under the pool lock
                # before any reuse, so a read that sees neither read the block while it still held this mapping.
                # A copy-on-write replacing a shared mapping can free a block too, but only one the last commit
                # uses (sharing comes from a snapshot, and Pool.create_snap commits), which is not handed out
                # again before the next commit; PoolMetadata.delete_thin drops every device's cache besides.
                # A pending copy-on-write (deferred, see the module docstring) is registered before its new
                # mapping enters the cache and forgotten only once complete (or after the cache was dropped),
                # so a mapping seen here with no pending entry after it reads complete bytes.
                sb = mc.pmd.sb
                v = mc.map.get(first)
                if v is not None and not (self._pend and first in self._pend):
                    out = pool.data.pread((v >> self._tbits) * ch + offset - first * ch, length)
                    if mc.valid and mc.pmd.sb is sb:
                        return out
        with pool.lock:
            if self._pend:
                self._settle(offset, offset + length)
            if (offset + length - 1) // ch == first:  # inside one chunk: one cached lookup, one pread
                mc = self._cache()
                v = mc.find(first)
                if v is None:
                    return self._unprovisioned(offset, length)
                return pool.data.pread((v >> self._tbits) * ch + offset - first * ch, length)
            return self._read(offset, length)

    def readinto(self, offset: int, buf: bytearray | memoryview) -> int:
        """Read ``len(buf)`` bytes at ``offset`` straight into ``buf`` (zero-copy: preads into slices of it, holes
        zeroed in place). Returns the number of bytes read (always ``len(buf)``)."""
        view = memoryview(buf)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        length = len(view)
        pool = self.pool
        size = self._size if pool.manifest is self._manifest else self._size_now()
        if offset < 0 or offset + length > size:
            check_bounds(size, offset, length)
        if not length:
            return 0
        ch = self.chunk
        first = offset // ch
        if (offset + length - 1) // ch == first:
            mc = self._mc
            if mc is not None and mc.valid:  # optimistic, without the lock: see read()
                sb = mc.pmd.sb
                v = mc.map.get(first)
                if v is not None and not (self._pend and first in self._pend):
                    pool.data.preadinto((v >> self._tbits) * ch + offset - first * ch, view)
                    if mc.valid and mc.pmd.sb is sb:
                        return length
        with pool.lock:
            if self._pend:
                self._settle(offset, offset + length)
            if (offset + length - 1) // ch == first:  # inside one chunk: one cached lookup
                mc = self._cache()
                v = mc.find(first)
                if v is None:
                    plan = [[0, length, -1]]
                else:
                    plan = [[0, length, (v >> self._tbits) * ch + offset - first * ch]]
            else:
                plan = self._plan(offset, length)
            self._fill(view, offset, plan)
        return length

    def _read(self, offset: int, length: int) -> bytes:
        ch = self.chunk
        plan = self._plan(offset, length)
        if len(plan) == 1:
            file_off = plan[0][2]
            if file_off < 0:
                return self._unprovisioned(offset, length)
            return self.pool.data.pread(file_off, length)
        # pieces from several places: a large read fills a new bytes object in place (no copy out), a small one
        # is gathered in a buffer kept by the device (a fresh one would be zeroed, then page-faulted in, on every
        # read: glibc gives large freed blocks back to the kernel) and copied out once
        if length >= _GATHER_IN_PLACE_BYTES and (made := new_bytes(length)) is not None:
            out, view = made
            try:
                self._fill(view, offset, plan)
            finally:
                view.release()
            return out
        if length > _SCRATCH_MAX_BYTES:
            big = bytearray(length)
            self._fill(memoryview(big), offset, plan)
            return bytes(big)
        scratch = self._scratch
        if scratch is None or len(scratch) < length:
            scratch = self._scratch = bytearray(max(length, ch))
        with memoryview(scratch) as mv, mv[:length] as view:
            self._fill(view, offset, plan)
            return bytes(view)

    def _plan(self, offset: int, length: int) -> list[list[int]]:
        """[buffer offset, length, data file offset or -1 (unprovisioned)] pieces covering [offset, offset+length),
        from one range lookup; physically contiguous mapped chunks (and adjacent holes) are merged into one piece."""
        ch = self.chunk
        end = offset + length
        first, last = offset // ch, (end - 1) // ch
        if last - first < _PLAN_CACHED_CHUNKS:  # a few chunks: cached lookups (no tree walk, no arrays)
            mc = self._cache()
            try:  # every chunk a hit: the values straight from the cache's dict (no Python loop)
                vals = list(map(mc.map.__getitem__, range(first, last + 1)))
            except KeyError:  # unmapped, or not cached yet: the cache's full lookup for those
                get, find, shift = mc.map.get, mc.find, self._tbits
                maybe = [get(c) for c in range(first, last + 1)]
                maybe = [find(first + i) if v is None else v for i, v in enumerate(maybe)]
                if None in maybe:
                    return self._plan_pieces(offset, end, first, maybe, shift)
                vals = cast("list[int]", maybe)
            return self._plan_mapped(offset, length, first, vals)
        else:
            k, d, _ = self.md.find_mapped_range(first, last + 1)
            thin_blocks, data_blocks = k.tolist(), d.tolist()
        nr = len(data_blocks)
        if not nr:
            return [[0, length, -1]]
        d0 = data_blocks[0]
        if (nr == last - first + 1 and data_blocks[-1] - d0 == nr - 1
                and (nr < 3 or data_blocks == list(range(d0, d0 + nr)))):  # one contiguous run: one pread
            return [[0, length, d0 * ch + offset - first * ch]]
        plan: list[list[int]] = []
        pos = offset
        for c, db in zip(thin_blocks, data_blocks):
            cs = c * ch
            if cs > pos:
                plan.append([pos - offset, cs - pos, -1])
                pos = cs
            n = min(cs + ch, end) - pos
            file_off = db * ch + pos - cs
            if plan and (prev := plan[-1])[2] >= 0 and prev[2] + prev[1] == file_off:
                prev[1] += n
            else:
                plan.append([pos - offset, n, file_off])
            pos += n
        if pos < end:
            plan.append([pos - offset, end - pos, -1])
        return plan

    def _plan_mapped(self, offset: int, length: int, first: int, vals: list[int]) -> list[list[int]]:
        """_plan's pieces when every chunk from ``first`` on is mapped (``vals``: their packed mappings): one
        piece per run of consecutive data blocks (a contiguous range is one piece). Per chunk one shift and one
        comparison; the arithmetic is per piece."""
        ch, shift = self.chunk, self._tbits
        head = offset - first * ch  # the read's offset inside its first chunk
        d0 = nxt = vals[0] >> shift
        s = 0  # the first chunk (index into vals) of the current run, whose data block is d0
        plan: list[list[int]] = []
        for i, v in enumerate(vals):
            d = v >> shift
            if d != nxt:  # the run of chunks s..i-1 ends: its piece [buffer start, buffer end, file offset]
                plan.append([s * ch - head if s else 0, i * ch - head, d0 * ch + (0 if s else head)])
                s, d0 = i, d
            nxt = d + 1
        plan.append([s * ch - head if s else 0, length, d0 * ch + (0 if s else head)])
        for p in plan:  # [buffer start, buffer end, file offset] -> [buffer start, length, file offset]
            p[1] -= p[0]
        return plan

    def _plan_pieces(self, offset: int, end: int, first: int, vals: list[int | None], shift: int) -> list[list[int]]:
        """_plan's pieces from the packed mapping of each chunk from ``first`` on (None: unmapped)."""
        ch = self.chunk
        plan: list[list[int]] = []
        pos = offset
        cs = first * ch
        prev: list[int] = [0, 0, -2]  # the piece being extended ([2] == -2: none yet)
        prev_end = -1  # file offset just past prev (when it is mapped)
        for v in vals:
            pe = cs + ch
            if pe > end:
                pe = end
            n = pe - pos
            if v is None:
                if prev[2] == -1:
                    prev[1] += n
                else:
                    prev = [pos - offset, n, -1]
                    plan.append(prev)
            else:
                fo = (v >> shift) * ch + pos - cs
                if fo == prev_end and prev[2] >= 0:
                    prev[1] += n
                else:
                    prev = [pos - offset, n, fo]
                    plan.append(prev)
                prev_end = fo + n
            pos = pe
            cs += ch
        return plan

    def _fill(self, view: memoryview, offset: int, plan: list[list[int]]) -> None:
        data = self.pool.data
        if len(plan) > 1 and type(data) is DataStore:  # the file store: every mapped piece in one call
            mapped = [p for p in plan if p[2] >= 0]
            data.preadinto_pieces(view, mapped)
            if len(mapped) == len(plan):
                return
            plan = [p for p in plan if p[2] < 0]
        for boff, n, file_off in plan:
            piece = view[boff:boff + n]
            if file_off >= 0:
                data.preadinto(file_off, piece)
                continue
            origin = self.pool.external_origin(self.dev_id)
            if origin is None:
                zero_fill(piece)
            else:
                piece[:] = origin.read_at(offset + boff, n)

    def _unprovisioned(self, start: int, n: int) -> bytes:
        """The bytes of unprovisioned [start, start+n): zeros, or the external origin's bytes."""
        origin = self.pool.external_origin(self.dev_id)
        if origin is None:
            return bytes(n)
        return origin.read_at(start, n)

    def mapped_ranges(self, offset: int = 0, length: int | None = None) -> list[tuple[int, int]]:
        """Byte ranges holding data (provisioned chunks, plus the external origin's extent), merged."""
        size = self.size
        if length is None:
            length = size - offset
        check_bounds(size, offset, length)
        ch = self.chunk
        with self.pool.lock:
            k, _, _ = self.md.find_mapped_range(offset // ch, -(-(offset + length) // ch))
        ranges: list[tuple[int, int]] = []
        if len(k):
            k = k.astype(np.int64)
            brk = np.flatnonzero(np.diff(k) != 1) + 1
            starts = np.concatenate([[0], brk])
            ends = np.concatenate([brk, [len(k)]])
            for s, e in zip(starts.tolist(), ends.tolist()):
                ranges.append((int(k[s]) * ch, int(k[e - 1] + 1) * ch))
        origin = self.pool.external_origin(self.dev_id)
        if origin is not None:
            ranges.append((0, origin.size))
        lo, hi = offset, offset + length
        clipped = sorted((max(a, lo), min(b, hi, size)) for a, b in ranges if min(b, hi, size) > max(a, lo))
        merged: list[tuple[int, int]] = []
        for a, b in clipped:
            if merged and a <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b))
            else:
                merged.append((a, b))
        return [(a, b - a) for a, b in merged]

    # --- writing ----------------------------------------------------------------------------------------------
    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at ``offset`` (see the module docstring for provisioning and copy-on-write). An
        overwrite inside one chunk the device owns (mapped at or after its snapshot time) is a mapping-cache hit
        and one pwrite: the bounds one chained comparison, the pool's state a few attribute tests inline (the
        slow check only when one fails), no further call but the store's pwrite."""
        if type(data) is not bytes and type(data) is not bytearray:
            data = memoryview(data).cast("B")  # any buffer: sized (and written) in bytes
        end = offset + len(data)
        pool = self.pool
        if pool.manifest is not self._manifest:
            self._size_now()
        if not 0 <= offset < end <= self._size:
            check_bounds(self._size, offset, end - offset)
            return  # an empty write
        ch = self.chunk
        first = offset // ch
        o = offset - first * ch
        hint: tuple[int, int] | None = None
        self._lock_acquire()  # pool.lock (explicit: cheaper than a with block on this path)
        try:
            pmd = pool.md
            # Pool.check_writable, inline: _rw is "open, not read-only (pool and metadata), not failed"; any
            # superblock flag (needs_check is the only one dm-thin defines) takes the full check
            if not pool._rw or pmd.failed or pmd.flags:
                pool.check_writable()
            if o + end - offset <= ch:  # inside one chunk
                mc = self._mc
                if mc is None or not mc.valid:
                    mc = self._cache()
                v = mc.map.get(first)
                if v is not None:
                    if v & self._tmask >= mc.details.snapshotted_time:  # owned: an overwrite in place
                        pend = self._pend
                        if pend and (e := pend.get(first)) is not None:  # a pending chunk (_note_written inline)
                            n = end - offset
                            if not (o | n) & _SECTOR_MASK:
                                pool.data.pwrite((v >> self._tbits) * ch + o, data)
                                # its sectors count as written once the pwrite is made (a failed one leaves
                                # them to the copy); a full entry goes only now (a lock-free read that still
                                # sees it takes the lock and waits for this write)
                                if n == 4096 and (m4 := self._m4) is not None:
                                    bits = e[2] | m4[o >> 9]  # a 4 KiB write's sectors from the table
                                else:
                                    bits = e[2] | ((1 << (n >> 9)) - 1) << (o >> 9)
                                if bits == self._full:
                                    del pend[first]
                                else:
                                    e[2] = bits
                                return
                            self._complete(first)  # unaligned: the copy first, then a plain overwrite
                        pool.data.pwrite((v >> self._tbits) * ch + o, data)
                        return  # nothing allocated: no low-water event to deliver
                    # shared: a sector-aligned piece of a small chunk breaks it deferred
                    n = end - offset
                    if (n < ch <= _WHOLE_FIRST_WRITE_BYTES and not (o | n) & _SECTOR_MASK and DEFER_COPIES
                            and pmd.data_sm.has_free(1)):
                        try:  # the deferred break of one shared chunk (_write's path, without its generality)
                            self._break_deferred(first, o, data, v >> self._tbits)
                        except NoMetadataSpace:
                            self._metadata_exhausted()
                            raise
                        finally:
                            pool.fire_low_water()
                        return
                    hint = (v >> self._tbits, v & self._tmask)  # _write breaks it without a second lookup
            try:
                self._write(offset, memoryview(data).cast("B"), hint)
            except NoMetadataSpace:
                self._metadata_exhausted()
                raise
            finally:
                pool.fire_low_water()
        finally:
            self._lock_release()

    # --- deferred copy-on-write (see the module docstring) ----------------------------------------------------
    def _break_deferred(self, c: int, o: int, data: bytes | bytearray | memoryview, old: int) -> None:
        """A sector-aligned write of part of shared chunk ``c`` (mapped to data block ``old``; chunks up to
        _WHOLE_FIRST_WRITE_BYTES) with a free data block: the new block written whole (the piece in a chunk of
        zeros, placeholders for the copy), registered as pending, then mapped. What _write_chunks and
        _prepare_new(defer=True) do for this case, in one call. Pool lock held."""
        pool, ch, pend = self.pool, self.chunk, self._pend
        db = pool.alloc_data_block()
        n = len(data)
        try:
            if len(pend) >= self._pend_max:  # the table is full: this break copies now (see _copy_around)
                self._copy_around(old, db, o, data)
            else:
                zb = self._zbuf
                if zb is None:
                    zb = self._zbuf = bytearray(ch)
                zb[o:o + n] = data
                try:
                    pool.data.pwrite(db * ch, zb)
                finally:
                    zb[o:o + n] = bytes(n)
                pend[c] = [old, db, ((1 << (n >> 9)) - 1) << (o >> 9)]
        except BaseException:
            pend.pop(c, None)
            self.md.release(db)  # nothing maps it yet: give it back
            raise
        try:
            self.md.insert_block(c, db)
        except BaseException:
            pend.pop(c, None)
            raise

    def _note_written(self, c: int, o: int, n: int) -> None:
        """A write of [o, o+n) of pending chunk ``c`` is about to be made: its sectors count as written (all of
        them: the copy is dropped); a write not on sector boundaries completes the copy first. Pool lock held."""
        e = self._pend[c]
        if (o | n) & (SECTOR_SIZE - 1):
            self._complete(c)
            return
        e[2] |= ((1 << (n >> 9)) - 1) << (o >> 9)  # a full entry is dropped by the caller after its pwrite

    def _pending_in(self, first: int, last: int) -> list[int]:
        """The pending chunks in [first, last]: from whichever is smaller, the range or the table."""
        pend = self._pend
        if last - first > len(pend):
            return [c for c in pend if first <= c <= last]
        return [c for c in range(first, last + 1) if c in pend]

    def _note_range(self, offset: int, end: int) -> None:
        """``_note_written`` for every pending chunk [offset, end) touches (as the table is now)."""
        ch = self.chunk
        for c in self._pending_in(offset // ch, (end - 1) // ch):
            lo = max(offset, c * ch)
            self._note_written(c, lo - c * ch, min(end, (c + 1) * ch) - lo)

    def _drop_full(self, first: int, last: int) -> None:
        """Forget the pending chunks in [first, last] whose every sector is written (after the write's pwrite)."""
        pend, full = self._pend, self._full
        for c in self._pending_in(first, last):
            if pend[c][2] == full:
                del pend[c]

    def _settle(self, offset: int, end: int) -> None:
        """Complete the pending copies of the chunks [offset, end) touches (before reading them)."""
        ch = self.chunk
        for c in self._pending_in(offset // ch, (end - 1) // ch):
            self._complete(c)

    def _complete(self, c: int) -> None:
        """Copy the sectors of pending chunk ``c`` never written from its shared block, and forget it."""
        old, new, bits = self._pend[c]
        complete_copy(self.pool, self.dev_id, c, old, new, bits)
        del self._pend[c]  # only once copied: a failed copy leaves it pending (a failed commit aborts it all)

    def _metadata_exhausted(self) -> None:
        """Out of metadata space in the middle of an I/O: as dm-thin, drop the open transaction and put the pool
        in read-only mode with needs_check (committed data stays readable)."""
        self.md.metadata_exhausted()

    def _lookup_range(self, first: int, last: int) -> dict[int, tuple[int, int]]:
        """{thin block: (data block, time)} for the mapped chunks in [first, last]: cached lookups for a few
        chunks, one range lookup for more."""
        if last - first >= _PLAN_CACHED_CHUNKS:
            return self.md.find_mapped_dict(first, last + 1)
        mc = self._cache()
        get, find, shift, mask = mc.map.get, mc.find, mc.TIME_BITS, mc.TIME_MASK
        out = {}
        for c in range(first, last + 1):
            v = get(c)  # a hit straight from the cache's dict; else its full lookup
            if v is None and (v := find(c)) is None:
                continue
            out[c] = (v >> shift, v & mask)
        return out

    def _overwrite_run(self, offset: int, view: memoryview, first: int, last: int, snap_time: int,
                       mapped: dict[int, tuple[int, int]]) -> bool:
        """Fast path: every chunk of [first, last] is mapped, unshared, to consecutive data blocks: one pwrite."""
        if len(mapped) != last - first + 1:
            return False
        d0 = mapped[first][0] - first
        for c, (db, t) in mapped.items():
            if db - c != d0 or t < snap_time:
                return False
        if self._pend:
            self._note_range(offset, offset + len(view))
        self.pool.data.pwrite((d0 + first) * self.chunk + offset - first * self.chunk, view)
        return True

    def _write(self, offset: int, view: memoryview, hint: tuple[int, int] | None = None) -> None:
        """One lookup pass over the range, a space check for the whole write, then the data: pwrites of
        physically contiguous pieces are coalesced (an overwrite of a run of sequentially allocated chunks is one
        pwrite). New mappings are inserted only after their data is written; if writing fails, the blocks
        allocated for it are released. ``hint``: the one chunk's (data block, time) as the mapping cache just
        gave it under the same lock hold (a shared chunk), so it is not looked up again."""
        ch = self.chunk
        end = offset + len(view)
        first, last = offset // ch, (end - 1) // ch
        self._write_chunks(offset, view, hint)
        if self._pend:
            self._drop_full(first, last)

    def _write_chunks(self, offset: int, view: memoryview, hint: tuple[int, int] | None = None) -> None:
        """_write's body. The sectors it writes of pending chunks count as written only once the write is sure to
        be made (after the space check), from the table as it is then: a wait for space releases the pool lock,
        and other writers may have completed pending chunks or made new ones meanwhile."""
        pool, md, ch = self.pool, self.md, self.chunk
        end = offset + len(view)
        first, last = offset // ch, (end - 1) // ch
        if self._pend and first == last:  # one chunk, pending: owned, so written in place below
            self._note_range(offset, end)
        snap_time = md.snapshotted_time  # a mapping older than this may be shared (__snapshotted_since)
        if first == last:  # one chunk
            m = hint if hint is not None else md.find_block(first)
            o = offset - first * ch
            if m is not None and m[1] >= snap_time:  # an overwrite in place
                pool.data.pwrite(m[0] * ch + o, view)
                return
            if md.has_free(1):  # a new block for it (else the general path applies the no-space policy)
                db = pool.alloc_data_block()
                try:
                    if len(view) == ch or not self._prepare_new(first, db, m, o, view, defer=True):
                        pool.data.pwrite(db * ch + o, view)
                except BaseException:
                    self._pend.pop(first, None)
                    md.release(db)  # nothing maps it yet: give it back
                    raise
                try:
                    md.insert_block(first, db)
                except BaseException:
                    self._pend.pop(first, None)
                    raise
                return
            mapped = {} if m is None else {first: m}
        else:
            mapped = self._lookup_range(first, last)
            if self._overwrite_run(offset, view, first, last, snap_time, mapped):
                return
        nr = last - first + 1
        while True:
            # the chunks unmapped or shared (``mapped`` holds only chunks of the range)
            need = nr - sum(1 for _, t in mapped.values() if t >= snap_time)
            if not need or md.has_free(need):
                break
            # raises, or (no_space=queue) waits with the pool lock released: other threads may change the
            # mappings (and commit) meanwhile, so the wait asks what the write needs after each wake, and the
            # write plans again once it returns
            pool.no_data_space(need, lambda: nr - sum(
                1 for _, t in self._lookup_range(first, last).values() if t >= md.snapshotted_time))
            snap_time = md.snapshotted_time
            mapped = self._lookup_range(first, last)
        if self._pend and first != last:  # the write is made now: its sectors of pending chunks count as written
            self._note_range(offset, end)
        data = pool.data
        if need == nr and offset == first * ch and end == (last + 1) * ch:
            # whole chunks, each needing a new block (provision, or break sharing with nothing to copy): the
            # blocks, one pwrite per run of consecutive ones, one insert run
            dbs = pool.alloc_data_blocks(nr)  # gives back what it took if it raises
            try:
                i = 0
                while i < nr:
                    j = i + 1
                    while j < nr and dbs[j] == dbs[j - 1] + 1:
                        j += 1
                    data.pwrite(dbs[i] * ch, view[i * ch:j * ch])
                    i = j
            except BaseException:
                for db in dbs:  # nothing maps them yet: give them back
                    md.release(db)
                raise
            md.insert_blocks(list(range(first, last + 1)), dbs)
            return
        inserts: list[tuple[int, int]] = []
        run_file = run_start = run_end = -1  # a pending coalesced pwrite of view[run_start:run_end]
        try:
            for c in range(first, last + 1):
                cs = c * ch
                o = offset - cs if c == first else 0
                vstart = cs + o - offset
                n = min(ch - o, end - cs - o)
                m = mapped.get(c)
                if m is not None and m[1] >= snap_time:
                    file_off = m[0] * ch + o  # overwrite in place
                else:
                    db = pool.alloc_data_block()
                    inserts.append((c, db))
                    file_off = db * ch + o
                    if n != ch:
                        if run_file >= 0:  # the piece may be written out of order: flush the pending run
                            data.pwrite(run_file, view[run_start:run_end])
                            run_file = -1
                        if self._prepare_new(c, db, m, o, view[vstart:vstart + n]):
                            continue
                if run_file >= 0 and file_off == run_file + (run_end - run_start) and vstart == run_end:
                    run_end += n
                    continue
                if run_file >= 0:
                    data.pwrite(run_file, view[run_start:run_end])
                run_file, run_start, run_end = file_off, vstart, vstart + n
            if run_file >= 0:
                data.pwrite(run_file, view[run_start:run_end])
        except BaseException:
            for _, db in inserts:  # nothing maps them yet: give them back
                md.release(db)
            raise
        if inserts:
            md.insert_blocks([c for c, _ in inserts], [db for _, db in inserts])

    def _prepare_new(self, c: int, db: int, m: tuple[int, int] | None, o: int, piece: memoryview, *,
                     defer: bool = False) -> bool:
        """A new data block ``db`` for chunk ``c`` that a write covers only partly (``piece`` at ``o``): the rest
        of the chunk comes from the shared block ``m`` (break sharing: the part the write does not cover copied
        around the piece; with ``defer`` and a sector-aligned piece, only the piece is written and the copy is
        left pending, the caller then maps ``db`` to ``c``), from the external origin, or reads as zeros (a hole
        punched when zeroing is on). Returns True when the piece is written too, False when the caller still
        writes it (so it can join a coalesced pwrite)."""
        pool, ch = self.pool, self.chunk
        data = pool.data
        if m is not None:
            n = len(piece)
            if (defer and DEFER_COPIES and not (o | n) & (SECTOR_SIZE - 1)
                    and len(self._pend) < self._pend_max):
                if ch <= _WHOLE_FIRST_WRITE_BYTES:
                    # the piece in a chunk of zeros, written at once: the page cache then holds the new block
                    # as one large folio (with Linux's large folios, a chunk built from 4 KiB writes into a
                    # hole reads back at half the speed); the zeros are placeholders for the pending copy
                    zb = self._zbuf
                    if zb is None:
                        zb = self._zbuf = bytearray(ch)
                    zb[o:o + n] = piece
                    try:
                        data.pwrite(db * ch, zb)
                    finally:
                        zb[o:o + n] = bytes(n)
                else:
                    data.pwrite(db * ch + o, piece)
                self._pend[c] = [m[0], db, ((1 << (n >> 9)) - 1) << (o >> 9)]
                return True
            self._copy_around(m[0], db, o, piece)
            return True
        origin = pool.external_origin(self.dev_id)
        cs = c * ch
        if origin is not None and cs < origin.size:
            buf = bytearray(origin.read_at(cs, ch))
            buf[o:o + len(piece)] = piece
            data.pwrite(db * ch, buf)
            return True
        if pool.zero_blocks:
            data.punch(db * ch, ch)
        return False

    def _copy_around(self, old: int, db: int, o: int, piece: bytes | bytearray | memoryview) -> None:
        """Break sharing now: new block ``db`` gets the shared block ``old``'s bytes around ``piece`` (at ``o``),
        copied in the kernel where it can (copy_file_range of the head and the tail), and the piece.

        A deferred break that finds its device's table of pending chunks full takes this path rather than
        completing the oldest pending chunk to make room: either way one chunk is copied, but a chunk first
        written whole (the piece in zeros) and copied into later costs a 64 KiB write more than a copy into a
        new block (1 GiB of one-4-KiB-write-per-chunk breaks: 0.87 -> 0.67 s of CPU, the copies included), and
        the chunks already pending keep their chance to be rewritten whole before the commit."""
        pool, ch = self.pool, self.chunk
        data = pool.data
        n = len(piece)
        pool.stats["cow_copies"] += 1
        pool.stats["cow_bytes"] += ch - n
        if o:
            data.copy(old * ch, db * ch, o)
        if o + n < ch:
            data.copy(old * ch + o + n, db * ch + o + n, ch - o - n)
        data.pwrite(db * ch + o, piece)

    def discard(self, offset: int, length: int) -> None:
        """Unmap the whole chunks inside [offset, offset+length) (per the pool's discard mode)."""
        check_bounds(self.size, offset, length)
        with self.pool.lock:
            self.pool.check_writable()
            if self.pool.discard_mode == "ignore":
                return
            ch = self.chunk
            first = -(-offset // ch)
            last = (offset + length) // ch  # exclusive
            if offset + length == self.size:
                last = -(-self.size // ch)
            try:
                self._unmap(first, last)
            except NoMetadataSpace:
                self._metadata_exhausted()
                raise

    def _unmap(self, first: int, last: int) -> int:
        if last <= first:
            return 0
        return self.md.remove_range(first, last)

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make [offset, offset+length) read as zeros (whole chunks are unmapped where no origin shows).

        Like a write, it is refused whole (NoDataSpace) before anything changes when the zeroing of partial (or,
        over an external origin, any) chunks would need more data blocks than are free."""
        check_bounds(self.size, offset, length)
        if not length:
            return
        with self.pool.lock:
            self.pool.check_writable()
            ch = self.chunk
            has_origin = self.pool.external_origin(self.dev_id) is not None
            first = -(-offset // ch)
            last = (offset + length) // ch
            if offset + length == self.size:
                last = -(-self.size // ch)
            if has_origin or last <= first:
                pieces = [(offset, length)]
                unmap = None
            else:
                head = min(first * ch, offset + length) - offset
                tail = last * ch
                pieces = [(offset, head), (tail, offset + length - tail)]
                unmap = (first, last)
            need = sum(self._zero_need(o, n) for o, n in pieces if n > 0)
            if need and not self.md.has_free(need):
                self.pool.no_data_space(need)
            try:
                for o, n in pieces:
                    if n > 0:
                        self._zero_range(o, n)
                    if unmap is not None:
                        self._unmap(*unmap)
                        unmap = None
            except NoMetadataSpace:
                self._metadata_exhausted()
                raise
            finally:
                self.pool.fire_low_water()

    def _zero_need(self, offset: int, length: int) -> int:
        """Data blocks ``_zero_range(offset, length)`` would allocate."""
        md, ch = self.md, self.chunk
        has_origin = self.pool.external_origin(self.dev_id) is not None
        need = 0
        for c in range(offset // ch, (offset + length - 1) // ch + 1):
            m = md.find_block(c)
            if (m is None and has_origin) or (m is not None and md.is_shared(m[1])):
                need += 1
        return need

    def _zero_range(self, offset: int, length: int) -> None:
        md, ch = self.md, self.chunk
        pos, end = offset, offset + length
        has_origin = self.pool.external_origin(self.dev_id) is not None
        while pos < end:
            c = pos // ch
            n = min(ch - (pos - c * ch), end - pos)
            if has_origin or md.find_block(c) is not None:
                self._write(pos, memoryview(bytes(n)))
            pos += n

    def flush(self) -> None:
        """Commit the pool (data first, then metadata)."""
        self.pool.commit()

    # --- batches and file-like access -------------------------------------------------------------------------
    def readv(self, requests: Iterable[tuple[int, int]]) -> list[bytes]:
        with self.pool.lock:
            return [self.read(o, n) for o, n in requests]

    def writev(self, requests: Iterable[tuple[int, bytes]]) -> None:
        with self.pool.lock:
            for o, d in requests:
                self.write(o, d)

    def open(self, mode: str = "rb") -> ThinFile:
        if mode not in ("rb", "r+b", "wb"):
            raise InvalidArgument(reason=f"mode {mode!r}: use 'rb' or 'r+b'")
        return ThinFile(self, writable=mode != "rb")

    def status(self) -> tuple[int, int | None]:
        """dm-thin thin status: (mapped sectors, highest mapped sector or None)."""
        with self.pool.lock:
            mapped = self.md.mapped_blocks
            hi = self.md.highest_mapped()
        spb = self.chunk // 512
        return mapped * spb, None if hi is None else (hi + 1) * spb - 1


def complete_copy(pool: Pool, dev_id: int, c: int, old: int, new: int, bits: int) -> None:
    """Complete the deferred copy-on-write of chunk ``c`` of ``dev_id``, newly mapped to data block ``new``: the
    runs of sectors not in ``bits`` (never written since the break) are copied from the shared block ``old``, one
    copy per run. Nothing to do once the chunk no longer maps ``new`` (its mapping was removed or replaced)."""
    try:
        mc = pool.md.mapping_cache(dev_id)
    except DeviceNotFound:
        return
    v = mc.find(c)
    if v is None or v >> mc.TIME_BITS != new:
        return
    copied = _copy_gaps(pool, old, new, bits)
    pool.stats["cow_copies"] += 1
    pool.stats["cow_bytes"] += copied


def _copy_gaps(pool: Pool, old: int, new: int, bits: int) -> int:
    """The copies of complete_copy: each run of sectors not in ``bits``, from ``old`` to ``new``; bytes copied."""
    ch = pool.chunk_bytes
    gaps = ~bits & ((1 << (ch // SECTOR_SIZE)) - 1)
    src, dst = old * ch, new * ch
    copied = 0
    copy = pool.data.copy
    while gaps:
        low = gaps & -gaps  # the first sector not written
        after = gaps + low  # the carry clears the run of unwritten sectors from there, sets the bit after it
        lo = (low.bit_length() - 1) * SECTOR_SIZE
        n = ((after & -after).bit_length() - 1) * SECTOR_SIZE - lo
        copy(src + lo, dst + lo, n)
        copied += n
        gaps &= after
    return copied


def complete_pending(pool: Pool) -> int:
    """Complete every deferred copy-on-write of the pool (before a commit or a change of the device table): for
    each chunk, what ``complete_copy`` does, with the device's mapping cache fetched once per device and the
    statistics added once. Pool lock held. Returns the number of chunks completed."""
    n = copies = copied = 0
    try:
        for dev_id, pend in pool.md.pending_devices():
            try:
                mc = pool.md.mapping_cache(dev_id)
            except DeviceNotFound:  # (complete_copy: nothing to copy for a device that is gone)
                n += len(pend)
                pend.clear()
                continue
            get, find, shift = mc.map.get, mc.find, mc.TIME_BITS
            while pend:
                c = next(iter(pend))
                old, new, bits = pend[c]
                v = get(c)
                if v is None:
                    v = find(c)
                if v is not None and v >> shift == new:  # still mapped to the new block: copy into it
                    copied += _copy_gaps(pool, old, new, bits)
                    copies += 1
                del pend[c]  # only once copied: a failed copy leaves it pending (a failed commit aborts it all)
                n += 1
    finally:
        stats = pool.stats
        stats["cow_copies"] += copies
        stats["cow_bytes"] += copied
    return n


class ThinFile(io.RawIOBase):
    """A seekable raw file over a thin device (works with shutil.copyfileobj)."""

    def __init__(self, dev: ThinDevice, *, writable: bool) -> None:
        super().__init__()
        self.dev = dev
        self.pos = 0
        self._writable = writable

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return self._writable

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.dev.size}[whence]
        if base + offset < 0:
            raise InvalidArgument(reason="negative seek position")
        self.pos = base + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        n = max(0, min(len(b), self.dev.size - self.pos))
        if n:
            self.dev.readinto(self.pos, memoryview(b).cast("B")[:n])
            self.pos += n
        return n

    def write(self, b: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        if not self._writable:
            raise io.UnsupportedOperation("not writable")
        n = len(b)
        self.dev.write(self.pos, b)
        self.pos += n
        return n

    def flush(self) -> None:
        if self._writable and not self.closed:
            self.dev.flush()

