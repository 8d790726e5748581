"""`docs/results.md` from the runs of `noisyseg.experiments.experiment`: tables and plots.

Numbers are read back from each run's `summary.json` and `metrics.jsonl`, whatever subset of
the runs exists (missing runs show as `n = 0` or a shorter seed count), so the report can be
rewritten after every piece of an experiment run in pieces. Values are percentages (the papers'
convention); mean ± sample standard deviation over noise seeds.
"""

from __future__ import annotations

import math
import shutil
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from noisyseg.data.folder import read_dataset_info
from noisyseg.data.noise import LEVEL_ITERATIONS
from noisyseg.experiments.arm_analysis import arm_series, plot_weight_function
from noisyseg.experiments.correction_analysis import label_quality, quality_row
from noisyseg.experiments.experiment import (
    ARM_STUDY,
    COARSE_METHODS,
    SCHEDULES,
    NoiseSpec,
    RunSpec,
    Scale,
    annotation_quality,
    data_paths,
)
from noisyseg.experiments.results import (
    LADDER_NAMES,
    TABLE1_NAMES,
    RunResult,
    by_method,
    load_results,
    mean_std,
    nan_if_none,
    paired,
    verdict,
)
from noisyseg.experiments.selection_report import (
    never_loses_lines,
    selection_target_lines,
    user_table,
)
from noisyseg.io import atomic_open, atomic_write_text
from noisyseg.run.run_dir import RunDir

THREE = (("best_val", "best val"), ("max", "max test"), ("last", "last epoch"))
# ADELE Table 1 (SegTHOR, last-epoch test mIoU, 5 noise draws) and ARM Table 4/5 (Cityscapes
# coarse, val mIoU), for the reader to compare with.
PAPER_TABLE1 = {"baseline-ms": "59.1 ± 1.3", "adele-nonadaptive": "40.5 ± 2.3", "adele": "70.8 ± 0.7"}
PAPER_COARSE = {"baseline": "70.33", "gce": "71.23", "ohem": "70.31", "arm": "71.94", "gce+arm": "72.08"}


def _cell(runs: list[RunResult], key: str, which: str) -> str:
    return mean_std([r.summary[key][which] for r in runs])


def method_table(
    results: list[RunResult], experiment: str, methods: Sequence[str], paper: dict[str, str], paper_label: str
) -> list[str]:
    """Markdown rows: per method the three test numbers, with and without background."""
    header = "| method | seeds | " + " | ".join(f"test mIoU {label}" for _, label in THREE)
    header += " | " + " | ".join(f"fg {label}" for _, label in THREE) + f" | final IoU_m (fg) | {paper_label} |"
    lines = [header, "|" + " --- |" * (len(THREE) * 2 + 4)]
    for method in methods:
        runs = by_method(results, experiment, method)
        memorised = [_last_finite(r.diagnostic("iou_m")) for r in runs]
        cells = [_cell(runs, "test_miou", k) for k, _ in THREE] + [_cell(runs, "test_miou_fg", k) for k, _ in THREE]
        lines.append(
            f"| {method} | {len(runs)} | " + " | ".join(cells) + f" | {mean_std(memorised)} | {paper.get(method, '')} |"
        )
    return lines


def per_class_table(
    results: list[RunResult], experiment: str, methods: Sequence[str], class_names: list[str]
) -> list[str]:
    """Markdown rows: per method the last-epoch test IoU of each class."""
    lines = ["| method | " + " | ".join(class_names) + " |", "|" + " --- |" * (len(class_names) + 1)]
    for method in methods:
        runs = by_method(results, experiment, method)
        if runs:
            cells = [
                mean_std([r.records[-1]["test"]["per_class_iou"][c] for r in runs]) for c in range(len(class_names))
            ]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def _last_finite(series: np.ndarray | None) -> float | None:
    if series is None or not np.isfinite(series).any():
        return None
    return float(series[np.isfinite(series)][-1])


def _level_quality(root: Path, scale: Scale, runs: list[RunResult]) -> dict[str, Any] | None:
    return annotation_quality(root, scale, runs[0].spec.noise) if runs else None


