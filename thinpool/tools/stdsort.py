"""A port of libstdc++'s std::sort (introsort), so that runs with equal keys come out in the order thin_rmap (C++)
leaves them: std::sort is not stable, and thin_rmap's output order for equal data_begin follows from it.

Layer: tools. May import: nothing from thinpool.

The algorithm (documented libstdc++ behaviour): median-of-three quicksort with an unguarded partition while a
range holds more than 16 elements, heapsort once the depth limit 2*log2(n) is used up, and a final insertion
sort over the whole array.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def std_sort(a: list[Any], less: Callable[[Any, Any], bool]) -> None:
    """libstdc++'s std::sort (introsort: median-of-three quicksort, heapsort fallback, final insertion sort), so
    that elements with equal keys end up in the same order as thin_rmap (C++) leaves them."""
    n = len(a)
    if n < 2:
        return
    _introsort_loop(a, 0, n, 2 * (n.bit_length() - 1), less)
    _final_insertion_sort(a, 0, n, less)


_THRESHOLD = 16


def _introsort_loop(a: list[Any], first: int, last: int, depth: int, less: Callable[[Any, Any], bool]) -> None:
    while last - first > _THRESHOLD:
        if depth == 0:
            _heap_sort(a, first, last, less)
            return
        depth -= 1
        mid = first + (last - first) // 2
        _move_median_to_first(a, first, first + 1, mid, last - 1, less)
        cut = _unguarded_partition(a, first + 1, last, first, less)
        _introsort_loop(a, cut, last, depth, less)
        last = cut


def _move_median_to_first(a: list[Any], result: int, x: int, y: int, z: int, less: Callable[[Any, Any], bool]) -> None:
    if less(a[x], a[y]):
        if less(a[y], a[z]):
            m = y
        elif less(a[x], a[z]):
            m = z
        else:
            m = x
    elif less(a[x], a[z]):
        m = x
    elif less(a[y], a[z]):
        m = z
    else:
        m = y
    a[result], a[m] = a[m], a[result]


def _unguarded_partition(a: list[Any], first: int, last: int, pivot: int, less: Callable[[Any, Any], bool]) -> int:
    while True:
        while less(a[first], a[pivot]):
            first += 1
        last -= 1
        while less(a[pivot], a[last]):
            last -= 1
        if not first < last:
            return first
        a[first], a[last] = a[last], a[first]
        first += 1


def _final_insertion_sort(a: list[Any], first: int, last: int, less: Callable[[Any, Any], bool]) -> None:
    if last - first > _THRESHOLD:
        _insertion_sort(a, first, first + _THRESHOLD, less)
        for i in range(first + _THRESHOLD, last):
            _unguarded_linear_insert(a, i, less)
    else:
        _insertion_sort(a, first, last, less)


def _insertion_sort(a: list[Any], first: int, last: int, less: Callable[[Any, Any], bool]) -> None:
    for i in range(first + 1, last):
        if less(a[i], a[first]):
            v = a[i]
            a[first + 1:i + 1] = a[first:i]
            a[first] = v
        else:
            _unguarded_linear_insert(a, i, less)


def _unguarded_linear_insert(a: list[Any], last: int, less: Callable[[Any, Any], bool]) -> None:
    v = a[last]
    nxt = last - 1
    while less(v, a[nxt]):
        a[last] = a[nxt]
        last = nxt
        nxt -= 1
    a[last] = v


def _adjust_heap(a: list[Any], first: int, hole: int, length: int, value: Any,
                 less: Callable[[Any, Any], bool]) -> None:
    top = hole
    child = hole
    while child < (length - 1) // 2:
        child = 2 * (child + 1)
        if less(a[first + child], a[first + child - 1]):
            child -= 1
        a[first + hole] = a[first + child]
        hole = child
    if length % 2 == 0 and child == (length - 2) // 2:
        child = 2 * (child + 1)
        a[first + hole] = a[first + child - 1]
        hole = child - 1
    parent = (hole - 1) // 2
    while hole > top and less(a[first + parent], value):
        a[first + hole] = a[first + parent]
        hole = parent
        parent = (hole - 1) // 2
    a[first + hole] = value


def _heap_sort(a: list[Any], first: int, last: int, less: Callable[[Any, Any], bool]) -> None:
    length = last - first
    if length >= 2:
        parent = (length - 2) // 2
        while True:
            _adjust_heap(a, first, parent, length, a[first + parent], less)
            if parent == 0:
                break
            parent -= 1
    while last - first > 1:
        last -= 1
        value = a[last]
        a[last] = a[first]
        _adjust_heap(a, first, 0, last - first, value, less)


# --- the same sort over integer keys, fast ------------------------------------------------------------------------
# std::sort's result is fixed by the arrangement its introsort loop leaves (partitions down to ranges of 16) and
# the final insertion sort, which, comparing with a strict "less", is a stable sort of that arrangement. So
# ``std_sort_order`` runs the loop (numpy partitions over large ranges, a Python loop over packed integers below
# _NP_MIN) and finishes with numpy's stable sort.
_NP_MIN = 2048  # ranges at least this long are partitioned with numpy
_IDX_BITS = 32
_IDX_MASK = (1 << _IDX_BITS) - 1


def std_sort_order(keys: Any) -> Any:
    """The order std::sort (libstdc++, comparing keys alone) leaves ``keys`` in: ``keys[order]`` is sorted, and
    equal keys come out as ``std_sort`` (above) leaves them. ``keys``: non-negative integers below 2**63, fewer
    than 2**32 of them. Returns an int64 numpy array."""
    return std_sort_range_order(keys, depth_limit(len(keys)))


def depth_limit(n: int) -> int:
    """libstdc++'s introsort depth limit for ``n`` elements: 2 * floor(log2 n)."""
    return 2 * (n.bit_length() - 1) if n >= 2 else 0


