"""examples/mcp_server: the limited kernels as MCP tools, driven by the SDK's own client.

The server runs as ``python -m mcp_server`` over stdio (``mcp.client.stdio``), on a
private state dir; the client is ``mcp.ClientSession``. After each test the client has
stopped the server and every kernel of the state dir is removed, whatever happened.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

if not os.environ.get("CI"):  # in CI the test extras must bring it: an ImportError fails
    pytest.importorskip("mcp.server.mcpserver", reason="needs the mcp SDK 2.x (pip install mcp)")
from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client

from .conftest import TEST_OWNER, backends
from .harness import (
    EXAMPLES,
    KERNEL_IMAGE,
    free_port,
    kernel_leftovers,
    remove_all_kernels,
    stop_process,
)

MARKER = re.compile(r"^\[limited-provisioner status=(\w+)\] (.*)$", re.MULTILINE)
GONE = "variables from earlier cells are gone"
KEPT = "variables from earlier cells are kept"
# Resident memory grows by touched 1 MiB blocks: the cgroup (256M) kills the kernel
# before RLIMIT_DATA (mem_limit + 128M) turns it into a MemoryError.
MEMORY_EATER = "blocks = []\nwhile True:\n    blocks.append(b'x' * (1 << 20))"
PLOT = """\
import base64
from IPython.display import Image, display
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")
display(Image(data=PNG))
open("plot.png", "wb").write(PNG)
"""
# Not TEST_OWNER: another pytest session ending on this host removes every container of
# TEST_OWNER (conftest's safety net), which would kill these kernels mid-test. Ours go
# by their state dir (remove_all_kernels).
MCP_OWNER = f"{TEST_OWNER}-mcp"
TOOLS = {"execute_code", "upload_file", "download_file", "list_files", "reset_session"}


def server_env(backend: str, state: Path, **settings: str) -> dict[str, str]:
    """The server's environment: examples/ importable, the test user, a private state
    dir and server id, small limits."""
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(EXAMPLES.parent), str(EXAMPLES), os.environ.get("PYTHONPATH", "")]),
        "MCP_USER": MCP_OWNER,
        "MCP_MAX_FILE_BYTES": "1000000",
        "AGENT_BACKEND_BACKEND": "docker" if "docker" in backend else "process",
        "AGENT_BACKEND_STATE_DIR": str(state),
        "AGENT_BACKEND_SERVER_ID": "test-mcp-" + uuid.uuid4().hex[:8],
        "AGENT_BACKEND_MEM_LIMIT": "256M",
        "AGENT_BACKEND_DISK_LIMIT": "64M",
        "AGENT_BACKEND_EXEC_TIMEOUT": "20",
        "AGENT_BACKEND_MAX_KERNELS_PER_USER": "2",
        **({"AGENT_BACKEND_IMAGE": KERNEL_IMAGE} if "docker" in backend else {}),
        **{f"AGENT_BACKEND_{k}": v for k, v in settings.items()},
    }


def new_state_dir() -> Path:
    # Short on purpose: the kernels' ipc socket paths live under it.
    return Path(tempfile.mkdtemp(prefix="lp-", dir="/var/lib"))


@asynccontextmanager
async def mcp_server(backend: str, **settings: str) -> AsyncIterator[tuple[ClientSession, Path]]:
    """A started MCP server (stdio) on a fresh state dir, and its client session."""
    state = new_state_dir()
    env = server_env(backend, state, **settings)
    params = StdioServerParameters(command=sys.executable, args=["-m", "mcp_server"],
                                   env=env, cwd=str(EXAMPLES))
    with tempfile.TemporaryFile("w+") as errlog:
        try:
            async with stdio_client(params, errlog=errlog) as (read, write), \
                    ClientSession(read, write) as session:
                await session.initialize()
                yield session, state
        except BaseException:
            errlog.seek(0)
            print(errlog.read()[-8000:])
            raise
        finally:
            remove_all_kernels(state)
            shutil.rmtree(state, ignore_errors=True)


def text_of(result) -> str:
    return "".join(c.text for c in result.content if c.type == "text")


def marker(result) -> tuple[str, str]:
    """(status, sentence) of the result's last line, which must be the marker."""
    text = text_of(result)
    last = text.rstrip("\n").splitlines()[-1]
    found = MARKER.fullmatch(last)
    assert found, text
    assert found[1] == result.structured_content["status"]
    return found[1], found[2]


async def call(session: ClientSession, tool: str, **arguments):
    return await session.call_tool(tool, arguments)


