"""The warm pool: limited kernels started ahead of demand, claimed by the next start.

One pool per kernelspec (``pool_size`` > 0) in the process that starts its kernels — a
server, a script, an agent backend. A pooled kernel is a whole limited kernel, sandbox
and limits included, started by a manager of the pool's own under an id of its own,
registered with state ``pooled`` and owner :data:`POOL_OWNER`; nobody's yet. A start
of that kernelspec *claims* one (``LimitedProvisioner._claim_pooled``): its provisioner
takes the pooled kernel's sandbox over — the sandbox keeps its name (``sandbox_id``),
the kernel takes the id its manager chose, its owner, labels, admission (the claim is a
start for caps and start rates), the caller's environment and folder. A claimed kernel
is never given back: it is shut down after use, as any other.

What keeps a claim clean is that nothing was ever run in a pooled kernel: every claim
gets a kernel whose uid, dirs, /tmp, /dev/shm, cgroups and processes are its own and new.
What keeps it current is the fingerprint: the kernelspec, the settings that shape the
sandbox and (Docker) the image's id, compared at every claim and every few seconds — a
change drains the pool instead of handing out a stale kernel.

Refills start ``pool_refill_delay`` after the last start of the kernelspec, one at a
time, so they never compete with a start somebody waits for.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from ._background import bridged

log = logging.getLogger(__name__)

# The owner of pooled kernels in the registry and on their containers.
POOL_OWNER = "(pool)"
# Caps a pooled kernel gives way to: a user's start evicts one rather than being refused.
EVICTABLE = ("max_kernels", "mem_budget")
# Seconds between two checks of a pool's fingerprint and of its kernels being alive.
CHECK_INTERVAL = 2.0
# Longest wait after a failed refill (it doubles from 1 s).
MAX_BACKOFF = 60.0
# Seconds a pool does not refill after one of its kernels was evicted for a user.
EVICTION_HOLD = 10.0
# A protocol version as a kernel sends it ("5.3"): anything else is not passed on.
PROTOCOL_VERSION = re.compile(r"[0-9]{1,3}\.[0-9]{1,3}(\.[0-9]{1,3})?")
# Settings that say who a kernel is for or how many there may be, not what it is: the
# claim sets them, so they are not part of a pool's fingerprint.
NOT_FINGERPRINTED = frozenset({
    "owner", "owner_env", "allow_owner_from_start_env", "labels", "workspace",
    "private_work_dir", "pool_size", "pool_refill_delay", "max_kernels",
    "max_kernels_per_user", "mem_budget", "mem_budget_fraction", "min_free_disk",
    "max_starts_per_minute", "keep_files_for", "keep_files_label", "kept_files_budget",
    "server_id", "reap_interval", "log_level",
})

POOL_SIZE = Gauge(
    "limited_provisioner_pool_kernels",
    "Pooled kernels ready to be claimed, by kernelspec",
    ["kernel_name"],
)
POOL_CLAIMS = Counter(
    "limited_provisioner_pool_claims",
    "Starts of a pooled kernelspec: hit (a pooled kernel was claimed) or miss (cold "
    "start), with why it missed",
    ["kernel_name", "result", "reason"],
)
POOL_CLAIM_SECONDS = Histogram(
    "limited_provisioner_pool_claim_seconds",
    "Seconds from a start's admission to its claimed kernel being ready",
    ["kernel_name"],
    buckets=(0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.5, 1),
)
POOL_REFILLS = Counter(
    "limited_provisioner_pool_refills",
    "Pooled kernels started (ok), or refills that failed (error) or were refused by a "
    "cap (refused)",
    ["kernel_name", "result"],
)
POOL_DRAINS = Counter(
    "limited_provisioner_pool_drains",
    "Pooled kernels shut down without being claimed, by why",
    ["kernel_name", "reason"],
)


class NotClaimable(Exception):
    """This start cannot be served from the pool (the reason is the miss's label)."""


def fingerprint(parts: dict[str, Any]) -> str:
    """A digest of what makes two kernels interchangeable."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def settings_of(prov: Any) -> dict[str, Any]:
    """The provisioner's settings that shape the kernel (see NOT_FINGERPRINTED)."""
    return {
        name: getattr(prov, name)
        for name in sorted(prov.traits(config=True))
        if name not in NOT_FINGERPRINTED
    }


@dataclass
class Pooled:
    """One pooled kernel: the manager that started it and its provisioner."""

    km: Any
    prov: Any
    fingerprint: str

    @property
    def kernel_id(self) -> str:
        return str(self.prov.kernel_id)


class KernelPool:
    """The pooled kernels of one kernelspec in this process (on the package's loop)."""

    def __init__(self, key: tuple[str, str, str], template: dict[str, Any], size: int,
                 refill_delay: float):
        self.kernel_name = key[1]
        # What a manager of a pooled kernel is made of: the first claimer's kernel
        # name, kernelspec manager and config.
        self.template = template
        self.size = size
        self.refill_delay = refill_delay
        self.ready: collections.deque[Pooled] = collections.deque()
        self.fingerprint: str | None = None
        self.starting = 0  # pooled kernels being started now
        self.cold_starts = 0  # starts of the kernelspec that missed, in progress
        self.last_start = 0.0
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._backoff = 0.0
        self._closed = False
        self._drain_task: asyncio.Task | None = None
        self._shutting: set[asyncio.Task] = set()

    # -- claims --------------------------------------------------------------------------

    def note_start(self) -> None:
        self.last_start = time.monotonic()

    async def take(self, wanted: str) -> Pooled:
        """A live pooled kernel with fingerprint ``wanted``; raises NotClaimable."""
        if self.fingerprint is not None and wanted != self.fingerprint:
            self.fingerprint = wanted
            # In the background: the start that noticed is a cold start, now.
            self._drain_task = asyncio.ensure_future(self.drain("changed"))
            raise NotClaimable("changed")
        self.fingerprint = wanted
        while self.ready:
            slot = self.ready.popleft()
            self._gauge()
            if slot.fingerprint != wanted:
                self._discard(slot, "changed")
                continue
            if not await slot.prov.pooled_alive():
                self._discard(slot, "died")
                continue
            return slot
        raise NotClaimable("empty")

    def put_back(self, slot: Pooled) -> None:
        """A claim that was refused (a cap of the claimer's) leaves the kernel pooled."""
        self.ready.appendleft(slot)
        self._gauge()

    def _gauge(self) -> None:
        POOL_SIZE.labels(kernel_name=self.kernel_name).set(len(self.ready))

    # -- filling ---------------------------------------------------------------------------

    def wake(self) -> None:
        """Look at the pool soon (a start happened, a setting changed)."""
        if self._closed:
            return
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._keep_filled())
        self._wake.set()

    async def _keep_filled(self) -> None:
        while not self._closed:
            try:
                await self._fill_round()
            except asyncio.CancelledError:
                raise
            except Exception:  # the next round may do better; never end the loop
                log.exception("Pool of %s: refill round failed", self.kernel_name)
                await asyncio.sleep(CHECK_INTERVAL)

    async def _fill_round(self) -> None:
        next_check = 0.0
        while not self._closed:
            loop_now = time.monotonic()
            if loop_now >= next_check:
                next_check = loop_now + CHECK_INTERVAL
                await self._check()
            wait = CHECK_INTERVAL
            if len(self.ready) + self.starting < self.size:
                quiet = self.last_start + self.refill_delay + self._backoff - loop_now
                if quiet <= 0 and self.cold_starts == 0:
                    await self._start_one()
                    continue
                wait = max(0.05, min(wait, quiet if quiet > 0 else 0.1))
            self._wake.clear()
            if self._closed:
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)

    async def _check(self) -> None:
        """Drain the pool if its kernelspec changed; drop pooled kernels that died."""
        try:
            current = await self._current_fingerprint()
        except Exception as e:  # noqa: BLE001 - the kernelspec is gone, say: drain
            log.warning("Pool of %s: its kernelspec cannot be read (%s); draining it",
                        self.kernel_name, e)
            current = None
        if self.fingerprint is not None and current != self.fingerprint:
            self.fingerprint = current
            await self.drain("changed")
            if current is None:
                self.close()
                return
        self.fingerprint = current
        for slot in list(self.ready):
            if await slot.prov.poll() is not None:
                with contextlib.suppress(ValueError):
                    self.ready.remove(slot)
                self._discard(slot, "died")
        self._gauge()

    async def _current_fingerprint(self) -> str:
        """The fingerprint a claim would have now: a provisioner built as a start would
        build it (kernelspec read again), never started."""
        from jupyter_client.provisioning import KernelProvisionerFactory as KPF

        km = self._manager()
        spec = await asyncio.to_thread(
            km.kernel_spec_manager.get_kernel_spec, self.kernel_name
        )
        km._kernel_spec = spec
        prov = KPF.instance(parent=km.parent).create_provisioner_instance(
            "pool-probe", spec, parent=km
        )
        return await prov.pool_fingerprint()

    def _manager(self) -> Any:
        from jupyter_client.manager import AsyncKernelManager

        return AsyncKernelManager(**self.template)

    async def _start_one(self) -> None:
        from .errors import KernelLimitError

        self.starting += 1
        km = self._manager()
        try:
            await km.start_kernel(limited_pool=self)
        except KernelLimitError as e:
            POOL_REFILLS.labels(kernel_name=self.kernel_name, result="refused").inc()
            self._back_off()
            log.info("Pool of %s: not refilled: %s", self.kernel_name, e)
            return
        except Exception:
            POOL_REFILLS.labels(kernel_name=self.kernel_name, result="error").inc()
            self._back_off()
            log.exception("Pool of %s: a pooled kernel failed to start", self.kernel_name)
            return
        finally:
            self.starting -= 1
        # Nobody's kernel: no restarter (a pooled kernel that dies is dropped, not
        # restarted), no control socket until a claim.
        km.stop_restarter()
        km._close_control_socket()
        slot = Pooled(km, km.provisioner, km.provisioner.pool_fp)
        try:
            # IPython's first execution costs ~25 ms (compiler, hooks): paid now, not by
            # the claim that runs its env and folder in the kernel, nor the first cell.
            await run_in_kernel(slot.prov.connection.proxy, "None")
            slot.prov.protocol_version = await protocol_version_of(slot.prov.connection.proxy)
            # What `limited-provisioner list` and outside waiters go by: claimable now.
            await asyncio.to_thread(slot.prov.registry.update, slot.kernel_id,
                                    pool_ready=time.time())
        except Exception as e:  # noqa: BLE001 - a kernel that cannot run it is no good
            log.warning("Pool of %s: pooled kernel %s dropped: %s", self.kernel_name,
                        slot.kernel_id, e)
            self._discard(slot, "broken")
            return
        self._backoff = 0.0
        POOL_REFILLS.labels(kernel_name=self.kernel_name, result="ok").inc()
        if self._closed or slot.fingerprint != self.fingerprint:
            self._discard(slot, "stopped" if self._closed else "changed")
            return
        self.ready.append(slot)
        self._gauge()

    def _back_off(self) -> None:
        self._backoff = min(MAX_BACKOFF, max(1.0, self._backoff * 2))

    # -- draining ------------------------------------------------------------------------

    def _discard(self, slot: Pooled, reason: str) -> asyncio.Task:
        POOL_DRAINS.labels(kernel_name=self.kernel_name, reason=reason).inc()
        task = asyncio.ensure_future(_shut_down(slot, reason))
        # Kept until done: stop() waits for every shutdown it started.
        self._shutting.add(task)
        task.add_done_callback(self._shutting.discard)
        return task

    async def drain(self, reason: str) -> None:
        """Shut every pooled kernel down (they are nobody's: nothing is lost)."""
        slots = list(self.ready)
        self.ready.clear()
        self._gauge()
        if slots:
            log.info("Pool of %s: %d pooled kernels shut down (%s)", self.kernel_name,
                     len(slots), reason)
        await asyncio.gather(*(self._discard(s, reason) for s in slots))

    async def evict_one(self) -> bool:
        """Shut one pooled kernel down to make room for a user's start (and hold the
        refills back: the room is the user's)."""
        self._backoff = max(self._backoff, EVICTION_HOLD)
        self.note_start()
        if not self.ready:
            return False
        await self._discard(self.ready.pop(), "evicted")
        self._gauge()
        return True

    def close(self) -> None:
        """No more refills (one being started finishes, then is shut down)."""
        self._closed = True
        self._wake.set()

    async def stop(self, reason: str) -> None:
        """Close the pool and shut down every kernel it holds or is starting; returns
        once they are gone. Never cancels a start midway (that would leave a kernel
        nobody holds)."""
        self.close()
        if self._task is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await self._task
        await self.drain(reason)
        if self._shutting:
            await asyncio.gather(*self._shutting, return_exceptions=True)


