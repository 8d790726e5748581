"""The results document's checkpoint-selection sections (issue 23): what a user gets at each
selection rule's epoch, the selection targets, and ADELE's never-loses targets."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from noisyseg.experiments.experiment import FORKED_ADELE, TLOSS_OPTIMISER, NoiseSpec, RunSpec
from noisyseg.experiments.results import (
    LADDER_NAMES,
    TABLE1_NAMES,
    RunResult,
    by_method,
    mean_std,
    paired,
    score,
    verdict,
)

# What a user gets (`selection.py`): the test mIoU at each rule's epoch; clean-val is the oracle.
USER_COLUMNS = (
    ("last", "last epoch"),
    ("noisy-val", "noisy-val"),
    ("label-free", "label-free (Label Wave)"),
    ("label-free-curves", "label-free (fitted curves)"),
    ("clean-val", "clean-val (oracle)"),
)


# The methods whose selection the targets judge (issue 23, part 1) and what they ask: within
# 1.0 point of the oracle and no more than 0.5 below the last epoch, mean over seeds.
USER_METHODS = ("baseline-ms", "adele", RunSpec("ladder", "tloss", NoiseSpec(), overrides=TLOSS_OPTIMISER).name)
ORACLE_GAP, LAST_GAP = 0.010, 0.005
FORKED = RunSpec("ladder", FORKED_ADELE[0], NoiseSpec(), overrides=FORKED_ADELE[1]).name


def _settings(experiments: set[str], levels: Sequence[int]) -> list[tuple[str, int | None, str, list[str]]]:
    """(experiment, level, label, run names) of the settings the user tables cover."""
    settings = (
        [("ladder", level, f"level {level}", LADDER_NAMES) for level in levels] if "ladder" in experiments else []
    )
    return settings + ([("table1", None, "Table 1", TABLE1_NAMES)] if "table1" in experiments else [])


def _runs_of(results: list[RunResult], experiment: str, level: int | None, name: str) -> list[RunResult]:
    return by_method(results, experiment, name, level, match_level=experiment == "ladder")


def user_table(results: list[RunResult], experiments: set[str], levels: Sequence[int]) -> list[str]:
    """Markdown rows: per setting and method, the test mIoU at the last epoch, at the epoch each
    selection rule a user can apply chooses, and at the clean-validation oracle's."""
    lines = [
        "| setting | method | seeds | " + " | ".join(label for _, label in USER_COLUMNS) + " |",
        "|" + " --- |" * (len(USER_COLUMNS) + 3),
    ]
    for experiment, level, label, names in _settings(experiments, levels):
        for name in names:
            runs = _runs_of(results, experiment, level, name)
            if runs:
                cells = [mean_std([score(r, rule) for r in runs]) for rule, _ in USER_COLUMNS]
                lines.append(f"| {label} | {name} | {len(runs)} | " + " | ".join(cells) + " |")
    return lines


def selection_target_lines(results: list[RunResult], experiments: set[str], levels: Sequence[int]) -> list[str]:
    """The selection targets per setting and method: each rule a user can apply (noisy-val, and
    the label-free candidates) within 1.0 point of the oracle and no more than 0.5 below the
    last epoch, mean over seeds. Cells: rule minus oracle / rule minus last epoch, met or not."""
    rules = [(rule, label) for rule, label in USER_COLUMNS if rule not in ("last", "clean-val")]
    lines = [
        f"Selection targets: each rule within {100 * ORACLE_GAP:.1f} point of the "
        f"clean-validation oracle and no more than {100 * LAST_GAP:.1f} below the last epoch "
        "(test mIoU, mean over seeds; cells: minus oracle / minus last epoch):",
        "",
        "| setting | method | seeds | " + " | ".join(label for _, label in rules) + " |",
        "|" + " --- |" * (len(rules) + 3),
    ]
    for experiment, level, label, _ in _settings(experiments, levels):
        for name in USER_METHODS:
            runs = [r for r in _runs_of(results, experiment, level, name) if r.summary.get("test_miou_at")]
            if not runs:
                continue
            cells = []
            for rule, _ in rules:
                to_oracle = [d for r in runs if (d := _difference(r, rule, "clean-val")) is not None]
                to_last = [d for r in runs if (d := _difference(r, rule, "last")) is not None]
                ok = (
                    None
                    if not (to_oracle and to_last)
                    else statistics.mean(to_oracle) >= -ORACLE_GAP and statistics.mean(to_last) >= -LAST_GAP
                )
                cells.append(f"{_signed(to_oracle)} / {_signed(to_last)} {verdict(ok)}")
            lines.append(f"| {label} | {name} | {len(runs)} | " + " | ".join(cells) + " |")
    return lines


def _difference(run: RunResult, which: str, reference: str) -> float | None:
    mine, theirs = score(run, which), score(run, reference)
    return None if mine is None or theirs is None else mine - theirs


