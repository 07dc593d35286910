"""A change of the device table copies the manifest's devices dict once at most and never changes a manifest in
place (issue 13: create_snap / delete stay flat in the device count): the manifest before the change is intact,
the unchanged entries are shared, and a reopen sees the change."""

from __future__ import annotations

from thinpool.pool import Pool

CH = 64 << 10


def test_changes_leave_the_old_manifest_intact_and_share_entries(tmp_path) -> None:
    with Pool.create(tmp_path / "p", data_size=256 * CH, chunk_size=CH) as pool:
        pool.create_thin(1, 16 * CH, name="base")
        for i in range(2, 6):
            pool.create_snap(i, 1, name=f"s{i}")
        before = pool.manifest
        snapshot = {k: dict(v) for k, v in before["devices"].items()}
        pool.create_snap(9, 1, name="new")
        after = pool.manifest
        assert after is not before and after["devices"] is not before["devices"]
        assert {k: dict(v) for k, v in before["devices"].items()} == snapshot  # untouched
        assert all(after["devices"][k] is before["devices"][k] for k in snapshot)  # shared, not copied
        pool.delete_thin(3)
        assert "3" in after["devices"] and "3" not in pool.manifest["devices"]
        assert pool.manifest["devices"]["9"] is after["devices"]["9"]
        assert "previous_transaction_id" not in pool.manifest
        tid = pool.md.trans_id
    with Pool.open(tmp_path / "p") as pool:
        assert sorted(pool.manifest["devices"], key=int) == ["1", "2", "4", "5", "9"]
        assert pool.find_device("new") == 9 and pool.manifest["transaction_id"] == tid
