"""Kernel launcher: ``python -I -S .../process/launch.py SPEC -- CMD...``.

Runs between fork and the kernel: it is the kernel's own process (it ``exec``s the
kernel command, so the pid jupyter_client holds is the kernel's pid; but see
``isolate`` below).  Doing this in a separate interpreter instead of a ``preexec_fn``
keeps the server safe: ``preexec_fn`` is unsafe in a threaded server (jupyter_server
runs threads), and an error here is a clean exit with a message instead of a
half-forked server.  It is run by path, without site, and imports nothing but the
standard library: importing the package (and jupyter_client) would cost ~0.2 s a start.

The server learns whether the sandbox was set up through ``status_fd`` (a pipe's write
end): its message if the launch fails here, EOF once the kernel command is exec'd (the
fd is close-on-exec), so a failed start is an error of the start, not a dead kernel.

Order matters: join cgroups and unshare namespaces while still root, set rlimits,
drop supplementary groups, gid, then uid, forbid regaining privileges, then exec.

With ``"isolate": true`` (root only) the kernel also gets its own pid, ipc and mount
namespaces, a fresh /proc, and a read-only view of the host's file systems except its
tmpfs scratch dirs and ``writable`` dirs.  A new pid namespace only applies to children,
so the launcher forks: the child becomes pid 1 of the namespace, sets the sandbox up and
forks the kernel (pid 2), staying its init (``_init_then_kernel``); the launcher stays
outside as an unprivileged supervisor whose exit status mirrors the kernel's (see
``_supervise``).  The pid jupyter_client holds is then the supervisor's.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import stat
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
EXIT_SANDBOX_FAILED = 121
# Starts a status message whose exec failed: "<EXEC_FAILED> <errno> <message>".
EXEC_FAILED = "exec-failed"
# The most of a failure message the server reads from ``status_fd``.
STATUS_LIMIT = 4096

# The new mount API (Linux >= 5.12).  Syscalls numbered from 424 on are the same on
# every architecture but alpha.
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_MOUNT_SETATTR = 442
SYS_OPENAT2 = 437
RESOLVE_NO_SYMLINKS = 0x04
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
OPEN_TREE_CLONE = 1
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOVE_MOUNT_T_EMPTY_PATH = 0x40
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_IDMAP = 0x00100000
MNT_DETACH = 0x2

# Seccomp: the kernel may not create set-user-ID or set-group-ID files (see
# _forbid_setid_files). Per architecture: its audit arch, and (syscall, index of the
# mode argument) for every call that sets a file's mode.
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
SETID_BITS = 0o6000
_SETID_CALLS = {
    "x86_64": (0xC000003E, {
        90: 1, 91: 1, 268: 2, 452: 2,  # chmod, fchmod, fchmodat, fchmodat2
        2: 2, 85: 1, 257: 3,  # open, creat, openat
        133: 1, 259: 2,  # mknod, mknodat (a regular file needs no capability)
    }),
    "aarch64": (0xC00000B7, {52: 1, 53: 2, 452: 2, 56: 3, 33: 2}),
}
# Calls whose mode the filter cannot read (openat2's is in a struct) or that open a way
# around it (io_uring runs opens outside the syscall path): ENOSYS, so libraries use
# the plain calls.
_BLIND_CALLS = {"x86_64": (437, 425), "aarch64": (437, 425)}

_RLIMITS = {
    "data": resource.RLIMIT_DATA,
    "nofile": resource.RLIMIT_NOFILE,
    "fsize": resource.RLIMIT_FSIZE,
    "core": resource.RLIMIT_CORE,
    "nproc": resource.RLIMIT_NPROC,
}

# What the isolate supervisor waits for.  SIGINT is only consumed: jupyter_client
# interrupts with killpg, which reaches the init directly (it passes it on once).
_SUPERVISED = {signal.SIGCHLD, signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT}
# What the namespace's init passes on to the kernel's process group.
_FORWARDED = {
    signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
    signal.SIGUSR2,
}


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


# The write end of the server's status pipe, while this process holds it.
_status_fd: int | None = None


def _fail(message: str, exec_errno: int | None = None) -> None:
    sys.stderr.write(f"limited-provisioner: cannot start kernel: {message}\n")
    sys.stderr.flush()
    if _status_fd is not None:
        # An exec's errno goes first, so the server raises the OSError a stock launch
        # would (launch_status.exec_errno).
        status = f"{EXEC_FAILED} {exec_errno} {message}" if exec_errno else message
        try:
            os.write(_status_fd, status.encode(errors="replace")[:STATUS_LIMIT])
        except OSError:
            pass  # the server gave up waiting: kernel.log has the message
    os._exit(EXIT_SANDBOX_FAILED)


def _hold_status_fd(spec: dict) -> None:
    """Keep the status pipe for :func:`_fail`; close-on-exec, so the kernel never gets it
    and the server reads EOF the moment the kernel command runs."""
    global _status_fd
    fd = spec.get("status_fd")
    if fd is not None:
        os.set_inheritable(fd, False)
        _status_fd = fd


def _release_status_fd() -> None:
    """The isolate supervisor's copy: only the child, which execs the kernel, keeps one."""
    global _status_fd
    if _status_fd is not None:
        os.close(_status_fd)
        _status_fd = None


