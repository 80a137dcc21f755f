"""The harness the tests and the benches share: real servers, real kernels, and what they
leave behind, looked at from the host.

* kernelspecs: :func:`write_kernelspec` (limited or stock), the kernel argv per backend;
* subprocesses: :class:`JupyterServer` (jupyter_server or ``jupyter lab``),
  :class:`AgentBackendService` (examples/agent_backend under uvicorn), :func:`free_port`,
  :func:`stop_process`; requests over a kernel's WebSocket (:func:`ws_execute` & co.);
* Docker: :func:`docker_client` / :func:`docker_available`, containers by label;
* what kernels leave behind, by kernel id or state dir (never by name patterns):
  :func:`kernel_leftovers` counts it, :func:`kill_kernel_leftovers` and
  :func:`remove_all_kernels` remove it;
* :class:`HostWatch`: what a runaway kernel could hurt outside its limits.

Tests import it as ``from .harness import ...``; the benches, run as
``python bench/x.py``, put the repository root on ``sys.path`` and import
``tests.harness``. Nothing here depends on pytest.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

import docker
import docker.errors
import httpx
import psutil
import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.websocket import websocket_connect

from limited_provisioner import list_kernels
from limited_provisioner.docker import DEFAULT_IMAGE, LABEL_PREFIX
from limited_provisioner.process.cgroups import kernel_group_dirs
from limited_provisioner.reaper import remove_kernel
from limited_provisioner.registry import Registry, is_alive, sandbox_of
from limited_provisioner.watchdog import KERNEL_ID_ENV

REPO = Path(__file__).resolve().parent.parent
# The server extension's config, as `pip install` (editable or not) places it: servers the
# tests start read it from here, not from whatever the environment has installed.
JUPYTER_CONFIG = REPO / "jupyter_config"
EXAMPLES = REPO / "examples"
# The token of every server and the REST/WebSocket URLs built here.
TOKEN = "limited-test-token"

# -- kernelspecs ---------------------------------------------------------------------------

# The image of the docker kernels the tests and benches start:
# LIMITED_PROVISIONER_TEST_IMAGE (LP_KERNEL_IMAGE, the variable .ci/setup-docker.sh also reads,
# is an alias), e.g. the tag
# .ci/setup-docker.sh builds (to try a candidate image without replacing the default one),
# else the default image.
KERNEL_IMAGE = (os.environ.get("LIMITED_PROVISIONER_TEST_IMAGE")
                or os.environ.get("LP_KERNEL_IMAGE") or DEFAULT_IMAGE)
KERNEL_ARGV = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
# Inside the kernel image the interpreter is the image's own, not this one.
CONTAINER_KERNEL_ARGV = ["python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"]
PROVISIONERS = {"process": "limited-process-provisioner", "docker": "limited-docker-provisioner",
                "swarm": "limited-swarm-provisioner"}


def write_kernelspec(
    root: Path, name: str, config: Mapping[str, Any] | None = None,
    provisioner: str | None = PROVISIONERS["process"], *,
    argv: list[str] | None = None, env: Mapping[str, str] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> str:
    """``<root>/kernels/<name>/kernel.json``; returns ``name``.

    With ``provisioner`` (e.g. ``PROVISIONERS["docker"]``) a limited kernel with
    ``config``; with None a stock kernelspec (jupyter_client's LocalProvisioner).
    ``argv`` replaces the backend's usual command, ``env`` is the kernelspec's env,
    ``metadata`` more of its metadata. A docker kernel runs :data:`KERNEL_IMAGE` unless
    ``config`` names an image.
    """
    docker_kernel = bool(provisioner and ("docker" in provisioner or "swarm" in provisioner))
    if docker_kernel and KERNEL_IMAGE != DEFAULT_IMAGE and "image" not in (config or {}):
        config = {**(config or {}), "image": KERNEL_IMAGE}
    spec: dict[str, Any] = {
        "argv": argv or (
            CONTAINER_KERNEL_ARGV if docker_kernel else KERNEL_ARGV
        ),
        "display_name": name,
        "language": "python",
    }
    if env:
        spec["env"] = dict(env)
    spec["metadata"] = dict(metadata or {})
    if provisioner:
        spec["metadata"]["kernel_provisioner"] = {
            "provisioner_name": provisioner, "config": dict(config or {}),
        }
    spec_dir = root / "kernels" / name
    spec_dir.mkdir(parents=True, exist_ok=True)
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return name


# -- processes -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM (a clean stop, as a deploy does), SIGKILL if it is still there after
    ``timeout``; only for processes the caller started."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def kill9(proc: subprocess.Popen | None) -> None:
    """SIGKILL a process the caller started (a crash), and reap it."""
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def alive(pids: Iterable[int]) -> list[int]:
    """The pids among ``pids`` that still run (zombies count as gone)."""
    result = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                result.append(pid)
        except psutil.NoSuchProcess:
            pass
    return result


# -- docker --------------------------------------------------------------------------------


class DockerUnavailable(Exception):
    """No Docker daemon, or no kernel image: docker kernels cannot run here."""


def docker_client(image: str = KERNEL_IMAGE) -> docker.DockerClient:
    """A client of a daemon that answers and has ``image``; else DockerUnavailable."""
    try:
        client = docker.from_env()
        client.ping()
        client.images.get(image)
        return client
    except docker.errors.DockerException as e:
        raise DockerUnavailable(f"docker or image {image} unavailable: {e}") from e


def docker_available(image: str = KERNEL_IMAGE) -> bool:
    try:
        docker_client(image).close()
        return True
    except DockerUnavailable:
        return False


def swarm_manager() -> docker.DockerClient:
    """A client of a daemon that manages a swarm; else skip (fail under
    LIMITED_PROVISIONER_REQUIRE_SWARM=1, set by .ci/run once .ci/setup-swarm.sh ran)."""
    try:
        client = docker.from_env()
        swarm = client.info().get("Swarm") or {}
    except docker.errors.DockerException as e:
        swarm, client = {"Error": str(e)}, None
    if client is not None and swarm.get("ControlAvailable"):
        return client
    why = (f"no swarm manager here (docker info: LocalNodeState="
           f"{swarm.get('LocalNodeState')!r}{', ' + swarm['Error'] if swarm.get('Error') else ''}"
           f"); run .ci/setup-swarm.sh")
    if os.environ.get("LIMITED_PROVISIONER_REQUIRE_SWARM") == "1":
        pytest.fail(why)
    pytest.skip(why)


def containers_with_label(name: str, value: str) -> list[Any]:
    """Containers (running or not) labelled ``limited-provisioner.<name>=<value>``;
    [] where there is no daemon (then none of ours can exist)."""
    try:
        return docker.from_env().containers.list(
            all=True, filters={"label": f"{LABEL_PREFIX}{name}={value}"})
    except docker.errors.DockerException:
        return []


def containers_of(client: docker.DockerClient, kernel_id: str) -> list[Any]:
    """The containers of one kernel (by its kernel-id label)."""
    return client.containers.list(
        all=True, filters={"label": f"{LABEL_PREFIX}kernel-id={kernel_id}"})


def remove_containers_with_label(name: str, value: str) -> None:
    for container in containers_with_label(name, value):
        with contextlib.suppress(docker.errors.APIError):  # gone / removal in progress
            container.remove(force=True)


# -- what kernels leave behind -------------------------------------------------------------

def kernel_cgroups(kernel_ids: Collection[str]) -> int:
    """Per-kernel cgroups (v1: pids, memory, cpu; v2: one) that still exist for these
    kernel ids."""
    return sum(len(kernel_group_dirs(k)) for k in kernel_ids)


def kernel_processes(kernel_ids: Collection[str] = (), state_dir: Path | None = None) -> set[int]:
    """Host pids of live kernel processes: those whose environment names one of
    ``kernel_ids``, and (with ``state_dir``) any kernel process whose command line lies
    in that state dir. Host pids, not what a kernel prints (its own PID namespace's)."""
    found = set()
    for proc in psutil.process_iter():
        try:
            kernel_id = proc.environ().get(KERNEL_ID_ENV)
            if kernel_id is None:
                continue
            if kernel_id in kernel_ids or (
                state_dir is not None and str(state_dir) in " ".join(proc.cmdline())
            ):
                found.add(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue  # gone meanwhile, or a kernel thread
    return found


def kernel_leftovers(state_dir: Path, kernel_ids: Collection[str] = ()) -> dict[str, int]:
    """What the kernels of a private state dir left: its registry entries and kernel
    dirs, the per-kernel cgroups and live processes of ``kernel_ids`` (and any kernel
    process in the state dir), containers labelled with the state dir. All 0 once every
    kernel is gone; while kernels live, their count of each."""
    registry = Registry(state_dir)
    kernels_dir = registry.kernels_dir
    return {
        "registry entries": len(registry.entries()),
        "kernel dirs": len(list(kernels_dir.iterdir())) if kernels_dir.is_dir() else 0,
        "cgroups": kernel_cgroups(kernel_ids),
        "processes": len(kernel_processes(kernel_ids, state_dir)),
        "containers": len(containers_with_label("state-dir", str(state_dir))),
    }


def kernel_pids(km) -> set[int]:
    """Host pids of every process of a kernel's tree: its cgroups (process backend) or
    its container's processes (docker backend)."""
    prov = km.provisioner
    if prov is None:
        return set()
    if prov.backend == "process":
        return set(prov._tree_pids())
    if not prov.container_id:
        return set()
    try:
        attrs = docker.from_env().api.inspect_container(prov.container_id)
    except docker.errors.DockerException:  # the container is gone
        return set()
    # The members of its init's cgroup, not `docker top`: under gVisor that lists the
    # sandbox's own pids (1, 2, ...), which are not the host's. Found from the init's
    # /proc/<pid>/cgroup, whatever the cgroup driver and version.
    pid = attrs["State"].get("Pid")
    if not pid:
        return set()  # not running
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except (FileNotFoundError, ProcessLookupError):
        return set()  # it has just exited: its processes with it
    paths = dict(line.split(":", 2)[1:] for line in lines)
    v1 = next((path for names, path in paths.items() if "pids" in names.split(",")), None)
    group = f"/sys/fs/cgroup/pids{v1}" if v1 is not None else f"/sys/fs/cgroup{paths.get('', '/')}"
    if attrs["Id"] not in group:
        return set()  # that pid is someone else's by now: never report (or kill) theirs
    try:
        return {int(p) for p in Path(group, "cgroup.procs").read_text().split()}
    except FileNotFoundError:
        return set()  # removed between the two reads: the container has stopped


def kill_kernel_leftovers(kernel_id: str, pids: Iterable[int] = ()) -> None:
    """Last-resort cleanup of one kernel: SIGKILL its cgroups' members and ``pids``
    (only pids the caller knows are that kernel's), then remove its empty cgroups."""
    pids = set(pids)
    groups = kernel_group_dirs(kernel_id)
    # v2 keeps the processes in a leaf below the group: every cgroup.procs of the subtree.
    subtrees = [[Path(d) for d, _, _ in os.walk(group)] for group in groups]
    for subtree in subtrees:
        for group in subtree:
            with contextlib.suppress(OSError):  # removed meanwhile: nothing of it runs
                pids |= {int(p) for p in (group / "cgroup.procs").read_text().split()}
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):  # exited meanwhile
            os.kill(pid, signal.SIGKILL)
    # rmdir fails while a killed member lingers; children before their parent.
    for subtree in subtrees:
        for group in reversed(subtree):
            for _ in range(20):
                try:
                    group.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.05)


def remove_all_kernels(state_dir: Path) -> None:
    """Every kernel a private state dir knows of, then the dir itself.

    Each registry entry goes through ``remove_kernel`` (as the reaper does); one it
    fails on (a "starting" process entry without a pid) is removed by hand (its process
    group killed). Then the kernel's cgroup members and its recorded pid (if still that
    process) are killed,
    every container labelled with the state dir is removed, and the dir deleted.
    """
    registry = Registry(state_dir)
    for entry in registry.entries():
        kernel_id = entry.get("kernel_id", "")
        pids = {entry["pid"]} if entry.get("pid") and is_alive(entry) else set()
        try:
            remove_kernel(registry, entry)
        except Exception as e:  # noqa: BLE001 -- one bad entry must not stop the others
            print(f"remove_kernel({kernel_id}): {e!r}; removing by hand", file=sys.stderr)
            for pid in alive(pids):  # its process group, if it leads one
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
            registry.remove(kernel_id)
        finally:
            if kernel_id:
                # Its cgroups are named by its sandbox (a claimed pooled kernel's id).
                kill_kernel_leftovers(sandbox_of(entry), alive(pids))
    remove_containers_with_label("state-dir", str(state_dir))
    shutil.rmtree(state_dir, ignore_errors=True)


# -- what a runaway kernel could hurt ------------------------------------------------------


def mem_available() -> int:
    """The host's MemAvailable (/proc/meminfo), bytes: what can still be allocated
    without swapping or OOM-killing anything."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


# A bystander outside every kernel's cgroup, first in line for the host's OOM killer.
BYSTANDER = (
    "import sys, time\n"
    "open('/proc/self/oom_score_adj', 'w').write('1000')\n"
    "held = bytearray(16 * 2**20)\n"
    "print('ready', flush=True)\n"
    "time.sleep(3600)\n"
)


class HostWatch:
    """What a runaway kernel could hurt outside its limits, watched while it runs.

    ``async with HostWatch(mem_limit) as host:`` around the attack, then
    ``assert host.harm() == []``. Three things, each of which a kernel the limits do not
    hold would break:

    * host memory: MemAvailable, sampled every 50 ms, must not fall more than the
      kernel's ``mem_limit`` plus ``slack`` (page tables, pipes, other tenants of a
      shared host) below its value at the start;
    * this process's responsiveness: it runs the kernels' server side (KernelManager,
      proxy, limit checks) on its event loop, whose longest stall (a 50 ms timer that
      fires late) must stay under ``max_stall`` seconds;
    * other processes: a bystander process outside every kernel, with oom_score_adj
      1000 (the host OOM killer's first pick), must be alive at the end. A kernel's
      own cgroup OOM kill cannot touch it; a host-wide one would take it first.
    """

    def __init__(self, mem_limit: int, slack: int = 512 * 2**20, max_stall: float = 1.0):
        self.may_take = mem_limit + slack
        self.max_stall_allowed = max_stall
        self.baseline = 0
        self.lowest = 0
        self.max_stall = 0.0
        self._tick = 0.0  # when the event loop timer last ran
        self.bystander_exit: int | None = None
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None
        self._timer: asyncio.Task | None = None
        self._bystander: subprocess.Popen | None = None

    @property
    def floor(self) -> int:
        return self.baseline - self.may_take

    @property
    def max_drop(self) -> int:
        """How far MemAvailable fell below its value at the start, bytes (>= 0)."""
        return max(0, self.baseline - self.lowest)

    async def __aenter__(self) -> HostWatch:  # noqa: PYI034 -- Self needs Python 3.11
        self._bystander = await asyncio.to_thread(
            subprocess.Popen, [sys.executable, "-c", BYSTANDER], stdout=subprocess.PIPE,
            text=True)
        ready = await asyncio.to_thread(self._bystander.stdout.readline)
        if ready.strip() != "ready":
            kill9(self._bystander)
            raise RuntimeError(f"bystander did not start: {ready!r}")
        self.baseline = self.lowest = mem_available()
        self._sampler = threading.Thread(target=self._sample_memory, daemon=True)
        self._sampler.start()
        self._tick = time.monotonic()
        self._timer = asyncio.ensure_future(self._time_event_loop())
        return self

    async def __aexit__(self, *exc_info) -> None:
        self._note_stall()  # a stall that ends here: the timer has not run since
        self._stop.set()
        self._timer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._timer
        self._sampler.join()
        self.bystander_exit = self._bystander.poll()
        kill9(self._bystander)
        self._bystander.stdout.close()

    def _sample_memory(self) -> None:
        while not self._stop.wait(0.05):
            self.lowest = min(self.lowest, mem_available())

    async def _time_event_loop(self) -> None:
        while True:
            self._tick = time.monotonic()
            await asyncio.sleep(0.05)
            self._note_stall()

    def _note_stall(self) -> None:
        self.max_stall = max(self.max_stall, time.monotonic() - self._tick - 0.05)

    def harm(self) -> list[str]:
        """What was hurt, in words; [] if nothing."""
        harm = []
        if self.lowest < self.floor:
            harm.append(
                f"host MemAvailable fell to {self.lowest / 2**20:.0f} MiB, below its floor "
                f"{self.floor / 2**20:.0f} MiB ({self.baseline / 2**20:.0f} MiB at the start "
                f"minus the kernel's mem_limit and slack, {self.may_take / 2**20:.0f} MiB)")
        if self.max_stall > self.max_stall_allowed:
            harm.append(
                f"this process (the kernels' server side) did not run its event loop for "
                f"{self.max_stall:.2f}s (allowed {self.max_stall_allowed:g}s)")
        if self.bystander_exit is not None:
            harm.append(
                f"a bystander process outside the kernel (oom_score_adj 1000) died with "
                f"status {self.bystander_exit}: the host's OOM killer fired")
        return harm


# -- a jupyter_server subprocess -----------------------------------------------------------

# The Jupyter runtime dir the user had before private_runtime_dir() replaced it, and ours.
_RUNTIME: dict[str, Path] = {}


def private_runtime_dir() -> Path:
    """A Jupyter runtime dir of this process's own, made on the first call and set as
    ``JUPYTER_RUNTIME_DIR`` for this process and every server, kernel and CLI it starts:
    their connection files (``kernel-*.json``), ``jpserver-*.json`` and the server
    extension's ``limited-provisioner-sessions-*.db`` go there, not into the user's
    runtime dir. Beside the user's (not under /tmp or /var/tmp, which kernels get private
    copies of); removed at exit. The user's is :func:`real_runtime_dir`."""
    if "ours" not in _RUNTIME:
        from jupyter_core.paths import jupyter_runtime_dir

        real = Path(jupyter_runtime_dir())
        real.parent.mkdir(parents=True, exist_ok=True)
        ours = Path(tempfile.mkdtemp(prefix="lp-test-runtime-", dir=real.parent))
        _RUNTIME.update(real=real, ours=ours)
        os.environ["JUPYTER_RUNTIME_DIR"] = str(ours)
        atexit.register(shutil.rmtree, ours, ignore_errors=True)
    return _RUNTIME["ours"]


