"""A kernel process this server did not start, handled like its own child."""

from __future__ import annotations

import os
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

    def poll(self) -> int | None:
        if self.returncode is None and not same_process(self.pid, self.create_time):
            self.returncode = -1
        return self.returncode

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
