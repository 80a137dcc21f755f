"""Containment, classes 6-10 of SECURITY.md, with real kernels on both backends.

As in test_containment.py (classes 1-5): the kernel is the attacker, every verdict is
taken from the host, and each test has a positive control so that it can fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import re
import stat
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import zmq
import zmq.asyncio

from limited_provisioner.errors import LimitConfigError
from limited_provisioner.process.cgroups import kernel_group_dirs
from limited_provisioner.uids import lease_dir

from ..conftest import backends
from ..harness import kernel_pids
from .containment import (
    DENIED,
    PROBE_BOUND,
    SCRATCH,
    RssPeak,
    code_with,
    environ_of,
    is_docker,
    kernel_main_pid,
    limits,
    namespace,
    parse_sysvipc_shm,
    probe_latency,
    run_json,
    run_ok,
    sysvipc_shm_rows,
    wait_for,
)

# -- class 6: output is not a weapon ----------------------------------------------------------

OUTPUT_LIMIT = 2**20
# What one execution may put on IOPub: the limit, the proxy's framing allowance (64 KiB),
# the notice, and the few small messages every execution has (status, execute_input).
IOPUB_BOUND = OUTPUT_LIMIT + 128 * 1024
NOTICE = re.compile(r"output limit of \d+ bytes reached")

RAW_STREAM_FLOOD = r'''
k = get_ipython().kernel
parent = k.get_parent("shell")
chunk = "x" * 2**20
for i in range(200):
    k.session.send(k.iopub_socket, "stream", {"name": "stdout", "text": chunk}, parent=parent)
'''

DISPLAY_FLOOD = r'''
from IPython.display import display
chunk = "y" * 2**20
for i in range(200):
    display({"text/plain": chunk}, raw=True)
'''

# Each message claims a parent request nobody sent (a fresh msg_id).
FORGED_PARENT_FLOOD = r'''
import uuid
k = get_ipython().kernel
parent = k.get_parent("shell")
chunk = "z" * 2**20
for i in range(100):
    forged = dict(parent, header=dict(parent["header"], msg_id=uuid.uuid4().hex))
    k.session.send(k.iopub_socket, "stream", {"name": "stdout", "text": chunk}, parent=forged)
'''

# 'status' messages padded with a payload.
STATUS_FLOOD = r'''
k = get_ipython().kernel
parent = k.get_parent("shell")
chunk = "s" * 2**20
for i in range(100):
    k.session.send(k.iopub_socket, "status", {"execution_state": "busy", "pad": chunk},
                   parent=parent)
'''


class IOPubTap:
    """A raw SUB socket on the clients' side of the proxy: every byte any client gets."""

    def __init__(self, km):
        info = km.get_connection_info()
        self._ctx = zmq.asyncio.Context()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.linger = 0
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._sub.connect(f"ipc://{info['ip']}-{info['iopub_port']}")
        self.bytes = 0
        self.messages = 0
        self._task = asyncio.ensure_future(self._listen())

    async def _listen(self):
        while True:
            frames = await self._sub.recv_multipart()
            self.bytes += sum(len(f) for f in frames)
            self.messages += 1

    def reset(self):
        self.bytes = self.messages = 0

    async def close(self):
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._sub.close()
        self._ctx.term()


async def execute_collecting(kc, code: str, timeout: float = 60) -> dict:
    """Run ``code``; sizes of what the client got for it, by kind, and the notices."""
    got = {"stream": 0, "display_data": 0, "notices": 0, "status": None}

    def hook(msg):
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            if NOTICE.search(content["text"]):
                got["notices"] += 1
            else:
                got["stream"] += len(content["text"])
        elif kind == "display_data":
            got["display_data"] += sum(len(str(v)) for v in content["data"].values())

    reply = await kc.execute_interactive(code, timeout=timeout, output_hook=hook)
    got["status"] = reply["content"]["status"]
    return got


@pytest.mark.parametrize("backend", backends(), indirect=True)
async def test_output_flood_is_capped_per_execution(backend, lp_kernels):
    """Class 6a/b: 200 x 1 MB raw IOPub stream sends, then 200 x 1 MB display_data, with
    output_limit 1M: the client gets at most ~1.1 MB of each cell plus one notice, the
    server does not swell, a second kernel keeps answering, the next cell works."""
    _probe_km, probe_kc = await lp_kernels(limits(), backend)
    km, kc = await lp_kernels(limits(output_limit="1M"), backend)
    tap = IOPubTap(km)
    try:
        await asyncio.sleep(0.5)
        rss = RssPeak()
        for code, kind in ((RAW_STREAM_FLOOD, "stream"), (DISPLAY_FLOOD, "display_data")):
            tap.reset()
            task = asyncio.ensure_future(execute_collecting(kc, code))
            await asyncio.sleep(0.1)
            latency = await probe_latency(probe_kc)
            got = await task
            await asyncio.sleep(0.5)
            assert got["status"] == "ok", got
            assert 0 < got[kind] <= 1.1 * OUTPUT_LIMIT, f"{kind}: client got {got}"
            assert got["notices"] == 1, f"{kind}: {got['notices']} notices"
            assert tap.bytes <= IOPUB_BOUND, f"{kind}: {tap.bytes} bytes on IOPub"
            assert latency < PROBE_BOUND, f"{kind}: probe answered in {latency:.2f}s"
        growth = rss.stop()
        assert growth < 50 * 2**20, f"server RSS grew by {growth / 2**20:.0f} MB"
    finally:
        await tap.close()
    out = await run_ok(kc, "print(6*7)")
    assert out["stdout"].strip() == "42", out


