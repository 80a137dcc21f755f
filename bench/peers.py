"""The peers' own test suites, run through limited kernels: what breaks for code written
against stock jupyter_client kernels when every kernel runs under our provisioners.

For the *installed* versions of nbclient, jupyter_server and jupyter_client, downloads
their sdists, builds (once, cached) a venv with this repo and their ``[test]`` extras, and
runs a selection of each suite once with stock kernels and once per limited backend. In
limited mode the pytest plugin ``bench/peers_plugin.py`` resolves every python kernelspec
without a provisioner to a limited one (mem_limit 1G) and records which provisioner
started each kernel. After each run it looks for what the run's kernels left behind
(registry entries, processes, cgroups, containers), reports and removes it.

Prints: suite | stock passed/total | limited-<backend> passed/total | limited-only
failures | leftovers; then each limited-only failure (test id, first line of the error),
then the tests that fail with stock kernels too.

Exit status 1 when a limited-only failure is not in the allow-list (KNOWN_BY_DESIGN or
``--allow FILE``), when a run left something behind, when a limited run started no
limited kernel, or when a run did not finish (whole-run timeout, no results).

    python bench/peers.py [--suites nbclient,jupyter_server,jupyter_client]
                          [--kernels stock,process[,docker]] [--cache-dir DIR]
                          [--state-root DIR] [--test-timeout 120] [--run-timeout 2400]
                          [--allow FILE] [--json out.json] [--setup-only]

The peers' test dependencies (pytest-jupyter registers pytest plugins) live only in the
cache's venv, never in the environment that runs this repo's own tests.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo: tests.harness
from limited_provisioner.process.cgroups import kernel_group_dirs
from limited_provisioner.registry import Registry, is_alive
from limited_provisioner.watchdog import KERNEL_ID_ENV
from tests.harness import (
    KERNEL_IMAGE,
    REPO,
    containers_with_label,
    docker_available,
    kill_kernel_leftovers,
    remove_all_kernels,
)

# Never under /tmp: a limited process kernel gets a private tmpfs there, so the venv's
# interpreter (the kernels' argv[0]) would not exist inside its sandbox.
DEFAULT_CACHE = Path("/var/lib/limited-provisioner-peers")
# Short on purpose: a kernel's ipc sockets live under its state dir, and a unix socket
# path has 107 bytes at most.
DEFAULT_STATE_ROOT = Path("/var/lib/lp-peers")

# suite -> (distribution, test paths inside its sdist)
SUITES = {
    "nbclient": ("nbclient", ["tests"]),
    "jupyter_server": ("jupyter_server", ["tests/services/kernels", "tests/services/sessions"]),
    "jupyter_client": ("jupyter_client", [
        "tests/test_kernelmanager.py", "tests/test_multikernelmanager.py",
        "tests/test_provisioning.py", "tests/test_restarter.py",
    ]),
}
BACKENDS = ("process", "docker")
# Test deps the [test] extras leave out but the runs need.
EXTRA_REQUIREMENTS = ["pytest-timeout"]
# Pinned to what the dev venv runs, so a difference between the two environments is not
# a version difference of the kernel side.
PINNED_LIKE_DEV = ["ipykernel", "ipython", "pyzmq", "tornado", "traitlets", "jupyter_core"]

# Limited-only failures whose test's premise contradicts a limit by design:
# test id (pytest node id, as printed) -> why. Also read from --allow FILE.
_FAILED_START = (
    "a kernel that exits before it opens its sockets fails the start itself "
    "(SandboxStartError with its last output: 503 through jupyter_server) instead of "
    "being handed to the restarter as a started kernel"
)
KNOWN_BY_DESIGN: dict[str, str] = {
    **{
        f"tests/test_client.py::{name}": (
            "the cell reads a variable the test put into the server's own environment "
            "(env_keep passes only an allow-list of it) and writes into a host tmp dir "
            "(the host filesystem is read-only for the kernel)"
        )
        for name in ("test_parallel_notebooks", "test_async_parallel_notebooks")
    },
    **{
        f"tests/test_restarter.py::{name}[{transport}]": _FAILED_START
        for name in ("test_restarter_gives_up", "test_async_restarter_gives_up")
        for transport in ("tcp", "ipc")
    },
    "tests/services/kernels/test_transport_encryption.py::"
    "test_transport_encryption_auto_skips_keys_for_non_curve_kernel": _FAILED_START,
    **{
        f"tests/test_multikernelmanager.py::{cls}::test_tcp_cinfo": (
            "a manager whose transport was left at its default gets ipc sockets in a "
            "server-only dir for its clients, not loopback tcp that any local user can "
            "connect to (a transport it was told, tcp or an ipc prefix, is served: "
            "test_ipc_cinfo passes)"
        )
        for cls in ("TestKernelManager", "TestAsyncKernelManager")
    },
}


# -- setup ---------------------------------------------------------------------------------


def run_checked(cmd: list[str], **kw) -> None:
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, **kw)


def sdist_sources(cache: Path, versions: dict[str, str]) -> dict[str, Path]:
    """dist -> its extracted sdist, downloaded and extracted if not there yet."""
    sdists, src = cache / "sdists", cache / "src"
    sdists.mkdir(parents=True, exist_ok=True)
    src.mkdir(exist_ok=True)
    result = {}
    for dist, version in versions.items():
        target = src / f"{dist}-{version}"
        result[dist] = target
        if (target / "pyproject.toml").is_file():
            continue
        # sdist file names use the normalized project name (jupyter_server-2.21.1.tar.gz).
        pattern = f"{re.sub(r'[-_.]+', '_', dist).lower()}-{version}.tar.gz"
        archive = next(iter(sdists.glob(pattern)), None)
        if archive is None:
            run_checked([sys.executable, "-m", "pip", "download", "--no-deps",
                         "--no-binary", ":all:", f"{dist}=={version}", "-d", str(sdists)])
            archive = next(iter(sdists.glob(pattern)))
        with tarfile.open(archive) as tar:
            tar.extractall(src, filter="data")
        if not (target / "pyproject.toml").is_file():
            raise RuntimeError(f"{archive} did not extract to {target}")
    return result


def ensure_venv(cache: Path, versions: dict[str, str]) -> Path:
    """The peers' venv (its python), created with this interpreter; recreated when the
    interpreter, the peers' versions, the pins or the repo path changed."""
    venv = cache / "venv"
    pins = {}
    for dist in PINNED_LIKE_DEV:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            pins[dist] = importlib.metadata.version(dist)
    stamp = {"python": sys.executable, "python_version": sys.version, "peers": versions,
             "pins": pins, "repo": str(REPO), "extra": EXTRA_REQUIREMENTS}
    stamp_file = venv / "peers-stamp.json"
    with contextlib.suppress(OSError, ValueError):
        if json.loads(stamp_file.read_text()) == stamp:
            return venv / "bin" / "python"
    shutil.rmtree(venv, ignore_errors=True)
    run_checked([sys.executable, "-m", "venv", str(venv)])
    python = venv / "bin" / "python"
    constraints = cache / "constraints.txt"
    constraints.write_text("".join(f"{d}=={v}\n" for d, v in {**pins, **versions}.items()))
    run_checked([str(python), "-m", "pip", "install", "-q", "--upgrade", "pip"])
    run_checked([str(python), "-m", "pip", "install", "-q", "-c", str(constraints),
                 "-e", str(REPO),
                 *(f"{d}[test]=={v}" for d, v in versions.items()), *EXTRA_REQUIREMENTS])
    stamp_file.write_text(json.dumps(stamp, indent=1))
    return python


