"""A kernel's files, from the server side: list, read, write and delete in its work dir.

An agent service (examples/agent_backend, an MCP server) moves files in and out of a
session without asking the kernel: the kernel's code is the attacker and cannot be
trusted to serve its own files. The server, often root, works on the kernel's private
work dir (``<state_dir>/kernels/<id>/work``, the kernel's HOME and cwd; the same host
dir on both backends) under these rules:

* Every path is resolved beneath an fd of the work dir, one component at a time with
  ``O_NOFOLLOW``: no symlink is followed, not even one the kernel plants between two
  calls; ``..``, absolute paths, empty or NUL-carrying names are refused outright.
* Only regular files are read: the last component is opened ``O_NONBLOCK`` (a FIFO
  never blocks) and checked with ``fstat`` (``S_ISREG``, owned by the kernel's uid) on
  the fd that is then read; reads stop at the size seen at open.
* Nothing existing is ever written into: an upload is a fresh file created ``O_EXCL``
  under a temporary name, handed to the kernel's uid/gid (mode 0644 or 0600) and
  renamed over the target, so a hard link the kernel made to any other file is
  replaced, never written through.
* Sizes are bounded by the kernel's ``disk_limit``: an upload is refused before a byte
  is written when its announced size does not fit what is free (``FileTooLarge``, with
  the limit), and stopped as soon as it stops fitting (an unannounced size, or ENOSPC
  on the kernel's own filesystem); its partial temp file is removed.
* Listing is bounded (entries, depth) and skips what is not a directory or a regular
  file. Every blocking call runs in a thread, never on the event loop.

A kernel working in a host folder (``workspace``: the notebook's folder) is refused
(:class:`FilesUnavailable`): that folder is its owner's, served by jupyter_server's
contents API with the owner's rights; this module serves only the private work dir,
which agent kernels (started without a ``cwd``) always have.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import secrets
import stat
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from typing import Any

from .errors import SandboxUnavailableError
from .kernel_dir import DIR_FLAGS, open_trusted_dir
from .limits import format_size
from .watchdog import dir_usage

CHUNK = 1 << 20
MAX_PATH = 1024  # bytes of a relative path
MAX_NAME = 255  # bytes of one component
MAX_DEPTH = 32  # directories below the work dir a path may go through
MAX_ENTRIES = 10_000  # entries a listing looks at
TEMP_PREFIX = ".lp-upload-"
_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


# -- errors: each maps to one HTTP status ----------------------------------------------


class FileError(Exception):
    """A file operation refused; ``status`` is the HTTP status it maps to."""

    status = 400


class FilePathRefused(FileError):
    """The path is absolute, climbs out (``..``), or goes through a symlink."""


class NotARegularFile(FileError):
    """The path names a directory, FIFO, socket, device or symlink."""


class FileNotFound(FileError):
    status = 404


class FileTooLarge(FileError):
    """The file does not fit the kernel's disk_limit; ``limit`` is it (bytes)."""

    status = 413

    def __init__(self, message: str, *, limit: int | None = None):
        super().__init__(message)
        self.limit = limit


class FilesUnavailable(FileError):
    """The kernel has no private work dir to serve (it works in a host folder, or it
    is gone)."""

    status = 409


# -- paths -------------------------------------------------------------------------------


def split_path(path: str) -> list[str]:
    """The components of a path relative to the work dir, or FilePathRefused.

    Refused: empty, absolute, ``..`` anywhere, NUL, longer than MAX_PATH bytes, a
    component longer than MAX_NAME, deeper than MAX_DEPTH. ``.`` and doubled slashes
    are dropped (``a/./b`` is ``a/b``).
    """
    if not isinstance(path, str) or not path:
        raise FilePathRefused("empty path: name a file relative to the session's work dir")
    if "\x00" in path:
        raise FilePathRefused("the path contains a NUL byte")
    if len(path.encode("utf-8", "surrogateescape")) > MAX_PATH:
        raise FilePathRefused(f"the path is longer than {MAX_PATH} bytes")
    if path.startswith("/"):
        raise FilePathRefused(
            f"{path!r} is absolute: paths are relative to the session's work dir")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise FilePathRefused(f"{path!r} contains '..': paths stay inside the work dir")
    if not parts:
        raise FilePathRefused(f"{path!r} names the work dir itself, not a file")
    if len(parts) > MAX_DEPTH:
        raise FilePathRefused(f"{path!r} is deeper than {MAX_DEPTH} directories")
    for part in parts:
        if len(part.encode("utf-8", "surrogateescape")) > MAX_NAME:
            raise FilePathRefused(f"a component of {path!r} is longer than {MAX_NAME} bytes")
    return parts