def ladder_table(root: Path, scale: Scale, results: list[RunResult], levels: Sequence[int], which: str) -> list[str]:
    """Markdown rows: per noise level the measured annotation mIoU (mean over the seeds' label
    folders) and each ladder method's test mIoU at `which` ("best_val" or "last"), with adele's
    paired difference to baseline-ms."""
    lines = [
        "| level | iterations | annotation mIoU (fg) | "
        + " | ".join(LADDER_NAMES)
        + " | adele - baseline-ms (paired) |",
        "|" + " --- |" * (len(LADDER_NAMES) + 4),
    ]
    for level in levels:
        runs = {m: by_method(results, "ladder", m, level, match_level=True) for m in LADDER_NAMES}
        qualities = [
            q
            for q in (annotation_quality(root, scale, r.spec.noise) for r in runs["baseline-ms"] or runs["adele"])
            if q
        ]
        annotation = "-"
        if qualities:
            annotation = (
                f"{mean_std([q['annotation_miou'] for q in qualities])} "
                f"({mean_std([q['annotation_miou_fg'] for q in qualities])})"
            )
        cells = [f"{_cell(rs, 'test_miou', which)} (n={len(rs)})" if rs else "-" for rs in runs.values()]
        delta = paired(runs["adele"], runs["baseline-ms"], which)
        lines.append(
            f"| {level} | {LEVEL_ITERATIONS[level]} | {annotation} | "
            + " | ".join(cells)
            + f" | {mean_std(delta) if delta else '-'} |"
        )
    return lines


def _file_name(name: str) -> str:
    """A run name (`adele@loader.augment.label_elastic=true`) as part of a file name."""
    return name.replace("+", "_").replace("@", "_").replace("=", "")


# A class the baseline learns (test IoU above this) must not end below ERASED under ADELE.
LEARNED, ERASED = 0.20, 0.05


def erased_classes(results: list[RunResult], class_names: list[str]) -> list[str]:
    """Runs of adele or adele+arm in which a class that the same setting's baseline-ms learns
    (last-epoch test IoU above 20) ends below 5."""
    baselines = {(r.spec.experiment, r.spec.noise): r for r in results if r.spec.name == "baseline-ms"}
    found = []
    for run in results:
        baseline = baselines.get((run.spec.experiment, run.spec.noise))
        if run.spec.name not in ("adele", "adele+arm") or baseline is None:
            continue
        ours, theirs = run.records[-1]["test"]["per_class_iou"], baseline.records[-1]["test"]["per_class_iou"]
        for c in range(1, len(ours)):
            if theirs[c] is not None and theirs[c] > LEARNED and (ours[c] is None or ours[c] < ERASED):
                name = class_names[c] if c < len(class_names) else str(c)
                found.append(
                    f"{run.spec.relative_dir}: "
                    f"{name} {100 * nan_if_none(ours[c]):.1f} (baseline-ms {100 * theirs[c]:.1f})"
                )
    return found


CORRECTING = ("adele-correction", "adele", "adele+arm", "adele-nonadaptive")


def correction_table(results: list[RunResult], class_names: list[str]) -> list[str]:
    """Markdown rows: per setting and correcting method, each class's labels against the clean
    masks before and after correction (`correction_analysis`), and its trigger epochs."""
    names = [class_names[c] if c < len(class_names) else str(c) for c in range(1, len(class_names))]
    lines = ["| setting, method | runs | " + " | ".join(names) + " |", "|" + " --- |" * (len(names) + 2)]
    groups: dict[tuple[str, str, str], list[RunResult]] = {}
    for run in results:
        if run.spec.method in CORRECTING:
            level = "ref" if run.spec.noise.level is None else f"level {run.spec.noise.level}"
            groups.setdefault((run.spec.experiment, level, run.spec.name), []).append(run)
    for (experiment, level, method), runs in sorted(
        groups.items(), key=lambda g: (g[0][0], g[0][1], CORRECTING.index(g[1][0].spec.method), g[0][2])
    ):
        pairs = [(q, r.summary["trigger_epoch"]) for r in runs if r.path is not None and (q := label_quality(r.path))]
        if pairs:
            lines.append(quality_row(f"{experiment} {level}, {method}", [q for q, _ in pairs], [t for _, t in pairs]))
    return lines


