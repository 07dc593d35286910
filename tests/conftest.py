"""Shared test helpers: real-tool discovery (skip locally, fail in CI), fixture paths, hypothesis profiles."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

REPO = Path(__file__).resolve().parent.parent
IMAGES = REPO / "images"

settings.register_profile("dev", max_examples=30, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

REQUIRE_EXTERNAL = os.environ.get("THINPOOL_REQUIRE_EXTERNAL") == "1"


def need_tool(*names: str) -> None:
    """Skip (locally) or fail (CI, THINPOOL_REQUIRE_EXTERNAL=1) unless every named program is on PATH."""
    extra = ["/usr/sbin", "/sbin"]
    missing = [n for n in names
               if shutil.which(n) is None and not any(os.access(os.path.join(d, n), os.X_OK) for d in extra)]
    if missing:
        msg = f"real tool(s) not installed: {', '.join(missing)}"
        if REQUIRE_EXTERNAL:
            pytest.fail(msg + " (THINPOOL_REQUIRE_EXTERNAL=1: CI must not skip)")
        pytest.skip(msg)


def need_root_feature(what: str, ok: bool) -> None:
    """Skip with a printed reason where a kernel feature (/dev/fuse, loop devices) is absent."""
    if not ok:
        pytest.skip(f"{what} not available on this machine")


def run_tool(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PATH"] = env.get("PATH", "") + ":/usr/sbin:/sbin"
    return subprocess.run(list(args), capture_output=True, text=True, check=check, env=env, **kw)


@pytest.fixture
def tools():
    return run_tool
