"""Files of idle-culled kernels, kept for ``keep_files_for`` and given back to the
kernel that next serves the same session.

A kernel is keyed by its owner and one of its labels (``keep_files_label``, default
``session_id``: what an agent backend starts each session's kernel with). When such a
kernel is shut down for ``idle_timeout`` — not when a client shuts it down, and not for
``max_lifetime`` — its work dir is moved here instead of being deleted with the kernel
dir; the next first start with the same owner and label value takes it back before the
kernel runs. The reaper (reaper.py) deletes what nobody took back in time::

    <state_dir>/kept/                    root 0700
    <state_dir>/kept/<id>/               root 0700; id = sha256 of (owner, label, value)
        meta.json                        root 0600: whose, until when, what (META_FIELDS)
        image                            the kernel's own filesystem (workfs.py),
                                         unmounted; or
        work/                            without one, its work dir, moved here as it is

Nothing is copied and nothing the kernel wrote is opened: the image (or the work dir) is
renamed on the same filesystem, beneath descriptors of root-only dirs. An image whose
loop device is still held (a copy of its mount in another kernel's namespace) is mounted
again through that same device, never through a second one (``workfs.detach``); its files are handed to the new kernel's uid by ``chown -R -P -h
--from=<old uid>`` (no link followed, only what the old kernel owned; hard links cannot
leave an ext4 image). A work dir on the host's filesystem gets the same chown.

Names beginning with a dot are half-done steps (``.new-``, ``.claim-``, ``.gone-``
+ the time they were made): renames between them and ``<id>`` make keeping, claiming and
expiry atomic against each other; the reaper removes one left by a crash after
STALE_AFTER seconds.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import secrets
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import workfs
from .kernel_dir import DIR_FLAGS, KernelDir, opened, open_trusted_dir, remove_entry
from .watchdog import dir_usage

log = logging.getLogger(__name__)

KEPT = "kept"
META = "meta.json"
IMAGE = "image"
WORK = "work"
# meta.json is the server's own file, but read it bounded all the same.
META_MAX = 64 * 1024
# A half-done step this old was cut off by a crash: the reaper removes it.
STALE_AFTER = 600.0
# The most entries of a kept work dir counted for the budget before giving up.
COUNT_FILES = 200_000
META_FIELDS = ("owner", "label", "value", "kernel_id", "kind", "kept_at", "expires",
               "bytes", "uid", "gid", "image_bytes")


class KeepError(Exception):
    """Why a culled kernel's files were not kept (they are deleted as before)."""


def kept_id(owner: str, label: str, value: str) -> str:
    """The kept dir's name for one (owner, label key, label value)."""
    return hashlib.sha256(json.dumps([owner, label, value]).encode()).hexdigest()[:40]


def expired(meta: dict[str, Any], now: float) -> bool:
    """Whether kept files are past their time (a meta without one always is)."""
    try:
        return now >= float(meta["expires"])
    except (KeyError, TypeError, ValueError):
        return True


def matches(meta: dict[str, Any], owner: str, label: str, value: str) -> bool:
    """Whether kept files belong to this owner's kernel with this label value."""
    return (meta.get("owner"), meta.get("label"), meta.get("value")) == (owner, label, value)


def kept_after(action: str, kind: str) -> bool:
    """Whether a kernel the lifecycle timer stops (its Verdict's ``action`` and ``kind``)
    keeps its files: only a cull for idle_timeout. Nobody asked for that end, and the
    session may come back; a max_lifetime cull is a deliberate end, and a restart keeps
    the kernel dir anyway."""
    return action == "cull" and kind == "idle_timeout"


def _step_name(what: str, now: float | None = None) -> str:
    return f".{what}-{int(now or time.time())}-{secrets.token_hex(6)}"


def stale(name: str, now: float) -> bool:
    """Whether the half-done step ``name`` (``.<what>-<time>-<token>``) was left by a
    crash: older than STALE_AFTER, or not a name this module makes."""
    parts = name[1:].split("-")
    try:
        return now - int(parts[1]) > STALE_AFTER
    except (IndexError, ValueError):
        return True



