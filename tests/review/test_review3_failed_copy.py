"""Review: the commit fails in the copy of a pending chunk (the first data write of the commit), over NBD.

A FLUSH after writes into chunks a snapshot shares first completes their deferred copies; when one of those
copies fails (EIO on its write), the commit must fail the served pool as a failed sync does (dm-thin's
metadata_operation_failed): the FLUSH gets EIO, and every later write, read, trim and flush, on this connection
and a new one, gets EIO, so an acknowledged write can never read back changed; shutdown commits nothing.
The pool's own state afterwards: failed, the pending table empty (aborted to the last commit).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "nbd"))
from nbd_client import RawClient  # noqa: E402
from test_nbd_failure import CH, faulty_pool  # noqa: E402

from thinpool.errors import PoolFailed  # noqa: E402
from thinpool.nbd import ServerThread  # noqa: E402
from thinpool.nbd import protocol as P  # noqa: E402
from thinpool.testing.faulty import FaultPlan  # noqa: E402


@pytest.fixture
def tmp():
    d = tempfile.mkdtemp(prefix="tpr3fail", dir="/tmp")
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("flush", ["FLUSH", "FUA write"])
def test_a_failed_pending_copy_fails_the_served_pool(tmp: Path, flush: str) -> None:
    plan = FaultPlan(at=None, kind="eio")
    pool = faulty_pool(tmp, plan)
    dev = pool.device(1)
    dev.write(0, b"\x11" * 4 * CH)
    pool.create_snap(2, 1)  # commits: chunks 0..3 shared
    committed: list[int] = []
    with ServerThread({"vol": dev}, unix_path=str(tmp / "s"), on_shutdown=lambda: committed.append(1)) as srv:
        with RawClient(srv.addresses[0]) as c:
            c.greeting()
            c.go("vol")
            for chunk in (0, 2):
                assert c.write(chunk * CH + 4096, b"\xaa" * 4096) == 0  # acknowledged; copies pending
            assert len(pool.md.pending_copies(1)) == 2
            plan.ops = ("write",)
            plan.stores = ("data",)
            # the commit's first data write, the first pending copy (after the FUA write's own pwrite into a
            # pending chunk, written in place)
            plan.at = plan.events + (1 if flush == "FLUSH" else 2)
            if flush == "FLUSH":
                assert c.command(P.CMD_FLUSH) == P.EIO
            else:
                assert c.write(8192, b"\xbb" * 4096, flags=P.CMD_FLAG_FUA) == P.EIO
            assert plan.failures == 1
            assert srv.server.failed is not None
            assert c.read(4096, 4096)[0] == P.EIO
            assert c.write(CH, b"\xcc" * 512) == P.EIO
            assert c.command(P.CMD_TRIM, 0, CH) == P.EIO
            assert c.command(P.CMD_FLUSH) == P.EIO
        with RawClient(srv.addresses[0]) as c2:
            c2.greeting()
            c2.go("vol")
            assert c2.read(0, 512)[0] == P.EIO
            assert c2.write(0, b"\xdd" * 512) == P.EIO
    assert committed == []
    assert pool.failed and not pool.md.pending_devices()
    with pytest.raises(PoolFailed):
        dev.write(0, b"x" * 512)
    with pytest.raises(PoolFailed):
        pool.commit()