def _check(result: int, what: str) -> int:
    """The ``result`` of a libc call, unless it failed: then the launch ends here."""
    if result < 0:
        _fail(f"{what} failed: {os.strerror(ctypes.get_errno())}")
    return result


def _unshare(libc: ctypes.CDLL, flags: int, what: str) -> None:
    _check(libc.unshare(flags), f"unshare({what})")
    if flags & CLONE_NEWNS:
        # Private propagation first, so nothing we mount ever shows up on the host.
        _mount(libc, "none", "/", None, MS_REC | MS_PRIVATE)


def _mount(libc: ctypes.CDLL, source: str, target: str, fstype: str | None, flags: int,
           options: str | None = None) -> None:
    result = libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None,
                        flags, options.encode() if options else None)
    _check(result, f"mount {source} on {target}")


def _mount_setattr(libc: ctypes.CDLL, what: str, dirfd: int, path: str, flags: int,
                   attr_set: int = 0, attr_clr: int = 0, userns_fd: int = 0) -> None:
    attr = _MountAttr(attr_set, attr_clr, 0, userns_fd)
    result = libc.syscall(SYS_MOUNT_SETATTR, dirfd, path.encode(), flags, ctypes.byref(attr),
                          ctypes.c_size_t(ctypes.sizeof(attr)))
    _check(result, f"mount_setattr {what}")


def _clone_tree(libc: ctypes.CDLL, what: str, dirfd: int, path: str, flags: int) -> int:
    """A detached copy of the mount at ``dirfd``/``path``: a bind mount that is not
    attached anywhere yet, so mounts made meanwhile neither cover nor change it."""
    tree = libc.syscall(SYS_OPEN_TREE, dirfd, path.encode(), OPEN_TREE_CLONE | os.O_CLOEXEC | flags)
    return _check(tree, f"open_tree {what}")


def _attach_tree(libc: ctypes.CDLL, what: str, tree: int, dirfd: int, path: str) -> None:
    flags = MOVE_MOUNT_F_EMPTY_PATH | (0 if path else MOVE_MOUNT_T_EMPTY_PATH)
    _check(libc.syscall(SYS_MOVE_MOUNT, tree, b"", dirfd, path.encode(), flags),
           f"move_mount {what}")
    os.close(tree)


def _open_exact(libc: ctypes.CDLL, path: str, what: str) -> int:
    """An ``O_PATH`` handle on ``path`` that followed no symlink on the way.

    Exposed paths are real paths checked by the server; a component another user owns
    could have been swapped for a symlink since (to a dir only root may reach): refused.
    """
    # No O_NOFOLLOW: with O_PATH it would open a final symlink itself, as a handle on the
    # link; RESOLVE_NO_SYMLINKS refuses it (ELOOP) like any other.
    how = _OpenHow(os.O_PATH | os.O_CLOEXEC, 0, RESOLVE_NO_SYMLINKS)
    fd = libc.syscall(SYS_OPENAT2, AT_FDCWD, path.encode(), ctypes.byref(how),
                      ctypes.c_size_t(ctypes.sizeof(how)))
    return _check(fd, f"open {what} {path} without following symlinks")


