"""The local-process backend: ``limited-process-provisioner``."""

from .provisioner import LimitedProcessProvisioner

__all__ = ["LimitedProcessProvisioner"]
