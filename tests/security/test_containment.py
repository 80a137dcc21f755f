"""Containment, classes 1-5 of SECURITY.md, with real kernels on both backends.

The code in the kernel is the attacker; every verdict is taken from the host (as root):
files, owners, modes, sockets, the frames clients receive. What the kernel prints is only
used for what it says about its *own* attempts (which call failed with which errno), and
each test has a positive control so that it can fail.

Classes 6-10 are in test_containment_limits.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import stat
import time
import uuid
from pathlib import Path

import psutil
import pytest
import zmq
import zmq.asyncio

from ..conftest import backends, run
from ..harness import kernel_pids
from .containment import (
    DENIED,
    KERNEL_SOCKETS,
    PROBE_BOUND,
    RssPeak,
    code_with,
    environ_of,
    is_docker,
    kernel_main_pid,
    limits,
    probe_latency,
    run_json,
    run_ok,
    tcp_listeners,
    wait_for,
    wait_restarted,
)

# -- class 1: root never follows a kernel's path -------------------------------------------

# Runs at every start of the kernel: from IPython's startup dir (after the kernel bound
# its sockets) and, where the interpreter has a user site (the image's python), from
# usercustomize (before it bound them, while sock/ is still the kernel's).
STARTUP_PLANT = '''
def _lp_plant():
    import errno, json, os
    sock = KD + "/sock"
    out = {}

    def attempt(label, fn):
        try:
            fn()
            out[label] = "OK"
        except OSError as e:
            out[label] = errno.errorcode.get(e.errno, str(e.errno))

    def planted_dir():
        os.mkdir(sock + "/d")
        os.symlink(DECOYDIR, sock + "/d/link")

    attempt("sock/k-6 -> decoy", lambda: os.symlink(DECOY, sock + "/k-6"))
    attempt("sock/k-0 fifo", lambda: os.mkfifo(sock + "/k-0"))
    attempt("sock/d/link -> decoy dir", planted_dir)
    with open(KD + "/work/startup-plant-" + WHERE + ".json", "a") as f:
        f.write(json.dumps(out) + "\\n")


try:
    _lp_plant()
except Exception:
    pass
del _lp_plant
'''

PLANT = r'''
import errno, json, os, socket, sys

res_root, res_kernel = {}, {}

def attempt(into, label, fn):
    try:
        fn()
        into[label] = "OK"
    except OSError as e:
        into[label] = errno.errorcode.get(e.errno, str(e.errno))

def replace(path, make):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    make(path)

def link(target):
    return lambda path: os.symlink(target, path)

def bind(path):
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(path)
    finally:
        s.close()

def append(path):
    with open(path, "a") as f:
        f.write("x")

C, S, W, N = KD + "/ctl", KD + "/sock", KD + "/work", KD + "/conn"
for label, fn in {
    "ctl: symlink -> decoy": lambda: os.symlink(DECOY, C + "/notice.planted"),
    "ctl: fifo": lambda: os.mkfifo(C + "/notice.fifo"),
    "ctl: unlink hooks.py": lambda: os.unlink(C + "/hooks.py"),
    "ctl: rename hooks.py": lambda: os.rename(C + "/hooks.py", C + "/hooks.old"),
    "ctl: append to hooks.py": lambda: append(C + "/hooks.py"),
    "ctl: chmod": lambda: os.chmod(C, 0o777),
    "kernel dir: symlink -> decoy": lambda: os.symlink(DECOY, KD + "/kernel.log.1"),
    "kernel dir: symlink -> decoy dir": lambda: os.symlink(DECOYDIR, KD + "/ctl2"),
    "kernel dir: fifo": lambda: os.mkfifo(KD + "/notice"),
    "kernel dir: chmod": lambda: os.chmod(KD, 0o777),
    "sock: symlink -> decoy": lambda: os.symlink(DECOY, S + "/k-6"),
    "sock: fifo": lambda: os.mkfifo(S + "/k-0"),
    "sock: unlink k-1": lambda: os.unlink(S + "/k-1"),
    "sock: rename k-1": lambda: os.rename(S + "/k-1", S + "/k-9"),
    "sock: bind k-7": lambda: bind(S + "/k-7"),
    "sock: chmod": lambda: os.chmod(S, 0o777),
}.items():
    attempt(res_root, label, fn)

for label, fn in {
    "conn/connection.json -> decoy": lambda: replace(N + "/connection.json", link(DECOY)),
    "conn/.connection.json.tmp -> decoy": lambda: replace(N + "/.connection.json.tmp", link(DECOY)),
    "conn/kernel.log -> decoy": lambda: replace(N + "/kernel.log", link(DECOY)),
    "conn/notice fifo": lambda: replace(N + "/notice", os.mkfifo),
    "work/kernel.log -> decoy": lambda: replace(W + "/kernel.log", link(DECOY)),
    "work/connection.json -> decoy": lambda: replace(W + "/connection.json", link(DECOY)),
    "work/hooks.py -> decoy": lambda: replace(W + "/hooks.py", link(DECOY)),
    "work/notice fifo": lambda: replace(W + "/notice", os.mkfifo),
    "work/escape -> decoy dir": lambda: replace(W + "/escape", link(DECOYDIR)),
    "work/sock -> decoy dir": lambda: replace(W + "/sock", link(DECOYDIR)),
    "work/ctl -> decoy dir": lambda: replace(W + "/ctl", link(DECOYDIR)),
}.items():
    attempt(res_kernel, label, fn)

def startup_files():
    startup = W + "/.ipython/profile_default/startup"
    os.makedirs(startup, exist_ok=True)
    with open(startup + "/00-lp-plant.py", "w") as f:
        f.write(PRELUDE + "WHERE = 'ipython'\n" + STARTUP)
    site = W + "/.local/lib/python%d.%d/site-packages" % sys.version_info[:2]
    os.makedirs(site, exist_ok=True)
    with open(site + "/usercustomize.py", "w") as f:
        f.write(PRELUDE + "WHERE = 'usercustomize'\n" + STARTUP)

attempt(res_kernel, "startup files", startup_files)
print(json.dumps({"root": res_root, "kernel": res_kernel}))
'''

MEMORY_HOG = "a = []\nwhile True:\n    a.append(bytearray(2**20))"
IGNORE_INTERRUPT = (
    "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    pass"
)


def read_connection_file(prov) -> dict:
    """The kernel's conn/connection.json, read without following a link."""
    path = Path(prov.kernel_dir) / "conn" / "connection.json"
    with open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW)) as f:
        return json.load(f)