def _clone_exposed(libc: ctypes.CDLL, exposures: dict[str, str]) -> dict[str, int]:
    """A detached, read-only copy of each exposed path (an interpreter, a venv, a
    PYTHONPATH entry), taken before the scratch tmpfs and the covers hide it."""
    trees = {}
    for path in sorted(exposures):
        fd = _open_exact(libc, path, "exposed path")
        tree = _clone_tree(libc, path, fd, "", AT_EMPTY_PATH | AT_RECURSIVE)
        os.close(fd)
        # Read-only even where the host's mount is not (the plain launch): the kernel
        # reads an interpreter it never writes.
        _mount_setattr(libc, path, tree, "", AT_EMPTY_PATH | AT_RECURSIVE,
                       attr_set=MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV)
        trees[path] = tree
    return trees


def _mount_point(top: int, parts: list[str], is_dir: bool) -> int:
    """Create ``parts`` beneath ``top`` (a tmpfs of ours nobody else has seen): traversable
    dirs, a dir or an empty file at the end; a handle on the last one."""
    fd = top
    for i, name in enumerate(parts):
        last = i == len(parts) - 1
        try:
            if last and not is_dir:
                os.close(os.open(name, os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW, 0o644,
                                 dir_fd=fd))
            else:
                os.mkdir(name, 0o755, dir_fd=fd)
        except FileExistsError:
            pass  # a parent of two exposed paths
        flags = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
        if not last or is_dir:
            flags |= os.O_DIRECTORY
        child = os.open(name, flags, dir_fd=fd)
        if fd != top:
            os.close(fd)
        fd = child
    return fd


def _expose(libc: ctypes.CDLL, trees: dict[str, int], exposures: dict[str, str],
            fresh: set[str], flags: int, covers: list[str] = ()) -> None:
    """Put each exposed path back where it was, read-only, for the kernel's uid.

    ``exposures`` maps each path to its top: a scratch dir (``fresh``: our tmpfs is
    already there) or a dir the kernel's uid cannot enter (a 0700 /root holding a pyenv
    interpreter), which gets an empty tmpfs (the kernel sees none of its other
    contents; it could not have read them anyway).  Inside the top, a skeleton of
    traversable dirs leads to each path's mount point.
    """
    old_umask = os.umask(0o022)
    tops = sorted(set(exposures.values()) | set(covers))
    for top in tops:
        if top not in fresh:
            fd = _open_exact(libc, top, "dir to cover")
            _mount(libc, "tmpfs", f"/proc/self/fd/{fd}", "tmpfs", flags, "mode=0755,size=1m")
            os.close(fd)
    for path, tree in trees.items():
        top = exposures[path]
        top_fd = _open_exact(libc, top, "the dir above exposed path")
        parts = os.path.relpath(path, top).split("/")
        if ".." in parts or parts == ["."]:
            _fail(f"exposed path {path} does not lie beneath {top}")
        try:
            leaf = _mount_point(top_fd, parts, stat.S_ISDIR(os.fstat(tree).st_mode))
        except OSError as e:
            _fail(f"cannot make a mount point for {path} under {top}: {e}")
        _check(libc.syscall(SYS_MOVE_MOUNT, tree, b"", leaf, b"",
                            MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH),
               f"move_mount {path}")
        for fd in (tree, leaf, top_fd):
            os.close(fd)
    # The covers stay writable for root only (0755): a writable dir of the kernel under
    # one is recreated there next (_bind_writable).
    os.umask(old_umask)


def _is_under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def _open_writable(path: str) -> int:
    """A handle on the kernel-owned dir ``path`` that refuses a symlink in its place.

    Everything later refers to the dir through this handle, never through the path
    again: a kernel that swapped it for a symlink to /etc gets no writable /etc.
    """
    try:
        return os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        _fail(f"writable dir {path} is not a directory (a symlink?): {e}")


def _mount_points() -> list[str]:
    """Where something is mounted in our mount namespace."""
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for escaped, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        points = [p.replace(escaped, char) for p in points]
    return points


def _bind_writable(libc: ctypes.CDLL, writable: dict[str, int], ours: list[str]) -> None:
    """Bind each dir of ``writable`` (real path: handle opened before anything was
    mounted) onto itself, writable, on top of the read-only view.  ``ours`` are the
    mounts made since, which may cover some of them."""
    mounted = _mount_points()
    for path, fd in sorted(writable.items()):
        if any(other != path and _is_under(path, other) for other in writable):
            continue  # writable through the bind of its parent
        _bind_over(libc, path, fd, ours, mounted, attr_set=MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
                   attr_clr=MOUNT_ATTR_RDONLY)