def target_lines(
    root: Path, scale: Scale, results: list[RunResult], levels: Sequence[int], class_names: list[str]
) -> list[str]:
    """The issue's targets, each with its measured numbers and whether it is met."""
    lines = ["Targets (best-validation-epoch test mIoU, mean over noise seeds):", ""]
    for level in levels:
        adele_runs = by_method(results, "ladder", "adele", level, match_level=True)
        baseline_runs = by_method(results, "ladder", "baseline-ms", level, match_level=True)
        delta = paired(adele_runs, baseline_runs, "best_val")
        quality = _level_quality(root, scale, baseline_runs)
        low_noise = quality is not None and quality["annotation_miou"] > 0.61
        need = 0.0 if low_noise or quality is None else 0.05
        ok = None if not delta else statistics.mean(delta) >= need
        goal = (
            "at least baseline-ms"
            if need == 0
            else "at least 5 points above baseline-ms (annotation mIoU 0.61 or below)"
        )
        lines.append(
            f"- ladder level {level}: adele {goal}: {mean_std(delta) if delta else '-'} "
            f"points over {len(delta)} paired seed(s), {verdict(ok)}"
        )
    erased = erased_classes(results, class_names)
    checked = [r for r in results if r.spec.name in ("adele", "adele+arm")]
    lines.append(
        f"- no class that baseline-ms learns (test IoU > {100 * LEARNED:.0f}) "
        f"ends below {100 * ERASED:.0f} under adele or adele+arm: "
        f"{len(erased)} case(s) in {len(checked)} runs, {verdict(None if not checked else not erased)}"
    )
    lines += [f"  - {case}" for case in erased]
    arm = paired(by_method(results, "coarse", "arm"), by_method(results, "coarse", "baseline"), "best_val")
    spread = {
        m: [r.summary["test_miou"]["best_val"] for r in by_method(results, "coarse", m)] for m in ("arm", "baseline")
    }
    arm_ok = None
    if len(arm) >= 3 and all(len(v) >= 2 for v in spread.values()):
        arm_ok = statistics.mean(arm) >= 0 and statistics.stdev(spread["arm"]) <= statistics.stdev(spread["baseline"])
    lines.append(
        "- coarse labels: arm at least baseline, spread no wider: "
        f"arm - baseline {mean_std(arm) if arm else '-'} over {len(arm)} seeds; "
        f"arm {mean_std(spread['arm'])} vs baseline {mean_std(spread['baseline'])}, {verdict(arm_ok)}"
    )
    adele_arm = paired(by_method(results, "table1", "adele+arm"), by_method(results, "table1", "adele"), "best_val")
    lines.append(
        "- Table 1: adele+arm at least adele: "
        f"{mean_std(adele_arm) if adele_arm else '-'} over {len(adele_arm)} seeds, "
        f"{verdict(None if not adele_arm else statistics.mean(adele_arm) >= 0)}"
    )
    return lines


STUDY_NAMES = [RunSpec("armstudy", m, NoiseSpec("coarse"), overrides=v).name for m, v in ARM_STUDY]
ARM_RUNS = (
    ("table1", "arm"),
    ("table1", "adele+arm"),
    ("coarse", "arm"),
    ("coarse", "gce+arm"),
    *(("armstudy", name) for name in STUDY_NAMES if name.split("@")[0] == "arm"),
)


def arm_table(results: list[RunResult]) -> list[str]:
    """Markdown rows: per ARM run group, what ARM's weights do to wrong labels (`arm_analysis`)."""
    lines = [
        "| experiment | method | seeds | test mIoU best val | wrong-label pixel share (%) "
        "| wrong-label weight share (%) | relative weight of a wrong label "
        "| effective sample fraction (%) | relative weight, mean over epochs |",
        "|" + " --- |" * 9,
    ]
    for experiment, method in ARM_RUNS:
        runs = [r for r in by_method(results, experiment, method) if arm_series(r.records)]
        if not runs:
            continue
        series = [arm_series(r.records) for r in runs]
        last = [s[-1] for s in series]
        over_epochs = [float(np.nanmean([e.wrong_relative_weight for e in s])) for s in series]
        lines.append(
            f"| {experiment} | {method} | {len(series)} | {_cell(runs, 'test_miou', 'best_val')} | "
            f"{mean_std([e.wrong_pixel_share for e in last])} | {mean_std([e.wrong_weight_share for e in last])} "
            f"| {_ratio(e.wrong_relative_weight for e in last)} | "
            f"{mean_std([e.effective_fraction for e in last])} | {_ratio(over_epochs)} |"
        )
    return lines


def _ratio(values: Any) -> str:
    finite = [v for v in values if np.isfinite(v)]
    if not finite:
        return "-"
    return f"{statistics.mean(finite):.2f}" + (f" ± {statistics.stdev(finite):.2f}" if len(finite) > 1 else "")


