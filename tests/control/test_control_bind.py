"""The control socket appears at its path only once it accepts connections (a client that finds the file must be
able to connect: the CLI otherwise falls back to opening the pool itself and meets PoolLocked)."""

from __future__ import annotations

import os
import socket

from thinpool import control


def test_the_socket_listens_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    path = str(tmp_path / "ctl.sock")
    seen: list[str] = []
    real_rename = os.rename

    def rename_then_connect(src, dst, *a, **kw):
        real_rename(src, dst, *a, **kw)
        if dst == path:
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                c.connect(path)  # refused if listen() had not been called yet
                seen.append("connected")
            finally:
                c.close()

    monkeypatch.setattr(control.os, "rename", rename_then_connect)
    sock = control._bind(path, 0o600)
    try:
        assert seen == ["connected"]
        assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    finally:
        sock.close()
