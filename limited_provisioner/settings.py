"""The configuration surface of every limited kernel, both backends: traits only.

Set them in a kernelspec (``metadata.kernel_provisioner.config``) for one kind of
kernel, or in Jupyter config as ``c.LimitedProvisioner.<name>`` for all of them
(``c.LimitedProcessProvisioner`` / ``c.LimitedDockerProvisioner`` for one backend).
``c.LimitedProvisionerMixin.<name>`` (the section's name before 0.2) still works, with
a deprecation warning. Limits are parsed into one :class:`~limited_provisioner.limits.Limits`
when a provisioner is built; nothing reads these traits for decisions afterwards.
"""

from __future__ import annotations

import copy
import getpass
import logging
import os
import re
from typing import Any

from traitlets import (
    Bool,
    Dict,
    Float,
    Int,
    List,
    Tuple,
    Unicode,
    default,
    observe,
    validate,
)
from traitlets.config import Config, LoggingConfigurable

from .errors import LimitConfigError
from .kernel_env import DEFAULT_ENV_KEEP
from .limits import (
    MIN_DISK_LIMIT,
    MIN_MEM_LIMIT,
    MIN_NOFILE_LIMIT,
    MIN_PIDS_LIMIT,
    ByteSize,
    Cores,
    Count,
    Seconds,
    Switch,
)
from .logs import follow_parent_log, get_logger
from .wheelhouse import validate_setting as wheelhouse_setting
from .workspace import validate_setting as workspace_setting

# Settings that are one per host (host.py); the legacy section held them too.
HOST_SETTINGS = ("state_dir", "server_id", "reap_interval")
LABEL_KEY = re.compile(r"[A-Za-z0-9._-]{1,64}")
LEGACY_SECTION = "LimitedProvisionerMixin"
OWN_FILESYSTEM = ("auto", "required", "off")


