"""/metrics of a real jupyter_server, scraped after causing each event it counts."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
from prometheus_client.parser import text_string_to_metric_families
from tornado.httpclient import HTTPClientError

from limited_provisioner.registry import Registry

from .harness import TOKEN, JupyterServer, write_kernelspec, ws_execute
from .test_recovery import ORPHANER, recovery_env  # noqa: F401  (fixture)

OWNER = "lp-pytest"
LIM = {
    "mem_limit": "256M", "pids_limit": 64, "exec_timeout": 3, "disk_limit": "64M",
    # The disk_limit trip below is the watchdog's (with its own filesystem the kernel's
    # writes fail instead, and nothing trips).
    "own_filesystem": "off", "owner": OWNER,
}


async def scrape(server: JupyterServer) -> dict[tuple[str, tuple], float]:
    resp = await server.client.fetch(f"{server.base}/metrics?token={TOKEN}")
    samples = {}
    for family in text_string_to_metric_families(resp.body.decode()):
        if family.name.startswith("limited_provisioner"):
            for s in family.samples:
                samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def wait_for(server: JupyterServer, name: str, expected: float, **labels: str) -> dict:
    """Scrape until ``name{labels}`` equals ``expected`` (events land asynchronously)."""
    for _ in range(100):
        samples = await scrape(server)
        if value(samples, name, **labels) == expected:
            return samples
        await asyncio.sleep(0.2)
    pytest.fail(f"{name}{labels} never reached {expected}: {samples}\n{server.logs()}")


async def execute(server: JupyterServer, kid: str, code: str, timeout: float = 60) -> list[dict]:
    """Run ``code``; messages until the execution is idle or the kernel restarts."""
    return (await ws_execute(server.base, kid, code, timeout))[1]


async def wait_until_usable(server: JupyterServer, kid: str) -> None:
    for _ in range(60):
        try:
            msgs = await execute(server, kid, "print('up')", timeout=5)
            if any(m["msg_type"] == "stream" for m in msgs):
                return
        except (TimeoutError, asyncio.TimeoutError):
            pass
        await asyncio.sleep(0.25)
    pytest.fail("kernel did not come back:\n" + server.logs())


async def test_metrics_count_each_event(jupyter_path, recovery_env):  # noqa: F811
    env, state, _ = recovery_env
    write_kernelspec(jupyter_path, "lim", LIM, "limited-process-provisioner")
    write_kernelspec(jupyter_path, "capped", {"max_kernels_per_user": 1, "owner": OWNER},
                     "limited-process-provisioner")
    write_kernelspec(jupyter_path, "idle", {"idle_timeout": 2, "owner": OWNER},
                     "limited-process-provisioner")
    # The server's reaper runs from its start: its period is server config.
    server = JupyterServer(jupyter_path, env, args=("--LimitedHost.reap_interval=1",))
    try:
        await server.start()
        samples = await scrape(server)
        assert value(samples, "limited_provisioner_kernels", backend="process", owner=OWNER) == 0

        # A start: live kernels and the start latency histogram.
        kid = (await server.api("POST", "/api/kernels", {"name": "lim"}))["id"]
        samples = await scrape(server)
        assert value(samples, "limited_provisioner_kernels", backend="process", owner=OWNER) == 1
        assert value(samples, "limited_provisioner_kernel_start_seconds_count",
                     backend="process") == 1

        # A refused start, by the limit that refused it.
        with pytest.raises(HTTPClientError) as refused:
            await server.api("POST", "/api/kernels", {"name": "capped"})
        assert refused.value.code == 429
        samples = await scrape(server)
        assert value(samples, "limited_provisioner_kernel_starts_refused_total",
                     limit="max_kernels_per_user") == 1

        # Limit trips: OOM kill, exec_timeout, pids, disk.
        await execute(server, kid, "a = []\nwhile True:\n    a.append(bytearray(2**20))")
        await wait_for(server, "limited_provisioner_limit_trips_total", 1, kind="mem_limit")
        await wait_until_usable(server, kid)

        msgs = await execute(server, kid, "while True: pass")
        assert any(m["msg_type"] == "error" and m["content"]["ename"] == "TimeoutError"
                   for m in msgs), [m["msg_type"] for m in msgs]
        await wait_for(server, "limited_provisioner_limit_trips_total", 1, kind="exec_timeout")

        await execute(server, kid, (
            "import subprocess\nps = []\ntry:\n"
            "    for _ in range(100): ps.append(subprocess.Popen(['sleep', '60']))\n"
            "except OSError as e:\n    print('refused', e)\n"
            "for p in ps: p.kill(); p.wait()\n"
        ))
        await wait_for(server, "limited_provisioner_limit_trips_total", 1, kind="pids_limit")

        await execute(server, kid, (
            "for i in range(3):\n"
            "    with open(f'big{i}', 'wb') as f: f.write(b'x' * 30 * 2**20)\n"
            "import time; time.sleep(30)"
        ))
        await wait_for(server, "limited_provisioner_limit_trips_total", 1, kind="disk_limit")
        await wait_until_usable(server, kid)

        # An idle cull.
        await server.api("POST", "/api/kernels", {"name": "idle"})
        await wait_for(server, "limited_provisioner_kernel_culls_total", 1, reason="idle_timeout")
        await wait_for(server, "limited_provisioner_kernels", 1, backend="process", owner=OWNER)

        # An orphan: a crashed agent (another server id) left an idle kernel behind.
        orphan_env = {**env, "LIMITED_PROVISIONER_SERVER_ID": "crashed-agent"}
        out = jupyter_path / "orphaner.out"
        with open(out, "w") as f:
            subprocess.run([sys.executable, "-c", ORPHANER.replace('"lim"', '"idle"')],
                           stdout=f, stderr=subprocess.STDOUT, env=orphan_env,
                           timeout=120, check=True)
        orphan = out.read_text().split()[-1]
        await wait_for(server, "limited_provisioner_orphans_reaped_total", 1, backend="process")
        assert Registry(state).read(orphan) is None

        # Adoption after a crash of the server.
        server.kill9()
        await server.start()
        samples = await wait_for(server, "limited_provisioner_kernel_adoptions_total", 1,
                                 backend="process")
        assert value(samples, "limited_provisioner_kernels", backend="process", owner=OWNER) == 1
        await server.api("DELETE", f"/api/kernels/{kid}")
        samples = await scrape(server)
        assert value(samples, "limited_provisioner_kernels", backend="process", owner=OWNER) == 0
    finally:
        await server.stop()
        print(server.logs()[-3000:])
