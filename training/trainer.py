"""The trainer: ADELE, ARM and the comparison losses on in-memory CPU data, resumable.

`train(config)` trains `config.method` on `config.data` (training masks from `config.labels`
when given) and writes into `config.out`:

    config.json          the configuration (a rerun or resume must match it)
    metrics.jsonl        one JSON object per epoch: epoch, iteration, method, lr, loss terms,
                         train_iou (foreground, vs the labels trained on), val/test per-class IoU
                         and mIoU with/without background, trigger state and fits,
                         labels_changed_fraction, corrected_pixels, and iou_el/iou_m when clean
                         training labels are known; NaN written as null
    summary.json         test mIoU at the best validation epoch / last / max, trigger epochs
    model.safetensors    the model at the best validation epoch (`checkpoint.save_model`)
    checkpoint/          full training state, every epoch (`run_checkpoint.py`)
    curves.png           from `noisyseg.training.plots.plot_run_curves` when that module exists

Design decisions (method-spec sections 2 to 5; the config docstrings give the defaults):
- Data: each split lives in memory (`load_split`, per-slice z-score). Batches are drawn from a
  permutation of a seeded `torch.Generator`, whose state is checkpointed, so an interrupted and
  resumed run gives the same weights as an uninterrupted one (deterministic CPU algorithms).
- Multiscale: the input is resized by each scale (bilinear, align_corners=True) and each
  output's logits back to label size. `baseline-ms` (the ADELE paper's baseline, "multiscale
  input augmentation") averages the CE of all scales at every step: ADELE's loss without the
  consistency term, so both see the same views and compute.
- Training IoU (what the trigger fits) and IoU_el/IoU_m come for free from the training passes:
  the scale-1.0 prediction against the labels trained on in that step, counts summed per epoch.
- ARM: for the first `arm.warmup_fraction` of all iterations the network trains on uniformly
  weighted losses while ARM ascends the reweighted detached per-pixel losses; then jointly.
- The trigger and the fits are computed only for methods that correct labels (fits are logged
  for every method, for the curves); model selection is by validation mIoU with background.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from noisyseg.kernels import ARM, arm_cross_entropy, arm_reweighted_loss, multiscale_consistency
from noisyseg.training import adele
from noisyseg.training.checkpoint import ModelInfo, save_model
from noisyseg.training.config import TrainConfig, config_from_dict, semantic_fields
from noisyseg.training.data import DatasetInfo, SplitArrays, load_split, read_dataset_info
from noisyseg.training.io import atomic_write_json, atomic_write_text
from noisyseg.training.label_store import LabelStore
from noisyseg.training.metrics import (
    ConfusionMeter,
    NoiseCounts,
    early_learning_memorization_iou,
    iou_per_class,
    mean_iou,
    noise_diagnostics,
)
from noisyseg.training.models import create_model
from noisyseg.training.run_checkpoint import (
    find_checkpoint,
    flatten_optimizer,
    prefixed,
    read_checkpoint,
    unflatten_optimizer,
    unprefixed,
    write_checkpoint,
)

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
MODEL_FILE = "model.safetensors"


@dataclass(frozen=True)
class MethodSpec:
    """What a `--method` switches on."""

    multiscale: bool = False
    consistency: bool = False
    correction: bool = False
    adaptive: bool = True
    arm: bool = False
    pixel_loss: str = "ce"


METHOD_SPECS = {
    "baseline": MethodSpec(),
    "baseline-ms": MethodSpec(multiscale=True),
    "adele": MethodSpec(multiscale=True, consistency=True, correction=True),
    "adele-nonadaptive": MethodSpec(multiscale=True, consistency=True, correction=True, adaptive=False),
    "arm": MethodSpec(arm=True),
    "adele+arm": MethodSpec(multiscale=True, consistency=True, correction=True, arm=True),
    "gce": MethodSpec(pixel_loss="gce"),
    "ohem": MethodSpec(pixel_loss="ohem"),
    "gce+arm": MethodSpec(pixel_loss="gce", arm=True),
}


# ----------------------------------------------------------------------------- data


@dataclass
class RunData:
    """Everything a run reads, in memory."""

    info: DatasetInfo
    train_images: torch.Tensor  # (N, C, H, W) float32
    train_labels: np.ndarray  # (N, H, W) uint8, the (noisy) annotations trained on, never modified
    train_ids: list[str]
    clean_train_labels: np.ndarray | None  # the data folder's masks when --labels replaces them
    val: SplitArrays
    test: SplitArrays

    @property
    def num_classes(self) -> int:
        return self.info.num_classes


def load_run_data(config: TrainConfig) -> RunData:
    """Load the train split (labels from `config.labels` if set) and the clean val/test splits."""
    info = read_dataset_info(config.data)
    train = load_split(config.data, "train", labels_root=config.labels)
    clean = load_split(config.data, "train").masks if config.labels else None
    return RunData(
        info=info,
        train_images=torch.from_numpy(train.images),
        train_labels=train.masks,
        train_ids=train.ids,
        clean_train_labels=clean,
        val=load_split(config.data, "val"),
        test=load_split(config.data, "test"),
    )


# ----------------------------------------------------------------------------- network passes


def resize(tensor: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(tensor.shape[-2:]) == size:
        return tensor
    return F.interpolate(tensor, size=size, mode="bilinear", align_corners=True)


def forward_scales(model: nn.Module, images: torch.Tensor, scales: list[float]) -> list[torch.Tensor]:
    """Logits at label resolution for each input scale (bilinear, align_corners=True both ways)."""
    height, width = images.shape[-2:]
    outputs = []
    for scale in scales:
        scaled_size = (max(1, round(height * scale)), max(1, round(width * scale)))
        outputs.append(resize(model(resize(images, scaled_size)), (height, width)))
    return outputs


def mean_probabilities(logits_per_scale: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([torch.softmax(z.detach().float(), dim=1) for z in logits_per_scale]).mean(dim=0)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode (BatchNorm running statistics) for the block, then the previous mode again."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def predict_batches(model: nn.Module, images: torch.Tensor, batch_size: int, scales: list[float] | None = None) -> torch.Tensor:
    """Class probabilities (N, C, H, W) in eval mode, averaged over `scales` (default: 1.0 only)."""
    with eval_mode(model):
        chunks = [mean_probabilities(forward_scales(model, images[i : i + batch_size], scales or [1.0])) for i in range(0, len(images), batch_size)]
    return torch.cat(chunks)


@torch.no_grad()
def evaluate_split(model: nn.Module, split: SplitArrays, num_classes: int, ignore_index: int, batch_size: int) -> dict[str, Any]:
    """Single-scale evaluation: {"per_class_iou", "miou", "miou_fg"} (NaN as None), dataset-level."""
    meter = ConfusionMeter(num_classes, ignore_index)
    images = torch.from_numpy(split.images)
    with eval_mode(model):
        for start in range(0, len(images), batch_size):
            prediction = model(images[start : start + batch_size]).argmax(dim=1)
            meter.update(prediction, torch.from_numpy(split.masks[start : start + batch_size]))
    return {
        "per_class_iou": json_floats(iou_per_class(meter.matrix)),
        "miou": json_float(mean_iou(meter.matrix, include_background=True)),
        "miou_fg": json_float(mean_iou(meter.matrix, include_background=False)),
    }


def json_float(value: float) -> float | None:
    """NaN/inf as None (JSON null)."""
    return None if not math.isfinite(value) else float(value)


def json_floats(values: Any) -> list[float | None]:
    return [json_float(float(v)) for v in values]


def foreground_dict(values: Any) -> dict[str, float | None]:
    """{"1": v1, ...}: the foreground entries of a per-class sequence, JSON keys."""
    return {str(c): json_float(float(values[c])) for c in range(1, len(values))}


# ----------------------------------------------------------------------------- trigger state


@dataclass
class TriggerState:
    """Per foreground class: training-IoU history, last fit, trigger epoch (sticky)."""

    num_classes: int
    iou_history: dict[int, list[float | None]] = field(default_factory=dict)
    fits: dict[int, dict[str, float] | None] = field(default_factory=dict)
    trigger_epoch: dict[int, int | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for c in range(1, self.num_classes):
            self.iou_history.setdefault(c, [])
            self.fits.setdefault(c, None)
            self.trigger_epoch.setdefault(c, None)

    def update(self, epoch: int, train_iou: np.ndarray, r: float, min_points: int, min_rise: float, detect: bool, adaptive: bool) -> list[int]:
        """Add this epoch's IoUs, refit, trigger; returns the classes that triggered now."""
        for c in range(1, self.num_classes):
            self.iou_history[c].append(json_float(float(train_iou[c])))
            fit = adele.fit_iou_curve(self.iou_history[c], min_points)
            self.fits[c] = fit.as_dict() if fit else None
        if not detect:
            return []
        pending = [c for c in range(1, self.num_classes) if self.trigger_epoch[c] is None]
        if adaptive:
            fired = [c for c in pending if self._class_fires(c, epoch, r, min_rise)]
        else:
            fired = pending if pending and adele.correction_started(self.mean_history(), r, min_points, min_rise) else []
        for c in fired:
            self.trigger_epoch[c] = epoch
        return fired

    def _class_fires(self, c: int, epoch: int, r: float, min_rise: float) -> bool:
        fit = self.fits[c]
        return fit is not None and adele.fit_triggers(adele.CurveFit(**fit), epoch, r, min_rise)

    def mean_history(self) -> list[float | None]:
        """Mean foreground training IoU per epoch (the non-adaptive ablation's single curve)."""
        columns = zip(*(self.iou_history[c] for c in range(1, self.num_classes)), strict=True)
        means = []
        for values in columns:
            present = [v for v in values if v is not None]
            means.append(sum(present) / len(present) if present else None)
        return means

    def triggered_mask(self, before_or_at: int) -> torch.Tensor:
        """(C,) bools: classes triggered at or before epoch `before_or_at` (index 0 False)."""
        mask = torch.zeros(self.num_classes, dtype=torch.bool)
        for c, epoch in self.trigger_epoch.items():
            mask[c] = epoch is not None and epoch <= before_or_at
        return mask

    def record(self) -> dict[str, Any]:
        return {
            str(c): {"triggered": self.trigger_epoch[c] is not None, "epoch": self.trigger_epoch[c], "fit": self.fits[c]}
            for c in range(1, self.num_classes)
        }

    def to_json(self) -> dict[str, Any]:
        return {"iou_history": {str(c): h for c, h in self.iou_history.items()}, "fits": {str(c): f for c, f in self.fits.items()}, "trigger_epoch": {str(c): e for c, e in self.trigger_epoch.items()}}

    @classmethod
    def from_json(cls, num_classes: int, raw: dict[str, Any]) -> TriggerState:
        return cls(
            num_classes,
            iou_history={int(c): list(h) for c, h in raw["iou_history"].items()},
            fits={int(c): f for c, f in raw["fits"].items()},
            trigger_epoch={int(c): e for c, e in raw["trigger_epoch"].items()},
        )


