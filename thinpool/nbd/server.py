"""An NBD server on asyncio (single process, single event-loop thread) exporting BlockDevices by name.

Layer: nbd. May import: thinpool.errors, thinpool.io, thinpool.nbd.protocol.

Protocol coverage: fixed-newstyle handshake (NO_ZEROES); options EXPORT_NAME, ABORT, LIST, INFO, GO,
STRUCTURED_REPLY, LIST_META_CONTEXT, SET_META_CONTEXT (``base:allocation``); commands READ, WRITE (FUA), FLUSH,
TRIM, WRITE_ZEROES (FUA, NO_HOLE), BLOCK_STATUS (REQ_ONE), DISC. Anything else is refused with the error the
NBD protocol document names (``NBD_REP_ERR_UNSUP`` for unknown options, ``NBD_EINVAL`` for unknown commands),
and a connection is dropped only where the spec says so (bad magic, unknown client flags, EXPORT_NAME of an
unknown export). A misbehaving connection never affects others.

Device calls run in the event-loop thread, one request at a time, each under ``NBDServer.lock`` (a
``threading.Lock`` other threads can take to touch the same devices safely). The devices need not be
thread-safe. ``FLUSH`` and ``FUA`` call ``device.flush()``.

Public entry points: :func:`serve` (blocking, for the CLI; SIGINT/SIGTERM shut down cleanly and call
``on_shutdown``) and :class:`ServerThread` (a server on its own loop in a background thread, for tests).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
import stat
import threading
from collections.abc import Callable, Generator, Mapping
from typing import Any

from thinpool.errors import NoSpace, OutOfBounds, ReadOnly, ThinpoolError
from thinpool.io.device import BlockDevice
from thinpool.nbd import protocol as P

log = logging.getLogger("thinpool.nbd")

MAX_OPTION_LENGTH = 64 * 1024  # longer option payloads are skipped and refused with ERR_TOO_BIG
BASE_ALLOCATION_ID = 1  # the context id handed out for base:allocation
PREFERRED_BLOCK = 4096
_MIN_BUFFER = 256 * 1024
_ZERO_CHUNK = 1024 * 1024


class _Close(Exception):
    """Raised inside the handshake to drop the connection (after flushing what was queued)."""


class _Export:
    __slots__ = ("name", "device", "readonly", "description")

    def __init__(self, name: str, device: BlockDevice) -> None:
        self.name = name
        self.device = device
        self.readonly = bool(getattr(device, "readonly", False))
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
                 lock: threading.Lock | None = None) -> None:
        self.exports = {str(name): _Export(str(name), dev) for name, dev in exports.items()}
        self.on_shutdown = on_shutdown
        self.lock = lock if lock is not None else threading.Lock()
        self.connections: set[_Connection] = set()
        self.stats = {"connections": 0, "requests": 0, "errors": 0, "protocol_errors": 0}
        self._servers: list[asyncio.base_events.Server] = []
        self._unix_paths: list[str] = []
        self._closed = False
        self.addresses: list[Any] = []

    # --- lookup ---------------------------------------------------------------------------------------------
    def find(self, name: str) -> _Export | None:
        exp = self.exports.get(name)
        if exp is None and name == "" and self.exports:
            exp = next(iter(self.exports.values()))  # the default export: the first one
        return exp

    # --- lifecycle ------------------------------------------------------------------------------------------
    async def start(self, *, unix_path: str | os.PathLike[str] | None = None, host: str | None = None,
                    port: int | None = None) -> None:
        loop = asyncio.get_running_loop()
        if unix_path is None and host is None and port is None:
            raise ValueError("give unix_path and/or host/port to listen on")
        if unix_path is not None:
            path = os.fspath(unix_path)
            try:
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    os.unlink(path)  # a stale socket from an earlier run
            except FileNotFoundError:
                pass
            srv = await loop.create_unix_server(lambda: _Connection(self), path)
            self._servers.append(srv)
            self._unix_paths.append(path)
            self.addresses.append(path)
        if host is not None or port is not None:
            srv = await loop.create_server(lambda: _Connection(self), host or "127.0.0.1", port or 0,
                                           family=socket.AF_INET, reuse_address=True)
            self._servers.append(srv)
            self.addresses.append(srv.sockets[0].getsockname()[:2])

    async def shutdown(self) -> None:
        """Stop listening, drop every connection (requests already received are complete), then commit."""
        if self._closed:
            return
        self._closed = True
        for srv in self._servers:
            srv.close()
        for conn in list(self.connections):
            conn.close()
        for srv in self._servers:
            try:
                await asyncio.wait_for(srv.wait_closed(), 5)
            except (asyncio.TimeoutError, Exception):  # pragma: no cover - best effort
                pass
        for path in self._unix_paths:
            try:
                os.unlink(path)
            except OSError:
                pass
        with self.lock:
            if self.on_shutdown is not None:
                self.on_shutdown()
            else:
                for exp in self.exports.values():
                    exp.device.flush()


class _Connection(asyncio.BufferedProtocol):
    """One client connection: handshake generator, then the transmission fast path."""

    def __init__(self, server: NBDServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray(_MIN_BUFFER)
        self._start = 0
        self._end = 0
        self._want = 4  # bytes needed to make progress
        self._hs: Generator[int, bytes, None] | None = None
        self._hs_need = 0
        self._skip = 0  # transmission: payload bytes still to discard (refused oversized write)
        self._export: _Export | None = None
        self._structured = False
        self._meta_base_allocation = False
        self._meta_export: _Export | None = None
        self._no_zeroes = False
        self._out: list[bytes] = []
        self._closing = False
        self._paused = False

    # --- asyncio plumbing -----------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)
        self.server.stats["connections"] += 1
        if self.server._closed:
            transport.close()
            return
        transport.write(P.S_SERVER_GREETING.pack(P.NBDMAGIC, P.IHAVEOPT, P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES))
        self._hs = self._handshake()
        self._hs_need = next(self._hs)
        self._want = self._hs_need

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self._closing = True
        self._buf = bytearray(0)
        if self._hs is not None:
            self._hs.close()
            self._hs = None

    def pause_writing(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self._paused and self.transport is not None and not self._closing:
            self._paused = False
            self.transport.resume_reading()

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
                # grow; room for two requests so that pipelined large writes rarely need a compaction
                new = bytearray(max(_MIN_BUFFER, 2 * need))
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
            self.transport.close()
        if self._start == self._end:
            self._start = self._end = 0

    def _flush_out(self) -> None:
        """Send queued replies: small pieces joined into one write, large read payloads written as they are
        (no extra copy when the socket takes them at once)."""
        out, self._out = self._out, []
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
        buf = self._buf
        out = self._out
        lock = self.server.lock
        stats = self.server.stats
        pack_simple = P.S_SIMPLE_REPLY.pack
        pack_chunk = P.S_CHUNK.pack
        pack_offset = P.S_OFFSET.pack
        while not self._closing:
            avail = self._end - self._start
            if self._hs is not None:
                need = self._hs_need
                if avail < need:
                    self._want = need
                    return
                data = bytes(buf[self._start:self._start + need])
                self._start += need
                try:
                    self._hs_need = self._hs.send(data)
                except StopIteration:
                    self._hs = None  # transmission phase
                except _Close:
                    self._hs = None
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
            magic, flags, cmd, cookie, offset, length = P.S_REQUEST.unpack_from(buf, self._start)
            if magic != P.REQUEST_MAGIC:
                log.info("nbd: bad request magic %#x, disconnecting", magic)
                self.server.stats["protocol_errors"] += 1
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
                    if not flags and length and not exp.readonly and offset + length <= exp.size:
                        # fast path: the common plain write
                        stats["requests"] += 1
                        try:
                            with lock:
                                exp.device.write(offset, data)
                        except Exception as e:
                            self._device_failed(cmd, cookie, exp, e)
                        else:
                            out.append(pack_simple(P.SIMPLE_REPLY_MAGIC, 0, cookie))
                    else:
                        self._request(flags, cmd, cookie, offset, length, data)
                finally:
                    try:
                        data.release()
                    except BufferError:  # the device kept a view: detach from our buffer for good
                        log.warning("nbd: device kept a reference to a write buffer")
                        self._buf = buf = bytearray(self._buf)
                continue
            self._start += 28
            if cmd == P.CMD_READ and self._structured and not flags & ~P.CMD_FLAG_DF and 0 < length <= P.MAX_PAYLOAD:
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
                        out.append(pack_chunk(P.STRUCTURED_REPLY_MAGIC, P.REPLY_FLAG_DONE, P.REPLY_TYPE_OFFSET_DATA,
                                              cookie, 8 + length) + pack_offset(offset))
                        out.append(data)
                    continue
            if cmd == P.CMD_DISC:
                self._closing = True
                return
            self._request(flags, cmd, cookie, offset, length, None)

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
                left = length
                while left:
                    n = min(left, 65536)
                    yield n
                    left -= n
                self._opt_error(opt, P.REP_ERR_TOO_BIG, "option payload too large")
                continue
            data = (yield length) if length else b""
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
        self._out.append(P.S_SIMPLE_REPLY.pack(P.SIMPLE_REPLY_MAGIC, 0, cookie))

    def _reply_error(self, cmd: int, cookie: int, err: int, msg: str) -> None:
        self.server.stats["errors"] += 1
        if self._structured and cmd in (P.CMD_READ, P.CMD_BLOCK_STATUS):
            raw = msg.encode()[:P.MAX_STRING]
            payload = P.S_ERROR.pack(err, len(raw)) + raw
            self._out.append(P.S_CHUNK.pack(P.STRUCTURED_REPLY_MAGIC, P.REPLY_FLAG_DONE, P.REPLY_TYPE_ERROR, cookie,
                                            len(payload)) + payload)
        else:
            self._out.append(P.S_SIMPLE_REPLY.pack(P.SIMPLE_REPLY_MAGIC, err, cookie))

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
        if cmd == P.CMD_READ and length > P.MAX_PAYLOAD:
            self._reply_error(cmd, cookie, P.EINVAL, "read larger than the maximum block size")
            return
        size = exp.size
        if cmd != P.CMD_FLUSH and offset + length > size:
            err = P.ENOSPC if cmd in (P.CMD_WRITE, P.CMD_WRITE_ZEROES) else P.EINVAL
            self._reply_error(cmd, cookie, err,
                              f"request {offset}+{length} beyond the end of the export ({size} bytes)")
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
                    if self._structured:
                        self._out.append(P.S_CHUNK.pack(P.STRUCTURED_REPLY_MAGIC, P.REPLY_FLAG_DONE,
                                                        P.REPLY_TYPE_OFFSET_DATA, cookie, 8 + length)
                                         + P.S_OFFSET.pack(offset))
                    else:
                        self._out.append(P.S_SIMPLE_REPLY.pack(P.SIMPLE_REPLY_MAGIC, 0, cookie))
                    self._out.append(buf)
                    return
                if cmd == P.CMD_WRITE:
                    if length:
                        dev.write(offset, data)
                elif cmd == P.CMD_FLUSH:
                    dev.flush()
                elif cmd == P.CMD_TRIM:
                    if length:
                        dev.discard(offset, length)
                elif cmd == P.CMD_WRITE_ZEROES:
                    if length:
                        if flags & P.CMD_FLAG_NO_HOLE:
                            pos = offset
                            while pos < offset + length:
                                n = min(_ZERO_CHUNK, offset + length - pos)
                                dev.write(pos, bytes(n))
                                pos += n
                        else:
                            dev.write_zeroes(offset, length)
                elif cmd == P.CMD_BLOCK_STATUS:
                    self._block_status(flags, cookie, offset, length, dev)
                    return
                elif cmd == P.CMD_CACHE:
                    pass  # advisory; nothing to prefetch in memory
                if flags & P.CMD_FLAG_FUA and cmd in (P.CMD_WRITE, P.CMD_TRIM, P.CMD_WRITE_ZEROES):
                    dev.flush()
        except Exception as e:  # a device error or bug must not kill the server
            self._device_failed(cmd, cookie, exp, e)
            return
        self._reply_ok(cookie)

    def _device_failed(self, cmd: int, cookie: int, exp: _Export, e: Exception) -> None:
        if isinstance(e, NoSpace):
            self._reply_error(cmd, cookie, P.ENOSPC, str(e))
        elif isinstance(e, OutOfBounds):
            self._reply_error(cmd, cookie, P.EINVAL, str(e))
        elif isinstance(e, ReadOnly):
            self._reply_error(cmd, cookie, P.EPERM, str(e))
        elif isinstance(e, OSError):
            self._reply_error(cmd, cookie, P.wire_errno(e.errno) if e.errno else P.EIO, str(e))
        elif isinstance(e, ThinpoolError):
            log.warning("nbd: %s on %s failed: %s", P.CMD_NAMES.get(cmd), exp.name, e)
            self._reply_error(cmd, cookie, P.EIO, str(e))
        else:
            log.error("nbd: %s on %s raised", P.CMD_NAMES.get(cmd), exp.name, exc_info=e)
            self._reply_error(cmd, cookie, P.EIO, f"internal error: {type(e).__name__}")

    def _reply_none(self, cookie: int) -> None:
        if self._structured:
            self._out.append(P.S_CHUNK.pack(P.STRUCTURED_REPLY_MAGIC, P.REPLY_FLAG_DONE, P.REPLY_TYPE_NONE, cookie, 0))
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
        self._out.append(P.S_CHUNK.pack(P.STRUCTURED_REPLY_MAGIC, P.REPLY_FLAG_DONE, P.REPLY_TYPE_BLOCK_STATUS,
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
          periodic: tuple[float, Callable[[], Any]] | None = None) -> NBDServer:
    """Serve ``exports`` until SIGINT/SIGTERM (when called in the main thread). Blocks; returns the server
    after a clean shutdown, which has called ``on_shutdown`` (or flushed every device when it is None).

    ``periodic=(seconds, fn)`` calls ``fn()`` (under the device lock, in the loop thread) every ``seconds``,
    e.g. a pool commit so that clients which never FLUSH still reach stable metadata.
    """

    async def main() -> NBDServer:
        server = NBDServer(exports, on_shutdown=on_shutdown, lock=lock)
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
                try:
                    with server.lock:
                        fn()
                except Exception:
                    log.exception("nbd: periodic task failed")
                ticker = loop.call_later(interval, tick)

            ticker = loop.call_later(interval, tick)
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
                 on_shutdown: Callable[[], Any] | None = None, lock: threading.Lock | None = None) -> None:
        self.server = NBDServer(exports, on_shutdown=on_shutdown, lock=lock)
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
