"""The kernel's own filesystem: a hard cap on what it can write, with no overshoot.

A watchdog that sums a directory every few seconds lets a fast writer put gigabytes
there before it looks (attack 3.1 wrote 1.6G against disk_limit=100M). With a
filesystem of its own, a write past ``disk_limit`` or a file past ``files_limit`` fails
in the kernel with ENOSPC, as on a full disk: nothing to kill, nothing over the limit.

At the kernel's first start (both backends; blocking, run off the event loop)::

    <kernel dir>/disk/          root 0700: the kernel cannot even look in
    <kernel dir>/disk/image     sparse file of disk_limit bytes + the inode tables
                                (mkfs.ext4 -N files_limit, no journal; the inodes
                                ext4 adds to fill its tables are taken by held/)
    <kernel dir>/disk/mnt       where it is loop-mounted (nosuid, nodev) for a moment:
    <kernel dir>/work           its work/, conn/ and sock/ are bind-mounted onto these
    <kernel dir>/conn           (the kernel's HOME, connection and socket dirs, same
    <kernel dir>/sock           paths and owners as before), then mnt is unmounted again

so the only mounts are the kernel's own dirs: nothing the kernel can write is left on
the host's filesystem, and the filesystem's root, the image and the loop device are
nowhere it can reach (a container gets binds of the same host paths, which show the
ext4). Restarts find it mounted and keep it (data survives an
auto-restart, as before); re-adoption after a server crash too: mounts outlive the
server. :func:`release` (from :meth:`KernelDir.remove`, so at shutdown and in the
reaper alike) unmounts both, lets the loop device go, deletes the image: nothing a
kernel wrote is there for the next one — except with ``keep_files_for``: an idle cull
unmounts it and keeps the image (:func:`detach`, kept_files.py), and the session's next
kernel mounts it again instead of a fresh one (:func:`create` with ``reuse``).

Where the host cannot do this (not root, no ``/dev/loop-control``, no ``mkfs.ext4``),
:func:`unavailable` says why and the watchdog keeps the limit, reported as best-effort.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import glob
import math
import os
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import SandboxUnavailableError
from .limits import format_size

DISK = "disk"  # <kernel dir>/disk: the image and the moment's mount point, root 0700
IMAGE = "image"
STAGE = "mnt"
# The kernel dir's entries the kernel can write: they live on its filesystem.
ON_FS = ("work", "conn", "sock")
BLOCK = 4096
INODE_SIZE = 256
# Inodes ext4 keeps for itself (1-10 reserved, 11 lost+found), and work/, conn/, sock/.
OWN_INODES = 14
# Root's dir at the filesystem's top (never bound into the kernel's view) holding empty
# files that take the inodes mkfs adds past files_limit: ext4 fills whole inode-table
# blocks (16 inodes each, per group), so -N 514 gives 528 -- 14 more files than allowed.
HELD = "held"
# When files_limit is unset: one inode per 16K, mke2fs's own default ratio.
INODE_RATIO = 16384
# ext4 blocks per group at 4K blocks; every group has a whole number of inode-table
# blocks (16 inodes each), so the inode count is rounded up per group.
GROUP_BLOCKS = 32768
# ext4 keeps min(2% of the blocks, 4096) back for metadata it must write when full.
RESERVED_CLUSTERS = 4096
INODES_PER_BLOCK = BLOCK // INODE_SIZE

MKFS_OPTIONS = [
    "-q", "-F",
    "-m", "0",  # no blocks reserved for root: the kernel is never root, they'd be lost
    "-b", str(BLOCK),
    "-I", str(INODE_SIZE),
    # No journal (nothing to replay: the filesystem dies with the kernel, and the host
    # keeps running across a server crash); no reserved GDT blocks for an online resize
    # that never happens. Both make mkfs and the image smaller.
    "-O", "^has_journal,^resize_inode",
    # Inode tables are left as holes: a sparse image reads back zeros anyway.
    "-E", "lazy_itable_init=1,nodiscard",
]
# noinit_itable: the kernel's ext4lazyinit thread would otherwise write zeros over the
# inode tables in the background, turning the sparse image's holes into real blocks.
MOUNT_OPTIONS = "loop,nosuid,nodev,noinit_itable"

MS_BIND = 4096
UMOUNT_NOFOLLOW = 8
MNT_DETACH = 2
LOOP_CLR_FD = 0x4C01
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class WorkFsError(SandboxUnavailableError):
    """The kernel's own filesystem could not be made (the start falls back to the
    watchdog unless ``own_filesystem`` is "required")."""


@dataclass(frozen=True)
class Geometry:
    """Size of the image and the inodes asked of mkfs for one kernel's limits."""

    image_bytes: int
    inodes: int | None  # None: mke2fs's ratio (files_limit unset)

    @classmethod
    def of(cls, disk_limit: int, files_limit: int | None) -> Geometry:
        """The inode tables, and the blocks ext4 holds back for its own metadata (2%,
        at most 4096: "resv_clusters"), come on top of disk_limit, so the kernel can
        write what it was promised; ext4's other bookkeeping (bitmaps, superblock
        copies, the root dir: tens of KB) comes out of it, so it never gets more."""
        data_blocks = math.ceil(disk_limit / BLOCK)
        if files_limit is None:
            inodes = None
            table_blocks = math.ceil(data_blocks * BLOCK / INODE_RATIO / INODES_PER_BLOCK)
        else:
            inodes = files_limit + OWN_INODES
            groups = math.ceil((data_blocks + inodes / INODES_PER_BLOCK) / GROUP_BLOCKS)
            table_blocks = math.ceil(inodes / groups / INODES_PER_BLOCK) * groups
        blocks = data_blocks + table_blocks
        # ext4 takes blocks // 50; a little more here, so rounding never eats into it.
        held_back = min(math.ceil(blocks / 49), RESERVED_CLUSTERS)
        return cls((blocks + held_back) * BLOCK, inodes)

    def mkfs_args(self) -> list[str]:
        if self.inodes is None:
            return ["-i", str(INODE_RATIO)]
        return ["-N", str(self.inodes)]


