"""The launcher's word on the sandbox: did the kernel command start, or what failed.

``launch.py`` gets the write end of a pipe (``status_fd`` in its spec, kept open by
``pass_fds``). It holds it close-on-exec: when the kernel command is exec'd the pipe
closes and the read end here sees EOF ("started"); when setting up the sandbox fails
it writes its message first. Without this a failed setup looked like a kernel that
started and died at once: jupyter_client returned, jupyter_server answered 201 and its
restarter tried again five times before the kernel vanished.
"""

from __future__ import annotations

import asyncio
import contextlib
import os

from .launch import EXEC_FAILED, STATUS_LIMIT

# Setting up a sandbox takes milliseconds; a launcher silent this long is stuck (a
# cgroup write or a mount hanging) and the start is given up.
SETUP_TIMEOUT = 30.0


class LaunchStatus:
    """One start's status pipe: ``write_fd`` for the launcher, the read end stays here."""

    def __init__(self) -> None:
        # Both ends non-inheritable: only Popen's pass_fds hands the write end over.
        self._read_fd, self.write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        self._write_open = True

    def launched(self) -> None:
        """Close our copy of the write end once the launcher holds its own, so that the
        launcher's exec (or exit) alone decides when the read end sees EOF."""
        if self._write_open:
            os.close(self.write_fd)
            self._write_open = False

    async def failure(self, timeout: float = SETUP_TIMEOUT) -> str | None:
        """None once the kernel command runs; else what the launcher said went wrong.

        Waits on the event loop (a reader callback, no thread); reads at most
        ``STATUS_LIMIT`` bytes of message.
        """
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        chunks: list[bytes] = []
        size = 0

        def readable() -> None:
            nonlocal size
            try:
                data = os.read(self._read_fd, STATUS_LIMIT)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if data:
                chunks.append(data)
                size += len(data)
            if (not data or size >= STATUS_LIMIT) and not done.done():
                done.set_result(None)

        loop.add_reader(self._read_fd, readable)
        try:
            await asyncio.wait_for(done, timeout)
        except asyncio.TimeoutError:
            return (
                f"the launcher did not finish setting up the sandbox within {timeout:g} s "
                f"(see kernel.log)"
            )
        finally:
            loop.remove_reader(self._read_fd)
        text = b"".join(chunks)[:STATUS_LIMIT].decode(errors="replace").strip()
        return text or None

    def close(self) -> None:
        self.launched()
        with contextlib.suppress(OSError):
            os.close(self._read_fd)


def exec_errno(failure: str) -> tuple[int | None, str]:
    """The errno of a failed exec of the kernel command (None for any other failure),
    and the launcher's message without it."""
    head, _, rest = failure.partition(" ")
    number, _, message = rest.partition(" ")
    if head == EXEC_FAILED and number.isdigit():
        return int(number), message
    return None, failure
