"""The orphan reaper asks each backend to remove what it left, on the daemon it ran on,
and never forgets a kernel whose traces it could not remove."""

from __future__ import annotations

import logging
import tempfile
import time
import uuid

import pytest

from limited_provisioner.reaper import reap
from limited_provisioner.registry import Registry

from .conftest import TEST_OWNER, containers_of

UNREACHABLE = "tcp://127.0.0.1:9"  # discard port: nothing listens, refused at once


@pytest.fixture
def registry():
    with tempfile.TemporaryDirectory(dir="/var/lib", prefix="lp-reaper-") as state:
        yield Registry(state)


def orphaned_docker_entry(kernel_id: str, docker_host: str) -> dict:
    """A docker kernel whose server is gone (pid 0 never runs) and whose idle clock ran
    out an hour ago."""
    past = time.time() - 7200
    return {
        "kernel_id": kernel_id, "backend": "docker", "state": "running", "owner": TEST_OWNER,
        "server_id": "gone", "server_pid": 0, "created": past, "last_activity": past,
        "limits": {"idle_timeout": 60}, "docker_host": docker_host, "container_id": "x",
    }


def test_unreachable_docker_daemon_keeps_the_entry(registry, caplog):
    """"No answer" is not "no containers": dropping the entry would leave a container
    running that nobody tracks any more."""
    kid = str(uuid.uuid4())
    registry.write(kid, orphaned_docker_entry(kid, UNREACHABLE))

    with caplog.at_level(logging.ERROR, logger="limited_provisioner.reaper"):
        reaped = reap(registry, all_servers=True)

    assert reaped == []
    assert registry.read(kid) is not None, "the entry of an unreachable kernel was dropped"
    assert f"Docker daemon unreachable at {UNREACHABLE}" in caplog.text
    assert "kept for the next round" in caplog.text


@pytest.mark.docker
async def test_reaper_removes_the_container_on_the_daemon_that_runs_it(
    start_kernel, docker_client, docker_cleanup, monkeypatch
):
    """The kernel was started on an explicit docker_host; the reaping process's own
    DOCKER_HOST points elsewhere (unreachable). The reaper must ask the kernel's daemon."""
    km, kc = await start_kernel(
        {"owner": TEST_OWNER, "mem_limit": "256M", "docker_host": "unix:///var/run/docker.sock"},
        provisioner="limited-docker-provisioner",
    )
    kc.stop_channels()
    prov = km.provisioner
    assert containers_of(docker_client, km.kernel_id), "no container to reap"
    entry = prov.registry.read(km.kernel_id)
    entry.update(server_pid=0, last_activity=time.time() - 7200, limits={"idle_timeout": 60})
    prov.registry.write(km.kernel_id, entry)
    monkeypatch.setenv("DOCKER_HOST", UNREACHABLE)

    reaped = reap(prov.registry, all_servers=True)

    assert [o.kernel_id for o in reaped] == [km.kernel_id]
    assert containers_of(docker_client, km.kernel_id) == []
    assert prov.registry.read(km.kernel_id) is None