async def _shut_down(slot: Pooled, reason: str) -> None:
    try:
        await slot.km.shutdown_kernel(now=True)
    except Exception:
        log.exception("Pooled kernel %s: shutdown (%s) failed", slot.kernel_id, reason)


# -- the pools of this process ---------------------------------------------------------------

_pools: dict[tuple[str, str, str], KernelPool] = {}


def pool_key(prov: Any) -> tuple[str, str, str]:
    return str(prov.state_dir), str(getattr(prov.parent, "kernel_name", "") or ""), prov.backend


def pool_for(prov: Any) -> KernelPool:
    """The pool of ``prov``'s kernelspec, made on first use from its manager."""
    key = pool_key(prov)
    pool = _pools.get(key)
    if pool is None or pool._closed:
        km = prov.parent
        template = {
            "kernel_name": key[1], "kernel_spec_manager": km.kernel_spec_manager,
            "config": km.config,
        }
        pool = _pools[key] = KernelPool(key, template, prov.pool_size, prov.pool_refill_delay)
    pool.size, pool.refill_delay = prov.pool_size, prov.pool_refill_delay
    return pool


def pools() -> list[KernelPool]:
    return [p for p in _pools.values() if not p._closed]


async def evict_for(limit: str) -> bool:
    """Make room for a user's start refused by ``limit`` (one of EVICTABLE): shut down
    one pooled kernel, the fullest pool's first. False if there is none."""
    if limit not in EVICTABLE:
        return False
    for pool in sorted(pools(), key=lambda p: -len(p.ready)):
        if await pool.evict_one():
            return True
    return False


