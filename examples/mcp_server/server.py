"""The MCP tools over agent_backend's kernel pool: one limited kernel per session.

``create_server(settings, user, pool)`` builds an ``MCPServer`` (the official ``mcp``
SDK, 2.x) whose tools call :class:`agent_backend.kernels.KernelPool` — the HTTP
service's sessions, statuses, marker lines and limits, unchanged — and the file port
(``files_port``, i.e. ``limited_provisioner.files``). ``serve()`` opens the pool (writes
the kernelspec, re-adopts this server's kernels), runs a transport, and leaves the
kernels running for the next start to re-adopt, as the HTTP service does.
"""

from __future__ import annotations

import base64
import binascii
import getpass
import logging
import mimetypes
import os
import re
import socket
from dataclasses import asdict, dataclass, replace
from typing import Annotated, Any
from urllib.parse import quote

from agent_backend import render
from agent_backend.kernels import ExecResult, KernelPool, refused
from agent_backend.settings import Settings
from mcp.server.mcpserver import MCPServer
from mcp.types import (
    BlobResourceContents,
    CallToolResult,
    EmbeddedResource,
    ImageContent,
    TextContent,
    TextResourceContents,
    ToolAnnotations,
)
from pydantic import Field

from limited_provisioner import KernelLimitError, LimitConfigError, SandboxUnavailableError

from . import files_port

log = logging.getLogger("mcp_server")

# The same forms as agent_backend.app's SESSION_ID and USER (app.py builds its app at
# import, so they are not imported from there; tests check they are equal).
SESSION_ID = r"^[A-Za-z0-9._:-]{1,128}$"
USER = r"^[A-Za-z0-9._@-]{1,64}$"
DEFAULT_SESSION = "default"
MAX_CODE = 200_000  # as POST /exec
IMAGE_TYPES = {"image/png", "image/jpeg", "image/gif", "image/webp"}

INSTRUCTIONS = """\
Runs Python in resource-limited Jupyter kernels, one per session_id (default
"default"); variables and files persist within a session until reset_session.
Every execute_code result ends with a line
'[limited-provisioner status=<ok|error|timeout|oom_killed|limit_refused>] <what happened>'
that says whether variables from earlier cells are kept or gone. Files live in the
session's work dir (the code's current directory): upload_file puts one there,
download_file and list_files read it."""

SessionId = Annotated[
    str,
    Field(
        pattern=SESSION_ID,
        description="Which session (kernel) to use; one kernel and its variables and files "
        "per session_id, started on first use.",
    ),
]
FilePath = Annotated[
    str,
    Field(
        min_length=1,
        max_length=4096,
        description="Path relative to the session's work dir (the code's current "
        "directory), e.g. 'data/input.csv'; absolute paths and '..' are refused.",
    ),
]


@dataclass(frozen=True)
class McpSettings:
    """What the MCP server adds to agent_backend's ``AGENT_BACKEND_*`` settings."""

    user: str
    max_file_bytes: int = 16 * 1024 * 1024

    @classmethod
    def from_env(cls) -> McpSettings:
        user = os.environ.get("MCP_USER") or getpass.getuser()
        if not re.fullmatch(USER, user):
            msg = f"MCP_USER={user!r}: use letters, digits and . _ @ - (at most 64)"
            raise ValueError(msg)
        size = os.environ.get("MCP_MAX_FILE_BYTES")
        return cls(user=user, max_file_bytes=int(size) if size else cls.max_file_bytes)


def backend_settings(user: str) -> Settings:
    """agent_backend's settings from the environment; the server id defaults to
    ``mcp-server-<user>-<host>`` so that this server never adopts (or shuts down) the
    kernels of an HTTP service or of another user's MCP server on the same state dir."""
    settings = Settings.from_env()
    if not (os.environ.get("AGENT_BACKEND_SERVER_ID") or os.environ.get(
            "LIMITED_PROVISIONER_SERVER_ID")):
        settings = replace(settings, server_id=f"mcp-server-{user}-{socket.gethostname()}")
    return settings


# -- results ---------------------------------------------------------------------------


