"""Resource-limited Jupyter kernels: kernel provisioners that bound every kernel."""

from .errors import KernelLimitError, LimitConfigError, SandboxUnavailableError
from .limits import Limits
from .process import LimitedProcessProvisioner

__version__ = "0.1.0"


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    """Enabled by jupyter_config/jupyter_server_config.d/limited_provisioner.json."""
    return [{"module": "limited_provisioner.serverext"}]

__all__ = [
    "KernelLimitError",
    "LimitConfigError",
    "LimitedProcessProvisioner",
    "Limits",
    "SandboxUnavailableError",
    "__version__",
]
