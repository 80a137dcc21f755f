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
from typing import Any, Protocol

from ..enforcement import CgroupOffer
from ..limits import Limits

ENV_ROOT = "LIMITED_PROVISIONER_CGROUP_ROOT"
CGROUP_ROOT = Path(os.environ.get(ENV_ROOT, "/sys/fs/cgroup"))
GROUP_NAME = "limited-provisioner"
# The v2 leaf that holds the kernel's processes; the limits sit on its parent.
LEAF_NAME = "kernel"
CONTROLLERS = ("memory", "cpu", "pids")
CFS_PERIOD_US = 100_000
# A kernel that can create sub-cgroups (delegated case) must not make our walks of its
# group unbounded.
MAX_WALK = 1000

log = logging.getLogger(__name__)


def cgroup_root() -> Path:
    """Where the cgroup hierarchies are mounted (``$LIMITED_PROVISIONER_CGROUP_ROOT``,
    read at each call so tests can point it at a fake tree)."""
    return Path(os.environ.get(ENV_ROOT, "/sys/fs/cgroup"))


class CgroupSetupError(OSError):
    """A cgroup file could not be written while setting up a kernel's group."""


@dataclass(frozen=True)
class Unavailable:
    """No cgroup hierarchy we may create kernel groups in, and why (reported)."""

    reason: str


# -- small file helpers (module level, so tests can stand in for cgroupfs) --------------


def _mkdir(path: Path) -> None:
    path.mkdir(exist_ok=True)


def _write(path: Path, text: str) -> None:
    # Not Path.write_text: that opens with O_CREAT|O_TRUNC, and an interface file that
    # is missing must fail, not be created (in a fake tree or a misnamed path).
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _read(path: Path) -> str:
    with open(path) as f:
        return f.read(64 * 1024)


def _keyed(path: Path, key: str) -> int | None:
    """The value of a ``key value`` line (memory.events, cpu.stat, ...), or None."""
    try:
        for line in _read(path).splitlines():
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
        return [int(line) for line in _read(group / "cgroup.procs").split()]
    except (OSError, ValueError):
        return []


def _remove_dir(path: Path) -> None:
    os.rmdir(path)  # on cgroupfs, removes the group with its interface files


def _rmdir(path: Path) -> bool:
    """Remove an empty cgroup, retrying while killed members are still being reaped."""
    for _ in range(50):
        try:
            _remove_dir(path)
            return True
        except FileNotFoundError:
            return True
        except OSError:
            time.sleep(0.02)  # EBUSY until the last killed process is gone
    log.warning("could not remove cgroup %s", path)
    return False


def _swap_in_use() -> bool:
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
    reason: str

    def group(self, kernel_id: str) -> Group: ...


