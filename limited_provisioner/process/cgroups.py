"""Per-kernel cgroups (v1 hierarchy): hard memory, CPU and pids limits.

A kernel gets ``<mount>/<controller>/limited-provisioner/<kernel_id>`` in each of the
``memory``, ``cpu`` and ``pids`` controllers.  The launcher (``_launch.py``) moves
itself into them *before* it execs the kernel, so no process of the kernel's tree —
double-forked daemons and ``setsid`` escapes included — ever runs outside them.  The
``pids`` cgroup is therefore also the authoritative list of the tree's processes.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..limits import Limits

CGROUP_ROOT = Path(os.environ.get("LIMITED_PROVISIONER_CGROUP_ROOT", "/sys/fs/cgroup"))
GROUP_NAME = "limited-provisioner"
CFS_PERIOD_US = 100_000

log = logging.getLogger(__name__)


def _controller_root(controller: str) -> Path | None:
    """The writable v1 hierarchy of ``controller`` for our parent group, or None."""
    base = CGROUP_ROOT / controller
    # cgroup v2 (unified) has no per-controller directories; we do not manage it yet.
    if not (base / "cgroup.procs").exists():
        return None
    root = base / GROUP_NAME
    try:
        root.mkdir(exist_ok=True)
    except OSError:
        return None
    if not os.access(root, os.W_OK):
        return None
    return root


def available_controllers() -> dict[str, Path]:
    """Controllers we can create child groups in on this host (empty when not root)."""
    found = {}
    for controller in ("memory", "cpu", "pids"):
        root = _controller_root(controller)
        if root is not None:
            found[controller] = root
    return found


@dataclass
class KernelCgroups:
    """The cgroups of one kernel. Only the controllers that could be set up appear."""

    kernel_id: str
    paths: dict[str, Path] = field(default_factory=dict)
    _oom_kills_seen: int = 0
    _pids_max_seen: int = 0

    @classmethod
    def create(cls, kernel_id: str, limits: Limits, defer_cpu: bool = False) -> KernelCgroups:
        """Create (or reuse, on restart) the groups and write the limits into them.

        With ``defer_cpu`` the CPU quota is left open; call :meth:`apply_cpu` later.
        """
        groups = cls(kernel_id)
        for controller, root in available_controllers().items():
            path = root / kernel_id
            try:
                path.mkdir(exist_ok=True)
                if controller == "cpu" and defer_cpu:
                    (path / "cpu.cfs_quota_us").write_text("-1")
                else:
                    groups._configure(controller, path, limits)
            except OSError as e:
                log.warning("cgroup %s for kernel %s unusable: %s", controller, kernel_id, e)
                continue
            groups.paths[controller] = path
        groups._oom_kills_seen = groups.oom_kills()
        groups._pids_max_seen = groups.pids_max_events()
        return groups

    @classmethod
    def attach(cls, kernel_id: str, controllers: list[str]) -> KernelCgroups:
        """Re-open the existing groups of a kernel (after a server restart)."""
        groups = cls(kernel_id)
        for controller in controllers:
            root = CGROUP_ROOT / controller / GROUP_NAME / kernel_id
            if root.is_dir():
                groups.paths[controller] = root
        groups._oom_kills_seen = groups.oom_kills()
        return groups

    @staticmethod
    def _configure(controller: str, path: Path, limits: Limits) -> None:
        if controller == "memory" and limits.mem_limit is not None:
            (path / "memory.limit_in_bytes").write_text(str(limits.mem_limit))
            # Without this, swap would let the kernel exceed mem_limit in RAM+swap.
            memsw = path / "memory.memsw.limit_in_bytes"
            if memsw.exists():
                memsw.write_text(str(limits.mem_limit))
            swappiness = path / "memory.swappiness"
            if swappiness.exists():
                try:
                    swappiness.write_text("0")
                except OSError:
                    pass  # read-only on the root group on some kernels; harmless
        elif controller == "cpu" and limits.cpu_limit is not None:
            (path / "cpu.cfs_period_us").write_text(str(CFS_PERIOD_US))
            (path / "cpu.cfs_quota_us").write_text(str(int(limits.cpu_limit * CFS_PERIOD_US)))
        elif controller == "pids" and limits.pids_limit is not None:
            (path / "pids.max").write_text(str(limits.pids_limit))

    def apply_cpu(self, limits: Limits) -> None:
        path = self.paths.get("cpu")
        if path is not None and path.is_dir():
            self._configure("cpu", path, limits)

    @property
    def procs_files(self) -> list[str]:
        return [str(p / "cgroup.procs") for p in self.paths.values()]

    def pids(self) -> list[int]:
        """Every process of the kernel's tree (from whichever group we have)."""
        for controller in ("pids", "memory", "cpu"):
            path = self.paths.get(controller)
            if path is None:
                continue
            try:
                text = (path / "cgroup.procs").read_text()
            except OSError:
                continue
            return [int(line) for line in text.split()]
        return []

    def _counter(self, controller: str, filename: str, key: str) -> int:
        """A "key value" line of a cgroup events file; 0 if absent or unreadable."""
        path = self.paths.get(controller)
        if path is None:
            return 0
        try:
            for line in (path / filename).read_text().splitlines():
                name, _, value = line.partition(" ")
                if name == key:
                    return int(value)
        except (OSError, ValueError):
            pass
        return 0

    def oom_kills(self) -> int:
        """Count of processes the kernel OOM-killed in this group, ever."""
        return self._counter("memory", "memory.oom_control", "oom_kill")

    def pids_max_events(self) -> int:
        """How many forks were refused by pids.max."""
        return self._counter("pids", "pids.events", "max")

    def new_oom_kills(self) -> int:
        """OOM kills since the last call (restarts reuse the group)."""
        total = self.oom_kills()
        new = total - self._oom_kills_seen
        self._oom_kills_seen = total
        return new

    def new_pids_max_events(self) -> int:
        total = self.pids_max_events()
        new = total - self._pids_max_seen
        self._pids_max_seen = total
        return new

    def kill_all(self, timeout: float = 5.0) -> list[int]:
        """SIGKILL every process in the groups until they are empty.

        Loops because a fork bomb can create a process between our read of
        ``cgroup.procs`` and the kill; pids.max bounds how long that can go on.
        Returns the pids that were signalled.
        """
        killed: list[int] = []
        deadline = time.monotonic() + timeout
        while True:
            pids = self.pids()
            if not pids:
                return killed
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    pass  # exited between the read and the kill
            if time.monotonic() > deadline:
                log.error("kernel %s: processes %s survive SIGKILL", self.kernel_id, pids)
                return killed
            time.sleep(0.02)

    def remove(self) -> None:
        """Delete the groups (they must be empty: call kill_all first)."""
        for controller, path in list(self.paths.items()):
            for _ in range(50):
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    # EBUSY while the last killed processes are still being reaped.
                    time.sleep(0.02)
            else:
                log.warning("could not remove cgroup %s", path)
            self.paths.pop(controller, None)