# ----------------------------------------------------------------------------- the trainer


@dataclass
class EpochCounters:
    """What one epoch's training passes accumulate."""

    train_meter: ConfusionMeter
    noise: NoiseCounts | None
    loss_sums: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    corrected_pixels: int = 0

    def add_losses(self, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.loss_sums[key] = self.loss_sums.get(key, 0.0) + value
        self.steps += 1

    def mean_losses(self) -> dict[str, float]:
        return {key: total / max(self.steps, 1) for key, total in self.loss_sums.items()}


class Trainer:
    """Holds the model, optimisers, ARM, label store and histories of one run."""

    def __init__(self, config: TrainConfig, data: RunData) -> None:
        self.config = config
        self.data = data
        self.spec = METHOD_SPECS[config.method]
        self.run_dir = Path(config.out)
        self.ignore_index = data.info.ignore_index
        self.scales = list(config.adele.scales) if self.spec.multiscale else [1.0]
        torch.manual_seed(config.seed)
        np.random.seed(config.seed)
        random.seed(config.seed)
        self.model_kwargs = {**config.model.kwargs, "in_channels": int(data.train_images.shape[1]), "num_classes": data.num_classes}
        # channels_last: about 20% faster convolutions on CPU (measured on the UNet, 1 thread).
        self.model = create_model(config.model.architecture, **self.model_kwargs).to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=config.optim.lr, momentum=config.optim.momentum, weight_decay=config.optim.weight_decay)
        self.arm: nn.Module | None = None
        self.arm_optimizer: torch.optim.Optimizer | None = None
        if self.spec.arm:
            self.arm = ARM()
            momentum = config.optim.momentum if config.arm.momentum is None else config.arm.momentum
            self.arm_optimizer = torch.optim.SGD(self.arm.parameters(), lr=config.optim.lr, momentum=momentum, maximize=True)
        self.shuffle = torch.Generator().manual_seed(config.seed)
        self.store = LabelStore.from_original(data.train_labels, data.train_ids)
        self.triggers = TriggerState(data.num_classes)
        self.epoch = 0
        self.iteration = 0
        self.history: list[dict[str, Any]] = []
        self.best_val: float | None = None
        self.best_epoch: int | None = None

    # ---- schedule

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(len(self.data.train_ids) / self.config.batch_size)

    @property
    def total_iterations(self) -> int:
        return self.batches_per_epoch * self.config.epochs

    def arm_warming_up(self) -> bool:
        return self.iteration < math.ceil(self.config.arm.warmup_fraction * self.total_iterations)

    def set_learning_rate(self) -> float:
        lr = self.config.optim.lr
        if self.config.optim.schedule == "poly":
            lr *= (1.0 - self.iteration / self.total_iterations) ** self.config.optim.poly_power
        for optimizer in (o for o in (self.optimizer, self.arm_optimizer) if o is not None):
            for group in optimizer.param_groups:
                group["lr"] = lr
        return lr

    # ---- losses

    def loss_terms(self, logits_per_scale: list[torch.Tensor], target: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """(what to backpropagate, logged terms). The network minimises the method's loss;
        with ARM, ARM ascends the same loss, or during warm-up its own detached objective."""
        arm = None if self.arm is None or self.arm_warming_up() else self.arm
        divisor = self.config.adele.logit_divisor
        logits = [z / divisor for z in logits_per_scale] if divisor != 1.0 else logits_per_scale
        supervised = torch.stack([self.pixel_loss_mean(z, target, arm) for z in logits]).mean()
        terms = {self.spec.pixel_loss: supervised.item()}
        network_loss = supervised
        if self.spec.consistency:
            consistency = multiscale_consistency(logits, target, self.config.adele.rho, self.config.adele.rho_mask, self.ignore_index, backend=self.config.loss.backend)
            # (sum_k CE_k + lambda L_ms) / S, method-spec section 4.
            network_loss = supervised + self.config.adele.lam * consistency / len(logits)
            terms["consistency"] = consistency.item()
        terms["total"] = network_loss.item()
        if self.arm is not None and arm is None:
            objective = self.arm_warmup_objective(logits, target)
            terms["arm_objective"] = objective.item()
            return network_loss + objective, terms
        return network_loss, terms

    def pixel_loss_mean(self, logits: torch.Tensor, target: torch.Tensor, arm: nn.Module | None) -> torch.Tensor:
        if self.spec.pixel_loss == "ce":
            return arm_cross_entropy(logits, target, arm, self.ignore_index, backend=self.config.loss.backend)
        from noisyseg.training.losses import segmentation_loss

        loss = self.config.loss
        return segmentation_loss(self.spec.pixel_loss, logits, target, arm, self.ignore_index, gce_q=loss.gce_q, ohem_threshold=loss.ohem_threshold, ohem_min_kept=loss.ohem_min_kept)

    def arm_warmup_objective(self, logits_per_scale: list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        """ARM's objective on detached per-pixel losses: only ARM's parameters get a gradient."""
        from noisyseg.training.losses import pixel_loss

        loss = self.config.loss
        objectives = []
        for logits in logits_per_scale:
            detached = logits.detach()
            losses, counted = pixel_loss(self.spec.pixel_loss, detached, target, self.ignore_index, gce_q=loss.gce_q, ohem_threshold=loss.ohem_threshold, ohem_min_kept=loss.ohem_min_kept)
            objectives.append(arm_reweighted_loss(losses.detach(), torch.softmax(detached.float(), dim=1), counted, self.arm))
        return torch.stack(objectives).mean()

    # ---- one epoch

    def correction_classes(self, epoch: int) -> torch.Tensor | None:
        """(C,) bools of the classes corrected during/at the end of `epoch`, or None if none.

        A class is corrected from its start epoch on: the trigger epoch itself for `epoch`
        timing (the end-of-epoch pass follows the trigger), the next epoch for `iteration`
        timing. With `correction_every` k > 1, only at start epochs and multiples of k.
        """
        if not self.spec.correction:
            return None
        delay = 1 if self.config.adele.correction_timing == "iteration" else 0
        starts = {e + delay for e in self.triggers.trigger_epoch.values() if e is not None}
        active = self.triggers.triggered_mask(epoch - delay)
        every = self.config.adele.correction_every
        due = every == 1 or epoch % every == 0 or epoch in starts
        return active if due and bool(active.any()) else None

    def correct_rows(self, rows: torch.Tensor, labels: torch.Tensor, probs: torch.Tensor, classes: torch.Tensor) -> int:
        """Correct the label-store rows `rows` from `probs`; returns the number of changed pixels."""
        corrected = adele.correct_labels(labels, probs, classes, self.config.adele.tau, self.config.adele.refuse_absent_classes, self.ignore_index)
        changed = int((corrected != labels).sum())
        if changed:
            self.store.update(rows.numpy(), corrected.to(torch.uint8).numpy())
        return changed

    def train_step(self, rows: torch.Tensor, counters: EpochCounters, correct: torch.Tensor | None) -> None:
        images = self.data.train_images[rows].contiguous(memory_format=torch.channels_last)
        target = torch.from_numpy(self.store.labels[rows.numpy()]).long()
        self.set_learning_rate()
        logits = forward_scales(self.model, images, self.scales)
        loss, terms = self.loss_terms(logits, target)
        if not math.isfinite(loss.item()):
            raise RuntimeError(
                f"non-finite loss ({loss.item()}) at epoch {self.epoch + 1}, iteration {self.iteration + 1}: "
                f"training stopped, the last complete checkpoint in {self.run_dir} is kept (try a lower optim.lr)"
            )
        self.optimise(loss)
        counters.add_losses(terms)
        self.count_training_pass(rows, logits[self.scales.index(1.0)].detach().argmax(dim=1), target, counters)
        if correct is not None and self.config.adele.correction_timing == "iteration":
            counters.corrected_pixels += self.correct_rows(rows, target, self.correction_probs(logits), correct)

    def optimise(self, loss: torch.Tensor) -> None:
        """One step: the network descends, ARM (when present) ascends (`maximize=True`)."""
        optimizers = [o for o in (self.optimizer, self.arm_optimizer) if o is not None]
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
        self.iteration += 1

    def correction_probs(self, logits_per_scale: list[torch.Tensor]) -> torch.Tensor:
        if self.config.adele.correction_prediction == "single":
            return torch.softmax(logits_per_scale[self.scales.index(1.0)].detach().float(), dim=1)
        return mean_probabilities(logits_per_scale)

    def count_training_pass(self, rows: torch.Tensor, prediction: torch.Tensor, target: torch.Tensor, counters: EpochCounters) -> None:
        counters.train_meter.update(prediction, target)
        if counters.noise is not None and self.data.clean_train_labels is not None:
            index = rows.numpy()
            counters.noise += noise_diagnostics(prediction, self.data.train_labels[index], self.data.clean_train_labels[index], self.data.num_classes, self.ignore_index)

    def run_epoch(self) -> EpochCounters:
        """Train one epoch (self.epoch is the number of completed epochs before it)."""
        epoch = self.epoch + 1
        counters = EpochCounters(
            train_meter=ConfusionMeter(self.data.num_classes, self.ignore_index),
            noise=NoiseCounts.zeros(self.data.num_classes) if self.data.clean_train_labels is not None else None,
        )
        correct = self.correction_classes(epoch)
        order = torch.randperm(len(self.data.train_ids), generator=self.shuffle)
        self.model.train()
        batches = order.split(self.config.batch_size)
        with tqdm(batches, desc=f"{self.config.method} epoch {epoch}/{self.config.epochs}", unit="batch", disable=self.config.quiet, leave=False) as progress:
            for rows in progress:
                self.train_step(rows, counters, correct)
                progress.set_postfix(loss=f"{counters.loss_sums['total'] / counters.steps:.4f}")
        return counters

    def correct_after_epoch(self, epoch: int) -> int:
        """`epoch` timing: recompute predictions on the whole train split, then correct."""
        classes = self.correction_classes(epoch)
        if classes is None or self.config.adele.correction_timing != "epoch":
            return 0
        scales = self.scales if self.config.adele.correction_prediction == "multiscale" else [1.0]
        probs = predict_batches(self.model, self.data.train_images, self.config.eval_batch_size, scales)
        rows = torch.arange(len(self.data.train_ids))
        return self.correct_rows(rows, torch.from_numpy(self.store.labels.copy()).long(), probs, classes)

    def finish_epoch(self, counters: EpochCounters) -> dict[str, Any]:
        """Trigger, end-of-epoch correction, evaluation; returns the epoch's metrics record."""
        self.epoch += 1
        epoch = self.epoch
        train_iou = iou_per_class(counters.train_meter.matrix)
        fired = self.triggers.update(epoch, train_iou, self.config.adele.r, self.config.adele.min_fit_points, self.config.adele.min_rise, detect=self.spec.correction, adaptive=self.spec.adaptive)
        for c in fired:
            log.info("epoch %d: label correction triggered for class %d (%s)", epoch, c, self.data.info.classes[c])
        corrected = counters.corrected_pixels + self.correct_after_epoch(epoch)
        if corrected:
            log.info("epoch %d: %d training label pixels corrected", epoch, corrected)
        record: dict[str, Any] = {
            "epoch": epoch,
            "iteration": self.iteration,
            "method": self.config.method,
            "lr": self.optimizer.param_groups[0]["lr"],
            "loss": counters.mean_losses(),
            "train_iou": foreground_dict(train_iou),
            "val": evaluate_split(self.model, self.data.val, self.data.num_classes, self.ignore_index, self.config.eval_batch_size),
            "test": evaluate_split(self.model, self.data.test, self.data.num_classes, self.ignore_index, self.config.eval_batch_size),
            "trigger": self.triggers.record(),
            "labels_changed_fraction": self.store.changed_fraction(self.data.train_labels),
            "corrected_pixels": corrected,
        }
        if counters.noise is not None:
            iou_el, iou_m = early_learning_memorization_iou(counters.noise)
            record["iou_el"], record["iou_m"] = foreground_dict(iou_el), foreground_dict(iou_m)
        return record

    # ---- bookkeeping

    def model_info(self) -> ModelInfo:
        return ModelInfo(
            architecture=self.config.model.architecture,
            model_kwargs=self.model_kwargs,
            class_names=list(self.data.info.classes),
            normalization="zscore",
            method=self.config.method,
            extra={"epoch": self.epoch, "val_miou": self.best_val, "config_hash": self.config.semantic_hash()},
        )

    def track_best(self, record: dict[str, Any]) -> None:
        """Keep `model.safetensors` at the epoch with the best validation mIoU."""
        val_miou = record["val"]["miou"]
        if val_miou is not None and (self.best_val is None or val_miou > self.best_val):
            self.best_val, self.best_epoch = val_miou, record["epoch"]
            save_model(self.run_dir / MODEL_FILE, self.model, self.model_info())

    def save_checkpoint(self) -> None:
        tensors = {**prefixed("model", self.model.state_dict()), "rng.torch": torch.get_rng_state(), "rng.shuffle": self.shuffle.get_state()}
        optimizers: dict[str, Any] = {}
        for name, optimizer in (("net", self.optimizer), ("arm", self.arm_optimizer)):
            if optimizer is not None:
                opt_tensors, optimizers[name] = flatten_optimizer(name, optimizer)
                tensors.update(opt_tensors)
        if self.arm is not None:
            tensors.update(prefixed("arm", self.arm.state_dict()))
        numpy_state: tuple[Any, ...] = np.random.get_state(legacy=True)  # type: ignore[assignment]
        state = {
            "epoch": self.epoch,
            "iteration": self.iteration,
            "config": self.config.to_dict(),
            "config_hash": self.config.semantic_hash(),
            "optimizers": optimizers,
            "rng": {
                "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
                "python": json_ready(random.getstate()),
            },
            "triggers": self.triggers.to_json(),
            "history": self.history,
            "best": {"val_miou": self.best_val, "epoch": self.best_epoch},
        }
        write_checkpoint(self.run_dir, tensors, state, self.store.save)

    def load_checkpoint(self, directory: Path) -> None:
        tensors, state = read_checkpoint(directory)
        try:
            self.model.load_state_dict(unprefixed("model", tensors))
            self.optimizer.load_state_dict(unflatten_optimizer("net", tensors, state["optimizers"]["net"]))
            if self.arm is not None and self.arm_optimizer is not None:
                self.arm.load_state_dict(unprefixed("arm", tensors))
                self.arm_optimizer.load_state_dict(unflatten_optimizer("arm", tensors, state["optimizers"]["arm"]))
            torch.set_rng_state(tensors["rng.torch"])
            self.shuffle.set_state(tensors["rng.shuffle"])
        except (KeyError, RuntimeError) as err:
            raise ValueError(f"{directory}: checkpoint does not match this run's model/method ({err})") from err
        numpy_state = state["rng"]["numpy"]
        np.random.set_state((numpy_state[0], np.array(numpy_state[1], dtype=np.uint32), *numpy_state[2:]))
        python_state = state["rng"]["python"]
        random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
        self.store = LabelStore.load(directory, self.data.train_labels, self.data.train_ids)
        self.triggers = TriggerState.from_json(self.data.num_classes, state["triggers"])
        self.epoch, self.iteration = int(state["epoch"]), int(state["iteration"])
        self.history = list(state["history"])
        self.best_val, self.best_epoch = state["best"]["val_miou"], state["best"]["epoch"]

    def write_metrics(self) -> None:
        """Rewrite metrics.jsonl from the history (so it always matches the checkpoint)."""
        atomic_write_text(self.run_dir / METRICS_FILE, "".join(json_line(r) + "\n" for r in self.history))

    def summary(self) -> dict[str, Any]:
        """Test mIoU at the best validation epoch, the last epoch and the maximum; trigger epochs."""
        return build_summary(self.history, self.triggers.trigger_epoch, self.best_epoch)

    # ---- the run

    def fit(self) -> dict[str, Any]:
        """Train from the current epoch to `config.epochs`; writes outputs; returns the summary."""
        log.info("training %s for %d epochs (%d batches each) into %s", self.config.method, self.config.epochs, self.batches_per_epoch, self.run_dir)
        while self.epoch < self.config.epochs:
            record = self.finish_epoch(self.run_epoch())
            self.history.append(record)
            self.track_best(record)
            self.save_checkpoint()
            self.write_metrics()
            log.info("epoch %d: loss %.4f, val mIoU %s, test mIoU %s, labels changed %.4f", record["epoch"], record["loss"]["total"], percent(record["val"]["miou"]), percent(record["test"]["miou"]), record["labels_changed_fraction"])
        summary = self.summary()
        atomic_write_json(self.run_dir / SUMMARY_FILE, summary)
        plot_curves(self.run_dir)
        return summary


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def json_ready(value: Any) -> Any:
    """Tuples to lists, recursively (RNG states)."""
    if isinstance(value, (tuple, list)):
        return [json_ready(v) for v in value]
    return value


def json_line(record: dict[str, Any]) -> str:
    """One JSON line, keys sorted (as in the checkpoint it is rebuilt from); never NaN."""
    return json.dumps(record, allow_nan=False, sort_keys=True)


def build_summary(history: list[dict[str, Any]], trigger_epoch: dict[int, int | None], best_epoch: int | None) -> dict[str, Any]:
    """The `summary.json` shape: {"test_miou": {best_val,last,max}, "test_miou_fg": {...}, "trigger_epoch": {...}}."""
    by_epoch = {r["epoch"]: r for r in history}

    def three(key: str) -> dict[str, float | None]:
        values = [r["test"][key] for r in history if r["test"][key] is not None]
        best = by_epoch[best_epoch]["test"][key] if best_epoch in by_epoch else None
        return {"best_val": best, "last": history[-1]["test"][key] if history else None, "max": max(values) if values else None}

    return {
        "test_miou": three("miou"),
        "test_miou_fg": three("miou_fg"),
        "trigger_epoch": {str(c): e for c, e in sorted(trigger_epoch.items())},
        "best_val_epoch": best_epoch,
        "epochs": len(history),
        "method": history[-1]["method"] if history else None,
    }


def plot_curves(run_dir: Path) -> None:
    """curves.png through `noisyseg.training.plots` when that module exists."""
    try:
        from noisyseg.training.plots import plot_run_curves
    except ModuleNotFoundError as err:
        if err.name != "noisyseg.training.plots":
            raise
        log.info("noisyseg.training.plots not available; curves.png not written")
        return
    plot_run_curves(run_dir)


# ----------------------------------------------------------------------------- entry points


def read_run_config(run_dir: str | Path) -> TrainConfig:
    """The configuration stored in `RUN_DIR/config.json`."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a noisyseg run directory (no {CONFIG_FILE})")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"{path}: unreadable run configuration ({err})") from err
    return config_from_dict(raw["config"])


def config_differences(stored: TrainConfig, given: TrainConfig) -> list[str]:
    """Dotted names of the fields (other than RESUMABLE_FIELDS) whose values differ."""
    def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        flat: dict[str, Any] = {}
        for key, value in values.items():
            if isinstance(value, dict) and key != "kwargs":
                flat.update(flatten(value, f"{prefix}{key}."))
            else:
                flat[prefix + key] = value
        return flat

    old, new = flatten(semantic_fields(stored)), flatten(semantic_fields(given))
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


def prepare_run_dir(config: TrainConfig, resume: bool) -> None:
    """Refuse a run directory that holds another configuration (or any run, unless resuming)."""
    run_dir = Path(config.out)
    config_path = run_dir / CONFIG_FILE
    if config_path.is_file():
        differences = config_differences(read_run_config(run_dir), config)
        if differences:
            raise ValueError(f"{run_dir}: run directory holds a run with another configuration (differs in {', '.join(differences)}); use another --out")
        if not resume:
            raise FileExistsError(f"{run_dir}: run directory already holds this run; continue it with --resume {run_dir} or choose another --out")
        return
    if resume:
        raise FileNotFoundError(f"{config_path}: nothing to resume (no run configuration in {run_dir})")
    if run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(f"{run_dir}: run directory exists and is not empty; choose another --out")
    atomic_write_json(config_path, {"config": config.to_dict(), "config_hash": config.semantic_hash()})


def train(config: TrainConfig, resume: bool = False) -> dict[str, Any]:
    """Train `config.method`; write everything into `config.out`; return the summary.

    With `resume=True` the run in `config.out` continues from its last checkpoint (its stored
    configuration must equal `config` except for `epochs`, `quiet`, `threads` and `out`). A
    resumed run with more epochs follows the new total for the ARM warm-up and the poly lr.
    """
    config.validate()
    prepare_run_dir(config, resume)
    previous_threads, previous_deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        # Process-wide torch settings, restored afterwards so callers are not surprised.
        if config.threads:
            torch.set_num_threads(config.threads)
        torch.use_deterministic_algorithms(config.deterministic)
        trainer = Trainer(config, load_run_data(config))
        checkpoint = find_checkpoint(config.out) if resume else None
        if checkpoint is not None:
            trainer.load_checkpoint(checkpoint)
            log.info("resuming %s after epoch %d", config.out, trainer.epoch)
        return trainer.fit()
    finally:
        torch.set_num_threads(previous_threads)
        torch.use_deterministic_algorithms(previous_deterministic)
