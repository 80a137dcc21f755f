"""examples/agent_backend: the code-interpreter service the seed's API should have been.

Real kernels, real HTTP: the service runs as a uvicorn subprocess on a private state dir
and is driven with httpx. Every service is killed by pid and every kernel of its state
dir removed after the test (or module), whatever happened.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from limited_provisioner.registry import Registry

from .conftest import TEST_OWNER, backends
from .harness import AgentBackendService, alive, kernel_leftovers, remove_all_kernels

MARKER = "[limited-provisioner status={}]"
GONE = "variables from earlier cells are gone"
KEPT = "variables from earlier cells are kept"
# Resident memory grows by touched 1 MiB blocks: the cgroup (256M) kills the kernel
# before RLIMIT_DATA (mem_limit + 128M) turns it into a MemoryError.
MEMORY_EATER = "blocks = []\nwhile True:\n    blocks.append(b'x' * (1 << 20))"
SETTINGS = {
    "MEM_LIMIT": "256M",
    "PIDS_LIMIT": "64",
    "EXEC_TIMEOUT": "2",
    "EXEC_TIMEOUT_GRACE": "2",
    "IDLE_TIMEOUT": "600",
    "MAX_KERNELS": "12",
    "MAX_KERNELS_PER_USER": "2",
    "RATE_LIMIT": "5",
}


def new_service(log_dir: Path, **settings: str) -> AgentBackendService:
    """A service (not started) on a fresh private state dir, with SETTINGS + ``settings``."""
    # Short on purpose: the kernels' ipc socket paths live under it.
    state = Path(tempfile.mkdtemp(prefix="lp-", dir="/var/lib"))
    return AgentBackendService(state, "test-ab-" + uuid.uuid4().hex[:8], log_dir,
                               {**SETTINGS, **settings})


def remove_everything(services: list[AgentBackendService]) -> None:
    """Kill the services by pid, then every kernel their state dirs know of."""
    for service in services:
        service.close()
    for service in services:
        remove_all_kernels(service.state)


@pytest.fixture
def make_service(request, tmp_path, jupyter_path):
    """``make_service(**settings)`` -> a started service on a fresh state dir."""
    services: list[AgentBackendService] = []

    def _make(**settings: str) -> AgentBackendService:
        log_dir = tmp_path / f"svc{len(services)}"
        log_dir.mkdir()
        service = new_service(log_dir, **settings)
        services.append(service)
        service.start()
        return service

    yield _make
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        for service in services:
            print(service.logs(8000))
    remove_everything(services)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """One service shared by the module's tests; each test uses its own users."""
    svc = new_service(tmp_path_factory.mktemp("svc"))
    try:
        svc.start()
        yield svc
    finally:
        print(svc.logs(8000))
        remove_everything([svc])


@pytest.fixture
def opened(service):
    """Records (user, session_id) pairs a test opens and deletes them afterwards."""
    pairs: list[tuple[str, str]] = []
    yield pairs
    for user, session_id in pairs:
        service.delete(user, session_id)


def test_ok_and_error_are_reported_with_the_marker(service, opened):
    opened.append(("u-ok", "s1"))
    out = service.run("u-ok", "s1", "print('hi')\n1 + 1")
    assert out["status"] == "ok"
    assert out["stdout"] == "hi\n"
    assert out["outputs"][0]["text"] == "2"
    assert out["text"].startswith("hi\n2\n")
    assert out["text"].endswith(f"{MARKER.format('ok')} the execution finished; {KEPT}.")

    out = service.run("u-ok", "s1", "1/0")
    assert out["status"] == "error"
    (error,) = out["outputs"]
    assert (error["ename"], error["evalue"]) == ("ZeroDivisionError", "division by zero")
    assert "\x1b" not in "".join(error["traceback"]) + out["text"]
    assert "ZeroDivisionError: division by zero" in out["text"]
    assert MARKER.format("error") + " the code raised ZeroDivisionError" in out["text"]
    assert not out["state_lost"]

    # The OpenAPI schema an agent framework turns into a tool definition.
    schema = service.client.get(f"{service.base}/openapi.json").json()
    body = schema["components"]["schemas"]["ExecRequest"]
    assert set(body["required"]) == {"session_id", "code"}
    assert "X-User" in {p["name"] for p in schema["paths"]["/exec"]["post"]["parameters"]}


