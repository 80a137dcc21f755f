"""Helpers of the containment suite (test_containment*.py): real kernels, checked from the host.

The code that runs inside a kernel is the attacker. What it prints is only trusted about
its own attempts (which call failed with which errno); everything about the host (files,
owners, modes, namespaces, processes, sockets) is looked at from here, as root.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import stat
import threading
import time
from pathlib import Path

import psutil

from ..conftest import TEST_OWNER, run
from ..harness import kernel_pids

# Our own owner label: other test sessions on this host remove every container of
# TEST_OWNER when they finish, and our session must not remove theirs (see conftest.py).
OWNER = f"{TEST_OWNER}-security"

BASE_LIMITS = {
    "mem_limit": "256M",
    "cpu_limit": 1,
    "pids_limit": 64,
    "disk_limit": "100M",
    "files_limit": 2000,
    "owner": OWNER,
}
PROBE_BOUND = 2.0  # a second kernel must answer within this while an attack runs
DENIED = {"EACCES", "EPERM", "EROFS"}
KERNEL_SOCKETS = {f"k-{i}" for i in range(1, 6)}
SCRATCH = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")


def limits(**overrides) -> dict:
    return {**BASE_LIMITS, **overrides}


def is_docker(backend: str) -> bool:
    return "docker" in backend


def code_with(body: str, **values) -> str:
    """Kernel code: ``NAME = <repr>`` lines for ``values``, then ``body``."""
    prelude = "".join(f"{name} = {value!r}\n" for name, value in values.items())
    return prelude + body


async def run_ok(kc, code: str, timeout: float = 60) -> dict:
    """``run`` that retries a request ipykernel 6 aborted.

    After an execution ends in an error, ipykernel 6 aborts the requests already queued;
    one sent right after the error reply can land in that window.
    """
    for _ in range(5):
        out = await run(kc, code, timeout=timeout)
        if out["status"] != "aborted":
            return out
        await asyncio.sleep(0.3)
    return out


async def run_json(kc, code: str, timeout: float = 60):
    """Run ``code`` (which prints one JSON line last) and return that value."""
    out = await run_ok(kc, code, timeout=timeout)
    assert out["status"] == "ok", f"kernel code failed: {out}"
    lines = out["stdout"].strip().splitlines()
    assert lines, f"kernel code printed nothing: {out}"
    return json.loads(lines[-1])


async def probe_latency(kc) -> float:
    """Seconds a (second) kernel takes to answer ``1+1``; asserts the answer."""
    t0 = time.monotonic()
    out = await run_ok(kc, "print(1+1)", timeout=30)
    latency = time.monotonic() - t0
    assert out["stdout"].strip() == "2", f"probe kernel answered {out}"
    return latency


# -- the kernel's processes, seen from the host -------------------------------------------


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def kernel_main_pid(km) -> int:
    """Host pid of the kernel process itself (not the launcher / the container's init)."""
    pids = kernel_pids(km)
    candidates = set()
    for pid in pids:
        argv = cmdline(pid)
        joined = " ".join(argv)
        if "ipykernel_launcher" not in joined:
            continue
        launcher = any(part.endswith("/process/launch.py") for part in argv)
        if launcher or "docker-init" in (argv[0] if argv else ""):
            continue
        candidates.add(pid)
    top = []
    for pid in candidates:
        try:
            if psutil.Process(pid).ppid() not in candidates:
                top.append(pid)
        except psutil.NoSuchProcess:
            pass
    if len(top) != 1:
        raise LookupError(f"no single kernel process in {pids} ({top})")
    return top[0]


def namespace(pid: int | str, kind: str) -> str:
    return os.readlink(f"/proc/{pid}/ns/{kind}")


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    result = {}
    for item in raw.split(b"\0"):
        if b"=" in item:
            name, _, value = item.partition(b"=")
            result[name.decode(errors="replace")] = value.decode(errors="replace")
    return result


def tcp_listeners(pids) -> list[tuple[int, str, str]]:
    """(pid, table, local address) of every listening TCP socket the processes hold.

    Reads each process's own ``/proc/<pid>/net/tcp{,6}``, i.e. the table of *its* network
    namespace (a container's, or the host's), and matches the socket inodes of its fds.
    """
    found = []
    for pid in pids:
        inodes = set()
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        for table in ("tcp", "tcp6"):
            try:
                lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
            except OSError:
                continue
            for line in lines:
                fields = line.split()
                if len(fields) > 9 and fields[3] == "0A" and fields[9] in inodes:
                    found.append((pid, table, fields[1]))
    return found


async def wait_for(predicate, timeout: float, interval: float = 0.1, what: str = "condition"):
    """Await until ``await predicate()`` (or a plain call) is truthy; returns its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


async def wait_restarted(km, kc, old_pid: int, timeout: float = 40, cancel=None) -> int:
    """Wait until a new kernel process (not ``old_pid``) runs and answers; its pid.

    ``cancel``: a task still reading the client's channels (the execution the restart
    killed), cancelled before waiting for the new kernel: two coroutines reading one
    zmq.asyncio socket can starve each other.
    """

    async def new_process():
        if not await km.is_alive():
            return None
        try:
            pid = kernel_main_pid(km)
        except LookupError:
            return None
        return pid if pid != old_pid else None

    pid = await wait_for(new_process, timeout, what="the restarted kernel process")
    if cancel is not None:
        cancel.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await cancel
    await kc.wait_for_ready(timeout=timeout)
    return pid


# -- host state -------------------------------------------------------------------------


def stat_record(path: Path) -> tuple:
    st = os.lstat(path)
    return (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
            st.st_size, st.st_nlink, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


class RssPeak:
    """Samples this process's resident memory every 20 ms until ``stop()``."""

    def __init__(self):
        self._proc = psutil.Process()
        self.baseline = self._proc.memory_info().rss
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def stop(self) -> int:
        """Growth of the peak over the baseline, in bytes."""
        self._stop.set()
        self._thread.join()
        return self.peak - self.baseline


