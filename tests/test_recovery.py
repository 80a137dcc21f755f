"""Server restarts are a non-event: a real jupyter_server is SIGKILLed and started again."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from limited_provisioner import AdoptionError, adopt, list_kernels, reap_orphans
from limited_provisioner.registry import Registry, is_alive

from .conftest import backends, run
from .harness import (
    JupyterServer,
    kernel_cgroups,
    kernel_leftovers,
    remove_all_kernels,
    server_env,
    write_kernelspec,
    ws_execute_text,
)

SMALL = {"mem_limit": "256M", "pids_limit": 64, "owner": "lp-pytest"}


@pytest.fixture
def recovery_env(jupyter_path):
    """Private state dir and server id; afterwards everything in that registry is removed."""
    state = Path(tempfile.mkdtemp(prefix="lp-", dir="/var/lib"))
    server_id = "test-" + uuid.uuid4().hex[:8]
    yield server_env(state, server_id), state, server_id
    remove_all_kernels(state)
    from jupyter_core.paths import jupyter_runtime_dir

    db = Path(jupyter_runtime_dir()) / f"limited-provisioner-sessions-{server_id}.db"
    db.unlink(missing_ok=True)


@pytest.mark.parametrize("backend", backends(), indirect=True)
async def test_kill9_and_restart_keeps_kernels_state_and_sessions(
    backend, tmp_path, jupyter_path, recovery_env, docker_cleanup
):
    env, state, server_id = recovery_env
    write_kernelspec(jupyter_path, "lim", SMALL, backend)
    server = JupyterServer(tmp_path, env)
    await server.start()
    try:
        ids = {}
        for name in ("a.ipynb", "b.ipynb", "c.ipynb"):
            session = await server.api("POST", "/api/sessions", {
                "path": name, "name": name, "type": "notebook", "kernel": {"name": "lim"}})
            ids[name] = session["kernel"]["id"]
            await ws_execute_text(server.base, ids[name], "x = 42")
        before = kernel_leftovers(state, ids.values())
        busy = ids["c.ipynb"]
        # One kernel is in the middle of an execution when the server dies.
        busy_task = asyncio.ensure_future(
            ws_execute_text(server.base, busy, "import time; time.sleep(5); y = 7", timeout=30))
        await asyncio.sleep(1)
        server.kill9()
        busy_task.cancel()
        for restart in range(2):  # twice in a row
            await server.start()
            listed = {k["id"] for k in await server.api("GET", "/api/kernels")}
            assert listed == set(ids.values()), server.logs()
            if restart == 0:
                server.kill9()
        for kid in ids.values():
            out = await ws_execute_text(server.base, kid, "print(x)")
            assert out.strip() == "42", out
        await asyncio.sleep(4)
        assert (await ws_execute_text(server.base, busy, "print(y)")).strip() == "7"
        sessions = {s["path"]: s["kernel"]["id"] for s in await server.api("GET", "/api/sessions")}
        assert sessions == ids
        # Nothing started twice: as many entries, dirs, cgroups, processes, containers.
        assert kernel_leftovers(state, ids.values()) == before
        assert before["registry entries"] == 3
    finally:
        for kid in await server.api("GET", "/api/kernels") or []:
            await server.api("DELETE", f"/api/kernels/{kid['id']}")
        await server.stop()
        print(server.logs())


@pytest.mark.parametrize("backend", backends(), indirect=True)
async def test_kernel_that_died_while_server_was_down_is_cleaned_up(
    backend, tmp_path, jupyter_path, recovery_env, docker_cleanup
):
    env, state, server_id = recovery_env
    write_kernelspec(jupyter_path, "lim", SMALL, backend)
    server = JupyterServer(tmp_path, env)
    await server.start()
    try:
        survivor = (await server.api("POST", "/api/kernels", {"name": "lim"}))["id"]
        victim = (await server.api("POST", "/api/kernels", {"name": "lim"}))["id"]
        server.kill9()
        entry = Registry(state).read(victim)
        if "docker" in backend:
            import docker

            docker.from_env().containers.get(entry["container_id"]).kill()
        else:
            os.kill(entry["pid"], signal.SIGKILL)
        await server.start()
        listed = {k["id"] for k in await server.api("GET", "/api/kernels")}
        assert listed == {survivor}
        assert Registry(state).read(victim) is None
        assert not (state / "kernels" / victim).exists()
        if "docker" in backend:
            assert docker_cleanup(victim) == []
        else:
            assert kernel_cgroups([victim]) == 0
    finally:
        await server.stop()


@pytest.mark.docker
async def test_two_servers_each_adopt_only_their_own(
    tmp_path, jupyter_path, recovery_env, docker_client, docker_cleanup
):
    env, state, server_id = recovery_env
    write_kernelspec(jupyter_path, "lim", SMALL, "limited-docker-provisioner")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = JupyterServer(tmp_path / "a", env)
    b = JupyterServer(tmp_path / "b", {**env, "LIMITED_PROVISIONER_SERVER_ID": server_id + "-b"})
    await a.start()
    await b.start()
    try:
        ka = (await a.api("POST", "/api/kernels", {"name": "lim"}))["id"]
        kb = (await b.api("POST", "/api/kernels", {"name": "lim"}))["id"]
        a.kill9()
        b.kill9()
        await a.start()
        await b.start()
        assert {k["id"] for k in await a.api("GET", "/api/kernels")} == {ka}
        assert {k["id"] for k in await b.api("GET", "/api/kernels")} == {kb}
    finally:
        await a.stop()
        await b.stop()


ORPHANER = r"""
import asyncio, os, sys
from jupyter_client.manager import AsyncKernelManager
async def main():
    km = AsyncKernelManager(kernel_name="lim")
    await km.start_kernel(labels={"session_id": "chat-7"})
    kc = km.client(); kc.start_channels(); await kc.wait_for_ready(timeout=60)
    await kc.execute_interactive("x = 42; import os; pid = os.getpid()", timeout=60)
    print(km.kernel_id, flush=True)
    os._exit(0)  # an agent service crashing: no shutdown, nothing cleaned up
