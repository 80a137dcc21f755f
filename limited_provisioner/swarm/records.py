"""A swarm kernel's recovery record: what a server on any node needs to manage it again.

The host registry (registry.py) is one machine's: a server restarted on another node --
or in a new container, as a swarm service is after a kill -9 -- finds none of it. So at
its first start each swarm kernel also gets a record in the swarm's raft store: a Swarm
config (``limited-provisioner.kernel.<id>``) holding its registry entry without what is
this host's (pids, paths), its connection file (session key, ports) and its sockets'
CurveZMQ keypair. Only the manager API reads configs, and no task is given this one: a
kernel sees nothing of it. :func:`restore_entries` turns the records of a server's kernels
that still have a service back into registry entries and connection files on this host,
after which recovery.adopt works as for any other kernel; a record of its own whose
service is gone is removed with every other trace of its kernel, another server's record
once it is older than slots.STALE_AFTER (its own server may never come back).
:func:`swarm_kernels` is every server's kernels as the swarm has them (``list``).

Configs cannot change once made: the record is written once per kernel (a restart keeps
its connection and keys; the live service and task are looked up by label at adoption).
The idle clock starts again at adoption (the record holds no activity).

All functions here block (Docker API calls): run them in a thread or the DockerSession's
pool.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from ..docker.client import label, remove
from ..registry import Registry, sandbox_of
from .slots import STALE_AFTER

RECORD_PREFIX = "limited-provisioner.kernel"
# What is this host's or this process's in an entry: rebuilt, not carried.
HOST_FIELDS = (
    "pid", "pid_create_time", "server_pid", "server_pid_create_time", "connection_file",
    "kernel_dir", "workfs", "service_id", "task_id", "node_id", "last_activity",
    "orphaned_at", "adopted", "container_id",
)
# A record is ours (the server's, through the manager API), but bounded all the same.
MAX_RECORD = 64 * 1024

Call = Callable[..., Any]


def record_name(sandbox_id: str) -> str:
    return f"{RECORD_PREFIX}.{sandbox_id}"


def write(call: Call, entry: dict[str, Any], client_connection: dict[str, Any],
          kernel_connection: dict[str, Any]) -> bool:
    """Create the kernel's record unless it exists (a restart); True if created."""
    import docker.errors

    sid = sandbox_of(entry)
    record = {
        "entry": {k: v for k, v in entry.items() if k not in HOST_FIELDS},
        "client_connection": client_connection,
        "kernel_connection": kernel_connection,
    }
    labels = {label("kernel-id"): sid, label("server-id"): str(entry.get("server_id", "")),
              label("record"): "1"}
    try:
        call("create_config", record_name(sid), json.dumps(record).encode(), labels=labels)
    except docker.errors.APIError as e:
        if e.status_code != 409:
            raise
        return False
    return True


def remove_record(call: Call, sandbox_id: str) -> int:
    """Remove the kernel's record; 1 if there was one."""
    found = call("configs", filters={"name": record_name(sandbox_id)})
    return sum(remove(call, "config", c["ID"]) for c in found
               if c["Spec"]["Name"] == record_name(sandbox_id))


def read_records(call: Call, server_id: str | None = None) -> list[dict[str, Any]]:
    """The records of ``server_id``'s kernels (None: every server's), each with the time
    it was made (``made``); malformed ones skipped."""
    wanted = {"label": [f"{label('record')}=1"]}
    if server_id is not None:
        wanted["label"].append(f"{label('server-id')}={server_id}")
    records = []
    for config in call("configs", filters=wanted):
        data = config.get("Spec", {}).get("Data") or ""
        if len(data) > MAX_RECORD * 2:
            continue
        try:
            record = json.loads(base64.b64decode(data))
            record["entry"]["kernel_id"]  # noqa: B018 - the one field it must have
        except (ValueError, KeyError, TypeError):
            continue
        record["made"] = created_time(config.get("CreatedAt", ""))
        records.append(record)
    return records


def created_time(created_at: str) -> float:
    """Docker's RFC 3339 time (nanoseconds, Z) as epoch seconds; 0 if unreadable."""
    try:
        return datetime.fromisoformat(created_at[:26].rstrip("Z") + "+00:00").timestamp()
    except ValueError:
        return 0.0


