"""The `thinpool` command line (installed as the package ``thinpool_cli``)."""

import os

# thinpool never calls BLAS, but numpy's OpenBLAS starts a thread per core when numpy is imported and lets them
# spin: ~50 ms of CPU per command on 2 cores (measured: `import numpy` 120 ms CPU for 72 ms wall, 69/69 ms with
# one thread), taken from the command itself and, under `serve`, from the NBD server. A user's setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
