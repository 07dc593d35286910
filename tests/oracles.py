"""The real metadata checkers as one oracle: the C++ thin_check 0.9.0 (on PATH, /usr/sbin) and the Rust pdata_tools'
thin_check 1.1.0 ($THINPOOL_RUST_TOOLS) judge the same metadata, and a test fails with both outputs when either
finds an error. Every test that asks "does the real thin_check accept this?" goes through here.

Rust thin_check 1.1.0 never takes less than 0.5 s of wall time, even on an empty pool: its progress monitor thread
sleeps 500 ms between ticks and the check joins it at the end (src/report.rs, ProgressMonitor::stop); it uses almost
no CPU meanwhile. So ``assert_thin_check`` runs the C++ checker at once and the Rust one in the background, on a
sparse copy of the file taken at the call: the test goes on, every test's teardown collects the Rust runs that have
finished (and fails, naming the test that asked, if one rejected its copy), and the session's end waits for the rest.
THINPOOL_ORACLE_SYNC=1 runs both checkers in the foreground instead.

Set THINPOOL_ORACLE_LOG=FILE to append one line per checker run (tool, seconds, exit status): what the oracle costs.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest


def _root_conftest():  # type: ignore[no-untyped-def]
    """tests/conftest.py itself: ``conftest`` may name a sub-directory's conftest (tests/metadata, tests/rbd) that
    re-exports only some of its helpers."""
    name = "_thinpool_tests_root_conftest_oracles"
    mod = sys.modules.get(name)
    if mod is None:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent / "conftest.py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        sys.modules[name] = mod
    return mod


_conftest = _root_conftest()
RUST: str = _conftest.RUST
RUST_TOOLS: Path = _conftest.RUST_TOOLS
need_tool = _conftest.need_tool
run_tool = _conftest.run_tool
tool_path = _conftest.tool_path

CXX_CHECK = "thin_check"
RUST_CHECK = RUST + "thin_check"
CHECKERS = (CXX_CHECK, RUST_CHECK)

# What each checker prints on stderr for good metadata: its step headers and nothing else.
CXX_STEPS = frozenset({"examining superblock", "examining devices tree", "examining mapping tree",
                       "checking space map counts"})
RUST_STEPS = frozenset({"Checking thin metadata", "device details tree", "mapping tree", "data space map",
                        "metadata space map"})
STEPS = {CXX_CHECK: CXX_STEPS, RUST_CHECK: RUST_STEPS}

_LOG = os.environ.get("THINPOOL_ORACLE_LOG")
_SYNC = os.environ.get("THINPOOL_ORACLE_SYNC") == "1"
_MAX_PENDING = 48  # background Rust checks at once (each sleeps most of its 0.5 s, in about 6 MB)


@dataclass(frozen=True, slots=True)
class CheckRun:
    """One checker's run on one metadata file."""

    tool: str
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def odd_stderr(self) -> list[str]:
        """stderr lines that are not this checker's step headers (warnings, errors)."""
        return [ln for ln in self.stderr.splitlines() if ln.strip() and ln.strip() not in STEPS[self.tool]]

    def describe(self) -> str:
        return (f"--- {self.tool} exit {self.returncode}\nstdout:\n{self.stdout.rstrip()}\n"
                f"stderr:\n{self.stderr.rstrip()}")


def _argv(tool: str, path: str | os.PathLike[str], extra: tuple[str, ...]) -> list[str]:
    prog = tool_path(tool)
    assert prog is not None, tool
    return [prog, *extra, os.fspath(path)]


def _log(tool: str, seconds: float, rc: int) -> None:
    if _LOG:
        with open(_LOG, "a") as log:
            log.write(f"{tool} {seconds:.4f} {rc}\n")


def run_checker(tool: str, path: str | os.PathLike[str], *extra: str) -> CheckRun:
    """Run one checker (CXX_CHECK or RUST_CHECK) on a metadata file, in the foreground; needs it installed."""
    need_tool(tool)
    t0 = time.perf_counter()
    r = subprocess.run(_argv(tool, path, extra), capture_output=True, text=True, timeout=600)
    _log(tool, time.perf_counter() - t0, r.returncode)
    return CheckRun(tool, r.returncode, r.stdout, r.stderr)


