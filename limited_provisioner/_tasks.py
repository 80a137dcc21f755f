"""The background task of a kernel's timer or watchdog: started once, stopped once."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any


class BackgroundTask:
    """At most one running coroutine; :meth:`stop` cancels it and waits until it ended.

    A task that stops its own kernel calls :meth:`release` first: the shutdown it starts
    stops this holder, which must not cancel the task doing the shutting down.
    """

    def __init__(self) -> None:
        self._task: asyncio.Task | None = None

    @property
    def running(self) -> bool:
        return self._task is not None

    def start(self, run: Callable[[], Awaitable[Any]]) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(run())

    def release(self) -> None:
        self._task = None

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