@dataclass(frozen=True)
class WorkFs:
    """What enforces a kernel's disk_limit/files_limit, for its plan and registry entry.

    ``why_not`` is None when the kernel's work, connection and socket dirs are on a
    filesystem of their own; else why not (the watchdog keeps the limits then).
    """

    why_not: str | None = None
    size: int = 0  # disk_limit
    files: int | None = None  # files and dirs the kernel can make in its dirs
    image: str = ""
    loop: str = ""

    @property
    def hard(self) -> bool:
        return self.why_not is None

    def describe(self) -> str:
        """For the enforcement plan: ``own ext4 filesystem of 100M, loop device``."""
        return f"own ext4 filesystem of {format_size(self.size)}, loop device"

    @classmethod
    def from_record(cls, record: dict[str, Any] | None) -> WorkFs | None:
        """What :meth:`record` wrote (an adopted kernel's registry entry)."""
        if not record:
            return None
        if record.get("why_not"):
            return cls(why_not=record["why_not"])
        return cls(size=record.get("size") or 0, files=record.get("files"),
                   image=record.get("image") or "", loop=record.get("loop") or "")

    def record(self) -> dict[str, Any] | None:
        """For the registry entry (what list --json and an operator see; the reaper
        finds the mounts and loop device from the kernel dir, not from this)."""
        if not self.hard:
            return {"why_not": self.why_not}
        return {"image": self.image, "loop": self.loop, "size": self.size,
                "files": self.files, "mounts": list(ON_FS)}


@functools.lru_cache(maxsize=1)
def unavailable() -> str | None:
    """Why this host cannot give kernels their own filesystem; None if it can."""
    if os.geteuid() != 0:
        return "not root (loop devices and mounts need root)"
    if not os.path.exists("/dev/loop-control"):
        return "no /dev/loop-control (loop module not loaded, or a container without it)"
    for tool, package in (("mkfs.ext4", "e2fsprogs"), ("mount", "mount")):
        if shutil.which(tool) is None:
            return f"{tool} not found (install {package})"
    return None


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _fd_path(fd: int) -> str:
    # Our own descriptor of the directory: mount(2) takes paths, and this one cannot
    # be swapped for a link after we opened (and checked) it.
    return f"/proc/self/fd/{fd}"


def _unescape(field: str) -> str:
    for escaped, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(escaped, char)
    return field


def mounts_under(top: Path) -> list[str]:
    """Mount points at or below ``top`` in our mount namespace, deepest first."""
    prefix = str(top).rstrip("/") + "/"
    with open("/proc/self/mountinfo") as f:
        points = [_unescape(line.split()[4]) for line in f]
    found = {p for p in points if p == str(top) or p.startswith(prefix)}
    return sorted(found, key=lambda p: (-p.count("/"), p))


