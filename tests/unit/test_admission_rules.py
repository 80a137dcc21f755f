"""admit(): one table row per cap, against a real Registry in a temp dir.

"Live" entries are this test process (its pid and create time), "dead" ones a pid that
cannot exist, "reused" ones this pid with another create time; "starting" entries count
while younger than 120 s.
"""

from __future__ import annotations

import os
import time
import types
from pathlib import Path

import pytest

from limited_provisioner import admission
from limited_provisioner.admission import AdmissionPolicy, admit
from limited_provisioner.errors import KernelLimitError
from limited_provisioner.registry import Registry, process_identity

G = 1024**3
M = 1024**2


def impossible_pid() -> int:
    """A pid no process can have: pids are below pid_max."""
    try:
        return int(Path("/proc/sys/kernel/pid_max").read_text())
    except OSError:
        return 4194304


def entry(kernel_id, owner="bob", kind="live", mem=G):
    """A registry entry; ``kind``: live, dead, reused, starting, stale-starting.

    Ages are kept relative ("_age", seconds) and made absolute when the entry is
    written: the table is built at collection, long before a test of it runs."""
    me = os.getpid()
    e = {
        "kernel_id": kernel_id,
        "owner": owner,
        "state": "running",
        "pid": me,
        "pid_create_time": process_identity(me),
        "limits": {} if mem is None else {"mem_limit": mem},
        "_age": 30,
    }
    if kind == "dead":
        e["pid"] = impossible_pid()
    elif kind == "reused":
        e["pid_create_time"] -= 1000
    elif kind == "starting":
        e.update(state="starting", pid=None, pid_create_time=None, _age=10)
    elif kind == "stale-starting":
        e.update(state="starting", pid=None, pid_create_time=None, _age=200)
    else:
        assert kind == "live", kind
    return e


@pytest.fixture
def registry(tmp_path):
    return Registry(tmp_path / "state")


def check(registry, entries, policy, *, kernel_id="new", owner="alice", mem_limit=G,
          replacing=None):
    for e in entries:
        e = dict(e)
        e["created"] = time.time() - e.pop("_age", 0)
        registry.write(e["kernel_id"], e)
    try:
        admit(registry, policy, kernel_id=kernel_id, owner=owner, mem_limit=mem_limit,
              replacing=replacing)
    except KernelLimitError as err:
        return err
    return None


