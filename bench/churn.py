"""The seed incident, replayed: many sessions that start a kernel, run one cell and
walk away without shutting anything down.

Each session uses a plain ``AsyncKernelManager`` (as an agent backend would), runs a
cell, then drops every reference. Only the provisioner's own idle culling
(``idle_timeout``) is there to clean up. Prints, per backend: peak live kernels,
what is left after the timeout (registry entries, kernel dirs, cgroups, processes,
containers — target 0), disk used before/after, and this process's RSS before/after
(target growth < 20 MB).

    python bench/churn.py [--sessions 300] [--idle-timeout 3] [--concurrency 4]
                          [--backends process,docker] [--markdown]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import psutil
from jupyter_client.manager import AsyncKernelManager

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo: tests.harness
from limited_provisioner.registry import Registry
from tests.harness import PROVISIONERS, kernel_leftovers, write_kernelspec

OWNER = "lp-churn"


def write_spec(root: Path, backend: str, idle_timeout: float) -> str:
    config = {"mem_limit": "256M", "cpu_limit": 0.5, "idle_timeout": idle_timeout,
              "owner": OWNER, "reap_interval": 0}
    return write_kernelspec(root, f"churn-{backend}", config, PROVISIONERS[backend])


async def session(kernel_name: str, live: set[str], peak: list[int]) -> None:
    km = AsyncKernelManager(kernel_name=kernel_name)
    await km.start_kernel()
    live.add(km.kernel_id)
    peak[0] = max(peak[0], len(live))
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=60)
        await kc.execute_interactive("x = sum(range(10**5))", timeout=60)
    finally:
        kc.stop_channels()
    # ...and walk away: no shutdown_kernel(), no reference kept (the seed's bug).


_ids_seen: set[str] = set()


async def churn(backend: str, args: argparse.Namespace, root: Path) -> dict:
    state = Path(tempfile.mkdtemp(prefix="lp-churn-", dir="/var/lib"))
    os.environ["LIMITED_PROVISIONER_STATE_DIR"] = str(state)
    registry = Registry(state)
    name = write_spec(root, backend, args.idle_timeout)
    # Warm-up: imports, zmq context, docker client... are one-time costs, not growth.
    for _ in range(3):
        await session(name, set(), [0])
    while registry.entries():
        await asyncio.sleep(0.5)
    gc.collect()
    rss_before = psutil.Process().memory_info().rss
    disk_before = shutil.disk_usage("/var/lib").used
    live: set[str] = set()
    peak = [0]
    sem = asyncio.Semaphore(args.concurrency)
    failures = 0
    t0 = time.monotonic()

    async def one() -> None:
        nonlocal failures
        async with sem:
            try:
                await session(name, live, peak)
            except Exception as e:  # counted and shown: a failed session is a finding
                failures += 1
                print(f"session failed: {type(e).__name__}: {e}", file=sys.stderr)

    async def track() -> None:
        while True:
            ids = {e["kernel_id"] for e in registry.entries()}
            _ids_seen.update(ids)
            live.intersection_update(ids)
            peak[0] = max(peak[0], len(ids))
            await asyncio.sleep(0.2)

    tracker = asyncio.ensure_future(track())
    await asyncio.gather(*(one() for _ in range(args.sessions)))
    elapsed = time.monotonic() - t0
    # Wait for the idle timeout to cull the last ones (plus a check interval of slack).
    deadline = time.monotonic() + args.idle_timeout + 30
    while registry.entries() and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    tracker.cancel()
    await asyncio.sleep(1)
    gc.collect()
    left = kernel_leftovers(state, _ids_seen)
    result = {
        "backend": backend,
        "sessions": args.sessions,
        "failed": failures,
        "elapsed_s": round(elapsed, 1),
        "peak_live": peak[0],
        **left,
        "disk_delta_mb": round((shutil.disk_usage("/var/lib").used - disk_before) / 2**20, 1),
        "rss_before_mb": round(rss_before / 2**20, 1),
        "rss_after_mb": round(psutil.Process().memory_info().rss / 2**20, 1),
    }
    shutil.rmtree(state, ignore_errors=True)
    return result


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=300)
    parser.add_argument("--idle-timeout", type=float, default=3)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--backends", default="process,docker")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="lp-churn-specs-"))
    os.environ["JUPYTER_PATH"] = str(root)
    rows = []
    try:
        for backend in args.backends.split(","):
            rows.append(await churn(backend, args, root))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    cols = ["backend", "sessions", "failed", "elapsed_s", "peak_live", "registry entries",
            "kernel dirs", "cgroups", "processes", "containers", "disk_delta_mb",
            "rss_before_mb", "rss_after_mb"]
    if args.markdown:
        print("| " + " | ".join(cols) + " |")
        print("|" + "---|" * len(cols))
        for r in rows:
            print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    else:
        for r in rows:
            print(", ".join(f"{c}={r[c]}" for c in cols))


if __name__ == "__main__":
    asyncio.run(main())
