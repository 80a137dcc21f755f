"""The file tools' one door to a kernel's work dir: ``limited_provisioner.files``.

The MCP server calls exactly these four coroutines and one exception class, with the
kernel's provisioner (``km.provisioner``) as the first argument::

    await list_files(provisioner) -> list[{"path": str, "size": int, "modified": float}]
    await read_bytes(provisioner, path, max_bytes) -> bytes
    await write_bytes(provisioner, path, data) -> None
    FileError (with .status: 400 bad path / not a regular file, 404 missing,
               413 larger than max_bytes or the kernel's disk_limit)

They are the package's (``limited_provisioner.files``) when it has them. Until it does,
a private FALLBACK below stands in, only so that the MCP server and its tests run: it
resolves every path beneath the work dir's fd without following a link, serves and
replaces regular files only (never opening a FIFO for blocking I/O, never a file with a
second hard link), creates files owned by the work dir's owner, and bounds sizes by
``max_bytes`` and the kernel's ``disk_limit``. It is not the package's reviewed API:
delete it once ``limited_provisioner.files`` exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import Any

try:
    from limited_provisioner import files as _package_files
except ImportError:  # not in this tree yet: the FALLBACK below
    _package_files = None


# -- FALLBACK: used only while limited_provisioner.files is missing ----------------------

MAX_LISTED = 10_000  # entries a listing looks at
MAX_DEPTH = 32
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


class _FallbackFileError(Exception):
    """A refused file operation; ``status`` is the HTTP-like code (400, 404, 413)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _parts(path: str) -> list[str]:
    """``path`` relative to the work dir as names; 400 for absolute paths and ``..``."""
    if not path or "\x00" in path or path.startswith("/"):
        msg = f"{path!r}: give a path relative to the session's work dir"
        raise _FallbackFileError(msg)
    parts = [p for p in PurePosixPath(path).parts if p not in ("", ".")]
    if not parts or ".." in parts:
        msg = f"{path!r}: '..' and empty paths are refused"
        raise _FallbackFileError(msg)
    return parts


def _work_dir(provisioner: Any) -> str:
    work = getattr(provisioner, "work_dir", None)
    if not work:
        msg = "the session's kernel has no work dir"
        raise _FallbackFileError(msg, 404)
    return work


def _open_dir(fd: int, name: str, create: bool, owner: os.stat_result) -> int:
    """``name`` beneath ``fd`` as a directory fd, made (as the work dir's owner) if
    missing and ``create``; never through a link."""
    try:
        return os.open(name, _DIR, dir_fd=fd)
    except FileNotFoundError:
        if not create:
            raise
    with contextlib.suppress(FileExistsError):  # the kernel made it meanwhile
        os.mkdir(name, 0o755, dir_fd=fd)
    child = os.open(name, _DIR, dir_fd=fd)
    os.fchown(child, owner.st_uid, owner.st_gid)
    return child


@contextlib.contextmanager
def _parent(provisioner: Any, parts: list[str], create: bool = False) -> Iterator[int]:
    """An fd of the directory holding ``parts[-1]``, reached without following links."""
    fd = os.open(_work_dir(provisioner), _DIR)
    try:
        owner = os.fstat(fd)
        for name in parts[:-1]:
            try:
                child = _open_dir(fd, name, create, owner)
            except FileNotFoundError:
                raise _FallbackFileError(f"{'/'.join(parts)}: no such file", 404) from None
            except OSError as e:  # ELOOP, ENOTDIR: a link or a file in the way
                msg = f"{'/'.join(parts)}: {name!r} is not a directory (links are not followed)"
                raise _FallbackFileError(msg) from e
            os.close(fd)
            fd = child
        yield fd
    finally:
        os.close(fd)


def _disk_limit(provisioner: Any) -> int | None:
    return getattr(getattr(provisioner, "limits", None), "disk_limit", None) or None


