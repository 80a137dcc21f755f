"""swarm/records.py: which records become registry entries on a restarted server, which
go, and what a restored entry and its connection files hold -- over an in-memory swarm
that answers the Engine API calls records.py makes (the real swarm: tests/test_swarm.py).
"""

from __future__ import annotations

import base64
import json
import os
import stat
import time
from datetime import datetime, timezone

import pytest

from limited_provisioner.docker.client import label
from limited_provisioner.registry import Registry
from limited_provisioner.swarm import records
from limited_provisioner.swarm.slots import STALE_AFTER

ME, OTHER = "server-me", "server-other"


class FakeSwarm:
    """Services, configs and secrets with labels; ``call`` is DockerSession.call's shape."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, dict]] = {"service": {}, "config": {}, "secret": {}}
        self.removed: list[tuple[str, str]] = []

    def add(self, kind: str, name: str, labels: dict, data: bytes = b"",
            created: float | None = None) -> str:
        oid = f"{kind}-{len(self.objects[kind])}-{name}"
        when = datetime.fromtimestamp(created or time.time(), timezone.utc)
        self.objects[kind][oid] = {
            "ID": oid, "CreatedAt": when.strftime("%Y-%m-%dT%H:%M:%S.%f123Z"),
            "Spec": {"Name": name, "Labels": labels,
                     "Data": base64.b64encode(data).decode()},
        }
        return oid

    def _matches(self, obj: dict, filters: dict) -> bool:
        wanted = filters.get("label", [])
        for want in [wanted] if isinstance(wanted, str) else wanted:
            key, _, value = want.partition("=")
            labels = obj["Spec"]["Labels"]
            if key not in labels or (value and labels[key] != value):
                return False
        return "name" not in filters or obj["Spec"]["Name"] == filters["name"]

    def call(self, method: str, *args, **kwargs):
        if method.startswith("remove_"):
            kind = method.removeprefix("remove_")
            self.objects[kind].pop(args[0])
            self.removed.append((kind, args[0]))
            return None
        if method == "create_config":
            import docker.errors

            name, data = args
            if not 0 < len(data) < 1024000:
                # Docker 20.10's own rule (the heartbeat once sent b"" and never beat).
                raise docker.errors.APIError(
                    "config data must be larger than 0 and less than 1024000 bytes",
                    response=_Response(400))
            if any(c["Spec"]["Name"] == name for c in self.objects["config"].values()):
                raise docker.errors.APIError("exists", response=_Response(409))
            return {"ID": self.add("config", name, kwargs["labels"], data)}
        kind = method.removesuffix("s")
        filters = kwargs.get("filters") or {}
        return [o for o in self.objects[kind].values() if self._matches(o, filters)]


class _Response:
    def __init__(self, status_code: int) -> None:
        self.status_code = status_code
        self.reason = "Conflict"


def entry(kernel_id: str, server_id: str) -> dict:
    return {
        "kernel_id": kernel_id, "server_id": server_id, "backend": "swarm",
        "state": "running", "owner": "alice", "kernel_name": "swarm-small",
        "limits": {"mem_limit": 256 * 2**20}, "created": time.time() - 60,
        # What was the old host's: never carried over.
        "pid": 4242, "server_pid": 99, "connection_file": "/old/host/connection.json",
        "kernel_dir": "/old/host/kernels/x", "service_id": "old-service",
    }


CLIENT = {"transport": "ipc", "ip": "/old/host/clients/x/c", "shell_port": 1,
          "key": "k" * 64, "signature_scheme": "hmac-sha256"}
KERNEL = {"transport": "tcp", "ip": "0.0.0.0", "shell_port": 50001, "key": "k" * 64,
          "curve_publickey": "P" * 40, "curve_secretkey": "S" * 40}


def kernel(swarm: FakeSwarm, kernel_id: str, server_id: str, *, service: bool,
           made: float | None = None) -> None:
    """A kernel as its first start leaves it: a record, and (while alive) a service, a
    secret and a slot."""
    records.write(swarm.call, entry(kernel_id, server_id), CLIENT, KERNEL)
    if made is not None:
        for config in swarm.objects["config"].values():
            if config["Spec"]["Name"] == records.record_name(kernel_id):
                config["CreatedAt"] = datetime.fromtimestamp(made, timezone.utc).strftime(
                    "%Y-%m-%dT%H:%M:%S.%fZ")
    labels = {label("kernel-id"): kernel_id, label("server-id"): server_id}
    swarm.add("secret", f"secret-{kernel_id}", labels)
    swarm.add("config", f"limited-provisioner.slot.all.{kernel_id[-1]}",
              {label("slot"): "", label("kernel-id"): kernel_id})
    if service:
        swarm.add("service", f"limited-kernel-{kernel_id}", labels)


def names(swarm: FakeSwarm, kind: str) -> set[str]:
    return {o["Spec"]["Name"] for o in swarm.objects[kind].values()}


def test_a_record_is_written_once_and_holds_nothing_of_the_old_host():
    swarm = FakeSwarm()
    assert records.write(swarm.call, entry("k1", ME), CLIENT, KERNEL)
    assert not records.write(swarm.call, entry("k1", ME), CLIENT, KERNEL)  # a restart
    (record,) = records.read_records(swarm.call, ME)
    assert not set(records.HOST_FIELDS) & set(record["entry"])
    assert record["kernel_connection"] == KERNEL
    assert abs(record["made"] - time.time()) < 5


def test_a_restarted_server_gets_entries_for_its_live_kernels_only(tmp_path):
    swarm, registry = FakeSwarm(), Registry(tmp_path / "state")
    kernel(swarm, "live-1", ME, service=True)
    kernel(swarm, "dead-2", ME, service=False)
    kernel(swarm, "other-3", OTHER, service=True)

    assert records.restore_entries(registry, swarm.call, ME, "tcp://manager:2375") == ["live-1"]

    restored = registry.read("live-1")
    assert restored["state"] == "running" and restored["owner"] == "alice"
    assert restored["docker_host"] == "tcp://manager:2375"
    assert "pid" not in restored and "server_pid" not in restored
    client_file = registry.clients_dir / "live-1" / "connection.json"
    assert restored["connection_file"] == str(client_file)
    # The client sockets are bound again in this host's client dir.
    assert json.loads(client_file.read_text())["ip"] == str(registry.clients_dir / "live-1" / "c")
    kernel_file = registry.kernels_dir / "live-1" / "conn" / "connection.json"
    assert json.loads(kernel_file.read_text()) == KERNEL
    for path in (client_file, kernel_file):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    # Its own kernel that died while it was down: every trace goes. Another server's
    # kernel: not touched, not restored here.
    assert registry.read("dead-2") is None and registry.read("other-3") is None
    assert names(swarm, "secret") == {"secret-live-1", "secret-other-3"}
    assert records.record_name("dead-2") not in names(swarm, "config")
    assert "limited-provisioner.slot.all.2" not in names(swarm, "config")
    assert records.record_name("other-3") in names(swarm, "config")


def test_an_entry_this_host_still_has_is_left_to_adoption(tmp_path):
    swarm, registry = FakeSwarm(), Registry(tmp_path / "state")
    kernel(swarm, "live-1", ME, service=True)
    registry.write("live-1", {"kernel_id": "live-1", "pid": 1, "note": "this host's"})
    assert records.restore_entries(registry, swarm.call, ME) == []
    assert registry.read("live-1")["note"] == "this host's"


@pytest.mark.parametrize("age, record_goes", [(10, False), (STALE_AFTER + 60, True)])
def test_another_servers_record_without_a_service_goes_only_when_stale(
    tmp_path, age, record_goes
):
    swarm, registry = FakeSwarm(), Registry(tmp_path / "state")
    kernel(swarm, "gone-1", OTHER, service=False, made=time.time() - age)
    records.restore_entries(registry, swarm.call, ME)
    assert (records.record_name("gone-1") not in names(swarm, "config")) == record_goes
    # Its slot and secret are its server's to release: it may be mid-restart.
    assert "limited-provisioner.slot.all.1" in names(swarm, "config")
    assert "secret-gone-1" in names(swarm, "secret")


def test_a_malformed_or_oversized_record_is_skipped():
    swarm = FakeSwarm()
    labels = {label("record"): "1", label("server-id"): ME}
    swarm.add("config", "limited-provisioner.kernel.bad", labels, b"{not json")
    swarm.add("config", "limited-provisioner.kernel.big", labels,
              json.dumps({"entry": {"kernel_id": "x" * records.MAX_RECORD * 2}}).encode())
    swarm.add("config", "limited-provisioner.kernel.noid", labels, b'{"entry": {}}')
    assert records.read_records(swarm.call, ME) == []


def test_list_shows_every_servers_swarm_kernels_with_their_state():
    swarm = FakeSwarm()
    kernel(swarm, "live-1", ME, service=True)
    kernel(swarm, "dead-2", OTHER, service=False)
    rows = {r["kernel_id"]: r for r in records.swarm_kernels(swarm.call)}
    assert {k: (r["state"], r["server_id"]) for k, r in rows.items()} == {
        "live-1": ("running", ME), "dead-2": ("dead", OTHER)}
    assert rows["live-1"]["service_id"] and rows["dead-2"]["service_id"] is None


def test_the_daemons_of_swarm_kernelspecs():
    def spec(name, config=None):
        return {"spec": {"metadata": {"kernel_provisioner": {
            "provisioner_name": name, "config": config or {}}}}}

    specs = {"a": spec("limited-swarm-provisioner"),
             "b": spec("limited-swarm-provisioner", {"docker_host": "tcp://m:2375"}),
             "c": spec("limited-docker-provisioner", {"docker_host": "tcp://d:2375"}),
             "d": {"spec": {"metadata": {}}}}
    assert records.swarm_daemons(specs) == {"", "tcp://m:2375"}