def loops_of(image: Path) -> list[str]:
    """Loop devices whose backing file is ``image`` (deleted or not), from sysfs."""
    found = []
    for backing in glob.glob("/sys/block/loop*/loop/backing_file"):
        try:
            with open(backing) as f:
                name = f.read().rstrip("\n")
        except OSError:
            continue  # detached meanwhile
        if name.removesuffix(" (deleted)") == str(image):
            found.append("/dev/" + backing.split("/")[3])
    return sorted(found)


def is_mounted(kernel_dir: Path) -> bool:
    """Whether the kernel's work dir is its own filesystem (another device than the
    kernel dir's; lstat: a link is never followed)."""
    try:
        top = os.lstat(kernel_dir)
        work = os.lstat(kernel_dir / "work")
    except OSError:
        return False
    return stat.S_ISDIR(work.st_mode) and work.st_dev != top.st_dev


def current(kernel_dir: Path, disk_limit: int, files_limit: int | None = None) -> WorkFs:
    """The filesystem a restarted or adopted kernel already has."""
    image = kernel_dir / DISK / IMAGE
    loops = loops_of(image)
    try:
        files = _files_of(kernel_dir / "work", files_limit)
    except OSError:
        files = None
    return WorkFs(size=disk_limit, files=files, image=str(image),
                  loop=loops[0] if loops else "")


@dataclass(frozen=True)
class Reuse:
    """A kept image (kept_files.py) to mount instead of a fresh one: the entry ``name``
    beneath the trusted, root-only dir ``dir_fd``, made for a kernel of ``uid``/``gid``
    (None: the server's own user)."""

    dir_fd: int
    name: str
    uid: int | None
    gid: int | None


def create(kernel_dir: Path, kdir_fd: int, disk_limit: int, files_limit: int | None,
           uid: int, gid: int, reuse: Reuse | None = None) -> WorkFs:
    """Make, mount and hand over the kernel's filesystem (see the module docstring).

    ``kdir_fd`` is the trusted kernel dir's descriptor; ``work`` and ``conn`` exist in
    it (empty: the kernel has not run yet). With ``reuse``, that image is moved in and
    mounted instead of a fresh one (no mkfs), its files handed to ``uid``
    (:func:`hand_over_tree`) and its connection and socket dirs emptied. Blocking. On
    failure nothing is left mounted (and a reused image is gone), and a
    :class:`WorkFsError` says what failed.
    """
    geometry = Geometry.of(disk_limit, files_limit)
    disk = kernel_dir / DISK
    image, stage = disk / IMAGE, disk / STAGE
    try:
        disk_fd = _disk_dir(kdir_fd)
        try:
            if reuse is None:
                _fresh_image(disk_fd, geometry.image_bytes)
            else:
                _reused_image(disk_fd, reuse, geometry.image_bytes)
            with contextlib.suppress(FileExistsError):
                os.mkdir(STAGE, 0o700, dir_fd=disk_fd)
        finally:
            os.close(disk_fd)
        # Paths from here on are beneath disk/, root's 0700 dir in root's kernel dir:
        # nothing in them is the kernel's to change.
        if reuse is None:
            _run(["mkfs.ext4", *MKFS_OPTIONS, *geometry.mkfs_args(), str(image)], "mkfs.ext4")
        if reuse is None or not _mount_still_attached(image, stage):
            _run(["mount", "-t", "ext4", "-o", MOUNT_OPTIONS, str(image), str(stage)], "mount")
        try:
            if reuse is None and files_limit is not None:
                _hold_extra_inodes(stage, os.statvfs(stage).f_files - OWN_INODES - files_limit)
            files = _files_of(stage, files_limit)
            if reuse is not None:
                _take_over_contents(stage, reuse, uid, gid)
            _bind_dirs(kdir_fd, stage, uid, gid)
        finally:
            _umount(str(stage))
    except (OSError, subprocess.SubprocessError, WorkFsError) as e:
        release(kernel_dir)
        if isinstance(e, WorkFsError):
            raise
        msg = f"kernel filesystem in {disk} could not be made: {e}"
        raise WorkFsError(msg) from None
    loops = loops_of(image)
    return WorkFs(size=disk_limit, files=files, image=str(image), loop=loops[0] if loops else "")


def _hold_extra_inodes(stage: Path, extra: int) -> None:
    """Take ``extra`` inodes (the dir itself is one) so the kernel can make exactly
    files_limit files and dirs. Empty files: no data blocks."""
    if extra <= 0:
        return
    root = os.open(stage, _DIR_FLAGS)
    try:
        os.mkdir(HELD, 0o700, dir_fd=root)
        held = os.open(HELD, _DIR_FLAGS, dir_fd=root)
        try:
            for i in range(extra - 1):
                os.close(os.open(str(i), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                                 0o600, dir_fd=held))
        finally:
            os.close(held)
    finally:
        os.close(root)


