"""``limited-process-provisioner``: a local kernel process inside OS limits.

On a host where we are root (the case this package is built for) the kernel runs:

* in its own memory / cpu / pids cgroup(s) (hard limits; cgroup v2 as root or in the
  user's delegated subtree, or v1; see ``cgroups.py``),
* in an empty network namespace (unless ``network``), reached over ``ipc`` sockets in
  its kernel dir through the server's proxy (proxy.py),
* in private PID, IPC and mount namespaces: it sees only its own processes, its SysV
  IPC objects vanish with it, the host filesystem is read-only, and ``/tmp``,
  ``/var/tmp``, ``/dev/shm`` and ``/run/lock`` are private size-capped tmpfs,
* as a per-kernel unprivileged uid (host-wide unique, uids.py) that owns only its work
  dir and, until it has bound them, its socket dir,
* with its stdout/stderr in a size-capped log (kernel_log.py), not the server's streams,
* with rlimits: RLIMIT_DATA (mem), RLIMIT_NOFILE, RLIMIT_FSIZE (disk), RLIMIT_CORE=0,
* with its work, connection and socket dirs on a filesystem of its own of disk_limit
  bytes and files_limit inodes (workfs.py; else the watchdog measures them),
* watched by a :class:`~limited_provisioner.watchdog.Watchdog` for memory where no
  cgroup exists (and for the dirs' size and file count without a filesystem of its own).

Without root, whatever cannot be set up is reported as best-effort or not enforced in
the log and ``get_provisioner_info()['enforcement']`` — never silently skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from typing import Any

from jupyter_client.provisioning.local_provisioner import LocalProvisioner
from traitlets import Float, Int

from .._background import on_package_loop
from ..enforcement import CGROUP, process_plan
from ..errors import LimitConfigError, SandboxStartError, kernel_command_error
from ..kernel_env import BLAS_THREADS
from ..limits import format_size
from ..pool import NotClaimable
from ..provisioner import LimitedProvisioner
from ..registry import Registry, is_alive, sandbox_of
from ..watchdog import tree_pids
from ..workspace import Workspace, attach_in_kernel, chosen_folder, resolve_workspace
from . import launch as _launch
from .adopted import AdoptedProcess
from .cgroups import KernelCgroups, entry_record
from .interpreter import Needed, interpreter_paths
from .kernel_log import KernelLog
from .launch_status import LaunchStatus, exec_errno
from .sandbox import (
    PRIVATE_SCRATCH,
    can_unshare_net,
    exposures,
    host_scratch_dirs,
    launch_spec,
    scratch_parent,
    untraversable_ancestor,
)


class LimitedProcessProvisioner(LimitedProvisioner, LocalProvisioner):
    """A :class:`LocalProvisioner` whose kernel runs inside resource limits."""

    backend = "process"

    kernel_nice = Int(
        10,
        help="""Niceness of kernels when no cpu cgroup is available (best-effort CPU
        limit). 0 leaves the priority alone.""",
    ).tag(config=True)

    cpu_startup_grace = Float(
        2.0,
        help="""Seconds after launch before the cpu_limit quota applies. Interpreter and
        ipykernel start-up is a short multi-threaded burst that a quota only slows down
        (measured: +30 ms median at cpu_limit=1); no user code runs before the kernel is
        ready. 0 applies the quota from the first instruction.""",
    ).tag(config=True)

    kernel_log_limit = Int(
        1024 * 1024,
        help="""Bytes of a kernel process's own stdout/stderr (raw writes to fd 1/2, C
        libraries, subprocesses) kept in <kernel dir>/kernel.log; the rest is dropped.
        Never written to the server's streams. Default 1 MiB.""",
    ).tag(config=True)

    _sandbox_fields = (
        *LimitedProvisioner._sandbox_fields,
        "process", "pgid", "ip", "ports_cached", "cgroups", "kernel_log", "_netns",
        "_cpu_task",
    )

    cgroups: KernelCgroups | None = None
    kernel_log: KernelLog | None = None
    _cpu_task: asyncio.Task | None = None
    _shutting_down = False

    # -- start ----------------------------------------------------------------------

    async def _prepare_sandbox(self, kwargs: dict[str, Any]) -> None:
        """Kernel dir, uid and cgroups, and the plan of what enforces each limit; runs
        before LocalProvisioner.pre_launch writes the connection file."""
        await asyncio.to_thread(self._prepare_sandbox_sync, kwargs.get("cwd"))

    def _prepare_sandbox_sync(self, cwd: str | None) -> None:
        if os.geteuid() == 0:
            scratch = scratch_parent(str(self.registry.state_dir))
            if scratch is not None:
                msg = (
                    f"state_dir {self.registry.state_dir} is under {scratch}, which every "
                    f"kernel gets a private, empty copy of: the kernel could not see its own "
                    f"dir. Choose a state_dir outside {', '.join(PRIVATE_SCRATCH)} (the "
                    f"default is /var/lib/limited-provisioner)"
                )
                raise LimitConfigError(msg)
        identity = self._prepare_kernel_dir()
        where = self._choose_work_folder(cwd, self.uid if self._isolate else None)
        self.cgroups = KernelCgroups.create(
            self.sandbox_id, self.limits, defer_cpu=self.cpu_startup_grace > 0
        )
        self._netns = can_unshare_net()
        self.plan = process_plan(
            self.limits, cgroups=self.cgroups.offer(), own_uid=self.uid is not None,
            isolated=self._isolate, netns=self._netns, nice=self.kernel_nice,
            cpu_grace=self.cpu_startup_grace, scratch_dirs=host_scratch_dirs(),
            workfs=self.workfs, disk_interval=self.watchdog_interval * 4,
            host_folder=self.work_folder is not None,
        )
        self.plan.measures["identity"] = identity
        self.plan.measures["workspace"] = where

    @property
    def _isolate(self) -> bool:
        return os.geteuid() == 0 and self.uid is not None

    async def _launch(self, cmd: list[str], kwargs: dict[str, Any]) -> Any:
        """Through ``launch.py``, which applies the sandbox, then execs the command; a
        restart whose sandbox cannot be set up is a kernel that died at once."""
        assert self.kdir is not None
        work = str(self.kdir.work)
        kwargs["cwd"] = self.work_folder.path if self.work_folder else work
        self.work_dir = kwargs["cwd"]
        env = self._kernel_env(kwargs.get("env"))
        self._launch_env = dict(env)
        env.setdefault("IPYTHONDIR", os.path.join(work, ".ipython"))
        if self.limits.cpu_limit is not None:
            # BLAS/OpenMP pools sized to the host's cores only thrash under a CPU quota.
            for name in BLAS_THREADS:
                env.setdefault(name, str(max(1, int(self.limits.cpu_limit))))
        kwargs["env"] = env
        # cmd, not the kernelspec's argv: jupyter_client has replaced a bare "python"
        # by the server's own interpreter.
        expose: dict[str, str] = {}
        if self._isolate:
            try:
                expose = await asyncio.to_thread(self._interpreter_exposures, cmd, env)
            except SandboxStartError as e:
                if not self._restarting:
                    raise
                # See below: a restart fails as a dead kernel, which the launcher's exec
                # (or the kernel) will make of it without the exposures.
                self.record_trip("sandbox", e.reason)
        status = LaunchStatus()
        try:
            spec = launch_spec(
                self.limits, self.plan, cwd=kwargs.get("cwd") or work,
                cgroup_procs=self.cgroups.procs_files if self.cgroups else [],
                netns=self._netns, nice=self.kernel_nice, uid=self.uid, gid=self.gid,
                isolated=self._isolate, writable=[work, str(self.kdir.conn), str(self.kdir.sock)],
                expose=expose, status_fd=status.write_fd, workspace=self.work_folder,
            )
            if self.refused_restart:
                spec["refused"] = self.refused_restart
            # Run the launcher by path, isolated and without site: it needs only the
            # stdlib, and importing our package (and jupyter_client) would cost ~0.2 s.
            wrapped = [sys.executable, "-I", "-S", _launch.__file__, json.dumps(spec), "--", *cmd]
            kwargs["pass_fds"] = (status.write_fd,)
            connection_info = await self._start_launcher(wrapped, kwargs)
            status.launched()
            failure = await status.failure()
        finally:
            status.close()
        errno = None
        if failure is not None:
            errno, failure = exec_errno(failure)
        if failure is not None and not self._restarting:
            if errno is not None:
                # What LocalProvisioner's Popen raises (FileNotFoundError...), with the
                # launcher's words; still a SandboxStartError (503 from a server).
                self.record_trip("sandbox", failure)
                msg = f"Kernel {self.kernel_id}: the kernel command cannot run: {failure}"
                raise kernel_command_error(msg, reason=failure, errno=errno)
            self.record_trip("sandbox", f"sandbox setup failed: {failure}")
            msg = (
                f"Kernel {self.kernel_id} could not be started in its sandbox: {failure}"
            )
            raise SandboxStartError(msg, reason=failure)
        await self._record_running(
            cgroups=sorted(self.cgroups.controllers) if self.cgroups else [],
            cgroup=self.cgroups.record() if self.cgroups else {},
            launch_cwd=str(kwargs.get("cwd") or ""), disk_baseline=list(self._baseline),
        )
        if failure is not None:
            # A restart whose setup failed is a kernel that died at once (_note_exit says
            # why): jupyter_client's restarter counts that against restart_limit, while
            # a restart that raises is not counted and would be retried forever.
            return connection_info
        if self.plan.uses("cpu_limit", CGROUP) and self.cpu_startup_grace > 0:
            self._cpu_task = asyncio.ensure_future(self._apply_cpu_quota_later())
        await self._open_kernel_door()
        # Only now: a kernel that bound its sockets has joined its cgroups, so a trip
        # (dirs left over the limit by the previous process) kills the whole tree.
        self._start_process_watchdog(self._baseline)
        self.log.info(
            "Kernel %s started as pid %s with %s [%s]", self.kernel_id, self.pid,
            self.limits.describe(), self.describe_enforcement(),
        )
        return connection_info

    async def _start_launcher(self, wrapped: list[str], kwargs: dict[str, Any]) -> Any:
        """Popen the launcher (LocalProvisioner.launch_kernel), its output to kernel.log."""
        assert self.kdir is not None
        self._baseline = await self._disk_baseline()
        # Independent: no JPY_PARENT_PID, so the kernel outlives a crashed server and can
        # be re-adopted (recovery.py) instead of dying with it.
        kwargs["independent"] = True
        if self.kernel_log is not None:
            self.kernel_log.close()
        log_fd = await asyncio.to_thread(self.kdir.open_log)
        self.kernel_log = KernelLog(
            log_fd, self.kernel_log_limit, str(self.kdir.path / "kernel.log")
        )
        kwargs["stdout"] = kwargs["stderr"] = self.kernel_log.write_fd
        try:
            # LocalProvisioner's Popen, past LimitedProvisioner.launch_kernel (which is
            # what called us).
            connection_info = await LocalProvisioner.launch_kernel(self, wrapped, **kwargs)
        finally:
            self.kernel_log.start()
        self._forget_exit()
        self._shutting_down = False
        return connection_info

    def _interpreter_exposures(self, cmd: list[str], env: dict[str, str]) -> dict[str, str]:
        """The interpreter's paths the isolated kernel could not see by itself
        (sandbox.exposures); what is left out is logged."""
        needed = interpreter_paths(cmd, env)
        if self.wheelhouse:
            # Readable by the kernel's uid wherever it lies (checked at pre_launch).
            needed.append(Needed(self.wheelhouse, required=True))
        expose, notes = exposures(needed)
        for note in notes:
            self.log.warning("Kernel %s: %s", self.kernel_id, note)
        return expose

    async def _start_output(self) -> str:
        if self.kernel_log is None:
            return ""
        await self.kernel_log.drained()
        return self.kernel_log.tail()

    async def _abandon_start(self) -> None:
        """The base's, with the launcher reaped before the release: a failed start leaves
        no process (``has_process`` false: jupyter_client's manager holds no kernel) and
        no zombie in the cgroups about to be removed."""
        self._shutting_down = True
        try:
            await self.kill()
            if self.process is not None:
                await asyncio.wait_for(self.wait(), 10)
        except Exception:  # releasing the rest matters more
            self.log.exception("Kernel %s: stopping a failed start", self.kernel_id)
        await self._cleanup_now(restart=self._restarting)

    async def _claim_folder(self, slot: Any, kwargs: dict[str, Any]) -> Workspace | None:
        """The folder a claim asks for: bound into the pooled kernel's mount namespace
        (root: ``launch.py --attach``, idmapped as at launch), or, for a kernel that runs
        as the server's user and sees the host, merely its cwd (the claim's chdir)."""
        folder = chosen_folder(self.workspace, kwargs.get("cwd"))
        if folder is None:
            return None
        src = slot.prov
        isolated = os.geteuid() == 0 and src.uid is not None
        ws = await asyncio.to_thread(
            resolve_workspace, folder, server_uid=os.geteuid(),
            kernel_uid=src.uid if isolated else None, kernel_gid=src.gid if isolated else None,
        )
        if not isolated:
            return ws
        if scratch_parent(ws.path) or untraversable_ancestor(ws.path):
            # Its path is hidden in the kernel's view: only a launch can lay it out.
            raise NotClaimable("workspace")
        failed = await attach_in_kernel(src.pid, ws)
        if failed:
            self.log.warning("Kernel %s: the pooled kernel cannot take folder %s (%s); "
                             "starting a new one", self.kernel_id, ws.path, failed)
            raise NotClaimable("workspace")
        return ws

    def _watch_sandbox(self) -> None:
        self._start_process_watchdog(self._baseline)

    def _start_process_watchdog(self, baseline: tuple[int, int]) -> None:
        self._start_watchdog(
            baseline, get_pids=self._tree_pids,
            check_events=self._check_cgroup_events if self.cgroups else None,
            # A delegated group's limits are the kernel's to raise: put back every round.
            events_back_off=not (self.cgroups and self.cgroups.delegated),
        )

    async def _restore(self, entry: dict[str, Any]) -> None:
        """Take over a kernel process a previous server started (see recovery.adopt)."""
        self.pid = entry["pid"]
        self.pid_create_time = entry.get("pid_create_time")
        self.process = AdoptedProcess(self.pid, self.pid_create_time)
        try:
            self.pgid = os.getpgid(self.pid)
        except OSError:
            self.pgid = None  # gone meanwhile: poll() will say so
        self.cgroups = await asyncio.to_thread(
            KernelCgroups.attach, self.sandbox_id, entry_record(entry)
        )
        self._netns = can_unshare_net()
        self._start_process_watchdog(tuple(entry.get("disk_baseline") or (0, 0)))
        self.log.info("Kernel %s adopted (pid %s)", self.kernel_id, self.pid)

    @classmethod
    def remove_traces(cls, registry: Registry, entry: dict[str, Any]) -> None:
        """The reaper's part for a process kernel: kill its tree, remove its cgroups."""
        groups = KernelCgroups.attach(sandbox_of(entry), entry_record(entry, default=None))
        if groups:
            groups.kill_all()
            groups.remove()
        elif entry.get("pid") and is_alive(entry):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(entry["pid"], signal.SIGKILL)

    # -- running --------------------------------------------------------------------

    async def _apply_cpu_quota_later(self) -> None:
        await asyncio.sleep(self.cpu_startup_grace)
        if self.cgroups is not None:
            await asyncio.to_thread(self.cgroups.apply_cpu, self.limits)

    def _tree_pids(self) -> list[int] | set[int]:
        if self.cgroups:
            return self.cgroups.pids()
        if self.pid is None:
            return set()
        return tree_pids(self.pid)

    def _check_cgroup_events(self) -> None:
        """Report OOM kills / refused forks inside the tree while the kernel lives; put
        back limits a kernel in a delegated cgroup raised."""
        if self.cgroups is None:
            return
        for name in self.cgroups.put_back_limits(self.limits):
            self.log.warning(
                "Kernel %s raised its cgroup's %s (it runs as the server's user, who owns "
                "the delegated cgroup); put back", self.kernel_id, name,
            )
        if self.cgroups.new_oom_kills() > 0:
            self.record_trip(
                "mem_limit",
                f"memory limit {format_size(self.limits.mem_limit)} exceeded "
                "(OOM killed a process of the kernel's tree)",
            )
        refused = self.cgroups.new_pids_max_events()
        if refused:
            self.record_trip(
                "pids_limit",
                f"pids limit {self.limits.pids_limit} reached ({refused} forks refused)",
            )

    async def _on_trip(self, kind: str, reason: str) -> None:
        self.record_trip(kind, reason)
        await asyncio.to_thread(self._kill_tree)

    @on_package_loop
    async def poll(self) -> int | None:
        """Like LocalProvisioner.poll(); on first seeing the exit, records why it died."""
        process = self.process
        ret = await super().poll()
        if process is not None and ret is not None:
            self._note_exit(ret)
        return ret

    def _note_exit(self, code: int) -> None:
        if getattr(self, "_exit_noted_pid", None) == self.pid:
            return
        self._exit_noted_pid = self.pid
        if self.watchdog is not None and self.watchdog.tripped:
            pass  # the watchdog killed it and already recorded why
        elif self.exit_kind == "mem_limit" and code == -signal.SIGKILL and not self._shutting_down:
            # The watchdog's event check saw the OOM kill first and counted it; the
            # process it killed was the kernel itself, say so.
            self.exit_reason = (
                f"memory limit {format_size(self.limits.mem_limit)} exceeded (OOM killed)"
            )
        elif self.cgroups is not None and self.cgroups.new_oom_kills() > 0:
            self.record_trip(
                "mem_limit",
                f"memory limit {format_size(self.limits.mem_limit)} exceeded (OOM killed)",
            )
        elif code == _launch.EXIT_SANDBOX_FAILED:
            tail = self.kernel_log.tail().strip() if self.kernel_log else ""
            self.record_trip("sandbox", f"sandbox setup failed: {tail or 'see kernel.log'}")
        elif self.exit_reason is None and not self._shutting_down:
            if code < 0:
                self.exit_reason = f"killed by signal {signal.Signals(-code).name}"
            elif code:
                self.exit_reason = f"exited with status {code}"
            if self.exit_reason:
                tail = self.kernel_log.tail().rstrip() if self.kernel_log else ""
                self.log.warning(
                    "Kernel %s died: %s%s", self.kernel_id, self.exit_reason,
                    f"; its last output (kernel.log):\n{tail}" if tail else "",
                )

    @on_package_loop
    async def wait(self) -> int | None:
        """LocalProvisioner.wait(), on the package's loop with every other hook."""
        return await super().wait()

    @on_package_loop
    async def send_signal(self, signum: int) -> None:
        """LocalProvisioner.send_signal() (to the process group), unless the kernel ended."""
        if not self.ended:
            await super().send_signal(signum)

    @on_package_loop
    async def terminate(self, restart: bool = False) -> None:
        """LocalProvisioner.terminate(), on the package's loop with every other hook."""
        self._shutting_down = True
        await super().terminate(restart=restart)

    @on_package_loop
    async def shutdown_requested(self, restart: bool = False) -> None:
        """Called by KernelManager.request_shutdown(); an exit after this is expected."""
        self._shutting_down = True
        await super().shutdown_requested(restart=restart)

    @on_package_loop
    async def kill(self, restart: bool = False) -> None:
        """Kill the kernel and every process of its tree (not only its process group)."""
        self._shutting_down = True
        if self.ended:
            return  # already gone and cleaned up: its pid may be someone else's by now
        await super().kill(restart=restart)
        await asyncio.to_thread(self._kill_tree)

    def _kill_tree(self) -> None:
        if self.cgroups:
            self.cgroups.kill_all()
            # A launcher that has not joined its cgroups yet is not in them.
            if self.pid and self.process is not None and self.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
            return
        # No cgroup: descendants, then anything still carrying our env marker
        # (double-forked daemons re-parented to init), until nothing is left.
        for _ in range(20):
            pids = tree_pids(self.pid, self.sandbox_id, scan_env=True) if self.pid else set()
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass  # already gone
                except PermissionError:
                    self.log.warning("Kernel %s: cannot kill pid %s", self.kernel_id, pid)
            time.sleep(0.05)

    # -- stop -----------------------------------------------------------------------

    async def _cleanup(self, restart: bool) -> None:
        """Kill what is left of the tree; unless restarting, remove every trace (on
        restart the cgroups, uid and dir are kept for the next process)."""
        await self._stop_watching()
        if self._cpu_task is not None:
            self._cpu_task.cancel()
            self._cpu_task = None
        await asyncio.to_thread(self._kill_tree)
        # LimitedProvisioner.cleanup comes first in the MRO and called us: its sibling
        # base returns the cached ports.
        await LocalProvisioner.cleanup(self, restart=restart)
        if restart:
            await self._between_processes()
        else:
            await self._release()

    async def _release(self) -> None:
        if self.cgroups is not None:
            await asyncio.to_thread(self.cgroups.kill_all)
            await asyncio.to_thread(self.cgroups.remove)
        if self.kernel_log is not None:
            self.kernel_log.close()
            self.kernel_log = None
        await super()._release()

    # -- persistence ----------------------------------------------------------------

    async def get_provisioner_info(self) -> dict[str, Any]:
        info = await super().get_provisioner_info()
        info.update(
            {
                "pid_create_time": self.pid_create_time,
                "cgroups": sorted(self.cgroups.controllers) if self.cgroups else [],
                "cgroup": self.cgroups.record() if self.cgroups else {},
            }
        )
        return info

    async def load_provisioner_info(self, provisioner_info: dict) -> None:
        await super().load_provisioner_info(provisioner_info)
        self.pid_create_time = provisioner_info.get("pid_create_time")
        self.cgroups = await asyncio.to_thread(
            KernelCgroups.attach, self.sandbox_id, entry_record(provisioner_info)
        )
