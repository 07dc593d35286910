"""Write the thin_dump-style XML inputs for the images made here with the real thin_restore (see README.md).

Deterministic (no randomness): ``python make_xml.py f6`` / ``python make_xml.py f7`` print the XML on stdout.
"""

from __future__ import annotations

import sys


def _device(out: list[str], dev_id: int, trans: int, ctime: int, stime: int, maps: list[tuple[int, int, int]]) -> None:
    """maps: sorted (thin, data, time). Emits thin_dump's canonical runs."""
    out.append(f'  <device dev_id="{dev_id}" mapped_blocks="{len(maps)}" transaction="{trans}" '
               f'creation_time="{ctime}" snap_time="{stime}">')
    i = 0
    while i < len(maps):
        j = i + 1
        while (j < len(maps) and maps[j][0] == maps[j - 1][0] + 1 and maps[j][1] == maps[j - 1][1] + 1
               and maps[j][2] == maps[i][2]):
            j += 1
        t, d, tm = maps[i]
        if j - i == 1:
            out.append(f'    <single_mapping origin_block="{t}" data_block="{d}" time="{tm}"/>')
        else:
            out.append(f'    <range_mapping origin_begin="{t}" data_begin="{d}" length="{j - i}" time="{tm}"/>')
        i = j
    out.append("  </device>")


def f6() -> str:
    """Origin dev 1 with 5000 mappings (time 0) and five snapshot-like devices 2..6 (created at times 1..5) that
    share the origin's data blocks except for 100 blocks each remapped privately at their creation time.
    Shared data blocks reach count 6 (a multi-leaf data ref-count tree); every tree has several levels."""
    origin = []
    for i in range(5000):
        d = i if i < 3000 else 3000 + (i * 7919) % 2000  # a range, then a scrambled permutation of 3000..4999
        origin.append((i, d, 0))
    out = [('<superblock uuid="" time="5" transaction="6" flags="0" version="2" data_block_size="128" '
            'nr_data_blocks="20000">')]
    _device(out, 1, 1, 0, 5, origin)
    nxt = 5000
    for k in range(2, 7):
        maps = list(origin)
        for j in range(100):
            t = 200 * k + 7 * j  # distinct private blocks per snapshot
            maps[t] = (t, nxt, k - 1)
            nxt += 1
        _device(out, k, k, k - 1, k - 1, maps)
    out.append("</superblock>")
    return "\n".join(out) + "\n"


def f7() -> str:
    """400 devices (ids 0, 3, 6, ...): a details tree and a top-level mapping tree with internal nodes; every
    fifth device is empty (the C++ restore shares one empty leaf among them: a metadata ref-count tree entry);
    60000 data blocks = 4 data bitmaps."""
    out = [('<superblock uuid="" time="3" transaction="400" flags="0" version="2" data_block_size="256" '
            'nr_data_blocks="60000">')]
    nxt = 0
    for i in range(400):
        dev = 3 * i
        n = 0 if i % 5 == 0 else 1 + (i * 13) % 40
        maps = []
        for j in range(n):
            maps.append((j * (1 + i % 3), nxt + (j if i % 2 else 0), i % 4 if i % 4 < 3 else 2))
            if i % 2 == 0:
                nxt += 1
        if i % 2:
            nxt += n
        nxt += 120  # gaps between devices, so data blocks land in several bitmaps
        _device(out, dev, i, min(i % 4, 3), min(i % 4, 3), maps)
    out.append("</superblock>")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write({"f6": f6, "f7": f7}[sys.argv[1]]())
