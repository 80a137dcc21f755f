"""``GET /api/limited-provisioner/kernels/{kernel_id}``: a kernel's limits, what it uses
of them now, its timers and why it last died -- what the JupyterLab status-bar item
(``labextension/``) shows and polls every few seconds.

The answer for a stock kernel is ``{"kernel_id": ..., "limited": false}`` (200: the
kernel exists, it just has no limits); an unknown id is 404. :func:`kernel_status` builds
the JSON from plain values, so it is tested without kernels; the handler gathers them:
attributes of the provisioner (cheap, on the loop) and the usage (cgroup files, psutil,
a short CPU sample: usage.py, in a thread).

``POST /api/sessions`` keeps the status of a refused start (429/403/503) instead of
jupyter_server's 500 (:class:`LimitedSessionRootHandler`).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from jupyter_server.services.sessions.handlers import SessionRootHandler
from jupyter_server.utils import url_path_join
from tornado import web

from ..enforcement import NONE
from ..limits import Limits
from ..provisioner import LimitedProvisioner
from ..registry import is_alive
from ..usage import own_filesystem_usage, sample_usage

# A kernel id, as jupyter_server's own kernel routes match it.
KERNEL_ID = r"(?P<kernel_id>\w+-\w+-\w+-\w+-\w+)"
# The CPU figure is the use over this many seconds, sampled per request (in a thread).
CPU_SAMPLE_SECONDS = 0.2


def kernel_status(
    kernel_id: str,
    *,
    backend: str,
    limits: Limits,
    usage: dict[str, Any] | None,
    idle_for: float | None,
    executing_for: float | None,
    created: float,
    max_lifetime: float = 0.0,
    enforcement: dict[str, tuple[str, str]] | None = None,
    exit_reason: dict[str, Any] | None = None,
    last_exit: dict[str, Any] | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """The endpoint's JSON for one limited kernel.

    ``usage`` is a sampled registry row (``mem_used``, ``cpu_cores``, ``pids``, and
    ``disk_used``/``files_used`` where measured), None while the kernel has no live
    process. ``idle_for`` / ``executing_for`` are seconds by the proxy's clock
    (traffic.py; None: no proxy). ``enforcement`` maps a limit to ``(mechanism, text)``.
    ``exit_reason`` is why the current process died (it has not been replaced yet),
    ``last_exit`` why the previous one did (provisioner.last_exit). Times are seconds;
    a timer that does not apply is null.
    """
    now = time.time() if now is None else now
    lim = limits
    timers: dict[str, Any] = {
        "idle_timeout": lim.idle_timeout or None,
        "idle_cull_in": None,
        "exec_timeout": lim.exec_timeout or None,
        "executing_for": None,
        "exec_timeout_in": None,
        "max_lifetime": max_lifetime or None,
        "lifetime_left": None,
    }
    executing = executing_for is not None and executing_for > 0
    if lim.idle_timeout and idle_for is not None and not executing:
        # The idle clock stands still while a cell runs (lifecycle.check_lifecycle).
        timers["idle_cull_in"] = round(max(0.0, lim.idle_timeout - idle_for), 1)
    if executing:
        timers["executing_for"] = round(executing_for, 1)
        if lim.exec_timeout:
            timers["exec_timeout_in"] = round(max(0.0, lim.exec_timeout - executing_for), 1)
    if max_lifetime:
        timers["lifetime_left"] = round(max(0.0, max_lifetime - (now - created)), 1)
    measured = None
    if usage is not None:
        cores = usage.get("cpu_cores")
        measured = {
            "memory": usage.get("mem_used"),
            "cpu_cores": cores,
            # Of one core, as top shows it; of the limit where there is one.
            "cpu_percent": round(100 * cores, 1) if cores is not None else None,
            "cpu_percent_of_limit": (
                round(100 * cores / lim.cpu_limit, 1)
                if cores is not None and lim.cpu_limit else None
            ),
            "pids": len(usage.get("pids") or []),
            "disk": usage.get("disk_used"),
            "files": usage.get("files_used"),
        }
    enforcement = enforcement or {}
    last = None
    if exit_reason:
        last = {**exit_reason, "restarted": None}
    elif last_exit:
        last = dict(last_exit)
    return {
        "kernel_id": kernel_id,
        "limited": True,
        "backend": backend,
        "alive": usage is not None,
        "limits": {
            "mem_limit": lim.mem_limit, "cpu_limit": lim.cpu_limit,
            "pids_limit": lim.pids_limit, "nofile_limit": lim.nofile_limit,
            "disk_limit": lim.disk_limit, "files_limit": lim.files_limit,
            "network": lim.network,
        },
        "usage": measured,
        "timers": timers,
        "age": round(max(0.0, now - created), 1),
        "enforcement": {name: text for name, (_, text) in enforcement.items()},
        # Limits the host could not put in force for this kernel (see "enforcement").
        "not_enforced": sorted(name for name, (how, _) in enforcement.items() if how == NONE),
        "last_exit": last,
        "last_exit_reason": last["reason"] if last else None,
    }


def _measure(entry: dict[str, Any] | None, kernel_dir: str | None, own_fs: bool,
             walked: tuple[int, int] | None) -> dict[str, Any] | None:
    """Sample one kernel's usage (blocking: run in a thread); None if it has no live
    process (between a death and its restart, or gone)."""
    if (entry is None or entry.get("state") != "running" or not entry.get("pid")
            or not is_alive(entry)):
        return None  # no process of it on this host (a swarm kernel's is on a node)
    row = {**entry, "alive": True}
    sample_usage([row], interval=CPU_SAMPLE_SECONDS)
    disk = own_filesystem_usage(kernel_dir) if own_fs and kernel_dir else walked
    if disk is not None:
        row["disk_used"], row["files_used"] = disk
    return row


async def limited_kernel_status(provisioner: LimitedProvisioner) -> dict[str, Any]:
    """:func:`kernel_status` of a running limited kernel; never blocks the loop."""
    prov = provisioner
    traffic = prov.connection.traffic if prov.connection is not None else None
    own_fs = prov.workfs is not None and prov.workfs.hard
    # The watchdog walks the work dir anyway (when it is not its own filesystem); its last
    # figures are at most a few seconds old, and a second walk per poll would double it.
    walked = prov.watchdog.last_disk if prov.watchdog is not None else None
    entry = await asyncio.to_thread(prov.registry.read, prov.kernel_id)
    usage = await asyncio.to_thread(
        _measure, entry, str(prov.kernel_dir) if prov.kernel_dir else None, own_fs, walked
    )
    exit_reason = (
        {"kind": prov.exit_kind or "exit", "reason": prov.exit_reason}
        if prov.exit_reason else None
    )
    return kernel_status(
        prov.kernel_id,
        backend=prov.backend,
        limits=prov.limits,
        usage=usage,
        idle_for=traffic.idle_for() if traffic is not None else None,
        executing_for=traffic.execution_running_for() if traffic is not None else None,
        created=prov.created or (entry or {}).get("created") or time.time(),
        max_lifetime=prov.max_lifetime,
        # A copy first: a restart on the package's loop may be updating the plan.
        enforcement={n: (m.mechanism, m.text) for n, m in dict(prov.plan.measures).items()},
        exit_reason=exit_reason,
        last_exit=prov.last_exit,
    )


class LimitedKernelHandler(APIHandler):
    """``GET /api/limited-provisioner/kernels/{kernel_id}``; authorized as jupyter_server's
    own kernel handlers are (the "kernels" resource, read)."""

    auth_resource = "kernels"

    @web.authenticated
    @authorized
    async def get(self, kernel_id: str) -> None:
        km = self.kernel_manager
        if kernel_id not in km:
            raise web.HTTPError(404, f"Kernel does not exist: {kernel_id}")
        provisioner = getattr(km.get_kernel(kernel_id), "provisioner", None)
        if isinstance(provisioner, LimitedProvisioner):
            status = await limited_kernel_status(provisioner)
        else:
            status = {"kernel_id": kernel_id, "limited": False}
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps(status))


class LimitedSessionRootHandler(SessionRootHandler):
    """``POST /api/sessions`` (how JupyterLab opens a notebook) answering a refused start
    as ``POST /api/kernels`` does: 429/403/503 with the reason. jupyter_server's handler
    turns any error of a session's kernel start into a 500 (``HTTPError(500, str(e))
    from e``); the status our manager chose is that error's cause."""

    async def post(self) -> None:
        try:
            await super().post()
        except web.HTTPError as e:
            cause = e.__cause__
            if (e.status_code == 500 and isinstance(cause, web.HTTPError)
                    and cause.status_code != 500):
                raise cause from None
            raise


def handlers(base_url: str) -> list[tuple[str, type]]:
    # Ahead of jupyter_server's own routes (tornado tries an extension's first).
    return [(url_path_join(base_url, rf"/api/limited-provisioner/kernels/{KERNEL_ID}"),
             LimitedKernelHandler),
            (url_path_join(base_url, r"/api/sessions"), LimitedSessionRootHandler)]
