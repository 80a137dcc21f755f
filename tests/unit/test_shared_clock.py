"""The shared clock of every kernel's periodic checks (ticker.py), the lifecycle timer and
the watchdog on it, and an adopted process's pidfd; no kernels."""

from __future__ import annotations

import asyncio
import os
import resource
import subprocess
import time

import pytest

from limited_provisioner import _background, ticker
from limited_provisioner.lifecycle import LifecycleTimer
from limited_provisioner.limits import Limits
from limited_provisioner.process.adopted import AdoptedProcess
from limited_provisioner.registry import process_identity
from limited_provisioner.traffic import Traffic
from limited_provisioner.watchdog import Watchdog


def on_package_loop(coro):
    return _background.run(coro).result(timeout=30)


def test_jobs_of_one_interval_share_one_task_and_a_failing_job_stops_no_other():
    calls: list[str] = []

    def failing() -> None:
        calls.append("failing")
        raise RuntimeError("one bad kernel")

    async def scenario():
        before = len(asyncio.all_tasks())
        stops = [ticker.every(0.05, lambda i=i: calls.append(str(i))) for i in range(50)]
        stops.append(ticker.every(0.05, failing))
        tasks = len(asyncio.all_tasks()) - before
        await asyncio.sleep(0.18)
        for stop in stops:
            stop()
        await asyncio.sleep(0.1)
        return tasks, ticker.jobs()

    tasks, left = on_package_loop(scenario())
    assert tasks == 1
    assert left == 0
    # Three rounds or so, every job each time, the one after the failing job too.
    assert calls.count("49") >= 2 and calls.count("failing") == calls.count("0")


def test_every_outside_the_package_loop_is_refused():
    async def elsewhere():
        try:
            ticker.every(1, lambda: None)
        except RuntimeError as e:
            return str(e)
        return ""

    assert "package's loop" in asyncio.run(elsewhere())


def timer(traffic: Traffic, stopped: list, **limits) -> LifecycleTimer:
    async def persist(_: float) -> None:
        pass

    async def interrupt(*_: object) -> None:
        pass

    async def stop(verdict) -> None:
        stopped.append(verdict)

    return LifecycleTimer(
        kernel_id="k", limits=Limits(**limits), traffic=traffic, created=time.time(),
        max_lifetime=0, exec_timeout_grace=1, interval=0.05, interrupt=interrupt,
        stop=stop, persist=persist, log=__import__("logging").getLogger("t"),
    )


def test_an_idle_kernels_timer_rounds_start_no_task_and_a_cull_comes_once():
    stopped: list = []
    traffic = Traffic(last_activity=time.time())
    lifecycle = timer(traffic, stopped, idle_timeout=0.3)

    async def scenario():
        lifecycle.start()
        await asyncio.sleep(0.1)
        quiet = lifecycle._step is None  # nothing due (the clock is saved): no task
        await asyncio.sleep(0.4)
        return quiet

    assert on_package_loop(scenario())
    assert [v.kind for v in stopped] == ["idle_timeout"]
    assert ticker.jobs() == 0  # it left the clock when it culled


def watchdog(events: list, busy: bool, **kwargs) -> Watchdog:
    async def on_trip(kind: str, reason: str) -> None:
        events.append(("trip", kind))

    return Watchdog(
        kernel_id="k", get_pids=list, on_trip=on_trip,
        check_events=lambda: events.append("events"), interval=0.02,
        events_idle_interval=0.2, busy=lambda: busy, **kwargs,
    )


def test_an_idle_kernels_events_wait_a_busy_ones_do_not():
    idle_events: list = []
    busy_events: list = []
    idle, busy = watchdog(idle_events, busy=False), watchdog(busy_events, busy=True)

    async def scenario():
        idle.start()
        busy.start()
        await asyncio.sleep(0.5)
        await idle.stop()
        await busy.stop()
        return idle._step, busy._step

    steps = on_package_loop(scenario())
    assert steps == (None, None)  # nothing to measure in a thread: no task either
    assert 2 <= len(idle_events) <= 4
    assert len(busy_events) >= 10


def test_memory_past_the_limit_still_trips_at_the_watchdog_interval():
    events: list = []
    dog = watchdog(events, busy=False, mem_limit=1)
    dog.get_pids = lambda: [os.getpid()]

    async def scenario():
        dog.start()
        await asyncio.sleep(0.3)

    on_package_loop(scenario())
    assert ("trip", "mem_limit") in events and dog.tripped
    assert ticker.jobs() == 0


def test_an_adopted_process_is_polled_through_a_pidfd_even_past_fd_1024():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 1100
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {wanted}: fds past 1024 not possible")
    # A soft limit of 1024 (a VM's, systemd's default) would stop the fillers short.
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    fillers: list[int] = []
    proc = None
    try:
        for _ in range(1030):
            fillers.append(os.open(os.devnull, os.O_RDONLY))
        proc = subprocess.Popen(["sleep", "30"])
        adopted = AdoptedProcess(proc.pid, process_identity(proc.pid))
        assert adopted.poll() is None
        assert adopted._pidfd is not None and adopted._pidfd > 1024
        assert adopted.poll() is None
        proc.kill()
        proc.wait()
        assert adopted.poll() == -1 and adopted._pidfd is None
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_an_adopted_pid_reused_by_another_process_reads_as_exited():
    proc = subprocess.Popen(["sleep", "30"])
    try:
        assert AdoptedProcess(proc.pid, process_identity(proc.pid) - 100).poll() == -1
    finally:
        proc.kill()
        proc.wait()
