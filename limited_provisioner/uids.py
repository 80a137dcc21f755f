"""Host-wide allocation of the unprivileged uids kernels run as.

A kernel's uid is its whole identity towards other kernels: two kernels with the same
uid can read each other's connection files and ptrace each other.  So the allocation
has to be host-wide, not per ``state_dir`` (two servers with different state dirs
once handed out the same uid), and a freed uid must not go to the next tenant at once
(that tenant read the previous one's 0600 file left in a shared directory).

Leases live in :data:`UID_LEASE_DIR`, one root-owned directory for the whole host, on
tmpfs: after a reboot no kernel runs, so no lease has to survive one.  Every file in it
is written under an ``flock`` of ``<dir>/lock`` and replaced atomically, the directory
reached by fd only (uid_lease_dir.py):

* ``<uid>``: the lease of a running kernel, JSON ``{"uid", "kernel_id", "state_dir",
  "time", "clock", "pid", "pid_create_time"}``.  ``time`` is wall-clock seconds for
  people, ``clock`` is ``CLOCK_BOOTTIME`` seconds, which is what ages are computed from
  (it does not jump when the wall clock is set, and /run does not outlive a boot).
* ``<uid>.released``: the same record plus ``released`` / ``released_clock``, kept
  after :func:`release` so the uid sits out a quarantine.
* ``next``: JSON ``{"<low>-<high>": <last uid handed out>}``: where the round robin of
  each ``kernel_uid_range`` resumes.

What a uid still has on the host (uid_holders.py) is looked up in this process's
namespaces (/proc, /proc/sysvipc): servers in containers with their own /run, pid or
IPC namespace are not covered by each other's leases or checks.

:envvar:`LIMITED_PROVISIONER_UID_LEASE_DIR` moves the directory, for this module's own
tests of corner cases only.  Overriding it in production defeats its purpose: servers
with different lease dirs hand out the same uids again.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path
from typing import Any

from .errors import KernelLimitError, SandboxUnavailableError
from .registry import process_identity
from .uid_holders import file_holders, ipc_holders, key_holders, process_holders
from .uid_lease_dir import locked, open_lease_dir, read_json, write_json

UID_LEASE_DIR = Path("/run/limited-provisioner/uids")
LEASE_DIR_ENV = "LIMITED_PROVISIONER_UID_LEASE_DIR"

# A lease whose kernel is not registered yet is still valid this long while the
# process that took it lives (the registry's own window for a start in progress).
START_GRACE = 120.0
RELEASED = ".released"

_MAX_UID = 2**32 - 2  # (uid_t)-1 means "no change" to setresuid


def lease_dir() -> Path:
    """The lease directory: :data:`UID_LEASE_DIR` unless a test moved it."""
    return Path(os.environ.get(LEASE_DIR_ENV) or UID_LEASE_DIR)


# -- public API -------------------------------------------------------------------------


def allocate(
    kernel_id: str,
    state_dir: str | os.PathLike,
    uid_range: tuple[int, int],
    *,
    quarantine: float = 300.0,
) -> int:
    """Lease a uid of ``uid_range`` (inclusive) to ``kernel_id`` and return it.

    Round robin from after the last uid handed out, so a freed uid comes back as late
    as possible.  A uid is skipped while it has a valid lease, was released less than
    ``quarantine`` seconds ago, or still has something on the host that its next
    holder could reach: a process, a SysV IPC object, a file at the top of a shared
    scratch dir.  A lease the same kernel (``kernel_id`` and ``state_dir``) already
    holds in the range is returned again, so a retried start does not leak a uid.

    Raises :class:`KernelLimitError` (``limit="kernel_uid_range"``) when no uid is
    free, :class:`SandboxUnavailableError` when the lease dir is unsafe or its lock
    is held for more than :data:`uid_lease_dir.LOCK_TIMEOUT` seconds.
    """
    low, high = _check_range(uid_range)
    _check_kernel_id(kernel_id)
    if not (isinstance(quarantine, (int, float)) and math.isfinite(quarantine)):
        msg = f"quarantine={quarantine!r} must be a finite number of seconds"
        raise ValueError(msg)
    state_dir = os.path.abspath(os.fspath(state_dir))
    dir_fd = _open_lease_dir(create=True)
    try:
        with locked(dir_fd, lease_dir()):
            return _allocate_locked(dir_fd, kernel_id, state_dir, low, high, quarantine)
    finally:
        os.close(dir_fd)


def release(uid: int, kernel_id: str) -> None:
    """End ``kernel_id``'s lease of ``uid``: it becomes ``<uid>.released``.

    Does nothing when there is no lease or it names another kernel (the uid may have
    been reclaimed and handed on already), so it is safe to call more than once.
    """
    uid = int(uid)
    dir_fd = _open_lease_dir(create=False)
    if dir_fd is None:
        return  # no lease dir, so no lease (e.g. /run was emptied by a reboot)
    try:
        with locked(dir_fd, lease_dir()):
            lease = _read_record(dir_fd, str(uid))
            if lease is None or lease.get("kernel_id") != kernel_id:
                return
            released = {**lease, "released": time.time(), "released_clock": _clock()}
            # Quarantine first, lease second: a crash in between leaves both, never neither.
            write_json(dir_fd, f"{uid}{RELEASED}", released)
            with contextlib.suppress(FileNotFoundError):  # a concurrent release won
                os.unlink(str(uid), dir_fd=dir_fd)
    finally:
        os.close(dir_fd)


def lease_of(uid: int) -> dict[str, Any] | None:
    """The current lease of ``uid`` (valid or stale), or None."""
    dir_fd = _open_lease_dir(create=False)
    if dir_fd is None:
        return None
    try:
        return _read_record(dir_fd, str(int(uid)))
    finally:
        os.close(dir_fd)


def leases() -> list[dict[str, Any]]:
    """Every current lease (valid or stale), by uid; released ones are not listed."""
    dir_fd = _open_lease_dir(create=False)
    if dir_fd is None:
        return []
    try:
        found = [_read_record(dir_fd, name) for name in os.listdir(dir_fd) if name.isdigit()]
    finally:
        os.close(dir_fd)
    return sorted((lease for lease in found if lease), key=lambda lease: lease["uid"])


# -- allocation -------------------------------------------------------------------------


def _allocate_locked(
    dir_fd: int, kernel_id: str, state_dir: str, low: int, high: int, quarantine: float
) -> int:
    """The body of :func:`allocate`, run under the lease dir lock."""
    names = set(os.listdir(dir_fd))
    in_range = {int(n): n for n in names if n.isdigit() and low <= int(n) <= high}
    leases_in_range = {uid: _read_record(dir_fd, name) for uid, name in in_range.items()}
    for uid, lease in sorted(leases_in_range.items()):
        if lease and lease.get("kernel_id") == kernel_id and lease.get("state_dir") == state_dir:
            _write_lease(dir_fd, uid, kernel_id, state_dir)
            return uid

    processes = process_holders(low, high)
    leftovers = {**ipc_holders(low, high), **key_holders(low, high), **file_holders(low, high)}
    now = _clock()
    leased: list[int] = []
    quarantined: dict[int, float] = {}  # uid -> seconds of quarantine left
    blocked: dict[int, str] = {}  # uid -> what it still has on the host
    start = _round_robin_start(dir_fd, low, high)
    for uid in [*range(start, high + 1), *range(low, start)]:
        if uid in leases_in_range and _lease_is_valid(leases_in_range[uid], uid, processes, now):
            leased.append(uid)
            continue
        if f"{uid}{RELEASED}" in names:
            left = quarantine - _released_age(dir_fd, uid, now)
            if left > 0:
                quarantined[uid] = left
                continue
        holder = processes.get(uid) or leftovers.get(uid)
        if holder:
            blocked[uid] = holder
            continue
        _write_lease(dir_fd, uid, kernel_id, state_dir)
        with contextlib.suppress(FileNotFoundError):  # never released: nothing to drop
            os.unlink(f"{uid}{RELEASED}", dir_fd=dir_fd)
        _remember_last(dir_fd, low, high, uid)
        return uid
    msg = _exhausted_message(low, high, leased, quarantined, blocked)
    raise KernelLimitError(msg, limit="kernel_uid_range")


def _exhausted_message(
    low: int, high: int, leased: list[int], quarantined: dict[int, float], blocked: dict[int, str]
) -> str:
    """Say why no uid of the range is free and what the operator can change."""
    reasons = [f"{len(leased)} leased to kernels"]
    remedies = ["widen kernel_uid_range or lower max_kernels"]
    if quarantined:
        reasons.append(
            f"{len(quarantined)} in quarantine after their kernel ended "
            f"(the first is free again in {min(quarantined.values()):.0f} s)"
        )
        remedies.append("wait for the quarantine to pass")
    if blocked:
        examples = "; ".join(f"uid {uid}: {what}" for uid, what in sorted(blocked.items())[:3])
        reasons.append(
            f"{len(blocked)} still owning processes, SysV IPC objects or files in "
            f"shared scratch dirs ({examples})"
        )
        remedies.append("remove what those uids left behind")
    return (
        f"no free uid in kernel_uid_range {low}-{high} ({high - low + 1} uids): "
        f"{', '.join(reasons)}. To start more kernels, {' or '.join(remedies)}."
    )


def _lease_is_valid(
    lease: dict[str, Any] | None, uid: int, processes: dict[int, str], now: float
) -> bool:
    """Whether a lease still protects its uid; an invalid (stale) one may be reclaimed.

    Valid while the kernel is registered in its state dir, while anything runs as the
    uid, or for :data:`START_GRACE` seconds while the allocating process lives (it
    takes the uid before or just after it registers the kernel).
    """
    if lease is None:
        return True  # unreadable: cannot tell whose it is, so keep it
    if uid in processes:
        return True
    state_dir, kernel_id = lease.get("state_dir"), lease.get("kernel_id")
    if isinstance(state_dir, str) and isinstance(kernel_id, str):
        if os.path.exists(os.path.join(state_dir, "registry", f"{kernel_id}.json")):
            return True
    if _age(lease, "time", now) < START_GRACE:
        pid, created = lease.get("pid"), lease.get("pid_create_time")
        alive = isinstance(pid, int) and process_identity(pid)
        if alive and (created is None or abs(alive - created) < 1.0):
            return True
    return False


def _round_robin_start(dir_fd: int, low: int, high: int) -> int:
    """The uid after the last one this range handed out (wrapping), or ``low``."""
    last = _read_next(dir_fd).get(f"{low}-{high}")
    if isinstance(last, int) and low <= last < high:
        return last + 1
    return low


def _remember_last(dir_fd: int, low: int, high: int, uid: int) -> None:
    pointers = _read_next(dir_fd)
    pointers[f"{low}-{high}"] = uid
    write_json(dir_fd, "next", pointers)


def _read_next(dir_fd: int) -> dict[str, Any]:
    try:
        pointers = read_json(dir_fd, "next")
    except ValueError:  # corrupt: start over at the range's low end, still safe
        return {}
    return pointers if isinstance(pointers, dict) else {}


def _write_lease(dir_fd: int, uid: int, kernel_id: str, state_dir: str) -> None:
    lease = {
        "uid": uid,
        "kernel_id": kernel_id,
        "state_dir": state_dir,
        "time": time.time(),
        "clock": _clock(),
        "pid": os.getpid(),
        "pid_create_time": process_identity(os.getpid()),
    }
    write_json(dir_fd, str(uid), lease)


# -- the lease dir ----------------------------------------------------------------------


def _open_lease_dir(create: bool) -> int | None:
    """An fd of :func:`lease_dir`, checked (see :func:`uid_lease_dir.open_lease_dir`);
    None if it is missing and not ``create``."""
    path = lease_dir()
    if not path.is_absolute() or len(path.parts) < 3:
        msg = f"{LEASE_DIR_ENV}={str(path)!r} must be an absolute path below a directory"
        raise SandboxUnavailableError(msg)
    return open_lease_dir(path, create)


# -- small helpers ----------------------------------------------------------------------


def _read_record(dir_fd: int, name: str) -> dict[str, Any] | None:
    """A lease or released record, or None if missing or unreadable."""
    try:
        record = read_json(dir_fd, name)
    except ValueError:  # only a hand edit can do this: files are replaced atomically
        return None
    if not isinstance(record, dict):
        return None
    record["uid"] = int(name.removesuffix(RELEASED))
    return record


def _clock() -> float:
    """Seconds since boot, suspend included: consistent across processes, never set back."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def _age(record: dict[str, Any] | None, key: str, now: float) -> float:
    """Seconds since ``record[key]`` happened; 0 (brand new) if it cannot be told.

    Uses the boot clock stored next to it (``<key>_clock``, or ``clock`` for ``time``);
    a boot clock ahead of now comes from an earlier boot, so the event is long past.
    """
    if record is None:
        return 0.0
    clock = record.get("clock" if key == "time" else f"{key}_clock")
    if isinstance(clock, (int, float)):
        return now - clock if clock <= now else math.inf
    wall = record.get(key)
    if isinstance(wall, (int, float)):
        return time.time() - wall
    return 0.0


