"""Admission: the one place that decides whether a kernel may start.

Counts come from the registry (live processes / containers), never from memory of
this server, and the caller holds the registry's host-wide lock, so concurrent starts
from several servers cannot both slip under a cap.
"""

from __future__ import annotations

from .errors import KernelLimitError
from .registry import Registry


def admit(
    registry: Registry,
    *,
    kernel_id: str,
    owner: str,
    max_kernels: int | None,
    max_kernels_per_user: int | None,
) -> None:
    """Raise :class:`KernelLimitError` if starting ``kernel_id`` would break a cap."""
    live = [e for e in registry.live_entries() if e.get("kernel_id") != kernel_id]
    if max_kernels is not None and len(live) >= max_kernels:
        msg = (
            f"max_kernels={max_kernels} reached: {len(live)} limited kernels are running "
            f"on this host; shut one down (or raise max_kernels) and try again"
        )
        raise KernelLimitError(msg, limit="max_kernels", owner=owner)
    if max_kernels_per_user is not None:
        mine = [e for e in live if e.get("owner") == owner]
        if len(mine) >= max_kernels_per_user:
            msg = (
                f"max_kernels_per_user={max_kernels_per_user} reached: {owner!r} already "
                f"runs {len(mine)} kernels; shut one down (or raise max_kernels_per_user)"
            )
            raise KernelLimitError(msg, limit="max_kernels_per_user", owner=owner)
