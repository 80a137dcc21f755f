"""examples/agent_backend: who is calling (auth.py, keys.py).

Most of it needs no kernel: the app is driven in-process (``TestClient`` without its
lifespan, on an empty private state dir) or the service is started and asked only
``/health`` and ``/sessions``. The hidden-user checks run real kernels: another user's
session is a 404 on every endpoint, and ``/exec`` on its id reaches a kernel of the
caller's own.
"""

from __future__ import annotations

import hmac
import json
import os
import stat
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from .conftest import TEST_OWNER, backends
from .harness import EXAMPLES, AgentBackendService, agent_backend_keys, remove_all_kernels

keys = agent_backend_keys()  # puts examples/ on sys.path
from agent_backend import auth
from agent_backend.app import create_app, current_user
from agent_backend.settings import Settings

BEARER = 'Bearer realm="agent_backend"'


@pytest.fixture
def state(tmp_path):
    path = tmp_path / "state"
    path.mkdir(mode=0o700)
    return path


def client(state: Path, **settings) -> TestClient:
    """The app in-process, without its lifespan: no kernel is started or adopted."""
    return TestClient(create_app(Settings(state_dir=str(state), **settings)))


def keys_path(state: Path) -> Path:
    return Path(Settings(state_dir=str(state)).keys_path)


def assert_401(resp, *words: str) -> str:
    assert resp.status_code == 401, resp.text
    assert resp.headers["WWW-Authenticate"].startswith(BEARER)
    detail = resp.json()["detail"]
    for word in words:
        assert word in detail, detail
    return detail


# -- the keys file and the comparison ---------------------------------------------------


def test_verify_compares_every_hash_in_constant_time(monkeypatch):
    entries = [keys.KeyEntry(f"u{i}", f"{i:08x}", keys.digest(f"key-{i}")) for i in range(5)]
    calls = []
    real = hmac.compare_digest

    def counting(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    for key, expected in (("key-0", entries[0]), ("key-4", entries[4]), ("nope", None)):
        calls.clear()
        assert auth.verify(entries, key) == expected
        # Every entry, whether the match is first, last or absent: the time says nothing.
        assert [a for a, _ in calls] == [e.digest for e in entries]
        assert {b for _, b in calls} == {keys.digest(key)}


def test_keys_cli_adds_lists_and_revokes_and_stores_only_hashes(state):
    env = {**os.environ, "AGENT_BACKEND_STATE_DIR": str(state), "PYTHONPATH": os.pathsep.join(
        [str(EXAMPLES.parent), os.environ.get("PYTHONPATH", "")])}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "agent_backend", "keys", *args],
                              cwd=EXAMPLES, env=env, capture_output=True, text=True, timeout=60,
                              check=False)

    added = cli("add", "alice")
    assert added.returncode == 0, added.stderr
    key = added.stdout.strip()
    assert key.startswith("abk_") and len(key) > 50
    assert "shown only this once" in added.stderr and key not in added.stderr
    path = keys_path(state)
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
    text = path.read_text()
    assert key not in text and keys.digest(key).hex() in text
    (entry,) = keys.load(path)
    assert (entry.user, key.split("_")[1]) == ("alice", entry.key_id)

    assert cli("add", "bob").returncode == 0
    listed = cli("list")
    assert [line.split("\t")[:2] for line in listed.stdout.splitlines()] == [
        ["alice", entry.key_id], ["bob", keys.load(path)[1].key_id]]
    assert key not in listed.stdout + listed.stderr

    assert cli("revoke", "alice", "--key-id", "00000000").returncode == 1
    assert cli("add", "no/such user").returncode == 1
    revoked = cli("revoke", "alice", "--key-id", entry.key_id)
    assert revoked.returncode == 0, revoked.stderr
    assert [e.user for e in keys.load(path)] == ["bob"]


@pytest.mark.parametrize("problem", [
    "group-readable", "world-readable", "dir-group-writable", "other-owner", "fifo",
    "too-large", "not-json", "bad-digest",
])
def test_an_unsafe_or_malformed_keys_file_is_refused(state, problem):
    path = keys_path(state)
    keys.add_key(path, "alice")
    if problem == "group-readable":
        os.chmod(path, 0o640)
    elif problem == "world-readable":
        os.chmod(path, 0o604)
    elif problem == "dir-group-writable":
        os.chmod(state, 0o770)
    elif problem == "other-owner":
        os.chown(path, 65534, 65534)
    elif problem == "fifo":
        path.unlink()
        os.mkfifo(path, 0o600)  # opened O_NONBLOCK: refused, never waited on
    elif problem == "too-large":
        path.write_text(" " * (keys.MAX_FILE_SIZE + 1))
    elif problem == "not-json":
        path.write_text("{")
    else:
        path.write_text(json.dumps({"users": {"alice": [{"id": "00000000", "sha256": "x"}]}}))
    with pytest.raises(keys.KeysFileError) as e:
        keys.load(path)
    expected = {"group-readable": "chmod 600", "world-readable": "chmod 600",
                "dir-group-writable": "chmod go-w", "other-owner": "owned by uid 65534",
                "fifo": "not a regular file", "too-large": "larger than",
                "not-json": "not JSON", "bad-digest": "sha256 hex digest"}[problem]
    assert expected in str(e.value)
    # The service refuses to start with it, and says why ...
    app = create_app(Settings(state_dir=str(state)))
    with pytest.raises(keys.KeysFileError, match=expected.split()[0]), TestClient(app):
        pass
    # ... and refuses every request (503) should it turn up while the service runs.
    resp = TestClient(app).get("/sessions", headers={"Authorization": "Bearer abk_x"})
    assert resp.status_code == 503 and expected in resp.json()["detail"]


