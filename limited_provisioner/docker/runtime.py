"""The OCI runtime a kernel container runs under (``runtime``): runc, gVisor, or another.

The daemon knows its runtimes by name (``docker info``: ``Runtimes``, with each one's path
and arguments); a kernel asks for one by name and :func:`resolve` checks, before anything
is reserved, that the daemon has it and that it can run a limited kernel at all. What
changes under gVisor (``runsc``) is decided here and nowhere else:

* **The kernel's ipc sockets.** ipykernel binds its sockets in a bind-mounted dir and the
  server connects to them from the host; gVisor hides a socket made inside the sandbox
  from the host unless runsc runs with ``--host-uds=create`` (or ``all``). Without it the
  kernel would start and never answer: refused with the daemon.json line that fixes it.
* **pids.** Under gVisor the host's pids cgroup counts the sandbox's own threads (the
  ptrace platform keeps several host tasks per kernel thread), not the kernel's
  processes; at a kernel-sized value gVisor itself dies. The kernel's tasks are bounded
  by ``RLIMIT_NPROC`` inside the sandbox instead (gVisor counts threads, like Linux, and
  only the kernel's uid runs there), and the host's cgroup gets a backstop sized for
  gVisor's threads (:data:`GVISOR_HOST_TASKS_PER_TASK`).
* **the notebook's folder.** As root a folder is bound through an idmapped mount (the
  kernel writes as the folder's owner). gVisor's gofer opens and creates the kernel's
  files on the host as root, which that mount does not map: every create fails with
  EOVERFLOW. Such a start is refused, saying how to start it instead.
* **network.** Debian's runsc (2022) mistakes every network namespace for the host's on
  Linux >= 6 and refuses to start with a network; registered with ``--network=none`` it
  starts with loopback only. A kernel with ``network=True`` under such a runtime is
  refused (never silently offline).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ..errors import SandboxUnavailableError, WorkspaceError

# Host tasks gVisor's ptrace platform keeps per kernel task (measured: 200 sleeping
# processes -> 1240 host tasks), plus its own fixed set; the host cgroup's backstop.
GVISOR_HOST_TASKS_PER_TASK = 8
GVISOR_HOST_TASKS_BASE = 256
# What a runsc registration needs so the server can reach the kernel's ipc sockets.
HOST_UDS_OK = ("create", "all")

DAEMON_JSON_HINT = (
    'register it in /etc/docker/daemon.json, e.g. {"runtimes": {"runsc": {"path": '
    '"/usr/bin/runsc", "runtimeArgs": ["--platform=ptrace", "--host-uds=create", '
    '"--network=none"]}}}, then reload dockerd (kill -HUP its pid) — '
    "`.ci/setup-docker.sh` does both"
)


@dataclass(frozen=True)
class Runtime:
    """One runtime as the daemon has it registered."""

    name: str
    path: str = ""
    args: tuple[str, ...] = ()

    @property
    def gvisor(self) -> bool:
        return os.path.basename(self.path or self.name).startswith("runsc")

    def flag(self, name: str) -> str | None:
        """The value of runsc flag ``--name=value`` (or ``--name value``), else None."""
        for i, arg in enumerate(self.args):
            if arg.startswith(f"--{name}="):
                return arg.split("=", 1)[1]
            if arg == f"--{name}" and i + 1 < len(self.args):
                return self.args[i + 1]
        return None

    @property
    def host_mounts(self) -> bool:
        """A mount made in the container's mount namespace from the host is what the
        kernel sees (runc, crun); not under gVisor, whose files come through its gofer."""
        return os.path.basename(self.path or self.name) in ("runc", "crun")

    @property
    def offline(self) -> bool:
        """Registered so that no container of it can have a network."""
        return self.gvisor and self.flag("network") == "none"

    def describe(self) -> str:
        if self.gvisor:
            return f"{self.name}, {self.flag('platform') or 'default'} platform"
        return self.name


def resolve(name: str, daemon_info: dict[str, Any], *, network: bool) -> Runtime:
    """The daemon's runtime ``name``, checked for a limited kernel; raises
    SandboxUnavailableError naming what is missing and how to fix it."""
    registered = daemon_info.get("Runtimes") or {}
    if name not in registered:
        have = ", ".join(sorted(registered)) or "none listed"
        msg = (
            f"runtime {name!r} is not registered with the Docker daemon (it has: {have}); "
            + (DAEMON_JSON_HINT if name.startswith("runsc") else
               "register it in /etc/docker/daemon.json under \"runtimes\" and reload dockerd")
        )
        raise SandboxUnavailableError(msg)
    entry = registered.get(name) or {}
    runtime = Runtime(name, str(entry.get("path") or name),
                      tuple(str(a) for a in entry.get("runtimeArgs") or ()))
    if runtime.gvisor and runtime.flag("host-uds") not in HOST_UDS_OK:
        msg = (
            f"runtime {name!r} is gVisor without --host-uds=create: the server could not "
            f"reach the kernel's ipc sockets (it would start and never answer); add "
            f'"--host-uds=create" to its runtimeArgs in /etc/docker/daemon.json and reload '
            f"dockerd"
        )
        raise SandboxUnavailableError(msg)
    if network and runtime.offline:
        msg = (
            f"network=True, but runtime {name!r} is registered with --network=none (no "
            f"container of it has a network); use network=False, or a runtime registered "
            f"with a network"
        )
        raise SandboxUnavailableError(msg)
    return runtime


def check_folder(runtime: Runtime | None, folder: Any) -> None:
    """Refuse a notebook folder ``runtime`` cannot work in (``folder``: the start's
    workspace.Workspace, None for the kernel's private dir)."""
    if runtime is None or not runtime.gvisor or folder is None or not folder.uid_map:
        return
    reason = (
        f"runtime {runtime.name!r} (gVisor) cannot work in {folder.path}: the folder is "
        f"mapped to the kernel's uid by an idmapped mount, through which gVisor's gofer "
        f"(root on the host) can create no file; use workspace='private' for this "
        f"kernelspec (files go through the Jupyter file browser), or runtime='runc'"
    )
    raise WorkspaceError(reason, reason=reason)


def pids_settings(runtime: Runtime | None, pids_limit: int | None) -> dict[str, Any]:
    """How ``pids_limit`` is applied under ``runtime``: the container's ``pids_limit``
    (host cgroup) and, under gVisor, an ``nproc`` rlimit inside the sandbox."""
    if pids_limit is None:
        return {}
    if runtime is None or not runtime.gvisor:
        return {"pids_limit": pids_limit}
    return {
        "pids_limit": pids_limit * GVISOR_HOST_TASKS_PER_TASK + GVISOR_HOST_TASKS_BASE,
        "nproc": pids_limit,
    }