asyncio.run(main())
"""


def run_client(script: str, recovery_env, monkeypatch, jupyter_path, *args: str) -> str:
    """Run ``script`` (with ``args``) as another client process of the test's state dir
    and server id (until it exits); its output."""
    env, _state, _server_id = recovery_env
    for key in ("LIMITED_PROVISIONER_STATE_DIR", "LIMITED_PROVISIONER_SERVER_ID"):
        monkeypatch.setenv(key, env[key])
    # A file, not a pipe: a surviving kernel inherits the client's stdout, and a pipe
    # would never reach EOF while it lives.
    out_file = jupyter_path / "client.out"
    with open(out_file, "w") as f:
        subprocess.run([sys.executable, "-c", script, *args], stdout=f,
                       stderr=subprocess.STDOUT, env={**os.environ}, timeout=120, check=True)
    return out_file.read_text()


@pytest.mark.parametrize("backend", backends(), indirect=True)
async def test_programmatic_adopt_from_a_fresh_process(
    backend, jupyter_path, recovery_env, monkeypatch, docker_cleanup
):
    env, state, server_id = recovery_env
    write_kernelspec(jupyter_path, "lim", {**SMALL, "exec_timeout_grace": 7}, backend)
    kid = run_client(ORPHANER, recovery_env, monkeypatch, jupyter_path).split()[-1]
    listed = [e["kernel_id"] for e in list_kernels(state, server_id=server_id)]
    assert listed == [kid]
    # The agent finds its session's kernel by label, without any memory of its own.
    assert [e["kernel_id"] for e in list_kernels(state, labels={"session_id": "chat-7"})] == [kid]
    assert list_kernels(state, labels={"session_id": "chat-8"}) == []
    km = await adopt(kid, state_dir=state)
    assert km.provisioner.labels == {"session_id": "chat-7"}
    assert km.provisioner.exec_timeout_grace == 7  # the kernelspec's settings, not defaults
    if backend == "docker":
        (container,) = docker_cleanup(kid)
        assert container.labels["limited-provisioner.label.session_id"] == "chat-7"
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=30)
        assert (await run(kc, "print(x)"))["stdout"].strip() == "42"
        with pytest.raises(AdoptionError, match="no limited kernel"):
            await adopt("not-a-kernel", state_dir=state)
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)
    assert Registry(state).entries() == []
    assert not is_alive({"pid": km.provisioner.pid if km.provisioner else None})


def test_a_start_cut_off_by_a_crash_is_reaped_at_once(tmp_path):
    """The service died between admission and launch: the entry never reaches "running",
    so no restart adopts it; it is an orphan as soon as its server is gone."""
    state = tmp_path / "state"
    registry = Registry(state)
    registry.ensure()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)
    registry.write("k-cut-off", {
        "kernel_id": "k-cut-off", "backend": "process", "state": "starting",
        "owner": "lp-pytest", "server_id": "crashed", "created": time.time(),
        "server_pid": dead_pid, "server_pid_create_time": 1.0,  # no pid yet: never launched
    })
    (registry.kernels_dir / "k-cut-off").mkdir()
    reaped = reap_orphans(state, server_id="crashed")
    assert [(o.kernel_id, o.why) for o in reaped] == [
        ("k-cut-off", "server gone while the kernel was starting")
    ]
    assert registry.entries() == []
    assert not (registry.kernels_dir / "k-cut-off").exists()


@pytest.mark.parametrize("backend", backends(), indirect=True)
async def test_a_crashed_clients_kernel_is_reaped_after_orphan_grace(
    backend, jupyter_path, recovery_env, monkeypatch, docker_cleanup
):
    """A script that dies without shutting down leaves a live kernel: kept for
    ``orphan_grace`` (a restart may adopt it), then reaped -- not held until its
    idle_timeout, reserving its mem_limit."""
    env, state, server_id = recovery_env
    write_kernelspec(jupyter_path, "lim", {**SMALL, "idle_timeout": 3600}, backend)
    kid = run_client(ORPHANER, recovery_env, monkeypatch, jupyter_path).split()[-1]
    registry = Registry(state)
    (entry,) = registry.entries()
    assert is_alive(entry)

    # The first reaper round to see it orphaned starts its grace; nothing is removed.
    assert reap_orphans(state, all_servers=True, orphan_grace=1.5) == []
    assert registry.read(kid)["orphaned_at"] > 0 and is_alive(entry)
    await asyncio.sleep(2)
    reaped = reap_orphans(state, all_servers=True, orphan_grace=1.5)
    assert [(o.kernel_id, "nobody adopted" in o.why) for o in reaped] == [(kid, True)]
    assert kernel_leftovers(state, [kid]) == dict.fromkeys(
        ("registry entries", "kernel dirs", "cgroups", "processes", "containers"), 0)


async def test_an_adopted_kernel_is_not_reaped_by_its_old_orphan_grace(
    jupyter_path, recovery_env, monkeypatch
):
    env, state, server_id = recovery_env
    write_kernelspec(jupyter_path, "lim", SMALL)
    kid = run_client(ORPHANER, recovery_env, monkeypatch, jupyter_path).split()[-1]
    assert reap_orphans(state, all_servers=True, orphan_grace=0.5) == []
    km = await adopt(kid, state_dir=state)
    try:
        assert Registry(state).read(kid).get("orphaned_at") is None
        await asyncio.sleep(1)
        assert reap_orphans(state, all_servers=True, orphan_grace=0.5) == []
        assert await km.is_alive()
    finally:
        await km.shutdown_kernel(now=True)
    assert Registry(state).entries() == []


FORGETFUL = r"""
import asyncio, os, sys
from jupyter_client.manager import AsyncKernelManager, KernelManager
async def main():
    km = AsyncKernelManager(kernel_name="lim")
    await km.start_kernel()
    kc = km.client(); kc.start_channels(); await kc.wait_for_ready(timeout=60)
    print(km.kernel_id, km.provisioner.pid, flush=True)
    if sys.argv[1] == "detach":
        await km.provisioner.detach()
