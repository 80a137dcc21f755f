"""Stopping the background tasks of a kernel (timers, watchdogs) the same way everywhere."""

from __future__ import annotations

import asyncio
import contextlib


async def cancel_and_wait(task: asyncio.Task | None) -> None:
    """Cancel ``task`` and wait until it has ended. A task stopping itself (a timer
    that shuts its kernel down) is left to finish what it is doing."""
    if task is not None and task is not asyncio.current_task():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
