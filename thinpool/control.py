"""The control channel of a running server: pool commands from another shell, applied between requests.

Layer: control. May import: thinpool.errors, thinpool.pool.

While ``thinpool serve`` or ``thinpool mount`` holds a pool's writer lock, no second process may open the
metadata for writing. Instead the server listens on ``POOL/control.sock`` (the socket's mode is the pool
directory's permission bits, so whoever may change the pool directory may send requests) and applies requests
itself, as dm-thin applies pool messages to a live pool (suspend, message, resume): each request runs in the
control thread under the server's device lock, i.e. between two device requests of the data path, so a snapshot
of a served device contains exactly the writes acknowledged before it (and ``create_snap`` commits, making them
durable first). No request ever opens the metadata a second time.

Wire format: one JSON object per line each way. Request ``{"op": NAME, "args": {...}}``; reply ``{"ok": true,
"result": ...}`` or ``{"ok": false, "error": {"type": CLASS, "message": TEXT, "exit_code": N, "fields": {...}}}``
(the class is re-raised by the client from thinpool.errors). Operations: ``info`` (status, devices, manifest
entries), ``find_device``, ``create_thin``, ``create_snap``, ``delete_thin``, ``resize``, ``resize_metadata``,
``commit``.

:class:`RemotePool` is the client: the subset of :class:`thinpool.pool.Pool` the CLI's pool commands use, so a
command that finds the pool locked by a server runs unchanged against it (``connect_if_served``).
"""

from __future__ import annotations

import json
import logging
import os
import select
import socket
import stat
import threading
from collections.abc import Callable
from typing import Any

import thinpool.errors as E
from thinpool.errors import (
    AddressInUse,
    ControlError,
    DeviceBusy,
    ListenError,
    ReadOnly,
    ServedPoolFailed,
    ThinpoolError,
)

log = logging.getLogger("thinpool.control")

SOCKET_NAME = "control.sock"
MAX_LINE = 1 << 20  # bytes of one request or reply


def socket_path(pool_dir: str | os.PathLike[str]) -> str:
    return os.path.join(os.fspath(pool_dir), SOCKET_NAME)


