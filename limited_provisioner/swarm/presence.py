"""Which servers of a swarm are alive, and the swarm-wide reaper for the kernels of the rest.

The host reaper (reaper.py) judges a server by its pid, which means nothing on another
node: a server killed with its container, or on a node that left, would leave its swarm
kernels running -- holding memory on a worker and slots of ``max_kernels`` -- for ever.
So each process managing swarm kernels shows it is alive in the swarm itself: every
``interval`` it creates a tiny Swarm config ``limited-provisioner.alive.<server>.<time>``
and removes its older ones (configs cannot change; a new one is one API call). In the same
round it reaps: a record (records.py) whose server has shown no sign of life for
``orphan_grace`` -- its newest heartbeat, or the record's own time if it never beat -- is
another server's orphan, and every trace of its kernel goes (service, secret, slots,
record). A server restarted within the grace adopts its kernels (records.restore_entries)
and beats again; ``limited-provisioner reap`` runs the same sweep from anywhere.

All functions here block (Docker API calls), except :func:`start`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import _background
from ..docker.client import label, remove
from ..registry import sandbox_of
from . import records

ALIVE_PREFIX = "limited-provisioner.alive"
# Seconds between two heartbeats (and swarm-wide sweeps) of one process.
BEAT_INTERVAL = 30.0

Call = Callable[..., Any]
log = logging.getLogger(__name__)


@dataclass
class SwarmOrphan:
    kernel_id: str
    server_id: str
    owner: str
    why: str


def _server_tag(server_id: str) -> str:
    """Config names allow [A-Za-z0-9._-] and 64 characters: the server id, hashed."""
    return hashlib.sha256(server_id.encode()).hexdigest()[:12]


def beat(call: Call, server_id: str, now: float | None = None) -> None:
    """One heartbeat of ``server_id``: a new config, then its older ones go."""
    import docker.errors

    now = time.time() if now is None else now
    stamp = str(int(now * 1000))
    name = f"{ALIVE_PREFIX}.{_server_tag(server_id)}.{stamp}"
    try:
        # Not empty: the engine refuses a config of 0 bytes.
        call("create_config", name, stamp.encode(), labels={label("alive"): "1",
                                                          label("server-id"): server_id})
    except docker.errors.APIError as e:
        if e.status_code != 409:  # the same millisecond: one is enough
            raise
    for config in _beats(call, server_id):
        if config["Spec"]["Name"] != name:
            remove(call, "config", config["ID"])


def _beats(call: Call, server_id: str | None = None) -> list[dict[str, Any]]:
    wanted = [f"{label('alive')}=1"]
    if server_id is not None:
        wanted.append(f"{label('server-id')}={server_id}")
    return call("configs", filters={"label": wanted})


def last_beats(call: Call) -> dict[str, float]:
    """Server id -> the time of its newest heartbeat."""
    newest: dict[str, float] = {}
    for config in _beats(call):
        server = (config["Spec"].get("Labels") or {}).get(label("server-id"), "")
        newest[server] = max(newest.get(server, 0.0), records.created_time(config["CreatedAt"]))
    return newest


def find_orphans(call: Call, *, orphan_grace: float, alive: set[str] = frozenset(),
                 now: float | None = None) -> list[SwarmOrphan]:
    """Kernels whose server has shown no sign of life for ``orphan_grace`` (0: none are);
    servers in ``alive`` (this process's) are alive whatever their heartbeats say."""
    if not orphan_grace:
        return []
    now = time.time() if now is None else now
    beats = last_beats(call)
    found = []
    for record in records.read_records(call):
        entry = record["entry"]
        server = str(entry.get("server_id", ""))
        if server in alive:
            continue
        last = max(beats.get(server, 0.0), record["made"])
        silent = now - last
        if silent > orphan_grace:
            found.append(SwarmOrphan(
                sandbox_of(entry), server, str(entry.get("owner", "")),
                f"its server {server} has shown no sign of life for {silent:.0f}s "
                f"(orphan_grace {orphan_grace:g}s)"))
    return found


def reap_swarm(call: Call, *, orphan_grace: float, alive: set[str] = frozenset(),
               dry_run: bool = False, now: float | None = None) -> list[SwarmOrphan]:
    """Remove every trace of the orphans :func:`find_orphans` finds, and the heartbeats
    of servers silent for longer than the grace; the orphans (removed, unless
    ``dry_run``). A failure on one kernel is logged and left for the next round."""
    from .provisioner import remove_swarm_traces

    now = time.time() if now is None else now
    orphans = find_orphans(call, orphan_grace=orphan_grace, alive=alive, now=now)
    if dry_run:
        return orphans
    done = []
    for orphan in orphans:
        try:
            remove_swarm_traces(call, orphan.kernel_id)
        except Exception as e:  # noqa: BLE001 - kept for the next round, said so
            log.error("could not reap swarm kernel %s, kept for the next round: %s",
                      orphan.kernel_id, e)
            continue
        done.append(orphan)
        log.info("reaped swarm kernel %s: %s", orphan.kernel_id, orphan.why)
    if orphan_grace:
        for server, last in last_beats(call).items():
            if server not in alive and now - last > orphan_grace:
                for config in _beats(call, server):
                    remove(call, "config", config["ID"])
    return done


# -- this process's heartbeat -------------------------------------------------------------

_lock = threading.Lock()
_running: dict[tuple[str, str], tuple[int, concurrent.futures.Future]] = {}


def start(session: Any, server_id: str, orphan_grace: float,
          interval: float = BEAT_INTERVAL) -> None:
    """This process's heartbeat for ``server_id`` in the swarm ``session`` (a
    DockerSession) talks to, with the sweep, on the package's loop; once per process
    (from any thread). It runs for the life of the process, as the server's reaper."""
    key = (session.docker_host, server_id)
    with _lock:
        pid, future = _running.get(key, (0, None))
        if future is not None and pid == os.getpid() and not future.done():
            return
        _running[key] = (os.getpid(), _background.run(
            _beat_and_reap(session, server_id, orphan_grace, interval)))


async def _beat_and_reap(session: Any, server_id: str, orphan_grace: float,
                         interval: float) -> None:
    while True:
        try:
            await asyncio.to_thread(beat, session.call, server_id)
            await asyncio.to_thread(reap_swarm, session.call, orphan_grace=orphan_grace,
                                    alive={server_id})
        except Exception:  # the next round may succeed; never end the loop
            log.exception("swarm heartbeat or reaper round failed")
        await asyncio.sleep(interval)
