"""A tiny raw NBD client for protocol tests: drives the handshake by hand so tests can misbehave on purpose."""

from __future__ import annotations

import socket
import struct

from thinpool.nbd import protocol as P


class Disconnected(Exception):
    pass


class RawClient:
    # a hang guard, not a latency bound: a FLUSH on a loaded host (fsync behind another process's writes) can
    # take seconds
    def __init__(self, path: str, timeout: float = 60.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.structured = False

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- raw io ---
    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exact(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise Disconnected(f"server closed after {len(out)}/{n} bytes")
            out += chunk
        return bytes(out)

    def is_closed_by_server(self) -> bool:
        """True when the server has closed the connection (EOF or reset) and sent nothing more."""
        try:
            data = self.sock.recv(1)
        except (ConnectionResetError, BrokenPipeError):
            return True
        return data == b""

    # --- handshake ---
    def greeting(self, client_flags: int = P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES) -> int:
        magic, opt_magic, hflags = P.S_SERVER_GREETING.unpack(self.recv_exact(18))
        assert magic == P.NBDMAGIC and opt_magic == P.IHAVEOPT
        self.send(P.S_CLIENT_FLAGS.pack(client_flags))
        return hflags

    def option(self, opt: int, data: bytes = b"", magic: int = P.IHAVEOPT) -> None:
        self.send(P.S_OPTION.pack(magic, opt, len(data)) + data)

    def reply(self) -> tuple[int, int, bytes]:
        magic, opt, rtype, length = P.S_OPTION_REPLY.unpack(self.recv_exact(20))
        assert magic == P.REPLY_MAGIC, hex(magic)
        return opt, rtype, self.recv_exact(length)

    def replies_until_final(self) -> list[tuple[int, int, bytes]]:
        out = []
        while True:
            r = self.reply()
            out.append(r)
            if r[1] == P.REP_ACK or r[1] & P.REP_FLAG_ERROR:
                return out

    @staticmethod
    def info_payload(name: str, infos: tuple[int, ...] = ()) -> bytes:
        raw = name.encode()
        return P.S_U32.pack(len(raw)) + raw + P.S_U16.pack(len(infos)) + b"".join(P.S_U16.pack(i) for i in infos)

    @staticmethod
    def meta_payload(name: str, queries: tuple[str, ...]) -> bytes:
        raw = name.encode()
        out = P.S_U32.pack(len(raw)) + raw + P.S_U32.pack(len(queries))
        for q in queries:
            out += P.S_U32.pack(len(q)) + q.encode()
        return out

    def go(self, name: str, *, structured: bool = True, meta: bool = True) -> tuple[int, int]:
        """Negotiate (structured replies, base:allocation) and enter transmission; returns (size, flags)."""
        if structured:
            self.option(P.OPT_STRUCTURED_REPLY)
            assert self.reply()[1] == P.REP_ACK
            self.structured = True
            if meta:
                self.option(P.OPT_SET_META_CONTEXT, self.meta_payload(name, (P.META_BASE_ALLOCATION,)))
                reps = self.replies_until_final()
                assert reps[-1][1] == P.REP_ACK, reps
        self.option(P.OPT_GO, self.info_payload(name))
        size = flags = None
        for _opt, rtype, data in self.replies_until_final():
            if rtype == P.REP_INFO and struct.unpack(">H", data[:2])[0] == P.INFO_EXPORT:
                _, size, flags = P.S_INFO_EXPORT.unpack(data)
            elif rtype != P.REP_INFO and rtype != P.REP_ACK:
                raise AssertionError(f"GO failed: reply type {rtype:#x} {data!r}")
        return size, flags

    # --- transmission ---
    def request(self, cmd: int, offset: int = 0, length: int = 0, *, flags: int = 0, cookie: int = 1,
                payload: bytes = b"", magic: int = P.REQUEST_MAGIC) -> None:
        self.send(P.S_REQUEST.pack(magic, flags, cmd, cookie, offset, length) + payload)

    def simple_or_chunks(self, expect_cookie: int = 1) -> tuple[int, list[tuple[int, int, bytes]]]:
        """Read one reply. Returns (error, chunks); a simple reply gives chunks=[] (read data is not consumed
        for simple replies: use read() for that)."""
        (magic,) = struct.unpack(">I", self.recv_exact(4))
        if magic == P.SIMPLE_REPLY_MAGIC:
            err, cookie = struct.unpack(">IQ", self.recv_exact(12))
            assert cookie == expect_cookie
            return err, []
        assert magic == P.STRUCTURED_REPLY_MAGIC, hex(magic)
        chunks = []
        while True:
            flags, rtype, cookie, length = struct.unpack(">HHQI", self.recv_exact(16))
            assert cookie == expect_cookie
            chunks.append((rtype, flags, self.recv_exact(length)))
            if flags & P.REPLY_FLAG_DONE:
                break
            (magic,) = struct.unpack(">I", self.recv_exact(4))
            assert magic == P.STRUCTURED_REPLY_MAGIC
        err = 0
        for rtype, _f, data in chunks:
            if rtype & (1 << 15):
                err = struct.unpack(">I", data[:4])[0]
        return err, chunks

    def any_reply(self) -> tuple[int, int, list[tuple[int, int, bytes]]]:
        """Read the next reply whatever its cookie (replies may come out of order): (cookie, error, chunks)."""
        (magic,) = struct.unpack(">I", self.recv_exact(4))
        if magic == P.SIMPLE_REPLY_MAGIC:
            err, cookie = struct.unpack(">IQ", self.recv_exact(12))
            return cookie, err, []
        assert magic == P.STRUCTURED_REPLY_MAGIC, hex(magic)
        chunks = []
        while True:
            flags, rtype, cookie, length = struct.unpack(">HHQI", self.recv_exact(16))
            chunks.append((rtype, flags, self.recv_exact(length)))
            if flags & P.REPLY_FLAG_DONE:
                break
            self.recv_exact(4)
        err = next((struct.unpack(">I", d[:4])[0] for t, _f, d in chunks if t & (1 << 15)), 0)
        return cookie, err, chunks

    def read(self, offset: int, length: int, cookie: int = 7) -> tuple[int, bytes]:
        self.request(P.CMD_READ, offset, length, cookie=cookie)
        if not self.structured:
            err, _ = self.simple_or_chunks(cookie)
            return err, (b"" if err else self.recv_exact(length))
        err, chunks = self.simple_or_chunks(cookie)
        out = bytearray(length)
        for rtype, _f, data in chunks:
            if rtype == P.REPLY_TYPE_OFFSET_DATA:
                (off,) = struct.unpack(">Q", data[:8])
                out[off - offset:off - offset + len(data) - 8] = data[8:]
        return err, bytes(out)

    def write(self, offset: int, data: bytes, *, flags: int = 0, cookie: int = 9) -> int:
        self.request(P.CMD_WRITE, offset, len(data), flags=flags, cookie=cookie, payload=data)
        return self.simple_or_chunks(cookie)[0]

    def command(self, cmd: int, offset: int = 0, length: int = 0, *, flags: int = 0, cookie: int = 11) -> int:
        self.request(cmd, offset, length, flags=flags, cookie=cookie)
        return self.simple_or_chunks(cookie)[0]

    def block_status(self, offset: int, length: int, *, flags: int = 0, cookie: int = 13):
        self.request(P.CMD_BLOCK_STATUS, offset, length, flags=flags, cookie=cookie)
        err, chunks = self.simple_or_chunks(cookie)
        extents = []
        for rtype, _f, data in chunks:
            if rtype == P.REPLY_TYPE_BLOCK_STATUS:
                for i in range(4, len(data), 8):
                    extents.append(struct.unpack(">II", data[i:i + 8]))
        return err, extents
