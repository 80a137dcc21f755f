"""Per-kernel cgroups: hard memory, CPU and pids limits, on cgroup v1 or v2.

One interface, :class:`KernelCgroups`, over the hierarchy this host offers
(:func:`detect`, decided at each kernel start):

* **v2 as root** (``<root>/cgroup.controllers`` lists the controllers): the kernel's group
  is ``<root>/limited-provisioner/<kernel_id>``; ``memory``, ``cpu`` and ``pids`` are
  enabled in ``cgroup.subtree_control`` of the root and of ``limited-provisioner/``,
  which therefore never holds a process itself (v2's "no internal processes" rule).
* **v2 delegated** (not root, on a systemd host): the highest ancestor of the server's
  own cgroup (``/proc/self/cgroup``) that our uid owns and can write — systemd's
  ``user@<uid>.service`` (``Delegate=yes``) — gets ``limited-provisioner/<kernel_id>``.
  The server's cgroup and the kernel groups share that ancestor, so the launcher may
  move itself across (v2 migration needs write access to the common ancestor's
  ``cgroup.procs``). The kernel runs as the same user and owns these files: limits
  there stop runaway code, not a kernel that sets out to raise them (:attr:`delegated`;
  the enforcement plan says so).
* **v1** (``<root>/<controller>`` mounted; also hybrid hosts, whose v2 mount at
  ``<root>/unified`` holds no controllers): ``<root>/<controller>/limited-provisioner/
  <kernel_id>`` in each of ``memory``, ``cpu`` and ``pids``.
* none of these: :class:`Unavailable` with the reason; the enforcement plan reports the
  best-effort fallback (rlimits, nice, watchdog) with it.

In v2 the limits sit on ``<kernel_id>`` and the kernel's processes in its leaf
``<kernel_id>/kernel``: a kernel that writes the ``memory.max`` of the cgroup
``/proc/self/cgroup`` names changes a group without limits of ours. The launcher
(``launch.py``) moves itself in *before* it execs the kernel, so no process of the
kernel's tree — double-forked daemons and ``setsid`` escapes included — ever runs
outside, and the group is the authoritative list of the tree's processes.

What a delegated kernel can loosen: cgroup v2 keeps a delegated subtree's limits from
its delegatee by file ownership alone (the resource files of ``user@<uid>.service``
itself stay root's; admin-guide/cgroup-v2.rst, "Model of Delegation"), and everything
below it is the user's — the kernel, running as that user, can write its group's
``memory.max``, ``cpu.max`` and ``pids.max`` and move itself to another group of the
subtree (the common ancestor's ``cgroup.procs`` is the user's too). chmod does not help
(the owner undoes it). ``nsdelegate`` with a cgroup namespace rooted at the kernel's
group would refuse writes to that group's interface files and migrations out of it from
inside, but the ancestors stay writable by path unless ``/sys/fs/cgroup`` and ``/proc``
are hidden too (user, mount and pid namespaces: a rootless container), and a same-uid
process can ptrace the server anyway. What it cannot loosen: limits systemd set above
the subtree, anything of other users. So the plan says "hard against runaway code, but
the kernel runs as your user and could raise it". As root none of this applies: the
groups are root's and the kernel runs as its own uid.

Paths come from the host (mounts, ``/proc/self/cgroup``) and the kernel id, never from
data the kernel can write: a v2 group recorded in a registry entry is only used when it
has the shape we create (:func:`_trusted_v2_group`).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..enforcement import CgroupOffer
from ..limits import Limits
from . import cgroup_versions as cv
from .cgroup_versions import (
    CONTROLLERS,
    GROUP_NAME,
    Group,
    Hierarchy,
    V1Group,
    V1Hierarchy,
    V2Group,
    V2Hierarchy,
)

ENV_ROOT = "LIMITED_PROVISIONER_CGROUP_ROOT"
# As imported before cgroup_root() existed (the v1 layout under it: GROUP_NAME).
CGROUP_ROOT = Path(os.environ.get(ENV_ROOT, "/sys/fs/cgroup"))

log = logging.getLogger(__name__)


def cgroup_root() -> Path:
    """Where the cgroup hierarchies are mounted (``$LIMITED_PROVISIONER_CGROUP_ROOT``,
    read at each call so tests can point it at a fake tree)."""
    return Path(os.environ.get(ENV_ROOT, "/sys/fs/cgroup"))


@dataclass(frozen=True)
class Unavailable:
    """No cgroup hierarchy we may create kernel groups in, and why (reported)."""

    reason: str


# -- detection ------------------------------------------------------------------------


def _enable(parent: Path, wanted: tuple[str, ...]) -> tuple[tuple[str, ...], dict[str, str]]:
    """Enable ``wanted`` controllers for the children of ``parent``; (enabled, {the
    others: why not})."""
    try:
        available = set(cv.read_file(parent / "cgroup.controllers").split())
        enabled = set(cv.read_file(parent / "cgroup.subtree_control").split())
    except OSError as e:
        return (), {c: f"cannot read {parent}: {e.strerror}" for c in wanted}
    missing = {}
    for controller in wanted:
        if controller in enabled:
            continue
        if controller not in available:
            missing[controller] = f"{controller} not in {parent}/cgroup.controllers"
            continue
        try:
            cv.write_file(parent / "cgroup.subtree_control", f"+{controller}")
            enabled.add(controller)
        except OSError as e:
            # EBUSY: the group holds processes itself ("no internal processes").
            missing[controller] = f"cannot enable {controller} in {parent}: {e.strerror}"
    return tuple(c for c in wanted if c in enabled), missing


def _v2_parent(top: Path, wanted: tuple[str, ...], create: bool) -> V2Hierarchy | Unavailable:
    """``<top>/limited-provisioner`` with ``wanted`` passed down to kernel groups."""
    parent = top / GROUP_NAME
    if not create:
        return V2Hierarchy(parent, wanted)
    enabled, missing = _enable(top, wanted)
    try:
        cv.mkdir_group(parent)
    except OSError as e:
        return Unavailable(f"cannot create {parent}: {e.strerror}")
    if enabled:
        enabled, more = _enable(parent, enabled)
        missing |= more
    return V2Hierarchy(parent, enabled, missing=missing)


def _owned(path: Path, uid: int) -> bool:
    """Ours to manage: owned by ``uid``, and we may create groups and move processes."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return st.st_uid == uid and all(
        os.access(p, os.W_OK) for p in (path, path / "cgroup.procs", path / "cgroup.subtree_control")
    )