# -- the modes, in-process ---------------------------------------------------------------


def test_api_keys_mode_accepts_only_the_users_own_valid_key(state):
    path = keys_path(state)
    alice_id, alice = keys.add_key(path, "alice")
    _, bob = keys.add_key(path, "bob")
    c = client(state)

    def sessions(**headers: str):
        return c.get("/sessions", headers=headers)

    assert sessions(**{"X-User": "alice", "Authorization": f"Bearer {alice}"}).json() == []
    # The key names its user: X-User may be left out.
    assert sessions(Authorization=f"Bearer {alice}").status_code == 200
    assert_401(sessions(**{"X-User": "alice"}), "missing 'Authorization: Bearer <key>'")
    assert_401(sessions(), "missing 'Authorization: Bearer <key>'")
    wrong = assert_401(sessions(**{"X-User": "alice", "Authorization": "Bearer abk_0_nope"}),
                       "invalid API key of user 'alice'")
    assert 'error="invalid_token"' in sessions(Authorization="Bearer x").headers[
        "WWW-Authenticate"]
    # Bob's key is no key of alice's; the answer is the same as for an unknown key.
    other = assert_401(sessions(**{"X-User": "alice", "Authorization": f"Bearer {bob}"}))
    assert other == wrong and bob not in other
    assert_401(sessions(**{"X-User": "alice", "Authorization": f"Basic {alice}"}),
               "must be 'Bearer <key>'")
    assert_401(sessions(Authorization="Bearer " + "k" * 300), "invalid API key")
    # A malformed X-User is a 422, as before.
    assert sessions(**{"X-User": "a/b", "Authorization": f"Bearer {alice}"}).status_code == 422

    # Revoked: refused at the next request (the file is re-read when it changes).
    keys.revoke(path, "alice", alice_id)
    assert_401(sessions(**{"X-User": "alice", "Authorization": f"Bearer {alice}"}),
               "invalid API key")
    assert sessions(**{"X-User": "bob", "Authorization": f"Bearer {bob}"}).status_code == 200


def test_unconfigured_refuses_everything_but_health_naming_both_fixes(state):
    c = client(state)
    assert c.get("/health").status_code == 200
    for method, url in (("GET", "/sessions"), ("DELETE", "/sessions/s1"),
                        ("POST", "/exec")):
        resp = c.request(method, url, headers={"X-User": "alice"},
                         json={"session_id": "s1", "code": "1"})
        assert_401(resp, "authentication is not configured", "keys add USER",
                   "AGENT_BACKEND_TRUST_X_USER=1", str(keys_path(state)))
    # Authentication comes before the body is looked at: no 422 for strangers.
    assert_401(c.post("/exec", json={"bad": 1}), "authentication is not configured")
    # The first key turns keys on, without a restart.
    _, key = keys.add_key(keys_path(state), "alice")
    assert c.get("/sessions", headers={"Authorization": f"Bearer {key}"}).status_code == 200


def test_trusted_proxy_mode_takes_x_user_as_given(state):
    keys.add_key(keys_path(state), "alice")  # ignored in this mode
    c = client(state, trust_x_user=True)
    assert c.get("/sessions", headers={"X-User": "alice"}).json() == []
    assert c.get("/sessions", headers={"X-User": "bob"}).status_code == 200
    assert_401(c.get("/sessions"), "missing X-User header")
    with pytest.raises(ValueError, match="not both"):
        Settings(state_dir=str(state), trust_x_user=True, keys_file=str(state / "k.json"))


def test_every_endpoint_but_health_authenticates_through_current_user(state):
    """Endpoints added later (the files API) get authentication by using current_user."""

    def calls(dependant) -> set:
        return {dependant.call} | {c for d in dependant.dependencies for c in calls(d)}

    app = create_app(Settings(state_dir=str(state)))
    routes = [r for r in app.routes if isinstance(r, APIRoute)]
    assert {"/exec", "/sessions", "/sessions/{session_id}", "/health"} <= {r.path for r in routes}
    for route in routes:
        if route.path != "/health":
            assert current_user in calls(route.dependant), route.path
    assert set(client(state).get("/health").json()) == {"status", "sessions", "server_id"}


