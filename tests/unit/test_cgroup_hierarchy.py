"""Which cgroup hierarchy a host offers and what is written where, against FAKE cgroup
trees laid out like a v1, hybrid, v2 (root) and systemd-delegated v2 host.

The fake stands in for cgroupfs where a plain directory differs: a new group gets the
interface files of the controllers its parent passes down, ``cgroup.subtree_control``
takes ``+controller`` writes (refused for a controller the group does not have, or in
a group that holds processes), and removing a group removes its files. Everything
else is the real code writing real files. tests/test_cgroups.py runs the same code on
the host's real kernel.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest

from limited_provisioner.enforcement import CGROUP, NICE, WATCHDOG, process_plan
from limited_provisioner.limits import Limits
from limited_provisioner.process import cgroup_versions as cv
from limited_provisioner.process import cgroups as cg
from limited_provisioner.process.cgroups import (
    KernelCgroups,
    Unavailable,
    V1Hierarchy,
    V2Hierarchy,
    detect,
    entry_record,
    kernel_group_dirs,
)

M = 2**20
LIMITS = Limits(mem_limit=256 * M, cpu_limit=0.5, pids_limit=48)
KID = "5f1c7a52-2d0e-4b8e-9d7c-0d3c7b4e1a10"
V2_CORE = ("cgroup.procs", "cgroup.subtree_control", "cgroup.kill", "cgroup.events", "cpu.stat")
V2_FILES = {
    "memory": ("memory.max", "memory.swap.max", "memory.events", "memory.current"),
    "cpu": ("cpu.max",),
    "pids": ("pids.max", "pids.events"),
}
V1_FILES = {
    "memory": ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes", "memory.oom_control",
               "memory.usage_in_bytes", "memory.swappiness"),
    "cpu": ("cpu.cfs_quota_us", "cpu.cfs_period_us"),
    "pids": ("pids.max", "pids.events"),
}
_real_write = cv.write_file
# A delegated user: ourselves when not root, else someone we chown the subtree to.
USER = os.geteuid() or 1000


class FakeCgroupFS:
    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch, owner: int = 0):
        self.root = root
        self.owner = owner  # who "creates" new groups (delegated case)
        monkeypatch.setattr(cv, "mkdir_group", self.mkdir)
        monkeypatch.setattr(cv, "write_file", self.write)
        monkeypatch.setattr(cv, "remove_dir", self.remove)

    # -- layouts --

    def v1(self, controllers=("memory", "cpu", "pids")) -> FakeCgroupFS:
        for c in controllers:
            (self.root / c).mkdir(parents=True)
            (self.root / c / "cgroup.procs").write_text("1\n")
        return self

    def v2_root(self, controllers="cpuset cpu io memory pids", enabled="") -> FakeCgroupFS:
        self._files(self.root, controllers.split())
        (self.root / "cgroup.procs").write_text("1\n")
        (self.root / "cgroup.controllers").write_text(controllers + "\n")
        (self.root / "cgroup.subtree_control").write_text(enabled + "\n")
        return self

    def v2_group(self, rel: str, processes: str = "", owner: int | None = None) -> Path:
        """Groups down to ``rel`` (made by systemd: each passes on what it has)."""
        path = self.root
        for part in Path(rel).parts:
            parent, path = path, path / part
            if not path.exists():
                path.mkdir()
                have = (parent / "cgroup.subtree_control").read_text().split()
                self._files(path, have)
                (path / "cgroup.subtree_control").write_text(" ".join(have) + "\n")
        (path / "cgroup.procs").write_text(processes)
        if owner is not None:
            self.chown(path, owner)
        return path

    def seal(self, *paths: Path) -> None:
        """Make groups root's: as root, they are (owner 0); a non-root test run cannot
        chown, so it takes write access away instead (what _owned checks too)."""
        if os.geteuid() == 0:
            return
        for path in paths:
            for name in ("cgroup.procs", "cgroup.subtree_control"):
                os.chmod(path / name, 0o444)
            os.chmod(path, 0o555)

    def chown(self, path: Path, uid: int) -> None:
        if os.geteuid() == 0:
            os.chown(path, uid, -1)
            for name in ("cgroup.procs", "cgroup.subtree_control", "cgroup.threads"):
                if (path / name).exists():
                    os.chown(path / name, uid, -1)

    def _files(self, path: Path, controllers) -> None:
        (path / "cgroup.controllers").write_text(" ".join(controllers) + "\n")
        for name in V2_CORE:
            if not (path / name).exists():
                (path / name).write_text("")
        for c in controllers:
            for name in V2_FILES.get(c, ()):
                (path / name).write_text("")

    # -- cgroupfs behaviour --

    def mkdir(self, path: Path) -> None:
        if path.is_dir():
            return
        path.mkdir()
        rel = path.relative_to(self.root).parts
        if rel[0] in V1_FILES and (self.root / rel[0] / "cgroup.procs").exists():
            (path / "cgroup.procs").write_text("")
            for name in V1_FILES[rel[0]]:
                (path / name).write_text("")
        else:
            self._files(path, (path.parent / "cgroup.subtree_control").read_text().split())
        if self.owner and os.geteuid() == 0:
            for p in [path, *path.iterdir()]:
                os.chown(p, self.owner, -1)

    def write(self, path: Path, text: str) -> None:
        if path.name != "cgroup.subtree_control":
            # cgroupfs takes each write whole; a plain file keeps an old, longer tail.
            if path.is_file() and not path.is_symlink():
                os.truncate(path, 0)
            return _real_write(path, text)
        group = path.parent
        have = (group / "cgroup.controllers").read_text().split()
        enabled = path.read_text().split()
        for token in text.split():
            name = token[1:]
            if name not in have:
                raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))
            if group != self.root and (group / "cgroup.procs").read_text().strip():
                raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))  # no internal processes
            if token[0] == "+" and name not in enabled:
                enabled.append(name)
        path.write_text(" ".join(enabled) + "\n")

    def remove(self, path: Path) -> None:
        if any(p.is_dir() for p in path.iterdir()):
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))
        if (path / "cgroup.procs").exists() and (path / "cgroup.procs").read_text().strip():
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))
        shutil.rmtree(path)


@pytest.fixture
def fs(tmp_path, monkeypatch):
    monkeypatch.setattr(cv, "rmdir_retrying", _fast_rmdir(cv.rmdir_retrying))
    root = tmp_path / "cgroup"
    root.mkdir()
    yield FakeCgroupFS(root, monkeypatch)
    for dirpath, _, _ in os.walk(root):  # unseal, so tmp_path can be removed
        os.chmod(dirpath, 0o755)


def _fast_rmdir(rmdir):
    def fast(path):  # the real one retries for a second; a fake EBUSY never clears
        try:
            cv.remove_dir(path)
            return True
        except FileNotFoundError:
            return True
        except OSError:
            return False
    return fast


def plan(groups: KernelCgroups, limits: Limits = LIMITS, grace: float = 0.0):
    return process_plan(limits, cgroups=groups.offer(), own_uid=False, isolated=False,
                        netns=False, nice=10, cpu_grace=grace, scratch_dirs=())


def text(groups, name, **kw):
    return plan(groups, **kw).measures[name]


# -- choosing the hierarchy -----------------------------------------------------------


def test_v1_host_uses_a_group_per_controller(fs):
    fs.v1()
    found = detect(root=fs.root, uid=0)
    assert isinstance(found, V1Hierarchy)
    assert found.parents == {c: fs.root / c / "limited-provisioner" for c in cg.CONTROLLERS}
    groups = KernelCgroups.create(KID, LIMITS, hierarchy=found)
    mem = fs.root / "memory/limited-provisioner" / KID
    assert (mem / "memory.limit_in_bytes").read_text() == str(256 * M)
    assert (mem / "memory.memsw.limit_in_bytes").read_text() == str(256 * M)
    assert (fs.root / "cpu/limited-provisioner" / KID / "cpu.cfs_quota_us").read_text() == "50000"
    assert (fs.root / "pids/limited-provisioner" / KID / "pids.max").read_text() == "48"
    assert groups.procs_files == [
        str(fs.root / c / "limited-provisioner" / KID / "cgroup.procs") for c in cg.CONTROLLERS
    ]
    assert groups.record() == {"version": 1}
    assert text(groups, "mem_limit").text == "hard (cgroup memory.limit_in_bytes, no swap)"
    assert text(groups, "cpu_limit").text == "hard (cgroup cpu.cfs_quota_us)"
    assert text(groups, "pids_limit").text == "hard (cgroup pids.max)"


def test_hybrid_host_uses_v1_where_the_controllers_are(fs):
    """v1 controllers mounted and an empty v2 mount at <root>/unified (this CI host)."""
    fs.v1()
    unified = fs.root / "unified"
    unified.mkdir()
    (unified / "cgroup.controllers").write_text("\n")
    (unified / "cgroup.procs").write_text("1\n")
    assert isinstance(detect(root=fs.root, uid=0), V1Hierarchy)


def test_v2_as_root_enables_controllers_down_to_the_kernel_group(fs):
    fs.v2_root()
    found = detect(root=fs.root, uid=0)
    assert isinstance(found, V2Hierarchy) and not found.delegated
    parent = fs.root / "limited-provisioner"
    assert found.parent == parent and found.controllers == cg.CONTROLLERS
    assert set((fs.root / "cgroup.subtree_control").read_text().split()) >= set(cg.CONTROLLERS)
    assert (parent / "cgroup.subtree_control").read_text().split() == list(cg.CONTROLLERS)

    groups = KernelCgroups.create(KID, LIMITS, hierarchy=found)
    group = parent / KID
    assert (group / "memory.max").read_text() == str(256 * M)
    assert (group / "memory.swap.max").read_text() == "0"
    assert (group / "cpu.max").read_text() == "50000 100000"
    assert (group / "pids.max").read_text() == "48"
    # The kernel goes into the leaf; the shared parent never holds a process.
    assert groups.procs_files == [str(group / "kernel" / "cgroup.procs")]
    assert (group / "kernel").is_dir()
    assert (parent / "cgroup.procs").read_text() == ""
    assert groups.record() == {"version": 2, "group": str(group),
                               "controllers": ["memory", "cpu", "pids"]}
    assert text(groups, "mem_limit").text == "hard (cgroup v2 memory.max, no swap)"
    assert text(groups, "cpu_limit").text == "hard (cgroup v2 cpu.max)"
    assert text(groups, "pids_limit").text == "hard (cgroup v2 pids.max)"
    for name in ("mem_limit", "cpu_limit", "pids_limit"):
        assert text(groups, name).mechanism == CGROUP
        assert "raise" not in text(groups, name).text


def test_v2_deferred_cpu_quota_is_open_until_applied(fs):
    fs.v2_root()
    groups = KernelCgroups.create(KID, LIMITS, defer_cpu=True, hierarchy=detect(root=fs.root, uid=0))
    cpu_max = fs.root / "limited-provisioner" / KID / "cpu.max"
    assert cpu_max.read_text() == "max"
    assert text(groups, "cpu_limit", grace=2).text == "hard (cgroup v2 cpu.max) from 2s after launch"
    groups.apply_cpu(LIMITS)
    assert cpu_max.read_text() == "50000 100000"


def test_v2_without_swap_accounting_claims_no_swap_only_without_swap(fs, monkeypatch):
    fs.v2_root()
    found = detect(root=fs.root, uid=0)
    orig_mkdir = cv.mkdir_group

    def no_swap_file(path):
        orig_mkdir(path)
        (path / "memory.swap.max").unlink(missing_ok=True)

    monkeypatch.setattr(cv, "mkdir_group", no_swap_file)
    monkeypatch.setattr(cv, "swap_in_use", lambda: True)
    groups = KernelCgroups.create(KID, LIMITS, hierarchy=found)
    assert "swap not limited" in text(groups, "mem_limit").text
    monkeypatch.setattr(cv, "swap_in_use", lambda: False)
    groups = KernelCgroups.create(KID, LIMITS, hierarchy=found)
    assert text(groups, "mem_limit").text == "hard (cgroup v2 memory.max, no swap)"


def test_v2_root_missing_controller_is_reported_with_the_reason(fs):
    fs.v2_root(controllers="cpuset io memory pids")
    groups = KernelCgroups.create(KID, LIMITS, hierarchy=detect(root=fs.root, uid=0))
    assert groups.controllers == {"memory", "pids"}
    measure = text(groups, "cpu_limit")
    assert measure.mechanism == NICE and measure.text.startswith("best-effort (nice 10")
    assert "cpu not in" in measure.text


SCOPE = "user.slice/user-1000.slice/user@1000.service/app.slice/jupyter.scope"
DELEGATED = "user.slice/user-1000.slice/user@1000.service"


def delegated_host(fs, controllers="cpu memory pids", processes_in_top=False):
    fs.v2_root(enabled="cpu io memory pids")
    fs.v2_group("user.slice/user-1000.slice")
    # systemd's user@.service: delegated (dir, procs, subtree_control owned by the user)
    # with what Delegate= passes on.
    top = fs.v2_group(DELEGATED, processes="7\n" if processes_in_top else "", owner=USER)
    (top / "cgroup.controllers").write_text(controllers + "\n")
    (top / "cgroup.subtree_control").write_text("\n")
    fs.owner = USER
    for rel in ("app.slice", "app.slice/jupyter.scope"):
        fs.mkdir(top / rel)
    (top / "app.slice/jupyter.scope/cgroup.procs").write_text(f"{os.getpid()}\n")
    fs.v2_group("user.slice/user-1000.slice/session-2.scope", processes="9\n")
    fs.seal(fs.root, fs.root / "user.slice", fs.root / "user.slice/user-1000.slice",
            fs.root / "user.slice/user-1000.slice/session-2.scope")
    return top


def test_delegated_user_gets_a_group_under_the_highest_owned_ancestor(fs):
    top = delegated_host(fs)
    found = detect(root=fs.root, uid=USER, self_cgroup=f"0::/{SCOPE}\n")
    assert isinstance(found, V2Hierarchy) and found.delegated
    assert found.parent == top / "limited-provisioner"
    assert found.controllers == cg.CONTROLLERS
    groups = KernelCgroups.create(KID, LIMITS, hierarchy=found)
    group = top / "limited-provisioner" / KID
    assert (group / "memory.max").read_text() == str(256 * M)
    assert groups.procs_files == [str(group / "kernel" / "cgroup.procs")]
    # The server's scope and the kernel group share the delegated ancestor (v2 lets a
    # non-root writer migrate only beneath a cgroup.procs it can write).
    assert os.path.commonpath([group, top / "app.slice/jupyter.scope"]) == str(top)
    for name in ("mem_limit", "cpu_limit", "pids_limit"):
        measure = text(groups, name)
        assert measure.mechanism == CGROUP and measure.text.startswith("hard (cgroup v2 ")
        # Truthful: the kernel runs as the user who owns these files.
        assert "runs as your user" in measure.text and "could raise it" in measure.text


def test_delegated_without_cpu_reports_cpu_best_effort(fs):
    delegated_host(fs, controllers="memory pids")
    groups = KernelCgroups.create(KID, LIMITS, hierarchy=detect(
        root=fs.root, uid=USER, self_cgroup=f"0::/{SCOPE}\n"))
    assert groups.controllers == {"memory", "pids"}
    assert text(groups, "cpu_limit").mechanism == NICE
    assert "cpu not in" in text(groups, "cpu_limit").text


def test_delegated_top_holding_processes_cannot_pass_controllers_down(fs):
    delegated_host(fs, processes_in_top=True)
    found = detect(root=fs.root, uid=USER, self_cgroup=f"0::/{SCOPE}\n")
    assert isinstance(found, V2Hierarchy) and found.controllers == ()
    assert all("Device or resource busy" in found.missing[c] for c in cg.CONTROLLERS)
    groups = KernelCgroups.create(KID, LIMITS, hierarchy=found)
    # Still one group for the tree (listing, cgroup.kill), but no limits claimed.
    assert groups and groups.controllers == set()
    measure = text(groups, "mem_limit")
    assert measure.mechanism == WATCHDOG and "Device or resource busy" in measure.text


def test_a_server_outside_the_delegated_subtree_gets_no_cgroups(fs):
    """An ssh session scope (user-1000.slice/session-2.scope) is root's, not the user's."""
    delegated_host(fs)
    found = detect(root=fs.root, uid=USER,
                   self_cgroup="0::/user.slice/user-1000.slice/session-2.scope\n")
    assert isinstance(found, Unavailable)
    assert "not delegated to uid" in found.reason and "systemd-run --user" in found.reason
    groups = KernelCgroups.create(KID, LIMITS, hierarchy=found)
    assert not groups and groups.procs_files == []
    measure = text(groups, "mem_limit")
    assert measure.mechanism == WATCHDOG and "not delegated" in measure.text


def test_no_cgroup_hierarchy_at_all(fs):
    found = detect(root=fs.root, uid=0)
    assert isinstance(found, Unavailable) and "no memory hierarchy" in found.reason
    assert text(KernelCgroups.create(KID, LIMITS, hierarchy=found), "pids_limit").mechanism != CGROUP


def test_v1_as_non_root_reports_why(fs, monkeypatch):
    fs.v1()
    monkeypatch.setattr(cv, "mkdir_group", lambda p: (_ for _ in ()).throw(
        PermissionError(errno.EACCES, "Permission denied")))
    found = detect(root=fs.root, uid=USER)
    assert isinstance(found, Unavailable) and "Permission denied" in found.reason


# -- events, listing, usage, kill, remove ---------------------------------------------


def v2_groups(fs) -> tuple[KernelCgroups, Path]:
    fs.v2_root()
    groups = KernelCgroups.create(KID, LIMITS, hierarchy=detect(root=fs.root, uid=0))
    return groups, fs.root / "limited-provisioner" / KID


def test_v2_events_are_counted_from_the_limited_group(fs):
    groups, group = v2_groups(fs)
    (group / "memory.events").write_text("low 0\nhigh 0\nmax 12\noom 2\noom_kill 2\n")
    (group / "pids.events").write_text("max 5\n")
    assert groups.new_oom_kills() == 2 and groups.new_oom_kills() == 0
    assert groups.new_pids_max_events() == 5
    (group / "memory.events").write_text("oom_kill 3\n")
    assert groups.new_oom_kills() == 1


def test_v2_tree_is_the_whole_subtree(fs):
    groups, group = v2_groups(fs)
    (group / "kernel/cgroup.procs").write_text("101\n102\n")
    sub = group / "kernel" / "made-by-the-kernel"
    sub.mkdir()
    (sub / "cgroup.procs").write_text("103\n")
    assert sorted(groups.pids()) == [101, 102, 103]


def test_v2_usage_comes_from_memory_current_and_cpu_stat(fs):
    groups, group = v2_groups(fs)
    (group / "memory.current").write_text("12345678\n")
    (group / "cpu.stat").write_text("usage_usec 2500000\nuser_usec 2000000\n")
    assert groups.memory_bytes() == 12345678 and groups.cpu_seconds() == 2.5


def test_v1_usage_has_memory_but_no_cpu(fs):
    fs.v1()
    groups = KernelCgroups.create(KID, LIMITS, hierarchy=detect(root=fs.root, uid=0))
    (fs.root / "memory/limited-provisioner" / KID / "memory.usage_in_bytes").write_text("4096\n")
    assert groups.memory_bytes() == 4096 and groups.cpu_seconds() is None


def test_v2_kill_writes_cgroup_kill_and_remove_takes_the_subtree(fs):
    groups, group = v2_groups(fs)
    (group / "kernel" / "made-by-the-kernel").mkdir()
    assert groups.kill_all(timeout=0.1) == []
    assert (group / "cgroup.kill").read_text() == "1"
    groups.remove()
    assert not group.exists() and not groups
    assert (fs.root / "limited-provisioner").is_dir()  # shared, stays


def test_no_cgroup_kill_falls_back_to_signalling_members(fs, monkeypatch):
    groups, group = v2_groups(fs)
    (group / "cgroup.kill").unlink()  # Linux < 5.14
    signalled = []
    monkeypatch.setattr(cg.os, "kill", lambda pid, sig: signalled.append(pid) or (
        (group / "kernel/cgroup.procs").write_text("")))
    (group / "kernel/cgroup.procs").write_text("4242\n")
    assert groups.kill_all(timeout=1) == [4242] and signalled == [4242]


# -- re-attaching from a registry entry -----------------------------------------------


def test_attach_v2_from_the_record(fs):
    groups, _ = v2_groups(fs)
    entry = {"cgroups": sorted(groups.controllers), "cgroup": groups.record()}
    again = KernelCgroups.attach(KID, entry_record(entry), root=fs.root, uid=0)
    assert again and again.version == 2 and again.paths == groups.paths
    assert again.procs_files == groups.procs_files


def test_attach_old_v1_entry_with_controller_names(fs):
    fs.v1()
    KernelCgroups.create(KID, LIMITS, hierarchy=detect(root=fs.root, uid=0))
    entry = {"cgroups": ["cpu", "memory", "pids"]}  # entries before v2 support
    again = KernelCgroups.attach(KID, entry_record(entry), root=fs.root, uid=0)
    assert again.version == 1 and set(again.paths) == set(cg.CONTROLLERS)


def test_attach_without_a_record_finds_the_hosts_group(fs):
    _, group = v2_groups(fs)
    again = KernelCgroups.attach(KID, entry_record({}, default=None), root=fs.root, uid=0)
    assert again and again.paths["memory"] == group


@pytest.mark.parametrize("recorded", [
    "{root}/user.slice",                                   # someone else's group
    "{root}/limited-provisioner/other-kernel",              # another kernel's
    "{root}/limited-provisioner/x/../../user.slice",        # climbing out
    "limited-provisioner/{kid}",                           # relative
])
def test_attach_as_root_ignores_a_group_it_did_not_make(fs, recorded):
    v2_groups(fs)
    record = {"version": 2, "group": recorded.format(root=fs.root, kid=KID),
              "controllers": ["memory"]}
    assert not KernelCgroups.attach(KID, record, root=fs.root, uid=0)


def test_attach_delegated_accepts_only_our_own_groups(fs):
    top = delegated_host(fs)
    groups = KernelCgroups.create(KID, LIMITS, hierarchy=detect(
        root=fs.root, uid=USER, self_cgroup=f"0::/{SCOPE}\n"))
    assert KernelCgroups.attach(KID, groups.record(), root=fs.root, uid=USER)
    other = fs.v2_group(f"{DELEGATED}/app.slice/limited-provisioner/{KID}")
    os.chown(other.parent, 0, -1) if os.geteuid() == 0 else None
    record = {"version": 2, "group": str(other), "controllers": ["memory"]}
    if os.geteuid() == 0:
        assert not KernelCgroups.attach(KID, record, root=fs.root, uid=USER)
    assert top in Path(groups.record()["group"]).parents


def test_kernel_group_dirs_finds_v1_and_v2_groups(fs):
    groups, group = v2_groups(fs)
    assert kernel_group_dirs(KID, root=fs.root, uid=0) == [group]
    groups.remove()
    assert kernel_group_dirs(KID, root=fs.root, uid=0) == []


def test_old_plan_callers_still_pass_controller_names():
    measure = process_plan(LIMITS, cgroups=("memory",), own_uid=False, isolated=False,
                           netns=False, nice=10, cpu_grace=0, scratch_dirs=()).measures
    assert measure["mem_limit"].text == "hard (cgroup memory.limit_in_bytes, no swap)"


# -- a delegated kernel raising its own limits ----------------------------------------


def test_delegated_limits_a_kernel_raised_are_put_back(fs):
    delegated_host(fs)
    groups = KernelCgroups.create(KID, LIMITS, defer_cpu=True, hierarchy=detect(
        root=fs.root, uid=USER, self_cgroup=f"0::/{SCOPE}\n"))
    group = Path(groups.record()["group"])
    assert groups.put_back_limits(LIMITS) == []
    # What a kernel running as the user can write:
    (group / "memory.max").write_text("max\n")
    (group / "memory.swap.max").write_text("max\n")
    (group / "pids.max").write_text("1000\n")
    assert sorted(groups.put_back_limits(LIMITS)) == ["memory.max", "memory.swap.max", "pids.max"]
    assert (group / "memory.max").read_text() == str(256 * M)
    assert (group / "memory.swap.max").read_text() == "0"
    assert (group / "pids.max").read_text() == "48"
    # Before cpu_startup_grace the open quota is ours; after it, "max" is loosened.
    (group / "cpu.max").write_text("max 100000\n")
    assert groups.put_back_limits(LIMITS) == []
    groups.apply_cpu(LIMITS)
    (group / "cpu.max").write_text("90000 100000\n")
    assert groups.put_back_limits(LIMITS) == ["cpu.max"]
    assert (group / "cpu.max").read_text() == "50000 100000"
    # Stricter is the kernel's business: left alone.
    (group / "memory.max").write_text(f"{128 * M}\n")
    (group / "cpu.max").write_text("10000 100000\n")
    assert groups.put_back_limits(LIMITS) == []
    assert (group / "memory.max").read_text() == f"{128 * M}\n"


def test_root_groups_are_not_rewritten(fs):
    groups, group = v2_groups(fs)
    (group / "memory.max").write_text("max\n")  # only root could: nothing to police
    assert groups.put_back_limits(LIMITS) == []
