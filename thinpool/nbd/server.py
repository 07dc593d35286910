"""An NBD server on asyncio exporting BlockDevices by name (and alias), bounded against hostile clients.

Layer: nbd. May import: thinpool.errors, thinpool.io, thinpool.nbd.protocol, thinpool.nbd.listen.

Protocol coverage: fixed-newstyle handshake (NO_ZEROES); options EXPORT_NAME, ABORT, LIST, STARTTLS, INFO, GO,
STRUCTURED_REPLY, LIST_META_CONTEXT, SET_META_CONTEXT (``base:allocation``); commands READ, WRITE (FUA), FLUSH,
TRIM, WRITE_ZEROES (FUA, NO_HOLE), BLOCK_STATUS (REQ_ONE), DISC. Anything else is refused with the error the
NBD protocol document names (``NBD_REP_ERR_UNSUP`` for unknown options, ``NBD_EINVAL`` for unknown commands),
and a connection is dropped only where the spec says so (bad magic, unknown client flags, EXPORT_NAME of an
unknown export or one longer than 64 KiB). A misbehaving connection never affects others.

Resources (:class:`ServerOptions`, all per connection unless noted): at most ``max_in_flight`` requests run off
the loop and at most ``max_reply_bytes`` of replies wait to be sent before the server stops reading from that
client; the receive buffer grows with the data that actually arrived (a WRITE header never makes the server
allocate its declared payload); a client has ``handshake_timeout`` seconds to reach transmission; at most
``max_connections`` connections exist (per server; at the cap the oldest connection still in its handshake is
evicted, else accepting pauses); EMFILE/ENFILE pause accepting for a moment with one log line per 10 s.
Requests longer than ``split_bytes`` (READ, TRIM, WRITE_ZEROES) run in a worker thread in pieces, releasing the
device lock between pieces, so other clients keep being served.

Device calls are made under ``NBDServer.lock`` (a ``threading.Lock`` other threads can take to touch the same
devices safely). Pipelined requests are handled as one batch: the plain WRITEs and structured READs that arrived
together run under one hold of the lock (at most 256 requests or 4 MiB of payload, and no more reply bytes than
``max_reply_bytes``), write payloads go to the device as views of the receive buffer, and their replies leave in
one send, in the requests' order; any other request ends the batch and runs after every request before it (so a
FLUSH covers every write received before it). ``FLUSH`` and ``FUA`` call ``device.flush()``. A failed flush (a
failed commit) *fails the server* as dm-thin's metadata_operation_failed fails a pool: every later request except
DISC gets an error, so nothing acknowledged can read back changed; ``NBDServer.failed`` holds the reason.

TLS: with ``ServerOptions.tls`` (an ``ssl.SSLContext``), ``NBD_OPT_STARTTLS`` upgrades the connection;
``tls_mode="require"`` refuses every other option before it (``NBD_REP_ERR_TLS_REQD``).

Public entry points: :func:`serve` (blocking, for the CLI; SIGINT/SIGTERM shut down cleanly and call
``on_shutdown``) and :class:`ServerThread` (a server on its own loop in a background thread, for tests).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from thinpool.io.device import BlockDevice
from thinpool.nbd.connection import _Connection
from thinpool.nbd.handshake import _Export
from thinpool.nbd.listen import bind_tcp, bind_unix

log = logging.getLogger("thinpool.nbd")

_EMFILE_BACKOFF = 0.5  # seconds without accepting after EMFILE/ENFILE
_LOG_EVERY = 10.0  # seconds between two log lines about the same resource problem


@dataclass(slots=True)
class ServerOptions:
    """Limits and policies of one server (the defaults are qemu-nbd's where it has one)."""

    max_connections: int = 100  # connections at once (qemu-nbd/qemu-storage-daemon: 100)
    handshake_timeout: float = 10.0  # seconds from accept to transmission (qemu's fix of CVE-2024-7409)
    max_in_flight: int = 16  # requests running off the loop per connection (qemu-nbd: MAX_NBD_REQUESTS)
    max_reply_bytes: int = 8 * 1024 * 1024  # reply bytes queued per connection before reading stops
    split_bytes: int = 4 * 1024 * 1024  # READ/TRIM/WRITE_ZEROES longer than this run in a worker, in pieces
    workers: int = 4  # worker threads for long requests (per server)
    tls: ssl.SSLContext | None = None  # enables NBD_OPT_STARTTLS
    tls_mode: str = "off"  # off | on (offered) | require (plaintext refused)
    socket_mode: int = 0o600  # mode of a unix listening socket
    read_only: bool = False  # every export read-only


class _RateLog:
    """One log line per ``every`` seconds for a recurring problem (with the count of those suppressed)."""

    def __init__(self, every: float = _LOG_EVERY) -> None:
        self.every = every
        self.last = -1e9
        self.suppressed = 0

    def __call__(self, level: int, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self.last >= self.every:
            if self.suppressed:
                msg += " (%d similar messages suppressed)"
                args = (*args, self.suppressed)
            log.log(level, msg, *args)
            self.last, self.suppressed = now, 0
        else:
            self.suppressed += 1


class NBDServer:
    """The server state shared by all connections: the exports, the device lock, the listening sockets."""

    def __init__(self, exports: Mapping[str, BlockDevice], *, on_shutdown: Callable[[], Any] | None = None,
                 lock: threading.Lock | None = None, options: ServerOptions | None = None,
                 aliases: Mapping[str, str] | None = None) -> None:
        self.options = options if options is not None else ServerOptions()
        if self.options.tls_mode not in ("off", "on", "require"):
            raise ValueError(f"tls_mode {self.options.tls_mode!r}: use off, on or require")
        if self.options.tls_mode != "off" and self.options.tls is None:
            raise ValueError("tls_mode on/require needs an SSL context")
        self.exports: dict[str, _Export] = {}
        for name, dev in exports.items():
            self.add_export(str(name), dev)
        self.aliases = {str(k): str(v) for k, v in (aliases or {}).items()}
        self.on_shutdown = on_shutdown
        self.lock = lock if lock is not None else threading.Lock()
        self.connections: set[_Connection] = set()
        self._handshaking: dict[_Connection, None] = {}  # insertion order = age
        self.stats = {"connections": 0, "requests": 0, "errors": 0, "protocol_errors": 0,
                      "handshake_timeouts": 0, "evicted": 0, "accept_errors": 0, "offloaded": 0}
        self.failed: str | None = None  # why the server refuses writes (a failed commit), or None
        self._listeners: list[socket.socket] = []
        self._unix_paths: list[str] = []
        self._accepting = False
        self._pending = 0  # accepted sockets whose protocol is not connected yet
        self._backoff: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._emfile_log = _RateLog()
        self._cap_log = _RateLog()
        self.addresses: list[Any] = []

    # --- exports ----------------------------------------------------------------------------------------------
    def add_export(self, name: str, device: BlockDevice, *, readonly: bool = False) -> None:
        """Export ``device`` as ``name`` (from now on; existing connections keep their export)."""
        self.exports[name] = _Export(name, device, readonly or self.options.read_only)

    def remove_export(self, name: str) -> None:
        self.exports.pop(name, None)
        for alias in [a for a, n in self.aliases.items() if n == name]:
            del self.aliases[alias]

    def find(self, name: str) -> _Export | None:
        exp = self.exports.get(name)
        if exp is None and name in self.aliases:
            exp = self.exports.get(self.aliases[name])
        if exp is None and name == "" and self.exports:
            exp = next(iter(self.exports.values()))  # the default export: the first one
        return exp

    # --- failure ----------------------------------------------------------------------------------------------
    def fail(self, reason: str) -> None:
        """Refuse every later request but DISC (dm-thin's fail mode after metadata_operation_failed)."""
        if self.failed is None:
            self.failed = reason
            log.error("nbd: pool failed (%s): refusing writes, flushes and reads until it is checked", reason)

    # --- lifecycle ------------------------------------------------------------------------------------------
    async def start(self, *, unix_path: str | os.PathLike[str] | None = None, host: str | None = None,
                    port: int | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        if unix_path is None and host is None and port is None:
            raise ValueError("give unix_path and/or host/port to listen on")
        if unix_path is not None:
            path = os.fspath(unix_path)
            self._listeners.append(bind_unix(path, self.options.socket_mode))
            self._unix_paths.append(path)
            self.addresses.append(path)
        if host is not None or port is not None:
            sock = bind_tcp(host or "127.0.0.1", port or 0)
            self._listeners.append(sock)
            self.addresses.append(sock.getsockname()[:2])
        self._executor = concurrent.futures.ThreadPoolExecutor(self.options.workers, thread_name_prefix="nbd-io")
        self._start_accepting()

    def _start_accepting(self) -> None:
        if self._accepting or self._closed or self._loop is None:
            return
        self._accepting = True
        for sock in self._listeners:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def _stop_accepting(self) -> None:
        if not self._accepting or self._loop is None:
            return
        self._accepting = False
        for sock in self._listeners:
            self._loop.remove_reader(sock.fileno())

    def _accept(self, lsock: socket.socket) -> None:
        for _ in range(32):
            if len(self.connections) + self._pending >= self.options.max_connections and not self._evict():
                self._cap_log(logging.WARNING, "nbd: %d connections (the cap): not accepting until one closes",
                              len(self.connections))
                self._stop_accepting()
                return
            try:
                conn, _addr = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self.stats["accept_errors"] += 1
                    # out of descriptors: give up a squatter's slot if there is one (retry soon), else wait
                    delay = 0.02 if self._evict() else _EMFILE_BACKOFF
                    self._emfile_log(logging.WARNING, "nbd: accept failed (%s): pausing accepts for %.2f s",
                                     os.strerror(e.errno), delay)
                    self._stop_accepting()
                    if self._backoff is None and self._loop is not None:
                        self._backoff = self._loop.call_later(delay, self._end_backoff)
                    return
                if e.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    continue
                raise
            conn.setblocking(False)
            if conn.family in (socket.AF_INET, socket.AF_INET6):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            assert self._loop is not None
            self._pending += 1
            self._loop.create_task(self._attach(conn))

    async def _attach(self, conn: socket.socket) -> None:
        assert self._loop is not None
        try:
            await self._loop.connect_accepted_socket(lambda: _Connection(self), conn)
        except OSError:
            conn.close()
        finally:
            self._pending -= 1
            self._maybe_accept()

    def _end_backoff(self) -> None:
        self._backoff = None
        self._start_accepting()

    def _evict(self) -> bool:
        """Close the oldest connection still in its handshake (a slowloris slot); True if there was one."""
        for conn in self._handshaking:
            self.stats["evicted"] += 1
            conn.close()
            self._handshaking.pop(conn, None)
            self.connections.discard(conn)
            return True
        return False

    def _connection_closed(self, conn: _Connection) -> None:
        self.connections.discard(conn)
        self._handshaking.pop(conn, None)
        self._maybe_accept()

    def _maybe_accept(self) -> None:
        """Accept again when below the cap, or when a connection still in its handshake could be evicted."""
        if (not self._accepting and self._backoff is None
                and (len(self.connections) + self._pending < self.options.max_connections or self._handshaking)):
            self._start_accepting()

    def run_off_loop(self, fn: Callable[[], Any]) -> asyncio.Future[Any]:
        assert self._loop is not None and self._executor is not None
        return self._loop.run_in_executor(self._executor, fn)

    async def shutdown(self) -> None:
        """Stop listening, drop every connection (requests already received are complete), then commit."""
        if self._closed:
            return
        self._stop_accepting()
        self._closed = True
        if self._backoff is not None:
            self._backoff.cancel()
        for sock in self._listeners:
            sock.close()
        for conn in list(self.connections):
            conn.close()
        if self._executor is not None:
            self._executor.shutdown(wait=True)  # long requests finish their current piece and stop
        for path in self._unix_paths:
            try:
                os.unlink(path)
            except OSError:
                pass
        with self.lock:
            if self.failed is not None:
                return  # never commit after a failed commit: the caller decides (check/repair)
            if self.on_shutdown is not None:
                self.on_shutdown()
            else:
                for exp in self.exports.values():
                    exp.device.flush()
