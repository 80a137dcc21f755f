"""The launcher's ``isolate`` mode, run for real as root: what a kernel can see and touch.

Each test starts ``_launch.py`` with a spec like the process backend's (an unprivileged
uid, a kernel dir holding the work dir, private tmpfs scratch dirs, the interpreter
exposed from under /root) and a small Python program as the "kernel", and checks the
result from the host.  The sandboxed program is the attacker: it reports what it
could do on stdout, as one JSON line.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from limited_provisioner.process import launch as _launch
from limited_provisioner.process.interpreter import Needed
from limited_provisioner.process.sandbox import exposures

UID = 64999
SCRATCH = ["/tmp", "/var/tmp", "/dev/shm", "/run/lock"]
TOKEN_ENV = "LP_LAUNCHER_TEST_TOKEN"
# sys.executable is the venv's python: the sandbox runs the interpreter it points to,
# without site (stdlib only), exposed like the process backend exposes it.
PYTHON = os.path.realpath(sys.executable)
PYTHON_PREFIX = os.path.dirname(os.path.dirname(PYTHON))


def _isolation_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if not Path("/proc/self/ns/pid").exists():
        return "no namespaces"
    probe = subprocess.run(["unshare", "--mount", "--pid", "--ipc", "--fork", "true"],
                           capture_output=True)
    return None if probe.returncode == 0 else f"unshare refused: {probe.stderr!r}"


_UNAVAILABLE = _isolation_unavailable()
pytestmark = pytest.mark.skipif(_UNAVAILABLE is not None, reason=str(_UNAVAILABLE))


# -- helpers ---------------------------------------------------------------------------


def pids_with_token(token: str) -> set[int]:
    """Host pids of every process started with our token in its environment."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        if f"{TOKEN_ENV}={token}".encode() in environ.split(b"\0"):
            found.add(int(entry))
    return found


