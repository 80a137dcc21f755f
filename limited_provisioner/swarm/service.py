"""The Swarm service one kernel runs as, as plain data: the Engine API's ServiceSpec.

A kernel on a cluster is one service (one replica, never restarted by Swarm: the
manager's restarter decides) whose task runs the kernel image with the same sandbox as
the docker backend's container (docker/container.py) — limits, read-only root, no
capabilities, non-root user, private tmpfs scratch, init, capped logs, the same labels —
built from the same :class:`~..docker.container.ContainerSpec`, so nothing about the
sandbox is decided twice. What differs, and why:

* **No host dirs.** The task may run on any node: the kernel's home is a tmpfs of
  ``disk_limit`` (hard, and counted in its memory cgroup), its connection file a Swarm
  secret (stored encrypted in the raft log, given only to the node that runs the task,
  mounted 0400 for the kernel's uid), its sockets TCP on the kernels' overlay network.
  ``extra_mounts`` and a host workspace are refused.
* **Ulimits.** The Python SDK's ``ServiceSpec`` has no ulimits: the task template is
  built here as the API's dict (``ContainerSpec.Ulimits``, API >= 1.41).
* **Resources.** ``Limits`` (memory, NanoCPUs, pids) and the same ``Reservations``
  (memory, CPU), so the scheduler places a kernel only where its limits fit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..docker.client import container_name
from ..docker.container import SCRATCH_TMPFS, ContainerSpec, kernel_rlimits
from ..errors import LimitConfigError

# The kernel's ports on its own address (each task has one on the overlay network).
KERNEL_PORTS = {"shell": 50001, "iopub": 50002, "stdin": 50003, "control": 50004,
                "hb": 50005}
# Where the kernel finds its connection file (the secret's target, under /run/secrets).
CONNECTION_SECRET_TARGET = "kernel-connection.json"
# Where the kernel finds the IPython startup hook (kernel_hook.py), a Swarm config: root's,
# read-only, the same for every kernel of a package version.
HOOK_TARGET = "/etc/limited-provisioner/hooks.py"
# Seconds Swarm waits after SIGTERM before SIGKILL when the service is removed.
STOP_GRACE_NS = 2 * 10**9


@dataclass(frozen=True)
class Placement:
    """Where the scheduler may put kernels: ``constraints`` as ``docker service create
    --constraint`` takes them ("node.labels.pool==kernels"), ``preferences`` as the
    label to spread over ("node.labels.zone")."""

    constraints: tuple[str, ...] = ()
    preferences: tuple[str, ...] = ()

    def to_api(self) -> dict[str, Any]:
        placement: dict[str, Any] = {}
        if self.constraints:
            placement["Constraints"] = list(self.constraints)
        if self.preferences:
            placement["Preferences"] = [
                {"Spread": {"SpreadDescriptor": label}} for label in self.preferences
            ]
        return placement


@dataclass(frozen=True)
class SecretRef:
    """The kernel's connection-file secret, as created (id and name)."""

    secret_id: str
    name: str


@dataclass(frozen=True)
class ConfigRef:
    """A Swarm config a kernel's task gets as a file (the startup hook), as created."""

    config_id: str
    name: str


@dataclass
class ServicePlan:
    """``create_service`` arguments of one kernel, with the parts the provisioner reads."""

    name: str
    task_template: dict[str, Any]
    labels: dict[str, str]
    endpoint_spec: dict[str, Any] = field(default_factory=lambda: {"Mode": "dnsrr"})

    def create_kwargs(self) -> dict[str, Any]:
        return {
            "task_template": self.task_template,
            "name": self.name,
            "labels": self.labels,
            "mode": {"Replicated": {"Replicas": 1}},
            "endpoint_spec": self.endpoint_spec,
        }


def service_name(kernel_id: str) -> str:
    """The kernel's service: unique in the swarm, named like its container elsewhere."""
    return container_name(kernel_id)