def plot_arm_runs(results: list[RunResult], figures: Path) -> list[str]:
    """The first seed's weight function of each ARM run group, as figures linked from the document."""
    lines = []
    for experiment, method in ARM_RUNS:
        runs = [r for r in by_method(results, experiment, method) if arm_series(r.records)]
        if not runs:
            continue
        name = f"arm_{experiment}_{_file_name(method)}.png"
        figure = Figure(figsize=(10, 3.8), layout="constrained")
        FigureCanvasAgg(figure)
        plot_weight_function(runs[0].records, f"{method}, {experiment} ({runs[0].spec.noise.name})", figure)
        _save(figure, figures / name)
        lines += [f"![{method} on {experiment}: w(v^) over training and the last epoch's inputs](results/{name})", ""]
    return lines


# ----------------------------------------------------------------------------- plots


def _save(figure: Figure, path: Path) -> None:
    with atomic_open(path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=100)


def _mean_curve(runs: list[RunResult], get: Any) -> np.ndarray | None:
    curves = [c for c in (get(r) for r in runs) if c is not None]
    if not curves:
        return None
    length = min(len(c) for c in curves)
    return np.nanmean(np.stack([c[:length] for c in curves]), axis=0)


def plot_training_dynamics(results: list[RunResult], experiment: str, methods: Sequence[str], path: Path) -> None:
    """Test mIoU, IoU_el and IoU_m (foreground mean) per epoch, mean over seeds, per method."""
    panels = [
        ("test mIoU", lambda r: r.series("test")),
        ("IoU_el: prediction vs clean label on noisy pixels", lambda r: r.diagnostic("iou_el")),
        ("IoU_m: prediction vs noisy label on noisy pixels", lambda r: r.diagnostic("iou_m")),
    ]
    figure = Figure(figsize=(15, 4), layout="constrained")
    FigureCanvasAgg(figure)
    for index, (title, get) in enumerate(panels):
        ax = figure.add_subplot(1, len(panels), index + 1)
        for method in methods:
            curve = _mean_curve(by_method(results, experiment, method), get)
            if curve is not None:
                ax.plot(np.arange(1, len(curve) + 1), curve, label=method)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylim(0, 1)
        if ax.get_lines():
            ax.legend(fontsize=7)
    _save(figure, path)


