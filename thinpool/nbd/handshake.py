"""The NBD handshake (fixed newstyle option haggling) of one connection, as a mixin of the connection.

Layer: nbd. May import: thinpool.errors, thinpool.io, thinpool.nbd.protocol.

Options: EXPORT_NAME, ABORT, LIST, STARTTLS, INFO, GO, STRUCTURED_REPLY, LIST/SET_META_CONTEXT
(``base:allocation``). :meth:`HandshakeMixin._handshake` is a generator: it yields how many bytes it needs next
(or ``_STARTTLS`` to ask for the TLS upgrade) and is sent them; it returns when transmission starts.
"""

from __future__ import annotations

import logging
from collections.abc import Generator
from typing import Any

from thinpool.io.device import BlockDevice
from thinpool.nbd import protocol as P

log = logging.getLogger("thinpool.nbd")

MAX_OPTION_LENGTH = 64 * 1024  # longer option payloads are skipped and refused with ERR_TOO_BIG
BASE_ALLOCATION_ID = 1  # the context id handed out for base:allocation
PREFERRED_BLOCK = 4096
_STARTTLS = -1  # what the handshake generator yields to ask for the TLS upgrade


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


class HandshakeMixin:
    """Option haggling; the connection class provides transport, server, opts and the negotiated state."""

    transport: Any
    server: Any
    opts: Any
    _export: Any
    _structured: bool
    _meta_base_allocation: bool
    _meta_export: _Export | None
    _no_zeroes: bool
    _tls: bool

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
        exp: _Export | None = self.server.find(name)
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
