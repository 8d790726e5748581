"""Ratios measured side by side in one run: each case's median beside those measured before it."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any


def record_side_by_side(
    medians: dict[Hashable, dict[str, float]], benchmark: Any, key: Hashable, name: str
) -> float | None:
    """Store this case's median under `medians[key][name]` and its speed-up over every case of
    `key` measured before it in `benchmark.extra_info`; None under --benchmark-disable (the
    cases then run once, as a smoke test)."""
    if benchmark.stats is None:
        return None
    median = benchmark.stats.stats.median
    measured = medians.setdefault(key, {})
    for baseline, seconds in measured.items():
        benchmark.extra_info[f"speedup_vs_{baseline.replace(' ', '_')}"] = round(seconds / median, 2)
    measured[name] = median
    return median