def kernel_dir_state(prov) -> dict:
    """What the server's kernel dir looks like from the host."""
    kd = Path(prov.kernel_dir)
    sock = kd / "sock"
    conn = kd / "conn" / "connection.json"
    return {
        "kernel dir": sorted(os.listdir(kd)),
        "ctl": sorted(os.listdir(kd / "ctl")),
        "sock": sorted(os.listdir(sock)),
        "sock dir": os.lstat(sock),
        "conn file": os.lstat(conn),
    }


def assert_kernel_dir_sound(prov, main_pid: int) -> None:
    kd = Path(prov.kernel_dir)
    uid = prov.uid
    state = kernel_dir_state(prov)
    assert set(state["kernel dir"]) <= {"ctl", "conn", "work", "sock", "kernel.log", "disk"}, state
    assert set(state["ctl"]) <= {"hooks.py", "notice"}, state
    st = state["sock dir"]
    assert stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o700, (
        f"sock/ is not root's 0700: uid {st.st_uid} mode {oct(st.st_mode)}")
    assert set(state["sock"]) == KERNEL_SOCKETS, f"sock/ holds {state['sock']}"
    for name in KERNEL_SOCKETS:
        sst = os.lstat(kd / "sock" / name)
        assert stat.S_ISSOCK(sst.st_mode) and sst.st_uid == uid, (name, sst)
    cst = state["conn file"]
    assert stat.S_ISREG(cst.st_mode), f"conn/connection.json is {stat.filemode(cst.st_mode)}"
    assert cst.st_uid == uid and stat.S_IMODE(cst.st_mode) == 0o600, cst
    info = read_connection_file(prov)
    assert info["transport"] == "ipc" and info["ip"] == str(kd / "sock" / "k"), info
    # The kernel process runs in its own work dir, as its own uid.
    work = kd / "work"
    assert os.readlink(f"/proc/{main_pid}/cwd") == str(work)
    cwd, wst = os.stat(f"/proc/{main_pid}/cwd"), os.stat(work)
    assert (cwd.st_dev, cwd.st_ino) == (wst.st_dev, wst.st_ino), "cwd is not the work dir"
    assert set(psutil.Process(main_pid).uids()) == {uid}


