"""Soak: a few hundred sessions against a real jupyter_server, mixing normal cells and
attacks, with one ``kill -9`` + restart of the server midway.

A long-lived "canary" kernel executes ``1 + 1`` every 0.2 s throughout; its latency with
nothing else running is the baseline. Prints per backend: sessions run / failed (those
cut by the restart are counted apart), kernels lost across the restart (target 0),
leaked registry entries / kernel dirs / cgroups / processes / containers at the end
(target 0),
server RSS at start and end of each server instance, and canary p50/p99 latency while the
attacks run vs its idle baseline (target p99 < 3x).

    python bench/soak.py [--sessions 300] [--concurrency 4] [--backends process,docker] [--markdown]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo: tests.harness
from tests.attacks.catalogue import CATALOGUE
from tests.harness import (
    PROVISIONERS,
    JupyterServer,
    kernel_leftovers,
    remove_all_kernels,
    server_env,
    write_kernelspec,
    ws_execute,
)

LIMITS = {"mem_limit": "256M", "cpu_limit": 0.5, "pids_limit": 64, "nofile_limit": 256,
          "disk_limit": "100M", "files_limit": 2000, "exec_timeout": 3,
          "exec_timeout_grace": 3, "output_limit": "1M", "idle_timeout": 60,
          "owner": "lp-soak"}
ATTACKS = [a for a in CATALOGUE if a.id in ("1.1", "1.5", "2.1", "2.6", "3.1", "3.5", "x.1",
                                             "x.4", "x.8")]
NORMAL = "import math\nprint(sum(math.sqrt(i) for i in range(10**5)))"


async def execute(server: JupyterServer, kernel_id: str, code: str, timeout: float = 30) -> float:
    """Run code over the kernel's WebSocket; seconds until it is done. Raises if no reply
    comes within ``timeout`` (a killed kernel's never does: the session then deletes it
    once jupyter_server's restart is long over; a DELETE during the restart fails)."""
    t0 = time.perf_counter()
    await ws_execute(server.base, kernel_id, code, timeout, return_on_restart=False)
    return time.perf_counter() - t0


async def soak(backend: str, args: argparse.Namespace, specs: Path) -> dict:
    state = Path(tempfile.mkdtemp(prefix="lp-soak-", dir="/var/lib"))
    env = server_env(state, "soak-" + uuid.uuid4().hex[:6], jupyter_path=specs)
    workdir = Path(tempfile.mkdtemp(prefix="lp-soak-nb-"))
    server = JupyterServer(workdir, env)
    result: dict = {"backend": backend, "sessions": args.sessions}
    ids: set[str] = set()  # every kernel started, for what they leave behind
    try:
        await server.start()
        name = f"soak-{backend}"
        canary = (await server.api("POST", "/api/kernels", {"name": name}))["id"]
        ids.add(canary)
        baseline = [await execute(server, canary, "1 + 1") for _ in range(30)]
        rss = [psutil.Process(server.proc.pid).memory_info().rss]
        latencies: list[float] = []
        stop = asyncio.Event()

        async def canary_loop():
            while not stop.is_set():
                try:
                    latencies.append(await execute(server, canary, "1 + 1", timeout=10))
                except Exception:  # server restarting: the gap is not kernel latency
                    await asyncio.sleep(0.2)
                await asyncio.sleep(0.2)

        counts = {"ok": 0, "failed": 0, "cut_by_restart": 0, "attacks": 0, "kernel_died": 0}
        restarting = asyncio.Event()
        sem = asyncio.Semaphore(args.concurrency)
        rng = random.Random(7)

        async def session(i: int):
            async with sem:
                attack = rng.random() < 0.4
                code = rng.choice(ATTACKS).code if attack else NORMAL
                kid = None
                try:
                    kid = (await server.api("POST", "/api/kernels", {"name": name}))["id"]
                    ids.add(kid)
                    await execute(server, kid, code, timeout=40)
                    counts["ok"] += 1
                    counts["attacks"] += attack
                except Exception:  # counted; the totals are the finding
                    if restarting.is_set():
                        counts["cut_by_restart"] += 1
                    elif attack:
                        # The attack killed the kernel (OOM, watchdog): no execute_reply
                        # ever comes; jupyter_server restarts the kernel.
                        counts["kernel_died"] += 1
                        counts["attacks"] += 1
                    else:
                        counts["failed"] += 1
                finally:
                    if kid is not None:
                        try:  # a client that gives up still closes its session
                            await server.api("DELETE", f"/api/kernels/{kid}")
                        except Exception:  # already gone
                            pass

        canary_task = asyncio.ensure_future(canary_loop())
        half = args.sessions // 2
        await asyncio.gather(*(session(i) for i in range(half)))
        before = {k["id"] for k in await server.api("GET", "/api/kernels")}
        rss.append(psutil.Process(server.proc.pid).memory_info().rss)
        restarting.set()
        server.kill9()
        await server.start()
        after = {k["id"] for k in await server.api("GET", "/api/kernels")}
        restarting.clear()
        rss.append(psutil.Process(server.proc.pid).memory_info().rss)
        await asyncio.gather(*(session(i) for i in range(half, args.sessions)))
        rss.append(psutil.Process(server.proc.pid).memory_info().rss)
        stop.set()
        await canary_task
        await server.api("DELETE", f"/api/kernels/{canary}")
        await asyncio.sleep(2)
        leaked = kernel_leftovers(state, ids)
        latencies.sort()
        result.update(
            ok=counts["ok"], attacks=counts["attacks"], kernel_died=counts["kernel_died"],
            failed=counts["failed"],
            cut_by_restart=counts["cut_by_restart"],
            lost_in_restart=len(before - after),
            leaked_entries=leaked["registry entries"], leaked_dirs=leaked["kernel dirs"],
            leaked_cgroups=leaked["cgroups"], leaked_processes=leaked["processes"],
            leaked_containers=leaked["containers"],
            server_rss_mb=" → ".join(f"{r / 2**20:.0f}" for r in rss),
            idle_p50_ms=round(statistics.median(baseline) * 1000, 1),
            idle_p99_ms=round(baseline[int(0.99 * (len(baseline) - 1))] * 1000, 1),
            load_p50_ms=round(statistics.median(latencies) * 1000, 1),
            load_p99_ms=round(latencies[int(0.99 * (len(latencies) - 1))] * 1000, 1),
        )
        result["p99_ratio"] = round(result["load_p99_ms"] / max(result["idle_p99_ms"], 0.1), 2)
    finally:
        await server.stop(timeout=60)
        remove_all_kernels(state)
        shutil.rmtree(workdir, ignore_errors=True)
    return result


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--backends", default="process,docker")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    specs = Path(tempfile.mkdtemp(prefix="lp-soak-specs-"))
    rows = []
    try:
        for backend in args.backends.split(","):
            write_kernelspec(specs, f"soak-{backend}", LIMITS, PROVISIONERS[backend])
            rows.append(await soak(backend, args, specs))
    finally:
        shutil.rmtree(specs, ignore_errors=True)
    cols = ["backend", "sessions", "ok", "attacks", "kernel_died", "failed", "cut_by_restart",
            "lost_in_restart", "leaked_entries", "leaked_dirs", "leaked_cgroups",
            "leaked_processes", "leaked_containers", "server_rss_mb", "idle_p50_ms",
            "idle_p99_ms", "load_p50_ms", "load_p99_ms", "p99_ratio"]
    if args.markdown:
        print("| " + " | ".join(cols) + " |")
        print("|" + "---|" * len(cols))
        for r in rows:
            print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    else:
        for r in rows:
            print(", ".join(f"{c}={r.get(c)}" for c in cols))


if __name__ == "__main__":
    asyncio.run(main())