def plugin_dir(cache: Path) -> Path:
    """A directory holding only peers_plugin.py, for the runs' PYTHONPATH: the repo root
    or bench/ there would put our ``tests`` package (or the benches) in front of the
    peer's own."""
    d = cache / "plugin"
    d.mkdir(parents=True, exist_ok=True)
    link = d / "peers_plugin.py"
    target = Path(__file__).resolve().parent / "peers_plugin.py"
    if not (link.is_symlink() and link.resolve() == target):
        link.unlink(missing_ok=True)
        link.symlink_to(target)
    return d


# -- one run -------------------------------------------------------------------------------


@dataclass
class Run:
    suite: str
    mode: str  # "stock" or a backend
    dir: Path
    tmp: Path
    state_dir: Path | None
    seconds: float = 0.0
    timed_out: bool = False
    returncode: int | None = None
    results: dict[str, dict] = field(default_factory=dict)  # test id -> outcome, message
    records: list[dict] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return "stock" if self.mode == "stock" else f"limited-{self.mode}"

    def provisioner_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for r in self.records:
            if r["event"] == "launched":
                counts[r["cls"]] = counts.get(r["cls"], 0) + 1
        return counts

    def limited_launches(self) -> int:
        return sum(1 for r in self.records
                   if r["event"] == "launched" and r["module"].startswith("limited_provisioner"))

    def stock_launches(self) -> int:
        """Kernels launched by another provisioner in a limited run: a test's own
        provisioner, or a kernelspec the plugin left alone (see its not-wrapped records)."""
        return sum(1 for r in self.records
                   if r["event"] == "launched"
                   and not r["module"].startswith("limited_provisioner"))

    def kernel_ids(self) -> set[str]:
        return {r["kernel_id"] for r in self.records
                if r["event"] in ("provisioner", "launched") and r.get("kernel_id")}

    def counts(self) -> tuple[int, int, int]:
        """passed, total (not skipped), skipped."""
        outcomes = [r["outcome"] for r in self.results.values()]
        skipped = outcomes.count("skipped")
        return outcomes.count("passed"), len(outcomes) - skipped, skipped


