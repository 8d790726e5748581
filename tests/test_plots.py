"""curves.png from a synthetic metrics.jsonl written to the metrics contract."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from noisyseg.experiments.plots import build_run_figure, plot_run_curves
from noisyseg.run.run_dir import read_metrics

CLASSES = ["1", "2", "3", "4"]
FIT = {"a": 0.8, "b": 0.3, "c": 1.2}
TRIGGER_EPOCH = 6


def _record(epoch: int, with_diagnostics: bool) -> dict:
    rising = 0.8 * (1 - math.exp(-0.3 * epoch**1.2))
    triggered = epoch >= TRIGGER_EPOCH
    record = {
        "epoch": epoch,
        "iteration": epoch * 10,
        "method": "adele",
        "lr": 0.01,
        "loss": {"total": 1.0 / epoch, "ce": 0.9 / epoch, "consistency": 0.1 / epoch},
        # Class 4 has no prediction yet in epoch 1: NaN written as null.
        "train_iou": {c: (None if (c == "4" and epoch == 1) else rising * (0.9 + 0.02 * int(c))) for c in CLASSES},
        "val": {"per_class_iou": [0.98, 0.5, 0.6, 0.7, 0.8], "miou": 0.5 + 0.02 * epoch, "miou_fg": 0.4 + 0.02 * epoch},
        "test": {
            "per_class_iou": [0.97, 0.5, 0.6, 0.7, 0.8],
            "miou": 0.45 + 0.02 * epoch,
            "miou_fg": 0.35 + 0.02 * epoch,
        },
        "trigger": {
            "1": {
                "triggered": triggered,
                "epoch": TRIGGER_EPOCH if triggered else None,
                "fit": FIT if epoch >= 3 else None,
            },
            **{c: {"triggered": False, "epoch": None, "fit": None} for c in CLASSES[1:]},
        },
        "labels_changed_fraction": 0.01 * max(0, epoch - TRIGGER_EPOCH),
    }
    if with_diagnostics:
        record["iou_el"] = {c: 0.3 + 0.01 * epoch for c in CLASSES}
        record["iou_m"] = {c: 0.02 * epoch for c in CLASSES}
    return record


def _write_run(run_dir: Path, epochs: int = 12, with_diagnostics: bool = True) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(_record(epoch, with_diagnostics)) for epoch in range(1, epochs + 1)]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run_dir


def _titled_axes(figure) -> dict[str, object]:
    return {ax.get_title(): ax for ax in figure.axes if ax.get_title()}


def test_plot_run_curves_writes_a_png(tmp_path: Path) -> None:
    run_dir = _write_run(tmp_path / "run")
    out = plot_run_curves(run_dir)
    assert out == run_dir / "curves.png"
    with Image.open(out) as image:
        assert image.format == "PNG"
        # Five columns (four classes and the summary) by two rows of panels.
        assert image.width > image.height > 300
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]


def test_figure_has_a_fit_and_a_diagnostics_panel_per_class_and_a_summary(tmp_path: Path) -> None:
    figure = build_run_figure(read_metrics(_write_run(tmp_path / "run") / "metrics.jsonl"))
    titles = _titled_axes(figure)
    assert sorted(titles) == sorted(
        [f"class {c}" for c in CLASSES] + [f"class {c}: noisy pixels" for c in CLASSES] + ["adele: mIoU"]
    )


def test_figure_without_clean_labels_has_no_diagnostics_row(tmp_path: Path) -> None:
    metrics = _write_run(tmp_path / "run", with_diagnostics=False) / "metrics.jsonl"
    titles = _titled_axes(
        build_run_figure(read_metrics(metrics), class_names=["bg", "eso", "heart", "trachea", "aorta"])
    )
    assert sorted(titles) == sorted(["class 1 eso", "class 2 heart", "class 3 trachea", "class 4 aorta", "adele: mIoU"])


def test_fit_panel_draws_the_fitted_curve_and_marks_the_trigger(tmp_path: Path) -> None:
    figure = build_run_figure(read_metrics(_write_run(tmp_path / "run") / "metrics.jsonl"))
    panel = _titled_axes(figure)["class 1"]
    lines = {line.get_label(): line for line in panel.get_lines()}
    t, fitted = lines["fitted a(1-exp(-b t^c))"].get_data()
    np.testing.assert_allclose(fitted, FIT["a"] * (1 - np.exp(-FIT["b"] * np.asarray(t) ** FIT["c"])))
    assert list(lines[f"correction from epoch {TRIGGER_EPOCH}"].get_xdata()) == [TRIGGER_EPOCH, TRIGGER_EPOCH]
    # Class 4's missing first value is plotted as a gap (NaN), not as 0.
    observed = _titled_axes(figure)["class 4"].get_lines()[0].get_ydata()
    assert math.isnan(observed[0]) and observed[1] > 0


def test_read_metrics_keeps_the_last_record_of_a_repeated_epoch(tmp_path: Path) -> None:
    run_dir = _write_run(tmp_path / "run", epochs=3)
    with open(run_dir / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps({**_record(3, True), "lr": 0.5}) + "\n")
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2, 3] and records[-1]["lr"] == 0.5


def test_bad_metrics_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plot_run_curves(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        read_metrics(tmp_path / "metrics.jsonl")
