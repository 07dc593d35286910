"""Commands import only what their work uses (issue 15: start-up).

Each case runs one CLI command in a fresh interpreter and lists which heavy modules it executed: numpy (~40 ms
of start-up), construct (~10 ms), rich (tables and progress bars only), the crc32c package's ``__init__`` (which
imports importlib.metadata; thinpool loads its C extension directly), tempfile (pipes only). Asserted on
``sys.modules``, never on time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# numpy._core appears in sys.modules once numpy's __init__ has run (thinpool.units.lazy_module defers that).
PROBE = r"""
import json, sys
before = set(sys.modules)  # what the interpreter's own start-up loaded (site, .pth files) is not the command's
sys.argv = ["thinpool"] + json.loads(sys.argv[1])
from thinpool_cli.main import main
try:
    main()
except SystemExit as e:
    code = e.code
else:
    code = 0
heavy = ["numpy._core", "construct", "rich", "crc32c", "tempfile", "thinpool_cli.thin_image", "thinpool.pool"]
print(json.dumps({"code": code, "loaded": [m for m in heavy if m in sys.modules and m not in before]}), file=sys.stderr)
"""


def loaded_by(args: list[str], pool: Path | None = None) -> list[str]:
    env = dict(os.environ)
    if pool is not None:
        env["THINPOOL_POOL"] = str(pool)
    r = subprocess.run([sys.executable, "-c", PROBE, json.dumps(args)], env=env, capture_output=True, text=True,
                       timeout=120)
    last = r.stderr.strip().splitlines()[-1]
    out = json.loads(last)
    assert out["code"] in (0, None), r.stderr
    return list(out["loaded"])


@pytest.fixture(scope="module")
def small_pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from thinpool import Pool

    d = tmp_path_factory.mktemp("startup") / "pool"
    with Pool.create(d, data_size=64 << 20) as p:
        p.create_thin(1, size=16 << 20)
        p.device(1).write(1 << 20, b"\x5a" * 4096)
        p.commit()
    (d.parent / "4k").write_bytes(b"\xa5" * 4096)
    return d


def test_help_imports_no_library_module() -> None:
    assert loaded_by(["--help"]) == []


def test_a_4k_read_imports_neither_numpy_nor_construct(small_pool: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    loaded = loaded_by(["thin", "read", "1", "--offset", "1M", "--length", "4k", "--output", str(out)], small_pool)
    assert loaded == ["thinpool.pool"]
    assert out.read_bytes() == b"\x5a" * 4096  # the probe really did the read


def test_a_4k_overwrite_imports_neither_numpy_nor_construct(small_pool: Path) -> None:
    # an overwrite in place changes no metadata block: the writable open keeps the metadata space map's index
    # entries as read (numpy is loaded only when a bitmap is paged in or the index changes)
    loaded = loaded_by(["thin", "write", "1", str(small_pool.parent / "4k"), "--offset", "1M"], small_pool)
    assert loaded == ["thinpool.pool"]
    from thinpool import Pool

    with Pool.open(small_pool, readonly=True) as p:
        assert p.device(1).read(1 << 20, 4096) == b"\xa5" * 4096


def test_the_checksum_uses_the_crc32c_extension_itself() -> None:
    import crc32c

    from thinpool import checksum

    data = os.urandom(4096)
    assert checksum._crc32c is not crc32c.crc32c or checksum._crc32c.__module__ == "crc32c._crc32c"
    assert checksum._crc32c(data) == crc32c.crc32c(data)
    assert checksum._crc32c(b"123456789") == 0xE3069283


def test_lazy_module_runs_the_module_at_first_attribute_use() -> None:
    probe = r"""
import sys, threading
from thinpool.units import lazy_module
m = lazy_module("colorsys")
before = "colorsys" in sys.modules
out = []
ts = [threading.Thread(target=lambda: out.append(m.rgb_to_hsv(1.0, 0.0, 0.0))) for _ in range(8)]
for t in ts: t.start()
for t in ts: t.join()
print(before, "colorsys" in sys.modules, set(out) == {(0.0, 1.0, 1.0)}, lazy_module("colorsys") is sys.modules["colorsys"])
"""
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert r.stdout.split() == ["False", "True", "True", "True"], r.stderr