def refuse_host_paths(spec: ContainerSpec) -> None:
    """A task may land on any node: no host path means the same thing everywhere."""
    if spec.extra_mounts:
        msg = (f"extra_mounts {spec.extra_mounts} cannot be used by the swarm backend: "
               "a kernel may run on any node, where those host paths are other files "
               "or none; put the data in the image, or use the docker backend")
        raise LimitConfigError(msg)
    if spec.workspace_source:
        msg = ("a host folder (workspace) cannot be the working dir of a swarm kernel: it "
               "runs on another node; start it without a folder, or use the docker "
               "backend")
        raise LimitConfigError(msg)


def service_plan(
    spec: ContainerSpec, *, secret: SecretRef, networks: list[str], placement: Placement,
    hook: ConfigRef | None = None,
) -> ServicePlan:
    """The service of ``spec``'s kernel: its limits, sandbox, secret and networks.

    ``spec.work`` is the kernel's home, a tmpfs here; ``spec.command`` must name the
    connection file at ``/run/secrets/`` + :data:`CONNECTION_SECRET_TARGET` (and the
    ``hook``, if given, at :data:`HOOK_TARGET`).
    """
    refuse_host_paths(spec)
    lim = spec.limits
    uid, _, gid = spec.user.partition(":")
    tmpfs_size = spec.tmp_size if isinstance(spec.tmp_size, int) else None
    # Its home and working dir: what disk_limit bounds (a tmpfs: hard, and in memory).
    # Docker 20.10 drops a swarm tmpfs's Mode: the mount point keeps the image's owner
    # and mode, so the home is best one of the scratch dirs (1777 in every image).
    home_size = lim.disk_limit or tmpfs_size
    mounts = [_tmpfs(path, home_size if path == spec.work else tmpfs_size, 0o1777)
              for path in SCRATCH_TMPFS]
    if spec.work not in SCRATCH_TMPFS:
        mounts.append(_tmpfs(spec.work, home_size, 0o1777))
    container: dict[str, Any] = {
        "Image": spec.image,
        "Command": list(spec.command),
        "Env": [f"{k}={v}" for k, v in spec.env.items()],
        "User": spec.user,
        "Dir": spec.work,
        "Labels": dict(spec.labels),
        "ReadOnly": True,
        "Init": True,
        "Mounts": mounts,
        "CapabilityDrop": ["ALL"],
        "Ulimits": [{"Name": name, "Soft": value, "Hard": value}
                    for name, value in kernel_rlimits(lim).items()],
        "StopSignal": "SIGTERM",
        "StopGracePeriod": STOP_GRACE_NS,
        "Secrets": [{
            "SecretID": secret.secret_id, "SecretName": secret.name,
            "File": {"Name": CONNECTION_SECRET_TARGET, "UID": uid, "GID": gid or uid,
                     "Mode": 0o400},
        }],
    }
    if hook is not None:
        container["Configs"] = [{
            "ConfigID": hook.config_id, "ConfigName": hook.name,
            "File": {"Name": HOOK_TARGET, "UID": "0", "GID": "0", "Mode": 0o444},
        }]
    limits: dict[str, Any] = {}
    reservations: dict[str, Any] = {}
    if lim.mem_limit is not None:
        limits["MemoryBytes"] = reservations["MemoryBytes"] = lim.mem_limit
    if lim.cpu_limit is not None:
        limits["NanoCPUs"] = reservations["NanoCPUs"] = round(lim.cpu_limit * 1e9)
    if lim.pids_limit is not None:
        limits["Pids"] = lim.pids_limit
    task: dict[str, Any] = {
        "ContainerSpec": container,
        "Resources": {"Limits": limits, "Reservations": reservations},
        # Swarm never starts the kernel again on its own: the manager's restarter does,
        # counting attempts, with the reason of each death.
        "RestartPolicy": {"Condition": "none", "MaxAttempts": 0},
        "Placement": placement.to_api(),
        "Networks": [{"Target": net} for net in networks],
        "LogDriver": {"Name": "json-file",
                      "Options": {"max-size": spec.log_max_size, "max-file": "1"}},
    }
    return ServicePlan(name=service_name(spec.kernel_id), task_template=task,
                       labels=dict(spec.labels))


def _tmpfs(target: str, size: int | None, mode: int) -> dict[str, Any]:
    options: dict[str, Any] = {"Mode": mode}
    if size is not None:
        options["SizeBytes"] = size
    return {"Type": "tmpfs", "Target": target, "TmpfsOptions": options}
