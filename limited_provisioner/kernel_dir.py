"""The per-kernel directory, laid out so that root never follows a path the kernel controls.

``<state_dir>/kernels/<kernel_id>/`` is owned by the server's user (root, normally) and
mode 0711: the kernel can enter it and read what it must, but it can neither create,
rename nor replace an entry in it. It holds:

=================  ==============  =====================================================
``ctl/``            root 0711       what the kernel reads; mounted read-only in containers:
``hooks.py``        root 0644       the IPython startup hook (hooks.py)
``notice``          root 0644       why the running execution is being interrupted
``kernel.log``      root 0600       the kernel's stdout/stderr, size-capped (kernellog.py)
``work/``           kernel 0700     the kernel's HOME and cwd
``conn/``           kernel 0700     its connection file, written fresh (temp file + rename
                                    beneath the dir's fd) at every start; ipykernel
                                    rewrites it, so it is the kernel's; the server never
                                    reads it back
``sock/``           kernel 0700     where it binds its ipc sockets; once bound the server
                    then root 0700  takes the directory back ("freezes" it), so no entry
                                    can be renamed or replaced any more
``disk/``           root 0700       with disk_limit, where the host allows it: the image
                                    of the kernel's own filesystem, whose work/, conn/
                                    and sock/ are bind-mounted onto the three above
                                    (workfs.py)
=================  ==============  =====================================================

Every operation goes through a file descriptor of the kernel dir opened without
following links; ownership and modes are changed on descriptors; files are written to a
fresh temporary name and renamed into place. Nothing under ``work/`` is ever opened by
the server through a path (the watchdog walks it by descriptor, read-only).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from . import workfs
from .errors import SandboxUnavailableError
from .registry import Registry
from .workspace import host_mount_point, release_host_mount

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def open_trusted_dir(path: str | os.PathLike) -> int:
    """An fd of a directory only the server's user can change, or a clear error.

    The state dir is the operator's choice; this checks the last component and refuses a
    directory that anyone else could write into (they could swap our entries).
    """
    try:
        fd = os.open(path, DIR_FLAGS)
    except OSError as e:
        msg = f"cannot open {path} as a directory without following links: {e}"
        raise SandboxUnavailableError(msg) from None
    return _ours_alone(fd, path, "fix it or choose another state_dir")


def _ours_alone(fd: int, path: str | os.PathLike, fix: str) -> int:
    """``fd`` if its directory is owned by us and writable by nobody else; else closes it
    and raises (anyone else who can write there could swap our entries)."""
    st = os.fstat(fd)
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        os.close(fd)
        msg = (
            f"{path} must be owned by uid {os.geteuid()} and writable by nobody else "
            f"(owner {st.st_uid}, mode {stat.filemode(st.st_mode)}); {fix}"
        )
        raise SandboxUnavailableError(msg)
    return fd


@contextlib.contextmanager
def opened(fd: int) -> Iterator[int]:
    """Close ``fd`` when the block ends (an fd-based walk opens many)."""
    try:
        yield fd
    finally:
        os.close(fd)


def _open_subdir(parent_fd: int, name: str) -> int:
    return os.open(name, DIR_FLAGS, dir_fd=parent_fd)


def remove_entry(parent_fd: int, name: str) -> None:
    """Remove ``name`` beneath ``parent_fd`` (a whole tree if a directory), no link followed."""
    try:
        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=parent_fd)
        return
    # coreutils rm walks with openat and never follows a link; unlike a recursive Python
    # walk it also copes with the 50000-deep trees a kernel can build. The path goes
    # through our own fd of the (trusted) parent.
    _rm_tree(f"/proc/{os.getpid()}/fd/{parent_fd}/{name}")


def _rm_tree(path: str) -> None:
    subprocess.run(["rm", "-rf", "--one-file-system", "--", path], check=False,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, pass_fds=())


class KernelDir:
    """One kernel's directory (see the module docstring for the layout).

    ``uid``/``gid`` are the kernel's identity, None when the server cannot switch users
    (then the kernel runs as the server's user and the layout protects nothing from it).
    """

    def __init__(self, kernels_dir: Path, kernel_id: str, uid: int | None, gid: int | None):
        self.kernels_dir = Path(kernels_dir)
        self.kernel_id = kernel_id
        self.path = self.kernels_dir / kernel_id
        self.uid = uid
        self.gid = gid if gid is not None else uid
        self.work = self.path / "work"
        self.sock = self.path / "sock"
        self.ctl = self.path / "ctl"
        self.conn = self.path / "conn"

    # -- descriptors ------------------------------------------------------------------

    def _open(self) -> int:
        """fd of the kernel dir; refuses one the kernel (or anyone else) could change."""
        with opened(open_trusted_dir(self.kernels_dir)) as parent:
            try:
                fd = _open_subdir(parent, self.kernel_id)
            except OSError as e:
                msg = f"kernel dir {self.path} cannot be opened safely: {e}"
                raise SandboxUnavailableError(msg) from None
        return _ours_alone(fd, self.path, "refusing to use it")

    # -- layout -----------------------------------------------------------------------

    def create(self) -> None:
        """Create (or, on restart, re-check) the layout; idempotent."""
        with opened(open_trusted_dir(self.kernels_dir)) as parent:
            with contextlib.suppress(FileExistsError):
                os.mkdir(self.kernel_id, 0o711, dir_fd=parent)
        with opened(self._open()) as fd:
            os.fchmod(fd, 0o711)
            for name in ("work", "sock", "ctl", "conn"):
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o700, dir_fd=fd)
            with opened(_open_subdir(fd, "ctl")) as ctl:
                os.fchmod(ctl, 0o711)
            self._hand_over(fd, "work")
            self._hand_over(fd, "conn")
            self.open_sockets()

    def own_filesystem(self, disk_limit: int, files_limit: int | None,
                       reuse: workfs.Reuse | None = None) -> workfs.WorkFs:
        """Put work/, conn/ and sock/ on a filesystem of their own of ``disk_limit`` bytes and
        ``files_limit`` inodes (workfs.py); a restart finds it there and keeps it;
        ``reuse``: a kept image (kept_files.py) instead of a fresh one.
        Raises :class:`~.workfs.WorkFsError`. Needs the kernel's uid (root)."""
        assert self.uid is not None, "a filesystem of its own needs a kernel uid"
        if workfs.is_mounted(self.path):
            return workfs.current(self.path, disk_limit, files_limit)
        with opened(self._open()) as fd:
            return workfs.create(self.path, fd, disk_limit, files_limit, self.uid, self.gid,
                                 reuse=reuse)

    def take_work(self, src_fd: int, name: str, old: tuple[int | None, int | None]) -> None:
        """Make the kept dir ``name`` beneath ``src_fd`` (root's, trusted) this kernel's
        work dir, in place of the empty one a first start has (kept_files.py); what the
        previous kernel (``old`` uid, gid) owned there becomes this kernel's
        (workfs.hand_over_tree: no link followed). Blocking."""
        with opened(self._open()) as fd:
            os.rmdir("work", dir_fd=fd)  # OSError if not empty: not a first start
            os.rename(name, "work", src_dir_fd=src_fd, dst_dir_fd=fd)
            if self.uid is not None and old[0] is not None and old != (self.uid, self.gid):
                workfs.hand_over_tree(fd, "work", (old[0], old[1]), (self.uid, self.gid))
            self._hand_over(fd, "work")

    def _hand_over(self, fd: int, name: str) -> None:
        """Give the kernel its own directory ``name`` (on the fd: no link is followed)."""
        with opened(_open_subdir(fd, name)) as sub:
            if self.uid is not None:
                os.fchown(sub, self.uid, self.gid)
            os.fchmod(sub, 0o700)

    def open_sockets(self) -> None:
        """An empty socket dir owned by the kernel, for the (next) process to bind in.

        What a previous process left there (its sockets, or anything it planted) is
        removed first: the server connects to these names once they are frozen again.
        """
        with opened(self._open()) as fd:
            with opened(_open_subdir(fd, "sock")) as sock:
                # Take it back before emptying it, so nothing new appears meanwhile.
                if self.uid is not None:
                    os.fchown(sock, os.geteuid(), os.getegid())
                os.fchmod(sock, 0o700)
                for name in os.listdir(sock):
                    remove_entry(sock, name)
            self._hand_over(fd, "sock")

    def empty(self, name: str) -> None:
        """Remove everything in the kernel's dir ``name`` (the dir itself stays its)."""
        with opened(self._open()) as fd, opened(_open_subdir(fd, name)) as sub:
            for entry in os.listdir(sub):
                remove_entry(sub, entry)

    def sockets_present(self, names: list[str]) -> bool:
        """Whether an entry exists for every name (lstat only: never opens anything)."""
        try:
            with opened(os.open(self.sock, DIR_FLAGS)) as sock:
                for name in names:
                    os.stat(name, dir_fd=sock, follow_symlinks=False)
        except OSError:
            return False
        return True

    def freeze_sockets(self, names: list[str]) -> list[str]:
        """Take the socket dir back and check every expected socket; returns problems.

        After this the kernel can no longer add, rename or replace an entry (the dir is
        the server's, mode 0700), so a check made now stays true: each name must be a
        socket owned by the kernel's uid, not a link to someone else's socket.
        """
        problems = []
        with opened(self._open()) as fd, opened(_open_subdir(fd, "sock")) as sock:
            if self.uid is not None:
                os.fchown(sock, os.geteuid(), os.getegid())
            os.fchmod(sock, 0o700)
            for name in os.listdir(sock):
                if name not in names:
                    remove_entry(sock, name)  # not a socket of ours: planted
            for name in names:
                try:
                    st = os.stat(name, dir_fd=sock, follow_symlinks=False)
                except FileNotFoundError:
                    problems.append(f"{name}: missing")
                    continue
                if not stat.S_ISSOCK(st.st_mode):
                    problems.append(f"{name}: not a socket ({stat.filemode(st.st_mode)})")
                elif self.uid is not None and st.st_uid != self.uid:
                    problems.append(f"{name}: owned by uid {st.st_uid}, not {self.uid}")
        return problems

    # -- files the server writes --------------------------------------------------------

    def write(self, name: str, data: str | bytes, mode: int = 0o644, where: str = "ctl") -> Path:
        """Atomically (re)place ``<where>/name`` with ``data``: a fresh temp file created
        beneath the dir's fd (O_EXCL, no link followed), then renamed over whatever is
        there. In ``conn/`` (the kernel's) the file is handed to the kernel's uid.
        """
        raw = data.encode() if isinstance(data, str) else data
        give = where == "conn" and self.uid is not None
        with opened(self._open()) as kfd, opened(_open_subdir(kfd, where)) as fd:
            tmp = f".{name}.{secrets.token_hex(6)}"
            tfd = os.open(
                tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600, dir_fd=fd,
            )
            try:
                with open(tfd, "wb", closefd=False) as f:
                    f.write(raw)
                if give:
                    os.fchown(tfd, self.uid, self.gid)
                os.fchmod(tfd, mode)
            finally:
                os.close(tfd)
            os.replace(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)
        return self.path / where / name

    def remove_file(self, name: str) -> None:
        """Remove ``ctl/name`` if it is there."""
        with opened(self._open()) as kfd, opened(_open_subdir(kfd, "ctl")) as fd:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=fd)

    def open_log(self, name: str = "kernel.log") -> int:
        """A write fd of a fresh root-only log file (the kernel never gets this fd)."""
        with opened(self._open()) as fd:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=fd)
            return os.open(
                name,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_APPEND,
                0o600,
                dir_fd=fd,
            )

    def remove(self) -> None:
        """Remove the whole dir (the kernel's files included), following no link; its
        own filesystem is unmounted and its image deleted first (workfs.release)."""
        try:
            parent = open_trusted_dir(self.kernels_dir)
        except SandboxUnavailableError:
            return
        # A container kernel's workspace bind (workspace.py), outside this dir.
        release_host_mount(host_mount_point(Path(self.kernels_dir).parent, self.kernel_id))
        with opened(parent):
            # Its own filesystem first: rm --one-file-system does not enter a mount.
            workfs.release(self.path)
            # A container that was just removed may still be letting go of its bind
            # mounts of our dirs: try again for a moment rather than leave the dir behind.
            for _ in range(40):
                remove_entry(parent, self.kernel_id)
                try:
                    os.stat(self.kernel_id, dir_fd=parent, follow_symlinks=False)
                except FileNotFoundError:
                    return
                time.sleep(0.05)


def prepare_kernel_dir(
    registry: Registry, kernel_id: str, uid: int | None, gid: int | None,
    sandbox_id: str | None = None,
) -> KernelDir:
    """Create (or, on a restart, reuse) a kernel's dir for one start of its process;
    named by its ``sandbox_id`` (its id unless it came from the warm pool)."""
    registry.ensure()
    if uid is not None:
        registry.update(kernel_id, uid=uid)
    kdir = KernelDir(registry.kernels_dir, sandbox_id or kernel_id, uid, gid)
    kdir.create()
    # A notice is for one execution of one process: none survives into the next; and
    # nothing the previous process left in its connection dir does either.
    kdir.remove_file("notice")
    kdir.empty("conn")
    return kdir
