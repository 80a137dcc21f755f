"""Density: what a pool of idle kernels costs the jupyter_server that manages them.

One server per kind of kernel; its kernels grow to each N of ``--kernels`` (default 25,
50, 100) and, at each N, once every kernel answered and ``--settle`` seconds passed:

* the server process's CPU over ``--idle`` seconds of nobody doing anything, in % of one
  core (its own user + system time, not its children's: the kernels' CPU is theirs) —
  what the timers, watchdogs, restarter polls and proxies cost (target < 5 % at N = 100);
* the RSS of each kernel's process tree (mean) and the server's RSS growth per kernel
  since it had none;
* ``kernel_info`` latency over the WebSocket (a new connection each, as a client that
  comes back sees it), asked of every kernel one after the other: p50 and p90.

Stock kernels (jupyter_client's LocalProvisioner, same server, same extension) are the
baseline, measured in the same run.

    python bench/density.py [--kernels 25,50,100] [--backends stock,process,docker]
                            [--idle 20] [--markdown]
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
from common import p90

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo: tests.harness
from tests.harness import (
    PROVISIONERS,
    JupyterServer,
    docker_available,
    kernel_processes,
    remove_all_kernels,
    replied,
    server_env,
    write_kernelspec,
    ws_request,
)

# The limits of a warm pool's kernels: the defaults (2G... 10G disk on a filesystem of
# its own, idle_timeout 1h, so the lifecycle timer runs) but a memory limit small enough
# for 100 under the default mem_budget (0.8 of host memory: 23G here).
LIMITS = {"mem_limit": "160M", "owner": "lp-bench"}
START_CONCURRENCY = 4  # two cores: more parallel starts only queue


async def kernel_info(server: JupyterServer, kernel_id: str) -> float:
    """Seconds until a kernel_info request over a new WebSocket is answered."""
    t0 = time.perf_counter()
    msg_id, seen = await ws_request(server.base, kernel_id, "kernel_info_request", {},
                                    timeout=60)
    if not replied(msg_id, seen):
        raise RuntimeError(f"kernel {kernel_id} restarted instead of answering kernel_info")
    return time.perf_counter() - t0


def cpu_seconds(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system


def tree_rss(pids: set[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.Error:  # gone meanwhile
            continue
    return total


def kernel_pids(kind: str, server: psutil.Process, ids: list[str]) -> set[int]:
    """Every process of the kernels: a limited kernel's carry its id in the
    environment; a stock kernel is a child of the server."""
    if kind == "stock":
        return {p.pid for p in server.children(recursive=True)}
    return kernel_processes(ids)


async def grow(server: JupyterServer, name: str, ids: list[str], n: int) -> None:
    sem = asyncio.Semaphore(START_CONCURRENCY)

    async def one() -> None:
        async with sem:
            kernel = await server.api("POST", "/api/kernels", {"name": name})
            await kernel_info(server, kernel["id"])
            ids.append(kernel["id"])

    await asyncio.gather(*(one() for _ in range(n - len(ids))))


async def measure_kind(kind: str, sizes: list[int], args: argparse.Namespace,
                       specs: Path) -> list[dict]:
    state = Path(tempfile.mkdtemp(prefix="lp-bench-density-", dir="/var/lib"))
    env = server_env(state, "density-" + uuid.uuid4().hex[:6], jupyter_path=specs)
    workdir = Path(tempfile.mkdtemp(prefix="lp-bench-density-nb-", dir="/var/lib"))
    server = JupyterServer(workdir, env)
    rows = []
    ids: list[str] = []
    try:
        await server.start()
        proc = psutil.Process(server.proc.pid)
        await asyncio.sleep(args.settle)
        rss0 = proc.memory_info().rss
        t0, c0 = time.monotonic(), cpu_seconds(proc)
        await asyncio.sleep(args.idle)
        empty_cpu = 100 * (cpu_seconds(proc) - c0) / (time.monotonic() - t0)
        rows.append({"kind": kind, "n": 0, "cpu": empty_cpu})
        for n in sizes:
            t_start = time.perf_counter()
            await grow(server, f"density-{kind}", ids, n)
            started = time.perf_counter() - t_start
            await asyncio.sleep(args.settle)
            t0, c0 = time.monotonic(), cpu_seconds(proc)
            await asyncio.sleep(args.idle)
            cpu = 100 * (cpu_seconds(proc) - c0) / (time.monotonic() - t0)
            pids = await asyncio.to_thread(kernel_pids, kind, proc, ids)
            kernel_rss = await asyncio.to_thread(tree_rss, pids)
            server_rss = proc.memory_info().rss
            latencies = [await kernel_info(server, k) for k in ids]
            rows.append({
                "kind": kind, "n": n, "cpu": cpu, "started_s": started,
                "kernel_rss": kernel_rss / n, "server_rss_per_kernel": (server_rss - rss0) / n,
                "server_rss": server_rss,
                "p50": statistics.median(latencies), "p90": p90(latencies),
            })
            print(f"{kind} N={n}: {cpu:.2f} % of a core idle", file=sys.stderr)
        for k in ids:
            await server.api("DELETE", f"/api/kernels/{k}")
        return rows
    finally:
        await server.stop(timeout=120)
        shutil.rmtree(workdir, ignore_errors=True)
        remove_all_kernels(state)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", default="25,50,100",
                        help="the Ns, ascending: one server grows its kernels to each")
    parser.add_argument("--backends", default="stock,process",
                        help="stock (the baseline), process, docker")
    parser.add_argument("--idle", type=float, default=20.0,
                        help="seconds of idleness the server's CPU is measured over")
    parser.add_argument("--settle", type=float, default=5.0,
                        help="seconds after the last start before measuring")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    sizes = sorted(int(n) for n in args.kernels.split(","))
    kinds = args.backends.split(",")
    if "docker" in kinds and not docker_available():
        print("docker: no daemon or no kernel image; skipped", file=sys.stderr)
        kinds.remove("docker")
    specs = Path(tempfile.mkdtemp(prefix="lp-bench-specs-"))
    rows: list[dict] = []
    try:
        for kind in kinds:
            write_kernelspec(specs, f"density-{kind}", LIMITS,
                             PROVISIONERS[kind] if kind != "stock" else None)
            rows += await measure_kind(kind, sizes, args, specs)
    finally:
        shutil.rmtree(specs, ignore_errors=True)
    mib = 2**20
    if args.markdown:
        print(f"| kernels | N | server CPU idle, % of a core ({args.idle:g} s) | per kernel % "
              "| kernel RSS MiB | server RSS +MiB/kernel | kernel_info p50 ms | p90 ms "
              "| started in s | target |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for r in rows:
            if r["n"] == 0:
                print(f"| {r['kind']} | 0 | {r['cpu']:.2f} | | | | | | | |")
                continue
            target = "< 5 %" if r["n"] == 100 and r["kind"] != "stock" else ""
            print(f"| {r['kind']} | {r['n']} | {r['cpu']:.2f} | {r['cpu'] / r['n']:.3f} "
                  f"| {r['kernel_rss'] / mib:.0f} | {r['server_rss_per_kernel'] / mib:.2f} "
                  f"| {1000 * r['p50']:.0f} | {1000 * r['p90']:.0f} | {r['started_s']:.1f} "
                  f"| {target} |")
    else:
        for r in rows:
            if r["n"] == 0:
                print(f"{r['kind']} N=0: server CPU {r['cpu']:.2f} % of a core")
                continue
            print(f"{r['kind']} N={r['n']}: server CPU {r['cpu']:.2f} % of a core, kernel "
                  f"RSS {r['kernel_rss'] / mib:.0f} MiB, server +{r['server_rss_per_kernel'] / mib:.2f}"
                  f" MiB/kernel, kernel_info p50 {1000 * r['p50']:.0f} ms p90 "
                  f"{1000 * r['p90']:.0f} ms")


if __name__ == "__main__":
    asyncio.run(main())
