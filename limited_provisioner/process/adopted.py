"""A kernel process this server did not start, handled like its own child."""

from __future__ import annotations

import os
import select
import signal
import time

from ..registry import same_process


class AdoptedProcess:
    """A ``Popen`` stand-in for a kernel process started by a previous server.

    It is not our child, so there is no exit status to collect: a vanished process (or
    a reused pid — the start time is compared) reads as exited with -1.
    """

    stdin = stdout = stderr = None

    def __init__(self, pid: int, create_time: float | None):
        self.pid = pid
        self.create_time = create_time
        self.returncode: int | None = None
        # A pidfd of the process once it was found to be ours: it becomes readable when
        # the process exits and never refers to a reused pid, so the restarter's poll
        # every few seconds is one select() instead of reading /proc (and /proc/stat).
        self._pidfd: int | None = None

    def poll(self) -> int | None:
        if self.returncode is not None:
            return self.returncode
        if self._pidfd is not None:
            # poll(), not select(): a server with hundreds of kernels has fds past 1024.
            watch = select.poll()
            watch.register(self._pidfd, select.POLLIN)
            if watch.poll(0):
                self._exited()
            return self.returncode
        if not same_process(self.pid, self.create_time):
            self._exited()
            return self.returncode
        try:
            pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):
            return None  # no pidfds here (or it just exited): /proc again next time
        if same_process(self.pid, self.create_time):  # still ours now the fd pins it
            self._pidfd = pidfd
        else:
            os.close(pidfd)
            self._exited()
        return self.returncode

    def _exited(self) -> None:
        self.returncode = -1
        self.close()

    def close(self) -> None:
        pidfd, self._pidfd = self._pidfd, None
        if pidfd is not None:
            os.close(pidfd)

    def __del__(self) -> None:
        if getattr(self, "_pidfd", None) is not None:  # not left to the process's exit
            self.close()

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"pid {self.pid} still running")
            time.sleep(0.05)
        return self.returncode  # type: ignore[return-value]

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)
