"""The status endpoint's JSON (server/handlers.kernel_status), built from plain values."""

from __future__ import annotations

from limited_provisioner.limits import Limits
from limited_provisioner.server.handlers import kernel_status

LIMITS = Limits.from_config(mem_limit="512M", cpu_limit=0.5, pids_limit=64,
                            disk_limit="1G", idle_timeout="10m", exec_timeout="30s")
USAGE = {"mem_used": 120 * 2**20, "cpu_cores": 0.25, "pids": [10, 11, 12],
         "disk_used": 2 * 2**20, "files_used": 7}


def status(**kw):
    args = {"backend": "process", "limits": LIMITS, "usage": USAGE, "idle_for": 60.0,
            "executing_for": 0.0, "created": 1000.0, "now": 1600.0}
    return kernel_status("k1", **{**args, **kw})


def test_limits_and_usage_are_reported_in_bytes_cores_and_counts():
    s = status()
    assert s["limited"] and s["alive"] and s["backend"] == "process"
    assert s["limits"]["mem_limit"] == 512 * 2**20 and s["limits"]["pids_limit"] == 64
    assert s["limits"]["disk_limit"] == 2**30 and s["limits"]["nofile_limit"] is None
    assert s["usage"] == {"memory": 120 * 2**20, "cpu_cores": 0.25, "cpu_percent": 25.0,
                          "cpu_percent_of_limit": 50.0, "pids": 3, "disk": 2 * 2**20,
                          "files": 7}
    assert s["age"] == 600.0


def test_idle_cull_counts_down_and_stands_still_while_a_cell_runs():
    assert status()["timers"]["idle_cull_in"] == 540.0
    assert status(idle_for=900.0)["timers"]["idle_cull_in"] == 0.0  # due, never negative
    busy = status(executing_for=12.0)["timers"]
    assert busy["idle_cull_in"] is None
    assert busy["executing_for"] == 12.0 and busy["exec_timeout_in"] == 18.0
    assert busy["exec_timeout"] == 30.0 and busy["idle_timeout"] == 600.0


def test_timers_that_are_not_set_are_null():
    s = status(limits=Limits.from_config(mem_limit="256M"), idle_for=5.0)
    assert set(s["timers"].values()) == {None}
    assert status(max_lifetime=3600.0)["timers"]["lifetime_left"] == 3000.0


def test_a_kernel_without_a_live_process_has_no_usage():
    s = status(usage=None, idle_for=None, executing_for=None)
    assert s["alive"] is False and s["usage"] is None
    assert s["timers"]["idle_cull_in"] is None


def test_exit_reason_of_the_dead_process_else_of_the_previous_one():
    reason = "memory limit 256M exceeded (OOM killed)"
    dead = status(exit_reason={"kind": "mem_limit", "reason": reason})
    assert dead["last_exit_reason"] == reason and dead["last_exit"]["restarted"] is None
    restarted = status(last_exit={"kind": "mem_limit", "reason": reason, "restarted": 1500.0})
    assert restarted["last_exit_reason"] == reason
    assert restarted["last_exit"]["restarted"] == 1500.0
    assert status()["last_exit"] is None and status()["last_exit_reason"] is None


def test_limits_the_host_could_not_enforce_are_listed():
    s = status(enforcement={"mem_limit": ("cgroup", "cgroup v1 memory"),
                            "uid": ("none", "server user: not root")})
    assert s["enforcement"] == {"mem_limit": "cgroup v1 memory",
                                "uid": "server user: not root"}
    assert s["not_enforced"] == ["uid"]