def std_sort_range_order(keys: Any, depth: int) -> Any:
    """``std_sort_order`` of a range that std::sort's introsort loop reaches with ``depth`` levels left (an
    external sort hands each range that fits in memory here): the loop from that depth, then the final insertion
    sort (a stable sort, the range being ordered against its neighbours). Returns an int64 numpy array."""
    import numpy as np

    k = np.array(keys, dtype=np.int64)
    n = len(k)
    perm = np.arange(n, dtype=np.int64)
    if n > _THRESHOLD:
        _np_loop(k, perm, 0, n, depth)
    return perm[np.argsort(k, kind="stable")]


def _np_loop(k: Any, perm: Any, first: int, last: int, depth: int) -> None:
    while last - first > _THRESHOLD:
        if last - first < _NP_MIN or depth == 0:
            _packed_range(k, perm, first, last, depth)
            return
        depth -= 1
        mid = first + (last - first) // 2
        x, y, z = first + 1, mid, last - 1
        kx, ky, kz = int(k[x]), int(k[y]), int(k[z])
        if kx < ky:
            m = y if ky < kz else z if kx < kz else x
        else:
            m = x if kx < kz else z if ky < kz else y
        k[[first, m]] = k[[m, first]]
        perm[[first, m]] = perm[[m, first]]
        cut = _np_partition(k, perm, first + 1, last, int(k[first]))
        _np_loop(k, perm, cut, last, depth)
        last = cut


def _np_partition(k: Any, perm: Any, lo: int, hi: int, pivot: int) -> int:
    """libstdc++'s __unguarded_partition of [lo, hi) around ``pivot``, vectorised: the left scan stops at the
    elements >= pivot (in ascending order), the right scan at those <= pivot (descending); the t-th stops swap
    while the left one is below the right one; where they cross, the left scan stops at its next stop or at the
    right scan's previous stop (which now holds a swapped element >= pivot), whichever comes first."""
    import numpy as np

    seg = k[lo:hi]
    left = np.flatnonzero(seg >= pivot)
    right = np.flatnonzero(seg <= pivot)[::-1]
    m = min(len(left), len(right))
    crossed = left[:m] >= right[:m]
    t = int(np.argmax(crossed)) if crossed.any() else m
    cut = int(left[t]) if t < len(left) else hi - lo
    if t:
        cut = min(cut, int(right[t - 1]))
        a, b = left[:t] + lo, right[:t] + lo
        k[a], k[b] = k[b], k[a].copy()
        perm[a], perm[b] = perm[b], perm[a].copy()
    return lo + cut


def _packed_range(k: Any, perm: Any, first: int, last: int, depth: int) -> None:
    """The introsort loop over [first, last) in Python, on ints packing (key << 32 | position in the range)."""
    import numpy as np

    keys = k[first:last].tolist()
    a = [(key << _IDX_BITS) | j for j, key in enumerate(keys)]
    _packed_loop(a, 0, len(a), depth)
    idx = np.array([v & _IDX_MASK for v in a], dtype=np.int64)
    k[first:last] = k[first:last][idx]
    perm[first:last] = perm[first:last][idx]


def _key_less(x: int, y: int) -> bool:
    return (x >> _IDX_BITS) < (y >> _IDX_BITS)


def _packed_loop(a: list[int], first: int, last: int, depth: int) -> None:
    while last - first > _THRESHOLD:
        if depth == 0:
            _heap_sort(a, first, last, _key_less)
            return
        depth -= 1
        mid = first + (last - first) // 2
        _move_median_to_first(a, first, first + 1, mid, last - 1, _key_less)
        p = a[first]
        below = (p >> _IDX_BITS) << _IDX_BITS  # v < below: key(v) < key(pivot)
        above = p | _IDX_MASK  # v > above: key(pivot) < key(v)
        lo, hi = first + 1, last
        while True:
            while a[lo] < below:
                lo += 1
            hi -= 1
            while a[hi] > above:
                hi -= 1
            if not lo < hi:
                break
            a[lo], a[hi] = a[hi], a[lo]
            lo += 1
        _packed_loop(a, lo, last, depth)
        last = lo