def real_runtime_dir() -> Path:
    """The runtime dir :func:`private_runtime_dir` keeps tests and benches out of."""
    private_runtime_dir()
    return _RUNTIME["real"]



def server_env(state_dir: Path, server_id: str, jupyter_path: Path | None = None,
               ) -> dict[str, str]:
    """This process's environment plus what a server with our extension on a private
    state dir needs: the extension's config, the state dir, the server id (and, with
    ``jupyter_path``, where its kernelspecs are)."""
    env = {**os.environ, "JUPYTER_CONFIG_PATH": str(JUPYTER_CONFIG),
           "JUPYTER_RUNTIME_DIR": str(private_runtime_dir()),
           "LIMITED_PROVISIONER_STATE_DIR": str(state_dir),
           "LIMITED_PROVISIONER_SERVER_ID": server_id}
    if jupyter_path is not None:
        env["JUPYTER_PATH"] = str(jupyter_path)
    return env



class JupyterServer:
    """A jupyter_server (``app="jupyterlab"``: ``jupyter lab``) subprocess with the
    environment ``env`` (e.g. ``JUPYTER_CONFIG_PATH=JUPYTER_CONFIG`` for our server
    extension), on a free port, stopped by pid.

    Restartable: each :meth:`start` spawns a new process on a new port, logging to
    ``<log_dir>/server-<n>.log``; :meth:`kill9` is a crash, :meth:`stop` a clean stop.
    """

    def __init__(self, log_dir: Path, env: Mapping[str, str], args: Iterable[str] = (),
                 root_dir: Path | None = None, app: str = "jupyter_server"):
        self.log_dir = log_dir
        self.env = dict(env)
        self.args = list(args)
        self.root_dir = root_dir or log_dir / "notebooks"
        self.app = app
        self.proc: subprocess.Popen | None = None
        self.base = ""
        self.client = AsyncHTTPClient()
        self.starts = 0
        self.spawned_at = 0.0  # time.perf_counter() of the last spawn

    async def start(self, timeout: float = 60) -> float:
        """Spawn the server; seconds from the spawn until /api/status answers (which,
        on a restart, includes re-adopting the live kernels)."""
        port = free_port()
        self.starts += 1
        self.spawned_at = time.perf_counter()
        await asyncio.to_thread(self._spawn, port)
        self.base = f"http://127.0.0.1:{port}"
        while True:
            try:
                await self.client.fetch(f"{self.base}/api/status?token={TOKEN}")
                return time.perf_counter() - self.spawned_at
            except (OSError, HTTPClientError):  # not listening (or not serving) yet
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"{self.app} exited with status {self.proc.returncode}:\n"
                        + self.logs()) from None
                if time.perf_counter() - self.spawned_at > timeout:
                    self.kill9()
                    raise RuntimeError(
                        f"{self.app} did not answer in {timeout:g}s:\n" + self.logs()) from None
                await asyncio.sleep(0.02)

    def _spawn(self, port: int) -> None:
        self.root_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"server-{self.starts:02d}.log", "w") as log:
            # The child keeps its own copy of the fd.
            self.proc = subprocess.Popen(
                [sys.executable, "-m", self.app, f"--port={port}", "--ip=127.0.0.1",
                 f"--IdentityProvider.token={TOKEN}", "--allow-root", "--no-browser",
                 f"--ServerApp.root_dir={self.root_dir}", *self.args],
                stdout=log, stderr=subprocess.STDOUT, env=self.env,
            )

    def logs(self, last: int = 6000) -> str:
        """The last ``last`` characters of every start's log."""
        return "".join(
            p.read_text(errors="replace") for p in sorted(self.log_dir.glob("server-*.log"))
        )[-last:]

    def kill9(self) -> None:
        """A crash: SIGKILL, nothing cleaned up (the kernels live on)."""
        kill9(self.proc)

    async def stop(self, timeout: float = 30) -> None:
        """A clean stop (SIGTERM; SIGKILL after ``timeout``)."""
        if self.proc is not None:
            await asyncio.to_thread(stop_process, self.proc, timeout)

    async def api(self, method: str, path: str, body: dict | None = None) -> Any:
        """A REST call; its JSON answer (None if empty)."""
        resp = await self.client.fetch(HTTPRequest(
            f"{self.base}{path}?token={TOKEN}", method=method,
            body=json.dumps(body) if body is not None else None,
            allow_nonstandard_methods=True))
        return json.loads(resp.body) if resp.body else None


