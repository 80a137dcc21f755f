"""Swarm-wide ``max_kernels`` / ``max_kernels_per_user``: a kernel holds named slots.

Servers on different nodes share no lock and no state dir; what they share is the
swarm's raft store, where names are unique. A cap of N is N names
(``limited-provisioner.slot.<scope>.<i>``, i < N); admission creates one of them as a
tiny Swarm config labelled with the kernel's id. The store accepts exactly one creation
of a name (the others get 409), so two servers can never both take the last slot, and
no count is ever read and then acted on. The per-user scope is taken first, then the
swarm's; a refusal gives back what it took.

A slot outlives a kernel only if its server died between claiming and cleanup: a slot
whose kernel has no service, older than :data:`STALE_AFTER`, is reclaimed when a claim
finds every slot taken (and by the reaper).

All functions here block (Docker API calls): run them through the DockerSession's pool.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from ..admission import cap_reached
from ..docker.client import label, remove

SLOT_PREFIX = "limited-provisioner.slot"
ALL = "all"
# A slot without a service this long is a dead server's leftover: a start creates its
# service within seconds of claiming the slot.
STALE_AFTER = 120.0

Call = Callable[..., Any]


def user_scope(owner: str) -> str:
    """Config names allow [A-Za-z0-9._-] only: the owner, hashed."""
    return "user-" + hashlib.sha256(owner.encode()).hexdigest()[:16]


def slot_name(scope: str, index: int) -> str:
    return f"{SLOT_PREFIX}.{scope}.{index}"


def claim(call: Call, *, kernel_id: str, owner: str, max_kernels: int | None,
          max_kernels_per_user: int | None, live_kernels: Callable[[], set[str]]) -> list[str]:
    """Take a slot in each capped scope for ``kernel_id``; their names. Raises
    :class:`~..errors.KernelLimitError` (nothing held) when a scope is full.
    ``live_kernels()``: the kernel ids that have a service (for reclaiming stale slots)."""
    scopes = [(user_scope(owner), max_kernels_per_user, "max_kernels_per_user"),
              (ALL, max_kernels, "max_kernels")]
    held: list[str] = []
    try:
        for scope, cap, limit in scopes:
            if cap is None:
                continue
            name = _claim_in(call, scope, cap, kernel_id, owner, live_kernels)
            if name is None:
                n = len(_slots(call, scope))
                raise cap_reached(limit, cap, n, owner, where="in the swarm")
            held.append(name)
    except BaseException:
        for name in held:
            _remove(call, name)
        raise
    return held


def release(call: Call, kernel_id: str) -> int:
    """Give back every slot ``kernel_id`` holds; how many."""
    found = call("configs", filters={"label": [f"{label('slot')}",
                                               f"{label('kernel-id')}={kernel_id}"]})
    return sum(_remove(call, c["ID"]) for c in found)


def reclaim_stale(call: Call, live_kernels: set[str], now: float | None = None,
                  scope: str | None = None) -> list[str]:
    """Remove slots whose kernel has no service and that are older than STALE_AFTER;
    their names (the reaper's sweep, and a claim that found its scope full)."""
    now = time.time() if now is None else now
    removed = []
    for config in _slots(call, scope):
        labels = config.get("Spec", {}).get("Labels") or {}
        if labels.get(label("kernel-id")) in live_kernels:
            continue
        if now - _created(config) < STALE_AFTER:
            continue
        if _remove(call, config["ID"]):
            removed.append(config["Spec"]["Name"])
    return removed


def _claim_in(call: Call, scope: str, cap: int, kernel_id: str, owner: str,
              live_kernels: Callable[[], set[str]]) -> str | None:
    for attempt in range(2):
        taken = {c["Spec"]["Name"] for c in _slots(call, scope)}
        for name in _free(scope, cap, taken):
            if _create(call, name, scope, kernel_id, owner):
                return name
        # Full (or every free one taken meanwhile): once, take back a dead server's.
        if attempt == 0 and not reclaim_stale(call, live_kernels(), scope=scope):
            return None
    return None


def _free(scope: str, cap: int, taken: set[str]) -> Iterable[str]:
    return (name for name in (slot_name(scope, i) for i in range(cap)) if name not in taken)


def _create(call: Call, name: str, scope: str, kernel_id: str, owner: str) -> bool:
    """Create the slot; False if another start got the name first."""
    import docker.errors

    try:
        call("create_config", name, kernel_id.encode(), labels={
            label("slot"): scope, label("kernel-id"): kernel_id, label("owner"): owner,
        })
    except docker.errors.APIError as e:
        if e.status_code == 409:
            return False
        raise
    return True


def _slots(call: Call, scope: str | None) -> list[dict[str, Any]]:
    wanted = label("slot") if scope is None else f"{label('slot')}={scope}"
    return call("configs", filters={"label": wanted})


def _remove(call: Call, name_or_id: str) -> bool:
    return remove(call, "config", name_or_id)


def _created(config: dict[str, Any]) -> float:
    """A config's CreatedAt ("2026-12-02T14:20:01.123456789Z") as a timestamp."""
    text = str(config.get("CreatedAt", ""))
    head, _, frac = text.rstrip("Z").partition(".")
    try:
        stamp = datetime.fromisoformat(head + "+00:00").timestamp()
    except ValueError:
        return 0.0  # unreadable: old enough to check against its service
    return stamp + float("0." + (frac[:6] or "0"))