def children_of(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces, so split after ")".
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            kids.append(int(entry))
    return kids


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class Sandbox:
    """One run of the launcher; the test talks to the "kernel" over stdin/stdout."""

    def __init__(self, proc: subprocess.Popen, token: str) -> None:
        self.proc = proc
        self.token = token
        self._buffer = b""

    def line(self, timeout: float = 20) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                raise AssertionError(f"no line from the sandbox within {timeout}s")
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                raise AssertionError(
                    f"sandbox closed stdout (rc={self.proc.wait(5)}): {self.stderr()}"
                )
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def json(self, timeout: float = 20) -> dict:
        return json.loads(self.line(timeout))

    def send(self, text: str = "go") -> None:
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()

    def wait(self, timeout: float = 20) -> int:
        return self.proc.wait(timeout)

    def stderr(self) -> str:
        return self.proc.stderr.read().decode() if self.proc.poll() is not None else ""

    def init_pid(self) -> int:
        """The host pid of the sandbox's init (pid 1 inside)."""
        for _ in range(200):
            kids = children_of(self.proc.pid)
            if kids:
                return kids[0]
            time.sleep(0.01)
        raise AssertionError("the launcher has no child")

    def kernel_pid(self) -> int:
        """The host pid of the kernel (pid 2 inside, the init's child)."""
        init = self.init_pid()
        for _ in range(200):
            kids = children_of(init)
            if kids:
                return kids[0]
            time.sleep(0.01)
        raise AssertionError("the sandbox's init has no child")


@pytest.fixture
def box(request):
    """``box.spec()`` builds a spec, ``box.run(code, spec)`` starts the launcher.

    Everything started is killed and every dir removed afterwards, pass or fail.
    """

    class Box:
        def __init__(self) -> None:
            self.root = Path(tempfile.mkdtemp(prefix="lp-launcher-test-", dir="/var/lib"))
            os.chmod(self.root, 0o711)
            # As kerneldir.py lays it out: <kernels>/<id>/ is root's (0711), its work,
            # sock and conn dirs are the kernel's.
            self.kernel_dir = self.root / "kernel"
            self.kernel_dir.mkdir(mode=0o711)
            self.work = self.kernel_dir / "work"
            self.sock = self.kernel_dir / "sock"
            self.conn = self.kernel_dir / "conn"
            for d in (self.work, self.sock, self.conn):
                d.mkdir(mode=0o700)
                os.chown(d, UID, UID)
            self.token = uuid.uuid4().hex
            self.sandboxes: list[Sandbox] = []
            self.extra_paths: list[Path] = []

        def spec(self, **changes) -> dict:
            spec = {
                "isolate": True,
                "uid": UID,
                "gid": UID,
                "cwd": str(self.work),
                "writable": [str(self.work), str(self.sock), str(self.conn)],
                "tmpfs": {d: "size=8m,mode=1777" for d in SCRATCH if os.path.isdir(d)},
                "rlimits": {"core": 0},
            }
            expose, _ = exposures([Needed(os.path.realpath(p), required=True)
                                   for p in (sys.base_prefix, PYTHON_PREFIX)])
            if expose:
                spec["expose"] = expose
            spec.update(changes)
            return spec

        def run(self, code: str, spec: dict | None = None, pass_fds=()) -> Sandbox:
            spec = self.spec() if spec is None else spec
            env = {"PATH": "/usr/bin:/bin", TOKEN_ENV: self.token}
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", _launch.__file__, json.dumps(spec), "--",
                 PYTHON, "-I", "-S", "-c", code],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env=env, start_new_session=True,  # as jupyter_client starts kernels
                pass_fds=pass_fds,
            )
            sandbox = Sandbox(proc, self.token)
            self.sandboxes.append(sandbox)
            return sandbox

        def cleanup(self) -> None:
            for sandbox in self.sandboxes:
                try:
                    os.killpg(sandbox.proc.pid, signal.SIGKILL)
                except OSError:
                    pass
            for _ in range(100):
                left = pids_with_token(self.token)
                if not left:
                    break
                for pid in left:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
                time.sleep(0.02)
            for sandbox in self.sandboxes:
                try:
                    sandbox.proc.wait(5)
                except subprocess.TimeoutExpired:
                    pass
                for stream in (sandbox.proc.stdin, sandbox.proc.stdout, sandbox.proc.stderr):
                    stream.close()
            self.sandboxes.clear()
            shutil.rmtree(self.root, ignore_errors=True)
            for path in self.extra_paths:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)

    b = Box()
    request.addfinalizer(b.cleanup)
    return b


def host_shm_keys() -> set[int]:
    lines = Path("/proc/sysvipc/shm").read_text().splitlines()[1:]
    return {int(line.split()[0]) for line in lines}


# -- namespaces ------------------------------------------------------------------------


def test_proc_lists_only_the_sandbox(box):
    # Another "kernel" on the host whose command line must stay invisible.
    marker = f"lp-other-kernel-{box.token}"
    other = subprocess.Popen([PYTHON, "-c", "import time; time.sleep(60)", marker])
    try:
        sandbox = box.run(
            "import os, subprocess, json\n"
            "sleeper = subprocess.Popen(['/bin/sleep', '30'])\n"
            "pids = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())\n"
            "cmdlines = [open(f'/proc/{p}/cmdline', 'rb').read().decode(errors='replace')"
            " for p in pids]\n"
            "print(json.dumps({'me': os.getpid(), 'sleeper': sleeper.pid, 'pids': pids,"
            " 'cmdlines': cmdlines}), flush=True)\n"
            "sleeper.kill(); sleeper.wait()\n"
        )
        seen = sandbox.json()
        assert sandbox.wait() == 0, sandbox.stderr()
    finally:
        other.kill()
        other.wait()
    assert seen["me"] == 2  # pid 1 is the sandbox's init
    assert seen["pids"] == sorted([1, 2, seen["sleeper"]])
    assert seen["cmdlines"][0].rstrip("\x00") == "limited-provisioner-init"
    assert not any(marker in c for c in seen["cmdlines"])
    assert not any("pytest" in c for c in seen["cmdlines"])


