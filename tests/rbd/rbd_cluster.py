"""A throw-away one-node Ceph cluster on 127.0.0.1 (one mon, one memstore OSD, size 1, auth none) in a temp dir.

Started once per test session by the ``ceph`` fixture (tests/rbd/conftest.py) and stopped by pid at the end,
OSD first. Ports are picked free at start so parallel sessions do not collide.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

DAEMONS = ("ceph-mon", "ceph-osd", "monmaptool", "ceph", "rbd")


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free ports on 127.0.0.1: each socket stays bound until all are picked (one closed before
    the next bind could hand the same port out twice, and the mon could not bind its second address)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


class CephCluster:
    """One mon + one memstore OSD under ``root``; ``rbd(...)`` runs the real rbd CLI against it."""

    def __init__(self, root: Path, *, memstore_bytes: int = 512 << 20) -> None:
        self.root = root
        self.conf = root / "ceph.conf"
        self.fsid = str(uuid.uuid4())
        self.memstore_bytes = memstore_bytes
        self.env = dict(os.environ, CEPH_CONF=str(self.conf))
        self.env["PATH"] = self.env.get("PATH", "") + ":/usr/sbin:/sbin"
        self.pids: dict[str, Path] = {"osd": root / "run" / "osd.0.pid", "mon": root / "run" / "mon.a.pid"}

    # --- lifecycle --------------------------------------------------------------------------------------------
    def start(self, timeout: float = 120.0) -> None:
        r = self.root
        (r / "run").mkdir(parents=True, exist_ok=True)
        (r / "log").mkdir(exist_ok=True)
        (r / "mon").mkdir(exist_ok=True)
        (r / "osd").mkdir(exist_ok=True)
        v2, v1 = _free_ports(2)
        addr = f"[v2:127.0.0.1:{v2},v1:127.0.0.1:{v1}]"
        self.conf.write_text(f"""[global]
