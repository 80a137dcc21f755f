"""``limited-docker-provisioner``: each kernel in a locked-down container.

Not implemented in this release: starting is refused with a clear message, so a
kernelspec that names this provisioner fails at once instead of running unlimited.
"""

from __future__ import annotations

from typing import Any

from jupyter_client.provisioning.provisioner_base import KernelProvisionerBase
from traitlets import Unicode

from .base import LimitedProvisionerMixin
from .errors import SandboxUnavailableError


class LimitedDockerProvisioner(LimitedProvisionerMixin, KernelProvisionerBase):
    """Placeholder for the Docker backend (refuses to start)."""

    backend = "docker"

    image = Unicode(
        "limited-provisioner-kernel:latest",
        help="Image the kernel container runs.",
    ).tag(config=True)

    @property
    def has_process(self) -> bool:
        return False

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        msg = (
            "limited-docker-provisioner is not available yet in this version; use "
            "limited-process-provisioner (limited-provisioner install --backend process)"
        )
        raise SandboxUnavailableError(msg)

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> Any:  # pragma: no cover
        raise SandboxUnavailableError("limited-docker-provisioner is not available yet")

    async def poll(self) -> int | None:
        return 0

    async def wait(self) -> int | None:
        return 0

    async def send_signal(self, signum: int) -> None:
        return None

    async def kill(self, restart: bool = False) -> None:
        return None

    async def terminate(self, restart: bool = False) -> None:
        return None

    async def cleanup(self, restart: bool = False) -> None:
        return None