def plot_ladder(root: Path, scale: Scale, results: list[RunResult], levels: Sequence[int], path: Path) -> None:
    """Last-epoch test mIoU against the measured annotation mIoU, per method."""
    figure = Figure(figsize=(5.5, 4), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot(1, 1, 1)
    for method in LADDER_NAMES:
        points = []
        for level in levels:
            runs = by_method(results, "ladder", method, level, match_level=True)
            quality = _level_quality(root, scale, runs)
            if runs and quality:
                values = [100 * r.summary["test_miou"]["best_val"] for r in runs]
                points.append(
                    (
                        quality["annotation_miou"],
                        statistics.mean(values),
                        statistics.stdev(values) if len(values) > 1 else 0.0,
                    )
                )
        if points:
            x, y, err = zip(*sorted(points), strict=True)
            ax.errorbar(x, y, yerr=err, fmt="o-", capsize=3, label=method)
    ax.set_xlabel("annotation mIoU of the training labels (seed 0)")
    ax.set_ylabel("test mIoU at the best validation epoch")
    ax.set_title("ADELE Table 6 ladder on the phantom", fontsize=10)
    if ax.get_lines():
        ax.legend()
    _save(figure, path)


# ----------------------------------------------------------------------------- the document


def _memorisation_notes(results: list[RunResult], experiment: str, methods: Sequence[str]) -> list[str]:
    """Measured facts on memorisation: the late drop of test mIoU and the rise of IoU_m."""
    notes = []
    for method in methods:
        runs = by_method(results, experiment, method)
        if not runs:
            continue
        drop = [r.summary["test_miou"]["max"] - r.summary["test_miou"]["last"] for r in runs]
        iou_m = [r.diagnostic("iou_m") for r in runs]
        rise = [float(np.nanmax(m) - m[0]) if m is not None and np.isfinite(m).any() else math.nan for m in iou_m]
        notes.append(
            f"- `{method}`: test mIoU falls by {mean_std(drop)} points from its maximum to the last epoch; "
            f"the foreground IoU_m rises by {mean_std(rise)} points from epoch 1 to its maximum."
        )
    return notes


def _paired_difference(results: list[RunResult], experiment: str, method: str, reference: str) -> str | None:
    """`method` minus `reference` in last-epoch and best-val test mIoU, over the seeds both finished."""
    by_seed = {
        name: {r.spec.noise.seed: r.summary["test_miou"] for r in by_method(results, experiment, name)}
        for name in (method, reference)
    }
    seeds = sorted(by_seed[method].keys() & by_seed[reference].keys())
    if not seeds:
        return None
    last = [by_seed[method][s]["last"] - by_seed[reference][s]["last"] for s in seeds]
    best = [by_seed[method][s]["best_val"] - by_seed[reference][s]["best_val"] for s in seeds]
    return (
        f"- `{method}` minus `{reference}` over {len(seeds)} paired seed(s): {mean_std(last)} points at the last "
        f"epoch, {mean_std(best)} at the best validation epoch."
    )


def _timing_line(results: list[RunResult]) -> str:
    timed = [r.timing for r in results if r.timing]
    if not timed:
        return "No run timings recorded."
    cpu = sum(t["cpu_seconds"] for t in timed) / 60
    wall = sum(t["wall_seconds"] for t in timed) / 60
    return (
        f"{len(timed)} timed runs: {cpu:.0f} CPU-minutes in total, {wall:.0f} minutes of "
        "wall time summed over runs (processes ran concurrently on a shared 2-core machine)."
    )


def write_results(
    root: Path, out: Path, scale: Scale, specs: Sequence[RunSpec], levels: Sequence[int], command: str
) -> Path:
    """Write the results document `out` (plots in `out`'s sibling folder `results/`)."""
    results = load_results(root, specs)
    figures = out.parent / "results"
    figures.mkdir(parents=True, exist_ok=True)
    experiments = {s.experiment for s in specs}
    phantom = data_paths(root, scale, specs[0].noise)[0] if specs else None
    class_names = read_dataset_info(phantom).classes if phantom and phantom.is_dir() else []
    lines = [
        "# Results: ADELE and ARM on the CT phantom, measured",
        "",
        "Every number below was measured by the command in the last section and is rewritten by it;",
        "percentages, mean ± standard deviation over noise seeds. Runs finished: "
        f"{len(results)} of {len(specs)} planned.",
        "",
        f"Scale: {scale.patients} phantom patients, "
        f"{scale.slices_per_patient} slices each rendered at "
        f"{scale.size} px over {scale.field_of_view:g} of the body's "
        "field of view, centred on the mediastinum (slices without organs dropped), "
        f"UNet {scale.unet}, DeepLabv3+ {scale.deeplab}, {scale.epochs} epochs, batch {scale.batch_size}, "
        f"SGD lr {scale.lr}, momentum {scale.momentum}, lr schedule constant"
        + "".join(f" ({name}: {schedule})" for name, schedule in SCHEDULES.items())
        + ". "
        "The papers: 256 px SegTHOR slices of 40 patients, UNet width 64, 100 epochs.",
        "",
        _timing_line(results),
        "",
    ]
    if experiments & {"table1", "ladder"} and any(r.summary.get("test_miou_at") for r in results):
        lines += [
            "## What a user gets: the checkpoint chosen without clean masks",
            "",
            "Test mIoU at the last epoch, at the epoch chosen on the noisy validation masks (the runs' default, "
            "`model.safetensors`), at the label-free choices (Label Wave: "
            "the first minimum of the moving average of the "
            "training predictions' changes; ADELE's fitted curves: every class past its early learning), and at the "
            "clean-validation epoch, an oracle no user has (`noisyseg/training/selection.py`):",
            "",
            *user_table(results, experiments, levels),
            "",
            *selection_target_lines(results, experiments, levels),
            "",
            *never_loses_lines(results, experiments, levels),
            "",
        ]
    if "table1" in experiments:
        plot_training_dynamics(results, "table1", TABLE1_NAMES, figures / "table1_dynamics.png")
        lines += [
            "## 1. ADELE Table 1 on the phantom (erode-dilate noise, reference setting)",
            "",
            *method_table(results, "table1", TABLE1_NAMES, PAPER_TABLE1, "paper, last epoch (SegTHOR)"),
            "",
            "Per-class test IoU at the last epoch:",
            "",
            *per_class_table(results, "table1", TABLE1_NAMES, class_names),
            "",
            "Differences, measured (the issue's goal: adele at least 5 points above baseline-ms):",
            *filter(
                None,
                [
                    _paired_difference(results, "table1", "adele", "baseline-ms"),
                    _paired_difference(results, "table1", "adele-nonadaptive", "baseline-ms"),
                    _paired_difference(results, "table1", "arm", "baseline"),
                    _paired_difference(results, "table1", "adele+arm", "adele"),
                ],
            ),
            "",
            "Memorisation, measured:",
            *_memorisation_notes(results, "table1", TABLE1_NAMES),
            "",
            "![test mIoU, IoU_el and IoU_m per epoch](results/table1_dynamics.png)",
            "",
            *_copy_run_curves(root, results, "table1", figures),
        ]
    if "ladder" in experiments:
        plot_ladder(root, scale, results, levels, figures / "ladder.png")
        lines += [
            "## 2. ADELE Table 6 ladder: baseline-ms, each half of ADELE and adele over noise levels",
            "",
            "Test mIoU at the best validation epoch (mean ± sd over noise seeds, n runs):",
            "",
            *ladder_table(root, scale, results, levels, "best_val"),
            "",
            "Test mIoU at the last epoch:",
            "",
            *ladder_table(root, scale, results, levels, "last"),
            "",
            "![test mIoU against annotation mIoU](results/ladder.png)",
            "",
        ]
    if any(by_method(results, e, m) for e, m in ARM_RUNS):
        lines += [
            "## ARM: what its weights do",
            "",
            "At the last epoch (the relative weight of a wrong label is its weight share "
            "over its pixel share: 1 = uniform, below 1 = ARM turns wrong labels down):",
            "",
            *arm_table(results),
            "",
            *plot_arm_runs(results, figures),
        ]
    if any(r.spec.method in CORRECTING for r in results):
        lines += [
            "## What correction did to the labels",
            "",
            "Per class: IoU of the labels trained on against the clean masks, "
            "as given → after the run's last correction "
            "(mean over runs), then how many runs triggered the class and at which epochs:",
            "",
            *correction_table(results, class_names),
            "",
        ]
    lines += [
        "## Targets",
        "",
        *target_lines(root, scale, results, levels if "ladder" in experiments else [], class_names),
        "",
    ]
    if "coarse" in experiments:
        plot_training_dynamics(results, "coarse", COARSE_METHODS, figures / "coarse_dynamics.png")
        lines += [
            "## 3. The ARM paper's coarse-label setting: "
            "DeepLabv3+ on coarse polygon labels, the paper's multi-step lr policy",
            "",
            *method_table(results, "coarse", COARSE_METHODS, PAPER_COARSE, "paper (Cityscapes coarse, val)"),
            "",
            *filter(None, [_paired_difference(results, "coarse", m, "baseline") for m in COARSE_METHODS[1:]]),
            "",
            *per_class_table(results, "coarse", COARSE_METHODS, class_names),
            "",
            "![test mIoU, IoU_el and IoU_m per epoch](results/coarse_dynamics.png)",
            "",
        ]
    if any(by_method(results, "armstudy", m) for m in STUDY_NAMES):
        lines += [
            "## 4. ARM study: the coarse setting under a constant lr, ARM's optimiser varied",
            "",
            *method_table(results, "armstudy", STUDY_NAMES, {}, "paper"),
            "",
            *filter(None, [_paired_difference(results, "armstudy", m, "baseline") for m in STUDY_NAMES[1:]]),
            "",
        ]
    lines += ["## How to reproduce", "", "```", command, "```", ""]
    atomic_write_text(out, "\n".join(lines) + _kept_sections(out))
    return out


# Hand-written sections after this line of an existing document survive its regeneration.
KEEP_MARKER = "<!-- Sections below are written by hand and kept when the tables above are regenerated. -->"


def _kept_sections(out: Path) -> str:
    text = out.read_text(encoding="utf-8") if out.is_file() else ""
    return "\n" + text[text.index(KEEP_MARKER) :] if KEEP_MARKER in text else ""


def _copy_run_curves(root: Path, results: list[RunResult], experiment: str, figures: Path) -> list[str]:
    """Copy the first seed's curves.png of each method beside the document and link them."""
    lines = [
        "Per-class curves of the first noise seed (IoU against the labels "
        "trained on, fitted curve, correction start; IoU_el and IoU_m):",
        "",
    ]
    seen = set()
    for result in results:
        if result.spec.experiment != experiment or result.spec.name in seen:
            continue
        source = RunDir(root / "runs" / result.spec.relative_dir).curves_file
        if source.is_file():
            seen.add(result.spec.name)
            name = f"{experiment}_{_file_name(result.spec.name)}_curves.png"
            shutil.copyfile(source, figures / name)
            lines += [
                f"`{result.spec.name}` ({result.spec.noise.name}):",
                "",
                f"![{result.spec.name} curves](results/{name})",
                "",
            ]
    return lines
