"""The warm pool (pool.py): real pooled kernels claimed by real starts, both backends.

A claim must give the kernel the claimer's identity (kernel id, owner, labels, registry
entry, env, folder), never a trace of an earlier tenant (canaries: tests/pool_canaries.py),
never a kernel of a changed kernelspec or image; a full pool never blocks a user's start;
a server killed with -9 keeps its claimed kernels (adopted) and drains its pool. Every
test runs on a private state dir and removes everything of it afterwards, pooled kernels
included (by registry entry and by the state-dir label of containers).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from jupyter_client.manager import AsyncKernelManager, KernelManager

from limited_provisioner import KernelLimitError, list_kernels
from limited_provisioner import pool as warm_pool
from limited_provisioner.registry import Registry, sandbox_of

from .conftest import NOTHING_LEFT, backends, run
from .harness import (
    pooled_entries,
    wait_for,
    KERNEL_IMAGE,
    TOKEN,
    JupyterServer,
    kernel_leftovers,
    remove_all_kernels,
    replied,
    server_env,
    write_kernelspec,
    ws_execute_text,
    ws_request,
)
from .pool_canaries import plant_and_check

POOLED = {"pool_size": 2, "mem_limit": "512M", "allow_owner_from_start_env": True,
          "pool_refill_delay": 0.1}


@pytest.fixture
def pool_state(monkeypatch):
    """A private state dir; afterwards every pool of this process is drained and every
    kernel of the dir removed (pooled ones included), whatever the test did."""
    state = Path(tempfile.mkdtemp(prefix="lp-pool-", dir="/var/lib"))
    monkeypatch.setenv("LIMITED_PROVISIONER_STATE_DIR", str(state))
    yield state
    try:
        asyncio.run(warm_pool.drain_all())
    finally:
        remove_all_kernels(state)


@pytest.fixture
async def managers(pool_state):
    """``await start(name, **start_kwargs)`` -> (km, kc); all shut down afterwards, then
    the pools drained."""
    started: list[tuple[AsyncKernelManager, object]] = []

    async def start(name: str, **kwargs):
        km = AsyncKernelManager(kernel_name=name)
        await km.start_kernel(**kwargs)
        kc = km.client()
        kc.start_channels()
        started.append((km, kc))
        await kc.wait_for_ready(timeout=60)
        return km, kc

    yield start
    for km, kc in started:
        kc.stop_channels()
        if km.has_kernel:
            await km.shutdown_kernel(now=True)
    await warm_pool.drain_all()


def owner_env(owner: str, **extra: str) -> dict[str, str]:
    return {**os.environ, "LIMITED_PROVISIONER_OWNER": owner, **extra}


@pytest.mark.parametrize("backend", backends(), indirect=True)
async def test_a_claim_takes_the_claimers_identity(backend, jupyter_path, pool_state, managers):
    write_kernelspec(jupyter_path, "warm", POOLED, backend)
    km0, _ = await managers("warm")
    assert km0.provisioner.sandbox_id == km0.kernel_id  # the first start creates the pool
    await warm_pool.ready("warm")
    pooled = {e["kernel_id"] for e in pooled_entries(pool_state)}
    assert len(pooled) == 2
    assert all(e["owner"] == warm_pool.POOL_OWNER for e in pooled_entries(pool_state))
    # Pooled kernels are nobody's: not listed as running kernels.
    assert pooled.isdisjoint(k["kernel_id"] for k in list_kernels(pool_state))

    t0 = time.perf_counter()
    km, kc = await managers("warm", env=owner_env("alice", FOO="from-the-caller"),
                           labels={"session": "s-1"})
    claimed_in = time.perf_counter() - t0
    sandbox = km.provisioner.sandbox_id
    assert sandbox in pooled and sandbox != km.kernel_id
    entry = Registry(pool_state).read(km.kernel_id)
    assert entry["owner"] == "alice" and entry["labels"] == {"session": "s-1"}
    assert entry["state"] == "running" and sandbox_of(entry) == sandbox
    assert Registry(pool_state).read(sandbox) is None  # the pooled entry became alice's
    assert [k["kernel_id"] for k in list_kernels(pool_state, owner="alice")] == [km.kernel_id]
    out = await run(kc, "import os; print(os.environ['FOO'], os.environ['HOME'])")
    assert out["stdout"].split() == ["from-the-caller", entry["work_dir"]], out
    assert claimed_in < 5, claimed_in  # a claim, not a cold start on a loaded machine

    # `limited-provisioner list --json` shows the pool's replacements as pooled.
    await warm_pool.ready("warm")
    listed = json.loads(subprocess.run(
        [sys.executable, "-m", "limited_provisioner.cli", "list", "--json",
         "--state-dir", str(pool_state)], capture_output=True, text=True, check=True).stdout)
    states = {k["kernel_id"]: k["state"] for k in listed["kernels"]}
    assert states[km.kernel_id] == "running"
    assert sorted(states.values()).count("pooled") == 2, states

    # A restart starts a new process in the same sandbox, under the claimer's identity.
    await km.restart_kernel(now=True)
    await kc.wait_for_ready(timeout=60)
    out = await run(kc, "import os; print(os.environ['FOO'], os.environ['HOME'])")
    assert out["stdout"].split() == ["from-the-caller", entry["work_dir"]], out
    assert km.provisioner.sandbox_id == sandbox
    assert Registry(pool_state).read(km.kernel_id)["owner"] == "alice"

    await km.shutdown_kernel(now=True)
    assert Registry(pool_state).read(km.kernel_id) is None
    assert not (pool_state / "kernels" / sandbox).exists()
    await km0.shutdown_kernel(now=True)
    await warm_pool.drain_all()
    assert kernel_leftovers(pool_state, [km0.kernel_id, sandbox]) == NOTHING_LEFT


@pytest.mark.parametrize("backend", backends(), indirect=True)
async def test_no_claim_sees_an_earlier_tenant(backend, jupyter_path, pool_state, managers):
    """Canaries (files in home, /tmp and /dev/shm, env, a global, a process) of each claim,
    looked for by the next one while the earlier tenant still runs: 0 seen."""
    write_kernelspec(jupyter_path, "warm", POOLED, backend)
    await managers("warm")
    owners = ["alice", "bob", "carol", "dave"]
    seen: list[str] = []
    homes: list[str] = []
    hits = 0
    for i in range(8):
        await warm_pool.ready("warm")
        owner = owners[i % 4]
        km, kc = await managers("warm", env=owner_env(owner))
        hits += km.provisioner.sandbox_id != km.kernel_id
        assert Registry(pool_state).read(km.kernel_id)["owner"] == owner
        got = await plant_and_check(kc, f"{i}-{owner}", homes[-1] if homes else None)
        seen += [f"claim {i}: {s}" for s in got["seen"]]
        homes.append(got["home"])
    assert seen == []
    assert hits == 8


@pytest.mark.parametrize("backend", backends(), indirect=True)
async def test_a_changed_kernelspec_drains_the_pool(backend, jupyter_path, pool_state, managers):
    write_kernelspec(jupyter_path, "warm", POOLED, backend)
    await managers("warm")
    await warm_pool.ready("warm")
    old = {e["kernel_id"] for e in pooled_entries(pool_state)}
    write_kernelspec(jupyter_path, "warm", {**POOLED, "mem_limit": "256M"}, backend)
    # The next start never gets a kernel of the old spec, and the old ones go.
    km, _ = await managers("warm")
    assert km.provisioner.sandbox_id not in old
    assert km.provisioner.limits.mem_limit == 256 * 2**20
    await wait_for(lambda: not old & {e["kernel_id"] for e in Registry(pool_state).entries()},
                   what="the old pooled kernels to be shut down")
    await warm_pool.ready("warm")
    assert all(e["limits"]["mem_limit"] == 256 * 2**20 for e in pooled_entries(pool_state))
    # Without any start, the pool notices a change by itself (every CHECK_INTERVAL s).
    old = {e["kernel_id"] for e in pooled_entries(pool_state)}
    write_kernelspec(jupyter_path, "warm", {**POOLED, "mem_limit": "384M"}, backend)
    await wait_for(lambda: not old & {e["kernel_id"] for e in Registry(pool_state).entries()},
                   timeout=30, what="the pool to drain by itself")
    km, _ = await managers("warm")
    assert km.provisioner.limits.mem_limit == 384 * 2**20


@pytest.mark.docker
async def test_a_retagged_image_drains_the_pool(jupyter_path, pool_state, managers,
                                                docker_client):
    tag = f"lp-pool-test:{uuid.uuid4().hex[:8]}"
    docker_client.images.get(KERNEL_IMAGE).tag(tag)
    try:
        write_kernelspec(jupyter_path, "warm", {**POOLED, "image": tag},
                         "limited-docker-provisioner")
        await managers("warm")
        await warm_pool.ready("warm")
        old = {e["kernel_id"] for e in pooled_entries(pool_state)}
        # Another image under the same tag: one more label on top of the kernel image.
        build = subprocess.run(
            ["docker", "build", "-q", "-t", tag, "-"], check=True, capture_output=True,
            text=True, input=f"FROM {KERNEL_IMAGE}\nLABEL lp-pool-test={uuid.uuid4().hex}\n")
        new_id = build.stdout.strip()
        km, _ = await managers("warm")
        assert km.provisioner.sandbox_id not in old
        image = docker_client.containers.get(km.provisioner.container_id).image.id
        assert image == new_id
        await wait_for(lambda: not old & {e["kernel_id"] for e in Registry(pool_state).entries()},
                       what="the old image's pooled kernels to be shut down")
    finally:
        await warm_pool.drain_all()
        remove_all_kernels(pool_state)
        pool_state.mkdir(exist_ok=True)
        subprocess.run(["docker", "rmi", "-f", tag], capture_output=True, check=False)


async def test_a_full_pool_never_blocks_a_users_start(jupyter_path, pool_state, managers):
    """max_kernels=3: a start (cold) and 2 pooled fill it; the next two users' starts of
    another kernelspec each evict a pooled kernel; only then is a start refused."""
    capped = {"max_kernels": 3}
    write_kernelspec(jupyter_path, "warm", {**POOLED, **capped})
    write_kernelspec(jupyter_path, "plain", {"mem_limit": "512M", **capped})
    await managers("warm")
    await warm_pool.ready("warm")
    assert len(pooled_entries(pool_state)) == 2
    await managers("plain")
    await managers("plain")
    assert pooled_entries(pool_state, ready=False) == []
    with pytest.raises(KernelLimitError) as refused:
        await managers("plain")
    assert refused.value.limit == "max_kernels"
    # The refills are refused too while the cap is reached: no pooled kernel crept back.
    await asyncio.sleep(1.5)
    assert pooled_entries(pool_state, ready=False) == []


async def test_the_blocking_manager_claims_too(jupyter_path, pool_state, managers):
    write_kernelspec(jupyter_path, "warm", POOLED)
    await managers("warm")
    await warm_pool.ready("warm")
    pooled = {e["kernel_id"] for e in pooled_entries(pool_state)}

    def blocking() -> str:
        km = KernelManager(kernel_name="warm")
        km.start_kernel()
        try:
            kc = km.client()
            kc.start_channels()
            try:
                kc.wait_for_ready(timeout=60)
                return km.provisioner.sandbox_id
            finally:
                kc.stop_channels()
        finally:
            km.shutdown_kernel(now=True)

    assert await asyncio.to_thread(blocking) in pooled


@pytest.mark.parametrize("backend", backends(), indirect=True)
async def test_a_server_claims_binds_the_notebooks_folder_and_drains_its_pool_when_killed(
    backend, tmp_path, jupyter_path, pool_state
):
    """Through jupyter_server: the pool warms at start; POST /api/kernels and
    POST /api/sessions (a notebook's folder, as root bound into the pooled kernel's mount
    namespace at the folder's own path) claim; after kill -9 the claimed kernels are
    adopted (a container's by its claim record) and the dead server's pool drained."""
    write_kernelspec(jupyter_path, "warm", POOLED, backend)
    # Not under /tmp: a folder there is hidden in the kernel's view (its own /tmp), so
    # only a cold start could lay it out.
    root_dir = Path(tempfile.mkdtemp(prefix="lp-pool-nb-", dir="/var/lib"))
    root_dir.chmod(0o755)
    # At DEBUG: jupyter_server says when it asks a kernel for its kernel_info.
    server = JupyterServer(tmp_path, server_env(pool_state, "pool-" + uuid.uuid4().hex[:6],
                                                jupyter_path=jupyter_path), root_dir=root_dir,
                           args=["--ServerApp.log_level=DEBUG"])
    folder = root_dir / "project"
    folder.mkdir()
    if os.geteuid() == 0:
        os.chown(folder, 1000, 1000)
    try:
        await server.start()
        await wait_for(lambda: len(pooled_entries(pool_state, "warm")) == 2,
                       what="the server to warm its pool")
        pooled = {e["kernel_id"] for e in pooled_entries(pool_state)}
        kid = (await server.api("POST", "/api/kernels", {"name": "warm"}))["id"]
        assert sandbox_of(Registry(pool_state).read(kid)) in pooled
        msg_id, seen = await ws_request(server.base, kid, "kernel_info_request", {})
        assert replied(msg_id, seen)
        # The pool asked it at the fill: the claimed kernel's first WebSocket does not.
        asked = f"Requesting kernel info from {kid}"
        assert asked not in (tmp_path / "server-01.log").read_text()

        await wait_for(lambda: len(pooled_entries(pool_state, "warm")) == 2,
                       what="the refill")
        pooled = {e["kernel_id"] for e in pooled_entries(pool_state)}
        session = await server.api("POST", "/api/sessions", {
            "path": "project/a.ipynb", "type": "notebook", "name": "a.ipynb",
            "kernel": {"name": "warm"}})
        nb_kid = session["kernel"]["id"]
        assert sandbox_of(Registry(pool_state).read(nb_kid)) in pooled
        text = await ws_execute_text(
            server.base, nb_kid,
            "import os; open('made.txt', 'w').write('x')\n"
            "try:\n    os.chmod('made.txt', 0o6755); print('set-id allowed')\n"
            "except OSError: print('set-id refused')\n"
            "print(os.getcwd(), __session__)")
        assert text.split() == ["set-id", "refused", str(folder), str(folder / "a.ipynb")], text
        if os.geteuid() == 0:
            made = (folder / "made.txt").stat()
            assert made.st_uid == 1000  # the folder's owner
            assert not made.st_mode & 0o6000  # never a set-id file of theirs

        await wait_for(lambda: len(pooled_entries(pool_state, "warm")) == 2,
                       what="the refill")
        old_pool = {e["kernel_id"] for e in pooled_entries(pool_state)}
        server.kill9()
        await server.start()
        listed = {k["id"] for k in await server.api("GET", "/api/kernels")}
        assert {kid, nb_kid} <= listed
        for k in (kid, nb_kid):
            msg_id, seen = await ws_request(server.base, k, "kernel_info_request", {})
            assert replied(msg_id, seen)
        # An adopted kernel is asked (the check above can fail).
        assert asked in (tmp_path / "server-02.log").read_text()
        await wait_for(lambda: not old_pool & {e["kernel_id"]
                                               for e in Registry(pool_state).entries()},
                       what="the dead server's pooled kernels to be reaped")
        await wait_for(lambda: len(pooled_entries(pool_state, "warm")) == 2,
                       what="the new server's pool")
        for k in (kid, nb_kid):
            await server.api("DELETE", f"/api/kernels/{k}")
        metrics = (await server.client.fetch(f"{server.base}/metrics?token={TOKEN}")).body
        assert b'limited_provisioner_pool_kernels{kernel_name="warm"} 2.0' in metrics
        assert b'limited_provisioner_pool_refills_total{kernel_name="warm",result="ok"}' \
            in metrics
    finally:
        await server.stop(timeout=60)
        shutil.rmtree(root_dir, ignore_errors=True)
    # A clean stop drains the pool: nothing of the state dir is left running.
    assert pooled_entries(pool_state, ready=False) == []
    assert kernel_leftovers(pool_state) == NOTHING_LEFT


def test_the_agent_backend_claims_for_its_sessions(tmp_path, jupyter_path):
    """AGENT_BACKEND_POOL_SIZE: sessions start from the pool (their kernels' sandboxes
    are pooled ones), each user's owner and session label bound at the claim."""
    from . import test_agent_backend as ab

    service = ab.new_service(tmp_path, POOL_SIZE="2", KEEP_FILES_FOR="0")
    try:
        service.start()
        registry = Registry(service.state)

        async def full() -> None:
            await wait_for(lambda: len(pooled_entries(service.state)) == 2,
                           what="the service's pool")

        for user in ("u-pool-a", "u-pool-b"):
            asyncio.run(full())
            pooled = {e["kernel_id"] for e in pooled_entries(service.state)}
            out = service.run(user, "s1", "import os; print(os.environ['HOME'])")
            assert out["status"] == "ok", out
            (entry,) = [e for e in registry.entries() if e.get("owner") == user]
            assert sandbox_of(entry) in pooled and entry["kernel_id"] not in pooled
            assert entry["labels"]["session_id"] == "s1"
            assert out["stdout"].strip() == entry["work_dir"]
            service.delete(user, "s1")
    finally:
        print(service.logs(8000))
        ab.remove_everything([service])