def test_sysv_shm_is_private_and_dies_with_the_sandbox(box):
    key = int.from_bytes(os.urandom(3), "big") | 0x4C000000
    before = host_shm_keys()
    sandbox = box.run(
        "import ctypes, json, sys\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        f"shmid = libc.shmget({key}, 65536, 0o1000 | 0o600)\n"  # IPC_CREAT
        "keys = [int(l.split()[0]) for l in open('/proc/sysvipc/shm').read().splitlines()[1:]]\n"
        "print(json.dumps({'shmid': shmid, 'errno': ctypes.get_errno(), 'keys': keys}),"
        " flush=True)\n"
        "sys.stdin.readline()\n"
    )
    inside = sandbox.json()
    assert inside["shmid"] >= 0, os.strerror(inside["errno"])
    assert inside["keys"] == [key]  # the host's segments are not visible either
    during = host_shm_keys()
    ipcs = subprocess.run(["ipcs", "-m"], capture_output=True, text=True).stdout
    sandbox.send()
    assert sandbox.wait() == 0, sandbox.stderr()
    assert key not in during
    assert f"{key:#010x}" not in ipcs
    assert key not in host_shm_keys()
    assert host_shm_keys() <= before | during


def test_nothing_mounted_shows_on_the_host(box):
    # Mounts under a shared host mount would propagate back to the host unless the
    # sandbox makes its copy private: share the test's root, mount in it inside.
    subprocess.run(["mount", "--bind", str(box.root), str(box.root)], check=True)
    try:
        subprocess.run(["mount", "--make-shared", str(box.root)], check=True)
        scratch = box.root / "scratch"
        scratch.mkdir(mode=0o1777)
        spec = box.spec()
        spec["tmpfs"][str(scratch)] = "size=1m,mode=1777"
        before = ours_mounted(box)
        sandbox = box.run(
            "import sys; print(open('/proc/self/mountinfo').read().count('\\n'), flush=True);"
            " sys.stdin.readline()",
            spec,
        )
        assert int(sandbox.line()) > 0
        during = ours_mounted(box)
        sandbox.send()
        assert sandbox.wait() == 0, sandbox.stderr()
    finally:
        subprocess.run(["umount", "--lazy", str(box.root)])
    assert during == before


def ours_mounted(box) -> list[str]:
    """Host mount points where the sandbox mounts something (others may come and go)."""
    places = [str(box.root), "/proc", *SCRATCH, *box.spec().get("expose", {}).values()]
    points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    return [p for p in points if any(p == d or p.startswith(d + "/") for d in places)]


# -- the file system -------------------------------------------------------------------

ATTEMPT = """
import errno, json, os, sys

def write(path, mode="w"):
    try:
        with open(path, mode) as f:
            f.write("from the sandbox")
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))

def read(path):
    try:
        return open(path).read()
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
"""


def test_host_file_system_is_read_only(box):
    # World-writable on purpose: only the read-only view stops the kernel's uid here.
    decoy = box.root / "decoy"
    decoy.write_text("original")
    os.chmod(decoy, 0o666)
    open_dir = box.root / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    sandbox = box.run(ATTEMPT + (
        "print(json.dumps({\n"
        f"  'decoy': write({str(decoy)!r}, 'a'),\n"
        f"  'new_file': write({str(open_dir / 'new')!r}),\n"
        "  'etc': write('/etc/lp-launcher-decoy'),\n"
        "}), flush=True)\n"
    ))
    seen = sandbox.json()
    assert sandbox.wait() == 0, sandbox.stderr()
    assert seen["decoy"] == "EROFS"
    assert seen["new_file"] == "EROFS"
    assert seen["etc"] in ("EROFS", "EACCES")
    assert decoy.read_text() == "original"
    assert not (open_dir / "new").exists()
    assert not Path("/etc/lp-launcher-decoy").exists()


