"""The package's own loop (_background.py), the once-only cleanup guard (_tasks.Once) and
the hand-over of a cull to an async manager's loop (manager_loop.py); no kernels."""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
import time

import pytest
from jupyter_client.manager import AsyncKernelManager, KernelManager

from limited_provisioner import _background
from limited_provisioner._tasks import BackgroundTask, Once
from limited_provisioner.docker import LimitedDockerProvisioner
from limited_provisioner.host import LimitedHost
from limited_provisioner.manager_loop import ManagerLoop, is_async_manager
from limited_provisioner.process import LimitedProcessProvisioner

# What jupyter_client (and our server manager) call on a provisioner that touches its
# loop-bound state: each must hop to the package's loop.
HOOKS = ("pre_launch", "launch_kernel", "post_launch", "poll", "wait", "send_signal", "kill",
         "terminate", "cleanup", "shutdown_requested", "detach")
BRIDGING = ("post_launch", "detach")


@pytest.mark.parametrize("cls", [LimitedProcessProvisioner, LimitedDockerProvisioner])
@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_runs_on_the_package_loop(cls, hook):
    method = getattr(cls, hook)
    # These two do a part on the manager's loop (remember it; stop its restarter) and
    # bridge the rest themselves.
    assert getattr(method, "on_package_loop", False) or hook in BRIDGING, (cls, hook)


def test_bridged_runs_on_the_package_loop_from_any_loop():
    async def where():
        return threading.current_thread().name, asyncio.get_running_loop()

    async def caller():
        return await _background.bridged(where())

    name, loop = asyncio.run(caller())
    assert name == "limited-provisioner" and loop is _background.loop()
    _, loop_again = asyncio.run(caller())  # another caller loop, the same one
    assert loop_again is loop


def test_cancelling_the_caller_cancels_the_work_there():
    cancelled = threading.Event()

    async def forever():
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def caller():
        task = asyncio.ensure_future(_background.bridged(forever()))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(caller())
    assert cancelled.wait(5)


def test_background_tasks_refuse_the_callers_loop():
    async def start_here():
        BackgroundTask().start(lambda: asyncio.sleep(0))

    with pytest.raises(RuntimeError, match="package's loop"):
        asyncio.run(start_here())


def _loop_in_child(done) -> None:
    ran = _background.run(asyncio.sleep(0, result="ran")).result(10)
    done.put((ran, _background.loop().is_running()))


def test_a_forked_child_gets_a_loop_of_its_own():
    _background.run(asyncio.sleep(0)).result(5)  # the parent's thread exists
    ctx = multiprocessing.get_context("fork")
    done = ctx.Queue()
    child = ctx.Process(target=_loop_in_child, args=(done,))
    child.start()
    try:
        assert done.get(timeout=20) == ("ran", True)
    finally:
        child.join(10)
        if child.is_alive():
            child.kill()


# -- Once ----------------------------------------------------------------------------------


def test_once_runs_the_step_once_and_later_callers_wait_for_it():
    once, runs, results = Once(), [], []

    async def step():
        runs.append(threading.current_thread().name)
        await asyncio.sleep(0.3)

    def caller():
        started = time.monotonic()
        asyncio.run(once.run(step))
        results.append(time.monotonic() - started)

    threads = [threading.Thread(target=caller) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(runs) == 1 and len(results) == 3
    assert min(results) >= 0.25  # nobody returned before the one run ended
    asyncio.run(once.run(step))
    assert len(runs) == 1
    once.reset()
    asyncio.run(once.run(step))
    assert len(runs) == 2


def test_once_after_a_failure_tries_again():
    once, runs = Once(), []

    async def flaky():
        runs.append(1)
        if len(runs) == 1:
            raise OSError("daemon away")

    with pytest.raises(OSError):
        asyncio.run(once.run(flaky))
    asyncio.run(once.run(flaky))
    assert len(runs) == 2 and once.done


# -- ManagerLoop ---------------------------------------------------------------------------


def test_a_blocking_manager_is_never_handed_a_cull():
    assert not is_async_manager(KernelManager())
    assert is_async_manager(AsyncKernelManager())
    link = ManagerLoop()

    async def start():
        link.remember(KernelManager())

    asyncio.run(start())
    assert not link.reachable
    assert _background.run(link.run(lambda: asyncio.sleep(0))).result(5) is False


def test_an_async_managers_cull_runs_on_its_loop_until_that_loop_ends():
    link, ran_on = ManagerLoop(), []

    async def cull():
        ran_on.append(asyncio.get_running_loop())

    async def manager_side():
        link.remember(AsyncKernelManager())
        assert link.reachable
        # The timer's side: from the package's loop, while this loop keeps running.
        handed = await asyncio.wrap_future(_background.run(link.run(cull)))
        return handed, asyncio.get_running_loop()

    handed, manager_loop = asyncio.run(manager_side())
    assert handed is True and ran_on == [manager_loop]
    # asyncio.run closed that loop: the provisioner must act alone now.
    assert not link.reachable
    assert _background.run(link.run(cull)).result(5) is False
    assert len(ran_on) == 1


def test_a_restart_run_on_the_package_loop_keeps_the_managers_loop():
    link = ManagerLoop()

    async def manager_side():
        link.remember(AsyncKernelManager())
        await asyncio.wrap_future(_background.run(_remember(link)))
        return link.reachable

    assert asyncio.run(manager_side()) is True


async def _remember(link: ManagerLoop) -> None:
    link.remember(AsyncKernelManager())


# -- the reaper ------------------------------------------------------------------------------


def test_the_reaper_runs_on_the_package_loop_started_from_any_thread(tmp_path):
    host = LimitedHost(state_dir=str(tmp_path), reap_interval=60)
    started = threading.Thread(target=host.start_reaper)
    started.start()
    started.join(5)
    reaper = host._reaper
    assert reaper is not None and not reaper.done()
    host.start_reaper()  # one per process
    assert host._reaper is reaper
    host.stop_reaper()
    time.sleep(0.1)
    assert reaper.cancelled()
