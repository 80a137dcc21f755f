"""What only the benches share (what tests share with them is in tests/harness.py, which
a bench imports as ``tests.harness`` after putting the repository root on sys.path)."""

from __future__ import annotations


def p90(values: list[float]) -> float:
    """The 90th percentile: the value at rank round(0.9 * (n - 1)) of the sorted values."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
