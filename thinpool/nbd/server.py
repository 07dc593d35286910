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
devices safely). ``FLUSH`` and ``FUA`` call ``device.flush()``. A failed flush (a failed commit) *fails the
server* as dm-thin's metadata_operation_failed fails a pool: every later request except DISC gets an error, so
nothing acknowledged can read back changed; ``NBDServer.failed`` holds the reason.

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
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from typing import Any

from thinpool.errors import NoSpace, OutOfBounds, ReadOnly, ServedPoolFailed, ThinpoolError
from thinpool.io.device import BlockDevice
from thinpool.nbd import protocol as P
from thinpool.nbd.listen import bind_tcp, bind_unix

log = logging.getLogger("thinpool.nbd")

MAX_OPTION_LENGTH = 64 * 1024  # longer option payloads are skipped and refused with ERR_TOO_BIG
BASE_ALLOCATION_ID = 1  # the context id handed out for base:allocation
PREFERRED_BLOCK = 4096
_MIN_BUFFER = 256 * 1024
_SHRINK_BUFFER = 8 * 1024 * 1024  # an idle receive buffer larger than this is given back
_ZERO_CHUNK = 1024 * 1024
_FLUSH_OUT_BYTES = 256 * 1024  # queued reply bytes handed to the transport at once
_EMFILE_BACKOFF = 0.5  # seconds without accepting after EMFILE/ENFILE
_LOG_EVERY = 10.0  # seconds between two log lines about the same resource problem
_STARTTLS = -1  # what the handshake generator yields to ask for the TLS upgrade


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


class _Close(Exception):
    """Raised inside the handshake to drop the connection (after flushing what was queued)."""


class _Export:
    __slots__ = ("name", "device", "readonly", "description")

    def __init__(self, name: str, device: BlockDevice, readonly: bool = False) -> None:
        self.name = name
        self.device = device
        self.readonly = readonly or bool(getattr(device, "readonly", False))
        self.description = str(getattr(device, "description", "") or "")

    @property
    def size(self) -> int:
        return int(self.device.size)

    @property
    def flags(self) -> int:
        f = P.FLAG_HAS_FLAGS | P.FLAG_SEND_FLUSH | P.FLAG_SEND_FUA | P.FLAG_CAN_MULTI_CONN | P.FLAG_SEND_CACHE
        if self.readonly:
            f |= P.FLAG_READ_ONLY
        else:
            f |= P.FLAG_SEND_TRIM | P.FLAG_SEND_WRITE_ZEROES
        return f


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


