"""What a running limited kernel uses now: memory, CPU, processes, disk.

One mechanism for everyone who shows usage: ``limited-provisioner list`` (cli.py), which
only has the registry, and the server's status endpoint (server/handlers.py), which also
has the provisioner. Figures come from the kernel's cgroup where the hierarchy counts
them (what the limit itself sees), else from its processes (psutil). Every function here
blocks (file reads, a short sleep for CPU): callers on an event loop run it in a thread.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import psutil


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None  # not this layout, or the group is gone


class ContainerGroups:
    """The cgroup dirs docker made for one container, on v1 or v2, either driver."""

    def __init__(self, container_id: str, root: Path | None = None):
        from .process.cgroups import cgroup_root

        root = cgroup_root() if root is None else root
        cid = container_id
        # v2 with docker's cgroupfs driver; v2 with its systemd driver.
        self.unified = next(
            (g for g in (root / "docker" / cid, root / "system.slice" / f"docker-{cid}.scope")
             if (g / "cgroup.procs").is_file()),
            None,
        )
        self.v1 = {c: root / c / "docker" / cid for c in ("pids", "memory", "cpuacct")}

    def pids(self) -> list[int] | None:
        for group in (self.unified, self.v1["pids"]):
            if group is None:
                continue
            try:
                return [int(p) for p in (group / "cgroup.procs").read_text().split()]
            except (OSError, ValueError):
                continue
        return None

    def memory_bytes(self) -> int | None:
        if self.unified is not None:
            return _read_int(self.unified / "memory.current")
        return _read_int(self.v1["memory"] / "memory.usage_in_bytes")

    def cpu_seconds(self) -> float | None:
        if self.unified is not None:
            try:
                for line in (self.unified / "cpu.stat").read_text().splitlines():
                    key, _, value = line.partition(" ")
                    if key == "usage_usec":
                        return int(value) / 1e6
            except (OSError, ValueError):
                return None
            return None
        nanoseconds = _read_int(self.v1["cpuacct"] / "cpuacct.usage")
        return nanoseconds / 1e9 if nanoseconds is not None else None


def _groups(entry: dict[str, Any]) -> Any:
    """The kernel's groups: its container's (docker backend) or ours (process backend),
    or None if it has none (no cgroups on this host, the kernel is gone)."""
    from .process.cgroups import KernelCgroups, entry_record
    from .registry import sandbox_of

    if entry.get("backend") == "docker":
        return ContainerGroups(entry["container_id"]) if entry.get("container_id") else None
    if entry.get("backend") == "swarm":
        return None  # its cgroups are on another node
    groups = KernelCgroups.attach(sandbox_of(entry), entry_record(entry, default=None))
    return groups or None


def kernel_pids(entry: dict[str, Any], groups: Any = None) -> list[int]:
    """Processes of a kernel, from its cgroup (process backend) or its container's."""
    groups = _groups(entry) if groups is None else groups
    found = groups.pids() if groups is not None else None
    if found:
        return list(found)
    return [entry["pid"]] if entry.get("pid") else []


def _cpu_seconds(groups: Any, pids: list[int]) -> float:
    counted = groups.cpu_seconds() if groups is not None else None
    if counted is not None:
        return counted
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def _memory(groups: Any, pids: list[int]) -> int:
    counted = groups.memory_bytes() if groups is not None else None
    if counted is not None:
        return counted
    memory = 0
    for pid in pids:
        try:
            memory += psutil.Process(pid).memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return memory


def sample_usage(rows: list[dict[str, Any]], interval: float = 0.25) -> None:
    """Add ``pids``, ``mem_used`` (bytes now) and ``cpu_cores`` (CPU use over
    ``interval``, in cores) to each registry entry in ``rows`` whose ``alive`` is set:
    from its cgroup where the hierarchy counts it (what the limit sees), else the sum
    over its processes (resident memory, CPU times). One sleep for all rows."""
    groups = [_groups(r) if r.get("alive") else None for r in rows]
    for row, group in zip(rows, groups):
        row["pids"] = kernel_pids(row, group) if row.get("alive") else []
    before = [_cpu_seconds(g, r["pids"]) for r, g in zip(rows, groups)]
    if any(r["pids"] for r in rows):
        time.sleep(interval)
    for row, group, start in zip(rows, groups, before):
        row["mem_used"] = _memory(group, row["pids"])
        row["cpu_cores"] = round(max(0.0, _cpu_seconds(group, row["pids"]) - start) / interval, 2)


def own_filesystem_usage(kernel_dir: str) -> tuple[int, int] | None:
    """(bytes, files) in use on a kernel's own filesystem (workfs.py): one statvfs,
    whatever the kernel wrote. None if it is not mounted any more."""
    try:
        st = os.statvfs(os.path.join(kernel_dir, "work"))
    except OSError:
        return None
    return (st.f_blocks - st.f_bfree) * st.f_frsize, st.f_files - st.f_ffree
