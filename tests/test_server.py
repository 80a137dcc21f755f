"""A real jupyter_server subprocess, driven over HTTP and WebSocket."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.websocket import websocket_connect

from limited_provisioner.process.cgroups import kernel_group_dirs
from limited_provisioner.registry import Registry

from .conftest import NOTHING_LEFT, backends
from .harness import (
    JUPYTER_CONFIG,
    TOKEN,
    JupyterServer,
    alive,
    kernel_leftovers,
    kernel_processes,
    kernel_ws_url,
    kill_kernel_leftovers,
    write_kernelspec,
    ws_execute,
    ws_execute_text,
    ws_message,
)


@contextlib.asynccontextmanager
async def running_server(tmp_path, env=None, root_dir=None):
    """A jupyter_server subprocess on a free port; stopped (by pid) and its kernels
    removed afterwards, even when the test failed. Yields (base_url, client, kernel_ids)."""
    server = JupyterServer(tmp_path, env or {**os.environ}, root_dir=root_dir)
    await server.start()
    started_kernels: list[str] = []
    try:
        yield server.base, server.client, started_kernels
    finally:
        for kid in started_kernels:
            with contextlib.suppress(Exception):  # already gone
                await server.api("DELETE", f"/api/kernels/{kid}")
        await server.stop(timeout=20)
        for kid in started_kernels:
            kill_kernel_leftovers(kid)
        print(server.logs(3000))


@pytest.fixture
async def server(tmp_path, jupyter_path):
    write_kernelspec(
        jupyter_path, "lim", {"mem_limit": "256M", "pids_limit": 64}, "limited-process-provisioner"
    )
    env = {**os.environ, "JUPYTER_CONFIG_PATH": str(JUPYTER_CONFIG)}
    async with running_server(tmp_path, env) as handles:
        yield handles


async def post_kernel(base: str, client, name: str, started: list[str]) -> str:
    """Start a kernel through the REST API; its id is also added to ``started``."""
    resp = await client.fetch(
        HTTPRequest(f"{base}/api/kernels?token={TOKEN}", method="POST",
                    body=json.dumps({"name": name}))
    )
    kernel_id = json.loads(resp.body)["id"]
    started.append(kernel_id)
    return kernel_id


async def wait_until_answers(base: str, kid: str) -> str:
    for _ in range(100):
        try:
            return await ws_execute_text(base, kid, "print(6 * 7)", timeout=10)
        except (TimeoutError, asyncio.TimeoutError):
            continue
    raise AssertionError(f"kernel {kid} never answered after its restart")


async def test_kernel_through_jupyter_server(server, tmp_path):
    base, client, started = server
    kid = await post_kernel(base, client, "lim", started)
    # Our messages are in the server's log, under our own logger name (logs.py).
    log = (tmp_path / "server-01.log").read_text()
    assert re.search(
        rf"^\[I [^]]* limited_provisioner\.process\.provisioner\] Kernel {kid} started as pid",
        log, re.MULTILINE), log
    out = await ws_execute_text(base, kid, "print(6 * 7)")
    pids = kernel_processes([kid])
    assert out.strip() == "42" and pids
    out = await ws_execute_text(base, kid, "x = bytearray(1024 * 2**20)")
    # Refused by the data rlimit: the kernel survives and the error names the limit.
    assert "MemoryError: memory limit 256M reached" in out
    await client.fetch(f"{base}/api/kernels/{kid}?token={TOKEN}", method="DELETE")
    started.remove(kid)
    await asyncio.sleep(0.5)
    assert alive(pids) == []


async def test_an_idle_kernel_is_culled_by_the_server_itself(tmp_path, jupyter_path):
    """The idle timer runs on the package's loop; the cull is handed to the server's
    manager on the server's loop, so the kernel also leaves the server's list."""
    state = tempfile.mkdtemp(prefix="lp-", dir="/var/lib")
    write_kernelspec(jupyter_path, "idle", {"mem_limit": "256M", "pids_limit": 64,
                                            "idle_timeout": 3}, "limited-process-provisioner")
    env = {**os.environ, "JUPYTER_CONFIG_PATH": str(JUPYTER_CONFIG),
           "LIMITED_PROVISIONER_STATE_DIR": state}
    try:
        async with running_server(tmp_path, env) as (base, client, started):
            kid = await post_kernel(base, client, "idle", started)
            assert (await ws_execute_text(base, kid, "print(6 * 7)")).strip() == "42"
            pids = kernel_processes([kid])
            listed = [kid]
            for _ in range(60):
                resp = await client.fetch(f"{base}/api/kernels?token={TOKEN}")
                listed = [k["id"] for k in json.loads(resp.body)]
                if kid not in listed:
                    break
                await asyncio.sleep(0.25)
            assert kid not in listed
            assert alive(pids) == []
            assert Registry(state).read(kid) is None
            assert not (Path(state) / "kernels" / kid).exists()
    finally:
        shutil.rmtree(state, ignore_errors=True)


STOCK_BLOCKING_MANAGER = "jupyter_server.services.kernels.kernelmanager.MappingKernelManager"


async def test_the_stock_blocking_mapping_kernel_manager_stops_limited_kernels(
    tmp_path, jupyter_path
):
    """jupyter_server's blocking MappingKernelManager calls each provisioner hook through
    run_sync, on a runner thread's loop: the hooks hop to the package's loop from there
    and a DELETE leaves nothing behind."""
    state = tempfile.mkdtemp(prefix="lp-", dir="/var/lib")
    write_kernelspec(jupyter_path, "lim", {"mem_limit": "256M", "pids_limit": 64},
                     "limited-process-provisioner")
    server = JupyterServer(
        tmp_path, {**os.environ, "LIMITED_PROVISIONER_STATE_DIR": state},
        args=(f"--ServerApp.kernel_manager_class={STOCK_BLOCKING_MANAGER}",),
    )
    await server.start()
    kid = None
    try:
        kid = (await server.api("POST", "/api/kernels", {"name": "lim"}))["id"]
        assert (await ws_execute_text(server.base, kid, "print(6 * 7)")).strip() == "42"
        pids = kernel_processes([kid])
        assert pids
        await server.api("DELETE", f"/api/kernels/{kid}")
        assert await server.api("GET", "/api/kernels") == []
        assert alive(pids) == []
        assert Registry(state).read(kid) is None
        assert "different loop" not in server.logs(100_000)
    finally:
        await server.stop()
        if kid:
            kill_kernel_leftovers(kid)
        shutil.rmtree(state, ignore_errors=True)
        print(server.logs(3000))


@pytest.mark.parametrize("backend", backends(), indirect=True)
async def test_a_limit_kill_is_explained_in_the_running_cell(
    backend, server, jupyter_path, docker_cleanup
):
    """The OOM-killed kernel's cell gets an error naming the limit, before 'restarting'."""
    base, client, started = server
    write_kernelspec(
        jupyter_path, "oom", {"mem_limit": "256M", "pids_limit": 64, "owner": "lp-pytest"},
        backend,
    )
    kid = await post_kernel(base, client, "oom", started)
    # Grows in small steps, so the cgroup OOM killer (256M) acts before the data rlimit.
    msg_id, seen = await ws_execute(
        base, kid, "a = []\nwhile True:\n    a.append(bytearray(2**20))"
    )
    errors = [m for m in seen if m["msg_type"] == "error"]
    assert errors, [m["msg_type"] for m in seen]
    error = errors[-1]
    assert error["parent_header"]["msg_id"] == msg_id
    assert error["content"]["ename"] == "KernelLimitExceeded"
    assert "memory limit 256M exceeded" in error["content"]["evalue"]
    assert "restarted" in error["content"]["evalue"]
    assert seen[-1]["content"]["execution_state"] == "restarting"  # the error came first
    assert (await wait_until_answers(base, kid)).strip() == "42"  # restarted, usable


