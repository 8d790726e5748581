"""The review of one split: a streaming pass over its items, then the files a person acts on.

The pass reads, predicts and scores one image at a time (`scores.review_image`, on the source's
device) and writes that image's masks at once, so its memory holds one image's probabilities
and a row of numbers per image, whatever the dataset's size. The worst `top` images are then
predicted again to draw the page and fill the relabelling exports.

OUT/
  scores.csv            one row per image, worst label quality first
  issues/<id>.png       255 where the given label disagrees with a confident prediction, else 0
  corrected/<id>.png    class ids the image should carry (the run's label store, or the given
                        mask with the issue pixels set to the prediction), in the mask format
                        (.png or .npy) of the given mask: they can replace the originals
  index.html            the worst images side by side, legend, histogram, relabelling counts
  label-studio/         tasks.json, config.xml, images/ (`label_studio.py`)
  cvat/coco.zip         COCO 1.0 with RLE masks for CVAT (`coco.py`)
  summary.json          what was reviewed, with what, and where the files are
"""

from __future__ import annotations

import csv
import io
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from noisyseg.data.colors import display_image, png_bytes
from noisyseg.data.folder import encode_mask, staged_directory, write_new_file
from noisyseg.io import atomic_write_json, atomic_write_text
from noisyseg.review.scores import DEFAULT_CONFIDENCE, ImageReview, review_image
from noisyseg.review.sources import ProbabilitySource

log = logging.getLogger(__name__)

FORMATS = ("html", "png", "label-studio", "cvat")
# What "worst" means: the lowest label quality, or the largest share of relabelled pixels (on
# the phantom the better order for ADELE runs: docs/results.md, "Label review").
ORDERS = ("label_quality", "changed_fraction")
SCORES_FILE = "scores.csv"
PAGE_FILE = "index.html"
SUMMARY_FILE = "summary.json"
ISSUES_DIR = "issues"
CORRECTED_DIR = "corrected"


@dataclass
class ReviewOptions:
    top: int = 20
    formats: Sequence[str] = FORMATS
    confidence: float = DEFAULT_CONFIDENCE
    image_url: str = "images"  # prefix of the Label Studio tasks' image paths
    quiet: bool = True
    # torch's intra-op threads during the review: one image's ops are small, and more threads
    # only wait on each other (measured on a loaded 2-core machine: 12 ms an image on one
    # thread, 300 ms on two).
    threads: int = 1
    sort: str = "label_quality"

    def __post_init__(self) -> None:
        unknown = [f for f in self.formats if f not in FORMATS]
        if unknown:
            raise ValueError(f"--format: unknown format(s) {', '.join(unknown)}; choose from {', '.join(FORMATS)}")
        if self.top < 1:
            raise ValueError(f"--top: expected at least 1, got {self.top}")
        if self.sort not in ORDERS:
            raise ValueError(f"--sort: expected one of {', '.join(ORDERS)}, got {self.sort!r}")
        if self.threads < 1:
            raise ValueError(f"--threads: expected at least 1, got {self.threads}")
        if not 0.0 < self.confidence <= 1.0:
            raise ValueError(f"--confidence: expected a probability in (0, 1], got {self.confidence}")


@dataclass
class ReviewRow:
    index: int
    slice_id: str
    label_quality: float
    changed_fraction: float
    issue_fraction: float
    class_iou: list[float]
    changes: list[tuple[int, int, int]] = field(default_factory=list)  # (given, corrected, pixels), most first


@dataclass
class Panel:
    """One of the worst images again: its display image and its masks."""

    row: ReviewRow
    image: np.ndarray  # uint8 (H, W, 3)
    given: np.ndarray  # uint8 (H, W) class ids
    corrected: np.ndarray  # uint8 (H, W) class ids
    issue: np.ndarray  # bool (H, W)


def run_review(source: ProbabilitySource, out: str | Path, options: ReviewOptions | None = None) -> dict[str, Any]:
    """Review every item of `source` into `out`; returns the summary also written there."""
    options = options or ReviewOptions()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(options.threads)
    try:
        return review_into(source, Path(out), options)
    finally:
        torch.set_num_threads(previous_threads)


