"""A process's identity (its create time) from one read of ``/proc/<pid>/stat``.

The registry tells a kernel process from a reused pid by its create time, for every
entry on every adoption, reaper sweep and status read. ``psutil.Process(pid)`` reads the
stat file twice for it (identity, then status) and ``/proc/stat`` for the boot time each
time: with 100 kernels that was ~40 % of the CPU the server spent adopting them. This is
the same arithmetic psutil does (start ticks / clock ticks + boot time), so the value
matches what psutil recorded before.
"""

from __future__ import annotations

import os
import threading
import time

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# /proc/stat's btime moves only when the wall clock is set; read it again after this many
# seconds, so a clock step shifts our create times as it shifts psutil's.
BOOT_TIME_TTL = 10.0

_lock = threading.Lock()
_boot: tuple[float, float] | None = None  # (btime, monotonic time it was read)


class Unreadable(Exception):
    """The stat file could not be read or parsed (e.g. /proc mounted with hidepid):
    the caller asks psutil instead."""


def boot_time() -> float:
    global _boot
    now = time.monotonic()
    with _lock:
        if _boot is not None and now - _boot[1] < BOOT_TIME_TTL:
            return _boot[0]
    with open("/proc/stat", "rb") as f:
        for line in f:
            if line.startswith(b"btime"):
                btime = float(line.split()[1])
                break
        else:
            msg = "no btime line in /proc/stat"
            raise Unreadable(msg)
    with _lock:
        _boot = (btime, now)
    return btime


def create_time(pid: int) -> float | None:
    """When ``pid`` started (seconds since the epoch), or None if it is gone or a zombie
    (it has exited; only its exit status is left). Raises :class:`Unreadable`."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError as e:
        raise Unreadable(str(e)) from e
    # The name (in parentheses) may hold spaces and parentheses: fields follow the last ")".
    fields = data[data.rfind(b")") + 2:].split()
    try:
        state, start_ticks = fields[0], int(fields[19])
    except (IndexError, ValueError) as e:
        raise Unreadable(f"/proc/{pid}/stat: {e}") from e
    if state == b"Z":
        return None
    return start_ticks / CLOCK_TICKS + boot_time()
