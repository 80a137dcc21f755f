"""What a limited kernel keeps of a stock one's interface, rule by rule: the caller's
environment, the errno of a command that cannot run, the clients' transport."""

from __future__ import annotations

import errno

import pytest
from jupyter_client.manager import AsyncKernelManager
from traitlets.config import Config

from limited_provisioner.client_address import ClientAddress, requested_address
from limited_provisioner.docker.container import command_errno
from limited_provisioner.errors import (
    KernelCommandError,
    SandboxStartError,
    SandboxUnavailableError,
    kernel_command_error,
)
from limited_provisioner.kernel_env import filter_env, supplied_names
from limited_provisioner.process.launch_status import exec_errno

SERVER = {"PATH": "/usr/bin", "HOME": "/root", "JUPYTER_TOKEN": "t0k", "LANG": "C.UTF-8"}


def test_supplied_names_are_the_callers_own_values():
    start = {**SERVER, "PATH": "/caller/bin", "IPYKERNEL_CELL_NAME": "<c1>", "X_TOKEN": "s"}
    assert supplied_names(start, SERVER) == {"PATH", "IPYKERNEL_CELL_NAME", "X_TOKEN"}
    # A plain copy of the server's environment supplies nothing; so does no env at all.
    assert supplied_names(dict(SERVER), SERVER) == set()
    assert supplied_names(None, SERVER) == set()
    assert supplied_names(SERVER, SERVER) == set()


def test_filter_env_keeps_supplied_names_but_never_a_secret_the_operator_did_not_name():
    env = {**SERVER, "IPYKERNEL_CELL_NAME": "<c1>", "MY_API_KEY": "s", "OTHER": "o"}
    kept, named, refused = filter_env(
        env, ["PATH", "LANG"], explicit=set(), supplied={"IPYKERNEL_CELL_NAME", "MY_API_KEY"}
    )
    assert kept == {"PATH": "/usr/bin", "LANG": "C.UTF-8", "IPYKERNEL_CELL_NAME": "<c1>"}
    assert (named, refused) == ([], ["MY_API_KEY"])
    # Named exactly by env_keep, a secret passes (and is reported as named).
    kept, named, refused = filter_env(env, ["MY_API_KEY"], set(), {"MY_API_KEY"})
    assert kept == {"MY_API_KEY": "s"} and named == ["MY_API_KEY"] and refused == []


@pytest.mark.parametrize("status, expected", [
    ("exec-failed 2 exec '/x' failed: [Errno 2] No such file or directory: '/x'",
     (2, "exec '/x' failed: [Errno 2] No such file or directory: '/x'")),
    ("exec-failed 13 exec '/x' failed: denied", (13, "exec '/x' failed: denied")),
    ("cannot join cgroup /sys/fs/cgroup/x: busy", (None, "cannot join cgroup /sys/fs/cgroup/x: busy")),
    ("exec-failed soon", (None, "exec-failed soon")),
])
def test_exec_errno_of_a_launch_status(status, expected):
    assert exec_errno(status) == expected


@pytest.mark.parametrize("message, expected", [
    ('OCI runtime create failed: container_linux.go:380: starting container process caused: '
     'exec: "nope": executable file not found in $PATH: unknown', errno.ENOENT),
    ('starting container process caused: exec: "/x/y": stat /x/y: no such file or directory',
     errno.ENOENT),
    ('starting container process caused: exec: "/etc/passwd": permission denied', errno.EACCES),
    ("error mounting /srv into rootfs: no such file or directory", None),
])
def test_command_errno_of_a_container_runtime_error(message, expected):
    assert command_errno(message) == expected


@pytest.mark.parametrize("code, types", [
    (errno.ENOENT, (FileNotFoundError,)),
    (errno.EACCES, (PermissionError,)),
    (errno.ENOEXEC, (OSError,)),
])
def test_kernel_command_errors_are_what_popen_raises_and_ours_too(code, types):
    e = kernel_command_error("Kernel k: cannot run", reason="exec failed", errno=code)
    assert isinstance(e, (*types, KernelCommandError, SandboxStartError, OSError))
    for t in types:
        assert isinstance(e, t)
    assert e.errno == code and e.reason == "exec failed"
    assert str(e) == f"[Errno {code}] Kernel k: cannot run"


def km_with(config: dict | None = None, **kwargs) -> AsyncKernelManager:
    c = Config()
    for name, value in (config or {}).items():
        setattr(c.KernelManager, name, value)
    return AsyncKernelManager(config=c, **kwargs)


PRIVATE = "/var/lib/limited-provisioner/clients/k/c"


def test_unset_transport_is_the_private_dir_even_after_its_default_was_read():
    km = km_with()
    assert requested_address(km, PRIVATE) == ClientAddress()
    assert (km.transport, km.ip) == ("tcp", "127.0.0.1")  # defaults, now materialized
    assert requested_address(km, PRIVATE) == ClientAddress()
    assert requested_address(None, PRIVATE).private


def test_configured_tcp_is_served_on_that_local_ip_with_its_ports():
    km = km_with({"transport": "tcp", "shell_port": 50123})
    address = requested_address(km, PRIVATE)
    assert (address.transport, address.ip) == ("tcp", "127.0.0.1")
    assert address.ports["shell"] == 50123 and address.ports["iopub"] == 0


def test_tcp_on_a_foreign_ip_is_refused_with_the_fix():
    km = km_with({"transport": "tcp"}, ip="192.0.2.7")
    with pytest.raises(SandboxUnavailableError, match="not an address of this host"):
        requested_address(km, PRIVATE)


def test_an_ipc_prefix_is_served_there_and_the_private_one_stays_private():
    address = requested_address(km_with({"transport": "ipc", "ip": "test"}), PRIVATE)
    assert (address.transport, address.prefix) == ("ipc", "test")
    assert address.ports == {"shell": 1, "iopub": 2, "stdin": 3, "control": 4, "hb": 5}
    # An adopted kernel's connection file names the private dir: still private.
    assert requested_address(km_with(transport="ipc", ip=PRIVATE), PRIVATE).private
    # ipc without a prefix of its own: the private dir.
    assert requested_address(km_with(transport="ipc"), PRIVATE).private