def delegated_top(root: Path, self_cgroup: str, uid: int) -> Path | Unavailable:
    """The highest ancestor of our own v2 cgroup (``self_cgroup``: the text of
    /proc/self/cgroup) that ``uid`` owns: where a systemd host delegated to us."""
    rel = next((line[3:] for line in self_cgroup.splitlines() if line.startswith("0::")), None)
    if rel is None:
        return Unavailable("this process is in no cgroup v2 group (/proc/self/cgroup)")
    own = root / rel.strip().lstrip("/")
    if ".." in Path(rel).parts or not _owned(own, uid):
        return Unavailable(
            f"this server's cgroup {own} is not delegated to uid {uid} (start it in a "
            "delegated scope, e.g. systemd-run --user --scope -p Delegate=yes ...)"
        )
    top = own
    while top.parent != root and _owned(top.parent, uid):
        top = top.parent
    return top


def detect(
    *, root: Path | None = None, uid: int | None = None, self_cgroup: str | None = None,
    create: bool = True,
) -> Hierarchy | Unavailable:
    """The hierarchy kernel groups go into on this host, for a server running as ``uid``.

    With ``create`` the shared parents are made and controllers enabled down to them
    (at each kernel start); without, only where they would be (reaper, tests, CLI).
    """
    root = cgroup_root() if root is None else root
    uid = os.geteuid() if uid is None else uid
    if (root / "cgroup.controllers").is_file():
        # The unified hierarchy is mounted at the root: v2 only.
        if uid == 0:
            return _v2_parent(root, CONTROLLERS, create)
        if self_cgroup is None:
            try:
                self_cgroup = cv.read_file(Path("/proc/self/cgroup"))
            except OSError as e:
                return Unavailable(f"cannot read /proc/self/cgroup: {e.strerror}")
        top = delegated_top(root, self_cgroup, uid)
        if isinstance(top, Unavailable):
            return top
        found = _v2_parent(top, CONTROLLERS, create)
        if isinstance(found, V2Hierarchy):
            found.delegated = True
        return found
    # v1 (and hybrid hosts: their v2 mount at <root>/unified carries no controllers).
    parents: dict[str, Path] = {}
    missing: dict[str, str] = {}
    for controller in CONTROLLERS:
        base = root / controller
        parent = base / GROUP_NAME
        if not (base / "cgroup.procs").exists():
            missing[controller] = f"no {controller} hierarchy at {base}"
            continue
        if create:
            try:
                cv.mkdir_group(parent)
            except OSError as e:
                missing[controller] = f"cannot create {parent}: {e.strerror}"
                continue
            if not os.access(parent, os.W_OK):
                missing[controller] = f"{parent} is not writable"
                continue
        parents[controller] = parent
    if not parents:
        # The same reason for each, say it once.
        return Unavailable("; ".join(dict.fromkeys(missing.values())))
    return V1Hierarchy(parents, missing=missing)


