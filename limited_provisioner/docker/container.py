"""The container a kernel runs in, as plain data: create arguments and labels.

Pure functions of the kernel's limits and dirs, so the security settings can be tested
without a daemon (tests/unit/test_container_settings.py) and nothing about them is
decided anywhere else.
"""

from __future__ import annotations

import errno
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import LimitConfigError
from ..limits import DATA_RLIMIT_HEADROOM, Limits
from .client import container_name, label
from .runtime import Runtime, pids_settings

# Private scratch dirs of every container (Docker gives /dev/shm its own private 64M).
SCRATCH_TMPFS = ("/tmp", "/var/tmp", "/run/lock")
# Where launch.py is bound when the kernel starts through its seccomp filter.
LAUNCHER_IN_CONTAINER = "/opt/limited-provisioner/launch.py"
# What extra_create_kwargs may add: settings that cannot widen what the kernel reaches
# (CPU pinning, names, DNS, GPUs handed out by the operator). The runtime is a trait of
# its own: it changes how limits are applied (runtime.py).
# Anything else — volumes, cap_add, pid_mode, devices, sysctls... — is refused, not
# merely the keys this module sets itself.
EXTRA_ALLOWED = frozenset({
    "cpuset_cpus", "cpuset_mems", "hostname", "domainname", "dns", "dns_opt",
    "dns_search", "extra_hosts", "platform", "stop_timeout", "healthcheck",
    "device_requests", "shm_size",
})
# Settings this module makes: the container's limits and sandbox.
PROTECTED = frozenset({
    "image", "command", "name", "user", "working_dir", "environment", "labels", "mounts",
    "read_only", "tmpfs", "ipc_mode", "log_config", "cap_drop", "security_opt", "init",
    "privileged", "ulimits", "network_mode", "mem_limit", "memswap_limit", "nano_cpus",
    "pids_limit", "detach", "stop_signal",
})


@dataclass
class ContainerSpec:
    """Everything the container of one kernel start is made of."""

    kernel_id: str
    image: str
    command: list[str]
    env: dict[str, str]
    user: str
    limits: Limits
    work: str  # its working dir: its HOME, or the folder it works in (workspace.py)
    sock: str
    conn: str
    ctl: str
    labels: dict[str, str] = field(default_factory=dict)
    extra_mounts: list[str] = field(default_factory=list)
    tmp_size: int | str = 1024**3
    log_max_size: str = "1m"
    extra_create_kwargs: dict[str, Any] = field(default_factory=dict)
    # The kernel's own dir when it works in a host folder (then ``work``).
    home: str | None = None
    # What Docker binds at ``work``: the folder, or its idmapped bind on the host.
    workspace_source: str | None = None
    workspace_read_only: bool = False
    # Start the kernel through launch.py's seccomp filter (no set-id files); the
    # launcher's host path, bound read-only into the container.
    no_setid_files: bool = False
    launcher: str | None = None
    # The operator's wheelhouse (wheelhouse.py), bound read-only at its own path.
    wheelhouse: str | None = None
    # The OCI runtime, as the daemon has it registered (None: the daemon's default).
    runtime: Runtime | None = None


def create_kwargs(spec: ContainerSpec) -> dict[str, Any]:
    """``containers.run`` arguments for ``spec``; refuses overrides of the sandbox."""
    import docker.types

    lim = spec.limits
    refused = sorted(set(spec.extra_create_kwargs) & PROTECTED)
    if refused:
        msg = (
            f"extra_create_kwargs may not override {refused}: those settings are the "
            f"container's limits and sandbox; use the matching limit traits instead"
        )
        raise LimitConfigError(msg)
    if "runtime" in spec.extra_create_kwargs:
        msg = (
            "extra_create_kwargs may not set 'runtime': set the runtime trait instead "
            f"(runtime={spec.extra_create_kwargs['runtime']!r}), which also applies the "
            "limits the way that runtime needs"
        )
        raise LimitConfigError(msg)
    unknown = sorted(set(spec.extra_create_kwargs) - EXTRA_ALLOWED)
    if unknown:
        msg = (
            f"extra_create_kwargs may not set {unknown}: only {sorted(EXTRA_ALLOWED)} are "
            f"accepted, since anything else could widen what the kernel reaches (mount "
            f"host paths with extra_mounts)"
        )
        raise LimitConfigError(msg)
    pids = pids_settings(spec.runtime, lim.pids_limit)
    ulimits = [docker.types.Ulimit(name=name, soft=value, hard=value)
               for name, value in kernel_rlimits(lim, pids.get("nproc")).items()]
    # Only the kernel's own dirs, at the same paths (ipc socket names stay valid).
    own = (spec.home or spec.work, spec.sock, spec.conn)
    mounts = [docker.types.Mount(path, path, type="bind") for path in own]
    mounts.append(docker.types.Mount(spec.ctl, spec.ctl, type="bind", read_only=True))
    if spec.workspace_source:
        # The folder it works in, at its own path (what the notebook's code names).
        mounts.append(docker.types.Mount(spec.work, spec.workspace_source, type="bind",
                                         read_only=spec.workspace_read_only))
    command = list(spec.command)
    if spec.no_setid_files and spec.launcher:
        mounts.append(docker.types.Mount(LAUNCHER_IN_CONTAINER, spec.launcher, type="bind",
                                         read_only=True))
        command = ["python3", "-I", "-S", LAUNCHER_IN_CONTAINER,
                   json.dumps({"no_setid_files": True}), "--", *command]
    if spec.wheelhouse:
        mounts.append(docker.types.Mount(spec.wheelhouse, spec.wheelhouse, type="bind",
                                         read_only=True))
    for entry in spec.extra_mounts:
        host, target, read_only = parse_mount(entry)
        mounts.append(docker.types.Mount(target, host, type="bind", read_only=read_only))
    kwargs: dict[str, Any] = {
        "image": spec.image,
        "command": command,
        "name": container_name(spec.kernel_id),
        "detach": True,
        "user": spec.user,
        "working_dir": spec.work,
        "environment": spec.env,
        "labels": spec.labels,
        "mounts": mounts,
        "read_only": True,
        "tmpfs": {p: f"size={spec.tmp_size},mode=1777,nosuid,nodev" for p in SCRATCH_TMPFS},
        "ipc_mode": "private",
        "log_config": docker.types.LogConfig(
            type="json-file", config={"max-size": spec.log_max_size, "max-file": "1"}
        ),
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "init": True,
        "privileged": False,
        "ulimits": ulimits,
        "network_mode": "bridge" if lim.network else "none",
        "stop_signal": "SIGTERM",
    }
    if lim.mem_limit is not None:
        kwargs["mem_limit"] = kwargs["memswap_limit"] = lim.mem_limit
    if lim.cpu_limit is not None:
        kwargs["nano_cpus"] = round(lim.cpu_limit * 1e9)
    if "pids_limit" in pids:
        kwargs["pids_limit"] = pids["pids_limit"]
    if spec.runtime is not None:
        kwargs["runtime"] = spec.runtime.name
    kwargs.update(spec.extra_create_kwargs)
    return kwargs


