"""`noisyseg demo`: noisy labels in, a better segmenter out, on a fresh machine with no data.

Builds the CT phantom, corrupts its training labels with ADELE's reference `erode-dilate` noise
(annotation mIoU about 0.6 to 0.7), trains `baseline-ms`, `adele` and `arm` on the CPU, prints a
side-by-side table, writes `curves.png` per method and `summary.json`, exports the model with
the best validation mIoU to ONNX and checks that ONNX Runtime agrees with PyTorch on the test
slices, and ends with the label review of the ADELE run (`noisyseg review`: its training labels
ranked, corrected masks, a page to look at, relabelling imports). Everything lands in `--out`
(default `runs/demo`); a second run with the same settings reuses the data and finished runs,
and resumes an interrupted one.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from noisyseg.experiments.experiment import NoiseSpec, Scale

# The heavy imports (torch, the trainer, the exporter) happen inside the functions that need
# them, so registering this command keeps `noisyseg --help` fast.

log = logging.getLogger(__name__)

# Longest first, so two workers finish together: adele on one core, baseline-ms then arm on the other.
DEMO_METHODS = ("adele", "baseline-ms", "arm")
QUICK_EPOCHS = 4
# How often the parent prints the workers' progress (their own bars are off: two processes
# drawing on one terminal garble it).
PROGRESS_INTERVAL_S = 20.0
ONNX_FILE = "model.onnx"


def demo_scale(quick: bool, epochs: int | None = None) -> Scale:
    """The full demo (the experiment's default scale, 100 epochs: minutes on two CPU cores), or
    the quick one (tiny slices and network, a few epochs: checks the pipeline, not the method)."""
    from noisyseg.experiments.experiment import Scale

    if epochs is not None and epochs < 1:
        raise ValueError(f"--epochs: expected at least 1, got {epochs}")
    if quick:
        return Scale(
            patients=5,
            size=64,
            slices_per_patient=8,
            epochs=epochs or QUICK_EPOCHS,
            batch_size=8,
            unet={"base_width": 4, "depth": 3},
        )
    return Scale() if epochs is None else Scale(epochs=epochs)


def register(subparsers: Any) -> None:
    """Add the `demo` subcommand."""
    parser = subparsers.add_parser("demo", help="end-to-end demo: phantom, noisy labels, baseline-ms vs ADELE vs ARM")
    parser.add_argument(
        "--out", default="runs/demo", help="folder for data, runs, table and summary (default runs/demo)"
    )
    parser.add_argument("--quick", action="store_true", help="a 1-2 minute version (tiny data and network, 4 epochs)")
    parser.add_argument(
        "--epochs",
        type=int,
        help=f"override the number of epochs (default: the experiment scale's, quick {QUICK_EPOCHS})",
    )
    parser.add_argument("--no-export", action="store_true", help="skip the ONNX export and ONNX Runtime check")
    parser.add_argument("--progress", action="store_true", help="show per-epoch progress bars")
    parser.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    out = Path(args.out)
    summary = demo(out, demo_scale(args.quick, args.epochs), export=not args.no_export, quiet=not args.progress)
    print(format_report(summary, out))
    return 0


def demo(
    out: Path, scale: Scale, export: bool = True, quiet: bool = True, workers: int | None = None
) -> dict[str, Any]:
    """Run the demo into `out` and return what `out/summary.json` holds. The methods train in
    `workers` processes of one torch thread each (default: one per CPU core, at most one per
    method); each run is locked and resumable, so workers never train the same run."""
    from noisyseg.data.folder import read_dataset_info
    from noisyseg.experiments.experiment import NoiseSpec, RunSpec, ensure_data
    from noisyseg.io import atomic_write_json

    started = time.monotonic()
    noise = NoiseSpec(family="erode-dilate", level=None, seed=0)  # the reference setting
    phantom, _ = ensure_data(out, scale, noise)  # once, before the workers start
    specs = [RunSpec("demo", method, noise) for method in DEMO_METHODS]
    workers = workers or min(len(specs), os.cpu_count() or 1)
    progress = TrainingProgress(
        {spec.method: out / "runs" / spec.relative_dir for spec in specs}, scale.epochs, started
    )
    if workers == 1:
        seconds = [_train_one(spec, out, scale, quiet) for spec in specs]
    else:
        context = multiprocessing.get_context("spawn")  # torch's thread pools do not survive fork
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            futures = [pool.submit(_train_one, spec, out, scale, quiet) for spec in specs]
            while wait(futures, timeout=PROGRESS_INTERVAL_S, return_when=FIRST_EXCEPTION).not_done:
                progress.report()
            seconds = [future.result() for future in futures]
    methods: dict[str, Any] = {}
    for spec, run_seconds in zip(specs, seconds, strict=True):
        methods[spec.method] = _run_summary(out / "runs" / spec.relative_dir)
        log.info("%s finished in %.0f s", spec.method, run_seconds)
    summary: dict[str, Any] = {
        "methods": methods,
        "noise": _noise_record(out, scale, noise),
        "scale": scale.__dict__,
        "class_names": read_dataset_info(phantom).classes,
    }
    if export:
        summary["onnx"] = export_best_model(out, phantom, methods)
    summary["review"] = review_adele(out, methods)
    summary["seconds"] = round(time.monotonic() - started, 1)
    atomic_write_json(out / "summary.json", summary)
    return summary


class TrainingProgress:
    """One status line per interval while worker processes train: each method's last finished
    epoch, mean training loss and validation mIoU, read from its run directory's metrics."""

    def __init__(self, run_dirs: dict[str, Path], epochs: int, started: float) -> None:
        self.run_dirs, self.epochs, self.started = run_dirs, epochs, started
        self.last_line = ""

    def method_status(self, method: str) -> str:
        from noisyseg.run.run_dir import RunDir

        run = RunDir(self.run_dirs[method])
        if run.is_finished():
            return f"{method} done"
        try:
            record = run.read_metrics()[-1]
        except (FileNotFoundError, ValueError):  # not started, or between its atomic rewrites
            return f"{method} starting"
        return (
            f"{method} epoch {record['epoch']}/{self.epochs} loss "
            f"{record['loss']['total']:.3f} val mIoU {_pct(record['val']['miou'])}%"
        )

    def report(self) -> None:
        line = " | ".join(self.method_status(m) for m in self.run_dirs)
        if line != self.last_line:
            print(f"[{time.monotonic() - self.started:5.0f} s] {line}", flush=True)
            self.last_line = line


def _train_one(spec: Any, out: Path, scale: Scale, quiet: bool) -> float:
    """Train (or skip, or resume) one demo run (the trainer's default: one torch thread); its
    wall time in seconds."""
    from noisyseg.commands.train import train_and_draw
    from noisyseg.experiments.experiment import run_experiment_step

    run_started = time.monotonic()
    run_experiment_step(spec, out, scale, train_and_draw, quiet=quiet)
    return time.monotonic() - run_started


def _run_summary(run_dir: Path) -> dict[str, Any]:
    """The run's summary.json, plus the last epoch's per-class test IoU for the table."""
    from noisyseg.run.run_dir import RunDir

    run = RunDir(run_dir)
    summary = run.read_summary()
    records = run.read_metrics()
    summary["last_test_per_class_iou"] = records[-1]["test"]["per_class_iou"]
    summary["best_val_miou"] = max((r["val"]["miou"] for r in records if r["val"]["miou"] is not None), default=None)
    summary["run_dir"] = str(run_dir)
    summary["curves"] = str(run.curves_file)
    return summary


def _noise_record(out: Path, scale: Scale, noise: NoiseSpec) -> dict[str, Any]:
    from noisyseg.experiments.experiment import annotation_quality

    quality = annotation_quality(out, scale, noise) or {}
    return {
        "family": noise.family,
        "setting": "reference (2-4 erosion/dilation iterations per slice)",
        "annotation_miou": quality.get("annotation_miou"),
        "annotation_miou_fg": quality.get("annotation_miou_fg"),
    }


# ----------------------------------------------------------------------------- export step


def export_best_model(out: Path, phantom: Path, methods: dict[str, Any]) -> dict[str, Any]:
    """Export the run with the best validation mIoU to `out/model.onnx` (validated by the export
    module on sample inputs) and check ONNX Runtime against PyTorch on the real test slices."""
    import numpy as np
    import torch

    from noisyseg.data.folder import (
        IMAGE_DIR,
        IMAGE_SUFFIXES,
        find_slice_file,
        read_image,
        read_split_ids,
    )
    from noisyseg.data.run_data import load_split
    from noisyseg.evaluation.metrics import confusion_matrix, mean_iou
    from noisyseg.export.onnx_export import ExportConfig, export_checkpoint
    from noisyseg.export.onnxruntime_runner import OnnxRuntimeRunner
    from noisyseg.models.model_file import load_model
    from noisyseg.run.run_dir import resolve_model_file

    best = max(methods, key=lambda m: methods[m]["best_val_miou"] or -1.0)
    run_dir = Path(methods[best]["run_dir"])
    onnx_path = out / ONNX_FILE
    # The legacy tracer: about ten times faster to export than the dynamo exporter.
    report = export_checkpoint(run_dir, onnx_path, ExportConfig(exporter="torchscript"))
    model, info = load_model(resolve_model_file(run_dir))
    runner = OnnxRuntimeRunner(onnx_path, providers=["CPUExecutionProvider"])
    raw = np.stack(
        [
            read_image(find_slice_file(phantom / IMAGE_DIR, i, IMAGE_SUFFIXES, "image"))
            for i in read_split_ids(phantom, "test")
        ]
    )
    test = load_split(phantom, "test")
    with torch.inference_mode():
        torch_labels = model(torch.from_numpy(test.images)).argmax(dim=1).numpy()
    onnx_labels = runner.run(raw)["logits"].argmax(axis=1)
    num_classes = info.num_classes
    result = {
        "method": best,
        "path": str(onnx_path),
        "export_validation": report.describe(),
        "test_argmax_agreement": float((torch_labels == onnx_labels).mean()),
        "test_miou_pytorch": mean_iou(confusion_matrix(torch_labels, test.masks, num_classes)),
        "test_miou_onnxruntime": mean_iou(confusion_matrix(onnx_labels, test.masks, num_classes)),
    }
    log.info(
        "exported %s's model to %s; ONNX Runtime agrees on %.4f%% of test pixels",
        best,
        onnx_path,
        100 * result["test_argmax_agreement"],
    )
    return result


# ----------------------------------------------------------------------------- review step


def review_adele(out: Path, methods: dict[str, Any]) -> dict[str, Any]:
    """`noisyseg review` of the ADELE run's training labels into `out/review`."""
    import tempfile

    from noisyseg.review.runner import ReviewOptions, run_review
    from noisyseg.review.sources import RunSource

    target = out / "review"
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target, prefix=".review-") as workdir:
        summary = run_review(RunSource(methods["adele"]["run_dir"], "train", workdir=workdir), target, ReviewOptions())
    return {
        "page": summary["files"]["page"],
        "images": summary["images"],
        "worst": summary["worst"][:5],
        "seconds": summary["seconds"],
    }


