"""The experiments' runs read back (`RunResult`: summary.json, metrics.jsonl, timing) and the
number formats the results document prints them in."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from noisyseg.experiments.experiment import (
    LADDER_RUNS,
    TABLE1_RUNS,
    TIMING_FILE,
    NoiseSpec,
    RunSpec,
)
from noisyseg.run.run_dir import RunDir


@dataclass
class RunResult:
    """What the report needs from one finished run."""

    spec: RunSpec
    summary: dict[str, Any]
    records: list[dict[str, Any]]
    timing: dict[str, Any] | None
    path: Path | None = None  # the run directory
    fork: dict[str, Any] | None = None  # the `adele.fork` entry of a forked run's own summary

    def series(self, split: str, key: str = "miou") -> np.ndarray:
        return np.array([nan_if_none(r[split][key]) for r in self.records])

    def diagnostic(self, key: str) -> np.ndarray | None:
        """Mean over foreground classes of IoU_el or IoU_m per epoch (None without clean labels)."""
        if not all(key in r for r in self.records):
            return None
        return np.array([_mean_of_known([nan_if_none(v) for v in r[key].values()]) for r in self.records])


def nan_if_none(value: Any) -> float:
    return math.nan if value is None else float(value)


def _mean_of_known(values: list[float]) -> float:
    """The mean of the values that are not NaN; NaN when none is (an epoch where no class had an
    IoU), without numpy's empty-slice warning."""
    known = [v for v in values if not math.isnan(v)]
    return float(np.mean(known)) if known else math.nan


def load_results(root: Path, specs: Sequence[RunSpec]) -> list[RunResult]:
    """The finished runs among `specs` (those with a summary.json). A run whose `adele.fork` kept
    its branch is read as the branch (`training/fork.py`): its model is what the run delivers."""
    results = []
    for spec in specs:
        run = RunDir(root / "runs" / spec.relative_dir)
        if not run.is_finished():
            continue
        summary = run.read_summary()
        fork = summary.get("fork")
        if fork and fork["kept"] == fork["branch"]:
            run = RunDir(run.branch_dir)
            summary = run.read_summary()
        timing_path = run.path / TIMING_FILE
        results.append(
            RunResult(
                spec=spec,
                summary=summary,
                records=run.read_metrics(),
                timing=json.loads(timing_path.read_text(encoding="utf-8")) if timing_path.is_file() else None,
                path=run.path,
                fork=fork,
            )
        )
    return results


def mean_std(values: Sequence[float | None]) -> str:
    """'61.2 ± 1.4' in percent over the finite values ('-' if none; no ± for a single value)."""
    finite = [100 * v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return "-"
    if len(finite) == 1:
        return f"{finite[0]:.1f}"
    return f"{statistics.mean(finite):.1f} ± {statistics.stdev(finite):.1f}"


# The run names (method, or method@overrides for a variant) of Table 1 and the ladder.
TABLE1_NAMES = [RunSpec("table1", m, NoiseSpec(), overrides=v).name for m, v in TABLE1_RUNS]


LADDER_NAMES = [RunSpec("ladder", m, NoiseSpec(), overrides=v).name for m, v in LADDER_RUNS]


def by_method(
    results: list[RunResult], experiment: str, method: str, level: int | None = None, match_level: bool = False
) -> list[RunResult]:
    """The runs of `method` (a variant: `RunSpec.name`, e.g. `arm@arm.lr=0.01`) in `experiment`."""
    return [
        r
        for r in results
        if r.spec.experiment == experiment
        and r.spec.name == method
        and (not match_level or r.spec.noise.level == level)
    ]


def score(run: RunResult, which: str) -> float | None:
    """A run's test mIoU at `which`: "best_val", "last" or "max", or a selection rule's epoch
    (None for a summary written before the rules)."""
    if which in run.summary["test_miou"]:
        return run.summary["test_miou"][which]
    return (run.summary.get("test_miou_at") or {}).get(which)


def paired(runs: list[RunResult], reference: list[RunResult], which: str) -> list[float]:
    """Per noise seed both finished: `runs`' test mIoU minus `reference`'s, at `which`."""
    by_seed = {r.spec.noise.seed: score(r, which) for r in reference}
    pairs = [(score(r, which), by_seed.get(r.spec.noise.seed)) for r in runs]
    return [mine - theirs for mine, theirs in pairs if mine is not None and theirs is not None]


def verdict(ok: bool | None) -> str:
    return "not measured yet" if ok is None else ("**met**" if ok else "**not met**")
