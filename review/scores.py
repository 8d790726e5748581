"""What the review measures on one image, computed in torch on the device the probabilities are on.

Label quality (Kuan and Mueller, "Estimating label quality and errors in semantic segmentation
data via any model", 2023; cleanlab's `segmentation.rank.get_label_quality_scores`, method
"softmin"): each labelled pixel's self-confidence s_i = p(given label of pixel i), aggregated as
the soft minimum sum_i s_i * softmax((1 - s)/T)_i with temperature T = 0.1. Low = suspicious.

Issue mask: a labelled pixel whose given label differs from the predicted class while the
prediction's probability is at least `confidence`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SOFTMIN_TEMPERATURE = 0.1
DEFAULT_CONFIDENCE = 0.9


def softmin_quality(self_confidence: torch.Tensor, temperature: float = SOFTMIN_TEMPERATURE) -> float:
    """The soft minimum of per-pixel self-confidences (any shape; NaN when empty)."""
    if temperature <= 0:
        raise ValueError(f"softmin temperature: expected a positive number, got {temperature}")
    s = self_confidence.reshape(-1).double()
    if s.numel() == 0:
        return math.nan
    return float((s * torch.softmax((1.0 - s) / temperature, dim=0)).sum())


@dataclass
class ImageReview:
    """One image's measures; the masks are (H, W) on the probabilities' device."""

    label_quality: float  # softmin of the self-confidences; NaN without labelled pixels
    changed_fraction: float  # labelled pixels whose corrected label differs from the given one
    issue_fraction: float  # labelled pixels in the issue mask
    class_iou: list[float]  # per class, IoU of the given mask and the prediction (NaN: absent in both)
    issue: torch.Tensor  # bool
    corrected: torch.Tensor  # uint8: the run's training labels, or the prediction on issue pixels
    transitions: torch.Tensor  # (K, K) int64 counts of given -> corrected over labelled pixels


def review_image(
    probs: torch.Tensor,
    given: torch.Tensor,
    ignore_index: int,
    confidence: float = DEFAULT_CONFIDENCE,
    corrected: torch.Tensor | None = None,
) -> ImageReview:
    """Measures of one image from its class probabilities `probs` (K, H, W) and its given mask
    (H, W) of class ids (`ignore_index` = unlabelled). `corrected` is what the run trains on now
    (ADELE's label store); without it the correction is the prediction on the issue pixels."""
    num_classes = probs.shape[0]
    if probs.ndim != 3 or given.shape != probs.shape[1:]:
        raise ValueError(
            f"review: probabilities {tuple(probs.shape)} and mask {tuple(given.shape)} must be (K, H, W) and (H, W)"
        )
    given = given.to(probs.device, torch.long)
    labelled = given != ignore_index
    if bool((given[labelled] >= num_classes).any()):
        raise ValueError(f"review: mask holds class ids >= {num_classes} that are not the ignore index {ignore_index}")
    top, prediction = probs.max(dim=0)
    safe_given = torch.where(labelled, given, 0)
    self_confidence = probs.gather(0, safe_given[None])[0][labelled]
    issue = labelled & (prediction != given) & (top >= confidence)
    if corrected is None:
        fixed = torch.where(issue, prediction, given)
    else:
        fixed = corrected.to(probs.device, torch.long)
        if fixed.shape != given.shape:
            raise ValueError(
                f"review: corrected mask {tuple(fixed.shape)} and given mask {tuple(given.shape)} differ in size"
            )
    n_labelled = max(int(labelled.sum()), 1)
    changed = labelled & (fixed != given)
    pairs = given[labelled] * num_classes + torch.where(fixed[labelled] < num_classes, fixed[labelled], given[labelled])
    transitions = torch.bincount(pairs, minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    return ImageReview(
        label_quality=softmin_quality(self_confidence),
        changed_fraction=int(changed.sum()) / n_labelled,
        issue_fraction=int(issue.sum()) / n_labelled,
        class_iou=class_iou(given[labelled], prediction[labelled], num_classes),
        issue=issue,
        corrected=fixed.to(torch.uint8),
        transitions=transitions,
    )


def class_iou(given: torch.Tensor, prediction: torch.Tensor, num_classes: int) -> list[float]:
    """Per class, |given & predicted| / |given | predicted| over the pixels given (NaN: neither)."""
    counts = torch.bincount(given * num_classes + prediction, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )
    intersection = counts.diag().double()
    union = counts.sum(0).double() + counts.sum(1).double() - intersection
    return [float(i / u) if u > 0 else math.nan for i, u in zip(intersection.tolist(), union.tolist())]