@pytest.mark.parametrize("backend", backends(), indirect=True)
async def test_root_never_follows_paths_the_kernel_plants(backend, lp_kernels, lp_decoy):
    """Class 1: links and FIFOs everywhere the kernel can reach in its kernel dir, then an
    exec_timeout interrupt, an auto-restart (interrupt ignored), an OOM kill + restart
    and a plain restart: root changed nothing it should not have."""
    _probe_km, probe_kc = await lp_kernels(limits(), backend)
    km, kc = await lp_kernels(limits(exec_timeout=2, exec_timeout_grace=1), backend)
    prov = km.provisioner
    kd = str(prov.kernel_dir)
    values = {"KD": kd, "DECOY": str(lp_decoy.secret), "DECOYDIR": str(lp_decoy.dir)}
    prelude = "".join(f"{k} = {v!r}\n" for k, v in values.items())
    plant = code_with(PLANT, PRELUDE=prelude, STARTUP=STARTUP_PLANT, **values)

    async def plant_everywhere(when: str) -> None:
        result = await run_json(kc, plant)
        wrong = {k: v for k, v in result["root"].items() if v not in DENIED}
        assert not wrong, f"{when}: the kernel changed root-owned places: {wrong}"
        failed = {k: v for k, v in result["kernel"].items() if v != "OK"}
        assert not failed, f"{when}: could not plant in its own dirs: {failed}"

    await plant_everywhere("first start")

    # 1. exec_timeout interrupt (root writes ctl/notice), a probe kernel answering meanwhile.
    pid = kernel_main_pid(km)
    task = asyncio.ensure_future(run_ok(kc, "while True:\n    pass", timeout=30))
    await asyncio.sleep(0.5)
    latency = await probe_latency(probe_kc)
    out = await task
    assert out["status"] == "error" and out["error"].startswith("TimeoutError"), out
    assert latency < PROBE_BOUND, f"probe kernel answered in {latency:.2f}s"
    await plant_everywhere("after the interrupt")

    # 2. The interrupt ignored: the provisioner restarts the kernel by itself.
    task = asyncio.ensure_future(run(kc, IGNORE_INTERRUPT, timeout=60))
    pid = await wait_restarted(km, kc, pid, cancel=task)
    assert any("restarted" in t["reason"] for t in prov.limit_trips), prov.limit_trips
    await plant_everywhere("after the auto-restart")

    # 3. Memory limit: the kernel is killed; restarted through the manager.
    task = asyncio.ensure_future(run(kc, MEMORY_HOG, timeout=60))
    await wait_for(lambda: _dead(km), 40, what="the OOM kill")
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    assert any(t["kind"] == "mem_limit" for t in prov.limit_trips), prov.limit_trips
    await km.restart_kernel(now=True)
    pid = await wait_restarted(km, kc, pid)
    await plant_everywhere("after the OOM restart")

    # 4. A plain restart.
    await km.restart_kernel(now=True)
    pid = await wait_restarted(km, kc, pid)

    lp_decoy.assert_untouched()
    assert_kernel_dir_sound(prov, pid)
    plants = sorted(p.name for p in (Path(kd) / "work").glob("startup-plant-*.json"))
    assert "startup-plant-ipython.json" in plants, f"the startup plant never ran: {plants}"
    if is_docker(backend):
        # The image's python has a user site: usercustomize ran before the kernel bound
        # its sockets, while sock/ was still the kernel's; the freeze removed what it put.
        assert "startup-plant-usercustomize.json" in plants, plants

    await km.shutdown_kernel(now=True)
    lp_decoy.assert_untouched()
    assert not os.path.lexists(kd), "kernel dir left after shutdown"


