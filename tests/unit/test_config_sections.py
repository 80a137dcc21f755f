"""Where settings are read from: c.LimitedProvisioner.* for both backends, a backend's
own section, the pre-0.2 c.LimitedProvisionerMixin.* (deprecated, still honoured), and
c.LimitedHost.* for what is one per host."""

from __future__ import annotations

import logging

import pytest
from traitlets.config import Config

from limited_provisioner import LimitedHost, LimitedProcessProvisioner
from limited_provisioner.docker import LimitedDockerProvisioner
from limited_provisioner.limits import parse_size

M = parse_size("m", "1M")


@pytest.fixture(autouse=True)
def no_host_yet(monkeypatch):
    for name in ("LIMITED_PROVISIONER_STATE_DIR", "LIMITED_PROVISIONER_SERVER_ID"):
        monkeypatch.delenv(name, raising=False)
    LimitedHost.clear_instance()
    yield
    LimitedHost.clear_instance()


def config(**sections: dict) -> Config:
    c = Config()
    for section, values in sections.items():
        for name, value in values.items():
            setattr(getattr(c, section), name, value)
    return c


@pytest.mark.parametrize(
    ("sections", "expected_mb"),
    [
        pytest.param({"LimitedProvisioner": {"mem_limit": "300M"}}, 300, id="shared section"),
        pytest.param({"LimitedProvisionerMixin": {"mem_limit": "301M"}}, 301,
                     id="pre-0.2 section still honoured"),
        pytest.param({"LimitedProvisionerMixin": {"mem_limit": "301M"},
                      "LimitedProvisioner": {"mem_limit": "302M"}}, 302,
                     id="new section wins over the old one"),
        pytest.param({"LimitedProvisioner": {"mem_limit": "302M"},
                      "LimitedProcessProvisioner": {"mem_limit": "303M"},
                      "LimitedDockerProvisioner": {"mem_limit": "304M"}}, 303,
                     id="a backend's own section wins for that backend"),
    ],
)
def test_process_provisioner_reads_mem_limit_from(sections, expected_mb):
    prov = LimitedProcessProvisioner(config=config(**sections), kernel_id="k", kernel_spec=None)
    assert prov.limits.mem_limit == expected_mb * M


def test_backend_section_does_not_leak_to_the_other_backend():
    c = config(LimitedProvisioner={"pids_limit": 100}, LimitedProcessProvisioner={"pids_limit": 50})
    docker = LimitedDockerProvisioner(config=c, kernel_id="k", kernel_spec=None)
    assert docker.limits.pids_limit == 100


def test_old_section_logs_a_deprecation(caplog):
    from limited_provisioner.provisioner import LimitedProvisioner

    LimitedProvisioner._legacy_warned = False
    with caplog.at_level(logging.WARNING):
        LimitedProcessProvisioner(
            config=config(LimitedProvisionerMixin={"cpu_limit": 0.5}), kernel_id="k",
            kernel_spec=None, log=logging.getLogger("test"),
        )
    assert "c.LimitedProvisionerMixin.* is deprecated" in caplog.text


@pytest.mark.parametrize(
    ("sections", "state_dir"),
    [
        pytest.param({"LimitedHost": {"state_dir": "/var/lib/a"}}, "/var/lib/a", id="host section"),
        pytest.param({"LimitedProvisionerMixin": {"state_dir": "/var/lib/b"}}, "/var/lib/b",
                     id="pre-0.2 provisioner section"),
        pytest.param({"LimitedProcessProvisioner": {"state_dir": "/var/lib/c"}}, "/var/lib/c",
                     id="a backend's section"),
        pytest.param({"LimitedProvisionerMixin": {"state_dir": "/var/lib/b"},
                      "LimitedHost": {"state_dir": "/var/lib/a"}}, "/var/lib/a",
                     id="host section wins"),
    ],
)
def test_host_and_kernels_agree_on_the_state_dir(sections, state_dir, caplog):
    c = config(**sections)
    host = LimitedHost.instance(config=c)
    prov = LimitedProcessProvisioner(config=c, kernel_id="k", kernel_spec=None)
    assert (host.resolved_state_dir, prov.state_dir, str(prov.registry.state_dir)) == (
        state_dir,) * 3
    if "LimitedHost" not in sections:
        assert "belong in c.LimitedHost.state_dir" in caplog.text


def test_kernelspec_may_point_one_kernel_elsewhere():
    host = LimitedHost.instance(config=config(LimitedHost={"state_dir": "/var/lib/a",
                                                           "server_id": "srv"}))
    prov = LimitedProcessProvisioner(kernel_id="k", kernel_spec=None, state_dir="/var/lib/agent")
    assert (host.state_dir, prov.state_dir, prov.server_id) == ("/var/lib/a", "/var/lib/agent",
                                                                "srv")


def test_server_id_defaults_to_the_environment(monkeypatch):
    monkeypatch.setenv("LIMITED_PROVISIONER_SERVER_ID", "from-env")
    assert LimitedHost.instance().resolved_server_id == "from-env"
    assert LimitedProcessProvisioner(kernel_id="k", kernel_spec=None).server_id == "from-env"


def test_legacy_host_setting_from_the_command_line():
    """``--LimitedProvisionerMixin.reap_interval=1`` arrives as an unparsed string."""
    from traitlets.config.loader import KVArgParseConfigLoader

    c = KVArgParseConfigLoader(["--LimitedProvisionerMixin.reap_interval=1"]).load_config()
    assert LimitedHost.instance(config=c).reap_interval == 1.0


def test_kernels_follow_the_environment_of_the_moment(monkeypatch):
    """One host per process, but an unset state_dir/server_id is resolved at each kernel:
    a script that points $LIMITED_PROVISIONER_STATE_DIR elsewhere between two kernels
    (as bench/churn.py does per backend) must not send the second to the first's dir."""
    host = LimitedHost.instance()
    monkeypatch.setenv("LIMITED_PROVISIONER_STATE_DIR", "/var/lib/first")
    first = LimitedProcessProvisioner(kernel_id="a", kernel_spec=None)
    monkeypatch.setenv("LIMITED_PROVISIONER_STATE_DIR", "/var/lib/second")
    second = LimitedProcessProvisioner(kernel_id="b", kernel_spec=None)
    assert (first.state_dir, second.state_dir) == ("/var/lib/first", "/var/lib/second")
    assert LimitedHost.instance() is host and host.resolved_state_dir == "/var/lib/second"
