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
