"""jupyter_server integration: 429 for refused starts, re-adoption after a restart.

Selected by the server extension this package enables at install time
(``ServerApp.kernel_manager_class``). For stock kernels it changes little: it translates
this package's exceptions, only adopts kernels in our registry, and keeps a kernel's
activity state right across automatic restarts (which limit kills make routine).
"""

from __future__ import annotations

import asyncio
import copy
import time
from typing import Any, ClassVar

from jupyter_client.kernelspec import NoSuchKernel
from jupyter_server.services.kernels.kernelmanager import AsyncMappingKernelManager
from tornado import web
from traitlets import Bool

from .. import _jupyter_internals as internals
from .. import pool as warm_pool
from ..errors import (
    AdoptionError,
    KernelLimitError,
    LimitConfigError,
    SandboxStartError,
    SandboxUnavailableError,
)
from ..host import LimitedHost
from ..provisioner import LimitedProvisioner
from ..reaper import reap
from ..recovery import adopt


class KernelSpecs:
    """The kernelspecs one adoption sweep has looked up, by name: each is searched for
    once, and every manager gets its own copy (as a fresh lookup would give it)."""

    def __init__(self) -> None:
        self._found: dict[str, Any] = {}

    def preset(self, km: Any) -> None:
        name = km.kernel_name
        if not name:
            return
        spec = self._found.get(name)
        if spec is None:
            try:
                spec = self._found[name] = km.kernel_spec
            except (NoSuchKernel, OSError, ValueError):  # removed or broken since: adopt()
                # goes on without it, as before
                return
        else:
            internals.preset_kernel_spec(km, type(spec)(
                resource_dir=spec.resource_dir, **copy.deepcopy(spec.to_dict())
            ))