def _trusted_v2_group(kernel_id: str, recorded: str, root: Path, uid: int) -> Path | None:
    """A recorded v2 group, if it is one we could have made for ``kernel_id``: under the
    cgroup root, ``.../limited-provisioner/<kernel_id>``, and (not root) owned by us.

    A registry a kernel could write (delegated case: same user) must not point us at
    another group to kill or remove; as root the path is recomputed outright.
    """
    path = Path(recorded)
    if not path.is_absolute() or ".." in path.parts:
        return None
    if uid == 0:
        return path if path == root / GROUP_NAME / kernel_id else None
    if path.name != kernel_id or path.parent.name != GROUP_NAME or root not in path.parents:
        return None
    try:
        owner = os.stat(path.parent, follow_symlinks=False).st_uid
    except OSError:
        return None
    return path if owner == uid else None


def kernel_group_dirs(
    kernel_id: str, *, root: Path | None = None, uid: int | None = None
) -> list[Path]:
    """Every group directory of ``kernel_id`` that exists on this host (for tests and
    leftover counting), whatever the hierarchy."""
    root = cgroup_root() if root is None else root
    found = detect(root=root, uid=uid, create=False)
    candidates = [root / c / GROUP_NAME / kernel_id for c in CONTROLLERS]
    if isinstance(found, V2Hierarchy):
        candidates.append(found.parent / kernel_id)
    return [p for p in candidates if p.is_dir()]


def entry_record(info: dict[str, Any], default: list[str] | None = ()) -> Any:
    """What a registry entry (or provisioner info) says about a kernel's groups, for
    :meth:`KernelCgroups.attach`: the group record, else the v1 controller names older
    entries carry, else ``default`` (None: wherever this host would have put them, for
    the reaper of a kernel that died while starting)."""
    record = info.get("cgroup")
    if record:
        return record
    names = info.get("cgroups")
    if names:
        return list(names)
    return None if default is None else list(default)


# -- the interface the provisioner, reaper, recovery and CLI use ------------------------


