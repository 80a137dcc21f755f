"""The Swarm service of one kernel, as data (limited_provisioner.swarm.service): the same
sandbox as the docker backend's container, built from the same ContainerSpec, with what a
cluster changes (tmpfs home, connection secret, overlay networks, placement)."""

from __future__ import annotations

import pytest

from limited_provisioner.docker.container import ContainerSpec, create_kwargs
from limited_provisioner.errors import LimitConfigError
from limited_provisioner.limits import DATA_RLIMIT_HEADROOM, Limits
from limited_provisioner.swarm.service import (
    CONNECTION_SECRET_TARGET,
    HOOK_TARGET,
    ConfigRef,
    Placement,
    SecretRef,
    service_name,
    service_plan,
)

M = 1024**2
KID = "0f1e2d3c-kernel"
LIMITS = Limits(mem_limit=512 * M, cpu_limit=1.5, pids_limit=64, nofile_limit=256,
                disk_limit=200 * M, files_limit=1000)
SECRET = SecretRef("sec123", "limited-kernel-0f1e2d3c-connection")


def make_spec(limits: Limits = LIMITS, **overrides) -> ContainerSpec:
    values = dict(
        kernel_id=KID, image="kernel-image:1",
        command=["python3", "-m", "ipykernel_launcher", "-f",
                 f"/run/secrets/{CONNECTION_SECRET_TARGET}"],
        env={"HOME": "/home/kernel"}, user="5000:5000", limits=limits, work="/home/kernel",
        sock="", conn="", ctl="", labels={"limited-provisioner.kernel-id": KID},
    )
    values.update(overrides)
    return ContainerSpec(**values)


def plan(spec=None, **kwargs):
    kwargs = {"secret": SECRET, "networks": ["lp-kernels-internal"],
              "placement": Placement(), **kwargs}
    return service_plan(spec or make_spec(), **kwargs)


def test_limits_are_the_tasks_limits_and_its_reservations():
    task = plan().task_template
    assert task["Resources"] == {
        "Limits": {"MemoryBytes": 512 * M, "NanoCPUs": 1_500_000_000, "Pids": 64},
        "Reservations": {"MemoryBytes": 512 * M, "NanoCPUs": 1_500_000_000},
    }
    ulimits = {u["Name"]: (u["Soft"], u["Hard"]) for u in task["ContainerSpec"]["Ulimits"]}
    assert ulimits == {"core": (0, 0), "nofile": (256, 256), "fsize": (200 * M, 200 * M),
                       "data": (512 * M + DATA_RLIMIT_HEADROOM,) * 2}


def test_the_sandbox_matches_the_docker_backends_container():
    container = plan().task_template["ContainerSpec"]
    docker_kwargs = create_kwargs(make_spec())
    assert container["ReadOnly"] is docker_kwargs["read_only"] is True
    assert container["Init"] is docker_kwargs["init"] is True
    assert container["CapabilityDrop"] == docker_kwargs["cap_drop"] == ["ALL"]
    assert container["User"] == docker_kwargs["user"] == "5000:5000"
    assert container["Labels"] == docker_kwargs["labels"]
    docker_ulimits = {u["Name"]: u["Hard"] for u in docker_kwargs["ulimits"]}
    assert {u["Name"]: u["Hard"] for u in container["Ulimits"]} == docker_ulimits
    tmpfs = {m["Target"]: m["TmpfsOptions"] for m in container["Mounts"]}
    assert set(docker_kwargs["tmpfs"]) < set(tmpfs)
    assert all(m["Type"] == "tmpfs" for m in container["Mounts"]), container["Mounts"]


@pytest.mark.parametrize("home", ["/home/kernel", "/tmp"])
def test_home_is_a_tmpfs_of_disk_limit(home):
    container = plan(make_spec(work=home)).task_template["ContainerSpec"]
    targets = [m["Target"] for m in container["Mounts"]]
    assert len(targets) == len(set(targets)), targets
    mounts = {m["Target"]: m for m in container["Mounts"]}
    assert mounts[home]["TmpfsOptions"] == {"SizeBytes": 200 * M, "Mode": 0o1777}
    assert container["Dir"] == home


def test_connection_file_is_a_secret_only_the_kernels_uid_reads():
    (secret,) = plan().task_template["ContainerSpec"]["Secrets"]
    assert secret == {"SecretID": "sec123", "SecretName": SECRET.name,
                      "File": {"Name": CONNECTION_SECRET_TARGET, "UID": "5000",
                               "GID": "5000", "Mode": 0o400}}


def test_the_startup_hook_is_a_config_the_kernel_can_read_but_not_change():
    assert "Configs" not in plan().task_template["ContainerSpec"]
    hook = ConfigRef("cfg1", "limited-provisioner.hook.0123456789abcdef")
    (config,) = plan(hook=hook).task_template["ContainerSpec"]["Configs"]
    assert config == {"ConfigID": "cfg1", "ConfigName": hook.name,
                      "File": {"Name": HOOK_TARGET, "UID": "0", "GID": "0", "Mode": 0o444}}


def test_swarm_never_restarts_the_kernel_itself_and_logs_are_capped():
    task = plan().task_template
    assert task["RestartPolicy"] == {"Condition": "none", "MaxAttempts": 0}
    assert task["LogDriver"] == {"Name": "json-file",
                                 "Options": {"max-size": "1m", "max-file": "1"}}


def test_networks_placement_and_name():
    p = plan(networks=["net-a"], placement=Placement(
        constraints=("node.labels.pool==kernels",), preferences=("node.labels.zone",)))
    assert p.task_template["Networks"] == [{"Target": "net-a"}]
    assert p.task_template["Placement"] == {
        "Constraints": ["node.labels.pool==kernels"],
        "Preferences": [{"Spread": {"SpreadDescriptor": "node.labels.zone"}}],
    }
    assert p.name == service_name(KID) == f"limited-kernel-{KID}"
    kwargs = p.create_kwargs()
    assert kwargs["mode"] == {"Replicated": {"Replicas": 1}}
    assert kwargs["endpoint_spec"] == {"Mode": "dnsrr"}
    assert kwargs["labels"] == {"limited-provisioner.kernel-id": KID}


def test_no_limits_no_resources():
    task = plan(make_spec(Limits())).task_template
    assert task["Resources"] == {"Limits": {}, "Reservations": {}}
    assert [u["Name"] for u in task["ContainerSpec"]["Ulimits"]] == ["core"]


@pytest.mark.parametrize(("overrides", "says"), [
    ({"extra_mounts": ["/data:/data"]}, "extra_mounts"),
    ({"workspace_source": "/home/alice/project"}, "workspace"),
])
def test_host_paths_are_refused_with_the_way_out(overrides, says):
    with pytest.raises(LimitConfigError, match=says) as info:
        plan(make_spec(**overrides))
    assert "docker backend" in str(info.value)