def _bind_over(libc: ctypes.CDLL, path: str, fd: int, ours: list[str], mounted: list[str], *,
               attr_set: int, attr_clr: int = 0, userns_fd: int = 0) -> None:
    """Bind the dir ``fd`` (at real path ``path``) onto itself with ``attr_set`` (an
    idmapping through ``userns_fd`` with MOUNT_ATTR_IDMAP), on top of the read-only view.

    The bind is not recursive (a recursive one would carry read-write copies of what is
    mounted beneath), so it would hide every mount below it: refused.
    """
    hidden = [m for m in mounted if m != path and _is_under(m, path)]
    if path in ours or hidden:
        _fail(f"writable dir {path} would hide {path if path in ours else hidden[0]}")
    tree = _clone_tree(libc, path, fd, "", AT_EMPTY_PATH)
    _mount_setattr(libc, path, tree, "", AT_EMPTY_PATH, attr_set=attr_set, attr_clr=attr_clr,
                   userns_fd=userns_fd)
    if any(_is_under(path, top) for top in ours):
        # Hidden under a mount of ours (a tmpfs on /var/tmp, say): recreate its path
        # there (nothing but us has seen that mount yet) and attach it to that.
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            _fail(f"cannot recreate writable dir {path} in the sandbox: {e}")
        _attach_tree(libc, path, tree, AT_FDCWD, path)
    else:
        _attach_tree(libc, path, tree, fd, "")


def _userns_fd(libc: ctypes.CDLL, uid_map: list[int], gid_map: list[int]) -> int:
    """A user namespace whose only mappings are ``[on-disk id, kernel's id]`` for the uid
    and the gid: what an idmapped mount maps through. A child unshares it and waits while
    we write its maps, then exits; our handle keeps the namespace."""
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(ready_r)
        os.close(done_w)
        ok = libc.unshare(CLONE_NEWUSER) == 0
        os.write(ready_w, b"1" if ok else b"0")
        os.read(done_r, 1)
        os._exit(0)
    os.close(ready_w)
    os.close(done_r)
    try:
        if os.read(ready_r, 1) != b"1":
            _fail("unshare(user) for the workspace's idmapped mount failed")
        try:
            for name, line in (("uid_map", uid_map), ("setgroups", None), ("gid_map", gid_map)):
                with open(f"/proc/{pid}/{name}", "w") as f:
                    f.write("deny" if line is None else f"{line[0]} {line[1]} 1\n")
            return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            _fail(f"cannot set up the workspace's id mapping: {e}")
    finally:
        os.close(ready_r)
        os.close(done_w)
        os.waitpid(pid, 0)


def _workspace_attrs(libc: ctypes.CDLL, ws: dict) -> tuple[int, int, int]:
    """``(attr_set, attr_clr, userns_fd)`` of the workspace's bind: never set-id or
    devices; read-only, or mapped (the folder's owner seen as the kernel's uid)."""
    attr_set, attr_clr, userns = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, MOUNT_ATTR_RDONLY, 0
    if ws.get("read_only"):
        attr_set, attr_clr = attr_set | MOUNT_ATTR_RDONLY, 0
    elif ws.get("uid_map"):
        userns = _userns_fd(libc, ws["uid_map"], ws["gid_map"])
        attr_set |= MOUNT_ATTR_IDMAP
    return attr_set, attr_clr, userns


def mount_workspace(ws: dict, target: str) -> None:
    """The docker backend's half, run as root on the host (``launch.py --workspace``):
    the workspace's bind, as the isolated launcher makes it, attached at ``target`` (a
    root-owned dir of ours) for Docker to bind into the container."""
    libc = ctypes.CDLL(None, use_errno=True)
    source = _open_exact(libc, ws["path"], "workspace")
    where = _open_exact(libc, target, "workspace mount point")
    attr_set, attr_clr, userns = _workspace_attrs(libc, ws)
    tree = _clone_tree(libc, ws["path"], source, "", AT_EMPTY_PATH)
    _mount_setattr(libc, ws["path"], tree, "", AT_EMPTY_PATH, attr_set=attr_set,
                   attr_clr=attr_clr, userns_fd=userns)
    _attach_tree(libc, target, tree, where, "")


