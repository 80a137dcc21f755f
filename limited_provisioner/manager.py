"""jupyter_server integration: refused starts become HTTP errors with our message.

Selected by the config this package installs into
``{sys.prefix}/etc/jupyter/jupyter_server_config.d/limited_provisioner.json``
(``ServerApp.kernel_manager_class``). It changes nothing for stock kernels: it only
translates this package's exceptions, which only our provisioners raise.
"""

from __future__ import annotations

from typing import Any

from jupyter_server.services.kernels.kernelmanager import AsyncMappingKernelManager
from tornado import web

from .errors import KernelLimitError, LimitConfigError, SandboxUnavailableError


class LimitedMappingKernelManager(AsyncMappingKernelManager):
    """AsyncMappingKernelManager whose refused starts answer 429/400/503, never 500."""

    async def start_kernel(self, *args: Any, **kwargs: Any) -> str:
        try:
            return await super().start_kernel(*args, **kwargs)
        except KernelLimitError as e:
            # 429: the caller may retry once a kernel is gone or the rate window passed.
            raise web.HTTPError(429, str(e), reason="Kernel limit reached") from e
        except LimitConfigError as e:
            raise web.HTTPError(400, str(e), reason="Invalid kernel limits") from e
        except SandboxUnavailableError as e:
            raise web.HTTPError(503, str(e), reason="Kernel sandbox unavailable") from e
