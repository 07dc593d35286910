"""Benchmark (not collected by pytest): dump / ls / delta on N mappings, thinpool next to the C++ tools in the
same run, wall time and peak RSS from /usr/bin/time. No assertions on timings; outputs are compared byte for
byte.

    python tests/tools/bench_tools.py [NR_MAPPINGS] [WORKDIR]

The metadata: device 1 maps thin blocks 0..N-1 to a random permutation of data blocks (every mapping its own
run: the worst case for dump), device 2 is a snapshot of it with 1 % of its blocks rewritten.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

from thinpool.io.block_store import FileBlockStore
from thinpool.metadata.pool_metadata import PoolMetadata


def build(path: str, n: int) -> None:
    with open(path, "wb") as f:
        f.truncate(max(64 << 20, n * 160))
    store = FileBlockStore(path)
    md = PoolMetadata.format(store, data_block_size=128, nr_data_blocks=4 * n)
    rng = np.random.default_rng(1)
    t = np.arange(n, dtype=np.uint64)
    md.build_device(1, t, rng.permutation(n).astype(np.uint64), np.zeros(n, dtype=np.uint64))
    md.commit()
    md.create_snap(2, 1)
    for i, tb in enumerate(sorted(rng.choice(n, n // 100, replace=False).tolist())):
        md.insert(2, tb, n + 10 + i)
        md.data_sm.inc(n + 10 + i)
    md.commit()
    store.close()


def timed(cmd: list[str], out: str) -> str:
    with open(out, "wb") as f:
        r = subprocess.run(["/usr/bin/time", "-f", "%e s %M KB", *cmd], stdout=f, stderr=subprocess.PIPE, text=True)
    return r.stderr.strip().splitlines()[-1]


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    work = sys.argv[2] if len(sys.argv) > 2 else tempfile.mkdtemp(prefix="thinpool-bench-tools-")
    md = os.path.join(work, f"md{n}.bin")
    if not os.path.exists(md):
        build(md, n)
    thinpool = shutil.which("thinpool") or "thinpool"
    cases = [("dump", ["thin_dump", md], [thinpool, "dump", md]),
             ("ls", ["thin_ls", md], [thinpool, "ls", md]),
             ("ls -o DEV,MAPPED,EXCLUSIVE,SHARED", ["thin_ls", "-o", "DEV,MAPPED,EXCLUSIVE,SHARED", md],
              [thinpool, "ls", "-o", "DEV,MAPPED,EXCLUSIVE,SHARED", md]),
             ("delta 1 2", ["thin_delta", "--snap1", "1", "--snap2", "2", md], [thinpool, "delta", "1", "2", md]),
             ("delta --verbose 1 2", ["thin_delta", "--verbose", "--snap1", "1", "--snap2", "2", md],
              [thinpool, "delta", "--verbose", "1", "2", md])]
    print(f"| {n} mappings | C++ 0.9.0 | thinpool | output |\n|---|---|---|---|")
    for name, real, ours in cases:
        a = timed(real, os.path.join(work, "real.out"))
        b = timed(ours, os.path.join(work, "ours.out"))
        with open(os.path.join(work, "real.out"), "rb") as f1, open(os.path.join(work, "ours.out"), "rb") as f2:
            same = f1.read() == f2.read()
        print(f"| {name} | {a} | {b} | {'identical' if same else 'DIFFERENT'} |")


if __name__ == "__main__":
    main()