# ----------------------------------------------------------------------------- the table


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _row(label: str, cells: list[str], width: int, cell_width: int = 10) -> str:
    return label.ljust(width) + "".join(cell.rjust(cell_width) for cell in cells)


def format_report(summary: dict[str, Any], out: Path) -> str:
    """The side-by-side table the demo prints."""
    methods, noise, names = summary["methods"], summary["noise"], summary["class_names"]
    width = max(len(m) for m in methods) + 2
    three = ("best_val", "last", "max")
    lines = [
        f"Noisy training labels: {noise['family']}, {noise['setting']}: annotation mIoU "
        f"{_pct(noise['annotation_miou'])}% (foreground {_pct(noise['annotation_miou_fg'])}%)",
        "",
        "Test mIoU (%): with background (all) and without (fg), "
        "at the best validation epoch, the last epoch, and the maximum",
        _row(
            "",
            [f"all {k}" for k in ("best-val", "last", "max")] + [f"fg {k}" for k in ("best-val", "last", "max")],
            width,
            13,
        ),
    ]
    for method, run in methods.items():
        cells = [_pct(run["test_miou"][k]) for k in three] + [_pct(run["test_miou_fg"][k]) for k in three]
        lines.append(_row(method, cells, width, 13))
    lines += ["", "Per-class test IoU at the last epoch (%)", _row("", [n[:11] for n in names], width, 12)]
    for method, run in methods.items():
        lines.append(_row(method, [_pct(v) for v in run["last_test_per_class_iou"]], width, 12))
    lines += ["", "Label correction start (epoch; - = never)", _row("", [n[:11] for n in names[1:]], width, 12)]
    for method, run in methods.items():
        epochs = run["trigger_epoch"]
        lines.append(_row(method, [str(epochs.get(str(c)) or "-") for c in range(1, len(names))], width, 12))
    lines += ["", "Curves: " + ", ".join(run["curves"] for run in methods.values())]
    if "onnx" in summary:
        onnx = summary["onnx"]
        lines.append(
            f"ONNX: {onnx['method']} model -> {onnx['path']}; ONNX Runtime agrees with PyTorch on "
            f"{100 * onnx['test_argmax_agreement']:.3f}% of test pixels "
            f"(test mIoU {_pct(onnx['test_miou_onnxruntime'])}% vs "
            f"{_pct(onnx['test_miou_pytorch'])}% in PyTorch)"
        )
    lines.append(f"Done in {summary['seconds']:.0f} s; summary: {out / 'summary.json'}")
    review = summary["review"]
    lines.append(
        f"Label review of the adele run's {review['images']} training images "
        f"({review['seconds']:.0f} s), worst first in scores.csv; page: {review['page']}"
    )
    return "\n".join(lines)
