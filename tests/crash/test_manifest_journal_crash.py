"""A crash at each step of a device change through the manifest journal (thinpool.manifest): the pending record,
the metadata superblock, the final record, and the compaction (before pool.json's rename, before the journal's
unlink). The reopened pool is the old state or the new one, never a mix, and opens without repair."""

from __future__ import annotations

from pathlib import Path

import pytest

from thinpool import manifest as mf
from thinpool import pool as pool_mod
from thinpool.pool import Pool

CH = 64 << 10
POINTS = ["pending record", "metadata superblock", "final record", "compaction write", "compaction unlink"]


class Crash(BaseException):
    pass


def _state(pool: Pool) -> dict:
    return {d: (pool.device_label(d), pool.device_size(d), pool.lineage(d)) for d in pool.list_devices()}


@pytest.mark.parametrize("op", ["rename", "snapshot", "delete"])
@pytest.mark.parametrize("point", POINTS)
def test_crash_during_a_device_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, point: str, op: str) -> None:
    path = tmp_path / "p"
    pool = Pool.create(path, data_size=32 * CH)
    pool.create_thin(1, 4 * CH, name="a").write(0, b"x" * CH)
    pool.create_snap(2, 1, name="s")
    old = _state(pool)
    new = dict(old)
    if op == "rename":
        new[1] = ("b", 4 * CH, [1])
    elif op == "snapshot":
        new[3] = ("t", 4 * CH, [1, 2, 3])
    else:
        del new[2]
    if point.startswith("compaction"):
        monkeypatch.setattr(pool_mod, "JOURNAL_COMPACT_BYTES", 0)
        monkeypatch.setattr(pool, "_manifest_bytes", 0)  # the next change compacts
    calls = []
    real_append = pool_mod._append_manifest

    def append(p: Path, rec: dict) -> int:
        calls.append(rec)
        if (point, len(calls)) in (("pending record", 1), ("final record", 2)):
            raise Crash()
        return real_append(p, rec)

    def boom(*a: object, **k: object) -> None:
        raise Crash()

    monkeypatch.setattr(pool_mod, "_append_manifest", append)
    if point == "metadata superblock":
        monkeypatch.setattr(pool.md.tm, "commit", boom)
    elif point == "compaction write":
        monkeypatch.setattr(mf, "_write_full", boom)
    elif point == "compaction unlink":
        monkeypatch.setattr(mf, "_drop_journal", boom)
    with pytest.raises(Crash):
        if op == "rename":
            pool.rename_device(1, "b")
        elif op == "snapshot":
            pool.create_snap(3, 2, name="t")
        else:
            pool.delete_thin(2)
    monkeypatch.undo()
    pool.crash_close()
    committed = point in ("final record", "compaction write", "compaction unlink")
    if op == "rename" and point == "metadata superblock":
        # the pending record (the union, written before the metadata step) holds the changed entry, and the
        # metadata at the previous id is accepted with it: a changed entry reads as changed (as before the
        # journal); a new device's entry is dropped (no metadata device) and a deleted one kept (still in it)
        committed = True
    if point == "compaction unlink":
        assert (path / mf.JOURNAL).exists()  # pool.json already holds the state; the journal replays over it
    with Pool.open(path, allow_needs_check=True) as pool:
        assert _state(pool) == (new if committed else old)
        assert pool.md.needs_check == (point == "metadata superblock")
        assert pool.device(1).read(0, CH) == b"x" * CH
    if point != "metadata superblock":
        assert not (path / mf.JOURNAL).exists()  # folded in at close