def sysvipc_shm_rows() -> list[dict[str, int]]:
    """The host's (this process's IPC namespace's) SysV shm segments."""
    return parse_sysvipc_shm(Path("/proc/sysvipc/shm").read_text())


def parse_sysvipc_shm(text: str) -> list[dict[str, int]]:
    lines = text.splitlines()
    if not lines:
        return []
    titles = lines[0].split()
    rows = []
    for line in lines[1:]:
        fields = line.split()
        if len(fields) >= len(titles):
            rows.append({t: int(v) for t, v in zip(titles, fields) if v.lstrip("-").isdigit()})
    return rows


# -- inotify: who touched a decoy ---------------------------------------------------------

_IN_NONBLOCK = 0o4000
_IN_CLOEXEC = 0o2000000
IN_EVENTS = {
    0x1: "ACCESS", 0x2: "MODIFY", 0x4: "ATTRIB", 0x8: "CLOSE_WRITE", 0x10: "CLOSE_NOWRITE",
    0x20: "OPEN", 0x40: "MOVED_FROM", 0x80: "MOVED_TO", 0x100: "CREATE", 0x200: "DELETE",
    0x400: "DELETE_SELF", 0x800: "MOVE_SELF", 0x40000000: "ISDIR",
}
IN_ALL = 0xFFF


class Inotify:
    """Every open, read, write, attribute change, create, delete or move of the watched
    paths, by anyone (stat does not count). The only way to see that root *read* a
    decoy through a planted link: nothing about the decoy changes then."""

    def __init__(self, paths):
        import ctypes

        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self._paths = {}
        for path in paths:
            wd = self._libc.inotify_add_watch(self.fd, os.fsencode(str(path)), IN_ALL)
            if wd < 0:
                raise OSError(ctypes.get_errno(), f"inotify_add_watch {path}")
            self._paths[wd] = str(path)

    def read(self) -> list[tuple[str, str, str]]:
        """(watched path, event names, entry name) of what happened since the last read."""
        import struct

        events = []
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            offset = 0
            while offset + 16 <= len(data):
                wd, mask, _cookie, length = struct.unpack_from("iIII", data, offset)
                name = data[offset + 16: offset + 16 + length].rstrip(b"\0").decode(
                    errors="replace")
                offset += 16 + length
                if mask & 0x8000:  # IN_IGNORED: the watch went away
                    continue
                kinds = "|".join(v for k, v in IN_EVENTS.items() if mask & k)
                events.append((self._paths.get(wd, "?"), kinds, name))
        return events

    def close(self) -> None:
        os.close(self.fd)