def test_exec_timeout_interrupts_and_the_session_goes_on(service, opened):
    opened.extend([("u-timeout", "s1"), ("u-timeout2", "s1")])
    service.run("u-timeout", "s1", "y = 5")
    out = service.run("u-timeout", "s1", "while True:\n    pass")
    assert (out["status"], out["limit"], out["state_lost"]) == ("timeout", "exec_timeout", False)
    assert "TimeoutError: execution exceeded exec_timeout=2s" in out["text"]
    assert MARKER.format("timeout") in out["text"] and KEPT in out["text"]
    assert service.run("u-timeout", "s1", "y")["outputs"][0]["text"] == "5"

    # Code that ignores the interrupt: the kernel is restarted after the grace period.
    service.run("u-timeout2", "s1", "y = 5")
    out = service.run(
        "u-timeout2", "s1",
        "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    pass",
    )
    assert (out["status"], out["state_lost"]) == ("timeout", True)
    assert "ignored the interrupt" in out["text"] and GONE in out["text"]
    assert service.run("u-timeout2", "s1", "'y' in globals()")["outputs"][0]["text"] == "False"


def test_oom_killed_kernel_is_restarted_and_said_so(service, opened):
    opened.append(("u-oom", "s1"))
    first = service.run("u-oom", "s1", "x = 1")
    out = service.run("u-oom", "s1", MEMORY_EATER)
    assert (out["status"], out["limit"], out["state_lost"]) == ("oom_killed", "mem_limit", True)
    assert "memory limit 256M exceeded" in out["reason"]
    assert MARKER.format("oom_killed") + " the kernel exceeded its memory limit 256M" in out["text"]
    assert GONE in out["text"]
    # Same session, same kernel id, a fresh process: usable, without the old variables.
    after = service.run("u-oom", "s1", "'x' in globals(), 1 + 1")
    assert after["outputs"][0]["text"] == "(False, 2)"
    assert after["kernel_id"] == first["kernel_id"]


@pytest.mark.parametrize("backend", backends()[1:], indirect=True)  # docker
def test_oom_killed_container_is_restarted_and_said_so(backend, make_service, docker_cleanup):
    service = make_service(BACKEND="docker", RATE_LIMIT="0")
    first = service.run(TEST_OWNER, "s1", "x = 1")
    out = service.run(TEST_OWNER, "s1", MEMORY_EATER)
    assert (out["status"], out["limit"], out["state_lost"]) == ("oom_killed", "mem_limit", True)
    assert "memory limit 256M exceeded (OOMKilled)" in out["reason"]
    assert MARKER.format("oom_killed") in out["text"]
    after = service.run(TEST_OWNER, "s1", "'x' in globals(), 1 + 1")
    assert after["outputs"][0]["text"] == "(False, 2)"
    assert after["kernel_id"] == first["kernel_id"]


def test_per_user_kernel_cap_is_enforced_by_the_provisioner(service, opened):
    opened.extend([("u-cap", "a"), ("u-cap", "b"), ("u-cap2", "c")])
    assert service.run("u-cap", "a", "1")["status"] == "ok"
    assert service.run("u-cap", "b", "1")["status"] == "ok"
    resp = service.exec("u-cap", "c", "1")
    assert resp.status_code == 429
    out = resp.json()
    assert (out["status"], out["limit"]) == ("limit_refused", "max_kernels_per_user")
    assert "max_kernels_per_user=2 reached" in out["reason"]
    assert out["text"].startswith(MARKER.format("limit_refused") + " nothing was executed: max_k")
    assert len(service.kernels(owner="u-cap")) == 2  # the refused start left nothing
    assert service.run("u-cap2", "c", "1")["status"] == "ok"  # the cap is per user


def test_rate_limit_answers_429_with_retry_after(service, opened):
    opened.append(("u-rate", "s1"))
    for _ in range(5):
        assert service.run("u-rate", "s1", "1")["status"] == "ok"
    resp = service.exec("u-rate", "s1", "1")
    assert resp.status_code == 429
    assert int(resp.headers["Retry-After"]) > 0
    out = resp.json()
    assert (out["status"], out["limit"]) == ("limit_refused", "rate_limit")
    assert out["text"].startswith(MARKER.format("limit_refused") + " nothing was executed: rate_l")
    opened.append(("u-rate2", "s1"))
    assert service.run("u-rate2", "s1", "1")["status"] == "ok"  # other users are not limited