class _Connection(asyncio.BufferedProtocol):
    """One client connection: handshake generator, then the transmission fast path."""

    def __init__(self, server: NBDServer) -> None:
        self.server = server
        self.opts = server.options
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray(_MIN_BUFFER)
        self._start = 0
        self._end = 0
        self._want = 4  # bytes needed to make progress
        self._hs: Generator[int, bytes, None] | None = None
        self._hs_need = 0
        self._hs_timer: asyncio.TimerHandle | None = None
        self._skip = 0  # transmission: payload bytes still to discard (refused oversized write)
        self._export: _Export | None = None
        self._structured = False
        self._meta_base_allocation = False
        self._meta_export: _Export | None = None
        self._no_zeroes = False
        self._tls = False
        self._upgrading = False
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._closing = False
        self._paused = False  # the transport's write buffer is above its high-water mark
        self._reading = True
        self._inflight = 0  # requests running in a worker
        self._reserved = 0  # reply bytes those requests will queue
        self._disc = False  # DISC received while requests were in flight

    # --- asyncio plumbing -----------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        srv = self.server
        srv.connections.add(self)
        srv._handshaking[self] = None
        srv.stats["connections"] += 1
        if srv._closed:
            transport.close()
            return
        self.transport.set_write_buffer_limits(high=self.opts.max_reply_bytes, low=self.opts.max_reply_bytes // 4)
        self._hs_timer = asyncio.get_running_loop().call_later(self.opts.handshake_timeout, self._hs_expired)
        transport.write(P.S_SERVER_GREETING.pack(P.NBDMAGIC, P.IHAVEOPT, P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES))
        self._hs = self._handshake()
        self._hs_need = next(self._hs)
        self._want = self._hs_need

    def _hs_expired(self) -> None:
        self._hs_timer = None
        if self._hs is not None or self._upgrading:
            log.debug("nbd: handshake not finished within %.1f s, disconnecting", self.opts.handshake_timeout)
            self.server.stats["handshake_timeouts"] += 1
            self.close()

    def _handshake_done(self) -> None:
        self._hs = None
        if self._hs_timer is not None:
            self._hs_timer.cancel()
            self._hs_timer = None
        self.server._handshaking.pop(self, None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self.server._connection_closed(self)
        if self._hs_timer is not None:
            self._hs_timer.cancel()
            self._hs_timer = None
        self._buf = bytearray(0)
        self._out = []
        if self._hs is not None:
            self._hs.close()
            self._hs = None

    def pause_writing(self) -> None:
        self._paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._paused = False
        self._resume()

    def _blocked(self) -> bool:
        return (self._paused or self._inflight >= self.opts.max_in_flight
                or self._reserved >= self.opts.max_reply_bytes or self._upgrading)

    def _update_reading(self) -> None:
        t = self.transport
        if t is None or self._closing or t.is_closing():
            return
        want = not self._blocked()
        if want != self._reading:
            self._reading = want
            if want:
                t.resume_reading()
            else:
                t.pause_reading()

    def _resume(self) -> None:
        """Something that blocked this connection went away: work through what is buffered, read again."""
        if self.transport is None or self.transport.is_closing():
            return
        self.buffer_updated(0)

    def get_buffer(self, sizehint: int) -> memoryview:
        buf = self._buf
        if len(buf) - self._end < 65536 or self._start + self._want > len(buf):
            avail = self._end - self._start
            need = max(self._want, avail) + 65536
            if need <= len(buf):
                # compact in place (same length: allowed even while a view of the buffer exists)
                if self._start:
                    buf[:avail] = buf[self._start:self._end]
                    self._start, self._end = 0, avail
            else:
                # grow with the data that arrived (doubling), never straight to a declared payload size: a
                # 28-byte WRITE header must not make the server allocate 32 MiB
                new = bytearray(min(need + 65536, max(_MIN_BUFFER, 2 * len(buf), 2 * (avail + 65536))))
                new[:avail] = buf[self._start:self._end]
                self._buf = new
                self._start, self._end = 0, avail
        return memoryview(self._buf)[self._end:]

    def buffer_updated(self, nbytes: int) -> None:
        self._end += nbytes
        try:
            self._process()
        except Exception:  # never let one connection take the loop down
            log.exception("nbd: internal error, dropping connection")
            self.server.stats["protocol_errors"] += 1
            self.close()
        if self._out and self.transport is not None and not self.transport.is_closing():
            self._flush_out()
        if self._closing and self.transport is not None:
            if self._inflight:
                return  # closed when the last worker request finishes
            self.transport.close()
            return
        if self._start == self._end:
            self._start = self._end = 0
            if len(self._buf) > _SHRINK_BUFFER:
                self._buf = bytearray(_MIN_BUFFER)
        self._update_reading()

    def _queue(self, piece: bytes | bytearray | memoryview) -> None:
        self._out.append(piece)  # type: ignore[arg-type]
        self._out_bytes += len(piece)

    def _flush_out(self) -> None:
        """Send queued replies: small pieces joined into one write, large read payloads written as they are
        (no extra copy when the socket takes them at once)."""
        out, self._out = self._out, []
        self._out_bytes = 0
        small: list[bytes] = []
        write = self.transport.write
        for piece in out:
            if len(piece) >= 65536:
                if small:
                    write(b"".join(small))
                    small = []
                write(piece)
            else:
                small.append(piece)
        if small:
            write(b"".join(small) if len(small) > 1 else small[0])

    def eof_received(self) -> bool:
        return False  # close the transport

    def close(self) -> None:
        self._closing = True
        if self.transport is not None:
            if self._out and not self.transport.is_closing():
                self._flush_out()
            self._out = []
            self.transport.close()

    # --- parsing --------------------------------------------------------------------------------------------
    def _process(self) -> None:
        lock = self.server.lock
        stats = self.server.stats
        pack_simple = P.S_SIMPLE_REPLY.pack
        pack_chunk = P.S_CHUNK.pack
        pack_offset = P.S_OFFSET.pack
        while not self._closing:
            buf = self._buf
            avail = self._end - self._start
            if self._hs is not None:
                if self._upgrading:
                    return
                need = self._hs_need
                if need == _STARTTLS:
                    if avail:
                        log.info("nbd: data after NBD_OPT_STARTTLS before the TLS handshake, disconnecting")
                        self._closing = True
                        return
                    self._start_tls()
                    return
                if avail < need:
                    self._want = need
                    return
                data = bytes(buf[self._start:self._start + need])
                self._start += need
                try:
                    self._hs_need = self._hs.send(data)
                except StopIteration:
                    self._handshake_done()  # transmission phase
                except _Close:
                    self._handshake_done()
                    self._closing = True
                    return
                continue
            if self._skip:
                n = min(self._skip, avail)
                self._skip -= n
                self._start += n
                if self._skip:
                    self._want = 1
                    return
                continue
            if avail < 28:
                self._want = 28
                return
            if self._out_bytes >= _FLUSH_OUT_BYTES:
                self._flush_out()
            if self._blocked():
                self._want = 28
                return  # resumed by resume_writing / a finished worker request
            magic, flags, cmd, cookie, offset, length = P.S_REQUEST.unpack_from(buf, self._start)
            if magic != P.REQUEST_MAGIC:
                log.info("nbd: bad request magic %#x, disconnecting", magic)
                stats["protocol_errors"] += 1
                self._closing = True
                return
            if cmd == P.CMD_WRITE:
                if length > P.MAX_PAYLOAD:
                    self._start += 28
                    self._skip = length
                    self._reply_error(cmd, cookie, P.EINVAL, "write payload too large")
                    continue
                if avail < 28 + length:
                    self._want = 28 + length
                    return
                # Zero-copy: the device gets a view of the receive buffer, valid during the call only.
                data = memoryview(buf)[self._start + 28:self._start + 28 + length]
                self._start += 28 + length
                exp = self._export
                try:
                    if (not flags and length and not exp.readonly and offset + length <= exp.size
                            and self.server.failed is None):
                        # fast path: the common plain write
                        stats["requests"] += 1
                        try:
                            with lock:
                                exp.device.write(offset, data)
                        except Exception as e:
                            self._device_failed(cmd, cookie, exp, e)
                        else:
                            self._out.append(pack_simple(P.SIMPLE_REPLY_MAGIC, 0, cookie))
                            self._out_bytes += 16
                    else:
                        self._request(flags, cmd, cookie, offset, length, data)
                finally:
                    try:
                        data.release()
                    except BufferError:  # the device kept a view: detach from our buffer for good
                        log.warning("nbd: device kept a reference to a write buffer")
                        self._buf = bytearray(self._buf)
                continue
            self._start += 28
            if (cmd == P.CMD_READ and self._structured and not flags & ~P.CMD_FLAG_DF
                    and 0 < length <= self.opts.split_bytes and self.server.failed is None):
                exp = self._export
                if offset + length <= exp.size:
                    # fast path: the common structured read
                    stats["requests"] += 1
                    try:
                        with lock:
                            data = exp.device.read(offset, length)
                        if len(data) != length:
                            raise OSError(errno.EIO, f"device returned {len(data)} of {length} bytes")
                    except Exception as e:
                        self._device_failed(cmd, cookie, exp, e)
                    else:
                        self._out.append(pack_chunk(P.STRUCTURED_REPLY_MAGIC, P.REPLY_FLAG_DONE,
                                                    P.REPLY_TYPE_OFFSET_DATA, cookie, 8 + length)
                                         + pack_offset(offset))
                        self._out.append(data)
                        self._out_bytes += 28 + length
                    continue
            if cmd == P.CMD_DISC:
                self._closing = True
                return
            self._request(flags, cmd, cookie, offset, length, None)

    # --- TLS ------------------------------------------------------------------------------------------------
    def _start_tls(self) -> None:
        self._upgrading = True
        self._update_reading()
        loop = asyncio.get_running_loop()
        loop.create_task(self._upgrade())

    async def _upgrade(self) -> None:
        loop = asyncio.get_running_loop()
        old = self.transport
        try:
            new = await loop.start_tls(old, self, self.opts.tls, server_side=True,
                                       ssl_handshake_timeout=self.opts.handshake_timeout)
        except Exception as e:  # bad certificate, plaintext client, timeout
            log.info("nbd: TLS handshake failed: %s", e)
            self.server.stats["protocol_errors"] += 1
            self._upgrading = False
            self._closing = True
            if old is not None:
                old.close()
            return
        if self._closing or new is None:
            if new is not None:
                new.close()
            return
        self.transport = new  # type: ignore[assignment]
        self._reading = True
        new.set_write_buffer_limits(high=self.opts.max_reply_bytes, low=self.opts.max_reply_bytes // 4)
        self._tls = True
        self._upgrading = False
        self._hs_need = self._hs.send(b"") if self._hs is not None else 16  # on to the next option header
        self._want = self._hs_need
        self._resume()

    # --- handshake ------------------------------------------------------------------------------------------
    def _flags(self, exp: _Export) -> int:
        # DF only means something with structured replies, and the spec forbids advertising it without them
        return exp.flags | (P.FLAG_SEND_DF if self._structured else 0)

    def _opt_reply(self, opt: int, rtype: int, payload: bytes = b"") -> None:
        self.transport.write(P.S_OPTION_REPLY.pack(P.REPLY_MAGIC, opt, rtype, len(payload)) + payload)

    def _opt_error(self, opt: int, rtype: int, msg: str = "") -> None:
        self.server.stats["protocol_errors"] += 1
        self._opt_reply(opt, rtype, msg.encode()[:P.MAX_STRING])

    def _handshake(self) -> Generator[int, bytes, None]:
        (cflags,) = P.S_CLIENT_FLAGS.unpack((yield 4))
        if cflags & ~P.KNOWN_CLIENT_FLAGS:
            # unknown client flags: the spec says to drop the connection
            log.info("nbd: unsupported client flags %#x, disconnecting", cflags)
            self.server.stats["protocol_errors"] += 1
            raise _Close
        self._no_zeroes = bool(cflags & P.FLAG_C_NO_ZEROES)
        while True:
            magic, opt, length = P.S_OPTION.unpack((yield 16))
            if magic != P.IHAVEOPT:
                log.info("nbd: bad option magic %#x, disconnecting", magic)
                self.server.stats["protocol_errors"] += 1
                raise _Close
            if length > MAX_OPTION_LENGTH:
                if opt == P.OPT_EXPORT_NAME:
                    # EXPORT_NAME has no error reply: the spec's answer to a name that is too long is to leave
                    log.info("nbd: EXPORT_NAME of %d bytes, disconnecting", length)
                    self.server.stats["protocol_errors"] += 1
                    raise _Close
                left = length
                while left:
                    n = min(left, 65536)
                    yield n
                    left -= n
                self._opt_error(opt, P.REP_ERR_TOO_BIG, "option payload too large")
                continue
            data = (yield length) if length else b""
            if self.opts.tls_mode == "require" and not self._tls and opt not in (P.OPT_STARTTLS, P.OPT_ABORT):
                if opt == P.OPT_EXPORT_NAME:
                    log.info("nbd: EXPORT_NAME without TLS while TLS is required, disconnecting")
                    raise _Close
                self._opt_error(opt, P.REP_ERR_TLS_REQD, "TLS is required: send NBD_OPT_STARTTLS first")
                continue
            if opt == P.OPT_STARTTLS:
                if self.opts.tls is None or self.opts.tls_mode == "off":
                    self._opt_error(opt, P.REP_ERR_UNSUP, "TLS is not configured on this server")
                elif self._tls:
                    self._opt_error(opt, P.REP_ERR_INVALID, "TLS is already active")
                elif length:
                    self._opt_error(opt, P.REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
                else:
                    self._opt_reply(opt, P.REP_ACK)
                    self._structured = False  # nothing negotiated in plaintext survives the upgrade
                    self._meta_base_allocation = False
                    self._meta_export = None
                    yield _STARTTLS
                continue
            if opt == P.OPT_EXPORT_NAME:
                exp = self.server.find(data.decode("utf-8", "replace"))
                if exp is None:
                    log.info("nbd: EXPORT_NAME of unknown export %r, disconnecting", data)
                    raise _Close  # the only possible answer to a bad EXPORT_NAME
                reply = P.S_EXPORT_NAME_REPLY.pack(exp.size, self._flags(exp))
                if not self._no_zeroes:
                    reply += bytes(124)
                self.transport.write(reply)
                self._export = exp
                return
            if opt == P.OPT_ABORT:
                self._opt_reply(opt, P.REP_ACK)
                raise _Close
            if opt == P.OPT_LIST:
                if length:
                    self._opt_error(opt, P.REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
                    continue
                for name in self.server.exports:
                    raw = name.encode()
                    self._opt_reply(opt, P.REP_SERVER, P.S_U32.pack(len(raw)) + raw)
                self._opt_reply(opt, P.REP_ACK)
                continue
            if opt in (P.OPT_INFO, P.OPT_GO):
                exp = self._info(opt, data)
                if exp is not None and opt == P.OPT_GO:
                    self._export = exp
                    return
                continue
            if opt == P.OPT_STRUCTURED_REPLY:
                if length:
                    self._opt_error(opt, P.REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
                    continue
                self._structured = True
                self._opt_reply(opt, P.REP_ACK)
                continue
            if opt in (P.OPT_LIST_META_CONTEXT, P.OPT_SET_META_CONTEXT):
                self._meta_context(opt, data)
                continue
            self._opt_error(opt, P.REP_ERR_UNSUP, f"option {opt} not supported")

    def _info(self, opt: int, data: bytes) -> _Export | None:
        try:
            if len(data) < 6:
                raise ValueError
            (nlen,) = P.S_U32.unpack_from(data, 0)
            if 4 + nlen + 2 > len(data):
                raise ValueError
            name = data[4:4 + nlen].decode("utf-8")
            (nreq,) = P.S_U16.unpack_from(data, 4 + nlen)
            if len(data) != 4 + nlen + 2 + 2 * nreq:
                raise ValueError
            reqs = [P.S_U16.unpack_from(data, 6 + nlen + 2 * i)[0] for i in range(nreq)]
        except (ValueError, UnicodeDecodeError):
            self._opt_error(opt, P.REP_ERR_INVALID, "malformed NBD_OPT_INFO/GO")
            return None
        exp = self.server.find(name)
        if exp is None:
            self._opt_error(opt, P.REP_ERR_UNKNOWN, f"no export named {name!r}")
            return None
        self._opt_reply(opt, P.REP_INFO, P.S_INFO_EXPORT.pack(P.INFO_EXPORT, exp.size, self._flags(exp)))
        if P.INFO_NAME in reqs:
            self._opt_reply(opt, P.REP_INFO, P.S_U16.pack(P.INFO_NAME) + exp.name.encode())
        if P.INFO_DESCRIPTION in reqs and exp.description:
            self._opt_reply(opt, P.REP_INFO, P.S_U16.pack(P.INFO_DESCRIPTION) + exp.description.encode())
        self._opt_reply(opt, P.REP_INFO,
                        P.S_INFO_BLOCK_SIZE.pack(P.INFO_BLOCK_SIZE, 1, PREFERRED_BLOCK, P.MAX_PAYLOAD))
        self._opt_reply(opt, P.REP_ACK)
        return exp

    def _meta_context(self, opt: int, data: bytes) -> None:
        if opt == P.OPT_SET_META_CONTEXT:
            self._meta_base_allocation = False  # SET replaces the selection, even when it fails
            self._meta_export = None
        if opt == P.OPT_SET_META_CONTEXT and not self._structured:
            self._opt_error(opt, P.REP_ERR_INVALID, "negotiate structured replies first")
            return
        try:
            (nlen,) = P.S_U32.unpack_from(data, 0)
            name = data[4:4 + nlen].decode("utf-8")
            if 4 + nlen + 4 > len(data):
                raise ValueError
            pos = 4 + nlen
            (nq,) = P.S_U32.unpack_from(data, pos)
            pos += 4
            queries = []
            for _ in range(nq):
                (qlen,) = P.S_U32.unpack_from(data, pos)
                pos += 4
                if pos + qlen > len(data):
                    raise ValueError
                queries.append(data[pos:pos + qlen].decode("utf-8"))
                pos += qlen
            if pos != len(data):
                raise ValueError
        except (ValueError, UnicodeDecodeError, IndexError, Exception):
            self._opt_error(opt, P.REP_ERR_INVALID, "malformed meta context request")
            return
        if self.server.find(name) is None:
            self._opt_error(opt, P.REP_ERR_UNKNOWN, f"no export named {name!r}")
            return
        if opt == P.OPT_LIST_META_CONTEXT:
            match = not queries or any(q in ("base:", P.META_BASE_ALLOCATION) for q in queries)
        else:
            match = P.META_BASE_ALLOCATION in queries
            self._meta_base_allocation = match
            self._meta_export = self.server.find(name)
        if match:
            ctx_id = BASE_ALLOCATION_ID if opt == P.OPT_SET_META_CONTEXT else 0
            self._opt_reply(opt, P.REP_META_CONTEXT, P.S_U32.pack(ctx_id) + P.META_BASE_ALLOCATION.encode())
        self._opt_reply(opt, P.REP_ACK)

    # --- transmission ---------------------------------------------------------------------------------------
    def _reply_ok(self, cookie: int) -> None:
        self._queue(P.S_SIMPLE_REPLY.pack(P.SIMPLE_REPLY_MAGIC, 0, cookie))

    def _reply_error(self, cmd: int, cookie: int, err: int, msg: str) -> None:
        self.server.stats["errors"] += 1
        if self._structured and cmd in (P.CMD_READ, P.CMD_BLOCK_STATUS):
            raw = msg.encode()[:P.MAX_STRING]
            payload = P.S_ERROR.pack(err, len(raw)) + raw
            self._queue(P.S_CHUNK.pack(P.STRUCTURED_REPLY_MAGIC, P.REPLY_FLAG_DONE, P.REPLY_TYPE_ERROR, cookie,
                                            len(payload)) + payload)
        else:
            self._queue(P.S_SIMPLE_REPLY.pack(P.SIMPLE_REPLY_MAGIC, err, cookie))

    def _request(self, flags: int, cmd: int, cookie: int, offset: int, length: int, data: bytes | None) -> None:
        exp = self._export
        self.server.stats["requests"] += 1
        # validate
        allowed = P.CMD_FLAG_FUA  # valid on every command once SEND_FUA is advertised (ignored where nothing is written)
        if cmd == P.CMD_READ:
            allowed |= P.CMD_FLAG_DF if self._structured else 0
        elif cmd == P.CMD_WRITE_ZEROES:
            allowed |= P.CMD_FLAG_NO_HOLE
        elif cmd == P.CMD_BLOCK_STATUS:
            allowed |= P.CMD_FLAG_REQ_ONE
        elif cmd not in (P.CMD_FLUSH, P.CMD_WRITE, P.CMD_TRIM, P.CMD_CACHE):
            self._reply_error(cmd, cookie, P.EINVAL, f"command {cmd} not supported")
            return
        if flags & ~allowed:
            self._reply_error(cmd, cookie, P.EINVAL, f"flags {flags:#x} not valid for {P.CMD_NAMES[cmd]}")
            return
        if exp.readonly and cmd in (P.CMD_WRITE, P.CMD_TRIM, P.CMD_WRITE_ZEROES):
            self._reply_error(cmd, cookie, P.EPERM, "export is read-only")
            return
        if self.server.failed is not None:
            self._reply_error(cmd, cookie, P.EIO, f"pool failed: {self.server.failed}")
            return
        if cmd == P.CMD_READ and length > P.MAX_PAYLOAD:
            self._reply_error(cmd, cookie, P.EINVAL, "read larger than the maximum block size")
            return
        size = exp.size
        if cmd != P.CMD_FLUSH and offset + length > size:
            err = P.ENOSPC if cmd in (P.CMD_WRITE, P.CMD_WRITE_ZEROES) else P.EINVAL
            self._reply_error(cmd, cookie, err,
                              f"request {offset}+{length} beyond the end of the export ({size} bytes)")
            return
        if length > self.opts.split_bytes and cmd in (P.CMD_READ, P.CMD_TRIM, P.CMD_WRITE_ZEROES):
            self._offload(flags, cmd, cookie, offset, length)
            return
        dev = exp.device
        try:
            with self.server.lock:
                if cmd == P.CMD_READ:
                    if length == 0:
                        self._reply_none(cookie)
                        return
                    buf = dev.read(offset, length)
                    if len(buf) != length:
                        raise OSError(errno.EIO, f"device returned {len(buf)} of {length} bytes")
                    self._reply_read(cookie, offset, buf)
                    return
                if cmd == P.CMD_WRITE:
                    if length:
                        dev.write(offset, data)
                elif cmd == P.CMD_FLUSH:
                    self._flush(dev)
                elif cmd == P.CMD_TRIM:
                    if length:
                        dev.discard(offset, length)
                elif cmd == P.CMD_WRITE_ZEROES:
                    if length:
                        self._zero(dev, flags, offset, length)
                elif cmd == P.CMD_BLOCK_STATUS:
                    self._block_status(flags, cookie, offset, length, dev)
                    return
                elif cmd == P.CMD_CACHE:
                    pass  # advisory; nothing to prefetch in memory
                if flags & P.CMD_FLAG_FUA and cmd in (P.CMD_WRITE, P.CMD_TRIM, P.CMD_WRITE_ZEROES):
                    self._flush(dev)
        except Exception as e:  # a device error or bug must not kill the server
            self._device_failed(cmd, cookie, exp, e)
            return
        self._reply_ok(cookie)

    def _flush(self, dev: BlockDevice) -> None:
        """FLUSH/FUA: the commit. Its failure fails the server (nothing acknowledged may change silently)."""
        try:
            dev.flush()
        except BaseException as e:
            self.server.fail(f"flush failed: {e}")
            raise

    @staticmethod
    def _zero(dev: BlockDevice, flags: int, offset: int, length: int) -> None:
        if flags & P.CMD_FLAG_NO_HOLE:
            pos = offset
            while pos < offset + length:
                n = min(_ZERO_CHUNK, offset + length - pos)
                dev.write(pos, bytes(n))
                pos += n
        else:
            dev.write_zeroes(offset, length)

    def _reply_read(self, cookie: int, offset: int, buf: bytes | bytearray) -> None:
        if self._structured:
            self._queue(P.S_CHUNK.pack(P.STRUCTURED_REPLY_MAGIC, P.REPLY_FLAG_DONE, P.REPLY_TYPE_OFFSET_DATA, cookie,
                                       8 + len(buf)) + P.S_OFFSET.pack(offset))
        else:
            self._queue(P.S_SIMPLE_REPLY.pack(P.SIMPLE_REPLY_MAGIC, 0, cookie))
        self._queue(buf)

    # --- long requests, off the loop ------------------------------------------------------------------------
    def _offload(self, flags: int, cmd: int, cookie: int, offset: int, length: int) -> None:
        """Run a long READ/TRIM/WRITE_ZEROES in a worker, ``split_bytes`` at a time, each piece under the device
        lock, the lock released (and the GIL offered) between pieces so the loop keeps serving others."""
        exp = self._export
        dev = exp.device
        lock = self.server.lock
        piece = self.opts.split_bytes
        server = self.server
        reserve = length if cmd == P.CMD_READ else 0

        def work() -> bytearray | None:
            out = bytearray(length) if cmd == P.CMD_READ else None
            pos = 0
            while pos < length:
                t = self.transport
                if (t is None or t.is_closing()) and cmd != P.CMD_READ:
                    raise ConnectionAbortedError("client went away")  # not acknowledged: may stop midway
                if server.failed is not None:
                    raise ServedPoolFailed(reason=server.failed)
                n = min(piece, length - pos)
                with lock:
                    if cmd == P.CMD_READ:
                        got = dev.read(offset + pos, n)
                        if len(got) != n:
                            raise OSError(errno.EIO, f"device returned {len(got)} of {n} bytes")
                        out[pos:pos + n] = got  # type: ignore[index]
                    elif cmd == P.CMD_TRIM:
                        dev.discard(offset + pos, n)
                    else:
                        self._zero(dev, flags, offset + pos, n)
                pos += n
                time.sleep(0.0005)  # let a waiting loop thread take the lock (threading.Lock is not fair)
            if flags & P.CMD_FLAG_FUA and cmd != P.CMD_READ:
                with lock:
                    self._flush(dev)
            return out

        self._inflight += 1
        self._reserved += reserve
        self.server.stats["offloaded"] += 1
        fut = self.server.run_off_loop(work)

        def done(f: asyncio.Future[Any]) -> None:
            self._inflight -= 1
            self._reserved -= reserve
            if self.transport is None or self.transport.is_closing():
                return
            exc = f.exception()
            if exc is not None:
                if not isinstance(exc, ConnectionAbortedError):
                    self._device_failed(cmd, cookie, exp, exc)  # type: ignore[arg-type]
            elif cmd == P.CMD_READ:
                self._reply_read(cookie, offset, f.result())
            else:
                self._reply_ok(cookie)
            self._resume()

        fut.add_done_callback(done)

    def _device_failed(self, cmd: int, cookie: int, exp: _Export, e: BaseException) -> None:
        cause = e.__cause__ if isinstance(e.__cause__, OSError) else None
        if isinstance(e, NoSpace) or (cause is not None and cause.errno in (errno.ENOSPC, errno.EDQUOT)):
            self._reply_error(cmd, cookie, P.ENOSPC, str(e))
        elif isinstance(e, OutOfBounds):
            self._reply_error(cmd, cookie, P.EINVAL, str(e))
        elif isinstance(e, ReadOnly):
            self._reply_error(cmd, cookie, P.EPERM, str(e))
        elif isinstance(e, OSError) and not isinstance(e, ThinpoolError):
            self._reply_error(cmd, cookie, P.wire_errno(e.errno) if e.errno else P.EIO, str(e))
        elif isinstance(e, ThinpoolError):
            log.warning("nbd: %s on %s failed: %s", P.CMD_NAMES.get(cmd), exp.name, e)
            self._reply_error(cmd, cookie, P.EIO, str(e))
        else:
            log.error("nbd: %s on %s raised", P.CMD_NAMES.get(cmd), exp.name, exc_info=e)
            self._reply_error(cmd, cookie, P.EIO, f"internal error: {type(e).__name__}")

    def _reply_none(self, cookie: int) -> None:
        if self._structured:
            self._queue(P.S_CHUNK.pack(P.STRUCTURED_REPLY_MAGIC, P.REPLY_FLAG_DONE, P.REPLY_TYPE_NONE, cookie, 0))
        else:
            self._reply_ok(cookie)

    def _block_status(self, flags: int, cookie: int, offset: int, length: int, dev: BlockDevice) -> None:
        if not self._structured or not self._meta_base_allocation or self._meta_export is not self._export:
            self._reply_error(P.CMD_BLOCK_STATUS, cookie, P.EINVAL, "no meta context negotiated")
            return
        if length == 0:
            self._reply_error(P.CMD_BLOCK_STATUS, cookie, P.EINVAL, "zero-length block status")
            return
        extents = allocation_extents(dev.mapped_ranges(offset, length), offset, length)
        if flags & P.CMD_FLAG_REQ_ONE:
            extents = extents[:1]
        payload = P.S_U32.pack(BASE_ALLOCATION_ID) + b"".join(P.S_EXTENT.pack(n, st) for n, st in extents)
        self._queue(P.S_CHUNK.pack(P.STRUCTURED_REPLY_MAGIC, P.REPLY_FLAG_DONE, P.REPLY_TYPE_BLOCK_STATUS,
                                        cookie, len(payload)) + payload)


def allocation_extents(mapped: list[tuple[int, int]], offset: int, length: int) -> list[tuple[int, int]]:
    """Turn a device's mapped byte ranges into base:allocation extents (length, flags) covering exactly
    [offset, offset+length): data is 0, anything unmapped is HOLE|ZERO. Adjacent extents of one kind merge."""
    end = offset + length
    out: list[list[int]] = []

    def add(n: int, st: int) -> None:
        if n <= 0:
            return
        if out and out[-1][1] == st:
            out[-1][0] += n
        else:
            out.append([n, st])

    pos = offset
    for start, n in sorted(mapped):
        s, e = max(start, offset), min(start + n, end)
        if e <= s or e <= pos:
            continue
        s = max(s, pos)
        add(s - pos, P.STATE_HOLE | P.STATE_ZERO)
        add(e - s, 0)
        pos = e
    add(end - pos, P.STATE_HOLE | P.STATE_ZERO)
    return [(n, st) for n, st in out]


# --- running --------------------------------------------------------------------------------------------------
def serve(exports: Mapping[str, BlockDevice], *, unix_path: str | os.PathLike[str] | None = None,
          host: str | None = None, port: int | None = None, on_shutdown: Callable[[], Any] | None = None,
          ready: Callable[[NBDServer], Any] | None = None, lock: threading.Lock | None = None,
          periodic: tuple[float, Callable[[], Any]] | None = None, options: ServerOptions | None = None,
          aliases: Mapping[str, str] | None = None, stop_event: threading.Event | None = None) -> NBDServer:
    """Serve ``exports`` until SIGINT/SIGTERM (when called in the main thread). Blocks; returns the server
    after a clean shutdown, which has called ``on_shutdown`` (or flushed every device when it is None) unless
    the server failed (``server.failed``): then nothing is committed.

    ``periodic=(seconds, fn)`` calls ``fn()`` (under the device lock, in the loop thread) every ``seconds``,
    e.g. a pool commit so that clients which never FLUSH still reach stable metadata. A failing ``fn`` fails the
    server, as a failed FLUSH does: clients get errors on their next request.
    """

    async def main() -> NBDServer:
        server = NBDServer(exports, on_shutdown=on_shutdown, lock=lock, options=options, aliases=aliases)
        await server.start(unix_path=unix_path, host=host, port=port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        installed = []
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
                installed.append(sig)
        ticker = None
        if periodic is not None:
            interval, fn = periodic

            def tick() -> None:
                nonlocal ticker
                if server.failed is not None:
                    return
                try:
                    with server.lock:
                        fn()
                except Exception as e:
                    server.fail(f"periodic commit failed: {e}")
                    return
                ticker = loop.call_later(interval, tick)

            ticker = loop.call_later(interval, tick)
        if stop_event is not None:
            def poll() -> None:
                if stop_event.is_set():
                    stop.set()
                else:
                    loop.call_later(0.2, poll)
            poll()
        if ready is not None:
            ready(server)
        try:
            await stop.wait()
        finally:
            if ticker is not None:
                ticker.cancel()
            for sig in installed:
                loop.remove_signal_handler(sig)
            await server.shutdown()
        return server

    return asyncio.run(main())


class ServerThread:
    """An NBDServer on its own event loop in a daemon thread (tests, embedding).

    ``with ServerThread(exports, unix_path=p) as srv: ...`` starts it (waiting until it listens) and stops it
    (closing connections and calling ``on_shutdown``) on exit. ``srv.lock`` guards the devices.
    """

    def __init__(self, exports: Mapping[str, BlockDevice], *, unix_path: str | os.PathLike[str] | None = None,
                 host: str | None = None, port: int | None = None,
                 on_shutdown: Callable[[], Any] | None = None, lock: threading.Lock | None = None,
                 options: ServerOptions | None = None, aliases: Mapping[str, str] | None = None) -> None:
        self.server = NBDServer(exports, on_shutdown=on_shutdown, lock=lock, options=options, aliases=aliases)
        self._listen = {"unix_path": unix_path, "host": host, "port": port}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    @property
    def lock(self) -> threading.Lock:
        return self.server.lock

    @property
    def addresses(self) -> list[Any]:
        return self.server.addresses

    def uri(self, name: str = "") -> str:
        addr = self.server.addresses[0]
        if isinstance(addr, str):
            return f"nbd+unix:///{name}?socket={addr}"
        return f"nbd://{addr[0]}:{addr[1]}/{name}"

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self.server.start(**self._listen))
        except BaseException as e:  # report to start()
            self._error = e
            self._started.set()
            loop.close()
            return
        self._started.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def start(self, timeout: float = 10) -> ServerThread:
        self._thread = threading.Thread(target=self._run, name="nbd-server", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise TimeoutError("NBD server did not start")
        if self._error is not None:
            raise self._error
        return self

    def stop(self, timeout: float = 10) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        fut = asyncio.run_coroutine_threadsafe(self.server.shutdown(), loop)
        try:
            fut.result(timeout)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