@pytest.mark.parametrize("backend", backends(), indirect=True)
@pytest.mark.parametrize("flood", ["forged-parent", "padded-status"])
async def test_output_limit_cannot_be_dodged_by_message_headers(backend, flood, lp_kernels):
    """Class 6: 'whatever it uses to send'. 100 x 1 MB signed IOPub messages in one
    execution, each claiming a parent request nobody sent, or typed 'status' with a
    payload: what reaches clients during that execution stays within output_limit."""
    km, kc = await lp_kernels(limits(output_limit="1M"), backend)
    tap = IOPubTap(km)
    try:
        await asyncio.sleep(0.5)
        code = FORGED_PARENT_FLOOD if flood == "forged-parent" else STATUS_FLOOD
        out = await run_ok(kc, code)
        await asyncio.sleep(1.0)
        assert out["status"] == "ok", out
        assert tap.messages > 0  # the tap sees the cell's own messages
        assert tap.bytes <= IOPUB_BOUND, (
            f"{flood}: {tap.bytes / 2**20:.1f} MiB in {tap.messages} IOPub messages reached "
            f"clients in one execution with output_limit 1M")
    finally:
        await tap.close()


async def run_or_hang(kc, code: str, timeout: float) -> dict:
    """``run_ok``, with a client that never got the cell's end reported as such."""
    try:
        return await run_ok(kc, code, timeout=timeout)
    except TimeoutError:
        return {"status": f"no end of the cell on IOPub within {timeout:g}s", "stdout": ""}


@pytest.mark.parametrize("backend", backends(), indirect=True)
async def test_oversized_message_is_dropped_and_output_keeps_flowing(backend, lp_kernels):
    """Class 6: the proxy "drops messages over max_message_size". One ordinary 2 MiB
    print with max_message_size 1M is that message: it is dropped, the rest of the cell's
    output and every later cell's still reach clients."""
    km, kc = await lp_kernels(limits(max_message_size="1M"), backend)
    out = await run_ok(kc, "print('before')")
    assert out["stdout"] == "before\n", out  # the link works
    # The flush makes the big print one message of its own (ipykernel batches writes).
    code = "import sys\nprint('x' * 2 * 2**20)\nsys.stdout.flush()\nprint('after')"
    big = await run_or_hang(kc, code, timeout=6)
    after = await run_or_hang(kc, "print('next')", timeout=6)
    assert (big["status"], after["status"]) == ("ok", "ok"), (
        f"the cell with the oversized message: {big['status']}; the next cell: "
        f"{after['status']}; messages dropped by the proxy: {km.provisioner.connection.proxy.dropped}")
    assert "after" in big["stdout"] and len(big["stdout"]) < 2**20, big["stdout"][:200]
    assert after["stdout"] == "next\n", after


# ipykernel redirects fds 1 and 2 into a pipe it forwards to clients as stream output
# (where output_limit applies); the fds the kernel was started with survive as
# ``_original_stdstream_copy``: a kernel that wants to flood the server's own streams
# writes there.
FD_FLOOD = r'''
import os, sys
token = ("LP" + "FD" + "FLOOD").encode()
chunk = (token * (2**20 // len(token) + 1))[:2**20]
originals = [getattr(s, "_original_stdstream_copy", None) for s in (sys.stdout, sys.stderr)]
print(originals, flush=True)
for fd in (1, originals[0]):
    if fd is not None:
        for i in range(N):
            os.write(fd, chunk)
for fd in (2, originals[1]):
    if fd is not None:
        for i in range(N // 10):
            os.write(fd, chunk)
'''


@pytest.mark.parametrize("backend", backends(), indirect=True)
async def test_raw_fd_writes_stay_out_of_server_streams(backend, lp_kernels, capfd):
    """Class 6c: raw writes to fds 1 and 2 never reach the server's own streams; the
    process backend keeps at most kernel_log_limit of them in a root-only kernel.log, and
    Docker's json log is capped at log_max_size."""
    log_limit = 256 * 1024
    config = limits(output_limit="1M")
    if not is_docker(backend):
        config["kernel_log_limit"] = log_limit
    km, kc = await lp_kernels(config, backend)
    prov = km.provisioner
    n = 20 if is_docker(backend) else 100
    out = await run_ok(kc, code_with(FD_FLOOD, N=n), timeout=120)
    assert out["status"] == "ok", out
    originals = out["stdout"].splitlines()[0]
    assert re.fullmatch(r"\[\d+, \d+\]", originals), originals  # the real fds were used
    await asyncio.sleep(1.0)
    captured = capfd.readouterr()
    assert "LPFDFLOOD" not in captured.out and "LPFDFLOOD" not in captured.err
    if is_docker(backend):
        import docker

        attrs = docker.from_env().api.inspect_container(prov.container_id)
        log = attrs["HostConfig"]["LogConfig"]
        assert log["Type"] == "json-file", log
        assert log["Config"].get("max-size") == prov.log_max_size == "1m", log
        assert log["Config"].get("max-file") == "1", log
        size = os.stat(attrs["LogPath"]).st_size
        assert 0 < size <= 2**20 + 64 * 1024, f"container log is {size} bytes"
    else:
        path = Path(prov.kernel_dir) / "kernel.log"
        st = os.lstat(path)
        assert stat.S_ISREG(st.st_mode) and st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_size <= log_limit + 1024, f"kernel.log is {st.st_size} bytes"
        assert b"LPFDFLOOD" in path.read_bytes()[:log_limit]  # it went there, capped
    out = await run_ok(kc, "print(1+1)")
    assert out["stdout"].strip() == "2", out


