"""The package's own event loop: one daemon thread per process, started on first use.

A limited kernel keeps things running between its manager's calls — the proxy every
client message goes through, the lifecycle timer, the watchdog, the kernel's log drain,
the reaper. On the caller's loop they would run only while the caller is inside a call:
a blocking ``KernelManager`` runs each call through ``run_sync`` on a loop that is idle
(or another loop) in between, so timers never fired and nothing was forwarded while a
script slept, and a shutdown from another loop failed on tasks "attached to a different
loop". So every provisioner hook runs here (:func:`on_package_loop`), whatever loop or
thread called it; the caller's loop only awaits a bridge (``asyncio.wrap_future``).

After ``os.fork()`` the child has no such thread: the state is forgotten at the fork
(``os.register_at_fork``) and a child that starts kernels gets a thread of its own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def loop() -> asyncio.AbstractEventLoop:
    """The package's loop, started (with its daemon thread) on first use."""
    global _loop
    with _lock:
        if _loop is None or _loop.is_closed():
            new = asyncio.new_event_loop()
            started = threading.Event()
            thread = threading.Thread(
                target=_serve, args=(new, started), name="limited-provisioner", daemon=True
            )
            thread.start()
            started.wait()
            _loop = new
        return _loop


def _serve(new: asyncio.AbstractEventLoop, started: threading.Event) -> None:
    asyncio.set_event_loop(new)
    new.call_soon(started.set)
    # Daemon thread: runs until the process exits (kernels are independent processes
    # the reaper finds if a script exits without shutting them down).
    new.run_forever()


def is_current() -> bool:
    """True when the calling code runs on the package's loop."""
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        return False
    return running is _loop


def run(coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
    """Schedule ``coro`` on the package's loop from any thread."""
    return asyncio.run_coroutine_threadsafe(coro, loop())


def call_soon(fn: Callable[..., Any], *args: Any) -> None:
    """Call ``fn(*args)`` on the package's loop thread, from any thread."""
    loop().call_soon_threadsafe(fn, *args)


async def bridged(coro: Coroutine[Any, Any, T]) -> T:
    """Await ``coro`` run on the package's loop, from whatever loop the caller is on.

    Cancelling the caller cancels ``coro`` there too (``wrap_future`` passes it on).
    """
    if is_current():
        return await coro
    return await asyncio.wrap_future(run(coro))


def on_package_loop(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Decorate a provisioner hook so its body always runs on the package's loop.

    Only the outermost call hops: ``super()`` calls made from there run directly.
    """

    @functools.wraps(method)
    async def hop(self: Any, *args: Any, **kwargs: Any) -> T:
        return await bridged(method(self, *args, **kwargs))

    hop.on_package_loop = True  # type: ignore[attr-defined]  # checked by a unit test
    return hop


def _forget_after_fork() -> None:
    # The child has the parent's loop object but not its thread: never touch the loop
    # (its selector and self-pipe are the parent's), start a new one on demand.
    global _lock, _loop
    _lock = threading.Lock()
    _loop = None


os.register_at_fork(after_in_child=_forget_after_fork)
