"""Per-pixel segmentation losses users compare ARM and ADELE against: GCE, OHEM and the T-Loss.

Both follow the `noisyseg.kernels` conventions: logits `(N, C, H, W)` at label resolution,
targets `(N, H, W)` int64 with `ignore_index` pixels ignored. With `reduction="none"` each returns
the per-pixel loss `(N, H, W)`, zero wherever the pixel does not count (ignored, or for OHEM not
selected), which is what `noisyseg.kernels.arm_reweighted_loss(pixel_loss, probs, valid, arm)`
reweights; `segmentation_loss` does that combination for any of the losses here (and CE).

- GCE (Zhang and Sabuncu, NeurIPS 2018): `(1 - p_y^q) / q`; q -> 0 gives cross-entropy, q = 1
  the mean absolute error. The issue fixes q = 0.7 (the GCE paper's choice); the ARM paper's
  grid search on Cityscapes-coarse preferred q = 0.1.
- OHEM for segmentation, as OCR/HRNet's `OhemCrossEntropy` (the implementation the ARM paper
  takes its OHEM setting from) and mmseg's `OHEMPixelSampler` select pixels: among the valid
  pixels of the whole batch, keep those whose true-class probability is below
  `max(threshold, p_(k))`, where `p_(k)` is the k-th smallest true-class probability (0-based)
  and k = min_kept per image times the batch size, so at least `min_kept` of the hardest pixels
  per image are kept (ties aside). When the batch has no more than k valid pixels all are kept
  (OCR and mmseg then drop the easiest one; noisyseg keeps the "at least" promise). The
  selection is not differentiated. `reduction="mean"` averages over the kept
  pixels, as OCR/HRNet do. Like mmseg's (unlike OCR's per-batch count), `min_kept` counts per
  image, so the selection does not depend on the batch size.
- T-Loss (Gonzalez-Jimenez et al., MICCAI 2023): the negative log-likelihood of a Student-t
  distribution centred on the prediction, with an identity scale matrix and a tolerance nu
  (the degrees of freedom) learned by backpropagation. As in the paper, a whole mask is one
  observation: for an image with P valid pixels, y its one-hot labels and p its softmax, both
  flattened to D = P * C dimensions (the paper's binary masks have D = P), and the residual
  r = ||y - p||^2 summed over the image:

      L = -log G((nu + D) / 2) + log G(nu / 2) + D/2 log(pi nu) + (nu + D) / 2 * log(1 + r / nu)

  The robustness is the image-level weight (nu + D) / (nu + r) on every pixel's gradient of
  ||y - p||^2: an image whose labels disagree with the network pulls less per pixel, and nu
  sets how sharply. One pixel at a time (D = C) is not a usable variant: a saturated pixel has
  r = 0 exactly, where L falls without bound as nu -> 0, and the phantom runs collapsed to
  background within two epochs (nu -> 1e-8). So that the T-Loss composes with the per-pixel
  losses here (`reduction="none"`, the mean over valid pixels, ARM's weights), each valid pixel
  carries L / P, its image's loss shared equally; the mean is then sum(L) / sum(P), the paper's
  per-image loss divided by the pixel count (a per-image constant, so the same minimiser and a
  CE-like scale under SGD). nu = exp(log_nu) + 1e-8 keeps it positive; log_nu starts at 1.0
  (nu about 2.72), the authors' code's default.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from noisyseg.kernels import arm_reweighted_loss
from noisyseg.kernels.contract import check_class_ids, check_logits_and_target

Reduction = Literal["mean", "sum", "none"]

GCE_Q = 0.7
OHEM_THRESHOLD = 0.7
# Per image. mmseg's default, 100000 per 512x1024 crop (19% of it), scaled to the 256x256
# slices of the medical setting (15% of 65536 pixels).
OHEM_MIN_KEPT = 10_000

TLOSS_LOG_NU = 1.0
TLOSS_EPSILON = 1e-8

PIXEL_LOSSES = ("ce", "gce", "ohem", "tloss")


def _true_class_log_prob(logits: Tensor, target: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """log p_y per pixel (0 at ignored pixels) in fp32, and the valid-pixel mask."""
    check_logits_and_target(logits, target)
    valid = check_class_ids(target, logits.shape[1], ignore_index)
    safe_target = torch.where(valid, target, torch.zeros_like(target)).long()
    log_probs = torch.log_softmax(logits.float(), dim=1)
    log_p_y = log_probs.gather(1, safe_target.unsqueeze(1)).squeeze(1)
    return torch.where(valid, log_p_y, torch.zeros_like(log_p_y)), valid


def _reduce(pixel_loss: Tensor, counted: Tensor, reduction: Reduction) -> Tensor:
    if reduction == "none":
        return pixel_loss
    if reduction == "sum":
        return pixel_loss.sum()
    if reduction == "mean":
        # An all-ignored batch gives 0 (with a gradient of 0) rather than NaN.
        return pixel_loss.sum() / counted.sum().clamp(min=1)
    raise ValueError(f"reduction: expected 'mean', 'sum' or 'none', got {reduction!r}")


def generalized_cross_entropy(
    logits: Tensor,
    target: Tensor,
    q: float = GCE_Q,
    ignore_index: int = 255,
    reduction: Reduction = "mean",
) -> Tensor:
    """Generalised cross-entropy `(1 - p_y^q) / q` per pixel, averaged over valid pixels.

    `reduction="none"` returns `(N, H, W)` with 0 at ignored pixels.
    """
    if not 0.0 < q <= 1.0:
        raise ValueError(f"q: GCE needs 0 < q <= 1, got {q}")
    log_p_y, valid = _true_class_log_prob(logits, target, ignore_index)
    # p_y^q = exp(q log p_y): no 0^q trouble for vanishing probabilities.
    losses = (1.0 - torch.exp(q * log_p_y)) / q
    losses = torch.where(valid, losses, torch.zeros_like(losses))
    return _reduce(losses, valid, reduction)


def _ohem_selection(log_p_y: Tensor, valid: Tensor, threshold: float, min_kept_per_image: int) -> Tensor:
    """Valid pixels whose true-class probability is below max(threshold, k-th smallest one)."""
    if min_kept_per_image < 0:
        raise ValueError(f"min_kept: expected a pixel count >= 0, got {min_kept_per_image}")
    p_y = log_p_y.detach().exp()
    valid_probs = p_y[valid]
    batch_kept = min_kept_per_image * log_p_y.shape[0]
    if batch_kept >= valid_probs.numel():
        return valid
    # The pixels strictly below the batch_kept-th smallest (0-based) are the batch_kept hardest.
    kth_smallest = torch.kthvalue(valid_probs, batch_kept + 1).values
    return valid & (p_y < torch.clamp(kth_smallest, min=threshold))


def ohem_keep_mask(
    logits: Tensor,
    target: Tensor,
    threshold: float = OHEM_THRESHOLD,
    min_kept: int = OHEM_MIN_KEPT,
    ignore_index: int = 255,
) -> Tensor:
    """The pixels OHEM trains on, `(N, H, W)` bool (see the module docstring for the rule)."""
    log_p_y, valid = _true_class_log_prob(logits.detach(), target, ignore_index)
    return _ohem_selection(log_p_y, valid, threshold, min_kept)


def ohem_cross_entropy(
    logits: Tensor,
    target: Tensor,
    threshold: float = OHEM_THRESHOLD,
    min_kept: int = OHEM_MIN_KEPT,
    ignore_index: int = 255,
    reduction: Reduction = "mean",
) -> Tensor:
    """Cross-entropy on the OHEM-selected pixels, averaged over them.

    `reduction="none"` returns `(N, H, W)` with 0 at the pixels not kept.
    """
    losses, keep = _ohem_pixel_loss(logits, target, threshold, min_kept, ignore_index)
    return _reduce(losses, keep, reduction)


def _ohem_pixel_loss(
    logits: Tensor, target: Tensor, threshold: float, min_kept: int, ignore_index: int
) -> tuple[Tensor, Tensor]:
    log_p_y, valid = _true_class_log_prob(logits, target, ignore_index)
    keep = _ohem_selection(log_p_y, valid, threshold, min_kept)
    return torch.where(keep, -log_p_y, torch.zeros_like(log_p_y)), keep


def student_t_loss(
    logits: Tensor,
    target: Tensor,
    log_nu: Tensor,
    ignore_index: int = 255,
    reduction: Reduction = "mean",
) -> Tensor:
    """The T-Loss of each image (module docstring) with tolerance nu = exp(`log_nu`) + 1e-8,
    shared equally among its valid pixels, averaged over the valid pixels of the batch.
    Computed in fp32 (fp64 inputs stay fp64).

    `reduction="none"` returns `(N, H, W)`: each valid pixel holds its image's loss divided by
    the image's valid pixel count, 0 at ignored pixels.
    """
    check_logits_and_target(logits, target)
    num_classes = logits.shape[1]
    valid = check_class_ids(target, num_classes, ignore_index)
    safe_target = torch.where(valid, target, torch.zeros_like(target)).long()
    values = logits if logits.dtype == torch.float64 else logits.float()
    probs = torch.softmax(values, dim=1)
    # ||y - p||^2 = sum_c p_c^2 - 2 p_y + 1 for a one-hot y (no one-hot tensor is built).
    distance = (probs * probs).sum(dim=1) - 2.0 * probs.gather(1, safe_target.unsqueeze(1)).squeeze(1) + 1.0
    residual = torch.where(valid, distance, torch.zeros_like(distance)).flatten(1).sum(dim=1).clamp(min=0.0)
    pixels = valid.flatten(1).sum(dim=1).to(values.dtype)
    dims = pixels * num_classes
    nu = torch.exp(log_nu.to(values.dtype)) + TLOSS_EPSILON
    half_sum = (nu + dims) / 2.0
    # An image without valid pixels has D = r = 0 and a loss of exactly 0.
    image_loss = (
        -torch.lgamma(half_sum)
        + torch.lgamma(nu / 2.0)
        + dims / 2.0 * (math.log(math.pi) + torch.log(nu))
        + half_sum * torch.log1p(residual / nu)
    )
    share = image_loss / pixels.clamp(min=1.0)
    losses = torch.where(valid, share[:, None, None].expand_as(distance), torch.zeros_like(distance))
    return _reduce(losses, valid, reduction)


class TLoss(nn.Module):
    """The T-Loss's learned tolerance: `log_nu` is trained by the network's optimiser (the
    trainer hands it every parameter of the method's objective)."""

    def __init__(self, log_nu: float = TLOSS_LOG_NU) -> None:
        super().__init__()
        self.log_nu = nn.Parameter(torch.tensor(float(log_nu)))

    @property
    def nu(self) -> Tensor:
        return torch.exp(self.log_nu) + TLOSS_EPSILON

    def forward(self, logits: Tensor, target: Tensor, ignore_index: int = 255, reduction: Reduction = "none") -> Tensor:
        return student_t_loss(logits, target, self.log_nu, ignore_index, reduction)


def pixel_loss(
    name: str,
    logits: Tensor,
    target: Tensor,
    ignore_index: int = 255,
    gce_q: float = GCE_Q,
    ohem_threshold: float = OHEM_THRESHOLD,
    ohem_min_kept: int = OHEM_MIN_KEPT,
    tloss: TLoss | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-pixel loss `(N, H, W)` of the loss `name` ("ce", "gce", "ohem" or "tloss", which
    needs its `TLoss` module) and the mask of the pixels it counts: the valid ones, or for OHEM
    the kept ones."""
    if name == "ce":
        log_p_y, valid = _true_class_log_prob(logits, target, ignore_index)
        return -log_p_y, valid
    if name == "gce":
        losses = generalized_cross_entropy(logits, target, gce_q, ignore_index, reduction="none")
        return losses, target != ignore_index
    if name == "ohem":
        return _ohem_pixel_loss(logits, target, ohem_threshold, ohem_min_kept, ignore_index)
    if name == "tloss":
        if tloss is None:
            raise ValueError("loss 'tloss': needs its TLoss module (the learned tolerance nu), got None")
        return tloss(logits, target, ignore_index), target != ignore_index
    raise ValueError(f"loss: unknown per-pixel loss {name!r}; expected one of {', '.join(PIXEL_LOSSES)}")


def segmentation_loss(
    name: str,
    logits: Tensor,
    target: Tensor,
    arm: nn.Module | None = None,
    ignore_index: int = 255,
    gce_q: float = GCE_Q,
    ohem_threshold: float = OHEM_THRESHOLD,
    ohem_min_kept: int = OHEM_MIN_KEPT,
    tloss: TLoss | None = None,
) -> Tensor:
    """The loss `name` reduced over the pixels it counts: their mean, or with `arm` their
    ARM-weighted sum through `noisyseg.kernels.arm_reweighted_loss` (ARM's confidence comes
    from the detached softmax of `logits`)."""
    losses, counted = pixel_loss(
        name,
        logits,
        target,
        ignore_index,
        gce_q=gce_q,
        ohem_threshold=ohem_threshold,
        ohem_min_kept=ohem_min_kept,
        tloss=tloss,
    )
    probs = torch.softmax(logits.detach().float(), dim=1) if arm is not None else None
    return arm_reweighted_loss(losses, probs, counted, arm)
