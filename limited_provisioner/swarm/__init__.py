"""The Docker Swarm backend: one service per kernel, anywhere on a cluster."""

from .provisioner import LimitedSwarmProvisioner

__all__ = ["LimitedSwarmProvisioner"]
