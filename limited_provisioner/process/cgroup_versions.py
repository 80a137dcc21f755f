"""What each cgroup version writes where: v1 (a group per controller mount) and v2 (one
group for the kernel, its processes in a leaf below the limits).

:mod:`.cgroups` decides which hierarchy a host offers and gives the rest of the package
one interface over both (``KernelCgroups``); this module is the two implementations of
its :class:`Group` operations. Every cgroup file access goes through the small helpers
at the top (``mkdir_group``, ``write_file``, ``remove_dir``, ...), which the unit tests
replace to give a plain directory cgroupfs's behaviour.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..limits import Limits

GROUP_NAME = "limited-provisioner"
# The v2 leaf that holds the kernel's processes; the limits sit on its parent.
LEAF_NAME = "kernel"
CONTROLLERS = ("memory", "cpu", "pids")
CFS_PERIOD_US = 100_000
# A kernel that can create sub-cgroups (delegated case) must not make our walks of its
# group unbounded.
MAX_WALK = 1000

log = logging.getLogger(__name__)


# -- cgroup file access (module level, so tests can stand in for cgroupfs) --------------


def mkdir_group(path: Path) -> None:
    path.mkdir(exist_ok=True)


def write_file(path: Path, text: str) -> None:
    # Not Path.write_text: that opens with O_CREAT|O_TRUNC, and an interface file that
    # is missing must fail, not be created (in a fake tree or a misnamed path).
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def read_file(path: Path) -> str:
    with open(path) as f:
        return f.read(64 * 1024)


def _keyed(path: Path, key: str) -> int | None:
    """The value of a ``key value`` line (memory.events, cpu.stat, ...), or None."""
    try:
        for line in read_file(path).splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return None


def _walk(top: Path) -> list[Path]:
    """``top`` and every cgroup below it, parents first (at most MAX_WALK)."""
    found = []
    for dirpath, dirnames, _ in os.walk(top):  # never follows symlinks
        found.append(Path(dirpath))
        if len(found) >= MAX_WALK:
            dirnames.clear()
            break
    return found


def _procs(group: Path) -> list[int]:
    try:
        return [int(line) for line in read_file(group / "cgroup.procs").split()]
    except (OSError, ValueError):
        return []


def remove_dir(path: Path) -> None:
    os.rmdir(path)  # on cgroupfs, removes the group with its interface files


def rmdir_retrying(path: Path) -> bool:
    """Remove an empty cgroup, retrying while killed members are still being reaped."""
    for _ in range(50):
        try:
            remove_dir(path)
            return True
        except FileNotFoundError:
            return True
        except OSError:
            time.sleep(0.02)  # EBUSY until the last killed process is gone
    log.warning("could not remove cgroup %s", path)
    return False


def swap_in_use() -> bool:
    """Whether the host has any swap a group could spill into."""
    try:
        with open("/proc/swaps") as f:
            return len(f.read().splitlines()) > 1
    except OSError:
        return True  # unknown: do not claim "no swap"


# -- hierarchies ----------------------------------------------------------------------


class Hierarchy(Protocol):
    """Where and how kernel groups are made on this host (v1 or v2)."""

    version: int
    delegated: bool
    controllers: tuple[str, ...]
    missing: dict[str, str]  # controller -> why kernel groups do not get it

    def group(self, kernel_id: str) -> Group: ...


class Group(Protocol):
    """One kernel's group(s) in a hierarchy: the operations :class:`KernelCgroups` needs."""

    def dirs(self) -> dict[str, Path]: ...
    def make(self, limits: Limits, defer_cpu: bool) -> tuple[set[str], bool]: ...
    def set_cpu(self, limits: Limits) -> None: ...
    def put_back(self, limits: Limits, cpu: bool) -> list[str]: ...
    def exists(self) -> bool: ...
    def procs_files(self) -> list[str]: ...
    def pids(self) -> list[int]: ...
    def oom_kills(self) -> int: ...
    def pids_refused(self) -> int: ...
    def kill(self) -> None: ...
    def remove(self) -> None: ...
    def memory_bytes(self) -> int | None: ...
    def cpu_seconds(self) -> float | None: ...
    def record(self) -> dict[str, Any]: ...


@dataclass
class V1Hierarchy:
    """cgroup v1: one ``limited-provisioner`` parent per controller mount."""

    parents: dict[str, Path]
    missing: dict[str, str] = field(default_factory=dict)
    version: int = 1
    delegated: bool = False

    @property
    def controllers(self) -> tuple[str, ...]:
        return tuple(self.parents)

    def group(self, kernel_id: str) -> V1Group:
        return V1Group(kernel_id, {c: p / kernel_id for c, p in self.parents.items()})


