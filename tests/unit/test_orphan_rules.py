"""find_orphans(): which registry entries the reaper removes, one table row per rule.

A "live" server or kernel is this test process (its pid and create time), a "gone" one a
pid that cannot exist, a "reused" one this pid with another create time. ``now`` is
passed explicitly: nothing sleeps.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from limited_provisioner.reaper import find_orphans, note_orphaned
from limited_provisioner.registry import Registry, process_identity

NOW = 1_700_000_000.0


def impossible_pid() -> int:
    """A pid no process can have: pids are below pid_max."""
    try:
        return int(Path("/proc/sys/kernel/pid_max").read_text())
    except OSError:
        return 4194304


def pid_fields(kind: str, prefix: str) -> dict:
    me = os.getpid()
    if kind == "live":
        return {f"{prefix}pid": me, f"{prefix}pid_create_time": process_identity(me)}
    if kind == "reused":
        return {f"{prefix}pid": me, f"{prefix}pid_create_time": process_identity(me) - 1000}
    if kind == "gone":
        return {f"{prefix}pid": impossible_pid(), f"{prefix}pid_create_time": 12345.0}
    if kind == "none":
        return {f"{prefix}pid": None}
    raise AssertionError(kind)


def entry(kernel_id="k1", *, server="gone", kernel="live", state="running",
          idle_timeout=None, idle=0.0, age=100.0, max_lifetime=0, server_id="srv-a",
          last_activity=True, orphaned=None):
    e = {
        "kernel_id": kernel_id,
        "backend": "process",
        "owner": "alice",
        "server_id": server_id,
        "state": state,
        "created": NOW - age,
        "limits": {"mem_limit": 1024**3, "idle_timeout": idle_timeout},
        "max_lifetime": max_lifetime,
        **pid_fields(server, "server_"),
        **pid_fields(kernel, ""),
    }
    if last_activity:
        e["last_activity"] = NOW - idle
    if orphaned is not None:
        e["orphaned_at"] = NOW - orphaned
    return e


# entry, reaped?, words in Orphan.why
ROWS = {
    # -- live server: never -----------------------------------------------------------
    "a live server's dead kernel is never reaped": (
        entry(server="live", kernel="gone"), False, ()),
    "a live server's kernel still starting is never reaped": (
        entry(server="live", kernel="none", state="starting", age=10**4), False, ()),
    "a live server's kernel past idle_timeout is never reaped": (
        entry(server="live", idle_timeout=600, idle=10**5), False, ()),
    "a live server's kernel past max_lifetime is never reaped": (
        entry(server="live", max_lifetime=3600, age=10**5), False, ()),
    # -- dead server, dead kernel -----------------------------------------------------
    "a gone server's dead kernel is reaped": (
        entry(server="gone", kernel="gone"), True, ("server gone", "kernel dead")),
    "a server whose pid was reused counts as gone": (
        entry(server="reused", kernel="gone"), True, ("server gone", "kernel dead")),
    "an entry without a server pid counts as server gone": (
        entry(server="none", kernel="gone"), True, ("kernel dead",)),
    "a kernel whose pid was reused counts as dead": (
        entry(server="gone", kernel="reused"), True, ("kernel dead",)),
    "a kernel entry without a pid counts as dead": (
        entry(server="gone", kernel="none"), True, ("kernel dead",)),
    # -- dead server, start in progress -----------------------------------------------
    "a gone server's kernel left starting is reaped": (
        entry(server="gone", kernel="none", state="starting", age=5), True,
        ("server gone", "starting")),
    "a gone server's kernel left starting is reaped even if its process lives": (
        entry(server="gone", kernel="live", state="starting", age=5), True, ("starting",)),
    # -- dead server, live kernel: kept for adoption until its clocks run out -----------
    "a gone server's live kernel within idle_timeout is kept": (
        entry(server="gone", kernel="live", idle_timeout=600, idle=599), False, ()),
    "a gone server's live kernel past idle_timeout is reaped": (
        entry(server="gone", kernel="live", idle_timeout=600, idle=700), True,
        ("server gone", "idle 700s > 600s")),
    "idle is measured from created when no activity was recorded": (
        entry(server="gone", kernel="live", idle_timeout=600, age=700, last_activity=False),
        True, ("idle 700s > 600s",)),
    "a gone server's live kernel without idle_timeout is kept however idle": (
        entry(server="gone", kernel="live", idle_timeout=None, idle=10**6, age=10**6),
        False, ()),
    "a gone server's live kernel younger than max_lifetime is kept": (
        entry(server="gone", kernel="live", max_lifetime=3600, age=3599), False, ()),
    "a gone server's live kernel past max_lifetime is reaped even if active": (
        entry(server="gone", kernel="live", max_lifetime=3600, age=3601, idle=1,
              idle_timeout=600), True, ("older than max_lifetime 3600s",)),
    "a gone server's live kernel first seen orphaned within orphan_grace is kept": (
        entry(server="gone", kernel="live", idle_timeout=3600, orphaned=299), False, ()),
    "a gone server's live kernel nobody adopted within orphan_grace is reaped": (
        entry(server="gone", kernel="live", idle_timeout=3600, orphaned=301), True,
        ("nobody adopted", "orphan_grace 300s")),
    "a live server's kernel is never reaped, whatever orphaned_at says": (
        entry(server="live", kernel="live", orphaned=10**6), False, ()),
    # -- the warm pool: nobody's kernels, nobody adopts them ------------------------------
    "a live server's pooled kernel is never reaped": (
        entry(server="live", kernel="live", state="pooled"), False, ()),
    "a gone server's pooled kernel is drained at once": (
        entry(server="gone", kernel="live", state="pooled", idle_timeout=3600), True,
        ("server gone", "pooled kernel drained")),
}


@pytest.fixture
def registry(tmp_path):
    return Registry(tmp_path / "state")


@pytest.mark.parametrize("e, reaped, words", list(ROWS.values()), ids=list(ROWS))
def test_find_orphans(registry, e, reaped, words):
    registry.write(e["kernel_id"], e)
    found = find_orphans(registry, server_id="srv-a", now=NOW)
    if not reaped:
        assert found == [], found
        return
    assert len(found) == 1, found
    orphan = found[0]
    assert (orphan.kernel_id, orphan.backend, orphan.server_id, orphan.owner) == (
        "k1", "process", "srv-a", "alice")
    for word in words:
        assert word in orphan.why


# -- which servers' entries are looked at -----------------------------------------------
SCOPES = {
    "server_id alone reaps only that server's orphans": (
        {"server_id": "srv-a"}, {"ka"}),
    "another server_id reaps only that one's": (
        {"server_id": "srv-b"}, {"kb"}),
    "all_servers reaps every server's orphans, whatever server_id": (
        {"server_id": "srv-a", "all_servers": True}, {"ka", "kb"}),
    "no server_id looks at every entry": (
        {}, {"ka", "kb"}),
    "an unknown server_id reaps nothing": (
        {"server_id": "srv-x"}, set()),
}


@pytest.mark.parametrize("kwargs, expected", list(SCOPES.values()), ids=list(SCOPES))
def test_find_orphans_scope(registry, kwargs, expected):
    for kid, sid in (("ka", "srv-a"), ("kb", "srv-b")):
        registry.write(kid, entry(kid, server="gone", kernel="gone", server_id=sid))
    # A live server's entry is never in the answer, whatever the scope.
    registry.write("kc", entry("kc", server="live", kernel="gone", server_id="srv-a"))
    found = find_orphans(registry, now=NOW, **kwargs)
    assert {o.kernel_id for o in found} == expected


def test_empty_registry_has_no_orphans(registry):
    assert find_orphans(registry, all_servers=True, now=NOW) == []


def test_entry_with_unknown_pid_create_time_does_not_break_the_reaper(registry):
    e = entry(server="gone", kernel="live")
    e["pid_create_time"] = None
    registry.write(e["kernel_id"], e)
    # The server is gone and the pid is held by a live process: kept until idle.
    assert find_orphans(registry, all_servers=True, now=NOW) == []


def test_orphan_grace_zero_keeps_a_live_orphan_until_its_idle_clock(registry):
    registry.write("k1", entry(server="gone", kernel="live", idle_timeout=3600,
                               orphaned=10**6))
    assert find_orphans(registry, all_servers=True, now=NOW, orphan_grace=0) == []


def test_note_orphaned_stamps_once_and_only_running_kernels_of_gone_servers(registry):
    registry.write("gone", entry("gone", server="gone", kernel="live"))
    registry.write("live", entry("live", server="live", kernel="live"))
    registry.write("starting", entry("starting", server="gone", state="starting"))
    assert note_orphaned(registry, all_servers=True, now=NOW) == ["gone"]
    assert registry.read("gone")["orphaned_at"] == NOW
    assert "orphaned_at" not in registry.read("live")
    # Counted from the first sighting, not pushed back by later rounds.
    assert note_orphaned(registry, all_servers=True, now=NOW + 50) == []
    assert registry.read("gone")["orphaned_at"] == NOW