def _files_of(mounted: Path, files_limit: int | None) -> int:
    """Files and dirs the kernel may make on its filesystem (mounted anywhere): its
    inodes less ext4's and ours; at most files_limit (the rest is held)."""
    files = os.statvfs(mounted).f_files - OWN_INODES
    return files if files_limit is None else min(files, files_limit)


def _disk_dir(kdir_fd: int) -> int:
    """fd of ``<kernel dir>/disk``, root's own 0700 dir (created if missing)."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(DISK, 0o700, dir_fd=kdir_fd)
    fd = os.open(DISK, _DIR_FLAGS, dir_fd=kdir_fd)
    st = os.fstat(fd)
    if st.st_uid != os.geteuid() or st.st_mode & 0o077:
        os.close(fd)
        msg = (f"{DISK}/ of the kernel dir is not root's own 0700 dir (owner {st.st_uid}, "
               f"mode {stat.filemode(st.st_mode)}); remove it")
        raise WorkFsError(msg)
    return fd


def _fresh_image(disk_fd: int, size: int) -> None:
    """A new sparse image of ``size`` bytes (what a cut-off start left is replaced)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(IMAGE, dir_fd=disk_fd)
    fd = os.open(IMAGE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600, dir_fd=disk_fd)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def _reused_image(disk_fd: int, reuse: Reuse, size: int) -> None:
    """Move the kept image into place; it must be a regular file of ``size`` bytes (the
    same limits as the kernel it was made for: an ext4 is not resized here)."""
    st = os.stat(reuse.name, dir_fd=reuse.dir_fd, follow_symlinks=False)
    if not stat.S_ISREG(st.st_mode) or st.st_size != size:
        msg = (f"the kept image is not a {size}-byte file ({stat.filemode(st.st_mode)}, "
               f"{st.st_size} bytes): the kernel's limits changed")
        raise WorkFsError(msg)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(IMAGE, dir_fd=disk_fd)
    os.rename(reuse.name, IMAGE, src_dir_fd=reuse.dir_fd, dst_dir_fd=disk_fd)


def _take_over_contents(stage: Path, reuse: Reuse, uid: int, gid: int) -> None:
    """The kept filesystem's files become the new kernel's; what its previous process
    left in its connection and socket dirs goes (the server connects to those names)."""
    from .kernel_dir import remove_entry  # kernel_dir imports this module

    root = os.open(stage, _DIR_FLAGS)
    try:
        for name in ("conn", "sock"):
            try:
                sub = os.open(name, _DIR_FLAGS, dir_fd=root)
            except FileNotFoundError:
                continue
            try:
                for entry in os.listdir(sub):
                    remove_entry(sub, entry)
            finally:
                os.close(sub)
        if reuse.uid is not None and (reuse.uid, reuse.gid) != (uid, gid):
            # Hard links cannot leave a filesystem: everything here is the kernel's own.
            hand_over_tree(root, "work", (reuse.uid, reuse.gid), (uid, gid))
    finally:
        os.close(root)


def hand_over_tree(parent_fd: int, name: str, old: tuple[int, int | None],
                   new: tuple[int, int]) -> None:
    """Give everything beneath ``parent_fd``/``name`` that ``old`` (uid, gid) owns to
    ``new``, following no link: coreutils chown -R walks with openat and (-P, the
    default with -R) never traverses a symlink; -h changes a link itself, never its
    target; --from leaves alone anything not owned by the previous kernel (a hard link
    to someone else's file). A FIFO is never opened. Blocking."""
    old_uid, old_gid = old
    src = f"{old_uid}:{old_gid if old_gid is not None else old_uid}"
    result = subprocess.run(
        ["chown", "-R", "-P", "-h", f"--from={src}", f"{new[0]}:{new[1]}", "--",
         f"/proc/{os.getpid()}/fd/{parent_fd}/{name}"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300, check=False,
    )
    if result.returncode != 0:
        detail = result.stderr.strip().splitlines()
        msg = f"handing the kept files over failed: {detail[-1] if detail else result.returncode}"
        raise WorkFsError(msg)


def _run(argv: list[str], what: str) -> None:
    result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=30, check=False)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        msg = f"{what} failed (exit {result.returncode}): {detail[-1] if detail else 'no output'}"
        raise WorkFsError(msg)


