"""The wheel is complete (issue 11): build it with ``pip wheel --no-deps``, install it into a fresh venv (its
dependencies from PyPI), and run ``thinpool quickstart`` there, far from the checkout, so nothing can come from
an editable install or the source tree."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest
from conftest import need_tool

REPO = Path(__file__).resolve().parents[2]


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME",
                                                            "THINPOOL_POOL")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


@pytest.mark.external
@pytest.mark.timeout(1200)
def test_wheel_installs_into_a_fresh_venv_and_runs_quickstart(tmp_path: Path) -> None:
    need_tool("pip")
    env = _clean_env()
    dist = tmp_path / "dist"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(REPO)],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    wheels = list(dist.glob("thinpool-*.whl"))
    assert len(wheels) == 1, wheels
    names = zipfile.ZipFile(wheels[0]).namelist()
    # every package of the source tree is in the wheel (thinpool.tx was once missing), and no bare `cli`
    for pkg in sorted({p.parent for p in (REPO / "thinpool").rglob("__init__.py")}):
        rel = pkg.relative_to(REPO).as_posix()
        assert f"{rel}/__init__.py" in names, f"{rel} is not in the wheel"
    assert "thinpool_cli/main.py" in names and not any(n.startswith("cli/") for n in names)
    assert "thinpool/py.typed" in names

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    py = env_dir / "bin" / "python"
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", str(wheels[0])], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    work = tmp_path / "elsewhere"
    work.mkdir()
    r = subprocess.run([str(py), "-c", "import thinpool, thinpool.tx, thinpool_cli.main; print(thinpool.__file__)"],
                       capture_output=True, text=True, env=env, cwd=work, timeout=120)
    assert r.returncode == 0, r.stderr
    assert str(env_dir) in r.stdout and str(REPO) not in r.stdout  # the installed copy, not the checkout
    r = subprocess.run([str(env_dir / "bin" / "thinpool"), "quickstart", "--no-png"], capture_output=True,
                       text=True, env=env, cwd=work, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "copy-on-write" in r.stdout and (work / "thinpool-demo" / "metadata").exists()
    r = subprocess.run([str(env_dir / "bin" / "thinpool"), "check", "thinpool-demo"], capture_output=True,
                       text=True, env=env, cwd=work, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
