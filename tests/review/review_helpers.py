"""What the review tests of long-lived servers share: a process's descriptors, threads and resident set, and a
server stopped with SIGTERM (killed after 60 s)."""

from __future__ import annotations

import os
import signal
import subprocess


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