def test_devices_still_work_on_the_read_only_dev(box):
    sandbox = box.run(ATTEMPT + (
        "import pty\n"
        "master, slave = os.openpty()\n"
        "os.write(slave, b'ping\\n')\n"
        "echoed = os.read(master, 100).decode()\n"
        "print(json.dumps({\n"
        "  'null': write('/dev/null'),\n"
        "  'zero': len(open('/dev/zero', 'rb').read(16)),\n"
        "  'urandom': len(open('/dev/urandom', 'rb').read(16)),\n"
        "  'pty': os.ttyname(slave), 'echoed': echoed,\n"
        "  'new_node': write('/dev/lp-launcher-decoy'),\n"
        "}), flush=True)\n"
        "sys.stdout.write('stdout pipe still writable\\n')\n"
    ))
    seen = sandbox.json()
    assert sandbox.line() == "stdout pipe still writable"
    assert sandbox.wait() == 0, sandbox.stderr()
    assert seen["null"] == "ok"
    assert seen["zero"] == seen["urandom"] == 16
    assert seen["pty"].startswith("/dev/pts/")
    assert "ping" in seen["echoed"]
    assert seen["new_node"] in ("EROFS", "EACCES")
    assert not Path("/dev/lp-launcher-decoy").exists()


def test_scratch_dirs_are_private_capped_tmpfs(box):
    name = f"lp-launcher-{box.token}"
    dirs = [d for d in SCRATCH if os.path.isdir(d)]
    # Something of the host's in each: the kernel must not see it.
    for d in dirs:
        host_file = Path(d) / f"{name}-host"
        box.extra_paths.append(host_file)
        host_file.write_text("host")
        box.extra_paths.append(Path(d) / name)
    sandbox = box.run(ATTEMPT + (
        f"dirs, name = {dirs!r}, {name!r}\n"
        "out = {}\n"
        "for d in dirs:\n"
        "    st = os.statvfs(d)\n"
        "    out[d] = {'write': write(f'{d}/{name}'), 'back': read(f'{d}/{name}'),\n"
        "              'host': os.path.exists(f'{d}/{name}-host'),\n"
        "              'size': st.f_blocks * st.f_frsize}\n"
        "print(json.dumps(out), flush=True)\n"
        "sys.stdin.readline()\n"
    ))
    seen = sandbox.json()
    leaked_during = [d for d in dirs if (Path(d) / name).exists()]
    sandbox.send()
    assert sandbox.wait() == 0, sandbox.stderr()
    for d in dirs:
        assert seen[d]["write"] == "ok", d
        assert seen[d]["back"] == "from the sandbox", d
        assert seen[d]["host"] is False, d
        assert seen[d]["size"] == 8 * 1024 * 1024, d
    assert leaked_during == []
    assert [d for d in dirs if (Path(d) / name).exists()] == []


def test_work_and_socket_dirs_are_writable_and_shared_with_the_host(box):
    sandbox = box.run(ATTEMPT + (
        "import socket\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        f"s.bind({str(box.sock / 'shell')!r})\n"
        "print(json.dumps({'cwd': os.getcwd(), 'uid': os.getuid(),\n"
        "  'work': write('in-work'),\n"
        f"  'conn': write({str(box.conn / 'connection.json')!r}),\n"
        f"  'kernel_dir': write({str(box.kernel_dir / 'planted')!r}),\n"
        "}), flush=True)\n"
    ))
    seen = sandbox.json()
    assert sandbox.wait() == 0, sandbox.stderr()
    assert seen == {"cwd": str(box.work), "uid": UID, "work": "ok", "conn": "ok",
                    "kernel_dir": "EROFS"}
    assert (box.work / "in-work").read_text() == "from the sandbox"
    assert (box.conn / "connection.json").stat().st_uid == UID
    assert stat.S_ISSOCK((box.sock / "shell").lstat().st_mode)
    assert not (box.kernel_dir / "planted").exists()


def test_nested_writable_dirs(box):
    # A writable dir inside another one is writable through the outer bind.
    os.chown(box.kernel_dir, UID, UID)
    spec = box.spec(writable=[str(box.kernel_dir), str(box.work)])
    sandbox = box.run(ATTEMPT + (
        "print(json.dumps([write('in-work'),"
        f" write({str(box.kernel_dir / 'in-kernel-dir')!r})]), flush=True)\n"
    ), spec)
    assert sandbox.json() == ["ok", "ok"]
    assert sandbox.wait() == 0, sandbox.stderr()
    assert (box.work / "in-work").exists() and (box.kernel_dir / "in-kernel-dir").exists()


