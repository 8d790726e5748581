"""The label review against the truth of synthetic noise, beside cleanlab on the same probabilities.

Run: ``make bench`` or ``.venv/bin/python -m pytest benchmarks/bench_review.py --benchmark-only``
(cleanlab is the `bench` extra: ``pip install -c constraints.txt -e '.[bench]'``; without it the
cleanlab rows are left out). ``NOISYSEG_BENCH_REVIEW_ROOT`` (default ``.benchmarks/review``)
keeps the phantoms and runs, so a second run reuses them.

Quality: the experiment's phantom (`experiment.Scale()`: 8 patients, 96 px) with ADELE's reference
erode-dilate noise at three noise seeds, one ADELE run each (100 epochs, about 10 minutes on one
core). On the training split the truth is known: an image's annotation mIoU (noisy vs clean mask,
over the classes in either), its pixel accuracy (labelled pixels whose label is right) and which
pixels are wrong. For each seed and scorer: Spearman's rank correlation between the image score and
each truth, the precision of the worst `TOP_K_FRACTION` images (how many of the truly worst that
many are among them), and the issue mask's pixel precision and recall. The table (mean and spread
over the seeds) goes to ``.benchmarks/review_summary.md``. cleanlab gets the probabilities the
review computes (the run's model on its own training images, in-sample for both) and the given
labels; `find_label_issues` runs at full resolution (`downsample=1`).

Time and memory: `noisyseg review --model model.onnx --data DIR` in a child process over phantoms
of about 250 and 1,000 training images (the seed-0 run's model exported to ONNX); wall time and
the child's CPU time and peak resident memory go into `extra_info` (the same peak for both sizes means the
pass streams).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from noisyseg.data.folder import MASK_DIR, MASK_SUFFIXES, find_slice_file, read_mask
from noisyseg.experiments.experiment import (
    NoiseSpec,
    RunSpec,
    Scale,
    ensure_data,
    run_experiment_step,
)
from noisyseg.review.scores import review_image
from noisyseg.review.sources import RunSource

ROOT = Path(os.environ.get("NOISYSEG_BENCH_REVIEW_ROOT", ".benchmarks/review"))
SUMMARY = Path(os.environ.get("NOISYSEG_BENCH_SUMMARY", ".benchmarks/review_summary.md"))
SEEDS = (0, 1, 2)
TOP_K_FRACTION = 0.1
SCALE = Scale()


def trained_run(seed: int) -> Path:
    """The ADELE run of noise seed `seed` (trained once, then reused)."""
    from noisyseg.training.trainer import train

    spec = RunSpec("review", "adele", NoiseSpec("erode-dilate", None, seed))
    run_experiment_step(spec, ROOT, SCALE, train)
    return ROOT / "runs" / spec.relative_dir


def annotation_miou(noisy: np.ndarray, clean: np.ndarray, num_classes: int) -> float:
    counts = np.bincount(
        clean.astype(np.int64).ravel() * num_classes + noisy.ravel(), minlength=num_classes**2
    ).reshape(num_classes, num_classes)
    union = counts.sum(0) + counts.sum(1) - np.diag(counts)
    return float(np.mean(np.diag(counts)[union > 0] / union[union > 0]))


def ranking(scores: np.ndarray, truths: dict[str, np.ndarray], k: int) -> dict[str, float]:
    """Per truth (low = bad): Spearman's rho, and how many of the k truly worst images are among
    the k lowest scores."""
    figures = {}
    for name, truth in truths.items():
        figures[f"spearman_{name}"] = float(spearmanr(scores, truth).statistic)
        figures[f"precision_at_k_{name}"] = (
            len(set(np.argsort(scores, kind="stable")[:k]) & set(np.argsort(truth, kind="stable")[:k])) / k
        )
    return figures


def pixels(found: np.ndarray, wrong: np.ndarray) -> dict[str, float]:
    hits = int((found & wrong).sum())
    return {"pixel_precision": hits / max(int(found.sum()), 1), "pixel_recall": hits / max(int(wrong.sum()), 1)}


def measure(seed: int) -> dict[str, dict[str, float]]:
    """Every scorer's figures on the training split of noise seed `seed`."""
    run = trained_run(seed)
    torch.set_num_threads(1)  # as `noisyseg review` runs (ReviewOptions.threads)
    phantom, _ = ensure_data(ROOT, SCALE, NoiseSpec("erode-dilate", None, seed))
    source = RunSource(run, "train", "cpu")
    num_classes = len(source.class_names)
    probs, given, clean, quality, unchanged, iou, issue, changed = [], [], [], [], [], [], [], []
    for item in source.items():
        review = review_image(
            item.probs,
            torch.from_numpy(item.given),
            source.ignore_index,
            corrected=None if item.corrected is None else torch.from_numpy(item.corrected),
        )
        truth = read_mask(find_slice_file(phantom / MASK_DIR, item.slice_id, MASK_SUFFIXES, "mask"))
        probs.append(item.probs.numpy())
        given.append(item.given)
        clean.append(truth)
        quality.append(review.label_quality)
        unchanged.append(1.0 - review.changed_fraction)
        iou.append(float(np.nanmean(review.class_iou)))
        prediction_review = review_image(
            item.probs, torch.from_numpy(item.given), source.ignore_index
        )  # the issue mask, whatever the store says
        issue.append(prediction_review.issue.numpy())
        changed.append(review.corrected.numpy() != item.given)
    labels, truth_masks = np.stack(given), np.stack(clean)
    wrong = labels != truth_masks
    true_miou = {
        "miou": np.array([annotation_miou(g, c, num_classes) for g, c in zip(labels, truth_masks)]),
        "accuracy": 1.0 - wrong.mean(axis=(1, 2)),
    }
    k = max(1, round(TOP_K_FRACTION * len(labels)))
    rows = {
        "noisyseg label quality (softmin)": {
            **ranking(np.array(quality), true_miou, k),
            **pixels(np.stack(issue), wrong),
        },
        "noisyseg ADELE changes (1 - changed fraction)": {
            **ranking(np.array(unchanged), true_miou, k),
            **pixels(np.stack(changed), wrong),
        },
        "noisyseg given-vs-prediction mIoU": ranking(np.array(iou), true_miou, k),
    }
    try:
        from cleanlab.segmentation.filter import find_label_issues
        from cleanlab.segmentation.rank import get_label_quality_scores
    except ImportError:
        return rows
    pred_probs = np.stack(probs)
    theirs, _ = get_label_quality_scores(labels.astype(np.int64), pred_probs, verbose=False)
    found = find_label_issues(labels.astype(np.int64), pred_probs, downsample=1, verbose=False)
    rows["cleanlab get_label_quality_scores (softmin)"] = {
        **ranking(theirs, true_miou, k),
        "max_abs_difference_to_noisyseg": float(np.abs(theirs - np.array(quality)).max()),
    }
    rows["cleanlab find_label_issues (1 - issue fraction)"] = {
        **ranking(1.0 - found.mean(axis=(1, 2)), true_miou, k),
        **pixels(found, wrong),
    }
    return rows


