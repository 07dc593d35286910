"""One NBD client connection on asyncio: receive buffer, transmission fast paths, long requests off the loop.

The fast path (:meth:`_Connection._run`) takes the plain WRITEs and structured READs at the head of the receive
buffer as one batch: one hold of the device lock, payloads written from views of the receive buffer (the device
must not keep them past the call), read replies of 64 KiB and more built in reused reply buffers the device reads
straight into, and the small replies joined into one piece, so a batch leaves in one send.

Layer: nbd. May import: thinpool.errors, thinpool.io, thinpool.nbd.protocol, thinpool.nbd.handshake.

See :mod:`thinpool.nbd.server` for the limits (:class:`ServerOptions`) this class enforces per connection.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import struct
import time
from collections.abc import Generator
from typing import TYPE_CHECKING, Any, cast

from thinpool.errors import NoSpace, OutOfBounds, ReadOnly, ServedPoolFailed, ThinpoolError
from thinpool.io.device import BlockDevice
from thinpool.nbd import protocol as P
from thinpool.nbd.handshake import _STARTTLS, BASE_ALLOCATION_ID, HandshakeMixin, _Close, _Export

if TYPE_CHECKING:
    from thinpool.nbd.server import NBDServer

log = logging.getLogger("thinpool.nbd")

_MIN_BUFFER = 256 * 1024
_SHRINK_BUFFER = 8 * 1024 * 1024  # an idle receive buffer larger than this is given back
_ZERO_CHUNK = 1024 * 1024
_FLUSH_OUT_BYTES = 256 * 1024  # queued reply bytes handed to the transport at once
# Socket send buffer asked for (the kernel caps it at net.core.wmem_max, and doubles it): with the default
# ~208 KiB a 1 MiB read reply took ~5 send() calls and asyncio copied the ~800 KiB the first one left behind
# into its own buffer (profiled: 1 MiB reads QD16 spent more time in send/extend/_write_ready than in pread).
_SNDBUF_BYTES = 2 * 1024 * 1024
# Read replies of at least _POOLED_MIN bytes are built in reply buffers (header + payload, the device reads
# straight into it) that are reused once the socket took them whole: no allocation, no page faults, one send.
_POOLED_MIN = 64 * 1024
_POOLED_MAX = 4 * 1024 * 1024 + 28  # split_bytes' default plus the header
_POOL_KEEP = 4  # reply buffers kept per connection, each at most _POOL_KEEP_BYTES (4 MiB a connection at most)
_POOL_KEEP_BYTES = 1024 * 1024 + 28
_READ_HEADER = 28  # structured reply chunk header (20) + offset (8)
_S_READ_REPLY = struct.Struct(">IHHQIQ")  # a structured OFFSET_DATA chunk header and its offset, packed at once
# A run of fast-path requests (one hold of the device lock) ends after this many requests or payload bytes, so
# other threads waiting for the lock (long requests, the control channel) wait at most one run.
_RUN_REQUESTS = 256
_RUN_BYTES = 4 * 1024 * 1024
# the fast path's constants and struct methods, bound once
_unpack_request = P.S_REQUEST.unpack_from
_pack_simple = P.S_SIMPLE_REPLY.pack
_pack_read = _S_READ_REPLY.pack
_pack_read_into = _S_READ_REPLY.pack_into
_REQUEST_MAGIC = P.REQUEST_MAGIC
_SIMPLE_MAGIC = P.SIMPLE_REPLY_MAGIC
_STRUCTURED_MAGIC = P.STRUCTURED_REPLY_MAGIC
_DONE = P.REPLY_FLAG_DONE
_OFFSET_DATA = P.REPLY_TYPE_OFFSET_DATA
_CMD_WRITE = P.CMD_WRITE
_CMD_READ = P.CMD_READ
_FLAG_DF = P.CMD_FLAG_DF


class _Connection(HandshakeMixin, asyncio.BufferedProtocol):
    """One client connection: handshake generator, then the transmission fast path."""

    def __init__(self, server: NBDServer) -> None:
        self.server = server
        self.opts = server.options
        self.transport: Any = None  # asyncio's Transport, then the TLS transport after STARTTLS
        self._buf = bytearray(_MIN_BUFFER)
        self._start = 0
        self._end = 0
        self._want = 4  # bytes needed to make progress
        self._hs: Generator[int, bytes, None] | None = None
        self._hs_need = 0
        self._hs_timer: asyncio.TimerHandle | None = None
        self._skip = 0  # transmission: payload bytes still to discard (refused oversized write)
        self._export: Any = None  # the _Export chosen by GO/EXPORT_NAME (set before transmission)
        self._structured = False
        self._meta_base_allocation = False
        self._meta_export: _Export | None = None
        self._no_zeroes = False
        self._tls = False
        self._upgrading = False
        self._out: list[bytes | bytearray | memoryview] = []  # memoryviews: pooled reply buffers
        self._out_bytes = 0
        self._free: list[bytearray] = []  # reply buffers the socket has taken whole, ready for reuse
        self._lent: list[bytearray] = []  # reply buffers the transport still holds (free again once it drained)
        self._fast: tuple[Any, Any, Any, int, int] | None = None  # see _fast_path
        self.reply_buffers_made = 0  # reply buffers allocated (tests and benchmarks count reuse with it)
        self._closing = False
        self._paused = False  # the transport holds unsent bytes: our replies wait in _out until it drains
        self._reading = True
        self._inflight = 0  # requests running in a worker
        self._reserved = 0  # reply bytes those requests will queue
        self._disc = False  # DISC received while requests were in flight

    # --- asyncio plumbing -----------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        srv = self.server
        srv.connections.add(self)
        srv._handshaking[self] = None
        srv.stats["connections"] += 1
        if srv._closed:
            transport.close()
            return
        # high 1, low 0: pause_writing as soon as the transport keeps anything (the TLS transport pauses at
        # size >= high, so high must be above 0), resume_writing once it sent it all. Replies then wait in _out
        # as they are (no copy) instead of being appended to the transport's buffer, which copied every byte of
        # a read reply once more whenever the socket was backlogged.
        self.transport.set_write_buffer_limits(high=1, low=0)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < _SNDBUF_BYTES:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SNDBUF_BYTES)
            except OSError:
                pass  # a transport without a settable buffer: the default works, only slower
        self._hs_timer = asyncio.get_running_loop().call_later(self.opts.handshake_timeout, self._hs_expired)
        self.transport.write(P.S_SERVER_GREETING.pack(P.NBDMAGIC, P.IHAVEOPT, P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES))
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
        self._free = []
        self._lent = []
        if self._hs is not None:
            self._hs.close()
            self._hs = None

    def pause_writing(self) -> None:
        self._paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._paused = False
        if self._lent:
            # the transport sent everything it held (low water 0): the reply buffers it kept are ours again
            free = self._free
            for whole in self._lent:
                if len(free) < _POOL_KEEP and len(whole) <= _POOL_KEEP_BYTES:
                    free.append(whole)
            self._lent = []
        self._resume()

    def _blocked(self) -> bool:
        t = self.transport
        queued = self._out_bytes + (t.get_write_buffer_size() if self._paused and t is not None else 0)
        return (queued >= self.opts.max_reply_bytes or self._inflight >= self.opts.max_in_flight
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
        self._out.append(piece)
        self._out_bytes += len(piece)

    def _flush_out(self, force: bool = False) -> None:
        """Send queued replies while the transport takes them whole: small pieces joined into one write, large
        read payloads written as they are. What the socket does not take at once stays in the transport (it
        copies it) and pauses us; the rest waits here, uncopied, until resume_writing (``force``: hand over
        everything, e.g. when closing)."""
        out = self._out
        small: list[bytes | bytearray | memoryview] = []
        write = self.transport.write
        i = 0
        n = len(out)
        while i < n and (force or not self._paused):
            piece = out[i]
            i += 1
            if len(piece) >= 65536:
                if small:
                    write(b"".join(small))
                    small = []
                    if self._paused and not force:
                        i -= 1  # the joined pieces filled the socket: this payload waits
                        break
                write(piece)
                if type(piece) is memoryview:
                    whole = cast(bytearray, piece.obj)
                    if not self._paused and not self.transport.get_write_buffer_size():
                        # a pooled reply buffer the socket took whole: reusable now
                        if len(self._free) < _POOL_KEEP and len(whole) <= _POOL_KEEP_BYTES:
                            self._free.append(whole)
                        piece.release()
                    else:
                        # the transport still holds (part of) it: from Python 3.12 on it queues the memoryview
                        # itself, uncopied, so the buffer is neither released nor reused until resume_writing
                        # says the transport drained (a buffer past the cap is left to the garbage collector)
                        if len(self._lent) < 2 * _POOL_KEEP:
                            self._lent.append(whole)
            else:
                small.append(piece)
        if small:
            write(b"".join(small) if len(small) > 1 else small[0])
        if i >= n:
            self._out = []
            self._out_bytes = 0
        else:
            del out[:i]
            self._out_bytes = sum(len(p) for p in out)

    def _reply_buffer(self, n: int) -> bytearray:
        """A reply buffer of at least ``n`` bytes: a reused one when one is free and big enough."""
        free = self._free
        while free:
            b = free.pop()
            if len(b) >= n:
                return b
        self.reply_buffers_made += 1
        return bytearray(max(n, _POOLED_MIN + _READ_HEADER))

    def eof_received(self) -> bool:
        return False  # close the transport

    def close(self) -> None:
        self._closing = True
        if self.transport is not None:
            if self._out and not self.transport.is_closing():
                self._flush_out(force=True)
            self._out = []
            self.transport.close()

    # --- parsing --------------------------------------------------------------------------------------------
    def _process(self) -> None:
        stats = self.server.stats
        size = -1  # the export's size, read once per batch of requests (a property chain on every request cost
        # ~1.5 us; a resize between batches is seen, and the device checks its own bounds anyway)
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
            if size < 0:
                size = self._export.size
            if 0 < length and offset + length <= size and (cmd == P.CMD_WRITE or cmd == P.CMD_READ) \
                    and self.server.failed is None:
                fast = self._fast or self._fast_path()
                if cmd == P.CMD_WRITE:
                    if not flags and length <= fast[3]:
                        stop = self._start + 28 + length
                        if stop == self._end:
                            # the only request that arrived (a client at QD1): written here, without the run's
                            # setup (a run of one costs ~17 % more than this, callgrind)
                            view = memoryview(buf)[self._start + 28:stop]
                            self._start = stop
                            stats["requests"] += 1
                            try:
                                with self.server.lock:
                                    fast[0](offset, view)
                            except Exception as e:
                                self._device_failed(cmd, cookie, self._export, e)
                            else:
                                self._out.append(_pack_simple(_SIMPLE_MAGIC, 0, cookie))
                                self._out_bytes += 16
                            finally:
                                self._release_payload(view)
                            continue
                        # the common requests, as many as arrived, under one hold of the lock
                        self._run(size, flags, cmd, cookie, offset, length)
                        continue
                elif not flags & ~P.CMD_FLAG_DF and length <= fast[4]:
                    self._run(size, flags, cmd, cookie, offset, length)
                    continue
            if cmd == P.CMD_WRITE:
                # Zero-copy: the device gets a view of the receive buffer, valid during the call only.
                view = memoryview(buf)[self._start + 28:self._start + 28 + length]
                self._start += 28 + length
                try:
                    self._request(flags, cmd, cookie, offset, length, view)
                finally:
                    self._release_payload(view)
                continue
            self._start += 28
            if cmd == P.CMD_DISC:
                self._closing = True
                return
            self._request(flags, cmd, cookie, offset, length, None)

    def _fast_path(self) -> tuple[Any, Any, Any, int, int]:
        """What the fast path needs of the export, fixed once transmission started: (write, read, readinto or
        None, the longest write it takes (-1: none, read-only), the longest read (-1: none, no structured
        replies))."""
        exp = self._export
        dev = exp.device
        fast = (dev.write, dev.read, getattr(dev, "readinto", None), -1 if exp.readonly else P.MAX_PAYLOAD,
                min(self.opts.split_bytes, P.MAX_PAYLOAD) if self._structured else -1)
        self._fast = fast
        return fast

    def _run(self, size: int, flags: int, cmd: int, cookie: int, offset: int, length: int) -> None:
        """The fast path: the plain WRITEs and structured READs (up to ``split_bytes``) at the head of the
        receive buffer, as many as arrived in a row (at most _RUN_REQUESTS / _RUN_BYTES of payload, and no more
        reply bytes than ``max_reply_bytes`` allows), under one hold of the device lock. Write payloads go to the
        device as views of the receive buffer (valid during the call only); the small replies of the run are
        joined into one piece, so the batch leaves in one send. Replies keep the requests' order. The caller
        parsed the first request (its fields are the arguments) and checked that it qualifies; the first one
        that does not ends the run and goes the general way."""
        write, read, readinto, max_write, max_read = self._fast or self._fast_path()
        buf = self._buf
        base = memoryview(buf)
        start = self._start
        end = self._end
        room = self.opts.max_reply_bytes - self._out_bytes  # reply bytes this run may still queue
        out = self._out
        small: list[bytes | bytearray | memoryview] = []  # replies not yet in _out (joined at the end)
        queued = nr = payload = 0
        failed: tuple[int, int, BaseException] | None = None
        kept = False
        with self.server.lock:
            while True:
                if cmd == _CMD_WRITE:
                    stop = start + 28 + length
                    if flags or length > max_write or stop > end:
                        break
                    view = base[start + 28:stop]
                    start = stop
                    nr += 1
                    try:
                        write(offset, view)
                    except Exception as e:
                        failed = (cmd, cookie, e)
                        break
                    finally:
                        try:
                            view.release()
                        except BufferError:  # the device kept an export of it: detach from this buffer
                            kept = True
                    small.append(_pack_simple(_SIMPLE_MAGIC, 0, cookie))
                    room -= 16
                    if kept:
                        break
                elif cmd == _CMD_READ:
                    if flags & ~_FLAG_DF or length > max_read:
                        break
                    start += 28
                    nr += 1
                    if readinto is not None and length >= _POOLED_MIN and length + _READ_HEADER <= _POOLED_MAX:
                        # one reply buffer: header, then the device reads straight into the rest
                        rbuf = self._reply_buffer(_READ_HEADER + length)
                        rmv = memoryview(rbuf)[:_READ_HEADER + length]
                        try:
                            got_n = readinto(offset, rmv[_READ_HEADER:])
                            if got_n != length:
                                raise OSError(errno.EIO, f"device returned {got_n} of {length} bytes")
                        except Exception as e:
                            rmv.release()
                            failed = (cmd, cookie, e)
                            break
                        _pack_read_into(rbuf, 0, _STRUCTURED_MAGIC, _DONE, _OFFSET_DATA, cookie, 8 + length, offset)
                        if small:
                            piece = b"".join(small) if len(small) > 1 else small[0]
                            out.append(piece)
                            queued += len(piece)
                            small = []
                        out.append(rmv)
                        queued += _READ_HEADER + length
                    else:
                        try:
                            got = read(offset, length)
                            if len(got) != length:
                                raise OSError(errno.EIO, f"device returned {len(got)} of {length} bytes")
                        except Exception as e:
                            failed = (cmd, cookie, e)
                            break
                        small.append(_pack_read(_STRUCTURED_MAGIC, _DONE, _OFFSET_DATA, cookie, 8 + length, offset))
                        if length >= 65536:  # sent as it is, not joined (a copy)
                            head: bytes | bytearray | memoryview = b"".join(small) if len(small) > 1 else small[0]
                            out.append(head)
                            out.append(got)
                            queued += len(head) + length
                            small = []
                        else:
                            small.append(got)
                    room -= _READ_HEADER + length
                else:
                    break
                payload += length
                if nr >= _RUN_REQUESTS or payload >= _RUN_BYTES or room <= 0 or end - start < 28:
                    break
                magic, flags, cmd, cookie, offset, length = _unpack_request(buf, start)
                if magic != _REQUEST_MAGIC or length <= 0 or offset + length > size:
                    break
        base.release()
        self._start = start
        if small:
            piece = b"".join(small) if len(small) > 1 else small[0]
            out.append(piece)
            queued += len(piece)
        self._out_bytes += queued
        self.server.stats["requests"] += nr
        if failed is not None:
            self._device_failed(failed[0], failed[1], self._export, failed[2])
        if kept:
            log.warning("nbd: device kept a reference to a write buffer")
            self._buf = bytearray(buf)

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
            # asyncio calls no connection_lost when the transport was lost during the handshake (a client gone
            # after its ClientHello): without this the connection kept its slot and its receive buffer for ever
            self.connection_lost(e)
            return
        if self._closing or new is None:
            if new is not None:
                new.close()
            self.connection_lost(None)  # (idempotent: asyncio may call it too, once the new transport closes)
            return
        self.transport = new
        self._reading = True
        new.set_write_buffer_limits(high=1, low=0)
        self._tls = True
        self._upgrading = False
        self._hs_need = self._hs.send(b"") if self._hs is not None else 16  # on to the next option header
        self._want = self._hs_need
        self._resume()

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

    def _request(self, flags: int, cmd: int, cookie: int, offset: int, length: int, data: Any) -> None:
        exp = self._export
        self.server.stats["requests"] += 1
        # validate
        # FUA is valid on every command once SEND_FUA is advertised (ignored where nothing is written)
        allowed = P.CMD_FLAG_FUA
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
        readinto = getattr(dev, "readinto", None)  # ThinDevice.readinto(offset, buf): no intermediate copy

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
                        if readinto is not None:  # straight into the reply buffer
                            got_n = readinto(offset + pos, memoryview(out)[pos:pos + n])  # type: ignore[arg-type]
                        else:
                            got = dev.read(offset + pos, n)
                            got_n = len(got)
                            if got_n == n:
                                out[pos:pos + n] = got  # type: ignore[index]
                        if got_n != n:
                            raise OSError(errno.EIO, f"device returned {got_n} of {n} bytes")
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
                    self._device_failed(cmd, cookie, exp, exc)
            elif cmd == P.CMD_READ:
                self._reply_read(cookie, offset, f.result())
            else:
                self._reply_ok(cookie)
            self._resume()

        fut.add_done_callback(done)

    def _release_payload(self, view: memoryview) -> None:
        """Release the view of the receive buffer a WRITE's payload was handed in; if the device kept a view of it,
        detach from that buffer for good (a new receive buffer), so later requests never overwrite what it holds."""
        try:
            view.release()
        except BufferError:
            log.warning("nbd: device kept a reference to a write buffer")
            self._buf = bytearray(self._buf)

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
