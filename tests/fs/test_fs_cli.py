"""`thinpool fs ...` end to end on a real pool (CliRunner), and e2fsck on the device afterwards."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner
from fs_helpers import e2fsck

MiB = 2**20


@pytest.fixture
def env(tmp_path):
    from thinpool.pool import Pool
    with Pool.create(tmp_path / "pool", data_size=128 * MiB) as p:
        p.create_thin(1, 64 * MiB, name="vol")
    return {"THINPOOL_POOL": str(tmp_path / "pool")}


def run(env, *args, ok=True, input=None):
    from thinpool_cli.main import cli
    r = CliRunner().invoke(cli, ["fs", *args], env=env, input=input, catch_exceptions=False)
    if ok:
        assert r.exit_code == 0, r.output
    return r


def test_fs_commands_round_trip(env, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_bytes(b"alpha\n")
    (src / "sub" / "big.bin").write_bytes(os.urandom(200_000))
    os.symlink("a.txt", src / "link")
    run(env, "mkfs", "vol")
    assert run(env, "mkfs", "vol", ok=False).exit_code == 1  # refuses to overwrite without --force
    run(env, "put", "vol", str(src), "/src")
    run(env, "put", "vol", "-", "/stdin.txt", input=b"from stdin")
    assert run(env, "ls", "vol").output.split() == ["src/", "stdin.txt"]
    assert run(env, "cat", "vol", "/src/a.txt", "/stdin.txt").stdout_bytes == b"alpha\nfrom stdin"
    run(env, "mkdir", "vol", "-p", "/x/y")
    run(env, "mv", "vol", "/stdin.txt", "/x/y")
    assert "stdin.txt" in run(env, "tree", "vol").output
    st = json.loads(run(env, "stat", "vol", "/src/link", "--json").output)
    assert st["type"] == "symlink" and st["target"] == "a.txt"
    out = tmp_path / "out"
    run(env, "get", "vol", "/src", str(out))
    assert (out / "sub" / "big.bin").read_bytes() == (src / "sub" / "big.bin").read_bytes()
    assert os.readlink(out / "link") == "a.txt"
    r = run(env, "rm", "vol", "/x", ok=False)
    assert r.exit_code == 1 and "is a directory" in r.output
    run(env, "rm", "vol", "-r", "/x")
    r = run(env, "cat", "vol", "/x/y/stdin.txt", ok=False)
    assert r.exit_code == 1 and "no such file" in r.output
    df = json.loads(run(env, "df", "vol", "--json").output)
    assert df["used_inodes"] == 11 + 5 and df["free"] < df["size"]
    from thinpool.pool import Pool
    img = tmp_path / "vol.img"
    with Pool.open(env["THINPOOL_POOL"], readonly=True) as p:
        dev = p.device(1)
        with open(img, "wb") as f:
            f.truncate(dev.size)
            for off, n in dev.mapped_ranges():
                f.seek(off)
                f.write(dev.read(off, n))
    e2fsck(img)


def test_fs_trim_returns_a_deleted_files_chunks(env, tmp_path):
    from thinpool.pool import Pool

    def used() -> int:
        with Pool.open(env["THINPOOL_POOL"], readonly=True) as p:
            return p.status().used_data_blocks

    run(env, "mkfs", "vol")
    (tmp_path / "big").write_bytes(os.urandom(8 * MiB))
    run(env, "put", "vol", str(tmp_path / "big"), "/big")
    full = used()
    run(env, "rm", "vol", "/big")
    assert used() == full
    r = run(env, "trim", "vol")
    assert r.output.startswith("trimmed ") and "on device vol" in r.output
    assert used() < full - 8 * MiB // (64 * 1024) + 4
