"""Re-adopting running kernels after the process that started them is gone.

The registry entry of a kernel holds everything needed to manage it again: pid and
start time (or container id), connection file, kernel dir, uid, cgroups, limits, owner
and its last activity. :func:`adopt` turns an entry back into a working
``KernelManager`` whose provisioner watches, culls and times out the kernel as before;
``LimitedMappingKernelManager`` calls it for every kernel of its server at start-up, and
agent backends call it directly (with :func:`list_kernels`) to rebuild their
``session -> kernel`` map instead of starting duplicates.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jupyter_client.manager import AsyncKernelManager

from . import _jupyter_internals as internals
from . import held_kernels, metrics
from ._background import bridged
from .enforcement import EnforcementPlan
from .errors import AdoptionError
from .kernel_dir import KernelDir
from .reaper import Orphan, provisioner_class, reap, remove_kernel
from .registry import (
    Registry,
    is_alive,
    list_kernels,
    process_identity,
    sandbox_of,
    server_alive,
)
from .workfs import WorkFs

__all__ = ["TRAIT_KEYS", "adopt", "list_kernels", "reap_orphans"]

# The limits a kernel runs with, restored from its registry entry (not its kernelspec,
# which may have been edited since it started).
TRAIT_KEYS = (
    "mem_limit", "cpu_limit", "pids_limit", "nofile_limit", "disk_limit", "files_limit",
    "network", "exec_timeout", "idle_timeout",
)


def reap_orphans(
    state_dir: str | os.PathLike | None = None,
    *,
    server_id: str | None = None,
    all_servers: bool = False,
    orphan_grace: float | None = None,
) -> list[Orphan]:
    """Remove the kernels nobody manages any more (``server_id``'s, or every server's).

    An orphan's server/agent process is gone and the kernel is dead, was still starting,
    or is idle/old past its limits (:func:`~limited_provisioner.reaper.find_orphans`).
    Kernels of live processes are never touched. An agent backend calls this at start,
    before adopting, and periodically; jupyter_server does it for you. Blocking: run it
    in a thread from async code. ``orphan_grace``: LimitedHost.orphan_grace by default.
    """
    if orphan_grace is None:
        from .host import LimitedHost

        orphan_grace = LimitedHost.instance().orphan_grace
    return reap(
        Registry(state_dir), server_id=server_id, all_servers=all_servers,
        orphan_grace=orphan_grace,
    )


async def adopt(
    kernel_id: str,
    *,
    state_dir: str | os.PathLike | None = None,
    parent: Any = None,
    factory: Callable[..., Any] | None = None,
    entry: dict[str, Any] | None = None,
    **provisioner_config: Any,
) -> AsyncKernelManager:
    """A started ``AsyncKernelManager`` for the running limited kernel ``kernel_id``.

    ``factory(connection_file=..., kernel_name=...)`` builds the manager (default
    ``AsyncKernelManager(parent=parent, ...)``); ``entry`` is its registry entry if the
    caller has just read it. Raises :class:`AdoptionError` (``reason``) if the kernel is
    unknown, dead (its leftovers are removed), managed by another live process, or
    unreachable (it is then shut down rather than left running unmanaged).
    """
    registry = Registry(state_dir)
    if entry is None:
        entry = await asyncio.to_thread(registry.read, kernel_id)
    if entry is None:
        msg = f"no limited kernel {kernel_id} in the registry at {registry.state_dir}"
        raise AdoptionError(msg, reason="unknown")
    if held_kernels.holding(registry.state_dir, kernel_id):
        msg = f"kernel {kernel_id} is being started or managed by this process already"
        raise AdoptionError(msg, reason="managed")
    if server_alive(entry) and entry.get("server_pid") != os.getpid():
        msg = (
            f"kernel {kernel_id} is managed by live process {entry.get('server_pid')}; "
            f"refusing to adopt it too (two managers would fight over it)"
        )
        raise AdoptionError(msg, reason="managed")
    if not is_alive(entry) or entry.get("state") != "running":
        await asyncio.to_thread(remove_kernel, registry, entry)
        msg = f"kernel {kernel_id} is not running any more; its leftovers were removed"
        raise AdoptionError(msg, reason="dead")
    connection_file = entry.get("connection_file")
    if not connection_file or not os.path.exists(connection_file):
        await asyncio.to_thread(remove_kernel, registry, entry)
        msg = (
            f"kernel {kernel_id}: connection file {connection_file!r} is gone, so nobody can "
            f"talk to it; it was shut down instead of being left running unmanaged"
        )
        raise AdoptionError(msg, reason="unreachable")

    kernel_name = entry.get("kernel_name") or ""
    if factory is None:
        km = AsyncKernelManager(
            parent=parent, connection_file=connection_file, kernel_name=kernel_name
        )
    else:
        km = factory(connection_file=connection_file, kernel_name=kernel_name)
    km.load_connection_file(connection_file)
    km.kernel_id = kernel_id
    try:
        spec = km.kernel_spec
    except Exception:  # kernelspec removed since: the registry entry has what we need
        spec = None
    # The kernelspec's settings (image, grace, output_limit, ...), then what the kernel
    # actually runs with from the registry (limits may have been edited in the spec since).
    config = dict(
        ((spec.metadata or {}).get("kernel_provisioner") or {}).get("config") or {}
        if spec is not None
        else {}
    )
    config.update({k: v for k, v in (entry.get("limits") or {}).items() if k in TRAIT_KEYS})
    config.update(
        owner=entry.get("owner", ""),
        max_lifetime=entry.get("max_lifetime") or 0,
        labels=dict(entry.get("labels") or {}),
        state_dir=str(registry.state_dir),
        **provisioner_config,
    )
    prov = provisioner_class(entry.get("backend", "process"))(
        kernel_id=kernel_id, kernel_spec=spec, parent=km, **config
    )
    km.provisioner = prov
    prov.manager_loop.remember(km)
    held_kernels.hold(prov)
    try:
        # With the proxy and timers it starts: on the package's loop (_background.py).
        await bridged(_resume(prov, entry))
    except Exception:
        held_kernels.let_go(prov)
        await asyncio.to_thread(remove_kernel, registry, entry)
        raise
    internals.mark_started(km, entry.get("launch_cwd"))
    km.start_restarter()
    return km


async def _resume(prov: Any, entry: dict[str, Any]) -> None:
    """Make ``prov`` manage the running kernel its registry entry describes: restore the
    backend's handle on it, check its sockets again, re-attach the watchdog, the timers
    (continuing the saved idle clock) and the reaper, and take the entry over."""
    kernel_dir = entry.get("kernel_dir")
    prov.kernel_dir = Path(kernel_dir) if kernel_dir else None
    prov.work_dir = entry.get("work_dir")
    prov.uid = entry.get("uid")
    prov.gid = entry.get("gid", prov.uid)
    prov.created = entry.get("created") or time.time()
    prov.plan = EnforcementPlan.from_report(
        entry.get("enforcement") or {}, entry.get("mechanisms") or {}
    )
    if sandbox_of(entry) != prov.kernel_id:
        prov._sandbox_id = sandbox_of(entry)  # a kernel claimed from the warm pool
    prov.kdir = KernelDir(prov.registry.kernels_dir, prov.sandbox_id, prov.uid, prov.gid)
    # Its own filesystem stays mounted across the server's death; the watchdog must
    # know it is there (it then leaves the dirs on it alone).
    prov.workfs = WorkFs.from_record(entry.get("workfs"))
    prov._connect_clients(last_activity=entry.get("last_activity"))
    if prov.parent is not None:
        prov.connection_info = prov.parent.get_connection_info()
    await prov._restore(entry)
    await prov._open_kernel_door()
    # Under the registry lock, as the reaper stamps orphans: neither undoes the other.
    await asyncio.to_thread(
        prov.registry.update_if, prov.kernel_id, lambda entry: True,
        server_id=prov.server_id, server_pid=os.getpid(),
        server_pid_create_time=process_identity(os.getpid()), adopted=time.time(),
        orphaned_at=None,
    )
    prov._start_watching()
    metrics.ADOPTIONS.labels(backend=prov.backend).inc()
