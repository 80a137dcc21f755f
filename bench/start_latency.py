"""Start latency of limited kernels against their baselines, measured in one run.

Times ``start_kernel()`` to the first ``kernel_info`` reply, N starts of each kind,
interleaved (stock, limited, docker, floor, stock, ...) so machine noise hits all alike:

* stock ``LocalProvisioner`` — the baseline of the process backend (target ratio <= 1.10);
* ``LimitedProcessProvisioner`` (mem 1G, cpu 1);
* ``LimitedDockerProvisioner`` (mem 1G, cpu 1, no network) — if Docker and the image exist;
* the docker floor: ``docker run --rm IMAGE python3 -c "import ipykernel.kernelapp"``,
  the least any container kernel can cost (target docker/floor <= 1.3);
* the same two under gVisor (``runtime="runsc"``, ``docker run --runtime=runsc``), if the
  daemon has runsc registered (.ci/setup-docker.sh): what the stronger sandbox costs.

    python bench/start_latency.py [--runs 20] [--markdown] [--no-docker]
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
from tests.harness import KERNEL_IMAGE, PROVISIONERS, docker_available, write_kernelspec

LIMITS = {"mem_limit": "1G", "cpu_limit": 1}


def write_specs(root: Path, with_docker: bool) -> None:
    write_kernelspec(root, "bench-stock", provisioner=None)
    write_kernelspec(root, "bench-limited", LIMITS, PROVISIONERS["process"])
    if with_docker:
        write_kernelspec(root, "bench-docker", LIMITS, PROVISIONERS["docker"])
        write_kernelspec(root, "bench-gvisor", {**LIMITS, "runtime": "runsc"},
                         PROVISIONERS["docker"])


def gvisor_available() -> bool:
    import docker

    return "runsc" in (docker.from_env().info().get("Runtimes") or {})


async def kernel_start(kernel_name: str) -> float:
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


async def docker_floor(runtime: str = "runc") -> float:
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        "docker", "run", "--rm", "--network=none", f"--runtime={runtime}", KERNEL_IMAGE,
        "python3", "-c", "import ipykernel.kernelapp",
    )
    if await proc.wait() != 0:
        raise RuntimeError("docker floor run failed")
    return time.perf_counter() - t0


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument("--no-docker", action="store_true", help="skip the docker rows")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="lp-bench-"))
    try:
        await run_bench(root, args, with_docker=not args.no_docker and docker_available())
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def run_bench(root: Path, args: argparse.Namespace, with_docker: bool) -> None:
    write_specs(root, with_docker)
    os.environ["JUPYTER_PATH"] = str(root)
    kinds = {
        "LocalProvisioner (stock)": lambda: kernel_start("bench-stock"),
        "LimitedProcessProvisioner": lambda: kernel_start("bench-limited"),
    }
    if with_docker:
        kinds["docker floor (run + import ipykernel)"] = docker_floor
        kinds["LimitedDockerProvisioner"] = lambda: kernel_start("bench-docker")
        if gvisor_available():
            kinds["gVisor floor (run --runtime=runsc + import)"] = lambda: docker_floor("runsc")
            kinds["LimitedDockerProvisioner, runtime=runsc"] = (
                lambda: kernel_start("bench-gvisor"))
    for start in kinds.values():  # warm page cache / image layers for every kind
        await start()
    times: dict[str, list[float]] = {label: [] for label in kinds}
    for _ in range(args.runs):
        for label, start in kinds.items():
            times[label].append(await start())

    def ratio(a: str, b: str) -> tuple[float, float]:
        return (statistics.median(times[a]) / statistics.median(times[b]),
                p90(times[a]) / p90(times[b]))

    ratios = [("limited process / stock (target <= 1.10)",
               ratio("LimitedProcessProvisioner", "LocalProvisioner (stock)"))]
    if with_docker:
        ratios.append(("limited docker / docker floor (target <= 1.3)",
                       ratio("LimitedDockerProvisioner", "docker floor (run + import ipykernel)")))
        if "LimitedDockerProvisioner, runtime=runsc" in times:
            ratios.append(("limited gVisor / gVisor floor",
                           ratio("LimitedDockerProvisioner, runtime=runsc",
                                 "gVisor floor (run --runtime=runsc + import)")))
            ratios.append(("limited gVisor / limited docker (runc)",
                           ratio("LimitedDockerProvisioner, runtime=runsc",
                                 "LimitedDockerProvisioner")))
    if args.markdown:
        print(f"| start → first kernel_info ({args.runs} runs each) | median s | p90 s |")
        print("|---|---:|---:|")
        for label, values in times.items():
            print(f"| {label} | {statistics.median(values):.3f} | {p90(values):.3f} |")
        for label, (med, p) in ratios:
            print(f"| **ratio {label}** | **{med:.2f}** | **{p:.2f}** |")
    else:
        print(f"{'kind':<46} {'median s':>9} {'p90 s':>8}")
        for label, values in times.items():
            print(f"{label:<46} {statistics.median(values):>9.3f} {p90(values):>8.3f}")
        for label, (med, p) in ratios:
            print(f"{'ratio ' + label:<46} {med:>9.2f} {p:>8.2f}")


if __name__ == "__main__":
    asyncio.run(main())
