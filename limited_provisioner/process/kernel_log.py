"""A process kernel's stdout and stderr: a pipe the server drains into a capped file.

A kernel writing to its file descriptors 1 and 2 directly (C code, ``os.write(1, ...)``,
a subprocess) must not reach the server's own streams — one cell could otherwise put
600 MB into the server's log — nor grow a file without bound. The server reads the pipe
on the package's event loop (_background.py; one bounded read per wake-up) and keeps the first
``limit`` bytes in ``<kernel dir>/kernel.log`` (root-only); the rest is counted and
dropped. When nobody drains the pipe (the server is gone), the kernel's writes block or
fail there: nothing accumulates anywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

READ_CHUNK = 64 * 1024
TAIL_BYTES = 2048


class KernelLog:
    """Drains one kernel process's output pipe into ``log_fd`` (at most ``limit`` bytes)."""

    def __init__(self, log_fd: int, limit: int, path: str):
        self.path = path
        self.limit = limit
        self.written = 0
        self.dropped = 0
        self._log_fd = log_fd
        self._read_fd, self.write_fd = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        # The kernel gets a blocking write end: a kernel that outpaces us waits, it
        # does not spin on EAGAIN.
        os.set_blocking(self.write_fd, True)
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """Start draining (call once the kernel holds the write end: it is closed here)."""
        os.close(self.write_fd)
        self.write_fd = -1
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._read_fd, self._drain)

    def _drain(self) -> None:
        try:
            data = os.read(self._read_fd, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        room = self.limit - self.written
        if room > 0:
            chunk = data[:room]
            with contextlib.suppress(OSError):
                os.write(self._log_fd, chunk)
            self.written += len(chunk)
            if len(chunk) < len(data):
                with contextlib.suppress(OSError):
                    os.write(
                        self._log_fd,
                        f"\n[limited-provisioner] kernel output past {self.limit} bytes "
                        f"is dropped\n".encode(),
                    )
        self.dropped += len(data) - max(0, min(room, len(data)))

    async def drained(self, timeout: float = 1.0) -> None:
        """Wait, at most ``timeout``, until every writer is gone and all it wrote is in the
        file (a descendant of the kernel may still hold the pipe: then what came so far)."""
        deadline = time.monotonic() + timeout
        while self._read_fd >= 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    def tail(self) -> str:
        """The last few lines the kernel wrote (for the server log when it dies)."""
        try:
            with open(self.path, "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - TAIL_BYTES))
                return f.read(TAIL_BYTES).decode(errors="replace")
        except OSError:
            return ""

    def close(self) -> None:
        if self._loop is not None and self._read_fd >= 0:
            with contextlib.suppress(Exception):  # loop already closed
                self._loop.remove_reader(self._read_fd)
        for fd in (self._read_fd, self.write_fd, self._log_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._read_fd = self.write_fd = self._log_fd = -1
