"""A server process for the resource tests: ``python limits_server.py SOCKET OPTIONS_JSON [NOFILE]``.

Serves a 4 GiB SparseDevice as ``big`` and a 1 MiB one as ``small`` with ServerOptions from the JSON, prints
``ready`` once listening, stops on SIGTERM. NOFILE lowers RLIMIT_NOFILE first (the EMFILE test).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from sparse_device import SparseDevice  # noqa: E402

from thinpool.nbd import ServerOptions, serve  # noqa: E402


def main() -> None:
    sock, opts = sys.argv[1], json.loads(sys.argv[2])
    if len(sys.argv) > 3:
        n = int(sys.argv[3])
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(message)s")
    devs = {"big": SparseDevice(4 << 30), "small": SparseDevice(1 << 20)}
    serve(devs, unix_path=sock, options=ServerOptions(**opts), ready=lambda s: print("ready", flush=True))


if __name__ == "__main__":
    main()
