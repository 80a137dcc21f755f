"""keep_files_for: an idle-culled session's files come back with its next kernel.

Real kernels behind examples/agent_backend (uvicorn subprocess, private state dir):
a session writes files, its kernel is culled for idle_timeout, the session comes back and
its new kernel (another uid) finds the files as its own, and /exec says the variables are
gone and the files are kept. Kept files expire through the reaper, keep_files_for=0 and
an explicit DELETE delete them, and nothing is left behind: no kernel, no kept file, no
loop device, no mount.
"""

from __future__ import annotations

import asyncio
import glob
import os
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from limited_provisioner import kept_files, reap_orphans, workfs
from limited_provisioner.registry import Registry

from . import test_agent_backend as ab
from .conftest import TEST_OWNER, backends, run
from .harness import AgentBackendService, kernel_leftovers, remove_all_kernels

NOTHING = dict.fromkeys(("registry entries", "kernel dirs", "cgroups", "processes",
                         "containers"), 0)
WRITE = (
    "import os\n"
    "os.makedirs('out', exist_ok=True)\n"
    "open('out/notes.txt', 'w').write('kept across the cull')\n"
    # What the attacker plants for the hand-over: a link to a host file, a FIFO.
    "os.symlink('/etc/passwd', 'out/passwd')\n"
    "os.mkfifo('out/fifo')\n"
    "x = 41\n"
    "print(os.getuid())"
)
READ = (
    "import os\n"
    "print(open('out/notes.txt').read(), 'x' in globals(), "
    "os.stat('out/notes.txt').st_uid == os.getuid(), os.getuid())\n"
    "open('out/more.txt', 'w').write('still writable')"
)


@pytest.fixture
def make_service(request, tmp_path, jupyter_path):
    """``make_service(**settings)`` -> a started agent service on a fresh state dir;
    afterwards every service is killed by pid and its kernels and state dir removed."""
    services: list[AgentBackendService] = []

    def _make(**settings: str) -> AgentBackendService:
        log_dir = tmp_path / f"svc{len(services)}"
        log_dir.mkdir()
        service = ab.new_service(log_dir, **{"IDLE_TIMEOUT": "3", "RATE_LIMIT": "0",
                                             "DISK_LIMIT": "64M", **settings})
        services.append(service)
        service.start()
        return service

    yield _make
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        for service in services:
            print(service.logs(8000))
    ab.remove_everything(services)


def _loops_under(state: Path) -> list[str]:
    """Loop devices (/dev/loopN) backed by a file under ``state``."""
    loops = []
    for backing in glob.glob("/sys/block/loop*/loop/backing_file"):
        try:
            name = Path(backing).read_text().strip()
        except OSError:
            continue
        if name.startswith(str(state) + "/"):
            loops.append("/dev/" + backing.split("/")[3])
    return loops


def loops_and_mounts(state: Path) -> tuple[list[str], list[str]]:
    """Loop devices backed by a file under ``state``, and mounts under it."""
    return _loops_under(state), workfs.mounts_under(state)


def assert_no_mount_or_loop(state: Path, wait: float = 30) -> None:
    """Nothing under ``state`` is mounted, and no loop device serves a file there once
    copies of its mounts in other kernels' namespaces are gone (a kernel started while
    another's filesystem was mounted holds one until it ends: wait for a moment)."""
    deadline = time.monotonic() + wait
    while True:
        loops, mounts = loops_and_mounts(state)
        assert mounts == []
        if not loops:
            return
        assert time.monotonic() < deadline, f"loop devices left: {loops}"
        time.sleep(0.2)


def wait_for_cull(service: AgentBackendService, timeout: float = 60) -> None:
    """Until the provisioner culled every kernel of the service (idle_timeout) and
    removed what it does not keep (its registry entry goes last)."""
    deadline = time.monotonic() + timeout
    while service.kernels() or Registry(service.state).entries():
        assert time.monotonic() < deadline, "the kernel was not culled"
        time.sleep(0.1)


def kept(service: AgentBackendService) -> list[dict]:
    return kept_files.entries(service.state)


