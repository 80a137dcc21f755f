"""Per-kernel async steps that must happen once: a timer's or watchdog's background task
(started once, stopped once) and the final release of a kernel (whoever asks first)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from . import _background


class BackgroundTask:
    """At most one running coroutine on the package's loop; :meth:`stop` cancels it and
    waits until it ended.

    A task that stops its own kernel calls :meth:`release` first: the shutdown it starts
    stops this holder, which must not cancel the task doing the shutting down.
    """

    def __init__(self) -> None:
        self._task: asyncio.Task | None = None

    @property
    def running(self) -> bool:
        return self._task is not None

    def start(self, run: Callable[[], Awaitable[Any]]) -> None:
        if not _background.is_current():
            # A task on the caller's loop would stop running between its calls.
            msg = "a kernel's background task must be started on the package's loop"
            raise RuntimeError(msg)
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


class Once:
    """An async step run once, by whichever caller comes first — a timer on the
    package's loop or the manager's shutdown; later callers (any thread, any loop)
    wait for that run and get its outcome (after a failure, the next caller tries
    again). :meth:`reset` arms it again for a new start.
    """

    def __init__(self) -> None:
        # A threading lock, not an asyncio one: the callers may be on different loops.
        self._lock = threading.Lock()
        self._done: concurrent.futures.Future | None = None

    @property
    def done(self) -> bool:
        return self._done is not None

    def reset(self) -> None:
        with self._lock:
            self._done = None

    async def run(self, step: Callable[[], Awaitable[Any]]) -> None:
        with self._lock:
            done, first = self._done, self._done is None
            if first:
                done = self._done = concurrent.futures.Future()
        assert done is not None
        if not first:
            await asyncio.wrap_future(done)
            return
        try:
            await step()
        except BaseException as e:
            with self._lock:
                self._done = None  # failed half-way: the next caller tries again
            done.set_exception(e)
            raise
        done.set_result(None)