# (entries, policy, admit kwargs, refused limit or None, words in the message)
ROWS = {
    # -- max_kernels -----------------------------------------------------------------
    "no caps admits anything": (
        [entry("a"), entry("b")], AdmissionPolicy(), {}, None, ()),
    "max_kernels not reached admits": (
        [entry("a")], AdmissionPolicy(max_kernels=2), {}, None, ()),
    "max_kernels reached refuses, whoever runs them": (
        [entry("a"), entry("b")], AdmissionPolicy(max_kernels=2), {},
        "max_kernels", ("max_kernels=2", "2 limited kernels", "'alice'", "shut one down",
                        "raise max_kernels")),
    "dead kernels do not count toward max_kernels": (
        [entry("a"), entry("b", kind="dead")], AdmissionPolicy(max_kernels=2), {}, None, ()),
    "a reused pid is not a live kernel": (
        [entry("a"), entry("b", kind="reused")], AdmissionPolicy(max_kernels=2), {}, None, ()),
    "a kernel still starting counts toward max_kernels": (
        [entry("a"), entry("b", kind="starting")], AdmissionPolicy(max_kernels=2), {},
        "max_kernels", ("max_kernels=2",)),
    "a start older than 120 s no longer counts": (
        [entry("a"), entry("b", kind="stale-starting")], AdmissionPolicy(max_kernels=2), {},
        None, ()),
    "a claim does not count the pooled kernel it turns into": (
        [entry("a"), entry("pooled-1", owner="(pool)")], AdmissionPolicy(max_kernels=2),
        {"replacing": "pooled-1"}, None, ()),
    "a claim counts the other pooled kernels": (
        [entry("pooled-2", owner="(pool)"), entry("pooled-1", owner="(pool)")],
        AdmissionPolicy(max_kernels=1), {"replacing": "pooled-1"}, "max_kernels",
        ("max_kernels=1",)),
    "a claim counts toward the claimer's per-user cap": (
        [entry("a", owner="alice"), entry("pooled-1", owner="(pool)")],
        AdmissionPolicy(max_kernels_per_user=1), {"replacing": "pooled-1"},
        "max_kernels_per_user", ("'alice' already runs 1",)),
    "a restart is not counted against its own kernel": (
        [entry("a"), entry("new", owner="alice")], AdmissionPolicy(max_kernels=2), {},
        None, ()),
    # -- max_kernels_per_user ------------------------------------------------------------
    "max_kernels_per_user counts only the owner's kernels": (
        [entry("a", owner="bob"), entry("b", owner="bob")],
        AdmissionPolicy(max_kernels_per_user=1), {}, None, ()),
    "max_kernels_per_user reached refuses the owner": (
        [entry("a", owner="alice"), entry("b", owner="bob")],
        AdmissionPolicy(max_kernels_per_user=1), {},
        "max_kernels_per_user", ("max_kernels_per_user=1", "'alice' already runs 1",
                                 "shut one down", "raise max_kernels_per_user")),
    "max_kernels_per_user does not count the owner's dead kernels": (
        [entry("a", owner="alice", kind="dead")],
        AdmissionPolicy(max_kernels_per_user=1), {}, None, ()),
    "max_kernels_per_user does not count the restarting kernel itself": (
        [entry("new", owner="alice")], AdmissionPolicy(max_kernels_per_user=1), {}, None, ()),
    "max_kernels is checked before max_kernels_per_user": (
        [entry("a", owner="alice")], AdmissionPolicy(max_kernels=1, max_kernels_per_user=1),
        {}, "max_kernels", ("max_kernels=1",)),
    # -- mem_budget ----------------------------------------------------------------------
    "mem_budget filled exactly admits": (
        [entry("a", mem=G), entry("b", mem=G)], AdmissionPolicy(mem_budget=4 * G),
        {"mem_limit": 2 * G}, None, ()),
    "mem_budget exceeded by one byte refuses": (
        [entry("a", mem=G), entry("b", mem=G)], AdmissionPolicy(mem_budget=4 * G),
        {"mem_limit": 2 * G + 1}, "mem_budget",
        ("mem_budget=4G", "2 live kernels reserve 2G", "'alice' asked for 2G",
         "lower mem_limit", "raise mem_budget")),
    "dead kernels reserve no memory": (
        [entry("a", mem=3 * G, kind="dead")], AdmissionPolicy(mem_budget=4 * G),
        {"mem_limit": 2 * G}, None, ()),
    "a live kernel without mem_limit reserves the whole budget": (
        [entry("a", mem=None)], AdmissionPolicy(mem_budget=4 * G), {"mem_limit": 1},
        "mem_budget", ("mem_budget=4G", "reserve 4G")),
    "asking for no mem_limit asks for the whole budget": (
        [entry("a", mem=M)], AdmissionPolicy(mem_budget=4 * G), {"mem_limit": None},
        "mem_budget", ("mem_budget=4G", "reserve 1M", "asked for 4G")),
    "asking for no mem_limit on an empty host is admitted": (
        [], AdmissionPolicy(mem_budget=4 * G), {"mem_limit": None}, None, ()),
    "a restart does not reserve its own memory twice": (
        [entry("new", owner="alice", mem=3 * G)], AdmissionPolicy(mem_budget=4 * G),
        {"mem_limit": 3 * G}, None, ()),
    # -- min_free_disk --------------------------------------------------------------------
    "min_free_disk available admits": (
        [], "disk:1", {}, None, ()),
    "min_free_disk not available refuses and names the path": (
        [], "disk:1000T", {}, "min_free_disk",
        ("min_free_disk=1000T", "free on", "free disk space")),
    "a disk path that does not exist is skipped": (
        [], "missing:1000T", {}, None, ()),
}