@pytest.mark.parametrize("backend", backends(), indirect=True)
def test_a_culled_sessions_files_come_back_with_its_next_kernel(
        backend, make_service, docker_cleanup):
    kind = "docker" if "docker" in backend else "process"
    service = make_service(BACKEND=kind, KEEP_FILES_FOR="60")
    user = TEST_OWNER if kind == "docker" else "u-keep"
    t_first = time.monotonic()
    first = service.run(user, "chat", WRITE)
    t_first = time.monotonic() - t_first
    assert first["status"] == "ok", first
    old_uid = first["stdout"].strip()

    t0 = time.monotonic()
    wait_for_cull(service)
    t_cull = time.monotonic() - t0
    (meta,) = kept(service)
    assert (meta["owner"], meta["value"], meta["kernel_id"]) == (user, "chat", first["kernel_id"])
    # As root the files are the kernel's own ext4 image, kept unmounted.
    assert meta["kind"] == "image"
    assert loops_and_mounts(service.state)[1] == []
    assert kernel_leftovers(service.state) == NOTHING

    t_back = time.monotonic()
    out = service.run(user, "chat", READ)
    t_back = time.monotonic() - t_back
    assert out["status"] == "ok", out
    assert out["kernel_id"] != first["kernel_id"]
    text, had_x, owns_it, new_uid = out["stdout"].strip().rsplit(" ", 3)
    assert (text, had_x, owns_it) == ("kept across the cull", "False", "True"), out
    assert new_uid != old_uid  # handed over to another uid, not just the same one again
    assert (out["state_lost"], out["files_kept"]) == (True, True)
    (notice,) = out["notices"]
    assert "previous kernel was shut down (idle for more than idle_timeout=3s" in notice
    assert "variables from earlier cells are gone, but files in its work dir are kept" in notice
    assert f"[limited-provisioner notice] {notice}" in out["text"]
    assert kept(service) == []  # taken back, not copied
    print(f"{kind}: first /exec (fresh kernel, mkfs) {t_first:.2f}s; culled and kept "
          f"{t_cull:.2f}s after the /exec; /exec that came back (new kernel, kept image "
          f"mounted and handed over) {t_back:.2f}s")

    # Neither planted entry was followed or opened by the hand-over.
    assert os.stat("/etc/passwd").st_uid == 0
    planted = service.run(user, "chat", "import os, stat\n"
                          "print(os.readlink('out/passwd'), "
                          "stat.S_ISFIFO(os.lstat('out/fifo').st_mode))")
    assert planted["stdout"] == "/etc/passwd True\n", planted

    # The next execution of the same kernel is an ordinary one.
    again = service.run(user, "chat", "print(open('out/more.txt').read())")
    assert (again["stdout"], again["files_kept"], again["notices"]) == (
        "still writable\n", False, [])

    assert service.delete(user, "chat").status_code == 200
    assert kernel_leftovers(service.state) == NOTHING
    assert kept(service) == []
    assert_no_mount_or_loop(service.state)


def test_a_kept_image_still_on_a_loop_device_is_mounted_through_that_device(make_service):
    """The culled kernel's loop device can outlive its unmount for a moment (a copy of
    the mount in another mount namespace holds it until the kernel dir is removed). The
    session's next kernel must then get that same device (the same superblock), never a
    second loop device over the same image. Simulated here with losetup."""
    service = make_service(KEEP_FILES_FOR="60")
    assert service.run("u-ns", "s", WRITE)["status"] == "ok"
    wait_for_cull(service)
    (meta,) = kept(service)
    image = service.state / "kept" / meta["id"] / kept_files.IMAGE
    dev = subprocess.run(["losetup", "--find", "--show", str(image)], check=True,
                         capture_output=True, text=True).stdout.strip()
    try:
        out = service.run("u-ns", "s", READ)
        assert out["stdout"].startswith("kept across the cull False True"), out
        assert out["files_kept"]
        (entry,) = Registry(service.state).entries()
        moved = Path(entry["kernel_dir"]) / workfs.DISK / workfs.IMAGE
        assert workfs.loops_of(moved) == [dev]  # the same device, no second one
        assert service.delete("u-ns", "s").status_code == 200
    finally:
        # Only while it still serves a file of this test (else it may be another's now).
        if any(d == dev for d in _loops_under(service.state)):
            subprocess.run(["losetup", "-d", dev], check=False, capture_output=True)
    assert kernel_leftovers(service.state) == NOTHING
    assert_no_mount_or_loop(service.state)


def test_kept_files_expire_and_the_reaper_removes_them(make_service):
    service = make_service(KEEP_FILES_FOR="2")
    assert service.run("u-exp", "s", WRITE)["status"] == "ok"
    wait_for_cull(service)
    assert len(kept(service)) == 1
    reap_orphans(service.state, all_servers=True)  # not yet expired: kept
    assert len(kept(service)) == 1
    time.sleep(2.2)
    reap_orphans(service.state, all_servers=True)
    assert kept(service) == []
    assert list((service.state / "kept").iterdir()) == []
    out = service.run("u-exp", "s", "import os; print(os.path.exists('out/notes.txt'))")
    assert (out["stdout"], out["files_kept"]) == ("False\n", False)
    assert "a new kernel was started and variables from earlier cells are gone" in out["text"]
    assert service.delete("u-exp", "s").status_code == 200
    assert kernel_leftovers(service.state) == NOTHING
    assert_no_mount_or_loop(service.state)


