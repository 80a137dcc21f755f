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
import signal
import time
from collections.abc import Callable
from typing import Any

import psutil
from jupyter_client.manager import AsyncKernelManager

from .errors import AdoptionError
from .reaper import Orphan, reap, remove_kernel, server_alive
from .registry import Registry, is_alive

TRAIT_KEYS = (
    "mem_limit", "cpu_limit", "pids_limit", "nofile_limit", "disk_limit", "files_limit",
    "network", "exec_timeout", "idle_timeout",
)


class AdoptedProcess:
    """A ``Popen`` stand-in for a kernel process started by a previous server.

    It is not our child, so there is no exit status to collect: a vanished process (or
    a reused pid — the start time is compared) reads as exited with -1.
    """

    stdin = stdout = stderr = None

    def __init__(self, pid: int, create_time: float | None):
        self.pid = pid
        self.create_time = create_time
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is not None:
            return self.returncode
        try:
            proc = psutil.Process(self.pid)
            same = self.create_time is None or abs(proc.create_time() - self.create_time) < 1
            if same and proc.status() != psutil.STATUS_ZOMBIE:
                return None
        except psutil.NoSuchProcess:
            pass
        self.returncode = -1
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"pid {self.pid} still running")
            time.sleep(0.05)
        return self.returncode  # type: ignore[return-value]

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


def list_kernels(
    state_dir: str | os.PathLike | None = None,
    *,
    server_id: str | None = None,
    owner: str | None = None,
    labels: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Registry entries of the live limited kernels on this host (optionally filtered;
    ``labels`` matches kernels carrying all of the given label values)."""
    result = []
    for entry in Registry(state_dir).live_entries():
        if entry.get("state") != "running":
            continue
        if server_id is not None and entry.get("server_id") != server_id:
            continue
        if owner is not None and entry.get("owner") != owner:
            continue
        if labels and any((entry.get("labels") or {}).get(k) != v for k, v in labels.items()):
            continue
        result.append(entry)
    return result


def reap_orphans(
    state_dir: str | os.PathLike | None = None,
    *,
    server_id: str | None = None,
    all_servers: bool = False,
) -> list[Orphan]:
    """Remove the kernels nobody manages any more (``server_id``'s, or every server's).

    An orphan's server/agent process is gone and the kernel is dead, was still starting,
    or is idle/old past its limits (:func:`~limited_provisioner.reaper.find_orphans`).
    Kernels of live processes are never touched. An agent backend calls this at start,
    before adopting, and periodically; jupyter_server does it for you. Blocking: run it
    in a thread from async code.
    """
    return reap(Registry(state_dir), server_id=server_id, all_servers=all_servers)


def _provisioner_class(backend: str) -> type:
    if backend == "docker":
        from .docker import LimitedDockerProvisioner

        return LimitedDockerProvisioner
    from .process import LimitedProcessProvisioner

    return LimitedProcessProvisioner


async def adopt(
    kernel_id: str,
    *,
    state_dir: str | os.PathLike | None = None,
    parent: Any = None,
    factory: Callable[..., Any] | None = None,
    **provisioner_config: Any,
) -> AsyncKernelManager:
    """A started ``AsyncKernelManager`` for the running limited kernel ``kernel_id``.

    ``factory(connection_file=..., kernel_name=...)`` builds the manager (default
    ``AsyncKernelManager(parent=parent, ...)``). Raises :class:`AdoptionError` if the
    kernel is unknown, dead (its leftovers are removed), managed by another live
    process, or unreachable (it is then shut down rather than left unmanaged).
    """
    registry = Registry(state_dir)
    entry = registry.read(kernel_id)
    if entry is None:
        msg = f"no limited kernel {kernel_id} in the registry at {registry.state_dir}"
        raise AdoptionError(msg)
    if not is_alive(entry) or entry.get("state") != "running":
        await asyncio.to_thread(remove_kernel, registry, entry)
        msg = f"kernel {kernel_id} is not running any more; its leftovers were removed"
        raise AdoptionError(msg)
    if server_alive(entry) and entry.get("server_pid") != os.getpid():
        msg = (
            f"kernel {kernel_id} is managed by live process {entry.get('server_pid')}; "
            f"refusing to adopt it too (two managers would fight over it)"
        )
        raise AdoptionError(msg)
    connection_file = entry.get("connection_file")
    if not connection_file or not os.path.exists(connection_file):
        await asyncio.to_thread(remove_kernel, registry, entry)
        msg = (
            f"kernel {kernel_id}: connection file {connection_file!r} is gone, so nobody can "
            f"talk to it; it was shut down instead of being left running unmanaged"
        )
        raise AdoptionError(msg)

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
    config.update(
        {k: v for k, v in (entry.get("limits") or {}).items() if k in TRAIT_KEYS}
    )
    config.update(
        owner=entry.get("owner", ""),
        max_lifetime=entry.get("max_lifetime") or 0,
        labels=dict(entry.get("labels") or {}),
        state_dir=str(registry.state_dir),
        **provisioner_config,
    )
    prov = _provisioner_class(entry.get("backend", "process"))(
        kernel_id=kernel_id, kernel_spec=spec, parent=km, **config
    )
    km.provisioner = prov
    try:
        await prov.adopt(entry)
    except Exception:
        await asyncio.to_thread(remove_kernel, registry, entry)
        raise
    if entry.get("launch_cwd"):
        km._launch_args = {"cwd": entry["launch_cwd"]}
    else:
        km._launch_args = {}
    km._attempted_start = True
    km._connect_control_socket()
    if not km.ready.done():
        km.ready.set_result(None)
    km.start_restarter()
    return km
