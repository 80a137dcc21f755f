"""The orphan reaper: removes what limited kernels left behind, and nothing else.

A registry entry is reaped when the server (the process that started the kernel) is
gone and either the kernel died (process gone / container stopped), its idle clock (or
max_lifetime) has run out, or nobody adopted it within ``orphan_grace`` of a reaper first
seeing its server gone — a live kernel of a dead server is kept that long, so a
restarted server can still adopt it, but a crashed script's kernel does not hold its
``mem_limit`` until its idle timeout. Kernels of live servers are never touched, and only
what carries our registry entry or our Docker label is. Each backend removes its own
traces (``remove_traces``: cgroups and processes, containers on the daemon that runs
them); a backend that cannot be asked keeps the entry for the next round. Each round also
removes the files kept after idle culls whose ``keep_files_for`` is up (kept_files.py).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import shutil
import time
from dataclasses import dataclass
from typing import Any

from . import kept_files, uids
from .kernel_dir import KernelDir
from .metrics import ORPHANS_REAPED
from .registry import Registry, is_alive, sandbox_of, server_alive

log = logging.getLogger(__name__)
# Seconds a live kernel of a gone server waits to be adopted before it is reaped.
ORPHAN_GRACE = 300.0
# Where each backend's provisioner lives; imported only when an entry of it is reaped.
BACKENDS = {
    "process": "limited_provisioner.process:LimitedProcessProvisioner",
    "docker": "limited_provisioner.docker:LimitedDockerProvisioner",
    "swarm": "limited_provisioner.swarm:LimitedSwarmProvisioner",
}


@dataclass
class Orphan:
    kernel_id: str
    backend: str
    why: str
    server_id: str = ""
    owner: str = ""


def provisioner_class(backend: str) -> type:
    """The provisioner class of a registry entry's ``backend``."""
    module, _, name = BACKENDS.get(backend, BACKENDS["process"]).partition(":")
    return getattr(importlib.import_module(module), name)


def find_orphans(
    registry: Registry,
    *,
    server_id: str | None = None,
    all_servers: bool = False,
    now: float | None = None,
    orphan_grace: float = ORPHAN_GRACE,
) -> list[Orphan]:
    """Registry entries to reap; only ``server_id``'s unless ``all_servers``.

    A live kernel of a gone server counts from ``orphaned_at`` (:func:`note_orphaned`);
    ``orphan_grace`` 0 keeps it until its idle clock or max_lifetime runs out.
    """
    now = now or time.time()
    found = []
    for entry in _in_scope(registry, server_id, all_servers):
        if server_alive(entry):
            # A live server manages its kernels itself (its restarter may be about to
            # restart a dead one): never reap under its feet.
            continue
        kid = entry.get("kernel_id", "")
        base = {"kernel_id": kid, "backend": entry.get("backend", "?"),
                "server_id": entry.get("server_id", ""), "owner": entry.get("owner", "")}
        if entry.get("state") == "pooled":
            # Nobody's kernel, and nobody adopts a pool: drained with its server.
            found.append(Orphan(why="server gone, its pooled kernel drained", **base))
            continue
        if entry.get("state") == "starting":
            # Its server died mid-start: nobody will finish the start or ever adopt a
            # kernel that never reached "running", but its process/container may exist.
            found.append(Orphan(why="server gone while the kernel was starting", **base))
            continue
        if not is_alive(entry):
            found.append(Orphan(why="server gone, kernel dead", **base))
            continue
        idle_timeout = (entry.get("limits") or {}).get("idle_timeout") or 0
        idle = now - entry.get("last_activity", entry.get("created", now))
        lifetime = entry.get("max_lifetime") or 0
        if idle_timeout and idle > idle_timeout:
            found.append(Orphan(why=f"server gone, idle {idle:.0f}s > {idle_timeout:g}s", **base))
        elif lifetime and now - entry.get("created", now) > lifetime:
            found.append(Orphan(why=f"server gone, older than max_lifetime {lifetime:g}s", **base))
        elif orphan_grace and now - (entry.get("orphaned_at") or now) > orphan_grace:
            found.append(Orphan(
                why=f"server gone and nobody adopted the kernel within orphan_grace "
                    f"{orphan_grace:g}s", **base))
    return found


