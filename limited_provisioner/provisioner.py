"""What every limited backend does around jupyter_client's provisioner lifecycle.

:class:`LimitedProvisioner` is a :class:`KernelProvisionerBase` whose hooks admit the
kernel, prepare its dir and proxy, and start its timers; it composes the parts that do
the work — :class:`~.kernel_dir.KernelDir`, :class:`~.connection.KernelConnection`,
:class:`~.lifecycle.LifecycleTimer`, an :class:`~.enforcement.EnforcementPlan` and the
host's reaper (:class:`~.host.LimitedHost`). A backend adds what is its own through the
``_prepare_*`` / ``_restore`` / ``_cleanup`` hooks (``process/``, ``docker/``).

Every hook jupyter_client calls runs on the package's own loop (``_background.py``),
whatever loop or thread the manager calls from: the proxy, the timers and the watchdog
live there and keep running while a blocking manager's caller sleeps. A timer that
culls a kernel hands the cull to an async manager on its loop (``manager_loop.py``);
without one the provisioner ends the kernel and removes every trace itself.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

from jupyter_client.provisioning.provisioner_base import KernelProvisionerBase
from traitlets import default

from . import _jupyter_internals as internals
from . import held_kernels, kept_files, metrics, uids, workfs
from . import pool as warm_pool
from ._background import bridged, on_package_loop
from ._tasks import Once
from .admission import AdmissionPolicy, admit_and_record
from .claim import claim_pooled
from .client_address import requested_address
from .connection import KernelConnection, client_curve_secretkey, door_refusal
from .enforcement import (
    NAMESPACE,
    NONE,
    PROVISIONER,
    EnforcementPlan,
    Measure,
    identity_measure,
    shared_measures,
)
from .errors import (
    KernelEndedError,
    KernelLimitError,
    SandboxStartError,
    SandboxUnavailableError,
    WorkspaceError,
    kernel_command_error,
)
from .host import LimitedHost
from .kernel_dir import KernelDir, prepare_kernel_dir
from .kernel_env import keep_allowed, limit_env, supplied_names
from .kernel_hook import READ_ONLY_FOLDER_ENV
from .lifecycle import LifecycleTimer, Verdict, with_limits_hit
from .limits import Limits
from .manager_loop import ManagerLoop
from .pool import POOL_OWNER, NotClaimable, Pooled
from .proxy import KernelEndpoint
from .registry import Registry, process_identity
from .settings import LEGACY_SECTION, LimitedSettings
from .watchdog import KERNEL_ID_ENV, Watchdog, carried_over, dir_usage
from .wheelhouse import check_wheelhouse, pip_env
from .workspace import Workspace, chosen_folder, resolve_beneath, resolve_workspace

log = logging.getLogger(__name__)

# The most of a kernel's output quoted in the error of a start it died in.
START_OUTPUT_LIMIT = 1500
# How long a shutdown waits for a (re)start it overlaps before it removes the kernel's
# traces anyway; every step of a start has a bound of its own well below this.
START_SETTLE_TIMEOUT = 300.0


class LimitedProvisioner(LimitedSettings, KernelProvisionerBase):
    """Limits, admission and bookkeeping common to every limited backend."""

    backend = "base"

    @default("state_dir")
    def _default_state_dir(self) -> str:
        return self.host.resolved_state_dir

    @default("server_id")
    def _default_server_id(self) -> str:
        return self.host.resolved_server_id

    uid: int | None = None
    gid: int | None = None
    kdir: KernelDir | None = None
    kernel_dir: Path | None = None
    work_dir: str | None = None
    connection: KernelConnection | None = None
    lifecycle: LifecycleTimer | None = None
    watchdog: Watchdog | None = None
    # The kernel's own filesystem, or why it has none; None without a disk_limit.
    workfs: workfs.WorkFs | None = None
    exit_reason: str | None = None
    exit_kind: str | None = None
    # The previous process's death once a new one started (``_forget_exit``): a client
    # that asks why after the automatic restart (the status endpoint) still gets it.
    last_exit: dict[str, Any] | None = None
    pid_create_time: float | None = None
    created: float = 0.0
    _launch_started = 0.0
    _restarting = False
    _legacy_warned = False
    # keep_files_for: the kernel is being culled for idle_timeout, so _release keeps its
    # files (kept_files.py); what it kept; what this kernel's first start got back.
    _keep_at_release = False
    files_kept: dict[str, Any] | None = None
    files_restored: dict[str, Any] | None = None
    _ran = False  # the kernel's process reached "running" (_record_running)
    # Set when the kernel came from the warm pool (pool.py): its sandbox was made under
    # the pooled kernel's id, which keeps naming it (see sandbox_id).
    _sandbox_id: str | None = None
    # The warm pool (pool.py) this provisioner's kernel was started for (``_pooled``:
    # nobody's yet) or claimed from (``_claimed``); a cold start of a pooled kernelspec
    # holds its pool's refills back while it runs (``_cold_pool``).
    _pool: Any = None
    _pooled = False
    _claimed = False
    _claim_launch = False
    _cold_pool: Any = None
    # Set by a restart's stop (cleanup(restart=True)), taken by its start (pre_launch): a
    # start that finds it, and the kernel ended in between, was a restart overlapping a
    # shutdown and starts nothing.
    _restart_due = False
    # While a (re)start runs, from pre_launch to the end of launch_kernel: unset. A
    # shutdown's cleanup waits for it (``_end_requested`` tells the start to give up).
    _start_over: asyncio.Event | None = None
    _end_requested = False
    pool_fp: str | None = None
    # What a pooled kernel answered to kernel_info before anyone's code ran in it (its
    # messaging protocol version), for jupyter_server not to ask again at the claim.
    protocol_version: str | None = None
    # The env the kernel's process was started with (the claim compares it).
    _launch_env: dict[str, str] | None = None
    # Bytes and files of the dirs at the start that disk_limit does not count.
    _baseline: tuple[int, int] = (0, 0)

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        if self.config._has_section(LEGACY_SECTION) and not LimitedProvisioner._legacy_warned:
            LimitedProvisioner._legacy_warned = True
            self.log.warning("c.%s.* is deprecated: use c.LimitedProvisioner.*", LEGACY_SECTION)
        self.limit_trips: list[dict[str, Any]] = []
        # Parsed once; every later decision reads this object, never the raw traits.
        self.limits = Limits.from_settings(self)
        self.registry = Registry(self.state_dir)
        self.plan = EnforcementPlan()
        self.manager_loop = ManagerLoop()
        # The final cleanup, once, whether a timer (package loop) or the manager's
        # shutdown (any loop, any thread) gets there first.
        self._ended = Once()

    @property
    def host(self) -> LimitedHost:
        return LimitedHost.instance(config=self.config)

    @property
    def sandbox_id(self) -> str:
        """What names the kernel's sandbox — its dir, uid lease, cgroups, container and
        the env tag of its processes: its kernel id, unless the kernel was started for
        the warm pool and claimed since (then the pooled kernel's id; the registry
        entry's ``sandbox_id`` maps one to the other)."""
        return self._sandbox_id or self.kernel_id

    @property
    def enforcement(self) -> dict[str, str]:
        """How each limit is enforced for the running kernel (the plan's report)."""
        return self.plan.report()

    # -- start ------------------------------------------------------------------------

    @on_package_loop
    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        """Admit the kernel, then let the backend prepare its sandbox.

        Called by ``KernelManager.pre_start_kernel()`` on every start and restart.
        Nothing is started before admission; if anything after it fails, what was
        reserved (registry entry, dirs, cgroups) is released before the error propagates.
        """
        start_labels = kwargs.pop("labels", None)
        # A start by the warm pool (pool.py): a kernel for nobody yet.
        filling = kwargs.pop("limited_pool", None)
        if start_labels:
            self.labels = {**self.labels, **{str(k): str(v) for k, v in start_labels.items()}}
        self._launch_started = time.monotonic()
        restart_due, self._restart_due = self._restart_due, False
        if restart_due and self.ended:
            # Its manager's restart stopped the kernel, then a shutdown ended it before
            # this start: starting now would run a kernel nobody holds.
            raise KernelEndedError(
                f"Kernel {self.kernel_id} was shut down while it restarted: the restart "
                "was dropped. Start a new kernel to go on."
            )
        entry = await asyncio.to_thread(self.registry.read, self.kernel_id)
        self._restarting = restarting = entry is not None
        if not restarting:
            self._ended.reset()  # a manager starting this provisioner's kernel again
            self._keep_at_release = self._ran = self._end_requested = False
            self.files_kept = self.files_restored = None
        self._start_over = asyncio.Event()
        # Before its registry entry exists: adoption in this process must never see
        # the entry without knowing the start is ours.
        held_kernels.hold(self)
        start_env = kwargs.get("env") or {}
        self._supplied_env = supplied_names(kwargs.get("env"), os.environ) - set(
            self._host_only_env
        )
        if self.allow_owner_from_start_env and start_env.get("LIMITED_PROVISIONER_OWNER"):
            self.owner = start_env["LIMITED_PROVISIONER_OWNER"]
        if filling is not None:
            self._pool, self._pooled, self.owner, self.labels = filling, True, POOL_OWNER, {}
        try:
            claimable = not restarting and filling is None and self.pool_size > 0
            if claimable and await self._claim_pooled(kwargs):
                return {**kwargs, "cmd": []}
            if self.wheelhouse and not restarting:
                # Not on a restart: one that raises would be retried forever.
                await asyncio.to_thread(check_wheelhouse, self.wheelhouse, self.kernel_uid_range)
            await self._before_admission()
            if filling is not None:
                self.pool_fp = await self.pool_fingerprint()
            if not restarting:
                await self._admit_or_evict()
            try:
                await self._prepare_sandbox(kwargs)
                self._connect_clients()
                self.plan.measures.update(shared_measures(
                    self.limits, exec_timeout_grace=self.exec_timeout_grace,
                    max_lifetime=self.max_lifetime, output_limit=self.output_limit,
                    max_message_size=self.max_message_size,
                ))
                kwargs = await super().pre_launch(**kwargs)
                await self._prepare_launch(kwargs)
                if self.connection is not None:
                    kwargs["cmd"] = await asyncio.to_thread(
                        self.connection.write_kernel_files, list(kwargs.get("cmd") or []),
                        getattr(self.parent, "kernel_name", "") or "",
                        bool(self.wheelhouse),
                    )
            except BaseException:
                if not restarting:
                    await self._release()
                raise
        except BaseException as e:
            if isinstance(e, KernelLimitError) and filling is None:
                metrics.STARTS_REFUSED.labels(limit=e.limit).inc()
            if not restarting:
                held_kernels.let_go(self)  # refused before anything was reserved
                self._cold_start_over()
            self._start_settled()
            raise
        return kwargs

    async def _admit_or_evict(self) -> None:
        """Admit this start; a user's start refused by a cap pooled kernels hold
        (max_kernels, mem_budget) shuts one down and tries again."""
        while True:
            try:
                await asyncio.to_thread(self._admit)
                return
            except KernelLimitError as e:
                if self._pooled or not await warm_pool.evict_for(e.limit):
                    raise

    def _policy(self) -> AdmissionPolicy:
        policy = AdmissionPolicy.of(
            self, disk_paths=[self.registry.kernels_dir, *self._disk_paths]
        )
        if self._pooled:
            # A pooled kernel is nobody's start: per-user caps and start rates apply
            # when it is claimed.
            policy.max_kernels_per_user = policy.max_starts_per_minute = None
        return policy

    def _admit(self) -> None:
        self.created = time.time()
        admit_and_record(
            self.registry,
            self._policy(),
            {
                "kernel_id": self.kernel_id, "backend": self.backend, "state": "starting",
                "owner": self.owner, "server_id": self.server_id,
                "kernel_name": getattr(self.parent, "kernel_name", ""),
                "created": self.created, "last_activity": self.created,
                "server_pid": os.getpid(), "server_pid_create_time": process_identity(os.getpid()),
                "limits": self.limits.to_dict(), "max_lifetime": self.max_lifetime,
                "labels": dict(self.labels),
            },
        )

    _disk_paths: tuple[Path, ...] = ()

    # -- the warm pool (pool.py) ------------------------------------------------------

    # What a claim takes over from the pooled kernel's provisioner: its sandbox, its
    # process or container, its proxy. Backends add theirs.
    _sandbox_fields: tuple[str, ...] = (
        "uid", "gid", "kdir", "kernel_dir", "work_dir", "connection", "plan", "workfs",
        "pid", "pid_create_time", "connection_info", "_baseline", "_disk_paths",
        "_launch_env", "protocol_version",
    )

    async def pool_fingerprint(self) -> str:
        """What a pooled kernel must share with a start to be claimed by it: backend,
        kernelspec, the settings that shape the sandbox, the limits (and the image)."""
        spec = self.kernel_spec
        return warm_pool.fingerprint({
            "class": type(self).__name__,
            "kernelspec": spec.to_dict() if spec is not None else None,
            "settings": warm_pool.settings_of(self),
            "limits": self.limits.to_dict(),
            **await self._fingerprint_extra(),
        })

    async def _fingerprint_extra(self) -> dict[str, Any]:
        """What else decides what a kernel is (Docker: the image's id)."""
        return {}

    async def pooled_alive(self) -> bool:
        """Whether this pooled kernel still runs (asked at each claim)."""
        return await self.poll() is None

    async def _claim_folder(self, slot: Pooled, kwargs: dict[str, Any]) -> Workspace | None:
        """The host folder the claimed kernel works in (None: its private dir), made
        visible in it. NotClaimable where the backend cannot do that after launch."""
        if chosen_folder(self.workspace, kwargs.get("cwd")) is not None:
            raise NotClaimable("workspace")
        return None

    async def _claim_pooled(self, kwargs: dict[str, Any]) -> bool:
        """Serve this start from the warm pool if a pooled kernel fits (claim.py); False:
        a cold start."""
        return await claim_pooled(self, kwargs)

    def _cold_start_over(self) -> None:
        """A cold start of a pooled kernelspec ended (either way): its refills may go."""
        pool, self._cold_pool = self._cold_pool, None
        if pool is not None:
            pool.cold_starts -= 1
            pool.note_start()
            pool.wake()

    def _watch_sandbox(self) -> None:
        """Start the watchdog of a claimed kernel (the pooled one's was stopped)."""
        self._start_watchdog(self._baseline)

    def _prepare_kernel_dir(self, uid: int | None = None, gid: int | None = None) -> Measure:
        """Create the kernel dir with its uid (kernel_dir.prepare); returns how the
        kernel's identity is enforced."""
        if uid is None and self.uid is None and os.geteuid() == 0:
            uid = gid = uids.allocate(
                self.sandbox_id, str(self.registry.state_dir), self.kernel_uid_range
            )
        if uid is not None:
            self.uid, self.gid = uid, gid if gid is not None else uid
        self.kdir = prepare_kernel_dir(
            self.registry, self.kernel_id, self.uid, self.gid, sandbox_id=self.sandbox_id
        )
        self.kernel_dir = self.kdir.path
        kept = None if self._restarting else self._claim_kept_files()
        try:
            self.workfs = self._own_filesystem(kept)
            if kept is not None and not kept.used:
                self._restore_kept_dir(kept)
        finally:
            if kept is not None:
                kept.settle()
        return identity_measure(self.uid, os.geteuid(), in_container=self.backend == "docker")

    # -- keep_files_for (kept_files.py) ---------------------------------------------------

    def _keep_files_key(self) -> tuple[str, str, str] | None:
        """(owner, label, value) this kernel's files are kept under, if they are."""
        value = self.labels.get(self.keep_files_label)
        if not self.keep_files_for or not value:
            return None
        return self.owner, self.keep_files_label, value

    def _claim_kept_files(self) -> kept_files.Claimed | None:
        key = self._keep_files_key()
        if key is None:
            return None
        try:
            return kept_files.claim(self.state_dir, *key)
        except Exception:  # a start never fails for files it could not get back
            self.log.exception("Kernel %s: kept files not taken back", self.kernel_id)
            return None

    def _restored(self, kept: kept_files.Claimed) -> None:
        kept.used = True
        self.files_restored = {k: kept.meta.get(k) for k in ("kernel_id", "kept_at", "bytes")}
        self.log.info("Kernel %s: the files kept from kernel %s are back in its work dir",
                      self.kernel_id, kept.meta.get("kernel_id"))

    def _kept_image(self, kept: kept_files.Claimed | None) -> workfs.Reuse | None:
        """The kept image, if this kernel's own filesystem can be it (same limits)."""
        if kept is None or kept.kind != "image" or self.limits.disk_limit is None:
            return None
        size = workfs.Geometry.of(self.limits.disk_limit, self.limits.files_limit).image_bytes
        if kept.meta.get("image_bytes") != size:
            self.log.warning("Kernel %s: kept files not taken back: disk_limit/files_limit "
                             "differ from their kernel's", self.kernel_id)
            return None
        return kept.reuse()

    def _restore_kept_dir(self, kept: kept_files.Claimed) -> None:
        """A kept work dir becomes this kernel's, unless it has a filesystem of its own
        (then a kept dir does not fit it: it stays kept until it expires)."""
        assert self.kdir is not None
        if kept.kind != "dir" or (self.workfs is not None and self.workfs.hard):
            return
        try:
            self.kdir.take_work(kept.dir_fd, kept_files.WORK, kept.old_identity)
        except (OSError, workfs.WorkFsError):
            self.log.exception("Kernel %s: kept files not taken back", self.kernel_id)
            return
        self._restored(kept)

    def _keep_files(self) -> None:
        """Keep the culled kernel's files (kept_files.keep) instead of deleting them
        with its dir; on any failure they go with it, as without keep_files_for."""
        key = self._keep_files_key()
        if key is None or self.kdir is None:
            return
        owner, label, value = key
        lim = self.limits
        image = (workfs.Geometry.of(lim.disk_limit, lim.files_limit).image_bytes
                 if lim.disk_limit is not None else None)
        try:
            self.files_kept = kept_files.keep(
                self.kdir, state_dir=self.state_dir, owner=owner, label=label, value=value,
                keep_for=self.keep_files_for, budget=self.kept_files_budget, image_bytes=image,
            )
        except (kept_files.KeepError, OSError) as e:
            self.log.warning("Kernel %s: files not kept, deleted with the kernel: %s",
                             self.kernel_id, e)
            return
        self.log.info("Kernel %s: files kept for %gs for %r's %s=%s", self.kernel_id,
                      self.keep_files_for, owner, label, value)

    def _own_filesystem(self, kept: kept_files.Claimed | None = None) -> workfs.WorkFs | None:
        """Put the kernel's dirs on a filesystem of their own (workfs.py) if asked and
        possible; else say why not. ``kept``: kept files whose image it may be.
        Blocking (mkfs, mount): called in a thread."""
        assert self.kdir is not None
        limits = self.limits
        if limits.disk_limit is None:
            return None  # nothing to cap: the dirs stay on the host's filesystem
        if self.own_filesystem == "off":
            why = "own_filesystem is off"
        elif self.uid is None:
            why = "the kernel has no uid of its own (the server is not root)"
        else:
            why = workfs.unavailable()
        if why is None and self._restarting and not workfs.is_mounted(self.kdir.path):
            # Made now, it would hide what the kernel's first process wrote there.
            why = "the kernel's first start had none"
        reuse = self._kept_image(kept) if why is None else None
        if reuse is not None:
            assert kept is not None
            try:
                made = self.kdir.own_filesystem(limits.disk_limit, limits.files_limit, reuse)
            except workfs.WorkFsError as e:
                kept.used = True  # the image went with the failed attempt
                self.log.warning("Kernel %s: kept files lost, their image could not be "
                                 "mounted again: %s", self.kernel_id, e)
            else:
                self._restored(kept)
                return made
        if why is None:
            try:
                return self.kdir.own_filesystem(limits.disk_limit, limits.files_limit)
            except workfs.WorkFsError as e:
                why = str(e)
                # The host should have allowed it: worth the operator's attention.
                self.log.warning("Kernel %s: disk_limit falls back to the watchdog: %s",
                                 self.kernel_id, why)
        if self.own_filesystem == "required":
            msg = (
                f"kernel {self.kernel_id}: own_filesystem='required', but its dirs cannot "
                f"be a filesystem of their own: {why}. Run the server as root on a host "
                f"with loop devices and mkfs.ext4, or set own_filesystem to 'auto'"
            )
            raise SandboxUnavailableError(msg)
        return workfs.WorkFs(why_not=why)

    def _connect_clients(self, last_activity: float | None = None) -> None:
        """Put the proxy between the KernelManager's clients and the kernel; once per
        kernel (clients keep their addresses across restarts)."""
        km = self.parent
        if km is None or self.kdir is None:
            return
        if self.connection is None:
            client_dir = self.registry.clients_dir / self.sandbox_id
            address = requested_address(km, str(client_dir / "c"))
            if not address.private:
                self.log.info("Kernel %s: clients connect as the manager was configured: %s",
                              self.kernel_id, address.describe())
            self.connection = KernelConnection(
                kernel_id=self.kernel_id,
                kdir=self.kdir,
                client_dir=client_dir,
                client_address=address,
                session=km.session,
                output_limit=self.output_limit,
                max_message_size=self.max_message_size,
                last_activity=last_activity,
                curve_secretkey=client_curve_secretkey(km),
                kernel=self._kernel_endpoint(),
            )
        self.connection.point_clients(km)

    def _kernel_endpoint(self) -> KernelEndpoint | None:
        """Where the proxy reaches the kernel's sockets; None: ipc in its socket dir."""
        return None

    # The host folder this start works in (workspace.py); None: its private work dir.
    work_folder: Workspace | None = None
    # Why this restart's kernel cannot be started (its folder became unusable): the
    # backend makes it a kernel that died at once, with this reason.
    refused_restart: str | None = None

    def _choose_work_folder(self, cwd: str | None, kernel_uid: int | None) -> Measure:
        """Resolve the ``workspace`` setting for a start asked to work in ``cwd``
        (blocking: it stats the path); returns the plan's line about it. ``kernel_uid``:
        the kernel's own uid (None: it runs as the server's user)."""
        folder = chosen_folder(self.workspace, cwd)
        self.work_folder = self.refused_restart = None
        if folder is None:
            return Measure(PROVISIONER, "a private per-kernel dir (its HOME), removed at shutdown")
        try:
            self.work_folder = resolve_workspace(
                folder, server_uid=os.geteuid(), kernel_uid=kernel_uid,
                kernel_gid=self.gid if kernel_uid is not None else None,
            )
        except WorkspaceError as e:
            self.record_trip("sandbox", e.reason or str(e))
            if not self._restarting:
                raise
            # A restart that raises is retried forever; one whose kernel dies at once is
            # counted against restart_limit: the backend's launch makes it that.
            self.refused_restart = e.reason or str(e)
            return Measure(NONE, f"none: {self.refused_restart}")
        return Measure(NAMESPACE if kernel_uid is not None else NONE,
                       self.work_folder.describe())

    def resolve_path(self, path: str) -> str | None:
        """``path`` relative to the folder the kernel works in, if it is there (reached
        without a symlink): jupyter_server's ``resolvePath``. Nothing for a kernel in its
        private dir (nobody else's business) or outside its folder."""
        if self.work_folder is None:
            return None
        return resolve_beneath(self.work_folder.path, path)

    def _kernel_env(self, env: dict[str, str] | None) -> dict[str, str]:
        """The start's env plus what every limited kernel is told about its limits, its
        id (the watchdog and reaper find its processes by it), its HOME (its work dir)
        and where its pip installs from (wheelhouse.py)."""
        assert self.kdir is not None
        notice = str(self.kdir.ctl / "notice")
        env = {
            **(env or {}), **limit_env(self.limits, self.output_limit, notice),
            KERNEL_ID_ENV: self.sandbox_id, "HOME": str(self.kdir.work),
        }
        if self.wheelhouse:
            env.update(pip_env(self.wheelhouse, str(self.kdir.work), self.limits.network))
        if self.work_folder is not None and self.work_folder.read_only:
            env[READ_ONLY_FOLDER_ENV] = f"{self.work_folder.path}: {self.work_folder.why}"
        return env

    # What a caller set in start_kernel(env=...) that is not the server's own value.
    _supplied_env: set[str] = set()
    # Names whose supplied values mean nothing where the kernel runs (docker: host paths).
    _host_only_env: tuple[str, ...] = ()

    def _finalize_env(self, env: dict[str, str]) -> None:
        """Drop server environment variables not on the allow-list (see ``env_keep``);
        keep what the caller supplied on purpose, never a secret it was not told to."""
        super()._finalize_env(env)
        explicit = set(self.kernel_spec.env) if self.kernel_spec else set()
        keep_allowed(env, self.env_keep, explicit, self.log, self.kernel_id, self._supplied_env)

    async def _open_kernel_door(self) -> None:
        """Check the kernel's sockets and connect the proxy (connection.open_door).

        A kernel whose sockets fail the check raises SandboxUnavailableError; one that
        exits before opening them raises :class:`SandboxStartError` on a first start
        (on a restart the restarter counts it and tries again). The backend's
        ``launch_kernel`` then stops and releases it (``_abandon_start``). Called by the
        backends' ``launch_kernel`` right after the process or container started.
        """
        assert self.connection is not None
        problems = await self.connection.open_door(self.poll, self.ipc_bind_wait)
        if not problems:
            return
        code = await self.poll()
        if code is not None:
            if not self._restarting:
                await self._died_starting(code)
            return
        msg = door_refusal(self.kernel_id, problems, self.ipc_bind_wait)
        self.record_trip("sandbox", msg)
        raise SandboxUnavailableError(msg)

    async def _died_starting(self, code: int) -> None:
        """The kernel exited before it opened its sockets: say why, with its own words (an
        interpreter that cannot import ipykernel in the sandbox, say)."""
        output = (await self._start_output()).strip()
        reason = (
            f"the kernel exited during its start, before opening its sockets "
            f"({self.exit_reason or f'exit status {code}'})"
        )
        if output:
            # Bounded: it is the kernel's own text, and it goes into an HTTP answer.
            reason += f"; its last output:\n{output[-START_OUTPUT_LIMIT:]}"
        self.record_trip("sandbox", reason)
        msg = f"Kernel {self.kernel_id} could not be started: {reason}"
        errno = self._command_errno(code)
        if errno is not None:
            raise kernel_command_error(msg, reason=reason, errno=errno)
        raise SandboxStartError(msg, reason=reason)

    async def _start_output(self) -> str:
        """What the kernel printed before it died at start (backends that keep it)."""
        return ""

    def _command_errno(self, code: int) -> int | None:
        """The errno of a kernel command that could not be executed, if exit status
        ``code`` of a start says so (backends whose init reports it that way)."""
        return None

    @on_package_loop
    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> Any:
        """Start the kernel (the backend's ``_launch``), then check and connect its
        sockets (``_open_kernel_door``); called by KernelManager after pre_launch.

        A first start that fails (the sandbox or container cannot be set up, the kernel
        exits before opening its sockets, its sockets fail their check) raises
        SandboxStartError or SandboxUnavailableError; what pre_launch reserved is released
        first (``_abandon_start``). A restart that fails so returns a kernel that died at
        once, for the restarter to count.
        """
        try:
            if self._claim_launch:
                # Claimed from the warm pool: it runs already (pre_launch took it over).
                self._claim_launch = False
                self._watch_sandbox()
                return self.connection_info
            try:
                self._give_up_if_ended()
                info = await self._launch(cmd, kwargs)
                self._give_up_if_ended()
                return info
            except BaseException:
                await self._abandon_start()
                raise
            finally:
                self._cold_start_over()
        finally:
            self._start_settled()

    def _give_up_if_ended(self) -> None:
        """A shutdown waits for this start (``cleanup``): stop it here rather than hand
        jupyter_client a kernel it has just shut down."""
        if self._end_requested:
            raise KernelEndedError(
                f"Kernel {self.kernel_id} was shut down while it started: the start was "
                "abandoned. Start a new kernel to go on."
            )

    def _start_settled(self) -> None:
        if self._start_over is not None:
            self._start_over.set()
            self._start_over = None

    async def _abandon_start(self) -> None:
        """Stop what a failed ``launch_kernel`` started, then release what pre_launch
        reserved: all of it, or on a restart what the next process would not reuse (the
        restarter tries again; jupyter_server releases the rest once it gives up).
        Called by the backends' ``launch_kernel`` before the error propagates."""
        try:
            await self.kill()
        except Exception:  # releasing the rest matters more
            self.log.exception("Kernel %s: stopping a failed start", self.kernel_id)
        await self._cleanup_now(restart=self._restarting)

    async def _record_running(self, **backend_fields: Any) -> None:
        """The started kernel's registry entry: what adoption and the reaper need."""
        self._ran = True
        pid = getattr(self, "pid", None)
        # With the pid, its start time: a reused pid never passes for this kernel.
        self.pid_create_time = await asyncio.to_thread(process_identity, pid) if pid else None
        await asyncio.to_thread(
            self.registry.update, self.kernel_id,
            state="pooled" if self._pooled else "running", pid=pid,
            pid_create_time=self.pid_create_time, uid=self.uid,
            gid=self.gid, kernel_dir=str(self.kernel_dir), work_dir=self.work_dir,
            connection_file=getattr(self.parent, "connection_file", None),
            enforcement=self.plan.report(), mechanisms=self.plan.mechanisms(),
            workfs=self.workfs.record() if self.workfs is not None else None,
            started=time.time(), **backend_fields,
        )

    async def _disk_baseline(self) -> tuple[int, int]:
        """Bytes and files the watchdog does not count against disk_limit/files_limit:
        in a host folder (workspace), what it held at the start (only growth counts); in
        the private work dir, what it holds over the limits at a restart
        (watchdog.carried_over); nothing on a filesystem of its own."""
        if self.work_folder is not None:
            if not (self.limits.disk_limit or self.limits.files_limit):
                return 0, 0
            usage = await asyncio.to_thread(dir_usage, self.work_folder.path, 200_000)
            return usage.bytes, usage.files
        if self.kdir is None or (self.workfs is not None and self.workfs.hard):
            return 0, 0
        return await asyncio.to_thread(carried_over, str(self.kdir.work), self.limits)

    def _start_watchdog(
        self, baseline: tuple[int, int], get_pids: Any = list, check_events: Any = None,
        events_back_off: bool = True,
    ) -> None:
        """``events_back_off``: ``check_events`` only reports, so an idle kernel's may
        wait watchdog_idle_interval (False when it also enforces, e.g. puts back limits)."""
        if self._pooled:
            # A pooled kernel runs no one's code: nothing to watch (and nothing to poll
            # for each kernel the pool holds) until a claim starts its watchdog.
            return
        back_off = events_back_off and self.watchdog_idle_interval > self.watchdog_interval
        self.watchdog = Watchdog.for_kernel(
            self.kernel_id, self.limits, self.plan, self.kdir, self.work_dir,
            interval=self.watchdog_interval, on_trip=self._on_trip, get_pids=get_pids,
            check_events=check_events, baseline=baseline,
            own_fs=self.workfs is not None and self.workfs.hard,
            events_idle_interval=self.watchdog_idle_interval if back_off else None,
            busy=self._recently_busy,
        )
        self.watchdog.start()

    def _recently_busy(self) -> bool:
        """An execution runs, or a client asked something within watchdog_idle_interval."""
        if self.connection is None:
            return True  # no traffic to tell: treat as busy
        traffic = self.connection.traffic
        return traffic.busy or traffic.idle_for() < self.watchdog_idle_interval

    async def _on_trip(self, kind: str, reason: str) -> None:
        """The watchdog found a limit exceeded: say why, then stop the kernel."""
        self.record_trip(kind, reason)
        await self.kill()

    async def post_launch(self, **kwargs: Any) -> None:
        """Start the timers and the reaper; called by ``KernelManager.post_start_kernel()``
        on the manager's loop, which is remembered for the timers' culls."""
        self.manager_loop.remember(self.parent)
        await bridged(self._post_launch(**kwargs))

    async def _post_launch(self, **kwargs: Any) -> None:
        await super().post_launch(**kwargs)
        if self.ended:
            return  # shut down since its launch: no timers for a kernel that is gone
        if self._pooled:
            # Nobody's kernel: never idle-culled, not counted as anyone's.
            self.host.start_reaper(self.state_dir, self.reap_interval)
            return
        self._start_watching()
        metrics.START_SECONDS.labels(backend=self.backend).observe(
            time.monotonic() - self._launch_started
        )
        if self._pool is not None or self.pool_size > 0:
            # The start someone waited for is done: the pool may refill behind it.
            pool = warm_pool.pool_for(self)
            pool.note_start()
            pool.wake()

    def _start_watching(self) -> None:
        if self.connection is not None:
            self.lifecycle = LifecycleTimer(
                kernel_id=self.kernel_id, limits=self.limits, traffic=self.connection.traffic,
                created=self.created or time.time(), max_lifetime=self.max_lifetime,
                exec_timeout_grace=self.exec_timeout_grace, interval=self.lifecycle_interval,
                interrupt=self._interrupt_execution, stop=self._stop_for, persist=self._persist,
                log=self.log,
            )
            self.lifecycle.start()
        self.host.start_reaper(self.state_dir, self.reap_interval)
        metrics.LIVE_KERNELS.add(self.kernel_id, self.backend, self.owner)

    # -- the lifecycle timer's actions --------------------------------------------------

    async def _interrupt_execution(self, verdict: Verdict, msg_id: str) -> None:
        self.record_trip(verdict.kind, verdict.reason)
        if self.kdir is not None:
            # Root-owned, read-only for the kernel; its hook only believes it for msg_id.
            await asyncio.to_thread(
                self.kdir.write, "notice", f"{msg_id}\n{verdict.reason}", mode=0o644
            )
        await self.send_signal(signal.SIGINT)

    async def _stop_for(self, verdict: Verdict) -> None:
        """Cull or restart the kernel (on the package's loop): through an async manager
        on its own loop, so its books stay true; else (a blocking manager, a loop that
        has ended, a manager that failed) here, alone."""
        # A restart follows an interrupt that was already counted as the trip.
        reason = verdict.reason
        if verdict.action == "restart":
            reason = self._with_limits_hit(reason)
        self.record_trip(verdict.kind, reason, count=verdict.action == "cull")
        # Idle: nobody asked for the end, so the files may be wanted back (keep_files_for).
        self._keep_at_release = kept_files.kept_after(verdict.action, verdict.kind)
        km, action = self.parent, verdict.action
        try:
            if await self.manager_loop.run(
                lambda: internals.cull_or_restart(km, self.kernel_id, action)
            ):
                return
        except Exception as e:
            if self.ended:
                # Shut down meanwhile (the restart found it ended): nothing left to do.
                self.log.info("Kernel %s: %s dropped, the kernel was shut down (%s)",
                              self.kernel_id, action, e)
                return
            self.log.exception(
                "Kernel %s: %s through its manager failed; doing it here", self.kernel_id, action
            )
        if self.ended:
            return
        try:
            if action == "cull" or km is None:
                await self._end_alone()
            else:
                await internals.restart_here(km)
        except Exception:
            self.log.exception("Kernel %s: %s failed", self.kernel_id, action)

    def _with_limits_hit(self, reason: str) -> str:
        traffic = self.connection.traffic if self.connection is not None else None
        since = traffic.executing_since if traffic is not None else None
        return with_limits_hit(reason, self.limit_trips, since)

    async def _end_alone(self) -> None:
        """Stop the kernel and remove every trace without the manager's help (nobody
        may call into a blocking manager for hours); the manager's later calls find a
        dead kernel and an idempotent cleanup."""
        km = self.parent
        if km is not None:
            # A blocking manager's restarter skips a kernel being shut down; an async
            # one (here after its manager failed) is stopped on its own loop.
            internals.hold_auto_restarts(km)
            self.manager_loop.call_soon(km.stop_restarter)
            # What the manager's cleanup would remove first (the client dir goes with it).
            km.cleanup_connection_file()
        await self.kill()
        await self.wait()
        await self.cleanup(restart=False)

    async def end_at_exit(self) -> None:
        """Its process exits cleanly still holding the kernel (held_kernels.py): end it
        and remove every trace, as a stock kernel ends with its parent."""
        self.log.info("Kernel %s: ending it with the process that manages it", self.kernel_id)
        await bridged(self._end_alone())

    async def _persist(self, last_activity: float) -> None:
        await asyncio.to_thread(self.registry.update, self.kernel_id, last_activity=last_activity)

    async def _stop_watching(self) -> None:
        if self.lifecycle is not None:
            await self.lifecycle.stop()
            self.lifecycle = None
        if self.watchdog is not None:
            await self.watchdog.stop()
            self.watchdog = None

    # -- backend hooks --------------------------------------------------------------------

    async def _before_admission(self) -> None:
        """Checks that need no reservation (daemon up, image present)."""

    async def _prepare_sandbox(self, kwargs: dict[str, Any]) -> None:
        """Kernel dir, uid and the enforcement plan; before the connection file exists."""

    async def _prepare_launch(self, kwargs: dict[str, Any]) -> None:
        """After jupyter_client's pre_launch (``kwargs["cmd"]`` final)."""

    async def _launch(self, cmd: list[str], kwargs: dict[str, Any]) -> Any:
        """Start the process or container (``launch_kernel``); returns the connection info."""
        raise NotImplementedError

    async def _restore(self, entry: dict[str, Any]) -> None:
        """Re-attach to the process or container of an adopted kernel (recovery.py)."""
        raise NotImplementedError

    async def _cleanup(self, restart: bool) -> None:
        """What :meth:`cleanup` does for this backend (the process or container is gone)."""
        raise NotImplementedError

    # -- stop -------------------------------------------------------------------------

    @property
    def ended(self) -> bool:
        """The kernel was stopped for good and its traces removed (or are being)."""
        return self._ended.done

    @on_package_loop
    async def cleanup(self, restart: bool = False) -> None:
        """Called by ``KernelManager.cleanup_resources()`` once the kernel stopped.

        On restart the backend keeps what the next process needs; otherwise everything
        goes, once: a second call (the manager's shutdown after a timer's cull, from any
        thread) waits for the first and returns.
        """
        if restart:
            self._restart_due = True
        elif self._start_over is not None:
            # A (re)start overlaps this shutdown: removing its dir, uid and container
            # under it would leave what it still creates to nobody. It gives up at its
            # next step (_give_up_if_ended) and releases what it made; then this runs.
            self._end_requested = True
            try:
                await asyncio.wait_for(self._start_over.wait(), START_SETTLE_TIMEOUT)
            except asyncio.TimeoutError:
                self.log.warning("Kernel %s: a start still runs after %gs; removing the "
                                 "kernel anyway", self.kernel_id, START_SETTLE_TIMEOUT)
        await self._cleanup_now(restart)

    async def _cleanup_now(self, restart: bool) -> None:
        """``cleanup`` without waiting for a start (called by a start that failed)."""
        if restart:
            await self._cleanup(restart=True)
        else:
            await self._ended.run(lambda: self._cleanup(restart=False))

    async def _between_processes(self) -> None:
        if self.connection is not None:
            await self.connection.between_processes()

    async def _release(self) -> None:
        """Undo what pre_launch reserved (proxy, kernel dir, uid lease, registry entry);
        backends extend this (and call it last)."""
        metrics.LIVE_KERNELS.remove(self.kernel_id)
        if self.connection is not None:
            await self.connection.close()
            self.connection = None
        if self.kdir is not None:
            # Files it got back, in a start that failed before the kernel ran: kept again.
            failed_restore = self.files_restored is not None and not self._ran
            if self._keep_at_release or failed_restore:
                self._keep_at_release = False
                await asyncio.to_thread(self._keep_files)
            await asyncio.to_thread(self.kdir.remove)
        if self.uid is not None:
            # A no-op for a uid this kernel holds no lease on (a fixed container_user).
            await asyncio.to_thread(uids.release, self.uid, self.sandbox_id)
        await asyncio.to_thread(self.registry.remove, self.kernel_id)
        held_kernels.let_go(self)
        if not metrics.LIVE_KERNELS.kernels:
            # The last kernel of this process is gone: stop a script's reaper rather than
            # leave a pending task behind (nbclient exits right after this).
            self.host.stop_reaper()

    # -- re-adoption (recovery.adopt does the rest) -----------------------------------

    async def detach(self) -> None:
        """Stop managing the kernel from this process and leave it running for a later
        :func:`~limited_provisioner.adopt` (a deploy, a service restart). Called on the
        manager's loop, where its restarter lives."""
        await bridged(self._let_go())
        if self.parent is not None:
            self.parent.stop_restarter()
            internals.keep_connection_file(self.parent)

    async def _let_go(self) -> None:
        held_kernels.let_go(self)
        await self._stop_watching()
        if self.connection is not None:
            # Whoever adopts the kernel next binds the client side anew.
            await self.connection.close()
            self.connection = None
        metrics.LIVE_KERNELS.remove(self.kernel_id)

    # -- limit trips and exit reasons ---------------------------------------------------

    def record_trip(self, kind: str, reason: str, count: bool = True) -> None:
        """Remember why the kernel was (or is about to be) stopped, log and count it."""
        self.exit_reason = reason
        self.exit_kind = kind
        if count:
            metrics.count_trip(kind)
        self.limit_trips.append({"kind": kind, "reason": reason, "time": time.time()})
        self.log.warning("Kernel %s: %s", self.kernel_id, reason)

    def _forget_exit(self) -> None:
        """A new process of the kernel runs: why the last one died moves to
        ``last_exit`` (with the time of this start). Called by the backends' launch."""
        if self.exit_reason:
            self.last_exit = {
                "kind": self.exit_kind or "exit", "reason": self.exit_reason,
                "restarted": time.time(),
            }
        self.exit_reason = self.exit_kind = None

    def death_report(self) -> dict[str, Any] | None:
        """Why the kernel just died, for its clients: ``{"kind", "reason", "parent"}``.

        ``parent`` is the header (msg_id, session) of the execution it was running, as
        the proxy saw the client ask for it; None if it died idle. None while no exit
        reason is known. Called from the restarter's callbacks.
        """
        if not self.exit_reason:
            return None
        parent = None
        running = self.connection.traffic.running() if self.connection is not None else None
        if running is not None:
            parent = {"msg_id": running.msg_id, "session": running.session}
        return {"kind": self.exit_kind or "exit", "reason": self.exit_reason, "parent": parent}

    def describe_enforcement(self) -> str:
        return self.plan.describe()

    async def get_provisioner_info(self) -> dict[str, Any]:
        """Add limits, how each is enforced, and the last exit reason to the base info."""
        info = await super().get_provisioner_info()
        info.update(
            backend=self.backend, limits=self.limits.to_dict(), enforcement=self.enforcement,
            exit_reason=self.exit_reason, limit_trips=list(self.limit_trips), owner=self.owner,
            server_id=self.server_id, work_dir=self.work_dir, uid=self.uid,
            kernel_dir=str(self.kernel_dir) if self.kernel_dir else None,
        )
        return info

    async def load_provisioner_info(self, provisioner_info: dict) -> None:
        """Restore what get_provisioner_info saved; tolerates info from older versions."""
        await super().load_provisioner_info(provisioner_info)
        self.plan = EnforcementPlan.from_report(provisioner_info.get("enforcement") or {})
        self.exit_reason = provisioner_info.get("exit_reason")
        self.limit_trips = list(provisioner_info.get("limit_trips") or [])
        kernel_dir = provisioner_info.get("kernel_dir")
        self.kernel_dir = Path(kernel_dir) if kernel_dir else None
        self.work_dir = provisioner_info.get("work_dir")
        self.uid = provisioner_info.get("uid")
