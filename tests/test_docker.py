"""The docker backend on a real Docker daemon and the real kernel image.

Skipped when no daemon/image is available, except under CI
(LIMITED_PROVISIONER_REQUIRE_DOCKER=1, set by .ci/run), where that is a failure.
"""

from __future__ import annotations

import asyncio
import os

import psutil
import pytest

from limited_provisioner import LimitConfigError, SandboxStartError, SandboxUnavailableError
from limited_provisioner.docker import LABEL_PREFIX

from .conftest import NOTHING_LEFT, TEST_OWNER, run
from .harness import containers_of, kernel_leftovers

DOCKER = "limited-docker-provisioner"
SMALL = {"mem_limit": "256M", "cpu_limit": 1, "pids_limit": 64, "nofile_limit": 256,
         "disk_limit": "64M", "owner": TEST_OWNER}


@pytest.fixture
async def docker_kernel(start_kernel, docker_client, request):
    started = []

    async def _start(config=None):
        km, kc = await start_kernel({**SMALL, **(config or {})}, provisioner=DOCKER)
        started.append(km)
        return km, kc

    yield _start
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for km in started:
            for c in containers_of(docker_client, km.kernel_id):
                print(c.logs()[-3000:].decode(errors="replace"))


async def test_container_settings_and_isolation(docker_kernel, docker_client):
    km, kc = await docker_kernel()
    out = await run(
        kc,
        "import os, socket\n"
        "print(os.getuid())\n"
        "for addr in [('172.17.0.1', 80), ('1.1.1.1', 53), ('127.0.0.1', 22)]:\n"
        "    try:\n"
        "        socket.create_connection(addr, timeout=2); print('connected', addr)\n"
        "    except OSError as e:\n"
        "        print('blocked', e.errno)\n",
    )
    lines = out["stdout"].split()
    assert int(lines[0]) != 0, out
    assert "connected" not in out["stdout"] and out["stdout"].count("blocked") == 3, out
    (container,) = containers_of(docker_client, km.kernel_id)
    attrs = docker_client.api.inspect_container(container.id)
    host = attrs["HostConfig"]
    assert host["Memory"] == 256 * 2**20 and host["MemorySwap"] == 256 * 2**20
    assert host["NanoCpus"] == 10**9
    assert host["PidsLimit"] == 64
    ulimits = {u["Name"]: u for u in host["Ulimits"]}
    assert ulimits["nofile"]["Soft"] == ulimits["nofile"]["Hard"] == 256
    assert ulimits["fsize"]["Hard"] == 64 * 2**20
    assert ulimits["data"]["Hard"] == (256 + 128) * 2**20
    assert host["ReadonlyRootfs"] is True
    assert "/tmp" in host["Tmpfs"] and "size=" in host["Tmpfs"]["/tmp"]
    assert host["CapDrop"] == ["ALL"]
    assert "no-new-privileges" in host["SecurityOpt"]
    assert host["Init"] is True and host["Privileged"] is False
    assert host["NetworkMode"] == "none"
    assert host["PidMode"] == "" and host["UTSMode"] == "" and host["IpcMode"] != "host"
    assert attrs["Config"]["User"].split(":")[0] != "0"
    labels = attrs["Config"]["Labels"]
    assert labels[f"{LABEL_PREFIX}kernel-id"] == km.kernel_id
    assert labels[f"{LABEL_PREFIX}owner"] == TEST_OWNER
    assert labels[f"{LABEL_PREFIX}mem-limit"] == str(256 * 2**20)
    assert not any(km.session.key.decode() in v for v in labels.values())
    st = os.stat(km.connection_file)
    assert st.st_mode & 0o077 == 0


