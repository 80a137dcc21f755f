"""One limited kernel per (user, session): start, re-adopt, execute, restart, delete.

The kernel registry of limited-provisioner is the record of which kernel serves which
session: every kernel carries ``labels={"session_id": ...}`` and its caller as
``owner``, and :meth:`KernelPool.recover` rebuilds the map from
``limited_provisioner.list_kernels()`` + ``adopt()`` when the service starts. The dict
here is a cache of that registry: losing it (a crash) loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

from limited_provisioner import AdoptionError, adopt, kept_files, list_kernels, reap_orphans
from limited_provisioner import pool as warm_pool
from limited_provisioner.limits import format_size

from . import render
from .render import Execution
from .settings import Settings

log = logging.getLogger("agent_backend")

SESSION_LABEL = "session_id"
# How often a running execution checks that its kernel is still there.
POLL_INTERVAL = 0.25
READY_TIMEOUT = 60.0
# How often sessions whose kernel the provisioner shut down (idle_timeout) are dropped,
# and how many of their reasons are remembered for the session's next request.
SWEEP_INTERVAL = 30.0
ENDED_MEMORY = 1000

Key = tuple[str, str]  # (user, session_id)


@dataclass
class ExecResult:
    """The answer to one ``POST /exec`` (see README.md for each field)."""

    status: str
    session_id: str
    kernel_id: str | None = None
    stdout: str = ""
    stderr: str = ""
    outputs: list[dict[str, Any]] = field(default_factory=list)
    text: str = ""
    state_lost: bool = False
    files_kept: bool = False
    limit: str | None = None
    reason: str | None = None
    notices: list[str] = field(default_factory=list)
    limit_trips: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Session:
    user: str
    session_id: str
    km: AsyncKernelManager
    kc: Any  # AsyncKernelClient
    # Notices from a (re)start a file request caused, for the next execution's result
    # (a model must learn that its variables are gone even if a download restarted it).
    pending_notices: list[str] = field(default_factory=list)

    @property
    def kernel_id(self) -> str:
        return self.km.kernel_id


def refused(session_id: str, limit: str, message: str) -> ExecResult:
    """The result for an execution refused before it ran (a cap or the rate limit)."""
    return ExecResult(
        status="limit_refused",
        session_id=session_id,
        limit=limit,
        reason=message,
        text=render.marker("limit_refused", render.refused_sentence(message)),
    )


def _incarnation(km: AsyncKernelManager) -> tuple[Any, Any]:
    """Changes when the kernel's process/container is replaced (a restart)."""
    prov = km.provisioner
    return getattr(prov, "pid", None), getattr(prov, "container_id", None)


def _mem_limit(km: AsyncKernelManager) -> str | None:
    mem = getattr(getattr(km.provisioner, "limits", None), "mem_limit", None)
    return format_size(mem) if mem else None


def _last(trips: list[dict[str, Any]], kind: str) -> str:
    return [t for t in trips if t["kind"] == kind][-1]["reason"]