class LimitedMappingKernelManager(AsyncMappingKernelManager):
    """AsyncMappingKernelManager that re-adopts its running limited kernels on start and
    answers refused starts with 429/400/503, never 500."""

    adopt_on_start = Bool(
        True,
        help="""At server start, re-adopt the running limited kernels this server
        (server_id) started before it died, under their original kernel ids.""",
    ).tag(config=True)

    adopt_all = Bool(
        False,
        help="""Adopt every orphaned limited kernel on the host, whichever server started
        it (single-tenant hosts). Kernels managed by another live server are never
        adopted.""",
    ).tag(config=True)

    keep_kernels_on_exit = Bool(
        False,
        help="""On a clean server stop, leave limited kernels running (for a deploy) so the
        next start re-adopts them. Default false: they are shut down as usual.""",
    ).tag(config=True)

    # Strong references to tasks started from sync callbacks (releases, re-watches).
    _background_tasks: ClassVar[set[asyncio.Future]] = set()

    @property
    def host(self) -> LimitedHost:
        return LimitedHost.instance(config=self.config)

    async def start_kernel(self, *args: Any, **kwargs: Any) -> str:
        existing = kwargs.get("kernel_id") in internals.managed_kernels(self)
        try:
            try:
                kernel_id = await super().start_kernel(*args, **kwargs)
            finally:
                internals.forget_failed_starts(self)
        except KernelLimitError as e:
            # 429: the caller may retry once a kernel is gone or the rate window passed.
            raise web.HTTPError(429, str(e), reason="Kernel limit reached") from e
        except LimitConfigError as e:
            raise web.HTTPError(400, str(e), reason="Invalid kernel limits") from e
        except SandboxStartError as e:
            # Released already, never registered: no restarter will try it again.
            raise web.HTTPError(503, str(e), reason="Kernel failed to start") from e
        except SandboxUnavailableError as e:
            raise web.HTTPError(503, str(e), reason="Kernel sandbox unavailable") from e
        if not existing:
            self._watch_auto_restarts(kernel_id)
            km = internals.managed_kernels(self).get(kernel_id)
            provisioner = getattr(km, "provisioner", None)
            if getattr(provisioner, "_claimed", False):
                # A claimed pooled kernel started long ago: it will say "starting" on
                # IOPub no more, and a client's first connection would wait for it.
                km.execution_state = "idle"
                # Its first connection would also ask it kernel_info over a shell
                # connection of its own (~5 ms of the claim); the pool asked at the fill.
                if provisioner.protocol_version:
                    internals.preset_kernel_info(
                        km, {"protocol_version": provisioner.protocol_version})
        return kernel_id

    def _watch_auto_restarts(self, kernel_id: str) -> None:
        self.add_restart_callback(kernel_id, lambda: self._handle_auto_restart(kernel_id))

    def _handle_auto_restart(self, kernel_id: str) -> None:
        """The auto-restarter is about to replace a dead kernel process.

        jupyter_server keeps the ``execution_state`` the dead process left -- "busy" when
        a limit killed it mid-cell -- and keeps watching activity on its old ports. A
        reconnecting websocket then skips its "nudge" (busy kernels are not nudged), so
        the new process may publish the next cell's output before the connection's IOPub
        socket is subscribed: the output is lost and the cell stays at [*]. Mark the
        kernel "starting", as jupyter_server does for a restart it was asked for, and
        re-watch activity if the new process got new ports.
        """
        km = internals.managed_kernels(self).get(kernel_id)
        if km is None:
            return
        km.execution_state = "starting"
        task = asyncio.ensure_future(
            self._rewatch_activity(kernel_id, km, km.ready, list(km.ports))
        )
        self._background_tasks.add(task)
        task.add_done_callback(self._background_tasks.discard)

    async def _rewatch_activity(
        self, kernel_id: str, km: Any, old_ready: Any, old_ports: list[int]
    ) -> None:
        """Once the restarted process is up, watch its IOPub if its ports changed."""
        deadline = time.monotonic() + self.kernel_info_timeout
        while True:
            await asyncio.sleep(0.05)
            if internals.managed_kernels(self).get(kernel_id) is not km or (
                time.monotonic() > deadline
            ):
                return
            ready = km.ready
            if ready is not old_ready and ready.done() and km.has_kernel:
                break
        if ready.cancelled() or ready.exception() is not None:
            return  # this attempt failed; the restarter tries again (and calls us again)
        if list(km.ports) != old_ports:
            self.stop_watching_activity(kernel_id)
            km.execution_state = "starting"
            self.start_watching_activity(kernel_id)

    def _handle_kernel_died(self, kernel_id: str) -> None:
        """After its auto-restarts failed, jupyter_server only forgets a kernel; also
        release what the provisioner holds for it (registry entry, kernel dir, cgroups,
        container), which the reaper leaves alone while this server lives."""
        km = internals.managed_kernels(self).get(kernel_id)
        super()._handle_kernel_died(kernel_id)
        if km is not None and isinstance(km.provisioner, LimitedProvisioner):
            task = asyncio.ensure_future(km.cleanup_resources(restart=False))
            self._background_tasks.add(task)
            task.add_done_callback(self._background_tasks.discard)

    async def shutdown_kernel(
        self, kernel_id: str, now: bool = False, restart: bool = False
    ) -> Any:
        """Shut a kernel down once no (re)start of it is in flight.

        A DELETE that lands while the auto-restarter replaces a kernel a limit just killed
        would otherwise race the restart inside jupyter_client (both settle the manager's
        ``ready`` future: InvalidStateError, HTTP 500) and leave the new process running,
        managed by nobody.
        """
        km = internals.managed_kernels(self).get(kernel_id)
        if km is not None:
            deadline = time.monotonic() + self.kernel_info_timeout
            while not km.ready.done() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        return await super().shutdown_kernel(kernel_id, now=now, restart=restart)

    async def adopt_kernels(self) -> list[str]:
        """Adopt this server's running kernels concurrently; returns their ids.

        Dead kernels of this server are removed (one log line each); a kernel that
        cannot be reached is shut down rather than left unmanaged.
        """
        host = self.host
        registry = host.registry
        # Orphans first (e.g. a start our previous process was killed in the middle of),
        # then the reaper for the server's whole life, kernels or not.
        try:
            await asyncio.to_thread(
                reap, registry, all_servers=True, orphan_grace=host.orphan_grace
            )
        except Exception:  # adoption matters more than one failed sweep
            self.log.exception("Reaping orphans at start failed")
        host.start_reaper(lasting=True)
        server_id = host.resolved_server_id
        await self._restore_swarm_entries(server_id)
        entries = [
            e for e in await asyncio.to_thread(registry.entries)
            if self.adopt_all or e.get("server_id") == server_id
        ]

        specs = KernelSpecs()

        async def one(entry: dict[str, Any]) -> str | None:
            kid = entry.get("kernel_id", "")
            if kid in internals.managed_kernels(self):
                return None
            try:
                await self._adopt(kid, entry, specs)
            except AdoptionError as e:
                if e.reason == "dead":
                    self.log.info("Kernel %s died while the server was down; removed", kid)
                elif e.reason != "managed":  # another live server's: not ours to report
                    self.log.warning("Not adopting kernel %s: %s", kid, e)
                return None
            except Exception:
                self.log.exception("Adopting kernel %s failed", kid)
                return None
            return kid

        adopted = [k for k in await asyncio.gather(*(one(e) for e in entries)) if k]
        if adopted:
            self.log.info("Adopted %d running limited kernel(s): %s", len(adopted), adopted)
        return adopted

    async def _restore_swarm_entries(self, server_id: str) -> None:
        """Registry entries for this server's swarm kernels that this host's registry
        lacks (restarted in a new container or on another node): from their records in
        the swarm (swarm/records.py)."""
        from ..swarm import records

        try:
            specs = await asyncio.to_thread(self.kernel_spec_manager.get_all_specs)
            daemons = records.swarm_daemons(specs)
            if not daemons:
                return
            restored = await asyncio.to_thread(
                records.restore_from_swarm, self.host.registry, server_id, daemons)
        except Exception:  # the kernels stay in the swarm: a later start may succeed
            self.log.exception("Reading this server's swarm kernels from the swarm failed")
            return
        if restored:
            self.log.info("Found %d swarm kernel(s) of this server in the swarm: %s",
                          len(restored), restored)

    async def _adopt(
        self, kernel_id: str, entry: dict[str, Any], specs: KernelSpecs | None = None
    ) -> None:
        from jupyter_server._tz import utcnow

        specs = specs or KernelSpecs()

        def factory(**kwargs: Any) -> Any:
            # The server's kernelspec manager, as for the kernels it starts itself.
            km = self.kernel_manager_factory(
                parent=self, log=self.log, kernel_spec_manager=self.kernel_spec_manager,
                **kwargs,
            )
            specs.preset(km)
            return km

        km = await adopt(
            kernel_id, state_dir=self.host.resolved_state_dir, factory=factory, entry=entry,
            server_id=self.host.resolved_server_id,
        )
        km.execution_state = "idle"
        km.reason = ""
        km.last_activity = utcnow()
        internals.register_adopted(self, kernel_id, km)
        self.start_watching_activity(kernel_id)
        self.add_restart_callback(kernel_id, lambda: self._handle_kernel_died(kernel_id), "dead")
        self._watch_auto_restarts(kernel_id)

    async def warm_pools(self) -> list[str]:
        """Fill the warm pool of every kernelspec that has one (pool_size > 0) before
        anybody asks for a kernel; returns their names."""
        names = []
        specs = await asyncio.to_thread(self.kernel_spec_manager.find_kernel_specs)
        for name in sorted(specs):
            try:
                km = self.kernel_manager_factory(parent=self, log=self.log, kernel_name=name)
                if await warm_pool.warm(km) is not None:
                    names.append(name)
            except Exception:  # a broken kernelspec must not stop the others' pools
                self.log.exception("Warm pool of kernelspec %s not started", name)
        if names:
            self.log.info("Warm pools filling for: %s", ", ".join(names))
        return names

    async def shutdown_all(self, now: bool = False) -> None:
        # Pooled kernels are nobody's: they go whatever happens to the others.
        await warm_pool.drain_all()
        if not self.keep_kernels_on_exit:
            await super().shutdown_all(now=now)
            return
        for kid, km in list(internals.managed_kernels(self).items()):
            if isinstance(km.provisioner, LimitedProvisioner):
                await km.provisioner.detach()
                self.log.info("Leaving kernel %s running for the next server start", kid)
            else:
                await self.shutdown_kernel(kid, now=now)
