"""Admission: the one place that decides whether a kernel may start.

Counts come from the registry (live processes / containers, pending starts included),
never from the memory of this server, and the caller holds the registry's host-wide
lock, so concurrent starts from several servers or processes cannot both slip under a
cap.  Every refusal is a :class:`KernelLimitError` naming the limit, the current value
and the owner.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from .errors import KernelLimitError
from .limits import format_size
from .registry import Registry


@dataclass
class AdmissionPolicy:
    """The caps one start is checked against (``None`` = no cap of that kind)."""

    max_kernels: int | None = None
    max_kernels_per_user: int | None = None
    mem_budget: int | None = None
    min_free_disk: int | None = None
    disk_paths: list[Path] = field(default_factory=list)
    max_starts_per_minute: int | None = None

    @classmethod
    def of(cls, settings: Any, disk_paths: list[Path]) -> AdmissionPolicy:
        """The caps of a provisioner's settings; mem_budget defaults to
        mem_budget_fraction of host memory."""
        budget = settings.mem_budget
        if budget is None and settings.mem_budget_fraction > 0:
            budget = int(psutil.virtual_memory().total * settings.mem_budget_fraction)
        return cls(
            max_kernels=settings.max_kernels,
            max_kernels_per_user=settings.max_kernels_per_user,
            mem_budget=budget,
            min_free_disk=settings.min_free_disk,
            disk_paths=disk_paths,
            max_starts_per_minute=settings.max_starts_per_minute,
        )


def admit_and_record(registry: Registry, policy: AdmissionPolicy, entry: dict[str, Any]) -> None:
    """Admit the start ``entry`` describes and write it, under the host-wide lock, so
    the next start (of any server) counts it."""
    with registry.lock():
        admit(
            registry,
            policy,
            kernel_id=entry["kernel_id"],
            owner=entry["owner"],
            mem_limit=(entry.get("limits") or {}).get("mem_limit"),
        )
        registry.write(entry["kernel_id"], entry)


def admit(
    registry: Registry,
    policy: AdmissionPolicy,
    *,
    kernel_id: str,
    owner: str,
    mem_limit: int | None,
    replacing: str | None = None,
) -> None:
    """Raise :class:`KernelLimitError` if starting ``kernel_id`` would break a cap.

    ``replacing``: the pooled kernel a claim turns into (pool.py), not counted twice.
    The caller holds ``registry.lock()``; on success it records the start (the rate
    window) so the next caller sees it.
    """
    # A swarm kernel runs on some node, counted by the swarm's slots (swarm/slots.py).
    live = [e for e in registry.live_entries()
            if e.get("kernel_id") not in (kernel_id, replacing) and e.get("backend") != "swarm"]
    mine = [e for e in live if e.get("owner") == owner]
    counted = (
        ("max_kernels", policy.max_kernels, live),
        ("max_kernels_per_user", policy.max_kernels_per_user, mine),
    )
    for limit, cap, entries in counted:
        if cap is not None and len(entries) >= cap:
            raise cap_reached(limit, cap, len(entries), owner)
    if policy.mem_budget is not None:
        # A kernel without mem_limit may use everything: it counts as the whole budget.
        used = sum(
            (e.get("limits") or {}).get("mem_limit") or policy.mem_budget for e in live
        )
        wanted = mem_limit if mem_limit is not None else policy.mem_budget
        if used + wanted > policy.mem_budget:
            msg = (
                f"mem_budget={format_size(policy.mem_budget)} reached: {len(live)} live "
                f"kernels reserve {format_size(used)} and {owner!r} asked for "
                f"{format_size(wanted)} more; shut a kernel down, lower mem_limit, or raise "
                f"mem_budget"
            )
            raise KernelLimitError(msg, limit="mem_budget")
    if policy.min_free_disk is not None:
        for path in policy.disk_paths:
            try:
                free = shutil.disk_usage(path).free
            except OSError:
                continue  # not visible from here (e.g. a remote Docker host)
            if free < policy.min_free_disk:
                msg = (
                    f"min_free_disk={format_size(policy.min_free_disk)} not available: only "
                    f"{format_size(free)} free on {path} where kernels write; free disk space "
                    f"(remove old kernels' files) before starting more kernels"
                    f"{_kept_note(registry, owner)}"
                )
                raise KernelLimitError(msg, limit="min_free_disk")
    if policy.max_starts_per_minute is not None:
        _check_rate(registry, owner, policy.max_starts_per_minute)


# What a count cap's refusal says was counted.
_COUNTED = {
    "max_kernels": "{n} limited kernels are running {where} (owner {owner!r} asked for one more)",
    "max_kernels_per_user": "{owner!r} already runs {n} kernels",
}


def cap_reached(limit: str, cap: int, n: int, owner: str,
                where: str = "on this host") -> KernelLimitError:
    """The refusal of a start past ``max_kernels`` / ``max_kernels_per_user`` (here or
    swarm-wide: swarm/slots.py), with the way out."""
    what = _COUNTED[limit].format(n=n, owner=owner, where=where)
    msg = f"{limit}={cap} reached: {what}; shut one down (or raise {limit}) and try again"
    return KernelLimitError(msg, limit=limit)


def _kept_note(registry: Registry, owner: str) -> str:
    """What files kept after idle culls (keep_files_for) hold of that disk: they are
    on the state dir's filesystem, so the free space above already counts them."""
    from . import kept_files

    try:
        everyone = kept_files.usage(registry.state_dir)
        if not everyone:
            return ""
        mine = kept_files.usage(registry.state_dir, owner)
    except Exception:  # noqa: BLE001 - only a hint in a refusal
        return ""
    return (f"; files kept after idle culls hold {format_size(everyone)} of it "
            f"({format_size(mine)} of them {owner!r}'s), until keep_files_for runs out")


def _check_rate(registry: Registry, owner: str, per_minute: int) -> None:
    path = registry.state_dir / "starts.json"
    now = time.time()
    try:
        starts = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        starts = {}
    recent = [t for t in starts.get(owner, []) if now - t < 60]
    if len(recent) >= per_minute:
        wait = 60 - (now - min(recent))
        msg = (
            f"max_starts_per_minute={per_minute} reached: {owner!r} started {len(recent)} "
            f"kernels in the last minute; retry in {wait:.0f} s"
        )
        raise KernelLimitError(msg, limit="max_starts_per_minute")
    recent.append(now)
    starts = {k: [t for t in v if now - t < 60] for k, v in starts.items()}
    starts[owner] = recent
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(starts))
    tmp.replace(path)