def kernel_ws_url(base: str, kernel_id: str, session_id: str | None = None) -> str:
    query = f"session_id={session_id}&" if session_id else ""
    return base.replace("http", "ws", 1) + f"/api/kernels/{kernel_id}/channels?{query}token={TOKEN}"


def ws_message(msg_type: str, content: dict, session: str | None = None,
               channel: str = "shell") -> dict:
    """A Jupyter message as a client sends it over the kernel WebSocket."""
    return {
        "header": {"msg_id": uuid.uuid4().hex, "username": "t",
                   "session": session or uuid.uuid4().hex, "msg_type": msg_type,
                   "version": "5.3", "date": ""},
        "parent_header": {}, "metadata": {}, "channel": channel, "buffers": [],
        "content": content,
    }


async def ws_request(base: str, kernel_id: str, msg_type: str, content: dict,
                     timeout: float = 60, return_on_restart: bool = True,
                     ) -> tuple[str, list[dict]]:
    """Send one request over the kernel's WebSocket; its msg_id and every message the
    server sent until the request is done (its reply *and* the kernel's idle status for
    it came) or, with ``return_on_restart``, the kernel restarts (then no reply comes:
    look for it in the messages; without, a request the restart cut off waits for the
    timeout). TimeoutError names what did come; ConnectionError if the server closed
    the socket. The WebSocket's opening may take ``timeout`` too (tornado's 20 s at
    least): jupyter_server opens it once the kernel has answered a kernel_info request."""
    opening = max(timeout, 20.0)
    ws = await websocket_connect(HTTPRequest(kernel_ws_url(base, kernel_id),
                                             connect_timeout=opening, request_timeout=opening))
    deadline = time.monotonic() + timeout
    request = ws_message(msg_type, content)
    msg_id = request["header"]["msg_id"]
    reply_type = msg_type.replace("_request", "_reply")
    ws.write_message(json.dumps(request))
    seen: list[dict] = []
    replied = idle = False
    try:
        while time.monotonic() < deadline:
            try:
                raw = await asyncio.wait_for(ws.read_message(), deadline - time.monotonic())
            except asyncio.TimeoutError:
                break
            if raw is None:
                raise ConnectionError(f"websocket closed after {[m['msg_type'] for m in seen]}")
            msg = json.loads(raw)
            seen.append(msg)
            ours = msg["parent_header"].get("msg_id") == msg_id
            state = msg["content"].get("execution_state") if msg["msg_type"] == "status" else None
            if state == "restarting" and return_on_restart:
                return msg_id, seen
            replied |= ours and msg["msg_type"] == reply_type
            idle |= ours and state == "idle"
            if replied and idle:
                return msg_id, seen
    finally:
        ws.close()
    raise TimeoutError([m["msg_type"] for m in seen])


