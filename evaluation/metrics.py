"""Segmentation metrics from confusion counts, and the ADELE noise diagnostics.

Everything is computed from dataset-level confusion matrices (counts summed over a split, rows =
target class, columns = predicted class), never by averaging per-image scores: that is how the
ADELE and ARM papers report IoU (method-spec section 6).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from noisyseg.kernels import normalized_confidence

ArrayLike = np.ndarray | torch.Tensor


def _as_flat_long(values: ArrayLike, name: str) -> torch.Tensor:
    tensor = values if isinstance(values, torch.Tensor) else torch.as_tensor(np.asarray(values))
    if tensor.is_floating_point() or tensor.is_complex():
        raise ValueError(f"{name}: expected integer class ids, got dtype {tensor.dtype}")
    return tensor.reshape(-1).long()


def _check_class_range(values: torch.Tensor, num_classes: int, name: str, ignore_index: int) -> None:
    if values.numel() == 0:
        return
    low, high = int(values.min()), int(values.max())
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"{name}: class ids must lie in [0, {num_classes - 1}] (or be {ignore_index} = ignore), "
            f"found values in [{low}, {high}]"
        )


def confusion_matrix(pred: ArrayLike, target: ArrayLike, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """(C, C) int64 counts, rows = target class, columns = predicted class.

    `pred` and `target` are numpy arrays or torch tensors (any device) of the same shape, any
    number of dimensions. Pixels whose target is `ignore_index` are left out. Unlike
    `ConfusionMeter.update`, out-of-range ids are refused at once, naming `pred` or `target`.
    """
    if tuple(pred.shape) != tuple(target.shape):
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    target_flat = _as_flat_long(target, "target")
    pred_flat = _as_flat_long(pred, "pred").to(target_flat.device)
    keep = target_flat != ignore_index
    _check_class_range(target_flat[keep], num_classes, "target", ignore_index)
    _check_class_range(pred_flat[keep], num_classes, "pred", ignore_index)
    meter = ConfusionMeter(num_classes, ignore_index, target_flat.device)
    meter.update(pred_flat, target_flat)
    return meter.matrix


def _ratio_or_nan(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0, numerator / np.maximum(denominator, 1), np.nan)


def iou_per_class(conf: np.ndarray) -> np.ndarray:
    """IoU per class; NaN for a class absent from both prediction and target. `conf` is one
    (C, C) matrix or a stack (..., C, C) of them (one IoU vector each)."""
    conf = np.asarray(conf, dtype=np.float64)
    intersection = np.diagonal(conf, axis1=-2, axis2=-1)
    union = conf.sum(axis=-2) + conf.sum(axis=-1) - intersection
    return _ratio_or_nan(intersection, union)


def dice_per_class(conf: np.ndarray) -> np.ndarray:
    """Dice (F1) per class, 2|P n T| / (|P| + |T|); NaN where the class is absent from both."""
    conf = np.asarray(conf, dtype=np.float64)
    return _ratio_or_nan(2 * np.diag(conf), conf.sum(axis=0) + conf.sum(axis=1))


def _nanmean(values: np.ndarray) -> float:
    present = values[~np.isnan(values)]
    return float(present.mean()) if present.size else math.nan


def mean_iou(conf: np.ndarray, include_background: bool = True) -> float:
    """Mean IoU over present classes; without background it averages classes 1..C-1."""
    ious = iou_per_class(conf)
    return _nanmean(ious if include_background else ious[1:])


def bootstrap_win_probability(first: np.ndarray, second: np.ndarray, draws: int = 2000, seed: int = 0) -> float:
    """How often `second` has the higher dataset-level mIoU (`mean_iou`) when the images are
    resampled with replacement, paired: the fraction of `draws` resamples (seeded, so the same
    inputs give the same answer). `first` and `second` are (images, C, C) per-image confusion
    matrices of two models on the same images (`inference.per_image_confusion`); a tie counts
    for `first`."""
    if first.shape != second.shape or first.ndim != 3 or not len(first):
        raise ValueError(
            "per-image confusion matrices: expected two equal (images, C, C) shapes, "
            f"got {first.shape} and {second.shape}"
        )
    images, classes = first.shape[0], first.shape[1]
    flat = np.stack([first.reshape(images, -1), second.reshape(images, -1)]).astype(np.float64)
    rng = np.random.default_rng(seed)
    wins = 0
    for start in range(0, draws, 256):  # resample counts in chunks: memory stays draws-independent
        counts = rng.multinomial(images, np.full(images, 1.0 / images), size=min(256, draws - start))
        miou = np.nanmean(iou_per_class((counts @ flat).reshape(2, -1, classes, classes)), axis=-1)  # (model, draw)
        wins += int((miou[1] > miou[0]).sum())
    return wins / draws


def _json_floats(values: np.ndarray) -> list[float | None]:
    return [None if math.isnan(v) else float(v) for v in values]


def _json_float(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


class ConfusionMeter:
    """Accumulates a confusion matrix over batches; `summary()` gives JSON-ready scores.

    The counts live on `device` as a torch tensor and `update` never waits for the host (no
    boolean indexing, no range check per batch), so a GPU training step can feed it without a
    synchronisation. Ids outside [0, C-1] that are not `ignore_index` land in an overflow slot,
    and reading `matrix` raises then: the range check is deferred, not dropped.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, device: torch.device | str | None = None) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        # C*C cells, then one slot for ignored pixels and one for out-of-range ids.
        self.counts = torch.zeros(num_classes * num_classes + 2, dtype=torch.int64, device=device)

    def update(self, pred: ArrayLike, target: ArrayLike) -> None:
        if tuple(pred.shape) != tuple(target.shape):
            raise ValueError(
                f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}"
            )
        target_flat = _as_flat_long(target, "target").to(self.counts.device, non_blocking=True)
        pred_flat = _as_flat_long(pred, "pred").to(self.counts.device, non_blocking=True)
        cells = self.num_classes * self.num_classes
        in_range = (
            (target_flat >= 0) & (target_flat < self.num_classes) & (pred_flat >= 0) & (pred_flat < self.num_classes)
        )
        index = torch.where(in_range, target_flat * self.num_classes + pred_flat, cells + 1)
        index = torch.where(target_flat == self.ignore_index, cells, index)
        self.counts.index_add_(0, index, torch.ones_like(index))

    @property
    def matrix(self) -> np.ndarray:
        """(C, C) int64 counts on the host (a synchronisation point on a GPU)."""
        counts = self.counts.cpu().numpy()
        if counts[-1]:
            raise ValueError(
                f"pred/target: {int(counts[-1])} pixel(s) had class ids outside [0, "
                f"{self.num_classes - 1}] (and not {self.ignore_index} = ignore)"
            )
        return counts[:-2].reshape(self.num_classes, self.num_classes).astype(np.int64)

    @matrix.setter
    def matrix(self, value: np.ndarray) -> None:
        """Replace the counts (for example by their sum over ranks)."""
        self.counts.zero_()
        self.counts[:-2] = torch.as_tensor(np.asarray(value, dtype=np.int64).reshape(-1), device=self.counts.device)

    def reset(self) -> None:
        self.counts.zero_()

    def summary(self) -> dict[str, Any]:
        """Per-class IoU and Dice, mIoU with and without background; NaN (absent) as None."""
        matrix = self.matrix
        return {
            "iou": _json_floats(iou_per_class(matrix)),
            "miou": _json_float(mean_iou(matrix, include_background=True)),
            "miou_no_background": _json_float(mean_iou(matrix, include_background=False)),
            "dice": _json_floats(dice_per_class(matrix)),
        }