class Group(Protocol):
    """One kernel's group(s) in a hierarchy: the operations :class:`KernelCgroups` needs."""

    def dirs(self) -> dict[str, Path]: ...
    def make(self, limits: Limits, defer_cpu: bool) -> tuple[set[str], bool]: ...
    def set_cpu(self, limits: Limits) -> None: ...
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
    reason: str = ""
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
                _mkdir(path)
                if controller == "cpu" and defer_cpu:
                    _write(path / "cpu.cfs_quota_us", "-1")
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
        _write(path / "memory.limit_in_bytes", str(limits.mem_limit))
        # Without this, swap would let the kernel exceed mem_limit in RAM+swap.
        memsw = path / "memory.memsw.limit_in_bytes"
        if memsw.exists():
            _write(memsw, str(limits.mem_limit))
        swappiness = path / "memory.swappiness"
        if swappiness.exists():
            try:
                _write(swappiness, "0")
            except OSError:
                pass  # read-only on the root group on some kernels; harmless
        return memsw.exists() or not _swap_in_use()

    def _set(self, controller: str, path: Path, limits: Limits) -> None:
        if controller == "cpu" and limits.cpu_limit is not None:
            _write(path / "cpu.cfs_period_us", str(CFS_PERIOD_US))
            _write(path / "cpu.cfs_quota_us", str(int(limits.cpu_limit * CFS_PERIOD_US)))
        elif controller == "pids" and limits.pids_limit is not None:
            _write(path / "pids.max", str(limits.pids_limit))

    def set_cpu(self, limits: Limits) -> None:
        path = self.paths.get("cpu")
        if path is not None and path.is_dir():
            self._set("cpu", path, limits)

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
            _rmdir(path)

    def memory_bytes(self) -> int | None:
        path = self.paths.get("memory")
        try:
            return int(_read(path / "memory.usage_in_bytes")) if path else None
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
    reason: str = ""
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
        _mkdir(self.path)
        made, no_swap = set(), True
        for controller in self.controllers:
            try:
                if controller == "memory":
                    no_swap = self._set_memory(limits)
                elif controller == "cpu":
                    _write(self.path / "cpu.max", "max" if defer_cpu else self._cpu_max(limits))
                elif controller == "pids" and limits.pids_limit is not None:
                    _write(self.path / "pids.max", str(limits.pids_limit))
            except OSError as e:
                log.warning("cgroup v2 %s for kernel %s unusable: %s",
                            controller, self.kernel_id, e)
                continue
            made.add(controller)
        self.controllers = tuple(c for c in self.controllers if c in made)
        # The leaf has no controllers of its own: the limits of its parent cover it.
        _mkdir(self.leaf)
        return made, no_swap

    def _set_memory(self, limits: Limits) -> bool:
        if limits.mem_limit is None:
            return True
        _write(self.path / "memory.max", str(limits.mem_limit))
        # memory.oom.group stays 0, as v1 behaves: an OOM kills the biggest process of
        # the tree (often a child the kernel started) and the kernel reports it and
        # lives on; group=1 would take the kernel down for any child's excess.
        swap = self.path / "memory.swap.max"
        if swap.exists():
            _write(swap, "0")  # or RAM + swap would exceed mem_limit
            return True
        return not _swap_in_use()  # no swap accounting: "no swap" only if there is none

    @staticmethod
    def _cpu_max(limits: Limits) -> str:
        if limits.cpu_limit is None:
            return f"max {CFS_PERIOD_US}"
        return f"{int(limits.cpu_limit * CFS_PERIOD_US)} {CFS_PERIOD_US}"

    def set_cpu(self, limits: Limits) -> None:
        if "cpu" in self.controllers and self.path.is_dir():
            _write(self.path / "cpu.max", self._cpu_max(limits))

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
                _write(kill_file, "1")
            except OSError as e:
                log.warning("cgroup.kill of kernel %s failed: %s", self.kernel_id, e)

    def remove(self) -> None:
        # Children first: rmdir of a group with sub-groups fails.
        for group in reversed(_walk(self.path)):
            _rmdir(group)

    def memory_bytes(self) -> int | None:
        try:
            return int(_read(self.path / "memory.current"))
        except (OSError, ValueError):
            return None

    def cpu_seconds(self) -> float | None:
        # cpu.stat's usage_usec is there even without the cpu controller.
        usec = _keyed(self.path / "cpu.stat", "usage_usec")
        return usec / 1e6 if usec is not None else None

    def record(self) -> dict[str, Any]:
        return {"version": 2, "group": str(self.path), "controllers": list(self.controllers)}


# -- detection ------------------------------------------------------------------------


def _enable(parent: Path, wanted: tuple[str, ...]) -> tuple[tuple[str, ...], list[str]]:
    """Enable ``wanted`` controllers for the children of ``parent``; (enabled, problems)."""
    try:
        available = set(_read(parent / "cgroup.controllers").split())
        enabled = set(_read(parent / "cgroup.subtree_control").split())
    except OSError as e:
        return (), [f"cannot read {parent}: {e.strerror}"]
    problems = []
    for controller in wanted:
        if controller in enabled:
            continue
        if controller not in available:
            problems.append(f"{controller} not delegated to {parent}")
            continue
        try:
            _write(parent / "cgroup.subtree_control", f"+{controller}")
            enabled.add(controller)
        except OSError as e:
            # EBUSY: the group holds processes itself ("no internal processes").
            problems.append(f"cannot enable {controller} in {parent}: {e.strerror}")
    return tuple(c for c in wanted if c in enabled), problems


