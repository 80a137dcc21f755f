"""The kernel's cgroup on the host's real kernel, whatever hierarchy it offers: v1 (this
CI host, as root), v2 as root, v2 delegated to a non-root user (tests/vm runs this module
in a cgroup-v2 VM both ways).

Each limit is tripped by real code in a real kernel: memory past mem_limit is OOM-killed
and reported as memory; a busy loop under cpu_limit=0.5 gets about half a core; forks
past pids_limit are refused; a double-forked setsid daemon dies with the kernel.

Skipped only when the host offers this user no cgroups (not root, no delegated subtree);
as root, or with LIMITED_PROVISIONER_REQUIRE_CGROUPS=1, that is a failure instead.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from limited_provisioner.process.cgroup_versions import CONTROLLERS, GROUP_NAME, LEAF_NAME
from limited_provisioner.process.cgroups import (
    ENV_ROOT,
    Unavailable,
    V2Hierarchy,
    cgroup_root,
    detect,
    kernel_group_dirs,
)
from limited_provisioner.registry import Registry

from .conftest import run
from .harness import alive

LIMITS = {"mem_limit": "256M", "pids_limit": 48, "cpu_limit": 0.5, "cpu_startup_grace": 0.5}


@pytest.fixture(scope="module")
def hierarchy():
    """The hierarchy kernels get here, with all three controllers, or skip/fail."""
    found = detect()
    if isinstance(found, Unavailable):
        missing = found.reason
    else:
        missing = "; ".join(found.missing.get(c, c) for c in CONTROLLERS
                            if c not in found.controllers)
    if missing:
        message = f"no cgroups for uid {os.geteuid()} on this host: {missing}"
        # As root on the real hierarchy there is no excuse (a test that cannot fail is
        # worse than none); a non-root user may simply have no delegated subtree.
        required = os.geteuid() == 0 and not os.environ.get(ENV_ROOT)
        if required or os.environ.get("LIMITED_PROVISIONER_REQUIRE_CGROUPS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return found


@pytest.fixture
def state_dir(monkeypatch):
    """A registry of our own; as root under /var/lib (kernels get a private /tmp)."""
    import shutil
    import tempfile

    parent = "/var/lib" if os.geteuid() == 0 else os.path.expanduser("~")
    path = tempfile.mkdtemp(prefix="lp-cg-", dir=parent)
    monkeypatch.setenv("LIMITED_PROVISIONER_STATE_DIR", path)
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


async def wait_until(condition, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await condition():
            return True
        await asyncio.sleep(0.25)
    return False


async def test_enforcement_is_hard_and_the_tree_is_in_the_group(hierarchy, state_dir, start_kernel):
    km, kc = await start_kernel(LIMITS)
    prov = km.provisioner
    info = await prov.get_provisioner_info()
    v2 = isinstance(hierarchy, V2Hierarchy)
    for name in ("mem_limit", "cpu_limit", "pids_limit"):
        text = info["enforcement"][name]
        assert text.startswith("hard (cgroup v2 " if v2 else "hard (cgroup "), text
        # A delegated user's kernel could raise its limits; the plan must say so.
        assert ("could raise it" in text) == (v2 and hierarchy.delegated), text
    out = await run(kc, "import os; print(os.getpid(), open('/proc/self/cgroup').read())")
    assert out["status"] == "ok", out
    pids = prov.cgroups.pids()
    assert prov.pid in pids and len(alive(pids)) == len(pids)
    own = Path(f"/proc/{prov.pid}/cgroup").read_text()
    if v2:
        group = hierarchy.parent / km.kernel_id
        leaf = (group / LEAF_NAME).relative_to(cgroup_root())
        assert f"0::/{leaf}\n" in own, own
        # v2's "no internal processes": the shared parent and the limited group hold none.
        assert (hierarchy.parent / "cgroup.procs").read_text() == ""
        assert (group / "cgroup.procs").read_text() == ""
        assert (group / "memory.max").read_text().strip() == str(256 * 2**20)
        assert (group / "pids.max").read_text().strip() == "48"
        swap = group / "memory.swap.max"
        assert not swap.exists() or swap.read_text().strip() == "0"
        entry = Registry(state_dir).read(km.kernel_id)
        assert entry["cgroup"] == {"version": 2, "group": str(group),
                                   "controllers": ["memory", "cpu", "pids"]}
    else:
        assert f"memory:/limited-provisioner/{km.kernel_id}" in own, own
    assert kernel_group_dirs(km.kernel_id)


async def test_memory_past_the_limit_is_oom_killed_and_reported_as_memory(
    hierarchy, state_dir, start_kernel
):
    km, kc = await start_kernel(LIMITS)
    prov = km.provisioner
    # Small touched chunks: resident memory reaches the group's limit before a single
    # allocation hits the data rlimit (which sits 128M higher).
    kc.execute("chunks = []\nwhile True:\n    chunks.append(b'x' * (8 * 2**20))\n")

    async def dead():
        return not await km.is_alive()

    assert await wait_until(dead, 60)
    assert prov.exit_reason.startswith("memory limit 256M exceeded"), prov.exit_reason
    assert prov.exit_kind == "mem_limit"
    assert prov.death_report()["kind"] == "mem_limit"
    assert prov.cgroups.oom_kills() >= 1
    info = await prov.get_provisioner_info()
    assert info["exit_reason"].startswith("memory limit 256M exceeded")


async def test_busy_loop_gets_half_a_core(hierarchy, state_dir, start_kernel):
    km, kc = await start_kernel(LIMITS)
    await asyncio.sleep(1.0)  # past cpu_startup_grace: the quota is on
    prov = km.provisioner
    before = prov.cgroups.cpu_seconds()
    out = await run(
        kc,
        "import time\n"
        "w0, c0 = time.monotonic(), time.process_time()\n"
        "while time.monotonic() - w0 < 4: pass\n"
        "print((time.process_time() - c0) / (time.monotonic() - w0))\n",
        timeout=60,
    )
    share = float(out["stdout"])
    # Unthrottled a busy loop gets a whole core (1.0); the quota allows 0.5 per period.
    assert 0.3 < share < 0.65, out
    after = prov.cgroups.cpu_seconds()
    if before is not None:  # v2 counts the group's CPU time (cpu.stat usage_usec)
        assert 1.2 < after - before < 3.0, (before, after)


async def test_forks_past_pids_limit_are_refused_and_reported(hierarchy, state_dir, start_kernel):
    km, kc = await start_kernel(LIMITS)
    out = await run(
        kc,
        "import os, time\n"
        "kids = []\n"
        "try:\n"
        "    for i in range(200):\n"
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
    assert int(out["stdout"].split()[2]) < 48
    prov = km.provisioner
    assert prov.cgroups.pids_max_events() >= 1

    async def reported():
        return any(t["kind"] == "pids_limit" for t in prov.limit_trips)

    assert await wait_until(reported, 10), prov.limit_trips
    assert await km.is_alive()  # refused forks, not a dead kernel


async def test_shutdown_kills_a_double_forked_setsid_daemon(hierarchy, state_dir, start_kernel):
    km, kc = await start_kernel(LIMITS)
    out = await run(
        kc,
        "import os, time\n"
        "r, w = os.pipe()\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "        os.write(w, b'up'); os.close(w)\n"
        "        time.sleep(600)\n"
        "    os._exit(0)\n"
        "os.close(w)\n"
        "print(os.read(r, 2).decode())\n",
    )
    assert out["stdout"].strip() == "up", out
    tree = set(km.provisioner.cgroups.pids())
    assert len(alive(tree)) >= 2  # the kernel (and its launcher) and the daemon
    kernel_id = km.kernel_id
    await km.shutdown_kernel()
    await asyncio.sleep(0.2)
    assert alive(tree) == []
    assert kernel_group_dirs(kernel_id) == []


async def test_the_kernel_cannot_keep_a_raised_memory_limit(hierarchy, state_dir, start_kernel):
    """As root the group's files are root's and the kernel runs as its own uid: writing
    its limit is refused. Delegated, the kernel (same user) owns them: its write goes
    through and is put back at the next watchdog round."""
    km, kc = await start_kernel(LIMITS)
    v2 = isinstance(hierarchy, V2Hierarchy)
    limit_file = km.provisioner.cgroups.paths["memory"] / (
        "memory.max" if v2 else "memory.limit_in_bytes"
    )
    out = await run(
        kc,
        "try:\n"
        f"    with open({str(limit_file)!r}, 'w') as f: f.write('max' if {v2} else '-1')\n"
        "    print('wrote')\n"
        "except OSError as e:\n"
        "    print('refused', e.errno)\n",
    )
    limit = str(256 * 2**20)
    if not hierarchy.delegated:
        assert out["stdout"].startswith("refused"), out
        assert limit_file.read_text().strip() == limit
        return
    assert out["stdout"].strip() == "wrote", out

    async def put_back():
        return limit_file.read_text().strip() == limit

    assert await wait_until(put_back, 5)


HYBRID_V2 = Path("/sys/fs/cgroup/unified")


@pytest.mark.skipif(
    os.geteuid() != 0 or not (HYBRID_V2 / "cgroup.controllers").is_file()
    or Path("/sys/fs/cgroup/cgroup.controllers").exists(),
    reason="needs root on a hybrid host (v1 controllers, a v2 mount at /sys/fs/cgroup/unified)",
)
async def test_a_v2_group_without_controllers_still_tracks_and_kills_the_tree(
    monkeypatch, state_dir, start_kernel
):
    """The v2 code on a v1 CI host: a hybrid host's v2 mount has no memory/cpu/pids, but
    a v2 group still holds the whole tree (the launcher moves into its leaf) and
    cgroup.kill ends it; the plan reports the limits best-effort, with the reason."""
    monkeypatch.setenv(ENV_ROOT, str(HYBRID_V2))
    km, kc = await start_kernel(LIMITS)
    prov = km.provisioner
    assert prov.cgroups and prov.cgroups.version == 2 and prov.cgroups.controllers == set()
    info = await prov.get_provisioner_info()
    assert info["enforcement"]["mem_limit"].startswith("best-effort"), info["enforcement"]
    assert "memory not in /sys/fs/cgroup/unified" in info["enforcement"]["mem_limit"]
    out = await run(
        kc,
        "import os, time\n"
        "r, w = os.pipe()\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        os.write(w, b'up'); os.close(w)\n"
        "        time.sleep(600)\n"
        "    os._exit(0)\n"
        "os.close(w)\n"
        "print(os.read(r, 2).decode())\n",
    )
    assert out["stdout"].strip() == "up", out
    group = Path(prov.cgroups.record()["group"])
    assert Path(f"/proc/{prov.pid}/cgroup").read_text().splitlines()[-1] == (
        f"0::/{GROUP_NAME}/{km.kernel_id}/{LEAF_NAME}"
    )
    tree = set(prov.cgroups.pids())
    assert len(alive(tree)) >= 2
    await km.shutdown_kernel()
    await asyncio.sleep(0.2)
    assert alive(tree) == [] and not group.exists()