def _refused_link(path: str, name: str) -> FilePathRefused:
    return FilePathRefused(f"{path!r}: {name!r} is a symbolic link; links are not followed")


@dataclass(frozen=True)
class FileInfo:
    path: str
    size: int
    modified: float

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "modified": self.modified}


@dataclass(frozen=True)
class Listing:
    files: list[FileInfo]
    truncated: bool  # stopped at MAX_ENTRIES entries or MAX_DEPTH directories


class FileReader:
    """An open regular file of the kernel's, read in chunks up to its size at open.

    ``async for chunk in reader`` (or :meth:`chunks`) streams it, each read in a thread,
    and closes the fd at the end; :meth:`aclose` closes it early.
    """

    def __init__(self, fd: int, info: FileInfo, chunk_size: int = CHUNK):
        self._fd: int | None = fd
        self.info = info
        self.size = info.size
        self.chunk_size = chunk_size

    async def chunks(self) -> AsyncIterator[bytes]:
        offset = 0
        try:
            while offset < self.size and self._fd is not None:
                n = min(self.chunk_size, self.size - offset)
                data = await asyncio.to_thread(os.pread, self._fd, n, offset)
                if not data:
                    break  # truncated by the kernel meanwhile: what is there is sent
                offset += len(data)
                yield data
        finally:
            await self.aclose()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self.chunks()

    async def aclose(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:
        # A response that was never sent (the client went away first) never iterated.
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


class WorkDir:
    """One kernel's work dir as the server handles it.

    ``path``: the work dir (its last component is opened without following a link; the
    caller vouches for the directories above it — :meth:`of` opens them from the
    trusted state dir). ``uid``/``gid``: the kernel's (None: the server's own user, no
    ownership checks). ``disk_limit``: bytes the kernel may use there (None: no cap
    beyond the disk). ``own_filesystem``: the work dir is the kernel's own filesystem
    (workfs.py), so free space is one ``statvfs``; else it is ``disk_limit`` minus a
    bounded walk of the dir.
    """

    def __init__(self, path: str | os.PathLike, *, uid: int | None = None,
                 gid: int | None = None, disk_limit: int | None = None,
                 own_filesystem: bool = False, kernels_dir: str | os.PathLike | None = None,
                 kernel_id: str | None = None):
        self.path = os.fspath(path)
        self.uid = uid
        self.gid = gid if gid is not None else uid
        self.disk_limit = disk_limit
        self.own_filesystem = own_filesystem
        self._kernels_dir = kernels_dir
        self._kernel_id = kernel_id

    @classmethod
    def of(cls, provisioner: Any) -> WorkDir:
        """The work dir of a running kernel's provisioner (either backend)."""
        kdir = getattr(provisioner, "kdir", None)
        if kdir is None:
            raise FilesUnavailable("the kernel has no work dir (not started, or shut down)")
        if getattr(provisioner, "work_folder", None) is not None:
            msg = (
                f"the kernel works in the host folder {provisioner.work_folder.path}, not in "
                f"a private work dir: its files are served by jupyter_server's contents "
                f"API, with the folder owner's rights"
            )
            raise FilesUnavailable(msg)
        fs = getattr(provisioner, "workfs", None)
        return cls(
            kdir.work, uid=provisioner.uid, gid=provisioner.gid,
            disk_limit=provisioner.limits.disk_limit,
            own_filesystem=bool(fs is not None and fs.hard),
            kernels_dir=kdir.kernels_dir, kernel_id=kdir.kernel_id,
        )

    # -- descriptors (blocking: called in threads) ----------------------------------------

    def _open_root(self) -> int:
        try:
            if self._kernels_dir is not None and self._kernel_id is not None:
                # From the trusted kernels dir down: the kernel dir is root's (0711), so
                # the kernel cannot swap its "work" entry.
                with (_closing(open_trusted_dir(self._kernels_dir)) as kernels,
                      _closing(os.open(self._kernel_id, DIR_FLAGS, dir_fd=kernels)) as k):
                    fd = os.open("work", DIR_FLAGS, dir_fd=k)
            else:
                fd = os.open(self.path, DIR_FLAGS)
        except SandboxUnavailableError as e:
            raise FilesUnavailable(f"the kernel's work dir cannot be opened: {e}") from None
        except OSError as e:
            msg = f"the kernel's work dir cannot be opened (gone?): {e.strerror}"
            raise FilesUnavailable(msg) from None
        if self.uid is not None and os.fstat(fd).st_uid != self.uid:
            os.close(fd)
            raise FilesUnavailable("the kernel's work dir is not owned by the kernel's uid")
        return fd

    def _parent(self, path: str, parts: list[str], create: bool = False) -> int:
        """fd of the directory holding ``parts[-1]``, walked from the work dir's fd
        with O_NOFOLLOW (a symlink anywhere is refused); ``create``: make missing
        directories (mode 0755, the kernel's)."""
        fd = self._open_root()
        try:
            for name in parts[:-1]:
                try:
                    child = os.open(name, DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise FileNotFound(f"{path!r}: no directory {name!r}") from None
                    child = self._mkdir(fd, name, path)
                except OSError as e:
                    raise self._why(fd, name, path, e) from None
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _mkdir(self, parent: int, name: str, path: str) -> int:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o700, dir_fd=parent)
        try:
            fd = os.open(name, DIR_FLAGS, dir_fd=parent)
        except OSError as e:
            raise self._why(parent, name, path, e) from None
        if self.uid is not None and os.fstat(fd).st_uid == os.geteuid() != self.uid:
            os.fchown(fd, self.uid, self.gid)  # ours (just made): the kernel's now
        os.fchmod(fd, 0o755)
        return fd

    @staticmethod
    def _why(parent: int, name: str, path: str, error: OSError) -> FileError:
        """The FileError for a failed open of ``name`` beneath ``parent``."""
        if error.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENXIO):
            try:
                st = os.stat(name, dir_fd=parent, follow_symlinks=False)
            except OSError:
                return FileNotFound(f"{path!r}: {name!r} vanished")
            if stat.S_ISLNK(st.st_mode):
                return _refused_link(path, name)
            return NotARegularFile(f"{path!r}: {name!r} is a {_kind(st.st_mode)}")
        if error.errno == errno.ENOENT:
            return FileNotFound(f"no file {path!r} in the session's work dir")
        if error.errno == errno.EISDIR:
            return NotARegularFile(f"{path!r} is a directory")
        return FileError(f"{path!r}: {error.strerror}")

    # -- operations -------------------------------------------------------------------------

    async def open_read(self, path: str, chunk_size: int = CHUNK) -> FileReader:
        """Open a regular file for streaming; errors are raised here, before a byte."""
        parts = split_path(path)
        return await _in_thread(path, self._open_read, path, parts, chunk_size)

    def _open_read(self, path: str, parts: list[str], chunk_size: int) -> FileReader:
        with _closing(self._parent(path, parts)) as parent:
            try:
                fd = os.open(parts[-1], _READ_FLAGS, dir_fd=parent)
            except OSError as e:
                raise self._why(parent, parts[-1], path, e) from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise NotARegularFile(f"{path!r} is a {_kind(st.st_mode)}, not a regular file")
        if self.uid is not None and st.st_uid != self.uid:
            os.close(fd)
            raise FilePathRefused(f"{path!r} is not the kernel's own file (owner uid {st.st_uid})")
        return FileReader(fd, FileInfo("/".join(parts), st.st_size, st.st_mtime), chunk_size)

    async def read(self, path: str, chunk_size: int = CHUNK) -> AsyncIterator[bytes]:
        """Stream a regular file's bytes (see :meth:`open_read`)."""
        reader = await self.open_read(path, chunk_size)
        async for chunk in reader:
            yield chunk

    async def read_bytes(self, path: str, max_size: int) -> bytes:
        """A whole (small) file; FileTooLarge past ``max_size``."""
        reader = await self.open_read(path)
        if reader.size > max_size:
            await reader.aclose()
            raise FileTooLarge(f"{path!r} is {format_size(reader.size)}, over "
                               f"{format_size(max_size)}", limit=max_size)
        return b"".join([c async for c in reader])

    async def free(self) -> int | None:
        """Bytes the kernel may still write in its work dir (None: no disk_limit)."""
        return await _in_thread(".", self._free)

    def _free(self) -> int | None:
        if self.disk_limit is None:
            return None
        with _closing(self._open_root()) as root:
            if self.own_filesystem:
                st = os.fstatvfs(root)
                return min(st.f_bavail * st.f_frsize, self.disk_limit)
        # Walked by fd beneath the work dir (opened O_NOFOLLOW), bounded.
        used = dir_usage(self.path, 200_000)
        if used.too_deep:
            return 0
        return max(0, self.disk_limit - used.bytes)

    def _too_large(self, path: str, size: int, free: int, *, known: bool) -> FileTooLarge:
        size_text = format_size(size) if known else f"more than {format_size(size)}"
        return FileTooLarge(
            f"{path!r} ({size_text}) does not fit the kernel's disk_limit="
            f"{format_size(self.disk_limit)}: {format_size(free)} free in the session's work "
            f"dir. Delete files there, or use a session with a larger disk_limit",
            limit=self.disk_limit,
        )

    async def write(self, path: str, chunks: AsyncIterable[bytes], *, size: int | None = None,
                    mode: int = 0o644) -> FileInfo:
        """Create or replace a regular file with the bytes of ``chunks``.

        ``size``: the announced length (Content-Length); refused at once if it does not
        fit. Missing directories are created. The file appears only once complete
        (temp file + rename); on any failure the temp file is removed.
        """
        if mode not in (0o644, 0o600):
            raise FileError(f"mode {oct(mode)}: use 0o644 or 0o600")
        parts = split_path(path)
        if parts[-1].startswith(TEMP_PREFIX):
            raise FilePathRefused(f"names starting with {TEMP_PREFIX!r} are the service's own")
        free = await self.free()
        if size is not None and free is not None and size > free:
            raise self._too_large(path, size, free, known=True)
        parent, tmp, fd = await _in_thread(path, self._create_temp, path, parts)
        written = 0
        try:
            # HTTP bodies come in ~64K pieces: one thread hop per MiB, not per piece.
            pending = bytearray()
            async for chunk in chunks:
                if not chunk:
                    continue
                written += len(chunk)
                if (free is not None and written > free) or (size is not None and written > size):
                    raise self._too_large(path, written - 1, free or 0, known=False)
                pending += chunk
                if len(pending) >= CHUNK:
                    await asyncio.to_thread(_write_all, fd, bytes(pending))
                    pending.clear()
            if pending:
                await asyncio.to_thread(_write_all, fd, bytes(pending))
            if size is not None and written != size:
                raise FileError(f"{path!r}: got {written} bytes of the {size} announced")
            mtime = await asyncio.to_thread(self._finish, fd, parent, tmp, parts[-1], path, mode)
        except OSError as e:
            await asyncio.to_thread(_discard, parent, tmp, fd)
            if e.errno in _FULL:
                raise self._too_large(path, written - 1, free or 0, known=False) from None
            raise FileError(f"{path!r}: {e.strerror}") from None
        except BaseException:
            await asyncio.to_thread(_discard, parent, tmp, fd)
            raise
        os.close(fd)
        os.close(parent)
        return FileInfo("/".join(parts), written, mtime)

    async def write_bytes(self, path: str, data: bytes, *, mode: int = 0o644) -> FileInfo:
        """:meth:`write` of bytes in memory (an MCP tool's upload, a test)."""

        async def one() -> AsyncIterator[bytes]:
            yield data

        return await self.write(path, one(), size=len(data), mode=mode)

    def _create_temp(self, path: str, parts: list[str]) -> tuple[int, str, int]:
        parent = self._parent(path, parts, create=True)
        try:
            try:
                st = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
            except FileNotFoundError:
                pass
            else:
                if stat.S_ISLNK(st.st_mode):
                    raise _refused_link(path, parts[-1])
                if not stat.S_ISREG(st.st_mode):
                    raise NotARegularFile(f"{path!r} exists and is a {_kind(st.st_mode)}")
            tmp = f"{TEMP_PREFIX}{secrets.token_hex(8)}"
            fd = os.open(tmp, _CREATE_FLAGS, 0o600, dir_fd=parent)
        except BaseException:
            os.close(parent)
            raise
        return parent, tmp, fd

    def _finish(self, fd: int, parent: int, tmp: str, name: str, path: str, mode: int) -> float:
        """Hand the complete temp file to the kernel and rename it over ``name``; its mtime."""
        if self.uid is not None:
            os.fchown(fd, self.uid, self.gid)
        os.fchmod(fd, mode)
        st = os.stat(name, dir_fd=parent, follow_symlinks=False) if _exists(parent, name) else None
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise NotARegularFile(f"{path!r} is a directory")
        mine = os.fstat(fd)
        now = os.stat(tmp, dir_fd=parent, follow_symlinks=False)
        if (now.st_dev, now.st_ino) != (mine.st_dev, mine.st_ino):
            raise FileError(f"{path!r}: the upload's temporary file was replaced meanwhile")
        os.rename(tmp, name, src_dir_fd=parent, dst_dir_fd=parent)
        return mine.st_mtime

    async def delete(self, path: str) -> None:
        """Remove the entry ``path``: a regular file, or a link, FIFO or socket the kernel
        made (the entry goes, whatever it points to is untouched). A directory is
        refused (NotARegularFile); nothing is followed on the way."""
        parts = split_path(path)
        await _in_thread(path, self._delete, path, parts)

    def _delete(self, path: str, parts: list[str]) -> None:
        with _closing(self._parent(path, parts)) as parent:
            try:
                st = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
            except FileNotFoundError:
                raise FileNotFound(f"no file {path!r} in the session's work dir") from None
            if stat.S_ISDIR(st.st_mode):
                raise NotARegularFile(f"{path!r} is a directory: only files are deleted")
            try:
                os.unlink(parts[-1], dir_fd=parent)
            except FileNotFoundError:
                raise FileNotFound(f"no file {path!r} in the session's work dir") from None

    async def list_files(self, *, hidden: bool = False, max_entries: int = MAX_ENTRIES,
                         max_depth: int = MAX_DEPTH) -> Listing:
        """Regular files beneath the work dir (path, size, mtime), sorted by path.

        ``hidden``: include names starting with '.' (the kernel's HOME holds .ipython,
        .cache, ...). Looks at most ``max_entries`` entries and ``max_depth`` levels
        (``truncated`` says it stopped); directories are opened beneath their parent's
        fd with O_NOFOLLOW, so a swapped-in link is skipped, never followed.
        """
        return await _in_thread(".", self._list, hidden, max_entries, max_depth)

    def _list(self, hidden: bool, max_entries: int, max_depth: int) -> Listing:
        files: list[FileInfo] = []
        seen = 0
        truncated = False
        stack: list[tuple[int, str, int]] = [(self._open_root(), "", 0)]
        try:
            while stack:
                fd, prefix, depth = stack.pop()
                try:
                    with os.scandir(fd) as it:
                        for entry in it:
                            seen += 1
                            if seen > max_entries:
                                truncated = True
                                break
                            if not hidden and entry.name.startswith("."):
                                continue
                            try:
                                st = entry.stat(follow_symlinks=False)
                            except OSError:
                                continue  # removed meanwhile
                            rel = prefix + entry.name
                            if stat.S_ISREG(st.st_mode):
                                files.append(FileInfo(rel, st.st_size, st.st_mtime))
                            elif stat.S_ISDIR(st.st_mode):
                                if depth + 1 >= max_depth:
                                    truncated = True
                                    continue
                                try:
                                    child = os.open(entry.name, DIR_FLAGS, dir_fd=fd)
                                except OSError:
                                    continue  # gone, or swapped for a link: not followed
                                stack.append((child, rel + "/", depth + 1))
                finally:
                    os.close(fd)
                if truncated and seen > max_entries:
                    break
        finally:
            for fd, _, _ in stack:
                os.close(fd)
        return Listing(sorted(files, key=lambda f: f.path), truncated)


