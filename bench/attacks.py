"""Containment tables.

1. Resource attacks: runs the attack suite (tests/attacks) on both backends and prints,
   per attack: stopped (by a mechanism the catalogue allows for it, within the bound:
   yes/no), time to stop, how (the mechanism), the reason the user saw, the second
   kernel's answer time during the attack, how far the host's MemAvailable fell, the
   longest stall of the server's event loop during the attack, and for the disk attacks
   (3.x) what the kernel's dirs held beyond disk_limit / files_limit afterwards,
   measured from the host (target 0), and what enforced them (own filesystem or watchdog).
2. Escapes (``--security``): runs the security suite (tests/security) and prints, per
   class of the threat model (SECURITY.md) and backend, each attack and whether it was
   contained (the test passed), with its run time.

    python bench/attacks.py [--markdown] [-k EXPR | --disk] [--own-filesystem off] [--security]
                            [--by-runtime]

``--by-runtime``: one row per attack, one column per backend and runtime (process; docker
under runc; docker under gVisor, ``runsc``): how it was stopped and how fast.

Rows that are not contained are printed as they are: the suite then also fails.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The attacks on the kernel's dirs: "beyond limit" is measured for these.
DISK_ATTACKS = ("3.1", "3.2", "3.3", "3.4", "3.5")


# tests/security test -> (class of SECURITY.md, what the kernel tries).
SECURITY_TESTS = {
    "test_root_never_follows_paths_the_kernel_plants":
        (1, "symlinks/FIFOs in its dirs, then interrupt, limit kill, restart"),
    "test_disk_watch_never_follows_a_directory_swapped_for_a_link":
        (1, "swap work-dir subdirs for links to a root-only dir during disk checks"),
    "test_forged_idle_status_does_not_stop_exec_timeout":
        (2, "forge signed 'idle' statuses while looping past exec_timeout"),
    "test_fifos_and_dev_zero_links_are_never_read":
        (2, "FIFOs and /dev/zero links at every control-file name"),
    "test_no_server_secret_reaches_the_kernel": (3, "read JUPYTER_TOKEN, JPY_API_TOKEN, keys"),
    "test_a_secret_passes_only_when_named_exactly": (3, "a secret through an env_keep pattern"),
    "test_uids_are_unique_across_state_dirs_and_not_handed_on":
        (4, "same uid from two state dirs; reuse of a freed uid"),
    "test_kernel_cannot_touch_its_frozen_socket_dir":
        (5, "repoint its sockets at another kernel's"),
    "test_foreign_signed_messages_never_reach_a_client":
        (5, "publish messages signed with another key"),
    "test_network_on_still_uses_ipc_and_listens_on_no_tcp_port":
        (5, "network=true: kernel ports reachable by other kernels"),
    "test_output_flood_is_capped_per_execution": (6, "raw IOPub / display_data flood"),
    "test_output_limit_cannot_be_dodged_by_message_headers":
        (6, "dodge output_limit by message headers"),
    "test_oversized_message_is_dropped_and_output_keeps_flowing":
        (6, "one message over max_message_size"),
    "test_raw_fd_writes_stay_out_of_server_streams": (6, "100 MB of raw writes to fd 1"),
    "test_made_up_replies_never_reach_clients":
        (6, "250 signed replies to requests nobody sent"),
    "test_input_request_flood_is_capped_per_execution": (6, "200 x 100 KiB input requests"),
    "test_files_in_the_connection_dir_count_against_disk_limit":
        (7, "200 MB into its connection dir (outside work/)"),
    "test_restarted_kernel_with_a_full_connection_dir_stays_limited":
        (7, "leave its dirs over disk_limit, then get restarted"),
    "test_scratch_files_and_sysv_shm_stay_inside_the_kernel":
        (7, "files in /tmp, /var/tmp, /dev/shm, /run/lock; SysV shm"),
    "test_kernels_cannot_see_each_other": (8, "find another kernel in /proc"),
    "test_state_dir_in_a_private_scratch_dir_is_refused":
        (9, "state_dir under /var/tmp (would hide the kernel dir)"),
    "test_enforcement_report_tells_the_truth": (9, "enforcement report vs what is in force"),
    "test_idle_culling_ignores_kernel_output_and_housekeeping":
        (10, "print forever from a thread; kernel_info every second"),
}


def security_table(markdown: bool) -> int:
    """Run tests/security's containment tests; one row per attack and backend."""
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "security.xml"
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
             str(REPO / "tests" / "security"), "-k", "containment", f"--junitxml={junit}"],
            cwd=REPO, capture_output=True, text=True,
        )
        cases = ET.parse(junit).getroot().iter("testcase") if junit.exists() else []
        rows = []
        for case in cases:
            name = case.get("name", "")
            match = re.fullmatch(r"(test_\w+?)(?:\[(.*)\])?", name)
            test, params = (match.group(1), match.group(2) or "") if match else (name, "")
            if test not in SECURITY_TESTS:
                continue
            cls, what = SECURITY_TESTS[test]
            backend = "docker" if "docker" in params else "process"
            variant = re.sub(r"-?(process|docker)-?", "", params)
            failed = any(child.tag in ("failure", "error") for child in case)
            rows.append((cls, what + (f" ({variant})" if variant else ""), backend,
                         not failed, float(case.get("time", 0))))
    rows.sort()
    if markdown:
        print("| class | the kernel tries | backend | contained | test s |")
        print("|---:|---|---|---|---:|")
        for cls, what, backend, ok, secs in rows:
            print(f"| {cls} | {what} | {backend} | {'yes' if ok else '**NO**'} | {secs:.1f} |")
    else:
        for cls, what, backend, ok, secs in rows:
            print(f"class={cls} backend={backend} contained={ok} s={secs:.1f} {what}")
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else "no output"
    print(f"\npytest: {summary}")
    return result.returncode