def disk_policy(spec: str, tmp_path: Path) -> AdmissionPolicy:
    where, size = spec.split(":")
    amount = {"1": 1, "1000T": 1000 * 1024**4}[size]
    path = tmp_path if where == "disk" else tmp_path / "no" / "such" / "dir"
    return AdmissionPolicy(min_free_disk=amount, disk_paths=[path])


@pytest.mark.parametrize("entries, policy, kwargs, refused, words", list(ROWS.values()),
                         ids=list(ROWS))
def test_admit(registry, tmp_path, entries, policy, kwargs, refused, words):
    if isinstance(policy, str):
        policy = disk_policy(policy, tmp_path)
    err = check(registry, entries, policy, **kwargs)
    if refused is None:
        assert err is None, f"refused: {err}"
        return
    assert err is not None, f"admitted despite {refused}"
    assert err.limit == refused
    for word in words:
        assert word in str(err)
    if refused == "min_free_disk":
        assert str(tmp_path) in str(err)


# -- max_starts_per_minute: a sequence of starts on a patched clock ---------------------
T0 = 1_000_000.0

# (seconds after T0, owner, refused?) in order; max_starts_per_minute=2
RATE = {
    "starts under the rate are admitted": [(0, "alice", False), (1, "alice", False)],
    "the start over the rate is refused with the wait": [
        (0, "alice", False), (1, "alice", False), (2, "alice", True)],
    "another owner has their own rate": [
        (0, "alice", False), (1, "alice", False), (2, "bob", False), (3, "bob", False)],
    "the window slides: a start 60 s old no longer counts": [
        (0, "alice", False), (1, "alice", False), (60.5, "alice", False)],
    "the window slides: a start 59 s old still counts": [
        (0, "alice", False), (1, "alice", False), (59, "alice", True)],
    "a refused start is not recorded": [
        (0, "alice", False), (30, "alice", False), (31, "alice", True),
        (60.5, "alice", False)],
}


@pytest.mark.parametrize("starts", list(RATE.values()), ids=list(RATE))
def test_max_starts_per_minute(registry, monkeypatch, starts):
    clock = [T0]
    monkeypatch.setattr(admission, "time", types.SimpleNamespace(time=lambda: clock[0]))
    policy = AdmissionPolicy(max_starts_per_minute=2)
    registry.ensure()
    for i, (offset, owner, refused) in enumerate(starts):
        clock[0] = T0 + offset
        try:
            admit(registry, policy, kernel_id=f"k{i}", owner=owner, mem_limit=G)
        except KernelLimitError as err:
            assert refused, f"start {i} at +{offset}s refused: {err}"
            assert err.limit == "max_starts_per_minute"
            assert "max_starts_per_minute=2" in str(err)
            assert f"{owner!r} started 2 kernels" in str(err)
            assert "retry in" in str(err)
        else:
            assert not refused, f"start {i} at +{offset}s admitted over the rate"


def test_refused_start_says_how_long_to_wait(registry, monkeypatch):
    """The wait is until the oldest start in the window leaves it."""
    clock = [T0]
    monkeypatch.setattr(admission, "time", types.SimpleNamespace(time=lambda: clock[0]))
    policy = AdmissionPolicy(max_starts_per_minute=2)
    registry.ensure()
    admit(registry, policy, kernel_id="k1", owner="alice", mem_limit=G)
    clock[0] = T0 + 10
    admit(registry, policy, kernel_id="k2", owner="alice", mem_limit=G)
    clock[0] = T0 + 20
    with pytest.raises(KernelLimitError, match=r"retry in 40 s"):
        admit(registry, policy, kernel_id="k3", owner="alice", mem_limit=G)


# -- entries written by older versions or cut short: never break admission ------------


def test_entry_with_unknown_pid_create_time_does_not_break_admission(registry):
    e = entry("a")
    e["pid_create_time"] = None  # and its pid (ours) is held by a live process
    err = check(registry, [e], AdmissionPolicy(max_kernels=5))
    assert err is None or isinstance(err, KernelLimitError)


def test_entry_with_null_limits_counts_as_the_whole_budget(registry):
    e = entry("a")
    e["limits"] = None
    err = check(registry, [e], AdmissionPolicy(mem_budget=4 * G), mem_limit=1)
    assert err is not None and err.limit == "mem_budget"