def run_checkers(path: str | os.PathLike[str], *extra: str,
                 tools: Iterable[str] = CHECKERS) -> dict[str, CheckRun]:
    """Both checkers' runs on the same file, in the foreground (skips or, in CI, fails unless both are installed)."""
    tools = tuple(tools)
    need_tool(*tools)
    return {t: run_checker(t, path, *extra) for t in tools}


def describe(runs: Mapping[str, CheckRun] | Iterable[CheckRun]) -> str:
    return "\n".join(r.describe() for r in (runs.values() if isinstance(runs, Mapping) else runs))


def _judge(run: CheckRun, *, expect_ok: bool, clean: bool, stdout_has: str | None) -> bool:
    if not expect_ok:
        return not run.ok
    return run.ok and not (clean and run.odd_stderr()) and (stdout_has is None or stdout_has in run.stdout)


# --- the Rust checker in the background ------------------------------------------------------------------------
@dataclass(slots=True)
class _Pending:
    proc: subprocess.Popen[str]
    copy_dir: str
    path: str
    what: str
    test: str
    expect_ok: bool
    clean: bool
    stdout_has: str | None
    cxx: CheckRun | None
    verdict: bool  # from checkers_verdict: the Rust checker is to give 0.9.0's verdict
    started: float = field(default_factory=time.perf_counter)


_pending: list[_Pending] = []
_failures: list[str] = []
_scratch: tempfile.TemporaryDirectory[str] | None = None


def _sparse_copy(src: str, dst: str) -> None:
    """Copy a (sparse) metadata file keeping its holes: only the data extents are read and written."""
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        size = os.fstat(fi.fileno()).st_size
        fo.truncate(size)
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fi.fileno(), pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break
                raise
            end = os.lseek(fi.fileno(), start, os.SEEK_HOLE)
            fi.seek(start)
            fo.seek(start)
            left = end - start
            while left:
                buf = fi.read(min(left, 8 << 20))
                fo.write(buf)
                left -= len(buf)
            pos = end


def _finish(p: _Pending) -> None:
    out, err = p.proc.communicate()
    _log(RUST_CHECK, time.perf_counter() - p.started, p.proc.returncode)
    shutil.rmtree(p.copy_dir, ignore_errors=True)
    run = CheckRun(RUST_CHECK, p.proc.returncode, out, err)
    if not _judge(run, expect_ok=p.expect_ok, clean=p.clean, stdout_has=p.stdout_has):
        if p.verdict:
            want = f"disagrees with {CXX_CHECK} 0.9.0, which {'accepted' if p.expect_ok else 'rejected'} it"
        else:
            want = "did not accept it"
        _failures.append(f"{RUST_CHECK} {want}: {p.what + ': ' if p.what else ''}{p.path} "
                         f"(copied when test {p.test} asked)\n{describe([r for r in (p.cxx, run) if r])}")


def _submit_rust(path: str, extra: tuple[str, ...], *, what: str, expect_ok: bool, clean: bool,
                 stdout_has: str | None, cxx: CheckRun | None, verdict: bool = False) -> None:
    global _scratch
    while len(_pending) >= _MAX_PENDING:
        _finish(_pending.pop(0))
    if _scratch is None:
        _scratch = tempfile.TemporaryDirectory(prefix="thinpool-oracle-")
    copy_dir = tempfile.mkdtemp(dir=_scratch.name)
    copy = os.path.join(copy_dir, "metadata")
    _sparse_copy(path, copy)
    proc = subprocess.Popen(_argv(RUST_CHECK, copy, extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True)
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0]
    _pending.append(_Pending(proc, copy_dir, path, what, test, expect_ok, clean, stdout_has, cxx, verdict))


def collect(*, wait: bool) -> list[str]:
    """The background Rust checks' failures so far (and forget them): those finished, or all of them with ``wait``.
    tests/conftest.py calls this after every test (wait=False) and at the end of the session (wait=True)."""
    for p in list(_pending):
        if wait or p.proc.poll() is not None:
            _pending.remove(p)
            _finish(p)
    out = list(_failures)
    _failures.clear()
    return out