def kernel_rlimits(limits: Limits, nproc: int | None = None) -> dict[str, int]:
    """The container's ulimits (soft = hard): no core dumps, and the kernel's limits
    that rlimits carry; ``nproc`` where the runtime bounds tasks that way."""
    rlimits = {"core": 0, "nofile": limits.nofile_limit, "fsize": limits.disk_limit,
               "nproc": nproc}
    if limits.mem_limit is not None:
        # As on the process backend: one runaway allocation becomes a MemoryError the
        # kernel survives, instead of an OOM kill of the whole container.
        rlimits["data"] = limits.mem_limit + DATA_RLIMIT_HEADROOM
    return {name: value for name, value in rlimits.items() if value is not None}


def kernel_labels(
    *,
    kernel_id: str,
    owner: str,
    server_id: str,
    kernelspec: str,
    state_dir: str,
    kernel_dir: str,
    connection_file: str,
    uid: int,
    limits: Limits,
    caller_labels: dict[str, str],
) -> dict[str, str]:
    """The container's labels: who it belongs to, its limits, the caller's own labels."""
    labels = {
        label("kernel-id"): kernel_id,
        label("owner"): owner,
        label("server-id"): server_id,
        label("kernelspec"): kernelspec,
        label("created"): str(time.time()),
        label("state-dir"): state_dir,
        label("kernel-dir"): kernel_dir,
        label("connection-file"): connection_file,
        label("uid"): str(uid),
        label("network"): str(limits.network).lower(),
    }
    for name in ("mem_limit", "cpu_limit", "pids_limit", "nofile_limit", "disk_limit"):
        value = getattr(limits, name)
        labels[label(name.replace("_", "-"))] = "" if value is None else str(value)
    labels.update({label("label." + k): v for k, v in caller_labels.items()})
    return labels


def tmp_size(limits: Limits, configured: str = "") -> int | str:
    """The scratch tmpfs size: as configured, else disk_limit capped at mem_limit (tmpfs
    pages are memory)."""
    if configured:
        return configured
    size = limits.disk_limit or 1024**3
    if limits.mem_limit is not None:
        size = min(size, limits.mem_limit)
    return size


def parse_mount(spec: str) -> tuple[str, str, bool]:
    """"HOST:CONTAINER[:ro|rw]" -> (host, container, read_only); refuses bad specs."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not all(parts[:2]):
        msg = f'extra_mounts entry {spec!r} must look like "HOST_PATH:CONTAINER_PATH[:ro|rw]"'
        raise LimitConfigError(msg)
    host, target = parts[0], parts[1]
    mode = parts[2] if len(parts) == 3 else "ro"
    if mode not in ("ro", "rw"):
        msg = f"extra_mounts entry {spec!r}: mode must be ro or rw, not {mode!r}"
        raise LimitConfigError(msg)
    if not (os.path.isabs(host) and os.path.isabs(target)):
        msg = f"extra_mounts entry {spec!r}: both paths must be absolute"
        raise LimitConfigError(msg)
    if not os.path.exists(host):
        msg = f"extra_mounts entry {spec!r}: host path {host} does not exist"
        raise LimitConfigError(msg)
    return host, target, mode == "ro"


def command_errno(runtime_error: str) -> int | None:
    """The errno of the kernel command's exec in a container runtime's start error
    ("exec: "python3": executable file not found in $PATH"), None for another failure."""
    if "exec:" not in runtime_error:
        return None
    text = runtime_error.lower()
    if "executable file not found" in text or "no such file or directory" in text:
        return errno.ENOENT
    if "permission denied" in text:
        return errno.EACCES
    return None