async def _dead(km) -> bool:
    return not await km.is_alive()


SWAP_DIRS = r'''
import os, time
race = KD + "/work/race"
os.makedirs(race, exist_ok=True)
names = ["r%d" % i for i in range(64)]
rounds, stop = 0, time.time() + SECONDS
while time.time() < stop:
    for make in ("link", "dir"):
        for name in names:
            path = race + "/" + name
            try:
                os.rmdir(path) if make == "link" else os.unlink(path)
            except OSError:
                pass
            try:
                os.symlink(DECOYDIR, path) if make == "link" else os.mkdir(path)
            except OSError:
                pass
    rounds += 1
print(rounds)
'''


@pytest.mark.parametrize("backend", backends(), indirect=True)
async def test_disk_watch_never_follows_a_directory_swapped_for_a_link(
    backend, lp_kernels, lp_decoy
):
    """Class 1 (and 2: "work-dir sizes are walked by fd"): while the watchdog measures
    work/, the kernel keeps swapping 64 subdirectories for links to a root-only dir and
    back, for 4 s (watchdog_interval 0.1: a disk walk every 0.4 s). Root must never
    open the decoy (inotify sees every open). The watchdog walks work/ only where it is
    no filesystem of its own: as on a host without loop devices."""
    km, kc = await lp_kernels(limits(watchdog_interval=0.1, own_filesystem="off"), backend)
    watchdog = km.provisioner.watchdog
    code = code_with(SWAP_DIRS, KD=str(km.provisioner.kernel_dir), DECOYDIR=str(lp_decoy.dir),
                     SECONDS=4.0)
    out = await run_ok(kc, code, timeout=60)
    assert out["status"] == "ok" and int(out["stdout"]) > 10, out
    assert watchdog is not None and watchdog.disk_checks > 0, "no disk walk ran"
    lp_decoy.assert_untouched()


# -- class 2: kernel data only makes enforcement stricter ----------------------------------

FORGE_IDLE = r'''
import threading, time
k = get_ipython().kernel
parent = k.get_parent("shell")

def forge():
    while True:
        k.session.send(k.iopub_socket, "status", {"execution_state": "idle"}, parent=parent)
        time.sleep(0.1)

threading.Thread(target=forge, daemon=True).start()
while True:
    pass
'''


@pytest.mark.parametrize("backend", backends(), indirect=True)
async def test_forged_idle_status_does_not_stop_exec_timeout(backend, lp_kernels):
    """Class 2a: the kernel signs 'status: idle' for the running cell every 0.1 s; the
    proxy still counts the execution as running and the cell is interrupted."""
    exec_timeout = 3
    km, kc = await lp_kernels(limits(exec_timeout=exec_timeout, exec_timeout_grace=5), backend)
    prov = km.provisioner
    seen_idle: list[float] = []
    t0 = time.monotonic()

    def hook(msg):
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            seen_idle.append(time.monotonic() - t0)

    task = asyncio.ensure_future(kc.execute_interactive(FORGE_IDLE, timeout=30, output_hook=hook))
    await asyncio.sleep(1.5)
    # The forgery reached the client (it is signed with the session key)...
    assert seen_idle and seen_idle[0] < 1.5, f"no forged idle seen: {seen_idle}"
    # ...and changed nothing on the server's side.
    assert prov.connection.traffic.executing is not None, "the proxy believed the forged idle"
    reply = await task
    elapsed = time.monotonic() - t0
    assert reply["content"]["status"] == "error", reply["content"]
    assert reply["content"]["ename"] == "TimeoutError", reply["content"]
    assert elapsed < exec_timeout + 5, f"interrupted only after {elapsed:.1f}s"


