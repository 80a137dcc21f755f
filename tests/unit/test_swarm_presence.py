"""swarm/presence.py: heartbeats in the swarm and which servers' kernels are orphans,
over the in-memory swarm of test_swarm_records (the real swarm: tests/test_swarm.py)."""

from __future__ import annotations

import time

from limited_provisioner.swarm import presence, records

from .test_swarm_records import ME, OTHER, FakeSwarm, kernel, names

GRACE = 300.0


def test_a_server_keeps_one_heartbeat_the_newest():
    swarm = FakeSwarm()
    for _ in range(3):
        presence.beat(swarm.call, ME)
        time.sleep(0.002)  # a new name each time (milliseconds)
    presence.beat(swarm.call, OTHER)
    assert len(presence._beats(swarm.call, ME)) == 1
    assert set(presence.last_beats(swarm.call)) == {ME, OTHER}
    assert abs(presence.last_beats(swarm.call)[ME] - time.time()) < 5


def test_a_kernel_is_an_orphan_once_its_server_is_silent_for_the_grace():
    swarm = FakeSwarm()
    kernel(swarm, "k-other", OTHER, service=True)
    presence.beat(swarm.call, OTHER)
    now = time.time()
    assert presence.find_orphans(swarm.call, orphan_grace=GRACE, now=now + 10) == []
    (orphan,) = presence.find_orphans(swarm.call, orphan_grace=GRACE, now=now + GRACE + 10)
    assert (orphan.kernel_id, orphan.server_id, orphan.owner) == ("k-other", OTHER, "alice")
    assert "no sign of life" in orphan.why and f"orphan_grace {GRACE:g}s" in orphan.why
    # This process's own server is alive whatever the swarm says; grace 0 reaps nothing.
    assert presence.find_orphans(swarm.call, orphan_grace=GRACE, alive={OTHER},
                                 now=now + GRACE + 10) == []
    assert presence.find_orphans(swarm.call, orphan_grace=0, now=now + 10**6) == []


def test_a_server_that_never_beat_is_judged_by_its_records_time():
    swarm = FakeSwarm()
    kernel(swarm, "k-old", OTHER, service=True, made=time.time() - GRACE - 60)
    kernel(swarm, "k-new", ME, service=True)
    assert [o.kernel_id for o in presence.find_orphans(swarm.call, orphan_grace=GRACE)] == [
        "k-old"]


def test_reaping_removes_every_trace_of_the_orphans_and_the_silent_servers_beats():
    swarm = FakeSwarm()
    kernel(swarm, "k-other", OTHER, service=True)
    kernel(swarm, "k-me", ME, service=True)
    presence.beat(swarm.call, OTHER)
    presence.beat(swarm.call, ME)
    later = time.time() + GRACE + 10
    assert presence.reap_swarm(swarm.call, orphan_grace=GRACE, alive={ME}, dry_run=True,
                               now=later)[0].kernel_id == "k-other"
    assert "limited-kernel-k-other" in names(swarm, "service")  # a dry run removes nothing

    done = presence.reap_swarm(swarm.call, orphan_grace=GRACE, alive={ME}, now=later)
    assert [o.kernel_id for o in done] == ["k-other"]
    assert names(swarm, "service") == {"limited-kernel-k-me"}
    assert names(swarm, "secret") == {"secret-k-me"}
    assert records.record_name("k-other") not in names(swarm, "config")
    assert "limited-provisioner.slot.all.r" not in names(swarm, "config")  # k-other's slot
    assert set(presence.last_beats(swarm.call)) == {ME}
