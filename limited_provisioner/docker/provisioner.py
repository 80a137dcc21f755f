"""``limited-docker-provisioner``: each kernel in its own locked-down container.

The container runtime enforces the limits (memory without swap, CPU, pids, nofile),
with a read-only root, size-capped private tmpfs scratch dirs, private IPC and PID
namespaces, a capped json log, no capabilities, no-new-privileges, a non-root uid, an
init process and no network unless asked (container.py says exactly what). The kernel
is reached over ``ipc`` sockets in its socket dir, bind-mounted at the same path,
through the server's proxy (proxy.py), so Jupyter talks to it even with
``--network=none``. Every Docker call goes through the kernel's
:class:`~.client.DockerSession`, off the event loop.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
from pathlib import Path
from typing import Any

from traitlets import Dict, List, Unicode, default, validate

from .._background import on_package_loop
from ..enforcement import container_plan
from ..errors import (
    AdoptionError,
    LimitConfigError,
    SandboxStartError,
    SandboxUnavailableError,
    kernel_command_error,
)
from ..kernel_env import CONTAINER_ENV_KEEP, HOST_PATH_ENV
from ..limits import format_size
from ..pool import NotClaimable
from ..process import launch as _launch
from ..process.sandbox import scratch_parent
from ..provisioner import LimitedProvisioner
from ..registry import Registry, same_process, sandbox_of
from ..workspace import (
    Workspace,
    attach_in_kernel,
    chosen_folder,
    host_mount_point,
    mount_on_host,
    resolve_workspace,
)
from .client import GONE, LABEL_PREFIX, DockerSession, container_name
from .container import (
    ContainerSpec,
    command_errno,
    create_kwargs,
    kernel_labels,
    parse_mount,
    tmp_size,
)
from .runtime import Runtime, check_folder
from .runtime import resolve as resolve_runtime

DEFAULT_IMAGE = "limited-provisioner-kernel:latest"
BUILD_HINT = "build it with `limited-provisioner build-image` (or set `image` to one you have)"

__all__ = ["DEFAULT_IMAGE", "LABEL_PREFIX", "LimitedDockerProvisioner"]


class LimitedDockerProvisioner(LimitedProvisioner):
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

    runtime = Unicode(
        "runc",
        help="""OCI runtime the kernel's container runs under, by the name the Docker
        daemon has it registered (`docker info`: Runtimes): "runc" (default), "runsc"
        for gVisor (its system calls served by a user-space kernel), or any other. Checked
        before anything is reserved; a gVisor runtime must be registered with
        --host-uds=create (the server reaches the kernel's ipc sockets through it). Under
        gVisor pids_limit is applied inside the sandbox (RLIMIT_NPROC) and a memory
        overrun ends the kernel (no MemoryError): see get_provisioner_info()["enforcement"].""",
    ).tag(config=True)

    extra_create_kwargs = Dict(
        help="""Extra docker create arguments (e.g. "cpuset_cpus",
        "device_requests", "shm_size"). Only settings that cannot widen what the kernel
        reaches are accepted; the sandbox's own settings and anything else (volumes,
        cap_add, pid_mode, devices...) are refused with the list of what is allowed.""",
    ).tag(config=True)

    log_max_size = Unicode(
        "1m",
        help="""Size of the container's json log (its stdout/stderr) before Docker rotates
        it; one file is kept. Default 1m.""",
    ).tag(config=True)

    @default("env_keep")
    def _default_env_keep(self) -> list[str]:
        return list(CONTAINER_ENV_KEEP)

    # A caller's PATH or venv names the host's directories; the image has its own.
    _host_only_env = HOST_PATH_ENV

    @validate("extra_mounts")
    def _validate_extra_mounts(self, proposal: dict) -> list[str]:
        for spec in proposal["value"]:
            parse_mount(spec)
        return proposal["value"]

    _sandbox_fields = (
        *LimitedProvisioner._sandbox_fields, "container_id", "exit_code", "_session",
        "_workspace_source", "_runtime",
    )

    container_id: str | None = None
    exit_code: int | None = None
    # The runtime as the daemon has it registered (runtime.resolve), at admission.
    _runtime: Runtime | None = None
    _shutting_down = False
    _session: DockerSession | None = None

    @property
    def docker(self) -> DockerSession:
        """The one Docker client of this kernel (docker_host, client_kwargs honoured)."""
        if self._session is None:
            self._session = DockerSession(self.docker_host, self.client_kwargs)
        return self._session

    # -- start ----------------------------------------------------------------------

    @property
    def has_process(self) -> bool:
        return self.container_id is not None

    async def _before_admission(self) -> None:
        """Daemon reachable and image present, before anything is reserved or created."""
        import docker.errors

        try:
            await self.docker.acall("inspect_image", self.image)
        except docker.errors.ImageNotFound:
            msg = f"image {self.image!r} not found on the Docker host; {BUILD_HINT}"
            raise SandboxUnavailableError(msg) from None
        info = await self.docker.acall("info")
        self._runtime = resolve_runtime(self.runtime, info, network=self.limits.network)
        if not self._disk_paths:
            root = info.get("DockerRootDir")
            self._disk_paths = (Path(root),) if root else ()

    async def _fingerprint_extra(self) -> dict[str, Any]:
        # A tag moved to another image must not hand out kernels of the old one.
        import docker.errors

        try:
            attrs = await self.docker.acall("inspect_image", self.image)
        except docker.errors.ImageNotFound:
            return {"image_id": None}  # no claim; the cold start says what is missing
        return {"image_id": attrs.get("Id")}

    async def _claim_folder(self, slot: Any, kwargs: dict[str, Any]) -> Workspace | None:
        """The folder a claim asks for, bound into the pooled container at its own path
        (root, a local daemon): its mount point made in the container's root filesystem
        from the host's side, then the same idmapped bind a launch makes, attached in the
        container's mount namespace (workspace.attach_in_kernel)."""
        folder = chosen_folder(self.workspace, kwargs.get("cwd"))
        if folder is None:
            return None
        src = slot.prov
        local = not self.docker_host or self.docker_host.startswith("unix://")
        if os.geteuid() != 0 or not local or src.uid is None:
            raise NotClaimable("workspace")
        if src._runtime is not None and not src._runtime.host_mounts:
            raise NotClaimable("workspace")  # gVisor would never see the bind
        ws = await asyncio.to_thread(
            resolve_workspace, folder, server_uid=0, kernel_uid=src.uid, kernel_gid=src.gid
        )
        attrs = await src._inspect()
        merged = ((attrs or {}).get("GraphDriver") or {}).get("Data", {}).get("MergedDir")
        pid = ((attrs or {}).get("State") or {}).get("Pid")
        if not merged or not pid or scratch_parent(ws.path):
            raise NotClaimable("workspace")  # its path is a tmpfs of the container's
        failed = await attach_in_kernel(pid, ws, merged)
        if failed:
            self.log.warning("Kernel %s: the pooled container cannot take folder %s (%s); "
                             "starting a new one", self.kernel_id, ws.path, failed)
            raise NotClaimable("workspace")
        return ws

    async def pooled_alive(self) -> bool:
        # Its init's pid and start time where the daemon is this host's: no API call in
        # the claim's path (the pool's periodic check asks the daemon).
        local = not self.docker_host or self.docker_host.startswith("unix://")
        if local and self.pid and self.pid_create_time:
            return same_process(self.pid, self.pid_create_time)
        return await super().pooled_alive()

    async def _prepare_sandbox(self, kwargs: dict[str, Any]) -> None:
        """Free the container name, make the kernel dir, decide the plan."""
        # A restart reuses the kernel id, so the old container's name must be free.
        await self.docker.run(self.docker.remove_container, container_name(self.sandbox_id))
        uid = gid = None
        if self.container_user:
            uid, gid = (int(part) for part in self.container_user.split(":"))
        identity = await asyncio.to_thread(self._prepare_kernel_dir, uid, gid)
        # Mapped onto the container's uid only where the server may mount (root).
        where = await asyncio.to_thread(
            self._choose_work_folder, kwargs.get("cwd"),
            self.uid if os.geteuid() == 0 else None,
        )
        check_folder(self._runtime, self.work_folder)
        self._workspace_source = None
        if self.work_folder is not None and os.geteuid() == 0:
            target = host_mount_point(self.state_dir, self.sandbox_id)
            await asyncio.to_thread(mount_on_host, self.work_folder, target)
            self._workspace_source = str(target)
        self.plan = container_plan(
            self.limits, log_max_size=self.log_max_size, workfs=self.workfs,
            disk_interval=self.watchdog_interval * 4, host_folder=self.work_folder is not None,
            runtime=self._runtime,
        )
        self.plan.measures["identity"] = identity
        self.plan.measures["workspace"] = where

    # The host dir Docker binds as the kernel's workspace (workspace.mount_on_host).
    _workspace_source: str | None = None

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

    def _container_spec(self, cmd: list[str], env: dict[str, str]) -> ContainerSpec:
        assert self.kdir is not None
        kdir, lim = self.kdir, self.limits
        uid = self.uid if self.uid is not None else os.getuid()
        user = self.container_user or (
            f"{uid}:{uid}" if self.uid is not None else f"{os.getuid()}:{os.getgid()}"
        )
        labels = kernel_labels(
            kernel_id=self.sandbox_id, owner=self.owner, server_id=self.server_id,
            kernelspec=getattr(self.parent, "kernel_name", "") or "",
            state_dir=str(self.state_dir), kernel_dir=str(self.kernel_dir),
            connection_file=getattr(self.parent, "connection_file", "") or "",
            uid=uid, limits=lim, caller_labels=self.labels,
        )
        folder = self.work_folder
        return ContainerSpec(
            kernel_id=self.sandbox_id, image=self.image, command=cmd, env=env, user=user,
            limits=lim, work=folder.path if folder else str(kdir.work), home=str(kdir.work),
            workspace_source=self._workspace_source or (folder.path if folder else None),
            workspace_read_only=bool(folder and folder.read_only),
            # A pooled kernel too: the folder a claim maps into it (_claim_folder) must
            # never receive a set-id file.
            no_setid_files=bool(folder and folder.uid_map) or self._pooled,
            launcher=_launch.__file__,
            sock=str(kdir.sock), conn=str(kdir.conn),
            ctl=str(kdir.ctl), labels=labels, extra_mounts=list(self.extra_mounts),
            tmp_size=tmp_size(lim, self.tmp_size), log_max_size=self.log_max_size,
            extra_create_kwargs=dict(self.extra_create_kwargs),
            wheelhouse=self.wheelhouse or None, runtime=self._runtime,
        )

    async def _launch(self, cmd: list[str], kwargs: dict[str, Any]) -> Any:
        """Create and start the container; one that cannot start raises
        SandboxStartError with the runtime's message (on a restart: a kernel that died
        at once)."""
        import docker.errors

        assert self.kdir is not None
        if self.refused_restart:
            # As a container that could not start on a restart (below): died at once.
            self.record_trip("sandbox", f"sandbox setup failed: {self.refused_restart}")
            self.container_id, self.exit_code = container_name(self.sandbox_id), None
            return self.connection_info
        work = str(self.kdir.work)
        env = self._kernel_env(kwargs.get("env"))
        self._launch_env = dict(env)
        create = create_kwargs(self._container_spec(cmd, env))
        try:
            self.container_id = await self.docker.run(self.docker.start_container, create)
        except docker.errors.APIError as e:
            # Created but not started (a command missing in the image, a mount refused):
            # nothing half-started stays behind.
            await self.docker.run(self.docker.remove_container, create["name"])
            reason = str(e.explanation or e)
            self.record_trip("sandbox", f"container failed to start: {reason}")
            if self._restarting:
                # A kernel that died at once, for the restarter to count against
                # restart_limit (a restart that raises is retried forever): the removed
                # container reads as exited (poll).
                self.container_id, self.exit_code = create["name"], None
                return self.connection_info
            exec_errno = command_errno(reason)
            if exec_errno is not None:
                msg = f"Kernel {self.kernel_id}: the kernel command cannot run: {reason}"
                raise kernel_command_error(msg, reason=reason, errno=exec_errno) from e
            msg = f"Kernel {self.kernel_id} could not be started in its container: {reason}"
            raise SandboxStartError(msg, reason=reason) from e
        except Exception:
            await self.docker.run(self.docker.remove_container, create["name"])
            raise
        self.exit_code = None
        self._forget_exit()
        self._shutting_down = False
        attrs = await self.docker.acall("inspect_container", self.container_id)
        self.pid = attrs["State"].get("Pid") or None
        self.work_dir = self.work_folder.path if self.work_folder else work
        await self._record_running(container_id=self.container_id, docker_host=self.docker_host)
        self._baseline = await self._disk_baseline()
        await self._open_kernel_door()
        self._start_watchdog(self._baseline)
        self.log.info(
            "Kernel %s started in container %s (%s) with %s [%s]", self.kernel_id,
            create["name"], self.image, self.limits.describe(), self.describe_enforcement(),
        )
        return self.connection_info

    async def _restore(self, entry: dict[str, Any]) -> None:
        """Take over a container a previous server started (see recovery.adopt)."""
        self.container_id = entry.get("container_id")
        attrs = await self._inspect()
        if attrs is None or not attrs["State"].get("Running"):
            msg = f"kernel {self.kernel_id}: container {self.container_id} is not running"
            raise AdoptionError(msg, reason="dead")
        self.pid = attrs["State"].get("Pid") or None
        self.exit_code = None
        self._start_watchdog((0, 0))
        self.log.info("Kernel %s adopted (container %s)", self.kernel_id, self.container_id[:12])

    @classmethod
    def remove_traces(cls, registry: Registry, entry: dict[str, Any]) -> None:
        """The reaper's part for a container kernel: remove its containers, on the daemon
        that runs them. Raises if that daemon cannot be asked (the entry must stay)."""
        DockerSession(entry.get("docker_host") or "").remove_kernel_containers(
            sandbox_of(entry)
        )

    # -- running --------------------------------------------------------------------

    async def _inspect(self) -> dict[str, Any] | None:
        import docker.errors

        if self.container_id is None:
            return None
        try:
            return await self.docker.acall("inspect_container", self.container_id)
        except docker.errors.NotFound:
            return None

    @on_package_loop
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

    async def _start_output(self) -> str:
        import docker.errors

        try:
            tail = await self.docker.acall("logs", self.container_id, tail=20)
        except docker.errors.APIError:
            return ""  # already removed
        return tail[-4096:].decode(errors="replace")

    async def _log_container_tail(self) -> None:
        """Put the dead container's last output in the server log before it is removed."""
        import docker.errors

        try:
            tail = await self.docker.acall("logs", self.container_id, tail=20)
        except docker.errors.APIError:
            return  # already removed
        # Kernel-written: bounded (the json log itself is capped at log_max_size).
        self.log.warning(
            "Kernel %s container output (last 20 lines):\n%s",
            self.kernel_id,
            tail[-4096:].decode(errors="replace").rstrip(),
        )

    def _command_errno(self, code: int) -> int | None:
        # The image's init (tini) exits 127 when the command is not found, 126 when it
        # cannot be executed, as a shell does.
        return {127: errno.ENOENT, 126: errno.EACCES}.get(code)

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

    @on_package_loop
    async def wait(self) -> int | None:
        """Block (asynchronously) until the container stopped; returns its exit code."""
        while (ret := await self.poll()) is None:
            await asyncio.sleep(0.1)
        return ret

    @on_package_loop
    async def send_signal(self, signum: int) -> None:
        """Signal the kernel: docker delivers it to the init process, which forwards it."""
        import docker.errors

        if self.container_id is None:
            return
        try:
            await self.docker.acall("kill", self.container_id, signal=int(signum))
        except docker.errors.APIError as e:
            if e.status_code in GONE:
                return  # gone, or not running any more
            raise

    @on_package_loop
    async def shutdown_requested(self, restart: bool = False) -> None:
        self._shutting_down = True
        await super().shutdown_requested(restart=restart)

    @on_package_loop
    async def kill(self, restart: bool = False) -> None:
        self._shutting_down = True
        await self.send_signal(signal.SIGKILL)

    @on_package_loop
    async def terminate(self, restart: bool = False) -> None:
        self._shutting_down = True
        await self.send_signal(signal.SIGTERM)

    # -- stop -----------------------------------------------------------------------

    async def _cleanup(self, restart: bool) -> None:
        """Remove the container; unless restarting, also the kernel dir and registry entry."""
        await self._stop_watching()
        if self.container_id is not None:
            await self.poll()  # capture OOMKilled before the evidence is removed
            await self.docker.run(self.docker.remove_container, self.container_id)
            self.container_id = None
        if restart:
            await self._between_processes()
        else:
            await self._release()

    # -- persistence ----------------------------------------------------------------

    async def get_provisioner_info(self) -> dict[str, Any]:
        info = await super().get_provisioner_info()
        info.update(
            {"container_id": self.container_id, "image": self.image}
        )
        return info

    async def load_provisioner_info(self, provisioner_info: dict) -> None:
        await super().load_provisioner_info(provisioner_info)
        self.container_id = provisioner_info.get("container_id")
