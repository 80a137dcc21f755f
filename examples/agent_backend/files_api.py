"""HTTP files API: upload, download, list and delete files in a session's work dir.

``PUT /sessions/{session_id}/files/{path}`` (the body is the file, streamed),
``GET /sessions/{session_id}/files/{path}`` (streamed back),
``GET /sessions/{session_id}/files`` (listing) and ``DELETE …/files/{path}``, with the
caller, ownership and rate limit of ``POST /exec``. The work is done by
``limited_provisioner.files`` on the kernel's private work dir from the server side:
the kernel's own code is never asked to serve anything (it is the attacker).
"""

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from limited_provisioner import KernelLimitError, LimitConfigError, SandboxUnavailableError
from limited_provisioner.files import FileError, WorkDir, split_path

SESSION_ID = r"^[A-Za-z0-9._:-]{1,128}$"


class FileEntry(BaseModel):
    path: str = Field(description="Relative to the session's work dir, '/'-separated.")
    size: int = Field(description="Bytes.")
    modified: float = Field(description="Last modification, seconds since the epoch.")


class FileListing(BaseModel):
    session_id: str
    files: list[FileEntry]
    truncated: bool = Field(
        description="The listing stopped at 10000 entries or 32 directories deep.")


class Written(BaseModel):
    session_id: str
    path: str
    size: int
    modified: float


def _error(e: FileError) -> HTTPException:
    headers = None
    limit = getattr(e, "limit", None)
    if limit is not None:
        headers = {"X-Disk-Limit": str(limit)}
    return HTTPException(e.status, str(e), headers=headers)


def files_router(pool: Any, limiter: Any, current_user: Callable[..., str]) -> APIRouter:
    """The routes, on the service's ``KernelPool``, a ``RateLimiter`` (of its own: file
    requests do not use up executions) and the service's caller dependency."""
    router = APIRouter(tags=["files"])
    User = Annotated[str, Depends(current_user)]
    Session = Annotated[str, Path(pattern=SESSION_ID)]
    FilePath = Annotated[str, Path(description="Relative to the session's work dir.")]

    def admit(user: str) -> None:
        refusal = limiter.refusal(user, "made {n} file requests")
        if refusal is not None:
            msg, retry = refusal
            raise HTTPException(429, msg, headers={"Retry-After": str(retry)})

    async def work_dir(user: str, session_id: str, *, start: bool = False) -> WorkDir:
        try:
            prov = await pool.provisioner(user, session_id, start=start)
        except KernelLimitError as e:
            raise HTTPException(429, str(e)) from None
        except (SandboxUnavailableError, LimitConfigError) as e:
            raise HTTPException(503, f"no kernel could be started: {e}") from None
        if prov is None:
            raise HTTPException(404, f"no session {session_id!r} of user {user!r}")
        try:
            return WorkDir.of(prov)
        except FileError as e:
            raise _error(e) from None

    @router.put(
        "/sessions/{session_id}/files/{path:path}",
        response_model=Written,
        responses={400: {"description": "path refused"}, 413: {"description": "over disk_limit"},
                   429: {"description": "rate limit, or a cap refused the session's kernel"}},
    )
    async def upload(session_id: Session, path: FilePath, request: Request,
                     user: User) -> dict[str, Any]:
        """Write the request body to ``path`` in the session's work dir (replacing it),
        starting the session's kernel if it has none, so files can be uploaded before the
        first execution. Owned by the kernel, mode 0644; refused with 413 when it does not
        fit the kernel's disk_limit (checked against Content-Length before a byte is
        written, and while streaming)."""
        admit(user)
        try:
            split_path(path)  # a refused path starts no kernel
        except FileError as e:
            raise _error(e) from None
        length = request.headers.get("content-length")
        size = int(length) if length and length.isdigit() else None
        wd = await work_dir(user, session_id, start=True)
        try:
            info = await wd.write(path, request.stream(), size=size)
        except FileError as e:
            raise _error(e) from None
        return {"session_id": session_id, **info.to_dict()}

    @router.get(
        "/sessions/{session_id}/files/{path:path}",
        response_class=StreamingResponse,
        responses={200: {"content": {"application/octet-stream": {}}},
                   400: {"description": "path refused, or not a regular file"},
                   404: {"description": "no such session or file"}},
    )
    async def download(session_id: Session, path: FilePath, user: User) -> StreamingResponse:
        """The file's bytes, streamed (``application/octet-stream``, Content-Length)."""
        admit(user)
        wd = await work_dir(user, session_id)
        try:
            reader = await wd.open_read(path)
        except FileError as e:
            raise _error(e) from None
        name = reader.info.path.rsplit("/", 1)[-1]
        quoted = "".join(c if " " <= c <= "~" and c not in '"\\' else "_" for c in name)
        return StreamingResponse(
            reader.chunks(), media_type="application/octet-stream",
            headers={"Content-Length": str(reader.size),
                     "Content-Disposition": f'attachment; filename="{quoted}"'},
        )

    @router.get("/sessions/{session_id}/files", response_model=FileListing)
    async def listing(session_id: Session, user: User,
                      hidden: Annotated[bool, Query(description="Include names starting "
                                                    "with '.' (.ipython, .cache, …).")] = False
                      ) -> dict[str, Any]:
        """The regular files in the session's work dir, sorted by path."""
        admit(user)
        wd = await work_dir(user, session_id)
        try:
            found = await wd.list_files(hidden=hidden)
        except FileError as e:
            raise _error(e) from None
        return {"session_id": session_id, "files": [f.to_dict() for f in found.files],
                "truncated": found.truncated}

    @router.delete("/sessions/{session_id}/files/{path:path}")
    async def delete(session_id: Session, path: FilePath, user: User) -> JSONResponse:
        """Remove a regular file from the session's work dir."""
        admit(user)
        wd = await work_dir(user, session_id)
        try:
            await wd.delete(path)
        except FileError as e:
            raise _error(e) from None
        return JSONResponse({"session_id": session_id, "path": path, "status": "deleted"})

    return router
