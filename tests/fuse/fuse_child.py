"""Child process for the FUSE tests: mounts SparseDevices with thinpool.fusefs.mount and, on unmount, writes a
JSON report (mapped ranges, discard/flush counts, content digests) so the test can check what reached them.

usage: python fuse_child.py MOUNTPOINT REPORT NAME=SIZE [NAME=SIZE ...]
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "nbd"))

from sparse_device import SparseDevice  # noqa: E402

from thinpool.fusefs import mount  # noqa: E402


def main() -> None:
    mountpoint, report = sys.argv[1], sys.argv[2]
    devs = {}
    for spec in sys.argv[3:]:
        name, size = spec.split("=")
        devs[name] = SparseDevice(int(size))

    def on_unmount() -> None:
        out = {name: {"mapped": d.mapped_ranges(), "discards": d.discards, "discarded_bytes": d.discarded_bytes,
                      "flushes": d.flushes, "sha256": hashlib.sha256(d.getvalue()).hexdigest()}
               for name, d in devs.items()}
        with open(report + ".tmp", "w") as f:
            json.dump(out, f)
        os.replace(report + ".tmp", report)

    mount(devs, mountpoint, on_unmount=on_unmount)


if __name__ == "__main__":
    main()