def beyond_limit(row: dict) -> str:
    """What a disk attack left beyond disk_limit / files_limit, and what enforced them:
    "0 B (own filesystem)", "1.5 GiB, +312 files (watchdog)"; "" for other attacks."""
    if row["attack"] not in DISK_ATTACKS or "beyond_bytes" not in row:
        return ""
    size, files = row["beyond_bytes"], row["beyond_files"]
    text = "0 B" if not size else (
        f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB")
    if files:
        text += f", +{files} files"
    return f"{text} ({row['disk']})"


RUNTIME_COLUMNS = (("process", "process backend"), ("docker", "docker, runc"),
                   ("runsc", "docker, gVisor (runsc)"))


def by_runtime_table(rows: list[dict]) -> None:
    """Markdown: each attack once, each backend/runtime a column ("how, seconds")."""
    cells: dict[str, dict[str, dict]] = {}
    titles: dict[str, str] = {}
    for r in rows:
        cells.setdefault(r["attack"], {})[r["backend"]] = r
        titles[r["attack"]] = r["title"]
    print("| # | attack | " + " | ".join(label for _, label in RUNTIME_COLUMNS) + " |")
    print("|---|---|" + "---|" * len(RUNTIME_COLUMNS))
    for attack in sorted(cells):
        row = []
        for key, _ in RUNTIME_COLUMNS:
            r = cells[attack].get(key)
            row.append("not run" if r is None else
                       f"{'' if r['stopped'] else '**NOT STOPPED** '}{r['how']}, {r['seconds']} s")
        print(f"| {attack} | {titles[attack]} | " + " | ".join(row) + " |")
    stopped = {key: sum(1 for c in cells.values() if c.get(key, {}).get("stopped"))
               for key, _ in RUNTIME_COLUMNS}
    print("| | **stopped** | " + " | ".join(
        f"**{stopped[key]} / {sum(1 for c in cells.values() if key in c)}**"
        for key, _ in RUNTIME_COLUMNS) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("-k", default="test_attack_is_stopped_by_its_limit",
                        help="pytest -k expression")
    parser.add_argument("--disk", action="store_true",
                        help="only the disk attacks (3.x)")
    parser.add_argument("--own-filesystem", default="auto", choices=["auto", "off"],
                        help="off: kernels without their own filesystem (the watchdog's "
                             "disk limits, as on a host without loop devices)")
    parser.add_argument("--security", action="store_true",
                        help="the escape classes of tests/security instead")
    parser.add_argument("--by-runtime", action="store_true",
                        help="a row per attack, a column per backend/runtime")
    args = parser.parse_args()
    if args.disk:
        # "[3.1-process]": the attack id, then the backend.
        args.k = f"{args.k} and ({' or '.join(f'[{a}-' for a in DISK_ATTACKS)})"
    if args.security:
        return security_table(args.markdown)
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "attacks.jsonl"
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
             str(REPO / "tests" / "attacks"), "-k", args.k],
            env={**os.environ, "LP_ATTACK_REPORT": str(report),
                 "LP_ATTACK_OWN_FILESYSTEM": args.own_filesystem}, cwd=REPO,
            capture_output=True, text=True,
        )
        lines = report.read_text().splitlines() if report.exists() else []
        rows = [json.loads(line) for line in lines]
    rows.sort(key=lambda r: (r["attack"], r["backend"]))
    for r in rows:
        r["beyond"] = beyond_limit(r)
    cols = ["attack", "title", "backend", "stopped", "seconds", "how", "reason", "probe_s",
            "host_mem_drop_mb", "loop_stall_s", "beyond"]
    if args.by_runtime:
        by_runtime_table(rows)
    elif args.markdown:
        print("| # | attack | backend | stopped | time to stop s | how | reason shown to the user "
              "| 2nd kernel answered in s | host MemAvailable drop MB | server loop stall s "
              "| beyond limit |")
        print("|---|---|---|---|---:|---|---|---:|---:|---:|---:|")
        for r in rows:
            reason = r["reason"].replace("|", "\\|")
            print(f"| {r['attack']} | {r['title']} | {r['backend']} | "
                  f"{'yes' if r['stopped'] else '**NO**'} | {r['seconds']} | {r['how']} | "
                  f"`{reason}` | {r['probe_s']} | {r['host_mem_drop_mb']} | "
                  f"{r['loop_stall_s']} | {r['beyond']} |")
    else:
        for r in rows:
            print("  ".join(f"{c}={r[c]}" for c in cols))
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else "no output"
    print(f"\npytest: {summary}")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
