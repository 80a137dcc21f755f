"""A limited kernel behaves like a stock one where the peers' own test suites look
(bench/peers.py runs them): the caller's environment, the errors a start raises, a
server adopting while it starts kernels, what the installed kernelspec declares.
"""

from __future__ import annotations

import errno
import json
import os

import pytest
from jupyter_client.manager import AsyncKernelManager
from traitlets.config import Config

from limited_provisioner import AdoptionError, SandboxStartError, adopt
from limited_provisioner.registry import Registry

from .conftest import NOTHING_LEFT, backends, run
from .harness import kernel_leftovers, kill_kernel_leftovers, write_kernelspec

SMALL = {"mem_limit": "256M", "pids_limit": 64, "owner": "lp-pytest"}
SHOW_ENV = (
    "import json, os\n"
    "print(json.dumps({k: os.environ.get(k) for k in "
    "('LP_CALLER_DIR', 'LP_CHANGED', 'LP_SERVER_ONLY', 'LP_API_TOKEN', 'PATH')}))"
)


@pytest.mark.parametrize("backend", backends(), indirect=True)
async def test_what_the_caller_sets_in_env_reaches_the_kernel_but_not_a_secret(
    backend, start_kernel, own_state, monkeypatch, docker_cleanup
):
    # nbclient passes IPYKERNEL_CELL_NAME this way, test suites a tmpdir: a copy of the
    # server's environment with the caller's own additions.
    monkeypatch.setenv("LP_SERVER_ONLY", "server's")
    monkeypatch.setenv("LP_CHANGED", "server's")
    env = {
        **os.environ, "LP_CALLER_DIR": "/srv/data", "LP_CHANGED": "caller's",
        "LP_API_TOKEN": "s3cret", "PATH": "/caller/bin:" + os.environ["PATH"],
    }
    km, kc = await start_kernel(SMALL, provisioner=backend, start_kwargs={"env": env})
    out = await run(kc, SHOW_ENV)
    seen = json.loads(out["stdout"].strip().splitlines()[-1])
    path = seen.pop("PATH")
    assert seen == {
        "LP_CALLER_DIR": "/srv/data", "LP_CHANGED": "caller's",
        # Passed along unchanged from the server: still filtered by env_keep.
        "LP_SERVER_ONLY": None,
        # A secret-looking name needs env_keep or the kernelspec's env to name it.
        "LP_API_TOKEN": None,
    }
    # A host PATH means nothing in a container: the image's stays.
    assert path.startswith("/caller/bin:") == (backend == "limited-process-provisioner"), path


