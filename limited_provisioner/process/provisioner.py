"""``limited-process-provisioner``: a local kernel process inside OS limits.

On a host where we are root (the case this package is built for) the kernel runs:

* in its own memory / cpu / pids cgroups (hard limits; see ``cgroups.py``),
* in an empty network namespace (unless ``network``), reached over ``ipc`` sockets in
  its kernel dir through the server's proxy (proxy.py),
* in private PID, IPC and mount namespaces: it sees only its own processes, its SysV
  IPC objects vanish with it, the host filesystem is read-only, and ``/tmp``,
  ``/var/tmp``, ``/dev/shm`` and ``/run/lock`` are private size-capped tmpfs,
* as a per-kernel unprivileged uid (host-wide unique, uids.py) that owns only its work
  dir and, until it has bound them, its socket dir,
* with its stdout/stderr in a size-capped log (kernellog.py), not the server's streams,
* with rlimits: RLIMIT_DATA (mem), RLIMIT_NOFILE, RLIMIT_FSIZE (disk), RLIMIT_CORE=0,
* watched by a :class:`~limited_provisioner.watchdog.Watchdog` for the work dir size
  and file count (and for memory where no cgroup exists).

Without root, whatever cannot be set up is reported as best-effort or not enforced in
the log and ``get_provisioner_info()['enforcement']`` — never silently skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

from jupyter_client.provisioning.local_provisioner import LocalProvisioner
from traitlets import Float, Int

from . import launch as _launch
from ..provisioner import LimitedProvisionerMixin
from .cgroups import KernelCgroups
from ..errors import LimitConfigError
from .kernel_log import KernelLog
from ..limits import DATA_RLIMIT_HEADROOM, format_size
from ..registry import process_identity
from ..watchdog import KERNEL_ID_ENV, Watchdog, tree_pids


def untraversable_ancestor(path: str) -> str | None:
    """The highest ancestor of ``path`` that other users cannot enter, if any."""
    parts = Path(path).parts
    for i in range(2, len(parts) + 1):
        ancestor = Path(*parts[:i])
        try:
            mode = ancestor.stat().st_mode
        except OSError:
            return None
        if not mode & 0o001:
            return str(ancestor)
    return None


def exposures_for(paths: list[str]) -> dict[str, str]:
    """``{path: blocker}`` for interpreter paths a kernel uid could not reach."""
    result: dict[str, str] = {}
    for path in sorted({os.path.realpath(p) for p in paths if p}):
        blocker = untraversable_ancestor(path)
        if blocker is None or blocker == path:
            continue
        if any(path.startswith(done + os.sep) for done in result):
            continue  # already exposed through a parent
        result[path] = blocker
    return result


def _can_unshare_net() -> bool:
    return os.geteuid() == 0 and Path("/proc/self/ns/net").exists()


# World-writable host directories: each kernel gets a private, size-capped tmpfs in their
# place, so nothing it writes there is shared with the host or outlives it.
PRIVATE_SCRATCH = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")


def scratch_parent(path: str) -> str | None:
    """The private scratch dir ``path`` lies in, if any (the kernel could not see it)."""
    real = os.path.realpath(path)
    for scratch in PRIVATE_SCRATCH:
        if real == scratch or real.startswith(scratch + "/"):
            return scratch
    return None


class LimitedProcessProvisioner(LimitedProvisionerMixin, LocalProvisioner):
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

    cgroups: KernelCgroups | None = None
    kernel_log: KernelLog | None = None
    _cpu_task: asyncio.Task | None = None
    watchdog: Watchdog | None = None
    pid_create_time: float | None = None
    _shutting_down = False

    # -- start ----------------------------------------------------------------------

    async def _prepare_sandbox(self, kwargs: dict[str, Any]) -> None:
        """Create the kernel dir, uid and cgroups; decide what the launcher isolates.

        Runs before LocalProvisioner.pre_launch writes the connection file.
        """
        await asyncio.to_thread(self._prepare_sandbox_sync)

    def _prepare_sandbox_sync(self) -> None:
        enforcement: dict[str, str] = {}
        root = os.geteuid() == 0
        if root:
            scratch = scratch_parent(str(self.registry.state_dir))
            if scratch is not None:
                msg = (
                    f"state_dir {self.registry.state_dir} is under {scratch}, which every "
                    f"kernel gets a private, empty copy of: the kernel could not see its own "
                    f"dir. Choose a state_dir outside {', '.join(PRIVATE_SCRATCH)} (the "
                    f"default is /var/lib/limited-provisioner)"
                )
                raise LimitConfigError(msg)
        enforcement["identity"] = self._prepare_kernel_dir()

        self.cgroups = KernelCgroups.create(
            self.kernel_id, self.limits, defer_cpu=self.cpu_startup_grace > 0
        )
        enforcement.update(self.cgroups.enforced(self.limits))
        if "cpu_limit" in enforcement and self.cpu_startup_grace > 0:
            enforcement["cpu_limit"] += f" from {self.cpu_startup_grace:g}s after launch"
        lim = self.limits
        if lim.mem_limit is not None:
            enforcement.setdefault(
                "mem_limit", "best-effort (watchdog on the tree's RSS, RLIMIT_DATA per process)"
            )
        if lim.cpu_limit is not None:
            enforcement.setdefault(
                "cpu_limit", f"best-effort (nice {self.kernel_nice}; no writable cpu cgroup)"
            )
        if lim.pids_limit is not None and "pids_limit" not in enforcement:
            if self.uid is not None:
                enforcement["pids_limit"] = "hard (RLIMIT_NPROC on the kernel's own uid)"
            else:
                enforcement["pids_limit"] = (
                    "best-effort (RLIMIT_NPROC counts every process of the server user)"
                )
        if lim.nofile_limit is not None:
            enforcement["nofile_limit"] = "hard (RLIMIT_NOFILE, per process)"
        if lim.disk_limit is not None:
            enforcement["disk_limit"] = (
                "hard per file (RLIMIT_FSIZE); best-effort total (watchdog on work dir"
                + (
                    "; host filesystem read-only; private size-capped tmpfs on "
                    + ", ".join(d for d in PRIVATE_SCRATCH if os.path.isdir(d))
                    + ")"
                    if self._isolate
                    else ")"
                )
            )
        if lim.files_limit is not None:
            enforcement["files_limit"] = "best-effort (watchdog on work dir)"
        if self._isolate:
            enforcement["isolation"] = (
                "private PID, IPC and mount namespaces (other kernels' processes invisible, "
                "SysV IPC gone with the kernel, host filesystem read-only except its work "
                "dir); stdout/stderr to a capped log"
            )
        else:
            enforcement["isolation"] = (
                "NOT enforced (needs root): the kernel runs as the server's user and can "
                "see and touch what the server can"
            )
        self._netns = _can_unshare_net()
        if lim.network:
            enforcement["network"] = "allowed (network=True)"
        elif self._netns:
            enforcement["network"] = "hard (empty network namespace, ipc transport)"
        else:
            enforcement["network"] = "NOT enforced (needs root for a network namespace)"
        self.enforcement = enforcement

    @property
    def _isolate(self) -> bool:
        return os.geteuid() == 0 and self.uid is not None

    def _sandbox_spec(self, cwd: str) -> dict[str, Any]:
        lim = self.limits
        rlimits: dict[str, Any] = {"core": 0}
        if lim.mem_limit is not None:
            rlimits["data"] = lim.mem_limit + DATA_RLIMIT_HEADROOM
        if lim.nofile_limit is not None:
            rlimits["nofile"] = lim.nofile_limit
        if lim.disk_limit is not None:
            rlimits["fsize"] = lim.disk_limit
        if lim.pids_limit is not None and "pids" not in (self.cgroups.paths if self.cgroups else {}):
            rlimits["nproc"] = lim.pids_limit
        spec: dict[str, Any] = {
            "cgroup_procs": self.cgroups.procs_files if self.cgroups else [],
            "unshare_net": bool(self._netns and not lim.network),
            "rlimits": rlimits,
            "cwd": cwd,
        }
        if self.cgroups is None or "cpu" not in self.cgroups.paths:
            spec["nice"] = self.kernel_nice
        if self.uid is not None:
            spec["uid"] = self.uid
            spec["gid"] = self.gid if self.gid is not None else self.uid
        if self._isolate:
            assert self.kdir is not None
            spec["isolate"] = True
            spec["tmpfs"] = self._tmpfs_mounts()
            spec["writable"] = sorted({str(self.kdir.work), *self._kernel_writable_dirs(), cwd})
            spec["stage_dir"] = str(self.kdir.path)
            paths = self._interpreter_paths()
            expose = exposures_for(paths)
            # An interpreter (a venv) in a scratch dir would be hidden by the private tmpfs.
            for path in sorted({os.path.realpath(p) for p in paths if p}):
                scratch = scratch_parent(path)
                if scratch and path != scratch and not any(
                    path == done or path.startswith(done + os.sep) for done in expose
                ):
                    expose[path] = scratch
            if expose:
                spec["expose"] = expose
        return spec

    def _interpreter_paths(self) -> list[str]:
        """Install locations the kernel process must be able to read."""
        argv0 = self.kernel_spec.argv[0] if self.kernel_spec and self.kernel_spec.argv else ""
        paths = [sys.prefix, sys.base_prefix, os.path.dirname(shutil.which(argv0) or "")]
        real = os.path.realpath(shutil.which(argv0) or argv0) if argv0 else ""
        if real:
            # <prefix>/bin/python -> <prefix>
            paths.append(os.path.dirname(os.path.dirname(real)))
        return paths

    def _tmpfs_mounts(self) -> dict[str, str]:
        """A private tmpfs on every world-writable scratch dir of the host, so writes there
        are capped, seen by no one else and vanish with the kernel. tmpfs pages are
        memory, charged to the kernel's memory cgroup: capped at mem_limit too."""
        lim = self.limits
        size = lim.disk_limit if lim.disk_limit is not None else 1024**3
        if lim.mem_limit:
            size = min(size, lim.mem_limit)
        inodes = f",nr_inodes={lim.files_limit}" if lim.files_limit else ""
        return {
            target: f"size={size},mode=1777{inodes}"
            for target in PRIVATE_SCRATCH
            if os.path.isdir(target)
        }

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> Any:
        """Start the kernel through ``_launch`` (which applies the sandbox, then execs),
        then check and connect its sockets (``_open_kernel_door``)."""
        work = str(self.kdir.work)
        if self.private_work_dir:
            kwargs["cwd"] = work
            self.work_dir = work
        else:
            self.work_dir = str(kwargs.get("cwd") or os.getcwd())
        env = dict(kwargs.get("env") or {})
        env.update(self._kernel_env())
        env[KERNEL_ID_ENV] = self.kernel_id
        env["HOME"] = work
        env.setdefault("IPYTHONDIR", os.path.join(work, ".ipython"))
        if self.limits.cpu_limit is not None:
            # BLAS/OpenMP pools sized to the host's cores only thrash under a CPU quota.
            threads = str(max(1, int(self.limits.cpu_limit)))
            for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
                env.setdefault(name, threads)
        kwargs["env"] = env
        spec = self._sandbox_spec(kwargs.get("cwd") or work)
        # Run the launcher by path, isolated and without site: it needs only the
        # stdlib, and importing our package (and jupyter_client) would cost ~0.2 s.
        wrapped = [sys.executable, "-I", "-S", _launch.__file__, json.dumps(spec), "--", *cmd]

        baseline_bytes = baseline_files = 0
        if not self.private_work_dir and (self.limits.disk_limit or self.limits.files_limit):
            from ..watchdog import dir_usage

            usage = await asyncio.to_thread(dir_usage, self.work_dir, 200_000)
            baseline_bytes, baseline_files = usage.bytes, usage.files
        elif self.private_work_dir:
            baseline_bytes, baseline_files = await self._carried_over_usage()

        # Independent: no JPY_PARENT_PID, so the kernel outlives a crashed server and can
        # be re-adopted (recovery.py) instead of dying with it.
        kwargs["independent"] = True
        if self.kernel_log is not None:
            self.kernel_log.close()
        log_fd = await asyncio.to_thread(self.kdir.open_log)
        self.kernel_log = KernelLog(log_fd, self.kernel_log_limit, str(self.kdir.path / "kernel.log"))
        kwargs["stdout"] = kwargs["stderr"] = self.kernel_log.write_fd
        try:
            connection_info = await super().launch_kernel(wrapped, **kwargs)
        finally:
            self.kernel_log.start()
        self.pid_create_time = process_identity(self.pid)
        self.exit_reason = self.exit_kind = None
        self._shutting_down = False
        await asyncio.to_thread(
            self.registry.update,
            self.kernel_id,
            state="running",
            pid=self.pid,
            pid_create_time=self.pid_create_time,
            uid=self.uid,
            gid=self.gid,
            kernel_dir=str(self.kernel_dir),
            work_dir=self.work_dir,
            connection_file=getattr(self.parent, "connection_file", None),
            cgroups=sorted(self.cgroups.paths) if self.cgroups else [],
            enforcement=self.enforcement,
            started=time.time(),
            launch_cwd=str(kwargs.get("cwd") or ""),
            disk_baseline=[baseline_bytes, baseline_files],
        )
        if self.cpu_startup_grace > 0 and "cpu" in self.cgroups.paths:
            self._cpu_task = asyncio.ensure_future(self._apply_cpu_quota_later())
        await self._open_kernel_door()
        # Only now: a kernel that bound its sockets has joined its cgroups, so a trip
        # (dirs left over the limit by the previous process) kills the whole tree.
        self._start_watchdog(baseline_bytes, baseline_files)
        self.log.info(
            "Kernel %s started as pid %s with %s [%s]",
            self.kernel_id,
            self.pid,
            self.limits.describe(),
            self.describe_enforcement(),
        )
        return connection_info

    def _start_watchdog(self, baseline_bytes: int = 0, baseline_files: int = 0) -> None:
        paths = self.cgroups.paths if self.cgroups is not None else {}
        self.watchdog = Watchdog(
            kernel_id=self.kernel_id,
            get_pids=self._tree_pids,
            on_trip=self._on_trip,
            check_events=self._check_cgroup_events if paths else None,
            mem_limit=None if "memory" in paths else self.limits.mem_limit,
            work_dir=self.work_dir,
            extra_dirs=self._kernel_writable_dirs(),
            disk_limit=self.limits.disk_limit,
            files_limit=self.limits.files_limit,
            disk_baseline=baseline_bytes,
            files_baseline=baseline_files,
            interval=self.watchdog_interval,
            disk_interval=self.watchdog_interval * 4,
        )
        self.watchdog.start()

    async def _restore(self, entry: dict[str, Any]) -> None:
        """Take over a kernel process a previous server started (see recovery.adopt)."""
        from ..recovery import AdoptedProcess

        self.pid = entry["pid"]
        self.pid_create_time = entry.get("pid_create_time")
        self.process = AdoptedProcess(self.pid, self.pid_create_time)
        try:
            self.pgid = os.getpgid(self.pid)
        except OSError:
            self.pgid = None  # gone meanwhile: poll() will say so
        self.cgroups = KernelCgroups.attach(self.kernel_id, entry.get("cgroups") or [])
        self._netns = _can_unshare_net()
        baseline = entry.get("disk_baseline") or [0, 0]
        self._start_watchdog(baseline[0], baseline[1])
        self.log.info("Kernel %s adopted (pid %s)", self.kernel_id, self.pid)

    # -- running --------------------------------------------------------------------

    async def _apply_cpu_quota_later(self) -> None:
        await asyncio.sleep(self.cpu_startup_grace)
        if self.cgroups is not None:
            await asyncio.to_thread(self.cgroups.apply_cpu, self.limits)

    def _tree_pids(self) -> list[int] | set[int]:
        if self.cgroups is not None and self.cgroups.paths:
            return self.cgroups.pids()
        if self.pid is None:
            return set()
        return tree_pids(self.pid)

    def _check_cgroup_events(self) -> None:
        """Report OOM kills / refused forks inside the tree while the kernel lives."""
        if self.cgroups is None:
            return
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

    async def shutdown_requested(self, restart: bool = False) -> None:
        """Called by KernelManager.request_shutdown(); an exit after this is expected."""
        self._shutting_down = True
        await super().shutdown_requested(restart=restart)

    async def kill(self, restart: bool = False) -> None:
        """Kill the kernel and every process of its tree (not only its process group)."""
        self._shutting_down = True
        await super().kill(restart=restart)
        await asyncio.to_thread(self._kill_tree)

    def _kill_tree(self) -> None:
        if self.cgroups is not None and self.cgroups.paths:
            self.cgroups.kill_all()
            # A launcher that has not joined its cgroups yet is not in them.
            if self.pid and self.process is not None and self.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
            return
        # No cgroup: descendants, then anything still carrying our env marker
        # (double-forked daemons re-parented to init), until nothing is left.
        for _ in range(20):
            pids = tree_pids(self.pid, self.kernel_id, scan_env=True) if self.pid else set()
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

    async def cleanup(self, restart: bool = False) -> None:
        """Kill what is left of the tree; unless restarting, remove every trace.

        Called by ``KernelManager.cleanup_resources()`` after the kernel process has
        exited. On restart the cgroups, uid and dir are kept for the next process.
        """
        await self._stop_lifecycle()
        if self.watchdog is not None:
            await self.watchdog.stop()
            self.watchdog = None
        if self._cpu_task is not None:
            self._cpu_task.cancel()
            self._cpu_task = None
        await asyncio.to_thread(self._kill_tree)
        await super().cleanup(restart=restart)
        if restart:
            await self._between_processes()
        else:
            await self._release()

    async def _release(self) -> None:
        await asyncio.to_thread(self._remove_traces)
        if self.kernel_log is not None:
            self.kernel_log.close()
            self.kernel_log = None
        await super()._release()

    def _remove_traces(self) -> None:
        if self.cgroups is not None:
            self.cgroups.kill_all()
            self.cgroups.remove()

    # -- persistence ----------------------------------------------------------------

    async def get_provisioner_info(self) -> dict[str, Any]:
        info = await super().get_provisioner_info()
        info.update(
            {
                "uid": self.uid,
                "pid_create_time": self.pid_create_time,
                "cgroups": sorted(self.cgroups.paths) if self.cgroups else [],
            }
        )
        return info

    async def load_provisioner_info(self, provisioner_info: dict) -> None:
        await super().load_provisioner_info(provisioner_info)
        self.uid = provisioner_info.get("uid")
        self.pid_create_time = provisioner_info.get("pid_create_time")
        self.cgroups = KernelCgroups.attach(self.kernel_id, provisioner_info.get("cgroups") or [])