# -- class 7: storage and IPC stay inside -----------------------------------------------------

SCRATCH_AND_SHM = r'''
import ctypes, errno, json, os

def err(e):
    return errno.errorcode.get(e.errno, str(e.errno))

res = {"scratch": {}, "kernel dir": {}}
for d in SCRATCH:
    path = d + "/" + NAME
    try:
        with open(path, "w") as f:
            f.write("lp scratch\n")
        res["scratch"][path] = "OK" if os.path.exists(path) else "missing"
    except OSError as e:
        res["scratch"][path] = err(e)
for label, path in {"kernel dir": KD + "/" + NAME, "ctl": KD + "/ctl/" + NAME,
                    "sock": KD + "/sock/" + NAME}.items():
    try:
        open(path, "w").close()
        res["kernel dir"][label] = "OK"
    except OSError as e:
        res["kernel dir"][label] = err(e)

libc = ctypes.CDLL(None, use_errno=True)
libc.shmget.restype = ctypes.c_int
libc.shmget.argtypes = (ctypes.c_int, ctypes.c_size_t, ctypes.c_int)
libc.shmat.restype = ctypes.c_void_p
libc.shmat.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_int)
libc.shmdt.argtypes = (ctypes.c_void_p,)
shmid = libc.shmget(KEY, 2**20, 0o1000 | 0o600)  # IPC_CREAT | 0600
res["shmid"] = shmid
if shmid >= 0:
    addr = libc.shmat(shmid, None, 0)
    if addr is not None and addr != ctypes.c_void_p(-1).value:
        ctypes.memset(addr, 0x5A, 2**20)
        res["shmdt"] = libc.shmdt(addr)  # detached, not removed
print(json.dumps(res))
'''


WRITABLE_DIRS = r'''
import json, os
found = []
for root, dirs, files in os.walk("/"):
    dirs[:] = [d for d in dirs if os.path.join(root, d) not in ("/proc", "/sys")]
    if os.access(root, os.W_OK):
        found.append(root)
        dirs[:] = []
print(json.dumps(found))
'''


def nsenter(pid: int, flag: str, *argv: str) -> str:
    return subprocess.run(["nsenter", "-t", str(pid), flag, "--", *argv], capture_output=True,
                          text=True, timeout=20, check=True).stdout


@pytest.mark.parametrize("backend", backends(), indirect=True)
async def test_scratch_files_and_sysv_shm_stay_inside_the_kernel(backend, lp_kernels):
    """Class 7: files in /tmp, /var/tmp, /dev/shm, /run/lock and a SysV shm segment the
    kernel leaves behind are in its own namespaces only: the host never sees them, during
    or after; the kernel dir outside work/ is not writable."""
    km, kc = await lp_kernels(limits(), backend)
    prov = km.provisioner
    uid, kd = prov.uid, str(prov.kernel_dir)
    name = f"lp-sec-{uuid.uuid4().hex}"
    key = int.from_bytes(os.urandom(3), "big") + 0x10000
    res = await run_json(kc, code_with(SCRATCH_AND_SHM, SCRATCH=list(SCRATCH), NAME=name,
                                       KD=kd, KEY=key))
    assert set(res["scratch"].values()) == {"OK"}, res  # it did write them (inside)
    assert res["shmid"] >= 0 and res.get("shmdt") == 0, res
    wrong = {k: v for k, v in res["kernel dir"].items() if v not in DENIED}
    assert not wrong, f"wrote into its kernel dir outside work/: {wrong}"
    main = kernel_main_pid(km)
    # Everywhere the kernel may write (the walk cannot enter the 0711 kernels dir, so its
    # own work/ and conn/ show up only in a container, where they are mounted).
    writable = set(await run_json(kc, WRITABLE_DIRS, timeout=120))
    allowed = {*SCRATCH, f"{kd}/work", f"{kd}/conn"}
    if is_docker(backend):
        allowed.add("/dev/mqueue")  # the container's own (private IPC namespace)
    assert set(SCRATCH) <= writable, writable  # the walk sees the scratch dirs
    assert writable <= allowed, f"writable outside its dirs: {sorted(writable - allowed)}"

    def assert_host_clean(when: str):
        leaked = [f"{d}/{name}" for d in SCRATCH if os.path.lexists(f"{d}/{name}")]
        assert not leaked, f"{when}: kernel files in the host's scratch dirs: {leaked}"
        rows = [r for r in sysvipc_shm_rows() if r.get("key") == key or r.get("uid") == uid]
        assert not rows, f"{when}: host SysV shm segments of the kernel: {rows}"
        for label in ("kernel dir", "ctl", "sock"):
            path = f"{kd}/{name}" if label == "kernel dir" else f"{kd}/{label}/{name}"
            assert not os.path.lexists(path), f"{when}: {path} exists"

    assert_host_clean("while the kernel runs")
    # Positive controls, from the host but inside the kernel's namespaces.
    assert namespace(main, "ipc") != namespace("self", "ipc")
    inside = parse_sysvipc_shm(nsenter(main, "-i", "cat", "/proc/sysvipc/shm"))
    assert any(r.get("key") == key and r.get("uid") == uid for r in inside), inside
    for d in SCRATCH:
        assert nsenter(main, "-m", "cat", f"{d}/{name}") == "lp scratch\n"

    await km.shutdown_kernel(now=True)
    await asyncio.sleep(0.3)
    assert_host_clean("after shutdown")


# -- class 8: kernels cannot see each other ---------------------------------------------------