@dataclass
class KernelCgroups:
    """The cgroup(s) of one kernel, on whichever hierarchy the host offers.

    Falsy (and :attr:`controllers` empty) when there are none: then the caller falls back
    to rlimits, nice and the watchdog, and :meth:`offer` says why.
    """

    kernel_id: str
    group: Group | None = None
    version: int = 0
    delegated: bool = False
    controllers: set[str] = field(default_factory=set)
    no_swap: bool = True
    missing: dict[str, str] = field(default_factory=dict)
    _oom_kills_seen: int = 0
    _pids_max_seen: int = 0
    _cpu_applied: bool = False  # the quota is on (after cpu_startup_grace)

    @classmethod
    def create(cls, kernel_id: str, limits: Limits, defer_cpu: bool = False,
               hierarchy: Hierarchy | Unavailable | None = None) -> KernelCgroups:
        """Create (or reuse, on restart) the groups and write the limits into them.

        With ``defer_cpu`` the CPU quota is left open; call :meth:`apply_cpu` later.
        """
        hierarchy = detect() if hierarchy is None else hierarchy
        if isinstance(hierarchy, Unavailable):
            log.info("kernel %s: no cgroups (%s)", kernel_id, hierarchy.reason)
            return cls.none(kernel_id, hierarchy.reason)
        group = hierarchy.group(kernel_id)
        try:
            made, no_swap = group.make(limits, defer_cpu)
        except OSError as e:
            reason = f"cannot create the kernel's cgroup: {e}"
            log.warning("kernel %s: %s", kernel_id, reason)
            group.remove()
            return cls.none(kernel_id, reason)
        missing = {
            c: hierarchy.missing.get(c, f"cannot set {c} limits (see the server log)")
            for c in CONTROLLERS if c not in made
        }
        groups = cls(kernel_id, group, hierarchy.version, hierarchy.delegated, made,
                     no_swap, missing)
        groups._cpu_applied = not defer_cpu
        groups._oom_kills_seen = groups.oom_kills()
        groups._pids_max_seen = groups.pids_max_events()
        return groups

    @classmethod
    def attach(
        cls, kernel_id: str, record: dict[str, Any] | list[str] | None, *,
        root: Path | None = None, uid: int | None = None,
    ) -> KernelCgroups:
        """Re-open the existing groups of a kernel (adoption, the reaper), from what its
        registry entry recorded (:meth:`record`); a list of controller names is the
        v1-only form older entries carry; None: wherever this host would put them."""
        root = cgroup_root() if root is None else root
        uid = os.geteuid() if uid is None else uid
        if record is None:
            # Nothing recorded (a kernel that died while starting): wherever this host
            # puts kernel groups.
            found = detect(root=root, uid=uid, create=False)
            if isinstance(found, V2Hierarchy):
                record = found.group(kernel_id).record() | {"controllers": list(CONTROLLERS)}
        if isinstance(record, dict) and record.get("version") == 2:
            path = _trusted_v2_group(kernel_id, str(record.get("group", "")), root, uid)
            if path is None:
                log.warning("kernel %s: recorded cgroup %r ignored", kernel_id,
                            record.get("group"))
                return cls.none(kernel_id, "recorded cgroup not trusted")
            controllers = tuple(c for c in record.get("controllers", []) if c in CONTROLLERS)
            group: Group = V2Group(kernel_id, path, controllers)
            version = 2
        else:
            names = record if isinstance(record, list) else CONTROLLERS
            paths = {c: root / c / GROUP_NAME / kernel_id for c in names if c in CONTROLLERS}
            group = V1Group(kernel_id, {c: p for c, p in paths.items() if p.is_dir()})
            controllers = tuple(group.dirs())
            version = 1
        if not group.exists():
            return cls.none(kernel_id, "its cgroup is gone")
        groups = cls(kernel_id, group, version, uid != 0 and version == 2, set(controllers))
        groups._cpu_applied = True  # a running kernel's grace is long over
        groups._oom_kills_seen = groups.oom_kills()
        groups._pids_max_seen = groups.pids_max_events()
        return groups

    @classmethod
    def none(cls, kernel_id: str, reason: str) -> KernelCgroups:
        return cls(kernel_id, missing=dict.fromkeys(CONTROLLERS, reason))

    def __bool__(self) -> bool:
        """Whether the kernel's tree is in a group of ours (tracked, killable as one)."""
        return self.group is not None

    @property
    def paths(self) -> dict[str, Path]:
        """``{controller: the dir holding its interface files}``."""
        return self.group.dirs() if self.group is not None else {}

    def record(self) -> dict[str, Any]:
        """What a registry entry keeps to re-attach and remove the groups later."""
        return self.group.record() if self.group is not None else {}

    def offer(self) -> CgroupOffer:
        """What the enforcement plan may claim."""
        return CgroupOffer(frozenset(self.controllers), self.version or 1, self.delegated,
                           self.no_swap, dict(self.missing))

    def apply_cpu(self, limits: Limits) -> None:
        if self.group is not None and "cpu" in self.controllers:
            self.group.set_cpu(limits)
            self._cpu_applied = True

    def put_back_limits(self, limits: Limits) -> list[str]:
        """In a delegated group (the kernel owns its limit files): rewrite any limit the
        kernel raised; the files it had raised. Called every watchdog round, so a raised
        limit holds for at most one interval. Nothing to do in root's groups."""
        if self.group is None or not self.delegated:
            return []
        return self.group.put_back(limits, cpu=self._cpu_applied)

    @property
    def procs_files(self) -> list[str]:
        """The ``cgroup.procs`` files the launcher writes its pid to before exec."""
        return self.group.procs_files() if self.group is not None else []

    def pids(self) -> list[int]:
        """Every process of the kernel's tree."""
        return self.group.pids() if self.group is not None else []

    def oom_kills(self) -> int:
        """Count of processes the kernel OOM-killed in this group, ever."""
        return self.group.oom_kills() if self.group is not None else 0

    def pids_max_events(self) -> int:
        """How many forks were refused by pids.max."""
        return self.group.pids_refused() if self.group is not None else 0

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

    def memory_bytes(self) -> int | None:
        """Memory charged to the group now (what counts against mem_limit), if known."""
        return self.group.memory_bytes() if self.group is not None else None

    def cpu_seconds(self) -> float | None:
        """CPU time the group used so far, if the hierarchy counts it."""
        return self.group.cpu_seconds() if self.group is not None else None

    def kill_all(self, timeout: float = 5.0) -> list[int]:
        """Kill every process in the group(s) until they are empty.

        v2 kills the subtree in one write (``cgroup.kill``); then, and on v1, SIGKILL
        each member in a loop, because a fork bomb can create a process between our read
        of ``cgroup.procs`` and the kill (pids.max bounds how long that can go on).
        Returns the pids that were signalled.
        """
        if self.group is None:
            return []
        self.group.kill()
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
        if self.group is not None:
            self.group.remove()
        self.group = None
        self.controllers = set()
