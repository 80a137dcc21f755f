"""The one seam between this package and the Docker daemon.

Every Docker call of the package goes through a :class:`DockerSession`: one lazily
created client per daemon URL (``docker_host`` / ``client_kwargs`` honoured everywhere,
the reaper included), blocking SDK calls run in this module's own thread pool (a slow
daemon never blocks an event loop nor starves the loop's default executor),
and daemon errors sorted by status code — "gone" is an answer, "unreachable" is an error,
never an empty list.
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..errors import SandboxUnavailableError

LABEL_PREFIX = "limited-provisioner."
DEFAULT_SOCKET = "unix:///var/run/docker.sock"
# Status codes that mean "nothing left to remove": not found, removal already running.
GONE = (404, 409)

_executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="limited-docker")


def _new_executor_after_fork() -> None:
    # A forked child inherits the pool's books but not its threads: work sent to it
    # would wait for a thread that never comes.
    global _executor
    _executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="limited-docker")


os.register_at_fork(after_in_child=_new_executor_after_fork)


def label(name: str) -> str:
    return LABEL_PREFIX + name


def container_name(kernel_id: str) -> str:
    return f"limited-kernel-{kernel_id}"


class DockerUnavailableError(SandboxUnavailableError):
    """The daemon could not be reached (or answered with an error we cannot read)."""


_CLIENTS: dict[tuple[str, str], Any] = {}
_CLIENTS_LOCK = threading.Lock()


def _forget_clients_after_fork() -> None:
    global _CLIENTS_LOCK
    _CLIENTS.clear()  # their connections are the parent's
    _CLIENTS_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_clients_after_fork)


class DockerSession:
    """A Docker client for one daemon, created on first use."""

    def __init__(self, docker_host: str = "", client_kwargs: dict[str, Any] | None = None):
        self.docker_host = docker_host
        self.client_kwargs = dict(client_kwargs or {})
        self._client: Any = None

    @property
    def where(self) -> str:
        return self.docker_host or os.environ.get("DOCKER_HOST") or DEFAULT_SOCKET

    # -- blocking side (threads, the reaper, the CLI) ------------------------------------

    def client(self) -> Any:
        if self._client is None:
            # One connected client per daemon and settings in the process: connecting
            # (version negotiation, ping) costs ~10 ms, which every start — and a warm
            # pool's claim — would pay again.
            key = (self.docker_host, repr(sorted(self.client_kwargs.items())))
            with _CLIENTS_LOCK:
                client = _CLIENTS.get(key)
                if client is None:
                    client = _CLIENTS[key] = self._guarded(self._connect)
            self._client = client
        return self._client

    def _connect(self) -> Any:
        import docker

        kwargs = dict(self.client_kwargs)
        if self.docker_host:
            client = docker.DockerClient(base_url=self.docker_host, **kwargs)
        else:
            client = docker.from_env(**kwargs)
        client.ping()
        return client

    def _guarded(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call ``fn``; an unreachable daemon becomes a DockerUnavailableError that
        names the daemon and the fix."""
        import docker.errors

        try:
            return fn(*args, **kwargs)
        except docker.errors.DockerException as e:
            if is_connection_error(e):
                msg = (
                    f"Docker daemon unreachable at {self.where} ({type(e).__name__}); start "
                    f"dockerd (or point docker_host or $DOCKER_HOST at one), or use "
                    f"limited-process-provisioner, "
                    f"which needs no Docker"
                )
                raise DockerUnavailableError(msg) from None
            raise

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """``client.api.<method>(...)`` (blocking)."""
        api = self.client().api
        return self._guarded(getattr(api, method), *args, **kwargs)

    def start_container(self, create: dict[str, Any]) -> str:
        """Create and start a container from ``containers.run`` arguments; its id."""
        return self._guarded(self.client().containers.run, **create).id

    def remove_container(self, name_or_id: str) -> bool:
        """Force-remove one container; False if it was already gone (blocking)."""
        return remove(self.call, "container", name_or_id, force=True)

    def remove_kernel_containers(self, kernel_id: str) -> int:
        """Remove every container labelled with ``kernel_id``; how many (blocking).

        Raises when the daemon cannot be asked: "no answer" must never read as "no
        containers", or the caller would forget a kernel whose container still runs.
        """
        found = self.call("containers", all=True,
                          filters={"label": f"{label('kernel-id')}={kernel_id}"})
        return sum(self.remove_container(c["Id"]) for c in found)

    # -- async side (the provisioner) --------------------------------------------------

    async def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(_executor, functools.partial(fn, *args, **kwargs))

    async def acall(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """``client.api.<method>(...)`` in the pool."""
        return await self.run(self.call, method, *args, **kwargs)


def remove(call: Callable[..., Any], kind: str, name_or_id: str, **kwargs: Any) -> bool:
    """``call("remove_<kind>", name_or_id)`` (container, service, secret, config...);
    False if it was already gone or going (blocking)."""
    import docker.errors

    try:
        call(f"remove_{kind}", name_or_id, **kwargs)
    except docker.errors.APIError as e:
        if e.status_code in GONE:
            return False
        raise
    return True


def is_connection_error(error: BaseException) -> bool:
    import requests

    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, (requests.exceptions.ConnectionError, ConnectionError,
                              FileNotFoundError)):
            return True
        cause = cause.__cause__ or cause.__context__
    return "Error while fetching server API version" in str(error)