def _signed(values: list[float]) -> str:
    return "-" if not values else f"{100 * statistics.mean(values):+.1f}"


# Issue 23, part 2, at the noisy-validation selection: adele against baseline-ms per setting.
NEVER_LOSES = (
    (0, -0.005, "at least baseline-ms - 0.5"),
    (1, -0.005, "at least baseline-ms - 0.5"),
    (3, 0.05, "at least 5 points above baseline-ms"),
    (4, 0.05, "at least 5 points above baseline-ms"),
    (5, 0.0, "at least baseline-ms"),
    (6, 0.0, "at least baseline-ms"),
)


def chosen_on_noisy_val(adele: list[RunResult], baseline: list[RunResult]) -> tuple[list[float], int]:
    """Per noise seed where both runs' selected checkpoints have a noisy-validation mIoU
    (`selection.val_miou` under the `noisy-val` rule): the test mIoU at the noisy-validation epoch
    of whichever run scores higher on those masks (ties: adele), minus baseline-ms's; and how
    many times that was adele. What a user who trains both and keeps the one their own masks
    prefer gets."""
    by_seed = {r.spec.noise.seed: r for r in baseline}
    delta, adele_chosen = [], 0
    for run in adele:
        other = by_seed.get(run.spec.noise.seed)
        if other is None:
            continue
        val_a, val_b, test_a, test_b = (
            _noisy_val_miou(run),
            _noisy_val_miou(other),
            score(run, "noisy-val"),
            score(other, "noisy-val"),
        )
        if None in (val_a, val_b, test_a, test_b):
            continue
        pick_adele = val_a >= val_b
        adele_chosen += pick_adele
        delta.append((test_a if pick_adele else test_b) - test_b)
    return delta, adele_chosen


def _noisy_val_miou(run: RunResult) -> float | None:
    """The selected checkpoint's noisy-validation mIoU: the summary's, or for a summary written
    before it held one, the selected epoch's record's."""
    selection = run.summary.get("selection") or {}
    if selection.get("rule") != "noisy-val":
        return None
    if "val_miou" in selection:
        return selection["val_miou"]
    chosen = [r for r in run.records if r["epoch"] == selection.get("epoch")]
    return chosen[0]["val_noisy"]["miou"] if chosen else None


def never_loses_lines(results: list[RunResult], experiments: set[str], levels: Sequence[int]) -> list[str]:
    """adele minus baseline-ms at the noisy-validation epoch, against the issue's bar per setting;
    and the same bar for the run of the two scoring higher on the noisy validation masks, and for
    the forked runs."""
    lines = ["ADELE never loses (test mIoU at the noisy-validation epoch, paired over noise seeds):", ""]
    bars = [
        ("ladder", level, f"ladder level {level}", need, goal)
        for level, need, goal in NEVER_LOSES
        if "ladder" in experiments and level in levels
    ]
    if "table1" in experiments:
        bars.append(("table1", None, "Table 1", 0.05, "at least 5 points above baseline-ms"))
    for experiment, level, label, need, goal in bars:
        delta = paired(
            _runs_of(results, experiment, level, "adele"),
            _runs_of(results, experiment, level, "baseline-ms"),
            "noisy-val",
        )
        ok = None if not delta else statistics.mean(delta) >= need
        lines.append(
            f"- {label}: adele {goal}: {mean_std(delta) if delta else '-'} "
            f"points over {len(delta)} paired seed(s), {verdict(ok)}"
        )
        chosen, adele_chosen = chosen_on_noisy_val(
            _runs_of(results, experiment, level, "adele"), _runs_of(results, experiment, level, "baseline-ms")
        )
        if chosen:
            ok = statistics.mean(chosen) >= need
            lines.append(
                f"  - the one of adele and baseline-ms scoring higher on the noisy validation masks (adele in "
                f"{adele_chosen} of {len(chosen)}): {mean_std(chosen)} points, {verdict(ok)}"
            )
        forked_runs = _runs_of(results, experiment, level, FORKED)
        forked = paired(forked_runs, _runs_of(results, experiment, level, "baseline-ms"), "noisy-val")
        if forked:
            # The bootstrap (`training/fork.py`) decides since the eighth session; earlier forks kept
            # the higher score, and their summaries carry no `p_branch_better`.
            forks = [r.fork for r in forked_runs if r.fork is not None]  # a run that never triggered has none
            by_bootstrap = sum("p_branch_better" in fork for fork in forks)
            lines.append(
                f"  - `{FORKED}`, the run its fork kept: {mean_std(forked)} points over "
                f"{len(forked)} paired seed(s), {verdict(statistics.mean(forked) >= need)} "
                f"({len(forks)} forked; {by_bootstrap} decided by the bootstrap, the others by the higher score)"
            )
    return lines
