"""Helpers for the CLI tests: a CliRunner wrapper, pools made through the CLI, golden images, state fingerprints."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from thinpool_cli.main import cli

REPO = Path(__file__).resolve().parents[2]
IMAGES = REPO / "images"
IMAGE_NAMES = ["f1_empty_pool", "f2_single_thin", "f3_snapshot", "f4_refcount_multilevel", "f5_needs_check_v1",
               "f6_snapshots_5000", "f7_many_devices"]


def run(*args: object, input: bytes | str | None = None, env: dict[str, str] | None = None) -> Result:
    """Invoke the CLI in-process; THINPOOL_POOL is unset unless given in ``env``."""
    e = {"THINPOOL_POOL": None}
    if env:
        e.update(env)
    return CliRunner().invoke(cli, [str(a) for a in args], input=input, env=e, catch_exceptions=False)


def ok(*args: object, **kw) -> Result:
    r = run(*args, **kw)
    assert r.exit_code == 0, f"exit {r.exit_code}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    return r


def fails(code: int, *args: object, **kw) -> Result:
    """Run, expect exit ``code`` with exactly one stderr line for thinpool errors (no traceback)."""
    r = run(*args, **kw)
    assert r.exit_code == code, f"exit {r.exit_code} != {code}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    assert "Traceback" not in r.stderr
    if code != 2:
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("thinpool: error: "), r.stderr
    return r


def unpack_image(name: str, dest: Path) -> Path:
    out = dest / f"{name}.bin"
    with gzip.open(IMAGES / f"{name}.bin.gz", "rb") as f, open(out, "wb") as g:
        shutil.copyfileobj(f, g)
    return out


def fingerprint(pool: Path) -> dict[str, str]:
    """Hashes of a pool's metadata, manifest and data files (to prove that a failed command changed nothing)."""
    out = {}
    for name in ("metadata", "pool.json", "data"):
        p = pool / name
        if p.exists():
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            out[name] = h.hexdigest()
    return out


def file_hash(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture
def pool(tmp_path: Path) -> Path:
    """An empty pool (32 MiB data, 64 KiB chunks) made through the CLI."""
    p = tmp_path / "pool"
    ok("pool", "create", p, "--size", "32M", "--chunk-size", "64k")
    return p


@pytest.fixture
def busy_pool(tmp_path: Path) -> Path:
    """A pool with an origin (vol, id 1), a snapshot (id 2), an overwrite that broke sharing, an empty device (5),
    and a held metadata snapshot."""
    p = tmp_path / "busy"
    ok("pool", "create", p, "--size", "32M")
    ok("thin", "create", "1", "--size", "4M", "--name", "vol", "-p", p)
    ok("thin", "write", "vol", "-", "-p", p, input=b"A" * (5 * 65536 + 100))
    ok("thin", "write", "vol", "--offset", "1M", "-", "-p", p, input=b"Z" * 4096)
    ok("thin", "snap", "2", "vol", "--name", "snap", "-p", p)
    ok("thin", "write", "vol", "--offset", "64k", "-", "-p", p, input=b"B" * 4096)
    ok("thin", "write", "snap", "--offset", "192k", "-", "-p", p, input=b"C" * 65536)
    ok("thin", "create", "5", "--size", "1M", "-p", p)
    ok("pool", "reserve-metadata-snap", "-p", p)
    ok("thin", "write", "vol", "--offset", "2M", "-", "-p", p, input=b"D" * 1000)
    return p


def read_pty(master: int, idle_timeout: float) -> bytes:
    """Everything the terminal side ``master`` of a pty gets until the child closes it (EOF or EIO), or until
    nothing arrives for ``idle_timeout`` seconds. poll, not select: a descriptor numbered past FD_SETSIZE (1024)
    must work too."""
    import select

    poller = select.poll()
    poller.register(master, select.POLLIN)
    out = b""
    while True:
        if not poller.poll(idle_timeout * 1000):
            break
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    return out


def random_pool(path: Path, seed: int, dev_chunks: int) -> list[int]:
    """A pool at ``path`` built by random writes, snapshots of snapshots, overwrites and deletes (64 KiB chunks;
    ``dev_chunks`` > 126 gives multi-level mapping trees partly shared between snapshots). Returns the live device ids."""
    import random

    from thinpool.pool import Pool

    CH = 64 << 10  # noqa: N806
    rng = random.Random(seed)
    big = dev_chunks > 126  # multi-level mapping trees, partly shared between snapshots
    with Pool.create(path, data_size=(4096 if big else 512) * CH) as p:
        live = [0]
        p.create_thin(0, dev_chunks * CH)
        for i in range(1, 12):
            op = rng.random()
            dev = p.device(rng.choice(live))
            for _ in range(rng.randint(1, 12)):
                n = rng.choice([512, 4096, CH, 3 * CH // 2] + ([40 * CH, 100 * CH] if big else []))
                dev.write(rng.randrange(0, dev.size - n), bytes([rng.randrange(256)]) * n)
            if op < 0.6:
                p.create_snap(i, rng.choice(live))
                live.append(i)
            elif op < 0.75 and len(live) > 2:
                victim = rng.choice(live[1:])
                p.delete_thin(victim)
                live.remove(victim)
            else:
                p.create_thin(i, dev_chunks // 2 * CH)
                live.append(i)
    return live