@pytest.mark.parametrize("backend", backends(), indirect=True)
async def test_a_kernel_command_that_does_not_exist_raises_file_not_found(
    backend, start_kernel, own_state, docker_cleanup
):
    argv = ["/nonexistent/bin/python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    # What jupyter_client's LocalProvisioner raises (Popen's FileNotFoundError), so
    # clients that say "kernel command not found" keep saying it.
    with pytest.raises(FileNotFoundError) as raised:
        await start_kernel(SMALL, provisioner=backend, argv=argv)
    e = raised.value
    assert isinstance(e, SandboxStartError), type(e).__mro__  # 503 from a server
    assert e.errno == errno.ENOENT
    assert "/nonexistent/bin/python3" in str(e) and "/nonexistent/bin/python3" in e.reason
    assert kernel_leftovers(own_state) == NOTHING_LEFT


async def test_adopting_in_the_same_process_leaves_a_starting_kernel_alone(
    jupyter_path, own_state
):
    """A server whose loop already runs (embedded, pytest-jupyter) adopts in the
    background while it starts kernels: its own starting entry is not an orphan."""
    write_kernelspec(jupyter_path, "lim", SMALL)
    km = AsyncKernelManager(kernel_name="lim")
    kc = None
    try:
        # The start, cut where adoption used to find it: admitted, registered, not running.
        cmd, kw = await km._async_pre_start_kernel()
        entry = Registry(own_state).read(km.kernel_id)
        assert entry["state"] == "starting", entry
        with pytest.raises(AdoptionError) as raised:
            await adopt(km.kernel_id, state_dir=own_state, entry=entry)
        assert raised.value.reason == "managed", raised.value
        await km._async_launch_kernel(cmd, **kw)
        await km._async_post_start_kernel(**kw)
        kc = km.client()
        kc.start_channels()
        await kc.wait_for_ready(timeout=60)
        assert (await run(kc, "print(6 * 7)"))["stdout"].strip() == "42"
    finally:
        if kc is not None:
            kc.stop_channels()
        pids = {km.provisioner.pid} if getattr(km.provisioner, "pid", None) else set()
        try:
            if km.has_kernel:
                await km.shutdown_kernel(now=True)
        finally:
            kill_kernel_leftovers(km.kernel_id, pids)
    assert kernel_leftovers(own_state) == NOTHING_LEFT


async def control_request(kc, msg_type: str, content: dict, timeout: float = 20) -> dict:
    msg = kc.session.msg(msg_type, content)
    kc.control_channel.send(msg)
    while True:
        reply = await kc.control_channel.get_msg(timeout=timeout)
        if reply["parent_header"].get("msg_id") == msg["header"]["msg_id"]:
            return reply


@pytest.mark.parametrize("backend", backends(), indirect=True)
async def test_jupyterlabs_debugger_attaches_to_a_kernel_without_network(
    backend, start_kernel, docker_cleanup
):
    """debugpy listens on the sandbox's own loopback: with network off it is there (up),
    and nothing else is."""
    km, kc = await start_kernel({**SMALL, "network": False}, provisioner=backend)
    info = await kc.kernel_info(reply=True, timeout=20)
    content = info["content"]
    # ipykernel 6: "debugger"; 7: "supported_features".
    assert content.get("debugger") or "debugger" in content.get("supported_features", []), content
    init = await control_request(kc, "debug_request", {
        "type": "request", "seq": 1, "command": "initialize",
        "arguments": {"clientID": "lp-test", "adapterID": "python", "pathFormat": "path",
                      "linesStartAt1": True, "columnsStartAt1": True}})
    assert init["content"]["success"], init["content"]
    attach = await control_request(kc, "debug_request", {
        "type": "request", "seq": 2, "command": "attach", "arguments": {}})
    assert attach["content"]["success"], attach["content"]
    dinfo = await control_request(kc, "debug_request", {
        "type": "request", "seq": 3, "command": "debugInfo", "arguments": {}})
    assert dinfo["content"]["body"]["isStarted"] is True, dinfo["content"]
    # Still no way out.
    out = await run(kc, "import socket\ntry:\n    socket.create_connection(('192.0.2.1', 80), "
                        "timeout=2)\nexcept OSError as e:\n    print('blocked', e.errno)")
    assert out["stdout"].startswith("blocked"), out


@pytest.mark.parametrize("backend", backends(), indirect=True)
async def test_transport_encryption_required_is_served_with_curve(
    backend, start_kernel, docker_cleanup
):
    """jupyter_client's transport_encryption: the sockets clients reach are CurveZMQ
    servers with the manager's keys; a client without them gets nothing."""
    km, kc = await start_kernel(
        SMALL, provisioner=backend, metadata={"supported_encryption": ["curve"]},
        start_kwargs={"transport_encryption": "required"},
    )
    assert km.curve_publickey is not None and km.curve_secretkey is not None
    info = km.get_connection_info()
    assert info["curve_publickey"] == km.curve_publickey.decode()
    assert (await run(kc, "print('over curve')"))["stdout"].strip() == "over curve"

    plain = km.client(curve_publickey=None, curve_secretkey=None)
    assert plain.curve_publickey is None
    plain.start_channels()
    try:
        with pytest.raises(TimeoutError):
            await plain.kernel_info(reply=True, timeout=3)
    finally:
        plain.stop_channels()


async def test_no_encryption_unless_asked(start_kernel):
    km, kc = await start_kernel(SMALL, metadata={"supported_encryption": ["curve"]})
    assert km.curve_publickey is None  # transport_encryption defaults to "disabled"
    assert (await run(kc, "print(1)"))["stdout"].strip() == "1"


async def test_a_manager_configured_for_tcp_gets_tcp_and_the_kernel_stays_offline(
    start_kernel,
):
    """network is about what the kernel reaches: clients that were told to use tcp (as in
    jupyter_client's own tests) get loopback tcp ports; the kernel's sockets stay ipc in
    its sandbox."""
    config = Config()
    config.KernelManager.transport = "tcp"
    km, kc = await start_kernel({**SMALL, "network": False}, km_config=config)
    info = km.get_connection_info()
    assert (info["transport"], info["ip"]) == ("tcp", "127.0.0.1"), info
    ports = [info[f"{c}_port"] for c in ("shell", "iopub", "stdin", "control", "hb")]
    assert all(p > 1024 for p in ports) and len(set(ports)) == 5, ports
    kernel_side = json.loads(open(km.provisioner.connection.kernel_connection_file).read())
    assert kernel_side["transport"] == "ipc", kernel_side
    assert (await run(kc, "print('via tcp')"))["stdout"].strip() == "via tcp"
    await km.restart_kernel(now=True)
    await kc.wait_for_ready(timeout=60)
    assert km.get_connection_info()["shell_port"] == info["shell_port"]
    assert (await run(kc, "print('again')"))["stdout"].strip() == "again"


async def test_a_manager_configured_with_an_ipc_prefix_gets_its_sockets_there(
    start_kernel, tmp_path
):
    prefix = str(tmp_path / "test")
    km, kc = await start_kernel(SMALL, transport="ipc", ip=prefix)
    info = km.get_connection_info()
    assert (info["transport"], info["ip"]) == ("ipc", prefix), info
    assert sorted(p.name for p in tmp_path.glob("test-*")) == [f"test-{n}" for n in range(1, 6)]
    assert (await run(kc, "print('via ipc')"))["stdout"].strip() == "via ipc"
    # jupyter_client removes <ip>-<port> at a restart: bound again for the new process.
    await km.restart_kernel(now=True)
    await kc.wait_for_ready(timeout=60)
    assert (await run(kc, "print('again')"))["stdout"].strip() == "again"
    await km.shutdown_kernel(now=True)
    assert list(tmp_path.glob("test-*")) == []


async def test_a_manager_told_to_serve_tcp_on_a_foreign_address_is_refused(
    start_kernel, own_state
):
    config = Config()
    config.KernelManager.transport = "tcp"
    with pytest.raises(RuntimeError, match="not an address of this host"):
        await start_kernel(SMALL, km_config=config, ip="192.0.2.1")
    assert kernel_leftovers(own_state) == NOTHING_LEFT


async def test_a_refused_start_is_not_held_by_this_process(start_kernel, own_state):
    """held_kernels: a start refused at admission holds nothing an exit would end."""
    from limited_provisioner import KernelLimitError, held_kernels

    km, _kc = await start_kernel({**SMALL, "max_kernels": 1})
    assert held_kernels.holding(own_state, km.kernel_id)
    refused = AsyncKernelManager(kernel_name=km.kernel_name)
    with pytest.raises(KernelLimitError):
        await refused.start_kernel()
    assert not held_kernels.holding(own_state, refused.kernel_id)
    await km.shutdown_kernel(now=True)
    assert not held_kernels.holding(own_state, km.kernel_id)
