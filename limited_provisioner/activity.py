"""What a kernel is doing, observed by the provisioner itself on the kernel's IOPub.

ipykernel publishes ``status: busy`` / ``status: idle`` around every request it handles
(execute, complete, kernel_info, ...), so one SUB socket on IOPub tells us when the kernel
was last used and whether an execution is running right now — with or without
jupyter_server, whoever the clients are.  The monitor only reads; it never sends.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import zmq
import zmq.asyncio

log = logging.getLogger(__name__)

DELIM = b"<IDS|MSG>"
# Requests clients send by themselves on every (re)connect: answering them is not use.
# Counting them would let a client that reconnects more often than idle_timeout (a
# crash-looping agent service, a flapping browser tab) keep an abandoned kernel forever.
HOUSEKEEPING = frozenset({"kernel_info_request", "comm_info_request", "usage_request"})

_context: zmq.asyncio.Context | None = None


def _zmq_context() -> zmq.asyncio.Context:
    """Our own asyncio context: ``zmq.asyncio.Context.instance()`` can hand back a
    *sync* context that another library created first, whose sockets cannot be awaited."""
    global _context
    if _context is None or _context.closed:
        _context = zmq.asyncio.Context()
    return _context


def iopub_url(connection_info: dict[str, Any]) -> str:
    transport = connection_info.get("transport", "tcp")
    ip = connection_info["ip"]
    port = connection_info["iopub_port"]
    if transport == "ipc":
        return f"ipc://{ip}-{port}"
    return f"tcp://{ip}:{port}"


class ActivityMonitor:
    """Tracks ``last_activity`` and the execution in progress of one kernel."""

    def __init__(
        self,
        connection_info: dict[str, Any],
        last_activity: float | None = None,
        state_file: str | None = None,
    ):
        self.url = iopub_url(connection_info)
        self.last_activity = last_activity or time.time()
        # Written by the kernel's startup hook while an execution runs (IPython kernels):
        # more reliable than IOPub, whose thread C code holding the GIL can starve.
        self.state_file = state_file
        self._file: dict[str, Any] | None = None
        # msg_id of the execute_request being run and when it went busy (wall clock).
        self._executing: str | None = None
        self._executing_since: float | None = None
        # Requests being handled (control requests can overlap an execution).
        self._busy_parents: set[str] = set()
        self._socket: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._socket = _zmq_context().socket(zmq.SUB)
        self._socket.linger = 0
        self._socket.setsockopt(zmq.SUBSCRIBE, b"")
        self._socket.connect(self.url)
        self._task = asyncio.ensure_future(self._run())
        self._task.add_done_callback(self._log_failure)

    def _log_failure(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("activity monitor on %s stopped: %r", self.url, task.exception())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    def refresh(self) -> None:
        """Re-read the exec-state file (blocking: call it from a thread, once per check)."""
        self._file = None
        if not self.state_file:
            return
        try:
            with open(self.state_file) as f:
                self._file = json.load(f)
        except (OSError, ValueError):
            pass  # no execution running (or the file is being replaced)

    def _file_state(self) -> dict[str, Any] | None:
        return self._file

    @property
    def executing(self) -> str | None:
        state = self._file_state()
        if state is not None:
            return state.get("msg_id") or "unknown"
        return self._executing

    @property
    def executing_since(self) -> float | None:
        state = self._file_state()
        if state is not None:
            return float(state.get("since") or time.time())
        return self._executing_since

    @property
    def busy(self) -> bool:
        return bool(self._busy_parents) or self._file_state() is not None

    def idle_for(self, now: float | None = None) -> float:
        """Seconds since the last activity; 0 while a request is being handled."""
        if self.busy:
            return 0.0
        return max(0.0, (now or time.time()) - self.last_activity)

    def execution_running_for(self, now: float | None = None) -> float:
        since = self.executing_since
        if since is None:
            return 0.0
        return (now or time.time()) - since

    async def _run(self) -> None:
        assert self._socket is not None
        while True:
            frames = await self._socket.recv_multipart()
            try:
                self.observe(frames)
            except (ValueError, KeyError, TypeError):
                log.debug("unparsable iopub message on %s", self.url)

    def observe(self, frames: list[bytes]) -> None:
        """Update state from one IOPub message (identities, DELIM, sig, header, parent, ...)."""
        now = time.time()
        index = frames.index(DELIM)
        header = json.loads(frames[index + 2])
        parent = json.loads(frames[index + 3])
        if parent.get("msg_type") in HOUSEKEEPING:
            return
        self.last_activity = now
        if header.get("msg_type") != "status":
            return
        content = json.loads(frames[index + 5])
        state = content.get("execution_state")
        is_execute = parent.get("msg_type") == "execute_request"
        parent_id = parent.get("msg_id") or ""
        if state == "busy":
            self._busy_parents.add(parent_id)
            if is_execute:
                self._executing = parent_id
                self._executing_since = now
        elif state in ("idle", "dead"):
            self._busy_parents.discard(parent_id)
            if state == "dead":
                self._busy_parents.clear()
            if is_execute and parent_id == self._executing:
                self._executing = None
                self._executing_since = None
