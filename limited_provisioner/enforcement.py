"""One enforcement plan per kernel start: which mechanism enforces each limit, and the
text reported for it.

Decided once, from what the host offers (cgroups, root, namespaces) or what the backend
is (a container); then the launch spec, the watchdog and ``get_provisioner_info()``
all read the same :class:`EnforcementPlan`, so what is reported is what is done. A
limit nothing enforces is reported as ``NOT enforced`` — never claimed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .limits import Limits, format_size

if TYPE_CHECKING:
    from .workfs import WorkFs

# Mechanisms (the first word of a Measure): what the launch spec and the watchdog ask for.
CGROUP, RLIMIT, WATCHDOG, NICE, CONTAINER = "cgroup", "rlimit", "watchdog", "nice", "container"
# The kernel's own filesystem (workfs.py): disk_limit / files_limit without a watchdog.
FILESYSTEM = "filesystem"
PROXY, PROVISIONER, NAMESPACE, NONE = "proxy", "provisioner", "namespace", "none"
# Known only by its text (an adopted kernel's plan, read back from its registry entry).
REPORTED = "reported"


@dataclass(frozen=True)
class Measure:
    mechanism: str
    text: str


@dataclass(frozen=True)
class CgroupOffer:
    """What the host's cgroups give one kernel (``KernelCgroups.offer()``)."""

    controllers: frozenset[str] = frozenset()
    version: int = 1
    # A v2 subtree delegated to the server's user: the kernel runs as that user and owns
    # the files its limits are written in, so it could raise them.
    delegated: bool = False
    # memory.swap.max / memsw set, or a host without swap.
    no_swap: bool = True
    # {controller: why the kernel's group does not have it} (said in the best-effort
    # texts).
    missing: Mapping[str, str] = field(default_factory=dict)

    def names(self, v1: str, v2: str) -> str:
        """The interface file that carries a limit, on this hierarchy."""
        return f"cgroup v2 {v2}" if self.version == 2 else f"cgroup {v1}"

    def hard(self, files: str, later: str = "") -> str:
        """The text of a limit a cgroup enforces; in a delegated group, with what the
        kernel (the group's owner) could still do about it."""
        caveat = (
            "; hard against runaway code, but the kernel runs as your user in your "
            "delegated cgroup and could raise it or leave the group (a raised limit is "
            "put back at the next watchdog round)" if self.delegated else ""
        )
        return f"hard ({files}{caveat}){later}"

    def why_not(self, controller: str) -> str:
        """": <why there is no group for controller>" for a best-effort text, or ""."""
        reason = self.missing.get(controller)
        return f": {reason}" if reason else ""


class EnforcementPlan:
    """``{limit or property: Measure}`` for one kernel process or container."""

    def __init__(self, measures: dict[str, Measure] | None = None):
        self.measures: dict[str, Measure] = dict(measures or {})

    @classmethod
    def from_report(
        cls, report: dict[str, str], mechanisms: dict[str, str] | None = None
    ) -> EnforcementPlan:
        """The plan of a kernel started elsewhere, as its registry entry recorded it."""
        mechanisms = mechanisms or {}
        return cls({
            name: Measure(mechanisms.get(name, REPORTED), text) for name, text in report.items()
        })

    def mechanisms(self) -> dict[str, str]:
        return {name: m.mechanism for name, m in self.measures.items()}

    def set(self, name: str, mechanism: str, text: str) -> None:
        self.measures[name] = Measure(mechanism, text)

    def uses(self, name: str, mechanism: str) -> bool:
        measure = self.measures.get(name)
        return measure is not None and measure.mechanism == mechanism

    def report(self) -> dict[str, str]:
        """What ``get_provisioner_info()["enforcement"]`` and the registry show."""
        return {name: m.text for name, m in self.measures.items()}

    def describe(self) -> str:
        return "; ".join(f"{name}: {text}" for name, text in sorted(self.report().items()))


