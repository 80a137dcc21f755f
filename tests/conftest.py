"""Fixtures: real kernels started through jupyter_client with a limited kernelspec.

Every kernel a test starts is shut down in the fixture's teardown, and anything of its
tree still alive (found through its cgroup or the pids recorded at start) is killed,
even when the test failed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import docker
import docker.errors
import psutil
import pytest
from jupyter_client.manager import AsyncKernelManager

from limited_provisioner.docker import DEFAULT_IMAGE, LABEL_PREFIX
from limited_provisioner.host import LimitedHost
from limited_provisioner.process.cgroups import CGROUP_ROOT, GROUP_NAME

# Docker kernels started by tests carry this owner; the session fixture removes any
# container with it, whatever happened.
TEST_OWNER = "lp-pytest"

KERNEL_ARGV = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
# Inside the kernel image the interpreter is the image's own.
CONTAINER_ARGV = ["python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"]


def write_kernelspec(prefix: Path, name: str, config: dict, provisioner: str) -> None:
    spec_dir = prefix / "kernels" / name
    spec_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        "argv": CONTAINER_ARGV if "docker" in provisioner else KERNEL_ARGV,
        "display_name": name,
        "language": "python",
        "metadata": {
            "kernel_provisioner": {"provisioner_name": provisioner, "config": config}
        },
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))


@pytest.fixture(autouse=True)
def fresh_host():
    """Each test builds its own LimitedHost from its own config and environment (in a
    server there is one per process; here tests change config and env between them)."""
    LimitedHost.clear_instance()
    yield
    LimitedHost.clear_instance()


@pytest.fixture
def jupyter_path(tmp_path, monkeypatch):
    path = tmp_path / "jupyter"
    path.mkdir()
    monkeypatch.setenv("JUPYTER_PATH", str(path))
    return path


def kill_kernel_leftovers(kernel_id: str, pids: set[int]) -> None:
    """Last-resort cleanup: our kernel's cgroup members and recorded pids."""
    for controller in ("pids", "memory", "cpu"):
        procs = CGROUP_ROOT / controller / GROUP_NAME / kernel_id / "cgroup.procs"
        try:
            pids |= {int(p) for p in procs.read_text().split()}
        except OSError:
            pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    # Then the kernel's (now empty) cgroups; rmdir fails while a killed member lingers.
    for controller in ("pids", "memory", "cpu"):
        group = CGROUP_ROOT / controller / GROUP_NAME / kernel_id
        for _ in range(20):
            try:
                group.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.05)


def stop_process(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM (a clean stop, as a deploy does), SIGKILL if it is still there after
    ``timeout``; only for processes the test started."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def tree_of(km: AsyncKernelManager) -> set[int]:
    prov = km.provisioner
    pids = set(prov._tree_pids()) if prov is not None else set()
    return pids


@pytest.fixture
async def start_kernel(jupyter_path):
    """``await start_kernel(config)`` -> (km, kc) for a fresh limited kernel."""
    started: list[tuple[AsyncKernelManager, object, set[int]]] = []
    counter = iter(range(1000))

    async def _start(config: dict | None = None, provisioner="limited-process-provisioner",
                     **km_kwargs):
        name = f"lim{next(counter)}"
        write_kernelspec(jupyter_path, name, config or {}, provisioner)
        km = AsyncKernelManager(kernel_name=name, **km_kwargs)
        record = [km, None, set()]
        started.append(record)
        await km.start_kernel()
        record[2] = {km.provisioner.pid} if getattr(km.provisioner, "pid", None) else set()
        kc = km.client()
        kc.start_channels()
        record[1] = kc
        await kc.wait_for_ready(timeout=60)
        return km, kc

    yield _start

    for km, kc, pids in started:
        if kc is not None:
            kc.stop_channels()
        kernel_id = km.kernel_id
        try:
            if km.has_kernel:
                await km.shutdown_kernel(now=True)
        finally:
            kill_kernel_leftovers(kernel_id, pids)


async def run(kc, code: str, timeout: float = 60) -> dict:
    """Execute ``code``; return {"stdout", "stderr", "error", "status"} (+ "reply_error")."""
    out: dict = {"stdout": "", "stderr": "", "error": None}

    def hook(msg):
        kind = msg["msg_type"]
        if kind == "stream":
            out[msg["content"]["name"]] += msg["content"]["text"]
        elif kind == "error":
            out["error"] = f"{msg['content']['ename']}: {msg['content']['evalue']}"

    reply = await kc.execute_interactive(code, timeout=timeout, output_hook=hook)
    out["status"] = reply["content"]["status"]
    if out["status"] == "error":
        # What a client that reads only the reply (nbclient's CellExecutionError) sees.
        out["reply_error"] = f"{reply['content']['ename']}: {reply['content']['evalue']}"
        if out["error"] is None:
            out["error"] = out["reply_error"]
    return out


def host_pids_of(kernel_id: str) -> set[int]:
    """Host pids of a kernel's processes (what a kernel prints is its own PID namespace's):
    every process carrying the kernel's id in its environment."""
    found = set()
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("LIMITED_PROVISIONER_KERNEL_ID") == kernel_id:
                found.add(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def alive(pids) -> list[int]:
    result = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            if p.status() != psutil.STATUS_ZOMBIE:
                result.append(pid)
        except psutil.NoSuchProcess:
            pass
    return result


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Expose each phase's report on the item, so fixtures can dump logs on failure."""
    report = yield
    setattr(item, "rep_" + report.when, report)
    return report


def _docker_client():
    try:
        client = docker.from_env()
        client.ping()
        client.images.get(DEFAULT_IMAGE)
        return client
    except docker.errors.DockerException as e:
        reason = f"docker or image {DEFAULT_IMAGE} unavailable: {e}"
        if os.environ.get("LIMITED_PROVISIONER_REQUIRE_DOCKER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture(scope="session")
def docker_client():
    client = _docker_client()
    yield client
    # Whatever happened, no container of the test owner survives the session.
    for c in client.containers.list(all=True, filters={"label": f"{LABEL_PREFIX}owner={TEST_OWNER}"}):
        c.remove(force=True)


def containers_of(client, kernel_id):
    return client.containers.list(
        all=True, filters={"label": f"{LABEL_PREFIX}kernel-id={kernel_id}"}
    )




@pytest.fixture
def docker_cleanup():
    """``containers(kernel_id)`` lister; afterwards removes the test owner's containers."""
    clients = []

    def containers(kernel_id):
        if not clients:
            clients.append(docker.from_env())
        return containers_of(clients[0], kernel_id)

    yield containers
    if clients:
        for c in clients[0].containers.list(
            all=True, filters={"label": f"{LABEL_PREFIX}owner={TEST_OWNER}"}
        ):
            c.remove(force=True)


def backends():
    """Parametrize over both backends: ``@pytest.mark.parametrize("backend", backends(),
    indirect=True)``; the docker case needs (or, in CI, requires) Docker."""
    return [
        pytest.param("limited-process-provisioner", id="process"),
        pytest.param("limited-docker-provisioner", id="docker", marks=pytest.mark.docker),
    ]


@pytest.fixture
def backend(request):
    if "docker" in request.param:
        request.getfixturevalue("docker_client")
    return request.param