async def drain_all(reason: str = "stopped") -> None:
    """Shut down every pooled kernel of this process (a server stopping)."""
    await bridged(_drain_all(reason))


async def _drain_all(reason: str) -> None:
    stopping = list(_pools.values())
    _pools.clear()
    await asyncio.gather(*(pool.stop(reason) for pool in stopping))


async def warm(km: Any) -> KernelPool | None:
    """Fill the pool of ``km``'s kernelspec now, without starting a kernel for anyone:
    a server warms its pools at startup. None if the kernelspec has no pool (or is not
    a limited one)."""
    return await bridged(_warm(km))


async def _warm(km: Any) -> KernelPool | None:
    from jupyter_client.provisioning import KernelProvisionerFactory as KPF

    prov = KPF.instance(parent=km.parent).create_provisioner_instance(
        "pool-probe", km.kernel_spec, parent=km
    )
    if getattr(prov, "pool_size", 0) <= 0:
        return None
    pool = pool_for(prov)
    pool.fingerprint = await prov.pool_fingerprint()
    pool.wake()
    return pool


async def ready(kernel_name: str | None = None, timeout: float = 60) -> None:
    """Wait until the pools (of ``kernel_name``) are full; for tests and benchmarks."""
    deadline = time.monotonic() + timeout
    while True:
        waiting = [p for p in pools() if kernel_name in (None, p.kernel_name)
                   and len(p.ready) < p.size]
        if not waiting:
            return
        if time.monotonic() > deadline:
            names = ", ".join(f"{p.kernel_name} {len(p.ready)}/{p.size}" for p in waiting)
            raise TimeoutError(f"pools not full after {timeout:g}s: {names}")
        await asyncio.sleep(0.05)