@pytest.mark.parametrize("path", ["/", "/tmp", "/dev"])
def test_writable_dir_that_would_hide_mounts_is_refused(box, path):
    # A bind of "/" would hide /proc and the private tmpfs (and bring back the host's
    # /tmp, writable); one of /tmp would replace the private tmpfs by the host's.
    spec = box.spec(writable=[str(box.work), path])
    sandbox = box.run("print('ran')", spec)
    assert sandbox.wait() == _launch.EXIT_SANDBOX_FAILED
    assert f"writable dir {path} would hide" in sandbox.stderr()


def test_work_dir_under_a_scratch_tmpfs_is_not_hidden(box):
    # A kernel dir under /var/tmp, which gets its own tmpfs in the sandbox.
    outer = Path(tempfile.mkdtemp(prefix="lp-launcher-test-", dir="/var/tmp"))
    box.extra_paths.append(outer)
    os.chmod(outer, 0o711)
    (outer / "other").write_text("host only")
    work = outer / "kernel" / "work"
    work.mkdir(parents=True)
    os.chown(work, UID, UID)
    spec = box.spec(cwd=str(work), writable=[str(work)])
    sandbox = box.run(ATTEMPT + (
        "print(json.dumps({'cwd': os.getcwd(), 'work': write('in-work'),\n"
        f"  'other': os.path.exists({str(outer / 'other')!r}),\n"
        "  'scratch': write('/var/tmp/scratch')}), flush=True)\n"
    ), spec)
    seen = sandbox.json()
    assert sandbox.wait() == 0, sandbox.stderr()
    assert seen == {"cwd": str(work), "work": "ok", "other": False, "scratch": "ok"}
    assert (work / "in-work").read_text() == "from the sandbox"
    assert not Path("/var/tmp/scratch").exists()


def test_work_dir_swapped_for_a_symlink_is_refused(box):
    # What a kernel owning its kernel dir could leave behind for its next start.
    decoy_dir = box.root / "decoy-dir"
    decoy_dir.mkdir()
    os.chmod(decoy_dir, 0o777)  # only the read-only view protects it
    (decoy_dir / "kept").write_text("original")
    box.work.rmdir()
    box.work.symlink_to(decoy_dir)
    sandbox = box.run(ATTEMPT + (
        f"print(json.dumps({{'write': write({str(box.work / 'kept')!r}, 'a')}}), flush=True)\n"
    ))
    code = sandbox.wait()
    err = sandbox.stderr()
    assert code == _launch.EXIT_SANDBOX_FAILED
    assert "writable dir" in err and str(box.work) in err
    assert (decoy_dir / "kept").read_text() == "original"
    assert sorted(os.listdir(decoy_dir)) == ["kept"]


def test_interpreter_is_exposed_but_nothing_else_under_its_blocker(box):
    spec = box.spec()
    if "expose" not in spec:
        pytest.skip("the interpreter is reachable without expose")
    (blocker,) = set(spec["expose"].values())
    sandbox = box.run(
        "import json, os, sys\n"
        f"print(json.dumps({{'exe': sys.executable, 'listing': os.listdir({blocker!r})}}))\n",
        spec,
    )
    seen = sandbox.json()
    assert sandbox.wait() == 0, sandbox.stderr()
    assert seen["exe"] == PYTHON
    exposed_tops = {p[len(blocker) + 1:].split("/")[0] for p in spec["expose"]}
    assert set(seen["listing"]) == exposed_tops


# -- exit statuses and signals ---------------------------------------------------------


def test_exit_code_propagates(box):
    sandbox = box.run("import sys; sys.exit(3)")
    assert sandbox.wait() == 3


def test_setup_failure_in_the_child_exits_121(box):
    spec = box.spec(tmpfs={"/nonexistent-lp-launcher-target": "size=1m"})
    sandbox = box.run("print('ran')", spec)
    assert sandbox.wait() == _launch.EXIT_SANDBOX_FAILED
    err = sandbox.stderr()
    assert "cannot start kernel" in err and "/nonexistent-lp-launcher-target" in err
    assert sandbox.proc.stdout.read() == b""


