"""``limited-swarm-provisioner``: each kernel a one-task Docker Swarm service, on any node.

The docker backend's sandbox (container.py), placed by the swarm's scheduler
(service.py says what the task is made of) instead of run on this host:

* **Admission** is swarm-wide: ``max_kernels`` / ``max_kernels_per_user`` are named
  slots in the swarm's raft store (slots.py), so servers on different nodes never
  both take the last one; host caps about this machine's memory and disk do not apply
  (the scheduler places a kernel only on a node where its reservation fits).
* **Transport**: the kernel's five sockets are TCP on the kernels' overlay network
  (``--internal`` when ``network`` is off), CurveZMQ servers with a keypair only the
  kernel's connection secret and this server hold; the server reaches them through its
  proxy (proxy.KernelEndpoint), so the lifecycle timers, output caps and message checks
  work as on the other backends. The server must itself be attached to that network
  (a container or service on it: see README's Swarm quick start).
* **Signals**: none reach a task on another node; an interrupt is an
  ``interrupt_request`` on the control channel, a kill the service's removal.
* **Deaths** are read from the task's status (exit code, the swarm's error) and the
  node's: a node that left the swarm is reported as such.
* **Recovery**: each kernel's record in the swarm (records.py) lets a server restarted
  anywhere -- a new container, another node -- adopt it without this host's registry;
  servers beat in the swarm (presence.py), and the kernels of one silent for
  ``orphan_grace`` are reaped by whichever server or ``limited-provisioner reap`` sees it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import signal
import time
from typing import Any

from traitlets import Float, List, Unicode

from .._background import on_package_loop
from ..admission import AdmissionPolicy
from ..docker.client import label, remove
from ..docker.provisioner import LimitedDockerProvisioner
from ..enforcement import NONE, swarm_plan
from ..errors import (
    AdoptionError,
    LimitConfigError,
    SandboxStartError,
    SandboxUnavailableError,
)
from ..kernel_hook import NOTICE_ENV
from ..provisioner import START_OUTPUT_LIMIT
from ..proxy import KernelEndpoint
from ..registry import sandbox_of
from . import presence, records, slots
from .service import (
    CONNECTION_SECRET_TARGET,
    HOOK_TARGET,
    KERNEL_PORTS,
    ConfigRef,
    Placement,
    SecretRef,
    service_name,
    service_plan,
)

# Task states (swarmkit's): on the way up, up, and the end of the road.
STARTING = {"new", "allocated", "pending", "assigned", "accepted", "preparing", "ready",
            "starting"}
ENDED = {"complete", "shutdown", "failed", "rejected", "remove", "orphaned"}
# The image's own kernel user (setup-docker.sh, the Dockerfile): a uid on no node's host.
DEFAULT_USER = "1000:1000"
SECRET_PATH = f"/run/secrets/{CONNECTION_SECRET_TARGET}"
# The kernel's home and working dir in its task: a tmpfs of disk_limit (service.py), on
# the image's /tmp (writable by every uid in any image: a swarm tmpfs's mode is not set).
HOME = "/tmp"
CONNECTION_COPY = f"{HOME}/.connection.json"
EXEC_FILES = "--IPKernelApp.exec_files="


class LimitedSwarmProvisioner(LimitedDockerProvisioner):
    """Runs the kernel as a resource-limited Swarm service on a node of the cluster."""

    backend = "swarm"

    kernels_network = Unicode(
        "limited-provisioner-kernels",
        help="""Attachable overlay network the kernels run on; kernels without network
        access get "<name>-internal", created --internal (no route out). Created on first
        use; the Jupyter server must be attached to both (it reaches the kernels there).""",
    ).tag(config=True)

    placement_constraints = List(
        Unicode(),
        help="""Where kernels may run, as `docker service create --constraint` takes them
        (e.g. "node.labels.limited-provisioner.role==kernels", "node.role==worker").""",
    ).tag(config=True)

    placement_preferences = List(
        Unicode(),
        help="""Node labels to spread kernels over (e.g. "node.labels.zone").""",
    ).tag(config=True)

    task_start_timeout = Float(
        120.0,
        help="""Seconds a kernel's task may take to be placed and started (the image is
        on every node: there is no registry pull). Past it the start is refused with the
        scheduler's reason (e.g. no node with enough free memory): HTTP 503.""",
    ).tag(config=True)

    placement_timeout = Float(
        10.0,
        help="""Seconds a kernel's task may wait while the scheduler finds no node that fits
        it ("no suitable node": not enough free memory or CPU for its reservation, no
        node matching the constraints). Past it the start is refused with that reason
        (HTTP 503) instead of waiting task_start_timeout for a kernel to end elsewhere.""",
    ).tag(config=True)

    _sandbox_fields = (
        *LimitedDockerProvisioner._sandbox_fields, "service_id", "task_id", "node_id",
        "_secret", "_endpoint", "_slots", "_recorded",
    )

    service_id: str | None = None
    task_id: str | None = None
    node_id: str | None = None
    _secret: SecretRef | None = None
    _endpoint: KernelEndpoint | None = None
    _slots: list[str] | None = None
    # Its recovery record is in the swarm (written at the first start, or adopted).
    _recorded = False
    # The kernels' network this start uses (made or checked before admission).
    _network_id: str | None = None

    @property
    def has_process(self) -> bool:
        return self.service_id is not None

    # -- admission ----------------------------------------------------------------------

    async def _before_admission(self) -> None:
        """A swarm manager, runc (Swarm cannot pick a runtime per service), and the
        kernels' networks; before anything is reserved."""
        info = await self.docker.acall("info")
        swarm = info.get("Swarm") or {}
        if not swarm.get("ControlAvailable"):
            msg = (f"the Docker daemon at {self.docker.where} is not a swarm manager "
                   f"(swarm state {swarm.get('LocalNodeState')!r}): run `docker swarm init` "
                   "there, or point docker_host at a manager")
            raise SandboxUnavailableError(msg)
        if self.runtime != "runc":
            msg = (f"runtime={self.runtime!r}: a Swarm service cannot choose its runtime "
                   "(it runs under each node's default); use the docker backend for "
                   "gVisor, or leave runtime at 'runc'")
            raise SandboxUnavailableError(msg)
        self._runtime = None
        self._refuse_host_settings()
        self._network_id = await self.docker.run(self._ensure_network)

    def _refuse_host_settings(self) -> None:
        """Settings that name this host's files: a kernel on another node has none."""
        named = {"wheelhouse": self.wheelhouse, "extra_mounts": self.extra_mounts,
                 "workspace": self.workspace if self.workspace.startswith("/") else ""}
        used = sorted(name for name, value in named.items() if value)
        if used:
            msg = (f"{', '.join(used)} name(s) this host's files, which a swarm kernel "
                   "does not have: it runs on another node. Unset them for this "
                   "kernelspec (put what the kernel needs in its image), or use the docker "
                   "backend")
            raise LimitConfigError(msg)

    def _network_name(self) -> str:
        return self.kernels_network if self.limits.network else self.kernels_network + "-internal"

    def _ensure_network(self) -> str:
        """The kernels' overlay network (blocking); created attachable (the server's
        container joins it), --internal without network access."""
        import docker.errors

        name = self._network_name()
        found = [n for n in self.docker.call("networks", names=[name]) if n["Name"] == name]
        if found:
            net = found[0]
            if net.get("Driver") != "overlay" or (not self.limits.network and not net.get("Internal")):
                msg = (f"network {name!r} exists but is not an --internal overlay network "
                       "(kernels without network access would get a way out): remove it "
                       "or set kernels_network to another name")
                raise SandboxUnavailableError(msg)
            return net["Id"]
        try:
            made = self.docker.call(
                "create_network", name, driver="overlay", attachable=True,
                internal=not self.limits.network,
                labels={label("network"): str(self.limits.network).lower()},
            )
        except docker.errors.APIError as e:
            if e.status_code != 409:
                raise
            return self._ensure_network()  # another server made it meanwhile
        return made["Id"]

    def _policy(self) -> AdmissionPolicy:
        policy = super()._policy()
        # Counted swarm-wide (slots.py), not on this host; and this host's memory and
        # disk are not where the kernel runs: the scheduler's reservations are.
        policy.max_kernels = policy.max_kernels_per_user = None
        policy.mem_budget = policy.min_free_disk = None
        return policy

    async def _admit_or_evict(self) -> None:
        """This host's admission (start rates; it writes the registry entry), then the
        swarm's caps; a refusal by the swarm takes the entry back."""
        await super()._admit_or_evict()
        try:
            self._slots = await self.docker.run(
                slots.claim, self.docker.call, kernel_id=self.sandbox_id, owner=self.owner,
                max_kernels=self.max_kernels, max_kernels_per_user=self.max_kernels_per_user,
                live_kernels=self._live_kernels,
            )
        except BaseException:
            await asyncio.to_thread(self.registry.remove, self.kernel_id)
            raise

    def _live_kernels(self) -> set[str]:
        services = self.docker.call("services", filters={"label": label("kernel-id")})
        return {s["Spec"]["Labels"][label("kernel-id")] for s in services}

    # -- start --------------------------------------------------------------------------

    def _kernel_endpoint(self) -> KernelEndpoint:
        if self._endpoint is None:
            self._endpoint = KernelEndpoint.tcp(KERNEL_PORTS)
        return self._endpoint

    async def _prepare_sandbox(self, kwargs: dict[str, Any]) -> None:
        """The kernel dir on this host (its connection file, before it becomes the task's
        secret), the plan; no uid lease: the kernel runs as the image's user on another
        machine."""
        await self.docker.run(self._remove_service, service_name(self.sandbox_id))
        self.kdir = None
        user = self.container_user or DEFAULT_USER
        uid, _, gid = user.partition(":")
        await asyncio.to_thread(self._prepare_kernel_dir, int(uid), int(gid))
        self.plan = swarm_plan(self.limits, log_max_size=self.log_max_size)
        self.plan.set("workspace", NONE,
                      "a private tmpfs home on the node that runs it (the notebook's folder "
                      "is on the server's host: not mounted)")

    def _prepare_kernel_dir(self, uid: int | None = None, gid: int | None = None) -> Any:
        # Not the base's: no uid lease and no filesystem of its own on this host (the
        # dir holds only what the server writes for the kernel, root's).
        from ..kernel_dir import prepare_kernel_dir

        self.uid, self.gid = uid, gid
        self.kdir = prepare_kernel_dir(
            self.registry, self.kernel_id, None, None, sandbox_id=self.sandbox_id
        )
        self.kernel_dir = self.kdir.path
        self.workfs = None

    async def _launch(self, cmd: list[str], kwargs: dict[str, Any]) -> Any:
        """Create the connection secret and the service; wait until its task runs (or
        say why it cannot), then connect the proxy to the task's address."""
        assert self.kdir is not None and self.connection is not None
        env = self._kernel_env(kwargs.get("env"))
        # Host paths mean nothing on the node: its home is the task's tmpfs, and no
        # notice file reaches it (exec_timeout's interrupt still ends the cell).
        env["HOME"] = HOME
        env.pop(NOTICE_ENV, None)
        self._launch_env = dict(env)
        conn_file = self.connection.kernel_connection_file
        # ipykernel rewrites its connection file at start (the curve keys read back as
        # text differ from its bytes): it gets a private copy in its home, the secret
        # itself is read-only.
        cmd = ["sh", "-c", 'umask 077 && cat "$1" > "$2" && shift 2 && exec "$@"', "sh",
               SECRET_PATH, CONNECTION_COPY,
               *(part.replace(conn_file, CONNECTION_COPY) for part in cmd)]
        # The startup hook is a host file (kernel_dir): the task gets its text as a Swarm
        # config instead; pip's hook serves a wheelhouse, which a swarm kernel has not.
        hook = None
        if any(part.startswith(EXEC_FILES) for part in cmd):
            hook = await self.docker.run(hook_config, self.docker.call)
            cmd = [part for part in cmd if not part.startswith(EXEC_FILES)]
            cmd.append(EXEC_FILES + HOOK_TARGET)
        user = self.container_user or DEFAULT_USER
        spec = self._container_spec(cmd, env)
        spec.user, spec.work, spec.home = user, HOME, None
        contents = await asyncio.to_thread(self._read_kernel_file, conn_file)
        self._secret = await self.docker.run(self._create_secret, contents, spec.labels)
        network = self._network_id or await self.docker.run(self._ensure_network)
        plan = service_plan(
            spec, secret=self._secret, networks=[network],
            placement=Placement(tuple(self.placement_constraints),
                                tuple(self.placement_preferences)),
            hook=hook,
        )
        made = await self.docker.acall("create_service", **plan.create_kwargs())
        self.service_id = made["ID"]
        self.container_id = None
        self.exit_code = None
        self._forget_exit()
        self._shutting_down = False
        task = await self._wait_for_task()
        self.task_id, self.node_id = task["ID"], task.get("NodeID")
        self._kernel_endpoint().host = self._task_address(task, network)
        self.container_id = (task.get("Status", {}).get("ContainerStatus") or {}).get(
            "ContainerID")
        self.work_dir = spec.work
        await self._record_running(service_id=self.service_id, node_id=self.node_id,
                                   docker_host=self.docker_host)
        if not self._recorded:
            self._recorded = True
            await self.docker.run(self._write_record)
        await self._open_kernel_door()
        self.log.info(
            "Kernel %s started as service %s on node %s with %s [%s]", self.kernel_id,
            plan.name, self.node_id, self.limits.describe(), self.describe_enforcement(),
        )
        return self.connection_info

    def _write_record(self) -> None:
        """The kernel's recovery record in the swarm (records.py), once per kernel: its
        connection and keys stay the same across restarts."""
        entry = self.registry.read(self.kernel_id)
        if entry is None or self.connection is None:
            return
        client, kernel = (json.loads(self._read_kernel_file(path)) for path in (
            self.connection.client_connection_file, self.connection.kernel_connection_file))
        records.write(self.docker.call, entry, client, kernel)

    async def _restore(self, entry: dict[str, Any]) -> None:
        """Take over a kernel a previous server started (recovery.adopt): its service's
        running task and its secret from the swarm; its sockets' keys from the kernel's
        connection file (the server's, in the kernel dir), their address from the task."""
        self._recorded = True  # a kernel adopted has its record already
        self._network_id = await self.docker.run(self._ensure_network)
        found = await self.docker.run(self._running_task, sandbox_of(entry))
        if found is None:
            msg = f"kernel {self.kernel_id}: its service has no running task in the swarm"
            raise AdoptionError(msg, reason="dead")
        service, task, self._secret = found
        self.service_id, self.task_id, self.node_id = service["ID"], task["ID"], task.get("NodeID")
        self.container_id = (task.get("Status", {}).get("ContainerStatus") or {}).get(
            "ContainerID")
        self.exit_code = None
        assert self.connection is not None
        info = json.loads(await asyncio.to_thread(
            self._read_kernel_file, self.connection.kernel_connection_file))
        # The endpoint the proxy was made with (_connect_clients): the kernel's keys.
        endpoint = self._kernel_endpoint()
        endpoint.curve_publickey = info["curve_publickey"].encode("ascii")
        endpoint.curve_secretkey = info["curve_secretkey"].encode("ascii")
        endpoint.ports = {channel: int(info[f"{channel}_port"]) for channel in endpoint.ports}
        endpoint.host = self._task_address(task, self._network_id)
        await asyncio.to_thread(self.registry.update, self.kernel_id,
                                service_id=self.service_id, node_id=self.node_id)
        self.log.info("Kernel %s adopted (service %s on node %s)", self.kernel_id,
                      self.service_id[:12], self.node_id)

    def _running_task(self, sandbox_id: str) -> tuple[dict, dict, SecretRef | None] | None:
        """The kernel's service, its running task and its connection secret (blocking)."""
        wanted = {"label": f"{label('kernel-id')}={sandbox_id}"}
        for service in self.docker.call("services", filters=wanted):
            tasks = self.docker.call("tasks", filters={"service": service["ID"]})
            running = [t for t in tasks if t.get("Status", {}).get("State") == "running"]
            if running:
                secret = next((SecretRef(s["ID"], s["Spec"]["Name"])
                               for s in self.docker.call("secrets", filters=wanted)), None)
                return service, max(running, key=lambda t: t.get("CreatedAt", "")), secret
        return None

    def _read_kernel_file(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def _create_secret(self, data: bytes, labels: dict[str, str]) -> SecretRef:
        name = f"{service_name(self.sandbox_id)}.{secrets.token_hex(4)}"
        made = self.docker.call("create_secret", name, data, labels=labels)
        return SecretRef(made["ID"], name)

    async def _wait_for_task(self) -> dict[str, Any]:
        """The service's task once it runs; a task that ends first, or that no node
        takes within task_start_timeout, is a start that failed, with the swarm's words."""
        deadline = time.monotonic() + self.task_start_timeout
        task: dict[str, Any] | None = None
        unplaced_since: float | None = None
        while True:
            tasks = await self.docker.acall("tasks", filters={"service": self.service_id})
            task = max(tasks, key=lambda t: t.get("CreatedAt", ""), default=None)
            status = (task or {}).get("Status", {})
            state = status.get("State", "new")
            if state == "running" and task is not None:
                return task
            now = time.monotonic()
            if state == "pending" and "no suitable node" in str(status.get("Err", "")):
                unplaced_since = unplaced_since or now
            else:
                unplaced_since = None
            unplaceable = (unplaced_since is not None
                           and now - unplaced_since > self.placement_timeout)
            if state in ENDED or now > deadline or unplaceable:
                why = status.get("Err") or status.get("Message") or state
                if state in ENDED:
                    reason = f"its task {state}: {why}"
                elif unplaceable:
                    reason = (f"no node can take it ({why}) for {self.placement_timeout:g}s: "
                              f"lower its mem_limit/cpu_limit (reserved on the node), or "
                              f"add nodes")
                else:
                    reason = f"its task is {state} after {self.task_start_timeout:g}s: {why}"
                output = (await self._start_output()).strip()
                if output:
                    # Bounded: the kernel's own text, going into an HTTP answer.
                    reason += f"; its last output:\n{output[-START_OUTPUT_LIMIT:]}"
                self.record_trip("sandbox", f"swarm task did not start: {reason}")
                msg = f"Kernel {self.kernel_id} could not be started on the swarm: {reason}"
                if state in STARTING or state == "new":
                    raise SandboxUnavailableError(msg)
                raise SandboxStartError(msg, reason=reason)
            await asyncio.sleep(0.2)

    def _task_address(self, task: dict[str, Any], network_id: str) -> str:
        for attachment in task.get("NetworksAttachments") or []:
            if attachment.get("Network", {}).get("ID") == network_id:
                for address in attachment.get("Addresses") or []:
                    return address.split("/")[0]
        msg = f"Kernel {self.kernel_id}: its task has no address on network {network_id}"
        raise SandboxStartError(msg, reason=msg)

    def _start_watching(self) -> None:
        super()._start_watching()
        # This process is alive for the swarm, and reaps the kernels of those that are not.
        presence.start(self.docker, self.server_id, self.host.orphan_grace)

    # -- running ------------------------------------------------------------------------

    async def _task(self) -> dict[str, Any] | None:
        import docker.errors

        if self.task_id is None:
            return None
        try:
            return await self.docker.acall("inspect_task", self.task_id)
        except docker.errors.NotFound:
            return None

    @on_package_loop
    async def poll(self) -> int | None:
        """None while the task runs (on a node still in the swarm); its exit code once it
        ended, -1 when its node left or the task vanished."""
        if self.service_id is None:
            return self.exit_code if self.exit_code is not None else 0
        if self.exit_code is not None:
            return self.exit_code
        if self.task_id is None:
            return None  # its task is being placed and started (_launch)
        task = await self._task()
        if task is None:
            self.exit_code = -1
            self.log.warning("Kernel %s: its task %s is gone", self.kernel_id, self.task_id)
            return self.exit_code
        status = task.get("Status", {})
        state = status.get("State")
        if state in STARTING or state == "running":
            node_state = await self._node_state()
            if node_state in (None, "ready"):
                return None
            self.log.warning("Kernel %s: node %s is %s", self.kernel_id, self.node_id, node_state)
            self.exit_code = -1
            if not self._shutting_down:
                self.record_trip("node", f"node {self.node_id} is {node_state}: the kernel "
                                         "is lost with it")
            return self.exit_code
        self.exit_code = int((status.get("ContainerStatus") or {}).get("ExitCode") or -1)
        self._note_task_exit(status)
        return self.exit_code

    async def _node_state(self) -> str | None:
        import docker.errors

        if not self.node_id:
            return None
        try:
            node = await self.docker.acall("inspect_node", self.node_id)
        except docker.errors.NotFound:
            return "gone"
        return node.get("Status", {}).get("State")

    def _note_task_exit(self, status: dict[str, Any]) -> None:
        self.log.debug("Kernel %s: task %s ended: %s", self.kernel_id, self.task_id, status)
        if self._shutting_down or (self.watchdog is not None and self.watchdog.tripped):
            return
        code = self.exit_code
        if code == 137 and self.limits.mem_limit is not None:
            # The swarm does not report OOM kills; nobody else sends SIGKILL to a task
            # the server did not remove.
            self.record_trip(
                "mem_limit", f"memory limit {self.limits.mem_limit} exceeded: killed "
                f"(exit 137) by its memory cgroup on node {self.node_id}")
            return
        self.exit_reason = (f"task {status.get('State')} with status {code}"
                            f"{': ' + status['Err'] if status.get('Err') else ''}")
        self.log.warning("Kernel %s died: %s", self.kernel_id, self.exit_reason)

    async def _start_output(self) -> str:
        """The task's last output, through the manager (which asks its node)."""
        import docker.errors

        if self.service_id is None:
            return ""
        try:
            chunks = await self.docker.acall("service_logs", self.service_id, stdout=True,
                                             stderr=True, tail=20)
            tail = b"".join(chunks) if not isinstance(chunks, bytes) else chunks
        except docker.errors.APIError:
            return ""  # already removed, or its node is gone
        return tail[-4096:].decode(errors="replace")

    async def _log_container_tail(self) -> None:
        return None

    async def _interrupt_execution(self, verdict: Any, msg_id: str) -> None:
        """exec_timeout: the reason goes to the cell through the proxy (the task cannot
        read the server's notice file), then the interrupt."""
        self.record_trip(verdict.kind, verdict.reason)
        if self.connection is not None:
            await self.connection.proxy.announce(msg_id, f"{verdict.reason}\n")
        await self.send_signal(signal.SIGINT)

    @on_package_loop
    async def send_signal(self, signum: int) -> None:
        """SIGINT: an interrupt_request on control; SIGKILL/SIGTERM: remove the service
        (its task gets SIGTERM, then SIGKILL after the stop grace period)."""
        if self.service_id is None:
            return
        if signum == signal.SIGINT:
            if self.connection is not None:
                await self.connection.proxy.interrupt()
            return
        if signum in (signal.SIGKILL, signal.SIGTERM):
            await self.docker.run(self._remove_service, self.service_id)
            return
        self.log.warning("Kernel %s: signal %d cannot reach a swarm task; ignored",
                         self.kernel_id, signum)

    # -- stop ---------------------------------------------------------------------------

    def _remove_service(self, name_or_id: str) -> bool:
        return remove(self.docker.call, "service", name_or_id)

    def _remove_secret(self, secret: SecretRef) -> None:
        import docker.errors

        # A secret is in use until its task is gone: retry for a moment.
        for _ in range(50):
            try:
                self.docker.call("remove_secret", secret.secret_id)
                return
            except docker.errors.APIError as e:
                if e.status_code == 404:
                    return
                if e.status_code != 400:
                    raise
            time.sleep(0.1)

    async def _cleanup(self, restart: bool) -> None:
        """Remove the service and its secret; unless restarting, also the slots, the
        kernel dir and the registry entry."""
        await self._stop_watching()
        if self.service_id is not None:
            await self.poll()
            await self.docker.run(self._remove_service, self.service_id)
            self.service_id = self.task_id = self.container_id = None
        if self._secret is not None:
            await self.docker.run(self._remove_secret, self._secret)
            self._secret = None
        if restart:
            await self._between_processes()
        else:
            await self._release()

    async def _release(self) -> None:
        # Slots by the kernel's id (an adopted kernel holds them too, unknown here).
        await self.docker.run(slots.release, self.docker.call, self.sandbox_id)
        await self.docker.run(records.remove_record, self.docker.call, self.sandbox_id)
        self._slots = None
        await super()._release()

    @classmethod
    def remove_traces(cls, registry: Any, entry: dict[str, Any]) -> None:
        """The reaper's part for a swarm kernel: its services, secrets and slots, from the
        swarm. Raises if the manager cannot be asked (the entry must stay)."""
        from ..docker.client import DockerSession
        from ..registry import sandbox_of

        session = DockerSession(entry.get("docker_host") or "")
        remove_swarm_traces(session.call, sandbox_of(entry))

    async def get_provisioner_info(self) -> dict[str, Any]:
        info = await super().get_provisioner_info()
        info.update({"service_id": self.service_id, "task_id": self.task_id,
                     "node_id": self.node_id})
        return info

    async def load_provisioner_info(self, provisioner_info: dict) -> None:
        await super().load_provisioner_info(provisioner_info)
        self.service_id = provisioner_info.get("service_id")
        self.task_id = provisioner_info.get("task_id")
        self.node_id = provisioner_info.get("node_id")


def hook_config(call: Any) -> ConfigRef:
    """The Swarm config holding the IPython startup hook of this package version (named
    by its text's hash: made once per swarm, shared by every kernel). Blocking."""
    import docker.errors

    from ..kernel_hook import hook_source

    source = hook_source().encode()
    name = f"limited-provisioner.hook.{hashlib.sha256(source).hexdigest()[:16]}"
    try:
        made = call("create_config", name, source, labels={label("hook"): "1"})
        return ConfigRef(made["ID"], name)
    except docker.errors.APIError as e:
        if e.status_code != 409:
            raise
    found = [c for c in call("configs", filters={"name": name}) if c["Spec"]["Name"] == name]
    if not found:  # removed between the two calls
        return hook_config(call)
    return ConfigRef(found[0]["ID"], name)


def remove_swarm_traces(call: Any, kernel_id: str) -> int:
    """Remove every service and secret labelled with ``kernel_id``, and its slots; how
    many objects went (blocking)."""
    wanted = {"label": f"{label('kernel-id')}={kernel_id}"}
    removed = sum(remove(call, kind, obj["ID"])
                  for kind in ("service", "secret") for obj in call(f"{kind}s", filters=wanted))
    return removed + slots.release(call, kernel_id) + records.remove_record(call, kernel_id)
