"""What ADELE's label correction did to the labels, measured against the clean masks.

The phantom experiments know the clean masks behind every noisy label, so the label store a
run ends with can be scored: per class, the IoU of the given (noisy) labels and of the
corrected labels against the clean ones. A correction that helps raises it; one made from a
network that has not yet learned the class lowers it.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from noisyseg.data.label_store import LabelStore
from noisyseg.data.run_data import load_run_data
from noisyseg.run.checkpoint import find_checkpoint
from noisyseg.run.run_dir import RunDir


def class_ious(labels: np.ndarray, clean: np.ndarray, num_classes: int) -> list[float | None]:
    """Per foreground class (1..num_classes-1): IoU of `labels` against `clean` (None where neither has it)."""
    ious: list[float | None] = []
    for c in range(1, num_classes):
        a, b = labels == c, clean == c
        union = int(np.count_nonzero(a | b))
        ious.append(None if union == 0 else int(np.count_nonzero(a & b)) / union)
    return ious


def label_quality(run_dir: str | Path) -> dict[str, list[float | None]] | None:
    """{"given": per-class IoU of the annotations trained on, "corrected": of the run's final
    label store}, both against the clean masks; None for a run without clean masks or store."""
    run = RunDir(run_dir)
    checkpoint = find_checkpoint(run.path)
    if checkpoint is None:
        return None
    data = load_run_data(run.read_config())
    if data.clean_train_labels is None:
        return None
    store = LabelStore.load(checkpoint, data.train_labels, data.train_ids)
    clean, classes = data.clean_train_labels.flat, data.num_classes
    return {
        "given": class_ious(data.train_labels.flat, clean, classes),
        "corrected": class_ious(store.maps.flat, clean, classes),
    }


def _mean(values: Sequence[float | None]) -> float | None:
    finite = [v for v in values if v is not None]
    return statistics.mean(finite) if finite else None


def quality_row(
    label: str, qualities: Sequence[dict[str, list[float | None]]], triggers: Sequence[dict[str, Any]]
) -> str:
    """One markdown row: per class 'given -> corrected' IoU (percent, mean over runs) and how many
    runs triggered the class, at which epochs."""
    cells = []
    for c in range(len(qualities[0]["given"])):
        given, corrected = _mean([q["given"][c] for q in qualities]), _mean([q["corrected"][c] for q in qualities])
        epochs = sorted(e for t in triggers if (e := t.get(str(c + 1))) is not None)
        text = "-" if given is None or corrected is None else f"{100 * given:.0f} → {100 * corrected:.0f}"
        cells.append(f"{text} ({len(epochs)}/{len(triggers)}{': ' + ', '.join(map(str, epochs)) if epochs else ''})")
    return f"| {label} | {len(qualities)} | " + " | ".join(cells) + " |"