async def kernel_status(base: str, client, kernel_id: str) -> dict:
    resp = await client.fetch(
        f"{base}/api/limited-provisioner/kernels/{kernel_id}?token={TOKEN}")
    return json.loads(resp.body)


# Touches every page, so the whole 100M is resident (charged to the kernel's group).
ALLOCATE_100M = "blob = bytearray(100 * 2**20)\nblob[::4096] = b'x' * (100 * 2**20 // 4096)"


@pytest.mark.parametrize("backend", backends(), indirect=True)
async def test_the_status_endpoint_shows_limits_usage_timers_and_the_last_kill(
    backend, server, jupyter_path, docker_cleanup
):
    base, client, started = server
    write_kernelspec(
        jupyter_path, "shown", {"mem_limit": "256M", "pids_limit": 64, "disk_limit": "64M",
                                "idle_timeout": "10m", "owner": "lp-pytest"}, backend,
    )
    kid = await post_kernel(base, client, "shown", started)
    assert (await ws_execute_text(base, kid, "print(6 * 7)")).strip() == "42"
    before = await kernel_status(base, client, kid)
    assert before["limited"] and before["alive"] and before["kernel_id"] == kid
    assert before["backend"] == backend.split("-")[1]
    assert before["limits"]["mem_limit"] == 256 * 2**20 and before["limits"]["pids_limit"] == 64
    assert before["limits"]["disk_limit"] == 64 * 2**20
    assert 0 < before["usage"]["pids"] <= 64 and before["usage"]["memory"] > 10 * 2**20
    assert before["usage"]["cpu_cores"] >= 0
    assert 540 < before["timers"]["idle_cull_in"] <= 600
    assert before["last_exit_reason"] is None

    await ws_execute_text(base, kid, ALLOCATE_100M + "\nopen('f', 'wb').write(b'x' * 5 * 2**20)")
    grown = await kernel_status(base, client, kid)
    assert grown["usage"]["memory"] > before["usage"]["memory"] + 80 * 2**20, (before, grown)
    for _ in range(50):  # the watchdog walks the work dir every few seconds
        disk = (await kernel_status(base, client, kid))["usage"]["disk"]
        if disk is not None and disk >= 5 * 2**20:
            break
        await asyncio.sleep(0.2)
    assert disk is not None and disk >= 5 * 2**20

    # A stock kernel exists, it just has no limits; an unknown id is not found.
    stock = await post_kernel(base, client, "python3", started)
    assert await kernel_status(base, client, stock) == {"kernel_id": stock, "limited": False}
    with pytest.raises(HTTPClientError) as missing:
        await kernel_status(base, client, str(uuid.uuid4()))
    assert missing.value.code == 404
    with pytest.raises(HTTPClientError) as anonymous:
        await client.fetch(f"{base}/api/limited-provisioner/kernels/{kid}")
    assert anonymous.value.code == 403

    # After an OOM kill and the automatic restart: why it died.
    await ws_execute(base, kid, "a = []\nwhile True:\n    a.append(bytearray(2**20))")
    assert (await wait_until_answers(base, kid)).strip() == "42"
    after = await kernel_status(base, client, kid)
    assert "memory limit 256M exceeded" in after["last_exit_reason"], after
    assert after["last_exit"]["kind"] == "mem_limit" and after["alive"]