async def ws_execute(base: str, kernel_id: str, code: str, timeout: float = 60,
                     return_on_restart: bool = True) -> tuple[str, list[dict]]:
    """``ws_request`` of an execute_request for ``code``."""
    return await ws_request(base, kernel_id, "execute_request", {
        "code": code, "silent": False, "store_history": False, "user_expressions": {},
        "allow_stdin": False}, timeout, return_on_restart)


async def ws_execute_text(base: str, kernel_id: str, code: str, timeout: float = 30) -> str:
    """Run ``code`` over the WebSocket; its stdout and errors as text."""
    msg_id, seen = await ws_execute(base, kernel_id, code, timeout)
    out = ""
    for msg in seen:
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream":
            out += msg["content"]["text"]
        if msg["msg_type"] == "error":
            out += f"{msg['content']['ename']}: {msg['content']['evalue']}"
    return out


def replied(msg_id: str, messages: list[dict]) -> bool:
    """Whether the request ``msg_id`` got its reply among ``messages``."""
    return any(m["parent_header"].get("msg_id") == msg_id and m["msg_type"].endswith("_reply")
               for m in messages)


# -- the agent backend service -------------------------------------------------------------


def agent_backend_keys() -> Any:
    """examples/agent_backend/keys.py, the module that issues the service's API keys."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    from agent_backend import keys

    return keys


class AgentBackendService:
    """examples/agent_backend as a uvicorn subprocess on a free port, on the state dir
    ``state`` with server id ``server_id``, configured by ``settings`` (each becomes
    ``AGENT_BACKEND_<NAME>``); stopped by pid.

    Restartable on the same state dir: each :meth:`start` spawns a new process on a new
    port, logging to ``<log_dir>/service-<n>.log``. The request helpers are synchronous
    (``self.client``, httpx); an async caller runs :meth:`start` in a thread.

    Callers authenticate as deployed: ``auth="keys"`` (default) issues each user an API
    key in the state dir's keys file at its first request (:meth:`headers`);
    ``auth="proxy"`` runs the service behind a "trusted proxy" (X-User alone).
    """

    def __init__(self, state: Path, server_id: str, log_dir: Path,
                 settings: Mapping[str, str], auth: str = "keys"):
        self.state = state
        self.server_id = server_id
        self.log_dir = log_dir
        self.auth = auth
        self.api_keys: dict[str, str] = {}  # user -> key issued by headers()
        self.env = {
            **os.environ,
            "AGENT_BACKEND_STATE_DIR": str(state),
            "AGENT_BACKEND_SERVER_ID": server_id,
            **({"AGENT_BACKEND_TRUST_X_USER": "1"} if auth == "proxy" else {}),
            **{f"AGENT_BACKEND_{k}": v for k, v in settings.items()},
        }
        if settings.get("BACKEND") == "docker" and "IMAGE" not in settings:
            self.env["AGENT_BACKEND_IMAGE"] = KERNEL_IMAGE
        self.proc: subprocess.Popen | None = None
        self.client = httpx.Client(timeout=120)
        self.starts = 0
        self.base = ""

    def start(self, timeout: float = 120) -> float:
        """Spawn the service; seconds until /health answers (re-adoption included)."""
        port = free_port()
        self.starts += 1
        t0 = time.perf_counter()
        with open(self.log_dir / f"service-{self.starts:02d}.log", "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "--app-dir", str(EXAMPLES),
                 "agent_backend.app:app", "--host", "127.0.0.1", "--port", str(port)],
                stdout=log, stderr=subprocess.STDOUT, env=self.env,
            )
        self.base = f"http://127.0.0.1:{port}"
        while True:
            try:
                self.client.get(f"{self.base}/health").raise_for_status()
                return time.perf_counter() - t0
            except httpx.HTTPError:  # not listening yet
                if self.proc.poll() is not None:
                    raise RuntimeError("service exited:\n" + self.logs(8000)) from None
                if time.perf_counter() - t0 > timeout:
                    self.kill9()
                    raise RuntimeError(
                        f"service did not come up in {timeout:g}s:\n" + self.logs(8000)) from None
                time.sleep(0.05)

    def logs(self, last: int | None = None) -> str:
        """Every start's log (its last ``last`` characters)."""
        text = "".join(p.read_text(errors="replace")
                       for p in sorted(self.log_dir.glob("service-*.log")))
        return text[-last:] if last else text

    def kill9(self) -> None:
        """A crash: SIGKILL, nothing cleaned up (the kernels live on)."""
        kill9(self.proc)

    def stop(self) -> None:
        """A clean stop (SIGTERM), as a deploy does."""
        if self.proc is not None:
            stop_process(self.proc)

    def close(self) -> None:
        """SIGKILL the service (if running) and close the client."""
        self.kill9()
        self.client.close()

    @property
    def keys_file(self) -> Path:
        return Path(self.env.get("AGENT_BACKEND_KEYS_FILE")
                    or self.state / "agent-backend-keys.json")

    def headers(self, user: str) -> dict[str, str]:
        """``X-User``, and with API keys ``Authorization`` (a key issued on first use)."""
        if self.auth == "proxy":
            return {"X-User": user}
        if user not in self.api_keys:
            self.api_keys[user] = agent_backend_keys().add_key(self.keys_file, user)[1]
        return {"X-User": user, "Authorization": f"Bearer {self.api_keys[user]}"}

    def exec(self, user: str, session_id: str, code: str) -> httpx.Response:
        return self.client.post(
            f"{self.base}/exec", json={"session_id": session_id, "code": code},
            headers=self.headers(user),
        )

    def run(self, user: str, session_id: str, code: str) -> dict:
        """Execute; the JSON result of a 200 answer."""
        resp = self.exec(user, session_id, code)
        assert resp.status_code == 200, resp.text
        return resp.json()

    def delete(self, user: str, session_id: str) -> httpx.Response:
        return self.client.delete(f"{self.base}/sessions/{session_id}",
                                  headers=self.headers(user))

    def sessions(self, user: str) -> list[dict]:
        resp = self.client.get(f"{self.base}/sessions", headers=self.headers(user))
        resp.raise_for_status()
        return resp.json()

    def kernels(self, **filters: Any) -> list[dict]:
        """This service's running kernels (``list_kernels`` of its state dir and id)."""
        return list_kernels(self.state, server_id=self.server_id, **filters)


def pooled_entries(state: Path, name: str | None = None, *, ready: bool = True) -> list[dict]:
    """The pooled kernels of ``state`` (``ready``: only those ready to be claimed)."""
    return [e for e in Registry(state).entries() if e.get("state") == "pooled"
            and (e.get("pool_ready") or not ready) and name in (None, e.get("kernel_name"))]


async def shutdown_settled(km, timeout: float = 60) -> None:
    """``km.shutdown_kernel(now=True)`` once the manager's pending start, restart or
    shutdown (a limit's restart or cull on the package's loop) has settled: jupyter_client
    lets one of them at a time settle its ``ready`` future, and a second call while one
    runs fails with InvalidStateError -- its own race, which jupyter_server's manager
    (server/manager.py) waits out the same way. The shutdown also runs when a limit already
    ended the process: its cleanup removes the registry entry and the kernel dir."""
    if km.provisioner is None:
        return
    # Polled, not awaited: a restart's shutdown settles one future and its start sets the
    # next at once, so only the manager's current future says whether one is in flight.
    deadline = time.monotonic() + timeout
    while not km.ready.done() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await km.shutdown_kernel(now=True)


async def wait_for(predicate, timeout: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.05)