LOOK_AROUND = r'''
import json, os
seen, hits = {}, []
for entry in os.listdir("/proc"):
    if not entry.isdigit():
        continue
    info = {}
    for part in ("cmdline", "environ"):
        try:
            with open("/proc/%s/%s" % (entry, part), "rb") as f:
                data = f.read()
        except OSError as e:
            info[part] = e.errno
            continue
        if OTHER.encode() in data:
            hits.append([entry, part])
        if part == "environ":
            info["mine"] = ("LIMITED_PROVISIONER_KERNEL_ID=" + MINE).encode() in data.split(b"\0")
        else:
            # The process sandbox's own init: unreadable environment, and a command line
            # that is no longer the launcher's (with its spec).
            info["init"] = data.rstrip(b"\0") == b"limited-provisioner-init"
    seen[entry] = info
print(json.dumps({"seen": seen, "hits": hits}))
'''


@pytest.mark.parametrize("backend", backends(), indirect=True)
async def test_kernels_cannot_see_each_other(backend, lp_kernels):
    """Class 8: in kernel A's /proc, nothing mentions kernel B, and only A's own few
    processes are listed (as many as the host counts in A's pid namespace)."""
    km_b, _kc_b = await lp_kernels(limits(), backend)
    km_a, kc_a = await lp_kernels(limits(), backend)
    id_a, id_b = km_a.kernel_id, km_b.kernel_id
    main_a, main_b = kernel_main_pid(km_a), kernel_main_pid(km_b)
    # Positive control: B's processes do carry B's id where A would look.
    assert environ_of(main_b).get("LIMITED_PROVISIONER_KERNEL_ID") == id_b
    ns_a, ns_b, ns_host = (namespace(p, "pid") for p in (main_a, main_b, "self"))
    assert len({ns_a, ns_b, ns_host}) == 3, "kernels share a pid namespace"

    res = await run_json(kc_a, code_with(LOOK_AROUND, OTHER=id_b, MINE=id_a))
    assert res["hits"] == [], f"kernel A sees kernel B: {res['hits']}"
    seen = res["seen"]
    assert 1 <= len(seen) <= 4, f"kernel A sees {len(seen)} processes: {sorted(seen)}"
    assert all(info.get("mine") or info.get("init") for info in seen.values()), seen
    in_ns_a = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if namespace(entry, "pid") == ns_a:
                    in_ns_a.append(int(entry))
    assert len(in_ns_a) == len(seen), (in_ns_a, sorted(seen))
    assert set(in_ns_a) <= kernel_pids(km_a)


# -- class 9: the enforcement report tells the truth ------------------------------------------


def kernel_leftovers(kernel_id: str, state_dir: Path) -> list[str]:
    """Everything of ``kernel_id`` still on the host."""
    found = []
    for sub in ("registry", "kernels", "clients"):
        path = state_dir / sub
        if path.is_dir():
            found += [f"{sub}/{n}" for n in os.listdir(path) if kernel_id in n]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if environ_of(int(entry)).get("LIMITED_PROVISIONER_KERNEL_ID") == kernel_id:
                    found.append(f"process {entry}")
    found += [str(group) for group in kernel_group_dirs(kernel_id)]
    leases = lease_dir()
    if leases.is_dir():
        for lease in leases.iterdir():
            if lease.name.isdigit():
                with contextlib.suppress(OSError, ValueError):
                    if json.loads(lease.read_text()).get("kernel_id") == kernel_id:
                        found.append(f"uid lease {lease.name}")
    return found


async def test_state_dir_in_a_private_scratch_dir_is_refused(start_kernel):
    """Class 9: as root, the process backend refuses a state_dir under /var/tmp (every
    kernel gets a private, empty /var/tmp) with a reason and the fix; nothing is left."""
    state_dir = Path(tempfile.mkdtemp(prefix="lp-sd-", dir="/var/tmp"))
    try:
        os.chmod(state_dir, 0o711)
        kernel_id = str(uuid.uuid4())
        with pytest.raises(LimitConfigError) as raised:
            await start_kernel(limits(state_dir=str(state_dir)), kernel_id=kernel_id)
        msg = str(raised.value)
        assert str(state_dir) in msg and "/var/tmp" in msg, msg
        assert "state_dir outside" in msg and "/var/lib/limited-provisioner" in msg, msg
        assert kernel_leftovers(kernel_id, state_dir) == []
    finally:
        import shutil

        shutil.rmtree(state_dir, ignore_errors=True)


def interfaces(pid: int) -> set[str]:
    lines = Path(f"/proc/{pid}/net/dev").read_text().splitlines()[2:]
    return {line.split(":")[0].strip() for line in lines}


@pytest.mark.parametrize("backend", backends(), indirect=True)
async def test_enforcement_report_tells_the_truth(backend, lp_kernels):
    """Class 9: the report lists isolation and claims 'network: hard' only with network
    off; the host agrees (namespaces, interfaces)."""
    km_off, _ = await lp_kernels(limits(), backend)
    km_on, _ = await lp_kernels(limits(network=True), backend)
    host = {kind: namespace("self", kind) for kind in ("pid", "ipc", "mnt", "net")}
    for km, network in ((km_off, False), (km_on, True)):
        enforcement = (await km.provisioner.get_provisioner_info())["enforcement"]
        main = kernel_main_pid(km)
        assert "isolation" in enforcement, enforcement
        assert "NOT enforced" not in enforcement["isolation"], enforcement["isolation"]
        for kind in ("pid", "ipc", "mnt"):
            assert namespace(main, kind) != host[kind], f"{kind} namespace shared with host"
        claim = enforcement.get("network", "")
        if network:
            assert not claim.startswith("hard") and "allowed" in claim, claim
            if is_docker(backend):
                assert interfaces(main) - {"lo"}, "network=True but no interface"
            else:
                assert namespace(main, "net") == host["net"]
        else:
            assert claim.startswith("hard"), claim
            assert namespace(main, "net") != host["net"]
            assert interfaces(main) == {"lo"}, interfaces(main)