def _v2_parent(top: Path, wanted: tuple[str, ...], create: bool) -> V2Hierarchy | Unavailable:
    """``<top>/limited-provisioner`` with ``wanted`` passed down to kernel groups."""
    parent = top / GROUP_NAME
    if not create:
        return V2Hierarchy(parent, wanted)
    enabled, problems = _enable(top, wanted)
    try:
        _mkdir(parent)
    except OSError as e:
        return Unavailable(f"cannot create {parent}: {e.strerror}")
    if enabled:
        enabled, more = _enable(parent, enabled)
        problems += more
    return V2Hierarchy(parent, enabled, reason="; ".join(problems))


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
                self_cgroup = _read(Path("/proc/self/cgroup"))
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
    problems = []
    for controller in CONTROLLERS:
        base = root / controller
        if not (base / "cgroup.procs").exists():
            problems.append(f"no {controller} hierarchy at {base}")
            continue
        parent = base / GROUP_NAME
        if create:
            try:
                _mkdir(parent)
            except OSError as e:
                problems.append(f"cannot create {parent}: {e.strerror}")
                continue
            if not os.access(parent, os.W_OK):
                problems.append(f"{parent} is not writable")
                continue
        parents[controller] = parent
    if not parents:
        return Unavailable("; ".join(problems) or f"no cgroup hierarchy at {root}")
    return V1Hierarchy(parents, reason="; ".join(problems))


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


def kernel_group_dirs(kernel_id: str, *, root: Path | None = None) -> list[Path]:
    """Every group directory of ``kernel_id`` that exists on this host (for tests and
    leftover counting), whatever the hierarchy."""
    root = cgroup_root() if root is None else root
    found = detect(root=root, create=False)
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
    reason: str = ""
    _oom_kills_seen: int = 0
    _pids_max_seen: int = 0

    @classmethod
    def create(cls, kernel_id: str, limits: Limits, defer_cpu: bool = False,
               hierarchy: Hierarchy | Unavailable | None = None) -> KernelCgroups:
        """Create (or reuse, on restart) the groups and write the limits into them.

        With ``defer_cpu`` the CPU quota is left open; call :meth:`apply_cpu` later.
        """
        hierarchy = detect() if hierarchy is None else hierarchy
        if isinstance(hierarchy, Unavailable):
            log.info("kernel %s: no cgroups (%s)", kernel_id, hierarchy.reason)
            return cls(kernel_id, reason=hierarchy.reason)
        group = hierarchy.group(kernel_id)
        try:
            made, no_swap = group.make(limits, defer_cpu)
        except OSError as e:
            reason = f"cannot create the kernel's cgroup: {e}"
            log.warning("kernel %s: %s", kernel_id, reason)
            group.remove()
            return cls(kernel_id, reason=reason)
        missing = [c for c in CONTROLLERS if c not in made]
        reason = hierarchy.reason or (f"{', '.join(missing)} not available" if missing else "")
        groups = cls(kernel_id, group, hierarchy.version, hierarchy.delegated, made,
                     no_swap, reason)
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
                return cls(kernel_id, reason="recorded cgroup not trusted")
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
            return cls(kernel_id, reason="its cgroup is gone")
        groups = cls(kernel_id, group, version, uid != 0 and version == 2, set(controllers))
        groups._oom_kills_seen = groups.oom_kills()
        groups._pids_max_seen = groups.pids_max_events()
        return groups

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
                           self.no_swap, self.reason)

    def apply_cpu(self, limits: Limits) -> None:
        if self.group is not None and "cpu" in self.controllers:
            self.group.set_cpu(limits)

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
