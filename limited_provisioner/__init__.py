"""Resource-limited Jupyter kernels: kernel provisioners that bound every kernel."""

from .errors import (
    AdoptionError,
    KernelCommandError,
    KernelEndedError,
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


def _jupyter_labextension_paths() -> list[dict[str, str]]:
    """The prebuilt status-bar extension (built from labextension/ at the repo top), for
    ``jupyter labextension develop``; pip installs it to share/jupyter/labextensions."""
    return [{"src": "labextension", "dest": "limited-provisioner"}]


__all__ = [
    "AdoptionError",
    "KernelCommandError",
    "KernelEndedError",
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