class KernelPool:
    """The service's sessions; every public coroutine is safe to call concurrently."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.ksm = KernelSpecManager(kernel_dirs=[str(settings.kernelspec_dir)])
        self.sessions: dict[Key, Session] = {}
        # Per session: its start, executions and deletion never overlap. A lock exists
        # only while someone holds or waits for it, so this cannot grow without bound.
        self._locks: dict[Key, tuple[asyncio.Lock, int]] = {}
        # Why the kernel of a dropped session ended, for that session's next request.
        self._ended: OrderedDict[Key, str] = OrderedDict()
        self._sweeper: asyncio.Task | None = None

    # -- start-up and shut-down -------------------------------------------------------

    async def open(self) -> None:
        """Write the service's kernelspec, then re-adopt the kernels of its sessions."""
        await asyncio.to_thread(self._write_kernelspec)
        await self.recover()
        self._sweeper = asyncio.ensure_future(self._sweep_periodically())
        if self.settings.pool_size:
            # Sessions to come claim a started kernel (pool.py); filled in the background.
            await warm_pool.warm(self._manager(kernel_name=self.settings.kernel_name))

    def _write_kernelspec(self) -> None:
        s = self.settings
        spec_dir = s.kernelspec_dir / s.kernel_name
        spec_dir.mkdir(parents=True, exist_ok=True)
        spec = {
            "argv": s.kernel_argv(),
            "display_name": f"Python (limited, {s.backend}) for agent_backend",
            "language": "python",
            "metadata": {
                "kernel_provisioner": {
                    "provisioner_name": s.provisioner_name,
                    "config": s.provisioner_config(),
                }
            },
        }
        path = spec_dir / "kernel.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(spec, indent=1))
        os.replace(tmp, path)

    async def recover(self) -> None:
        """Rebuild ``(user, session_id) -> kernel`` from the registry after a restart.

        Every running kernel of this service (``server_id``) is adopted under its session;
        a kernel without a session label, or a second kernel of one session, has no
        session to serve and is shut down instead of being left running.
        """
        s = self.settings
        # First what the previous process left half-done (a start it was killed in the
        # middle of never reaches "running", so nobody would adopt or stop it).
        await asyncio.to_thread(reap_orphans, s.state_dir, server_id=s.server_id)
        entries = await asyncio.to_thread(list_kernels, s.state_dir, server_id=s.server_id)
        keep: dict[Key, dict[str, Any]] = {}
        extra: list[dict[str, Any]] = []
        # Latest activity first: should a session have two kernels, keep the one used last.
        for entry in sorted(entries, key=lambda e: -(e.get("last_activity") or 0)):
            session_id = (entry.get("labels") or {}).get(SESSION_LABEL)
            key = (entry.get("owner", ""), session_id)
            if session_id and key not in keep:
                keep[key] = entry
            else:
                extra.append(entry)
        await asyncio.gather(
            *(self._adopt_session(key, e["kernel_id"]) for key, e in keep.items()),
            *(self._shut_down_unused(e["kernel_id"]) for e in extra),
        )
        log.info(
            "recovered %d session(s); %d kernel(s) without a session shut down",
            len(self.sessions), len(extra),
        )

    async def _adopt(self, kernel_id: str) -> AsyncKernelManager:
        return await adopt(
            kernel_id,
            state_dir=self.settings.state_dir,
            factory=self._manager,
            **self.settings.adoption_config(),
        )

    async def _adopt_session(self, key: Key, kernel_id: str) -> None:
        try:
            km = await self._adopt(kernel_id)
        except AdoptionError as e:  # died meanwhile, or another live process has it
            log.warning("session %s of %s not recovered: %s", key[1], key[0], e)
            return
        try:
            kc = await self._connect(km)
        except Exception:  # unreachable: shut it down rather than leave it unmanaged
            log.exception("kernel %s adopted but not answering; shutting it down", kernel_id)
            await km.shutdown_kernel(now=True)
            return
        self.sessions[key] = Session(key[0], key[1], km, kc)
        log.info("session %s of %s: re-adopted kernel %s", key[1], key[0], kernel_id)

    async def _shut_down_unused(self, kernel_id: str) -> None:
        try:
            km = await self._adopt(kernel_id)
        except AdoptionError as e:  # already gone, or managed by another live process
            log.warning("kernel %s without a session not shut down: %s", kernel_id, e)
            return
        await km.shutdown_kernel(now=True)
        log.info("kernel %s had no session any more; shut down", kernel_id)

    async def close(self) -> None:
        """Leave every kernel running for the next start of the service to re-adopt."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        await warm_pool.drain_all()  # pooled kernels are nobody's: not left for adoption
        for session in self.sessions.values():
            session.kc.stop_channels()
            if session.km.provisioner is not None:
                await session.km.provisioner.detach()  # keeps the connection file
        self.sessions.clear()

    # -- sessions -------------------------------------------------------------------

    def _manager(self, **kwargs: Any) -> AsyncKernelManager:
        return AsyncKernelManager(kernel_spec_manager=self.ksm, **kwargs)

    async def _connect(self, km: AsyncKernelManager) -> Any:
        kc = km.client()
        kc.start_channels()
        try:
            await kc.wait_for_ready(timeout=READY_TIMEOUT)
        except BaseException:
            kc.stop_channels()
            raise
        return kc

    async def _reconnect(self, session: Session) -> None:
        session.kc.stop_channels()
        session.kc = await self._connect(session.km)

    async def _start(self, user: str, session_id: str) -> Session:
        """Start a kernel for the session; KernelLimitError if a cap refuses it."""
        km = self._manager(kernel_name=self.settings.kernel_name)
        # The owner travels in the start env (allow_owner_from_start_env in the kernelspec).
        env = {**os.environ, "LIMITED_PROVISIONER_OWNER": user}
        await km.start_kernel(env=env, labels={SESSION_LABEL: session_id})
        try:
            kc = await self._connect(km)
        except BaseException:
            await km.shutdown_kernel(now=True)
            raise
        log.info("session %s of %s: started kernel %s", session_id, user, km.kernel_id)
        return Session(user, session_id, km, kc)

    async def _drop(self, key: Key, reason: str | None = None) -> None:
        """Forget a session (shutting its kernel down if it still has one)."""
        session = self.sessions.pop(key, None)
        if session is None:
            return
        session.kc.stop_channels()
        if session.km.has_kernel:
            await session.km.shutdown_kernel(now=True)
        if reason:
            self._ended[key] = reason
            while len(self._ended) > ENDED_MEMORY:
                self._ended.popitem(last=False)

    @contextlib.asynccontextmanager
    async def _locked(self, key: Key) -> AsyncIterator[None]:
        lock, users = self._locks.get(key) or (asyncio.Lock(), 0)
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    async def _sweep_periodically(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            try:  # other processes' leftovers too (this process's kernels are safe)
                await asyncio.to_thread(reap_orphans, self.settings.state_dir, all_servers=True)
            except Exception:
                log.exception("reaping orphans failed")
            for key, session in list(self.sessions.items()):
                if session.km.has_kernel or key in self._locks:
                    continue
                # The provisioner shut it down (idle_timeout, max_lifetime).
                try:
                    await self._drop(key, getattr(session.km.provisioner, "exit_reason", None))
                except Exception:  # one bad session must not end the sweep
                    log.exception("dropping session %s of %s failed", key[1], key[0])

    async def _ensure(self, key: Key, notices: list[str]) -> Session:
        """The session's kernel, running and connected; started if there is none."""
        session = self.sessions.get(key)
        if session is not None:
            km = session.km
            if not km.ready.done():  # the provisioner is restarting or culling it
                with contextlib.suppress(Exception):  # a failed restart is judged below
                    await asyncio.wait_for(asyncio.shield(km.ready), READY_TIMEOUT)
            if not km.has_kernel:
                await self._drop(key, getattr(km.provisioner, "exit_reason", None))
                session = None
            elif not await km.is_alive():
                reason = getattr(km.provisioner, "exit_reason", None) or "reason unknown"
                await km.restart_kernel(now=True)
                await self._reconnect(session)
                notices.append(
                    f"this session's kernel died while idle ({reason}) and was restarted; "
                    f"{render.STATE_LOST}"
                )
        if session is None:
            session = await self._start(*key)
            self.sessions[key] = session
            ended = self._ended.pop(key, None)
            # The provisioner gave the new kernel the culled one's files (keep_files_for).
            restored = getattr(session.km.provisioner, "files_restored", None)
            if ended or restored:
                notices.append(render.new_kernel_notice(ended, files_kept=bool(restored)))
        return session

    @staticmethod
    def _came_back(session: Session, result: ExecResult, notices: list[str]) -> None:
        """A session whose culled kernel was replaced: state lost, files maybe kept."""
        if any(n.startswith(render.NEW_KERNEL) for n in notices):
            result.state_lost = True
            result.files_kept = bool(getattr(session.km.provisioner, "files_restored", None))

    async def execute(self, user: str, session_id: str, code: str) -> ExecResult:
        """Run ``code`` in the session's kernel (started on first use) and classify it.

        Raises ``KernelLimitError`` when a cap refuses the session's new kernel.
        """
        key = (user, session_id)
        async with self._locked(key):
            notices: list[str] = []
            session = await self._ensure(key, notices)
            notices[:0], session.pending_notices = session.pending_notices, []
            result, chunks, sentence = await self._run(session, code)
            self._came_back(session, result, notices)
            result.notices[:0] = notices
            result.text = render.render_text(chunks, result.notices, result.status, sentence)
            return result

    @contextlib.asynccontextmanager
    async def session(
        self, user: str, session_id: str, *, start: bool = True
    ) -> AsyncIterator[tuple[Session | None, list[str]]]:
        """The session's running kernel (started if ``start`` and there is none, else
        None) and the notices about it, held so that no execution, start or deletion of
        the session overlaps: for work on the kernel's files. Raises what ``execute``
        raises when a cap refuses the new kernel."""
        key = (user, session_id)
        async with self._locked(key):
            notices: list[str] = []
            if start:
                # The caller reports ``notices`` itself (the MCP server's file tools).
                yield await self._ensure(key, notices), notices
            else:
                session = self.sessions.get(key)
                yield (session if session is not None and session.km.has_kernel else None), notices

    async def delete(self, user: str, session_id: str) -> str | None:
        """Shut the session's kernel down and delete the files kept from its culled
        kernel; its kernel id (the culled one's if only kept files were left), or None
        if there is neither."""
        key = (user, session_id)
        async with self._locked(key):
            session = self.sessions.get(key)
            self._ended.pop(key, None)
            try:
                kept = await asyncio.to_thread(
                    kept_files.forget, self.settings.state_dir, user, SESSION_LABEL, session_id
                )
            except Exception:  # the kernel's shutdown below matters more
                log.exception("session %s of %s: kept files not deleted", session_id, user)
                kept = None
            if session is None:
                return kept.get("kernel_id") if kept else None
            await self._drop(key)
            log.info("session %s of %s: kernel %s shut down", session_id, user, session.kernel_id)
            return session.kernel_id

    async def provisioner(self, user: str, session_id: str, *, start: bool = False) -> Any:
        """The provisioner of the session's running kernel (files_api.py works on its work
        dir), or None if there is none; ``start``: start the session's kernel as the first
        execution would (raises ``KernelLimitError`` like it)."""
        key = (user, session_id)
        async with self._locked(key):
            session = self.sessions.get(key)
            running = session is not None and session.km.has_kernel
            if start or (not running and await asyncio.to_thread(
                    kept_files.waiting, self.settings.state_dir, user, SESSION_LABEL,
                    session_id)):
                # A culled session's kept files come back with its next kernel: a file
                # request starts it, as /exec would, and the next /exec says so.
                notices: list[str] = []
                session = await self._ensure(key, notices)
                session.pending_notices.extend(notices)
                return session.km.provisioner
            return session.km.provisioner if running else None

    async def list_sessions(self, user: str) -> list[dict[str, Any]]:
        """The user's sessions with a running kernel, read from the registry."""
        s = self.settings
        entries = await asyncio.to_thread(
            list_kernels, s.state_dir, server_id=s.server_id, owner=user
        )
        return [
            {
                "session_id": (e.get("labels") or {}).get(SESSION_LABEL),
                "kernel_id": e.get("kernel_id"),
                "backend": e.get("backend"),
                "created": e.get("created"),
                "last_activity": e.get("last_activity"),
                "limits": e.get("limits"),
            }
            for e in entries
        ]

    # -- one execution -----------------------------------------------------------------

    def _ceiling(self, km: AsyncKernelManager) -> float:
        """Longest wait for a reply: exec_timeout plus grace plus a margin, if set."""
        prov = km.provisioner
        exec_timeout = getattr(getattr(prov, "limits", None), "exec_timeout", 0)
        if exec_timeout:
            grace = float(getattr(prov, "exec_timeout_grace", 0) or 0)
            return min(self.settings.reply_ceiling, exec_timeout + grace + 30)
        return self.settings.reply_ceiling

    async def _collect(self, kc: Any, msg_id: str, execution: Execution) -> None:
        while True:
            msg = await kc.get_iopub_msg()
            if msg.get("parent_header", {}).get("msg_id") == msg_id and execution.handle(msg):
                break
        while True:
            reply = await kc.get_shell_msg()
            if reply.get("parent_header", {}).get("msg_id") == msg_id:
                execution.reply = reply
                return

    async def _wait(self, km: AsyncKernelManager, io: asyncio.Future, ceiling: float) -> str:
        """``"reply"``, ``"kernel_gone"`` (died, replaced or stopped) or ``"ceiling"``."""
        incarnation = _incarnation(km)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ceiling
        while True:
            done, _ = await asyncio.wait({io}, timeout=POLL_INTERVAL)
            if done:
                return "reply" if io.exception() is None else "kernel_gone"
            if (
                not km.ready.done()  # being restarted (exec_timeout grace) or shut down
                or not km.has_kernel
                or _incarnation(km) != incarnation
                or not await km.is_alive()  # records why it died (mem_limit, ...)
            ):
                return "kernel_gone"
            if loop.time() > deadline:
                return "ceiling"

    async def _run(self, session: Session, code: str) -> tuple[ExecResult, list[str], str]:
        """Execute and classify; returns the result, the output chunks, the marker sentence."""
        km = session.km
        prov = km.provisioner
        trips_before = len(prov.limit_trips)
        incarnation = _incarnation(km)
        execution = Execution()
        msg_id = session.kc.execute(code, allow_stdin=False, stop_on_error=False)
        io = asyncio.ensure_future(self._collect(session.kc, msg_id, execution))
        ceiling = self._ceiling(km)
        try:
            outcome = await self._wait(km, io, ceiling)
        finally:
            if not io.done():
                io.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await io
        io_error = None if io.cancelled() else io.exception()
        trips = list(prov.limit_trips[trips_before:])
        exit_reason = prov.exit_reason  # before a restart clears it
        result = ExecResult(
            status="ok",
            session_id=session.session_id,
            kernel_id=session.kernel_id,
            stdout=execution.stdout,
            stderr=execution.stderr,
            outputs=execution.outputs,
            limit_trips=trips,
        )
        mem = _mem_limit(km)
        chunks = execution.chunks
        if outcome == "reply":
            return result, chunks, self._classify_reply(result, execution, trips, mem)
        if outcome == "ceiling":
            await km.restart_kernel(now=True)
            await self._reconnect(session)
            result.status, result.state_lost = "timeout", True
            result.reason = f"no reply within {ceiling:g}s; kernel restarted"
            return result, chunks, render.timeout_restart_sentence(result.reason)

        await self._recover_kernel(session)
        kinds = {t["kind"] for t in trips}
        result.state_lost = _incarnation(km) != incarnation or not km.has_kernel
        if "mem_limit" in kinds:
            result.status, result.limit = "oom_killed", "mem_limit"
            result.reason = _last(trips, "mem_limit")
            return result, chunks, render.oom_sentence(mem, result.reason)
        if "exec_timeout" in kinds and result.state_lost:
            result.status, result.limit = "timeout", "exec_timeout"
            result.reason = _last(trips, "exec_timeout")
            return result, chunks, render.timeout_restart_sentence(result.reason)
        result.status = "error"
        if not result.state_lost:  # the kernel lives on: only its reply got lost
            result.reason = f"lost the kernel's reply ({io_error!r})"
            return result, chunks, render.lost_reply_sentence(result.reason)
        result.reason = exit_reason or (trips[-1]["reason"] if trips else "reason unknown")
        result.limit = trips[-1]["kind"] if trips else None
        if km.has_kernel:
            return result, chunks, render.died_sentence(result.reason)
        return result, chunks, render.closed_sentence(result.reason)

    async def _recover_kernel(self, session: Session) -> None:
        """After the kernel died or was replaced mid-execution: a running kernel again."""
        km = session.km
        if not km.ready.done():  # the provisioner is restarting it (exec_timeout grace)
            await asyncio.wait_for(asyncio.shield(km.ready), READY_TIMEOUT)
        if not km.has_kernel:
            # Stopped for good (max_lifetime): the next execution starts a new kernel.
            await self._drop((session.user, session.session_id))
            return
        if not await km.is_alive():
            await km.restart_kernel(now=True)
        await self._reconnect(session)

    def _classify_reply(
        self, result: ExecResult, execution: Execution, trips: list[dict], mem: str | None
    ) -> str:
        """Status from the execute reply (the kernel lived); returns the marker sentence."""
        # Limits that tripped without ending the kernel (a child OOM-killed, forks refused).
        result.notices.extend(t["reason"] for t in trips if t["kind"] != "exec_timeout")
        error = execution.error
        if error is None:
            return render.ok_sentence()
        result.status = "error"
        ename = error.get("ename", "")
        if ename == "TimeoutError" and any(t["kind"] == "exec_timeout" for t in trips):
            result.status, result.limit = "timeout", "exec_timeout"
            result.reason = _last(trips, "exec_timeout")
            return render.interrupted_sentence(result.reason)
        if ename == "MemoryError":
            result.limit = "mem_limit"
        return render.exception_sentence(ename, mem)
