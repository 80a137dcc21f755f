"""Containment table: runs the attack suite (tests/attacks) on both backends and prints,
per attack: stopped (yes/no), time to stop, how, the reason the user saw, the second
kernel's answer time during the attack, and peak extra host memory during the attack.

    python bench/attacks.py [--markdown] [-k EXPR]

Rows that are not contained are printed as they are: the suite then also fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("-k", default="test_attack_is_contained", help="pytest -k expression")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "attacks.jsonl"
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
             str(REPO / "tests" / "attacks"), "-k", args.k],
            env={**os.environ, "LP_ATTACK_REPORT": str(report)}, cwd=REPO,
            capture_output=True, text=True,
        )
        rows = [json.loads(line) for line in report.read_text().splitlines()] if report.exists() else []
    rows.sort(key=lambda r: (r["attack"], r["backend"]))
    cols = ["attack", "title", "backend", "stopped", "seconds", "how", "reason", "probe_s",
            "peak_host_mem_mb"]
    if args.markdown:
        print("| # | attack | backend | stopped | time to stop s | how | reason shown to the user "
              "| 2nd kernel answered in s | peak extra host memory MB |")
        print("|---|---|---|---|---:|---|---|---:|---:|")
        for r in rows:
            reason = r["reason"].replace("|", "\\|")
            print(f"| {r['attack']} | {r['title']} | {r['backend']} | "
                  f"{'yes' if r['stopped'] else '**NO**'} | {r['seconds']} | {r['how']} | "
                  f"`{reason}` | {r['probe_s']} | {r['peak_host_mem_mb']} |")
    else:
        for r in rows:
            print("  ".join(f"{c}={r[c]}" for c in cols))
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else "no output"
    print(f"\npytest: {summary}")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