def running_services(call: Call) -> dict[str, dict[str, Any]]:
    """Kernel id -> its service, for every limited kernel service in the swarm."""
    return {s["Spec"]["Labels"].get(label("kernel-id")): s
            for s in call("services", filters={"label": label("kernel-id")})}


def swarm_kernels(call: Call) -> list[dict[str, Any]]:
    """Every server's swarm kernels as the swarm knows them (``limited-provisioner
    list``): their recorded entries, with ``state`` "running" while their service exists
    (else "dead": its server has not cleaned up yet) and ``service_id``."""
    services = running_services(call)
    rows = []
    for record in read_records(call):
        row = dict(record["entry"])
        service = services.get(sandbox_of(row))
        row.update(state="running" if service else "dead", where="swarm",
                   service_id=service["ID"] if service else None)
        rows.append(row)
    return rows


def restore_entries(registry: Registry, call: Call, server_id: str,
                    docker_host: str = "") -> list[str]:
    """Registry entries, kernel dirs and connection files for ``server_id``'s swarm
    kernels this host does not know; returns their ids. A record whose kernel has no
    service any more goes, with what else the kernel left in the swarm."""
    from .provisioner import remove_swarm_traces

    restored = []
    with_service = set(running_services(call))
    now = time.time()
    for record in read_records(call):
        entry = dict(record["entry"])
        kid, sid = str(entry["kernel_id"]), sandbox_of(record["entry"])
        if sid not in with_service:
            if entry.get("server_id") == server_id:
                # Died while nobody managed it (this server was down): all of it goes.
                remove_swarm_traces(call, sid)
            elif now - record["made"] > STALE_AFTER:
                # Another server's: it may be between two processes of a restart (no
                # service for a moment); only a record nobody can use goes, not its slots.
                remove_record(call, sid)
            continue
        if entry.get("server_id") != server_id or registry.read(kid) is not None:
            continue  # another server's, or this host still has it (adoption reads that)
        restored.append(_restore_one(registry, entry, record, docker_host))
    return restored


def _restore_one(registry: Registry, entry: dict[str, Any], record: dict[str, Any],
                 docker_host: str) -> str:
    from ..kernel_dir import prepare_kernel_dir

    kid, sid = str(entry["kernel_id"]), sandbox_of(entry)
    kdir = prepare_kernel_dir(registry, kid, None, None, sandbox_id=sid)
    kdir.write("connection.json", json.dumps(record["kernel_connection"], indent=1),
               mode=0o600, where="conn")
    client_dir = registry.clients_dir / sid
    client_dir.mkdir(mode=0o700, exist_ok=True)
    client = dict(record["client_connection"])
    if client.get("transport") == "ipc":
        # This host's client dir (the proxy binds its client sockets there again).
        client["ip"] = str(client_dir / "c")
    client_file = client_dir / "connection.json"
    client_file.write_text(json.dumps(client, indent=1))
    client_file.chmod(0o600)
    entry.update(
        backend="swarm", state="running", connection_file=str(client_file),
        kernel_dir=str(kdir.path), docker_host=docker_host or entry.get("docker_host", ""),
        last_activity=time.time(), restored_from_swarm=time.time(),
    )
    registry.write(kid, entry)
    return kid


def swarm_daemons(kernel_specs: dict[str, Any]) -> set[str]:
    """The Docker daemons (``docker_host``; "" is $DOCKER_HOST or the local socket) the
    swarm kernelspecs among ``kernel_specs`` (KernelSpecManager.get_all_specs()) use."""
    daemons = set()
    for found in kernel_specs.values():
        provisioner = (found.get("spec", {}).get("metadata") or {}).get("kernel_provisioner") or {}
        if provisioner.get("provisioner_name") == "limited-swarm-provisioner":
            daemons.add(str((provisioner.get("config") or {}).get("docker_host") or ""))
    return daemons


def restore_from_swarm(registry: Registry, server_id: str,
                       daemons: set[str] | list[str]) -> list[str]:
    """:func:`restore_entries` on each daemon (a swarm manager); an unreachable one is
    skipped (its kernels stay in the swarm, for the next start or the reaper of another
    server). Call before adopting (recovery.adopt): a server restarted in a new container
    or on another node then adopts its swarm kernels as if its registry had survived."""
    from ..docker.client import DockerSession

    restored = []
    for docker_host in sorted(daemons):
        session = DockerSession(docker_host)
        restored += restore_entries(registry, session.call, server_id, docker_host)
    return restored