def _forget_after_fork() -> None:
    _pools.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


# -- the claim's work inside the kernel ---------------------------------------------------------


def claim_code(set_env: dict[str, str], unset: list[str], cwd: str | None) -> str:
    """One silent statement that gives a pristine pooled kernel the claimer's env and
    folder, leaving no name behind in its namespace."""
    parts = []
    if set_env:
        parts.append(f"_os.environ.update({set_env!r})")
    if unset:
        parts.append(f"[_os.environ.pop(k, None) for k in {unset!r}]")
    if cwd:
        parts.append(f"_os.chdir({cwd!r})")
    session = set_env.get("JPY_SESSION_NAME")
    if session:
        # What ipykernel does with it at start (ipkernel.py): the notebook's path.
        parts.append(f"get_ipython().user_ns.__setitem__('__session__', {session!r})")
    return f"(lambda _os: ({', '.join(parts)},))(__import__('os'))"


async def run_in_kernel(proxy: Any, code: str, timeout: float = 10.0) -> None:
    """Execute ``code`` silently in the kernel behind ``proxy`` over a shell connection
    of the server's own (the proxy's clients never see it); raises RuntimeError unless
    it ran without error."""
    content = await _ask(proxy, "execute_request", {
        "code": code, "silent": True, "store_history": False, "user_expressions": {},
        "allow_stdin": False, "stop_on_error": False,
    }, timeout)
    if content.get("status") != "ok":
        raise RuntimeError(
            f"the claim failed in the kernel: {content.get('ename')}: {content.get('evalue')}"
        )


