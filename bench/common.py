"""What the benches share: the kernel argv per backend, a limited kernelspec on disk, and
counting what kernels left behind (by kernel id, never by name patterns)."""

from __future__ import annotations

import json
import sys
from collections.abc import Collection
from pathlib import Path
from typing import Any

import psutil

from limited_provisioner.process.cgroups import CGROUP_ROOT, GROUP_NAME
from limited_provisioner.watchdog import KERNEL_ID_ENV

REPO = Path(__file__).resolve().parent.parent
ARGV = {
    "process": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
    # Inside the container: the image's interpreter, not the server's.
    "docker": ["python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
}


def write_kernelspec(root: Path, name: str, backend: str, config: dict[str, Any]) -> str:
    """``<root>/kernels/<name>/kernel.json`` for ``limited-<backend>-provisioner``."""
    spec = {
        "argv": ARGV[backend],
        "display_name": name,
        "language": "python",
        "metadata": {"kernel_provisioner": {
            "provisioner_name": f"limited-{backend}-provisioner", "config": config,
        }},
    }
    (root / "kernels" / name).mkdir(parents=True)
    (root / "kernels" / name / "kernel.json").write_text(json.dumps(spec))
    return name


def kernel_cgroups(ids: Collection[str]) -> int:
    """Per-kernel cgroups (memory, cpu, pids) that still exist for these kernel ids."""
    return sum(
        1 for c in ("memory", "cpu", "pids") for k in ids
        if (CGROUP_ROOT / c / GROUP_NAME / k).exists()
    )


def kernel_processes(ids: Collection[str]) -> int:
    """Live processes whose environment names one of these kernel ids."""
    count = 0
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(KERNEL_ID_ENV) in ids:
                count += 1
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue  # gone meanwhile, or a kernel thread
    return count
