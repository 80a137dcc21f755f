"""check_lifecycle: one table row per rule (idle, max_lifetime, exec_timeout, grace).

The kernel's activity is a Traffic driven through its public methods with explicit
``now`` values, as the proxy drives it; no kernel, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from limited_provisioner.lifecycle import check_lifecycle, with_limits_hit

try:  # Traffic may move out of proxy.py
    from limited_provisioner.traffic import Traffic
except ImportError:
    from limited_provisioner.proxy import Traffic

# Far from 0: the functions treat a falsy ``now`` as "use the wall clock".
T0 = 1_000_000.0


def req(msg_type, at, msg_id=""):
    return ("request", msg_type, msg_id, at)


def rep(parent_id, at, msg_type="execute_reply"):
    return ("reply", msg_type, parent_id, at)


def run(msg_id, at):
    return req("execute_request", at, msg_id)


@dataclass
class Case:
    events: list
    now: float
    expect: str  # action
    kind: str = ""
    words: tuple = ()
    idle_timeout: float = 0
    max_lifetime: float = 0
    exec_timeout: float = 0
    exec_timeout_grace: float = 5
    interrupted: str | None = None
    interrupted_at: float | None = None
    created: float = T0


CASES = {
    # -- idle_timeout ----------------------------------------------------------------
    "an idle kernel below idle_timeout is left alone": Case(
        [run("e1", T0), rep("e1", T0 + 1)], now=T0 + 1 + 59, idle_timeout=60, expect="none"
    ),
    "an idle kernel exactly at idle_timeout is not yet culled": Case(
        [run("e1", T0), rep("e1", T0 + 1)], now=T0 + 1 + 60, idle_timeout=60, expect="none"
    ),
    "an idle kernel past idle_timeout is culled": Case(
        [run("e1", T0), rep("e1", T0 + 1)], now=T0 + 1 + 61, idle_timeout=60,
        expect="cull", kind="idle_timeout", words=("idle_timeout=60s", "shut down"),
    ),
    "a kernel never used since it started is culled past idle_timeout": Case(
        [], now=T0 + 61, idle_timeout=60,
        expect="cull", kind="idle_timeout", words=("idle_timeout=60s",),
    ),
    "idle_timeout 0 disables idle culling": Case(
        [run("e1", T0), rep("e1", T0 + 1)], now=T0 + 10**6, idle_timeout=0, expect="none"
    ),
    "a pending execution is never culled as idle": Case(
        [run("e1", T0)], now=T0 + 10**5, idle_timeout=60, expect="none"
    ),
    "an execution queued behind a running one keeps the kernel from idling": Case(
        [run("e1", T0), run("e2", T0 + 1), rep("e1", T0 + 2)], now=T0 + 10**5,
        idle_timeout=60, expect="none",
    ),
    "kernel_info and comm_info requests do not reset the idle clock": Case(
        [run("e1", T0), rep("e1", T0 + 1), req("kernel_info_request", T0 + 50),
         req("comm_info_request", T0 + 55), req("usage_request", T0 + 58)],
        now=T0 + 1 + 61, idle_timeout=60,
        expect="cull", kind="idle_timeout", words=("idle_timeout=60s",),
    ),
    "a kernel_info request does not start an execution either": Case(
        [req("kernel_info_request", T0, "k1")], now=T0 + 61, idle_timeout=60,
        exec_timeout=30, expect="cull", kind="idle_timeout",
    ),
    "any other client request (a completion) resets the idle clock": Case(
        [run("e1", T0), rep("e1", T0 + 1), req("complete_request", T0 + 50)],
        now=T0 + 1 + 61, idle_timeout=60, expect="none",
    ),
    "the reply that ends an execution restarts the idle clock": Case(
        [run("e1", T0), rep("e1", T0 + 100)], now=T0 + 150, idle_timeout=60, expect="none"
    ),
    "a non-execute reply does not move the idle clock": Case(
        [req("complete_request", T0, "c1"), rep("c1", T0 + 50, "complete_reply")],
        now=T0 + 61, idle_timeout=60, expect="cull", kind="idle_timeout",
    ),
    # -- max_lifetime ----------------------------------------------------------------
    "a kernel younger than max_lifetime is left alone": Case(
        [run("e1", T0 + 10)], now=T0 + 3599, max_lifetime=3600, expect="none"
    ),
    "max_lifetime reached while busy culls the kernel": Case(
        [run("e1", T0 + 10)], now=T0 + 3601, max_lifetime=3600,
        expect="cull", kind="max_lifetime", words=("max_lifetime 3600s", "shut down"),
    ),
    "max_lifetime counts from created, not from the last activity": Case(
        [run("e1", T0 + 3500), rep("e1", T0 + 3590)], now=T0 + 3601, max_lifetime=3600,
        idle_timeout=600, expect="cull", kind="max_lifetime",
    ),
    "max_lifetime 0 disables the age cap": Case(
        [], now=T0 + 10**7, max_lifetime=0, expect="none"
    ),
    # -- exec_timeout ----------------------------------------------------------------
    "an execution within exec_timeout runs on": Case(
        [run("e1", T0)], now=T0 + 29, exec_timeout=30, expect="none"
    ),
    "an execution past exec_timeout is interrupted": Case(
        [run("e1", T0)], now=T0 + 31, exec_timeout=30,
        expect="interrupt", kind="exec_timeout", words=("exec_timeout=30s", "interrupted"),
    ),
    "exec_timeout 0 lets an execution run forever": Case(
        [run("e1", T0)], now=T0 + 10**6, exec_timeout=0, expect="none"
    ),
    "a reply ends the execution: no exec_timeout afterwards": Case(
        [run("e1", T0), rep("e1", T0 + 10)], now=T0 + 100, exec_timeout=30, expect="none"
    ),
    "a reply to another request does not end the execution": Case(
        [run("e1", T0), rep("other", T0 + 10)], now=T0 + 31, exec_timeout=30,
        expect="interrupt", kind="exec_timeout",
    ),
    "a non-execute reply to the execution does not end it": Case(
        [run("e1", T0), rep("e1", T0 + 10, "complete_reply")], now=T0 + 31,
        exec_timeout=30, expect="interrupt", kind="exec_timeout",
    ),
    "a queued execution's clock starts at the previous reply, not at its request": Case(
        [run("e1", T0), run("e2", T0 + 1), rep("e1", T0 + 40)], now=T0 + 40 + 29,
        exec_timeout=30, expect="none",
    ),
    "a queued execution past exec_timeout from its start is interrupted": Case(
        [run("e1", T0), run("e2", T0 + 1), rep("e1", T0 + 40)], now=T0 + 40 + 31,
        exec_timeout=30, expect="interrupt", kind="exec_timeout",
    ),
    "the execution already interrupted is given the grace period": Case(
        [run("e1", T0)], now=T0 + 35, exec_timeout=30, exec_timeout_grace=5,
        interrupted="e1", interrupted_at=T0 + 31, expect="none",
    ),
    "the interrupted execution still running past the grace restarts the kernel": Case(
        [run("e1", T0)], now=T0 + 37, exec_timeout=30, exec_timeout_grace=5,
        interrupted="e1", interrupted_at=T0 + 31,
        expect="restart", kind="exec_timeout",
        words=("exec_timeout=30s", "interrupt for 5s", "restarted"),
    ),
    "a different execution after an interrupted one is interrupted again": Case(
        [run("e1", T0), run("e2", T0 + 1), rep("e1", T0 + 33)], now=T0 + 33 + 31,
        exec_timeout=30, exec_timeout_grace=5, interrupted="e1", interrupted_at=T0 + 31,
        expect="interrupt", kind="exec_timeout", words=("exec_timeout=30s", "interrupted"),
    ),
    "a different execution after an interrupted one is not restarted for its grace": Case(
        [run("e1", T0), run("e2", T0 + 1), rep("e1", T0 + 33)], now=T0 + 33 + 10,
        exec_timeout=30, exec_timeout_grace=5, interrupted="e1", interrupted_at=T0 + 31,
        expect="none",
    ),
    # -- precedence ------------------------------------------------------------------
    "max_lifetime comes before exec_timeout": Case(
        [run("e1", T0)], now=T0 + 3601, max_lifetime=3600, exec_timeout=30,
        expect="cull", kind="max_lifetime", words=("max_lifetime 3600s",),
    ),
    "max_lifetime comes before a due restart": Case(
        [run("e1", T0)], now=T0 + 3601, max_lifetime=3600, exec_timeout=30,
        interrupted="e1", interrupted_at=T0 + 31, expect="cull", kind="max_lifetime",
    ),
    "max_lifetime comes before idle_timeout": Case(
        [], now=T0 + 3601, max_lifetime=3600, idle_timeout=60,
        expect="cull", kind="max_lifetime",
    ),
    "exec_timeout is checked while idle_timeout is also set": Case(
        [run("e1", T0)], now=T0 + 100, exec_timeout=30, idle_timeout=60,
        expect="interrupt", kind="exec_timeout",
    ),
}


def replay(events) -> Traffic:
    traffic = Traffic(last_activity=T0)
    for what, msg_type, msg_id, at in events:
        if what == "request":
            traffic.request(msg_type, {"msg_id": msg_id, "session": "s", "msg_type": msg_type},
                            now=at)
        else:
            traffic.reply(msg_type, msg_id, now=at)
    return traffic


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_check_lifecycle(case: Case):
    verdict = check_lifecycle(
        replay(case.events),
        created=case.created,
        idle_timeout=case.idle_timeout,
        max_lifetime=case.max_lifetime,
        exec_timeout=case.exec_timeout,
        exec_timeout_grace=case.exec_timeout_grace,
        interrupted=case.interrupted,
        interrupted_at=case.interrupted_at,
        now=case.now,
    )
    assert (verdict.action, verdict.kind) == (case.expect, case.kind), verdict.reason
    for word in case.words:
        assert word in verdict.reason
    if case.expect == "none":
        assert verdict.reason == ""


def trip(kind, at, reason=None):
    return {"kind": kind, "reason": reason or f"{kind} hit at {at}", "time": at}


def test_a_restart_for_exec_timeout_names_the_limits_hit_while_the_execution_ran():
    reason = "execution exceeded exec_timeout=3s and ignored the interrupt for 3s"
    trips = [
        trip("pids_limit", T0 - 10, "pids limit 64 reached (3 forks refused)"),  # before
        trip("pids_limit", T0 + 1, "pids limit 64 reached (51 forks refused)"),
        trip("mem_limit", T0 + 2, "memory limit 256M exceeded"),
        trip("pids_limit", T0 + 3, "pids limit 64 reached (80 forks refused)"),
        trip("exec_timeout", T0 + 3, "execution exceeded exec_timeout=3s and was interrupted"),
    ]
    assert with_limits_hit(reason, trips, since=T0) == (
        f"{reason}; while it ran: pids limit 64 reached (80 forks refused); "
        "memory limit 256M exceeded"
    )


@pytest.mark.parametrize("since", [None, T0 + 100])
def test_a_restart_with_no_other_limit_hit_keeps_its_reason(since):
    reason = "execution exceeded exec_timeout=3s and ignored the interrupt for 3s"
    trips = [trip("pids_limit", T0), trip("exec_timeout", T0 + 101)]
    assert with_limits_hit(reason, trips, since=since) == reason
