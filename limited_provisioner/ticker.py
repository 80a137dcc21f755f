"""One shared clock for every kernel's periodic checks (lifecycle timer, watchdog).

A task per kernel that sleeps ``interval`` and checks costs a timer, a task step and a
coroutine resume per kernel per round, whether or not there is anything to do: with a
warm pool of 100 idle kernels that alone was several % of a core in the server. Here
every job with the same interval shares one task: each round it calls every job's
``tick()`` in turn — a plain function that decides quickly and hands anything slow
(a thread, an interrupt, a cull) to a task of its own, so one kernel's round never
waits for another's.

Jobs run on the package's loop (``_background.py``): :func:`every` must be called there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable

from . import _background

log = logging.getLogger(__name__)


class _Round:
    """Every job of one interval, called from one task until none is left."""

    def __init__(self, interval: float):
        self.interval = interval
        # Insertion-ordered, so jobs run in the order they were added.
        self.jobs: dict[object, Callable[[], None]] = {}
        self.task: asyncio.Task | None = None

    async def run(self) -> None:
        while self.jobs:
            await asyncio.sleep(self.interval)
            for key, tick in list(self.jobs.items()):
                if key not in self.jobs:
                    continue  # cancelled by an earlier job of this round
                try:
                    tick()
                except Exception:  # one kernel's failed check must not end the others'
                    log.exception("periodic check %r failed", tick)
        self.task = None
        if _rounds.get(self.interval) is self:
            del _rounds[self.interval]


_rounds: dict[float, _Round] = {}


def every(interval: float, tick: Callable[[], None]) -> Callable[[], None]:
    """Call ``tick()`` every ``interval`` seconds (the first time within one interval),
    with every other job of that interval; returns the function that stops it.

    ``tick`` must not block: it runs on the package's loop between everyone else's.
    """
    if not _background.is_current():
        msg = "periodic checks must be started on the package's loop"
        raise RuntimeError(msg)
    key = object()
    rnd = _rounds.get(interval)
    if rnd is None:
        rnd = _rounds[interval] = _Round(interval)
    rnd.jobs[key] = tick
    if rnd.task is None:
        rnd.task = asyncio.ensure_future(rnd.run())

    def cancel() -> None:
        rnd.jobs.pop(key, None)  # the round's task ends by itself once none is left

    return cancel


def jobs() -> int:
    """How many jobs are registered (tests, debugging)."""
    return sum(len(r.jobs) for r in _rounds.values())


class Ticked:
    """A kernel's periodic check on the shared clock (its lifecycle timer, its watchdog):
    the subscription, and the one slow step (a task) a round may have started."""

    _cancel: Callable[[], None] | None = None
    _step: asyncio.Future | None = None

    def _tick(self) -> None:
        raise NotImplementedError

    def _start_ticking(self, interval: float) -> None:
        if self._cancel is None:
            self._cancel = every(interval, self._tick)

    async def stop(self) -> None:
        """No more rounds; a step still running is cancelled (unless it is the caller)."""
        self._end()
        step, self._step = self._step, None
        if step is not None and step is not asyncio.current_task():
            step.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await step

    def _end(self) -> None:
        if self._cancel is not None:
            self._cancel()
            self._cancel = None


def _forget_after_fork() -> None:
    # The parent's tasks are on the parent's loop, which a child never runs.
    _rounds.clear()


os.register_at_fork(after_in_child=_forget_after_fork)