def test_kernel_killed_from_the_host_reads_as_sigkill(box):
    sandbox = box.run("import sys; print('ready', flush=True); sys.stdin.readline()")
    assert sandbox.line() == "ready"
    os.kill(sandbox.kernel_pid(), signal.SIGKILL)
    assert sandbox.wait() == -signal.SIGKILL


def test_kernel_crash_reads_as_its_signal(box):
    sandbox = box.run("import ctypes; ctypes.string_at(0)")
    assert sandbox.wait() == -signal.SIGSEGV


@pytest.mark.parametrize("signo", [signal.SIGKILL, signal.SIGTERM])
def test_kernel_killing_itself_dies_of_it(box, signo):
    # nbclient's Autokill notebook: os.kill(os.getpid(), SIGTERM). The kernel is pid 2,
    # not the namespace's init, which would ignore it.
    sandbox = box.run(f"import os; assert os.getpid() == 2; os.kill(os.getpid(), {signo})")
    assert sandbox.wait() == -signo


def test_the_kernel_leads_a_process_group_inside_and_an_interrupt_reaches_it(box):
    # jupyter_client's test_signal_kernel_subprocesses: `bash -i` children of the kernel
    # stay in its group (bash makes one of its own if it cannot see its group).
    sandbox = box.run(
        "import os, subprocess, time\n"
        "assert os.getpgrp() == os.getpid() == 2, (os.getpgrp(), os.getpid())\n"
        "child = subprocess.Popen(['/bin/bash', '-i', '-c', 'exec /bin/sleep 30'],\n"
        "                         stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        "time.sleep(0.5)\n"
        "assert os.getpgid(child.pid) == 2, os.getpgid(child.pid)\n"
        "print('ready', flush=True)\n"
        "try:\n"
        "    time.sleep(30)\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted', child.wait(), flush=True)\n"
    )
    assert sandbox.line() == "ready"
    os.killpg(sandbox.proc.pid, signal.SIGINT)
    assert sandbox.line() == f"interrupted {-signal.SIGINT}"
    assert sandbox.wait() == 0


def test_orphans_are_reaped_by_the_sandboxs_init(box):
    # A double-forked child whose parent is gone is the init's to reap: no zombie holds
    # a slot of pids_limit.
    sandbox = box.run(
        "import os, time\n"
        "for _ in range(5):\n"
        "    if os.fork() == 0:\n"
        "        if os.fork() == 0:\n"
        "            os._exit(0)\n"
        "        os._exit(0)\n"
        "    os.wait()\n"
        "time.sleep(0.5)\n"
        "states = [open(f'/proc/{p}/stat').read().split()[2] for p in os.listdir('/proc')\n"
        "          if p.isdigit()]\n"
        "print(states.count('Z'), flush=True)\n"
    )
    assert sandbox.line() == "0"
    assert sandbox.wait() == 0


def test_oom_kill_reads_as_sigkill(box):
    memory = Path("/sys/fs/cgroup/memory")
    if not (memory / "memory.limit_in_bytes").exists() or not os.access(memory, os.W_OK):
        pytest.skip("no writable cgroup v1 memory controller")
    cgroup = memory / f"lp-launcher-test-{box.token}"
    cgroup.mkdir()
    try:
        (cgroup / "memory.limit_in_bytes").write_text(str(64 * 1024**2))
        if (cgroup / "memory.memsw.limit_in_bytes").exists():
            (cgroup / "memory.memsw.limit_in_bytes").write_text(str(64 * 1024**2))
        spec = box.spec(cgroup_procs=[str(cgroup / "cgroup.procs")])
        sandbox = box.run("b = bytearray(256 * 1024**2); print('survived')", spec)
        assert sandbox.wait(60) == -signal.SIGKILL
        oom_control = (cgroup / "memory.oom_control").read_text()
        oom = dict(line.split() for line in oom_control.splitlines())
        assert int(oom.get("oom_kill", 1)) == 1
    finally:
        box.cleanup()
        for _ in range(100):
            try:
                cgroup.rmdir()
                break
            except OSError:
                time.sleep(0.05)