# -- class 10: idle culling cannot be defeated from inside -----------------------------------

PRINTER = r'''
import threading, time

def chatter():
    while True:
        print("still here", flush=True)
        time.sleep(0.5)

threading.Thread(target=chatter, daemon=True).start()
'''
IDLE_TIMEOUT = 3
CULL_BOUND = 8.0


@pytest.mark.parametrize("backend", backends(), indirect=True)
async def test_idle_culling_ignores_kernel_output_and_housekeeping(backend, lp_kernels):
    """Class 10: with idle_timeout=3, a kernel printing every 0.5 s from a background
    thread, and one receiving a kernel_info request every second, are both shut down
    within ~8 s of their last real request."""
    config = limits(idle_timeout=IDLE_TIMEOUT)

    async def start_and_request(code: str):
        """A kernel given its last real request as soon as it is ready: its idle clock
        runs from its start, and on a slow box the other kernel's start alone can outlast
        idle_timeout (run one after the other, the first was culled before its request)."""
        km, kc = await lp_kernels(config, backend)
        out = await run_ok(kc, code)
        return km, kc, out, time.monotonic()

    (km_p, kc_p, out, t_p), (km_i, kc_i, out_i, t_i) = await asyncio.gather(
        start_and_request(PRINTER), start_and_request("print(1+1)"))
    assert out["status"] == "ok", out
    assert out_i["stdout"].strip() == "2", out_i
    prov_p, prov_i = km_p.provisioner, km_i.provisioner

    printed = 0

    async def count_output():
        nonlocal printed
        while True:
            msg = await kc_p.get_iopub_msg()
            if msg["msg_type"] == "stream" and "still here" in msg["content"]["text"]:
                printed += 1

    answered = 0

    async def poll_kernel_info():
        nonlocal answered
        while True:
            t0 = time.monotonic()
            with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                await kc_i.kernel_info(reply=True, timeout=0.9)
                answered += 1
            await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - t0)))

    culled = {}

    async def watch(km, name, since):
        prov = km.provisioner
        kernel_dir = prov.kernel_dir
        await wait_for(lambda: _dead(km), CULL_BOUND + 4, what=f"{name} to be culled")
        culled[name] = time.monotonic() - since
        # Shut down, not only dead: the entry, dir and uid are released too (and the
        # test does not end under the feet of the shutdown still running).
        await wait_for(
            lambda: prov.registry.read(km.kernel_id) is None and not kernel_dir.exists(),
            10, what=f"{name}'s shutdown to finish",
        )

    tasks = [asyncio.ensure_future(count_output()), asyncio.ensure_future(poll_kernel_info())]
    try:
        await asyncio.gather(watch(km_p, "printer", t_p), watch(km_i, "polled", t_i))
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
    assert printed >= 4, f"the printer printed {printed} times"  # it kept talking
    assert answered >= 2, f"{answered} kernel_info replies"  # and answered housekeeping
    for name, prov in (("printer", prov_p), ("polled", prov_i)):
        assert IDLE_TIMEOUT - 0.5 <= culled[name] <= CULL_BOUND, (name, culled)
        assert prov.exit_reason and "idle_timeout" in prov.exit_reason, prov.exit_reason


async def _dead(km) -> bool:
    return not await km.is_alive()


# -- classes 2 and 6: only replies to real requests, within the budget, reach clients ---------

# The kernel answers its own request (the running cell's) with made-up replies: correctly
# signed, sent where ipykernel sends its real replies (6: the shell stream; 7: the main
# shell's pipe to the shell-channel thread), routed by the identity frames of the running
# request (the requesting client), each claiming a parent request nobody sent, or one a
# client sent and already got its reply to.
FORGED_REPLIES = r'''
import json
k = get_ipython().kernel
ident, head = k._parent_ident["shell"], k.get_parent("shell")["header"]
if getattr(k, "_supports_kernel_subshells", False):  # ipykernel 7: via the shell thread
    stream = k.shell_channel_thread.manager.get_subshell_to_shell_channel_socket(None)
else:
    stream = k.shell_stream
content = {"status": "ok", "execution_count": 1, "user_expressions": {}, "payload": []}
parents = [{"msg_id": "made-up-%d" % i, "msg_type": "execute_request",
            "session": head["session"], "username": head.get("username", ""),
            "version": head.get("version", "5.3")} for i in range(N)]
parents += [dict(parents[0], msg_id=ANSWERED) for i in range(N_ANSWERED)]
for parent in parents:
    k.session.send(stream, "execute_reply", content, parent=parent, ident=ident)
print(json.dumps({"sent": len(parents), "idents": len(ident)}))
'''

# input_request messages on the kernel's stdin socket, to the requesting client: signed
# first, then sent as raw frames as fast as the socket takes them; the cell ends right after.
INPUT_FLOOD = r'''
import json
k = get_ipython().kernel
ident, request = k._parent_ident["shell"], k.get_parent("shell")
content = {"prompt": "p" * SIZE, "password": False}
messages = [k.session.serialize(k.session.msg("input_request", content, parent=request),
                                ident=ident) for i in range(N)]
sent = 0
for frames in messages:
    k.stdin_socket.send_multipart(frames)
    sent += 1
del messages
'''


