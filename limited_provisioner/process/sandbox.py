"""What the launcher sets up around a local kernel process, as plain data.

:func:`launch_spec` turns a kernel's limits, its enforcement plan and its dirs into the
JSON spec ``launch.py`` applies before it execs the kernel (rlimits, cgroups, uid,
namespaces, mounts). Pure functions of their arguments (and of what the host's
filesystem looks like), so they are tested without starting anything.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

from ..enforcement import NICE, RLIMIT, EnforcementPlan
from ..limits import DATA_RLIMIT_HEADROOM, Limits

# World-writable host directories: each kernel gets a private, size-capped tmpfs in their
# place, so nothing it writes there is shared with the host or outlives it.
PRIVATE_SCRATCH = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")


def can_unshare_net() -> bool:
    return os.geteuid() == 0 and Path("/proc/self/ns/net").exists()


def host_scratch_dirs() -> list[str]:
    return [d for d in PRIVATE_SCRATCH if os.path.isdir(d)]


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


def scratch_parent(path: str) -> str | None:
    """The private scratch dir ``path`` lies in, if any (the kernel could not see it)."""
    real = os.path.realpath(path)
    for scratch in PRIVATE_SCRATCH:
        if real == scratch or real.startswith(scratch + "/"):
            return scratch
    return None


def interpreter_paths(argv0: str) -> list[str]:
    """Install locations the kernel process must be able to read."""
    found = shutil.which(argv0) if argv0 else None
    paths = [sys.prefix, sys.base_prefix, os.path.dirname(found or "")]
    real = os.path.realpath(found or argv0) if argv0 else ""
    if real:
        paths.append(os.path.dirname(os.path.dirname(real)))  # <prefix>/bin/python
    return paths


def exposures(paths: list[str]) -> dict[str, str]:
    """Interpreter paths to bind into the kernel's view: those behind a dir its uid
    cannot enter, and those in a scratch dir the private tmpfs would hide."""
    expose = exposures_for(paths)
    for path in sorted({os.path.realpath(p) for p in paths if p}):
        scratch = scratch_parent(path)
        if scratch and path != scratch and not any(
            path == done or path.startswith(done + os.sep) for done in expose
        ):
            expose[path] = scratch
    return expose


def tmpfs_mounts(limits: Limits) -> dict[str, str]:
    """A private tmpfs on every world-writable scratch dir of the host, so writes there
    are capped, seen by no one else and vanish with the kernel. tmpfs pages are memory,
    charged to the kernel's memory cgroup: capped at mem_limit too."""
    size = limits.disk_limit if limits.disk_limit is not None else 1024**3
    if limits.mem_limit:
        size = min(size, limits.mem_limit)
    inodes = f",nr_inodes={limits.files_limit}" if limits.files_limit else ""
    return {target: f"size={size},mode=1777{inodes}" for target in host_scratch_dirs()}


def launch_spec(
    limits: Limits,
    plan: EnforcementPlan,
    *,
    cwd: str,
    cgroup_procs: list[str],
    netns: bool,
    nice: int,
    uid: int | None,
    gid: int | None,
    isolated: bool,
    writable: list[str],
    stage_dir: str,
    argv0: str,
) -> dict[str, Any]:
    """The spec ``launch.py`` applies to the kernel process before it execs it."""
    rlimits: dict[str, Any] = {"core": 0}
    if limits.mem_limit is not None:
        rlimits["data"] = limits.mem_limit + DATA_RLIMIT_HEADROOM
    if limits.nofile_limit is not None:
        rlimits["nofile"] = limits.nofile_limit
    if limits.disk_limit is not None:
        rlimits["fsize"] = limits.disk_limit
    if plan.uses("pids_limit", RLIMIT):
        rlimits["nproc"] = limits.pids_limit
    spec: dict[str, Any] = {
        "cgroup_procs": cgroup_procs,
        "unshare_net": bool(netns and not limits.network),
        "rlimits": rlimits,
        "cwd": cwd,
    }
    if plan.uses("cpu_limit", NICE):
        spec["nice"] = nice
    if uid is not None:
        spec["uid"] = uid
        spec["gid"] = gid if gid is not None else uid
    if isolated:
        spec["isolate"] = True
        spec["tmpfs"] = tmpfs_mounts(limits)
        spec["writable"] = sorted({*writable, cwd})
        spec["stage_dir"] = stage_dir
        expose = exposures(interpreter_paths(argv0))
        if expose:
            spec["expose"] = expose
    return spec