@dataclass
class V1Group:
    kernel_id: str
    paths: dict[str, Path]

    def dirs(self) -> dict[str, Path]:
        return dict(self.paths)

    def make(self, limits: Limits, defer_cpu: bool) -> tuple[set[str], bool]:
        made, no_swap = set(), True
        for controller, path in list(self.paths.items()):
            try:
                mkdir_group(path)
                if controller == "cpu" and defer_cpu:
                    write_file(path / "cpu.cfs_quota_us", "-1")
                elif controller == "memory":
                    no_swap = self._set_memory(path, limits)
                else:
                    self._set(controller, path, limits)
            except OSError as e:
                log.warning("cgroup %s for kernel %s unusable: %s", controller, self.kernel_id, e)
                self.paths.pop(controller)
                continue
            made.add(controller)
        return made, no_swap

    @staticmethod
    def _set_memory(path: Path, limits: Limits) -> bool:
        if limits.mem_limit is None:
            return True
        write_file(path / "memory.limit_in_bytes", str(limits.mem_limit))
        # Without this, swap would let the kernel exceed mem_limit in RAM+swap.
        memsw = path / "memory.memsw.limit_in_bytes"
        if memsw.exists():
            write_file(memsw, str(limits.mem_limit))
        swappiness = path / "memory.swappiness"
        if swappiness.exists():
            try:
                write_file(swappiness, "0")
            except OSError:
                pass  # read-only on the root group on some kernels; harmless
        return memsw.exists() or not swap_in_use()

    def _set(self, controller: str, path: Path, limits: Limits) -> None:
        if controller == "cpu" and limits.cpu_limit is not None:
            write_file(path / "cpu.cfs_period_us", str(CFS_PERIOD_US))
            write_file(path / "cpu.cfs_quota_us", str(int(limits.cpu_limit * CFS_PERIOD_US)))
        elif controller == "pids" and limits.pids_limit is not None:
            write_file(path / "pids.max", str(limits.pids_limit))

    def set_cpu(self, limits: Limits) -> None:
        path = self.paths.get("cpu")
        if path is not None and path.is_dir():
            self._set("cpu", path, limits)

    def put_back(self, limits: Limits, cpu: bool) -> list[str]:
        return []  # v1 groups are root's: a kernel cannot write them

    def exists(self) -> bool:
        return any(p.is_dir() for p in self.paths.values())

    def procs_files(self) -> list[str]:
        return [str(p / "cgroup.procs") for p in self.paths.values()]

    def pids(self) -> list[int]:
        # The processes are in every controller's group; the first readable one will do.
        for controller in ("pids", "memory", "cpu"):
            path = self.paths.get(controller)
            if path is not None and (path / "cgroup.procs").exists():
                return _procs(path)
        return []

    def oom_kills(self) -> int:
        path = self.paths.get("memory")
        return (_keyed(path / "memory.oom_control", "oom_kill") or 0) if path else 0

    def pids_refused(self) -> int:
        path = self.paths.get("pids")
        return (_keyed(path / "pids.events", "max") or 0) if path else 0

    def kill(self) -> None:
        pass  # v1 has no cgroup.kill: KernelCgroups.kill_all signals each member

    def remove(self) -> None:
        for controller, path in list(self.paths.items()):
            rmdir_retrying(path)

    def memory_bytes(self) -> int | None:
        path = self.paths.get("memory")
        try:
            return int(read_file(path / "memory.usage_in_bytes")) if path else None
        except (OSError, ValueError):
            return None

    def cpu_seconds(self) -> float | None:
        return None  # usage is in the cpuacct hierarchy, where we make no groups

    def record(self) -> dict[str, Any]:
        return {"version": 1}


@dataclass
class V2Hierarchy:
    """cgroup v2: kernel groups under ``parent`` (``<root or delegated>/limited-provisioner``)."""

    parent: Path
    controllers: tuple[str, ...]
    delegated: bool = False
    missing: dict[str, str] = field(default_factory=dict)
    version: int = 2

    def group(self, kernel_id: str) -> V2Group:
        return V2Group(kernel_id, self.parent / kernel_id, self.controllers)