# --- what the tests call ---------------------------------------------------------------------------------------
def assert_thin_check(path: str | os.PathLike[str], *extra: str, clean: bool = True, what: str = "",
                      stdout_has: str | None = None) -> CheckRun:
    """The C++ and the Rust thin_check both accept the metadata: exit 0 and (``clean``) nothing on stderr but their
    step headers (and ``stdout_has`` on stdout). The C++ run happens now (its result is returned); the Rust one on a
    copy in the background (see the module docstring). A failure shows both checkers' output."""
    need_tool(*CHECKERS)
    path = os.fspath(path)
    cxx = run_checker(CXX_CHECK, path, *extra)
    if not _judge(cxx, expect_ok=True, clean=clean, stdout_has=stdout_has):
        rust = run_checker(RUST_CHECK, path, *extra)
        pytest.fail(f"{what + ': ' if what else ''}{CXX_CHECK} rejected {path}{' (or printed warnings)' if clean else ''}"
                    f":\n{describe([cxx, rust])}", pytrace=False)
    if _SYNC:
        rust = run_checker(RUST_CHECK, path, *extra)
        if not _judge(rust, expect_ok=True, clean=clean, stdout_has=stdout_has):
            pytest.fail(f"{what + ': ' if what else ''}{RUST_CHECK} rejected {path}:\n{describe([cxx, rust])}",
                        pytrace=False)
    else:
        _submit_rust(path, extra, what=what, expect_ok=True, clean=clean, stdout_has=stdout_has, cxx=cxx)
    return cxx


def checkers_verdict(path: str | os.PathLike[str], *extra: str, what: str = "") -> bool:
    """Whether the metadata passes the real checkers: the C++ verdict now, and the Rust checker must give the same
    one (in the background; the message shows both outputs when it does not). For damaged metadata, where a test
    compares our checker with the real ones."""
    need_tool(*CHECKERS)
    path = os.fspath(path)
    cxx = run_checker(CXX_CHECK, path, *extra)
    if _SYNC:
        rust = run_checker(RUST_CHECK, path, *extra)
        assert rust.ok == cxx.ok, f"the checkers disagree on {path}:\n{describe([cxx, rust])}"
    else:
        _submit_rust(path, extra, what=what, expect_ok=cxx.ok, clean=False, stdout_has=None, cxx=cxx, verdict=True)
    return cxx.ok


def write_blocks(blocks: Mapping[int, bytes], nr_blocks: int, dest: str | os.PathLike[str]) -> None:
    """A sparse metadata file of nr_blocks 4 KiB blocks holding ``blocks`` (block number -> 4 KiB)."""
    with open(dest, "wb") as f:
        f.truncate(nr_blocks * 4096)
        for b, buf in blocks.items():
            f.seek(b * 4096)
            f.write(buf)


def assert_thin_check_blocks(blocks: Mapping[int, bytes], nr_blocks: int, *, clean: bool = True,
                             what: str = "") -> None:
    """assert_thin_check on in-memory metadata (a MemoryBlockStore's blocks), written to a scratch file."""
    need_tool(*CHECKERS)
    with tempfile.TemporaryDirectory(prefix="thinpool-oracle-") as d:
        path = Path(d) / "metadata"
        write_blocks(blocks, nr_blocks, path)
        assert_thin_check(path, clean=clean, what=what)


def checkers_installed() -> bool:
    """Whether both checkers are installed."""
    return all(tool_path(t) is not None for t in CHECKERS)


# Whether harnesses that check sampled images should run the checkers: when installed, and always in CI (where a
# missing checker then fails the test through need_tool instead of being passed over).
RUN_CHECKERS: bool = checkers_installed() or _conftest.REQUIRE_EXTERNAL

__all__ = ["CHECKERS", "CXX_CHECK", "RUN_CHECKERS", "RUST", "RUST_CHECK", "RUST_TOOLS", "CheckRun",
           "assert_thin_check", "assert_thin_check_blocks", "checkers_installed", "checkers_verdict", "collect",
           "describe", "need_tool", "run_checker", "run_checkers", "run_tool", "tool_path"]
