"""The loop a kernel's manager lives on, so the package's loop can hand it a cull.

The lifecycle timer runs on the package's loop (``_background.py``). When it culls or
restarts a kernel, an async manager — jupyter_server's, or an ``AsyncKernelManager`` in
a script's running loop — must do it itself, on its own loop, so its books stay true:
the kernel leaves the server's list and clients get the usual dead-kernel behaviour.
A blocking manager has no loop running between its calls (``run_sync`` runs each call
on a loop that is idle afterwards, or on a runner thread of its own): then
:meth:`ManagerLoop.run` says so and the provisioner acts alone.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Coroutine
from typing import Any

from . import _background

# How long a cull or restart handed to the manager may take before the provisioner
# stops waiting and acts alone (a server loop that stopped would never answer).
MANAGER_TIMEOUT = 120.0


def is_async_manager(km: Any) -> bool:
    """An ``AsyncKernelManager`` (its methods are coroutines), not a blocking one."""
    return km is not None and inspect.iscoroutinefunction(getattr(km, "shutdown_kernel", None))


class ManagerLoop:
    """Remembers the running loop of an async manager at each start or adoption."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None

    def remember(self, km: Any) -> None:
        """Called from the manager's side of a start (``post_launch``) or adoption."""
        if _background.is_current():
            return  # a restart the provisioner ran itself: the manager did not move
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        self._loop = running if is_async_manager(km) else None

    @property
    def reachable(self) -> bool:
        loop = self._loop
        return loop is not None and not loop.is_closed() and loop.is_running()

    def call_soon(self, fn: Callable[[], Any]) -> bool:
        """Call ``fn()`` on the manager's loop, without waiting; False if there is none."""
        loop = self._loop
        if loop is None or not self.reachable:
            return False
        try:
            loop.call_soon_threadsafe(fn)
        except RuntimeError:  # closed since we looked
            return False
        return True

    async def run(self, make: Callable[[], Coroutine[Any, Any, Any]]) -> bool:
        """Run ``make()`` on the manager's loop and wait for it (from the package's loop).

        False, without running it, when there is no such loop any more; its errors
        propagate.
        """
        loop = self._loop
        if loop is None or not self.reachable:
            return False
        coro = make()
        try:
            future = asyncio.run_coroutine_threadsafe(coro, loop)
        except RuntimeError:  # closed since we looked
            coro.close()
            return False
        # Shielded: giving up waiting must not cancel a shutdown half-way on the server.
        await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), MANAGER_TIMEOUT)
        return True