@pytest.mark.parametrize("how", ["parent", "group"])
def test_sigterm_stops_the_kernel_and_everything_it_started(box, how):
    # jupyter_client's terminate: SIGTERM to the process group; also to the pid alone.
    sandbox = box.run(
        "import subprocess, sys\n"
        "subprocess.Popen(['/bin/sleep', '60'])\n"
        "subprocess.Popen(['/bin/sh', '-c', '/bin/sleep 60 & /bin/sleep 60'])\n"
        "import os, time\n"
        # Its namespace's 6: init, kernel, sleep, sh and sh's two sleeps (waiting for 5
        # raced sh's second fork on a loaded machine).
        "while len([p for p in os.listdir('/proc') if p.isdigit()]) < 6:\n"
        "    time.sleep(0.01)\n"
        "print('ready', flush=True)\n"
        "sys.stdin.readline()\n"
    )
    assert sandbox.line() == "ready"
    started = pids_with_token(box.token)
    assert len(started) == 7  # supervisor, init, kernel, sh, 3 sleeps
    if how == "parent":
        os.kill(sandbox.proc.pid, signal.SIGTERM)
    else:
        os.killpg(sandbox.proc.pid, signal.SIGTERM)
    # The kernel's own death, as with a stock kernel (a kernel that ignores SIGTERM is
    # jupyter_client's to SIGKILL, which the next test covers).
    assert sandbox.wait() == -signal.SIGTERM
    deadline = time.monotonic() + 5
    while [p for p in started if alive(p)] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [p for p in started if alive(p)] == []


def test_kernel_dies_with_a_killed_supervisor(box):
    # jupyter_client's Popen.kill() when signalling the group failed: the launcher only.
    sandbox = box.run("import sys; print('ready', flush=True); sys.stdin.readline()")
    assert sandbox.line() == "ready"
    kernel = sandbox.kernel_pid()
    os.kill(sandbox.proc.pid, signal.SIGKILL)
    assert sandbox.wait() == -signal.SIGKILL
    deadline = time.monotonic() + 5
    while alive(kernel) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not alive(kernel)


def test_sigint_to_the_group_interrupts_the_kernel_once_each(box):
    sandbox = box.run(
        "import time\n"
        "count, end = 0, None\n"
        "while end is None or time.monotonic() < end:\n"
        "    try:\n"
        "        if end is None:\n"
        "            end = time.monotonic() + 3\n"
        "            print('ready', flush=True)\n"
        "        time.sleep(0.05)\n"
        "    except KeyboardInterrupt:\n"
        "        count += 1\n"
        "print(count, flush=True)\n"
    )
    assert sandbox.line() == "ready"
    for _ in range(2):
        os.killpg(sandbox.proc.pid, signal.SIGINT)
        time.sleep(0.5)
    assert sandbox.line() == "2"
    assert sandbox.wait() == 0  # the supervisor ignored them


