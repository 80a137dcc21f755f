"""Limited kernels under jupyter_client's *blocking* managers (scripts, agent frameworks).

A blocking ``KernelManager`` runs each call through ``run_sync`` on a loop that is idle
between calls (or on a runner thread when the caller has a loop): the kernel's proxy,
timers and watchdog run on the package's own loop instead, so an idle kernel is culled
and every trace removed while the caller sleeps with no loop at all, and a shutdown or
an auto-restart from another loop works. Also: a forked child starts kernels of its own.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from jupyter_client.ioloop import IOLoopKernelManager
from jupyter_client.manager import KernelManager
from jupyter_client.multikernelmanager import MultiKernelManager
from traitlets.config import Config

from limited_provisioner.registry import Registry

from .conftest import TEST_OWNER, backends
from .harness import (
    alive,
    kernel_cgroups,
    kernel_leftovers,
    kernel_pids,
    kernel_processes,
    kill_kernel_leftovers,
    remove_all_kernels,
    write_kernelspec,
)

SMALL = {"mem_limit": "256M", "pids_limit": 64, "nofile_limit": 256, "disk_limit": "64M",
         "owner": TEST_OWNER}
NOTHING = {"registry entries": 0, "kernel dirs": 0, "cgroups": 0, "processes": 0,
           "containers": 0}


@pytest.fixture
def state_dir(monkeypatch):
    """A registry of our own (short path for ipc sockets; not under a private tmpfs)."""
    path = Path(tempfile.mkdtemp(prefix="lp-", dir="/var/lib"))
    monkeypatch.setenv("LIMITED_PROVISIONER_STATE_DIR", str(path))
    yield path
    remove_all_kernels(path)
    shutil.rmtree(path, ignore_errors=True)


@contextmanager
def managed(km):
    """Whatever the test did, the kernel of ``km`` and its whole tree end with it."""
    pids: set[int] = set()
    try:
        yield pids
    finally:
        kernel_id = km.kernel_id
        try:
            if km.has_kernel:
                km.shutdown_kernel(now=True)
        finally:
            if kernel_id:
                kill_kernel_leftovers(kernel_id, alive(pids))


def answer(km, code: str = "print(6 * 7)") -> str:
    kc = km.client()
    kc.start_channels()
    out: list[str] = []
    try:
        kc.wait_for_ready(timeout=60)
        reply = kc.execute_interactive(
            code, timeout=60, output_hook=lambda m: out.append(m["content"].get("text", ""))
        )
        assert reply["content"]["status"] == "ok", reply["content"]
    finally:
        kc.stop_channels()
    return "".join(out)


def gone_within(state_dir: Path, kernel_id: str, pids: set[int], seconds: float) -> float:
    """Sleep (no loop running) until nothing of the kernel is left; the seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        if kernel_leftovers(state_dir, [kernel_id]) == NOTHING and not alive(pids):
            return time.monotonic() - started
        time.sleep(0.2)
    return float("inf")


# -- idle cull with nobody calling into the manager ------------------------------------


@pytest.mark.parametrize("backend", backends(), indirect=True)
def test_idle_kernel_of_a_sleeping_script_is_culled_and_removed(
    backend, state_dir, jupyter_path, docker_cleanup
):
    write_kernelspec(jupyter_path, "idle", {**SMALL, "idle_timeout": 3}, backend)
    km = KernelManager(kernel_name="idle")
    with managed(km) as pids:
        km.start_kernel()
        assert answer(km).strip() == "42"
        pids |= kernel_pids(km)
        assert pids, "no process of the kernel's tree found"
        last_request = time.monotonic()
        with pytest.raises(RuntimeError):
            asyncio.get_running_loop()  # the script really runs no loop while it sleeps

        took = gone_within(state_dir, km.kernel_id, pids, 10)
        print(f"\nidle_timeout=3 ({backend}): everything gone "
              f"{time.monotonic() - last_request:.1f}s after the last request")
        assert took < 10, kernel_leftovers(state_dir, [km.kernel_id])
        assert alive(pids) == []
        assert not (state_dir / "clients" / km.kernel_id).exists()
        if "docker" in backend:
            assert docker_cleanup(km.kernel_id) == []
        assert "idle_timeout=3s" in (km.provisioner.exit_reason or "")

        # The script's next calls find a dead kernel, nothing to clean twice.
        assert not km.is_alive()
        kc = km.client()
        kc.start_channels()
        try:
            with pytest.raises(RuntimeError, match="died"):
                kc.wait_for_ready(timeout=10)
        finally:
            kc.stop_channels()
        km.shutdown_kernel()
        km.shutdown_kernel(now=True)
        assert kernel_leftovers(state_dir, [km.kernel_id]) == NOTHING


def test_an_ignored_exec_timeout_restarts_the_kernel_of_a_blocking_manager(
    state_dir, jupyter_path
):
    """The restart a timer decides runs on the package's loop through the coroutine
    behind the blocking manager's restart_kernel (which would block that loop)."""
    write_kernelspec(jupyter_path, "lim", {**SMALL, "exec_timeout": 2, "exec_timeout_grace": 2})
    km = KernelManager(kernel_name="lim")
    with managed(km) as pids:
        km.start_kernel()
        pids |= kernel_pids(km)
        old_pid = km.provisioner.pid
        kc = km.client()
        kc.start_channels()
        try:
            kc.wait_for_ready(timeout=60)
            kc.execute("import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
                       "time.sleep(60)")
            for _ in range(100):
                time.sleep(0.2)
                if km.provisioner.pid not in (None, old_pid) and km.is_alive():
                    break
            assert km.provisioner.pid != old_pid, "the kernel was not restarted"
            assert any("ignored the interrupt" in trip["reason"]
                       for trip in km.provisioner.limit_trips)
            pids |= kernel_pids(km)
            assert alive({old_pid}) == []
        finally:
            kc.stop_channels()
        assert answer(km).strip() == "42"
        km.shutdown_kernel()
        assert gone_within(state_dir, km.kernel_id, pids, 10) < 10


