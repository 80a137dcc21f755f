"""What a kernel's own filesystem (limited_provisioner/workfs.py) costs, measured in one run.

1. The filesystem alone, N times each, interleaved: create (sparse image + mkfs.ext4 +
   mount + binds + chown) and remove (unmount, loop device gone, image deleted, kernel
   dir removed) for 100M, 1G and 10G (the default disk_limit) with the default
   files_limit, against the baseline of a kernel dir without one (target: create
   <= 100 ms).
2. Start latency (``start_kernel()`` to the first ``kernel_info`` reply) and shutdown of a
   process kernel (mem 1G, cpu 1, disk 10G) with its own filesystem and without
   (``own_filesystem: off``, the baseline), interleaved in a new random order each
   round; with ``--docker`` the same for docker kernels.

    python bench/disk_quota.py [--runs 30] [--starts 10] [--docker]     (prints markdown)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import p90
from jupyter_client.manager import AsyncKernelManager

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo: tests.harness
from limited_provisioner import workfs
from limited_provisioner.kernel_dir import KernelDir
from tests.harness import PROVISIONERS, docker_available, write_kernelspec

M, G = 2**20, 2**30
SIZES = {"100M": 100 * M, "1G": G, "10G": 10 * G}
FILES = 50000  # files_limit's default
UID = 64999  # only chown'ed to: nothing runs as it here
LIMITS = {"mem_limit": "1G", "cpu_limit": 1, "disk_limit": "10G", "owner": "lp-bench"}


def ms(values: list[float]) -> tuple[str, str]:
    return f"{statistics.median(values) * 1e3:.1f}", f"{p90(values) * 1e3:.1f}"


def filesystem_costs(runs: int) -> dict[str, tuple[list[float], list[float]]]:
    """{kind: (create seconds, remove seconds)}, the kinds interleaved."""
    root = Path(tempfile.mkdtemp(dir="/var/lib", prefix="lp-bench-disk-"))
    os.chmod(root, 0o700)
    kinds: dict[str, int | None] = {"kernel dir only (baseline)": None, **SIZES}
    times: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in kinds}
    try:
        for i in range(runs + 1):  # the first round warms caches and is not counted
            for label, size in kinds.items():
                kd = KernelDir(root, f"k{i}", UID, UID)
                t0 = time.perf_counter()
                kd.create()
                if size is not None:
                    kd.own_filesystem(size, FILES)
                t1 = time.perf_counter()
                kd.remove()
                t2 = time.perf_counter()
                if i:
                    times[label][0].append(t1 - t0)
                    times[label][1].append(t2 - t1)
                assert not workfs.mounts_under(root), "a mount was left behind"
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return times


async def start_and_stop(kernel_name: str) -> tuple[float, float]:
    km = AsyncKernelManager(kernel_name=kernel_name)
    t0 = time.perf_counter()
    await km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=60)
        started = time.perf_counter() - t0
    finally:
        kc.stop_channels()
        t1 = time.perf_counter()
        await km.shutdown_kernel(now=True)
    return started, time.perf_counter() - t1


async def kernel_costs(starts: int, docker: bool) -> dict[str, tuple[list[float], list[float]]]:
    root = Path(tempfile.mkdtemp(dir="/var/lib", prefix="lp-bench-specs-"))
    os.environ["JUPYTER_PATH"] = str(root)
    kinds = {}
    backends = ["process", "docker"] if docker else ["process"]
    for backend in backends:
        for fs in ("off", "auto"):
            name = f"bench-{backend}-{fs}"
            write_kernelspec(root, name, {**LIMITS, "own_filesystem": fs}, PROVISIONERS[backend])
            label = f"{backend}, {'own filesystem' if fs == 'auto' else 'watchdog (baseline)'}"
            kinds[label] = name
    try:
        for name in kinds.values():  # warm-up
            await start_and_stop(name)
        times: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in kinds}
        order = list(kinds.items())
        for _ in range(starts):
            # A new order every round: no kind always follows the same one (a docker
            # kernel's removal, say, still settling).
            random.shuffle(order)
            for label, name in order:
                start, stop = await start_and_stop(name)
                times[label][0].append(start)
                times[label][1].append(stop)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="filesystem create/remove runs")
    parser.add_argument("--starts", type=int, default=10, help="kernel starts of each kind")
    parser.add_argument("--docker", action="store_true", help="also docker kernels")
    args = parser.parse_args()
    why_not = workfs.unavailable()
    if why_not:
        sys.exit(f"no own filesystem on this host: {why_not}")
    fs = filesystem_costs(args.runs)
    kernels = asyncio.run(kernel_costs(args.starts, args.docker and docker_available()))

    rows = []
    for label, (create, remove) in fs.items():
        rows.append((f"{label}: create", *ms(create)))
        rows.append((f"{label}: remove", *ms(remove)))
    print(f"| own filesystem, {args.runs} runs each (files_limit {FILES}) | median ms | p90 ms |")
    print("|---|---:|---:|")
    for row in rows:
        print(f"| {row[0]} | {row[1]} | {row[2]} |")
    print()
    print(f"| kernel, disk_limit 10G ({args.starts} runs each) | start median s | start p90 s "
          f"| shutdown median s | shutdown p90 s |")
    print("|---|---:|---:|---:|---:|")
    for label, (start, stop) in kernels.items():
        print(f"| {label} | {statistics.median(start):.3f} | {p90(start):.3f} | "
              f"{statistics.median(stop):.3f} | {p90(stop):.3f} |")
    for backend in ("process", "docker"):
        own, base = f"{backend}, own filesystem", f"{backend}, watchdog (baseline)"
        if own in kernels:
            (s1, d1), (s0, d0) = kernels[own], kernels[base]
            print(f"| **ratio {backend}: own filesystem / baseline** | "
                  f"**{statistics.median(s1) / statistics.median(s0):.2f}** | "
                  f"**{p90(s1) / p90(s0):.2f}** | "
                  f"**{statistics.median(d1) / statistics.median(d0):.2f}** | "
                  f"**{p90(d1) / p90(d0):.2f}** |")


if __name__ == "__main__":
    main()
