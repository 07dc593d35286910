"""The storage-driver lab (issue 18): one deterministic image materialised by thinpool-devicemapper (64 KiB and
512 KiB chunks), the kernel's overlayfs, btrfs on a loop file, vfs and an aufs-like copy-up union, measured side by
side; the claims table and plots.

Layer: tooling (thinpool_bench). May import: everything in thinpool.
"""

from __future__ import annotations

from thinpool_bench.lab.runner import LabConfig, run_lab

__all__ = ["LabConfig", "run_lab"]