# -- calls from other loops and threads ---------------------------------------------------


def test_shutdown_from_another_loop_and_thread(state_dir, jupyter_path):
    """Start on this thread's run_sync loop, use it from a thread, stop it from inside a
    running loop (run_sync's runner thread): jupyter_client then used to fail with
    "attached to a different loop" and leave the kernel running."""
    write_kernelspec(jupyter_path, "lim", SMALL)
    km = KernelManager(kernel_name="lim")
    with managed(km) as pids:
        km.start_kernel()
        pids |= kernel_pids(km)
        result: list[str] = []
        worker = threading.Thread(target=lambda: result.append(answer(km)))
        worker.start()
        worker.join(90)
        assert result and result[0].strip() == "42"

        async def stop_inside_a_loop():
            km.shutdown_kernel()

        asyncio.run(stop_inside_a_loop())
        assert not km.has_kernel
        assert gone_within(state_dir, km.kernel_id, pids, 10) < 10


def test_blocking_multikernelmanager_starts_and_stops(state_dir, jupyter_path):
    write_kernelspec(jupyter_path, "lim", SMALL)
    mkm = MultiKernelManager()
    kernel_id = mkm.start_kernel(kernel_name="lim")
    km = mkm.get_kernel(kernel_id)
    with managed(km) as pids:
        pids |= kernel_pids(km)
        assert answer(km).strip() == "42"
        stopper = threading.Thread(target=mkm.shutdown_kernel, args=(kernel_id,))
        stopper.start()
        stopper.join(60)
        assert kernel_id not in mkm.list_kernel_ids()
        assert gone_within(state_dir, kernel_id, pids, 10) < 10


async def test_blocking_restarter_brings_a_killed_kernel_back(state_dir, jupyter_path):
    """jupyter_client's own test_restart_check, on a limited kernel: an IOLoopKernelManager
    in a running loop polls and restarts through run_sync's runner thread."""
    write_kernelspec(jupyter_path, "lim", SMALL)
    config = Config({"KernelRestarter": {"time_to_dead": 0.5}})
    km = IOLoopKernelManager(kernel_name="lim", config=config)
    restarts: list[float] = []
    with managed(km) as pids:
        km.start_kernel()
        km.add_restart_callback(lambda: restarts.append(time.time()), "restart")
        loop = asyncio.get_running_loop()
        for round_ in range(2):
            pids |= kernel_pids(km)
            assert (await loop.run_in_executor(None, answer, km)).strip() == "42"
            old_pid = km.provisioner.pid
            await km.provisioner.kill()  # a crash: no cleanup, the restarter notices
            for _ in range(200):
                if len(restarts) > round_ and km.is_alive() and km.provisioner.pid != old_pid:
                    break
                await asyncio.sleep(0.1)
            assert len(restarts) == round_ + 1, "the restarter did not restart the kernel"
        pids |= kernel_pids(km)
        assert (await loop.run_in_executor(None, answer, km)).strip() == "42"
        km.shutdown_kernel(now=True)
        assert gone_within(state_dir, km.kernel_id, pids, 10) < 10


# -- fork ----------------------------------------------------------------------------------


def _child_starts_and_stops(state_dir: str, done) -> None:
    km = KernelManager(kernel_name="lim")
    try:
        km.start_kernel()
        out = answer(km)
        pids = kernel_pids(km)
        km.shutdown_kernel()
        # Its own kernel's traces only: the parent's kernel shares the state dir.
        kid, registry = km.kernel_id, Registry(state_dir)
        left = {
            "registry entry": registry.read(kid) is not None,
            "kernel dir": (registry.kernels_dir / kid).exists(),
            "cgroups": kernel_cgroups([kid]),
            "processes": sorted(kernel_processes([kid]) | set(alive(pids))),
        }
        done.put((out.strip(), left))
    except BaseException as e:  # noqa: BLE001 -- the parent reports whatever it was
        done.put(repr(e))
        if km.has_kernel:
            km.shutdown_kernel(now=True)


def test_a_forked_child_starts_kernels_of_its_own(state_dir, jupyter_path):
    """The parent's package loop (with a kernel on it) does not exist in a fork: the
    child must make its own, or it hangs (nbclient's ProcessPoolExecutor does this)."""
    write_kernelspec(jupyter_path, "lim", SMALL)
    km = KernelManager(kernel_name="lim")
    with managed(km):
        km.start_kernel()
        assert answer(km).strip() == "42"
        ctx = multiprocessing.get_context("fork")
        done = ctx.Queue()
        child = ctx.Process(target=_child_starts_and_stops, args=(str(state_dir), done))
        child.start()
        try:
            result = done.get(timeout=120)
            child.join(30)
        finally:
            if child.is_alive():
                child.kill()
        assert result == (
            "42", {"registry entry": False, "kernel dir": False, "cgroups": 0, "processes": []}
        ), result
        assert child.exitcode == 0
        assert answer(km).strip() == "42"  # the parent's kernel still answers