async def execute_watching(kc, code: str, allow_stdin: bool = False, settle: float = 1.0,
                           timeout: float = 60) -> dict:
    """Run ``code`` through a client; everything that client got on shell and stdin until
    ``settle`` s after the cell's real reply, and the cell's stdout."""
    msg_id = kc.execute(code, allow_stdin=allow_stdin, store_history=False)
    got: dict = {"msg_id": msg_id, "shell": [], "stdin": [], "stdout": "", "reply": None}

    async def read(get, into):
        while True:
            with contextlib.suppress(queue.Empty):
                into.append(await get(timeout=0.2))

    async def read_iopub():
        while True:
            with contextlib.suppress(queue.Empty):
                msg = await kc.get_iopub_msg(timeout=0.2)
                if (msg["parent_header"].get("msg_id") == msg_id
                        and msg["msg_type"] == "stream" and msg["content"]["name"] == "stdout"):
                    got["stdout"] += msg["content"]["text"]

    readers = [read(kc.get_shell_msg, got["shell"]), read(kc.get_stdin_msg, got["stdin"]),
               read_iopub()]
    return await read_until_reply(got, readers, timeout, settle, "the cell's execute_reply")


async def read_until_reply(got: dict, readers: list, timeout: float, settle: float,
                           what: str) -> dict:
    """Run ``readers`` until ``got["shell"]`` holds the reply to ``got["msg_id"]``, and
    ``settle`` s more; then cancel them. Returns ``got`` with ``reply`` set."""
    tasks = [asyncio.ensure_future(reader) for reader in readers]
    try:
        def replied():
            return next((m for m in got["shell"]
                         if m["parent_header"].get("msg_id") == got["msg_id"]), None)

        got["reply"] = await wait_for(replied, timeout, what=what)
        await asyncio.sleep(settle)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
    return got


class DirectKernel:
    """Root's own connection to the kernel's shell and stdin sockets, behind the proxy's
    back (one identity on both, as a client has): the control that shows what the
    kernel's sends deliver when nothing filters them."""

    def __init__(self, km):
        from jupyter_client.session import Session

        from limited_provisioner.proxy import PORTS

        proxy = km.provisioner.connection.proxy
        self.session = Session(key=proxy.key, signature_scheme=proxy.signature_scheme,
                               username="lp-test")
        self._ctx = zmq.asyncio.Context()
        identity = os.urandom(8)
        self.sockets = {}
        for channel in ("shell", "stdin"):
            sock = self._ctx.socket(zmq.DEALER)
            sock.linger = 0
            sock.setsockopt(zmq.IDENTITY, identity)
            sock.connect(f"ipc://{proxy.kernel_prefix}-{PORTS[channel]}")
            self.sockets[channel] = sock

    async def execute(self, code: str, settle: float = 1.0, timeout: float = 60) -> dict:
        msg = self.session.msg("execute_request", {
            "code": code, "silent": False, "store_history": False, "user_expressions": {},
            "allow_stdin": True, "stop_on_error": True})
        msg_id = msg["header"]["msg_id"]
        await asyncio.sleep(0.3)  # the connections are up
        await self.sockets["shell"].send_multipart(self.session.serialize(msg))
        got: dict = {"msg_id": msg_id, "shell": [], "stdin": [], "reply": None}

        async def read(channel):
            while True:
                frames = await self.sockets[channel].recv_multipart()
                try:
                    _idents, rest = self.session.feed_identities(frames)
                    got[channel].append(self.session.deserialize(rest))
                except ValueError:
                    got.setdefault("unparsable", []).append(frames)

        readers = [read(channel) for channel in self.sockets]
        return await read_until_reply(got, readers, timeout, settle, "the direct execute_reply")

    def close(self):
        for sock in self.sockets.values():
            sock.close(linger=0)
        self._ctx.term()


def other_replies(got: dict) -> list[str]:
    """Parent msg_ids of the shell messages a client got that answer something else than
    its request."""
    return [m["parent_header"].get("msg_id") for m in got["shell"]
            if m["parent_header"].get("msg_id") != got["msg_id"]]


@pytest.mark.parametrize("backend", backends(), indirect=True)
async def test_made_up_replies_never_reach_clients(backend, lp_kernels):
    """Classes 2 and 5: in one cell the kernel sends 200 signed execute_replies to requests
    nobody sent, and 50 to a request already answered, routed to the client running the
    cell: that client gets none of them, only the cell's own reply (once), and the next
    cell works. Control: the same cell over root's own connection to the kernel's shell
    socket delivers all 250 made-up replies."""
    n, n_answered = 200, 50
    km, kc = await lp_kernels(limits(), backend)
    proxy = km.provisioner.connection.proxy
    first = await kc.execute_interactive("1", timeout=30)
    answered = first["parent_header"]["msg_id"]
    code = code_with(FORGED_REPLIES, N=n, N_ANSWERED=n_answered, ANSWERED=answered)

    direct = DirectKernel(km)
    try:
        control = await direct.execute(code)
    finally:
        direct.close()
    assert control["reply"]["content"]["status"] == "ok", control["reply"]["content"]
    made_up = other_replies(control)
    assert len(made_up) == n + n_answered, f"direct: {len(made_up)} made-up replies"
    assert made_up.count(answered) == n_answered

    dropped = proxy.dropped
    got = await execute_watching(kc, code)
    assert got["reply"]["content"]["status"] == "ok", got["reply"]["content"]
    report = json.loads(got["stdout"].strip().splitlines()[-1])
    assert report["sent"] == n + n_answered and report["idents"] >= 1, report
    leaked = other_replies(got)
    assert leaked == [], (
        f"{len(leaked)} made-up replies reached the client, e.g. {sorted(set(leaked))[:5]}")
    assert len(got["shell"]) == 1, [m["msg_type"] for m in got["shell"]]  # its reply, once
    # They reached the proxy (and were refused there), not lost on the way.
    assert proxy.dropped - dropped >= n + n_answered, proxy.dropped - dropped
    out = await run_ok(kc, "print(6*7)")
    assert out["stdout"].strip() == "42", out


