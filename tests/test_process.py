"""The process backend on real ipykernel kernels: each limit trips on real code."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from jupyter_client.manager import AsyncKernelManager

from limited_provisioner import (
    KernelLimitError,
    LimitedProcessProvisioner,
    SandboxStartError,
    SandboxUnavailableError,
    uids,
)
from limited_provisioner.registry import Registry

from .conftest import NOTHING_LEFT, run
from .harness import (
    HostWatch,
    alive,
    kernel_leftovers,
    kill_kernel_leftovers,
    write_kernelspec,
)

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="hard limits need root (cgroups, namespaces)")

SMALL = {"mem_limit": "256M", "disk_limit": "32M", "pids_limit": 48, "nofile_limit": 128}


async def test_runs_code_and_info_round_trips(start_kernel):
    km, kc = await start_kernel(SMALL)
    out = await run(kc, "print(6 * 7)")
    assert out["stdout"].strip() == "42", out
    prov = km.provisioner
    info = await prov.get_provisioner_info()
    assert info["limits"]["mem_limit"] == 256 * 2**20
    assert info["enforcement"]["mem_limit"]
    assert info["backend"] == "process"
    clone = LimitedProcessProvisioner(kernel_id=km.kernel_id, parent=km)
    await clone.load_provisioner_info(info)
    assert clone.pid == prov.pid
    assert clone.enforcement == prov.enforcement
    assert clone.kernel_dir == prov.kernel_dir
    assert (await clone.get_provisioner_info())["pid"] == info["pid"]
    entry = Registry(prov.state_dir).read(km.kernel_id)
    assert entry["pid"] == prov.pid and entry["state"] == "running"


@needs_root
async def test_root_server_runs_kernel_unprivileged_offline_and_scrubbed(start_kernel, monkeypatch):
    monkeypatch.setenv("VERY_SECRET_TOKEN", "hunter2")
    km, kc = await start_kernel(SMALL)
    out = await run(
        kc,
        "import os, socket\n"
        "print(os.getuid(), os.getgid(), os.getcwd())\n"
        "print('secret' if 'VERY_SECRET_TOKEN' in os.environ else 'clean')\n"
        "try:\n"
        "    socket.create_connection(('127.0.0.1', 22), timeout=2); print('connected')\n"
        "except OSError as e:\n"
        "    print('blocked', e.errno)\n",
    )
    uid, gid, cwd = out["stdout"].splitlines()[0].split()
    assert int(uid) != 0 and int(gid) != 0
    assert cwd == str(km.provisioner.kernel_dir / "work")
    assert "clean" in out["stdout"]
    assert "blocked" in out["stdout"], out
    assert km.transport == "ipc"
    info = await km.provisioner.get_provisioner_info()
    assert info["enforcement"]["network"].startswith("hard")
    assert info["enforcement"]["identity"].startswith("uid/gid")
    # The key is readable by the kernel's uid (its own file) and root (the clients').
    st = os.stat(km.provisioner.connection.kernel_connection_file)
    assert st.st_mode & 0o077 == 0 and st.st_uid == int(uid)
    st = os.stat(km.connection_file)
    assert st.st_mode & 0o077 == 0 and st.st_uid == 0


async def test_filling_4x_mem_limit_fails_without_hurting_the_host(start_kernel):
    km, kc = await start_kernel(SMALL)
    # Filled, not just reserved: unlimited, it would take 1 GiB of the host's memory.
    async with HostWatch(mem_limit=256 * 2**20) as host:
        out = await run(kc, "x = b'x' * (4 * 256 * 1024 * 1024)\nprint(len(x))")
    assert out["status"] == "error" or not await km.is_alive()
    if out["status"] == "error":
        assert out["error"].startswith("MemoryError: memory limit 256M reached"), out
        assert out["reply_error"] == out["error"], out
        # Python caught it: the kernel lives on and still answers.
        assert (await run(kc, "print('still here')"))["stdout"].strip() == "still here"
    # Host MemAvailable above its floor, this process's event loop running, and a
    # bystander first in line for the host's OOM killer alive.
    assert host.harm() == []


async def test_doubling_list_is_stopped(start_kernel):
    km, kc = await start_kernel(SMALL)
    out = await run(kc, "x = [0]\nwhile True:\n    x = x + x\n", timeout=120)
    assert out["status"] == "error" and "MemoryError" in out["error"], out


@needs_root
async def test_children_together_cannot_exceed_mem_limit(start_kernel):
    """Each child stays under RLIMIT_DATA; together they exceed mem_limit: the cgroup
    OOM-kills one and the provisioner reports it."""
    km, kc = await start_kernel(SMALL)
    out = await run(
        kc,
        "import subprocess, sys\n"
        "code = 'b = bytearray(150 * 2**20); import time; time.sleep(10)'\n"
        "ps = [subprocess.Popen([sys.executable, '-c', code]) for _ in range(3)]\n"
        "print(sorted(p.wait() for p in ps))\n",
        timeout=120,
    )
    codes = out["stdout"]
    assert "-9" in codes, out
    prov = km.provisioner
    peak = "memory.peak" if prov.cgroups.version == 2 else "memory.max_usage_in_bytes"
    usage_max = int((prov.cgroups.paths["memory"] / peak).read_text())
    assert usage_max <= 256 * 2**20
    for _ in range(20):
        if any(t["kind"] == "mem_limit" for t in prov.limit_trips):
            break
        await asyncio.sleep(0.25)
    assert any("memory limit 256M exceeded" in t["reason"] for t in prov.limit_trips)


async def test_opening_nofile_plus_10_files_fails(start_kernel):
    km, kc = await start_kernel(SMALL)
    out = await run(
        kc,
        "fs, result = [], 'opened all'\n"
        "try:\n"
        "    for i in range(128 + 10): fs.append(open('/dev/null'))\n"
        "except OSError as e:\n"
        "    result = f'refused-{e.errno}'\n"
        "for f in fs: f.close()\n"
        # Report only once descriptors are free again: while they are exhausted
        # IPython's history thread may print its own complaint into stdout.
        "print(f'<{result}>')\n",
    )
    assert "<refused-24>" in out["stdout"], out


async def test_writing_a_file_past_disk_limit_fails(start_kernel):
    km, kc = await start_kernel(SMALL)
    out = await run(
        kc,
        "try:\n"
        "    with open('big.bin', 'wb') as f:\n"
        "        for _ in range(40): f.write(b'x' * 2**20)\n"
        "    print('wrote all')\n"
        "except OSError as e:\n"
        "    print('refused', e.errno)\n",
    )
    # EFBIG (File too large: RLIMIT_FSIZE); on the kernel's own filesystem the disk is
    # full (ENOSPC) a few KB before the file reaches disk_limit.
    assert "refused 27" in out["stdout"] or "refused 28" in out["stdout"], out


async def test_many_files_past_disk_limit_kill_the_kernel_with_a_reason(start_kernel):
    # The watchdog, as on a host without loop devices (with its own filesystem the
    # writes fail instead: tests/test_disk_quota.py).
    km, kc = await start_kernel({**SMALL, "disk_limit": "16M", "own_filesystem": "off"})
    # Each file is under RLIMIT_FSIZE; only the work-dir watchdog sees the total.
    kc.execute(
        "import time\nfor i in range(40):\n    open(f'f{i}', 'wb').write(b'x' * 2**20)\n"
        "time.sleep(30)\n"
    )
    prov = km.provisioner
    for _ in range(60):
        if not await km.is_alive():
            break
        await asyncio.sleep(0.25)
    assert not await km.is_alive()
    assert prov.exit_reason and "disk limit 16M exceeded" in prov.exit_reason
    info = await prov.get_provisioner_info()
    assert "disk limit" in info["exit_reason"]


async def test_fork_loop_stops_at_pids_limit(start_kernel):
    km, kc = await start_kernel(SMALL)
    out = await run(
        kc,
        "import os, time\n"
        "kids = []\n"
        "try:\n"
        "    for i in range(500):\n"
        "        pid = os.fork()\n"
        "        if pid == 0:\n"
        "            time.sleep(60); os._exit(0)\n"
        "        kids.append(pid)\n"
        "    print('forked', len(kids))\n"
        "except OSError as e:\n"
        "    print('stopped at', len(kids), e.errno)\n"
        "for k in kids: os.kill(k, 9); os.waitpid(k, 0)\n",
        timeout=120,
    )
    assert "stopped at" in out["stdout"], out
    forked = int(out["stdout"].split()[2])
    assert forked < 48


async def test_shutdown_leaves_no_process_of_the_tree(start_kernel):
    km, kc = await start_kernel(SMALL)
    out = await run(
        kc,
        "import os, subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        "r, w = os.pipe()\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "        os.write(w, str(os.getpid()).encode()); os.close(w)\n"
        "        time.sleep(600)\n"
        "    os._exit(0)\n"
        "os.close(w)\n"
        "daemon = int(os.read(r, 32))\n"
        "print(child.pid, daemon)\n",
    )
    assert len(out["stdout"].split()) == 2, out
    # Those pids are the kernel's PID namespace's: take the host's from the cgroup.
    tree = set(km.provisioner._tree_pids())
    assert len(alive(tree)) >= 4  # the launcher outside, the kernel, its child, the daemon
    kernel_dir = km.provisioner.kernel_dir
    await km.shutdown_kernel()
    await asyncio.sleep(0.2)
    assert alive(tree) == []
    assert not kernel_dir.exists()
    assert Registry(km.provisioner.state_dir if km.provisioner else None).read(
        km.kernel_id
    ) is None


@pytest.fixture
def private_state_dir(monkeypatch):
    """A registry of our own (short path: ipc socket paths must stay < 108 bytes)."""
    path = tempfile.mkdtemp(prefix="lp-", dir="/var/lib")
    monkeypatch.setenv("LIMITED_PROVISIONER_STATE_DIR", path)
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


async def test_max_kernels_refuses_with_the_limit_named(start_kernel, private_state_dir):
    await start_kernel({**SMALL, "max_kernels": 1})
    with pytest.raises(KernelLimitError, match="max_kernels=1 reached: 1 limited kernels"):
        await start_kernel({**SMALL, "max_kernels": 1})
    entries = Registry(private_state_dir).entries()
    assert len(entries) == 1  # the refused start left nothing behind


async def test_restart_keeps_limits_and_works(start_kernel):
    km, kc = await start_kernel(SMALL)
    old_pid = km.provisioner.pid
    await km.restart_kernel(now=True)
    await kc.wait_for_ready(timeout=60)
    assert km.provisioner.pid != old_pid
    out = await run(kc, "print(open('/proc/self/limits').read())")
    assert "Max open files            128" in out["stdout"], out
    assert alive({old_pid}) == []


async def test_numpy_stays_usable_under_the_memory_limit(start_kernel):
    """RLIMIT_DATA (not RLIMIT_AS) so BLAS thread pools' reserved address space does
    not count: real array work within mem_limit succeeds."""
    pytest.importorskip("numpy")
    km, kc = await start_kernel(SMALL)
    out = await run(
        kc,
        "import numpy as np\n"
        "a = np.ones((2000, 2000))\n"
        "print(float((a @ a)[0, 0]))\n",
    )
    assert out["stdout"].strip() == "2000.0", out


async def test_most_of_mem_limit_is_usable(start_kernel):
    """A limit is only useful if the memory below it can actually be used."""
    km, kc = await start_kernel(SMALL)
    out = await run(kc, "b = bytearray(140 * 2**20); print(len(b) >> 20)")
    assert out["stdout"].strip() == "140", out


async def test_network_true_gives_a_working_kernel_still_behind_the_proxy(start_kernel):
    km, kc = await start_kernel({**SMALL, "network": True})
    # With the network on too, clients reach the kernel over ipc through the proxy: no
    # kernel port is open to other processes (or other kernels) on the host.
    assert km.transport == "ipc"
    out = await run(kc, "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print('ok')")
    assert out["stdout"].strip() == "ok", out
    info = await km.provisioner.get_provisioner_info()
    assert info["enforcement"]["network"] == "allowed (network=True)"


@needs_root
async def test_cpu_limit_throttles_a_multicore_burn(start_kernel):
    km, kc = await start_kernel({**SMALL, "cpu_limit": 0.5, "cpu_startup_grace": 0.5})
    await asyncio.sleep(1.0)
    groups = km.provisioner.cgroups
    if groups.version == 2:
        assert (groups.paths["cpu"] / "cpu.max").read_text().split() == ["50000", "100000"]
    else:
        assert (groups.paths["cpu"] / "cpu.cfs_quota_us").read_text().strip() == "50000"
    out = await run(
        kc,
        "import multiprocessing as mp, os, time\n"
        "def burn():\n"
        "    end = time.time() + 3\n"
        "    while time.time() < end: pass\n"
        "ps = [mp.Process(target=burn) for _ in range(2)]\n"
        "[p.start() for p in ps]; [p.join() for p in ps]\n"
        "t = os.times(); print(t.children_user + t.children_system)\n",
        timeout=60,
    )
    cpu_seconds = float(out["stdout"])
    # Unthrottled, two burners use ~6 CPU-seconds in 3 s on two cores; 0.5 core allows 1.5.
    assert cpu_seconds < 3.0, out


async def test_output_flood_is_capped_per_execution(start_kernel):
    km, kc = await start_kernel({**SMALL, "output_limit": "1M"})
    out = await run(kc, "for i in range(100):\n    print('x' * 1024 * 1024)\n", timeout=120)
    assert len(out["stdout"]) < 2 * 2**20
    assert "output limit of 1048576 bytes reached" in out["stdout"] + out["stderr"]
    # The next cell has its own budget.
    assert (await run(kc, "print('next')"))["stdout"].strip() == "next"


@needs_root
async def test_kernel_past_mem_limit_is_oom_killed_with_the_reason(start_kernel):
    km, kc = await start_kernel(SMALL)
    # Small touched chunks: the tree's resident memory reaches the cgroup limit before
    # any single allocation hits the data rlimit (which sits 128M higher).
    kc.execute("chunks = []\nwhile True:\n    chunks.append(b'x' * (8 * 2**20))\n")
    prov = km.provisioner
    for _ in range(120):
        if not await km.is_alive():
            break
        await asyncio.sleep(0.25)
    assert not await km.is_alive()
    assert prov.exit_reason.startswith("memory limit 256M exceeded"), prov.exit_reason


# -- a start that fails in the sandbox -----------------------------------------------------

BROKEN_ARGV = ["/nonexistent/python", "-m", "ipykernel_launcher", "-f", "{connection_file}"]


@needs_root
@pytest.mark.parametrize(
    "case", ["missing interpreter", "folder it cannot enter", "kernel exits at start"]
)
async def test_a_start_that_fails_in_the_sandbox_raises_and_leaves_nothing(
    jupyter_path, own_state, case
):
    """jupyter_client's start_kernel raises the launcher's (or the dead kernel's) own
    words, and everything reserved for the kernel (entry, dir, cgroups, uid lease) is
    gone with it."""
    locked = Path(tempfile.mkdtemp(prefix="lp-locked-", dir="/var/lib"))  # 0700, root's
    try:
        if case == "missing interpreter":
            write_kernelspec(jupyter_path, "broken", {}, argv=BROKEN_ARGV)
            start: dict = {}
            said = "exec '/nonexistent/python' failed"
        elif case == "folder it cannot enter":
            write_kernelspec(jupyter_path, "broken", {})
            start = {"cwd": str(locked)}
            said = f"the folder {locked} belongs to root and other users cannot read it"
        else:  # past the sandbox: e.g. an interpreter that finds no ipykernel there
            write_kernelspec(jupyter_path, "broken", {}, argv=[
                "/bin/sh", "-c", "echo No module named lp_probe >&2; exit 3", "{connection_file}",
            ])
            start = {}
            said = "exited with status 3); its last output:\nNo module named lp_probe"
        km = AsyncKernelManager(kernel_name="broken")
        with pytest.raises(SandboxStartError) as raised:
            await km.start_kernel(**start)
    finally:
        shutil.rmtree(locked, ignore_errors=True)
    assert said in str(raised.value) and said in raised.value.reason
    assert isinstance(raised.value, SandboxUnavailableError)
    assert not km.has_kernel
    assert [lease for lease in uids.leases() if lease["kernel_id"] == km.kernel_id] == []
    assert kernel_leftovers(own_state, [km.kernel_id]) == NOTHING_LEFT
    assert km.provisioner.limit_trips[-1]["kind"] == "sandbox"





@needs_root
async def test_a_restart_that_fails_in_the_sandbox_is_a_dead_kernel_with_the_reason(
    jupyter_path, own_state
):
    """The notebook folder became one the kernel's uid cannot enter: the restart gives a kernel
    that died at once, with the launcher's words as its exit reason (jupyter_client's
    restarter counts such restarts against restart_limit; one that raised it would retry
    forever); shutting down releases it all."""
    work = Path(tempfile.mkdtemp(prefix="lp-work-", dir="/var/lib"))
    write_kernelspec(jupyter_path, "movable", {})
    km = AsyncKernelManager(kernel_name="movable")
    try:
        work.chmod(0o777)
        await km.start_kernel(cwd=str(work))
        work.chmod(0o700)
        await km.restart_kernel(now=True)
        for _ in range(100):
            if not await km.is_alive():
                break
            await asyncio.sleep(0.05)
        assert not await km.is_alive()
        reason = km.provisioner.exit_reason or ""
        assert reason.startswith("sandbox setup failed")
        assert f"the folder {work} belongs to root and other users cannot read it" in reason
        await km.shutdown_kernel(now=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        kill_kernel_leftovers(km.kernel_id)
    assert kernel_leftovers(own_state, [km.kernel_id]) == NOTHING_LEFT
    assert [lease for lease in uids.leases() if lease["kernel_id"] == km.kernel_id] == []
