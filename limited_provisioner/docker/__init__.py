"""The Docker backend: ``limited-docker-provisioner``."""

from .provisioner import DEFAULT_IMAGE, LABEL_PREFIX, LimitedDockerProvisioner

__all__ = ["DEFAULT_IMAGE", "LABEL_PREFIX", "LimitedDockerProvisioner"]
