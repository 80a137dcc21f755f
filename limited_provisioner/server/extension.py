"""The jupyter_server extension this package enables at install time.

``pip install`` drops ``jupyter_server_config.d/limited_provisioner.json`` into
``{sys.prefix}/etc/jupyter``; it enables this extension, which selects
:class:`~limited_provisioner.server.manager.LimitedMappingKernelManager` (refused starts
answer 429/400/503 instead of 500) and
:class:`~limited_provisioner.server.websocket.LimitedWebsocketConnection` (a cell whose kernel a
limit killed says which limit). For stock kernels the only change is that their state
stays right across automatic restarts (see the manager). Turn it off with
``jupyter server extension disable limited_provisioner``.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from ..logs import follow_application_log

MANAGER = "limited_provisioner.server.manager.LimitedMappingKernelManager"
# Where the manager lived before 0.2; configs naming it are pointed at MANAGER.
OLD_MANAGER = "limited_provisioner.manager.LimitedMappingKernelManager"


def _link_jupyter_server_extension(serverapp: Any) -> None:
    """Runs before the server creates its kernel manager (init_configurables)."""
    # Everything we log from now on, under our own name, in the server's log (logs.py).
    follow_application_log(serverapp.log)
    configured = serverapp.config.get("ServerApp", {}).get("kernel_manager_class")
    if configured and str(configured) == OLD_MANAGER:
        serverapp.log.warning("ServerApp.kernel_manager_class: %s moved to %s",
                              OLD_MANAGER, MANAGER)
        configured = serverapp.config.ServerApp.kernel_manager_class = MANAGER
    if configured and str(configured) != MANAGER:
        serverapp.log.warning(
            "limited-provisioner: ServerApp.kernel_manager_class is set to %s; refused "
            "kernel starts will answer 500 instead of 429. Subclass %s to keep both.",
            configured,
            MANAGER,
        )
        return
    from .manager import LimitedMappingKernelManager

    serverapp.kernel_manager_class = LimitedMappingKernelManager
    _explain_deaths(serverapp)
    _persist_sessions(serverapp)


def _explain_deaths(serverapp: Any) -> None:
    """Use the websocket connection that writes a limit kill's reason into the cell."""
    if "kernel_websocket_connection_class" in serverapp.config.get("ServerApp", {}):
        return  # the operator chose
    if serverapp.config.get("GatewayClient", {}).get("url") or os.environ.get(
        "JUPYTER_GATEWAY_URL"
    ):
        return  # kernels are remote: the gateway's connection class is needed
    from .websocket import LimitedWebsocketConnection

    serverapp.kernel_websocket_connection_class = LimitedWebsocketConnection


def _persist_sessions(serverapp: Any) -> None:
    """Keep notebook <-> kernel sessions on disk, so a restarted server still maps each
    notebook to its adopted kernel instead of starting a second one."""
    if "database_filepath" in serverapp.config.get("SessionManager", {}):
        return  # the operator chose
    from jupyter_core.paths import jupyter_runtime_dir

    from ..host import LimitedHost

    server_id = LimitedHost.instance(config=serverapp.config).resolved_server_id
    runtime = jupyter_runtime_dir()
    os.makedirs(runtime, exist_ok=True)
    path = os.path.join(runtime, f"limited-provisioner-sessions-{server_id}.db")
    serverapp.config.SessionManager.database_filepath = path


def _load_jupyter_server_extension(serverapp: Any) -> None:
    """Serve the kernel status endpoint (handlers.py); adopt this server's running
    kernels before the first request is served."""
    from .handlers import handlers
    from .manager import LimitedMappingKernelManager

    # Whatever the manager class: the endpoint answers "limited: false" for kernels
    # that are not ours, and needs no labextension (any client may poll it).
    serverapp.web_app.add_handlers(".*$", handlers(serverapp.base_url))

    km = serverapp.kernel_manager
    if not isinstance(km, LimitedMappingKernelManager):
        return

    async def adopt_then_warm() -> None:
        if km.adopt_on_start:
            await km.adopt_kernels()
        # In the background: pooled kernels need not be ready before the first request
        # (a start that finds none is a cold start).
        km._warming = asyncio.ensure_future(km.warm_pools())

    loop = serverapp.io_loop.asyncio_loop
    if loop.is_running():  # embedded in a running loop (tests): adopt in the background
        loop.create_task(adopt_then_warm())
    else:
        loop.run_until_complete(adopt_then_warm())