def identity_measure(uid: int | None, server_uid: int, in_container: bool = False) -> Measure:
    if uid is None:
        if in_container:
            return Measure(NONE, f"server user's uid {server_uid} in the container (not root)")
        return Measure(NONE, f"server user (uid {server_uid}): not root, cannot switch")
    where = "per kernel, container user" if in_container else "per kernel"
    return Measure(NAMESPACE, f"uid/gid {uid} (unprivileged, {where}, host-wide unique)")


def shared_measures(
    limits: Limits,
    *,
    exec_timeout_grace: float,
    max_lifetime: float,
    output_limit: int | None,
    max_message_size: int,
) -> dict[str, Measure]:
    """What the server enforces itself, the same on every backend (proxy and timers)."""
    result = {
        "connections": Measure(
            PROXY,
            "through the server's proxy: clients connect in a server-only dir; the kernel's "
            "sockets are checked (type, owner) in its frozen socket dir before use; every "
            "message from the kernel is HMAC-verified before it is forwarded; messages over "
            f"{format_size(max_message_size)} are dropped",
        )
    }
    if output_limit:
        result["output_limit"] = Measure(
            PROXY,
            f"enforced by the proxy ({format_size(output_limit)} of IOPub output per "
            "execution, whatever sends it)",
        )
    if limits.idle_timeout:
        result["idle_timeout"] = Measure(
            PROVISIONER,
            f"enforced by the provisioner ({limits.idle_timeout:g}s without a client request "
            "seen by the proxy; never while an execution is pending)",
        )
    if limits.exec_timeout:
        result["exec_timeout"] = Measure(
            PROVISIONER,
            f"enforced by the provisioner (SIGINT after {limits.exec_timeout:g}s, restart "
            f"after {exec_timeout_grace:g}s more)",
        )
    if max_lifetime:
        result["max_lifetime"] = Measure(
            PROVISIONER, f"enforced by the provisioner ({max_lifetime:g}s)"
        )
    return result


def disk_measures(
    limits: Limits,
    workfs: WorkFs | None,
    *,
    per_file: str,
    extra: str = "",
    disk_interval: float = 2.0,
    cwd_elsewhere: bool = False,
) -> dict[str, Measure]:
    """disk_limit and files_limit, the same way on both backends.

    ``workfs`` is the kernel's own filesystem (hard: ENOSPC, nothing over the limit) or
    why it has none (None: not decided, e.g. a plan made without a kernel dir): then the
    watchdog measures every ``disk_interval`` seconds and a fast writer overshoots.
    ``per_file`` names the per-file cap, ``extra`` what else caps scratch space;
    ``cwd_elsewhere``: the kernel works in a folder of the host (its workspace),
    which only the watchdog can measure.
    """
    result: dict[str, Measure] = {}
    every = f"every {disk_interval:g} s"
    if workfs is not None and workfs.hard:
        own = workfs.describe()
        if cwd_elsewhere:
            where = (f"hard in its home, connection and socket dirs ({own}); best-effort in its "
                     f"working dir (watchdog {every}: a host folder, its workspace)")
            if limits.disk_limit is not None:
                result["disk_limit"] = Measure(
                    WATCHDOG, f"{where}; hard per file ({per_file}){extra}"
                )
            if limits.files_limit is not None:
                result["files_limit"] = Measure(WATCHDOG, where)
            return result
        if limits.disk_limit is not None:
            result["disk_limit"] = Measure(
                FILESYSTEM,
                f"hard ({own}: work, connection and socket dirs; per file: {per_file}{extra})",
            )
        if limits.files_limit is not None:
            result["files_limit"] = Measure(
                FILESYSTEM, f"hard ({own}: {workfs.files} files and dirs)"
            )
        return result
    why = f"; no own filesystem: {workfs.why_not}" if workfs is not None else ""
    if limits.disk_limit is not None:
        result["disk_limit"] = Measure(
            WATCHDOG, f"hard per file ({per_file}); best-effort total (watchdog on work dir "
            f"{every}{why}{extra})"
        )
    if limits.files_limit is not None:
        result["files_limit"] = Measure(
            WATCHDOG, f"best-effort (watchdog on work dir {every}{why})"
        )
    return result


