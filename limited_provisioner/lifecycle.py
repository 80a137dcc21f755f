"""Idle culling, maximum lifetime and execution timeouts, enforced by the provisioner.

:func:`check_lifecycle` is a plain function over one kernel's observed activity, so the
timer (:class:`LifecycleTimer`, which each limited provisioner holds) and the tests call
the same thing; the timer acts on the :class:`Verdict` it returns. Works for any client
(JupyterLab, nbclient, an agent backend driving jupyter_client) because the activity is
what clients send through the kernel's proxy (proxy.py), by the server's clock: nothing
the kernel writes or publishes can keep it alive or stretch an execution.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from . import ticker
from .limits import Limits
from .traffic import Traffic


@dataclass
class Verdict:
    """What to do with a kernel now: nothing, cull it, or interrupt/restart it."""

    action: str  # "none" | "cull" | "interrupt" | "restart"
    kind: str = ""
    reason: str = ""


def check_lifecycle(
    monitor: Traffic,
    *,
    created: float,
    idle_timeout: float,
    max_lifetime: float,
    exec_timeout: float,
    exec_timeout_grace: float,
    interrupted: str | None,
    interrupted_at: float | None,
    now: float | None = None,
) -> Verdict:
    """Decide the next action for one kernel.

    ``interrupted`` is the msg_id of an execution already interrupted for exec_timeout
    (at ``interrupted_at``); if it is still running after the grace period, the answer
    is "restart".
    """
    now = now or time.time()
    if max_lifetime and now - created > max_lifetime:
        return Verdict(
            "cull", "max_lifetime", f"max_lifetime {max_lifetime:g}s reached; kernel shut down"
        )
    running = monitor.execution_running_for(now)
    if exec_timeout and monitor.executing is not None:
        if interrupted == monitor.executing and interrupted_at is not None:
            if now - interrupted_at > exec_timeout_grace:
                return Verdict(
                    "restart",
                    "exec_timeout",
                    f"execution exceeded exec_timeout={exec_timeout:g}s and ignored the "
                    f"interrupt for {exec_timeout_grace:g}s; kernel restarted",
                )
        elif running > exec_timeout:
            return Verdict(
                "interrupt",
                "exec_timeout",
                f"execution exceeded exec_timeout={exec_timeout:g}s and was interrupted "
                f"by limited-provisioner",
            )
    if idle_timeout and monitor.idle_for(now) > idle_timeout:
        return Verdict(
            "cull",
            "idle_timeout",
            f"idle for more than idle_timeout={idle_timeout:g}s; kernel shut down",
        )
    return Verdict("none")


def with_limits_hit(reason: str, trips: list[dict], since: float | None) -> str:
    """``reason`` (an execution restarted for ignoring its interrupt), followed by the
    other limits the kernel hit since that execution began, latest per kind. Such an
    execution usually hung at another limit (a fork bomb at pids_limit, a tree
    OOM-killed piece by piece): the user learns the cause, not only the timeout."""
    if since is None:
        return reason
    latest: dict[str, str] = {}
    for trip in trips:
        if trip["time"] >= since and trip["kind"] != "exec_timeout":
            latest[trip["kind"]] = trip["reason"]
    if not latest:
        return reason
    return f"{reason}; while it ran: {'; '.join(latest.values())}"


class LifecycleTimer(ticker.Ticked):
    """The per-kernel timer of idle_timeout, max_lifetime and exec_timeout.

    Every ``interval`` seconds it saves the activity clock (``persist``, so a restarted
    server continues it) and asks :func:`check_lifecycle`; it acts through the
    provisioner's callbacks: ``interrupt(verdict, msg_id)`` for an execution past
    exec_timeout, ``stop(verdict)`` to cull or restart the kernel (after which it ends).
    It runs on the package's loop (``_background.py``), so it fires while a blocking
    manager's caller sleeps; every kernel's timer of the same interval shares one clock
    (ticker.py): a round where nothing is due costs one arithmetic check, no task.
    """

    def __init__(
        self,
        *,
        kernel_id: str,
        limits: Limits,
        traffic: Traffic,
        created: float,
        max_lifetime: float,
        exec_timeout_grace: float,
        interval: float,
        interrupt: Callable[[Verdict, str], Awaitable[None]],
        stop: Callable[[Verdict], Awaitable[None]],
        persist: Callable[[float], Awaitable[None]],
        log: logging.Logger | logging.LoggerAdapter,
    ):
        self.kernel_id = kernel_id
        self.limits = limits
        self.traffic = traffic
        self.created = created
        self.max_lifetime = max_lifetime
        self.exec_timeout_grace = exec_timeout_grace
        self.interval = interval
        self._interrupt, self._stop, self._persist = interrupt, stop, persist
        self.log = log
        self.interrupted: str | None = None
        self.interrupted_at: float | None = None
        # The activity clock as the registry has it: what the timer started from (a
        # restarted server's from the registry, a new kernel's its start, which the
        # reaper reads from "created"), so adopting 100 kernels writes no 100 entries.
        self._saved = traffic.last_activity
        # _step (ticker.Ticked): the round that had something to await (save,
        # interrupt), while it runs.
        self._stopping: asyncio.Future | None = None  # held: the loop keeps only weak refs

    @property
    def needed(self) -> bool:
        lim = self.limits
        return bool(lim.idle_timeout or lim.exec_timeout or self.max_lifetime)

    def start(self) -> None:
        if self.needed:
            self._start_ticking(self.interval)

    def _tick(self) -> None:
        """One round on the shared clock: a task only when there is something to do."""
        if self._step is not None and not self._step.done():
            return  # the previous round is still saving or interrupting
        if not (self._save_due() or self._verdict().action != "none"):
            return
        self._step = asyncio.ensure_future(self._round())

    async def _round(self) -> None:
        try:
            if await self.check_once():
                self._end()
        except Exception:  # one bad round must not end the timer of this kernel
            self.log.exception("Kernel %s: lifecycle check failed", self.kernel_id)

    def _verdict(self, now: float | None = None) -> Verdict:
        return check_lifecycle(
            self.traffic,
            created=self.created,
            idle_timeout=self.limits.idle_timeout,
            max_lifetime=self.max_lifetime,
            exec_timeout=self.limits.exec_timeout,
            exec_timeout_grace=self.exec_timeout_grace,
            interrupted=self.interrupted,
            interrupted_at=self.interrupted_at,
            now=now,
        )

    async def check_once(self, now: float | None = None) -> bool:
        """One round; True once the kernel is being culled or restarted."""
        traffic = self.traffic
        await self._save_activity(traffic)
        verdict = self._verdict(now)
        if verdict.action == "interrupt":
            self.interrupted = traffic.executing
            self.interrupted_at = time.time()
            await self._interrupt(verdict, traffic.executing or "")
        elif verdict.action in ("cull", "restart"):
            # Shutting down stops this timer: act from a task of its own.
            self._end()
            self._stopping = asyncio.ensure_future(self._stop(verdict))
            return True
        return False

    def _save_due(self) -> bool:
        return self.traffic.last_activity > self._saved and time.time() - self._saved > 5

    async def _save_activity(self, traffic: Traffic) -> None:
        """Save last_activity (at most every 5 s) so a restart continues the idle clock."""
        if self._save_due():
            self._saved = time.time()
            await self._persist(traffic.last_activity)
