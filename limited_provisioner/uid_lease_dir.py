"""The uid lease directory as root reaches it: by fd, checked, locked, written whole.

Whoever could redirect or edit the lease dir (see uids.py) could make two kernels share
a uid.  So its parent and itself are opened beneath the fd of the level above, without
following symlinks, and their owner and mode are checked on that fd; every change is
made under one ``flock``, and every file is replaced atomically (a fresh temp file,
then ``os.replace``), so a reader sees the old record or the new one, never half.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import SandboxUnavailableError

# How long allocate/release wait for another allocation to finish.  The lock is held
# for milliseconds; waiting longer means a holder hangs, which must surface as an error.
LOCK_TIMEOUT = 10.0

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def open_lease_dir(path: Path, create: bool) -> int | None:
    """An fd of ``path`` (absolute, two levels deep at least), after checking it cannot
    be redirected or tampered with.

    Its parent and itself are opened without following symlinks (created mode 0700 if
    missing and ``create``) and must be root-owned directories nobody else can write;
    their own parent must not let others replace them (root-owned, and not writable by
    others unless sticky, like /tmp).  Returns None if missing and not ``create``.
    """
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
    """Open ``path.name`` in ``parent_fd`` as a root-only directory (see open_lease_dir)."""
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
def locked(dir_fd: int, path: Path) -> Iterator[None]:
    """Hold the host-wide allocation lock of the lease dir ``dir_fd`` (at ``path``);
    give up after :data:`LOCK_TIMEOUT`."""
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
                        f"the uid allocation lock {path / 'lock'} has been held for "
                        f"over {LOCK_TIMEOUT:.0f} s; a stuck process holds it (find it "
                        f"with: fuser {path / 'lock'})"
                    )
                    raise SandboxUnavailableError(msg) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.02)
        yield
    finally:
        os.close(fd)  # drops the flock too


def read_json(dir_fd: int, name: str) -> Any:
    """The parsed content of ``name`` in the lease dir; None if missing.

    Raises ValueError if it is not JSON.
    """
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    with open(fd, "rb") as f:
        return json.loads(f.read())


def write_json(dir_fd: int, name: str, data: Any) -> None:
    """Replace ``name`` atomically: readers see the old or the new content, never half."""
    tmp = f".{name}.{os.getpid()}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    with open(os.open(tmp, flags, 0o600, dir_fd=dir_fd), "w") as f:
        json.dump(data, f, sort_keys=True)
    os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