def _in_scope(
    registry: Registry, server_id: str | None, all_servers: bool
) -> list[dict[str, Any]]:
    return [
        e for e in registry.entries()
        if all_servers or server_id is None or e.get("server_id") == server_id
    ]


def note_orphaned(
    registry: Registry,
    *,
    server_id: str | None = None,
    all_servers: bool = False,
    now: float | None = None,
) -> list[str]:
    """Stamp ``orphaned_at`` on each running kernel whose server is gone, the first time
    a reaper sees it so (adoption clears it); returns their ids. The grace is counted
    from here: a server's death leaves no time of its own."""
    now = now or time.time()
    noted = []
    for entry in _in_scope(registry, server_id, all_servers):
        if entry.get("orphaned_at") or entry.get("state") != "running" or server_alive(entry):
            continue
        kid = entry.get("kernel_id", "")
        # Re-checked under the registry's lock: an adoption may have just taken it over.
        if registry.update_if(kid, lambda e: not server_alive(e), orphaned_at=now):
            noted.append(kid)
    return noted


def remove_kernel(registry: Registry, entry: dict[str, Any]) -> None:
    """Kill and remove everything of one kernel: processes/container, cgroups, dir, entry.

    Raises if its backend cannot remove its traces (e.g. its Docker daemon is
    unreachable): then the entry stays, so the kernel is not forgotten while it runs.
    """
    kid, sid = entry["kernel_id"], sandbox_of(entry)
    provisioner_class(entry.get("backend", "process")).remove_traces(registry, entry)
    # Only ever <state_dir>/kernels/<id> and <state_dir>/clients/<id>, whatever the entry
    # says, removed without following a link the kernel planted in its dirs.
    KernelDir(registry.kernels_dir, sid, None, None).remove()
    shutil.rmtree(registry.clients_dir / sid, ignore_errors=True)
    if entry.get("uid") is not None:
        uids.release(entry["uid"], sid)
    registry.remove(kid)


def reap(
    registry: Registry,
    *,
    server_id: str | None = None,
    all_servers: bool = False,
    dry_run: bool = False,
    orphan_grace: float = ORPHAN_GRACE,
) -> list[Orphan]:
    """Find and (unless ``dry_run``) remove orphans. Each failure is logged on its own."""
    if not dry_run:
        note_orphaned(registry, server_id=server_id, all_servers=all_servers)
    orphans = find_orphans(
        registry, server_id=server_id, all_servers=all_servers, orphan_grace=orphan_grace
    )
    if dry_run:
        return orphans
    # Files kept after idle culls (keep_files_for) whose time is up.
    kept_files.reap_kept(registry.state_dir)
    done = []
    for orphan in orphans:
        entry = registry.read(orphan.kernel_id)
        if entry is None or server_alive(entry):
            continue  # gone meanwhile, or adopted since it was found
        try:
            remove_kernel(registry, entry)
            done.append(orphan)
            ORPHANS_REAPED.labels(backend=orphan.backend).inc()
            log.info("reaped kernel %s (%s): %s", orphan.kernel_id, orphan.backend, orphan.why)
        except Exception as e:
            log.error("could not reap kernel %s (%s), kept for the next round: %s",
                      orphan.kernel_id, orphan.backend, e)
    return done


async def reap_periodically(
    registry: Registry, interval: float, log: Any, orphan_grace: float = ORPHAN_GRACE
) -> None:
    """The in-server reaper: :func:`reap` every ``interval`` seconds, off the event loop."""
    while True:
        await asyncio.sleep(interval)
        try:
            await asyncio.to_thread(
                reap, registry, all_servers=True, orphan_grace=orphan_grace
            )
        except Exception:  # the next round may succeed; never end the loop
            log.exception("orphan reaper failed")
