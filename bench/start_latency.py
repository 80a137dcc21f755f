"""Start latency: stock LocalProvisioner vs LimitedProcessProvisioner.

Times ``start_kernel()`` to the first ``kernel_info`` reply, N starts of each,
interleaved (stock, limited, stock, ...) so machine noise hits both alike, and prints
median / p90 and the limited/stock ratio (target <= 1.10).

    python bench/start_latency.py [--runs 20] [--markdown]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from jupyter_client.manager import AsyncKernelManager

ARGV = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]


def write_specs(root: Path) -> None:
    stock = {"argv": ARGV, "display_name": "stock", "language": "python"}
    limited = dict(stock, display_name="limited", metadata={
        "kernel_provisioner": {"provisioner_name": "limited-process-provisioner",
                               "config": {"mem_limit": "1G", "cpu_limit": 1}}})
    for name, spec in (("bench-stock", stock), ("bench-limited", limited)):
        (root / "kernels" / name).mkdir(parents=True)
        (root / "kernels" / name / "kernel.json").write_text(json.dumps(spec))


async def one_start(kernel_name: str) -> float:
    km = AsyncKernelManager(kernel_name=kernel_name)
    t0 = time.perf_counter()
    await km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=60)
        return time.perf_counter() - t0
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)


def p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="lp-bench-"))
    try:
        await run_bench(root, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def run_bench(root: Path, args: argparse.Namespace) -> None:
    write_specs(root)
    os.environ["JUPYTER_PATH"] = str(root)
    times: dict[str, list[float]] = {"bench-stock": [], "bench-limited": []}
    await one_start("bench-stock")  # warm the page cache for both
    await one_start("bench-limited")
    for _ in range(args.runs):
        for name in times:
            times[name].append(await one_start(name))
    stock, limited = times["bench-stock"], times["bench-limited"]
    rows = [
        ("LocalProvisioner (stock)", stock),
        ("LimitedProcessProvisioner", limited),
    ]
    ratio_med = statistics.median(limited) / statistics.median(stock)
    ratio_p90 = p90(limited) / p90(stock)
    if args.markdown:
        print(f"| provisioner ({args.runs} starts each) | median s | p90 s |")
        print("|---|---:|---:|")
        for label, values in rows:
            print(f"| {label} | {statistics.median(values):.3f} | {p90(values):.3f} |")
        print(f"| **ratio limited/stock** | **{ratio_med:.2f}** | **{ratio_p90:.2f}** |")
    else:
        print(f"{'provisioner':<28} {'median s':>9} {'p90 s':>8}")
        for label, values in rows:
            print(f"{label:<28} {statistics.median(values):>9.3f} {p90(values):>8.3f}")
        print(f"{'ratio limited/stock':<28} {ratio_med:>9.2f} {ratio_p90:>8.2f}  (target <= 1.10)")


if __name__ == "__main__":
    asyncio.run(main())
