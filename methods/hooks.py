"""The methods' parts of a training run, as hooks the trainer calls: the loop decides when,
each hook owns its state and its entry in the checkpoint (mmengine's hooks, MONAI's handlers).

- `LabelHook`: the run's current labels (the label store and the corrections on their way into
  it, `correction.py`) and ADELE's per-class curves, trigger and guard (`adele.py`). Every
  method has one: all of them train on the store and log the fits (for the curves); only the
  methods whose table row says `correction` detect and correct.
- `ArmHook`: ARM's 53 parameters, their ascending optimiser, the warm-up and the epoch's record
  of what its weight function does.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from noisyseg.config import TrainConfig
from noisyseg.data.label_store import LabelMaps, LabelStore
from noisyseg.evaluation.inference import mean_probabilities
from noisyseg.evaluation.metrics import ConfidenceMeter
from noisyseg.method_table import MethodSpec
from noisyseg.methods import adele
from noisyseg.methods.correction import LabelCorrections
from noisyseg.run.checkpoint import flatten_optimizer, prefixed, unflatten_optimizer, unprefixed
from noisyseg.runtime.distributed import DistContext, average_gradients

log = logging.getLogger(__name__)


class LabelHook:
    """The labels a run trains on, and ADELE's decisions about correcting them."""

    def __init__(
        self,
        config: TrainConfig,
        spec: MethodSpec,
        corrections: LabelCorrections,
        annotations: LabelMaps,
        train_ids: list[str],
        class_names: list[str],
        workdir: str | None,
    ) -> None:
        self.config, self.spec = config, spec
        self.corrections = corrections
        self.annotations = annotations  # what the annotators drew, never modified
        self.train_ids, self.class_names = train_ids, class_names
        self.workdir = workdir  # where a streamed store's memory-mapped maps live
        self.timing = config.correction_timing()
        self.triggers = adele.TriggerState(len(class_names))
        self.annotated_area: np.ndarray | None = None  # pixels per class in the annotations (the guard's reference)

    @property
    def store(self) -> LabelStore:
        return self.corrections.store

    def correction_classes(self, epoch: int) -> torch.Tensor | None:
        """(C,) bools of the classes corrected during/at the end of `epoch`, or None if none."""
        if not self.spec.correction:
            return None
        return self.triggers.correction_classes(epoch, self.timing, self.config.adele.correction_every)

    def correct_step(
        self,
        rows: torch.Tensor,
        geometry: torch.Tensor | None,
        target: torch.Tensor,
        logits_per_scale: list[torch.Tensor],
        scales: list[float],
        classes: torch.Tensor | None,
    ) -> torch.Tensor | None:
        """`iteration` timing: correct the step's labels from its own outputs (the corrected
        pixel count on the device), cached rows or streamed crops."""
        if classes is None or self.timing != "iteration":
            return None
        if self.config.adele.correction_prediction == "single":
            probs = torch.softmax(logits_per_scale[scales.index(1.0)].detach().float(), dim=1)
        else:
            probs = mean_probabilities(logits_per_scale)
        if geometry is None:
            return self.corrections.correct_rows(rows, target, probs, classes)
        return self.corrections.correct_crops(geometry, target, probs, classes)

    def end_epoch(
        self, epoch: int, train_iou: np.ndarray, stepped: int, correct_whole_images: Callable[[torch.Tensor], int]
    ) -> int:
        """Fit and trigger, the `epoch`-timing correction (`correct_whole_images(classes)`
        returns the pixels it changed over all ranks) and the guard; returns the pixels
        corrected in the epoch (`stepped` of them by the steps)."""
        fired = self.triggers.update(
            epoch, train_iou, self.config.adele, detect=self.spec.correction, adaptive=self.spec.adaptive
        )
        for c in fired:
            log.info("epoch %d: label correction triggered for class %d (%s)", epoch, c, self.class_names[c])
        classes = self.correction_classes(epoch)
        corrected = stepped + (correct_whole_images(classes) if classes is not None and self.timing == "epoch" else 0)
        if corrected:
            log.info("epoch %d: %d training label pixels corrected", epoch, corrected)
        self.guard(epoch)
        return corrected

    def guard(self, epoch: int) -> None:
        """Stop and undo the correction of a class whose labelled area collapsed (`adele.py`).
        Reads the store after the epoch's corrections are in it (same on every rank)."""
        corrected = self.triggers.corrected_classes()
        if not (self.config.adele.guard and corrected):
            return
        num_classes = len(self.class_names)
        if self.annotated_area is None:
            self.annotated_area = self.annotations.class_counts(num_classes)
        areas = self.store.maps.class_counts(num_classes)
        for c in adele.collapsed_classes(areas, self.annotated_area, corrected, self.config.adele.guard_min_area):
            self.triggers.stop(c, epoch)
            restored = self.corrections.give_back(c, self.annotations)
            log.warning(
                "epoch %d: class %d (%s) kept %d of its %d annotated pixels under correction; "
                "the guard stopped its correction and restored %d pixels",
                epoch,
                c,
                self.class_names[c],
                areas[c],
                self.annotated_area[c],
                restored,
            )

    def record(self, corrected: int) -> dict[str, Any]:
        return {
            "trigger": self.triggers.record(),
            "labels_changed_fraction": self.store.changed_fraction(self.annotations),
            "corrected_pixels": corrected,
        }

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint's `triggers` entry (the store is written beside it: `store.save`)."""
        return self.triggers.to_json()

    def load_state_dict(self, state: dict[str, Any], directory: Path) -> None:
        """The checkpoint's `triggers` entry, and the label store saved in `directory`."""
        self.corrections.replace_store(LabelStore.load(directory, self.annotations, self.train_ids, self.workdir))
        self.triggers = adele.TriggerState.from_json(len(self.class_names), state)


