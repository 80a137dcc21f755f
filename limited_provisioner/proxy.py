"""The kernel's only door: a proxy between its sockets and every client.

Clients (jupyter_server, ``KernelManager.client()``, nbclient, an agent backend) connect
to sockets the *server* binds in a directory only its user can enter; the proxy forwards
to the kernel's own sockets, which it connects to only after the kernel dir has checked
them (see ``KernelDir.freeze_sockets``). Standing in the middle lets the server rely on
what the kernel cannot forge:

* **Requests come from clients only.** What clients ask (an execute, a completion, a
  comm message) and when is seen on the way in, by the server's clock: idle culling and
  exec_timeout rest on that (traffic.py), never on what the kernel says about
  itself. A reply the kernel sends early can only end an execution sooner.
* **Every message from the kernel is verified** (HMAC of the session key) before it is
  forwarded, on every channel: a kernel that points a socket at another kernel's, or
  publishes unsigned frames, reaches no client.
* **Output is capped on the receiving side**: bytes per execution (``output_limit``, a
  notice once, the rest dropped) and bytes per message (``max_message_size``), whatever
  the kernel uses to send it (print, display_data, raw IOPub sends, input requests); on
  shell and control only the one reply to each request a client sent is forwarded.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from .client_address import PORTS, ClientAddress
from .traffic import OUTPUT_NOTICE, OVERSIZE_NOTICE, Awaiting, OutputBudget, Traffic

log = logging.getLogger(__name__)

DELIM = b"<IDS|MSG>"
KERNEL_SOCKETS = [f"k-{port}" for port in PORTS.values()]
# Header and parent header frames are small; bigger ones are not worth parsing.
MAX_HEADER_BYTES = 64 * 1024
# A status message only says busy/idle/starting: anything bigger is padding, dropped.
MAX_STATUS_BYTES = 4 * 1024
# Messages the proxy buffers per kernel socket: with the transport's size cap this bounds
# what a flooding kernel can make the server hold (the rest waits in the kernel's memory).
KERNEL_RCVHWM = 8
# The transport drops the connection of a kernel that sends a message this many times
# max_message_size (zmq MAXMSGSIZE); below that, the proxy drops an oversized message
# itself and tells the cell, so the execution still ends normally.
TRANSPORT_CAP_FACTOR = 4

_context: zmq.asyncio.Context | None = None


@dataclass
class KernelEndpoint:
    """Where the proxy reaches the kernel's five sockets.

    ``ipc``: a prefix in the kernel's socket dir on this host (process and docker
    backends), checked by the kernel dir before the proxy connects. ``tcp``: the
    kernel's address on a network others share (the swarm backend's overlay network),
    where a check of the socket's owner is impossible; the kernel's sockets are then
    CurveZMQ servers whose keypair only the kernel and this endpoint hold, so nobody else
    on that network completes a handshake with them, and the session key's HMAC is never
    the only secret on the wire. ``host`` is known once the kernel's task runs.
    """

    prefix: str = ""
    host: str = ""
    ports: dict[str, int] = field(default_factory=lambda: dict(PORTS))
    curve_publickey: bytes | None = None
    curve_secretkey: bytes | None = None

    @classmethod
    def ipc(cls, prefix: str) -> KernelEndpoint:
        return cls(prefix=prefix)

    @classmethod
    def tcp(cls, ports: dict[str, int]) -> KernelEndpoint:
        public, secret = zmq.curve_keypair()
        return cls(ports=dict(ports), curve_publickey=public, curve_secretkey=secret)

    @property
    def transport(self) -> str:
        return "ipc" if self.prefix else "tcp"

    def url(self, channel: str) -> str:
        port = self.ports[channel]
        if self.transport == "ipc":
            return f"ipc://{self.prefix}-{port}"
        if not self.host:
            msg = "the kernel's address is not known yet (its task has not started)"
            raise RuntimeError(msg)
        return f"tcp://{self.host}:{port}"

    def kernel_connection_info(self) -> dict[str, Any]:
        """What the kernel's own connection file says about its sockets."""
        if self.transport == "ipc":
            info: dict[str, Any] = {"transport": "ipc", "ip": self.prefix}
        else:
            assert self.curve_publickey is not None and self.curve_secretkey is not None
            # Every address of its own container: the overlay's is only known there.
            info = {"transport": "tcp", "ip": "0.0.0.0",
                    "curve_publickey": self.curve_publickey.decode("ascii"),
                    "curve_secretkey": self.curve_secretkey.decode("ascii")}
        info.update({f"{channel}_port": port for channel, port in self.ports.items()})
        return info

    def secure(self, sock: zmq.Socket) -> None:
        """Make ``sock`` a CurveZMQ client of the kernel's sockets (tcp); as jupyter_client
        does with a manager-provisioned keypair, the kernel's own keypair is the client's."""
        if self.curve_publickey is None:
            return
        sock.curve_serverkey = self.curve_publickey
        sock.curve_publickey = self.curve_publickey
        sock.curve_secretkey = self.curve_secretkey