@pytest.mark.parametrize("backend", backends(), indirect=True)
async def test_input_request_flood_is_capped_per_execution(backend, lp_kernels):
    """Class 6: 200 input_requests of 100 KiB on the kernel's stdin socket in one cell,
    with output_limit 1M, five cells in a row: a client with allow_stdin gets at most
    ~1.1 MiB of them per cell, each cell's reply arrives and the next cell works.
    Control: over root's own connection to the kernel's sockets all 200 (19.5 MiB) arrive."""
    n, size, rounds = 200, 100 * 1024, 5
    km, kc = await lp_kernels(limits(output_limit="1M"), backend)
    code = code_with(INPUT_FLOOD, N=n, SIZE=size)

    direct = DirectKernel(km)
    try:
        control = await direct.execute(code)
    finally:
        direct.close()
    direct_bytes = sum(len(m["content"]["prompt"]) for m in control["stdin"])
    assert direct_bytes == n * size, f"direct: {direct_bytes} bytes of input requests"

    totals = []
    for _ in range(rounds):
        got = await execute_watching(kc, code, allow_stdin=True, settle=0.5)
        assert got["reply"]["content"]["status"] == "ok", got["reply"]["content"]
        # The cell's own output is past the budget too: it reports in the next cell.
        assert await run_json(kc, "print(json.dumps({'sent': sent}))") == {"sent": n}
        prompts = [len(m["content"]["prompt"]) for m in got["stdin"]
                   if m["msg_type"] == "input_request"]
        assert prompts, "no input request reached the client (the channel works in budget)"
        totals.append(sum(prompts))
    assert max(totals) <= 1.1 * OUTPUT_LIMIT, (
        f"input requests that reached the client per cell: "
        f"{[f'{t / 2**20:.2f} MiB' for t in totals]}, with output_limit 1M")
    out = await run_ok(kc, "print(6*7)")
    assert out["stdout"].strip() == "42", out


# -- class 7: the connection dir counts against disk_limit ------------------------------------

# Files of SIZE bytes in the directory of the kernel's own connection file (its conn/,
# writable by the kernel at any time; bind-mounted at the same path in a container).
CONN_DIR_FILL = r'''
import json, os
from ipykernel.connect import get_connection_file
d = os.path.dirname(os.path.abspath(get_connection_file()))
block = b"c" * SIZE
for i in range(COUNT):
    with open(os.path.join(d, "%s-%d" % (NAME, i)), "wb") as f:
        f.write(block)
print(json.dumps({"dir": d}))
'''


def conn_junk(conn: Path, name: str) -> tuple[int, set[int]]:
    """Bytes on disk and owners of the kernel's ``name-*`` files in its conn dir."""
    used, owners = 0, set()
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(conn):
            if entry.name.startswith(name):
                st = entry.stat(follow_symlinks=False)
                used += st.st_blocks * 512
                owners.add(st.st_uid)
    return used, owners


# How disk_limit holds: the kernel's own filesystem (workfs.py; ENOSPC, nothing over the
# limit) or, as on a host without loop devices, the watchdog (a kill, some overshoot).
DISK_ENFORCERS = [pytest.param("auto", id="own-fs"), pytest.param("off", id="watchdog")]
NO_SPACE = "No space left on device"


@pytest.mark.parametrize("own_filesystem", DISK_ENFORCERS)
@pytest.mark.parametrize("backend", backends(), indirect=True)
async def test_files_in_the_connection_dir_count_against_disk_limit(
    backend, own_filesystem, lp_kernels
):
    """Class 7: with disk_limit 100M, 10 x 20 MB written into the directory of the
    kernel's connection file are refused there (ENOSPC: its own filesystem, the kernel
    lives on, nothing lands over the limit) or get the kernel killed within seconds
    with a reason naming the disk limit (the watchdog); after its shutdown nothing of
    it is left on the host. Control: 10 x 5 MB there (50 MB) leave it running."""
    km, kc = await lp_kernels(
        limits(watchdog_interval=0.2, own_filesystem=own_filesystem), backend
    )
    prov = km.provisioner
    kernel_id, kernel_dir, conn = km.kernel_id, Path(prov.kernel_dir), Path(prov.kdir.conn)
    state_dir = Path(prov.registry.state_dir)
    name = f"lp-sec-{uuid.uuid4().hex[:8]}"
    uid = None if is_docker(backend) else prov.uid

    res = await run_json(kc, code_with(CONN_DIR_FILL, SIZE=5 * 10**6, COUNT=10, NAME=name))
    assert res["dir"] == str(conn), res  # the connection file's dir is conn/ on the host
    used, owners = conn_junk(conn, name)
    assert used >= 50 * 10**6, f"{used} bytes of the kernel's files in {conn}"
    if uid is not None:
        assert owners == {uid}, owners
    await asyncio.sleep(2.0)  # > 2 disk checks (every 4 x 0.2 s)
    assert await km.is_alive(), f"killed with 50 MB in conn/: {prov.exit_reason}"
    assert prov.exit_reason is None, prov.exit_reason
    out = await run_ok(kc, "print(6*7)")
    assert out["stdout"].strip() == "42", out

    fill = code_with(CONN_DIR_FILL, SIZE=20 * 10**6, COUNT=10, NAME=name)
    if own_filesystem == "auto":
        enforcement = (await prov.get_provisioner_info())["enforcement"]
        assert enforcement["disk_limit"].startswith("hard (own ext4 filesystem"), enforcement
        out = await run_ok(kc, fill)
        assert NO_SPACE in (out["error"] or ""), out
        assert conn_junk(conn, name)[0] <= 100 * 2**20  # not a byte over the limit
        await asyncio.sleep(1.0)
        assert await km.is_alive() and prov.exit_reason is None, prov.exit_reason
    else:
        kc.execute(fill + "import time\ntime.sleep(60)\n")
        t0 = time.monotonic()
        await wait_for(lambda: _dead(km), 15, what="the kernel to be killed")
        took = time.monotonic() - t0
        assert prov.exit_reason and "disk limit 100M exceeded" in prov.exit_reason, (
            prov.exit_reason)
        assert took < 8, f"killed {took:.1f}s after the cell started"
        assert conn_junk(conn, name)[0] > 100 * 2**20  # the kernel did get past the limit
        # The main process dies first; the rest of its tree a moment later.
        await wait_for(lambda: not kernel_pids(km), 10, what="the kernel's tree killed")

    await km.shutdown_kernel(now=True)
    assert not kernel_dir.exists(), f"{kernel_dir} is left: {os.listdir(kernel_dir)}"
    assert kernel_leftovers(kernel_id, state_dir) == []
    if is_docker(backend):
        import docker

        from limited_provisioner.docker import LABEL_PREFIX

        assert docker.from_env().containers.list(
            all=True, filters={"label": f"{LABEL_PREFIX}kernel-id={kernel_id}"}) == []


