"""What the review tests share: a process's descriptors, threads and resident set (and a wait for them to settle),
a server stopped with SIGTERM
(killed after 60 s), and a device read through each of its read paths."""

from __future__ import annotations

import os
import signal
import subprocess
import time


def proc_counts(pid: int) -> tuple[int, int, int]:
    """(open descriptors, threads, VmRSS bytes) of ``pid``."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    threads = rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                threads = int(line.split()[1])
            elif line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
    return fds, threads, rss


def settled_counts(pid: int, fds0: int, threads0: int, timeout: float = 20.0) -> tuple[int, int, int]:
    """``proc_counts(pid)`` once its descriptors and threads are back to the baseline ``fds0``/``threads0``, or
    after ``timeout`` seconds (what a slow host needs to finish closing what clients left: FUSE sends RELEASE
    after close() returns; a server closes a dropped socket at its next loop turn)."""
    deadline = time.monotonic() + timeout
    while True:
        now = proc_counts(pid)
        if (now[0] <= fds0 and now[1] <= threads0) or time.monotonic() > deadline:
            return now
        time.sleep(0.1)


def stop_process(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    """SIGTERM (if still running), then its exit status and output; killed if it has not exited in 60 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return proc.returncode, out, err


def read_by(dev, off: int, n: int, how: int) -> bytes:  # type: ignore[no-untyped-def]
    """``n`` bytes at ``off`` through one of a device's read paths: 0 read, 1 readinto, 2 readv (two pieces),
    3 ThinFile (short reads followed up)."""
    if how == 0:
        return dev.read(off, n)
    if how == 1:
        buf = bytearray(n)
        dev.readinto(off, buf)
        return bytes(buf)
    if how == 2:
        half = n // 2
        parts = dev.readv([(off, half), (off + half, n - half)]) if half else [dev.read(off, n)]
        return b"".join(parts)
    f = dev.open("rb")
    f.seek(off)
    out = b""
    while len(out) < n:
        got = f.read(n - len(out))
        if not got:
            break
        out += got
    return out