def zmq_context() -> zmq.asyncio.Context:
    """Our own asyncio context: ``zmq.asyncio.Context.instance()`` can hand back a
    *sync* context that another library created first, whose sockets cannot be awaited."""
    global _context
    if _context is None or _context.closed:
        _context = zmq.asyncio.Context()
    return _context


def _forget_context_after_fork() -> None:
    # The parent's context has no I/O threads in a forked child (using it hangs) and
    # must not be terminated there either: a child's kernels get a context of its own.
    global _context
    _context = None


os.register_at_fork(after_in_child=_forget_context_after_fork)


def _digest(signature_scheme: str) -> Any:
    name = signature_scheme.split("-", 1)[-1] if signature_scheme else "sha256"
    return getattr(hashlib, name)


class KernelProxy:
    """Forwards one kernel's five channels between its sockets and its clients.

    ``client_dir``: a directory only the server's user can enter, where the client-facing
    sockets are bound (``s-<port>``) and linked under the names clients connect to
    (``c-<port>``: jupyter_client removes those on restart, :meth:`relink` restores
    them). ``kernel``: where the kernel's own sockets are (:class:`KernelEndpoint`).
    """

    def __init__(
        self,
        *,
        kernel_id: str,
        client_dir: Path,
        kernel: KernelEndpoint,
        key: bytes,
        signature_scheme: str,
        traffic: Traffic,
        output_limit: int | None,
        max_message_size: int | None,
        curve_secretkey: bytes | None = None,
        client_address: ClientAddress | None = None,
    ):
        self.kernel_id = kernel_id
        self.client_address = client_address or ClientAddress()
        # The port (tcp) or name suffix (ipc) each client-facing socket was bound with.
        self._client_ports: dict[str, int] = dict(PORTS)
        # With it the client-facing sockets are CurveZMQ servers (transport encryption).
        self.curve_secretkey = curve_secretkey
        self.client_dir = Path(client_dir)
        self.kernel = kernel
        self.key = key
        self.signature_scheme = signature_scheme
        self.traffic = traffic
        self.budget = OutputBudget(output_limit)
        self.max_message_size = max_message_size
        self._auth = hmac.new(key, digestmod=_digest(signature_scheme)) if key else None
        self._clients: dict[str, zmq.asyncio.Socket] = {}
        self._kernel: dict[str, zmq.asyncio.Socket] = {}
        self._pumps: list[asyncio.Task] = []
        self._awaiting = Awaiting()
        self.dropped = 0  # messages from the kernel refused (bad signature, too big)
        self._session: Any = None

    # -- addresses ------------------------------------------------------------------

    @property
    def client_prefix(self) -> str:
        return str(self.client_dir / "c")

    def client_connection_info(self) -> dict[str, Any]:
        """What clients are told: ipc in the server-only dir with fixed ports, or the
        address the manager asked for (client_address.py)."""
        address = self.client_address
        if address.private:
            ip = self.client_prefix
        else:
            ip = address.ip if address.transport == "tcp" else str(address.prefix)
        return {
            "transport": address.transport,
            "ip": ip,
            **{f"{channel}_port": port for channel, port in self._client_ports.items()},
        }

    @property
    def kernel_prefix(self) -> str:
        """The kernel's ipc prefix (``<kernel dir>/sock/k``; "" for a tcp kernel)."""
        return self.kernel.prefix

    def kernel_connection_info(self) -> dict[str, Any]:
        """What the kernel is told (its own connection file)."""
        return {
            **self.kernel.kernel_connection_info(),
            "key": self.key.decode(),
            "signature_scheme": self.signature_scheme,
        }

    # -- client side ------------------------------------------------------------------

    def bind_clients(self) -> None:
        """Bind the client-facing sockets (once per kernel; kept across restarts)."""
        if self._clients:
            return
        os.makedirs(self.client_dir, mode=0o700, exist_ok=True)
        os.chmod(self.client_dir, 0o700)
        ctx = zmq_context()
        for channel, port in PORTS.items():
            sock = ctx.socket(zmq.PUB if channel == "iopub" else zmq.ROUTER)
            sock.linger = 0
            if self.curve_secretkey is not None:
                # As ipykernel binds with the manager's keys: clients hold the public key.
                sock.curve_server = True
                sock.curve_secretkey = self.curve_secretkey
            if channel != "iopub":
                # As ipykernel's own sockets: a client reconnecting with the identity of an
                # earlier connection (a browser tab, a second KernelClient of the same
                # manager) takes it over instead of being silently ignored.
                sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
            self._client_ports[channel] = self._bind_client(sock, channel, port)
            self._clients[channel] = sock
        self.relink()

    def _bind_client(self, sock: zmq.Socket, channel: str, port: int) -> int:
        address = self.client_address
        if address.private:
            bound = self.client_dir / f"s-{port}"
            bound.unlink(missing_ok=True)  # left by a server that died
            sock.bind(f"ipc://{bound}")
            return port
        wanted = address.ports.get(channel, 0)
        if address.transport == "tcp":
            if not wanted:
                return sock.bind_to_random_port(f"tcp://{address.ip}")
            sock.bind(f"tcp://{address.ip}:{wanted}")
            return wanted
        sock.bind(f"ipc://{address.prefix}-{wanted}")
        return wanted

    def relink(self) -> None:
        """(Re)create the names clients connect to, which jupyter_client removes at every
        restart: hard links of the sockets bound in the private dir, or the configured
        ipc sockets bound again."""
        if self.client_address.private:
            for port in PORTS.values():
                link = self.client_dir / f"c-{port}"
                link.unlink(missing_ok=True)
                os.link(self.client_dir / f"s-{port}", link)
        elif self.client_address.transport == "ipc":
            for channel, sock in self._clients.items():
                path = f"{self.client_address.prefix}-{self._client_ports[channel]}"
                if not os.path.exists(path):
                    with contextlib.suppress(zmq.ZMQError):
                        sock.unbind(f"ipc://{path}")
                    sock.bind(f"ipc://{path}")

    # -- kernel side ------------------------------------------------------------------

    def connect_kernel(self) -> None:
        """Connect to the kernel's (verified) sockets and start forwarding."""
        if self._kernel:
            return
        ctx = zmq_context()
        # The kernel answers stdin requests to the identity that sent the execute_request
        # on shell: both sockets must carry the same identity, as jupyter_client's do.
        identity = secrets.token_bytes(8)
        for channel in PORTS:
            sock = ctx.socket(zmq.SUB if channel == "iopub" else zmq.DEALER)
            sock.linger = 0
            sock.rcvhwm = KERNEL_RCVHWM
            if self.max_message_size:
                sock.setsockopt(zmq.MAXMSGSIZE, self.max_message_size * TRANSPORT_CAP_FACTOR)
            if channel in ("shell", "stdin"):
                sock.setsockopt(zmq.IDENTITY, identity)
            if channel == "iopub":
                sock.setsockopt(zmq.SUBSCRIBE, b"")
            self.kernel.secure(sock)
            sock.connect(self.kernel.url(channel))
            self._kernel[channel] = sock
        for channel in ("shell", "control", "stdin"):
            self._spawn(self._up(channel), channel)
            self._spawn(self._down(channel), channel)
        self._spawn(self._hb(upward=True), "hb")
        self._spawn(self._hb(upward=False), "hb")
        self._spawn(self._iopub(), "iopub")

    def _spawn(self, coro: Any, channel: str) -> None:
        task = asyncio.ensure_future(coro)
        task.add_done_callback(lambda t: self._pump_done(t, channel))
        self._pumps.append(task)

    def _pump_done(self, task: asyncio.Task, channel: str) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("kernel %s: %s proxy stopped: %r", self.kernel_id, channel, task.exception())

    async def disconnect_kernel(self) -> None:
        """The kernel process is gone (or about to be): stop forwarding to it.

        Client-facing sockets stay bound, so clients keep their connections across a
        restart; what they send meanwhile waits until :meth:`connect_kernel`.
        """
        pumps, self._pumps = self._pumps, []
        for task in pumps:
            task.cancel()
        for task in pumps:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for sock in self._kernel.values():
            sock.close(linger=0)
        self._kernel.clear()
        self.traffic.reset()

    async def stop(self) -> None:
        await self.disconnect_kernel()
        for sock in self._clients.values():
            sock.close(linger=0)
        self._clients.clear()
        for port in PORTS.values():
            for name in (f"s-{port}", f"c-{port}"):
                (self.client_dir / name).unlink(missing_ok=True)
        if self.client_address.transport == "ipc" and not self.client_address.private:
            for port in self._client_ports.values():
                with contextlib.suppress(OSError):
                    os.unlink(f"{self.client_address.prefix}-{port}")
        with contextlib.suppress(OSError):
            self.client_dir.rmdir()

    # -- forwarding -----------------------------------------------------------------

    async def _up(self, channel: str) -> None:
        """Client -> kernel. Clients are the server's own code: observed, not checked."""
        client, kernel = self._clients[channel], self._kernel[channel]
        while True:
            frames = await client.recv_multipart()
            if channel != "stdin":
                header = _header_of(frames)
                if header is not None:
                    self.traffic.request(str(header.get("msg_type", "")), header)
                    self._awaiting.add(str(header.get("msg_id", "")))
            await kernel.send_multipart(frames)

    async def _down(self, channel: str) -> None:
        """Kernel -> client: verified, then routed by the client identity it carries.

        On shell and control only the reply to a request a client sent (once); on stdin
        (the kernel asks for input) within the running execution's output budget.
        """
        client, kernel = self._clients[channel], self._kernel[channel]
        while True:
            frames = await kernel.recv_multipart()
            checked = self._verified(frames)
            if checked is None:
                continue
            header, parent = checked
            if channel == "stdin":
                size = sum(len(f) for f in frames)
                if self.budget.admit(self.traffic.charged(), size) != "pass":
                    self._refuse("input request past the output limit")
                    continue
            else:
                parent_id = str(parent.get("msg_id", ""))
                if not self._awaiting.take(parent_id):
                    self._refuse("reply to no request")
                    continue
                if channel == "shell":
                    self.traffic.reply(str(header.get("msg_type", "")), parent_id)
            await client.send_multipart(frames)

    async def _hb(self, upward: bool) -> None:
        """Heartbeats are raw echoes (unsigned): forwarded both ways, size-capped."""
        client, kernel = self._clients["hb"], self._kernel["hb"]
        source, target = (client, kernel) if upward else (kernel, client)
        while True:
            frames = await source.recv_multipart()
            if upward or self._size_ok(frames):
                await target.send_multipart(frames)

    async def _iopub(self) -> None:
        client, kernel = self._clients["iopub"], self._kernel["iopub"]
        while True:
            frames = await kernel.recv_multipart()
            parsed = self._parsed(frames)
            if parsed is None:
                continue
            start, header, parent = parsed
            size = sum(len(f) for f in frames)
            if header.get("msg_type") == "status" and size > MAX_STATUS_BYTES:
                self._refuse("padded status message")
                continue
            if header.get("msg_type") != "status":
                execution = self.traffic.charged()
                verdict = self.budget.admit(execution, size)
                # Past the budget nothing is forwarded: no need to check the signature
                # (a flood is dropped at the cost of parsing two small frames).
                if verdict == "drop":
                    continue
                cell = execution.parent_header() if execution else parent
                if not self._size_ok(frames):
                    text = OVERSIZE_NOTICE.format(size=size, limit=self.max_message_size)
                    await client.send_multipart(self._notice(cell, text))
                    continue
                if not self._signed(frames, start):
                    continue
                if verdict == "notice":
                    frames = self._notice(cell)
            elif not self._signed(frames, start):
                continue
            await client.send_multipart(frames)

    # -- checks -----------------------------------------------------------------------

    def _size_ok(self, frames: list[bytes]) -> bool:
        if self.max_message_size and sum(len(f) for f in frames) > self.max_message_size:
            self._refuse("message larger than max_message_size")
            return False
        return True

    def _verified(self, frames: list[bytes]) -> tuple[dict, dict] | None:
        """(header, parent) of a message signed with the session key, else None."""
        if not self._size_ok(frames):
            return None
        parsed = self._parsed(frames)
        if parsed is None or not self._signed(frames, parsed[0]):
            return None
        return parsed[1], parsed[2]

    def _parsed(self, frames: list[bytes]) -> tuple[int, dict, dict] | None:
        """(index of the delimiter, header, parent) of a well-formed message, else None."""
        try:
            start = frames.index(DELIM)
        except ValueError:
            self._refuse("no message delimiter")
            return None
        parts = frames[start + 2 : start + 6]
        if len(parts) < 4:
            self._refuse("truncated message")
            return None
        if len(parts[0]) > MAX_HEADER_BYTES or len(parts[1]) > MAX_HEADER_BYTES:
            self._refuse("oversized header")
            return None
        try:
            header, parent = json.loads(parts[0]), json.loads(parts[1])
        except ValueError:
            self._refuse("unparsable header")
            return None
        if not isinstance(header, dict) or not isinstance(parent, dict):
            self._refuse("header is not an object")
            return None
        return start, header, parent

    def _signed(self, frames: list[bytes], start: int) -> bool:
        """Whether the message carries the HMAC of the session key over its four parts."""
        if self._auth is None:
            return True
        mac = self._auth.copy()
        for part in frames[start + 2 : start + 6]:
            mac.update(part)
        if hmac.compare_digest(frames[start + 1], mac.hexdigest().encode()):
            return True
        self._refuse("bad signature")
        return False

    def _refuse(self, why: str) -> None:
        self.dropped += 1
        if self.dropped == 1 or self.dropped % 1000 == 0:
            log.warning(
                "kernel %s: dropped a message from the kernel (%s); %d so far",
                self.kernel_id, why, self.dropped,
            )

    def _signer(self) -> Any:
        from jupyter_client.session import Session

        if self._session is None:
            self._session = Session(
                key=self.key, signature_scheme=self.signature_scheme,
                username="limited-provisioner",
            )
        return self._session

    def _notice(self, parent: dict[str, Any], text: str | None = None) -> list[bytes]:
        """A stderr stream message, signed with the session key, for the capped cell."""
        session = self._signer()
        text = text or OUTPUT_NOTICE.format(limit=self.budget.limit)
        msg = session.msg("stream", {"name": "stderr", "text": text}, parent=parent)
        return session.serialize(msg, ident=[b"stream.stderr"])

    async def announce(self, msg_id: str, text: str) -> None:
        """Tell the clients of execution ``msg_id`` why it is being stopped (a stderr
        stream message on IOPub, signed as the kernel's are): where the kernel cannot
        read the server's notice file (a task on another node)."""
        iopub = self._clients.get("iopub")
        if iopub is not None:
            parent = {"msg_id": msg_id, "msg_type": "execute_request"}
            await iopub.send_multipart(self._notice(parent, text))

    async def interrupt(self) -> bool:
        """Ask the kernel to interrupt its execution (``interrupt_request`` on control):
        SIGINT where no signal reaches it (a task on another node). Its reply answers no
        client and is dropped. False if the kernel is not connected."""
        control = self._kernel.get("control")
        if control is None:
            return False
        session = self._signer()
        msg = session.msg("interrupt_request", {})
        await control.send_multipart(session.serialize(msg))
        return True


def _header_of(frames: list[bytes]) -> dict[str, Any] | None:
    try:
        i = frames.index(DELIM)
        raw = frames[i + 2]
        if len(raw) > MAX_HEADER_BYTES:
            return None
        header = json.loads(raw)
    except (ValueError, IndexError):
        return None
    return header if isinstance(header, dict) else None
