"""Resource-limited Jupyter kernels: kernel provisioners that bound every kernel."""

from .errors import KernelLimitError, LimitConfigError, SandboxUnavailableError
from .limits import Limits
from .process import LimitedProcessProvisioner

__version__ = "0.1.0"

__all__ = [
    "KernelLimitError",
    "LimitConfigError",
    "LimitedProcessProvisioner",
    "Limits",
    "SandboxUnavailableError",
    "__version__",
]