async def test_a_connected_client_is_told_idle_once_after_a_status_it_ignores(server):
    """JupyterLab ignores the status of untracked requests (kernel_info_request): the
    connection follows the first such "idle" with one of its own, without a parent."""
    base, client, started = server
    kid = await post_kernel(base, client, "lim", started)
    assert (await ws_execute_text(base, kid, "print(6 * 7)")).strip() == "42"
    ws = await websocket_connect(kernel_ws_url(base, kid))
    seen: list[tuple[str, str | None]] = []
    try:
        for _ in range(2):  # the second kernel_info's idle gets no echo
            ws.write_message(json.dumps(ws_message("kernel_info_request", {})))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                raw = await asyncio.wait_for(ws.read_message(), deadline - time.monotonic())
            except asyncio.TimeoutError:
                break
            msg = json.loads(raw)
            if msg["msg_type"] == "status":
                seen.append((msg["content"]["execution_state"],
                             msg["parent_header"].get("msg_type")))
    finally:
        ws.close()
    echoes = [i for i, s in enumerate(seen) if s == ("idle", None)]
    assert len(echoes) == 1, seen
    assert seen[echoes[0] - 1] == ("idle", "kernel_info_request"), seen


async def test_an_ignored_exec_timeout_restart_is_explained_in_the_cell(tmp_path, jupyter_path):
    """Code that ignores the interrupt is restarted by the provisioner, not by the
    auto-restarter: clients still get the reason, then "restarting"."""
    write_kernelspec(
        jupyter_path, "stubborn", {"exec_timeout": 1, "exec_timeout_grace": 1},
        "limited-process-provisioner",
    )
    env = {**os.environ, "JUPYTER_CONFIG_PATH": str(JUPYTER_CONFIG)}
    async with running_server(tmp_path, env) as (base, client, started):
        kid = await post_kernel(base, client, "stubborn", started)
        msg_id, seen = await ws_execute(
            base, kid,
            "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True: pass",
        )
        errors = [m for m in seen if m["msg_type"] == "error"]
        assert errors, [m["msg_type"] for m in seen]
        assert errors[-1]["parent_header"]["msg_id"] == msg_id
        assert "exec_timeout=1s and ignored the interrupt" in errors[-1]["content"]["evalue"]
        assert (await wait_until_answers(base, kid)).strip() == "42"