# A blocking manager too, as a notebook runner holds it.
bkm = KernelManager(kernel_name="lim")
bkm.start_kernel()
print(bkm.kernel_id, bkm.provisioner.pid, flush=True)
if sys.argv[1] == "detach":
    asyncio.run(bkm.provisioner.detach())
asyncio.run(main())
# Returns without a shutdown: a clean exit with both kernels still running.
"""


@pytest.mark.parametrize("how", ["forgets", "detach"])
async def test_a_clean_exit_ends_the_kernels_it_did_not_let_go(
    how, jupyter_path, recovery_env, monkeypatch
):
    """As a stock kernel ends with its parent: a script that exits without shutting its
    kernels down leaves nothing running -- unless it detached them for a later adopt()."""
    env, state, server_id = recovery_env
    write_kernelspec(jupyter_path, "lim", SMALL)
    out = run_client(FORGETFUL, recovery_env, monkeypatch, jupyter_path, how)
    started = [line.split() for line in out.splitlines()
               if len(line.split()) == 2 and line.split()[1].isdigit()]
    assert len(started) == 2, out
    kids = [kid for kid, _ in started]
    if how == "forgets":
        assert Registry(state).entries() == []
        assert kernel_leftovers(state, kids) == dict.fromkeys(
            ("registry entries", "kernel dirs", "cgroups", "processes", "containers"), 0)
        return
    assert sorted(e["kernel_id"] for e in Registry(state).entries()) == sorted(kids)
    for kid in kids:
        km = await adopt(kid, state_dir=state)
        await km.shutdown_kernel(now=True)
    assert Registry(state).entries() == []