PLANT_NAMES = [
    "executing", "notice", "connection.json", "kernel.log", "hooks.py", "exec_state",
    "activity", "last_activity", "status", "stdout", "stderr", "output",
    ".connection.json.tmp", "usage",
]

PLANT_TRAPS = r'''
import json, os
planted = []
for d in (KD + "/work", KD + "/conn"):
    for name in NAMES:
        path = d + "/" + name
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        if KIND == "fifo":
            os.mkfifo(path)
        else:
            os.symlink("/dev/zero", path)
        planted.append(path)
print(json.dumps(planted))
'''


@pytest.mark.parametrize("backend", backends(), indirect=True)
async def test_fifos_and_dev_zero_links_are_never_read(backend, lp_kernels):
    """Class 2b: FIFOs, then links to /dev/zero, at every name in work/ and conn/; an
    interrupt and a restart each time: the server neither blocks nor swells, and a
    second kernel keeps answering."""
    _probe_km, probe_kc = await lp_kernels(limits(), backend)
    km, kc = await lp_kernels(limits(exec_timeout=2, exec_timeout_grace=3), backend)
    prov = km.provisioner
    kd = str(prov.kernel_dir)
    rss = RssPeak()
    latencies = []
    for kind in ("fifo", "dev-zero"):
        planted = await run_json(kc, code_with(PLANT_TRAPS, KD=kd, NAMES=PLANT_NAMES, KIND=kind))
        assert len(planted) == 2 * len(PLANT_NAMES)
        for path in planted:  # really there, as the kernel says
            st = os.lstat(path)
            assert stat.S_ISFIFO(st.st_mode) if kind == "fifo" else stat.S_ISLNK(st.st_mode)
        pid = kernel_main_pid(km)
        task = asyncio.ensure_future(run_ok(kc, "while True:\n    pass", timeout=30))
        await asyncio.sleep(0.5)
        latencies.append(await probe_latency(probe_kc))
        out = await asyncio.wait_for(task, 30)
        assert out["error"] and out["error"].startswith("TimeoutError"), out
        await asyncio.wait_for(km.restart_kernel(now=True), 30)
        pid = await wait_restarted(km, kc, pid)
        latencies.append(await probe_latency(probe_kc))
        st = os.lstat(Path(kd) / "conn" / "connection.json")
        assert stat.S_ISREG(st.st_mode) and st.st_uid == prov.uid, st
    growth = rss.stop()
    assert growth < 50 * 2**20, f"server RSS grew by {growth / 2**20:.0f} MB"
    assert max(latencies) < PROBE_BOUND, f"probe latencies {latencies}"
    out = await run_ok(kc, "print(6*7)")
    assert out["stdout"].strip() == "42", out


# -- class 3: no server secret reaches a kernel -----------------------------------------------

SECRET_NAMES = ["JUPYTER_TOKEN", "JPY_API_TOKEN", "AWS_SECRET_ACCESS_KEY", "DB_PASSWORD",
                "MY_API_KEY"]
ENVIRON = "import json, os\nprint(json.dumps(dict(os.environ)))"


def set_secrets(monkeypatch) -> dict[str, str]:
    values = {name: f"lp-secret-{uuid.uuid4().hex}" for name in SECRET_NAMES}
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


def host_environ(km) -> dict[str, str]:
    """The kernel process's environment as the host sees it (and, for a container,
    what Docker was told to set)."""
    env = environ_of(kernel_main_pid(km))
    prov = km.provisioner
    if prov.backend == "docker":
        import docker

        attrs = docker.from_env().api.inspect_container(prov.container_id)
        for item in attrs["Config"]["Env"] or []:
            name, _, value = item.partition("=")
            env.setdefault(name, value)
    return env


def leaked(env: dict[str, str], secrets: dict[str, str], names) -> list[str]:
    found = [name for name in names if name in env]
    values = {secrets[name] for name in names}
    found += [f"value of {k}" for k, v in env.items() if any(s in v for s in values)]
    return found


