"""Where a kernel works: the notebook's folder (its workspace) or a private dir.

A kernel started for a notebook (jupyter_server passes the notebook's folder as ``cwd``)
works in that folder: it reads the files next to the notebook and what it writes stays
there, owned by the folder's owner. As root each kernel runs as its own unprivileged
uid; the folder is then bound into the kernel's view through an *idmapped* mount
(Linux >= 5.12) that shows the folder's owner as the kernel's uid, so the kernel writes
there as that owner without being that user anywhere else. The mount is ``nosuid,
nodev``, the kernel cannot create set-id files (a seccomp filter, launch.py), and a
kernel is never mapped onto root: a root-owned folder is bound read-only.

:func:`resolve_workspace` decides, from the ``workspace`` setting, the start's ``cwd``
and the kernel's identity, what the launcher (process backend) or the host-side mount
(docker backend) sets up: a :class:`Workspace`, as plain data.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from .errors import LimitConfigError, WorkspaceError

NOTEBOOK = "notebook"
PRIVATE = "private"
# World-writable host dirs every kernel gets a private, empty copy of.
PRIVATE_SCRATCH = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")


@dataclass(frozen=True)
class Workspace:
    """The host folder a kernel works in, and how it sees it.

    ``uid_map``/``gid_map``: ``(on-disk id, kernel's id)`` of the idmapped mount (None:
    the kernel uses the folder as the server's user would, or read-only).
    ``read_only``: the kernel may read but not write there; ``why`` says why.
    """

    path: str
    owner: int
    group: int
    uid_map: tuple[int, int] | None = None
    gid_map: tuple[int, int] | None = None
    read_only: bool = False
    why: str = ""

    def to_spec(self) -> dict:
        """The launcher's ``workspace`` entry (launch.py)."""
        spec: dict = {"path": self.path, "read_only": self.read_only}
        if self.uid_map and self.gid_map:
            spec["uid_map"], spec["gid_map"] = list(self.uid_map), list(self.gid_map)
        return spec

    def describe(self) -> str:
        if self.read_only:
            return f"{self.path}, read-only ({self.why})"
        if self.uid_map:
            return (f"{self.path}, written as its owner uid {self.owner} through an idmapped "
                    f"mount (nosuid, nodev, no set-id files)")
        return f"{self.path}, as the server's user"


def validate_setting(value: str) -> str:
    """The ``workspace`` trait's value, or a LimitConfigError naming what is accepted."""
    if value in (NOTEBOOK, PRIVATE) or os.path.isabs(value):
        return value
    msg = (
        f"workspace={value!r} must be 'notebook' (the folder Jupyter starts the kernel for), "
        f"'private' (a fresh per-kernel dir) or an absolute path"
    )
    raise LimitConfigError(msg)


def chosen_folder(setting: str, cwd: str | None) -> str | None:
    """The host folder the kernel works in under ``setting``, or None for its private dir.

    "notebook" takes the start's ``cwd`` (jupyter_server passes the notebook's folder;
    a kernel started without one, from code or an agent, keeps a private dir)."""
    if setting == PRIVATE:
        return None
    if setting == NOTEBOOK:
        return str(cwd) if cwd else None
    return setting


def trusted_realpath(path: str, server_uid: int) -> str:
    """``path`` with its symlinks resolved, refusing a symlink the server does not own.

    A kernel writing in a folder can plant a symlink there; a later kernel started
    "in" it would be bound wherever the link points. Links owned by root (or, for a
    server that is not root, by the server's own user) are followed; any other is
    refused with the real path to use instead.
    """
    path = os.path.abspath(path)
    parts = Path(path).parts
    current = Path("/")
    for name in parts[1:]:
        candidate = current / name
        try:
            st = candidate.lstat()
        except OSError as e:
            raise WorkspaceError(_cannot(path, e)) from None
        if stat.S_ISLNK(st.st_mode):
            if st.st_uid not in (0, server_uid):
                real = os.path.realpath(path)
                msg = (
                    f"the folder {path} is reached through the symlink {candidate}, owned by "
                    f"uid {st.st_uid} (a kernel could have made it): the kernel is not "
                    f"started there. Open the notebook by its real path ({real}), or set "
                    f"workspace='private'"
                )
                raise WorkspaceError(msg, reason=msg)
            current = Path(os.path.realpath(candidate))
        else:
            current = candidate
    return str(current)


def _cannot(path: str, error: OSError) -> str:
    return f"cannot use the folder {path} as the kernel's workspace: {error.strerror or error}"


def resolve_workspace(
    folder: str,
    *,
    server_uid: int,
    kernel_uid: int | None,
    kernel_gid: int | None,
    owner_gid: int | None = None,
) -> Workspace:
    """How the kernel sees ``folder``: mapped onto its own uid when it has one (a root
    server), as is otherwise; read-only when it belongs to root.

    ``owner_gid``: the group files the kernel creates get on disk when the folder's own
    group is root's (default: the owner's primary group, or the owner's uid).
    """
    real = trusted_realpath(folder, server_uid)
    try:
        st = os.stat(real)
    except OSError as e:
        raise WorkspaceError(_cannot(folder, e)) from None
    if not stat.S_ISDIR(st.st_mode):
        raise WorkspaceError(f"cannot use {folder} as the kernel's workspace: not a folder")
    for scratch in PRIVATE_SCRATCH:
        if real == scratch:
            msg = (
                f"the notebook lies directly in {scratch}, which every kernel gets a private, "
                f"empty copy of: move it into a folder (e.g. {scratch}/work/), or set "
                f"workspace='private'"
            )
            raise WorkspaceError(msg, reason=msg)
    if kernel_uid is None:
        # No identity of its own (the server is not root): the kernel is the server's
        # user, and sees the folder as that user does, like a stock kernel.
        return Workspace(real, st.st_uid, st.st_gid)
    if st.st_uid == 0 and st.st_mode & 0o005 != 0o005:
        msg = (
            f"the folder {real} belongs to root and other users cannot read it (mode "
            f"{stat.filemode(st.st_mode)}); kernels never run as root, so this one could "
            f"not even list it. Keep notebooks in a folder owned by a user (e.g. "
            f"install -d -o 1000 -g 1000 /srv/notebooks, then jupyter lab "
            f"--ServerApp.root_dir=/srv/notebooks), or set workspace='private'"
        )
        raise WorkspaceError(msg, reason=msg)
    if st.st_uid == 0:
        why = (
            f"it belongs to root and kernels never write as root; give it to a user "
            f"(chown -R USER {real}) or set workspace='private'"
        )
        return Workspace(real, 0, st.st_gid, read_only=True, why=why)
    group = st.st_gid if st.st_gid != 0 else (owner_gid or _primary_gid(st.st_uid))
    gid = kernel_gid if kernel_gid is not None else kernel_uid
    return Workspace(real, st.st_uid, group, uid_map=(st.st_uid, kernel_uid),
                     gid_map=(group, gid))


def _primary_gid(uid: int) -> int:
    import pwd

    try:
        gid = pwd.getpwuid(uid).pw_gid
    except KeyError:
        return uid
    return gid or uid


def resolve_beneath(folder: str, path: str) -> str | None:
    """``path`` (relative to ``folder``) if it names something in ``folder`` reached
    without a symlink, else None: jupyter_server's ``resolvePath`` for a kernel. The
    kernel writes in its folder, so no link it planted is followed (a root server
    stating through one would tell it what exists where it cannot look)."""
    parts = [p for p in Path(path).parts if p not in ("", ".")]
    if not parts or Path(path).is_absolute() or ".." in parts:
        return None
    flags = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(folder, flags | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        for name in parts:
            try:
                child = os.open(name, flags, dir_fd=fd)
            except OSError:
                return None
            os.close(fd)
            fd = child
            if stat.S_ISLNK(os.fstat(fd).st_mode):
                return None
    finally:
        os.close(fd)
    return str(Path(folder, *parts))


# -- the docker backend's host-side bind --------------------------------------------------

# Where, under the state dir, a container kernel's workspace is mounted for Docker to
# bind: outside the kernel dir, whose removal (rm --one-file-system) would otherwise walk
# into the user's folder (an idmapped bind is on the same device).
MOUNTS_DIR = "workspaces"


def host_mount_point(state_dir: Path | str, kernel_id: str) -> Path:
    return Path(state_dir) / MOUNTS_DIR / kernel_id


def mount_on_host(ws: Workspace, target: Path) -> None:
    """Bind ``ws`` at ``target`` as the launcher binds it into a process kernel's view
    (launch.py ``--workspace``: no symlink followed, nosuid, nodev, idmapped or
    read-only). Blocking; root only. Run in a fresh interpreter: making the id mapping
    forks, which a threaded server must not do."""
    import json
    import subprocess
    import sys

    from .process import launch

    release_host_mount(target)
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    target.mkdir(mode=0o700)
    done = subprocess.run(
        [sys.executable, "-I", "-S", launch.__file__, "--workspace",
         json.dumps(ws.to_spec()), str(target)],
        capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=30, check=False,
    )
    if done.returncode != 0:
        release_host_mount(target)
        said = done.stderr.strip().removeprefix("limited-provisioner: cannot start kernel: ")
        msg = f"cannot bind the folder {ws.path} for the kernel: {said}"
        raise WorkspaceError(msg, reason=msg)


async def attach_in_kernel(pid: int, ws: Workspace, container_root: str | None = None
                           ) -> str | None:
    """Bind ``ws`` into the mount namespace of the running kernel ``pid`` (a pooled
    kernel being claimed; launch.py ``--attach``, root only); None, or why it could not.
    A fresh interpreter: setns into a mount namespace needs a single-threaded caller."""
    import asyncio
    import json
    import sys

    from .process import launch

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-I", "-S", launch.__file__, "--attach", str(pid),
        json.dumps(ws.to_spec()), *([container_root] if container_root else []),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    if proc.returncode == 0:
        return None
    said = err.decode(errors="replace").strip()
    return said.removeprefix("limited-provisioner: cannot start kernel: ")[:500]


def release_host_mount(target: Path) -> None:
    """Detach whatever is mounted at ``target`` and remove the (then empty) mount point.
    Idempotent. Never removes anything beneath it: rmdir refuses a dir that is not empty
    (a mount still attached), so a user's files cannot be deleted from here."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for _ in range(8):  # stacked mounts (a crash between two starts)
        if libc.umount2(str(target).encode(), 2) != 0:  # MNT_DETACH
            break
    try:
        target.rmdir()
    except FileNotFoundError:
        pass
    except OSError:
        pass  # not empty: a mount we could not detach stays, and the next call retries
