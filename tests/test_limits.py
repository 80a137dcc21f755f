"""Limit parsing and validation: every bad value is refused with a message that names
the setting and the accepted form, through every path a value can arrive by."""

import pytest
from jupyter_client.kernelspec import KernelSpec
from jupyter_client.manager import KernelManager
from jupyter_client.provisioning import KernelProvisionerFactory
from traitlets.config import Config

from limited_provisioner import LimitConfigError, LimitedProcessProvisioner, Limits
from limited_provisioner.limits import format_size, parse_duration, parse_size


@pytest.mark.parametrize(
    "value, expected",
    [(1048576, 2**20), ("512M", 512 * 2**20), ("2G", 2 * 2**30), ("1.5GiB", int(1.5 * 2**30)),
     ("300 mb", 300 * 2**20), ("4096k", 4 * 2**20)],
)
def test_sizes(value, expected):
    assert parse_size("mem_limit", value) == expected


def test_durations():
    assert parse_duration("exec_timeout", "90s") == 90
    assert parse_duration("exec_timeout", "30m") == 1800
    assert parse_duration("idle_timeout", "1h") == 3600
    assert parse_duration("idle_timeout", 0) == 0


def test_format_size():
    assert format_size(512 * 2**20) == "512M"
    assert format_size(int(1.5 * 2**30)) == "1.5G"


@pytest.mark.parametrize(
    "config, field, fragment",
    [
        ({"mem_limit": "12 parsecs"}, "mem_limit", '"512M"'),
        ({"mem_limit": -5}, "mem_limit", "must be positive"),
        ({"mem_limit": "10M"}, "mem_limit", "a kernel needs to start"),
        ({"cpu_limit": 0}, "cpu_limit", "greater than 0"),
        ({"cpu_limit": "lots"}, "cpu_limit", "number of cores"),
        ({"pids_limit": 2}, "pids_limit", ">= 8"),
        ({"nofile_limit": "many"}, "nofile_limit", "integer"),
        ({"disk_limit": "1 parsec"}, "disk_limit", "not a size"),
        ({"network": "maybe"}, "network", "true"),
        ({"exec_timeout": -1}, "exec_timeout", ">= 0"),
        ({"idle_timeout": "soon"}, "idle_timeout", '"30m"'),
    ],
)
def test_bad_values_are_refused(config, field, fragment):
    with pytest.raises(LimitConfigError) as info:
        Limits.from_config(**config)
    assert field in str(info.value) and fragment in str(info.value)
    # The same value set as a trait is refused with the same message.
    with pytest.raises(LimitConfigError) as info:
        LimitedProcessProvisioner(kernel_id="k", **config)
    assert field in str(info.value) and fragment in str(info.value)


def _spec(config):
    return KernelSpec(
        argv=["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        display_name="t",
        language="python",
        metadata={
            "kernel_provisioner": {
                "provisioner_name": "limited-process-provisioner",
                "config": config,
            }
        },
    )


def test_kernelspec_config_reaches_the_provisioner():
    """kernel.json ``config`` keys arrive as trait values via the factory."""
    km = KernelManager()
    prov = KernelProvisionerFactory.instance().create_provisioner_instance(
        "kid", _spec({"mem_limit": "300M", "cpu_limit": 0.5, "network": True}), parent=km
    )
    assert isinstance(prov, LimitedProcessProvisioner)
    assert prov.limits.mem_limit == 300 * 2**20
    assert prov.limits.cpu_limit == 0.5
    assert prov.limits.network is True


def test_jupyter_config_reaches_the_provisioner_and_kernelspec_wins():
    """``c.LimitedProcessProvisioner.*`` arrives through the parent KernelManager;
    a kernelspec value overrides it."""
    c = Config()
    c.LimitedProcessProvisioner.mem_limit = "700M"
    c.LimitedProvisionerMixin.pids_limit = 99
    c.LimitedProcessProvisioner.cpu_limit = "1.5"
    km = KernelManager(config=c)
    prov = KernelProvisionerFactory.instance().create_provisioner_instance(
        "kid", _spec({"cpu_limit": 2}), parent=km
    )
    assert prov.limits.mem_limit == 700 * 2**20
    assert prov.limits.pids_limit == 99
    assert prov.limits.cpu_limit == 2.0


def test_bad_kernelspec_value_fails_before_anything_starts():
    km = KernelManager()
    with pytest.raises(LimitConfigError, match="mem_limit='lots'"):
        KernelProvisionerFactory.instance().create_provisioner_instance(
            "kid", _spec({"mem_limit": "lots"}), parent=km
        )