def test_keep_files_for_0_deletes_at_cull_as_before(make_service):
    service = make_service(KEEP_FILES_FOR="0")
    assert service.run("u-zero", "s", WRITE)["status"] == "ok"
    wait_for_cull(service)
    assert kept(service) == []
    assert kernel_leftovers(service.state) == NOTHING
    assert_no_mount_or_loop(service.state)
    out = service.run("u-zero", "s", "import os; print(os.path.exists('out/notes.txt'))")
    assert (out["stdout"], out["files_kept"]) == ("False\n", False)
    assert service.delete("u-zero", "s").status_code == 200


def test_delete_removes_kept_files_at_once_and_a_plain_shutdown_keeps_none(make_service):
    service = make_service(KEEP_FILES_FOR="60")
    first = service.run("u-del", "s", WRITE)
    wait_for_cull(service)
    assert len(kept(service)) == 1
    # The session has no kernel, only kept files: DELETE deletes them (200, not 404).
    resp = service.delete("u-del", "s")
    assert resp.status_code == 200, resp.text
    assert resp.json()["kernel_id"] == first["kernel_id"]
    assert kept(service) == []
    assert service.delete("u-del", "s").status_code == 404
    # A DELETE of a live session: its files go with the kernel, nothing is kept.
    out = service.run("u-del", "s", "import os; print(os.path.exists('out/notes.txt'))")
    assert (out["stdout"], out["files_kept"]) == ("False\n", False)
    assert service.run("u-del", "s", WRITE)["status"] == "ok"
    assert service.delete("u-del", "s").status_code == 200
    assert kept(service) == []
    assert kernel_leftovers(service.state) == NOTHING
    assert_no_mount_or_loop(service.state)


async def test_without_its_own_filesystem_the_work_dir_itself_is_kept(start_kernel):
    """own_filesystem off (the work dir is on the state dir's disk): the dir is moved
    and handed to the next kernel of the same owner and session label, directly
    through jupyter_client (no agent service)."""
    state = Path(tempfile.mkdtemp(prefix="lp-", dir="/var/lib"))
    config = {"state_dir": str(state), "idle_timeout": 3, "lifecycle_interval": 0.2,
              "keep_files_for": "1m", "own_filesystem": "off", "disk_limit": "32M",
              "mem_limit": "256M", "owner": "u-dir"}
    labels = {"start_kwargs": {"labels": {"session_id": "s"}}}
    try:
        km, kc = await start_kernel(config, **labels)
        assert (await run(kc, WRITE))["status"] == "ok"
        deadline = time.monotonic() + 30
        while km.has_kernel or Registry(state).entries():  # culled, and cleaned up
            assert time.monotonic() < deadline, "not culled"
            await asyncio.sleep(0.1)
        (meta,) = kept_files.entries(state)
        assert (meta["kind"], meta["owner"], meta["kernel_id"]) == ("dir", "u-dir", km.kernel_id)
        assert kernel_leftovers(state) == NOTHING

        km2, kc2 = await start_kernel(config, **labels)
        assert km2.provisioner.files_restored["kernel_id"] == km.kernel_id
        out = await run(kc2, READ)
        text, had_x, owns_it, _ = out["stdout"].strip().rsplit(" ", 3)
        assert (text, had_x, owns_it) == ("kept across the cull", "False", "True"), out
        assert kept_files.entries(state) == []
        # A shutdown a client asks for keeps nothing.
        await km2.shutdown_kernel(now=True)
        kc2.stop_channels()
        assert kept_files.entries(state) == []
        assert kernel_leftovers(state) == NOTHING
    finally:
        remove_all_kernels(state)


@pytest.mark.parametrize("backend", backends(), indirect=True)
def test_a_culled_sessions_file_is_downloadable_and_the_next_exec_says_state_is_lost(
        backend, make_service, docker_cleanup):
    """The files API on a culled session with kept files starts its next kernel (as
    /exec would) and serves the kept file; the next /exec still says variables are gone."""
    kind = "docker" if "docker" in backend else "process"
    service = make_service(BACKEND=kind, KEEP_FILES_FOR="60")
    user = TEST_OWNER if kind == "docker" else "u-keep-dl"
    assert service.run(user, "chat", WRITE)["status"] == "ok"
    wait_for_cull(service)
    url = f"{service.base}/sessions/chat/files/out/notes.txt"
    resp = service.client.get(url, headers=service.headers(user))
    assert (resp.status_code, resp.content) == (200, b"kept across the cull")
    # Without kept files a culled session is simply gone: 404, no kernel started.
    assert service.client.get(f"{service.base}/sessions/other/files/x",
                              headers=service.headers(user)).status_code == 404
    out = service.run(user, "chat", "print('x' in globals())")
    assert (out["stdout"], out["state_lost"], out["files_kept"]) == ("False\n", True, True)
    assert any("files in its work dir are kept" in n for n in out["notices"])