@dataclass
class NoiseCounts:
    """Confusion counts on the incorrectly labelled pixels (noisy label != clean label).

    `pred_vs_clean` has rows = clean class, `pred_vs_noisy` rows = noisy class; columns are the
    predicted class in both. Counts add up over batches and epochs with `+`.
    """

    pred_vs_clean: np.ndarray
    pred_vs_noisy: np.ndarray

    @classmethod
    def zeros(cls, num_classes: int) -> NoiseCounts:
        shape = (num_classes, num_classes)
        return cls(np.zeros(shape, dtype=np.int64), np.zeros(shape, dtype=np.int64))

    def __add__(self, other: NoiseCounts) -> NoiseCounts:
        return NoiseCounts(self.pred_vs_clean + other.pred_vs_clean, self.pred_vs_noisy + other.pred_vs_noisy)


def noise_diagnostics(
    pred: ArrayLike, noisy: ArrayLike, clean: ArrayLike, num_classes: int, ignore_index: int = 255
) -> NoiseCounts:
    """Counts for the early-learning / memorisation diagnostics of ADELE (Liu et al., ICLR 2022).

    ADELE section 2.1 and Figure 2 analyse the model output "on the pixels that are incorrectly
    labeled": IoU_el is the IoU between the output and the ground truth there, IoU_m the IoU
    between the output and the incorrect annotations there. This returns the two confusion
    matrices restricted to those pixels (noisy != clean, neither label `ignore_index`);
    `early_learning_memorization_iou` turns accumulated counts into the per-class curves.
    """
    meter = NoiseMeter(num_classes, ignore_index, device=noisy.device if isinstance(noisy, torch.Tensor) else None)
    meter.update(pred, noisy, clean)
    return meter.counts()


