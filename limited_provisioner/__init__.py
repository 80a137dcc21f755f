"""Resource-limited Jupyter kernels: kernel provisioners that bound every kernel."""

from .errors import (
    AdoptionError,
    KernelCommandError,
    KernelLimitError,
    LimitConfigError,
    SandboxStartError,
    SandboxUnavailableError,
    WorkspaceError,
)
from .host import LimitedHost
from .limits import Limits
from .process import LimitedProcessProvisioner
from .provisioner import LimitedProvisioner
from .recovery import adopt, list_kernels, reap_orphans

__version__ = "0.1.0"


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    """Enabled by jupyter_config/jupyter_server_config.d/limited_provisioner.json."""
    return [{"module": "limited_provisioner.server.extension"}]


__all__ = [
    "AdoptionError",
    "KernelCommandError",
    "KernelLimitError",
    "LimitConfigError",
    "LimitedHost",
    "LimitedProcessProvisioner",
    "LimitedProvisioner",
    "Limits",
    "SandboxStartError",
    "SandboxUnavailableError",
    "WorkspaceError",
    "__version__",
    "adopt",
    "list_kernels",
    "reap_orphans",
]
