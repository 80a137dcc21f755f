"""Prometheus metrics of the limited kernels this process manages.

Registered in prometheus_client's default registry, which jupyter_server already serves
at ``/metrics`` (authenticated unless ``ServerApp.authenticate_prometheus=False``); an
agent backend can serve the same registry with ``prometheus_client.make_asgi_app()``.
Every metric is about this process: a second server on the host exports its own.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# Lifecycle kinds that end a kernel by policy rather than because it broke a limit.
CULL_KINDS = ("idle_timeout", "max_lifetime")
# Not a resource limit: the sandbox itself could not be set up.
NOT_A_TRIP = ("sandbox",)

STARTS_REFUSED = Counter(
    "limited_provisioner_kernel_starts_refused",
    "Kernel starts refused before anything ran, by the limit that refused them",
    ["limit"],
)
CULLS = Counter(
    "limited_provisioner_kernel_culls",
    "Kernels shut down by policy: idle_timeout or max_lifetime",
    ["reason"],
)
LIMIT_TRIPS = Counter(
    "limited_provisioner_limit_trips",
    "Limits a kernel ran into and that were enforced on it (mem_limit = OOM kill, "
    "exec_timeout, disk_limit, files_limit, pids_limit, ...)",
    ["kind"],
)
ADOPTIONS = Counter(
    "limited_provisioner_kernel_adoptions",
    "Running kernels re-adopted after the process that started them went away",
    ["backend"],
)
ORPHANS_REAPED = Counter(
    "limited_provisioner_orphans_reaped",
    "Kernels (processes or containers) nobody managed any more, removed by the reaper",
    ["backend"],
)
START_SECONDS = Histogram(
    "limited_provisioner_kernel_start_seconds",
    "Seconds from admission to a kernel with bound sockets (starts and restarts)",
    ["backend"],
    buckets=(0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 20, 60),
)


class LiveKernels(Collector):
    """``limited_provisioner_kernels{backend, owner}``: kernels this process manages now.

    A collector over a dict rather than a Gauge with inc/dec, so a kernel is counted
    once whatever path (start, restart, adoption, failed start) it took.
    """

    def __init__(self) -> None:
        self.kernels: dict[str, tuple[str, str]] = {}

    def add(self, kernel_id: str, backend: str, owner: str) -> None:
        self.kernels[kernel_id] = (backend, owner)

    def remove(self, kernel_id: str) -> None:
        self.kernels.pop(kernel_id, None)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "limited_provisioner_kernels",
            "Limited kernels managed by this process, by backend and owner",
            labels=["backend", "owner"],
        )
        counts: dict[tuple[str, str], int] = {}
        for key in list(self.kernels.values()):
            counts[key] = counts.get(key, 0) + 1
        for (backend, owner), count in sorted(counts.items()):
            family.add_metric([backend, owner], count)
        yield family


LIVE_KERNELS = LiveKernels()
REGISTRY.register(LIVE_KERNELS)


def count_trip(kind: str) -> None:
    """Count a recorded trip as a cull or a limit trip (see CULL_KINDS)."""
    if kind in CULL_KINDS:
        CULLS.labels(reason=kind).inc()
    elif kind not in NOT_A_TRIP:
        LIMIT_TRIPS.labels(kind=kind).inc()
