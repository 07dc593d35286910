"""Listening sockets for the servers: unix sockets with an explicit mode and no takeover, TCP with checks.

Layer: nbd. May import: thinpool.errors.

``bind_unix`` refuses to replace a socket a live server still accepts on (a connect() succeeds), removes a
stale one (connect() is refused), refuses any other kind of file, and sets the socket's mode explicitly (the
umask does not decide who may connect). ``bind_tcp`` checks the port range and turns OSErrors into one-line
ListenErrors. ``is_loopback`` tells whether a listen address keeps traffic on this machine.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import stat

from thinpool.errors import AddressInUse, ListenError

BACKLOG = 128


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``; False for wildcard and other addresses."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _live(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError as e:
        if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return False
        return True  # EAGAIN (backlog full) and the like: somebody is there
    finally:
        probe.close()
    return True


def bind_unix(path: str, mode: int = 0o600) -> socket.socket:
    """A listening, non-blocking unix socket at ``path`` with permissions ``mode``.

    Raises:
        AddressInUse: a server is accepting on ``path``.
        ListenError: ``path`` is not a socket, its directory does not exist, or bind fails.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise ListenError(address=path, reason=e.strerror or str(e)) from e
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise ListenError(address=path, reason="exists and is not a socket")
        if _live(path):
            raise AddressInUse(address=path)
        try:
            os.unlink(path)  # a stale socket from an earlier run
        except FileNotFoundError:
            pass
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ListenError(address=path, reason=f"directory {parent} does not exist")
    tmp = os.path.join(parent, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        sock.bind(tmp)  # bind under a private name, set the mode, then move into place: never a window
        os.chmod(tmp, mode)  # in which the umask's permissions apply
        os.rename(tmp, path)
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        for p in (tmp,):
            try:
                os.unlink(p)
            except OSError:
                pass
        if len(path.encode()) > 107:
            raise ListenError(address=path, reason="socket path too long (108 bytes at most)") from e
        raise ListenError(address=path, reason=e.strerror or str(e)) from e
    return sock


def bind_tcp(host: str, port: int) -> socket.socket:
    """A listening, non-blocking TCP socket on ``host:port`` (IPv4 or IPv6 literal, or a name)."""
    if not 0 <= port <= 65535:
        raise ListenError(address=f"{host}:{port}", reason="port must be 0..65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ListenError(address=f"{host}:{port}", reason=str(e.strerror)) from e
    family, _t, _p, _c, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise ListenError(address=f"{host}:{port}", reason=e.strerror or str(e)) from e
    return sock
