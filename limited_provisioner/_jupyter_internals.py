"""Every use of a private jupyter_client / jupyter_server name, in one place.

Re-adoption, restarts decided by the provisioner, refused starts and the deprecated
config section need a few things jupyter_client, jupyter_server and traitlets do not
offer publicly. Each is wrapped here, named after what it does for us;
:data:`PRIVATE_NAMES` lists them and ``tests/unit/test_jupyter_internals.py`` checks each
still exists in the installed versions, so an upgrade that moves one fails a fast test
instead of a kernel in production.
"""

from __future__ import annotations

import asyncio
from typing import Any

# (where, name): instance attributes of the class named, checked on a fresh instance.
PRIVATE_NAMES = [
    ("jupyter_client.manager:AsyncKernelManager", "_launch_args"),
    ("jupyter_client.manager:AsyncKernelManager", "_attempted_start"),
    ("jupyter_client.manager:AsyncKernelManager", "_connect_control_socket"),
    ("jupyter_client.manager:AsyncKernelManager", "_connection_file_written"),
    ("jupyter_client.manager:AsyncKernelManager", "_restarter"),
    ("jupyter_client.manager:AsyncKernelManager", "_kernel_spec"),
    ("jupyter_client.manager:KernelManager", "_async_restart_kernel"),
    ("jupyter_client.restarter:KernelRestarter", "_fire_callbacks"),
    ("jupyter_client.provisioning.provisioner_base:KernelProvisionerBase", "_finalize_env"),
    ("jupyter_client.multikernelmanager:AsyncMultiKernelManager", "_kernels"),
    ("jupyter_client.multikernelmanager:AsyncMultiKernelManager", "_pending_kernels"),
    ("jupyter_server.services.kernels.kernelmanager:AsyncMappingKernelManager",
     "_kernel_connections"),
    ("jupyter_server.services.kernels.kernelmanager:AsyncMappingKernelManager", "_kernel_ports"),
    ("jupyter_server.services.kernels.kernelmanager:AsyncMappingKernelManager",
     "_initialized_culler"),
    ("jupyter_server.services.kernels.kernelmanager:AsyncMappingKernelManager",
     "_handle_kernel_died"),
    # jupyter_server's WebSocket keeps a kernel's kernel_info answer on its manager
    ("jupyter_server.services.kernels.connection.channels:ZMQChannelsWebsocketConnection",
     "_kernel_info_future"),
    # traitlets: reading the pre-0.2 config section (settings.py, host.py)
    ("traitlets.config.configurable:Configurable", "_load_config"),
    ("traitlets.config.loader:Config", "_has_section"),
]


# -- one KernelManager ------------------------------------------------------------------


def fire_restart_callbacks(km: Any) -> None:
    """Tell the kernel's clients it is restarting, as the auto-restarter does (the
    "restart" callbacks are what jupyter_server's websocket subscribes to)."""
    restarter = getattr(km, "_restarter", None)
    fire = getattr(restarter, "_fire_callbacks", None)
    if fire is not None:
        fire("restart")


def keep_connection_file(km: Any) -> None:
    """``KernelManager.__del__`` deletes a connection file it wrote; a detached kernel
    without one could never be adopted again."""
    km._connection_file_written = False


def preset_kernel_info(km: Any, info: dict[str, Any]) -> None:
    """What jupyter_server's first WebSocket to a kernel asks it (``kernel_info``, over a
    shell connection of its own) and keeps on the kernel's manager for the next ones,
    known already: none of them asks."""
    from concurrent.futures import Future

    answered: Future[dict[str, Any]] = Future()
    answered.set_result(info)
    km._kernel_info_future = answered


def preset_kernel_spec(km: Any, spec: Any) -> None:
    """Give a new manager its kernelspec, so ``km.kernel_spec`` does not search every
    Jupyter path again (adopting 100 kernels of one spec searched 100 times)."""
    km._kernel_spec = spec


def mark_started(km: Any, launch_cwd: str | None) -> None:
    """Make a manager built around an already running kernel behave as if it had
    started it: restarts reuse the cwd, the control socket is open, ``ready`` is set."""
    km._launch_args = {"cwd": launch_cwd} if launch_cwd else {}
    km._attempted_start = True
    km._connect_control_socket()
    if not km.ready.done():
        km.ready.set_result(None)


async def cull_or_restart(km: Any, kernel_id: str, action: str) -> None:
    """Shut down ("cull") or restart a kernel through whoever owns it — the server's
    MultiKernelManager if it manages it (so its listing stays true), else ``km``."""
    from jupyter_core.utils import ensure_async

    mkm = getattr(km, "parent", None)
    managed = manages(mkm, kernel_id)
    if action == "cull":
        await ensure_async(mkm.shutdown_kernel(kernel_id) if managed else km.shutdown_kernel())
        return
    # Announced as the auto-restarter would, or a notebook waits forever on the cell.
    fire_restart_callbacks(km)
    await ensure_async(
        mkm.restart_kernel(kernel_id, now=True) if managed else km.restart_kernel(now=True)
    )


async def restart_here(km: Any) -> None:
    """Restart a kernel of a *blocking* manager from the package's loop: its public
    ``restart_kernel`` is ``run_sync``, which would block that loop while the restart
    needs it; the coroutine behind it does the same steps."""
    # In a worker thread: a callback that calls back into the blocking manager (run_sync)
    # would otherwise wait on the very loop it blocks.
    await asyncio.to_thread(fire_restart_callbacks, km)
    await km._async_restart_kernel(now=True)


def hold_auto_restarts(km: Any) -> None:
    """A kernel culled without its manager's help must stay dead: the manager's
    restarter skips a kernel that is ``shutting_down`` (reset by the next start)."""
    km.shutting_down = True


# -- the server's MultiKernelManager ------------------------------------------------------


def managed_kernels(mkm: Any) -> dict[str, Any]:
    """``{kernel_id: KernelManager}`` of a MultiKernelManager."""
    return getattr(mkm, "_kernels", {})


def manages(mkm: Any, kernel_id: str) -> bool:
    return mkm is not None and kernel_id in managed_kernels(mkm)


def forget_failed_starts(mkm: Any) -> None:
    """Drop failed starts from ``_pending_kernels``.

    jupyter_client keeps a start whose task failed there; ``shutdown_all`` then asks for
    that id, gets 404, and the server never finishes stopping (kernels left running,
    SIGTERM ignored). A refused start is a routine event here.
    """
    kernels = managed_kernels(mkm)
    for kernel_id, task in list(mkm._pending_kernels.items()):
        if task.done() and kernel_id not in kernels:
            mkm._pending_kernels.pop(kernel_id, None)


def register_adopted(mkm: Any, kernel_id: str, km: Any) -> None:
    """Enter an adopted kernel in jupyter_server's books as if it had started it."""
    mkm._kernels[kernel_id] = km
    mkm._kernel_connections[kernel_id] = 0
    mkm._kernel_ports[kernel_id] = km.ports
    if not mkm._initialized_culler:
        mkm.initialize_culler()
