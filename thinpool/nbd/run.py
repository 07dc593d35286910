"""Running an NBDServer: :func:`serve` (blocking, signals, periodic commit) and :class:`ServerThread` (tests).

Layer: nbd. May import: thinpool.errors, thinpool.io, thinpool.nbd.server.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from collections.abc import Callable, Mapping
from typing import Any

from thinpool.io.device import BlockDevice
from thinpool.nbd.server import NBDServer, ServerOptions

log = logging.getLogger("thinpool.nbd")


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
        self._listen: dict[str, Any] = {"unix_path": unix_path, "host": host, "port": port}
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