class LimitedSettings(LoggingConfigurable):
    """Limits, caps, identity and timers of a limited kernel (see the module doc)."""

    @classmethod
    def section_names(cls) -> list[str]:
        # Config sections read, lowest priority first: the legacy name, then the
        # classes of the MRO (this traits-only class is not a section of its own).
        names = [name for name in super().section_names() if name != "LimitedSettings"]
        return [LEGACY_SECTION, *names]

    def _load_config(self, cfg: Config, section_names: Any = None, traits: Any = None) -> None:
        # Host-wide settings in the legacy section are LimitedHost's now (host.py reads
        # them from there): kernels take them from the host, so both always agree.
        if cfg._has_section(LEGACY_SECTION) and set(cfg[LEGACY_SECTION]) & set(HOST_SETTINGS):
            cfg = copy.deepcopy(cfg)
            for name in HOST_SETTINGS:
                cfg[LEGACY_SECTION].pop(name, None)
        super()._load_config(cfg, section_names, traits)

    @default("log")
    def _log_default(self) -> logging.Logger:
        # Our own name (not the parent's "ServerApp" or "traitlets"), in the server's log
        # all the same (logs.py).
        follow_parent_log(self)
        return get_logger(type(self).__module__)

    mem_limit = ByteSize(
        "2G",
        minimum=MIN_MEM_LIMIT,
        help="""Memory the kernel's whole process tree may use, in bytes or with a unit
        ("512M", "2G"); null for unlimited. Default 2G. Enforced with a cgroup (no swap)
        where the host allows it, else by a watchdog on the tree's resident memory.""",
    ).tag(config=True)

    cpu_limit = Cores(
        1.0,
        help="""CPU cores the kernel's tree may use (0.5 = half a core, 2 = two cores);
        null for unlimited. Default 1. Throttles, never kills.""",
    ).tag(config=True)

    pids_limit = Count(
        256,
        minimum=MIN_PIDS_LIMIT,
        help="""Maximum number of processes and threads in the kernel's tree; forks past
        it fail with EAGAIN. Stops fork bombs. Default 256.""",
    ).tag(config=True)

    nofile_limit = Count(
        1024,
        minimum=MIN_NOFILE_LIMIT,
        help="""Maximum open file descriptors per kernel process (RLIMIT_NOFILE).
        Default 1024.""",
    ).tag(config=True)

    disk_limit = ByteSize(
        "10G",
        minimum=MIN_DISK_LIMIT,
        help="""Bytes the kernel may write into its work dir, and the largest single
        file it may write anywhere (RLIMIT_FSIZE). Default 10G; null for unlimited.""",
    ).tag(config=True)

    files_limit = Count(
        50000,
        minimum=16,
        help="""Maximum number of files and directories in the kernel's work dir
        (stops inode exhaustion). Default 50000.""",
    ).tag(config=True)

    own_filesystem = Unicode(
        "auto",
        help="""Whether a kernel's work, connection and socket dirs are a filesystem of
        their own (a sparse ext4 image of disk_limit bytes and files_limit inodes, loop-mounted),
        so writes past disk_limit / files_limit fail with ENOSPC at once instead of being
        noticed by the watchdog seconds (and gigabytes) later. "auto" (default): where the
        host allows it (root, /dev/loop-control, mkfs.ext4), else the watchdog, reported
        as best-effort. "required": refuse to start a kernel without it. "off": the
        watchdog only. Nothing is made when disk_limit is null.""",
    ).tag(config=True)

    @validate("own_filesystem")
    def _validate_own_filesystem(self, proposal: dict) -> str:
        value = str(proposal["value"]).strip().lower()
        if value not in OWN_FILESYSTEM:
            msg = (
                f"own_filesystem={proposal['value']!r} must be one of "
                f"{', '.join(map(repr, OWN_FILESYSTEM))}"
            )
            raise LimitConfigError(msg)
        return value

    network = Switch(
        False,
        help="""Whether the kernel may use the network. Default false: the kernel gets an
        empty network namespace and talks to Jupyter over ipc sockets.""",
    ).tag(config=True)

    exec_timeout = Seconds(
        0,
        help="""Seconds a single execution may run before it is interrupted; 0 (default)
        disables. Accepts "90s", "5m".""",
    ).tag(config=True)

    idle_timeout = Seconds(
        3600,
        help="""Seconds without activity after which a kernel is shut down; 0 disables.
        Default 3600 (1 hour).""",
    ).tag(config=True)

    keep_files_for = Seconds(
        0,
        help="""Seconds ("1h") an idle-culled kernel's work dir is kept for the next kernel
        with the same owner and keep_files_label value (an agent backend's session that
        comes back): that kernel starts with the files, owned by its own uid. Only a
        cull for idle_timeout keeps them; a shutdown a client asks for (an agent's
        DELETE), max_lifetime and the orphan reaper delete them as before. The reaper
        deletes kept files nobody took back in time. 0 (default): delete at cull.""",
    ).tag(config=True)

    keep_files_label = Unicode(
        "session_id",
        help="""The label (start_kernel(labels={...})) that, with the owner, says which
        later kernel gets an idle-culled kernel's kept files (keep_files_for). A kernel
        without it keeps nothing. Default "session_id".""",
    ).tag(config=True)

    kept_files_budget = ByteSize(
        "20G",
        help="""Disk one owner's kept files (keep_files_for) may take on the state dir's
        filesystem; keeping more evicts that owner's oldest kept files first, and files
        larger than the budget alone are not kept. null = no cap. Default 20G.""",
    ).tag(config=True)

    max_kernels = Count(
        None,
        help="""Maximum number of limited kernels running on this host, counted across
        every server that shares the state dir. null (default) = no cap.""",
    ).tag(config=True)

    max_kernels_per_user = Count(
        None,
        help="""Maximum number of limited kernels one owner may run on this host.
        null (default) = no cap.""",
    ).tag(config=True)

    output_limit = ByteSize(
        "10M",
        help="""Bytes of output (stream, display data, results, any IOPub message) one
        execution may send to clients; the rest of that cell's output is dropped with a
        one-line notice, so a print loop or raw IOPub sends cannot flood Jupyter or a
        client's memory. Counted by the server's proxy, whatever the kernel does. null =
        unlimited. Default 10M.""",
    ).tag(config=True)

    max_message_size = ByteSize(
        "32M",
        minimum=1024 * 1024,
        help="""Largest message (all frames) the server forwards from a kernel on any
        channel; a bigger output is dropped by the proxy with a notice in the cell (the
        execution still ends normally), and a kernel that sends more than 4 times this in
        one message is disconnected by the transport. Bounds what one kernel can make the
        server hold in memory. Default 32M.""",
    ).tag(config=True)

    mem_budget = ByteSize(
        None,
        help="""Sum of mem_limit over all live limited kernels on this host; a start that
        would exceed it is refused. Default: mem_budget_fraction of host memory. A kernel
        with mem_limit=null reserves the whole budget.""",
    ).tag(config=True)

    mem_budget_fraction = Float(
        0.8,
        help="Fraction of host memory used as mem_budget when mem_budget is not set.",
    ).tag(config=True)

    min_free_disk = ByteSize(
        "1G",
        help="""Refuse a start when less than this is free where kernels write (the state
        dir; Docker's data root for containers). null disables. Default 1G.""",
    ).tag(config=True)

    max_starts_per_minute = Count(
        None,
        help="""Kernel starts one owner may make per minute, host-wide; stops a runaway
        client churning kernels. null (default) = no limit.""",
    ).tag(config=True)

    owner = Unicode(
        help="""Who the kernel belongs to, for per-user caps and listings. Resolved in this
        order: this setting (kernelspec config or Jupyter config); the start's
        LIMITED_PROVISIONER_OWNER env entry if allow_owner_from_start_env; the server
        environment variable named by owner_env ($JUPYTERHUB_USER); the OS user running
        the server. Per-user caps are only as trustworthy as that source.""",
    ).tag(config=True)

    @default("owner")
    def _default_owner(self) -> str:
        if self.owner_env and os.environ.get(self.owner_env):
            return os.environ[self.owner_env]
        return getpass.getuser()

    owner_env = Unicode(
        "JUPYTERHUB_USER",
        help="""Server environment variable that names the owner (set by JupyterHub for
        single-user servers). Empty to ignore the environment.""",
    ).tag(config=True)

    allow_owner_from_start_env = Bool(
        False,
        help="""Trust a LIMITED_PROVISIONER_OWNER entry in the env passed to
        start_kernel(env=...) as the owner. Enable only when the code calling start_kernel
        (e.g. an agent backend) authenticates its users; a notebook user could otherwise
        name anyone.""",
    ).tag(config=True)

    labels = Dict(
        key_trait=Unicode(),
        value_trait=Unicode(),
        help="""Caller-defined key/value strings stored with the kernel: in its registry
        entry (list_kernels(labels=...), `limited-provisioner list --json`) and, on Docker,
        as container labels limited-provisioner.label.<key>. An agent backend keeps its
        session id here to find the session's kernel again after it restarts. Also
        accepted per start: start_kernel(labels={...}). Keys: letters, digits, . _ -""",
    ).tag(config=True)

    @validate("labels")
    def _validate_labels(self, proposal: Any) -> dict[str, str]:
        for key in proposal["value"]:
            if not LABEL_KEY.fullmatch(key):
                msg = (
                    f"labels: key {key!r} is not allowed; use 1-64 letters, digits, '.', "
                    f"'_' or '-' (it becomes a Docker label name)"
                )
                raise LimitConfigError(msg)
        return proposal["value"]

    env_keep = List(
        Unicode(),
        DEFAULT_ENV_KEEP,
        help="""Names of server environment variables passed to the kernel (patterns like
        "LC_*" allowed). Variables set in the kernelspec's env are always passed.
        Everything else is dropped, and a name that looks like a secret (containing TOKEN,
        SECRET, PASSWORD, KEY, CREDENTIAL...) passes only when named exactly here or in
        the kernelspec's env; the log says so at every start.""",
    ).tag(config=True)

    workspace = Unicode(
        "notebook",
        help="""Where the kernel works. "notebook" (default): in the folder Jupyter starts
        it for (jupyter_server passes the notebook's own folder): it reads the files next
        to the notebook, and what it writes there appears in the file browser and stays
        after shutdown, restart and cull. As root the kernel still runs as its own uid and
        writes as the folder's owner through an idmapped mount (nosuid, nodev, no set-id
        files; never as root: a root-owned folder is read-only for kernels). A kernel
        started without a folder (from code, an agent backend) works in a private dir.
        "private": always a fresh per-kernel dir (its HOME, removed at shutdown). An
        absolute path: that folder for every kernel. disk_limit/files_limit count growth
        past what a folder held at start (checked by the watchdog).""",
    ).tag(config=True)

    @validate("workspace")
    def _validate_workspace(self, proposal: dict) -> str:
        return workspace_setting(proposal["value"])

    wheelhouse = Unicode(
        "",
        help="""A directory of wheels (filled with `limited-provisioner wheelhouse add`)
        every kernel may install from, read-only, at the same path (docker: bound
        read-only). Its kernels' pip installs from it only, binary wheels only (no
        source distribution is built), into a dir of the kernel's HOME, within its disk
        limit, importable at once: `%pip install pandas` works with network=false. With
        network=true pip may also use its index. A directory, not a URL: a kernel
        without network reaches no index. It must be readable by others and writable
        by neither every user nor a kernel uid. Empty (default): none.""",
    ).tag(config=True)

    @validate("wheelhouse")
    def _validate_wheelhouse(self, proposal: dict) -> str:
        return wheelhouse_setting(proposal["value"])

    private_work_dir = Bool(
        None,
        allow_none=True,
        help="""Deprecated: use workspace. True is workspace="private", False is
        workspace="notebook".""",
    ).tag(config=True)

    @observe("private_work_dir")
    def _private_work_dir_changed(self, change: dict) -> None:
        if change["new"] is not None:
            self.workspace = "private" if change["new"] else "notebook"

    kernel_uid_range = Tuple(
        Int(),
        Int(),
        default_value=(64000, 64999),
        help="""When the server runs as root, each kernel (process or container) runs as
        its own unprivileged uid (and gid) picked from this inclusive range, so kernels
        can neither touch the server nor each other. Default (64000, 64999).""",
    ).tag(config=True)

    ipc_bind_wait = Float(
        60.0,
        help="""Seconds a start waits for the kernel to bind its sockets. Then the server
        takes the kernel's socket dir back, checks every socket and only then connects;
        a kernel that has not bound them by then is stopped with the reason.""",
    ).tag(config=True)

    watchdog_interval = Float(
        0.5,
        help="Seconds between two watchdog checks of memory (disk is checked every 4th).",
    ).tag(config=True)

    watchdog_idle_interval = Float(
        5.0,
        help="""Seconds between two checks of an idle kernel's cgroup events (a process of
        its tree OOM-killed, forks refused by pids_limit). The cgroup enforced those
        limits already; only their report (log, metrics, status endpoint) waits this
        long while the kernel runs no execution and got no request for that long. Memory
        and disk checks, and putting back limits a kernel raised in a delegated cgroup,
        keep watchdog_interval. 0: every watchdog_interval, as for a busy kernel.""",
    ).tag(config=True)

    state_dir = Unicode(
        help="""Directory of the registry, locks and kernel dirs for kernels of this
        kernelspec. Default: LimitedHost.state_dir (the host's). Point an agent
        backend's or a test's kernels at their own.""",
    ).tag(config=True)

    server_id = Unicode(
        help="""Identity of the process managing these kernels in the registry and on
        containers. Default: LimitedHost.server_id. An agent backend sets its own so it
        re-adopts only its kernels.""",
    ).tag(config=True)

    reap_interval = Float(
        None,
        allow_none=True,
        help="""Seconds between two runs of the orphan reaper this process starts with its
        first kernel (scripts, agents). Default: LimitedHost.reap_interval; a server's
        reaper starts with the server and follows LimitedHost.reap_interval.""",
    ).tag(config=True)

    max_lifetime = Seconds(
        0,
        help="""Hard age cap in seconds ("8h"): the kernel is shut down this long after it
        started, busy or not. 0 (default) disables.""",
    ).tag(config=True)

    exec_timeout_grace = Seconds(
        5,
        help="""Seconds an execution may keep running after the exec_timeout interrupt
        before the kernel is restarted (its state is lost). Default 5.""",
    ).tag(config=True)

    lifecycle_interval = Float(
        1.0,
        help="Seconds between two checks of idle_timeout, max_lifetime and exec_timeout.",
    ).tag(config=True)

    pool_size = Int(
        0,
        min=0,
        help="""Kernels of this kernelspec kept started and ready (a warm pool, pool.py):
        a start claims one instead of launching, and takes its identity then (kernel id,
        owner, labels, admission, the caller's env and folder). A replacement starts
        pool_refill_delay seconds after the claim, one at a time. Pooled kernels count
        against max_kernels and mem_budget, but a user's start evicts one rather than
        being refused; a change of the kernelspec, its config or the image drains the
        pool. 0 (default): no pool.""",
    ).tag(config=True)

    pool_refill_delay = Float(
        0.5,
        min=0,
        help="""Seconds after the last start (claimed or cold) of a kernelspec before its
        pool starts a replacement: refills never compete with a start someone waits
        for. Default 0.5.""",
    ).tag(config=True)
