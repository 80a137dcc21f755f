"""The container a kernel runs in, as data: create_kwargs, kernel_labels, tmp_size and
parse_mount from limited_provisioner.docker.container, one table row per rule.

No Docker daemon: these are pure functions of a ContainerSpec. docker.types objects
(Mount, Ulimit, LogConfig) are dicts underneath, so their fields are compared.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import pytest

from limited_provisioner.docker.container import (
    EXTRA_ALLOWED,
    PROTECTED,
    SCRATCH_TMPFS,
    ContainerSpec,
    create_kwargs,
    kernel_labels,
    parse_mount,
    tmp_size,
)
from limited_provisioner.errors import LimitConfigError
from limited_provisioner.limits import DATA_RLIMIT_HEADROOM, Limits

M = 1024**2
G = 1024**3
KID = "0f1e2d3c-kernel"
DIRS = {"work": "/k/x/work", "sock": "/k/x/sock", "conn": "/k/x/conn", "ctl": "/k/x/ctl"}
# A host path that exists wherever the tests run.
HOST = os.path.dirname(os.path.abspath(__file__))

NO_LIMITS = Limits()
ALL_LIMITS = Limits(
    mem_limit=512 * M, cpu_limit=1.5, pids_limit=64, nofile_limit=256, disk_limit=200 * M,
    files_limit=1000, network=False, exec_timeout=30, idle_timeout=600,
)
NETWORKED = Limits(network=True)


def make_spec(limits: Limits = NO_LIMITS, **overrides) -> ContainerSpec:
    values = dict(
        kernel_id=KID, image="kernel-image:1", command=["python", "-m", "ipykernel_launcher"],
        env={"HOME": "/k/x/work"}, user="5000:5000", limits=limits, **DIRS,
    )
    values.update(overrides)
    return ContainerSpec(**values)


def mounts_of(kwargs: dict) -> list[tuple]:
    """(target, source, type, read_only) of every mount, in order."""
    return [(m["Target"], m["Source"], m["Type"], m["ReadOnly"]) for m in kwargs["mounts"]]


def ulimits_of(kwargs: dict) -> dict[str, tuple[int, int]]:
    return {u["Name"]: (u["Soft"], u["Hard"]) for u in kwargs["ulimits"]}


# -- security settings: the same whatever the limits ----------------------------------

SECURITY = {
    "the root filesystem is read-only": ("read_only", True),
    "every capability is dropped": ("cap_drop", ["ALL"]),
    "setuid binaries cannot gain privileges": ("security_opt", ["no-new-privileges"]),
    "an init process reaps the kernel's zombies": ("init", True),
    "the container is never privileged": ("privileged", False),
    "the IPC namespace is private": ("ipc_mode", "private"),
    "the container runs detached": ("detach", True),
    "the kernel is stopped with SIGTERM": ("stop_signal", "SIGTERM"),
    "the container is named after the kernel": ("name", f"limited-kernel-{KID}"),
    "the kernel runs as the spec's user": ("user", "5000:5000"),
    "the kernel starts in its work dir": ("working_dir", DIRS["work"]),
    "the image is the spec's": ("image", "kernel-image:1"),
    "the command is the spec's": ("command", ["python", "-m", "ipykernel_launcher"]),
    "the environment is the spec's, nothing added": ("environment", {"HOME": "/k/x/work"}),
    "the scratch dirs are size-capped nosuid nodev tmpfs": (
        "tmpfs", {p: f"size={G},mode=1777,nosuid,nodev" for p in ("/tmp", "/var/tmp", "/run/lock")}
    ),
}
LIMIT_VARIANTS = {
    "with no limits": NO_LIMITS,
    "with every limit": ALL_LIMITS,
    "with network allowed": NETWORKED,
}


@pytest.mark.parametrize("limits", LIMIT_VARIANTS.values(), ids=LIMIT_VARIANTS.keys())
@pytest.mark.parametrize(("key", "expected"), SECURITY.values(), ids=SECURITY.keys())
def test_security_setting_is_always_present(key, expected, limits):
    assert create_kwargs(make_spec(limits))[key] == expected


@pytest.mark.parametrize("limits", LIMIT_VARIANTS.values(), ids=LIMIT_VARIANTS.keys())
def test_the_log_is_json_file_capped_to_one_file(limits):
    log = create_kwargs(make_spec(limits, log_max_size="3m"))["log_config"]
    assert log["Type"] == "json-file"
    assert log["Config"] == {"max-size": "3m", "max-file": "1"}


def test_the_tmpfs_paths_are_exactly_the_scratch_dirs():
    assert SCRATCH_TMPFS == ("/tmp", "/var/tmp", "/run/lock")
    assert create_kwargs(make_spec(tmp_size="64M"))["tmpfs"] == {
        "/tmp": "size=64M,mode=1777,nosuid,nodev",
        "/var/tmp": "size=64M,mode=1777,nosuid,nodev",
        "/run/lock": "size=64M,mode=1777,nosuid,nodev",
    }


NETWORK = {
    "the default limits give no network": (Limits(), "none"),
    "network=False gives no network": (Limits(network=False), "none"),
    "network=False with every other limit gives no network": (ALL_LIMITS, "none"),
    "network=True gives the bridge network": (Limits(network=True), "bridge"),
}


@pytest.mark.parametrize(("limits", "mode"), NETWORK.values(), ids=NETWORK.keys())
def test_network_mode(limits, mode):
    assert create_kwargs(make_spec(limits))["network_mode"] == mode


# -- resource limits ------------------------------------------------------------------

RESOURCE_KEYS = ("mem_limit", "memswap_limit", "nano_cpus", "pids_limit")


@dataclass
class Resources:
    limits: Limits
    expect: dict  # the resource keys that must be present, with their values; others absent


RESOURCES = {
    "unlimited limits leave every resource key out": Resources(NO_LIMITS, {}),
    "mem_limit sets memory and an equal memswap: no swap": Resources(
        Limits(mem_limit=512 * M), {"mem_limit": 512 * M, "memswap_limit": 512 * M}
    ),
    "a 2G mem_limit is passed in bytes": Resources(
        Limits(mem_limit=2 * G), {"mem_limit": 2 * G, "memswap_limit": 2 * G}
    ),
    "cpu_limit 1.5 is 1.5e9 nano_cpus": Resources(
        Limits(cpu_limit=1.5), {"nano_cpus": 1_500_000_000}
    ),
    "cpu_limit 0.25 is 2.5e8 nano_cpus": Resources(
        Limits(cpu_limit=0.25), {"nano_cpus": 250_000_000}
    ),
    "cpu_limit 4 is 4e9 nano_cpus": Resources(Limits(cpu_limit=4.0), {"nano_cpus": 4_000_000_000}),
    "the smallest cpu_limit 0.01 is 1e7 nano_cpus": Resources(
        Limits(cpu_limit=0.01), {"nano_cpus": 10_000_000}
    ),
    "pids_limit is passed as is": Resources(Limits(pids_limit=64), {"pids_limit": 64}),
    "every limit at once": Resources(
        ALL_LIMITS,
        {"mem_limit": 512 * M, "memswap_limit": 512 * M, "nano_cpus": 1_500_000_000,
         "pids_limit": 64},
    ),
}


@pytest.mark.parametrize("case", RESOURCES.values(), ids=RESOURCES.keys())
def test_resource_limits(case):
    kwargs = create_kwargs(make_spec(case.limits))
    assert {k: kwargs[k] for k in RESOURCE_KEYS if k in kwargs} == case.expect
    assert all(type(kwargs[k]) is int for k in case.expect)


@dataclass
class Ulimits:
    limits: Limits
    expect: dict  # name -> value (soft = hard = value); nothing else may be present


ULIMITS = {
    "unlimited limits still forbid core dumps, nothing else": Ulimits(NO_LIMITS, {"core": 0}),
    "mem_limit adds RLIMIT_DATA at mem_limit plus the headroom": Ulimits(
        Limits(mem_limit=512 * M), {"core": 0, "data": 512 * M + DATA_RLIMIT_HEADROOM}
    ),
    "nofile_limit adds RLIMIT_NOFILE": Ulimits(
        Limits(nofile_limit=256), {"core": 0, "nofile": 256}
    ),
    "disk_limit adds RLIMIT_FSIZE": Ulimits(
        Limits(disk_limit=200 * M), {"core": 0, "fsize": 200 * M}
    ),
    "cpu, pids, files and network limits add no ulimit": Ulimits(
        Limits(cpu_limit=1, pids_limit=64, files_limit=100, network=True), {"core": 0}
    ),
    "every limit adds core, nofile, fsize and data": Ulimits(
        ALL_LIMITS,
        {"core": 0, "nofile": 256, "fsize": 200 * M, "data": 512 * M + DATA_RLIMIT_HEADROOM},
    ),
}


@pytest.mark.parametrize("case", ULIMITS.values(), ids=ULIMITS.keys())
def test_ulimits(case):
    assert ulimits_of(create_kwargs(make_spec(case.limits))) == {
        name: (value, value) for name, value in case.expect.items()
    }


def test_the_data_headroom_is_the_documented_128m():
    assert DATA_RLIMIT_HEADROOM == 128 * M


# -- mounts ---------------------------------------------------------------------------

KERNEL_MOUNTS = [
    (DIRS["work"], DIRS["work"], "bind", False),
    (DIRS["sock"], DIRS["sock"], "bind", False),
    (DIRS["conn"], DIRS["conn"], "bind", False),
    (DIRS["ctl"], DIRS["ctl"], "bind", True),
]
MOUNTS = {
    "without extra mounts only the four kernel dirs are mounted, ctl read-only": ([], []),
    "an extra mount without a mode is read-only": (
        [f"{HOST}:/data"], [("/data", HOST, "bind", True)]
    ),
    "an extra mount with :ro is read-only": (
        [f"{HOST}:/data:ro"], [("/data", HOST, "bind", True)]
    ),
    "an extra mount with :rw is writable": (
        [f"{HOST}:/data:rw"], [("/data", HOST, "bind", False)]
    ),
    "several extra mounts keep their order after the kernel dirs": (
        [f"{HOST}:/b:rw", "/usr:/a"],
        [("/b", HOST, "bind", False), ("/a", "/usr", "bind", True)],
    ),
}


@pytest.mark.parametrize("limits", LIMIT_VARIANTS.values(), ids=LIMIT_VARIANTS.keys())
@pytest.mark.parametrize(("extra", "expect"), MOUNTS.values(), ids=MOUNTS.keys())
def test_mounts(extra, expect, limits):
    kwargs = create_kwargs(make_spec(limits, extra_mounts=extra))
    assert mounts_of(kwargs) == KERNEL_MOUNTS + expect


def test_a_bad_extra_mount_refuses_the_whole_spec():
    with pytest.raises(LimitConfigError, match="does not exist"):
        create_kwargs(make_spec(extra_mounts=["/no/such/host/path:/data"]))


# -- extra_create_kwargs --------------------------------------------------------------

ALLOWED_EXTRA = {
    "a cpuset can be added": {"cpuset_cpus": "0-1"},
    "several unprotected settings at once": {"cpuset_cpus": "0-1", "hostname": "kernel"},
}


@pytest.mark.parametrize("extra", ALLOWED_EXTRA.values(), ids=ALLOWED_EXTRA.keys())
def test_extra_create_kwargs_may_add_unprotected_settings(extra):
    base = create_kwargs(make_spec(ALL_LIMITS))
    kwargs = create_kwargs(make_spec(ALL_LIMITS, extra_create_kwargs=dict(extra)))
    assert {k: kwargs[k] for k in extra} == extra
    assert {k: v for k, v in kwargs.items() if k not in extra} == base


@pytest.mark.parametrize(
    "key", sorted(PROTECTED), ids=lambda key: f"extra_create_kwargs may not override {key}"
)
def test_extra_create_kwargs_refuses_a_protected_key(key):
    spec = make_spec(ALL_LIMITS, extra_create_kwargs={key: "override", "runtime": "runsc"})
    with pytest.raises(LimitConfigError) as err:
        create_kwargs(spec)
    assert repr([key]) in str(err.value)


def test_every_refused_key_is_named_at_once():
    spec = make_spec(extra_create_kwargs={"privileged": True, "cap_drop": [], "runtime": "x"})
    with pytest.raises(LimitConfigError) as err:
        create_kwargs(spec)
    assert "['cap_drop', 'privileged']" in str(err.value)
    assert "runtime" not in str(err.value)


WIDENING = {
    "the host's root mounted": {"volumes": {"/": {"bind": "/host", "mode": "rw"}}},
    "capabilities added back": {"cap_add": ["SYS_ADMIN"]},
    "the host's pid namespace": {"pid_mode": "host"},
    "no user namespace remap": {"userns_mode": "host"},
    "host devices": {"devices": ["/dev/sda:/dev/sda"]},
    "kernel parameters": {"sysctls": {"net.ipv4.ip_forward": "1"}},
    "another cgroup parent": {"cgroup_parent": "/"},
    "the OOM killer off": {"oom_kill_disable": True},
    "another container's volumes": {"volumes_from": ["other"]},
    "a restart policy the provisioner does not know": {"restart_policy": {"Name": "always"}},
}


@pytest.mark.parametrize("extra", WIDENING.values(), ids=WIDENING.keys())
def test_extra_create_kwargs_refuses_what_would_widen_the_sandbox(extra):
    with pytest.raises(LimitConfigError, match="may not set") as err:
        create_kwargs(make_spec(ALL_LIMITS, extra_create_kwargs=dict(extra)))
    assert repr(sorted(extra)) in str(err.value) and "cpuset_cpus" in str(err.value)


@pytest.mark.parametrize("limits", LIMIT_VARIANTS.values(), ids=LIMIT_VARIANTS.keys())
def test_every_setting_create_kwargs_makes_is_protected(limits):
    assert not PROTECTED & EXTRA_ALLOWED
    kwargs = create_kwargs(make_spec(limits, tmp_size="1M", extra_mounts=[f"{HOST}:/d"]))
    assert set(kwargs) - PROTECTED == set()


# -- labels ---------------------------------------------------------------------------

P = "limited-provisioner."


def labels_for(limits: Limits, caller: dict | None = None) -> dict[str, str]:
    return kernel_labels(
        kernel_id=KID, owner="alice", server_id="srv-1", kernelspec="python3-limited",
        state_dir="/state", kernel_dir="/k/x", connection_file="/k/x/conn/kernel.json",
        uid=5000, limits=limits, caller_labels=caller or {},
    )


IDENTITY_LABELS = {
    "the kernel id": ("kernel-id", KID),
    "the owner": ("owner", "alice"),
    "the server id": ("server-id", "srv-1"),
    "the kernelspec": ("kernelspec", "python3-limited"),
    "the state dir": ("state-dir", "/state"),
    "the kernel dir": ("kernel-dir", "/k/x"),
    "the connection file": ("connection-file", "/k/x/conn/kernel.json"),
    "the uid as text": ("uid", "5000"),
}


@pytest.mark.parametrize(("name", "value"), IDENTITY_LABELS.values(),
                         ids=[f"a label carries {k}" for k in IDENTITY_LABELS])
def test_identity_labels(name, value):
    assert labels_for(NO_LIMITS)[P + name] == value


LIMIT_LABELS = {
    "unlimited limits are labelled with empty strings": (
        NO_LIMITS,
        {"mem-limit": "", "cpu-limit": "", "pids-limit": "", "nofile-limit": "",
         "disk-limit": "", "network": "false"},
    ),
    "set limits are labelled with their values": (
        ALL_LIMITS,
        {"mem-limit": str(512 * M), "cpu-limit": "1.5", "pids-limit": "64",
         "nofile-limit": "256", "disk-limit": str(200 * M), "network": "false"},
    ),
    "network=True is labelled true": (
        NETWORKED,
        {"mem-limit": "", "cpu-limit": "", "pids-limit": "", "nofile-limit": "",
         "disk-limit": "", "network": "true"},
    ),
}


@pytest.mark.parametrize(("limits", "expect"), LIMIT_LABELS.values(), ids=LIMIT_LABELS.keys())
def test_limit_labels(limits, expect):
    labels = labels_for(limits)
    assert {name: labels[P + name] for name in expect} == expect


def test_the_created_label_is_the_current_time():
    before = time.time()
    created = float(labels_for(NO_LIMITS)[P + "created"])
    assert before <= created <= time.time()


CALLER_LABELS = {
    "no caller labels add nothing under label.": ({}, {}),
    "a caller label is put under label.": ({"team": "ml"}, {P + "label.team": "ml"}),
    "a caller label named like ours cannot replace ours": (
        {"kernel-id": "forged", "owner": "mallory"},
        {P + "label.kernel-id": "forged", P + "label.owner": "mallory"},
    ),
}


@pytest.mark.parametrize(("caller", "expect"), CALLER_LABELS.values(), ids=CALLER_LABELS.keys())
def test_caller_labels(caller, expect):
    labels = labels_for(NO_LIMITS, caller)
    assert {k: v for k, v in labels.items() if k.startswith(P + "label.")} == expect
    assert labels[P + "kernel-id"] == KID
    assert labels[P + "owner"] == "alice"
    assert all(k.startswith(P) for k in labels)


def test_labels_reach_the_container_unchanged():
    labels = labels_for(ALL_LIMITS, {"team": "ml"})
    assert create_kwargs(make_spec(labels=dict(labels)))["labels"] == labels


# -- tmp_size -------------------------------------------------------------------------


@dataclass
class TmpSize:
    limits: Limits
    expect: int | str
    configured: str = ""


TMP_SIZES = {
    "without disk or mem limit the scratch tmpfs is 1 GiB": TmpSize(NO_LIMITS, G),
    "a configured size wins": TmpSize(NO_LIMITS, "64M", configured="64M"),
    "a configured size wins over disk and mem limits": TmpSize(ALL_LIMITS, "2G", configured="2G"),
    "disk_limit alone is the size": TmpSize(Limits(disk_limit=2 * G), 2 * G),
    "disk_limit below mem_limit is the size": TmpSize(
        Limits(disk_limit=100 * M, mem_limit=512 * M), 100 * M
    ),
    "disk_limit above mem_limit is capped at mem_limit": TmpSize(
        Limits(disk_limit=2 * G, mem_limit=512 * M), 512 * M
    ),
    "mem_limit below 1 GiB caps the default": TmpSize(Limits(mem_limit=512 * M), 512 * M),
    "mem_limit above 1 GiB leaves the 1 GiB default": TmpSize(Limits(mem_limit=4 * G), G),
}


@pytest.mark.parametrize("case", TMP_SIZES.values(), ids=TMP_SIZES.keys())
def test_tmp_size(case):
    assert tmp_size(case.limits, case.configured) == case.expect


@pytest.mark.parametrize("case", TMP_SIZES.values(), ids=TMP_SIZES.keys())
def test_tmp_size_is_what_the_tmpfs_mounts_get(case):
    size = tmp_size(case.limits, case.configured)
    tmpfs = create_kwargs(make_spec(case.limits, tmp_size=size))["tmpfs"]
    assert set(tmpfs.values()) == {f"size={case.expect},mode=1777,nosuid,nodev"}


# -- parse_mount ----------------------------------------------------------------------

GOOD_MOUNTS = {
    "HOST:TARGET is read-only by default": (f"{HOST}:/data", (HOST, "/data", True)),
    "HOST:TARGET:ro is read-only": (f"{HOST}:/data:ro", (HOST, "/data", True)),
    "HOST:TARGET:rw is writable": (f"{HOST}:/data:rw", (HOST, "/data", False)),
    "a system dir may be mounted read-only at another path": (
        "/usr:/opt/host-usr", ("/usr", "/opt/host-usr", True)
    ),
}


@pytest.mark.parametrize(("entry", "expect"), GOOD_MOUNTS.values(), ids=GOOD_MOUNTS.keys())
def test_parse_mount_accepts(entry, expect):
    assert parse_mount(entry) == expect


@dataclass
class BadMount:
    entry: str
    words: tuple = field(default_factory=tuple)


SHAPE = "must look like"
BAD_MOUNTS = {
    "a single path is refused": BadMount("/data", (SHAPE,)),
    "four fields are refused": BadMount(f"{HOST}:/data:ro:x", (SHAPE,)),
    "an empty host path is refused": BadMount(":/data", (SHAPE,)),
    "an empty container path is refused": BadMount(f"{HOST}:", (SHAPE,)),
    "an empty entry is refused": BadMount("", (SHAPE,)),
    "a mode other than ro or rw is refused": BadMount(
        f"{HOST}:/data:rx", ("mode must be ro or rw", "'rx'")
    ),
    "an upper-case mode is refused": BadMount(f"{HOST}:/data:RW", ("mode must be ro or rw",)),
    "an empty mode is refused": BadMount(f"{HOST}:/data:", ("mode must be ro or rw", "''")),
    "a relative host path is refused": BadMount("relative/dir:/data", ("must be absolute",)),
    "a relative container path is refused": BadMount(f"{HOST}:data", ("must be absolute",)),
    "a missing host path is refused": BadMount(
        "/no/such/host/path:/data", ("host path /no/such/host/path does not exist",)
    ),
}


@pytest.mark.parametrize("case", BAD_MOUNTS.values(), ids=BAD_MOUNTS.keys())
def test_parse_mount_refuses(case):
    with pytest.raises(LimitConfigError) as err:
        parse_mount(case.entry)
    message = str(err.value)
    assert repr(case.entry) in message
    for word in case.words:
        assert word in message
