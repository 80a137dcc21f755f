"""The seed incident replayed against examples/agent_backend: sessions of several users
run a few cells each while the service is SIGKILLed and restarted twice, a third of the
sessions are abandoned and the rest deleted.

Measured (per backend), on a private state dir, with the service as a uvicorn
subprocess exactly as deployed:

* **replay** -- executions that failed (target 0; those in flight at a kill are retried
  once by the client and counted apart), sessions whose ``x`` survived each restart
  (target all), sessions with more than one kernel in ``list_kernels(state_dir)`` at
  any 0.25 s sample, and in all registry entries (starts the kill interrupted stay in
  state ``starting``, which ``list_kernels`` hides) (target 0), kernels vs. sessions alive after the DELETEs, and what
  is left once the abandoned sessions' ``idle_timeout`` ran out (registry entries,
  kernel dirs, cgroups, processes, containers -- target 0). The seed's design (one
  container per session id on first use, never removed, the map lost at every restart)
  is the baseline: its container count is *computed* from the same run's request log.
* **overhead** -- ``POST /exec`` of ``1+1`` on a warm session vs. ``execute_interactive``
  of ``1+1`` on a warm kernel of the same kernelspec started from this process, N each,
  interleaved: p50/p90/p99 and the ratio.
* **files** -- ``PUT`` then ``GET /sessions/{id}/files/{path}`` of ``--files-mb`` MB of
  random bytes into a warm session (its kernel already running, ``disk_limit`` 1G),
  ``--files-runs`` times: PUT, GET and round-trip seconds (median), MiB/s, and whether
  every download was byte-identical (target: < 3 s for 100 MB).

Service settings (explicit, so that no cap gets in the way): ``RATE_LIMIT=0``,
``MAX_KERNELS=none``, ``MAX_KERNELS_PER_USER=none``, ``MEM_LIMIT=256M``,
``IDLE_TIMEOUT=--idle-timeout``. The idle timeout must exceed the longest pause of a
session (a restart included), or a kernel is culled for idleness and its ``x`` is lost
for a reason other than the restart; the table shows that pause.

Everything started is removed afterwards, even on failure: the service by pid, every
kernel of the private state dir through its registry entry, containers by the state-dir
label.

    python bench/agent_backend.py [--backend process|docker|process,docker]
        [--sessions 40] [--users 4] [--concurrency 8] [--idle-timeout 20] [-n 100]
        [--parts replay,overhead,files] [--files-mb 100] [--files-runs 3] [--markdown]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import itertools
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo: tests.harness
from limited_provisioner import list_kernels
from limited_provisioner.registry import Registry
from tests.harness import (
    AgentBackendService,
    containers_with_label,
    kernel_leftovers,
    remove_all_kernels,
)

KERNEL_NAME = "agent-python"
SESSION_LABEL = "session_id"
SAMPLE_INTERVAL = 0.25
SWEEP_INTERVAL = 30.0  # examples/agent_backend/kernels.py: culled sessions leave the map
RECOVERED = re.compile(r"recovered (\d+) session\(s\); (\d+) kernel\(s\) without a session")


def pct(values: list[float], q: int) -> float:
    """The q-th percentile (inclusive method), in ms."""
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1000


# -- the service -------------------------------------------------------------------------


class ReplayService(AgentBackendService):
    """The service as the replay drives it: async requests, and each SIGKILL + start is
    one incarnation, during which requests wait for ``up``."""

    def __init__(self, backend: str, state: Path, log_dir: Path, idle_timeout: float):
        super().__init__(state, "bench-ab-" + uuid.uuid4().hex[:8], log_dir, {
            "BACKEND": backend,
            "MEM_LIMIT": "256M",
            "IDLE_TIMEOUT": f"{idle_timeout:g}",
            "MAX_KERNELS": "none",
            "MAX_KERNELS_PER_USER": "none",
            "RATE_LIMIT": "0",
            "DISK_LIMIT": "1G",
        })
        self.incarnation = 0  # SIGKILLs so far; raised *before* the kill
        self.up = asyncio.Event()
        self.http = httpx.AsyncClient(timeout=180, limits=httpx.Limits(max_connections=64))

    async def serve(self) -> float:
        """Start (in a thread: the replay's sampler runs meanwhile); seconds until
        /health answers, re-adoption included."""
        seconds = await asyncio.to_thread(self.start)
        self.up.set()
        return seconds

    async def kill_and_restart(self) -> float:
        self.up.clear()
        self.incarnation += 1
        self.kill9()
        return await self.serve()

    async def post(self, user: str, session_id: str, code: str) -> httpx.Response:
        return await self.http.post(
            f"{self.base}/exec", json={"session_id": session_id, "code": code},
            headers=self.headers(user),
        )

    async def delete(self, user: str, session_id: str) -> httpx.Response:
        return await self.http.delete(
            f"{self.base}/sessions/{session_id}", headers=self.headers(user))

    async def sessions(self, user: str) -> list[dict]:
        resp = await self.http.get(f"{self.base}/sessions", headers=self.headers(user))
        resp.raise_for_status()
        return resp.json()


# -- the replay --------------------------------------------------------------------------


@dataclass
class Call:
    """One execution as the client saw it (after at most one retry)."""

    session: int
    code: str
    uses_x: bool
    incarnation: int = -1  # the service incarnation that answered
    hit_kill: bool = False  # in flight at a SIGKILL, retried once
    ok: bool = False
    error: str = ""
    sent_at: float = 0.0  # of the attempt that was answered
    answered_at: float = 0.0


@dataclass
class Run:
    calls: list[Call] = field(default_factory=list)
    restarts: list[float] = field(default_factory=list)  # spawn -> /health, s
    kill_times: list[float] = field(default_factory=list)
    restart_done: list[float] = field(default_factory=list)
    max_duplicates: int = 0
    max_duplicates_all: int = 0
    peak_kernels: int = 0
    ids_seen: set[str] = field(default_factory=set)


def cells(i: int) -> dict[str, list[tuple[str, str | None]]]:
    """Per phase, (code, expected text/plain) of session ``i``; None = no output."""
    if i % 4 == 0:
        work = ("import pandas as pd\nint(pd.Series(range(100)).sum()) + x", str(4950 + i))
    elif i % 4 == 1:
        work = ("import numpy as np\nint(np.arange(1000).sum()) + x", str(499500 + i))
    else:
        work = ("sum(k * k for k in range(1000)) + x", str(332833500 + i))
    check = ("x + 1", str(i + 1))
    return {"create": [(f"x = {i}", None), check], "work": [work, check], "verify": [check]}


async def execute(svc: ReplayService, run: Run, i: int, user: str, code: str,
                  expect: str | None) -> Call:
    call = Call(i, code, uses_x=expect is not None)
    for attempt in (1, 2):
        await svc.up.wait()
        incarnation = svc.incarnation
        call.sent_at = time.monotonic()
        try:
            resp = await svc.post(user, f"chat-{i}", code)
        except httpx.TransportError as e:
            if attempt == 1 and svc.incarnation != incarnation:
                call.hit_kill = True  # the service died under this request: retry once
                continue
            call.error = f"{type(e).__name__}: {e}"
            break
        call.incarnation, call.answered_at = svc.incarnation, time.monotonic()
        try:
            body = resp.json()
        except ValueError:  # not the service's JSON (a 500 page): judged below as failed
            body = {"text": resp.text}
        if body.get("kernel_id"):
            run.ids_seen.add(body["kernel_id"])
        texts = [o.get("text") for o in body.get("outputs", []) if o.get("text") is not None]
        got = texts[-1] if texts else None
        if resp.status_code == 200 and body.get("status") == "ok" and got == expect:
            call.ok = True
        else:
            call.error = (f"HTTP {resp.status_code} status={body.get('status')} "
                          f"got={got!r} want={expect!r}: {body.get('text', '')[-300:]!r}")
        break
    run.calls.append(call)
    return call


def duplicates(entries: list[dict[str, Any]]) -> int:
    """Sessions (owner, session_id label) with more than one entry."""
    per_session = Counter(
        (e.get("owner"), (e.get("labels") or {}).get(SESSION_LABEL)) for e in entries)
    return sum(1 for n in per_session.values() if n > 1)


async def sample(state: Path, run: Run) -> None:
    """Duplicates and peak kernels in the registry, every SAMPLE_INTERVAL.

    Counted twice: over ``list_kernels()`` (running kernels, what the service
    re-adopts from) and over every registry entry, which also holds starts that never
    reached ``running`` (the server died in between) -- invisible to ``list_kernels``.
    """
    registry = Registry(state)
    while True:
        running = await asyncio.to_thread(list_kernels, state)
        every = await asyncio.to_thread(registry.entries)
        run.ids_seen.update(e["kernel_id"] for e in every)
        run.max_duplicates = max(run.max_duplicates, duplicates(running))
        run.max_duplicates_all = max(run.max_duplicates_all, duplicates(every))
        run.peak_kernels = max(run.peak_kernels, len(running))
        await asyncio.sleep(SAMPLE_INTERVAL)


async def phase(svc: ReplayService, run: Run, name: str, n: int, users: int, concurrency: int,
                kill_after: int | None) -> None:
    """Every session runs its cells of ``name``, ``concurrency`` sessions at a time;
    after ``kill_after`` sessions are done the service is SIGKILLed and restarted."""
    sem = asyncio.Semaphore(concurrency)
    done = 0
    trigger = asyncio.Event()

    async def one(i: int) -> None:
        nonlocal done
        async with sem:
            try:
                for code, expect in cells(i)[name]:
                    await execute(svc, run, i, f"ab-u{i % users}", code, expect)
            finally:
                done += 1
                if done == kill_after:
                    trigger.set()

    async def killer() -> None:
        await trigger.wait()
        run.kill_times.append(time.monotonic())
        run.restarts.append(await svc.kill_and_restart())
        run.restart_done.append(time.monotonic())

    jobs = [one(i) for i in range(n)] + ([killer()] if kill_after else [])
    await asyncio.gather(*jobs)


def naive_design(run: Run, n: int) -> dict[str, int]:
    """What the seed's API would have done with the same requests (computed).

    One container per session id on first use, never removed (no DELETE, no TTL), the
    map lost at every restart: a session gets a new container in every incarnation of
    the service that served it, and there ``x`` is gone.
    """
    served: dict[int, set[int]] = {i: set() for i in range(n)}
    defined_in: dict[int, int] = {}
    lost = 0
    for call in sorted((c for c in run.calls if c.incarnation >= 0),
                       key=lambda c: c.answered_at):
        served[call.session].add(call.incarnation)
        if not call.uses_x:
            defined_in[call.session] = call.incarnation
        elif defined_in.get(call.session) != call.incarnation:
            lost += 1  # NameError: x lives in the container of an earlier incarnation
    containers = sum(len(s) for s in served.values())
    return {"containers": containers, "duplicates": containers - sum(1 for s in served.values() if s),
            "failed": lost}


async def replay(svc: ReplayService, args: argparse.Namespace) -> dict[str, Any]:
    n, run = args.sessions, Run()
    sampler = asyncio.ensure_future(sample(svc.state, run))
    t0 = time.monotonic()
    try:
        await phase(svc, run, "create", n, args.users, args.concurrency, kill_after=n // 2)
        await phase(svc, run, "work", n, args.users, args.concurrency, kill_after=n // 2)
        await phase(svc, run, "verify", n, args.users, args.concurrency, kill_after=None)
        abandoned = [i for i in range(n) if i % 3 == 0]
        deleted = [i for i in range(n) if i % 3 != 0]
        answers = await asyncio.gather(
            *(svc.delete(f"ab-u{i % args.users}", f"chat-{i}") for i in deleted))
        delete_failed = sum(1 for r in answers if r.status_code != 200)
        kernels_after_delete = len(await asyncio.to_thread(list_kernels, svc.state))
        listed = await asyncio.gather(*(svc.sessions(f"ab-u{u}") for u in range(args.users)))
        sessions_after_delete = sum(len(x) for x in listed)
        elapsed = time.monotonic() - t0
        # The abandoned sessions: culled by the provisioner after idle_timeout.
        last_use = max(c.answered_at for c in run.calls if c.session in abandoned)
        deadline = time.monotonic() + args.idle_timeout + 30
        while await asyncio.to_thread(list_kernels, svc.state) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        culled_after = time.monotonic() - last_use
        # ...and the service's map forgets them at its next sweep.
        deadline = time.monotonic() + SWEEP_INTERVAL + 5
        while time.monotonic() < deadline:
            health = (await svc.http.get(f"{svc.base}/health")).json()
            if health["sessions"] == 0:
                break
            await asyncio.sleep(0.5)
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    await asyncio.sleep(1)  # a last shutdown may still be removing its dir
    left = await asyncio.to_thread(kernel_leftovers, svc.state, run.ids_seen)
    for entry in Registry(svc.state).entries():  # evidence, before the cleanup removes it
        print(f"left in the registry: {json.dumps(entry, sort_keys=True)}", file=sys.stderr)
    for container in containers_with_label("state-dir", str(svc.state)):
        print(f"left container {container.name}: {container.status}", file=sys.stderr)

    # Survival of x: a session defined before kill k whose first x-reading call
    # answered after restart k saw the right value.
    survived, at_risk = [], []
    for k, kill_time in enumerate(run.kill_times, start=1):
        defined = {c.session for c in run.calls
                   if not c.uses_x and c.ok and c.answered_at < kill_time}
        first_after: dict[int, Call] = {}
        for c in sorted(run.calls, key=lambda c: c.answered_at):
            if c.uses_x and c.incarnation >= k and c.session in defined:
                first_after.setdefault(c.session, c)
        at_risk.append(len(defined))
        survived.append(sum(1 for s in defined if s in first_after and first_after[s].ok))
    # The longest idle stretch of a kernel during the replay (what idle_timeout must
    # cover): between two executions of its session, cut at each restart, whose
    # re-adoption (a kernel_info request) counts as activity for the idle clock.
    by_session: dict[int, list[float]] = {}
    for c in run.calls:
        if c.incarnation >= 0:
            by_session.setdefault(c.session, []).extend((c.sent_at, c.answered_at))
    longest_pause = 0.0
    for times in by_session.values():
        first, last = min(times), max(times)
        times = sorted(times + [t for t in run.restart_done if first < t < last])
        longest_pause = max(longest_pause, *(b - a for a, b in itertools.pairwise(times)))
    recovered = [m.groups() for m in RECOVERED.finditer(svc.logs())]
    return {
        "run": run,
        "executions": len(run.calls),
        "hit_kill": sum(1 for c in run.calls if c.hit_kill),
        "hit_kill_ok": sum(1 for c in run.calls if c.hit_kill and c.ok),
        "failed": [c for c in run.calls if not c.ok],
        "survived": survived,
        "at_risk": at_risk,
        "restarts": run.restarts,
        "recovered": recovered[1:],  # the first start had nothing to recover
        "max_duplicates": run.max_duplicates,
        "max_duplicates_all": run.max_duplicates_all,
        "peak_kernels": run.peak_kernels,
        "kernels_after_delete": kernels_after_delete,
        "sessions_after_delete": sessions_after_delete,
        "abandoned": len(abandoned),
        "delete_failed": delete_failed,
        "culled_after": culled_after,
        "health_sessions": health["sessions"],
        "longest_pause": longest_pause,
        "elapsed": elapsed,
        "left": left,
        "naive": naive_design(run, n),
    }


# -- the overhead ------------------------------------------------------------------------


async def overhead(svc: ReplayService, args: argparse.Namespace,
                   spec_root: Path) -> dict[str, Any]:
    """POST /exec '1+1' vs. execute_interactive '1+1', both warm, interleaved."""
    # The service's own kernelspec, under another server_id (the service must not adopt
    # or count this kernel as one of its own) and without a reaper in this process.
    spec = json.loads((svc.state / "agent-backend-kernelspecs" / KERNEL_NAME
                       / "kernel.json").read_text())
    config = spec["metadata"]["kernel_provisioner"]["config"]
    config.update(server_id=svc.server_id + "-direct", reap_interval=0)
    (spec_root / KERNEL_NAME).mkdir(parents=True)
    (spec_root / KERNEL_NAME / "kernel.json").write_text(json.dumps(spec))
    km = AsyncKernelManager(kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(spec_root)]),
                            kernel_name=KERNEL_NAME)
    kc = None
    try:
        await km.start_kernel(env={**os.environ, "LIMITED_PROVISIONER_OWNER": "ab-direct"})
        kc = km.client()
        kc.start_channels()
        await kc.wait_for_ready(timeout=60)

        async def via_http() -> float:
            t = time.perf_counter()
            resp = await svc.post("ab-lat", "lat", "1+1")
            body = resp.json()
            elapsed = time.perf_counter() - t
            if body["status"] != "ok" or body["outputs"][0]["text"] != "2":
                raise RuntimeError(f"POST /exec 1+1: {body}")
            return elapsed

        async def direct() -> float:
            got: list[str] = []

            def hook(msg: dict) -> None:
                if msg["msg_type"] == "execute_result":
                    got.append(msg["content"]["data"]["text/plain"])

            t = time.perf_counter()
            reply = await kc.execute_interactive("1+1", timeout=30, output_hook=hook)
            elapsed = time.perf_counter() - t
            if reply["content"]["status"] != "ok" or got != ["2"]:
                raise RuntimeError(f"execute_interactive 1+1: {reply['content']} {got}")
            return elapsed

        for _ in range(5):  # warm-up: the session's kernel start, imports, connections
            await via_http()
            await direct()
        http_t, direct_t = [], []
        for j in range(args.n):
            if j % 2:
                http_t.append(await via_http())
                direct_t.append(await direct())
            else:
                direct_t.append(await direct())
                http_t.append(await via_http())
        await svc.delete("ab-lat", "lat")
    finally:
        if kc is not None:
            kc.stop_channels()
        if km.has_kernel:
            await km.shutdown_kernel(now=True)
    return {"http": http_t, "direct": direct_t}


# -- files -------------------------------------------------------------------------------


async def files_round_trip(svc: ReplayService, args: argparse.Namespace) -> dict[str, Any]:
    """PUT then GET ``--files-mb`` MB in a warm session, ``--files-runs`` times."""
    size = args.files_mb * 1000 * 1000
    block = os.urandom(1 << 20)
    payload = block * (size // len(block)) + block[: size % len(block)]
    digest = hashlib.sha256(payload).hexdigest()
    user, session = "ab-files", "files"
    target = f"{svc.base}/sessions/{session}/files/data/payload.bin"
    headers = svc.headers(user)
    warm = await svc.http.put(f"{svc.base}/sessions/{session}/files/warm.txt", content=b"1",
                              headers=headers)  # starts the session's kernel
    warm.raise_for_status()
    puts, gets, identical = [], [], 0
    try:
        for _ in range(args.files_runs):
            t = time.perf_counter()
            resp = await svc.http.put(target, content=payload, headers=headers)
            puts.append(time.perf_counter() - t)
            if resp.status_code != 200:
                raise RuntimeError(f"PUT: HTTP {resp.status_code}: {resp.text[:300]}")
            got = hashlib.sha256()
            t = time.perf_counter()
            async with svc.http.stream("GET", target, headers=headers) as resp:
                if resp.status_code != 200:
                    raise RuntimeError(f"GET: HTTP {resp.status_code}")
                async for chunk in resp.aiter_raw():
                    got.update(chunk)
            gets.append(time.perf_counter() - t)
            identical += got.hexdigest() == digest
    finally:
        await svc.delete(user, session)
    return {"size": size, "put": puts, "get": gets, "identical": identical}


def files_rows(results: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for r in results:
        f = r["files"]
        put, get = statistics.median(f["put"]), statistics.median(f["get"])
        trips = [a + b for a, b in zip(f["put"], f["get"])]
        rows.append([
            r["backend"], f"{f['size'] / 1e6:g} MB", str(len(trips)), f"{put:.2f}", f"{get:.2f}",
            f"{statistics.median(trips):.2f} ({min(trips):.2f}–{max(trips):.2f})",
            f"{f['size'] / (1 << 20) / put:.0f} / {f['size'] / (1 << 20) / get:.0f}",
            f"{f['identical']}/{len(trips)}",
        ])
    return rows


# -- one backend, cleanup, output ----------------------------------------------------------


async def bench_backend(backend: str, args: argparse.Namespace) -> dict[str, Any]:
    # Short on purpose: the kernels' ipc socket paths live under it.
    state = Path(tempfile.mkdtemp(prefix="lp-ab-", dir="/var/lib"))
    scratch = Path(tempfile.mkdtemp(prefix="lp-ab-bench-"))
    svc = None
    ok = False
    try:
        svc = ReplayService(backend, state, scratch, args.idle_timeout)
        first_start = await svc.serve()
        result: dict[str, Any] = {}
        if "files" in args.parts:
            result["files"] = await files_round_trip(svc, args)
        if "overhead" in args.parts:
            result["lat"] = await overhead(svc, args, scratch / "kernels")
        if "replay" in args.parts:
            result.update(await replay(svc, args))
        result.update(backend=backend, first_start=first_start)
        ok = True
        return result
    finally:
        if svc is not None:
            if not ok or args.logs:
                print(f"--- service log ({backend}) ---\n{svc.logs()[-12000:]}", file=sys.stderr)
            await svc.http.aclose()
            svc.close()
        await asyncio.to_thread(remove_all_kernels, state)
        shutil.rmtree(scratch, ignore_errors=True)


def replay_rows(results: list[dict[str, Any]], args: argparse.Namespace) -> list[list[str]]:
    n = args.sessions

    def row(label: str, target: str, fn) -> list[str]:
        return [label, *(str(fn(r)) for r in results), target]

    rows = [
        row(f"executions ({n} sessions × 5 cells)", "", lambda r: r["executions"]),
        row("in flight at a SIGKILL, retried once (ok on retry)", "report",
            lambda r: f"{r['hit_kill']} ({r['hit_kill_ok']})"),
        row("executions failed (after the retry)", "0", lambda r: len(r["failed"])),
        row("restart: spawn → /health incl. re-adoption, s", "report",
            lambda r: " / ".join(f"{t:.2f}" for t in r["restarts"])),
        row("sessions re-adopted by the service (log)", "report",
            lambda r: " / ".join(a for a, _ in r["recovered"])),
    ]
    for k in range(2):
        rows.append(row(f"sessions whose x survived restart {k + 1}", "all",
                        lambda r, k=k: f"{r['survived'][k]}/{r['at_risk'][k]}"))
    rows += [
        row("sessions with >1 kernel in list_kernels(), worst 0.25 s sample", "0",
            lambda r: r["max_duplicates"]),
        row("same over all registry entries (incl. stuck 'starting')", "0",
            lambda r: r["max_duplicates_all"]),
        row("peak running kernels (list_kernels)", f"≤ {n}", lambda r: r["peak_kernels"]),
        row(f"after DELETE of {n - len(range(0, n, 3))}: kernels / sessions listed",
            f"{len(range(0, n, 3))} / {len(range(0, n, 3))}",
            lambda r: f"{r['kernels_after_delete']} / {r['sessions_after_delete']}"),
        row("DELETEs not answered 200", "0", lambda r: r["delete_failed"]),
        row(f"abandoned culled (idle_timeout={args.idle_timeout:g}s) after, s", "report",
            lambda r: f"{r['culled_after']:.1f}"),
        row("longest idle stretch of a used kernel, s", f"< {args.idle_timeout:g}",
            lambda r: f"{r['longest_pause']:.1f}"),
        row("service map after its sweep (/health sessions)", "0",
            lambda r: r["health_sessions"]),
    ]
    for key in ("registry entries", "kernel dirs", "cgroups", "processes", "containers"):
        rows.append(row(f"left at the end: {key}", "0", lambda r, key=key: r["left"][key]))
    rows += [
        row("seed design, computed: containers created = left running at the end", "—",
            lambda r: r["naive"]["containers"]),
        row("seed design, computed: of which orphaned by a restart (2nd+ of a session)", "—",
            lambda r: r["naive"]["duplicates"]),
        row("seed design, computed: executions failing on a lost x", "—",
            lambda r: r["naive"]["failed"]),
        row("wall time of the replay (before the TTL wait), s", "", lambda r: f"{r['elapsed']:.1f}"),
    ]
    return rows


def overhead_rows(results: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for r in results:
        http_t, direct_t = r["lat"]["http"], r["lat"]["direct"]
        h = [pct(http_t, q) for q in (50, 90, 99)]
        d = [pct(direct_t, q) for q in (50, 90, 99)]
        rows.append([r["backend"], "execute_interactive (direct, baseline)",
                     *(f"{v:.2f}" for v in d), "1.00"])
        rows.append([r["backend"], "POST /exec (HTTP + service)", *(f"{v:.2f}" for v in h),
                     f"{h[0] / d[0]:.2f}"])
        rows.append([r["backend"], "difference, ms", *(f"{a - b:+.2f}" for a, b in zip(h, d)),
                     ""])
    return rows


def table(header: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |",
                 "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(r, widths)) for r in [header, *rows])


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="process",
                        help="process, docker, or both comma-separated (default process)")
    parser.add_argument("--sessions", type=int, default=40)
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=8,
                        help="sessions executing at the same time (default 8)")
    parser.add_argument("--idle-timeout", type=float, default=20,
                        help="the service's idle_timeout in s (default 20)")
    parser.add_argument("-n", type=int, default=100, help="executions per path (overhead)")
    parser.add_argument("--parts", default="replay,overhead,files",
                        help="which parts to run, comma-separated (default all)")
    parser.add_argument("--files-mb", type=int, default=100,
                        help="MB (10^6 bytes) per upload/download (default 100)")
    parser.add_argument("--files-runs", type=int, default=3)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--logs", action="store_true", help="print the service logs")
    args = parser.parse_args()
    backends = args.backend.split(",")
    args.parts = set(args.parts.split(","))
    if not set(backends) <= {"process", "docker"} or args.sessions < 6:
        parser.error("--backend: process and/or docker; --sessions: at least 6")
    if not args.parts <= {"replay", "overhead", "files"}:
        parser.error("--parts: replay, overhead and/or files")
    results = []
    for backend in backends:
        t0 = time.monotonic()
        results.append(await bench_backend(backend, args))
        print(f"{backend}: {time.monotonic() - t0:.0f} s", file=sys.stderr)
    for r in results:
        for c in r.get("failed", [])[:10]:
            print(f"{r['backend']}: session {c.session} {c.code!r}: {c.error}", file=sys.stderr)

    if "replay" in args.parts:
        print(f"Replay: {args.sessions} sessions of {args.users} users, concurrency "
              f"{args.concurrency}, SIGKILL + restart after half the sessions of the create "
              f"and of the work phase; every third session abandoned. Service: RATE_LIMIT=0, "
              f"MAX_KERNELS=none, MAX_KERNELS_PER_USER=none, MEM_LIMIT=256M, DISK_LIMIT=1G, "
              f"IDLE_TIMEOUT={args.idle_timeout:g}.\n")
        print(table(["", *(r["backend"] for r in results), "target"],
                    replay_rows(results, args), args.markdown))
    if "overhead" in args.parts:
        print(f"\nOverhead: '1+1' on a warm session, N={args.n} each, interleaved, ms.\n")
        print(table(["backend", "path", "p50", "p90", "p99", "p50 ratio"],
                    overhead_rows(results), args.markdown))
    if "files" in args.parts:
        print(f"\nFiles: PUT then GET of {args.files_mb} MB of random bytes in a warm session "
              f"(disk_limit 1G), {args.files_runs} runs, median seconds; target: round trip "
              f"< 3 s for 100 MB.\n")
        print(table(["backend", "size", "runs", "PUT s", "GET s", "round trip s (min–max)",
                     "MiB/s PUT / GET", "byte-identical"], files_rows(results), args.markdown))


if __name__ == "__main__":
    asyncio.run(main())
