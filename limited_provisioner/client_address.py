"""Where clients reach a kernel's proxy.

By default the proxy's client-facing sockets are ipc sockets in
``<state_dir>/clients/<id>/``, a dir only the server's user can enter -- stricter than
jupyter_client's loopback TCP, which any local user can connect to. A manager that was
*told* how its clients connect (``c.KernelManager.transport = "tcp"``, an ipc ``ip``
prefix, fixed ports, in config, in its constructor or in a connection file it loaded)
gets exactly that, as from jupyter_client's ``LocalProvisioner``: ``network`` is about
what the kernel reaches, and the kernel's own sockets stay ipc in its sandbox either way.
Only a manager's unset defaults are replaced by the private dir.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import SandboxUnavailableError

# Fixed ports (ipc "ports" are file name suffixes): the same on both sides, every start.
PORTS = {"shell": 1, "iopub": 2, "stdin": 3, "control": 4, "hb": 5}


@dataclass(frozen=True)
class ClientAddress:
    """``transport`` "ipc" with ``prefix`` None is the private dir; "ipc" with a prefix
    binds ``<prefix>-<port>``; "tcp" binds ``ip`` (ports 0: any free one)."""

    transport: str = "ipc"
    prefix: str | None = None
    ip: str = ""
    ports: Mapping[str, int] = field(default_factory=dict)

    @property
    def private(self) -> bool:
        return self.transport == "ipc" and self.prefix is None

    def describe(self) -> str:
        if self.private:
            return "ipc in the server's private clients dir"
        if self.transport == "tcp":
            return f"tcp on {self.ip}"
        return f"ipc at {self.prefix}-<port>"


def _told(km: Any, name: str) -> bool:
    """Whether trait ``name`` of ``km`` was set in config, or set to something other
    than its default (a default that was merely read counts for nothing)."""
    for cls in type(km).mro():
        section = cls.__name__
        if km.config._has_section(section) and name in km.config[section]:
            return True
    return km.trait_has_value(name) and getattr(km, name) != km.trait_defaults(name)


def requested_address(km: Any, private_prefix: str) -> ClientAddress:
    """What ``km`` was told about its clients' transport; its defaults count for nothing
    (so ``KernelManager(transport="tcp")``, the default's value, keeps the private dir;
    in config it counts).

    A tcp address must be local (LocalProvisioner refuses others too): the proxy runs on
    this host. Raises SandboxUnavailableError for one that is not.
    """
    if km is None or not _told(km, "transport"):
        return ClientAddress()
    ports = {channel: int(getattr(km, f"{channel}_port", 0) or 0) for channel in PORTS}
    if km.transport == "tcp":
        from jupyter_client.localinterfaces import is_local_ip, local_ips

        if not is_local_ip(km.ip):
            msg = (
                f"the kernel manager's clients are to connect over tcp to {km.ip!r}, which "
                f"is not an address of this host (local ones: {', '.join(local_ips())}); "
                f"set KernelManager.ip to one of them, or leave transport unset"
            )
            raise SandboxUnavailableError(msg)
        return ClientAddress("tcp", ip=km.ip, ports=ports)
    if not _told(km, "ip") or km.ip == private_prefix:
        return ClientAddress()
    return ClientAddress(
        "ipc", prefix=km.ip,
        ports={channel: ports[channel] or port for channel, port in PORTS.items()},
    )