def process_plan(
    limits: Limits,
    *,
    cgroups: CgroupOffer | Iterable[str],
    own_uid: bool,
    isolated: bool,
    netns: bool,
    nice: int,
    cpu_grace: float,
    scratch_dirs: Iterable[str],
    workfs: WorkFs | None = None,
    disk_interval: float = 2.0,
    host_folder: bool = False,
) -> EnforcementPlan:
    """The plan of a local kernel process, from the cgroups that could be set up (a
    :class:`CgroupOffer`, or v1 controller names), whether it runs as its own uid, in
    private namespaces, and in a network namespace, and whether its dirs are a filesystem
    of its own (``workfs``)."""
    offer = cgroups if isinstance(cgroups, CgroupOffer) else CgroupOffer(frozenset(cgroups))
    groups = offer.controllers
    plan = EnforcementPlan()
    if limits.mem_limit is not None:
        if "memory" in groups:
            swap = "no swap" if offer.no_swap else "swap not limited: no swap accounting"
            files = offer.names("memory.limit_in_bytes", "memory.max")
            plan.set("mem_limit", CGROUP, offer.hard(f"{files}, {swap}"))
        else:
            plan.set("mem_limit", WATCHDOG,
                     "best-effort (watchdog on the tree's RSS, RLIMIT_DATA per process; "
                     f"no memory cgroup{offer.why_not('memory')})")
    if limits.cpu_limit is not None:
        if "cpu" in groups:
            later = f" from {cpu_grace:g}s after launch" if cpu_grace > 0 else ""
            plan.set("cpu_limit", CGROUP,
                     offer.hard(offer.names("cpu.cfs_quota_us", "cpu.max"), later))
        else:
            plan.set("cpu_limit", NICE,
                     f"best-effort (nice {nice}; no writable cpu cgroup{offer.why_not('cpu')})")
    if limits.pids_limit is not None:
        if "pids" in groups:
            plan.set("pids_limit", CGROUP, offer.hard(offer.names("pids.max", "pids.max")))
        elif own_uid:
            plan.set("pids_limit", RLIMIT, "hard (RLIMIT_NPROC on the kernel's own uid)")
        else:
            plan.set("pids_limit", RLIMIT,
                     "best-effort (RLIMIT_NPROC counts every process of the server user; "
                     f"no pids cgroup{offer.why_not('pids')})")
    if limits.nofile_limit is not None:
        plan.set("nofile_limit", RLIMIT, "hard (RLIMIT_NOFILE, per process)")
    scratch = (
        "; host filesystem read-only; private size-capped tmpfs on " + ", ".join(scratch_dirs)
        if isolated else ""
    )
    plan.measures.update(disk_measures(
        limits, workfs, per_file="RLIMIT_FSIZE", extra=scratch, disk_interval=disk_interval,
        cwd_elsewhere=host_folder,
    ))
    if isolated:
        plan.set("isolation", NAMESPACE,
                 "private PID, IPC and mount namespaces (other kernels' processes invisible, "
                 "SysV IPC gone with the kernel, host filesystem read-only except its work "
                 "dir); stdout/stderr to a capped log")
    else:
        plan.set("isolation", NONE,
                 "NOT enforced (needs root): the kernel runs as the server's user and can "
                 "see and touch what the server can")
    if limits.network:
        plan.set("network", NONE, "allowed (network=True)")
    elif netns:
        plan.set("network", NAMESPACE, "hard (empty network namespace, ipc transport)")
    else:
        plan.set("network", NONE, "NOT enforced (needs root for a network namespace)")
    return plan


