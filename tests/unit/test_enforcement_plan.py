"""The enforcement plan (limited_provisioner.enforcement) and the launch spec that follows
it (limited_provisioner.process.sandbox.launch_spec), one table row per rule.

What the host offers (cgroup controllers, own uid, namespaces) is passed in, so every
host is simulated here; nothing is started.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from limited_provisioner.enforcement import (
    CGROUP,
    CONTAINER,
    NAMESPACE,
    NICE,
    NONE,
    PROVISIONER,
    PROXY,
    REPORTED,
    RLIMIT,
    WATCHDOG,
    EnforcementPlan,
    Measure,
    container_plan,
    identity_measure,
    process_plan,
    shared_measures,
)
from limited_provisioner.limits import DATA_RLIMIT_HEADROOM, Limits
from limited_provisioner.process.sandbox import host_scratch_dirs, launch_spec

M = 1024**2
G = 1024**3
MECHANISMS = (CGROUP, RLIMIT, WATCHDOG, NICE, CONTAINER, PROXY, PROVISIONER, NAMESPACE, NONE,
              REPORTED)
ALL_CGROUPS = ("memory", "cpu", "pids")
SCRATCH = ("/tmp", "/var/tmp")

NO_LIMITS = Limits()
ALL_LIMITS = Limits(
    mem_limit=512 * M, cpu_limit=1.5, pids_limit=64, nofile_limit=256, disk_limit=200 * M,
    files_limit=1000, network=False, exec_timeout=30, idle_timeout=600,
)
RESOURCE_NAMES = ("mem_limit", "cpu_limit", "pids_limit", "nofile_limit", "disk_limit",
                  "files_limit")


@dataclass
class Host:
    """What process_plan is told about the host."""

    cgroups: tuple = ALL_CGROUPS
    own_uid: bool = True
    isolated: bool = True
    netns: bool = True
    nice: int = 10
    cpu_grace: float = 0.0

    def plan(self, limits: Limits) -> EnforcementPlan:
        return process_plan(
            limits, cgroups=self.cgroups, own_uid=self.own_uid, isolated=self.isolated,
            netns=self.netns, nice=self.nice, cpu_grace=self.cpu_grace, scratch_dirs=SCRATCH,
        )


ROOT = Host()  # root with a delegated cgroup: everything available
BARE = Host(cgroups=(), own_uid=False, isolated=False, netns=False)  # unprivileged, no cgroup


# -- process_plan ---------------------------------------------------------------------


@dataclass
class Row:
    host: Host
    limits: Limits
    name: str
    mechanism: str
    starts: str  # the text starts with this
    words: tuple = ()  # and contains these
    absent_words: tuple = ()  # and not these


PROCESS_ROWS = {
    # memory
    "a memory cgroup makes mem_limit hard": Row(
        ROOT, ALL_LIMITS, "mem_limit", CGROUP, "hard", ("memory.limit_in_bytes", "no swap")
    ),
    "without a memory cgroup mem_limit is a best-effort watchdog": Row(
        Host(cgroups=("cpu", "pids")), ALL_LIMITS, "mem_limit", WATCHDOG, "best-effort",
        ("RSS", "RLIMIT_DATA"),
    ),
    # cpu
    "a cpu cgroup makes cpu_limit hard": Row(
        ROOT, ALL_LIMITS, "cpu_limit", CGROUP, "hard", ("cpu.cfs_quota_us",), ("after launch",)
    ),
    "a cpu grace is reported with the hard cpu limit": Row(
        Host(cpu_grace=2.5), ALL_LIMITS, "cpu_limit", CGROUP, "hard", ("from 2.5s after launch",)
    ),
    "without a cpu cgroup cpu_limit is best-effort nice": Row(
        Host(cgroups=("memory", "pids"), nice=15), ALL_LIMITS, "cpu_limit", NICE, "best-effort",
        ("nice 15",),
    ),
    # pids
    "a pids cgroup makes pids_limit hard": Row(
        ROOT, ALL_LIMITS, "pids_limit", CGROUP, "hard", ("pids.max",)
    ),
    "without a pids cgroup but with its own uid pids_limit is a hard RLIMIT_NPROC": Row(
        Host(cgroups=("memory", "cpu"), own_uid=True), ALL_LIMITS, "pids_limit", RLIMIT, "hard",
        ("RLIMIT_NPROC", "own uid"),
    ),
    "without a pids cgroup or own uid pids_limit is a best-effort RLIMIT_NPROC": Row(
        Host(cgroups=("memory", "cpu"), own_uid=False), ALL_LIMITS, "pids_limit", RLIMIT,
        "best-effort", ("RLIMIT_NPROC", "server user"),
    ),
    "a pids cgroup wins over the own uid rlimit": Row(
        Host(own_uid=True), ALL_LIMITS, "pids_limit", CGROUP, "hard"
    ),
    # nofile, disk, files
    "nofile_limit is a hard RLIMIT_NOFILE anywhere": Row(
        BARE, ALL_LIMITS, "nofile_limit", RLIMIT, "hard", ("RLIMIT_NOFILE",)
    ),
    "disk_limit isolated is per-file hard plus a watchdog and private tmpfs": Row(
        ROOT, ALL_LIMITS, "disk_limit", WATCHDOG, "hard per file",
        ("RLIMIT_FSIZE", "best-effort total", "private size-capped tmpfs on /tmp, /var/tmp"),
    ),
    "disk_limit not isolated claims no tmpfs": Row(
        BARE, ALL_LIMITS, "disk_limit", WATCHDOG, "hard per file",
        ("RLIMIT_FSIZE", "best-effort total"), ("tmpfs", "read-only"),
    ),
    "files_limit is a best-effort watchdog": Row(
        ROOT, ALL_LIMITS, "files_limit", WATCHDOG, "best-effort", ("watchdog on work dir",)
    ),
    # isolation
    "isolated kernels report private namespaces": Row(
        ROOT, NO_LIMITS, "isolation", NAMESPACE, "private PID, IPC and mount namespaces"
    ),
    "a kernel that is not isolated reports isolation NOT enforced": Row(
        BARE, NO_LIMITS, "isolation", NONE, "NOT enforced", ("needs root",)
    ),
    "own uid without namespaces still reports isolation NOT enforced": Row(
        Host(isolated=False), ALL_LIMITS, "isolation", NONE, "NOT enforced"
    ),
    # network
    "network=True is reported allowed even with a network namespace": Row(
        ROOT, Limits(network=True), "network", NONE, "allowed"
    ),
    "network=True is reported allowed without a network namespace": Row(
        BARE, Limits(network=True), "network", NONE, "allowed"
    ),
    "no network with a network namespace is hard": Row(
        ROOT, NO_LIMITS, "network", NAMESPACE, "hard", ("empty network namespace",)
    ),
    "no network without a network namespace is NOT enforced": Row(
        Host(netns=False), NO_LIMITS, "network", NONE, "NOT enforced", ("needs root",)
    ),
}


@pytest.mark.parametrize("row", PROCESS_ROWS.values(), ids=PROCESS_ROWS.keys())
def test_process_plan(row):
    measure = row.host.plan(row.limits).measures[row.name]
    assert measure.mechanism == row.mechanism
    assert measure.text.startswith(row.starts), measure.text
    for word in row.words:
        assert word in measure.text
    for word in row.absent_words:
        assert word not in measure.text


PROCESS_KEYS = {
    "unlimited limits on a full host plan only isolation and network": (
        ROOT, NO_LIMITS, {"isolation", "network"}
    ),
    "unlimited limits on a bare host plan only isolation and network": (
        BARE, NO_LIMITS, {"isolation", "network"}
    ),
    "every limit is planned on a full host": (
        ROOT, ALL_LIMITS, {*RESOURCE_NAMES, "isolation", "network"}
    ),
    "every limit is planned on a bare host": (
        BARE, ALL_LIMITS, {*RESOURCE_NAMES, "isolation", "network"}
    ),
    "only mem_limit set plans only mem_limit of the limits": (
        ROOT, Limits(mem_limit=G), {"mem_limit", "isolation", "network"}
    ),
    "timeouts are not the process plan's (shared_measures has them)": (
        ROOT, Limits(exec_timeout=30, idle_timeout=60), {"isolation", "network"}
    ),
}


@pytest.mark.parametrize(("host", "limits", "names"), PROCESS_KEYS.values(),
                         ids=PROCESS_KEYS.keys())
def test_process_plan_names_exactly_the_set_limits(host, limits, names):
    assert set(host.plan(limits).measures) == names


# -- container_plan -------------------------------------------------------------------

CONTAINER_ROWS = {
    "mem_limit is hard, with no swap": ("mem_limit", ALL_LIMITS, CONTAINER, "hard", "no swap"),
    "cpu_limit is hard nano_cpus": ("cpu_limit", ALL_LIMITS, CONTAINER, "hard", "nano_cpus"),
    "pids_limit is hard": ("pids_limit", ALL_LIMITS, CONTAINER, "hard", "pids_limit"),
    "nofile_limit is a hard ulimit": ("nofile_limit", ALL_LIMITS, CONTAINER, "hard", "nofile"),
    "disk_limit is per-file hard, total best-effort": (
        "disk_limit", ALL_LIMITS, WATCHDOG, "hard per file", "best-effort total"
    ),
    "files_limit is a best-effort watchdog": (
        "files_limit", ALL_LIMITS, WATCHDOG, "best-effort", "watchdog"
    ),
    "no network is a hard --network=none": ("network", NO_LIMITS, CONTAINER, "hard", "none"),
    "network=True is reported allowed": (
        "network", Limits(network=True), NONE, "allowed", "bridge"
    ),
    "the filesystem is a read-only root without capabilities": (
        "filesystem", NO_LIMITS, CONTAINER, "read-only root", "cap_drop ALL"
    ),
    "isolation names the log cap": ("isolation", NO_LIMITS, CONTAINER, "container", "capped at 7m"),
}


@pytest.mark.parametrize(("name", "limits", "mechanism", "starts", "word"),
                         CONTAINER_ROWS.values(), ids=CONTAINER_ROWS.keys())
def test_container_plan(name, limits, mechanism, starts, word):
    measure = container_plan(limits, log_max_size="7m").measures[name]
    assert (measure.mechanism, measure.text[: len(starts)]) == (mechanism, starts)
    assert word in measure.text


CONTAINER_KEYS = {
    "unlimited limits plan only network, filesystem and isolation": (
        NO_LIMITS, {"network", "filesystem", "isolation"}
    ),
    "every limit is planned": (ALL_LIMITS, {*RESOURCE_NAMES, "network", "filesystem", "isolation"}),
    "only pids_limit set plans only pids_limit of the limits": (
        Limits(pids_limit=64), {"pids_limit", "network", "filesystem", "isolation"}
    ),
}


@pytest.mark.parametrize(("limits", "names"), CONTAINER_KEYS.values(), ids=CONTAINER_KEYS.keys())
def test_container_plan_names_exactly_the_set_limits(limits, names):
    assert set(container_plan(limits, log_max_size="1m").measures) == names


def test_nothing_in_a_container_plan_is_claimed_not_enforced():
    for limits in (NO_LIMITS, ALL_LIMITS, Limits(network=True)):
        assert not any("NOT enforced" in t for t in container_plan(limits, log_max_size="1m")
                       .report().values())


# -- shared_measures ------------------------------------------------------------------


@dataclass
class Shared:
    limits: Limits = NO_LIMITS
    output_limit: int | None = None
    max_lifetime: float = 0
    expect: dict = field(default_factory=dict)  # name -> (mechanism, words)


SHARED_ROWS = {
    "with nothing set only connections are enforced, by the proxy": Shared(expect={
        "connections": (PROXY, ("HMAC-verified", "over 4M are dropped")),
    }),
    "an output limit is enforced by the proxy": Shared(output_limit=2 * M, expect={
        "connections": (PROXY, ()),
        "output_limit": (PROXY, ("2M of IOPub output",)),
    }),
    "idle_timeout is enforced by the provisioner": Shared(Limits(idle_timeout=90), expect={
        "connections": (PROXY, ()),
        "idle_timeout": (PROVISIONER, ("90s without a client request",)),
    }),
    "exec_timeout is enforced by the provisioner with its grace": Shared(
        Limits(exec_timeout=30), expect={
            "connections": (PROXY, ()),
            "exec_timeout": (PROVISIONER, ("SIGINT after 30s", "after 5s more")),
        }),
    "max_lifetime is enforced by the provisioner": Shared(max_lifetime=3600, expect={
        "connections": (PROXY, ()),
        "max_lifetime": (PROVISIONER, ("3600s",)),
    }),
    "everything set at once": Shared(
        Limits(idle_timeout=90, exec_timeout=30), output_limit=M, max_lifetime=60, expect={
            "connections": (PROXY, ()),
            "output_limit": (PROXY, ("1M",)),
            "idle_timeout": (PROVISIONER, ("90s",)),
            "exec_timeout": (PROVISIONER, ("30s",)),
            "max_lifetime": (PROVISIONER, ("60s",)),
        }),
    "resource limits are not shared measures": Shared(ALL_LIMITS, expect={
        "connections": (PROXY, ()),
        "idle_timeout": (PROVISIONER, ("600s",)),
        "exec_timeout": (PROVISIONER, ("30s",)),
    }),
}


@pytest.mark.parametrize("row", SHARED_ROWS.values(), ids=SHARED_ROWS.keys())
def test_shared_measures(row):
    measures = shared_measures(
        row.limits, exec_timeout_grace=5, max_lifetime=row.max_lifetime,
        output_limit=row.output_limit, max_message_size=4 * M,
    )
    assert {k: m.mechanism for k, m in measures.items()} == {
        k: mech for k, (mech, _) in row.expect.items()
    }
    for name, (_, words) in row.expect.items():
        for word in words:
            assert word in measures[name].text


# -- identity_measure -----------------------------------------------------------------

IDENTITY_ROWS = {
    "no own uid runs as the server user": (
        None, False, Measure(NONE, "server user (uid 1000): not root, cannot switch")
    ),
    "no own uid in a container runs as the server's uid there": (
        None, True, Measure(NONE, "server user's uid 1000 in the container (not root)")
    ),
    "an own uid is a per-kernel namespace identity": (
        70001, False,
        Measure(NAMESPACE, "uid/gid 70001 (unprivileged, per kernel, host-wide unique)"),
    ),
    "an own uid in a container is the container user": (
        70001, True,
        Measure(NAMESPACE,
                "uid/gid 70001 (unprivileged, per kernel, container user, host-wide unique)"),
    ),
}


@pytest.mark.parametrize(("uid", "in_container", "expect"), IDENTITY_ROWS.values(),
                         ids=IDENTITY_ROWS.keys())
def test_identity_measure(uid, in_container, expect):
    assert identity_measure(uid, 1000, in_container) == expect


# -- EnforcementPlan: report, mechanisms, from_report ---------------------------------

PLANS = {
    "a full-host process plan": lambda: ROOT.plan(ALL_LIMITS),
    "a bare-host process plan": lambda: BARE.plan(ALL_LIMITS),
    "an own-uid process plan without cgroups": lambda: Host(cgroups=()).plan(ALL_LIMITS),
    "an unlimited process plan": lambda: ROOT.plan(NO_LIMITS),
    "a container plan": lambda: container_plan(ALL_LIMITS, log_max_size="1m"),
    "a networked container plan": lambda: container_plan(Limits(network=True), log_max_size="1m"),
}
PLAN_NAMES = (*RESOURCE_NAMES, "isolation", "network", "filesystem", "identity", "unknown")


@pytest.mark.parametrize("make", PLANS.values(), ids=PLANS.keys())
def test_a_plan_read_back_from_its_report_uses_the_same_mechanisms(make):
    plan = make()
    back = EnforcementPlan.from_report(plan.report(), plan.mechanisms())
    assert back.report() == plan.report()
    assert back.mechanisms() == plan.mechanisms()
    assert back.describe() == plan.describe()
    answers = {(n, m): plan.uses(n, m) for n in PLAN_NAMES for m in MECHANISMS}
    assert {(n, m): back.uses(n, m) for n in PLAN_NAMES for m in MECHANISMS} == answers
    assert any(answers.values())


@pytest.mark.parametrize("make", PLANS.values(), ids=PLANS.keys())
def test_a_plan_read_back_without_mechanisms_claims_none(make):
    plan = make()
    back = EnforcementPlan.from_report(plan.report())
    assert back.report() == plan.report()
    assert set(back.mechanisms().values()) == {REPORTED}
    assert not any(back.uses(n, m) for n in PLAN_NAMES for m in MECHANISMS if m != REPORTED)


def test_describe_lists_measures_sorted_by_name():
    plan = EnforcementPlan()
    plan.set("network", NONE, "allowed")
    plan.set("cpu_limit", NICE, "best-effort")
    assert plan.describe() == "cpu_limit: best-effort; network: allowed"


def test_uses_is_false_for_a_limit_not_in_the_plan():
    plan = ROOT.plan(NO_LIMITS)
    assert not any(plan.uses("pids_limit", m) for m in MECHANISMS)


# -- launch_spec follows the plan -----------------------------------------------------

CWD = "/k/x/work"


def spec_for(limits: Limits, plan: EnforcementPlan, host: Host, **overrides) -> dict:
    values = {
        "cwd": CWD, "cgroup_procs": ["/sys/fs/cgroup/k/cgroup.procs"], "netns": host.netns,
        "nice": host.nice, "uid": 70001 if host.own_uid else None, "gid": None,
        "isolated": host.isolated, "writable": ["/k/x/sock", "/k/x/conn"],
        "expose": {"/tmp/venv": "/tmp"}, "status_fd": 9,
    }
    values.update(overrides)
    return launch_spec(limits, plan, **values)


def planned_spec(host: Host, limits: Limits, **overrides) -> dict:
    return spec_for(limits, host.plan(limits), host, **overrides)


NPROC = {
    "a pids cgroup sets no RLIMIT_NPROC": (ROOT, ALL_LIMITS, None),
    "pids by rlimit with an own uid sets RLIMIT_NPROC": (
        Host(cgroups=("memory", "cpu"), own_uid=True), ALL_LIMITS, 64
    ),
    "pids by rlimit without an own uid sets RLIMIT_NPROC": (BARE, ALL_LIMITS, 64),
    "no pids_limit sets no RLIMIT_NPROC even without a cgroup": (BARE, NO_LIMITS, None),
}


@pytest.mark.parametrize(("host", "limits", "nproc"), NPROC.values(), ids=NPROC.keys())
def test_nproc_rlimit_follows_the_plan(host, limits, nproc):
    assert planned_spec(host, limits)["rlimits"].get("nproc") == nproc


NICE_ROWS = {
    "a cpu cgroup sets no nice": (ROOT, ALL_LIMITS, None),
    "cpu by nice sets the plan's nice": (Host(cgroups=("memory",), nice=12), ALL_LIMITS, 12),
    "cpu by nice on a bare host sets nice": (BARE, ALL_LIMITS, 10),
    "no cpu_limit sets no nice even without a cgroup": (BARE, NO_LIMITS, None),
}


@pytest.mark.parametrize(("host", "limits", "nice"), NICE_ROWS.values(), ids=NICE_ROWS.keys())
def test_nice_follows_the_plan(host, limits, nice):
    assert planned_spec(host, limits).get("nice") == nice


def hand_plan(**measures: str) -> EnforcementPlan:
    return EnforcementPlan({name: Measure(mech, "text") for name, mech in measures.items()})


HAND_PLANS = {
    "a plan saying pids by cgroup gets no nproc though the limit is set": (
        hand_plan(pids_limit=CGROUP, cpu_limit=CGROUP), None, None
    ),
    "a plan saying pids by rlimit gets nproc": (hand_plan(pids_limit=RLIMIT), 64, None),
    "a plan saying cpu by nice gets nice": (hand_plan(cpu_limit=NICE), None, 7),
    "a plan read back from a report (mechanisms unknown) gets neither": (
        EnforcementPlan.from_report({"pids_limit": "hard", "cpu_limit": "best-effort"}), None, None
    ),
    "an empty plan gets neither": (EnforcementPlan(), None, None),
}


@pytest.mark.parametrize(("plan", "nproc", "nice"), HAND_PLANS.values(), ids=HAND_PLANS.keys())
def test_launch_spec_reads_the_plan_not_the_limits(plan, nproc, nice):
    spec = spec_for(ALL_LIMITS, plan, ROOT, nice=7)
    assert (spec["rlimits"].get("nproc"), spec.get("nice")) == (nproc, nice)


RLIMITS = {
    "unlimited limits only forbid core dumps": (ROOT, NO_LIMITS, {"core": 0}),
    "mem_limit with a memory cgroup still sets RLIMIT_DATA at mem_limit plus headroom": (
        ROOT, Limits(mem_limit=512 * M), {"core": 0, "data": 512 * M + DATA_RLIMIT_HEADROOM}
    ),
    "mem_limit without a memory cgroup sets RLIMIT_DATA at mem_limit plus headroom": (
        BARE, Limits(mem_limit=G), {"core": 0, "data": G + DATA_RLIMIT_HEADROOM}
    ),
    "nofile_limit sets RLIMIT_NOFILE": (
        ROOT, Limits(nofile_limit=256), {"core": 0, "nofile": 256}
    ),
    "disk_limit sets RLIMIT_FSIZE": (
        ROOT, Limits(disk_limit=200 * M), {"core": 0, "fsize": 200 * M}
    ),
    "cpu and files limits set no rlimit": (ROOT, Limits(cpu_limit=1, files_limit=100), {"core": 0}),
    "every limit on a full host": (
        ROOT, ALL_LIMITS,
        {"core": 0, "data": 512 * M + DATA_RLIMIT_HEADROOM, "nofile": 256, "fsize": 200 * M},
    ),
    "every limit on a bare host adds nproc": (
        BARE, ALL_LIMITS,
        {"core": 0, "data": 512 * M + DATA_RLIMIT_HEADROOM, "nofile": 256, "fsize": 200 * M,
         "nproc": 64},
    ),
}


@pytest.mark.parametrize(("host", "limits", "rlimits"), RLIMITS.values(), ids=RLIMITS.keys())
def test_rlimits(host, limits, rlimits):
    assert planned_spec(host, limits)["rlimits"] == rlimits


def tmpfs(size: int, inodes: int | None = None) -> dict[str, str]:
    extra = f",nr_inodes={inodes}" if inodes else ""
    return {d: f"size={size},mode=1777{extra}" for d in host_scratch_dirs()}


ISOLATED = {
    "isolated without limits gets 1 GiB scratch tmpfs": (NO_LIMITS, tmpfs(G)),
    "isolated scratch tmpfs is capped at disk_limit": (Limits(disk_limit=200 * M), tmpfs(200 * M)),
    "isolated scratch tmpfs is capped at mem_limit": (Limits(mem_limit=256 * M), tmpfs(256 * M)),
    "isolated scratch tmpfs takes the lower of disk and mem": (
        Limits(disk_limit=2 * G, mem_limit=512 * M), tmpfs(512 * M)
    ),
    "isolated scratch tmpfs caps inodes at files_limit": (
        Limits(files_limit=1000), tmpfs(G, 1000)
    ),
    "isolated with every limit": (ALL_LIMITS, tmpfs(200 * M, 1000)),
}


@pytest.mark.parametrize(("limits", "expect_tmpfs"), ISOLATED.values(), ids=ISOLATED.keys())
def test_isolated_spec(limits, expect_tmpfs):
    spec = planned_spec(ROOT, limits, writable=["/k/x/sock", "/k/x/conn", "/k/x/sock"])
    assert spec["isolate"] is True
    assert spec["tmpfs"] == expect_tmpfs
    assert spec["writable"] == ["/k/x/conn", "/k/x/sock", CWD]
    assert spec["expose"] == {"/tmp/venv": "/tmp"}
    assert spec["status_fd"] == 9


@pytest.mark.parametrize("limits", [NO_LIMITS, ALL_LIMITS], ids=["no limits", "every limit"])
def test_a_spec_that_is_not_isolated_has_no_namespace_keys(limits):
    spec = planned_spec(BARE, limits)
    assert set(spec) & {"isolate", "tmpfs", "writable", "expose"} == set()
    assert spec["status_fd"] == 9  # a failed setup is reported without isolation too


def test_the_writable_list_always_includes_cwd():
    spec = planned_spec(ROOT, NO_LIMITS, writable=[], cwd="/elsewhere")
    assert spec["writable"] == ["/elsewhere"]
    assert spec["cwd"] == "/elsewhere"


UNSHARE = {
    "a network namespace without network unshares the network": (True, False, True),
    "a network namespace with network=True keeps the network": (True, True, False),
    "without a network namespace nothing is unshared": (False, False, False),
    "without a network namespace and network=True nothing is unshared": (False, True, False),
}


@pytest.mark.parametrize(("netns", "network", "unshare"), UNSHARE.values(), ids=UNSHARE.keys())
def test_unshare_net(netns, network, unshare):
    limits = Limits(network=network)
    spec = planned_spec(Host(netns=netns), limits)
    assert spec["unshare_net"] is unshare
    assert Host(netns=netns).plan(limits).uses("network", NAMESPACE) is unshare


IDENTITY = {
    "an own uid without a gid uses the uid as gid": (70001, None, {"uid": 70001, "gid": 70001}),
    "an own uid with a gid uses both": (70001, 80002, {"uid": 70001, "gid": 80002}),
    "no own uid sets neither": (None, None, {}),
    "no own uid ignores a gid": (None, 80002, {}),
}


@pytest.mark.parametrize(("uid", "gid", "expect"), IDENTITY.values(), ids=IDENTITY.keys())
def test_uid_and_gid(uid, gid, expect):
    spec = planned_spec(ROOT, NO_LIMITS, uid=uid, gid=gid)
    assert {k: spec[k] for k in ("uid", "gid") if k in spec} == expect


def test_cgroup_procs_and_cwd_pass_through():
    spec = planned_spec(ROOT, NO_LIMITS, cgroup_procs=["/a/cgroup.procs", "/b/cgroup.procs"])
    assert spec["cgroup_procs"] == ["/a/cgroup.procs", "/b/cgroup.procs"]
    assert spec["cwd"] == CWD