def _make_mount_point(root: str, path: str) -> None:
    """Create ``path`` (absolute, in a container's view) beneath ``root`` (the host's view
    of the container's root filesystem), following no symlink: the directories a bind
    at ``path`` needs in a container whose image lacks them."""
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for part in [p for p in path.split("/") if p]:
            if part in (".", ".."):
                _fail(f"folder path {path} is not normalized")
            try:
                os.mkdir(part, 0o755, dir_fd=fd)
            except FileExistsError:
                pass
            child = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                            dir_fd=fd)
            os.close(fd)
            fd = child
    except OSError as e:
        _fail(f"cannot make the folder's mount point {path} in the container: {e}")
    finally:
        os.close(fd)


def attach_workspace(pid: int, ws: dict, container_root: str | None = None) -> None:
    """A pooled kernel's folder, bound at its claim (``launch.py --attach``; root, on the
    host): the workspace's bind, made as the launcher makes it, attached at the folder's
    own path inside the mount namespace of the kernel ``pid``. The kernel ran no code of
    anyone's yet; it never sees the folder before the bind is complete.

    A process kernel: ``pid`` is its supervisor, outside its namespaces, whose child (the
    init of its pid namespace) is in its mount namespace. A container (``container_root``:
    the host's view of its root filesystem, where the mount point is made): ``pid`` is
    its init."""
    libc = ctypes.CDLL(None, use_errno=True)
    if container_root is None:
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                pid = int(f.read().split()[0])
        except (OSError, IndexError, ValueError) as e:
            _fail(f"the kernel's init (child of {pid}) not found: {e}")
    if os.stat(f"/proc/{pid}/ns/mnt").st_ino == os.stat("/proc/self/ns/mnt").st_ino:
        _fail(f"process {pid} shares the host's mount namespace: not binding the folder there")
    with open(f"/proc/{pid}/mountinfo") as f:
        mounted = [line.split()[4] for line in f]
    hidden = [m for m in mounted if m != ws["path"] and _is_under(m, ws["path"])]
    if ws["path"] in mounted or hidden:
        _fail(f"folder {ws['path']} would hide {hidden[0] if hidden else 'a mount'} "
              f"of the kernel")
    ns = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    if container_root is not None:
        _make_mount_point(container_root, ws["path"])
    source = _open_exact(libc, ws["path"], "workspace")
    attr_set, attr_clr, userns = _workspace_attrs(libc, ws)
    tree = _clone_tree(libc, ws["path"], source, "", AT_EMPTY_PATH)
    _mount_setattr(libc, ws["path"], tree, "", AT_EMPTY_PATH, attr_set=attr_set,
                   attr_clr=attr_clr, userns_fd=userns)
    # A detached tree can be attached in another mount namespace (what `systemctl bind`
    # does); from here on, paths are the kernel's view (its read-only host).
    _check(libc.setns(ns, CLONE_NEWNS), "setns(mount) into the kernel")
    where = _open_exact(libc, ws["path"], "the folder in the kernel's view")
    _attach_tree(libc, ws["path"], tree, where, "")


def _forbid_setid_files(libc: ctypes.CDLL) -> None:
    """A seccomp filter: no call may give a file the set-user-ID or set-group-ID bit.

    A kernel that writes into its workspace through an idmapped mount writes as the
    folder's owner on the host: a set-id file it made would run as that user for anyone
    on the host. (Inside, nosuid mounts and no_new_privs already make set-id inert.)
    Installed after no_new_privs; inherited by everything the kernel starts.
    """
    import platform

    machine = platform.machine()
    if machine not in _SETID_CALLS:
        _fail(f"set-id files cannot be forbidden on {machine}: no seccomp table for it")
    arch, calls = _SETID_CALLS[machine]
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    errno_of = {"EPERM": 1, "ENOSYS": 38}
    prog = [
        (ld, 0, 0, 4),  # seccomp_data.arch
        (jeq, 1, 0, arch),
        (ret, 0, 0, SECCOMP_RET_ERRNO | errno_of["EPERM"]),  # another ABI (int 0x80)
        (ld, 0, 0, 0),  # seccomp_data.nr
    ]
    if machine == "x86_64":
        prog += [(jge, 0, 1, 0x40000000), (ret, 0, 0, SECCOMP_RET_ERRNO | errno_of["ENOSYS"])]
    for nr in _BLIND_CALLS[machine]:
        prog += [(jeq, 0, 1, nr), (ret, 0, 0, SECCOMP_RET_ERRNO | errno_of["ENOSYS"])]
    for nr, arg in sorted(calls.items()):
        prog += [
            (jeq, 0, 4, nr),
            (ld, 0, 0, 16 + 8 * arg),  # low 32 bits of args[arg] (little-endian)
            (jset, 0, 1, SETID_BITS),
            (ret, 0, 0, SECCOMP_RET_ERRNO | errno_of["EPERM"]),
            (ret, 0, 0, SECCOMP_RET_ALLOW),
        ]
    prog.append((ret, 0, 0, SECCOMP_RET_ALLOW))
    filters = (_SockFilter * len(prog))(*(_SockFilter(*insn) for insn in prog))
    fprog = _SockFprog(len(prog), filters)
    _check(libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0),
           "prctl(PR_SET_SECCOMP)")


