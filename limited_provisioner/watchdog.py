"""The watchdog: limits the kernel (OS) cannot enforce for us, checked by polling.

It sums the resident memory of the kernel's whole process tree (used only where no
memory cgroup is available) and measures the kernel's work dir (bytes on disk and
number of entries) where it is not a filesystem of its own (workfs.py: that refuses
writes past the limits itself, and the walk is skipped). When a limit trips it calls
``on_trip(reason)`` once; the provisioner then kills the tree and reports the reason.

Every kernel's watchdog of the same interval runs on one shared clock (ticker.py); a
round with nothing to measure in a thread (memory and disk left to the kernel's cgroup
and filesystem) is a plain call, no task and no thread.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import psutil

from . import ticker
from .enforcement import WATCHDOG, EnforcementPlan
from .limits import Limits, format_size

if TYPE_CHECKING:
    from .kernel_dir import KernelDir

KERNEL_ID_ENV = "LIMITED_PROVISIONER_KERNEL_ID"

log = logging.getLogger(__name__)


@dataclass
class DirUsage:
    bytes: int
    files: int
    # Directories nested deeper than MAX_DEPTH: the walk stopped there, so the usage is
    # not known (and is treated as over the limit: data must not hide deep down).
    too_deep: bool = False


# One open fd per level of the walk; deeper trees are not measured (see DirUsage).
MAX_DEPTH = 96
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class _Enough(Exception):
    """Counted past ``stop_after_files``."""


def dir_usage(path: str, stop_after_files: int | None = None) -> DirUsage:
    """Disk usage of ``path`` in allocated bytes (sparse files count what they use).

    The kernel owns what it walks and can swap any directory for a link at any moment:
    every directory is opened beneath its parent's fd with O_NOFOLLOW, so a swapped one
    is skipped, never followed (root never lists a directory the kernel points it at).
    Stops counting entries after ``stop_after_files`` so an inode bomb of a million
    files cannot make each check take seconds.
    """
    usage = DirUsage(0, 0)

    def scan(fd: int) -> list[str]:
        subdirs = []
        with os.scandir(fd) as it:
            for entry in it:
                usage.files += 1
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue  # deleted while we walk
                usage.bytes += st.st_blocks * 512
                if stat.S_ISDIR(st.st_mode):
                    subdirs.append(entry.name)
                if stop_after_files is not None and usage.files > stop_after_files:
                    raise _Enough
        return subdirs

    try:
        root = os.open(path, _DIR_FLAGS)
    except OSError:
        return usage
    stack: list[tuple[int, list[str]]] = []
    try:
        stack.append((root, []))
        stack[-1] = (root, scan(root))
        while stack:
            fd, pending = stack[-1]
            if not pending:
                os.close(stack.pop()[0])
                continue
            name = pending.pop()
            if len(stack) >= MAX_DEPTH:
                usage.too_deep = True
                continue
            try:
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError:
                continue  # removed, or swapped for a link: not followed
            stack.append((child, []))
            try:
                stack[-1] = (child, scan(child))
            except OSError:
                stack[-1] = (child, [])  # unreadable meanwhile
    except _Enough:
        pass
    finally:
        for fd, _ in stack:
            os.close(fd)
    return usage


def carried_over(work_dir: str, limits: Limits) -> tuple[int, int]:
    """(bytes, files) a (re)starting kernel's work dir holds beyond its limits.

    A kernel killed for disk_limit keeps its files: its next process may keep (and
    delete) what is over the limit plus a little room to start (16M, 100 files: IPython
    writes its history), never grow it further, or it would be killed at once on every
    restart and the user could never clean up. Blocking.
    """
    if not (limits.disk_limit or limits.files_limit):
        return 0, 0
    usage = dir_usage(work_dir, 200_000)
    over_bytes = usage.bytes - limits.disk_limit if limits.disk_limit else 0
    over_files = usage.files - limits.files_limit if limits.files_limit else 0
    return (
        over_bytes + min(16 * 2**20, limits.disk_limit) if over_bytes > 0 else 0,
        over_files + min(100, limits.files_limit) if over_files > 0 else 0,
    )


def tree_pids(root_pid: int, kernel_id: str | None = None, scan_env: bool = False) -> set[int]:
    """Processes of a kernel's tree without cgroups: descendants of the kernel, plus
    (with ``scan_env``) any process carrying our kernel-id environment marker, which
    catches double-forked daemons that were re-parented away from the kernel."""
    pids: set[int] = set()
    try:
        root = psutil.Process(root_pid)
        pids.add(root_pid)
        pids.update(child.pid for child in root.children(recursive=True))
    except psutil.NoSuchProcess:
        pass
    if scan_env and kernel_id:
        for proc in psutil.process_iter():
            try:
                if proc.environ().get(KERNEL_ID_ENV) == kernel_id:
                    pids.add(proc.pid)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
    pids.discard(os.getpid())
    return pids


def tree_rss(pids: set[int] | list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return total


class Watchdog(ticker.Ticked):
    """Polls one kernel's tree and work dir; calls ``on_trip(reason)`` at most once."""

    def __init__(
        self,
        *,
        kernel_id: str,
        get_pids: Callable[[], list[int] | set[int]],
        on_trip: Callable[[str, str], Awaitable[None]],
        check_events: Callable[[], None] | None = None,
        mem_limit: int | None = None,
        work_dir: str | None = None,
        extra_dirs: tuple[str, ...] = (),
        disk_limit: int | None = None,
        files_limit: int | None = None,
        disk_baseline: int = 0,
        files_baseline: int = 0,
        interval: float = 0.5,
        disk_interval: float = 2.0,
        events_idle_interval: float | None = None,
        busy: Callable[[], bool] | None = None,
    ):
        self.kernel_id = kernel_id
        self.get_pids = get_pids
        self.on_trip = on_trip
        # Called every round for limits the OS enforces itself (e.g. an OOM kill of a
        # child in the kernel's cgroup), so they are reported while the kernel lives on.
        self.check_events = check_events
        self.mem_limit = mem_limit
        self.work_dir = work_dir
        # Other dirs the kernel can write (its connection and socket dirs): they count
        # against the same limits, or they would be free disk.
        self.extra_dirs = extra_dirs
        self.disk_limit = disk_limit
        self.files_limit = files_limit
        self.disk_baseline = disk_baseline
        self.files_baseline = files_baseline
        self.interval = interval
        self.disk_interval = disk_interval
        # ``check_events`` only reports what the OS already enforced (an OOM kill, a
        # refused fork): while the kernel is not ``busy()`` (no execution running, no
        # recent request) that report may wait this long. None: every round.
        self.events_idle_interval = events_idle_interval
        self.busy = busy
        self.tripped: str | None = None
        # Walks of the kernel's dirs so far (evidence for tests and debugging).
        self.disk_checks = 0
        # What the last walk found over the baseline (bytes, files): the status endpoint
        # shows it rather than walking the kernel's dirs a second time.
        self.last_disk: tuple[int, int] | None = None
        # _step (ticker.Ticked): the round's measurement in a thread (memory, disk) or
        # its trip, while it runs.
        self._next_disk = 0.0
        self._next_events = 0.0

    @classmethod
    def for_kernel(
        cls,
        kernel_id: str,
        limits: Limits,
        plan: EnforcementPlan,
        kdir: KernelDir | None,
        work_dir: str | None,
        *,
        interval: float,
        on_trip: Callable[[str, str], Awaitable[None]],
        get_pids: Callable[[], list[int] | set[int]] = list,
        check_events: Callable[[], None] | None = None,
        baseline: tuple[int, int] = (0, 0),
        own_fs: bool = False,
        events_idle_interval: float | None = None,
        busy: Callable[[], bool] | None = None,
    ) -> Watchdog:
        """The watchdog of one kernel: memory where the plan leaves it to the watchdog
        (no cgroup), the size and file count of every dir the kernel can write — except
        those on its own filesystem (``own_fs``: workfs.py), which enforces both limits
        itself; then only a working dir elsewhere (a host folder: workspace.py) is measured."""
        extra_dirs = (str(kdir.conn), str(kdir.sock)) if kdir is not None else ()
        if own_fs and kdir is not None:
            extra_dirs = ()  # conn/ and sock/ are on it too
            if work_dir == str(kdir.work):
                work_dir = None
        return cls(
            kernel_id=kernel_id,
            get_pids=get_pids,
            on_trip=on_trip,
            check_events=check_events,
            mem_limit=limits.mem_limit if plan.uses("mem_limit", WATCHDOG) else None,
            work_dir=work_dir,
            extra_dirs=extra_dirs,
            disk_limit=limits.disk_limit,
            files_limit=limits.files_limit,
            disk_baseline=baseline[0],
            files_baseline=baseline[1],
            interval=interval,
            disk_interval=interval * 4,
            events_idle_interval=events_idle_interval,
            busy=busy,
        )

    @property
    def watches_anything(self) -> bool:
        return self.check_events is not None or self.mem_limit is not None or (
            self.work_dir is not None
            and (self.disk_limit is not None or self.files_limit is not None)
        )

    def start(self) -> None:
        if self.watches_anything and self.tripped is None:
            self._start_ticking(self.interval)

    def check_memory(self) -> tuple[str, str] | None:
        if self.mem_limit is None:
            return None
        rss = tree_rss(self.get_pids())
        if rss > self.mem_limit:
            return "mem_limit", (
                f"memory limit {format_size(self.mem_limit)} exceeded "
                f"(process tree used {format_size(rss)})"
            )
        return None

    def check_disk(self) -> tuple[str, str] | None:
        if self.work_dir is None:
            return None
        stop_after = None
        if self.files_limit is not None:
            stop_after = self.files_limit + self.files_baseline
        usage = dir_usage(self.work_dir, stop_after)
        self.disk_checks += 1
        for extra in self.extra_dirs:
            more = dir_usage(extra, stop_after)
            usage = DirUsage(
                usage.bytes + more.bytes, usage.files + more.files,
                usage.too_deep or more.too_deep,
            )
        used = usage.bytes - self.disk_baseline
        files = usage.files - self.files_baseline
        self.last_disk = (max(0, used), max(0, files))
        if usage.too_deep:
            kind = "disk_limit" if self.disk_limit is not None else "files_limit"
            return kind, (
                f"directories nested more than {MAX_DEPTH} levels deep in {self.work_dir}: "
                "their size cannot be checked, so the kernel was stopped"
            )
        if self.disk_limit is not None and used > self.disk_limit:
            return "disk_limit", (
                f"disk limit {format_size(self.disk_limit)} exceeded "
                f"({format_size(used)} written in {self.work_dir}"
                + (" and its connection/socket dirs)" if self.extra_dirs else ")")
            )
        if self.files_limit is not None and files > self.files_limit:
            return "files_limit", (
                f"files limit {self.files_limit} exceeded "
                f"(more than {files} files in {self.work_dir})"
            )
        return None

    def _tick(self) -> None:
        """One round on the shared clock: the event check here (a few small reads of the
        kernel's cgroup files), memory and disk in a thread of a task of their own."""
        if self._step is not None and not self._step.done():
            return  # the previous round is still measuring (a big dir) or tripping
        loop = asyncio.get_running_loop()
        now = loop.time()
        busy = self.events_idle_interval is None or self.busy is None or self.busy()
        if self.check_events is not None and (busy or now >= self._next_events):
            if not busy:
                self._next_events = now + self.events_idle_interval
            try:
                self.check_events()
            except Exception:  # one bad read must not end the watch
                log.exception("watchdog check failed for kernel %s", self.kernel_id)
        disk = self.work_dir is not None and now >= self._next_disk
        if self.mem_limit is None and not disk:
            return
        if disk:
            self._next_disk = now + self.disk_interval
        self._step = asyncio.ensure_future(self._measure(disk))

    async def _measure(self, disk: bool) -> None:
        try:
            found = None
            if self.mem_limit is not None:
                found = await asyncio.to_thread(self.check_memory)
            if found is None and disk:
                found = await asyncio.to_thread(self.check_disk)
        except Exception:  # one bad read must not end the watch
            log.exception("watchdog check failed for kernel %s", self.kernel_id)
            return
        if found is not None and self.tripped is None:
            kind, reason = found
            self.tripped = reason
            self._end()
            # Stopping the kernel stops this watchdog: not from the task it would cancel.
            self._step = None
            await self.on_trip(kind, reason)