def _released_age(dir_fd: int, uid: int, now: float) -> float:
    """Seconds since ``uid`` was released (its ``<uid>.released`` record)."""
    record = _read_record(dir_fd, f"{uid}{RELEASED}")
    if record is not None:
        return _age(record, "released", now)
    try:
        # Unreadable record: its file was written at release, so its mtime tells when.
        mtime = os.stat(f"{uid}{RELEASED}", dir_fd=dir_fd, follow_symlinks=False).st_mtime
    except FileNotFoundError:  # gone since the listing: nothing to wait for
        return math.inf
    return time.time() - mtime


def _check_range(uid_range: tuple[int, int]) -> tuple[int, int]:
    try:
        low, high = uid_range
    except (TypeError, ValueError):  # not a pair
        low = high = None
    if not (
        isinstance(low, int)
        and isinstance(high, int)
        and not isinstance(low, bool)
        and 0 < low <= high <= _MAX_UID
    ):
        msg = f"kernel_uid_range={uid_range!r} must be two uids 0 < low <= high"
        raise SandboxUnavailableError(msg)
    return low, high


def _check_kernel_id(kernel_id: str) -> None:
    """Kernel ids become file names in the registry, so they must be plain names."""
    plain = isinstance(kernel_id, str) and kernel_id not in ("", ".", "..")
    if not plain or "/" in kernel_id or "\0" in kernel_id:
        msg = f"kernel_id {kernel_id!r} must be a non-empty file name (no '/')"
        raise ValueError(msg)