# -- helpers -----------------------------------------------------------------------------


async def _in_thread(path: str, fn: Any, *args: Any) -> Any:
    """``fn(*args)`` in a thread; an OSError it did not expect (the kernel changed its
    work dir between two steps: a directory removed, renamed) becomes a FileError."""
    try:
        return await asyncio.to_thread(fn, *args)
    except OSError as e:
        if e.errno == errno.ENOENT:
            raise FileNotFound(f"{path!r}: removed meanwhile, or no such directory") from None
        raise FileError(f"{path!r}: {e.strerror} (the work dir changed meanwhile?)") from None


@contextlib.contextmanager
def _closing(fd: int):
    try:
        yield fd
    finally:
        os.close(fd)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISLNK, "symbolic link"),
                       (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "regular file" if stat.S_ISREG(mode) else "special file"


def _exists(parent: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _discard(parent: int, tmp: str, fd: int) -> None:
    """Remove the upload's temp file (if it is still ours) and close both fds."""
    try:
        mine = os.fstat(fd)
        try:
            now = os.stat(tmp, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return
        if (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=parent)
    finally:
        os.close(fd)
        os.close(parent)


__all__ = [
    "FileError",
    "FileInfo",
    "FileNotFound",
    "FilePathRefused",
    "FileReader",
    "FileTooLarge",
    "FilesUnavailable",
    "Listing",
    "NotARegularFile",
    "WorkDir",
    "split_path",
]
