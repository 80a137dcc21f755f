"""What the launcher sets up around a local kernel process, as plain data.

:func:`launch_spec` turns a kernel's limits, its enforcement plan and its dirs into the
JSON spec ``launch.py`` applies before it execs the kernel (rlimits, cgroups, uid,
namespaces, mounts). Pure functions of their arguments (and of what the host's
filesystem looks like), so they are tested without starting anything.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from ..enforcement import NICE, RLIMIT, EnforcementPlan
from ..errors import SandboxStartError
from ..limits import DATA_RLIMIT_HEADROOM, Limits
from ..workspace import PRIVATE_SCRATCH, Workspace
from .interpreter import Needed

# World-writable host directories (PRIVATE_SCRATCH): each kernel gets a private,
# size-capped tmpfs in their place, so nothing it writes there is shared with the host or
# outlives it.


def can_unshare_net() -> bool:
    return os.geteuid() == 0 and Path("/proc/self/ns/net").exists()


def host_scratch_dirs() -> list[str]:
    return [d for d in PRIVATE_SCRATCH if os.path.isdir(d)]


def untraversable_ancestor(path: str) -> str | None:
    """The highest ancestor of ``path`` that other users cannot enter, if any."""
    parts = Path(path).parts
    for i in range(2, len(parts)):
        ancestor = Path(*parts[:i])
        try:
            mode = ancestor.stat().st_mode
        except OSError:
            return None
        if not mode & 0o001:
            return str(ancestor)
    return None


def scratch_parent(path: str) -> str | None:
    """The private scratch dir ``path`` lies in, if any (the kernel could not see it)."""
    real = os.path.realpath(path)
    for scratch in PRIVATE_SCRATCH:
        if real == scratch or real.startswith(scratch + "/"):
            return scratch
    return None


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def exposures(needed: list[Needed]) -> tuple[dict[str, str], list[str]]:
    """Which of the interpreter's paths (interpreter.interpreter_paths) the launcher binds
    read-only into the kernel's view, and the tops they go under: ``({path: top}, notes)``.

    A path needs it when a private scratch tmpfs hides it (top: that scratch dir) or
    when an ancestor other users cannot enter blocks the kernel's uid (top: the highest
    such dir, which the launcher covers with an empty tmpfs). ``notes`` say what was
    left out, and why: a path the kernel could not use even so (its own mode shuts
    other users out), or should not (every user may write to it). Such a path that the
    interpreter needs raises :class:`SandboxStartError` naming it and the fix.

    A path named by a ``.pth`` file of another user is only exposed past a blocker
    that user owns: a line in someone's site-packages must not open root's 0700 dirs.
    """
    expose: dict[str, str] = {}
    notes: list[str] = []
    for item in sorted(needed, key=lambda n: n.path):
        path = item.path
        if any(_under(path, done) for done in expose):
            continue  # inside an exposed tree
        scratch = scratch_parent(path)
        blocker = untraversable_ancestor(path)
        if scratch is None and blocker is None:
            continue  # the kernel sees it where it is
        if path == scratch:
            notes.append(f"{path} is not exposed: the kernel gets its own, empty {path}")
            continue
        if blocker is not None and item.named_by and _owner(blocker) != item.named_by:
            notes.append(
                f"{path} (named by a .pth file of uid {item.named_by}) is not exposed: it "
                f"lies behind {blocker}, which that user cannot enter either"
            )
            continue
        try:
            st = os.stat(path)
        except OSError as e:
            notes.append(f"{path} is not exposed: {e}")
            continue
        mode = stat.filemode(st.st_mode)
        if not st.st_mode & (0o001 if stat.S_ISDIR(st.st_mode) else 0o004):
            msg = (
                f"{path} is not readable by other users (mode {mode}), so the kernel's uid "
                f"cannot use it even when exposed: make it readable (chmod -R o+rX "
                f"{path}) or install the kernel's interpreter elsewhere"
            )
        elif st.st_mode & 0o002:
            msg = (
                f"{path} is writable by every user (mode {mode}): the kernel would run "
                f"code anyone can plant there, so it is not exposed; chmod o-w {path}"
            )
        else:
            msg = ""
        if msg:
            if item.required:
                raise SandboxStartError(msg)
            notes.append(msg)
            continue
        expose[path] = scratch or blocker  # type: ignore[assignment]
    return expose, notes


def _owner(path: str) -> int:
    try:
        return os.stat(path).st_uid
    except OSError:
        return -1


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
    expose: dict[str, str] | None = None,
    status_fd: int | None = None,
    workspace: Workspace | None = None,
) -> dict[str, Any]:
    """The spec ``launch.py`` applies to the kernel process before it execs it.

    ``expose``: the interpreter paths to bind into an isolated kernel's view
    (:func:`exposures`); ``status_fd``: where the launcher reports a failed setup;
    ``workspace``: the host folder it works in (workspace.py), its cwd.
    """
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
    if workspace is not None:
        spec["cwd"] = workspace.path
    if isolated:
        spec["isolate"] = True
        spec["tmpfs"] = tmpfs_mounts(limits)
        # Never a set-id file: through an idmapped workspace it would be its owner's.
        spec["no_setid_files"] = True
        if workspace is not None:
            spec["workspace"] = workspace.to_spec()
            spec["writable"] = sorted(set(writable))
            blocker = untraversable_ancestor(workspace.path)
            # Under a scratch dir, the private tmpfs hides the blocker anyway (the bind
            # recreates the path on it).
            if blocker is not None and scratch_parent(workspace.path) is None:
                # A folder beneath a dir other users cannot enter (a user's folder in
                # root's 0700 /root): that dir becomes an empty skeleton leading to it.
                spec["covers"] = [blocker]
        else:
            spec["writable"] = sorted({*writable, cwd})
        if expose:
            spec["expose"] = dict(expose)
    if status_fd is not None:
        spec["status_fd"] = status_fd
    return spec