def test_delete_shuts_the_kernel_down(service, opened):
    opened.append(("u-del", "s1"))
    kernel_id = service.run("u-del", "s1", "1")["kernel_id"]
    (entry,) = service.kernels(labels={"session_id": "s1"}, owner="u-del")
    assert entry["kernel_id"] == kernel_id
    assert [s["session_id"] for s in service.sessions("u-del")] == ["s1"]
    assert service.delete("u-del", "s1").status_code == 200
    assert alive([entry["pid"]]) == []
    assert service.kernels(owner="u-del") == []
    assert Registry(service.state).read(kernel_id) is None
    assert not (service.state / "kernels" / kernel_id).exists()
    assert service.sessions("u-del") == []
    assert service.delete("u-del", "s1").status_code == 404


def test_idle_kernel_is_culled_and_the_session_starts_afresh(make_service):
    service = make_service(IDLE_TIMEOUT="2", RATE_LIMIT="0")
    first = service.run("u-idle", "s1", "x = 1")
    (entry,) = service.kernels()
    for _ in range(600):  # the provisioner culls it after 2 s without activity
        if not service.kernels():
            break
        time.sleep(0.1)
    assert service.kernels() == [] and alive([entry["pid"]]) == []
    out = service.run("u-idle", "s1", "'x' in globals()")
    assert out["outputs"][0]["text"] == "False"
    assert out["kernel_id"] != first["kernel_id"]
    (notice,) = out["notices"]
    assert "previous kernel was shut down (idle for more than idle_timeout=2s" in notice
    assert f"[limited-provisioner notice] {notice}" in out["text"]


ORPHAN = r"""
import asyncio, os, sys
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
async def main():
    ksm = KernelSpecManager(kernel_dirs=[sys.argv[1]])
    km = AsyncKernelManager(kernel_spec_manager=ksm, kernel_name="agent-python")
    await km.start_kernel()  # no session label: nothing will ever ask for this kernel
    print(km.kernel_id, flush=True)
    os._exit(0)
asyncio.run(main())
"""


@pytest.mark.parametrize("backend", backends(), indirect=True)
def test_restart_readopts_sessions_without_duplicates(backend, make_service, docker_cleanup):
    kind = "docker" if "docker" in backend else "process"
    service = make_service(BACKEND=kind, RATE_LIMIT="0")
    # Two users' sessions (docker containers carry the owner label the fixtures clean by).
    users = [TEST_OWNER, TEST_OWNER + "-b"] if kind == "docker" else ["u-a", "u-b"]
    for user in users:
        assert service.run(user, "chat", "x = 41")["status"] == "ok"
    before = {k["kernel_id"] for k in service.kernels()}
    assert len(before) == 2

    service.kill9()
    # A kernel of this service whose session is gone (here: it never had one).
    spec_dir = service.state / "agent-backend-kernelspecs"
    # A file, not a pipe: the kernel inherits it and would hold a pipe open.
    out_file = service.log_dir / "orphan.out"
    with open(out_file, "w") as out:
        subprocess.run([sys.executable, "-c", ORPHAN, str(spec_dir)], env=service.env,
                       stdout=out, stderr=subprocess.STDOUT, timeout=120, check=True)
    orphan_id = out_file.read_text().strip().splitlines()[-1]
    orphan_entry = Registry(service.state).read(orphan_id)
    assert {k["kernel_id"] for k in service.kernels()} == before | {orphan_id}

    for restart in ("kill -9", "clean stop"):
        service.start()
        for user in users:
            out = service.run(user, "chat", "x + 1")
            assert out["outputs"][0]["text"] == "42", (restart, out)
            assert [s["session_id"] for s in service.sessions(user)] == ["chat"]
        assert {k["kernel_id"] for k in service.kernels()} == before, restart
        if restart == "kill -9":
            service.kill9()
        else:
            service.stop()
    assert Registry(service.state).read(orphan_id) is None
    if kind == "process":
        assert alive([orphan_entry["pid"]]) == []
    else:
        assert docker_cleanup(orphan_id) == []


def test_a_kernel_that_cannot_start_in_its_sandbox_is_a_503(make_service):
    """The session's kernel cannot be set up in its sandbox (here: its interpreter is
    missing): 503 JSON with the launcher's words, and no kernel or session left."""
    service = make_service(KERNEL_PYTHON="/nonexistent/python")
    resp = service.exec("u-broken", "s1", "print(1)")
    assert resp.status_code == 503, resp.text
    out = resp.json()
    assert out["status"] == "error"
    assert "exec '/nonexistent/python' failed" in out["reason"], out
    assert "no kernel could be started" in out["text"]
    assert service.sessions("u-broken") == []
    assert service.kernels() == []
    assert kernel_leftovers(service.state) == dict.fromkeys(
        ("registry entries", "kernel dirs", "cgroups", "processes", "containers"), 0
    )
