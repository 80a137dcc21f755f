"""HTTP API: ``POST /exec``, ``GET /sessions``, ``DELETE /sessions/{id}``, ``GET /health``,
and the files API of files_api.py (``/sessions/{id}/files``).

Run with ``python -m uvicorn --app-dir examples agent_backend.app:app`` (settings from
``AGENT_BACKEND_*`` environment variables, see README.md) or ``python -m agent_backend``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Header, HTTPException, Path, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

from limited_provisioner import KernelLimitError, LimitConfigError, SandboxUnavailableError

from . import render
from .auth import Authenticator, Refusal
from .files_api import files_router
from .kernels import ExecResult, KernelPool, refused
from .settings import Settings

SESSION_ID = r"^[A-Za-z0-9._:-]{1,128}$"
USER = r"^[A-Za-z0-9._@-]{1,64}$"


# -- who is calling ----------------------------------------------------------------------


_bearer = HTTPBearer(
    auto_error=False,
    description="An API key issued with 'python -m agent_backend keys add USER' "
    "(not needed behind a trusted proxy: AGENT_BACKEND_TRUST_X_USER=1).",
)


def current_user(
    request: Request,
    _: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    x_user: Annotated[
        str | None,
        Header(
            alias="X-User",
            pattern=USER,
            description="The calling user. With API keys: the user the key was issued "
            "to (optional: the key names its user). Behind a trusted proxy "
            "(AGENT_BACKEND_TRUST_X_USER=1): required, set by the proxy, taken as given.",
        ),
    ] = None,
) -> str:
    """The authenticated caller: the one place every endpoint but /health gets it from.

    Every kernel counts against its owner's max_kernels_per_user; sessions are keyed by
    (user, session_id), so another user's session is simply not found (404).
    """
    authenticator: Authenticator = request.app.state.auth
    try:
        return authenticator.authenticate(x_user, request.headers.get("authorization"))
    except Refusal as e:
        raise HTTPException(e.status, e.message, headers=e.headers()) from None


class RateLimiter:
    """At most ``per_minute`` executions per user in any 60 s window (0 = off).

    Kept in memory: a restart of the service forgets the window (the kernels, which are
    what costs, are in the registry). Users with no recent execution are forgotten, so
    the table stays as small as the set of active users.
    """

    def __init__(self, per_minute: int, window: float = 60.0):
        self.per_minute = per_minute
        self.window = window
        self._seen: dict[str, deque[float]] = {}

    def admit(self, user: str, now: float | None = None) -> float | None:
        """Record an execution and return None, or return seconds until one is allowed."""
        if not self.per_minute:
            return None
        now = time.monotonic() if now is None else now
        for name in [u for u, q in self._seen.items() if q and q[-1] <= now - self.window]:
            del self._seen[name]
        recent = self._seen.setdefault(user, deque())
        while recent and recent[0] <= now - self.window:
            recent.popleft()
        if len(recent) >= self.per_minute:
            return recent[0] + self.window - now
        recent.append(now)
        return None

    def refusal(self, user: str, did: str) -> tuple[str, int] | None:
        """:meth:`admit`, as the refusal's message and the seconds to Retry-After (None:
        admitted). ``did``: what the user did that many times ("ran ... executions")."""
        wait = self.admit(user)
        if wait is None:
            return None
        retry = max(1, math.ceil(wait))
        message = (
            f"rate_limit={self.per_minute}/min reached: user {user!r} "
            f"{did.format(n=self.per_minute)} in the last 60 s; retry in {retry} s"
        )
        return message, retry


# -- request and response bodies ---------------------------------------------------------


class ExecRequest(BaseModel):
    session_id: str = Field(
        pattern=SESSION_ID,
        description="Caller-chosen id of the conversation; one kernel (and its variables) "
        "per (user, session_id), started on first use.",
    )
    code: str = Field(max_length=200_000, description="Python source to run in the session.")


class Output(BaseModel):
    output_type: Literal["execute_result", "display_data", "error"]
    text: str | None = Field(None, description="text/plain of a result or display.")
    mime_types: list[str] | None = None
    png: str | None = Field(
        None, description="image/png of a result or display (a plot), base64: hand it to "
        "the model as an image.")
    ename: str | None = None
    evalue: str | None = None
    traceback: list[str] | None = Field(None, description="Without ANSI colour codes.")


class ExecResponse(BaseModel):
    status: Literal["ok", "error", "timeout", "oom_killed", "limit_refused"]
    session_id: str
    kernel_id: str | None = None
    stdout: str = ""
    stderr: str = ""
    outputs: list[Output] = []
    text: str = Field(
        description="Everything above as plain text, ending with the line "
        "'[limited-provisioner status=<status>] <what happened>'. Give this to the model."
    )
    state_lost: bool = Field(
        False, description="The kernel was restarted: variables from earlier cells are gone."
    )
    files_kept: bool = Field(
        False, description="The session's kernel had been culled for idle_timeout and was "
        "replaced: variables are gone, but its work dir's files were kept (keep_files_for).",
    )
    limit: str | None = Field(None, description="The limit involved, e.g. mem_limit.")
    reason: str | None = None
    notices: list[str] = []
    limit_trips: list[dict[str, Any]] = []


class SessionInfo(BaseModel):
    session_id: str | None
    kernel_id: str
    backend: str | None = None
    created: float | None = None
    last_activity: float | None = None
    limits: dict[str, Any] | None = None


def _answer(result: ExecResult, status_code: int = 200, **headers: str) -> JSONResponse:
    return JSONResponse(asdict(result), status_code=status_code, headers=headers or None)


# -- the application -----------------------------------------------------------------------


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    pool = KernelPool(settings)
    limiter = RateLimiter(settings.rate_limit)
    auth = Authenticator(settings.keys_path, settings.trust_x_user)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Raises (the service does not start) if the keys file is unsafe or malformed.
        mode = await asyncio.to_thread(auth.start)
        logging.getLogger("agent_backend").warning("%s", mode)
        await pool.open()
        yield
        await pool.close()  # kernels keep running; the next start re-adopts them

    app = FastAPI(
        title="agent_backend: limited Python sessions for LLM agents",
        summary="Runs model-written Python in resource-limited Jupyter kernels.",
        lifespan=lifespan,
    )
    app.state.pool = pool
    app.state.settings = settings
    app.state.auth = auth
    # Files in and out of sessions: same caller, ownership and rate (its own window).
    app.include_router(files_router(pool, RateLimiter(settings.rate_limit), current_user))

    @app.post(
        "/exec",
        response_model=ExecResponse,
        responses={
            429: {"model": ExecResponse, "description": "status limit_refused"},
            503: {"model": ExecResponse, "description": "no kernel could be started (reason)"},
        },
    )
    async def execute(
        request: ExecRequest, user: Annotated[str, Depends(current_user)]
    ) -> JSONResponse:
        """Run code in the caller's session; the result's ``text`` is what a model reads."""
        refusal = limiter.refusal(user, "ran {n} executions")
        if refusal is not None:
            message, retry = refusal
            return _answer(
                refused(request.session_id, "rate_limit", message), 429, **{"Retry-After": str(retry)}
            )
        try:
            result = await pool.execute(user, request.session_id, request.code)
        except KernelLimitError as e:
            # A cap of the provisioner (max_kernels, max_kernels_per_user, mem_budget, ...)
            # refused the session's kernel; its message names the limit and the count.
            return _answer(refused(request.session_id, e.limit or "kernel_limit", str(e)), 429)
        except (SandboxUnavailableError, LimitConfigError) as e:
            result = ExecResult(
                status="error",
                session_id=request.session_id,
                reason=str(e),
                text=render.marker("error", f"no kernel could be started: {e}"),
            )
            return _answer(result, 503)
        return _answer(result)

    @app.get("/sessions", response_model=list[SessionInfo])
    async def sessions(user: Annotated[str, Depends(current_user)]) -> list[dict[str, Any]]:
        """The caller's sessions with a running kernel (from the kernel registry)."""
        return await pool.list_sessions(user)

    @app.delete("/sessions/{session_id}")
    async def delete_session(
        session_id: Annotated[str, Path(pattern=SESSION_ID)],
        user: Annotated[str, Depends(current_user)],
    ) -> dict[str, str]:
        """Shut the session's kernel down (its variables and files are gone, files kept
        from a culled kernel of the session too)."""
        kernel_id = await pool.delete(user, session_id)
        if kernel_id is None:
            raise HTTPException(404, f"no session {session_id!r} of user {user!r}")
        return {"session_id": session_id, "kernel_id": kernel_id, "status": "deleted"}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "sessions": len(pool.sessions), "server_id": settings.server_id}

    return app


def _configure_logging() -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")


_configure_logging()
app = create_app()