def _open_root(state_dir: str | os.PathLike, create: bool) -> int | None:
    """fd of ``<state_dir>/kept``, root's own 0700 dir; None if absent and not ``create``."""
    with opened(open_trusted_dir(state_dir)) as top:
        if create:
            with contextlib.suppress(FileExistsError):
                os.mkdir(KEPT, 0o700, dir_fd=top)
        try:
            fd = os.open(KEPT, DIR_FLAGS, dir_fd=top)
        except FileNotFoundError:
            return None
    st = os.fstat(fd)
    if st.st_uid != os.geteuid() or st.st_mode & 0o077:
        os.close(fd)
        msg = (f"{Path(state_dir) / KEPT} must be uid {os.geteuid()}'s own 0700 dir "
               f"(owner {st.st_uid}, mode {stat.filemode(st.st_mode)}); remove it")
        raise KeepError(msg)
    return fd


def _read_meta(dir_fd: int) -> dict[str, Any] | None:
    try:
        fd = os.open(META, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=dir_fd)
    except OSError:
        return None
    with opened(fd):
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        raw = os.read(fd, META_MAX)
    try:
        meta = json.loads(raw)
    except ValueError:
        return None
    return meta if isinstance(meta, dict) else None


def _write_meta(dir_fd: int, meta: dict[str, Any]) -> None:
    tmp = f".{META}.{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600, dir_fd=dir_fd)
    with opened(fd):
        os.write(fd, json.dumps(meta).encode())
    os.replace(tmp, META, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def _remove(root: int, name: str, state_dir: str | os.PathLike) -> bool:
    """Remove the entry ``name`` of the kept dir (no link followed). A loop device that
    still serves its image (a mount copy in another kernel's namespace: workfs.detach)
    goes with its last holder, as after workfs.release."""
    remove_entry(root, name)
    return True


def _discard(root: int, name: str, state_dir: str | os.PathLike) -> bool:
    """Rename ``name`` out of the way (atomic against a claim), then remove it."""
    gone = _step_name("gone")
    try:
        os.rename(name, gone, src_dir_fd=root, dst_dir_fd=root)
    except FileNotFoundError:
        return False  # claimed or removed meanwhile
    return _remove(root, gone, state_dir)


# -- keeping -----------------------------------------------------------------------


def entries(state_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The meta of every kept set (``id`` added); blocking."""
    root = _open_root(state_dir, create=False)
    if root is None:
        return []
    found = []
    with opened(root):
        for name in os.listdir(root):
            if name.startswith("."):
                continue
            try:
                dfd = os.open(name, DIR_FLAGS, dir_fd=root)
            except OSError:
                continue  # claimed or removed meanwhile
            with opened(dfd):
                meta = _read_meta(dfd)
            if meta is not None:
                found.append({**meta, "id": name})
    return found


def waiting(state_dir: str | os.PathLike, owner: str, label: str, value: str,
            now: float | None = None) -> bool:
    """Whether unexpired kept files of (owner, label, value) wait for a start; blocking."""
    if not os.path.lexists(Path(state_dir) / KEPT):
        return False
    now = now or time.time()
    return any(matches(m, owner, label, value) and not expired(m, now)
               for m in entries(state_dir))


def usage(state_dir: str | os.PathLike, owner: str | None = None) -> int:
    """Bytes kept files hold on the state dir's disk (one owner's, or everyone's)."""
    return sum(int(m.get("bytes") or 0) for m in entries(state_dir)
               if owner is None or m.get("owner") == owner)


@contextlib.contextmanager
def _budget_lock(root: int) -> Iterator[None]:
    """Keeps of the whole host one after the other, so two culls of one owner cannot
    both fit the budget that only one fits (flock on the root-only kept dir itself)."""
    fcntl.flock(root, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(root, fcntl.LOCK_UN)


def _make_room(root: int, state_dir: str | os.PathLike, owner: str, need: int,
               budget: int | None, replacing: str) -> None:
    """Evict the owner's oldest kept files until ``need`` more bytes fit its budget."""
    if budget is None:
        return
    if need > budget:
        msg = f"they take {need} bytes, more than kept_files_budget={budget}"
        raise KeepError(msg)
    mine = sorted((m for m in entries(state_dir)
                   if m.get("owner") == owner and m["id"] != replacing),
                  key=lambda m: float(m.get("kept_at") or 0))
    held = sum(int(m.get("bytes") or 0) for m in mine)
    for meta in mine:
        if held + need <= budget:
            return
        if _discard(root, meta["id"], state_dir):
            log.info("kept files of %r (%s=%s) removed to make room within "
                     "kept_files_budget", owner, meta.get("label"), meta.get("value"))
        held -= int(meta.get("bytes") or 0)


def keep(
    kdir: KernelDir,
    *,
    state_dir: str | os.PathLike,
    owner: str,
    label: str,
    value: str,
    keep_for: float,
    budget: int | None,
    image_bytes: int | None,
    now: float | None = None,
) -> dict[str, Any]:
    """Move the files of the culled kernel ``kdir`` (its processes are gone) to the kept
    dir for ``keep_for`` seconds; returns their meta. Raises :class:`KeepError` (or
    OSError) when they cannot be kept: the caller then deletes them with the kernel dir.
    ``image_bytes``: the size of its own filesystem's image, if it has one. Blocking.
    """
    now = now or time.time()
    root = _open_root(state_dir, create=True)
    assert root is not None
    with opened(root), opened(kdir._open()) as kfd:
        if workfs.is_mounted(kdir.path):
            workfs.detach(kdir.path)
            kind, src_dir, src = "image", workfs.DISK, workfs.IMAGE
            sfd = os.open(src_dir, DIR_FLAGS, dir_fd=kfd)
            st = os.stat(src, dir_fd=sfd, follow_symlinks=False)
            used = st.st_blocks * 512
        else:
            kind, src = "dir", "work"
            sfd = os.dup(kfd)
            used = dir_usage(f"/proc/{os.getpid()}/fd/{kfd}/work", COUNT_FILES).bytes
        with opened(sfd), _budget_lock(root):
            kid = kept_id(owner, label, value)
            _make_room(root, state_dir, owner, used, budget, kid)
            new = _step_name("new", now)
            os.mkdir(new, 0o700, dir_fd=root)
            try:
                with opened(os.open(new, DIR_FLAGS, dir_fd=root)) as nfd:
                    meta = {
                        "owner": owner, "label": label, "value": value,
                        "kernel_id": kdir.kernel_id, "kind": kind, "kept_at": now,
                        "expires": now + keep_for, "bytes": used, "uid": kdir.uid,
                        "gid": kdir.gid, "image_bytes": image_bytes if kind == "image" else None,
                    }
                    _write_meta(nfd, meta)
                    # Same filesystem (both under state_dir): EXDEV says otherwise.
                    os.rename(src, IMAGE if kind == "image" else WORK,
                              src_dir_fd=sfd, dst_dir_fd=nfd)
                _publish(root, new, kid, state_dir)
            except BaseException:
                _remove(root, new, state_dir)
                raise
    return meta


def _publish(root: int, new: str, kid: str, state_dir: str | os.PathLike) -> None:
    """``new`` becomes ``kid``; older kept files of the same session are replaced."""
    for _ in range(3):
        try:
            os.rename(new, kid, src_dir_fd=root, dst_dir_fd=root)
            return
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            # An older one of the same session is there: it is replaced.
            _discard(root, kid, state_dir)
    msg = f"kept files {kid} could not be put in place"
    raise KeepError(msg)


# -- taking them back --------------------------------------------------------------


@dataclass
class Claimed:
    """Kept files taken out of reach of the reaper and of other starts, for one start.

    ``dir_fd`` is their dir (root's); the start uses ``image`` or ``work`` in it and
    sets ``used``; :meth:`settle` then removes what is left, or puts them back.
    """

    state_dir: str
    kid: str
    name: str
    root: int
    dir_fd: int
    meta: dict[str, Any] = field(default_factory=dict)
    used: bool = False

    @property
    def kind(self) -> str:
        return str(self.meta.get("kind"))

    @property
    def old_identity(self) -> tuple[int | None, int | None]:
        return self.meta.get("uid"), self.meta.get("gid")

    def reuse(self) -> workfs.Reuse:
        """The kept image, for ``workfs.create``."""
        uid, gid = self.old_identity
        return workfs.Reuse(self.dir_fd, IMAGE, uid, gid)

    def settle(self) -> None:
        """Used: remove the (now empty) claim. Unused (the new kernel's disk settings do
        not fit them): back under their id until they expire, unless newer ones are
        there. Closes the descriptors."""
        try:
            if not self.used:
                try:
                    os.rename(self.name, self.kid, src_dir_fd=self.root, dst_dir_fd=self.root)
                    return
                except OSError:
                    pass  # newer kept files took the place: these go
            _remove(self.root, self.name, self.state_dir)
        finally:
            os.close(self.dir_fd)
            os.close(self.root)


def claim(state_dir: str | os.PathLike, owner: str, label: str, value: str,
          now: float | None = None) -> Claimed | None:
    """Take the kept files of (owner, label, value) for a start, if there are any that
    have not expired (expired ones are removed here). Blocking."""
    now = now or time.time()
    if not os.path.lexists(Path(state_dir) / KEPT):
        return None
    root = _open_root(state_dir, create=False)
    if root is None:
        return None
    kid = kept_id(owner, label, value)
    name = _step_name("claim", now)
    try:
        os.rename(kid, name, src_dir_fd=root, dst_dir_fd=root)
        dfd = os.open(name, DIR_FLAGS, dir_fd=root)
    except OSError:
        os.close(root)
        return None  # none, or another start or the reaper took them first
    meta = _read_meta(dfd)
    if meta is None or not matches(meta, owner, label, value) or expired(meta, now):
        os.close(dfd)
        _remove(root, name, state_dir)
        os.close(root)
        return None
    return Claimed(str(state_dir), kid, name, root, dfd, meta)


def forget(state_dir: str | os.PathLike, owner: str, label: str,
           value: str) -> dict[str, Any] | None:
    """Delete the kept files of (owner, label, value) now (the session was deleted);
    their meta if there were any. Blocking."""
    if not os.path.lexists(Path(state_dir) / KEPT):
        return None
    root = _open_root(state_dir, create=False)
    if root is None:
        return None
    with opened(root):
        gone = _step_name("gone")
        try:
            os.rename(kept_id(owner, label, value), gone, src_dir_fd=root, dst_dir_fd=root)
        except FileNotFoundError:
            return None  # none, or claimed by a start meanwhile
        try:
            with opened(os.open(gone, DIR_FLAGS, dir_fd=root)) as dfd:
                meta = _read_meta(dfd) or {}
        except OSError:
            meta = {}
        _remove(root, gone, state_dir)
    return meta


def reap_kept(state_dir: str | os.PathLike, now: float | None = None) -> list[str]:
    """Remove expired kept files and the leftovers of cut-off steps; returns the ids
    removed. Each entry's failure is logged on its own. Blocking."""
    now = now or time.time()
    if not os.path.lexists(Path(state_dir) / KEPT):
        return []  # nothing was ever kept here (most state dirs)
    try:
        root = _open_root(state_dir, create=False)
    except Exception as e:  # noqa: BLE001 - a state dir we must not use: nothing to reap
        log.error("kept files not reaped: %s", e)
        return []
    if root is None:
        return []
    removed = []
    with opened(root):
        for name in os.listdir(root):
            try:
                if name.startswith("."):
                    if stale(name, now) and _remove(root, name, state_dir):
                        log.info("removed %s, left in the kept dir by a cut-off step", name)
                    continue
                try:
                    dfd = os.open(name, DIR_FLAGS, dir_fd=root)
                except OSError:
                    meta = None  # claimed meanwhile, or not a dir: not ours to keep
                else:
                    with opened(dfd):
                        meta = _read_meta(dfd)
                if (meta is None or expired(meta, now)) and _discard(root, name, state_dir):
                    removed.append(name)
                    meta = meta or {}
                    log.info("kept files %s (%r, %s=%s) expired; removed", name,
                             meta.get("owner"), meta.get("label"), meta.get("value"))
            except Exception:  # one bad entry must not stop the round
                log.exception("removing kept files %s failed", name)
    return removed
