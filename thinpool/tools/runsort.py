"""thin_rmap's runs sorted as libstdc++'s std::sort sorts them, in bounded memory (an external introsort).

Layer: tools. May import: thinpool.errors, thinpool.tools.stdsort, numpy.

``RunStore`` keeps runs (data_begin, data_end, dev_id, thin_begin: one 32-byte record each) in numpy arrays up
to a budget; past it, every run goes to an unlinked temporary file, read and written a chunk at a time with
pread/pwrite (no mmap: pages of a mapped file would count in the resident set). ``sort`` then reproduces
std::sort by data_begin (thin_rmap 0.9.0's order of equal keys) exactly:

- std::sort is introsort: median-of-three quicksort partitions while a range holds more than 16 elements
  (heapsort once the depth limit 2*log2(n) is used up), then one insertion sort over the whole array, which,
  comparing with a strict "less", is a stable sort of the arrangement the partitions left.
- A range larger than the budget is partitioned on the file, as ``__unguarded_partition`` would partition it in
  memory (``stdsort._np_partition``'s reading of it): the t-th element >= pivot from the left swaps with the
  t-th element <= pivot from the right while the first lies below the second. One pass counts both kinds of
  element per chunk, which locates the crossing of the scans to a window or two; then the elements that move go
  through the file's scratch area to their new places (three passes over the parts of the range they span).
- A range that fits in the budget is read, sorted by ``stdsort.std_sort_range_order`` from the depth the loop
  reached it at, and written back. Each such range is ordered against the rest (everything before it <= its keys
  <= everything after it), so the final insertion sort's stable pass is done range by range.
- Only a range larger than the budget that exhausts the depth limit (an adversarial input: 2*log2(n) bad
  pivots in a row) is read whole for its heapsort; that is the one case where memory exceeds the budget.

Memory: the budget (default 8 MiB of runs) plus a few copies of one chunk, whatever the number of runs; the file
holds up to twice the runs (their records and one partition's scratch).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from thinpool.errors import StoreIOError
from thinpool.tools.stdsort import _THRESHOLD, depth_limit, std_sort_range_order

RUN_FIELDS = ("data_begin", "data_end", "dev_id", "thin_begin")
RUN_SIZE = 32  # bytes per run: four little-endian int64
DEFAULT_BUDGET_BYTES = 8 << 20  # runs kept in memory before the store spills to its file


def run_dtype() -> Any:
    return np.dtype([(f, "<i8") for f in RUN_FIELDS])


class RunStore:
    """Runs in arrival order, then sorted (``sort``) and read back a chunk at a time (``chunks``).

    ``budget_bytes``: runs held in memory (at most ``budget_bytes // 32``; at least 64 runs); ``chunk_runs``: the
    runs a streaming pass reads at once (default a quarter of the budget). ``tmpdir``: where the spill file is
    created (unlinked at once; default: $TMPDIR).
    """

    def __init__(self, *, budget_bytes: int = DEFAULT_BUDGET_BYTES, chunk_runs: int | None = None,
                 tmpdir: str | None = None) -> None:
        self.mem_runs = max(budget_bytes // RUN_SIZE, 64)
        self.chunk = max(chunk_runs if chunk_runs is not None else self.mem_runs // 4, 1)
        self.tmpdir = tmpdir
        self._pending: list[Any] = []  # structured arrays not yet written (or, unspilled, all of them)
        self._pending_n = 0
        self._fd: int | None = None
        self.n = 0  # runs stored
        self.sorted = False
        self.partitions_on_file = 0  # ranges partitioned on the file (tests: the spill path ran)

    # --- filling ------------------------------------------------------------------------------------------------
    @property
    def spilled(self) -> bool:
        return self._fd is not None

    def append(self, cols: Sequence[Any]) -> None:
        """Append runs given as four equal-length integer columns (``RUN_FIELDS``)."""
        n = len(cols[0])
        if not n:
            return
        rec = np.empty(n, dtype=run_dtype())
        for f, c in zip(RUN_FIELDS, cols):
            rec[f] = c
        self._pending.append(rec)
        self._pending_n += n
        self.n += n
        if self._pending_n > self.mem_runs or (self.spilled and self._pending_n >= self.chunk):
            self._flush()

    def _flush(self) -> None:
        if self._fd is None:
            import tempfile

            f = tempfile.TemporaryFile(dir=self.tmpdir)  # unlinked (O_TMPFILE where the filesystem has it)
            self._fd = os.dup(f.fileno())
            f.close()
        base = self.n - self._pending_n
        for rec in self._pending:
            self._write(base, rec)
            base += len(rec)
        self._pending.clear()
        self._pending_n = 0

    # --- file I/O -----------------------------------------------------------------------------------------------
    def _read(self, lo: int, hi: int) -> Any:
        buf = np.empty(hi - lo, dtype=run_dtype())
        want = (hi - lo) * RUN_SIZE
        assert self._fd is not None
        got = os.preadv(self._fd, [buf.view(np.uint8).data], lo * RUN_SIZE) if want else 0
        if got != want:
            raise StoreIOError(what="rmap spill file", op="read", reason=f"short read ({got} of {want} bytes)")
        return buf

    def _write(self, lo: int, rec: Any) -> None:
        assert self._fd is not None
        view = np.ascontiguousarray(rec).view(np.uint8).data
        off = lo * RUN_SIZE
        while len(view):
            try:
                n = os.pwrite(self._fd, view, off)
            except OSError as e:
                raise StoreIOError(what="rmap spill file", op="write", reason=e.strerror or str(e)) from e
            view, off = view[n:], off + n

    def _key(self, i: int) -> int:
        return int(self._read(i, i + 1)["data_begin"][0])

    def _swap(self, i: int, j: int) -> None:
        a, b = self._read(i, i + 1), self._read(j, j + 1)
        self._write(i, b)
        self._write(j, a)

    # --- sorting ------------------------------------------------------------------------------------------------
    def sort(self) -> None:
        """Sort by data_begin exactly as libstdc++'s std::sort does (see the module docstring)."""
        if self.sorted:
            return
        self.sorted = True
        if not self.spilled:
            if self._pending:
                rec = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
                self._pending = [rec[std_sort_range_order(rec["data_begin"], depth_limit(len(rec)))]]
            return
        self._flush()
        self._loop(0, self.n, depth_limit(self.n))

    def _sort_range(self, first: int, last: int, depth: int) -> None:
        rec = self._read(first, last)
        self._write(first, rec[std_sort_range_order(rec["data_begin"], depth)])

    def _loop(self, first: int, last: int, depth: int) -> None:
        while last - first > _THRESHOLD:
            if last - first <= self.mem_runs or depth == 0:
                self._sort_range(first, last, depth)
                return
            depth -= 1
            mid = first + (last - first) // 2
            x, y, z = first + 1, mid, last - 1
            kx, ky, kz = self._key(x), self._key(y), self._key(z)
            if kx < ky:
                m = y if ky < kz else z if kx < kz else x
            else:
                m = x if kx < kz else z if ky < kz else y
            self._swap(first, m)
            cut = self._partition(first + 1, last, self._key(first))
            self.partitions_on_file += 1
            self._loop(cut, last, depth)
            last = cut
        if last - first > 1:
            self._sort_range(first, last, depth)  # at most 16: the final insertion sort's share

    def _windows(self, lo: int, hi: int, *, descending: bool = False) -> Iterator[tuple[int, int]]:
        if descending:
            for e in range(hi, lo, -self.chunk):
                yield max(e - self.chunk, lo), e
        else:
            for s in range(lo, hi, self.chunk):
                yield s, min(s + self.chunk, hi)

    def _partition(self, lo: int, hi: int, pivot: int) -> int:
        """``__unguarded_partition`` of [lo, hi) around ``pivot`` on the file; returns the cut."""
        ge: list[int] = []  # per window: keys >= pivot (the left scan's stops)
        le: list[int] = []  # keys <= pivot (the right scan's stops)
        wins = list(self._windows(lo, hi))
        for s, e in wins:
            k = self._read(s, e)["data_begin"]
            ge.append(int(np.count_nonzero(k >= pivot)))
            le.append(int(np.count_nonzero(k <= pivot)))
        le_after = [0] * (len(wins) + 1)  # right stops in the windows after window c
        for c in range(len(wins) - 1, -1, -1):
            le_after[c] = le_after[c + 1] + le[c]
        # t: the left stops x whose index among left stops is below the number of right stops after x
        t, last_true, first_false, last_skipped = 0, -1, -1, -1
        for c, (s, e) in enumerate(wins):
            if not ge[c]:
                continue
            if le_after[c + 1] > t + ge[c] - 1:  # every left stop of this window swaps: no need to read it
                t += ge[c]
                last_true, last_skipped = -1, c
                continue
            k = self._read(s, e)["data_begin"]
            pos = np.flatnonzero(k >= pivot)
            le_cum = np.cumsum(k <= pivot)
            r_after = le_after[c + 1] + (le[c] - le_cum[pos])
            ok = r_after > (t + np.arange(len(pos)))
            nt = int(np.argmin(ok)) if not ok.all() else len(pos)
            if nt:
                last_true = s + int(pos[nt - 1])
            t += nt
            if nt < len(pos):
                first_false = s + int(pos[nt])
                break
        cut = first_false if first_false >= 0 else hi
        if t == 0:
            return cut
        if last_true < 0:  # the last left stop that swaps is the last one of a window not read
            s, e = wins[last_skipped]
            last_true = s + int(np.flatnonzero(self._read(s, e)["data_begin"] >= pivot)[-1])
        # the t-th right stop from the right end: where the right scan stopped last before the scans crossed
        c = next(c for c in range(len(wins)) if le_after[c] >= t > le_after[c + 1])
        s, e = wins[c]
        rpos = np.flatnonzero(self._read(s, e)["data_begin"] <= pivot)
        b_start = s + int(rpos[len(rpos) - (t - le_after[c + 1])])
        cut = min(cut, b_start)
        a_end = last_true + 1
        # The elements that move: left stops in [lo, a_end) (ascending) and right stops in [b_start, hi)
        # (descending); each takes the place of the other kind's element of the same rank. The right ones are
        # copied to the scratch area past the runs; one pass over [lo, a_end) copies the left ones out beside
        # them and writes the right ones in; a last pass writes the left ones into [b_start, hi).
        sl, sr = self.n, self.n + t
        w = 0
        for s, e in self._windows(b_start, hi, descending=True):
            rec = self._read(s, e)
            sel = rec[rec["data_begin"] <= pivot][::-1]
            self._write(sr + w, sel)
            w += len(sel)
        assert w == t
        w = 0
        for s, e in self._windows(lo, a_end):
            rec = self._read(s, e)
            where = np.flatnonzero(rec["data_begin"] >= pivot)
            if len(where):
                self._write(sl + w, rec[where])
                rec[where] = self._read(sr + w, sr + w + len(where))
                self._write(s, rec)
                w += len(where)
        assert w == t
        w = 0
        for s, e in self._windows(b_start, hi, descending=True):
            rec = self._read(s, e)
            where = np.flatnonzero(rec["data_begin"] <= pivot)[::-1]
            if len(where):
                rec[where] = self._read(sl + w, sl + w + len(where))
                self._write(s, rec)
                w += len(where)
        return cut

    # --- reading back -------------------------------------------------------------------------------------------
    def chunks(self) -> Iterator[Any]:
        """The runs in their current order (sorted after ``sort``), as structured arrays of at most a chunk."""
        if not self.spilled:
            for rec in self._pending:
                for i in range(0, len(rec), self.chunk):
                    yield rec[i:i + self.chunk]
            return
        self._flush()
        for s, e in self._windows(0, self.n):
            yield self._read(s, e)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._pending = []

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