@dataclass
class V2Group:
    kernel_id: str
    path: Path
    controllers: tuple[str, ...]

    @property
    def leaf(self) -> Path:
        return self.path / LEAF_NAME

    def dirs(self) -> dict[str, Path]:
        return {c: self.path for c in self.controllers}

    def make(self, limits: Limits, defer_cpu: bool) -> tuple[set[str], bool]:
        mkdir_group(self.path)
        made, no_swap = set(), True
        for controller in self.controllers:
            try:
                if controller == "memory":
                    no_swap = self._set_memory(limits)
                elif controller == "cpu":
                    write_file(self.path / "cpu.max", "max" if defer_cpu else self._cpu_max(limits))
                elif controller == "pids" and limits.pids_limit is not None:
                    write_file(self.path / "pids.max", str(limits.pids_limit))
            except OSError as e:
                log.warning("cgroup v2 %s for kernel %s unusable: %s",
                            controller, self.kernel_id, e)
                continue
            made.add(controller)
        self.controllers = tuple(c for c in self.controllers if c in made)
        # The leaf has no controllers of its own: the limits of its parent cover it, and
        # its OOM kills and refused forks count in the parent's memory.events / pids.events.
        mkdir_group(self.leaf)
        return made, no_swap

    def _set_memory(self, limits: Limits) -> bool:
        if limits.mem_limit is None:
            return True
        write_file(self.path / "memory.max", str(limits.mem_limit))
        # memory.oom.group stays 0, as v1 behaves: an OOM kills the biggest process of
        # the tree (often a child the kernel started) and the kernel reports it and
        # lives on; group=1 would take the kernel down for any child's excess.
        swap = self.path / "memory.swap.max"
        if swap.exists():
            write_file(swap, "0")  # or RAM + swap would exceed mem_limit
            return True
        return not swap_in_use()  # no swap accounting: "no swap" only if there is none

    @staticmethod
    def _cpu_max(limits: Limits) -> str:
        if limits.cpu_limit is None:
            return f"max {CFS_PERIOD_US}"
        return f"{int(limits.cpu_limit * CFS_PERIOD_US)} {CFS_PERIOD_US}"

    def set_cpu(self, limits: Limits) -> None:
        if "cpu" in self.controllers and self.path.is_dir():
            write_file(self.path / "cpu.max", self._cpu_max(limits))

    def put_back(self, limits: Limits, cpu: bool) -> list[str]:
        """Rewrite each of our limits that is looser now than ``limits`` (a delegated
        kernel owns these files and can raise them); the files it had loosened. A
        stricter value (the kernel lowered its own limit) is left alone."""
        wanted: dict[str, float] = {}
        if "memory" in self.controllers and limits.mem_limit is not None:
            # Read back in whole pages: never above what was written.
            wanted["memory.max"] = limits.mem_limit
            if (self.path / "memory.swap.max").exists():
                wanted["memory.swap.max"] = 0
        if "pids" in self.controllers and limits.pids_limit is not None:
            wanted["pids.max"] = limits.pids_limit
        if cpu and "cpu" in self.controllers and limits.cpu_limit is not None:
            wanted["cpu.max"] = limits.cpu_limit
        loosened = []
        for name, limit in wanted.items():
            try:
                words = read_file(self.path / name).split()
                if name == "cpu.max":
                    current = math.inf if words[0] == "max" else int(words[0]) / int(words[1])
                else:
                    current = math.inf if words[0] == "max" else int(words[0])
            except (OSError, ValueError, IndexError):
                continue  # unreadable now (the group is going): nothing to compare
            if current > limit + 1e-6:
                loosened.append(name)
                text = self._cpu_max(limits) if name == "cpu.max" else str(int(limit))
                try:
                    write_file(self.path / name, text)
                except OSError as e:
                    log.warning("kernel %s: cannot put back %s: %s", self.kernel_id, name, e)
        return loosened

    def exists(self) -> bool:
        return self.path.is_dir()

    def procs_files(self) -> list[str]:
        return [str(self.leaf / "cgroup.procs")]

    def pids(self) -> list[int]:
        # v2 cgroup.procs lists only the group's own processes: walk the subtree (a
        # delegated kernel can make sub-groups of its leaf).
        pids: list[int] = []
        for group in _walk(self.path):
            pids += _procs(group)
        return pids

    def oom_kills(self) -> int:
        # memory.events counts the subtree's events (memory.events.local only its own).
        return _keyed(self.path / "memory.events", "oom_kill") or 0

    def pids_refused(self) -> int:
        return _keyed(self.path / "pids.events", "max") or 0

    def kill(self) -> None:
        """The whole subtree at once (Linux >= 5.14): a fork bomb gets no time to fork."""
        kill_file = self.path / "cgroup.kill"
        if kill_file.exists():
            try:
                write_file(kill_file, "1")
            except OSError as e:
                log.warning("cgroup.kill of kernel %s failed: %s", self.kernel_id, e)

    def remove(self) -> None:
        # Children first: rmdir of a group with sub-groups fails.
        for group in reversed(_walk(self.path)):
            rmdir_retrying(group)

    def memory_bytes(self) -> int | None:
        try:
            return int(read_file(self.path / "memory.current"))
        except (OSError, ValueError):
            return None

    def cpu_seconds(self) -> float | None:
        # cpu.stat's usage_usec is there even without the cpu controller.
        usec = _keyed(self.path / "cpu.stat", "usage_usec")
        return usec / 1e6 if usec is not None else None

    def record(self) -> dict[str, Any]:
        return {"version": 2, "group": str(self.path), "controllers": list(self.controllers)}