def exec_result(result: ExecResult) -> CallToolResult:
    """The marker text, then each displayed PNG as an image; the fields as structured
    content. ``is_error`` only when nothing ran (a cap refused, no sandbox)."""
    content: list[Any] = [TextContent(type="text", text=result.text)]
    fields = asdict(result)
    for output in fields["outputs"]:
        png = output.pop("png", None)
        if png:
            content.append(ImageContent(type="image", data=png, mime_type="image/png"))
    nothing_ran = result.status == "limit_refused" or result.kernel_id is None
    return CallToolResult(content=content, structured_content=fields, is_error=nothing_ran)


def failure(message: str, **fields: Any) -> CallToolResult:
    return CallToolResult(
        content=[TextContent(type="text", text=message)],
        structured_content={"error": message, **fields},
        is_error=True,
    )


def not_started(session_id: str, error: Exception) -> CallToolResult:
    """A cap refused the session's kernel, or no sandbox could be set up (HTTP 429/503)."""
    if isinstance(error, KernelLimitError):
        return exec_result(refused(session_id, error.limit or "kernel_limit", str(error)))
    return exec_result(
        ExecResult(
            status="error",
            session_id=session_id,
            reason=str(error),
            text=render.marker("error", f"no kernel could be started: {error}"),
        )
    )


def file_content(session_id: str, path: str, data: bytes) -> list[Any]:
    """What a model can read: images as images, UTF-8 text as text, else a blob."""
    mime = mimetypes.guess_type(path)[0] or "application/octet-stream"
    uri = f"sandbox:///{quote(session_id, safe='')}/{quote(path)}"
    encoded = base64.b64encode(data).decode()
    if mime in IMAGE_TYPES:
        return [ImageContent(type="image", data=encoded, mime_type=mime)]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return [EmbeddedResource(type="resource", resource=BlobResourceContents(
            uri=uri, mime_type=mime, blob=encoded))]
    return [EmbeddedResource(type="resource", resource=TextResourceContents(
        uri=uri, mime_type=mime if mime.startswith("text/") else "text/plain", text=text))]


# -- the server ------------------------------------------------------------------------


