"""`curves.png` of a training run, from its `metrics.jsonl`: the ADELE paper's Figures 2 and 4.

Layout: one column per foreground class plus a summary column.
- Top row, per class: the training IoU against the labels currently trained on, the fitted
  early-learning curve a (1 - exp(-b t^c)) and a dashed line where label correction started.
- Bottom row, per class, only when clean training labels are known: IoU_el (prediction vs the
  clean label on wrongly labelled pixels) and IoU_m (prediction vs the wrong label there).
- Summary column: validation and test mIoU (with background) over epochs, the best validation
  epoch marked, and the fraction of training labels changed by correction.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from noisyseg.io import atomic_open
from noisyseg.methods.adele import CurveFit
from noisyseg.models.model_file import read_model_info
from noisyseg.run.run_dir import RunDir

logger = logging.getLogger(__name__)

PANEL_SIZE = (3.2, 2.6)  # inches per panel


@dataclass
class RunCurves:
    """The per-epoch series of a run, as float arrays (NaN where a value is missing)."""

    epochs: np.ndarray
    class_ids: list[str]
    train_iou: dict[str, np.ndarray]
    iou_el: dict[str, np.ndarray] | None
    iou_m: dict[str, np.ndarray] | None
    val_miou: np.ndarray
    val_noisy_miou: np.ndarray  # on the labels folder's noisy validation masks (all NaN without)
    test_miou: np.ndarray
    labels_changed: np.ndarray
    trigger_epoch: dict[str, int | None]
    fit: dict[str, dict[str, float] | None]
    method: str


def _value(x: Any) -> float:
    return math.nan if x is None else float(x)


def _series(records: list[dict[str, Any]], key: str, class_ids: list[str]) -> dict[str, np.ndarray] | None:
    if not any(key in record for record in records):
        return None
    return {
        class_id: np.array([_value(record.get(key, {}).get(class_id)) for record in records]) for class_id in class_ids
    }


def _split_miou(records: list[dict[str, Any]], split: str) -> np.ndarray:
    return np.array([_value((record.get(split) or {}).get("miou")) for record in records])


def _trigger_and_fit(records: list[dict[str, Any]], class_id: str) -> tuple[int | None, dict[str, float] | None]:
    """The epoch correction started, and the fit that decided it (else the latest fit)."""
    latest_fit = None
    for record in records:
        state = (record.get("trigger") or {}).get(class_id) or {}
        if state.get("fit"):
            latest_fit = state["fit"]
        if state.get("triggered"):
            return int(state.get("epoch") or record["epoch"]), state.get("fit") or latest_fit
    return None, latest_fit


def run_curves(records: list[dict[str, Any]]) -> RunCurves:
    """Collect the plotted series from metrics records (see the metrics.jsonl contract)."""
    class_ids = sorted({cid for record in records for cid in record.get("train_iou", {})}, key=int)
    triggers = {class_id: _trigger_and_fit(records, class_id) for class_id in class_ids}
    return RunCurves(
        epochs=np.array([int(record["epoch"]) for record in records]),
        class_ids=class_ids,
        train_iou=_series(records, "train_iou", class_ids) or {},
        iou_el=_series(records, "iou_el", class_ids),
        iou_m=_series(records, "iou_m", class_ids),
        val_miou=_split_miou(records, "val"),
        val_noisy_miou=_split_miou(records, "val_noisy"),
        test_miou=_split_miou(records, "test"),
        labels_changed=np.array([_value(record.get("labels_changed_fraction", 0.0)) for record in records]),
        trigger_epoch={class_id: epoch for class_id, (epoch, _) in triggers.items()},
        fit={class_id: fit for class_id, (_, fit) in triggers.items()},
        method=str(records[-1].get("method", "")),
    )


def _epoch_axis(ax: Axes, curves: RunCurves) -> None:
    ax.set_xlim(0.5, max(int(curves.epochs.max()), 2) + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")


def _plot_fit_panel(ax: Axes, curves: RunCurves, class_id: str, title: str) -> None:
    ax.plot(curves.epochs, curves.train_iou[class_id], "o", markersize=3, label="IoU vs current labels")
    fit = curves.fit[class_id]
    if fit is not None:
        t = np.linspace(1, max(int(curves.epochs.max()), 2), 200)
        ax.plot(t, CurveFit(fit["a"], fit["b"], fit["c"]).value(t), "-", label="fitted a(1-exp(-b t^c))")
    trigger = curves.trigger_epoch[class_id]
    if trigger is not None:
        ax.axvline(trigger, color="tab:red", linestyle="--", label=f"correction from epoch {trigger}")
    ax.set_title(title)
    ax.set_ylim(0, 1)
    _epoch_axis(ax, curves)
    ax.legend(fontsize=6, loc="lower right")


def _plot_diagnostics_panel(ax: Axes, curves: RunCurves, class_id: str, title: str) -> None:
    assert curves.iou_el is not None and curves.iou_m is not None
    ax.plot(curves.epochs, curves.iou_el[class_id], "-", color="tab:green", label="IoU_el (early learning)")
    ax.plot(curves.epochs, curves.iou_m[class_id], "-", color="tab:purple", label="IoU_m (memorisation)")
    trigger = curves.trigger_epoch[class_id]
    if trigger is not None:
        ax.axvline(trigger, color="tab:red", linestyle="--")
    ax.set_title(title)
    ax.set_ylim(0, 1)
    _epoch_axis(ax, curves)
    ax.legend(fontsize=6, loc="upper right")


def _plot_summary_panel(ax: Axes, curves: RunCurves) -> None:
    ax.plot(curves.epochs, curves.val_miou, "-", label="val mIoU")
    if np.isfinite(curves.val_noisy_miou).any():
        ax.plot(curves.epochs, curves.val_noisy_miou, "--", label="val mIoU, noisy masks")
    ax.plot(curves.epochs, curves.test_miou, "-", label="test mIoU")
    if np.isfinite(curves.val_miou).any():
        best = int(np.nanargmax(curves.val_miou))
        ax.axvline(curves.epochs[best], color="grey", linestyle=":", label=f"best val (epoch {curves.epochs[best]})")
    ax.set_ylim(0, 1)
    _epoch_axis(ax, curves)
    ax.set_title(f"{curves.method}: mIoU")
    changed = ax.twinx()
    changed.plot(curves.epochs, curves.labels_changed, "-", color="tab:brown", alpha=0.6, label="labels changed")
    changed.set_ylabel("fraction of labels changed", fontsize=7)
    changed.set_ylim(bottom=0)
    handles, labels = ax.get_legend_handles_labels()
    more_handles, more_labels = changed.get_legend_handles_labels()
    ax.legend(handles + more_handles, labels + more_labels, fontsize=6, loc="lower right")


def build_run_figure(records: list[dict[str, Any]], class_names: list[str] | None = None) -> Figure:
    """The curves figure of a run from its metrics records; `class_names` indexed by class id."""
    curves = run_curves(records)
    has_diagnostics = curves.iou_el is not None and curves.iou_m is not None
    rows, columns = (2 if has_diagnostics else 1), len(curves.class_ids) + 1
    # A bare Figure on the Agg canvas, not pyplot: no global backend state, nothing to close.
    figure = Figure(figsize=(PANEL_SIZE[0] * columns, PANEL_SIZE[1] * rows), layout="constrained")
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(rows, columns)

    def class_title(class_id: str) -> str:
        index = int(class_id)
        name = class_names[index] if class_names and index < len(class_names) else ""
        return f"class {class_id} {name}".strip()

    for column, class_id in enumerate(curves.class_ids):
        _plot_fit_panel(figure.add_subplot(grid[0, column]), curves, class_id, class_title(class_id))
        if has_diagnostics:
            title = f"{class_title(class_id)}: noisy pixels"
            _plot_diagnostics_panel(figure.add_subplot(grid[1, column]), curves, class_id, title)
    _plot_summary_panel(figure.add_subplot(grid[:, -1]), curves)
    return figure


def _class_names(run: RunDir) -> list[str] | None:
    model_file = run.model_file
    return read_model_info(model_file).class_names if model_file.is_file() else None


def plot_run_curves(run_dir: str | Path) -> Path:
    """Write `RUN_DIR/curves.png` from `RUN_DIR/metrics.jsonl` (atomically) and return its path."""
    run = RunDir(run_dir)
    figure = build_run_figure(run.read_metrics(), _class_names(run))
    out = run.curves_file
    with atomic_open(out, "wb") as handle:
        figure.savefig(handle, format="png", dpi=110)
    logger.info("wrote %s", out)
    return out