def run_suite(suite: str, mode: str, python: Path, src: Path, args, cache: Path,
              only: list[str] | None = None) -> Run:
    """One pytest run of ``suite`` on ``mode``'s kernels; ``only``: these test ids (a
    rerun of failures), in a run dir of its own."""
    name = f"{suite}-{mode}" + ("-rerun" if only else "")
    run_dir = cache / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    # A tmp dir of its own: the peers' fixtures put HOME, JUPYTER_PATH, runtime dirs (so
    # the connection files) under it, which is how leftover processes are told apart from
    # other people's. Next to the state dirs, to keep ipc paths short.
    tmp = args.state_root / "tmp" / name
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state_dir = None if mode == "stock" else args.state_root / f"{suite}-{mode}"
    if state_dir is not None and state_dir.exists():
        remove_all_kernels(state_dir)  # a previous bench's, killed before it cleaned up
    run = Run(suite, mode, run_dir, tmp, state_dir)
    record_file = run_dir / "record.jsonl"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME")}
    env.update(
        PATH=f"{python.parent}:{env.get('PATH', '/usr/bin:/bin')}",
        PYTHONPATH=str(plugin_dir(cache)),
        TMPDIR=str(tmp),
        PEERS_BACKEND="" if mode == "stock" else mode,
        PEERS_RECORD=str(record_file),
        PEERS_MEM_LIMIT=args.mem_limit,
        PEERS_IMAGE=args.image,
    )
    if state_dir is not None:
        env["LIMITED_PROVISIONER_STATE_DIR"] = str(state_dir)
    else:
        env.pop("LIMITED_PROVISIONER_STATE_DIR", None)
    cmd = [str(python), "-m", "pytest", *(only or SUITES[suite][1]),
           f"--junitxml={run_dir / 'junit.xml'}", "-p", "no:cacheprovider",
           "-p", "peers_plugin", f"--timeout={args.test_timeout}",
           # signal, not the peers' "thread": thread ends the whole pytest process on the
           # first hanging test.
           "-o", "timeout_method=signal", "--color=no",
           # pytest-asyncio >= 1.x warns when it is unset, and the peers turn warnings
           # into errors: an INTERNALERROR before the first test.
           "-o", "asyncio_default_fixture_loop_scope=function"]
    print(f"== {suite} {run.label}: {' '.join(cmd[3:])}", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    with open(run_dir / "output.log", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=src, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            run.returncode = proc.wait(timeout=args.run_timeout)
        except subprocess.TimeoutExpired:
            run.timed_out = True
            stop_group(proc)
    run.seconds = time.monotonic() - t0
    run.records = read_records(record_file)
    run.results = junit_results(run_dir / "junit.xml", src) or record_results(run.records)
    time.sleep(2)  # kernels whose shutdown the test's teardown started
    run.leftovers = find_and_remove_leftovers(run)
    print(f"   {run.label}: {run.counts()[0]}/{run.counts()[1]} passed, "
          f"{run.seconds:.0f}s, kernels {run.provisioner_counts()}, "
          f"leftovers {len(run.leftovers)}", file=sys.stderr, flush=True)
    return run


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the run's process group (its own session: only what pytest started that
    stayed in it), SIGKILL after 15 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def read_records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):  # a line cut by a kill
            records.append(json.loads(line))
    return records


WORSE = {"passed": 0, "skipped": 1, "failed": 2, "error": 3}


def merge(results: dict[str, dict], test_id: str, outcome: str, message: str,
          detail: str = "") -> None:
    """A test's phases (setup, call, teardown) into one result: the worst outcome wins."""
    old = results.get(test_id)
    if old is None or WORSE[outcome] > WORSE[old["outcome"]]:
        results[test_id] = {"outcome": outcome, "message": message, "detail": detail}