def table(per_seed: list[dict[str, dict[str, float]]]) -> str:
    columns = (
        "spearman_miou",
        "precision_at_k_miou",
        "spearman_accuracy",
        "precision_at_k_accuracy",
        "pixel_precision",
        "pixel_recall",
    )
    lines = ["| scorer | " + " | ".join(columns) + " |", "| --- |" + " ---: |" * len(columns)]
    for name in per_seed[0]:
        cells = []
        for column in columns:
            values = [seed[name][column] for seed in per_seed if column in seed[name]]
            cells.append(f"{np.mean(values):.3f} ± {np.std(values):.3f}" if values else "–")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def test_review_quality_against_the_truth(benchmark: Any) -> None:
    per_seed: list[dict[str, dict[str, float]]] = []
    benchmark.pedantic(lambda: per_seed.extend(measure(seed) for seed in SEEDS), rounds=1, iterations=1)
    text = table(per_seed)
    SUMMARY.parent.mkdir(parents=True, exist_ok=True)
    SUMMARY.write_text(text)
    print("\n" + text)
    benchmark.extra_info["per_seed"] = per_seed
    softmin = [seed["noisyseg label quality (softmin)"]["spearman_miou"] for seed in per_seed]
    assert all(np.isfinite(softmin))
    if "cleanlab get_label_quality_scores (softmin)" in per_seed[0]:  # the same definition
        assert (
            max(
                seed["cleanlab get_label_quality_scores (softmin)"]["max_abs_difference_to_noisyseg"]
                for seed in per_seed
            )
            < 1e-6
        )


@pytest.fixture(scope="module")
def onnx_model() -> Path:
    from noisyseg.export.onnx_export import ExportConfig, export_checkpoint

    path = ROOT / "review-model.onnx"
    if not path.is_file():
        export_checkpoint(trained_run(0), path, ExportConfig(exporter="torchscript", output="probs"))
    return path


def phantom_with(train_images: int) -> tuple[Path, Path]:
    """A phantom (and its noisy labels) with at least `train_images` training slices."""
    from noisyseg.data.folder import read_split_ids
    from noisyseg.data.noise import corrupt_dataset
    from noisyseg.data.phantom import generate_phantom

    # About 14 of a patient's 16 slices show an organ, and about 0.6 of the patients are in training.
    patients = int(np.ceil(train_images / (0.6 * 14)))
    data, labels = ROOT / f"phantom-{train_images}", ROOT / f"noisy-{train_images}"
    if not data.is_dir():
        generate_phantom(data, patients, SCALE.phantom_seed, SCALE.phantom_config())
    if not labels.is_dir():
        corrupt_dataset(data, labels, "erode-dilate")
    assert len(read_split_ids(data, "train")) >= train_images
    return data, labels


@pytest.mark.parametrize("images", [250, 1000])
def test_review_time_and_peak_memory(benchmark: Any, onnx_model: Path, images: int, tmp_path: Path) -> None:
    data, labels = phantom_with(images)
    command = [
        sys.executable,
        "-m",
        "noisyseg",
        "review",
        "--model",
        str(onnx_model),
        "--data",
        str(data),
        "--labels",
        str(labels),
        "--quiet",
    ]

    peaks: list[float] = []
    cpu: list[float] = []

    def review() -> None:
        child = subprocess.Popen(
            [*command, "--out", str(tmp_path / f"out-{time.monotonic_ns()}")], stdout=subprocess.DEVNULL
        )
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        assert child.returncode == 0
        peaks.append(usage.ru_maxrss / 1024)  # KiB on Linux
        cpu.append(usage.ru_utime + usage.ru_stime)  # what a shared machine's wall time hides

    benchmark.pedantic(review, rounds=1, iterations=1)
    from noisyseg.data.folder import read_split_ids

    benchmark.extra_info.update(
        images=len(read_split_ids(data, "train")), peak_rss_mib=round(max(peaks), 1), cpu_seconds=round(max(cpu), 1)
    )
    print(json.dumps(benchmark.extra_info))
