"""Idle culling, maximum lifetime and execution timeouts, enforced by the provisioner.

:func:`check_lifecycle` is a plain function over one kernel's observed activity, so the
timer (:class:`LifecyclePolicy`, a base of every limited provisioner) and the tests call
the same thing; the timer acts on the :class:`Verdict` it returns. Works for any client
(JupyterLab, nbclient, an agent backend driving jupyter_client) because the activity is
what clients send through the kernel's proxy (proxy.py), by the server's clock: nothing
the kernel writes or publishes can keep it alive or stretch an execution.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from dataclasses import dataclass

from traitlets import Float
from traitlets.config import LoggingConfigurable

from .kernel_dir import KernelDir
from .limits import Limits, Seconds
from .proxy import Traffic


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


class LifecyclePolicy(LoggingConfigurable):
    """The per-kernel timer: idle_timeout, max_lifetime and exec_timeout.

    A base of LimitedProvisionerMixin, which provides what it reads: ``limits``,
    ``registry``, ``kdir``, ``kernel_id``, ``traffic``, ``parent`` (the KernelManager),
    ``record_trip()`` and ``send_signal()``.
    """

    max_lifetime = Seconds(
        0,
        help="""Hard age cap in seconds ("8h"): the kernel is shut down this long after it
        started, busy or not. 0 (default) disables.""",
    ).tag(config=True)

    exec_timeout_grace = Seconds(
        5,
        help="""Seconds an execution may keep running after the exec_timeout interrupt
        before the kernel is restarted (its state is lost). Default 5.""",
    ).tag(config=True)

    lifecycle_interval = Float(
        1.0,
        help="Seconds between two checks of idle_timeout, max_lifetime and exec_timeout.",
    ).tag(config=True)

    limits: Limits
    traffic: Traffic | None = None
    kdir: KernelDir | None = None
    _lifecycle_task: asyncio.Task | None = None
    _interrupted: str | None = None
    _interrupted_at: float | None = None
    _activity_saved: float = 0.0
    _created: float = 0.0

    def _lifecycle_enforcement(self) -> dict[str, str]:
        lim = self.limits
        result = {}
        if lim.idle_timeout:
            result["idle_timeout"] = (
                f"enforced by the provisioner ({lim.idle_timeout:g}s without a client request "
                "seen by the proxy; never while an execution is pending)"
            )
        if lim.exec_timeout:
            result["exec_timeout"] = (
                f"enforced by the provisioner (SIGINT after {lim.exec_timeout:g}s, restart "
                f"after {self.exec_timeout_grace:g}s more)"
            )
        if self.max_lifetime:
            result["max_lifetime"] = f"enforced by the provisioner ({self.max_lifetime:g}s)"
        return result

    def _start_lifecycle(self) -> None:
        lim = self.limits
        if not (lim.idle_timeout or lim.exec_timeout or self.max_lifetime):
            return
        entry = self.registry.read(self.kernel_id) or {}
        self._created = entry.get("created", time.time())
        self._interrupted = self._interrupted_at = None
        self._lifecycle_task = asyncio.ensure_future(self._lifecycle_loop())

    async def _stop_lifecycle(self) -> None:
        task, self._lifecycle_task = self._lifecycle_task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _lifecycle_loop(self) -> None:
        while True:
            await asyncio.sleep(self.lifecycle_interval)
            monitor = self.traffic
            if monitor is None:
                return
            try:
                await self._persist_activity(monitor)
                verdict = check_lifecycle(
                    monitor,
                    created=self._created,
                    idle_timeout=self.limits.idle_timeout,
                    max_lifetime=self.max_lifetime,
                    exec_timeout=self.limits.exec_timeout,
                    exec_timeout_grace=self.exec_timeout_grace,
                    interrupted=self._interrupted,
                    interrupted_at=self._interrupted_at,
                )
                if verdict.action == "interrupt":
                    self.record_trip(verdict.kind, verdict.reason)
                    await asyncio.to_thread(
                        self._write_notice, monitor.executing or "", verdict.reason
                    )
                    self._interrupted = monitor.executing
                    self._interrupted_at = time.time()
                    await self.send_signal(signal.SIGINT)
                elif verdict.action in ("cull", "restart"):
                    # A restart follows an interrupt that was already counted as the trip.
                    self.record_trip(verdict.kind, verdict.reason, count=verdict.action == "cull")
                    # Shutting down ends this task (cleanup stops it): act from another.
                    self._lifecycle_task = None
                    asyncio.ensure_future(self._act(verdict.action))
                    return
            except Exception:  # one bad round must not end the policy for this kernel
                self.log.exception("Kernel %s: lifecycle check failed", self.kernel_id)

    def _write_notice(self, msg_id: str, text: str) -> None:
        """Why the execution ``msg_id`` is interrupted, for the kernel's hook to show.

        Written by the server into the kernel dir, which the kernel can read but not
        change; the hook only believes it for the execution it names.
        """
        if self.kdir is not None:
            self.kdir.write("notice", f"{msg_id}\n{text}", mode=0o644)

    async def _persist_activity(self, monitor: Traffic) -> None:
        """Save last_activity (at most every 5 s) so a restart continues the idle clock."""
        if monitor.last_activity > self._activity_saved and time.time() - self._activity_saved > 5:
            self._activity_saved = time.time()
            await asyncio.to_thread(
                self.registry.update, self.kernel_id, last_activity=monitor.last_activity
            )

    async def _act(self, action: str) -> None:
        """Shut down or restart through the owner of the kernel, so its listing stays true."""
        from jupyter_core.utils import ensure_async

        km = self.parent
        mkm = getattr(km, "parent", None)
        managed = mkm is not None and self.kernel_id in getattr(mkm, "_kernels", {})
        try:
            if action == "cull":
                if managed:
                    await ensure_async(mkm.shutdown_kernel(self.kernel_id))
                else:
                    await ensure_async(km.shutdown_kernel())
            else:
                self._announce_restart()
                if managed:
                    await ensure_async(mkm.restart_kernel(self.kernel_id, now=True))
                else:
                    await ensure_async(km.restart_kernel(now=True))
        except Exception:
            self.log.exception("Kernel %s: %s failed", self.kernel_id, action)

    def _announce_restart(self) -> None:
        """Tell the kernel's clients it is restarting, as the auto-restarter does.

        A restart requested by a client is announced by that client; one decided here
        (exec_timeout ignored) is not, so the server's websocket would never send
        "restarting" (nor the reason, see websocket.py) and a notebook would wait forever
        on the killed cell. Fires the restarter's "restart" callbacks, which is what
        jupyter_server subscribes to.
        """
        restarter = getattr(self.parent, "_restarter", None)
        fire = getattr(restarter, "_fire_callbacks", None)
        if fire is not None:
            fire("restart")