@pytest.mark.parametrize("backend", backends(), indirect=True)
async def test_no_server_secret_reaches_the_kernel(backend, lp_kernels, monkeypatch):
    """Class 3: tokens, cloud keys and passwords in the server's environment stay out."""
    secrets = set_secrets(monkeypatch)
    session = f"lp-session-{uuid.uuid4().hex}"
    monkeypatch.setenv("JPY_SESSION_NAME", session)  # allowed by default: a control
    km, kc = await lp_kernels(limits(), backend)
    inside = await run_json(kc, ENVIRON)
    outside = host_environ(km)
    for env in (inside, outside):
        assert leaked(env, secrets, SECRET_NAMES) == [], sorted(env)
        assert env.get("JPY_SESSION_NAME") == session, "the allow-list passes nothing at all"


@pytest.mark.parametrize("backend", backends(), indirect=True)
async def test_a_secret_passes_only_when_named_exactly(backend, lp_kernels, monkeypatch, caplog):
    """Class 3: env_keep naming DB_PASSWORD passes it (and nothing else secret); patterns
    that match secret names (DB_*, *_KEY, *TOKEN*) pass the harmless ones only."""
    secrets = set_secrets(monkeypatch)
    monkeypatch.setenv("DB_HOST", "db.example")
    path = [] if is_docker(backend) else ["PATH"]
    exact_km, exact_kc = await lp_kernels(limits(env_keep=[*path, "DB_PASSWORD"]), backend)
    pattern_km, pattern_kc = await lp_kernels(
        limits(env_keep=[*path, "DB_*", "*_KEY", "*TOKEN*", "JUPYTER_*", "AWS_*"]), backend
    )
    others = [n for n in SECRET_NAMES if n != "DB_PASSWORD"]
    warned = [r.getMessage() for r in caplog.records if "DB_PASSWORD" in r.getMessage()]
    assert warned and exact_km.kernel_id in warned[0], "passing a secret was not logged"
    for env in (await run_json(exact_kc, ENVIRON), host_environ(exact_km)):
        assert env.get("DB_PASSWORD") == secrets["DB_PASSWORD"], "exact name not passed"
        assert leaked(env, secrets, others) == []
        assert "DB_HOST" not in env
    for env in (await run_json(pattern_kc, ENVIRON), host_environ(pattern_km)):
        assert env.get("DB_HOST") == "db.example", "the pattern passes nothing at all"
        assert leaked(env, secrets, SECRET_NAMES) == []


# -- class 4: uids unique across state dirs, not handed on -----------------------------------

READ_OTHER = r'''
import errno, json, os
res = {}
for label, fn in {
    "read connection.json": lambda: open(OTHER + "/conn/connection.json").read(),
    "list work": lambda: os.listdir(OTHER + "/work"),
}.items():
    try:
        fn()
        res[label] = "OK"
    except OSError as e:
        res[label] = errno.errorcode.get(e.errno, str(e.errno))
print(json.dumps(res))
'''


def host_uid(km) -> int:
    """The kernel's uid, from its work dir and its process (they must agree)."""
    work_uid = os.stat(Path(km.provisioner.kernel_dir) / "work").st_uid
    proc_uids = set(psutil.Process(kernel_main_pid(km)).uids())
    assert proc_uids == {work_uid}, (work_uid, proc_uids)
    assert work_uid == km.provisioner.uid
    return work_uid


