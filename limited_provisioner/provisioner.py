"""What both backends share: limit traits, admission, the registry entry, exit reasons.

:class:`LimitedProvisionerMixin` sits in front of a jupyter_client provisioner class
in the MRO (``class LimitedProcessProvisioner(LimitedProvisionerMixin,
LocalProvisioner)``), so the backend keeps jupyter_client's lifecycle and only adds
what is specific to it through the ``_prepare_*`` hooks.
"""

from __future__ import annotations

import asyncio
import fnmatch
import getpass
import hashlib
import json
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

from traitlets import Bool, Dict, Float, Int, List, Tuple, Unicode, default, validate

from . import metrics, uids
from .errors import KernelLimitError, LimitConfigError, SandboxUnavailableError
from .kernel_hook import IPYTHON_HOOK, MEM_LIMIT_ENV, NOTICE_ENV, OUTPUT_LIMIT_ENV
from .kernel_dir import KernelDir
from .lifecycle import LifecyclePolicy
from .limits import (
    MIN_DISK_LIMIT,
    MIN_MEM_LIMIT,
    MIN_NOFILE_LIMIT,
    MIN_PIDS_LIMIT,
    ByteSize,
    Cores,
    Count,
    Limits,
    Seconds,
    Switch,
    format_size,
)
from .admission import AdmissionPolicy, admit
from .proxy import KERNEL_SOCKETS, KernelProxy, Traffic
from .reaper import reap_periodically
from .registry import Registry, process_identity

# Longest path a unix socket can bind to (sun_path is 108 bytes with the NUL).
MAX_IPC_PATH = 107
# What follows an ipc prefix: "-<port>", ports 1-5 (proxy.PORTS).
IPC_SUFFIX = len("-1")
LABEL_KEY = re.compile(r"[A-Za-z0-9._-]{1,64}")

# Variables a kernel needs to work; everything else of the server's environment (tokens,
# cloud credentials, Jupyter's and JupyterHub's own settings) stays out of reach of the
# code the kernel runs. Exact names; a pattern never lets a secret-looking name through.
DEFAULT_ENV_KEEP = [
    "PATH",
    "LANG",
    "LANGUAGE",
    "LC_*",
    "TZ",
    "TERM",
    "PYTHONPATH",
    "PYTHONHASHSEED",
    "PYTHONIOENCODING",
    "PYTHONUNBUFFERED",
    "VIRTUAL_ENV",
    "CONDA_PREFIX",
    "CONDA_DEFAULT_ENV",
    "JPY_SESSION_NAME",
    "MPLBACKEND",
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "LIMITED_PROVISIONER_OWNER",
]
# Parts of a name that mark it as a secret: such a variable reaches a kernel only when
# the kernelspec's env or env_keep names it exactly (and the log says so).
SECRET_MARKERS = ("TOKEN", "SECRET", "PASSWORD", "PASSWD", "KEY", "CREDENTIAL", "COOKIE")


def looks_secret(name: str) -> bool:
    upper = name.upper()
    return any(marker in upper for marker in SECRET_MARKERS)


def filter_env(
    env: dict[str, str], keep: list[str], explicit: set[str]
) -> tuple[dict[str, str], list[str]]:
    """The variables of ``env`` a kernel may see, and the secret-looking ones passed
    because ``explicit`` (the kernelspec's env) or an exact ``keep`` entry names them."""
    exact = {p for p in keep if not any(c in p for c in "*?[")}
    patterns = [p for p in keep if p not in exact]
    result, named_secrets = {}, []
    for name, value in env.items():
        if name in explicit or name in exact:
            result[name] = value
            if looks_secret(name):
                named_secrets.append(name)
        elif not looks_secret(name) and any(fnmatch.fnmatchcase(name, p) for p in patterns):
            result[name] = value
    return result, named_secrets


def _default_server_id() -> str:
    from jupyter_core.paths import jupyter_runtime_dir

    seed = f"{socket.gethostname()}:{jupyter_runtime_dir()}"
    return hashlib.sha256(seed.encode()).hexdigest()[:12]