def container_plan(
    limits: Limits, *, log_max_size: str, workfs: WorkFs | None = None,
    disk_interval: float = 2.0, host_folder: bool = False, runtime: Any = None,
) -> EnforcementPlan:
    """The plan of a kernel container: the runtime enforces the resource limits; disk and
    files the kernel's own filesystem (bind-mounted) where the host allows it.
    ``runtime``: the daemon's runtime (docker/runtime.py), None for the default."""
    plan = EnforcementPlan()
    gvisor = runtime is not None and runtime.gvisor
    hard = {
        "mem_limit": "hard (container memory, memswap = memory: no swap)",
        "cpu_limit": "hard (container nano_cpus)",
        "pids_limit": "hard (container pids_limit)",
        "nofile_limit": "hard (ulimit nofile)",
    }
    if gvisor:
        # Measured under runsc: RLIMIT_DATA is not applied, so an allocation past the
        # limit is an OOM kill of the sandbox, reported as such, never a MemoryError.
        hard["mem_limit"] = ("hard (container memory around the whole gVisor sandbox; "
                             "an overrun ends the kernel: no MemoryError)")
        hard["pids_limit"] = ("hard (RLIMIT_NPROC inside the gVisor sandbox: processes "
                              "and threads; the host's pids cgroup bounds gVisor's own)")
        hard["nofile_limit"] = "hard (ulimit nofile, applied by gVisor)"
    for name, text in hard.items():
        if getattr(limits, name) is not None:
            plan.set(name, CONTAINER, text)
    plan.measures.update(disk_measures(
        limits, workfs, per_file="ulimit fsize", extra="; /tmp: size-capped tmpfs",
        disk_interval=disk_interval, cwd_elsewhere=host_folder,
    ))
    if limits.network:
        plan.set("network", NONE, "allowed (bridge network, network=True)")
    else:
        plan.set("network", CONTAINER, "hard (--network=none, ipc transport over a bind mount)")
    plan.set("filesystem", CONTAINER,
             "read-only root, cap_drop ALL, no-new-privileges, init process; only the "
             "kernel's work, socket and connection dirs (and, read-only, the control dir) "
             "mounted")
    plan.set("isolation", CONTAINER,
             (f"gVisor ({runtime.describe()}): the kernel's system calls served by a "
              "user-space kernel; " if gvisor else "")
             + "container: private PID and IPC namespaces; private size-capped tmpfs /tmp, "
             "/var/tmp, /run/lock and Docker's /dev/shm (64M unless shm_size); json log capped at "
             f"{log_max_size}")
    return plan


def swarm_plan(limits: Limits, *, log_max_size: str) -> EnforcementPlan:
    """The plan of a kernel running as a Swarm service (swarm/service.py): the node's
    container runtime enforces what the task template asks; what the Engine API 1.41 a
    task template cannot ask is reported, never claimed."""
    plan = EnforcementPlan()
    hard = {
        # Swarm sets no memswap: the node's swap, if it has any, is not counted.
        "mem_limit": ("hard (task memory limit, and the same reservation: the scheduler "
                      "places the kernel where it fits; swap is the node's setting)"),
        "cpu_limit": "hard (task NanoCPUs, and the same reservation)",
        "pids_limit": "hard (task pids limit)",
        "nofile_limit": "hard (ulimit nofile)",
    }
    for name, text in hard.items():
        if getattr(limits, name) is not None:
            plan.set(name, CONTAINER, text)
    if limits.disk_limit is not None:
        plan.set("disk_limit", CONTAINER,
                 f"hard (home and work dir /tmp: a tmpfs of {format_size(limits.disk_limit)}, "
                 "counted in the kernel's memory; per file: ulimit fsize; /var/tmp, "
                 "/run/lock: size-capped tmpfs)")
    if limits.files_limit is not None:
        plan.set("files_limit", NONE,
                 "NOT enforced (a task's tmpfs takes no inode count before Engine API "
                 "1.46; its size bounds what files can hold)")
    if limits.network:
        plan.set("network", NONE, "allowed (the kernels' overlay network with a way out)")
    else:
        plan.set("network", CONTAINER,
                 "hard (an --internal overlay network: no route out; its peers need the "
                 "kernel's CurveZMQ key to talk to it)")
    plan.set("filesystem", CONTAINER,
             "read-only root, cap_drop ALL, init process; no host path mounted (the "
             "connection file is a Swarm secret); no-new-privileges NOT available to "
             "services (Engine API 1.41): a set-id file of the image gains no capability")
    plan.set("isolation", CONTAINER,
             "a Swarm task on a node the scheduler picked: private PID and IPC namespaces; "
             f"private size-capped tmpfs /tmp, /var/tmp, /run/lock; json log capped at "
             f"{log_max_size}")
    return plan