def _list(provisioner: Any) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    seen = 0

    def walk(fd: int, prefix: str, depth: int) -> None:
        nonlocal seen
        for entry in os.scandir(fd):
            seen += 1
            if seen > MAX_LISTED:
                return
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISREG(st.st_mode):
                found.append(
                    {"path": prefix + entry.name, "size": st.st_size, "modified": st.st_mtime}
                )
            elif stat.S_ISDIR(st.st_mode) and depth < MAX_DEPTH and not entry.name.startswith("."):
                try:
                    child = os.open(entry.name, _DIR, dir_fd=fd)
                except OSError:  # replaced meanwhile
                    continue
                try:
                    walk(child, f"{prefix}{entry.name}/", depth + 1)
                finally:
                    os.close(child)

    fd = os.open(_work_dir(provisioner), _DIR)
    try:
        walk(fd, "", 0)
    finally:
        os.close(fd)
    return sorted(found, key=lambda f: f["path"])


def _read(provisioner: Any, path: str, max_bytes: int) -> bytes:
    parts = _parts(path)
    with _parent(provisioner, parts) as dfd:
        try:
            fd = os.open(parts[-1], os.O_RDONLY | _FILE, dir_fd=dfd)
        except FileNotFoundError:
            raise _FallbackFileError(f"{path}: no such file", 404) from None
        except OSError as e:
            raise _FallbackFileError(f"{path}: not a regular file ({e.strerror})") from e
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                msg = f"{path}: not a regular file with a single link"
                raise _FallbackFileError(msg)
            if st.st_size > max_bytes:
                msg = f"{path}: {st.st_size} bytes, more than the {max_bytes} bytes served"
                raise _FallbackFileError(msg, 413)
            chunks, left = [], max_bytes + 1
            while left > 0:
                chunk = os.read(fd, min(left, 1 << 20))
                if not chunk:
                    break
                chunks.append(chunk)
                left -= len(chunk)
            data = b"".join(chunks)
            if len(data) > max_bytes:  # grew while read
                msg = f"{path}: more than the {max_bytes} bytes served"
                raise _FallbackFileError(msg, 413)
            return data
        finally:
            os.close(fd)


def _write(provisioner: Any, path: str, data: bytes) -> None:
    parts = _parts(path)
    limit = _disk_limit(provisioner)
    if limit is not None and len(data) > limit:
        msg = f"{path}: {len(data)} bytes, more than the kernel's disk_limit of {limit} bytes"
        raise _FallbackFileError(msg, 413)
    with _parent(provisioner, parts, create=True) as dfd:
        owner = os.fstat(dfd)
        tmp = f".upload-{secrets.token_hex(8)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _FILE, 0o644, dir_fd=dfd)
        try:
            os.fchown(fd, owner.st_uid, owner.st_gid)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.close(fd)
            fd = -1
            os.replace(tmp, parts[-1], src_dir_fd=dfd, dst_dir_fd=dfd)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                msg = f"{path}: no space left within the kernel's disk_limit ({limit} bytes)"
                raise _FallbackFileError(msg, 413) from e
            raise _FallbackFileError(f"{path}: cannot be written ({e.strerror})") from e
        finally:
            if fd >= 0:
                os.close(fd)


async def _fallback_list_files(provisioner: Any) -> list[dict[str, Any]]:
    return await asyncio.to_thread(_list, provisioner)


async def _fallback_read_bytes(provisioner: Any, path: str, max_bytes: int) -> bytes:
    return await asyncio.to_thread(_read, provisioner, path, max_bytes)


async def _fallback_write_bytes(provisioner: Any, path: str, data: bytes) -> None:
    await asyncio.to_thread(_write, provisioner, path, data)


# -- the port -------------------------------------------------------------------------------

if _package_files is not None:
    FileError = _package_files.FileError
    list_files = _package_files.list_files
    read_bytes = _package_files.read_bytes
    write_bytes = _package_files.write_bytes
    IMPLEMENTATION = "limited_provisioner.files"
else:
    FileError = _FallbackFileError
    list_files = _fallback_list_files
    read_bytes = _fallback_read_bytes
    write_bytes = _fallback_write_bytes
    IMPLEMENTATION = "fallback"
