"""What the proxy in front of every limited kernel costs, against a stock kernel, in one run.

Every client of a limited kernel talks to it through the server's proxy (proxy.py), which
HMAC-verifies each message from the kernel and counts output. This measures, per kind of
kernel (stock ``LocalProvisioner``, ``LimitedProcessProvisioner``, and
``LimitedDockerProvisioner`` if Docker and the image exist; ``output_limit`` off so the
whole stream is measured):

* round trip of a trivial execute (``pass``) to its reply: median and p90 of N;
* output throughput: one cell printing 64 MB in 64 KiB writes, MB/s until the reply;
* the managing process's CPU seconds spent for that cell (proxy work included).

    python bench/proxy.py [--round-trips 300] [--markdown] [--no-docker]
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
from pathlib import Path

from common import p90
from jupyter_client.manager import AsyncKernelManager

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo: tests.harness
from tests.harness import PROVISIONERS, docker_available, write_kernelspec

LIMITS = {"mem_limit": "1G", "cpu_limit": 1, "output_limit": None, "max_message_size": "128M",
          "owner": "lp-bench"}
FLOOD_MB = 64
FLOOD = (
    f"import sys\nchunk = 'x' * 65535 + '\\n'\n"
    f"for _ in range({FLOOD_MB} * 16):\n    sys.stdout.write(chunk)\nsys.stdout.flush()"
)


async def measure(kernel_name: str, round_trips: int) -> dict[str, float]:
    km = AsyncKernelManager(kernel_name=kernel_name)
    await km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=60)
        await kc.execute_interactive("pass", timeout=30)  # warm
        trips = []
        for _ in range(round_trips):
            t0 = time.perf_counter()
            await kc.execute_interactive("pass", timeout=30)
            trips.append(time.perf_counter() - t0)
        received = 0

        def count(msg: dict) -> None:
            nonlocal received
            if msg["msg_type"] == "stream":
                received += len(msg["content"]["text"])

        cpu0 = sum(os.times()[:2])
        t0 = time.perf_counter()
        await kc.execute_interactive(FLOOD, timeout=300, output_hook=count)
        elapsed = time.perf_counter() - t0
        cpu = sum(os.times()[:2]) - cpu0
        return {
            "rt_median_ms": statistics.median(trips) * 1000,
            "rt_p90_ms": p90(trips) * 1000,
            "mb_s": received / 2**20 / elapsed,
            "received_mb": received / 2**20,
            "server_cpu_s": cpu,
        }
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--round-trips", type=int, default=300)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--no-docker", action="store_true")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="lp-bench-"))
    os.environ["JUPYTER_PATH"] = str(root)
    try:
        kinds = {
            "LocalProvisioner (stock)": write_kernelspec(root, "stock", provisioner=None),
            "LimitedProcessProvisioner": write_kernelspec(root, "lp", LIMITS,
                                                          PROVISIONERS["process"]),
        }
        if not args.no_docker and docker_available():
            kinds["LimitedDockerProvisioner"] = write_kernelspec(root, "ld", LIMITS,
                                                                 PROVISIONERS["docker"])
        results = {label: await measure(name, args.round_trips) for label, name in kinds.items()}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    base = results["LocalProvisioner (stock)"]
    rows = [
        (label, r, r["rt_median_ms"] / base["rt_median_ms"], r["mb_s"] / base["mb_s"])
        for label, r in results.items()
    ]
    if args.markdown:
        print(f"| kernel | execute round trip median ms | p90 ms | ratio to stock | "
              f"output MB/s ({FLOOD_MB} MB cell) | ratio to stock | server CPU s for the cell |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for label, r, rt, tp in rows:
            print(f"| {label} | {r['rt_median_ms']:.2f} | {r['rt_p90_ms']:.2f} | {rt:.2f} | "
                  f"{r['mb_s']:.1f} | {tp:.2f} | {r['server_cpu_s']:.2f} |")
    else:
        for label, r, rt, tp in rows:
            print(f"{label:<28} rt {r['rt_median_ms']:.2f} ms (p90 {r['rt_p90_ms']:.2f}, x{rt:.2f})"
                  f"  output {r['mb_s']:.1f} MB/s (x{tp:.2f}, {r['received_mb']:.0f} MB)"
                  f"  server cpu {r['server_cpu_s']:.2f} s")


if __name__ == "__main__":
    asyncio.run(main())
