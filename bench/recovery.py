"""Recovery time: a jupyter_server with 20 live limited kernels is SIGKILLed and started
again; measured is the time from spawning the new server to all 20 kernels listed under
their old ids *and* answering ``kernel_info`` over the WebSocket (target < 3 s). The
same server starting with no kernels is the floor, measured in the same run. Also: when
the kernels were listed (the server adopts them before it serves), and the CPU seconds
the new server used until all answered (the share of a busy machine's noise it is not).

    python bench/recovery.py [--kernels 20] [--rounds 3] [--backends process,docker] [--markdown]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo: tests.harness
from tests.harness import (
    PROVISIONERS,
    JupyterServer,
    remove_all_kernels,
    replied,
    server_env,
    write_kernelspec,
    ws_request,
)


async def kernel_info(server: JupyterServer, kernel_id: str) -> None:
    """A kernel_info request over the kernel's WebSocket, answered."""
    msg_id, seen = await ws_request(server.base, kernel_id, "kernel_info_request", {},
                                    timeout=30)
    if not replied(msg_id, seen):
        raise RuntimeError(f"kernel {kernel_id} restarted instead of answering kernel_info")


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


async def one_round(backend: str, n: int, root: Path) -> tuple[float, float, float, float]:
    state = Path(tempfile.mkdtemp(prefix="lp-bench-", dir="/var/lib"))
    env = server_env(state, "bench-" + uuid.uuid4().hex[:6], jupyter_path=root)
    workdir = Path(tempfile.mkdtemp(prefix="lp-bench-nb-"))
    server = JupyterServer(workdir, env)
    try:
        floor = await server.start()
        ids = []
        for _ in range(n):
            ids.append((await server.api("POST", "/api/kernels", {"name": f"b-{backend}"}))["id"])
        await asyncio.gather(*(kernel_info(server, k) for k in ids))
        server.kill9()
        await server.start()
        listed = {k["id"] for k in await server.api("GET", "/api/kernels")}
        listed_at = time.perf_counter() - server.spawned_at
        if listed != set(ids):
            raise RuntimeError(f"adopted {len(listed & set(ids))}/{n}")
        await asyncio.gather(*(kernel_info(server, k) for k in ids))
        recovered = time.perf_counter() - server.spawned_at
        cpu = cpu_seconds(server.proc.pid)
        for k in ids:
            await server.api("DELETE", f"/api/kernels/{k}")
        return floor, recovered, listed_at, cpu
    finally:
        await server.stop(timeout=60)
        shutil.rmtree(workdir, ignore_errors=True)
        remove_all_kernels(state)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backends", default="process,docker")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="lp-bench-specs-"))
    rows = []
    try:
        for backend in args.backends.split(","):
            # 160M: 100 of them fit the default mem_budget (0.8 of host memory) on 23G.
            write_kernelspec(root, f"b-{backend}", {"mem_limit": "160M", "owner": "lp-bench"},
                             PROVISIONERS[backend])
            results = [await one_round(backend, args.kernels, root) for _ in range(args.rounds)]
            floors = [r[0] for r in results]
            recovered = [r[1] for r in results]
            rows.append((backend, statistics.median(floors), statistics.median(recovered),
                         max(recovered), statistics.median(r[2] for r in results),
                         statistics.median(r[3] for r in results)))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.markdown:
        print(f"| backend | server start, no kernels (floor) s | restart → {args.kernels} "
              f"kernels adopted + kernel_info, median s | max s | of which listed at s "
              "| server CPU s | target |")
        print("|---|---:|---:|---:|---:|---:|---|")
        for b, f, r, m, li, c in rows:
            print(f"| {b} | {f:.2f} | {r:.2f} | {m:.2f} | {li:.2f} | {c:.2f} | < 3 s |")
    else:
        for b, f, r, m, li, c in rows:
            print(f"{b}: floor {f:.2f}s, recovered median {r:.2f}s, max {m:.2f}s (target < 3 s); "
                  f"listed at {li:.2f}s, server CPU {c:.2f}s")


if __name__ == "__main__":
    asyncio.run(main())