@pytest.mark.parametrize("backend", backends(), indirect=True)
async def test_uids_are_unique_across_state_dirs_and_not_handed_on(
    backend, lp_state_dirs, lp_kernels
):
    """Class 4: two servers' state dirs, two uids; one kernel cannot read the other's
    connection file; a shut-down kernel's uid does not go to the next one."""
    dir_a, dir_b = lp_state_dirs(), lp_state_dirs()
    km_a, kc_a = await lp_kernels(limits(state_dir=str(dir_a)), backend)
    km_b, _kc_b = await lp_kernels(limits(state_dir=str(dir_b)), backend)
    assert Path(km_a.provisioner.kernel_dir).parent.parent == dir_a
    assert Path(km_b.provisioner.kernel_dir).parent.parent == dir_b
    uid_a, uid_b = host_uid(km_a), host_uid(km_b)
    assert uid_a != uid_b and 0 not in (uid_a, uid_b)

    other = str(km_b.provisioner.kernel_dir)
    target = os.lstat(Path(other) / "conn" / "connection.json")  # it is there
    assert target.st_uid == uid_b and stat.S_IMODE(target.st_mode) == 0o600
    res = await run_json(kc_a, code_with(READ_OTHER, OTHER=other))
    # A container does not even have the other kernel's dir; a process kernel sees it
    # on the (read-only) host file system and must be refused.
    expected = {"EACCES", "ENOENT"} if is_docker(backend) else {"EACCES"}
    assert set(res.values()) <= expected, res

    await km_b.shutdown_kernel(now=True)
    km_c, _kc_c = await lp_kernels(limits(state_dir=str(dir_b)), backend)
    uid_c = host_uid(km_c)
    assert uid_c not in (uid_a, uid_b), f"uid {uid_c} handed on"


# -- class 5: the server is no confused deputy ------------------------------------------------

TOUCH_SOCK = r'''
import errno, json, os, socket
S = KD + "/sock"
res = {}

def bind(path):
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(path)
    finally:
        s.close()

for label, fn in {
    "list": lambda: os.listdir(S),
    "symlink new": lambda: os.symlink("/dev/null", S + "/k-6"),
    "fifo new": lambda: os.mkfifo(S + "/k-0"),
    "bind new": lambda: bind(S + "/k-8"),
    "unlink k-1": lambda: os.unlink(S + "/k-1"),
    "rename k-2": lambda: os.rename(S + "/k-2", S + "/k-9"),
    "symlink over k-4": lambda: os.symlink("/dev/null", S + "/k-4"),
    "chmod dir": lambda: os.chmod(S, 0o777),
    "chmod k-5": lambda: os.chmod(S + "/k-5", 0o777),
}.items():
    try:
        fn()
        res[label] = "OK"
    except OSError as e:
        res[label] = errno.errorcode.get(e.errno, str(e.errno))
print(json.dumps(res))
'''


@pytest.mark.parametrize("backend", backends(), indirect=True)
async def test_kernel_cannot_touch_its_frozen_socket_dir(backend, lp_kernels):
    """Class 5a: after start, nothing in sock/ can be created, replaced or removed."""
    km, kc = await lp_kernels(limits(), backend)
    sock = Path(km.provisioner.kernel_dir) / "sock"
    before = {name: os.lstat(sock / name) for name in os.listdir(sock)}
    assert set(before) == KERNEL_SOCKETS
    res = await run_json(kc, code_with(TOUCH_SOCK, KD=str(km.provisioner.kernel_dir)))
    wrong = {k: v for k, v in res.items() if v not in DENIED}
    assert not wrong, f"the kernel changed its frozen socket dir: {wrong}"
    after = {name: os.lstat(sock / name) for name in os.listdir(sock)}
    assert {n: (s.st_ino, s.st_mode) for n, s in after.items()} == {
        n: (s.st_ino, s.st_mode) for n, s in before.items()
    }
    st = os.lstat(sock)
    assert st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o700
    out = await run_ok(kc, "print(1+1)")
    assert out["stdout"].strip() == "2", out


FOREIGN_SIGNED = r'''
from jupyter_client.session import Session
k = get_ipython().kernel
parent = k.get_parent("shell")
scheme = k.session.signature_scheme
wrong = Session(key=b"not-the-session-key", signature_scheme=scheme, username="attacker")
unsigned = Session(key=b"", username="attacker")
for i in range(3):
    wrong.send(k.iopub_socket, "stream",
               {"name": "stdout", "text": "".join(["WRONG", "KEY", TAG])}, parent=parent)
    unsigned.send(k.iopub_socket, "stream",
                  {"name": "stdout", "text": "".join(["UN", "SIGNED", TAG])}, parent=parent)
k.session.send(k.iopub_socket, "stream",
               {"name": "stdout", "text": "".join(["RIGHT", "KEY", TAG])}, parent=parent)
'''


