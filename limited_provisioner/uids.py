"""Host-wide allocation of the unprivileged uids kernels run as.

A kernel's uid is its whole identity towards other kernels: two kernels with the same
uid can read each other's connection files and ptrace each other.  So the allocation
has to be host-wide, not per ``state_dir`` (two servers with different state dirs
once handed out the same uid), and a freed uid must not go to the next tenant at once
(that tenant read the previous one's 0600 file left in a shared directory).

Leases live in :data:`UID_LEASE_DIR`, one root-owned directory for the whole host, on
tmpfs: after a reboot no kernel runs, so no lease has to survive one.  Every file in it
is written under an ``flock`` of ``<dir>/lock`` and replaced atomically:

* ``<uid>``: the lease of a running kernel, JSON ``{"uid", "kernel_id", "state_dir",
  "time", "clock", "pid", "pid_create_time"}``.  ``time`` is wall-clock seconds for
  people, ``clock`` is ``CLOCK_BOOTTIME`` seconds, which is what ages are computed from
  (it does not jump when the wall clock is set, and /run does not outlive a boot).
* ``<uid>.released``: the same record plus ``released`` / ``released_clock``, kept
  after :func:`release` so the uid sits out a quarantine.
* ``next``: JSON ``{"<low>-<high>": <last uid handed out>}``: where the round robin of
  each ``kernel_uid_range`` resumes.

What a uid still has on the host is looked up in this process's namespaces (/proc,
/proc/sysvipc): servers in containers with their own /run, pid or IPC namespace are
not covered by each other's leases or checks.

:envvar:`LIMITED_PROVISIONER_UID_LEASE_DIR` moves the directory, for this module's own
tests of corner cases only.  Overriding it in production defeats its purpose: servers
with different lease dirs hand out the same uids again.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import KernelLimitError, SandboxUnavailableError
from .registry import process_identity

UID_LEASE_DIR = Path("/run/limited-provisioner/uids")
LEASE_DIR_ENV = "LIMITED_PROVISIONER_UID_LEASE_DIR"

# World-writable directories every uid can leave things in for the next holder of its
# uid.  Only their top level is looked at: a bounded cost per allocation.
SCRATCH_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/dev/mqueue")
SYSVIPC_TABLES = ("shm", "msg", "sem")

# A lease whose kernel is not registered yet is still valid this long while the
# process that took it lives (the registry's own window for a start in progress).
START_GRACE = 120.0
# How long allocate/release wait for another allocation to finish.  The lock is held
# for milliseconds; waiting longer means a holder hangs, which must surface as an error.
LOCK_TIMEOUT = 10.0
RELEASED = ".released"

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
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
    is held for more than :data:`LOCK_TIMEOUT` seconds.
    """
    low, high = _check_range(uid_range)
    _check_kernel_id(kernel_id)
    if not (isinstance(quarantine, (int, float)) and math.isfinite(quarantine)):
        msg = f"quarantine={quarantine!r} must be a finite number of seconds"
        raise ValueError(msg)
    state_dir = os.path.abspath(os.fspath(state_dir))
    dir_fd = _open_lease_dir(create=True)
    try:
        with _locked(dir_fd):
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
        with _locked(dir_fd):
            lease = _read_record(dir_fd, str(uid))
            if lease is None or lease.get("kernel_id") != kernel_id:
                return
            released = {**lease, "released": time.time(), "released_clock": _clock()}
            # Quarantine first, lease second: a crash in between leaves both, never neither.
            _write_json(dir_fd, f"{uid}{RELEASED}", released)
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

    processes = _process_holders(low, high)
    leftovers = {
        **_ipc_holders(low, high), **_key_holders(low, high), **_file_holders(low, high)
    }
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
    _write_json(dir_fd, "next", pointers)


def _read_next(dir_fd: int) -> dict[str, Any]:
    try:
        pointers = _read_json(dir_fd, "next")
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
    _write_json(dir_fd, str(uid), lease)


# -- what a uid still has on the host ------------------------------------------------