async def test_memory_bomb_fails_or_is_oom_killed_and_reported(docker_kernel, docker_client):
    km, kc = await docker_kernel()
    other_km, other_kc = await docker_kernel()
    before = psutil.Process().memory_info().rss
    # One allocation of 4x mem_limit: refused by the data ulimit, the kernel lives on.
    out = await run(kc, "x = bytearray(4 * 256 * 2**20)")
    assert "MemoryError" in out["error"], out
    assert (await run(kc, "print('alive')"))["stdout"].strip() == "alive"
    # Resident memory past mem_limit (under the data ulimit): the container is OOM-killed.
    # Small touched chunks: the tree's resident memory reaches the cgroup limit before
    # any single allocation hits the data rlimit (which sits 128M higher).
    kc.execute("chunks = []\nwhile True:\n    chunks.append(b'x' * (8 * 2**20))\n")
    prov = km.provisioner
    for _ in range(120):
        if prov.exit_reason or not await km.is_alive():
            break
        await asyncio.sleep(0.25)
    await prov.poll()
    assert prov.exit_reason == "memory limit 256M exceeded (OOMKilled)", prov.exit_reason
    info = await prov.get_provisioner_info()
    assert info["exit_reason"] == prov.exit_reason
    assert psutil.Process().memory_info().rss - before < 50 * 2**20
    assert (await run(other_kc, "print(1 + 1)"))["stdout"].strip() == "2"


async def test_interrupt_restart_and_shutdown_leave_nothing(docker_kernel, docker_client):
    km, kc = await docker_kernel()
    msg_id = kc.execute("import time; time.sleep(60)")
    await asyncio.sleep(1.0)
    await km.interrupt_kernel()
    reply = await kc._async_get_shell_msg(timeout=20)
    assert reply["parent_header"]["msg_id"] == msg_id
    assert reply["content"]["status"] == "error"
    assert reply["content"]["ename"] == "KeyboardInterrupt"

    await run(kc, "x = 41")
    first = containers_of(docker_client, km.kernel_id)[0].id
    await km.restart_kernel(now=True)
    await kc.wait_for_ready(timeout=60)
    out = await run(kc, "print('x' in globals())")
    assert out["stdout"].strip() == "False"
    (second,) = containers_of(docker_client, km.kernel_id)
    assert second.id != first

    kernel_dir = km.provisioner.kernel_dir
    await km.shutdown_kernel()
    assert containers_of(docker_client, km.kernel_id) == []
    assert not kernel_dir.exists()


async def test_daemon_down_is_a_clear_error(start_kernel):
    with pytest.raises(SandboxUnavailableError) as info:
        await start_kernel(
            {**SMALL, "docker_host": "unix:///var/run/no-such-docker.sock"}, provisioner=DOCKER
        )
    text = str(info.value)
    assert "unix:///var/run/no-such-docker.sock" in text
    assert "limited-process-provisioner" in text


async def test_missing_image_names_the_build_command(start_kernel, docker_client):
    with pytest.raises(SandboxUnavailableError, match="'no-such-image:1' not found.*build-image"):
        await start_kernel({**SMALL, "image": "no-such-image:1"}, provisioner=DOCKER)


async def test_invalid_mount_is_refused_before_create(start_kernel, docker_client):
    with pytest.raises(LimitConfigError, match="host path /no/such/dir does not exist"):
        await start_kernel(
            {**SMALL, "extra_mounts": ["/no/such/dir:/data"]}, provisioner=DOCKER
        )
    assert docker_client.containers.list(
        all=True, filters={"label": f"{LABEL_PREFIX}owner={TEST_OWNER}"}
    ) == []


async def test_a_container_that_cannot_start_is_a_start_error(start_kernel, own_state):
    """The daemon cannot run the container (CPUs this host does not have):
    SandboxStartError with the daemon's words, and nothing left."""
    with pytest.raises(SandboxStartError) as info:
        await start_kernel(
            {**SMALL, "extra_create_kwargs": {"cpuset_cpus": "1023"}}, provisioner=DOCKER
        )
    assert "could not be started in its container" in str(info.value), info.value
    assert info.value.reason and info.value.reason in str(info.value)
    assert kernel_leftovers(own_state) == NOTHING_LEFT