def node_id(classname: str, name: str, src: Path) -> str:
    """junit's ``tests.test_x.TestY`` + ``test_z[a]`` -> ``tests/test_x.py::TestY::test_z[a]``
    (the id pytest prints and the allow-list uses)."""
    parts = classname.split(".") if classname else []
    for i in range(len(parts), 0, -1):
        path = Path(*parts[:i]).with_suffix(".py")
        if (src / path).is_file():
            return "::".join([path.as_posix(), *parts[i:], name])
    return "::".join([*parts, name])


def junit_results(path: Path, src: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    results: dict[str, dict] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        test_id = node_id(case.get("classname", ""), case.get("name", ""), src)
        outcome, message, detail = "passed", "", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
                message = (child.get("message") or "").strip()
                detail = child.text or ""
                if outcome != "skipped":
                    break
        message = message.splitlines()[0] if message else ""
        merge(results, test_id, outcome, message[:500], detail)
    return results


def record_results(records: list[dict]) -> dict[str, dict]:
    """Results from the plugin's records: for a run without a junit file (killed)."""
    results: dict[str, dict] = {}
    for r in records:
        if r["event"] == "test":
            outcome = r["outcome"]
            if outcome == "failed" and r["when"] != "call":
                outcome = "error"
            merge(results, r["nodeid"], outcome, r.get("message", ""))
    return results


# -- leftovers -----------------------------------------------------------------------------


def find_and_remove_leftovers(run: Run) -> list[str]:
    """What the run's kernels left: registry entries of its state dir, live processes
    tied to the run (its TMPDIR in their environment, its tmp or state dir in their
    command line, or one of its kernel ids in LIMITED_PROVISIONER_KERNEL_ID), cgroups
    named after its kernel ids, containers labelled with its kernel ids or state dir.
    One line per kernel (or stray process), naming the test that started it; then all
    of it is removed (by pid, id, path)."""
    kernel_ids = set(run.kernel_ids())
    registry_entries = Registry(run.state_dir).entries() if run.state_dir else []
    kernel_ids |= {e["kernel_id"] for e in registry_entries if e.get("kernel_id")}
    pids = run_processes(run, kernel_ids)
    groups = [g for k in sorted(kernel_ids) for g in kernel_group_dirs(k)]
    containers = {c.id: c for k in kernel_ids for c in containers_with_label("kernel-id", k)}
    if run.state_dir:
        containers.update(
            {c.id: c for c in containers_with_label("state-dir", str(run.state_dir))})

    # kernel id -> what is left of it
    left: dict[str, list[str]] = {}
    for entry in registry_entries:
        left.setdefault(entry["kernel_id"], []).append(
            f"registry entry (state {entry.get('state')}, alive {is_alive(entry)})")
    stray = []
    for pid, (kernel_id, cmdline) in sorted(pids.items()):
        what = f"process {pid} `{cmdline[:100]}`"
        if kernel_id:
            left.setdefault(kernel_id, []).append(what)
        else:
            stray.append(what)
    for g in groups:
        left.setdefault(g.name, []).append(f"cgroup {g.parent.parent.name}")
    for c in containers.values():
        kernel_id = c.labels.get("limited-provisioner.kernel-id", "?")
        left.setdefault(kernel_id, []).append(f"container {c.short_id} ({c.status})")
    started_by = {r["kernel_id"]: r.get("test", "").split(" (")[0] for r in run.records
                  if r["event"] == "provisioner"}
    found = [f"kernel {k} (started by {started_by.get(k) or '?'}): " + ", ".join(items)
             for k, items in sorted(left.items())] + stray

    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if run.state_dir:
        remove_all_kernels(run.state_dir)  # registry, its kernels' groups and containers
    for kernel_id in {g.name for g in groups}:
        kill_kernel_leftovers(kernel_id)
    for container in containers.values():
        with contextlib.suppress(Exception):  # removed meanwhile (remove_all_kernels)
            container.remove(force=True)
    shutil.rmtree(run.tmp, ignore_errors=True)
    return found


def run_processes(run: Run, kernel_ids: set[str]) -> dict[int, tuple[str, str]]:
    """Live processes of this run: pid -> (its kernel id if known, command line)."""
    marks = [str(run.tmp)] + ([str(run.state_dir)] if run.state_dir else [])
    found = {}
    for proc in psutil.process_iter():
        try:
            environ = proc.environ()
            cmdline = " ".join(proc.cmdline())
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue  # gone meanwhile, or a kernel thread
        kernel_id = environ.get(KERNEL_ID_ENV) or next(
            (k for k in kernel_ids if k in cmdline), "")
        if (environ.get("TMPDIR") == str(run.tmp) or kernel_id in kernel_ids
                or any(m in cmdline for m in marks)):
            found[proc.pid] = (kernel_id, cmdline)
    return found


# -- report --------------------------------------------------------------------------------


def load_allow(path: str | None) -> dict[str, str]:
    """KNOWN_BY_DESIGN plus ``path``: a JSON object {test id: reason}, or lines
    ``<test id> <reason>`` (# comments)."""
    allow = dict(KNOWN_BY_DESIGN)
    if not path:
        return allow
    text = Path(path).read_text()
    try:
        allow.update(json.loads(text))
    except ValueError:
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip() if line.lstrip().startswith("#") else line.strip()
            if line:
                test_id, _, reason = line.partition(" ")
                allow[test_id] = reason.strip()
    return allow


def failed(run: Run | None) -> dict[str, dict]:
    if run is None:
        return {}
    return {t: r for t, r in run.results.items() if r["outcome"] in ("failed", "error")}


def unexplained(runs: dict[tuple[str, str], Run], suite: str, mode: str,
                allow: dict[str, str]) -> list[str]:
    """Limited-only failures of one run that are not known by design."""
    stock_failed = failed(runs.get((suite, "stock")))
    return sorted(t for t in failed(runs.get((suite, mode)))
                  if t not in stock_failed and t not in allow)


def report(runs: dict[tuple[str, str], Run], suites: list[str], modes: list[str],
           allow: dict[str, str], reruns: dict[tuple[str, str], Run] | None = None,
           ) -> tuple[list[str], dict]:
    """Prints the table and lists; returns (problems that make the exit status 1, summary)."""
    backends = [m for m in modes if m != "stock"]
    problems: list[str] = []
    cols = ["suite"] + [("stock" if m == "stock" else f"limited-{m}") + " passed/total"
                        for m in modes] + ["limited-only failures", "leftovers"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    only: dict[tuple[str, str], dict[str, dict]] = {}
    summary: dict = {"runs": [], "limited_only": [], "stock_failures": []}
    for suite in suites:
        cells = [suite]
        stock_failed = failed(runs.get((suite, "stock")))
        for mode in modes:
            run = runs.get((suite, mode))
            if run is None:
                cells.append("not run")
                continue
            passed, total, skipped = run.counts()
            cell = f"{passed}/{total}" + (f" ({skipped} skipped)" if skipped else "")
            if run.timed_out:
                cell += " TIMEOUT"
                problems.append(f"{suite} {run.label}: whole-run timeout")
            if not run.results:
                cell += " NO RESULTS"
                problems.append(f"{suite} {run.label}: no results (see {run.dir}/output.log)")
            if mode != "stock":
                n = run.limited_launches()
                cell += f", {n} limited kernels"
                if run.stock_launches():
                    cell += f" + {run.stock_launches()} not limited"
                if n == 0:
                    problems.append(f"{suite} {run.label}: 0 limited kernels started")
                only[(suite, mode)] = {t: r for t, r in failed(run).items()
                                       if t not in stock_failed}
            summary["runs"].append({
                "suite": suite, "mode": run.label, "passed": passed, "total": total,
                "skipped": skipped, "seconds": round(run.seconds, 1),
                "timed_out": run.timed_out, "returncode": run.returncode,
                "kernels_launched": run.provisioner_counts(), "leftovers": run.leftovers,
                "dir": str(run.dir)})
            cells.append(cell)
        cells.append(", ".join(f"{m}: {len(only.get((suite, m), {}))}" for m in backends)
                     or "-")
        left = sum(len(runs[(suite, m)].leftovers) for m in modes if (suite, m) in runs)
        left += sum(len(r.leftovers) for (s, _), r in (reruns or {}).items() if s == suite)
        cells.append(str(left))
        if left:
            problems.append(f"{suite}: {left} leftovers")
        print("| " + " | ".join(cells) + " |")

    print("\nRuntimes: " + ", ".join(f"{s} {r.label} {r.seconds:.0f}s"
                                     for (s, _), r in runs.items()))
    print("\n## Limited-only failures\n")
    for (suite, mode), tests in only.items():
        for test_id, r in sorted(tests.items()):
            reason = allow.get(test_id)
            tag = f" (allowed: {reason})" if reason is not None else ""
            rerun = (reruns or {}).get((suite, mode))
            if reason is None and rerun is not None and test_id in rerun.results \
                    and test_id not in failed(rerun):
                # Passed when run again on its own: a flaky test (ipykernel's stream
                # batching, timing under load), reported but not an explained failure.
                reason = tag = " (flaky: passed when run again alone)"
            print(f"- [{suite} limited-{mode}] `{test_id}` {r['outcome']}: {r['message']}{tag}")
            summary["limited_only"].append({"suite": suite, "mode": mode, "test": test_id,
                                            **r, "allowed": reason})
            if reason is None:
                problems.append(f"limited-only failure {test_id} ({mode})")
    if not any(only.values()):
        print("(none)")
    print("\n## Failing with stock kernels too (not counted)\n")
    any_stock = False
    for suite in suites:
        for test_id, r in sorted(failed(runs.get((suite, "stock"))).items()):
            any_stock = True
            print(f"- [{suite}] `{test_id}` {r['outcome']}: {r['message']}")
            summary["stock_failures"].append({"suite": suite, "test": test_id, **r})
    if not any_stock:
        print("(none)")
    print("\n## Leftovers\n")
    any_left = False
    for (suite, _), run in [*runs.items(), *(reruns or {}).items()]:
        for item in run.leftovers:
            any_left = True
            print(f"- [{suite} {run.label}] {item}")
    if not any_left:
        print("(none)")
    return problems, summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suites", default=",".join(SUITES))
    parser.add_argument("--kernels", default="stock,process",
                        help="stock and/or limited backends: stock,process,docker")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE,
                        help="sdists, sources, the venv, run outputs (not under /tmp)")
    parser.add_argument("--state-root", type=Path, default=DEFAULT_STATE_ROOT,
                        help="per-run state and tmp dirs (keep it short: ipc socket paths)")
    parser.add_argument("--test-timeout", type=int, default=120, help="seconds per test")
    parser.add_argument("--run-timeout", type=int, default=2400, help="seconds per run")
    parser.add_argument("--mem-limit", default="1G")
    parser.add_argument("--image", default=KERNEL_IMAGE,
                        help="docker kernels' image (default: $LIMITED_PROVISIONER_TEST_IMAGE, "
                        "else the default image)")
    parser.add_argument("--allow", default=None,
                        help="known by-design failures: JSON {test id: reason} or lines")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--setup-only", action="store_true",
                        help="download, extract, build the venv; run nothing")
    args = parser.parse_args()
    suites = args.suites.split(",")
    modes = args.kernels.split(",")
    unknown = [s for s in suites if s not in SUITES] + [
        m for m in modes if m != "stock" and m not in BACKENDS]
    if unknown:
        parser.error(f"unknown suite or kernels: {unknown}")
    for path in (args.cache_dir, args.state_root):
        if path.resolve().is_relative_to("/tmp"):
            parser.error(f"{path}: not under /tmp (limited kernels do not see the host's)")
    if "docker" in modes and not docker_available(args.image):
        parser.error(f"--kernels docker: no docker daemon or no image {args.image}")
    allow = load_allow(args.allow)

    versions = {SUITES[s][0]: importlib.metadata.version(SUITES[s][0]) for s in SUITES}
    sources = sdist_sources(args.cache_dir, versions)
    python = ensure_venv(args.cache_dir, versions)
    if args.setup_only:
        print(f"venv {python}; sources {', '.join(str(p) for p in sources.values())}")
        return 0

    args.state_root.mkdir(parents=True, exist_ok=True)
    runs: dict[tuple[str, str], Run] = {}
    for suite in suites:
        for mode in modes:
            runs[(suite, mode)] = run_suite(suite, mode, python, sources[SUITES[suite][0]],
                                            args, args.cache_dir)
    # Each unexplained limited-only failure runs once more on its own: one that passes then
    # is flaky, not a difference the limits make.
    reruns: dict[tuple[str, str], Run] = {}
    for (suite, mode) in list(runs):
        if mode != "stock":
            again = unexplained(runs, suite, mode, allow)
            if again:
                reruns[(suite, mode)] = run_suite(
                    suite, mode, python, sources[SUITES[suite][0]], args, args.cache_dir,
                    only=again)
    problems, summary = report(runs, suites, modes, allow, reruns)
    summary["versions"] = versions
    summary["problems"] = problems
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=1))
    if problems:
        print("\nFAIL: " + "; ".join(problems[:20])
              + (f"; ... {len(problems) - 20} more" if len(problems) > 20 else ""))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