def write_wrapped_kernelspec(jupyter_path: Path, name: str, shell: str) -> None:
    """A process kernelspec whose kernel command first runs ``shell`` (sh), then the
    kernel: a start that fails or is slow on demand."""
    write_kernelspec(jupyter_path, name, {"pids_limit": 64}, "limited-process-provisioner")
    spec_file = jupyter_path / "kernels" / name / "kernel.json"
    spec = json.loads(spec_file.read_text())
    spec["argv"] = ["/bin/sh", "-c", f'{shell}; exec "$@"', "sh", *spec["argv"]]
    spec_file.write_text(json.dumps(spec))


@contextlib.asynccontextmanager
async def answering_kernel_then(tmp_path, jupyter_path, then: str):
    """A server (own state dir) and one kernel that answers; once the yielded flag file
    exists, each (re)start of that kernel first runs ``then`` (sh). Yields (base, client,
    started, kernel_id, flag, registry); everything is removed afterwards."""
    state = tempfile.mkdtemp(prefix="lp-", dir="/var/lib")
    flag = Path(state) / "flag"  # not under /tmp: the kernel has a private /tmp
    write_wrapped_kernelspec(jupyter_path, "wrapped", f"test -e {flag} && {then}")
    env = {**os.environ, "JUPYTER_CONFIG_PATH": str(JUPYTER_CONFIG),
           "LIMITED_PROVISIONER_STATE_DIR": state}
    try:
        async with running_server(tmp_path, env) as (base, client, started):
            kid = await post_kernel(base, client, "wrapped", started)
            assert (await ws_execute_text(base, kid, "print(6 * 7)")).strip() == "42"
            yield base, client, started, kid, flag, Registry(state)
    finally:
        for entry in Registry(state).entries():
            kill_kernel_leftovers(entry["kernel_id"], set())
        shutil.rmtree(state, ignore_errors=True)


async def test_a_kernel_whose_restarts_fail_leaves_nothing_behind(tmp_path, jupyter_path):
    """jupyter_server gives up after restart_limit failed restarts and forgets the kernel;
    its registry entry, dir and cgroups must go too (the reaper spares live servers)."""
    async with answering_kernel_then(tmp_path, jupyter_path, "exit 3") as (
        base, client, started, kid, broken, registry
    ):
        pids = kernel_processes([kid])
        broken.touch()
        for pid in pids:  # the kernel and its launcher, as the host sees them
            os.kill(pid, signal.SIGKILL)
        for _ in range(240):
            if registry.read(kid) is None:
                break
            await asyncio.sleep(0.25)
        assert registry.read(kid) is None, registry.read(kid)
        assert not (registry.kernels_dir / kid).exists()
        assert kernel_group_dirs(kid) == []
        listed = json.loads((await client.fetch(f"{base}/api/kernels?token={TOKEN}")).body)
        assert kid not in [k["id"] for k in listed]


