"""thinpool's benchmark tooling, kept out of the library package.

``thinpool_bench.suite``: the device matrix, the CoW lab, the qcow2 peer and the snapshot series (with RESULTS.md
and plots); ``thinpool_bench.lab``: the storage-driver lab (one image materialised by thinpool-devicemapper,
overlayfs, btrfs, vfs and an aufs-like copy-up union, measured side by side). Used by ``thinpool bench`` and by
``benchmarks/``. May import: everything in thinpool; matplotlib lazily.
"""

from __future__ import annotations