def review_into(source: ProbabilitySource, out: Path, options: ReviewOptions) -> dict[str, Any]:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a folder; choose another --out")
    started = time.monotonic()
    if "png" in options.formats:
        for name in (ISSUES_DIR, CORRECTED_DIR):
            shutil.rmtree(out / name, ignore_errors=True)  # a previous review's masks
        with staged_directory(out / ISSUES_DIR) as issues, staged_directory(out / CORRECTED_DIR) as corrected:
            rows, transitions = score_all(source, options, (issues, corrected))
    else:
        rows, transitions = score_all(source, options, None)
    rows.sort(key=worst_first(options.sort))
    atomic_write_text(out / SCORES_FILE, scores_csv(rows, source.class_names))
    worst = rows[: options.top]
    written = {"scores": str(out / SCORES_FILE)}
    if "png" in options.formats:
        written.update(issues=str(out / ISSUES_DIR), corrected=str(out / CORRECTED_DIR))
    panels = list(draw(source, worst, options)) if {"html", "label-studio", "cvat"} & set(options.formats) else []
    if "label-studio" in options.formats:
        from noisyseg.review.label_studio import write_label_studio

        items = ((p.row.slice_id, p.image, p.corrected, p.row.label_quality) for p in panels)
        written["label_studio"] = str(
            write_label_studio(out / "label-studio", items, source.class_names, options.image_url)
        )
    if "cvat" in options.formats:
        from noisyseg.review.coco import write_cvat_archive

        written["cvat"] = str(
            write_cvat_archive(
                out / "cvat" / "coco.zip", ((p.row.slice_id, p.image, p.corrected) for p in panels), source.class_names
            )
        )
    summary: dict[str, Any] = {
        "images": len(rows),
        "top": len(worst),
        "correction": source.correction,
        "confidence": options.confidence,
        "sort": options.sort,
        "class_names": source.class_names,
        "transitions": transitions.cpu().tolist(),
        "worst": [r.slice_id for r in worst],
        "files": written,
        "seconds": round(time.monotonic() - started, 2),
    }
    if "html" in options.formats:
        from noisyseg.review.page import render_page

        atomic_write_text(out / PAGE_FILE, render_page(summary, rows, panels, source.ignore_index))
        written["page"] = str(out / PAGE_FILE)
    atomic_write_json(out / SUMMARY_FILE, summary)
    return summary


def worst_first(order: str) -> Callable[[ReviewRow], tuple[bool, float]]:
    """The sort key putting the worst rows first (NaN, an image without labels, last)."""
    if order == "changed_fraction":
        return lambda r: (math.isnan(r.changed_fraction), -r.changed_fraction)
    return lambda r: (math.isnan(r.label_quality), r.label_quality)


def score_all(
    source: ProbabilitySource, options: ReviewOptions, mask_dirs: tuple[Path, Path] | None
) -> tuple[list[ReviewRow], torch.Tensor]:
    """The streaming pass: one row per item and the summed class transitions; with `mask_dirs`
    (issues, corrected) each item's masks written there (folders that appear whole at the end,
    so no file needs its own fsync)."""
    num_classes = len(source.class_names)
    transitions = torch.zeros((num_classes, num_classes), dtype=torch.int64, device=source.device)
    rows = []
    for item in progress(source.items(), len(source.ids), options.quiet):
        review = score(source, item.given, item.probs, item.corrected, options)
        transitions += review.transitions
        if mask_dirs is not None:
            issues, corrected = mask_dirs
            write_new_file(
                issues / f"{item.slice_id}.png", png_bytes(review.issue.to(torch.uint8).mul_(255).cpu().numpy())
            )
            path = corrected / f"{item.slice_id}{source.mask_suffix(item.index)}"
            write_new_file(path, encode_mask(path, review.corrected.cpu().numpy()))
        rows.append(row_of(item.index, item.slice_id, review))
    return rows, transitions


def score(
    source: ProbabilitySource,
    given: np.ndarray,
    probs: torch.Tensor,
    corrected: np.ndarray | None,
    options: ReviewOptions,
) -> ImageReview:
    return review_image(
        probs,
        torch.from_numpy(given),
        source.ignore_index,
        options.confidence,
        None if corrected is None else torch.from_numpy(corrected),
    )


def progress(items: Iterator[Any], total: int, quiet: bool) -> Iterator[Any]:
    from tqdm import tqdm

    return iter(tqdm(items, total=total, desc="review", unit="image", disable=quiet))


def row_of(index: int, slice_id: str, review: ImageReview) -> ReviewRow:
    counts = review.transitions.cpu().numpy()
    changes = [(int(g), int(c), int(counts[g, c])) for g, c in zip(*np.nonzero(counts)) if g != c]
    changes.sort(key=lambda change: -change[2])
    return ReviewRow(
        index, slice_id, review.label_quality, review.changed_fraction, review.issue_fraction, review.class_iou, changes
    )


def number(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.6f}"


def scores_csv(rows: Sequence[ReviewRow], class_names: Sequence[str]) -> str:
    """`scores.csv`: rank, id, the three measures, the relabelled classes, per-class IoU."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        [
            "rank",
            "slice_id",
            "label_quality",
            "changed_fraction",
            "issue_fraction",
            "classes_changed",
            *(f"iou_{name}" for name in class_names),
        ]
    )
    for rank, row in enumerate(rows, start=1):
        changed = ";".join(f"{class_names[g]}>{class_names[c]}:{n}" for g, c, n in row.changes)
        writer.writerow(
            [
                rank,
                row.slice_id,
                number(row.label_quality),
                number(row.changed_fraction),
                number(row.issue_fraction),
                changed,
                *(number(v) for v in row.class_iou),
            ]
        )
    return buffer.getvalue()


def draw(source: ProbabilitySource, rows: Sequence[ReviewRow], options: ReviewOptions) -> Iterator[Panel]:
    """The worst images predicted and scored again (the pass kept no image)."""
    for row in rows:
        image, given = source.data.read(row.index)
        review = score(source, given, source.probabilities(image), source.corrected(row.index), options)
        yield Panel(row, display_image(image), given, review.corrected.cpu().numpy(), review.issue.cpu().numpy())