class LimitedProvisionerMixin(LifecyclePolicy):
    """Limits, admission and bookkeeping common to every limited backend (the timers of
    idle_timeout, max_lifetime and exec_timeout come from LifecyclePolicy)."""

    backend = "base"

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

    reap_interval = Float(
        60.0,
        help="""Seconds between two runs of the in-server orphan reaper, which removes
        kernels left by servers that are gone once they died or their idle clock ran
        out. A server's reaper starts with the server: set this in Jupyter config (in a
        kernelspec it only applies to scripts/agents whose first kernel starts the
        reaper). 0 disables (use `limited-provisioner reap`).""",
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

    server_id = Unicode(
        help="""Identity of this Jupyter server in the registry and on containers; stable
        across restarts of the same server. Default: derived from hostname and runtime
        dir.""",
    ).tag(config=True)

    @default("server_id")
    def _default_server_id(self) -> str:
        return os.environ.get("LIMITED_PROVISIONER_SERVER_ID") or _default_server_id()

    state_dir = Unicode(
        help="""Directory holding the kernel registry, locks and per-kernel dirs.
        Default: /var/lib/limited-provisioner as root, else a dir in the Jupyter runtime
        dir. $LIMITED_PROVISIONER_STATE_DIR overrides the default.""",
    ).tag(config=True)

    @default("state_dir")
    def _default_state_dir(self) -> str:
        from .registry import default_state_dir

        return str(default_state_dir())

    env_keep = List(
        Unicode(),
        DEFAULT_ENV_KEEP,
        help="""Names of server environment variables passed to the kernel (patterns like
        "LC_*" allowed). Variables set in the kernelspec's env are always passed.
        Everything else is dropped, and a name that looks like a secret (containing TOKEN,
        SECRET, PASSWORD, KEY, CREDENTIAL...) passes only when named exactly here or in
        the kernelspec's env; the log says so at every start.""",
    ).tag(config=True)

    private_work_dir = Bool(
        True,
        help="""Start the kernel in a fresh per-kernel directory (its HOME, removed at
        shutdown) whose size and file count disk_limit/files_limit cap. If false the
        kernel starts where Jupyter asks (the notebook's dir) and only growth past the
        starting size is counted.""",
    ).tag(config=True)

    kernel_uid_range = Tuple(
        Int(),
        Int(),
        default_value=(64000, 64999),
        help="""When the server runs as root, each kernel (process or container) runs as its own unprivileged
        uid (and gid) picked from this inclusive range, so kernels can neither touch the
        server nor each other. Default (64000, 64999).""",
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

    uid: int | None = None
    _launch_started: float = 0.0
    exit_reason: str | None = None
    exit_kind: str | None = None
    limit_trips: list[dict[str, Any]]
    kernel_dir: Path | None = None
    kdir: KernelDir | None = None
    gid: int | None = None
    proxy: KernelProxy | None = None
    traffic: Traffic | None = None
    work_dir: str | None = None
    _restarting = False

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.limit_trips = []
        # Parsed once; every later decision reads this object, never the raw traits.
        self.limits = Limits(
            mem_limit=self.mem_limit,
            cpu_limit=self.cpu_limit,
            pids_limit=self.pids_limit,
            nofile_limit=self.nofile_limit,
            disk_limit=self.disk_limit,
            files_limit=self.files_limit,
            network=self.network,
            exec_timeout=self.exec_timeout,
            idle_timeout=self.idle_timeout,
        )
        self.registry = Registry(self.state_dir)
        self.enforcement: dict[str, str] = {}

    # -- lifecycle -----------------------------------------------------------------

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        """Admit the kernel, then let the backend prepare its sandbox.

        Called by ``KernelManager.pre_start_kernel()`` on every start and restart.
        Nothing is started before admission; if anything after it fails, what was
        reserved (registry entry, dirs, cgroups) is released before the error propagates.
        """
        start_labels = kwargs.pop("labels", None)
        if start_labels:
            self.labels = {**self.labels, **{str(k): str(v) for k, v in start_labels.items()}}
        self._launch_started = time.monotonic()
        restarting = self.registry.read(self.kernel_id) is not None
        self._restarting = restarting
        start_env = kwargs.get("env") or {}
        if self.allow_owner_from_start_env and start_env.get("LIMITED_PROVISIONER_OWNER"):
            self.owner = start_env["LIMITED_PROVISIONER_OWNER"]
        try:
            await self._before_admission()
            if not restarting:
                await asyncio.to_thread(self._admit)
            try:
                await self._prepare_sandbox(kwargs)
                self._route_through_proxy()
                self.enforcement.update(self._lifecycle_enforcement())
                self.enforcement.update(self._proxy_enforcement())
                kwargs = await super().pre_launch(**kwargs)
                await self._prepare_launch(kwargs)
                await asyncio.to_thread(self._write_kernel_files, kwargs)
            except BaseException:
                if not restarting:
                    await self._release()
                raise
        except KernelLimitError as e:
            metrics.STARTS_REFUSED.labels(limit=e.limit).inc()
            raise
        return kwargs

    async def post_launch(self, **kwargs: Any) -> None:
        """Start the timers and the reaper; called by ``KernelManager.post_start_kernel()``.

        The kernel's sockets were checked and connected in ``launch_kernel`` (see
        :meth:`_open_kernel_door`), before any client could reach them.
        """
        await super().post_launch(**kwargs)
        self._start_lifecycle()
        self._ensure_reaper()
        metrics.LIVE_KERNELS.add(self.kernel_id, self.backend, self.owner)
        metrics.START_SECONDS.labels(backend=self.backend).observe(
            time.monotonic() - self._launch_started
        )

    async def _open_kernel_door(self) -> None:
        """Wait for the kernel to bind its sockets, take its socket dir back, check every
        socket (type, owner), and only then let the proxy connect to them.

        Called by the backends' ``launch_kernel`` right after the process or container
        started, so no client ever talks to a socket the kernel could still swap. A
        kernel that dies meanwhile is left to the caller (``poll()`` says so); one whose
        sockets fail the check, or that binds nothing within ``ipc_bind_wait``, is stopped.
        """
        assert self.kdir is not None and self.proxy is not None
        deadline = time.monotonic() + self.ipc_bind_wait
        rounds = 0
        while not self.kdir.sockets_present(KERNEL_SOCKETS):
            rounds += 1
            # poll() may be a Docker API call: check for a dead kernel only every 0.25 s.
            if rounds % 25 == 0 and await self.poll() is not None:
                break
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.01)
        problems = await asyncio.to_thread(self.kdir.freeze_sockets, KERNEL_SOCKETS)
        if not problems:
            self.proxy.connect_kernel()
            return
        if await self.poll() is not None:
            return  # it died: the restarter (or the start) reports that
        msg = (
            f"kernel {self.kernel_id} was stopped: its sockets failed the server's check "
            f"after {self.ipc_bind_wait:g}s ({'; '.join(problems)}). A kernel that is slow to "
            f"start needs a larger ipc_bind_wait; anything else means code in the kernel "
            f"tampered with its socket dir"
        )
        self.record_trip("sandbox", msg)
        await self.kill()
        await self.cleanup(restart=self._restarting)
        raise SandboxUnavailableError(msg)

    def admission_policy(self) -> AdmissionPolicy:
        """The caps this start is checked against; backends add their disk paths."""
        budget = self.mem_budget
        if budget is None and self.mem_budget_fraction > 0:
            import psutil

            budget = int(psutil.virtual_memory().total * self.mem_budget_fraction)
        return AdmissionPolicy(
            max_kernels=self.max_kernels,
            max_kernels_per_user=self.max_kernels_per_user,
            mem_budget=budget,
            min_free_disk=self.min_free_disk,
            disk_paths=[self.registry.kernels_dir, *self._extra_disk_paths],
            max_starts_per_minute=self.max_starts_per_minute,
        )

    _extra_disk_paths: tuple[Path, ...] = ()

    def _admit(self) -> None:
        with self.registry.lock():
            admit(
                self.registry,
                self.admission_policy(),
                kernel_id=self.kernel_id,
                owner=self.owner,
                mem_limit=self.limits.mem_limit,
            )
            self.registry.write(
                self.kernel_id,
                {
                    "kernel_id": self.kernel_id,
                    "backend": self.backend,
                    "state": "starting",
                    "owner": self.owner,
                    "server_id": self.server_id,
                    "kernel_name": getattr(self.parent, "kernel_name", ""),
                    "created": time.time(),
                    "last_activity": time.time(),
                    "server_pid": os.getpid(),
                    "server_pid_create_time": process_identity(os.getpid()),
                    "limits": self.limits.to_dict(),
                    "max_lifetime": self.max_lifetime,
                    "labels": dict(self.labels),
                },
            )

    async def _before_admission(self) -> None:
        """Backend hook: checks that need no reservation (daemon up, image present)."""

    async def _prepare_sandbox(self, kwargs: dict[str, Any]) -> None:
        """Backend hook, before jupyter_client writes the connection file."""

    async def _prepare_launch(self, kwargs: dict[str, Any]) -> None:
        """Backend hook, after jupyter_client's pre_launch (``kwargs["cmd"]`` final, with
        the clients' connection file in it; ``_write_kernel_files`` swaps in the
        kernel's own)."""

    async def _release(self) -> None:
        """Undo what pre_launch reserved (proxy, kernel dir, uid lease, registry entry);
        backends extend this (and call it last)."""
        metrics.LIVE_KERNELS.remove(self.kernel_id)
        if self.proxy is not None:
            await self.proxy.stop()
            self.proxy = None
        await asyncio.to_thread(self._remove_kernel_dir)
        if self.uid is not None:
            # A no-op for a uid this kernel holds no lease on (a fixed container_user).
            await asyncio.to_thread(uids.release, self.uid, self.kernel_id)
        await asyncio.to_thread(self.registry.remove, self.kernel_id)
        if not metrics.LIVE_KERNELS.kernels:
            # The last kernel of this process is gone: stop the reaper rather than leave a
            # pending task behind (a script using nbclient exits right after this).
            self._stop_reaper()

    def _finalize_env(self, env: dict[str, str]) -> None:
        """Drop server environment variables not on the allow-list (see ``env_keep``)."""
        super()._finalize_env(env)
        explicit = set(self.kernel_spec.env) if self.kernel_spec else set()
        kept, named_secrets = filter_env(env, self.env_keep, explicit)
        env.clear()
        env.update(kept)
        for name in named_secrets:
            self.log.warning(
                "Kernel %s: passing %s to the kernel because the kernelspec's env or "
                "env_keep names it; code in the kernel can read it",
                self.kernel_id, name,
            )

    def _allocate_uid(self) -> int:
        """A uid no other kernel on this host holds or held recently (see uids.py)."""
        uid = uids.allocate(self.kernel_id, str(self.registry.state_dir), self.kernel_uid_range)
        self.registry.update(self.kernel_id, uid=uid)
        return uid

    # -- re-adoption --------------------------------------------------------------------

    async def adopt(self, entry: dict[str, Any]) -> None:
        """Manage a running kernel described by its registry entry (recovery.adopt).

        Restores the backend's handle on the kernel, then re-attaches the watchdog, the
        lifecycle policy (continuing the persisted idle clock) and the reaper, and marks
        the entry as managed by this process.
        """
        kernel_dir = entry.get("kernel_dir")
        self.kernel_dir = Path(kernel_dir) if kernel_dir else None
        self.work_dir = entry.get("work_dir")
        self.uid = entry.get("uid")
        self.gid = entry.get("gid", self.uid)
        self.enforcement = dict(entry.get("enforcement") or {})
        self.kdir = KernelDir(self.registry.kernels_dir, self.kernel_id, self.uid, self.gid)
        self._route_through_proxy(last_activity=entry.get("last_activity"))
        if self.parent is not None:
            self.connection_info = self.parent.get_connection_info()
        await self._restore(entry)
        # The kernel's socket dir was frozen by the server that started it: check again.
        await self._open_kernel_door()
        await asyncio.to_thread(
            self.registry.update,
            self.kernel_id,
            server_id=self.server_id,
            server_pid=os.getpid(),
            server_pid_create_time=process_identity(os.getpid()),
            adopted=time.time(),
        )
        self._start_lifecycle()
        self._ensure_reaper()
        metrics.ADOPTIONS.labels(backend=self.backend).inc()
        metrics.LIVE_KERNELS.add(self.kernel_id, self.backend, self.owner)

    async def detach(self) -> None:
        """Stop managing the kernel from this process and leave it running for a later
        :func:`~limited_provisioner.adopt` (a deploy, a service restart).

        Stops the timers and the watchdog of this process, and keeps the connection
        file: ``KernelManager.__del__`` deletes a file it wrote, and a kernel without
        its connection file can never be adopted again.
        """
        await self._stop_lifecycle()
        watchdog = getattr(self, "watchdog", None)
        if watchdog is not None:
            await watchdog.stop()
            self.watchdog = None
        if self.proxy is not None:
            # Whoever adopts the kernel next binds the client side anew.
            await self.proxy.stop()
            self.proxy = None
        metrics.LIVE_KERNELS.remove(self.kernel_id)
        km = self.parent
        if km is not None:
            km.stop_restarter()
            km._connection_file_written = False

    async def _restore(self, entry: dict[str, Any]) -> None:
        """Backend hook: re-attach to the kernel's process or container."""
        raise NotImplementedError

    # -- idle culling, lifetime, exec timeout -------------------------------------------

    _reapers: dict[Any, asyncio.Task] = {}
    # Loops of long-running servers: their reaper runs for the server's whole life, also
    # while it has no kernel (orphans of crashed peers still need removing).
    _lasting_reapers: set[Any] = set()

    def _ensure_reaper(self, lasting: bool = False) -> None:
        """One periodic reaper per event loop (i.e. per server or agent process)."""
        if not self.reap_interval:
            return
        loop = asyncio.get_running_loop()
        if lasting:
            LimitedProvisionerMixin._lasting_reapers.add(loop)
        task = LimitedProvisionerMixin._reapers.get(loop)
        if task is None or task.done():
            LimitedProvisionerMixin._reapers[loop] = asyncio.ensure_future(
                reap_periodically(self.registry, self.reap_interval, self.log)
            )

    @staticmethod
    def _stop_reaper() -> None:
        """Stop the reaper a script's kernels started (not a server's lasting one)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if loop in LimitedProvisionerMixin._lasting_reapers:
            return
        task = LimitedProvisionerMixin._reapers.pop(loop, None)
        if task is not None:
            task.cancel()

    def _kernel_env(self) -> dict[str, str]:
        """Variables every limited kernel gets (both backends)."""
        # ipykernel treats a parent pid of 1 (init) as "managed, but do not poll the
        # parent": the kernel outlives a crashed server so it can be re-adopted, and it
        # does not print its standalone connection banner into the server's stdout.
        env = {"JPY_PARENT_PID": "1"}
        if self.kdir is not None:
            env[NOTICE_ENV] = str(self.kdir.ctl / "notice")
        if self.limits.mem_limit:
            env[MEM_LIMIT_ENV] = format_size(self.limits.mem_limit)
        if self.output_limit:
            env[OUTPUT_LIMIT_ENV] = str(self.output_limit)
        return env

    # -- the per-kernel dir and the proxy ----------------------------------------------

    def _prepare_kernel_dir(self, uid: int | None = None, gid: int | None = None) -> str:
        """Create the kernel dir (kerneldir.py), allocating a uid when we are root.

        Returns a description of the kernel's identity for the enforcement report.
        """
        self.registry.ensure()
        if uid is not None:
            self.uid, self.gid = uid, gid if gid is not None else uid
        elif self.uid is None and os.geteuid() == 0:
            self.uid = self.gid = self._allocate_uid()
        self.kdir = KernelDir(self.registry.kernels_dir, self.kernel_id, self.uid, self.gid)
        self.kernel_dir = self.kdir.path
        self.kdir.create()
        # A notice is for one execution of one process: none survives into the next; and
        # nothing the previous process left in its connection dir does either.
        self.kdir.remove_file("notice")
        self.kdir.empty("conn")
        if self.uid is None:
            return f"server user (uid {os.geteuid()}): not root, cannot switch"
        return f"uid/gid {self.uid} (unprivileged, per kernel, host-wide unique)"

    def _route_through_proxy(self, last_activity: float | None = None) -> None:
        """Point the KernelManager (hence every client) at the proxy's sockets.

        Once per kernel: the client side keeps its addresses across restarts, and its
        directory (``<state_dir>/clients/<id>``) is the server's alone.
        """
        km = self.parent
        if km is None or self.kdir is None:
            return
        client_dir = self.registry.clients_dir / self.kernel_id
        kernel_prefix = str(self.kdir.sock / "k")
        for prefix in (str(client_dir / "c"), kernel_prefix):
            if len(prefix) + IPC_SUFFIX > MAX_IPC_PATH:
                msg = (
                    f"state_dir {self.state_dir!r} is too long for ipc sockets ({prefix!r}); "
                    f"set {type(self).__name__}.state_dir to a shorter path"
                )
                raise SandboxUnavailableError(msg)
        if self.proxy is None:
            self.traffic = Traffic(last_activity)
            self.proxy = KernelProxy(
                kernel_id=self.kernel_id,
                client_dir=client_dir,
                kernel_prefix=kernel_prefix,
                key=km.session.key,
                signature_scheme=km.session.signature_scheme,
                traffic=self.traffic,
                output_limit=self.output_limit,
                max_message_size=self.max_message_size,
            )
            self.proxy.bind_clients()
        info = self.proxy.client_connection_info()
        km.connection_file = str(client_dir / "connection.json")
        km.transport = info["transport"]
        km.ip = info["ip"]
        km.cache_ports = False
        for name in ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port"):
            setattr(km, name, info[name])

    async def _between_processes(self) -> None:
        """A restart's cleanup: forget the dead process's sockets, keep the clients'.

        jupyter_client has just removed the client-side socket names (it thinks they are
        the kernel's): restore them, so reconnecting clients find the proxy again.
        """
        if self.proxy is not None:
            await self.proxy.disconnect_kernel()
            await asyncio.to_thread(self.proxy.relink)

    def _proxy_enforcement(self) -> dict[str, str]:
        result = {
            "connections": "through the server's proxy: clients connect in a server-only "
            "dir; the kernel's sockets are checked (type, owner) in its frozen socket dir "
            "before use; every message from the kernel is HMAC-verified before it is "
            f"forwarded; messages over {format_size(self.max_message_size)} are dropped",
        }
        if self.output_limit:
            result["output_limit"] = (
                f"enforced by the proxy ({format_size(self.output_limit)} of IOPub output "
                "per execution, whatever sends it)"
            )
        return result

    @property
    def kernel_connection_file(self) -> str:
        assert self.kdir is not None
        return str(self.kdir.conn / "connection.json")

    def _write_kernel_files(self, kwargs: dict[str, Any]) -> None:
        """(Re)write what the kernel reads, every start: its own connection file (kernel
        side of the proxy) and, for IPython kernels, the hook."""
        assert self.kdir is not None and self.proxy is not None
        km = self.parent
        info = self.proxy.kernel_connection_info()
        info["kernel_name"] = getattr(km, "kernel_name", "") or ""
        self.kdir.write("connection.json", json.dumps(info, indent=1), mode=0o600, where="conn")
        cmd = kwargs.get("cmd") or []
        if km is not None and cmd:
            kwargs["cmd"] = cmd = [
                part.replace(km.connection_file, self.kernel_connection_file) for part in cmd
            ]
        if any("ipykernel" in part for part in cmd):
            hook = self.kdir.write("hooks.py", IPYTHON_HOOK, mode=0o644)
            kwargs["cmd"] = [*cmd, f"--IPKernelApp.exec_files={hook}"]

    async def _carried_over_usage(self) -> tuple[int, int]:
        """(bytes, files) a (re)starting kernel's work dir holds beyond its limits.

        A kernel killed for disk_limit keeps its files: its next process may keep (and
        delete) what is over the limit plus a little room to start (16M, 100 files:
        IPython writes its history), never grow it further, or it would be killed at once
        on every restart and the user could never clean up.
        """
        from .watchdog import dir_usage

        lim = self.limits
        if self.kdir is None or not (lim.disk_limit or lim.files_limit):
            return 0, 0
        usage = await asyncio.to_thread(dir_usage, str(self.kdir.work), 200_000)
        over_bytes = usage.bytes - lim.disk_limit if lim.disk_limit else 0
        over_files = usage.files - lim.files_limit if lim.files_limit else 0
        return (
            over_bytes + min(16 * 2**20, lim.disk_limit) if over_bytes > 0 else 0,
            over_files + min(100, lim.files_limit) if over_files > 0 else 0,
        )

    def _kernel_writable_dirs(self) -> tuple[str, ...]:
        """Dirs of the kernel dir the kernel can write besides work/ (watchdog counts them)."""
        if self.kdir is None:
            return ()
        return (str(self.kdir.conn), str(self.kdir.sock))

    def _remove_kernel_dir(self) -> None:
        if self.kdir is not None:
            self.kdir.remove()

    # -- limit trips and exit reasons ----------------------------------------------

    def record_trip(self, kind: str, reason: str, count: bool = True) -> None:
        """Remember why the kernel was (or is about to be) stopped, log and count it."""
        self.exit_reason = reason
        self.exit_kind = kind
        if count:
            metrics.count_trip(kind)
        self.limit_trips.append({"kind": kind, "reason": reason, "time": time.time()})
        self.log.warning("Kernel %s: %s", self.kernel_id, reason)

    def death_report(self) -> dict[str, Any] | None:
        """Why the kernel just died, for its clients: ``{"kind", "reason", "parent"}``.

        ``parent`` is the header (msg_id, session) of the execution it was running, as
        the proxy saw the client ask for it; None if it died idle. Returns None while no
        exit reason is known. Called from the restarter's callbacks, before the proxy
        forgets the dead process's executions.
        """
        if not self.exit_reason:
            return None
        parent = None
        running = self.traffic.running() if self.traffic is not None else None
        if running is not None:
            parent = {"msg_id": running.msg_id, "session": running.session}
        return {"kind": self.exit_kind or "exit", "reason": self.exit_reason, "parent": parent}

    def describe_enforcement(self) -> str:
        return "; ".join(f"{name}: {how}" for name, how in sorted(self.enforcement.items()))

    async def get_provisioner_info(self) -> dict[str, Any]:
        """Add limits, how each is enforced, and the last exit reason to the base info."""
        info = await super().get_provisioner_info()
        info.update(
            {
                "backend": self.backend,
                "limits": self.limits.to_dict(),
                "enforcement": dict(self.enforcement),
                "exit_reason": self.exit_reason,
                "limit_trips": list(self.limit_trips),
                "owner": self.owner,
                "server_id": self.server_id,
                "kernel_dir": str(self.kernel_dir) if self.kernel_dir else None,
                "work_dir": self.work_dir,
            }
        )
        return info

    async def load_provisioner_info(self, provisioner_info: dict) -> None:
        """Restore what get_provisioner_info saved; tolerates info from older versions."""
        await super().load_provisioner_info(provisioner_info)
        self.enforcement = dict(provisioner_info.get("enforcement") or {})
        self.exit_reason = provisioner_info.get("exit_reason")
        self.limit_trips = list(provisioner_info.get("limit_trips") or [])
        kernel_dir = provisioner_info.get("kernel_dir")
        self.kernel_dir = Path(kernel_dir) if kernel_dir else None
        self.work_dir = provisioner_info.get("work_dir")