def _bind_dirs(kdir_fd: int, stage: Path, uid: int, gid: int) -> None:
    """work/, conn/ and sock/ of the new filesystem, the kernel's own (as KernelDir
    hands them over), bound onto the kernel dir's entries of the same names."""
    libc = _libc()
    root = os.open(stage, _DIR_FLAGS)
    try:
        for name in ON_FS:
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o700, dir_fd=root)
            src = os.open(name, _DIR_FLAGS, dir_fd=root)
            dst = os.open(name, _DIR_FLAGS, dir_fd=kdir_fd)
            try:
                os.fchown(src, uid, gid)
                os.fchmod(src, 0o700)
                _check(libc.mount(_fd_path(src).encode(), _fd_path(dst).encode(), None,
                                  MS_BIND, None), f"bind {name}/ of the kernel filesystem")
            finally:
                os.close(src)
                os.close(dst)
    finally:
        os.close(root)


def _umount(path: str) -> None:
    """Unmount ``path``; if something still uses it, detach it lazily (it goes when
    the last user lets go: the kernel's tree is dead by then, or about to be)."""
    libc = _libc()
    if libc.umount2(path.encode(), UMOUNT_NOFOLLOW) == 0:
        return
    err = ctypes.get_errno()
    if err == errno.EBUSY:
        _check(libc.umount2(path.encode(), UMOUNT_NOFOLLOW | MNT_DETACH), f"umount -l {path}")
    elif err not in (errno.EINVAL, errno.ENOENT):  # not a mount point (any more)
        raise OSError(err, f"umount {path}: {os.strerror(err)}")


def release(kernel_dir: Path) -> None:
    """Unmount the kernel's filesystem, let its loop device go, delete its image.

    Idempotent, and safe for a kernel that never had one. Blocking. Everything is
    found from the kernel dir itself (its mount points in /proc/self/mountinfo, the
    loop devices whose backing file is its image), so it works for a start cut off
    half-way and for an orphan whose server died.
    """
    kernel_dir = Path(kernel_dir)
    _unmount_all(kernel_dir)
    try:
        top = os.open(kernel_dir, _DIR_FLAGS)
    except OSError:
        return  # no kernel dir: nothing of ours there
    try:
        disk = os.open(DISK, _DIR_FLAGS, dir_fd=top)
    except OSError:
        os.close(top)
        return
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(IMAGE, dir_fd=disk)
        with contextlib.suppress(OSError):  # ENOENT; EBUSY if the unmount failed
            os.rmdir(STAGE, dir_fd=disk)
    finally:
        os.close(disk)
    with contextlib.suppress(OSError):
        os.rmdir(DISK, dir_fd=top)
    os.close(top)


def detach(kernel_dir: Path) -> None:
    """Unmount the kernel's filesystem, keeping its image (kept_files.py moves it away).

    Its loop device may outlive this: every kernel started while the filesystem was
    mounted holds a copy of the mount in its private mount namespace until it ends. The
    image is then still that loop device's (autoclear: it goes with the last holder),
    and :func:`create` mounts that same device again rather than a second loop device
    over the same image. Blocking."""
    _unmount_all(Path(kernel_dir))


def _mount_still_attached(image: Path, stage: Path) -> bool:
    """Mount the loop device that still serves ``image`` (see :func:`detach`), if there
    is one: the same superblock again, never a second one over the same image. False
    if there is none (any more). The device is held open while it is checked and
    mounted, so it cannot be cleared and given to another image in between."""
    for dev in loops_of(image):
        try:
            fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue  # cleared meanwhile
        try:
            if dev not in loops_of(image):
                continue  # cleared before we opened it: maybe someone else's by now
            mount_opts = MOUNT_OPTIONS.removeprefix("loop,")
            _run(["mount", "-t", "ext4", "-o", mount_opts, dev, str(stage)], "mount")
            return True
        finally:
            os.close(fd)
    return False


def _unmount_all(kernel_dir: Path) -> None:
    """Every mount beneath the kernel dir, then the loop devices of its image."""
    for point in mounts_under(kernel_dir):
        _umount(point)
    image = kernel_dir / DISK / IMAGE
    # A loop device goes by itself with the last unmount (mount -o loop sets autoclear);
    # one without a mount (a start cut off between losetup and mount) is let go here.
    # On a device still in use, LOOP_CLR_FD only sets autoclear: it goes when free.
    for dev in loops_of(image):
        try:
            fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue  # gone meanwhile
        try:
            with contextlib.suppress(OSError):  # ENXIO: detached meanwhile
                fcntl.ioctl(fd, LOOP_CLR_FD, 0)
        finally:
            os.close(fd)