@pytest.mark.parametrize("backend", backends(), indirect=True)
async def test_tools_run_code_in_limited_kernels(backend, jupyter_path):
    async with mcp_server(backend) as (session, state):
        tools = {t.name: t for t in (await session.list_tools()).tools}
        assert set(tools) == TOOLS
        assert tools["execute_code"].input_schema["required"] == ["code"]

        out = await call(session, "execute_code", code="print('hi')\nx = 21\nx * 2")
        assert not out.is_error
        assert marker(out) == ("ok", f"the execution finished; {KEPT}.")
        assert text_of(out).startswith("hi\n42\n")
        first_kernel = out.structured_content["kernel_id"]

        out = await call(session, "execute_code", code="1/0")
        assert marker(out)[0] == "error" and "ZeroDivisionError" in text_of(out)
        assert not out.is_error  # the tool ran; the code raised

        # A displayed image comes back as an MCP image; the file it wrote downloads.
        out = await call(session, "execute_code", code=PLOT)
        assert marker(out)[0] == "ok"
        (image,) = [c for c in out.content if c.type == "image"]
        assert image.mime_type == "image/png"
        png = base64.b64decode(image.data)
        assert png.startswith(b"\x89PNG")
        out = await call(session, "download_file", path="plot.png")
        assert not out.is_error, text_of(out)
        assert base64.b64decode(out.content[0].data) == png
        assert out.structured_content["mime_type"] == "image/png"

        # Files in and out: upload, the code reads it, list, download byte-identical.
        blob = os.urandom(300_000) + b"\x00\xff"
        out = await call(session, "upload_file", path="data/in.bin",
                         content_base64=base64.b64encode(blob).decode())
        assert not out.is_error, text_of(out)
        out = await call(session, "execute_code", code=(
            "import hashlib\nd = open('data/in.bin', 'rb').read()\n"
            "open('out.txt', 'w').write(hashlib.sha256(d).hexdigest())\n"
            "import os\nopen('data/in.bin', 'ab').close()  # the kernel's own file\n"
            "len(d), os.stat('data').st_uid == os.stat('data/in.bin').st_uid == os.getuid()"))
        assert f"({len(blob)}, True)" in text_of(out), text_of(out)
        listed = await call(session, "list_files")
        sizes = {f["path"]: f["size"] for f in listed.structured_content["files"]}
        assert sizes["data/in.bin"] == len(blob) and "out.txt" in sizes
        out = await call(session, "download_file", path="data/in.bin")
        assert base64.b64decode(out.content[0].resource.blob) == blob
        assert out.structured_content["size"] == len(blob)
        out = await call(session, "download_file", path="out.txt")
        assert out.content[0].resource.text == hashlib.sha256(blob).hexdigest()

        # Paths that leave the work dir, and links the kernel planted, are refused.
        for path in ("../escape", "/etc/passwd", "a/../../b"):
            out = await call(session, "upload_file", path=path, content_base64="eA==")
            assert out.is_error and out.structured_content["status"] == 400, path
        await call(session, "execute_code",
                   code="import os\nos.symlink('/etc', 'etc')\nos.symlink('/etc/passwd', 'pw')")
        for path in ("pw", "etc/passwd"):
            out = await call(session, "download_file", path=path)
            assert out.is_error and out.structured_content["status"] == 400, path
        out = await call(session, "upload_file", path="etc/evil", content_base64="eA==")
        assert out.is_error and out.structured_content["status"] == 400
        assert not Path("/etc/evil").exists()
        too_big = base64.b64encode(b"x" * 1_000_001).decode()
        out = await call(session, "upload_file", path="big", content_base64=too_big)
        assert out.is_error and out.structured_content["status"] == 413
        assert "1000000 bytes" in text_of(out)
        out = await call(session, "upload_file", path="x", content_base64="not base64!")
        assert out.is_error and out.structured_content["status"] == 400
        out = await call(session, "download_file", path="missing.txt")
        assert out.is_error and out.structured_content["status"] == 404

        # The memory bomb: oom_killed with the marker; the session goes on without x.
        out = await call(session, "execute_code", code=MEMORY_EATER)
        status, sentence = marker(out)
        assert status == "oom_killed", text_of(out)
        assert sentence.startswith("the kernel exceeded its memory limit 256M") and GONE in sentence
        assert out.structured_content["limit"] == "mem_limit"
        out = await call(session, "execute_code", code="'x' in globals()")
        assert marker(out)[0] == "ok" and text_of(out).startswith("False\n")
        assert out.structured_content["kernel_id"] == first_kernel

        # A kernel writing to the server's stdout/stderr fds does not reach the wire.
        out = await call(session, "execute_code", code=(
            "import os\nos.write(1, b'{\"jsonrpc\": \"2.0\", \"id\": 99}\\n')\n"
            "os.write(2, b'noise\\n')\n'still here'"))
        assert marker(out)[0] == "ok"
        assert (await call(session, "execute_code", code="1 + 1")).structured_content[
            "outputs"][0]["text"] == "2"

        # reset_session: the kernel is shut down; the next execution gets a fresh one.
        await call(session, "execute_code", code="y = 1")
        out = await call(session, "reset_session")
        assert out.structured_content == {
            "session_id": "default", "kernel_id": first_kernel, "reset": True}
        assert kernel_leftovers(state)["registry entries"] == 0
        out = await call(session, "execute_code", code="'y' in globals()")
        assert text_of(out).startswith("False\n")
        assert out.structured_content["kernel_id"] != first_kernel
        out = await call(session, "list_files")
        assert "data/in.bin" not in {f["path"] for f in out.structured_content["files"]}

        # Sessions are separate kernels; a second session and then the per-user cap.
        out = await call(session, "execute_code", code="z = 2", session_id="other")
        assert marker(out)[0] == "ok"
        out = await call(session, "execute_code", code="1", session_id="third")
        assert marker(out)[0] == "limit_refused" and out.is_error
        assert "max_kernels_per_user=2" in text_of(out)

        for sid in ("default", "other"):
            assert (await call(session, "reset_session", session_id=sid)).structured_content[
                "reset"]
        assert not (await call(session, "reset_session", session_id="other")).structured_content[
            "reset"]
        leftovers = kernel_leftovers(state)
        assert leftovers["registry entries"] == 0 and leftovers["containers"] == 0, leftovers