class ArmHook:
    """ARM: for the first `arm.warmup_fraction` of all iterations the network trains on
    uniformly weighted losses while ARM ascends the reweighted detached per-pixel losses; then
    jointly. Its learning rate follows the network's schedule from `arm.lr` (default `optim.lr`)."""

    def __init__(self, config: TrainConfig, arm: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.config, self.arm, self.optimizer = config, arm, optimizer
        self.lr = config.optim.lr if config.arm.lr is None else config.arm.lr

    def warming_up(self, iteration: int, total_iterations: int) -> bool:
        return iteration < math.ceil(self.config.arm.warmup_fraction * total_iterations)

    def average_gradients(self, ctx: DistContext) -> None:
        """DDP averages the network's gradients in the backward pass; ARM's are averaged here."""
        average_gradients(ctx, list(self.arm.parameters()), "the ARM gradient all-reduce")

    def record(self, meter: ConfidenceMeter, device: torch.device) -> dict[str, Any]:
        """ARM's weight function w(v^) at the histogram's bin centres (before the batch
        normalisation) and the epoch's pixel counts per bin, right and wrong labels."""
        centres = ConfidenceMeter.centres()
        with torch.no_grad():
            weights = self.arm(centres.to(device)).float().cpu()
        right, wrong = meter.histogram()
        return {
            "v": [round(float(v), 4) for v in centres],
            "w": [float(w) for w in weights],
            "pixels": right.tolist(),
            "pixels_wrong": wrong.tolist(),
        }

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, torch.Tensor]]:
        """(optimiser tensors, the optimiser's JSON entry, ARM's weights), checkpoint-keyed."""
        opt_tensors, opt_state = flatten_optimizer("arm", self.optimizer)
        return opt_tensors, opt_state, prefixed("arm", self.arm.state_dict())

    def load_state_dict(
        self,
        tensors: dict[str, torch.Tensor],
        opt_state: dict[str, Any],
        load_weights: Callable[[nn.Module, dict[str, torch.Tensor], str], None],
    ) -> None:
        load_weights(self.arm, unprefixed("arm", tensors), "ARM")
        self.optimizer.load_state_dict(unflatten_optimizer("arm", tensors, opt_state))


@dataclass(frozen=True)
class ArmEpoch:
    """One epoch's ARM statistics."""

    wrong_pixel_share: float
    wrong_weight_share: float
    effective_fraction: float

    @property
    def wrong_relative_weight(self) -> float:
        return self.wrong_weight_share / self.wrong_pixel_share if self.wrong_pixel_share > 0 else float("nan")


def arm_epoch(record: dict[str, Any]) -> ArmEpoch:
    """The statistics of one epoch's `arm` record."""
    w = np.asarray(record["w"], dtype=np.float64)
    right = np.asarray(record["pixels"], dtype=np.float64)
    wrong = np.asarray(record["pixels_wrong"], dtype=np.float64)
    counts = right + wrong
    total, weighted = counts.sum(), (w * counts).sum()
    if total == 0 or weighted == 0:
        return ArmEpoch(float("nan"), float("nan"), float("nan"))
    return ArmEpoch(
        wrong_pixel_share=float(wrong.sum() / total),
        wrong_weight_share=float((w * wrong).sum() / weighted),
        effective_fraction=float(weighted**2 / ((w**2 * counts).sum() * total)),
    )
