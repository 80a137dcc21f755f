"""How clients reach one kernel: the proxy in front of it, the files the kernel reads to
find the proxy, and the check of the kernel's sockets before anyone talks to them.

Clients (jupyter_server, ``km.client()``, nbclient, an agent backend) connect to the
proxy's sockets in ``<state_dir>/clients/<id>/``, a dir only the server can touch; the
kernel binds its own in its socket dir, which the server takes back and checks before
the proxy connects (see :meth:`KernelConnection.open_door`).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from .client_address import ClientAddress
from .errors import SandboxUnavailableError
from .kernel_dir import KernelDir
from .kernel_hook import hook_source
from .pip_hook import hook_source as pip_hook_source
from .proxy import KERNEL_SOCKETS, KernelEndpoint, KernelProxy
from .traffic import Traffic

# Longest path a unix socket can bind to (sun_path is 108 bytes with the NUL).
MAX_IPC_PATH = 107
# What follows an ipc prefix: "-<port>", ports 1-5 (proxy.PORTS).
IPC_SUFFIX = len("-1")
PORT_NAMES = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")


def door_refusal(kernel_id: str, problems: list[str], bind_wait: float) -> str:
    """Why a kernel whose sockets failed the check was stopped, and what to do."""
    return (
        f"kernel {kernel_id} was stopped: its sockets failed the server's check after "
        f"{bind_wait:g}s ({'; '.join(problems)}). A kernel that is slow to start needs a "
        f"larger ipc_bind_wait; anything else means code in the kernel tampered with its "
        f"socket dir"
    )


class KernelConnection:
    """The proxy of one kernel, kept across its restarts (clients keep their addresses)."""

    def __init__(
        self,
        *,
        kernel_id: str,
        kdir: KernelDir,
        client_dir: Path,
        session: Any,
        output_limit: int | None,
        max_message_size: int,
        last_activity: float | None = None,
        curve_secretkey: bytes | None = None,
        client_address: ClientAddress | None = None,
        kernel: KernelEndpoint | None = None,
    ):
        """``kernel``: where the kernel's sockets are; default ipc in its socket dir."""
        self.kdir = kdir
        kernel_prefix = str(kdir.sock / "k")
        configured = client_address.prefix if client_address is not None else None
        if configured and len(os.path.abspath(configured)) + IPC_SUFFIX > MAX_IPC_PATH:
            msg = (
                f"the kernel manager's ipc prefix {configured!r} is too long for ipc "
                f"sockets; set KernelManager.ip to a shorter path, or leave it unset"
            )
            raise SandboxUnavailableError(msg)
        self.kernel = kernel or KernelEndpoint.ipc(kernel_prefix)
        for prefix in (str(client_dir / "c"), self.kernel.prefix):
            if not prefix:
                continue
            if len(prefix) + IPC_SUFFIX > MAX_IPC_PATH:
                msg = (
                    f"state_dir {str(client_dir.parent.parent)!r} is too long for ipc "
                    f"sockets ({prefix!r}); set LimitedHost.state_dir (or the kernelspec's "
                    f"state_dir) to a shorter path"
                )
                raise SandboxUnavailableError(msg)
        self.client_dir = client_dir
        self.traffic = Traffic(last_activity)
        self.proxy = KernelProxy(
            kernel_id=kernel_id,
            client_dir=client_dir,
            kernel=self.kernel,
            key=session.key,
            signature_scheme=session.signature_scheme,
            traffic=self.traffic,
            output_limit=output_limit,
            max_message_size=max_message_size,
            curve_secretkey=curve_secretkey,
            client_address=client_address,
        )
        self.proxy.bind_clients()

    @property
    def client_connection_file(self) -> str:
        return str(self.client_dir / "connection.json")

    @property
    def kernel_connection_file(self) -> str:
        return str(self.kdir.conn / "connection.json")

    def point_clients(self, km: Any) -> None:
        """Point the KernelManager (hence every client it makes) at the proxy."""
        info = self.proxy.client_connection_info()
        km.connection_file = self.client_connection_file
        km.transport = info["transport"]
        km.ip = info["ip"]
        km.cache_ports = False
        for name in PORT_NAMES:
            setattr(km, name, info[name])

    def write_kernel_files(
        self, cmd: list[str], kernel_name: str, wheelhouse: bool = False
    ) -> list[str]:
        """(Re)write what the kernel reads at every start — its own connection file (the
        kernel side of the proxy) and, for IPython kernels, the hook (and with a
        ``wheelhouse``, pip's hook); returns ``cmd`` pointed at them."""
        info = self.proxy.kernel_connection_info()
        info["kernel_name"] = kernel_name
        self.kdir.write("connection.json", json.dumps(info, indent=1), mode=0o600, where="conn")
        cmd = [part.replace(self.client_connection_file, self.kernel_connection_file)
               for part in cmd]
        if any("ipykernel" in part for part in cmd):
            hook = self.kdir.write("hooks.py", hook_source(), mode=0o644)
            cmd.append(f"--IPKernelApp.exec_files={hook}")
            if wheelhouse:
                pip_hook = self.kdir.write("pip_hook.py", pip_hook_source(), mode=0o644)
                cmd.append(f"--IPKernelApp.exec_files={pip_hook}")
        return cmd

    async def open_door(
        self, poll: Callable[[], Awaitable[int | None]], bind_wait: float
    ) -> list[str]:
        """Wait for the kernel to bind its sockets, take its socket dir back, check every
        socket (type, owner), and only then let the proxy connect to them.

        Returns the problems found (none: connected). A kernel that dies meanwhile
        stops the wait early; the caller asks ``poll()`` what happened.
        """
        if self.kernel.transport == "tcp":
            # Nothing on this host to check: its sockets serve CurveZMQ (proxy.py), and
            # whether it answers is the client's kernel_info to find out.
            self.proxy.connect_kernel()
            return []
        deadline = time.monotonic() + bind_wait
        rounds = 0
        while not self.kdir.sockets_present(KERNEL_SOCKETS):
            rounds += 1
            # poll() may be a Docker API call: check for a dead kernel only every 0.25 s.
            if rounds % 25 == 0 and await poll() is not None:
                break
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.01)
        problems = await asyncio.to_thread(self.kdir.freeze_sockets, KERNEL_SOCKETS)
        if not problems:
            self.proxy.connect_kernel()
        return problems

    async def between_processes(self) -> None:
        """A restart's cleanup: forget the dead process's sockets, keep the clients'.

        jupyter_client has just removed the client-side socket names (it thinks they are
        the kernel's): restore them, so reconnecting clients find the proxy again.
        """
        await self.proxy.disconnect_kernel()
        await asyncio.to_thread(self.proxy.relink)

    async def close(self) -> None:
        await self.proxy.stop()


def client_curve_secretkey(km: Any) -> bytes | None:
    """The CurveZMQ secret key the proxy's client sockets serve with, or None.

    As jupyter_client's LocalProvisioner decides for the kernel's own sockets: the
    manager's ``transport_encryption`` policy ("required", or "auto" with a kernelspec
    that declares ``supported_encryption: ["curve"]``); the keypair goes on the manager,
    hence into every client's connection info. A manager that already holds one (an
    adopted kernel's connection file, a restart) keeps it, whatever its policy.
    """
    if getattr(km, "curve_secretkey", None) is not None:
        return km.curve_secretkey
    # jupyter_client before transport encryption: no policy, nothing to serve.
    policy_of = getattr(km, "_transport_encryption_policy", None)
    policy = policy_of() if policy_of is not None else "disabled"
    wanted = policy == "required" or (
        policy == "auto" and km._kernel_supports_curve_encryption()
    )
    if not wanted:
        return None
    import zmq

    km.curve_publickey, km.curve_secretkey = zmq.curve_keypair()
    return km.curve_secretkey
