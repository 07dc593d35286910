"""`thinpool pool ...`: create, status, resize, set-transaction-id, metadata snapshots, and their errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import busy_pool, fails, fingerprint, ok, pool, run  # noqa: F401
from conftest import need_tool, run_tool
from oracles import assert_thin_check, describe, run_checkers


def test_pool_create_and_status(tmp_path: Path):
    p = tmp_path / "p"
    r = ok("pool", "create", p, "--size", "64M", "--chunk-size", "128k", "--no-zero", "--discard", "nopassdown",
           "--queue-if-no-space")
    assert "512 chunks" in r.stdout
    assert {x.name for x in p.iterdir()} >= {"metadata", "data", "pool.json"}
    st = json.loads(ok("pool", "status", "--json", "--pool", p).stdout)
    assert st["total_data_blocks"] == 512 and st["chunk_size"] == 128 * 1024
    assert st["zero"] is False and st["discard"] == "nopassdown" and st["no_space_policy"] == "queue"
    assert st["mode"] == "rw" and st["nr_devices"] == 0 and st["devices"] == []
    text = ok("pool", "status", "-p", p).stdout
    assert f"{p}: 0 " in text and "no_discard_passdown queue_if_no_space -" in text
    assert "chunk size" in text and "128KiB" in text


def test_pool_found_through_environment(tmp_path: Path):
    p = tmp_path / "envpool"
    ok("pool", "create", "--size", "8M", env={"THINPOOL_POOL": str(p)})
    ok("thin", "create", "1", "--size", "1M", env={"THINPOOL_POOL": str(p)})
    st = json.loads(ok("pool", "status", "--json", env={"THINPOOL_POOL": str(p)}).stdout)
    assert [d["dev_id"] for d in st["devices"]] == [1]


@pytest.mark.parametrize("size", ["10Q", "abc", "-5", "1.3k"])
def test_bad_size_is_a_usage_error_naming_the_value(tmp_path: Path, size: str):
    r = fails(2, "pool", "create", tmp_path / "p", "--size", size)
    assert repr(size) in r.stderr
    assert not (tmp_path / "p").exists()


def test_size_suffixes_accepted(tmp_path: Path):
    for i, size in enumerate(["8388608", "8192k", "8192K", "8M", "16384s"]):
        st = json.loads(ok("pool", "create", tmp_path / f"p{i}", "--size", size, "--json").stdout)
        assert st["total_data_blocks"] == 128, size


def test_size_not_a_chunk_multiple(tmp_path: Path):
    r = fails(2, "pool", "create", tmp_path / "p", "--size", "1000k")
    assert "not a multiple of the chunk size" in r.stderr
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("chunk", ["32k", "100k", "2G"])
def test_bad_chunk_size(tmp_path: Path, chunk: str):
    r = fails(2, "pool", "create", tmp_path / "p", "--size", "8M", "--chunk-size", chunk)
    assert repr(chunk) in r.stderr


def test_metadata_too_small_for_the_data(tmp_path: Path):
    r = fails(2, "pool", "create", tmp_path / "p", "--size", "1T", "--metadata-size", "1M")
    assert "at least" in r.stderr
    assert not (tmp_path / "p").exists()
    st = json.loads(ok("pool", "create", tmp_path / "p", "--size", "1T", "--metadata-size", "5M", "--json").stdout)
    assert st["total_metadata_blocks"] == 1280


def test_create_under_a_file_fails_cleanly(tmp_path: Path):
    (tmp_path / "f").write_text("x")
    fails(1, "pool", "create", tmp_path / "f" / "p", "--size", "8M")
    assert (tmp_path / "f").read_text() == "x"


def test_create_over_existing_pool_changes_nothing(pool: Path):
    ok("thin", "create", "1", "--size", "1M", "-p", pool)
    before = fingerprint(pool)
    r = fails(1, "pool", "create", pool, "--size", "8M")
    assert "already holds a pool" in r.stderr
    assert fingerprint(pool) == before


def test_no_pool_given_is_a_usage_error():
    r = fails(2, "pool", "status")
    assert "THINPOOL_POOL" in r.stderr


def test_missing_pool(tmp_path: Path):
    for args in (["pool", "status"], ["thin", "create", "1", "--size", "1M"], ["thin", "list"],
                 ["pool", "resize", "--size", "64M"]):
        r = fails(1, *args, "-p", tmp_path / "nothing")
        assert f"no pool at {tmp_path / 'nothing'}" in r.stderr
    assert not (tmp_path / "nothing").exists()


def test_resize(pool: Path):
    ok("pool", "resize", "--size", "64M", "-p", pool)
    st = json.loads(ok("pool", "status", "--json", "-p", pool).stdout)
    assert st["total_data_blocks"] == 1024
    assert (pool / "data").stat().st_size == 64 << 20
    ok("pool", "resize", "--metadata-size", "8M", "-p", pool)
    assert json.loads(ok("pool", "status", "--json", "-p", pool).stdout)["total_metadata_blocks"] == 2048


def test_resize_errors_change_nothing(pool: Path):
    before = fingerprint(pool)
    assert "cannot shrink" in fails(1, "pool", "resize", "--size", "16M", "-p", pool).stderr
    assert "not a multiple of the chunk size" in fails(2, "pool", "resize", "--size", "40001k", "-p", pool).stderr
    fails(2, "pool", "resize", "-p", pool)
    assert fingerprint(pool) == before


def test_set_transaction_id(pool: Path):
    assert json.loads(ok("pool", "set-transaction-id", "0", "7", "--json", "-p", pool).stdout) == \
        {"transaction_id": 7, "previous": 0}
    assert json.loads(ok("pool", "status", "--json", "-p", pool).stdout)["transaction_id"] == 7
    before = fingerprint(pool)
    r = fails(1, "pool", "set-transaction-id", "3", "9", "-p", pool)
    assert "transaction id mismatch: pool has 7, caller said 3" in r.stderr
    assert fingerprint(pool) == before


def test_metadata_snapshot_reserve_and_release(busy_pool: Path):
    # busy_pool holds a snapshot taken before the last write to vol
    st = json.loads(ok("pool", "status", "--json", "-p", busy_pool).stdout)
    assert st["held_metadata_root"] is not None
    live = ok("dump", busy_pool).stdout
    snap = ok("dump", "-m", busy_pool).stdout
    assert live != snap and 'nr_data_blocks="0"' in snap
    before = fingerprint(busy_pool)
    assert "already exists" in fails(1, "pool", "reserve-metadata-snap", "-p", busy_pool).stderr
    assert fingerprint(busy_pool) == before
    ok("pool", "release-metadata-snap", "-p", busy_pool)
    held = json.loads(ok("pool", "reserve-metadata-snap", "--json", "-p", busy_pool).stdout)["held_metadata_root"]
    assert json.loads(ok("pool", "status", "--json", "-p", busy_pool).stdout)["held_metadata_root"] == held
    ok("pool", "release-metadata-snap", "-p", busy_pool)
    assert json.loads(ok("pool", "status", "--json", "-p", busy_pool).stdout)["held_metadata_root"] is None
    assert "no pool metadata snapshot" in fails(1, "pool", "release-metadata-snap", "-p", busy_pool).stderr
    assert "no metadata snapshot is held" in fails(1, "dump", "-m", busy_pool).stderr


def test_locked_pool_refuses_writers_and_changes_nothing(busy_pool: Path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from thinpool.pool import Pool\n"
         f"p = Pool.open({str(busy_pool)!r}); print('locked', flush=True); sys.stdin.read(); p.close()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        before = fingerprint(busy_pool)
        for args in (["thin", "create", "9", "--size", "1M"], ["thin", "write", "vol", "-"],
                     ["pool", "resize", "--metadata-size", "64M"], ["thin", "delete", "snap", "--force"],
                     ["pool", "set-transaction-id", "4", "5"]):
            r = fails(1, *args, "-p", busy_pool, input=b"x")
            assert "is in use by another writer" in r.stderr
        # data readers take a shared lock: refused beside a writer (they would see mappings change under them)
        r = fails(1, "thin", "read", "vol", "--length", "10", "-p", busy_pool)
        assert "in use by another writer" in r.stderr
        assert fingerprint(busy_pool) == before
        # views of the device table and the tools read the last commit without a lock
        ok("pool", "status", "-p", busy_pool)
        ok("thin", "list", "-p", busy_pool)
        ok("dump", busy_pool)
    finally:
        holder.communicate("", timeout=30)


@pytest.mark.external
def test_corrupt_metadata(tmp_path: Path, busy_pool: Path):
    bad = tmp_path / "bad"
    shutil.copytree(busy_pool, bad)
    with open(bad / "metadata", "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xff\xff\xff")
    before = fingerprint(bad)
    for args in (["pool", "status"], ["thin", "create", "9", "--size", "1M"], ["thin", "read", "vol"]):
        r = fails(4, *args, "-p", bad)
        assert "metadata corrupt at block 0" in r.stderr
    assert fails(4, "dump", bad).stderr.count("\n") == 1
    r = run("check", bad)
    assert r.exit_code == 1 and "TRANSACTION_ID" not in r.stdout and "bad checksum" in r.stderr
    assert fingerprint(bad) == before
    runs = run_checkers(bad / "metadata")
    assert runs["thin_check"].returncode == 1 and not any(r.ok for r in runs.values()), describe(runs)


@pytest.mark.external
def test_pool_made_by_cli_passes_thin_check(busy_pool: Path):
    assert_thin_check(busy_pool / "metadata")
