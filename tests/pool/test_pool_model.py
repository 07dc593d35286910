"""Hypothesis state machine: a pool against a byte model (dev_id -> bytearray).

Rules: create (plain or over an external origin of smaller / equal / larger size), snapshot, write at random
offsets and lengths (partial chunks included), discard (whole chunks inside the range show the unprovisioned
content again: zeros, or the external origin), write_zeroes, delete, commit, grow, reopen, crash.

Crash semantics (dm-thin's, and the issue's "writes after the last commit may be lost, committed ones never"):
the device set and every mapping revert to the last commit. A chunk that was provisioned and unshared at the last
commit is overwritten in place (as the kernel does), so after a crash each of its bytes holds either the committed
value or a value some write since the commit put there. The model checks exactly that, byte by byte, and then
adopts what it read.

After each run: every device equals the model, our checker is ok with no warnings, and the real thin_check
exits 0.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile

import numpy as np
import pytest
from conftest import need_tool, run_tool
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, initialize, invariant, precondition, rule
from oracles import assert_thin_check

from thinpool.errors import NoDataSpace
from thinpool.io.block_store import FileBlockStore
from thinpool.metadata.check import check_metadata, format_report
from thinpool.pool import Pool

CH = 64 << 10
SIZES = [1 << 20, 3 * CH + 4096, 2 << 20]  # the middle one has a partial tail chunk
MAX_DEVS = 6
EVENTS: dict[str, int] = {}  # what the runs exercised (printed by the test, see -s)


def _event(what: str) -> None:
    EVENTS[what] = EVENTS.get(what, 0) + 1


def _lengths() -> st.SearchStrategy[int]:
    return st.one_of(st.integers(1, 1024), st.sampled_from([CH - 1, CH, CH + 1, 2 * CH]),
                     st.integers(1, 3 * CH + 777))


class PoolMachine(RuleBasedStateMachine):
    devs = Bundle("devs")

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="tp-model-")
        self.path = os.path.join(self.dir, "pool")
        self.pool: Pool | None = None
        self.model: dict[int, bytearray] = {}
        self.base: dict[int, bytes] = {}  # what an unprovisioned chunk shows (zeros or the external origin)
        self.committed: dict[int, bytes] = {}
        self.committed_base: dict[int, bytes] = {}
        self.since: dict[int, list[tuple[int, bytes]]] = {}  # writes since the last commit (crash tolerance)
        self.next_id = 0
        self.next_origin = 0
        self.discard_mode = "passdown"
        self.data_chunks = 0

    # --- helpers ----------------------------------------------------------------------------------------------
    def _mark_committed(self) -> None:
        self.committed = {d: bytes(m) for d, m in self.model.items()}
        self.committed_base = dict(self.base)
        self.since = {d: [] for d in self.model}

    def _verify(self, dev_id: int) -> None:
        assert self.pool is not None
        got = self.pool.device(dev_id).read(0, len(self.model[dev_id]))
        if got != self.model[dev_id]:
            a = np.frombuffer(got, np.uint8)
            b = np.frombuffer(bytes(self.model[dev_id]), np.uint8)
            bad = np.flatnonzero(a != b)
            raise AssertionError(f"device {dev_id}: {len(bad)} bytes differ from the model, first at {bad[0]} "
                                 f"(chunk {bad[0] // CH}): got {a[bad[0]]}, model {b[bad[0]]}")

    # --- rules ------------------------------------------------------------------------------------------------
    @initialize(discard=st.sampled_from(["passdown", "nopassdown", "ignore"]), data_chunks=st.integers(6, 64))
    def init(self, discard: str, data_chunks: int) -> None:
        self.discard_mode = discard
        self.data_chunks = data_chunks
        self.pool = Pool.create(self.path, data_size=data_chunks * CH, chunk_size=CH, discard=discard)

    @precondition(lambda self: len(self.model) < MAX_DEVS)
    @rule(target=devs, size=st.sampled_from(SIZES),
          origin=st.sampled_from([None, "smaller", "equal", "larger"]), seed=st.integers(0, 2**32 - 1))
    def create(self, size: int, origin: str | None, seed: int) -> int:
        _event('create')
        assert self.pool is not None
        dev_id = self.next_id
        self.next_id += 1
        base = bytes(size)
        opath = None
        if origin is not None:
            osize = {"smaller": size // 2 + 1000, "equal": size, "larger": size + 100_000}[origin]
            content = random.Random(seed).randbytes(osize)
            opath = os.path.join(self.dir, f"origin{self.next_origin}")
            self.next_origin += 1
            with open(opath, "wb") as f:
                f.write(content)
            base = content[:size] + bytes(max(0, size - len(content)))
        self.pool.create_thin(dev_id, size, origin=opath)
        self.model[dev_id] = bytearray(base)
        self.base[dev_id] = base
        self._mark_committed()  # create commits
        return dev_id

    @precondition(lambda self: len(self.model) < MAX_DEVS)
    @rule(target=devs, origin=devs)
    def snapshot(self, origin: int) -> int:
        _event('snapshot')
        assert self.pool is not None
        if origin not in self.model:
            return origin  # deleted meanwhile (bundles keep stale ids): no-op, hand the stale id back
        dev_id = self.next_id
        self.next_id += 1
        self.pool.create_snap(dev_id, origin)
        self.model[dev_id] = bytearray(self.model[origin])
        self.base[dev_id] = self.base[origin]
        self._mark_committed()
        return dev_id

    @rule(dev=devs, where=st.floats(0, 1), length=st.integers(1, 4096), seed=st.integers(0, 2**32 - 1))
    def write_small(self, dev: int, where: float, length: int, seed: int) -> None:
        _event("write_small")
        self._write(dev, where, length, seed)

    @rule(dev=devs, where=st.floats(0, 1), length=_lengths(), seed=st.integers(0, 2**32 - 1))
    def write(self, dev: int, where: float, length: int, seed: int) -> None:
        _event("write")
        self._write(dev, where, length, seed)

    @rule(dev=devs, ops=st.lists(st.tuples(st.sampled_from(["w", "w", "w", "d", "z"]), st.floats(0, 1),
                                           _lengths(), st.integers(0, 2**32 - 1)), min_size=1, max_size=8))
    def io_batch(self, dev: int, ops: list[tuple[str, float, int, int]]) -> None:
        """Several writes / discards / write_zeroes on one device in one step (I/O dominates the runs)."""
        _event("io_batch")
        for kind, where, length, seed in ops:
            if kind == "w":
                self._write(dev, where, length, seed)
            elif kind == "d":
                self._discard(dev, where, length)
            else:
                self._write_zeroes(dev, where, length)

    def _write(self, dev: int, where: float, length: int, seed: int) -> None:
        assert self.pool is not None
        if dev not in self.model:
            return
        size = len(self.model[dev])
        length = min(length, size)
        offset = min(int(where * size), size - length)
        data = random.Random(seed).randbytes(length)
        _event("write op")
        before = self.pool.status().used_data_blocks
        try:
            self.pool.device(dev).write(offset, data)
        except NoDataSpace:
            _event("write refused: no data space")
            # refused whole: nothing changed (the next verification proves it), no block allocated
            assert self.pool.status().used_data_blocks == before
            self._verify(dev)
            return
        self.model[dev][offset:offset + length] = data
        self.since[dev].append((offset, data))

    @rule(dev=devs, where=st.floats(0, 1), length=_lengths())
    def discard(self, dev: int, where: float, length: int) -> None:
        _event('discard')
        self._discard(dev, where, length)

    def _discard(self, dev: int, where: float, length: int) -> None:
        assert self.pool is not None
        if dev not in self.model:
            return
        size = len(self.model[dev])
        length = min(length, size)
        offset = min(int(where * size), size - length)
        _event("discard op")
        self.pool.device(dev).discard(offset, length)
        if self.discard_mode == "ignore":
            return
        end = offset + length
        for c in range(-(-offset // CH), -(-size // CH)):
            lo, hi = c * CH, min((c + 1) * CH, size)
            if hi > end:
                break
            self.model[dev][lo:hi] = self.base[dev][lo:hi]

    @rule(dev=devs, where=st.floats(0, 1), length=_lengths())
    def write_zeroes(self, dev: int, where: float, length: int) -> None:
        _event('write_zeroes')
        self._write_zeroes(dev, where, length)

    def _write_zeroes(self, dev: int, where: float, length: int) -> None:
        assert self.pool is not None
        if dev not in self.model:
            return
        size = len(self.model[dev])
        length = min(length, size)
        offset = min(int(where * size), size - length)
        before = self.pool.status().used_data_blocks
        try:
            _event("write_zeroes op")
            self.pool.device(dev).write_zeroes(offset, length)
        except NoDataSpace:
            assert self.pool.status().used_data_blocks == before
            self._verify(dev)
            return
        self.model[dev][offset:offset + length] = bytes(length)
        self.since[dev].append((offset, bytes(length)))

    @rule(dev=consumes(devs))
    def delete(self, dev: int) -> None:
        _event('delete')
        assert self.pool is not None
        if dev not in self.model:
            return
        self.pool.delete_thin(dev)
        del self.model[dev], self.base[dev]
        self._mark_committed()

    @precondition(lambda self: bool(self.model))
    @rule()
    def commit(self) -> None:
        _event('commit')
        assert self.pool is not None
        self.pool.commit()
        self._mark_committed()

    @precondition(lambda self: bool(self.model) and self.data_chunks < 400)
    @rule(extra=st.integers(1, 32))
    def grow(self, extra: int) -> None:
        _event('grow')
        assert self.pool is not None
        self.data_chunks += extra
        self.pool.resize(self.data_chunks * CH)
        assert self.pool.status().total_data_blocks == self.data_chunks
        self._mark_committed()

    @precondition(lambda self: bool(self.model))
    @rule()
    def reopen(self) -> None:
        _event('reopen')
        assert self.pool is not None
        self.pool.close()
        self._mark_committed()
        self.pool = Pool.open(self.path)
        assert sorted(self.pool.list_devices()) == sorted(self.model)
        for d in self.model:
            self._verify(d)

    @precondition(lambda self: bool(self.model))
    @rule()
    def crash(self) -> None:
        _event('crash')
        assert self.pool is not None
        self.pool.crash_close()
        self.pool = Pool.open(self.path)
        assert sorted(self.pool.list_devices()) == sorted(self.committed)
        self.model = {}
        self.base = dict(self.committed_base)
        for d, old in self.committed.items():
            got = self.pool.device(d).read(0, len(old))
            a = np.frombuffer(got, np.uint8)
            ok = a == np.frombuffer(old, np.uint8)
            for off, data in self.since[d]:
                ok[off:off + len(data)] |= a[off:off + len(data)] == np.frombuffer(data, np.uint8)
            if not (a == np.frombuffer(old, np.uint8)).all():
                _event("crash: a write since the commit survived in place")
            if not ok.all():
                bad = int(np.flatnonzero(~ok)[0])
                raise AssertionError(f"device {d} after crash: byte {bad} (chunk {bad // CH}) is neither the "
                                     "committed value nor one written since")
            self.model[d] = bytearray(got)
        self._mark_committed()

    @invariant()
    def devices_match_model(self) -> None:
        if self.pool is None:
            return
        for d in self.model:
            self._verify(d)

    def teardown(self) -> None:
        try:
            if self.pool is not None:
                self.pool.close()
                with Pool.open(self.path, readonly=True) as ro:
                    self.pool = ro
                    assert sorted(ro.list_devices()) == sorted(self.model)
                    for d in self.model:
                        self._verify(d)
                self.pool = None
                report = check_metadata(FileBlockStore(os.path.join(self.path, "metadata"), readonly=True))
                assert report.ok and not report.warnings, format_report(report)
                assert_thin_check(os.path.join(self.path, "metadata"))
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


PoolMachine.TestCase.settings = settings(PoolMachine.TestCase.settings, stateful_step_count=50)


@pytest.mark.external
def test_pool_against_byte_model() -> None:
    need_tool("thin_check")
    PoolMachine.TestCase().runTest()
    print('model events:', EVENTS)