@pytest.mark.parametrize("backend", backends(), indirect=True)
async def test_foreign_signed_messages_never_reach_a_client(backend, lp_kernels):
    """Class 5b: IOPub messages signed with a wrong key (or none) are dropped by the
    proxy; the same message signed with the session key gets through."""
    km, kc = await lp_kernels(limits(), backend)
    prov = km.provisioner
    info = km.get_connection_info()
    assert info["transport"] == "ipc"
    ctx = zmq.asyncio.Context()
    sub = ctx.socket(zmq.SUB)
    sub.linger = 0
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(f"ipc://{info['ip']}-{info['iopub_port']}")
    frames: list[bytes] = []

    async def listen():
        while True:
            frames.extend(await sub.recv_multipart())

    listener = asyncio.ensure_future(listen())
    try:
        await asyncio.sleep(0.5)  # the subscription reaches the proxy
        tag = uuid.uuid4().hex
        dropped_before = prov.connection.proxy.dropped
        out = await run_ok(kc, code_with(FOREIGN_SIGNED, TAG=tag))
        await asyncio.sleep(1.0)
    finally:
        listener.cancel()
        sub.close()
        ctx.term()
    data = b"\n".join(frames)
    assert f"RIGHTKEY{tag}".encode() in data, "the correctly signed message did not arrive"
    assert f"RIGHTKEY{tag}" in out["stdout"], out
    assert f"WRONGKEY{tag}".encode() not in data, "a wrong-key message reached a client"
    assert f"UNSIGNED{tag}".encode() not in data, "an unsigned message reached a client"
    assert prov.connection.proxy.dropped - dropped_before >= 6, prov.connection.proxy.dropped


LISTEN = r'''
import socket
_lp_listener = socket.socket()
_lp_listener.bind(("127.0.0.1", 0))
_lp_listener.listen()
print(_lp_listener.getsockname()[1])
'''


IOPUB_PIPE = "print(get_ipython().kernel.iopub_thread._pipe_port)"


@pytest.mark.parametrize("backend", backends(), indirect=True)
async def test_network_on_still_uses_ipc_and_listens_on_no_tcp_port(backend, lp_kernels):
    """Class 5c: with network=True the kernel is still reached over ipc only, and no
    process of its tree listens on TCP (checked in each process's own network namespace,
    and with psutil on the process backend) -- except ipykernel's own IOPub pipe for
    forked subprocesses (a PULL socket on 127.0.0.1, authenticated by a random token),
    which every ipykernel binds and no server code uses. A listener the kernel opens on
    purpose is found: the check works."""
    km, kc = await lp_kernels(limits(network=True), backend)
    prov = km.provisioner
    assert km.transport == "ipc" and km.get_connection_info()["transport"] == "ipc"
    assert read_connection_file(prov)["transport"] == "ipc"
    main = kernel_main_pid(km)
    pipe = int((await run_ok(kc, IOPUB_PIPE))["stdout"].strip())
    allowed = {(main, "tcp", f"0100007F:{pipe:04X}")}
    pids = kernel_pids(km)
    assert pids
    assert set(tcp_listeners(pids)) <= allowed, (tcp_listeners(pids), allowed)
    if prov.backend == "process":
        listening = {
            (pid, c.laddr.ip, c.laddr.port) for pid in pids
            for c in psutil.Process(pid).net_connections("tcp") if c.status == psutil.CONN_LISTEN
        }
        assert listening <= {(main, "127.0.0.1", pipe)}, listening
    # Positive control: a socket the kernel opens on purpose is found.
    out = await run_ok(kc, LISTEN)
    assert out["status"] == "ok", out
    port = int(out["stdout"].strip())
    found = set(tcp_listeners(kernel_pids(km))) - allowed
    assert [addr for _, _, addr in found] == [f"0100007F:{port:04X}"], found
    await run_ok(kc, "_lp_listener.close()")
    assert set(tcp_listeners(kernel_pids(km))) <= allowed