def _loopback_up() -> None:
    """Bring up ``lo`` of the kernel's new network namespace (it starts down): a kernel
    without network still talks to itself over 127.0.0.1 -- JupyterLab's debugger
    (debugpy), multiprocessing managers, local test servers. Nothing else is there."""
    import fcntl
    import socket
    import struct

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            ifreq = fcntl.ioctl(s, SIOCGIFFLAGS, struct.pack("16sH14x", b"lo", 0))
            flags = struct.unpack("16sH14x", ifreq)[1]
            fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))
    except OSError as e:
        # Not worth refusing the kernel: it still has no network, only no loopback.
        sys.stderr.write(f"limited-provisioner: loopback stays down in the sandbox: {e}\n")


def _mount_isolated(libc: ctypes.CDLL, spec: dict) -> None:
    """Private mount + ipc (+ net) namespaces with a read-only view of the host."""
    flags, what = CLONE_NEWNS | CLONE_NEWIPC, "mount, ipc"
    if spec.get("unshare_net"):
        flags, what = flags | CLONE_NEWNET, what + ", network"
    _unshare(libc, flags, what)
    if spec.get("unshare_net"):
        _loopback_up()
    # Opened before anything is mounted over them; keyed by where they really are.
    handles = [_open_writable(p) for p in spec.get("writable", [])]
    writable = {os.readlink(f"/proc/self/fd/{fd}"): fd for fd in handles}
    ws = spec.get("workspace")
    # A real path checked by the server; a component swapped for a symlink since is refused.
    ws_fd = _open_exact(libc, ws["path"], "workspace") if ws else None

    # Device nodes, fifos and sockets stay usable on a read-only mount (only creating,
    # changing and removing files is refused), so /dev can be read-only too.
    _mount_setattr(libc, "/ read-only", AT_FDCWD, "/", AT_RECURSIVE,
                   attr_set=MOUNT_ATTR_RDONLY)
    exposures = spec.get("expose") or {}
    # Copied before the tmpfs mounts, which may cover them (a venv under /tmp).
    trees = _clone_exposed(libc, exposures)
    _mount(libc, "proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    tmpfs = spec.get("tmpfs") or {}
    for target, options in tmpfs.items():
        _mount(libc, "tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, options)
    covers = [c for c in spec.get("covers", []) if c not in tmpfs]
    if trees or covers:
        _expose(libc, trees, exposures, set(tmpfs), MS_NOSUID | MS_NODEV, covers)

    ours = ["/proc", *(os.path.realpath(p) for p in [*tmpfs, *exposures.values(), *covers])]
    _bind_writable(libc, writable, ours)
    if ws and ws_fd is not None:
        # After /proc is the namespace's own: _userns_fd finds its child there.
        attr_set, attr_clr, userns = _workspace_attrs(libc, ws)
        _bind_over(libc, ws["path"], ws_fd, ours, _mount_points(), attr_set=attr_set,
                   attr_clr=attr_clr, userns_fd=userns)
        os.close(ws_fd)
        if userns:
            os.close(userns)
    for fd in handles:
        os.close(fd)


def _join_cgroups(spec: dict) -> None:
    pid = str(os.getpid())
    for procs_file in spec.get("cgroup_procs", []):
        try:
            with open(procs_file, "w") as f:
                f.write(pid)
        except OSError as e:
            _fail(f"joining cgroup {procs_file} failed: {e}")


def _drop_privileges(libc: ctypes.CDLL, uid: int | None, gid: int | None) -> None:
    if gid is not None:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
    if uid is not None:
        os.setresuid(uid, uid, uid)
        if os.geteuid() == 0 and uid != 0:
            _fail("still root after setuid")
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")


def _limit_and_drop(libc: ctypes.CDLL, spec: dict) -> None:
    """Rlimits, niceness, then the kernel's uid, then its work dir."""
    for name, value in spec.get("rlimits", {}).items():
        soft, hard = value if isinstance(value, list) else (value, value)
        try:
            resource.setrlimit(_RLIMITS[name], (soft, hard))
        except (ValueError, OSError) as e:
            _fail(f"setrlimit {name}={value} failed: {e}")

    nice = spec.get("nice")
    if nice:
        os.nice(nice)

    _drop_privileges(libc, spec.get("uid"), spec.get("gid"))
    if spec.get("no_setid_files"):
        _forbid_setid_files(libc)

    cwd = spec.get("cwd")
    if cwd:
        try:
            os.chdir(cwd)
        except OSError as e:
            _fail(f"cannot enter work dir {cwd}: {e}")


def apply(spec: dict) -> None:
    """Apply the sandbox described by ``spec`` to the current process."""
    _join_cgroups(spec)

    libc = ctypes.CDLL(None, use_errno=True)
    if spec.get("unshare_net"):
        _unshare(libc, CLONE_NEWNET, "network")
        _loopback_up()
    tmpfs = spec.get("tmpfs") or {}
    exposures = spec.get("expose") or {}
    if tmpfs or exposures:
        _unshare(libc, CLONE_NEWNS, "mount")
        trees = _clone_exposed(libc, exposures)
        for target, options in tmpfs.items():
            _mount(libc, "tmpfs", target, "tmpfs", 0, options)
        if trees:
            _expose(libc, trees, exposures, set(tmpfs), 0)

    _limit_and_drop(libc, spec)


def apply_isolated(spec: dict) -> None:
    """Apply ``spec`` with ``isolate``: returns in the kernel, pid 2 of its own pid
    namespace with the sandbox applied; the parent supervises from outside and pid 1
    is the namespace's init (:func:`_init_then_kernel`); neither returns."""
    if os.geteuid() != 0:
        _fail("isolate needs root")
    if not spec.get("uid"):
        _fail("isolate needs a uid to drop to (root could undo the read-only view)")
    _join_cgroups(spec)  # the child inherits the cgroups
    libc = ctypes.CDLL(None, use_errno=True)
    _unshare(libc, CLONE_NEWPID, "pid")
    # Until the child has dropped to the kernel's uid the unprivileged parent cannot
    # kill it; the child instead dies with the parent (PR_SET_PDEATHSIG) and checks
    # this pipe, which reads EOF once the parent is gone.
    parent_alive, parent_holds = os.pipe()
    # The kernel's wait status, from the init to the supervisor (the init's own exit
    # status cannot carry a signal: pid 1 cannot kill itself).
    kernel_status_r, kernel_status_w = os.pipe()
    # Blocked before fork, so no signal is lost or acted on before the parent waits.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SUPERVISED)
    child = os.fork()
    if child:
        os.close(parent_alive)
        os.close(kernel_status_w)
        _release_status_fd()
        _supervise(libc, spec, child, kernel_status_r)
    os.close(parent_holds)
    os.close(kernel_status_r)
    # Python's SIGINT handler would turn an interrupt during setup into a traceback; as
    # pid 1 with SIG_DFL, signals from outside are dropped until the kernel has a handler.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    _mount_isolated(libc, spec)
    _limit_and_drop(libc, spec)
    # Set after the last credential change, which clears it.
    _check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
    os.set_blocking(parent_alive, False)
    try:
        os.read(parent_alive, 1)
        _fail("the launcher died during setup")
    except BlockingIOError:
        pass  # the parent still holds the pipe open
    os.close(parent_alive)
    _init_then_kernel(kernel_status_w)


def _init_then_kernel(kernel_status_w: int) -> None:
    """Fork the kernel as pid 2 and stay its init: returns in the kernel only.

    The kernel is then an ordinary process: a signal it sends itself, or one without a
    handler, acts as it would outside (pid 1 ignores both), and it leads a process group
    of its own *inside* the namespace, so shells and pools it starts stay in it (bash
    makes a group of its own when it cannot see its group, which lives outside) and an
    interrupt reaches them as with a stock kernel. This init forwards what the host sends
    (to the launcher's group) to the kernel's group, reaps orphans, and when the kernel
    ends, hands its wait status to the supervisor and exits -- which ends the namespace.
    """
    for signo in _FORWARDED:
        # From outside, pid 1 gets only the signals it has a handler for.
        signal.signal(signo, _ignore)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, _FORWARDED | {signal.SIGCHLD})
    kernel = os.fork()
    if kernel == 0:
        os.close(kernel_status_w)
        for signo in _FORWARDED:
            signal.signal(signo, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        os.setpgid(0, 0)
        return
    _release_status_fd()  # the kernel reports on it until its exec; EOF means started
    _retitle(b"limited-provisioner-init")
    while True:
        signo = signal.sigwaitinfo(_FORWARDED | {signal.SIGCHLD}).si_signo
        if signo != signal.SIGCHLD:
            try:
                os.killpg(kernel, signo)
            except OSError:
                pass  # its group is gone: SIGCHLD follows
            continue
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                pid = 0
            if pid == 0:
                break
            if pid == kernel:
                os.write(kernel_status_w, status.to_bytes(4, "little"))
                os._exit(0)


def _retitle(title: bytes) -> None:
    """Overwrite this process's command line, which the kernel can read in its /proc:
    it is the launcher's, with the whole sandbox spec in it (as setproctitle does: the
    bytes between arg_start and arg_end of /proc/self/stat are this process's own)."""
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        start, end = int(fields[45]), int(fields[46])  # fields 48 and 49
    except (OSError, IndexError, ValueError):
        return
    if end - start < 2:
        return
    ctypes.memset(start, 0, end - start)
    ctypes.memmove(start, title, min(len(title), end - start - 1))


def _ignore(signo: int, frame: object) -> None:
    """A handler that is not SIG_DFL; the signals it is set for are blocked and taken
    with sigwaitinfo, so it never runs."""


def _supervise(libc: ctypes.CDLL, spec: dict, child: int, kernel_status_r: int) -> None:
    """The parent: wait for the child (the namespace's init), then exit the way the
    kernel did, so an OOM kill still reads as -9.

    A signal sent to this process alone (not to its group, which jupyter_client signals
    and the init is in) is passed to the init, which passes it to the kernel.
    """
    _drop_privileges(libc, spec["uid"], spec.get("gid"))
    while True:
        signo = signal.sigwaitinfo(_SUPERVISED).si_signo
        if signo == signal.SIGCHLD:
            pid, status = os.waitpid(child, os.WNOHANG)
            if pid:
                os.set_blocking(kernel_status_r, False)
                try:
                    reported = os.read(kernel_status_r, 4)
                except BlockingIOError:
                    reported = b""
                _exit_as(int.from_bytes(reported, "little") if len(reported) == 4 else status)
        elif signo != signal.SIGINT:
            try:
                os.kill(child, signo)
            except PermissionError:
                _die_of(signo)  # it is still root, setting up, and exits when we are gone
            except OSError:
                pass  # already gone: SIGCHLD follows


def _exit_as(status: int) -> None:
    """Exit with the wait ``status`` of the child: its code, or killed by its signal."""
    if os.WIFSIGNALED(status):
        _die_of(os.WTERMSIG(status))
    os._exit(os.WEXITSTATUS(status))


def _die_of(signo: int) -> None:
    if signo != signal.SIGKILL:
        signal.signal(signo, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signo})
    os.kill(os.getpid(), signo)
    os._exit(128 + signo)  # not reached for a signal that can kill


def main(argv: list[str]) -> None:
    if len(argv) == 3 and argv[0] == "--workspace":
        mount_workspace(json.loads(argv[1]), argv[2])
        return
    if len(argv) in (3, 4) and argv[0] == "--attach":
        attach_workspace(int(argv[1]), json.loads(argv[2]), *argv[3:])
        return
    if len(argv) < 3 or argv[1] != "--":
        _fail("usage: launch.py SPEC_JSON -- CMD...")
    spec = json.loads(argv[0])
    _hold_status_fd(spec)
    if spec.get("refused"):
        _fail(spec["refused"])  # a restart the server could not set up (status pipe)
    cmd = argv[2:]
    if spec.get("isolate"):
        apply_isolated(spec)
    else:
        apply(spec)
    try:
        os.execvp(cmd[0], cmd)
    except OSError as e:
        _fail(f"exec {cmd[0]!r} failed: {e}", e.errno)


if __name__ == "__main__":
    main(sys.argv[1:])
