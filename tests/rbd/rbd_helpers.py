"""Helpers of the RBD tests: pools with a device and a chain of snapshots, raw images of devices, the CLI."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
from pathlib import Path

from click.testing import CliRunner, Result

from thinpool.pool import Pool
from thinpool_cli.main import cli

KiB, MiB = 1 << 10, 1 << 20


def run(*args: object, input: bytes | None = None) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], input=input, env={"THINPOOL_POOL": None},
                              catch_exceptions=False)


def ok(*args: object, **kw) -> Result:
    r = run(*args, **kw)
    assert r.exit_code == 0, f"exit {r.exit_code}\nstdout: {r.stdout_bytes[:2000]!r}\nstderr: {r.stderr}"
    return r


def fails(code: int, *args: object, **kw) -> Result:
    """Exit ``code`` with one ``thinpool: error:`` line on stderr, no traceback."""
    r = run(*args, **kw)
    assert r.exit_code == code, f"exit {r.exit_code} != {code}\nstderr: {r.stderr}"
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("thinpool: error: "), r.stderr
    assert "Traceback" not in r.stderr
    return r


def fingerprint(pool: Path) -> dict[str, str]:
    out = {}
    for name in ("metadata", "pool.json", "data"):
        p = pool / name
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for piece in iter(lambda: f.read(1 << 20), b""):
                h.update(piece)
        out[name] = h.hexdigest()
    return out


def device_bytes(pool: Pool, ref: str | int) -> bytes:
    d = pool.find_device(ref)
    return pool.device(d).read(0, pool.device_size(d))


def pattern(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def build_chain(path: Path, *, chunk: int = 64 * KiB, size: int = 9 * MiB + 3 * 512, origin: str | None = None,
                data_size: int = 128 * MiB) -> dict[str, bytes]:
    """A pool at ``path`` with device ``vol`` and snapshots ``s1``, ``s2``, ``s3`` taken between rounds of
    writes, overwrites, discards, write_zeroes and all-zero writes (the size is not a multiple of the chunk).
    Returns the expected bytes of every device (the model, kept by hand beside the pool)."""
    model = {}
    with Pool.create(path, data_size=data_size, chunk_size=chunk) as pool:
        vol = pool.create_thin(1, size, name="vol", origin=origin)
        img = bytearray(vol.read(0, size))

        def w(off: int, data: bytes) -> None:
            vol.write(off, data)
            img[off:off + len(data)] = data

        def z(off: int, n: int) -> None:
            vol.write_zeroes(off, n)
            img[off:off + n] = bytes(n)

        def disc(off: int, n: int) -> None:  # whole chunks only: those read as zeros (or the origin) afterwards
            vol.discard(off, n)
            first, last = -(-off // chunk), (off + n) // chunk
            if off + n == size:
                last = -(-size // chunk)
            for c in range(first, last):
                a, b = c * chunk, min((c + 1) * chunk, size)
                img[a:b] = _origin_bytes(origin, a, b - a)

        w(0, pattern(1, 100_000))
        w(3 * MiB + 777, pattern(2, 2 * MiB))
        w(size - 5000, pattern(3, 5000))  # the last, partial chunk
        w(6 * MiB, bytes(3 * chunk))  # all-zero data: must travel as zeros
        pool.create_snap(2, 1, name="s1")
        model["s1"] = bytes(img)
        w(3 * MiB + 10, pattern(4, 3000))  # overwrite (CoW)
        disc(0, 2 * chunk)  # discard what s1 has
        w(8 * MiB, pattern(5, chunk))
        pool.create_snap(3, 1, name="s2")
        model["s2"] = bytes(img)
        z(3 * MiB, chunk + 100)  # write_zeroes over shared and partial chunks
        w(5 * MiB, pattern(6, 4 * chunk + 1))
        disc(8 * MiB, size - 8 * MiB)  # up to the end, including the partial last chunk
        pool.create_snap(4, 1, name="s3")
        model["s3"] = bytes(img)
        w(7 * MiB, pattern(7, 1000))
        model["vol"] = bytes(img)
        for name, want in model.items():
            assert device_bytes(pool, name) == want, name
    return model


def _origin_bytes(origin: str | None, off: int, n: int) -> bytes:
    if origin is None:
        return bytes(n)
    with open(origin, "rb") as f:
        f.seek(off)
        b = f.read(n)
    return b + bytes(n - len(b))


def merge_diff(*paths: Path, out: Path) -> subprocess.CompletedProcess[str]:
    """The real, offline ``rbd merge-diff`` (no cluster: ``-c /dev/null``)."""
    if out.exists():
        os.unlink(out)
    return subprocess.run(["rbd", "-c", "/dev/null", "merge-diff", "--no-progress", *map(str, paths), str(out)],
                          capture_output=True, text=True, timeout=120)