def create_server(pool: KernelPool, mcp_settings: McpSettings) -> MCPServer:
    """The tools; ``pool`` is opened and closed by the caller (:func:`serve`)."""
    user = mcp_settings.user
    max_bytes = mcp_settings.max_file_bytes
    server = MCPServer(name="limited-python", instructions=INSTRUCTIONS)

    @server.tool(annotations=ToolAnnotations(open_world_hint=False))
    async def execute_code(
        code: Annotated[str, Field(max_length=MAX_CODE, description="Python source to run.")],
        session_id: SessionId = DEFAULT_SESSION,
    ) -> CallToolResult:
        """Run Python in the session's kernel (started on first use); variables persist
        between calls. The text ends with '[limited-provisioner status=...] ...'; images
        the code displays (plots) come back as PNG images."""
        try:
            result = await pool.execute(user, session_id, code)
        except (KernelLimitError, SandboxUnavailableError, LimitConfigError) as e:
            return not_started(session_id, e)
        return exec_result(result)

    @server.tool(annotations=ToolAnnotations(destructive_hint=True, open_world_hint=False))
    async def upload_file(
        path: FilePath,
        content_base64: Annotated[str, Field(description="The file's bytes, base64.")],
        session_id: SessionId = DEFAULT_SESSION,
    ) -> CallToolResult:
        """Write a file into the session's work dir (replacing one of that name),
        starting the session's kernel if it has none."""
        if len(content_base64) > (max_bytes + 2) // 3 * 4 + 4:
            return failure(f"{path}: larger than the {max_bytes} bytes a file may have here",
                           status=413)
        try:
            data = base64.b64decode(content_base64, validate=True)
        except (binascii.Error, ValueError) as e:
            return failure(f"content_base64 is not base64: {e}", status=400)
        if len(data) > max_bytes:
            return failure(f"{path}: larger than the {max_bytes} bytes a file may have here",
                           status=413)
        try:
            async with pool.session(user, session_id) as (session, notices):
                await files_port.write_bytes(session.km.provisioner, path, data)
        except files_port.FileError as e:
            return failure(str(e), status=e.status)
        except (KernelLimitError, SandboxUnavailableError, LimitConfigError) as e:
            return not_started(session_id, e)
        # A kernel started or restarted for this upload says so, as execute_code does.
        lines = [f"{render.NOTICE} {notice}" for notice in notices]
        lines.append(f"wrote {path} ({len(data)} bytes) in session {session_id!r}")
        return CallToolResult(
            content=[TextContent(type="text", text="\n".join(lines))],
            structured_content={"path": path, "size": len(data), "session_id": session_id,
                                "notices": notices},
        )

    @server.tool(annotations=ToolAnnotations(read_only_hint=True, open_world_hint=False))
    async def download_file(path: FilePath, session_id: SessionId = DEFAULT_SESSION
                            ) -> CallToolResult:
        """Read a file of the session's work dir (e.g. a plot or CSV the code wrote):
        images come back as images, UTF-8 text as text, anything else as a base64 blob
        (an embedded resource)."""
        try:
            async with pool.session(user, session_id, start=False) as (session, _):
                if session is None:
                    return failure(f"session {session_id!r} has no running kernel, so no "
                                   "files; execute_code or upload_file starts one", status=404)
                data = await files_port.read_bytes(session.km.provisioner, path, max_bytes)
        except files_port.FileError as e:
            return failure(str(e), status=e.status)
        # The bytes travel once, in the content block (a second copy in the structured
        # content would double every message; the SDK's stdio client reads long lines in
        # quadratic time).
        content = file_content(session_id, path, data)
        mime = getattr(content[0], "mime_type", None) or content[0].resource.mime_type
        return CallToolResult(
            content=content,
            structured_content={"path": path, "size": len(data), "mime_type": mime,
                                "session_id": session_id},
        )

    @server.tool(annotations=ToolAnnotations(read_only_hint=True, open_world_hint=False))
    async def list_files(session_id: SessionId = DEFAULT_SESSION) -> CallToolResult:
        """The regular files in the session's work dir: path, size, modified (Unix time)."""
        async with pool.session(user, session_id, start=False) as (session, _):
            found = [] if session is None else await files_port.list_files(
                session.km.provisioner)
        lines = [f"{f['path']}\t{f['size']}" for f in found]
        text = "\n".join(lines) if lines else f"no files in session {session_id!r}"
        return CallToolResult(
            content=[TextContent(type="text", text=text)],
            structured_content={"session_id": session_id, "files": found},
        )

    @server.tool(annotations=ToolAnnotations(destructive_hint=True, open_world_hint=False))
    async def reset_session(session_id: SessionId = DEFAULT_SESSION) -> CallToolResult:
        """Shut the session's kernel down: its variables and files are gone; the next
        execute_code starts a fresh kernel."""
        kernel_id = await pool.delete(user, session_id)
        if kernel_id is None:
            text = (f"session {session_id!r} had no running kernel; the next execute_code "
                    "starts a fresh one")
        else:
            text = (f"session {session_id!r}: kernel {kernel_id} shut down; variables and "
                    "files are gone; the next execute_code starts a fresh kernel")
        return CallToolResult(
            content=[TextContent(type="text", text=text)],
            structured_content={"session_id": session_id, "kernel_id": kernel_id,
                                "reset": kernel_id is not None},
        )

    return server


async def serve(transport: str = "stdio", host: str = "127.0.0.1", port: int = 8766) -> None:
    """Open the pool, serve one transport until it ends, close the pool (kernels live on
    for the next start to re-adopt; ``idle_timeout`` culls the forgotten ones)."""
    mcp_settings = McpSettings.from_env()
    settings = backend_settings(mcp_settings.user)
    pool = KernelPool(settings)
    server = create_server(pool, mcp_settings)
    await pool.open()
    log.info(
        "serving %s for user %r (backend %s, server_id %s, files: %s)", transport,
        mcp_settings.user, settings.backend, settings.server_id, files_port.IMPLEMENTATION,
    )
    try:
        if transport == "stdio":
            await server.run_stdio_async()
        else:
            await server.run_streamable_http_async(host=host, port=port)
    finally:
        await pool.close()
