"""The only module that crosses between the asyncio thread and the trio thread.

Theory of operation
-------------------
py-libp2p is trio-only and the daemon is asyncio, so each `Host` runs its libp2p stack in ONE dedicated
thread under ``trio.run`` (pattern A of /work/shared/notes/py-libp2p-0.8.1.md: 169-191 MB/s from asyncio
code and at most 2-5 ms of asyncio loop lag during a 64 MB transfer). The thread's root task enters the
service context manager (the libp2p host), opens a nursery for bridged calls, signals "ready", and then waits
for a stop event. Everything trio-side is owned by that nursery or by the service's own nurseries.

Crossing rules (each is one primitive, nothing else crosses):

* asyncio -> trio: `TrioBridge.run(afn, *args)` -> awaitable. Schedules ``afn`` in the bridge nursery with
  ``TrioToken.run_sync_soon(nursery.start_soon, ...)``; the result (or exception) comes back with
  ``loop.call_soon_threadsafe``. Cancelling the awaiting asyncio task cancels the trio task (through its own
  CancelScope), and vice versa a shutdown of the trio side fails the call with HostClosed.
* trio -> asyncio, fire and forget: `TrioBridge.call_soon_in_asyncio(fn, *args)` (``call_soon_threadsafe``).
* trio -> asyncio, awaited: `TrioBridge.call_asyncio(afn, *args)` from trio code
  (``run_coroutine_threadsafe``, completion signalled back with ``run_sync_soon``). Cancelling the trio
  side cancels the asyncio task.

Rejected alternatives: trio guest mode on the asyncio thread (measured 28 ms loop lag, libp2p's CPU work
would run on the daemon's loop); trio-asyncio (a third-party loop shim under all asyncio code); one trio
thread shared by all Hosts in the process (couples unrelated Hosts' lifetimes; threads are cheap).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager, suppress
from typing import Any, Generic, TypeVar

import outcome
import trio

from p2p._errors import HostClosed

__all__ = ["TrioBridge"]

log = logging.getLogger(__name__)

T = TypeVar("T")
S = TypeVar("S")

STOP_JOIN_TIMEOUT_S = 10.0  # libp2p's clean shutdown of 3 hosts took 5 ms; 10 s means something is stuck


class _Call:
    """Per-call state living in the trio thread (only touched there, so no locking)."""

    __slots__ = ("cancel_requested", "scope")

    def __init__(self) -> None:
        self.scope: trio.CancelScope | None = None
        self.cancel_requested = False

    def cancel(self) -> None:
        self.cancel_requested = True
        if self.scope is not None:
            self.scope.cancel()


class TrioBridge(Generic[S]):
    """Owns one trio thread running ``open_service()`` until `aclose()`.

    Create and use it from a running asyncio loop; `run()` and `aclose()` must be awaited on that loop.
    """

    def __init__(self, open_service: Callable[[], AbstractAsyncContextManager[S]], *, name: str) -> None:
        self._open_service = open_service
        self._name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._stop: trio.Event | None = None
        self._ready: asyncio.Future[S] | None = None
        self._done: asyncio.Future[None] | None = None
        self._open = False  # True between "ready" and the start of shutdown; read from both threads
        self.service: S | None = None

    # ------------------------------------------------------------------ lifecycle (asyncio side)

    async def start(self, *, timeout_s: float = 30.0) -> S:
        """Start the thread and wait until the service is up. Raises whatever the service raised."""
        self._loop = asyncio.get_running_loop()
        self._ready = self._loop.create_future()
        self._done = self._loop.create_future()
        self._thread = threading.Thread(target=self._thread_main, name=self._name, daemon=True)
        self._thread.start()
        try:
            async with asyncio.timeout(timeout_s):
                service = await asyncio.shield(self._ready)
        except BaseException:
            await self.aclose()
            raise
        return service

    async def aclose(self, *, timeout_s: float = STOP_JOIN_TIMEOUT_S) -> None:
        """Stop the service, cancel in-flight bridged calls, and wait for the thread to end. Idempotent."""
        self._open = False
        if self._thread is None or self._done is None:
            return
        token, stop = self._token, self._stop
        if token is not None and stop is not None:
            with suppress(trio.RunFinishedError):
                token.run_sync_soon(stop.set)
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.shield(self._done)
        except TimeoutError:
            log.error("trio thread did not stop in time thread=%s timeout_s=%s", self._name, timeout_s)
            return
        finally:
            if self._ready is not None and not self._ready.done():
                self._ready.cancel()
        self._thread.join(timeout=1.0)

    @property
    def is_open(self) -> bool:
        return self._open

    # ------------------------------------------------------------------ asyncio -> trio

    async def run(self, afn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``afn(*args)`` in the trio thread and return its result on the asyncio loop.

        Raises:
            HostClosed: the bridge is not open, or it shut down while the call was running.
            Any exception ``afn`` raised (it should already be a p2p error).
        """
        if not self._open or self._token is None or self._nursery is None or self._loop is None:
            raise HostClosed(f"{self._name} is not running")
        loop = self._loop
        fut: asyncio.Future[T] = loop.create_future()
        call = _Call()

        def deliver(result: outcome.Outcome[T]) -> None:  # asyncio thread
            if fut.done():
                return
            if isinstance(result, outcome.Error) and _only_cancelled(result.error):
                fut.set_exception(HostClosed(f"{self._name} shut down during the call"))
            elif isinstance(result, outcome.Error):
                fut.set_exception(result.error)
            else:
                fut.set_result(result.value)

        async def wrapper() -> None:  # trio thread
            if call.cancel_requested:
                return
            with trio.CancelScope() as scope:
                call.scope = scope
                result = await outcome.acapture(afn, *args)
            if not scope.cancelled_caught or not call.cancel_requested:
                self._post(deliver, result)

        nursery, token = self._nursery, self._token
        try:
            token.run_sync_soon(nursery.start_soon, wrapper)
        except trio.RunFinishedError:
            raise HostClosed(f"{self._name} is not running") from None
        try:
            return await fut
        except asyncio.CancelledError:
            with suppress(trio.RunFinishedError):
                token.run_sync_soon(call.cancel)
            raise

    def call_soon_in_trio(self, fn: Callable[..., object], *args: Any) -> None:
        """From the asyncio side: run the sync ``fn(*args)`` soon in the trio thread (no-op once stopped)."""
        token = self._token
        if token is None:
            return
        with suppress(trio.RunFinishedError):
            token.run_sync_soon(fn, *args)

    # ------------------------------------------------------------------ trio -> asyncio

    def call_soon_in_asyncio(self, fn: Callable[..., object], *args: Any) -> bool:
        """From the trio thread: schedule ``fn(*args)`` on the asyncio loop. False if the loop is gone."""
        return self._post(fn, *args)

    async def call_asyncio(self, afn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """From the trio thread: run ``afn(*args)`` as an asyncio task and await its result in trio.

        Raises:
            HostClosed: the asyncio loop is closed.
            Whatever ``afn`` raised.
        """
        assert self._loop is not None and self._token is not None  # internal: only called while running
        coro = afn(*args)
        try:
            cfut: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)  # type: ignore[arg-type]
        except RuntimeError as exc:  # loop closed
            coro.close()  # type: ignore[attr-defined]
            raise HostClosed("asyncio loop is closed") from exc
        done = trio.Event()
        token = self._token

        def on_done(_: concurrent.futures.Future[T]) -> None:  # asyncio thread
            with suppress(trio.RunFinishedError):
                token.run_sync_soon(done.set)

        cfut.add_done_callback(on_done)
        try:
            await done.wait()
        except trio.Cancelled:
            cfut.cancel()
            raise
        if cfut.cancelled():
            raise HostClosed("asyncio side cancelled the call")
        return cfut.result()

    # ------------------------------------------------------------------ thread internals

    def _post(self, fn: Callable[..., object], *args: Any) -> bool:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the asyncio loop is closed: nobody is listening any more
            return False
        return True

    def _thread_main(self) -> None:
        error: BaseException | None = None
        try:
            trio.run(self._root)
        except BaseException as exc:  # reported to the asyncio side, which owns the decision
            error = exc
        self._open = False

        def finish() -> None:
            assert self._ready is not None and self._done is not None
            if not self._ready.done():
                self._ready.set_exception(error or HostClosed(f"{self._name} stopped before it was ready"))
            elif error is not None:
                log.error("trio thread crashed thread=%s", self._name, exc_info=error)
            if not self._done.done():
                self._done.set_result(None)

        self._post(finish)

    async def _root(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with self._open_service() as service, trio.open_nursery() as nursery:
            self._nursery = nursery
            self.service = service
            self._open = True
            self._post(self._set_ready, service)
            await self._stop.wait()
            self._open = False
            nursery.cancel_scope.cancel()

    def _set_ready(self, service: S) -> None:
        assert self._ready is not None
        if not self._ready.done():
            self._ready.set_result(service)


def _only_cancelled(exc: BaseException) -> bool:
    """A trio cancellation, alone or as every leaf of the group a nursery wraps it in."""
    if isinstance(exc, BaseExceptionGroup):
        _, rest = exc.split(trio.Cancelled)
        return rest is None
    return isinstance(exc, trio.Cancelled)