def host_usage(*dirs: Path) -> int:
    """Bytes on disk under ``dirs``, walked from the host (links not followed)."""
    total = 0
    for top in dirs:
        for root, subdirs, files in os.walk(top):
            for name in subdirs + files:
                with contextlib.suppress(FileNotFoundError):
                    total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


@pytest.mark.parametrize("own_filesystem", DISK_ENFORCERS)
@pytest.mark.parametrize("backend", backends(), indirect=True)
async def test_restarted_kernel_with_a_full_connection_dir_stays_limited(
    backend, own_filesystem, lp_kernels
):
    """Class 7: conn/ (like work/) is kept for a restart, and emptied at it. On its own
    filesystem the kernel fills conn/ to ENOSPC, is restarted, fills it again to ENOSPC,
    never over the limit. With the watchdog: a kernel killed for 200 MB there with disk_limit 100M
    and then restarted (what a server's restarter does on its own) is still held to the
    limit: within seconds it is either killed again for the disk limit, or it runs with
    its dirs within the limit (conn/ cleaned) and 10 x 20 MB more there get it killed.
    Control: the first kill."""
    km, kc = await lp_kernels(
        limits(watchdog_interval=0.2, own_filesystem=own_filesystem), backend
    )
    prov = km.provisioner
    kernel_dir = Path(prov.kernel_dir)
    dirs = (kernel_dir / "work", kernel_dir / "conn")
    name = f"lp-sec-{uuid.uuid4().hex[:8]}"
    if own_filesystem == "auto":
        fill = code_with(CONN_DIR_FILL, SIZE=20 * 10**6, COUNT=10, NAME=name)
        out = await run_ok(kc, fill)
        assert NO_SPACE in (out["error"] or ""), out
        before = host_usage(*dirs)
        assert 60 * 2**20 < before <= 100 * 2**20, before  # full, to the limit
        await km.restart_kernel(now=True)
        await kc.wait_for_ready(timeout=30)
        assert host_usage(*dirs) <= 100 * 2**20
        out = await run_ok(kc, fill.replace(name, name + "-again"))
        assert NO_SPACE in (out["error"] or ""), out
        assert host_usage(*dirs) <= 100 * 2**20
        assert await km.is_alive() and prov.exit_reason is None, prov.exit_reason
        return
    fill = code_with(CONN_DIR_FILL + "import time\ntime.sleep(60)\n",
                     SIZE=20 * 10**6, COUNT=10, NAME=name)
    kc.execute(fill)
    await wait_for(lambda: _dead(km), 15, what="the kernel to be killed")
    assert prov.exit_reason and "disk limit 100M exceeded" in prov.exit_reason, (
        prov.exit_reason)
    assert host_usage(*dirs) > 100 * 2**20  # still there: conn/ is kept for the restart

    await km.restart_kernel(now=True)
    await asyncio.sleep(3.0)  # > 3 disk checks (every 4 x 0.2 s)
    alive, used = await km.is_alive(), host_usage(*dirs)
    watchdog = prov.watchdog
    assert not (alive and used > 100 * 2**20), (
        f"the restarted kernel runs unkilled with {used / 2**20:.0f} MiB in work/ and conn/ "
        f"(disk_limit 100M); its watchdog tripped={getattr(watchdog, 'tripped', None)!r}, "
        f"still running={getattr(watchdog, '_task', None) is not None}; "
        f"exit_reason={prov.exit_reason!r}")
    if not alive:
        assert not kernel_pids(km), kernel_pids(km)
        trips = (await prov.get_provisioner_info())["limit_trips"]
        assert [t["kind"] for t in trips].count("disk_limit") >= 2, trips  # killed again
        return
    await kc.wait_for_ready(timeout=30)
    kc.execute(fill)
    await wait_for(lambda: _dead(km), 15, what="the restarted kernel to be killed")
    assert prov.exit_reason and "disk limit 100M exceeded" in prov.exit_reason, (
        prov.exit_reason)
