"""A start served from the warm pool (pool.py): the claim, step by step.

``claim_pooled(prov, kwargs)`` is what ``LimitedProvisioner.pre_launch`` calls for a start
of a pooled kernelspec: it checks the start can be served from the pool, takes a pooled
kernel, lets the backend give it the start's folder, admits the claimer under the
registry's lock (the pooled entry becomes the claimer's), then makes the pooled kernel's
sandbox, process and proxy the provisioner's own and sets the caller's env and folder in
the kernel. Backends add what is theirs through ``_claim_folder``, ``_sandbox_fields`` and
``_watch_sandbox``.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from jupyter_client.provisioning.provisioner_base import KernelProvisionerBase

from . import held_kernels, kept_files
from . import pool as warm_pool
from .admission import admit
from .client_address import requested_address
from .enforcement import NAMESPACE, NONE, Measure
from .errors import SandboxStartError, WorkspaceError
from .pool import NotClaimable, Pooled
from .registry import process_identity
from .workspace import Workspace


async def _check(prov: Any, kwargs: dict[str, Any]) -> None:
    """Raise NotClaimable if this start needs what a pooled kernel cannot be given."""
    km = prov.parent
    if km is None:
        raise NotClaimable("no manager")
    spec = prov.kernel_spec
    ipykernel = spec is not None and any("ipykernel" in part for part in spec.argv)
    if not ipykernel and (kwargs.get("env") is not None or kwargs.get("cwd")):
        # The claim's env and folder are set by Python code in the kernel.
        raise NotClaimable("not ipykernel")
    if not requested_address(km, "").private:
        raise NotClaimable("client address")  # the proxy's were bound at fill
    key = prov._keep_files_key()
    if key is not None and await asyncio.to_thread(kept_files.waiting, prov.state_dir, *key):
        raise NotClaimable("kept files")  # they go into a new kernel's own dirs


async def claim_pooled(prov: Any, kwargs: dict[str, Any]) -> bool:
    """Serve this start from the warm pool if a pooled kernel fits; False: a cold
    start (its refills wait for it). Raises what admission raises for the claimer."""
    pool = warm_pool.pool_for(prov)
    pool.note_start()
    started = time.monotonic()
    try:
        await _check(prov, kwargs)
        slot = await pool.take(await prov.pool_fingerprint())
        try:
            folder = await prov._claim_folder(slot, kwargs)
        except (NotClaimable, WorkspaceError):
            pool.put_back(slot)  # nothing of the claimer's reached it
            raise
        except BaseException:
            pool._discard(slot, "folder")  # it may hold half a bind of it
            raise
        try:
            await asyncio.to_thread(_admit, prov, slot)
        except BaseException as e:
            if folder is None and not isinstance(e, NotClaimable):
                pool.put_back(slot)  # refused for the claimer: still a good kernel
            else:
                pool._discard(slot, "refused")  # it holds the claimer's folder
            raise
    except NotClaimable as e:
        warm_pool.POOL_CLAIMS.labels(
            kernel_name=pool.kernel_name, result="miss", reason=str(e)).inc()
        pool.cold_starts += 1
        prov._cold_pool = pool
        return False
    try:
        await _take_over(prov, slot, kwargs, folder)
    except Exception as e:
        reason = f"the pooled kernel {slot.kernel_id} could not be claimed: {e}"
        prov.record_trip("sandbox", reason)
        prov._claim_launch = False
        await prov._abandon_start()
        raise SandboxStartError(f"Kernel {prov.kernel_id}: {reason}", reason=reason) from e
    warm_pool.POOL_CLAIMS.labels(kernel_name=pool.kernel_name, result="hit",
                                 reason="").inc()
    warm_pool.POOL_CLAIM_SECONDS.labels(kernel_name=pool.kernel_name).observe(
        time.monotonic() - started)
    prov.log.info("Kernel %s: claimed pooled kernel %s for %r", prov.kernel_id,
                  slot.kernel_id, prov.owner)
    return True


def _admit(prov: Any, slot: Pooled) -> None:
    """Under the registry's lock: admit the claimer (the pooled kernel it becomes
    does not count twice) and turn the pooled entry into the claimer's."""
    sid = slot.kernel_id
    prov._disk_paths = slot.prov._disk_paths
    with prov.registry.lock():
        pooled = prov.registry.read(sid)
        if pooled is None or pooled.get("state") != "pooled":
            raise NotClaimable("taken")
        admit(prov.registry, prov._policy(), kernel_id=prov.kernel_id, owner=prov.owner,
              mem_limit=prov.limits.mem_limit, replacing=sid)
        prov.created = now = time.time()
        entry = {
            **pooled, "kernel_id": prov.kernel_id, "sandbox_id": sid, "state": "running",
            "owner": prov.owner, "server_id": prov.server_id,
            "kernel_name": getattr(prov.parent, "kernel_name", ""), "created": now,
            "last_activity": now, "pooled_at": pooled.get("created"), "claimed": now,
            "server_pid": os.getpid(),
            "server_pid_create_time": process_identity(os.getpid()),
            "limits": prov.limits.to_dict(), "max_lifetime": prov.max_lifetime,
            "labels": dict(prov.labels),
        }
        # The claimer's entry first: a crash in between leaves two entries naming
        # one sandbox (the reaper removes both: their server is gone), never none.
        prov.registry.write(prov.kernel_id, entry)
        prov.registry.remove(sid)


async def _take_over(
    prov: Any, slot: Pooled, kwargs: dict[str, Any], folder: Workspace | None
) -> None:
    """Make the pooled kernel this provisioner's: its sandbox, process and proxy,
    then the caller's env and folder inside it."""
    src = slot.prov
    # First: whatever fails from here on, the claimer's abandoned start ends the kernel.
    for name in prov._sandbox_fields:
        setattr(prov, name, getattr(src, name))
    prov._sandbox_id, prov._pool, prov._claimed = src.sandbox_id, src._pool, True
    held_kernels.let_go(src)
    await src._stop_watching()
    prov._ran = prov._claim_launch = True
    # The pooled kernel's manager goes away without touching what is now ours.
    slot.km._connection_file_written = False
    src.connection = src.kdir = None
    km = prov.parent
    km.load_connection_info(slot.km.get_connection_info())
    assert prov.connection is not None
    prov.connection.point_clients(km)
    km._connection_file_written = True
    prov.connection.traffic.last_activity = time.time()
    cwd = None
    prov.work_folder = folder
    if folder is not None:
        cwd = prov.work_dir = folder.path
        prov.plan.measures["workspace"] = Measure(
            NAMESPACE if folder.uid_map or folder.read_only else NONE, folder.describe())
        prov._baseline = await prov._disk_baseline()
    finalized = (await KernelProvisionerBase.pre_launch(
        prov, env=kwargs.get("env", os.environ)))["env"]
    mine = prov._kernel_env(finalized)
    before = prov._launch_env or {}
    changed = {k: v for k, v in mine.items() if before.get(k) != v}
    gone = sorted(set(before) - set(mine))
    if changed or gone or cwd:
        await warm_pool.run_in_kernel(
            prov.connection.proxy, warm_pool.claim_code(changed, gone, cwd)
        )
        prov._launch_env = {**{k: v for k, v in before.items() if k not in gone},
                            **changed}
    if cwd:
        await asyncio.to_thread(prov.registry.update, prov.kernel_id, work_dir=cwd,
                                launch_cwd=cwd)