# -- the service, with kernels -------------------------------------------------------------


def new_service(tmp_path: Path, auth_mode: str = "keys", **settings: str) -> AgentBackendService:
    state = Path(tempfile.mkdtemp(prefix="lp-", dir="/var/lib"))  # short: ipc socket paths
    log_dir = tmp_path / f"log-{uuid.uuid4().hex[:6]}"
    log_dir.mkdir()
    return AgentBackendService(state, "test-auth-" + uuid.uuid4().hex[:8], log_dir, {
        "MEM_LIMIT": "256M", "RATE_LIMIT": "0", "MAX_KERNELS": "6",
        "MAX_KERNELS_PER_USER": "2", "IDLE_TIMEOUT": "600", **settings,
    }, auth=auth_mode)


@pytest.fixture
def services(request, tmp_path):
    started: list[AgentBackendService] = []

    def make(auth_mode: str = "keys", start: bool = True, **settings: str):
        service = new_service(tmp_path, auth_mode, **settings)
        started.append(service)
        if start:
            service.start()
        return service

    yield make
    rep = getattr(request.node, "rep_call", None)
    for service in started:
        service.close()
        if rep is not None and rep.failed:
            print(service.logs(8000))
    for service in started:
        remove_all_kernels(service.state)  # and the state dir


def test_the_service_logs_its_mode_and_refuses_to_start_on_an_unsafe_keys_file(services):
    unconfigured = services()
    assert "auth mode unconfigured" in unconfigured.logs()
    resp = unconfigured.client.get(f"{unconfigured.base}/sessions", headers={"X-User": "a"})
    assert_401(resp, "authentication is not configured")
    assert unconfigured.client.get(f"{unconfigured.base}/health").status_code == 200

    proxy = services("proxy")
    assert "auth mode trusted_proxy" in proxy.logs()
    assert proxy.sessions("alice") == []

    unsafe = services(start=False)
    unsafe.headers("alice")  # issues a key: the keys file exists
    os.chmod(unsafe.keys_file, 0o644)
    with pytest.raises(RuntimeError, match="service exited") as e:
        unsafe.start()
    assert "has mode 0644: chmod 600 it" in str(e.value)
    assert unsafe.kernels() == []


@pytest.mark.parametrize("backend", backends(), indirect=True)
def test_another_users_session_is_hidden_on_every_endpoint(backend, services, docker_cleanup):
    kind = "docker" if "docker" in backend else "process"
    service = services(BACKEND=kind)
    alice, bob = TEST_OWNER, TEST_OWNER + "-b"  # docker containers carry the test owner
    mine = service.run(alice, "secret-chat", "secret = 'alice-only'\nimport os; os.getpid()")
    assert mine["status"] == "ok"

    # A key of another user, or a revoked key: 401, and nothing reaches a kernel.
    bob_headers = service.headers(bob)
    as_alice_with_bobs_key = {**bob_headers, "X-User": alice}
    resp = service.client.post(f"{service.base}/exec", headers=as_alice_with_bobs_key,
                               json={"session_id": "secret-chat", "code": "secret"})
    assert_401(resp, "invalid API key of user")

    # Bob cannot see, delete or reach alice's session: 404 / not listed / a kernel of his.
    assert service.sessions(bob) == []
    resp = service.delete(bob, "secret-chat")
    assert resp.status_code == 404 and repr(alice) not in resp.text
    theirs = service.run(bob, "secret-chat", "'secret' in globals()")
    assert theirs["outputs"][0]["text"] == "False"
    assert theirs["kernel_id"] != mine["kernel_id"]
    owners = {k["kernel_id"]: k["owner"] for k in service.kernels()}
    assert owners == {mine["kernel_id"]: alice, theirs["kernel_id"]: bob}
    assert [s["kernel_id"] for s in service.sessions(bob)] == [theirs["kernel_id"]]
    assert [s["kernel_id"] for s in service.sessions(alice)] == [mine["kernel_id"]]
    # Alice's session is untouched.
    assert service.run(alice, "secret-chat", "secret")["outputs"][0]["text"] == "'alice-only'"

    # Revoked: 401 at once, the session stays.
    gone = service.api_keys[alice]
    keys.revoke(service.keys_file, alice)
    resp = service.exec(alice, "secret-chat", "secret")
    assert_401(resp, "invalid API key")
    assert len(service.kernels(owner=alice)) == 1

    # No key reached the log.
    log = service.logs()
    # (The service started before the first key: the harness issues them on first use.)
    assert "auth mode unconfigured" in log and "read: 2 key(s)" in log
    assert "refused a request of user" in log
    assert gone not in log and service.api_keys[bob] not in log and "abk_" not in log
