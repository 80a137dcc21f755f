"""Lifecycle policy on real kernels: caps, idle culling, exec timeouts, the reaper."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from jupyter_client.manager import AsyncKernelManager

from limited_provisioner import KernelLimitError
from limited_provisioner.process.cgroups import kernel_group_dirs
from limited_provisioner.registry import Registry
from limited_provisioner.traffic import Traffic

from .conftest import backends, run
from .harness import (
    JUPYTER_CONFIG,
    KERNEL_IMAGE,
    TOKEN,
    JupyterServer,
    alive,
    kill_kernel_leftovers,
    write_kernelspec,
)

SMALL = {"mem_limit": "256M", "pids_limit": 64, "nofile_limit": 256, "disk_limit": "64M"}
PROCESS = "limited-process-provisioner"
DOCKER = "limited-docker-provisioner"


@pytest.fixture
def state_dir(monkeypatch):
    """A registry of our own, so caps count only this test's kernels (short path: ipc)."""
    path = tempfile.mkdtemp(prefix="lp-", dir="/var/lib")
    monkeypatch.setenv("LIMITED_PROVISIONER_STATE_DIR", path)
    yield Path(path)
    for entry in Registry(path).entries():
        kill_kernel_leftovers(entry["kernel_id"], {entry["pid"]} if entry.get("pid") else set())
    shutil.rmtree(path, ignore_errors=True)


async def test_twenty_concurrent_starts_against_max_kernels_5(jupyter_path, state_dir):
    write_kernelspec(jupyter_path, "capped", {**SMALL, "max_kernels": 5}, PROCESS)
    kms = [AsyncKernelManager(kernel_name="capped") for _ in range(20)]
    try:
        results = await asyncio.gather(*(km.start_kernel() for km in kms), return_exceptions=True)
        refused = [r for r in results if isinstance(r, KernelLimitError)]
        others = [r for r in results if isinstance(r, BaseException) and r not in refused]
        assert others == []
        started = [km for km, r in zip(kms, results) if not isinstance(r, BaseException)]
        assert len(started) == 5 and len(refused) == 15
        assert all("max_kernels=5 reached: 5 limited kernels" in str(e) for e in refused)
        registry = Registry(state_dir)
        assert len(registry.entries()) == 5  # refused starts left nothing behind
        assert len(list(registry.kernels_dir.iterdir())) == 5
        await started[0].shutdown_kernel(now=True)
        again = AsyncKernelManager(kernel_name="capped")
        kms.append(again)
        await again.start_kernel()
        assert await again.is_alive()
    finally:
        for km in kms:
            if km.has_kernel:
                await km.shutdown_kernel(now=True)


async def test_per_user_cap_with_two_owners(jupyter_path, state_dir):
    for owner in ("alice", "bob"):
        write_kernelspec(
            jupyter_path, owner, {**SMALL, "owner": owner, "max_kernels_per_user": 2}, PROCESS
        )
    kms = []
    try:
        for owner in ("alice", "alice", "bob", "bob"):
            km = AsyncKernelManager(kernel_name=owner)
            kms.append(km)
            await km.start_kernel()
        refused = AsyncKernelManager(kernel_name="alice")
        with pytest.raises(KernelLimitError, match="'alice' already runs 2 kernels"):
            await refused.start_kernel()
    finally:
        for km in kms:
            if km.has_kernel:
                await km.shutdown_kernel(now=True)


AGENT = r"""
import asyncio, sys
from jupyter_client.manager import AsyncKernelManager
async def main(n):
    kms = []
    for _ in range(n):
        km = AsyncKernelManager(kernel_name=sys.argv[2]); await km.start_kernel(); kms.append(km)
    print("started", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    for km in kms:
        await km.shutdown_kernel(now=True)
asyncio.run(main(int(sys.argv[1])))
"""


