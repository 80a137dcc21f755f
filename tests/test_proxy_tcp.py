"""The proxy in front of a kernel reached over TCP (the swarm backend's overlay network):
a real ipykernel whose sockets are CurveZMQ servers, a real client through the proxy, and
peers on the same network that hold the session key but not the kernel's keypair."""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import sys

import pytest
import zmq
import zmq.asyncio
from jupyter_client.session import Session

from limited_provisioner.proxy import KernelEndpoint, KernelProxy
from limited_provisioner.traffic import Traffic

from .harness import free_port, stop_process

CHANNELS = ("shell", "iopub", "stdin", "control", "hb")


@pytest.fixture
async def tcp_kernel(tmp_path):
    """An ipykernel bound to TCP with CurveZMQ, and a proxy in front of it."""
    key = secrets.token_hex(16).encode()
    endpoint = KernelEndpoint.tcp({channel: free_port() for channel in CHANNELS})
    endpoint.host = "127.0.0.1"
    proxy = KernelProxy(
        kernel_id="tcp-test", client_dir=tmp_path / "clients", kernel=endpoint, key=key,
        signature_scheme="hmac-sha256", traffic=Traffic(), output_limit=None,
        max_message_size=None,
    )
    info = proxy.kernel_connection_info()
    # The kernel binds every address of its container; here: loopback only.
    info["ip"] = "127.0.0.1"
    conn = tmp_path / "kernel.json"
    conn.write_text(json.dumps(info))
    proc = await asyncio.to_thread(
        subprocess.Popen, [sys.executable, "-m", "ipykernel_launcher", "-f", str(conn),
         "--HistoryManager.enabled=False"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    proxy.bind_clients()
    proxy.connect_kernel()
    try:
        yield proxy, endpoint, key, proc
    finally:
        await proxy.stop()
        stop_process(proc)


async def ask(sock, session: Session, timeout: float) -> dict | None:
    """kernel_info_request on a DEALER; the reply, or None within ``timeout``."""
    session.send(sock, "kernel_info_request", {})
    if not await sock.poll(timeout * 1000):
        return None
    _, frames = session.feed_identities(await sock.recv_multipart())
    return session.deserialize(frames)


async def test_a_client_through_the_proxy_reaches_a_curve_kernel(tcp_kernel):
    proxy, _, key, proc = tcp_kernel
    info = proxy.client_connection_info()
    session = Session(key=key, signature_scheme="hmac-sha256")
    ctx = zmq.asyncio.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(f"ipc://{info['ip']}-{info['shell_port']}")
    try:
        reply = None
        for _ in range(30):  # the kernel takes a moment to bind
            reply = await ask(sock, session, 1.0)
            if reply is not None:
                break
        assert reply is not None, proc.stderr.read1().decode() if proc.poll() else "no reply"
        assert reply["content"]["status"] == "ok"
        assert reply["content"]["implementation"] == "ipython"
    finally:
        sock.close(linger=0)
    # Over TCP without CurveZMQ ipykernel warns that everything goes in plain text.
    proc.terminate()
    err = proc.stderr.read().decode()
    assert "without encryption" not in err, err[-2000:]


@pytest.mark.parametrize("peer", ["plain", "other keypair", "public key only"])
async def test_a_peer_on_the_network_needs_the_kernels_public_key(tcp_kernel, peer):
    """Another kernel on the overlay that learnt the HMAC key still cannot talk to the
    kernel's sockets: without CurveZMQ, or with a server key other than the kernel's, no
    handshake and no reply. The kernel's sockets take any client keypair (ipykernel runs
    no ZAP handler), so its public key is a secret like the session key: it is only in
    the kernel's connection secret and this server's memory ("public key only" shows what
    it would let through)."""
    _, endpoint, key, _ = tcp_kernel
    session = Session(key=key, signature_scheme="hmac-sha256")
    ctx = zmq.asyncio.Context.instance()
    # The legitimate path answers first: the kernel is up.
    legit = ctx.socket(zmq.DEALER)
    legit.linger = 0
    endpoint.secure(legit)
    legit.connect(endpoint.url("shell"))
    intruder = ctx.socket(zmq.DEALER)
    intruder.linger = 0
    try:
        for _ in range(30):
            if await ask(legit, session, 1.0) is not None:
                break
        else:
            pytest.fail("the kernel never answered its key holder")
        if peer == "other keypair":
            public, secret = zmq.curve_keypair()
            intruder.curve_serverkey = public
            intruder.curve_publickey, intruder.curve_secretkey = public, secret
        elif peer == "public key only":
            # Knows which server it talks to, with a keypair of its own: the kernel's
            # sockets take any client key (no ZAP), so this one must not be given out.
            public, secret = zmq.curve_keypair()
            intruder.curve_serverkey = endpoint.curve_publickey
            intruder.curve_publickey, intruder.curve_secretkey = public, secret
        intruder.connect(endpoint.url("shell"))
        reply = await ask(intruder, session, 3.0)
        if peer == "public key only":
            # Documented: the public key is the secret that matters, with the session key.
            assert reply is not None
        else:
            assert reply is None, reply
    finally:
        legit.close(linger=0)
        intruder.close(linger=0)


def test_the_kernels_connection_file_for_tcp_says_curve_and_every_address():
    endpoint = KernelEndpoint.tcp({"shell": 50001, "iopub": 50002, "stdin": 50003,
                                   "control": 50004, "hb": 50005})
    info = endpoint.kernel_connection_info()
    assert info["transport"] == "tcp" and info["ip"] == "0.0.0.0"
    assert info["shell_port"] == 50001 and info["hb_port"] == 50005
    assert info["curve_publickey"].encode() == endpoint.curve_publickey
    assert len(info["curve_secretkey"]) == 40
    with pytest.raises(RuntimeError, match="not known yet"):
        endpoint.url("shell")
    endpoint.host = "10.0.1.7"
    assert endpoint.url("iopub") == "tcp://10.0.1.7:50002"
    assert KernelEndpoint.ipc("/k/sock/k").url("shell") == "ipc:///k/sock/k-1"


def test_ipc_endpoint_info_is_unchanged():
    assert KernelEndpoint.ipc("/k/sock/k").kernel_connection_info() == {
        "transport": "ipc", "ip": "/k/sock/k", "shell_port": 1, "iopub_port": 2,
        "stdin_port": 3, "control_port": 4, "hb_port": 5}
