"""What a uid still has on the host that the next kernel given it could reach.

A uid that is no longer leased may still run processes, own SysV IPC objects or keys
in its keyrings, or own files at the top of the world-writable scratch dirs: its next
holder would inherit all of that.  The allocator (uids.py) skips such a uid; each probe
here maps the uids of a range to one example of what each still has, for that decision
and for the operator's message when no uid is left.

Everything is looked up in this process's namespaces (/proc, /proc/sysvipc): servers
in containers with their own pid or IPC namespace do not see each other's leftovers.
"""

from __future__ import annotations

import os

# World-writable directories every uid can leave things in for the next holder of its
# uid.  Only their top level is looked at: a bounded cost per allocation.
SCRATCH_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/dev/mqueue")
SYSVIPC_TABLES = ("shm", "msg", "sem")


def process_holders(low: int, high: int) -> dict[int, str]:
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


def ipc_holders(low: int, high: int) -> dict[int, str]:
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


def key_holders(low: int, high: int) -> dict[int, str]:
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


def file_holders(low: int, high: int) -> dict[int, str]:
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