async def test_a_restart_the_daemon_refuses_is_a_dead_kernel_with_the_reason(
    docker_kernel, own_state
):
    """Counted by the restarter (restart_limit), not retried forever: the restart returns
    a kernel that died at once, with the daemon's words as its exit reason."""
    km, _ = await docker_kernel()
    km.provisioner.extra_create_kwargs = {"cpuset_cpus": "1023"}
    await km.restart_kernel(now=True)
    assert not await km.is_alive()
    assert "Requested CPUs are not available" in (km.provisioner.exit_reason or "")
    await km.shutdown_kernel(now=True)
    assert kernel_leftovers(own_state) == NOTHING_LEFT


async def test_a_kernel_command_missing_in_the_image_fails_the_start(start_kernel, own_state):
    """The container starts but its command does not exist there: the start raises with
    the exit status and the container's output; no container is left, no restarts."""
    with pytest.raises(SandboxStartError) as info:
        await start_kernel(SMALL, provisioner=DOCKER, argv=[
            "/nonexistent/python", "-m", "ipykernel_launcher", "-f", "{connection_file}",
        ])
    assert "container exited with status 127" in info.value.reason, info.value
    assert "not runnable in image" in info.value.reason
    assert kernel_leftovers(own_state) == NOTHING_LEFT


async def test_work_dir_past_disk_limit_stops_the_container(docker_kernel, docker_client):
    # The watchdog, as on a host without loop devices (with its own filesystem the
    # writes fail instead: tests/test_disk_quota.py).
    km, kc = await docker_kernel({"disk_limit": "16M", "own_filesystem": "off"})
    # Each file is under the fsize ulimit; only the work-dir watchdog sees the total.
    kc.execute(
        "import time\nfor i in range(40):\n    open(f'f{i}', 'wb').write(b'x' * 2**20)\n"
        "time.sleep(30)\n"
    )
    prov = km.provisioner
    for _ in range(80):
        if not await km.is_alive():
            break
        await asyncio.sleep(0.25)
    assert not await km.is_alive()
    assert prov.exit_reason and "disk limit 16M exceeded" in prov.exit_reason


async def test_container_user_and_root_refusal(docker_kernel, start_kernel, docker_client):
    km, kc = await docker_kernel({"container_user": "4242:4242"})
    assert (await run(kc, "import os; print(os.getuid(), os.getgid())"))["stdout"].split() == [
        "4242", "4242"]
    with pytest.raises(LimitConfigError, match="non-root"):
        await start_kernel({**SMALL, "container_user": "0:0"}, provisioner=DOCKER)


async def test_the_image_has_what_notebooks_use(docker_kernel):
    """A notebook's usual imports work in the default image under small limits, with no
    network and a non-root uid: a widget opens its comm, a plot comes out inline."""
    km, kc = await docker_kernel()
    out = await run(
        kc,
        "import os, ipykernel, comm, ipywidgets, numpy, pandas, matplotlib\n"
        "print(os.getuid(), ipykernel.version_info >= (6, 29))\n"
        "print(pandas.DataFrame({'a': numpy.arange(3)}).a.sum())\n",
    )
    assert out["error"] is None, out
    uid, recent = out["stdout"].split()[:2]
    assert int(uid) != 0 and recent == "True", out
    assert out["stdout"].split()[2] == "3", out

    async def outputs(code: str) -> list[dict]:
        msgs: list[dict] = []
        reply = await kc.execute_interactive(code, timeout=60, output_hook=msgs.append)
        assert reply["content"]["status"] == "ok", (reply["content"], msgs)
        return msgs

    msgs = await outputs("ipywidgets.IntSlider(value=3)")
    assert any(m["msg_type"] == "comm_open" and m["content"]["target_name"] == "jupyter.widget"
               for m in msgs), msgs
    (result,) = [m for m in msgs if m["msg_type"] == "execute_result"]
    assert "application/vnd.jupyter.widget-view+json" in result["content"]["data"], result

    msgs = await outputs(
        "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [1, 4, 9])\nplt.show()"
    )
    images = [m for m in msgs
              if m["msg_type"] == "display_data" and "image/png" in m["content"]["data"]]
    assert len(images) == 1, msgs