def start_agent(n: int, kernel_name: str) -> subprocess.Popen:
    """Another process using this package: starts n kernels, holds them until stdin closes."""
    proc = subprocess.Popen(
        [sys.executable, "-c", AGENT, str(n), kernel_name],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    line = proc.stdout.readline()
    assert line.strip() == "started", line
    return proc


async def test_two_processes_share_the_host_wide_cap(jupyter_path, state_dir):
    write_kernelspec(jupyter_path, "capped", {**SMALL, "max_kernels": 3}, PROCESS)
    agent = await asyncio.to_thread(start_agent, 3, "capped")
    try:
        km = AsyncKernelManager(kernel_name="capped")
        with pytest.raises(KernelLimitError, match="max_kernels=3 reached: 3 limited"):
            await km.start_kernel()
    finally:
        agent.stdin.close()
        agent.wait(timeout=60)
    assert Registry(state_dir).entries() == []


@pytest.mark.parametrize("backend", backends(), indirect=True)
async def test_idle_kernel_is_culled_busy_one_is_not(backend, start_kernel, docker_cleanup):
    config = {**SMALL, "idle_timeout": 3, "owner": "lp-pytest"}
    idle_km, idle_kc = await start_kernel(config, provisioner=backend)
    busy_km, busy_kc = await start_kernel(config, provisioner=backend)
    await run(idle_kc, "x = 1")
    busy = asyncio.ensure_future(run(busy_kc, "import time; time.sleep(10); print('done')"))
    idle_pid = idle_km.provisioner.pid
    idle_prov = idle_km.provisioner
    for _ in range(60):
        if not idle_km.has_kernel:
            break
        await asyncio.sleep(0.25)
    assert not idle_km.has_kernel, "idle kernel was not culled"
    assert "idle_timeout=3s" in idle_prov.exit_reason
    if backend == PROCESS:
        assert alive({idle_pid}) == []
    else:
        assert docker_cleanup(idle_km.kernel_id) == []
    out = await busy
    assert out["stdout"].strip() == "done"  # survived 10 s with a 3 s idle timeout


@pytest.mark.parametrize("backend", backends(), indirect=True)
async def test_exec_timeout_interrupts_with_a_readable_message(backend, start_kernel):
    km, kc = await start_kernel(
        {**SMALL, "exec_timeout": 2, "owner": "lp-pytest"}, provisioner=backend
    )
    t0 = time.monotonic()
    out = await run(kc, "while True:\n    pass\n", timeout=30)
    assert time.monotonic() - t0 < 10
    assert out["status"] == "error"
    assert out["error"].startswith("TimeoutError: execution exceeded exec_timeout=2s"), out
    assert out["reply_error"] == out["error"], out
    assert (await run(kc, "print(6 * 7)"))["stdout"].strip() == "42"


async def test_exec_timeout_restarts_a_kernel_that_ignores_the_interrupt(start_kernel):
    km, kc = await start_kernel({**SMALL, "exec_timeout": 2, "exec_timeout_grace": 2})
    first_pid = km.provisioner.pid
    kc.execute(
        "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "while True:\n    time.sleep(0.01)\n"
    )
    for _ in range(80):
        if km.provisioner.pid != first_pid:
            break
        await asyncio.sleep(0.25)
    assert km.provisioner.pid != first_pid, "kernel was not restarted"
    await kc.wait_for_ready(timeout=60)
    assert any("ignored the interrupt" in t["reason"] for t in km.provisioner.limit_trips)
    assert (await run(kc, "print('fresh')"))["stdout"].strip() == "fresh"
    assert alive({first_pid}) == []


@pytest.mark.parametrize("backend", backends(), indirect=True)
def test_reaper_removes_orphans_of_a_killed_server_and_nothing_else(
    backend, jupyter_path, state_dir, docker_cleanup
):
    write_kernelspec(
        jupyter_path, "orphan", {**SMALL, "idle_timeout": 2, "owner": "lp-pytest"}, backend
    )
    agent = start_agent(1, "orphan")
    entries = Registry(state_dir).entries()
    assert len(entries) == 1
    kid = entries[0]["kernel_id"]
    bystander = None
    if backend == DOCKER:
        import docker

        bystander = docker.from_env().containers.run(
            KERNEL_IMAGE, ["sleep", "120"], detach=True,
            labels={"lp-pytest-bystander": "1"}, network_mode="none",
        )
    try:
        agent.send_signal(signal.SIGKILL)  # the "server" dies without any cleanup
        agent.wait()
        time.sleep(3)  # let the idle clock run out (the kernel may also die with its parent)
        cli = [sys.executable, "-m", "limited_provisioner.cli", "reap", "--all-servers"]
        dry = subprocess.run([*cli, "--dry-run"], capture_output=True, text=True, check=True)
        assert f"would reap {kid}" in dry.stdout, dry.stdout
        assert Registry(state_dir).read(kid) is not None  # dry run removed nothing
        real = subprocess.run(cli, capture_output=True, text=True, check=True)
        assert f"reaped {kid}" in real.stdout, real.stdout
        assert Registry(state_dir).entries() == []
        assert not (state_dir / "kernels" / kid).exists()
        if backend == DOCKER:
            assert docker_cleanup(kid) == []
            bystander.reload()
            assert bystander.status == "running"
        else:
            assert kernel_group_dirs(kid) == []
    finally:
        if bystander is not None:
            bystander.remove(force=True)


async def test_sixth_kernel_through_jupyter_server_is_429_for_kernels_and_sessions(tmp_path, jupyter_path, state_dir):
    from .test_server import running_server

    write_kernelspec(jupyter_path, "capped", {**SMALL, "max_kernels": 5}, PROCESS)
    env = {**os.environ, "JUPYTER_CONFIG_PATH": str(JUPYTER_CONFIG)}
    async with running_server(tmp_path, env) as (base, client, started):
        from tornado.httpclient import HTTPClientError, HTTPRequest

        for _ in range(5):
            resp = await client.fetch(HTTPRequest(
                f"{base}/api/kernels?token={TOKEN}", method="POST",
                body=json.dumps({"name": "capped"})))
            started.append(json.loads(resp.body)["id"])
        with pytest.raises(HTTPClientError) as info:
            await client.fetch(HTTPRequest(
                f"{base}/api/kernels?token={TOKEN}", method="POST",
                body=json.dumps({"name": "capped"})))
        assert info.value.code == 429
        body = json.loads(info.value.response.body)
        assert "max_kernels=5 reached: 5 limited kernels" in body["message"]
        # How JupyterLab opens a notebook: the same 429, not jupyter_server's 500.
        with pytest.raises(HTTPClientError) as info:
            await client.fetch(HTTPRequest(
                f"{base}/api/sessions?token={TOKEN}", method="POST",
                body=json.dumps({"path": "a.ipynb", "type": "notebook", "name": "a.ipynb",
                                 "kernel": {"name": "capped"}})))
        assert info.value.code == 429
        assert "max_kernels=5 reached" in json.loads(info.value.response.body)["message"]
        sessions = json.loads((await client.fetch(f"{base}/api/sessions?token={TOKEN}")).body)
        assert sessions == []
        listed = json.loads((await client.fetch(f"{base}/api/kernels?token={TOKEN}")).body)
        assert len(listed) == 5
        assert len(Registry(state_dir).entries()) == 5


async def test_server_that_refused_a_start_still_stops_on_sigterm(
    tmp_path, jupyter_path, state_dir
):
    """jupyter_client keeps a failed start in _pending_kernels; shutdown_all would then
    fail on it (404) and leave the server hanging with its kernels running."""
    write_kernelspec(jupyter_path, "capped", {**SMALL, "max_kernels": 1}, PROCESS)
    server = JupyterServer(tmp_path, {**os.environ, "JUPYTER_CONFIG_PATH": str(JUPYTER_CONFIG)})
    try:
        await server.start()
        await server.api("POST", "/api/kernels", {"name": "capped"})
        from tornado.httpclient import HTTPClientError

        with pytest.raises(HTTPClientError) as info:
            await server.api("POST", "/api/kernels", {"name": "capped"})
        assert info.value.code == 429
        server.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(server.proc.wait, 30)
        except subprocess.TimeoutExpired:
            pytest.fail("server ignored SIGTERM after a refused start:\n" + server.logs())
        assert "Kernel does not exist" not in server.logs()
        assert Registry(state_dir).entries() == []  # its kernel was shut down with it
    finally:
        await server.stop()


@pytest.mark.parametrize(
    "config, message",
    [
        ({"mem_budget": "300M"}, "mem_budget=300M reached: 1 live kernels reserve 256M"),
        ({"max_starts_per_minute": 1}, "max_starts_per_minute=1 reached: 'root' started 1"),
    ],
)
async def test_second_start_refused_by_budget_or_rate(jupyter_path, state_dir, config, message):
    write_kernelspec(jupyter_path, "k", {**SMALL, "owner": "root", **config}, PROCESS)
    first = AsyncKernelManager(kernel_name="k")
    try:
        await first.start_kernel()
        with pytest.raises(KernelLimitError, match=message):
            await AsyncKernelManager(kernel_name="k").start_kernel()
        assert len(Registry(state_dir).entries()) == 1
    finally:
        await first.shutdown_kernel(now=True)


async def test_low_disk_refuses_before_anything_starts(jupyter_path, state_dir):
    write_kernelspec(jupyter_path, "k", {**SMALL, "min_free_disk": "100T"}, PROCESS)
    with pytest.raises(KernelLimitError, match="min_free_disk=100T not available: only"):
        await AsyncKernelManager(kernel_name="k").start_kernel()
    assert Registry(state_dir).entries() == []


async def test_max_lifetime_ends_even_a_busy_kernel(start_kernel):
    km, kc = await start_kernel({**SMALL, "max_lifetime": 3, "idle_timeout": 0})
    prov = km.provisioner
    kc.execute("import time; time.sleep(60)")
    for _ in range(60):
        if not km.has_kernel:
            break
        await asyncio.sleep(0.25)
    assert not km.has_kernel
    assert "max_lifetime 3s reached" in prov.exit_reason


def test_reconnect_chatter_does_not_reset_the_idle_clock():
    """A client that reconnects (kernel_info_request) more often than idle_timeout - a
    crash-looping agent service - must not keep an abandoned kernel alive forever."""
    traffic = Traffic(last_activity=1000.0)
    for msg_type in ("kernel_info_request", "comm_info_request", "usage_request"):
        traffic.request(msg_type, {"msg_id": msg_type}, now=2000.0)
    assert traffic.last_activity == 1000.0 and not traffic.busy
    traffic.request("execute_request", {"msg_id": "x", "session": "s"}, now=2000.0)
    assert traffic.last_activity == 2000.0 and traffic.executing == "x"
    # A reply to something never asked (forged by the kernel) changes nothing.
    traffic.reply("execute_reply", "forged", now=3000.0)
    assert traffic.executing == "x" and traffic.executing_since == 2000.0
    traffic.reply("execute_reply", "x", now=3000.0)
    assert not traffic.busy and traffic.last_activity == 3000.0
