"""The host-wide registry of live limited kernels.

One JSON file per kernel under ``<state_dir>/registry/``; written atomically by the
server that started the kernel, readable by every server and by the CLI.  The registry
is what ``limited-provisioner list`` shows, what admission counts (not an in-memory
dict, which a restart would lose), and what recovery re-adopts from.  A process entry
records ``pid`` *and* its ``create_time`` so a reused pid is never mistaken for a kernel.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil

from . import procstat

STATE_DIR_ENV = "LIMITED_PROVISIONER_STATE_DIR"


# Longest state dir whose kernels' ipc sockets still fit in sun_path (107 bytes):
# "<state_dir>/kernels/<36-char kernel id>/sock/k-<port>" adds 54 characters.
MAX_STATE_DIR_LEN = 53


def default_state_dir() -> Path:
    """Where registry, locks and per-kernel dirs live.

    Root servers share one host-wide place (so caps hold across servers).  A non-root
    server keeps its own: the login session's runtime dir (``$XDG_RUNTIME_DIR``, e.g.
    ``/run/user/1000``) where there is one, else the Jupyter runtime dir -- unless that
    is too long for the ipc sockets inside it (``~/.local/share/jupyter/runtime/...`` is
    for any home dir), then ``~/.limited-provisioner``.
    """
    env = os.environ.get(STATE_DIR_ENV)
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/limited-provisioner")
    candidates = _user_state_dirs()
    for candidate in candidates:
        if len(str(candidate)) <= MAX_STATE_DIR_LEN:
            return candidate
    # Nothing short enough: the start fails with an error naming the path and the fix.
    return candidates[-1]


def _user_state_dirs() -> list[Path]:
    from jupyter_core.paths import jupyter_runtime_dir

    found = []
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and _private_dir(runtime):
        found.append(Path(runtime) / "limited-provisioner")
    found.append(Path(jupyter_runtime_dir()) / "limited-provisioner")
    found.append(Path.home() / ".limited-provisioner")
    return found


def _private_dir(path: str) -> bool:
    """A dir of ours that nobody else can write (what pam_systemd makes /run/user/<uid>)."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return st.st_uid == os.geteuid() and not st.st_mode & 0o022 and os.path.isabs(path)


class Registry:
    """Read/write access to the registry files under ``state_dir``."""

    def __init__(self, state_dir: str | os.PathLike | None = None):
        self.state_dir = Path(state_dir) if state_dir else default_state_dir()
        self.entries_dir = self.state_dir / "registry"
        self.kernels_dir = self.state_dir / "kernels"
        # The client side of each kernel's proxy: the server's alone (proxy.py).
        self.clients_dir = self.state_dir / "clients"

    def ensure(self) -> None:
        self.entries_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.entries_dir, 0o700)
        self.clients_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.clients_dir, 0o700)
        self.kernels_dir.mkdir(parents=True, exist_ok=True, mode=0o711)
        # Kernels running as other uids must be able to traverse into their own dir,
        # but not list the others.
        os.chmod(self.kernels_dir, 0o711)
        os.chmod(self.state_dir, 0o711)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Host-wide exclusive lock (admission and uid allocation happen under it)."""
        self.ensure()
        with open(self.state_dir / "lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _path(self, kernel_id: str) -> Path:
        return self.entries_dir / f"{kernel_id}.json"

    def write(self, kernel_id: str, entry: dict[str, Any]) -> None:
        self.ensure()
        path = self._path(kernel_id)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            json.dump(entry, f, indent=1, sort_keys=True)
        os.replace(tmp, path)

    def update(self, kernel_id: str, **changes: Any) -> None:
        entry = self.read(kernel_id)
        if entry is not None:
            entry.update(changes)
            self.write(kernel_id, entry)

    def update_if(
        self, kernel_id: str, check: Callable[[dict[str, Any]], bool], **changes: Any
    ) -> bool:
        """``update`` under the host-wide lock, if the entry exists and passes ``check``
        (the reaper stamping an orphan must not undo an adoption that just happened)."""
        with self.lock():
            entry = self.read(kernel_id)
            if entry is None or not check(entry):
                return False
            entry.update(changes)
            self.write(kernel_id, entry)
            return True

    def read(self, kernel_id: str) -> dict[str, Any] | None:
        try:
            return json.loads(self._path(kernel_id).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def remove(self, kernel_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(kernel_id).unlink()

    def entries(self) -> list[dict[str, Any]]:
        """Every registered kernel, alive or not (see :func:`is_alive`)."""
        if not self.entries_dir.is_dir():
            return []
        result = []
        for path in sorted(self.entries_dir.glob("*.json")):
            try:
                result.append(json.loads(path.read_text()))
            except (OSError, json.JSONDecodeError):
                continue  # being replaced right now, or foreign junk
        return result

    def live_entries(self) -> list[dict[str, Any]]:
        return [e for e in self.entries() if is_alive(e)]


def sandbox_of(entry: dict[str, Any]) -> str:
    """The id that names an entry's sandbox (dir, uid lease, cgroups, container): its
    ``sandbox_id`` if the kernel came from the warm pool, else its kernel id."""
    return str(entry.get("sandbox_id") or entry.get("kernel_id", ""))


def process_identity(pid: int) -> float | None:
    """The create time of ``pid`` (seconds since epoch), or None if it is gone.

    A zombie counts as gone: it has exited, only its exit status is left to collect.
    """
    try:
        return procstat.create_time(pid)  # one read instead of psutil's four
    except procstat.Unreadable:
        pass
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc.create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def same_process(pid: Any, create_time: Any) -> bool:
    """Whether ``pid`` still runs and is the process that started at ``create_time``
    (None: unknown, any process with that pid will do)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    created = process_identity(pid)
    if created is None:
        return False
    return not isinstance(create_time, (int, float)) or abs(created - create_time) < 1.0


def is_alive(entry: dict[str, Any]) -> bool:
    """Whether the kernel an entry describes is still running (not a reused pid)."""
    if entry.get("state") == "starting":
        # A start in progress counts against caps until it finishes or goes stale.
        return time.time() - (entry.get("created") or 0) < 120
    if entry.get("backend") == "swarm":
        # Its task runs on some node of the swarm, not as a process here: only the swarm
        # can say (adoption asks it and removes a dead one; the reaper gives a kernel of a
        # gone server orphan_grace).
        return entry.get("state") in ("running", "pooled")
    return same_process(entry.get("pid"), entry.get("pid_create_time"))


def server_alive(entry: dict[str, Any]) -> bool:
    """Whether the server (or agent) process that manages the kernel still runs."""
    return same_process(entry.get("server_pid"), entry.get("server_pid_create_time"))


def list_kernels(
    state_dir: str | os.PathLike | None = None,
    *,
    server_id: str | None = None,
    owner: str | None = None,
    labels: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Registry entries of the live limited kernels on this host (optionally filtered;
    ``labels`` matches kernels carrying all of the given label values)."""
    result = []
    for entry in Registry(state_dir).live_entries():
        if entry.get("state") != "running":
            continue
        if server_id is not None and entry.get("server_id") != server_id:
            continue
        if owner is not None and entry.get("owner") != owner:
            continue
        if labels and any((entry.get("labels") or {}).get(k) != v for k, v in labels.items()):
            continue
        result.append(entry)
    return result