async def test_deleting_a_kernel_while_it_auto_restarts_stops_it(tmp_path, jupyter_path):
    """A DELETE that lands while jupyter_server auto-restarts a kernel (a limit just killed
    it) answers 204 and leaves nothing running, not a 500 and a kernel nobody manages."""
    async with answering_kernel_then(tmp_path, jupyter_path, "sleep 3") as (
        base, client, started, kid, slow, registry
    ):
        slow.touch()
        for pid in kernel_processes([kid]):
            os.kill(pid, signal.SIGKILL)
        url = f"{base}/api/kernels/{kid}?token={TOKEN}"
        for _ in range(200):  # the restart has begun once the server says "starting"
            model = json.loads((await client.fetch(url)).body)
            if model["execution_state"] == "starting":
                break
            await asyncio.sleep(0.05)
        assert model["execution_state"] == "starting", model

        resp = await client.fetch(url, method="DELETE", raise_error=False)

        assert resp.code == 204, (resp.code, resp.body)
        started.remove(kid)
        for _ in range(100):
            if registry.read(kid) is None and not kernel_processes([kid]):
                break
            await asyncio.sleep(0.1)
        assert kernel_processes([kid]) == set()
        assert registry.read(kid) is None, registry.read(kid)


async def _read_until(ws, done, timeout: float) -> list[dict]:
    """Messages from ``ws`` until ``done(msg)``; TimeoutError names what did come."""
    seen: list[dict] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            raw = await asyncio.wait_for(ws.read_message(), deadline - time.monotonic())
        except asyncio.TimeoutError:
            break
        msg = json.loads(raw)
        seen.append(msg)
        if done(msg):
            return seen
    raise TimeoutError([(m["msg_type"], m["content"].get("execution_state")) for m in seen])


@pytest.mark.parametrize("network", [False, True], ids=["offline", "network"])
async def test_the_first_cell_after_a_limit_kill_gets_its_output(
    network, tmp_path, jupyter_path
):
    """A browser reconnects after the auto-restart of a kernel killed mid-cell (as
    JupyterLab does: same session id, kernel_info first, then the next cell). Its output
    must arrive: the server must not keep the dead process's "busy" state, which made
    the reconnect skip its IOPub handshake and lose the output (cell stuck at [*])."""
    write_kernelspec(
        jupyter_path, "oomnet", {"mem_limit": "256M", "network": network},
        "limited-process-provisioner",
    )
    env = {**os.environ, "JUPYTER_CONFIG_PATH": str(JUPYTER_CONFIG)}
    async with running_server(tmp_path, env) as (base, client, started):
        kid = await post_kernel(base, client, "oomnet", started)
        session = uuid.uuid4().hex
        url = kernel_ws_url(base, kid, session)

        async def state() -> str:
            resp = await client.fetch(f"{base}/api/kernels/{kid}?token={TOKEN}")
            return json.loads(resp.body)["execution_state"]

        ws = await websocket_connect(url)
        ws.write_message(json.dumps(ws_message(
            "execute_request",
            {"code": "a = []\nwhile True:\n    a.append(bytearray(2**20))", "silent": False},
            session,
        )))
        await _read_until(
            ws, lambda m: m["content"].get("execution_state") == "restarting", timeout=60
        )
        assert await state() != "busy"  # the process that was busy is gone
        ws.close()

        ws = await websocket_connect(url)
        try:
            info = ws_message("kernel_info_request", {}, session)
            ws.write_message(json.dumps(info))
            await _read_until(
                ws, lambda m: m["parent_header"].get("msg_id") == info["header"]["msg_id"]
                and m["msg_type"] == "kernel_info_reply", timeout=60,
            )
            run = ws_message("execute_request", {"code": "print('alive')", "silent": False},
                             session)
            ws.write_message(json.dumps(run))
            seen = await _read_until(
                ws, lambda m: m["parent_header"].get("msg_id") == run["header"]["msg_id"]
                and m["content"].get("execution_state") == "idle", timeout=30,
            )
        finally:
            ws.close()
        run_id = run["header"]["msg_id"]
        out = [m["content"]["text"] for m in seen
               if m["msg_type"] == "stream" and m["parent_header"]["msg_id"] == run_id]
        assert out == ["alive\n"], [m["msg_type"] for m in seen]
        # The server watches the new process: its state follows it again.
        for _ in range(50):
            if await state() == "idle":
                break
            await asyncio.sleep(0.1)
        assert await state() == "idle"