def _bind(path: str, mode: int) -> socket.socket:
    """A listening unix socket with ``mode``; a live server's socket is never taken over, a stale one is."""
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise ListenError(address=path, reason="exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
            raise AddressInUse(address=path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)
        finally:
            probe.close()
    tmp = f"{path}.{os.getpid()}.tmp"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(tmp)
        os.chmod(tmp, mode)
        sock.listen(16)  # before the rename: a client that finds the path must find it accepting
        os.rename(tmp, path)
    except OSError as e:
        sock.close()
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise ListenError(address=path, reason=e.strerror or str(e)) from e
    return sock


class ReadOnlyView:
    """A read-only view of a device (a snapshot published read-only)."""

    readonly = True

    def __init__(self, dev: Any) -> None:
        self._dev = dev

    @property
    def size(self) -> int:
        return int(self._dev.size)

    def read(self, offset: int, length: int) -> bytes:
        return self._dev.read(offset, length)  # type: ignore[no-any-return]

    def mapped_ranges(self, offset: int = 0, length: int | None = None) -> list[tuple[int, int]]:
        return self._dev.mapped_ranges(offset, length)  # type: ignore[no-any-return]

    def flush(self) -> None:
        pass

    def _refuse(self, *args: Any) -> None:
        raise ReadOnly()

    write = discard = write_zeroes = _refuse


# --- hosts: what a server lets the control channel do ------------------------------------------------------
class Host:
    """The server side of the channel: run pool operations between data requests, publish new devices."""

    def __init__(self, pool: Any, lock: Any) -> None:
        self.pool = pool
        self.lock = lock

    def failed(self) -> str | None:
        return None

    def run(self, fn: Callable[[], Any]) -> Any:
        with self.lock, self.pool.lock:
            return fn()

    def device_added(self, dev_id: int, readonly: bool) -> None:
        """A new device exists (create/snap): make it reachable by the server's clients."""

    def device_removing(self, dev_id: int) -> None:
        """Raise DeviceBusy if a client uses the device; else stop exporting it (the lock is held)."""


class NbdHost(Host):
    """Control for a running NBDServer (thinpool.nbd.server)."""

    def __init__(self, server: Any, pool: Any) -> None:
        super().__init__(pool, server.lock)
        self.server = server

    def failed(self) -> str | None:
        return self.server.failed  # type: ignore[no-any-return]

    def _on_loop(self, fn: Callable[[], None]) -> None:
        loop = self.server._loop
        done = threading.Event()
        box: list[BaseException] = []

        def call() -> None:
            try:
                fn()
            except BaseException as e:  # pragma: no cover - reported to the caller
                box.append(e)
            finally:
                done.set()

        loop.call_soon_threadsafe(call)
        if not done.wait(10):
            raise ControlError(path="-", reason="the server's event loop did not respond")
        if box:
            raise box[0]

    def device_added(self, dev_id: int, readonly: bool) -> None:
        name = self.pool.device_name(dev_id)
        dev = self.pool.device(dev_id)

        def add() -> None:
            self.server.add_export(name, dev, readonly=readonly)
            if str(dev_id) != name:
                self.server.aliases[str(dev_id)] = name

        self._on_loop(add)

    def device_removing(self, dev_id: int) -> None:
        name = self.pool.device_name(dev_id)

        def remove() -> None:
            # on the event loop, where handshakes choose their export: the check and the removal are one step, so
            # no client can pick the export between them and then reach a deleted (or reused) device id
            exp = self.server.exports.get(name)
            if exp is None:
                return
            if any(c._export is exp for c in list(self.server.connections)):
                raise DeviceBusy(dev_id=dev_id)
            self.server.remove_export(name)

        self._on_loop(remove)


class FuseHost(Host):
    """Control for a running FUSE export (thinpool.fusefs): new devices appear as files."""

    def __init__(self, ops: Any, pool: Any) -> None:
        super().__init__(pool, ops.device_lock)
        self.ops = ops

    def failed(self) -> str | None:
        return self.ops.failed  # type: ignore[no-any-return]

    def device_added(self, dev_id: int, readonly: bool) -> None:
        name = self.pool.device_name(dev_id)
        if "/" in name or name in (".", ".."):
            return
        dev = self.pool.device(dev_id)
        if readonly:
            dev = ReadOnlyView(dev)
        self.ops.devices[name] = dev
        self.ops.names.append(name)

    def device_removing(self, dev_id: int) -> None:
        name = self.pool.device_name(dev_id)
        if name in self.ops.devices:
            raise DeviceBusy(dev_id=dev_id)  # a file of the mount: unmount first (dm: an open device is busy)


# --- server -------------------------------------------------------------------------------------------------
def _device_info(pool: Any, dev_id: int) -> dict[str, Any]:
    dev = pool.device(dev_id)
    mapped, highest = dev.status()
    return {"dev_id": dev_id, "name": dev.name, "size": dev.size, "mapped_sectors": mapped, "highest": highest}


class ControlServer:
    """The channel's listener: a thread accepting one client at a time, one JSON request per line."""

    def __init__(self, pool: Any, host: Host, sock: socket.socket, path: str,
                 snapshot_readonly: bool = True) -> None:
        self.pool = pool
        self.host = host
        self.sock = sock
        self.path = path
        self.snapshot_readonly = snapshot_readonly
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="thinpool-control", daemon=True)
        self.requests = 0

    @classmethod
    def start(cls, pool: Any, host: Host) -> ControlServer:
        path = socket_path(pool.path)
        mode = stat.S_IMODE(os.stat(pool.path).st_mode) & 0o777
        srv = cls(pool, host, _bind(path, mode), path)
        srv._thread.start()
        return srv

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass

    def _serve(self) -> None:
        waiter = select.poll()  # poll, not select: a descriptor past FD_SETSIZE in a busy process is still fine
        waiter.register(self.sock, select.POLLIN)
        while not self._stop.is_set():
            if not waiter.poll(200):
                continue
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                if self._stop.is_set():
                    return
                continue
            try:
                self._session(conn)
            except Exception:
                log.exception("control: session failed")
            finally:
                conn.close()

    def _session(self, conn: socket.socket) -> None:
        conn.setblocking(True)
        conn.settimeout(30)
        f = conn.makefile("rwb")
        while not self._stop.is_set():
            try:
                line = f.readline(MAX_LINE + 1)
            except (TimeoutError, OSError):
                return
            if not line:
                return
            if len(line) > MAX_LINE:
                self._send(f, {"ok": False, "error": {"type": "ControlError", "message": "request too long",
                                                       "exit_code": 1, "fields": {}}})
                return
            self._send(f, self.handle(line))

    @staticmethod
    def _send(f: Any, obj: dict[str, Any]) -> None:
        f.write(json.dumps(obj).encode() + b"\n")
        f.flush()

    def handle(self, line: bytes) -> dict[str, Any]:
        """One request -> one reply (never raises)."""
        self.requests += 1
        try:
            req = json.loads(line)
            op, args = req["op"], dict(req.get("args") or {})
            fn = self.OPS.get(op)
            if fn is None:
                raise ControlError(path=self.path, reason=f"unknown operation {op!r}")
            return {"ok": True, "result": fn(self, **args)}
        except ThinpoolError as e:
            return {"ok": False, "error": {"type": type(e).__name__, "message": str(e),
                                           "exit_code": getattr(e, "exit_code", 1),
                                           "fields": {k: v for k, v in e.fields.items() if _jsonable(v)}}}
        except (ValueError, KeyError, TypeError) as e:
            return {"ok": False, "error": {"type": "ControlError", "message": f"bad request: {e}", "exit_code": 2,
                                           "fields": {}}}
        except Exception as e:  # a bug must not kill the server
            log.exception("control: %s failed", line[:200])
            return {"ok": False, "error": {"type": "ControlError", "message": f"internal error: {e}",
                                           "exit_code": 1, "fields": {}}}

    def _writable(self) -> None:
        reason = self.host.failed()
        if reason is not None:
            raise ServedPoolFailed(reason=reason)

    # --- operations (run between data requests, under the server's lock) ---
    def op_info(self) -> dict[str, Any]:
        pool = self.pool

        def info() -> dict[str, Any]:
            st = pool.status().to_dict()
            st.pop("dm_status", None)
            if self.host.failed() is not None:
                st["mode"] = "failed"
            return {"status": st, "chunk_bytes": pool.chunk_bytes, "path": str(pool.path),
                    "trans_id": pool.transaction_id, "manifest_devices": pool.manifest.get("devices", {}),
                    "devices": [_device_info(pool, d) for d in pool.list_devices()]}

        return self.host.run(info)  # type: ignore[no-any-return]

    def op_find_device(self, ref: str | int) -> int:
        return int(self.host.run(lambda: self.pool.find_device(ref)))

    def op_create_thin(self, dev_id: int, size: int, name: str | None = None, origin: str | None = None
                       ) -> dict[str, Any]:
        self._writable()

        def create() -> dict[str, Any]:
            self.pool.create_thin(int(dev_id), int(size), name=name, origin=origin)
            return _device_info(self.pool, int(dev_id))

        out = self.host.run(create)
        self.host.device_added(int(dev_id), readonly=False)
        return out  # type: ignore[no-any-return]

    def op_create_snap(self, dev_id: int, origin_id: int, name: str | None = None) -> dict[str, Any]:
        self._writable()

        def snap() -> dict[str, Any]:
            # between requests: every acknowledged write of the origin is in it; create_snap commits them
            self.pool.create_snap(int(dev_id), int(origin_id), name=name)
            return _device_info(self.pool, int(dev_id))

        out = self.host.run(snap)
        self.host.device_added(int(dev_id), readonly=self.snapshot_readonly)
        return out  # type: ignore[no-any-return]

    def op_delete_thin(self, dev_id: int) -> None:
        self._writable()

        def delete() -> None:
            self.host.device_removing(int(dev_id))
            self.pool.delete_thin(int(dev_id))

        self.host.run(delete)

    def op_resize(self, size: int) -> None:
        self._writable()
        self.host.run(lambda: self.pool.resize(int(size)))

    def op_resize_metadata(self, size: int) -> None:
        self._writable()
        self.host.run(lambda: self.pool.resize_metadata(int(size)))

    def op_commit(self) -> int:
        self._writable()

        def commit() -> int:
            self.pool.commit()
            return int(self.pool.transaction_id)

        return int(self.host.run(commit))

    OPS: dict[str, Callable[..., Any]] = {
        "info": op_info, "find_device": op_find_device, "create_thin": op_create_thin,
        "create_snap": op_create_snap, "delete_thin": op_delete_thin, "resize": op_resize,
        "resize_metadata": op_resize_metadata, "commit": op_commit,
    }