fsid = {self.fsid}
mon host = {addr}
public addr = 127.0.0.1
auth cluster required = none
auth service required = none
auth client required = none
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
osd crush chooseleaf type = 0
mon warn on pool no redundancy = false
run dir = {r}/run
pid file = {r}/run/$name.pid
admin socket = {r}/run/$name.asok
log file = {r}/log/$name.log
keyring = /dev/null
osd pool default pg autoscale mode = off
mon osd full ratio = 0.98
mon osd nearfull ratio = 0.97
mon osd backfillfull ratio = 0.975
[osd.0]
osd objectstore = memstore
memstore device bytes = {self.memstore_bytes}
osd data = {r}/osd
osd journal size = 0
[mon.a]
mon data = {r}/mon
""")
        self._run("monmaptool", "--create", "--fsid", self.fsid, "--addv", "a", addr, str(r / "monmap"))
        self._run("ceph-mon", "--mkfs", "-i", "a", "--monmap", str(r / "monmap"), "--keyring", "/dev/null")
        self._run("ceph-mon", "-i", "a")
        deadline = time.monotonic() + timeout
        self._wait(lambda: self._ok("ceph", "--connect-timeout", "5", "mon", "stat"), deadline, "mon")
        osd_uuid = str(uuid.uuid4())
        self._run("ceph", "osd", "new", osd_uuid)
        self._run("ceph-osd", "-i", "0", "--mkfs", "--osd-uuid", osd_uuid)
        self._run("ceph-osd", "-i", "0")
        self._wait(lambda: "osd.0 up" in self._run("ceph", "osd", "dump").stdout, deadline, "osd.0 up")
        self._start_watchdog()
        self._run("ceph", "osd", "pool", "create", "rbd", "8", "8")
        self._run("ceph", "osd", "pool", "application", "enable", "rbd", "rbd")
        self._run("rbd", "pool", "init", "rbd")

    def _start_watchdog(self) -> None:
        """A small process that kills the daemons by their pid files (and removes the directory) if this (test)
        process dies without ``stop`` (killed by a timeout, say), so no cluster outlives its session."""
        import sys

        code = ("import os, shutil, signal, sys, time\n"
                "parent, root, files = int(sys.argv[1]), sys.argv[2], sys.argv[3:]\n"
                "while True:\n"
                "    try:\n"
                "        os.kill(parent, 0)\n"
                "    except ProcessLookupError:\n"
                "        break\n"
                "    time.sleep(1)\n"
                "for f in files:\n"
                "    try:\n"
                "        os.kill(int(open(f).read().strip()), signal.SIGKILL)\n"
                "    except (OSError, ValueError):\n"
                "        pass\n"
                "time.sleep(1)\n"
                "shutil.rmtree(root, ignore_errors=True)\n")
        args = [sys.executable, "-c", code, str(os.getpid()), str(self.root), str(self.pids["osd"]),
                str(self.pids["mon"])]
        self._watchdog = subprocess.Popen(args, start_new_session=True,
                                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        """Stop the OSD, then the mon, by their pid files (SIGTERM, then SIGKILL after 20 s)."""
        wd = getattr(self, "_watchdog", None)
        if wd is not None:
            wd.kill()
            wd.wait()
        for name in ("osd", "mon"):
            pidfile = self.pids[name]
            try:
                pid = int(pidfile.read_text().strip())
            except (OSError, ValueError):
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            for _ in range(200):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def daemon_rss(self) -> dict[str, int]:
        """Resident set size (bytes) of the mon and the OSD."""
        out: dict[str, int] = {}
        for name, pidfile in self.pids.items():
            try:
                pid = int(pidfile.read_text().strip())
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        out[name] = int(line.split()[1]) * 1024
            except (OSError, ValueError):
                pass
        return out

    # --- commands ---------------------------------------------------------------------------------------------
    def _run(self, *args: str, check: bool = True, input: bytes | None = None,
             timeout: float = 300) -> subprocess.CompletedProcess[str]:
        p = subprocess.run(list(args), env=self.env, capture_output=True, timeout=timeout, input=input)
        res = subprocess.CompletedProcess(p.args, p.returncode, p.stdout.decode(errors="replace"),
                                          p.stderr.decode(errors="replace"))
        if check and p.returncode:
            raise AssertionError(f"{' '.join(args)} exited {p.returncode}: {res.stderr.strip()[-2000:]}")
        return res

    def _ok(self, *args: str) -> bool:
        try:
            return self._run(*args, check=False, timeout=30).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    @staticmethod
    def _wait(cond, deadline: float, what: str) -> None:
        while time.monotonic() < deadline:
            if cond():
                return
            time.sleep(0.5)
        raise AssertionError(f"ceph test cluster: timed out waiting for {what}")

    def rbd(self, *args: str, check: bool = True, input: bytes | None = None) -> subprocess.CompletedProcess[str]:
        """Run the real ``rbd`` CLI against the cluster (``--no-progress`` where rbd takes it is up to callers)."""
        return self._run("rbd", *args, check=check, input=input)


def have_ceph() -> list[str]:
    """The Ceph programs missing from this machine."""
    extra = ["/usr/sbin", "/sbin"]
    return [n for n in DAEMONS
            if shutil.which(n) is None and not any(os.access(os.path.join(d, n), os.X_OK) for d in extra)]


# Linux keeps a process's peak RSS across fork and exec (exec_mmap records the old mm's high-water mark), so a
# child spawned straight from a big test process reports the parent's RSS. This tiny launcher is started first;
# it spawns the measured command from its own small image and prints that grandchild's peak RSS (bytes).
_LAUNCHER = ("import os, subprocess, sys\n"
             "p = subprocess.Popen(sys.argv[1:], stdout=sys.stdout.fileno(), stderr=sys.stderr.fileno())\n"
             "_, st, ru = os.wait4(p.pid, 0)\n"
             "os.write(int(os.environ['RSS_FD']), b'%d %d' % (os.waitstatus_to_exitcode(st), ru.ru_maxrss * 1024))\n")


def measure(args: list[str], *, env: dict[str, str] | None = None, stdin: bytes | None = None,
            stdout=None) -> tuple[float, int]:
    """(seconds, peak RSS in bytes) of one run of ``args``; fails on a non-zero exit."""
    import sys

    r, w = os.pipe()
    t0 = time.monotonic()
    penv = dict(os.environ if env is None else env, RSS_FD=str(w))
    p = subprocess.Popen([sys.executable, "-c", _LAUNCHER, *args], env=penv, pass_fds=(w,),
                         stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                         stdout=stdout if stdout is not None else subprocess.DEVNULL, stderr=subprocess.PIPE)
    os.close(w)
    _, err = p.communicate(stdin, timeout=1800)
    dt = time.monotonic() - t0
    with os.fdopen(r, "rb") as f:
        out = f.read().split()
    assert p.returncode == 0 and out and int(out[0]) == 0, err.decode(errors="replace")[-2000:]
    return dt, int(out[1])