async def test_a_kernel_that_cannot_start_in_its_sandbox_is_a_503(tmp_path, jupyter_path):
    """POST /api/kernels answers 503 with the launcher's words, at once: no 201 for a
    kernel that then dies five times in the restarter, and nothing left behind."""
    state = Path(tempfile.mkdtemp(prefix="lp-", dir="/var/lib"))
    write_kernelspec(jupyter_path, "broken", {},
                     argv=["/nonexistent/python", "-m", "ipykernel_launcher", "-f",
                           "{connection_file}"])
    env = {**os.environ, "JUPYTER_CONFIG_PATH": str(JUPYTER_CONFIG),
           "LIMITED_PROVISIONER_STATE_DIR": str(state)}
    try:
        async with running_server(tmp_path, env) as (base, client, _):
            resp = await client.fetch(
                HTTPRequest(f"{base}/api/kernels?token={TOKEN}", method="POST",
                            body=json.dumps({"name": "broken"})),
                raise_error=False,
            )
            assert resp.code == 503, resp.body
            assert resp.reason == "Kernel failed to start"
            body = json.loads(resp.body)
            assert "exec '/nonexistent/python' failed" in body["message"], body
            listed = json.loads((await client.fetch(f"{base}/api/kernels?token={TOKEN}")).body)
            assert listed == []
            assert kernel_leftovers(state) == NOTHING_LEFT
            await asyncio.sleep(1)  # a restarter, had one been started, would try now
            logs = "".join(p.read_text() for p in tmp_path.glob("server-*.log"))
            assert "restarting kernel" not in logs
    finally:
        shutil.rmtree(state, ignore_errors=True)


async def test_restarts_that_fail_in_the_sandbox_end_after_restart_limit(tmp_path, jupyter_path):
    """A kernel dies and its notebook folder has become one its uid cannot enter: each restart
    fails in the launcher. The restarter counts them (no endless retries), gives up after
    restart_limit, and the kernel's reservations are released."""
    state = Path(tempfile.mkdtemp(prefix="lp-", dir="/var/lib"))
    notebooks = state / "notebooks"
    notebooks.mkdir(mode=0o777)
    notebooks.chmod(0o777)
    write_kernelspec(jupyter_path, "shared-dir", {})
    env = {**os.environ, "JUPYTER_CONFIG_PATH": str(JUPYTER_CONFIG),
           "LIMITED_PROVISIONER_STATE_DIR": str(state)}
    registry = Registry(state)
    try:
        async with running_server(tmp_path, env, root_dir=notebooks) as (base, client, started):
            resp = await client.fetch(HTTPRequest(
                f"{base}/api/kernels?token={TOKEN}", method="POST",
                body=json.dumps({"name": "shared-dir", "path": ""})))  # cwd: the root dir
            kid = json.loads(resp.body)["id"]
            started.append(kid)
            assert (await ws_execute_text(base, kid, "import os; print(os.getcwd())")).strip() \
                == str(notebooks)
            notebooks.chmod(0o700)
            for pid in kernel_processes([kid]):
                os.kill(pid, signal.SIGKILL)
            for _ in range(240):
                if registry.read(kid) is None:
                    break
                await asyncio.sleep(0.25)
            assert registry.read(kid) is None, registry.read(kid)
            logs = "".join(p.read_text() for p in tmp_path.glob("server-*.log"))
            assert "restarting kernel (5/5)" in logs and "(6/5)" not in logs
            assert f"the folder {notebooks} belongs to root and other users cannot" in logs
            listed = json.loads((await client.fetch(f"{base}/api/kernels?token={TOKEN}")).body)
            assert kid not in [k["id"] for k in listed]
            assert kernel_leftovers(state, [kid]) == NOTHING_LEFT
    finally:
        for entry in registry.entries():
            kill_kernel_leftovers(entry["kernel_id"], set())
        shutil.rmtree(state, ignore_errors=True)
