"""The warm pool (pool_size): claim latency against a cold start, a burst, and hygiene.

* **latency** — start → first ``kernel_info`` reply, claimed (``pool_size=2``, the pool
  full again before each claim) and cold (the same kernelspec without a pool), runs
  interleaved: programmatically (``AsyncKernelManager.start_kernel()`` then a client's
  ``kernel_info``; target claimed p50 <= 30 ms) and through a real jupyter_server
  (``POST /api/kernels`` then ``kernel_info`` over a new WebSocket; target claimed p50
  <= 50 ms, p99 <= 150 ms);
* **burst** — ``--burst`` starts at once with ``pool_size=4``: all must succeed; the
  hits' latency against the misses' (cold starts);
* **hygiene** — ``--hygiene N`` sequential claims across 4 owners, each planting
  canaries (tests/pool_canaries.py) and looking for the previous tenant's, which is kept
  running until then: violations must be 0; each claim's registry owner is checked too.

    python bench/pool.py [--runs 20] [--backends process,docker,runsc] [--burst 20]
                         [--hygiene 0] [--markdown]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from common import p90
from jupyter_client.manager import AsyncKernelManager

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo: tests.harness
from limited_provisioner import pool as warm_pool  # noqa: E402
from limited_provisioner.registry import Registry  # noqa: E402
from tests.harness import (  # noqa: E402
    PROVISIONERS,
    JupyterServer,
    docker_available,
    kernel_leftovers,
    remove_all_kernels,
    replied,
    server_env,
    write_kernelspec,
    ws_request,
)
from tests.pool_canaries import plant_and_check  # noqa: E402

LIMITS = {"mem_limit": "512M", "cpu_limit": 1, "allow_owner_from_start_env": True}
OWNERS = ("alice", "bob", "carol", "dave")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


# "runsc": the docker backend under gVisor, whose slower start the pool hides.
RUNTIMES = {"runsc": {"runtime": "runsc"}}


def write_specs(root: Path, backends: list[str]) -> None:
    for b in backends:
        provisioner = PROVISIONERS["docker" if b in RUNTIMES else b]
        limits = {**LIMITS, **RUNTIMES.get(b, {})}
        write_kernelspec(root, f"cold-{b}", limits, provisioner)
        write_kernelspec(root, f"pool-{b}", {**limits, "pool_size": 2}, provisioner)
        write_kernelspec(root, f"burst-{b}", {**limits, "pool_size": 4}, provisioner)


async def programmatic(name: str, owner: str | None = None) -> tuple[float, AsyncKernelManager]:
    """start_kernel() to a client's first kernel_info reply; with ``owner``, the start
    passes an env of its own (which a claim sets in the kernel: one execution more)."""
    km = AsyncKernelManager(kernel_name=name)
    t0 = time.perf_counter()
    if owner is None:
        await km.start_kernel()
    else:
        await km.start_kernel(env={**os.environ, "LIMITED_PROVISIONER_OWNER": owner})
    kc = km.client()
    kc.start_channels()
    try:
        await kc.kernel_info(reply=True, timeout=60)
        return time.perf_counter() - t0, km
    finally:
        kc.stop_channels()


async def pooled_count(state: Path, name: str) -> int:
    entries = await asyncio.to_thread(Registry(state).entries)
    return sum(1 for e in entries if e.get("state") == "pooled" and e.get("pool_ready")
               and e.get("kernel_name") == name)


async def wait_pooled(state: Path, name: str, n: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while await pooled_count(state, name) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"pool of {name} not refilled to {n} in {timeout:g}s")
        await asyncio.sleep(0.05)


async def latency_programmatic(backend: str, runs: int, state: Path) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"cold": [], "claimed": [], "claimed+env": []}
    pool_name, cold_name = f"pool-{backend}", f"cold-{backend}"
    # Warm the page cache and the pool (the first start of a pooled spec is a miss).
    for name in (cold_name, pool_name):
        _, km = await programmatic(name)
        await km.shutdown_kernel(now=True)
    for _ in range(runs):
        for kind, name, owner in (("claimed", pool_name, None), ("cold", cold_name, None),
                                  ("claimed+env", pool_name, "alice")):
            if name == pool_name:
                await warm_pool.ready(pool_name, timeout=120)
                await asyncio.sleep(0.2)  # the refill's own start settled
            dt, km = await programmatic(name, owner)
            times[kind].append(dt)
            await km.shutdown_kernel(now=True)
    return times


async def latency_server(backend: str, runs: int, root: Path) -> dict[str, list[float]]:
    state = Path(tempfile.mkdtemp(prefix="lp-bench-", dir="/var/lib"))
    workdir = Path(tempfile.mkdtemp(prefix="lp-bench-nb-"))
    server = JupyterServer(workdir, server_env(state, "bench-" + uuid.uuid4().hex[:6],
                                               jupyter_path=root))
    times: dict[str, list[float]] = {"cold": [], "claimed": [], "floor": []}
    pool_name, cold_name = f"pool-{backend}", f"cold-{backend}"

    async def kernel_info(kid: str) -> None:
        msg_id, seen = await ws_request(server.base, kid, "kernel_info_request", {})
        if not replied(msg_id, seen):
            raise RuntimeError(f"kernel {kid} did not answer kernel_info")

    async def one(name: str) -> float:
        t0 = time.perf_counter()
        kid = (await server.api("POST", "/api/kernels", {"name": name}))["id"]
        await kernel_info(kid)
        dt = time.perf_counter() - t0
        # jupyter_server's own floor: the same request on a kernel that already runs.
        t0 = time.perf_counter()
        await kernel_info(kid)
        times["floor"].append(time.perf_counter() - t0)
        await server.api("DELETE", f"/api/kernels/{kid}")
        return dt

    try:
        await server.start()
        await one(cold_name)
        for _ in range(runs):
            await wait_pooled(state, pool_name, 2)
            await asyncio.sleep(0.2)  # the refill's own start settled
            times["claimed"].append(await one(pool_name))
            times["cold"].append(await one(cold_name))
    finally:
        await server.stop(timeout=60)
        shutil.rmtree(workdir, ignore_errors=True)
        remove_all_kernels(state)
    return times


async def burst(backend: str, n: int, state: Path) -> dict[str, list[float]]:
    name = f"burst-{backend}"
    _, km = await programmatic(name)  # creates the pool (a miss)
    await km.shutdown_kernel(now=True)
    await warm_pool.ready(name, timeout=120)
    await asyncio.sleep(0.2)
    before = {e["kernel_id"] for e in Registry(state).entries() if e.get("state") == "pooled"}
    results = await asyncio.gather(*(programmatic(name) for _ in range(n)),
                                   return_exceptions=True)
    out: dict[str, list[float]] = {"hit": [], "miss": [], "failed": []}
    kms = []
    for r in results:
        if isinstance(r, BaseException):
            out["failed"].append(0.0)
            print(f"burst start failed: {r!r}", file=sys.stderr)
            continue
        dt, km = r
        kms.append(km)
        out["hit" if km.provisioner.sandbox_id in before else "miss"].append(dt)
    await asyncio.gather(*(km.shutdown_kernel(now=True) for km in kms))
    return out


async def hygiene(backend: str, claims: int, state: Path) -> tuple[int, int, list[str]]:
    """(claims made, claims served from the pool, violations)."""
    name = f"pool-{backend}"
    violations: list[str] = []
    hits = 0
    prev: tuple[AsyncKernelManager, str] | None = None
    _, km = await programmatic(name)
    await km.shutdown_kernel(now=True)
    for i in range(claims):
        owner = OWNERS[i % len(OWNERS)]
        await warm_pool.ready(name, timeout=120)
        km = AsyncKernelManager(kernel_name=name)
        await km.start_kernel(env={**os.environ, "LIMITED_PROVISIONER_OWNER": owner})
        hits += km.provisioner.sandbox_id != km.kernel_id
        entry = Registry(state).read(km.kernel_id) or {}
        if entry.get("owner") != owner or entry.get("state") != "running":
            violations.append(f"claim {i}: registry says owner {entry.get('owner')!r}, "
                              f"state {entry.get('state')!r}; expected {owner!r}, running")
        kc = km.client()
        kc.start_channels()
        try:
            await kc.wait_for_ready(timeout=60)
            seen = await plant_and_check(kc, f"{i}-{owner}", prev[1] if prev else None)
        finally:
            kc.stop_channels()
        violations += [f"claim {i} ({owner}) saw: {s}" for s in seen["seen"]]
        if prev is not None:
            await prev[0].shutdown_kernel(now=True)
        prev = (km, seen["home"])
        if (i + 1) % 100 == 0:
            print(f"  hygiene {backend}: {i + 1}/{claims}, {len(violations)} violations",
                  file=sys.stderr)
    if prev is not None:
        await prev[0].shutdown_kernel(now=True)
    return claims, hits, violations


def row(label: str, values: list[float]) -> str:
    if not values:
        return f"| {label} | 0 | - | - | - |"
    return (f"| {label} | {len(values)} | {1000 * statistics.median(values):.0f} | "
            f"{1000 * p90(values):.0f} | {1000 * pct(values, 0.99):.0f} |")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--backends", default="process,docker")
    parser.add_argument("--burst", type=int, default=20)
    parser.add_argument("--hygiene", type=int, default=0)
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    backends = [b for b in args.backends.split(",")
                if b == "process" or docker_available()]
    root = Path(tempfile.mkdtemp(prefix="lp-bench-specs-"))
    state = Path(tempfile.mkdtemp(prefix="lp-bench-", dir="/var/lib"))
    os.environ["JUPYTER_PATH"] = str(root)
    os.environ["LIMITED_PROVISIONER_STATE_DIR"] = str(state)
    write_specs(root, backends)
    lines = ["| start → first kernel_info | n | p50 ms | p90 ms | p99 ms |",
             "|---|---:|---:|---:|---:|"]
    extra: list[str] = []
    try:
        for b in backends:
            if not args.skip_latency:
                prog = await latency_programmatic(b, args.runs, state)
                srv = await latency_server(b, args.runs, root)
                lines += [row(f"{b}: cold, start_kernel()", prog["cold"]),
                          row(f"{b}: **claimed**, start_kernel() (target p50 ≤ 30)",
                              prog["claimed"]),
                          row(f"{b}: claimed, start_kernel(env=…) (env set in the kernel)",
                              prog["claimed+env"]),
                          row(f"{b}: cold, REST + WebSocket", srv["cold"]),
                          row(f"{b}: **claimed**, REST + WebSocket (target p50 ≤ 50, "
                              f"p99 ≤ 150)", srv["claimed"]),
                          row(f"{b}: jupyter_server's floor: a new WebSocket + kernel_info "
                              f"to a running kernel", srv["floor"])]
            if args.burst:
                out = await burst(b, args.burst, state)
                lines += [row(f"{b}: burst of {args.burst}, pool_size=4: hits", out["hit"]),
                          row(f"{b}: burst of {args.burst}: misses (cold)", out["miss"])]
                extra.append(f"{b} burst: {len(out['hit'])} hits, {len(out['miss'])} misses, "
                             f"{len(out['failed'])} failed")
            if args.hygiene:
                made, hits, bad = await hygiene(b, args.hygiene, state)
                extra.append(f"{b} hygiene: {made} claims across {len(OWNERS)} owners "
                             f"({hits} from the pool): {len(bad)} saw an earlier tenant")
                for v in bad[:10]:
                    extra.append(f"  {v}")
    finally:
        await warm_pool.drain_all()
        left = {k: v for k, v in kernel_leftovers(state).items() if v}
        extra.append(f"left behind after the last shutdown and the pools' drain: "
                     f"{left or 'nothing'}")
        remove_all_kernels(state)
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(state, ignore_errors=True)
    print("\n".join(lines if args.markdown else [
        line.replace("|", " ").replace("**", "") for line in lines]))
    for line in extra:
        print(("- " if args.markdown else "") + line)


if __name__ == "__main__":
    asyncio.run(main())
