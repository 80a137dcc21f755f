"""Which runtime a kernel container gets, and how its limits are applied under it
(limited_provisioner/docker/runtime.py, container.py): decided without a daemon."""

from __future__ import annotations

import pytest

from limited_provisioner.docker.container import create_kwargs
from limited_provisioner.docker.runtime import (
    GVISOR_HOST_TASKS_BASE,
    GVISOR_HOST_TASKS_PER_TASK,
    Runtime,
    pids_settings,
    resolve,
)
from limited_provisioner.enforcement import container_plan
from limited_provisioner.errors import LimitConfigError, SandboxUnavailableError
from limited_provisioner.limits import Limits

from .test_container_settings import ALL_LIMITS, make_spec

RUNSC_ARGS = ["--platform=ptrace", "--host-uds=create", "--network=none"]
INFO = {"Runtimes": {
    "runc": {"path": "runc"},
    "runsc": {"path": "/usr/bin/runsc", "runtimeArgs": RUNSC_ARGS},
    "runsc-no-uds": {"path": "/usr/bin/runsc", "runtimeArgs": ["--platform=ptrace"]},
    "runsc-net": {"path": "/usr/bin/runsc", "runtimeArgs": ["--host-uds", "create"]},
}}


def test_the_daemons_registration_is_what_a_runtime_is():
    runsc = resolve("runsc", INFO, network=False)
    assert runsc == Runtime("runsc", "/usr/bin/runsc", tuple(RUNSC_ARGS))
    assert runsc.gvisor and runsc.offline and runsc.flag("platform") == "ptrace"
    runc = resolve("runc", INFO, network=True)
    assert not runc.gvisor and not runc.offline


def test_an_unregistered_runtime_is_refused_with_what_the_daemon_has():
    with pytest.raises(SandboxUnavailableError) as err:
        resolve("kata", INFO, network=False)
    text = str(err.value)
    assert "'kata' is not registered" in text and "runc, runsc" in text


def test_an_unregistered_runsc_names_the_daemon_json_that_registers_it():
    with pytest.raises(SandboxUnavailableError, match="--host-uds=create"):
        resolve("runsc", {"Runtimes": {"runc": {}}}, network=False)


def test_gvisor_without_host_uds_is_refused_before_the_kernel_would_hang():
    with pytest.raises(SandboxUnavailableError, match="never answer"):
        resolve("runsc-no-uds", INFO, network=False)
    # The flag's two spellings are the same flag.
    assert resolve("runsc-net", INFO, network=True).flag("host-uds") == "create"


def test_a_network_is_never_silently_dropped_by_an_offline_runtime():
    with pytest.raises(SandboxUnavailableError, match="network=True.*--network=none"):
        resolve("runsc", INFO, network=True)


GVISOR = Runtime("runsc", "/usr/bin/runsc", tuple(RUNSC_ARGS))


def test_pids_are_the_hosts_cgroup_under_runc_and_nproc_inside_gvisor():
    assert pids_settings(None, 64) == {"pids_limit": 64}
    assert pids_settings(Runtime("runc", "runc"), 64) == {"pids_limit": 64}
    assert pids_settings(GVISOR, 64) == {
        "nproc": 64,
        "pids_limit": 64 * GVISOR_HOST_TASKS_PER_TASK + GVISOR_HOST_TASKS_BASE,
    }
    assert pids_settings(GVISOR, None) == {}


def ulimit(kwargs: dict, name: str) -> tuple[int, int] | None:
    for u in kwargs["ulimits"]:
        if u["Name"] == name:
            return u["Soft"], u["Hard"]
    return None


def test_a_gvisor_container_gets_its_runtime_and_nproc():
    kwargs = create_kwargs(make_spec(ALL_LIMITS, runtime=GVISOR))
    assert kwargs["runtime"] == "runsc"
    assert ulimit(kwargs, "nproc") == (64, 64)
    assert kwargs["pids_limit"] == 64 * GVISOR_HOST_TASKS_PER_TASK + GVISOR_HOST_TASKS_BASE


def test_a_runc_container_is_unchanged_but_named():
    base = create_kwargs(make_spec(ALL_LIMITS))
    kwargs = create_kwargs(make_spec(ALL_LIMITS, runtime=Runtime("runc", "runc")))
    assert kwargs.pop("runtime") == "runc"
    assert kwargs == base and ulimit(base, "nproc") is None and base["pids_limit"] == 64


def test_the_runtime_is_not_an_extra_create_kwarg():
    with pytest.raises(LimitConfigError, match="set the runtime trait instead"):
        create_kwargs(make_spec(ALL_LIMITS, extra_create_kwargs={"runtime": "runsc"}))


def test_the_plan_says_what_gvisor_changes():
    plan = container_plan(ALL_LIMITS, log_max_size="1m", runtime=GVISOR).report()
    assert "no MemoryError" in plan["mem_limit"]
    assert "RLIMIT_NPROC" in plan["pids_limit"]
    assert plan["isolation"].startswith("gVisor (runsc, ptrace platform)")
    runc = container_plan(ALL_LIMITS, log_max_size="1m").report()
    assert "gVisor" not in " ".join(runc.values())
    assert runc["pids_limit"] == "hard (container pids_limit)"


def test_limits_without_pids_add_no_nproc_under_gvisor():
    kwargs = create_kwargs(make_spec(Limits(mem_limit=2**28), runtime=GVISOR))
    assert ulimit(kwargs, "nproc") is None and "pids_limit" not in kwargs


def test_only_runtimes_that_share_the_hosts_mounts_take_a_folder_at_claim():
    assert Runtime("runc", "runc").host_mounts
    assert Runtime("crun", "/usr/bin/crun").host_mounts
    assert not GVISOR.host_mounts
    assert not Runtime("kata", "/opt/kata/bin/kata-runtime").host_mounts
