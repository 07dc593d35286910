"""Shared test helpers: real-tool discovery (skip locally, fail in CI), fixture paths, hypothesis profiles."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
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


# The Rust thin-provisioning-tools (pdata_tools 1.1.0), the second oracle beside the C++ 0.9.0 tools on PATH. Their
# directory is $THINPOOL_RUST_TOOLS (set by .ci/run); a tool name written "rust:thin_check" means the one there.
RUST_TOOLS = Path(os.environ.get("THINPOOL_RUST_TOOLS") or "/opt/thin-provisioning-tools-rust/usr/sbin")
RUST = "rust:"
_SYSTEM_DIRS = ("/usr/sbin", "/sbin")


def tool_path(name: str) -> str | None:
    """The program a tool name runs: "rust:NAME" in RUST_TOOLS, else NAME on PATH or in /usr/sbin, /sbin."""
    if name.startswith(RUST):
        p = RUST_TOOLS / name[len(RUST):]
        return str(p) if os.access(p, os.X_OK) else None
    found = shutil.which(name)
    if found is not None:
        return found
    return next((os.path.join(d, name) for d in _SYSTEM_DIRS if os.access(os.path.join(d, name), os.X_OK)), None)


def need_tool(*names: str) -> None:
    """Skip (locally) or fail (CI, THINPOOL_REQUIRE_EXTERNAL=1) unless every named program is installed
    ("rust:thin_check" names the Rust pdata_tools' thin_check in $THINPOOL_RUST_TOOLS)."""
    missing = [n for n in names if tool_path(n) is None]
    if missing:
        msg = f"real tool(s) not installed: {', '.join(missing)}"
        if any(n.startswith(RUST) for n in missing):
            msg += f" (Rust tools looked for in {RUST_TOOLS}; set THINPOOL_RUST_TOOLS)"
        if REQUIRE_EXTERNAL:
            pytest.fail(msg + " (THINPOOL_REQUIRE_EXTERNAL=1: CI must not skip)")
        pytest.skip(msg)


def need_root_feature(what: str, ok: bool) -> None:
    """Skip with a printed reason where a kernel feature (/dev/fuse, loop devices) is absent."""
    if not ok:
        pytest.skip(f"{what} not available on this machine")


def run_tool(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess[str]:
    """Run a real tool (the first argument may be "rust:NAME") and capture its text output."""
    env = dict(os.environ)
    env["PATH"] = env.get("PATH", "") + ":/usr/sbin:/sbin"
    argv = list(args)
    if argv and argv[0].startswith(RUST):
        argv[0] = str(RUST_TOOLS / argv[0][len(RUST):])
    return subprocess.run(argv, capture_output=True, text=True, check=check, env=env, **kw)


@pytest.fixture
def tools():
    return run_tool


def _oracle_failures(*, wait: bool) -> list[str]:
    """The background Rust thin_check runs that rejected what a test handed them (tests/oracles.py)."""
    mod = sys.modules.get("oracles")
    return mod.collect(wait=wait) if mod is not None else []


@pytest.fixture(autouse=True)
def _oracle_background_checks():
    """After each test: fail it if a background Rust thin_check that has finished rejected its copy."""
    yield
    failures = _oracle_failures(wait=False)
    if failures:
        pytest.fail("\n\n".join(failures), pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def _oracle_session_end():
    """At the end of the session: wait for every background Rust thin_check still running."""
    yield
    failures = _oracle_failures(wait=True)
    if failures:
        pytest.fail("\n\n".join(failures), pytrace=False)
