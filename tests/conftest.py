"""Fixtures: real kernels started through jupyter_client with a limited kernelspec.

Every kernel a test starts is shut down in the fixture's teardown, and anything of its
tree still alive (found through its cgroup or the pids recorded at start) is killed,
even when the test failed. What is not pytest-specific (kernelspecs, servers, cleanup
by kernel id) lives in harness.py, which the benches share.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
from pathlib import Path

import docker
import pytest
from jupyter_client.manager import AsyncKernelManager

from limited_provisioner.host import LimitedHost

from .harness import (
    REPO,
    DockerUnavailable,
    containers_of,
    kill_kernel_leftovers,
    private_runtime_dir,
    real_runtime_dir,
    remove_containers_with_label,
    shutdown_settled,
    write_kernelspec,
)
from .harness import (
    docker_client as connect_docker,
)

# Docker kernels started by tests carry this owner; the session fixture removes any
# container with it, whatever happened.
TEST_OWNER = "lp-pytest"


def _listing(path: Path) -> set[str]:
    try:
        return set(os.listdir(path))
    except FileNotFoundError:
        return set()


def pytest_configure(config):
    # Before any test, server or kernel: the run's runtime files go to a dir of its own.
    private_runtime_dir()
    config._lp_runtime_before = _listing(real_runtime_dir())


def _another_servers(path: Path, mine: tuple[Path, ...]) -> bool:
    """A jpserver-<pid>.json (or its -open.html) of a Jupyter server whose root dir is
    none of this run's: someone else's server on this machine, not a leak of ours."""
    if not path.name.startswith("jpserver-"):
        return False
    info = path.with_name(path.name.replace("-open.html", ".json"))
    try:
        root = Path(json.loads(info.read_text())["root_dir"])
    except (OSError, ValueError, KeyError):
        return False  # gone or unreadable: count it
    return not any(root.is_relative_to(m) for m in mine)


@pytest.fixture(scope="session", autouse=True)
def user_runtime_dir_untouched(request, tmp_path_factory):
    """At the end of the run: nothing new in the user's Jupyter runtime dir (connection
    files, jpserver-*.json, session databases) — all of it went to the run's own."""
    yield
    real = real_runtime_dir()
    # Where this run's servers have their root dir: its tmp_path's, the checkout.
    mine = (tmp_path_factory.getbasetemp(), REPO)
    new = sorted(name for name in _listing(real) - request.config._lp_runtime_before
                 if not _another_servers(real / name, mine))
    if new:
        pytest.fail(
            f"the test run left {len(new)} new file(s) in the user's Jupyter runtime dir "
            f"{real} (it should have used {private_runtime_dir()}; another Jupyter "
            "running on this machine meanwhile would show here too): " + ", ".join(new[:50]),
            pytrace=False,
        )


@pytest.fixture(autouse=True)
def fresh_host():
    """Each test builds its own LimitedHost from its own config and environment (in a
    server there is one per process; here tests change config and env between them)."""
    LimitedHost.clear_instance()
    yield
    LimitedHost.clear_instance()


# kernel_leftovers() of a state dir whose kernels are all gone.
NOTHING_LEFT = dict.fromkeys(
    ("registry entries", "kernel dirs", "cgroups", "processes", "containers"), 0
)


@pytest.fixture
def own_state(monkeypatch):
    """A private state dir for the test's kernels (not under /tmp: kernels get their own
    /tmp), removed afterwards."""
    state = Path(tempfile.mkdtemp(prefix="lp-", dir="/var/lib"))
    monkeypatch.setenv("LIMITED_PROVISIONER_STATE_DIR", str(state))
    yield state
    shutil.rmtree(state, ignore_errors=True)


@pytest.fixture
def jupyter_path(tmp_path, monkeypatch):
    path = tmp_path / "jupyter"
    path.mkdir()
    monkeypatch.setenv("JUPYTER_PATH", str(path))
    return path