def _jsonable(v: Any) -> bool:
    return isinstance(v, (str, int, float, bool, type(None)))


# --- client -------------------------------------------------------------------------------------------------
class _RemoteMetadata:
    def __init__(self, remote: RemotePool) -> None:
        self._remote = remote

    @property
    def trans_id(self) -> int:
        return int(self._remote._info()["trans_id"])

    def abort(self) -> None:
        """Nothing to abort here: every request was applied (or refused) whole by the server."""


class RemoteDevice:
    """What the CLI reads of a device through the channel (name, size, status)."""

    def __init__(self, info: dict[str, Any]) -> None:
        self.dev_id = int(info["dev_id"])
        self.name = str(info["name"])
        self.size = int(info["size"])
        self._status = (int(info["mapped_sectors"]), info["highest"])

    def status(self) -> tuple[int, int | None]:
        return self._status

    def __getattr__(self, attr: str) -> Any:
        raise ControlError(path="-", reason=f"device {attr} is not available while the pool is served: use the "
                                            "server's NBD/FUSE export (or stop the server)")


class RemotePool:
    """The Pool methods the CLI's pool commands use, sent to the server that holds the pool."""

    def __init__(self, path: str, timeout: float = 120.0) -> None:
        self.path = os.path.abspath(path)
        self.sock_path = socket_path(path)
        self.readonly = False
        self.closed = False
        self.remote = True
        self.md = _RemoteMetadata(self)
        self._cache: dict[str, Any] | None = None
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(self.sock_path)
        except OSError as e:
            s.close()
            raise ControlError(path=self.sock_path, reason=e.strerror or str(e)) from e
        self._sock = s
        self._f = s.makefile("rwb")

    # --- transport ---
    def call(self, op: str, **args: Any) -> Any:
        try:
            self._f.write(json.dumps({"op": op, "args": args}).encode() + b"\n")
            self._f.flush()
            line = self._f.readline(MAX_LINE + 1)
        except OSError as e:
            raise ControlError(path=self.sock_path, reason=e.strerror or str(e)) from e
        if not line:
            raise ControlError(path=self.sock_path, reason="the server closed the channel")
        reply = json.loads(line)
        if reply.get("ok"):
            return reply.get("result")
        raise _rebuild(reply.get("error") or {})

    def _info(self) -> dict[str, Any]:
        if self._cache is None:
            self._cache = self.call("info")
        return self._cache

    def _changed(self) -> None:
        self._cache = None

    # --- the Pool subset ---
    @property
    def chunk_bytes(self) -> int:
        return int(self._info()["chunk_bytes"])

    @property
    def transaction_id(self) -> int:
        return int(self._info()["trans_id"])

    @property
    def nr_data_blocks(self) -> int:
        return int(self._info()["status"]["total_data_blocks"])

    @property
    def nr_metadata_blocks(self) -> int:
        return int(self._info()["status"]["total_metadata_blocks"])

    @property
    def manifest(self) -> dict[str, Any]:
        return {"devices": self._info()["manifest_devices"]}

    def status(self) -> Any:
        from dataclasses import fields

        from thinpool.pool import PoolStatus

        st = self._info()["status"]
        return PoolStatus(**{f.name: st[f.name] for f in fields(PoolStatus) if f.name in st})

    def list_devices(self) -> list[int]:
        return [int(d["dev_id"]) for d in self._info()["devices"]]

    def device(self, dev_id: int) -> RemoteDevice:
        for d in self._info()["devices"]:
            if int(d["dev_id"]) == int(dev_id):
                return RemoteDevice(d)
        raise E.DeviceNotFound(dev_id=dev_id)

    def device_name(self, dev_id: int) -> str:
        return self.device(dev_id).name

    def find_device(self, ref: str | int) -> int:
        return int(self.call("find_device", ref=ref))

    def create_thin(self, dev_id: int, size: int, *, name: str | None = None, origin: str | None = None
                    ) -> RemoteDevice:
        if origin is not None:
            origin = os.path.abspath(origin)
        out = self.call("create_thin", dev_id=dev_id, size=size, name=name, origin=origin)
        self._changed()
        return RemoteDevice(out)

    def create_snap(self, dev_id: int, origin_id: int, *, name: str | None = None) -> RemoteDevice:
        out = self.call("create_snap", dev_id=dev_id, origin_id=origin_id, name=name)
        self._changed()
        return RemoteDevice(out)

    def delete_thin(self, dev_id: int) -> None:
        self.call("delete_thin", dev_id=dev_id)
        self._changed()

    def resize(self, data_size: int) -> None:
        self.call("resize", size=data_size)
        self._changed()

    def resize_metadata(self, size: int) -> None:
        self.call("resize_metadata", size=size)
        self._changed()

    def commit(self) -> None:
        self.call("commit")
        self._changed()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            for c in (self._f.close, self._sock.close):
                try:
                    c()
                except OSError:
                    pass

    def __enter__(self) -> RemotePool:
        return self

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__") or attr in ("_sock", "_f", "_cache"):
            raise AttributeError(attr)
        raise ControlError(path=self.sock_path,
                           reason=f"{attr!r} cannot be sent to the running server (it applies thin create/snap/"
                                  "delete and pool status/resize/commit); stop the server first")

    def __exit__(self, *exc: object) -> None:
        self.close()


def _rebuild(err: dict[str, Any]) -> ThinpoolError:
    cls = getattr(E, str(err.get("type", "")), None)
    if not (isinstance(cls, type) and issubclass(cls, ThinpoolError)):
        cls = ControlError
    msg = str(err.get("message", "control request failed"))
    e = cls.__new__(cls)
    ThinpoolError.__init__(e, msg.replace("{", "{{").replace("}", "}}"), **dict(err.get("fields") or {}))
    e.exit_code = int(err.get("exit_code", getattr(cls, "exit_code", 1)))
    return e


def connect_if_served(pool_dir: str) -> RemotePool | None:
    """A RemotePool if a server holding ``pool_dir`` listens on its control socket, else None."""
    path = socket_path(pool_dir)
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return None
    except OSError:
        return None
    try:
        return RemotePool(pool_dir)
    except ControlError:
        return None
