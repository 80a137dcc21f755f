"""Recovery time: a jupyter_server with 20 live limited kernels is SIGKILLed and started
again; measured is the time from spawning the new server to all 20 kernels listed under
their old ids *and* answering ``kernel_info`` over the WebSocket (target < 3 s). The
same server starting with no kernels is the floor, measured in the same run.

    python bench/recovery.py [--kernels 20] [--rounds 3] [--backends process,docker] [--markdown]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.websocket import websocket_connect

from common import REPO, write_kernelspec

TOKEN = "bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, workdir: Path, env: dict[str, str]):
        self.workdir, self.env = workdir, env
        self.client = AsyncHTTPClient()
        self.proc: subprocess.Popen | None = None

    async def start(self) -> float:
        """Spawn the server; return seconds until /api/status answers."""
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jupyter_server", f"--port={port}", "--ip=127.0.0.1",
             f"--IdentityProvider.token={TOKEN}", "--allow-root", "--no-browser",
             f"--ServerApp.root_dir={self.workdir}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=self.env,
        )
        self.t0 = t0
        while True:
            try:
                await self.client.fetch(f"{self.base}/api/status?token={TOKEN}")
                return time.perf_counter() - t0
            except Exception:  # not up yet
                if self.proc.poll() is not None:
                    raise RuntimeError("server exited") from None
                await asyncio.sleep(0.02)

    async def api(self, method: str, path: str, body: dict | None = None):
        resp = await self.client.fetch(HTTPRequest(
            f"{self.base}{path}?token={TOKEN}", method=method,
            body=json.dumps(body) if body is not None else None))
        return json.loads(resp.body) if resp.body else None

    async def kernel_info(self, kernel_id: str) -> None:
        url = self.base.replace("http", "ws") + f"/api/kernels/{kernel_id}/channels?token={TOKEN}"
        ws = await websocket_connect(url)
        msg_id = uuid.uuid4().hex
        ws.write_message(json.dumps({
            "header": {"msg_id": msg_id, "username": "b", "session": uuid.uuid4().hex,
                       "msg_type": "kernel_info_request", "version": "5.3", "date": ""},
            "parent_header": {}, "metadata": {}, "content": {}, "channel": "shell",
            "buffers": []}))
        try:
            while True:
                msg = json.loads(await asyncio.wait_for(ws.read_message(), 30))
                if (msg.get("msg_type") == "kernel_info_reply"
                        and msg["parent_header"].get("msg_id") == msg_id):
                    return
        finally:
            ws.close()

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=60)


async def one_round(backend: str, n: int, root: Path) -> tuple[float, float]:
    state = tempfile.mkdtemp(prefix="lp-bench-", dir="/var/lib")
    env = {**os.environ, "JUPYTER_PATH": str(root), "LIMITED_PROVISIONER_STATE_DIR": state,
           "LIMITED_PROVISIONER_SERVER_ID": "bench-" + uuid.uuid4().hex[:6],
           "JUPYTER_CONFIG_PATH": str(REPO / "jupyter_config")}
    workdir = Path(tempfile.mkdtemp(prefix="lp-bench-nb-"))
    server = Server(workdir, env)
    try:
        floor = await server.start()
        ids = []
        for _ in range(n):
            ids.append((await server.api("POST", "/api/kernels", {"name": f"b-{backend}"}))["id"])
        await asyncio.gather(*(server.kernel_info(k) for k in ids))
        server.kill9()
        await server.start()
        listed = {k["id"] for k in await server.api("GET", "/api/kernels")}
        if listed != set(ids):
            raise RuntimeError(f"adopted {len(listed & set(ids))}/{n}")
        await asyncio.gather(*(server.kernel_info(k) for k in ids))
        recovered = time.perf_counter() - server.t0
        for k in ids:
            await server.api("DELETE", f"/api/kernels/{k}")
        return floor, recovered
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        from limited_provisioner.reaper import remove_kernel
        from limited_provisioner.registry import Registry

        registry = Registry(state)
        for entry in registry.entries():
            remove_kernel(registry, entry)
        shutil.rmtree(state, ignore_errors=True)


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
            write_kernelspec(root, f"b-{backend}", backend,
                             {"mem_limit": "256M", "owner": "lp-bench"})
            results = [await one_round(backend, args.kernels, root) for _ in range(args.rounds)]
            floors = [r[0] for r in results]
            recovered = [r[1] for r in results]
            rows.append((backend, statistics.median(floors), statistics.median(recovered),
                         max(recovered)))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.markdown:
        print(f"| backend | server start, no kernels (floor) s | restart → {args.kernels} "
              f"kernels adopted + kernel_info, median s | max s | target |")
        print("|---|---:|---:|---:|---|")
        for b, f, r, m in rows:
            print(f"| {b} | {f:.2f} | {r:.2f} | {m:.2f} | < 3 s |")
    else:
        for b, f, r, m in rows:
            print(f"{b}: floor {f:.2f}s, recovered median {r:.2f}s, max {m:.2f}s (target < 3 s)")


if __name__ == "__main__":
    asyncio.run(main())
