"""A shutdown that overlaps a restart (an exec_timeout restart while the server deletes the
kernel, a test's teardown): whatever the order, nothing of the kernel survives and no
new kernel is started for nobody."""

from __future__ import annotations

import asyncio

import pytest

from limited_provisioner.errors import KernelEndedError

from .conftest import NOTHING_LEFT, TEST_OWNER, backends
from .harness import kernel_leftovers

LIMITS = {"mem_limit": "256M", "pids_limit": 64, "owner": TEST_OWNER}


def _pause(prov, name: str) -> tuple[asyncio.Event, asyncio.Event]:
    """Hold the provisioner's next ``name`` call until ``go`` is set; ``reached`` says
    the restart got there."""
    reached, go = asyncio.Event(), asyncio.Event()
    original = getattr(prov, name)

    async def held(*args, **kwargs):
        reached.set()
        await go.wait()
        return await original(*args, **kwargs)

    setattr(prov, name, held)
    return reached, go


async def _settle(task: asyncio.Future, what: str) -> None:
    """The restart may fail (KernelEndedError: its kernel was shut down under it); what it
    must not do is leave a kernel running. Either may also hit jupyter_client's own race:
    both calls settle the manager's one ``ready`` future (InvalidStateError) -- the
    reason jupyter_server's manager (server/manager.py) waits for a start before a
    shutdown. Anything else is a failure."""
    try:
        await asyncio.wait_for(task, 120)
    except (KernelEndedError, asyncio.InvalidStateError):
        pass
    except Exception as e:
        raise AssertionError(f"the {what} failed: {e!r}") from e


@pytest.mark.parametrize("backend", backends(), indirect=True)
@pytest.mark.parametrize("paused_at", ["pre_launch", "launch_kernel"])
async def test_a_shutdown_during_a_restart_leaves_nothing(
    backend, paused_at, start_kernel, own_state, docker_cleanup
):
    """``pre_launch``: the shutdown ends the kernel between the restart's stop and its
    start (the restart then finds its kernel ended and starts nothing). ``launch_kernel``:
    the shutdown arrives while the restart is admitted and about to launch (it waits for
    that start, then stops what it started)."""
    km, kc = await start_kernel(LIMITS, provisioner=backend)
    kc.stop_channels()
    prov = km.provisioner
    kernel_id = km.kernel_id
    reached, go = _pause(prov, paused_at)
    restart = asyncio.ensure_future(km.restart_kernel(now=True))
    await asyncio.wait_for(reached.wait(), 60)

    shutdown = asyncio.ensure_future(km.shutdown_kernel(now=True))
    if paused_at == "pre_launch":
        # The whole shutdown runs while the restart is between its two halves.
        await _settle(shutdown, "shutdown")
        go.set()
    else:
        # The shutdown must wait for the start it overlaps, not remove its dir under it.
        await asyncio.sleep(1.0)
        assert not shutdown.done(), "the shutdown did not wait for the start in progress"
        go.set()
        await _settle(shutdown, "shutdown")
    await _settle(restart, "restart")

    assert prov.ended
    assert not prov.has_process, "the provisioner still holds a kernel"
    leftovers = await asyncio.to_thread(kernel_leftovers, own_state, [kernel_id])
    assert leftovers == NOTHING_LEFT, leftovers
    if "docker" in backend:
        assert docker_cleanup(kernel_id) == []