@pytest.fixture
async def start_kernel(jupyter_path):
    """``await start_kernel(config)`` -> (km, kc) for a fresh limited kernel (``argv``,
    ``env``: the kernelspec's, instead of this interpreter's ipykernel; ``start_kwargs``
    for ``km.start_kernel``)."""
    started: list[tuple[AsyncKernelManager, object, set[int]]] = []
    counter = iter(range(1000))

    async def _start(config: dict | None = None, provisioner="limited-process-provisioner",
                     *, argv: list[str] | None = None, env: dict | None = None,
                     start_kwargs: dict | None = None, metadata: dict | None = None,
                     km_config=None, **km_kwargs):
        name = f"lim{next(counter)}"
        provisioner, runtime = split_backend(provisioner)
        config = {**(config or {}), **runtime}
        write_kernelspec(jupyter_path, name, config, provisioner, argv=argv, env=env,
                         metadata=metadata)
        if km_config is not None:
            km_kwargs["config"] = km_config  # the manager's traitlets config
        km = AsyncKernelManager(kernel_name=name, **km_kwargs)
        record = [km, None, set()]
        started.append(record)
        await km.start_kernel(**(start_kwargs or {}))
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
            await shutdown_settled(km)
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

    for _ in range(3):
        reply = await kc.execute_interactive(code, timeout=timeout, output_hook=hook)
        if reply["content"]["status"] != "aborted":
            break
        # ipykernel aborts a request that reaches it just after an error's reply, before it
        # stops aborting its queue (stop_on_error): it never ran, and the proxy's own
        # thread makes such quick follow-ups more likely. Send it again. (Measured: of the
        # requests sent right after an error's reply, 19% aborted with ipykernel 6.17,
        # 8-15% with 6.29-6.31, ~1% with 7.4, the kernel image's since image version 3.)
        await asyncio.sleep(0.1)
    out["status"] = reply["content"]["status"]
    if out["status"] == "error":
        # What a client that reads only the reply (nbclient's CellExecutionError) sees.
        out["reply_error"] = f"{reply['content']['ename']}: {reply['content']['evalue']}"
        if out["error"] is None:
            out["error"] = out["reply_error"]
    return out


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Expose each phase's report on the item, so fixtures can dump logs on failure."""
    report = yield
    setattr(item, "rep_" + report.when, report)
    return report


def _docker_client():
    """A client of a daemon with the kernel image, or skip (fail under
    LIMITED_PROVISIONER_REQUIRE_DOCKER=1)."""
    try:
        return connect_docker()
    except DockerUnavailable as e:
        if os.environ.get("LIMITED_PROVISIONER_REQUIRE_DOCKER") == "1":
            pytest.fail(str(e))
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def docker_client():
    client = _docker_client()
    yield client
    # Whatever happened, no container of the test owner survives the session.
    remove_containers_with_label("owner", TEST_OWNER)


@pytest.fixture
def docker_cleanup():
    """``containers(kernel_id)`` lister (fails without Docker); afterwards removes the
    test owner's containers."""
    clients = []

    def containers(kernel_id):
        if not clients:
            clients.append(docker.from_env())
        return containers_of(clients[0], kernel_id)

    yield containers
    if clients:
        remove_containers_with_label("owner", TEST_OWNER)


def backends(runtimes: bool = False):
    """Parametrize over both backends: ``@pytest.mark.parametrize("backend", backends(),
    indirect=True)``; the docker case needs (or, in CI, requires) Docker. ``runtimes``:
    also the docker backend under gVisor, ``"limited-docker-provisioner+runsc"`` (the
    ``start_kernel`` fixture sets ``runtime``), which needs runsc registered with the
    daemon (.ci/setup-docker.sh)."""
    params = [
        pytest.param("limited-process-provisioner", id="process"),
        pytest.param("limited-docker-provisioner", id="docker", marks=pytest.mark.docker),
    ]
    if runtimes:
        params.append(pytest.param(f"limited-docker-provisioner+{GVISOR}", id=GVISOR,
                                   marks=[pytest.mark.docker, pytest.mark.runsc]))
    return params


GVISOR = "runsc"


def split_backend(backend: str) -> tuple[str, dict]:
    """("limited-docker-provisioner+runsc") -> the provisioner and its runtime config."""
    name, _, runtime = backend.partition("+")
    return name, ({"runtime": runtime} if runtime else {})


def _require_runtime(client, runtime: str) -> None:
    """Skip (fail under LIMITED_PROVISIONER_REQUIRE_DOCKER=1) unless the daemon has
    ``runtime``."""
    if runtime in (client.info().get("Runtimes") or {}):
        return
    msg = f"the Docker daemon has no runtime {runtime!r} (.ci/setup-docker.sh registers runsc)"
    if os.environ.get("LIMITED_PROVISIONER_REQUIRE_DOCKER") == "1":
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture
def backend(request):
    if "docker" in request.param:
        client = request.getfixturevalue("docker_client")
        runtime = split_backend(request.param)[1].get("runtime")
        if runtime:
            _require_runtime(client, runtime)
    return request.param