def _process_holders(low: int, high: int) -> dict[int, str]:
    """uid -> a process having it as real, effective, saved or filesystem uid.

    Read from ``/proc/<pid>/status``, not from the owner of ``/proc/<pid>`` (its
    effective uid only): a setuid program the uid ran, still waiting on a prompt, has
    it as real uid only, and can go back to it.
    """
    holders: dict[int, str] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            fd = os.open(f"/proc/{name}/status", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:  # exited since the listing
            continue
        try:
            status = os.read(fd, 2048)
        except OSError:  # exited while being read (ESRCH)
            continue
        finally:
            os.close(fd)
        start = status.find(b"\nUid:")
        if start < 0:
            continue
        end = status.find(b"\n", start + 1)
        for field in status[start + 5 : end].split():
            uid = int(field)
            if low <= uid <= high and uid not in holders:
                comm = status[: status.find(b"\n")].partition(b":")[2].strip()
                holders[uid] = f"process {name} ({comm.decode(errors='replace')})"
    return holders


def _ipc_holders(low: int, high: int) -> dict[int, str]:
    """uid -> a SysV shared memory segment, message queue or semaphore set of it.

    Both the owner and the creator count: the creator can hand the object to another
    owner (IPC_SET) and still control it.
    """
    holders: dict[int, str] = {}
    for table in SYSVIPC_TABLES:
        try:
            with open(f"/proc/sysvipc/{table}") as f:
                lines = f.read().splitlines()
        except OSError:  # kernel built without SysV IPC
            continue
        if not lines:
            continue
        header = lines[0].split()
        columns = [header.index(c) for c in ("uid", "cuid") if c in header]
        for line in lines[1:]:
            fields = line.split()
            for column in columns:
                uid = int(fields[column])
                if low <= uid <= high and uid not in holders:
                    holders[uid] = f"SysV {table} id {fields[1]}"
    return holders


def _key_holders(low: int, high: int) -> dict[int, str]:
    """uid -> keys it still holds in the kernel's keyrings (``/proc/key-users``).

    A uid's user keyring can outlive all of its processes; the next holder of the uid
    could read what the previous one put there.
    """
    holders: dict[int, str] = {}
    try:
        with open("/proc/key-users") as f:
            lines = f.read().splitlines()
    except OSError:  # kernel built without keys
        return holders
    for line in lines:
        uid_field, _, rest = line.partition(":")
        try:
            uid = int(uid_field)
            keys = int(rest.split()[1].split("/")[0])
        except (ValueError, IndexError):
            continue
        # A uid that ever looked at its keyrings keeps two of them (user and
        # user-session, created together) for good; only what is beyond those is data.
        if low <= uid <= high and keys > 2:
            holders[uid] = f"{keys} key(s) in its keyrings"
    return holders


def _file_holders(low: int, high: int) -> dict[int, str]:
    """uid -> an entry it owns at the top level of a shared scratch dir."""
    holders: dict[int, str] = {}
    for scratch in SCRATCH_DIRS:
        try:
            entries = os.scandir(scratch)
        except OSError:  # this host has no such dir (e.g. /dev/mqueue not mounted)
            continue
        with entries:
            for entry in entries:
                try:
                    uid = entry.stat(follow_symlinks=False).st_uid
                except OSError:  # removed since the listing
                    continue
                if low <= uid <= high and uid not in holders:
                    holders[uid] = entry.path
    return holders


# -- the lease dir ----------------------------------------------------------------------


def _open_lease_dir(create: bool) -> int | None:
    """An fd of the lease dir, after checking it cannot be redirected or tampered with.

    Its parent and itself are opened without following symlinks (created mode 0700 if
    missing and ``create``) and must be root-owned directories nobody else can write;
    their own parent must not let others replace them (root-owned, and not writable by
    others unless sticky, like /tmp).  Returns None if missing and not ``create``.
    """
    path = lease_dir()
    if not path.is_absolute() or len(path.parts) < 3:
        msg = f"{LEASE_DIR_ENV}={str(path)!r} must be an absolute path below a directory"
        raise SandboxUnavailableError(msg)
    try:
        fd = os.open(path.parent.parent, _DIR_FLAGS)
    except FileNotFoundError:
        if not create:
            return None
        msg = f"cannot keep uid leases in {path}: {path.parent.parent} does not exist"
        raise SandboxUnavailableError(msg) from None
    try:
        st = os.fstat(fd)
        replaceable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX
        if st.st_uid != 0 or replaceable:
            msg = (
                f"cannot keep uid leases in {path}: {path.parent.parent} lets others than "
                f"root replace it (owner uid {st.st_uid}, mode {stat.filemode(st.st_mode)}); "
                f"make it root-owned and not writable by others"
            )
            raise SandboxUnavailableError(msg)
        for part in (path.parent, path):
            child = _open_private_dir(fd, part, create)
            os.close(fd)
            fd = child
            if fd is None:
                return None
    except BaseException:
        if fd is not None:
            os.close(fd)
        raise
    return fd


def _open_private_dir(parent_fd: int, path: Path, create: bool) -> int | None:
    """Open ``path.name`` in ``parent_fd`` as a root-only directory (see _open_lease_dir)."""
    try:
        fd = os.open(path.name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=parent_fd)
    except FileNotFoundError:
        if not create:
            return None
        with contextlib.suppress(FileExistsError):  # a concurrent first allocate made it
            os.mkdir(path.name, 0o700, dir_fd=parent_fd)
        return _open_private_dir(parent_fd, path, create=False)
    except NotADirectoryError:  # also what O_NOFOLLOW gives for a symlink here
        what = "a symlink" if os.path.islink(path) else "not a directory"
        msg = (
            f"refusing to keep uid leases in {path}: it is {what}; remove it so a "
            f"root-owned directory (mode 0700) can be created there"
        )
        raise SandboxUnavailableError(msg) from None
    st = os.fstat(fd)
    if st.st_uid != 0 or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        os.close(fd)
        msg = (
            f"refusing to keep uid leases in {path}: owner uid {st.st_uid}, mode "
            f"{stat.filemode(st.st_mode)}; it must be owned by root and writable by root "
            f"only (chown root:root {path}; chmod 0700 {path})"
        )
        raise SandboxUnavailableError(msg)
    return fd


@contextlib.contextmanager
def _locked(dir_fd: int) -> Iterator[None]:
    """Hold the host-wide allocation lock; give up after :data:`LOCK_TIMEOUT`."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open("lock", flags, 0o600, dir_fd=dir_fd)
    try:
        deadline = time.monotonic() + LOCK_TIMEOUT
        delay = 0.0005
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:  # another allocate or release is running
                if time.monotonic() > deadline:
                    msg = (
                        f"the uid allocation lock {lease_dir() / 'lock'} has been held for "
                        f"over {LOCK_TIMEOUT:.0f} s; a stuck process holds it (find it "
                        f"with: fuser {lease_dir() / 'lock'})"
                    )
                    raise SandboxUnavailableError(msg) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.02)
        yield
    finally:
        os.close(fd)  # drops the flock too


# -- small helpers ----------------------------------------------------------------------


def _read_json(dir_fd: int, name: str) -> Any:
    """The parsed content of ``name`` in the lease dir; None if missing.

    Raises ValueError if it is not JSON.
    """
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    with open(fd, "rb") as f:
        return json.loads(f.read())


def _read_record(dir_fd: int, name: str) -> dict[str, Any] | None:
    """A lease or released record, or None if missing or unreadable."""
    try:
        record = _read_json(dir_fd, name)
    except ValueError:  # only a hand edit can do this: files are replaced atomically
        return None
    if not isinstance(record, dict):
        return None
    record["uid"] = int(name.removesuffix(RELEASED))
    return record


def _write_json(dir_fd: int, name: str, data: Any) -> None:
    """Replace ``name`` atomically: readers see the old or the new content, never half."""
    tmp = f".{name}.{os.getpid()}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    with open(os.open(tmp, flags, 0o600, dir_fd=dir_fd), "w") as f:
        json.dump(data, f, sort_keys=True)
    os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


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