def test_supervisor_runs_as_the_kernel_uid_without_privileges(box):
    sandbox = box.run("import sys; print('ready', flush=True); sys.stdin.readline()")
    assert sandbox.line() == "ready"
    status = Path(f"/proc/{sandbox.proc.pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines())
    sandbox.send()
    assert sandbox.wait() == 0
    assert fields["Uid"].split() == [str(UID)] * 4
    assert fields["Gid"].split() == [str(UID)] * 4
    assert fields["Groups"].split() == []
    assert fields["NoNewPrivs"].strip() == "1"
    assert int(fields["CapEff"], 16) == 0


# -- without isolate -------------------------------------------------------------------


def test_without_isolate_the_launcher_execs_in_place(box):
    spec = box.spec()
    for key in ("isolate", "writable"):
        del spec[key]
    sandbox = box.run(
        "import json, os\n"
        "print(json.dumps({'pid': os.getpid(), 'uid': os.getuid(),"
        " 'tmp': os.listdir('/tmp')}))",
        spec,
    )
    seen = sandbox.json()
    assert sandbox.wait() == 0, sandbox.stderr()
    assert seen["pid"] == sandbox.proc.pid  # no fork, no pid namespace
    assert seen["uid"] == UID
    assert seen["tmp"] == []  # its private tmpfs


def test_expose_across_a_scratch_tmpfs(box):
    # An interpreter under /var/tmp (a venv, say) stays reachable, read-only, in the
    # kernel's private /var/tmp; nothing else of the host's /var/tmp does.
    outer = Path(tempfile.mkdtemp(prefix="lp-launcher-test-", dir="/var/tmp"))
    box.extra_paths.append(outer)
    os.chmod(outer, 0o755)
    tool = outer / "tool"
    tool.mkdir()
    (tool / "lib.py").write_text("VALUE = 42\n")
    os.chmod(tool / "lib.py", 0o666)  # only the read-only view protects it
    (outer / "other").write_text("host only")
    spec = box.spec()
    spec["expose"] = {**spec.get("expose", {}), str(tool): "/var/tmp"}
    sandbox = box.run(ATTEMPT + (
        f"sys.path.insert(0, {str(tool)!r}); import lib\n"
        "print(json.dumps({'value': lib.VALUE,\n"
        f"  'write': write({str(tool / 'lib.py')!r}, 'a'),\n"
        f"  'other': os.path.exists({str(outer / 'other')!r}),\n"
        "  'scratch': write('/var/tmp/scratch')}), flush=True)\n"
    ), spec)
    seen = sandbox.json()
    assert sandbox.wait() == 0, sandbox.stderr()
    assert seen == {"value": 42, "write": "EROFS", "other": False, "scratch": "ok"}
    assert (tool / "lib.py").read_text() == "VALUE = 42\n"
    assert not Path("/var/tmp/scratch").exists()


def test_an_exposed_path_swapped_for_a_symlink_is_refused(box):
    # The server checked a real dir; by launch time a user who owns its parent has put
    # a symlink to a dir only root may read there: the launcher follows no symlink.
    outer = Path(tempfile.mkdtemp(prefix="lp-launcher-test-", dir="/var/tmp"))
    box.extra_paths.append(outer)
    os.chmod(outer, 0o755)
    (outer / "venv").symlink_to("/root")
    spec = box.spec()
    spec["expose"] = {**spec.get("expose", {}), str(outer / "venv"): "/var/tmp"}
    sandbox = box.run("print('ran')", spec)
    assert sandbox.wait() == _launch.EXIT_SANDBOX_FAILED
    err = sandbox.stderr()
    assert f"{outer / 'venv'} without following symlinks" in err, err


@pytest.mark.parametrize("fails", [True, False], ids=["setup fails", "kernel runs"])
def test_status_fd_carries_the_failure_or_closes_at_exec(box, fails):
    """The server's status pipe: the launcher's message on a failed setup; EOF as soon
    as the kernel command runs (close-on-exec), though the kernel and its supervisor
    live on, and the kernel cannot write to it."""
    read_end, write_end = os.pipe()
    try:
        changes = {"tmpfs": {"/nonexistent-lp-launcher-target": "size=1m"}} if fails else {}
        spec = box.spec(status_fd=write_end, **changes)
        sandbox = box.run(
            "import os, sys\n"
            f"try:\n    os.write({write_end}, b'forged')\nexcept OSError as e:\n"
            "    print('closed', e.errno, flush=True)\n"
            "sys.stdin.readline()\n",
            spec, pass_fds=(write_end,),
        )
        os.close(write_end)
        write_end = -1
        said = b""
        while chunk := os.read(read_end, 4096):  # EOF when no holder is left
            said += chunk
        if fails:
            assert sandbox.wait() == _launch.EXIT_SANDBOX_FAILED
            assert "/nonexistent-lp-launcher-target" in said.decode()
        else:
            assert said == b""
            assert sandbox.line() == "closed 9"  # EBADF: the kernel never had it
            assert sandbox.proc.poll() is None
            sandbox.send()
            assert sandbox.wait() == 0
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
