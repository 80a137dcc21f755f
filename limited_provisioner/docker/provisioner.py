"""``limited-docker-provisioner``: each kernel in its own locked-down container.

The container runtime enforces the limits (memory without swap, CPU, pids, nofile,
read-only root, size-capped tmpfs ``/tmp``, ``/var/tmp``, ``/run/lock`` (``/dev/shm``: Docker's private 64M),
private IPC and PID namespaces, a capped json log, no capabilities, no-new-privileges,
non-root uid, an init process, no network unless asked).  The kernel is reached over
``ipc`` sockets in its socket dir, bind-mounted at the same path, through the server's
proxy (proxy.py), so even with ``network=False`` (``--network=none``) Jupyter can talk to
it. Only three host dirs are mounted: the kernel's work dir and socket dir, and (read-only)
the control dir with its connection file and hook.

Every Docker SDK call goes through :meth:`LimitedDockerProvisioner._docker`, which runs
it in a thread so a slow daemon never blocks the server's event loop.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jupyter_client.provisioning.provisioner_base import KernelProvisionerBase
from traitlets import Dict, List, Unicode, default, validate

from ..provisioner import LimitedProvisionerMixin
from ..errors import LimitConfigError, SandboxUnavailableError
from ..limits import DATA_RLIMIT_HEADROOM, format_size
from ..registry import process_identity
from ..watchdog import KERNEL_ID_ENV, Watchdog

LABEL_PREFIX = "limited-provisioner."
DEFAULT_IMAGE = "limited-provisioner-kernel:latest"
BUILD_HINT = "build it with `limited-provisioner build-image` (or set `image` to one you have)"


def label(name: str) -> str:
    return LABEL_PREFIX + name


def container_name(kernel_id: str) -> str:
    return f"limited-kernel-{kernel_id}"


class LimitedDockerProvisioner(LimitedProvisionerMixin, KernelProvisionerBase):
    """Runs the kernel in a resource-limited Docker container."""

    backend = "docker"

    image = Unicode(
        DEFAULT_IMAGE,
        help=f"""Image the kernel container runs; it must contain the kernelspec's argv[0]
        (e.g. python3 with ipykernel). Default {DEFAULT_IMAGE}, built by
        `limited-provisioner build-image`.""",
    ).tag(config=True)

    docker_host = Unicode(
        "",
        help="""Docker daemon URL (e.g. unix:///var/run/docker.sock, tcp://host:2376).
        Default: $DOCKER_HOST, else the local socket.""",
    ).tag(config=True)

    client_kwargs = Dict(
        help="Extra keyword arguments for docker.DockerClient (tls, timeout, version).",
    ).tag(config=True)

    extra_mounts = List(
        Unicode(),
        help="""Extra bind mounts, "HOST_PATH:CONTAINER_PATH[:ro|rw]" (default ro). The host
        path must exist; refused before anything is created otherwise.""",
    ).tag(config=True)

    container_user = Unicode(
        "",
        help="""uid:gid the kernel runs as in the container (never 0). Default: a per-kernel
        uid from kernel_uid_range when the server is root, else the server's own uid.""",
    ).tag(config=True)

    @validate("container_user")
    def _validate_container_user(self, proposal: dict) -> str:
        value = proposal["value"]
        if value:
            parts = value.split(":")
            if len(parts) != 2 or not all(p.isdigit() for p in parts) or int(parts[0]) == 0:
                msg = (
                    f"container_user={value!r} must be a non-root numeric 'uid:gid' "
                    f"like '1000:1000'"
                )
                raise LimitConfigError(msg)
        return value

    tmp_size = Unicode(
        "",
        help="""Size of the container's tmpfs /tmp ("64M"); default: disk_limit capped at
        mem_limit, since tmpfs pages are memory.""",
    ).tag(config=True)

    extra_create_kwargs = Dict(
        help="""Extra docker create arguments (e.g. {"runtime": "runsc"}). Cannot override
        the security settings: those keys are refused.""",
    ).tag(config=True)

    log_max_size = Unicode(
        "1m",
        help="""Size of the container's json log (its stdout/stderr) before Docker rotates
        it; one file is kept. Default 1m.""",
    ).tag(config=True)

    @default("env_keep")
    def _default_env_keep(self) -> list[str]:
        # The server's PATH, LANG, PYTHONPATH... describe the host, not the image.
        return ["JPY_SESSION_NAME", "LIMITED_PROVISIONER_OWNER"]

    @validate("extra_mounts")
    def _validate_extra_mounts(self, proposal: dict) -> list[str]:
        for spec in proposal["value"]:
            parse_mount(spec)
        return proposal["value"]

    _client = None
    container_id: str | None = None
    exit_code: int | None = None
    watchdog: Watchdog | None = None
    _shutting_down = False

    # -- docker access ----------------------------------------------------------------

    async def _docker(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run one blocking Docker SDK call in a thread, with daemon errors made readable."""
        import docker.errors

        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except docker.errors.DockerException as e:
            if _is_connection_error(e):
                raise SandboxUnavailableError(self._daemon_down_message(e)) from None
            raise

    def _daemon_down_message(self, error: Exception) -> str:
        where = self.docker_host or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
        return (
            f"Docker daemon unreachable at {where} ({type(error).__name__}); start dockerd "
            f"(or set docker_host), or use limited-process-provisioner, which needs no Docker"
        )

    async def client(self) -> Any:
        if self._client is None:
            self._client = await self._docker(self._make_client)
        return self._client

    def _make_client(self) -> Any:
        import docker

        kwargs = dict(self.client_kwargs)
        if self.docker_host:
            kwargs["base_url"] = self.docker_host
            client = docker.DockerClient(**kwargs)
        else:
            client = docker.from_env(**kwargs)
        client.ping()
        return client

    # -- start ----------------------------------------------------------------------

    @property
    def has_process(self) -> bool:
        return self.container_id is not None

    async def _before_admission(self) -> None:
        """Daemon reachable and image present, before anything is reserved or created."""
        client = await self.client()
        import docker.errors

        try:
            await self._docker(client.api.inspect_image, self.image)
        except docker.errors.ImageNotFound:
            msg = f"image {self.image!r} not found on the Docker host; {BUILD_HINT}"
            raise SandboxUnavailableError(msg) from None
        if not self._extra_disk_paths:
            info = await self._docker(client.info)
            root = info.get("DockerRootDir")
            self._extra_disk_paths = (Path(root),) if root else ()

    async def _prepare_sandbox(self, kwargs: dict[str, Any]) -> None:
        """Make the kernel dir and choose ipc (the container name must be free)."""
        # A restart reuses the kernel id, so the old container's name must be free.
        await self._remove_container(container_name(self.kernel_id))
        uid = gid = None
        if self.container_user:
            uid, gid = (int(part) for part in self.container_user.split(":"))
        identity = await asyncio.to_thread(self._prepare_kernel_dir, uid, gid)
        lim = self.limits
        self.enforcement = {
            "identity": identity.replace("per kernel", "per kernel, container user"),
            "mem_limit": "hard (container memory, memswap = memory: no swap)",
            "cpu_limit": "hard (container nano_cpus)",
            "pids_limit": "hard (container pids_limit)",
            "nofile_limit": "hard (ulimit nofile)",
            "disk_limit": "hard per file (ulimit fsize) and tmpfs /tmp size; best-effort "
            "total (watchdog on the bind-mounted work dir)",
            "files_limit": "best-effort (watchdog on the work dir)",
            "network": "allowed (bridge network, network=True)"
            if lim.network
            else "hard (--network=none, ipc transport over a bind mount)",
            "filesystem": "read-only root, cap_drop ALL, no-new-privileges, init process; "
            "only the kernel's work, socket and connection dirs (and, read-only, the "
            "control dir) mounted",
            "isolation": "container: private PID and IPC namespaces; private size-capped "
            "tmpfs /tmp, /var/tmp, /run/lock and Docker's 64M /dev/shm; json log capped at "
            f"{self.log_max_size}",
        }
        for name in list(self.enforcement):
            if name.endswith("_limit") and getattr(lim, name, 0) is None:
                del self.enforcement[name]

    async def _prepare_launch(self, kwargs: dict[str, Any]) -> None:
        """Write the connection file and build the in-container command.

        The kernelspec argv is used as is (only ``{connection_file}`` substituted):
        jupyter_client's ``format_kernel_cmd`` would replace ``python`` with the server's
        interpreter, which does not exist in the image.
        """
        km = self.parent
        await asyncio.to_thread(km.write_connection_file)
        self.connection_info = km.get_connection_info()
        extra = kwargs.pop("extra_arguments", [])
        argv = list(self.kernel_spec.argv) + list(extra)
        kwargs["cmd"] = [a.replace("{connection_file}", km.connection_file) for a in argv]

    def _create_kwargs(self, cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
        import docker.types

        lim = self.limits
        assert self.kdir is not None
        work = str(self.kdir.work)
        user = self._container_user()
        ulimits = [docker.types.Ulimit(name="core", soft=0, hard=0)]
        if lim.nofile_limit is not None:
            ulimits.append(
                docker.types.Ulimit(name="nofile", soft=lim.nofile_limit, hard=lim.nofile_limit)
            )
        if lim.disk_limit is not None:
            ulimits.append(
                docker.types.Ulimit(name="fsize", soft=lim.disk_limit, hard=lim.disk_limit)
            )
        if lim.mem_limit is not None:
            # As on the process backend: one runaway allocation becomes a MemoryError the
            # kernel survives, instead of an OOM kill of the whole container.
            data = lim.mem_limit + DATA_RLIMIT_HEADROOM
            ulimits.append(docker.types.Ulimit(name="data", soft=data, hard=data))
        kdir = self.kdir
        mounts = [
            docker.types.Mount(str(kdir.work), str(kdir.work), type="bind"),
            docker.types.Mount(str(kdir.sock), str(kdir.sock), type="bind"),
            docker.types.Mount(str(kdir.conn), str(kdir.conn), type="bind"),
            docker.types.Mount(str(kdir.ctl), str(kdir.ctl), type="bind", read_only=True),
        ]
        for spec in self.extra_mounts:
            host, target, read_only = parse_mount(spec)
            mounts.append(docker.types.Mount(target, host, type="bind", read_only=read_only))
        kwargs: dict[str, Any] = {
            "image": self.image,
            "command": cmd,
            "name": container_name(self.kernel_id),
            "detach": True,
            "user": user,
            "working_dir": work,
            "environment": env,
            "labels": self._labels(),
            "mounts": mounts,
            "read_only": True,
            "tmpfs": {
                path: f"size={self._tmp_size()},mode=1777,nosuid,nodev"
                for path in ("/tmp", "/var/tmp", "/run/lock")
            },
            "ipc_mode": "private",
            "log_config": docker.types.LogConfig(
                type="json-file", config={"max-size": self.log_max_size, "max-file": "1"}
            ),
            "cap_drop": ["ALL"],
            "security_opt": ["no-new-privileges"],
            "init": True,
            "privileged": False,
            "ulimits": ulimits,
            "network_mode": "bridge" if lim.network else "none",
            "stop_signal": "SIGTERM",
        }
        if lim.mem_limit is not None:
            kwargs["mem_limit"] = lim.mem_limit
            kwargs["memswap_limit"] = lim.mem_limit
        if lim.cpu_limit is not None:
            kwargs["nano_cpus"] = int(lim.cpu_limit * 1e9)
        if lim.pids_limit is not None:
            kwargs["pids_limit"] = lim.pids_limit
        refused = set(self.extra_create_kwargs) & set(kwargs)
        if refused:
            msg = (
                f"extra_create_kwargs may not override {sorted(refused)}: those settings are "
                f"the container's limits; use the matching limit traits instead"
            )
            raise LimitConfigError(msg)
        kwargs.update(self.extra_create_kwargs)
        return kwargs

    def _container_user(self) -> str:
        if self.container_user:
            return self.container_user
        if self.uid is not None:
            return f"{self.uid}:{self.uid}"
        return f"{os.getuid()}:{os.getgid()}"

    def _tmp_size(self) -> int | str:
        if self.tmp_size:
            return self.tmp_size
        size = self.limits.disk_limit or 1024**3
        if self.limits.mem_limit is not None:
            size = min(size, self.limits.mem_limit)
        return size

    def _labels(self) -> dict[str, str]:
        lim = self.limits
        labels = {
            label("kernel-id"): self.kernel_id,
            label("owner"): self.owner,
            label("server-id"): self.server_id,
            label("kernelspec"): getattr(self.parent, "kernel_name", "") or "",
            label("created"): str(time.time()),
            label("state-dir"): str(self.state_dir),
            label("kernel-dir"): str(self.kernel_dir),
            label("connection-file"): getattr(self.parent, "connection_file", "") or "",
            label("uid"): str(self.uid if self.uid is not None else os.getuid()),
            label("network"): str(lim.network).lower(),
        }
        for name in ("mem_limit", "cpu_limit", "pids_limit", "nofile_limit", "disk_limit"):
            value = getattr(lim, name)
            labels[label(name.replace("_", "-"))] = "" if value is None else str(value)
        labels.update({label("label." + k): v for k, v in self.labels.items()})
        labels.update({label(k): str(v) for k, v in self.extra_labels().items()})
        return labels

    def extra_labels(self) -> dict[str, str]:
        """Hook for subclasses (e.g. recovery data); keys get our prefix."""
        return {}

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> Any:
        """Create and start the container; called by KernelManager after pre_launch."""
        env = dict(kwargs.get("env") or {})
        work = str(self.kdir.work)
        env.update(self._kernel_env())
        env.update({KERNEL_ID_ENV: self.kernel_id, "HOME": work})
        create = self._create_kwargs(cmd, env)
        client = await self.client()
        try:
            container = await self._docker(client.containers.run, **create)
        except Exception:
            # Nothing half-started: a container that was created but failed to start.
            await self._remove_container(create["name"])
            raise
        self.container_id = container.id
        self.exit_code = None
        self.exit_reason = self.exit_kind = None
        self._shutting_down = False
        attrs = await self._docker(client.api.inspect_container, container.id)
        self.pid = attrs["State"].get("Pid") or None
        await asyncio.to_thread(
            self.registry.update,
            self.kernel_id,
            state="running",
            container_id=container.id,
            pid=self.pid,
            pid_create_time=process_identity(self.pid) if self.pid else None,
            uid=self.uid,
            gid=self.gid,
            kernel_dir=str(self.kernel_dir),
            work_dir=work,
            connection_file=getattr(self.parent, "connection_file", None),
            enforcement=self.enforcement,
            started=time.time(),
        )
        self.work_dir = work
        baseline = await self._carried_over_usage()
        await self._open_kernel_door()
        self._start_watchdog(baseline)
        self.log.info(
            "Kernel %s started in container %s (%s) with %s [%s]",
            self.kernel_id,
            container.name,
            self.image,
            self.limits.describe(),
            self.describe_enforcement(),
        )
        return self.connection_info

    def _start_watchdog(self, baseline: tuple[int, int] = (0, 0)) -> None:
        self.watchdog = Watchdog(
            kernel_id=self.kernel_id,
            get_pids=list,
            on_trip=self._on_trip,
            work_dir=self.work_dir,
            extra_dirs=self._kernel_writable_dirs(),
            disk_limit=self.limits.disk_limit,
            files_limit=self.limits.files_limit,
            disk_baseline=baseline[0],
            files_baseline=baseline[1],
            interval=self.watchdog_interval,
            disk_interval=self.watchdog_interval * 4,
        )
        self.watchdog.start()

    async def _restore(self, entry: dict[str, Any]) -> None:
        """Take over a container a previous server started (see recovery.adopt)."""
        from ..errors import AdoptionError

        self.container_id = entry.get("container_id")
        attrs = await self._inspect()
        if attrs is None or not attrs["State"].get("Running"):
            msg = f"kernel {self.kernel_id}: container {self.container_id} is not running"
            raise AdoptionError(msg)
        self.pid = attrs["State"].get("Pid") or None
        self.exit_code = None
        self._start_watchdog()
        self.log.info("Kernel %s adopted (container %s)", self.kernel_id, self.container_id[:12])

    # -- running --------------------------------------------------------------------

    async def _on_trip(self, kind: str, reason: str) -> None:
        self.record_trip(kind, reason)
        await self.kill()

    async def _inspect(self) -> dict[str, Any] | None:
        import docker.errors

        if self.container_id is None:
            return None
        client = await self.client()
        try:
            return await self._docker(client.api.inspect_container, self.container_id)
        except docker.errors.NotFound:
            return None

    async def poll(self) -> int | None:
        """None while the container runs; its exit code once it stopped (or vanished)."""
        if self.container_id is None:
            return self.exit_code if self.exit_code is not None else 0
        attrs = await self._inspect()
        if attrs is None:
            # Removed behind our back: treat as exited (as dockerspawner does).
            self.exit_code = self.exit_code if self.exit_code is not None else -1
            return self.exit_code
        state = attrs["State"]
        if state.get("Running") or state.get("Status") in ("created", "restarting"):
            return None
        if self.exit_code is None:
            self.exit_code = int(state.get("ExitCode", -1))
            self._note_exit(state)
            if self.exit_reason and self.exit_reason.startswith("container exited"):
                await self._log_container_tail()
        return self.exit_code

    async def _log_container_tail(self) -> None:
        """Put the dead container's last output in the server log before it is removed."""
        import docker.errors

        client = await self.client()
        try:
            tail = await self._docker(client.api.logs, self.container_id, tail=20)
        except docker.errors.APIError:
            return  # already removed
        # Kernel-written: bounded (the json log itself is capped at log_max_size).
        self.log.warning(
            "Kernel %s container output (last 20 lines):\n%s",
            self.kernel_id,
            tail[-4096:].decode(errors="replace").rstrip(),
        )

    def _note_exit(self, state: dict[str, Any]) -> None:
        if state.get("OOMKilled"):
            self.record_trip(
                "mem_limit",
                f"memory limit {format_size(self.limits.mem_limit)} exceeded (OOMKilled)",
            )
        elif self.watchdog is not None and self.watchdog.tripped:
            pass  # reason already recorded by the watchdog
        elif not self._shutting_down and self.exit_code:
            self.exit_reason = f"container exited with status {self.exit_code}"
            if self.exit_code in (126, 127):
                self.exit_reason += (
                    f" (kernel command {self.kernel_spec.argv[0]!r} not runnable in image "
                    f"{self.image!r}: argv is the command inside the container)"
                )
            if state.get("Error"):
                self.exit_reason += f": {state['Error']}"
            self.log.warning("Kernel %s died: %s", self.kernel_id, self.exit_reason)

    async def wait(self) -> int | None:
        """Block (asynchronously) until the container stopped; returns its exit code."""
        while (ret := await self.poll()) is None:
            await asyncio.sleep(0.1)
        return ret

    async def send_signal(self, signum: int) -> None:
        """Signal the kernel: docker delivers it to the init process, which forwards it."""
        import docker.errors

        if self.container_id is None:
            return
        client = await self.client()
        try:
            await self._docker(client.api.kill, self.container_id, signal=int(signum))
        except docker.errors.APIError as e:
            if e.status_code in (404, 409):
                return  # gone, or not running any more
            raise

    async def shutdown_requested(self, restart: bool = False) -> None:
        self._shutting_down = True
        await super().shutdown_requested(restart=restart)

    async def kill(self, restart: bool = False) -> None:
        self._shutting_down = True
        await self.send_signal(signal.SIGKILL)

    async def terminate(self, restart: bool = False) -> None:
        self._shutting_down = True
        await self.send_signal(signal.SIGTERM)

    # -- stop -----------------------------------------------------------------------

    async def _remove_container(self, name_or_id: str) -> None:
        import docker.errors

        client = await self.client()
        try:
            await self._docker(client.api.remove_container, name_or_id, force=True)
        except docker.errors.APIError as e:
            if e.status_code not in (404, 409):  # already gone / removal in progress
                raise

    async def cleanup(self, restart: bool = False) -> None:
        """Remove the container; unless restarting, also the kernel dir and registry entry.

        Called by KernelManager.cleanup_resources() after the kernel stopped.
        """
        await self._stop_lifecycle()
        if self.watchdog is not None:
            await self.watchdog.stop()
            self.watchdog = None
        if self.container_id is not None:
            await self.poll()  # capture OOMKilled before the evidence is removed
            await self._remove_container(self.container_id)
            self.container_id = None
        if restart:
            await self._between_processes()
        else:
            await self._release()

    # -- persistence ----------------------------------------------------------------

    async def get_provisioner_info(self) -> dict[str, Any]:
        info = await super().get_provisioner_info()
        info.update(
            {"container_id": self.container_id, "image": self.image, "uid": self.uid}
        )
        return info

    async def load_provisioner_info(self, provisioner_info: dict) -> None:
        await super().load_provisioner_info(provisioner_info)
        self.container_id = provisioner_info.get("container_id")
        self.uid = provisioner_info.get("uid")


def parse_mount(spec: str) -> tuple[str, str, bool]:
    """"HOST:CONTAINER[:ro|rw]" -> (host, container, read_only); refuses bad specs."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not all(parts[:2]):
        msg = f'extra_mounts entry {spec!r} must look like "HOST_PATH:CONTAINER_PATH[:ro|rw]"'
        raise LimitConfigError(msg)
    host, target = parts[0], parts[1]
    mode = parts[2] if len(parts) == 3 else "ro"
    if mode not in ("ro", "rw"):
        msg = f"extra_mounts entry {spec!r}: mode must be ro or rw, not {mode!r}"
        raise LimitConfigError(msg)
    if not (os.path.isabs(host) and os.path.isabs(target)):
        msg = f"extra_mounts entry {spec!r}: both paths must be absolute"
        raise LimitConfigError(msg)
    if not os.path.exists(host):
        msg = f"extra_mounts entry {spec!r}: host path {host} does not exist"
        raise LimitConfigError(msg)
    return host, target, mode == "ro"


def _is_connection_error(error: Exception) -> bool:
    import requests

    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, (requests.exceptions.ConnectionError, ConnectionError,
                              FileNotFoundError)):
            return True
        cause = cause.__cause__ or cause.__context__
    return "Error while fetching server API version" in str(error)