class NoiseMeter:
    """`noise_diagnostics` accumulated over batches on a device, without host synchronisation."""

    def __init__(self, num_classes: int, ignore_index: int = 255, device: torch.device | str | None = None) -> None:
        self.ignore_index = ignore_index
        self.vs_clean = ConfusionMeter(num_classes, ignore_index, device)
        self.vs_noisy = ConfusionMeter(num_classes, ignore_index, device)

    def update(self, pred: ArrayLike, noisy: ArrayLike, clean: ArrayLike) -> None:
        shapes = {"pred": tuple(pred.shape), "noisy": tuple(noisy.shape), "clean": tuple(clean.shape)}
        if len(set(shapes.values())) != 1:
            raise ValueError(f"pred, noisy and clean must have the same shape, got {shapes}")
        device = self.vs_clean.counts.device
        noisy_flat = _as_flat_long(noisy, "noisy").to(device, non_blocking=True)
        clean_flat = _as_flat_long(clean, "clean").to(device, non_blocking=True)
        pred_flat = _as_flat_long(pred, "pred").to(device, non_blocking=True)
        wrong = (noisy_flat != clean_flat) & (noisy_flat != self.ignore_index) & (clean_flat != self.ignore_index)
        ignored = torch.full_like(noisy_flat, self.ignore_index)
        self.vs_clean.update(pred_flat, torch.where(wrong, clean_flat, ignored))
        self.vs_noisy.update(pred_flat, torch.where(wrong, noisy_flat, ignored))

    def counts(self) -> NoiseCounts:
        return NoiseCounts(self.vs_clean.matrix, self.vs_noisy.matrix)


def early_learning_memorization_iou(counts: NoiseCounts) -> tuple[np.ndarray, np.ndarray]:
    """Per-class (IoU_el, IoU_m) on the incorrectly labelled pixels; NaN where a class is absent."""
    return iou_per_class(counts.pred_vs_clean), iou_per_class(counts.pred_vs_noisy)


class ConfidenceMeter:
    """Histogram of ARM's input, the normalised confidence v^ in [-1, 1] (method-spec section 5),
    over a training pass's valid pixels: row 0 pixels whose label is right (or not known to be
    wrong), row 1 pixels whose label differs from the clean mask. With ARM's w(v^) at the bin
    centres it gives the weight distribution and the share of the weight wrong labels get."""

    BINS = 40

    def __init__(self, ignore_index: int = 255, device: torch.device | str | None = None) -> None:
        self.ignore_index = ignore_index
        self.counts = torch.zeros(2 * self.BINS, dtype=torch.int64, device=device)

    @classmethod
    def centres(cls) -> torch.Tensor:
        return torch.linspace(-1.0, 1.0, 2 * cls.BINS + 1)[1::2]

    def update(self, probs: torch.Tensor, target: torch.Tensor, clean: torch.Tensor | None = None) -> None:
        """probs (N, C, H, W), target (N, H, W) the labels trained on, clean (N, H, W) or None."""
        bins = ((normalized_confidence(probs.float()) + 1.0) * (self.BINS / 2)).long().clamp_(0, self.BINS - 1)
        valid = target != self.ignore_index
        if clean is not None:
            wrong = (target != clean) & (clean != self.ignore_index)
            bins = bins + self.BINS * wrong.long()
        self.counts += torch.bincount(bins[valid], minlength=2 * self.BINS)

    def histogram(self) -> np.ndarray:
        """(2, BINS) pixel counts: right (or unknown), wrong."""
        return self.counts.cpu().numpy().reshape(2, self.BINS)
