"""The jupyter_server extension this package enables at install time.

``pip install`` drops ``jupyter_server_config.d/limited_provisioner.json`` into
``{sys.prefix}/etc/jupyter``; it enables this extension, which selects
:class:`~limited_provisioner.manager.LimitedMappingKernelManager` (refused starts
answer 429/400/503 instead of 500). It changes nothing for stock kernels. Turn it off
with ``jupyter server extension disable limited_provisioner``.
"""

from __future__ import annotations

from typing import Any

MANAGER = "limited_provisioner.manager.LimitedMappingKernelManager"


def _link_jupyter_server_extension(serverapp: Any) -> None:
    """Runs before the server creates its kernel manager (init_configurables)."""
    configured = serverapp.config.get("ServerApp", {}).get("kernel_manager_class")
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


def _load_jupyter_server_extension(serverapp: Any) -> None:
    serverapp.log.info(
        "limited-provisioner: kernel manager %s", type(serverapp.kernel_manager).__name__
    )