@pytest.fixture
def http_server(jupyter_path, tmp_path):
    """``python -m mcp_server --transport streamable-http`` on a free loopback port, on a
    fresh state dir: yields (url, state); stopped by pid, its kernels removed."""
    state = new_state_dir()
    port = free_port()
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mcp_server", "--transport", "streamable-http",
             "--port", str(port)],
            cwd=EXAMPLES, env=server_env("process", state), stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:  # until it listens
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}/mcp", state
    finally:
        stop_process(proc)
        print(log.read_text()[-8000:])
        remove_all_kernels(state)
        shutil.rmtree(state, ignore_errors=True)


async def test_streamable_http_transport(http_server):
    """``--transport streamable-http``: the same tools over HTTP on loopback."""
    url, state = http_server
    async with streamable_http_client(url) as (read, write), \
            ClientSession(read, write) as session:
        await session.initialize()
        assert {t.name for t in (await session.list_tools()).tools} == TOOLS
        out = await call(session, "execute_code", code="6 * 7", session_id="h1")
        assert marker(out) == ("ok", f"the execution finished; {KEPT}.")
        assert text_of(out).startswith("42\n")
        out = await call(session, "reset_session", session_id="h1")
        assert out.structured_content["reset"]
    assert kernel_leftovers(state)["registry entries"] == 0


def test_patterns_match_the_http_service(monkeypatch, tmp_path):
    """The session and user forms are agent_backend.app's (checked, not imported there)."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.setenv("AGENT_BACKEND_STATE_DIR", str(tmp_path))
    from agent_backend import app
    from mcp_server import server

    assert (server.SESSION_ID, server.USER) == (app.SESSION_ID, app.USER)


def test_results_without_kernels(monkeypatch, tmp_path):
    """How results become MCP content: PNGs as images (once), refusals as is_error with
    the marker, file names of any form as valid resource URIs."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    from agent_backend.kernels import ExecResult
    from mcp_server import server

    from limited_provisioner import KernelLimitError, SandboxUnavailableError

    png = base64.b64encode(b"\x89PNG\r\n\x1a\nfake").decode()
    result = ExecResult(status="ok", session_id="s", kernel_id="k", text="x\n[marker]", outputs=[
        {"output_type": "display_data", "text": "<Figure>", "mime_types": ["image/png"],
         "png": png}])
    out = server.exec_result(result)
    assert [c.type for c in out.content] == ["text", "image"] and not out.is_error
    assert out.content[1].data == png and "png" not in out.structured_content["outputs"][0]

    out = server.not_started("s", KernelLimitError("max_kernels=1 reached", limit="max_kernels"))
    assert out.is_error and out.structured_content["status"] == "limit_refused"
    assert marker(out) == ("limit_refused", "nothing was executed: max_kernels=1 reached")
    out = server.not_started("s", SandboxUnavailableError("docker is down"))
    assert out.is_error and marker(out) == (
        "error", "no kernel could be started: docker is down")

    (text,) = server.file_content("a:b", "dir/my file #1?.csv", b"a,b\n")
    assert text.resource.text == "a,b\n"
    assert str(text.resource.uri) == "sandbox:///a%3Ab/dir/my%20file%20%231%3F.csv"
    (blob,) = server.file_content("s", "x.bin", b"\xff\x00")
    assert base64.b64decode(blob.resource.blob) == b"\xff\x00"
    (image,) = server.file_content("s", "p.png", b"\x89PNG")
    assert image.type == "image" and image.mime_type == "image/png"