async def protocol_version_of(proxy: Any, timeout: float = 10.0) -> str | None:
    """The messaging protocol version a pristine pooled kernel says it speaks (None if
    it says nothing usable): what jupyter_server would otherwise ask it on the claimed
    kernel's first WebSocket (server/manager.py presets it)."""
    version = (await _ask(proxy, "kernel_info_request", {}, timeout)).get("protocol_version")
    return version if isinstance(version, str) and PROTOCOL_VERSION.fullmatch(version) else None


async def _ask(proxy: Any, msg_type: str, content: dict[str, Any],
               timeout: float) -> dict[str, Any]:
    """One request on a shell connection of the server's own to the kernel behind
    ``proxy``; the reply's content. RuntimeError if none came within ``timeout`` s."""
    import zmq
    from jupyter_client.session import Session

    from .proxy import PORTS, zmq_context

    session = Session(key=proxy.key, signature_scheme=proxy.signature_scheme)
    sock = zmq_context().socket(zmq.DEALER)
    sock.linger = 0
    try:
        sock.connect(f"ipc://{proxy.kernel_prefix}-{PORTS['shell']}")
        msg = session.msg(msg_type, content)
        session.send(sock, msg)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not await sock.poll(left * 1000):
                raise RuntimeError(f"no answer to {msg_type} in {timeout:g}s")
            frames = await sock.recv_multipart()
            _, frames = session.feed_identities(frames)
            reply = session.deserialize(frames)
            if reply["parent_header"].get("msg_id") == msg["header"]["msg_id"]:
                return dict(reply["content"])
    finally:
        sock.close(linger=0)
