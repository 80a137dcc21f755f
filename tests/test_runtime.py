"""The docker backend under another OCI runtime: gVisor (``runtime="runsc"``), real
kernels in real gVisor sandboxes, through jupyter_client and a real jupyter_server.

The attack suite runs under runsc too (tests/attacks, id ``runsc``); this file covers
what is the runtime's own: the kernel is in gVisor and reachable over its ipc sockets
(runsc's --host-uds=create), what the plan reports, pids through RLIMIT_NPROC, and the
refusals a start gets before anything is created.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest
from tornado.httpclient import HTTPRequest

from limited_provisioner import SandboxUnavailableError
from limited_provisioner.docker import LABEL_PREFIX
from limited_provisioner.registry import Registry, sandbox_of

from .conftest import GVISOR, NOTHING_LEFT, TEST_OWNER, _require_runtime, run
from .harness import (
    TOKEN,
    JupyterServer,
    containers_of,
    kernel_leftovers,
    kill_kernel_leftovers,
    pooled_entries,
    server_env,
    wait_for,
    write_kernelspec,
    ws_execute_text,
)

pytestmark = pytest.mark.docker

DOCKER = "limited-docker-provisioner"
SMALL = {"mem_limit": "256M", "cpu_limit": 1, "pids_limit": 64, "nofile_limit": 256,
         "disk_limit": "64M", "owner": TEST_OWNER}


@pytest.fixture
def gvisor(docker_client):
    _require_runtime(docker_client, GVISOR)
    return docker_client


async def test_a_gvisor_kernel_runs_in_gvisor_with_its_limits(start_kernel, gvisor):
    km, kc = await start_kernel({**SMALL, "runtime": GVISOR}, provisioner=DOCKER)
    prov = km.provisioner
    [container] = containers_of(gvisor, km.kernel_id)
    assert container.attrs["HostConfig"]["Runtime"] == GVISOR
    # gVisor's user-space kernel answers the kernel's uname, not the host's Linux; and the
    # kernel answered at all: its ipc sockets reached the host (--host-uds=create).
    out = await run(kc, "import platform; print(platform.release())")
    assert out["stdout"].strip() not in ("", platform.release()), out
    info = (await prov.get_provisioner_info())["enforcement"]
    assert info["isolation"].startswith("gVisor (runsc, ptrace platform)"), info
    assert "RLIMIT_NPROC" in info["pids_limit"] and "no MemoryError" in info["mem_limit"]
    # pids_limit holds inside the sandbox (the host's pids cgroup counts gVisor's threads).
    out = await run(
        kc,
        "import threading, time\nstarted = 0\ntry:\n    for _ in range(200):\n"
        "        threading.Thread(target=time.sleep, args=(5,), daemon=True).start()\n"
        "        started += 1\nexcept RuntimeError as e:\n    print('refused', started, e)\n",
        timeout=60,
    )
    refused = out["stdout"].split()
    assert refused[:1] == ["refused"] and 0 < int(refused[1]) < 64, out
    # gVisor's own threads fit under the host backstop: the kernel still answers.
    assert (await run(kc, "print('alive')"))["stdout"].strip() == "alive"
    kernel_dir = prov.kernel_dir
    await km.shutdown_kernel(now=True)
    assert containers_of(gvisor, km.kernel_id) == []
    assert not kernel_dir.exists()


async def test_an_unregistered_runtime_is_refused_before_anything_is_made(
    start_kernel, docker_client, own_state
):
    with pytest.raises(SandboxUnavailableError) as err:
        await start_kernel({**SMALL, "runtime": "no-such-runtime"}, provisioner=DOCKER)
    assert "'no-such-runtime' is not registered with the Docker daemon" in str(err.value)
    assert "runc" in str(err.value)  # what the daemon does have
    assert docker_client.containers.list(
        all=True, filters={"label": f"{LABEL_PREFIX}owner={TEST_OWNER}"}) == []
    assert kernel_leftovers(own_state) == NOTHING_LEFT


async def test_through_jupyter_server_gvisor_kernels_pool_and_refuse_a_folder_or_a_network(
    tmp_path, jupyter_path, gvisor
):
    """A real jupyter_server: POST /api/kernels claims a pooled gVisor kernel; a notebook's
    session in a folder is a 503 that says what to do (workspace="private", which then
    works); a kernelspec asking for a network under a runtime registered without one is a
    503 that says so. Nothing left behind after the server's stop drains the pool."""
    state = Path(tempfile.mkdtemp(prefix="lp-", dir="/var/lib"))
    root_dir = Path(tempfile.mkdtemp(prefix="lp-rt-nb-", dir="/var/lib"))
    root_dir.chmod(0o755)
    folder = root_dir / "project"
    folder.mkdir()
    os.chown(folder, 1000, 1000)
    write_kernelspec(jupyter_path, "gvisor", {**SMALL, "runtime": GVISOR, "pool_size": 1},
                     DOCKER)
    write_kernelspec(jupyter_path, "gvisor-net", {**SMALL, "runtime": GVISOR, "network": True},
                     DOCKER)
    write_kernelspec(jupyter_path, "gvisor-private",
                     {**SMALL, "runtime": GVISOR, "workspace": "private"}, DOCKER)
    server = JupyterServer(tmp_path, server_env(state, "rt-" + uuid.uuid4().hex[:6],
                                                jupyter_path), root_dir=root_dir)
    started: list[str] = []
    try:
        await server.start()
        resp = await server.client.fetch(HTTPRequest(
            f"{server.base}/api/kernels?token={TOKEN}", method="POST",
            body=json.dumps({"name": "gvisor-net"})), raise_error=False)
        assert resp.code == 503, resp.body
        assert "--network=none" in json.loads(resp.body)["message"]

        await wait_for(lambda: len(pooled_entries(state)) == 1, timeout=120,
                       what="the gVisor pool to fill")
        [pooled_id] = [e["kernel_id"] for e in Registry(state).entries()]
        kid = (await server.api("POST", "/api/kernels", {"name": "gvisor"}))["id"]
        started.append(kid)
        assert sandbox_of(Registry(state).read(kid)) == pooled_id  # claimed
        out = await ws_execute_text(server.base, kid, "import os; print(os.uname().release)")
        assert out.strip() not in ("", platform.release()), out

        # A notebook's folder: as root it is an idmapped bind, which gVisor's gofer cannot
        # create files through (EOVERFLOW): refused with what to do instead, not started
        # to fail at the first save.
        resp = await server.client.fetch(HTTPRequest(
            f"{server.base}/api/sessions?token={TOKEN}", method="POST", body=json.dumps({
                "path": "project/a.ipynb", "type": "notebook", "name": "a.ipynb",
                "kernel": {"name": "gvisor"}})), raise_error=False)
        assert resp.code == 503, resp.body
        assert "workspace='private'" in json.loads(resp.body)["message"], resp.body
        assert not (folder / "made.txt").exists()
        # With workspace="private" the same notebook gets a gVisor kernel in its own dir.
        session = await server.api("POST", "/api/sessions", {
            "path": "project/b.ipynb", "type": "notebook", "name": "b.ipynb",
            "kernel": {"name": "gvisor-private"}})
        nb_kid = session["kernel"]["id"]
        started.append(nb_kid)
        text = await ws_execute_text(
            server.base, nb_kid,
            "import os; open('made.txt', 'w').write('x'); print(os.getcwd() == os.environ['HOME'],"
            " os.uname().release)")
        assert text.split() == ["True", out.strip()], text
        [container] = containers_of(gvisor, sandbox_of(Registry(state).read(nb_kid)))
        assert container.attrs["HostConfig"]["Runtime"] == GVISOR

        for k in started:
            await server.api("DELETE", f"/api/kernels/{k}")
            assert containers_of(gvisor, k) == []
        await server.stop(timeout=60)  # drains the pool
        assert kernel_leftovers(state) == NOTHING_LEFT
    finally:
        await server.stop(timeout=30)
        for kid in started:
            kill_kernel_leftovers(kid)
        shutil.rmtree(state, ignore_errors=True)
        shutil.rmtree(root_dir, ignore_errors=True)
        print(server.logs(3000))

