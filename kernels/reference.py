"""The loss specification: readable, autograd-differentiable PyTorch.

Every fused backend (Triton, numba) is tested against these functions. Semantics follow
`method-spec.md` sections 4 (multiscale consistency) and 5 (ARM) exactly:

* Shapes: logits ``(N, C, *spatial)`` at label resolution, targets ``(N, *spatial)`` integer
  class ids, ``ignore_index`` (255) marking pixels that count nowhere.
* Every loss is computed in fp32 for fp16/bf16/fp32 logits (fp64 stays fp64, for gradcheck);
  gradients reach the logits in their own dtype through autograd.
* A batch with no valid pixel gives a loss of exactly 0 (and zero gradients), never NaN.
* ARM is the exact MLP per pixel by default here (``arm_mode="exact"``); ``"table"`` is the
  interpolated table every backend computes by default (`contract`, `arm_table_weights`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from noisyseg.kernels.contract import (
    ARM_WIDTHS,
    arm_table_nodes,
    arm_table_position,
    check_arm_mode,
    check_class_ids,
    check_logits_and_target,
    check_mask,
    check_scales,
)


class ARM(nn.Module):
    """Adversarial Reweighting Module: normalised confidence in [-1, 1] -> weight in (0, 1).

    Four 1x1 convolutions with bias, widths 1-4-4-4-1, Swish (SiLU) between layers and a final
    sigmoid: 8 + 20 + 20 + 5 = 53 parameters (the ARM paper's Figure 3).
    """

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Conv2d(width_in, width_out, kernel_size=1)
            for width_in, width_out in zip(ARM_WIDTHS[:-1], ARM_WIDTHS[1:])
        )

    def forward(self, confidence: torch.Tensor) -> torch.Tensor:
        """Weights for a tensor of normalised confidences of any shape (same shape out)."""
        hidden = confidence.reshape(1, 1, -1, 1)
        for index, layer in enumerate(self.layers):
            hidden = layer(hidden)
            hidden = torch.sigmoid(hidden) if index == len(self.layers) - 1 else F.silu(hidden)
        return hidden.reshape(confidence.shape)


def normalized_confidence(probs: torch.Tensor) -> torch.Tensor:
    """ARM's confidence indicator, ``(N, C, *) -> (N, *)`` in [-1, 1].

    v = (1/C) sum_c (p_c - 1/C)^2 lies in [0, (C-1)/C^2]; it is mapped to
    2 C^2/(C-1) v - 1, so 1 means one-hot (confident) and -1 means uniform.
    """
    num_classes = probs.shape[1]
    if num_classes < 2:
        raise ValueError(f"probs: ARM's confidence needs at least 2 classes, got shape {tuple(probs.shape)}")
    variance = (probs - 1.0 / num_classes).square().mean(dim=1)
    return variance * (2.0 * num_classes**2 / (num_classes - 1)) - 1.0


def arm_table_weights(arm: nn.Module, confidence: torch.Tensor) -> torch.Tensor:
    """ARM's weights through its table (`contract`, ``arm_mode="table"``): the MLP at the K
    nodes, interpolated linearly at each confidence. Autograd through the node values gives ARM's
    gradient the fused backends compute from K bins."""
    table = arm(arm_table_nodes(confidence.dtype, confidence.device))
    index, fraction = arm_table_position(confidence)
    return table[index] * (1.0 - fraction) + table[index + 1] * fraction


def arm_pixel_weights(arm: nn.Module, confidence: torch.Tensor, arm_mode: str = "exact") -> torch.Tensor:
    """Per-pixel weights over the valid pixels: ARM, then L2 then constant L1 normalisation.

    w2 = w / ||w||_2 carries ARM's gradient (the constraint that makes the adversarial game
    converge); dividing by sum(w2) as a stop-gradient constant gives weights that sum to 1
    without collapsing the two steps into a plain L1 normalisation (which does not converge).
    ``arm_mode``: ARM itself (``"exact"``) or its table (``"table"``, `arm_table_weights`).
    """
    check_arm_mode(arm_mode)
    weights = arm(confidence) if arm_mode == "exact" else arm_table_weights(arm, confidence)
    weights_l2 = weights / weights.norm(p=2)
    return weights_l2 / weights_l2.sum().detach()


def arm_reweighted_loss(
    pixel_loss: torch.Tensor,
    probs: torch.Tensor | None,
    valid: torch.Tensor,
    arm: nn.Module | None,
    arm_mode: str = "exact",
) -> torch.Tensor:
    """Reduce a per-pixel loss over the valid pixels, ARM-weighted or uniformly.

    ``pixel_loss`` ``(N, *)`` carries the gradient to the network; ``probs`` ``(N, C, *)``
    feed ARM's confidence and are detached here (the ARM paper's Table 1: not detaching
    collapses training). With ``arm=None`` this is the mean over valid pixels.

    Value: sum_i w_i l_i over valid pixels with sum_i w_i = 1. Gradients: the network sees the
    weights as constants (d/dl_i = w_i); ARM's parameters see the losses as constants and the
    L1 normaliser as a constant, so they receive sum_i l_i dw2_i / (sum_j w2_j).
    """
    losses = pixel_loss[valid]
    if arm is None:
        return losses.sum() / max(int(valid.sum()), 1)
    if losses.numel() == 0:
        return losses.sum()
    if probs is None:
        raise ValueError("probs: ARM reweighting needs the class probabilities, got None")
    confidence = normalized_confidence(_accumulation_precision(probs.detach()))[valid]
    weights = arm_pixel_weights(arm, confidence, arm_mode)
    constant_weights = weights.detach()
    # One scalar with two gradient paths: (w_const * l) for the network, (w - w_const) * l_const
    # for ARM; the second term is zero in value.
    return (constant_weights * losses).sum() + ((weights - constant_weights) * losses.detach()).sum()


def _accumulation_precision(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def arm_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    arm: nn.Module | None,
    ignore_index: int = 255,
    arm_mode: str = "exact",
) -> torch.Tensor:
    """ARM-weighted cross-entropy (method-spec section 5); ``arm=None``: mean CE over valid pixels.

    Equals ``F.cross_entropy(logits, target, ignore_index=ignore_index)`` when ``arm`` is None,
    except that a batch with no valid pixel gives 0 rather than NaN.
    """
    check_logits_and_target(logits, target)
    valid = check_class_ids(target, logits.shape[1], ignore_index)
    logits32 = _accumulation_precision(logits)
    pixel_loss = F.cross_entropy(logits32, target.long(), ignore_index=ignore_index, reduction="none")
    probs = torch.softmax(logits32.detach(), dim=1) if arm is not None else None
    return arm_reweighted_loss(pixel_loss, probs, valid, arm, arm_mode)


def consistency_mask(q: torch.Tensor, valid: torch.Tensor, rho: float, mask: str) -> torch.Tensor:
    """Pixels the consistency term applies to, from the mean prediction q ``(N, C, *)``.

    ``image`` (the paper and reference code): every valid pixel of an image whose maximum of q
    over its valid pixels and all classes exceeds rho. ``pixel``: each valid pixel whose own
    max_c q exceeds rho.
    """
    check_mask(mask)
    pixel_max = q.amax(dim=1)
    if mask == "pixel":
        return valid & (pixel_max > rho)
    masked = torch.where(valid, pixel_max, torch.full_like(pixel_max, -math.inf))
    image_max = masked.reshape(masked.shape[0], -1).amax(dim=1)
    keep_image = (image_max > rho).reshape(-1, *([1] * (valid.dim() - 1)))
    return valid & keep_image


def multiscale_consistency(
    logits_per_scale: Sequence[torch.Tensor],
    target: torch.Tensor,
    rho: float = 0.8,
    mask: str = "image",
    ignore_index: int = 255,
) -> torch.Tensor:
    """ADELE's multiscale consistency: sum_k KL(p_k || q), q = mean_k p_k (method-spec section 4).

    Summed over the pixels the rho mask keeps, divided by the number of valid pixels in the
    batch (masked-out pixels count in the denominator, as the reference code's plain mean).
    log q is computed as logsumexp_k(log p_k) - log S, so it is finite and no clamp is needed;
    a term with p = 0 contributes 0.
    """
    check_scales(logits_per_scale, target)
    check_mask(mask)
    valid = check_class_ids(target, logits_per_scale[0].shape[1], ignore_index)
    log_p = torch.stack([F.log_softmax(_accumulation_precision(z), dim=1) for z in logits_per_scale])
    log_q = torch.logsumexp(log_p, dim=0) - math.log(len(logits_per_scale))
    kl_per_pixel = (log_p.exp() * (log_p - log_q)).sum(dim=2).sum(dim=0)
    keep = consistency_mask(log_q.detach().exp(), valid, rho, mask)
    return torch.where(keep, kl_per_pixel, torch.zeros_like(kl_per_pixel)).sum() / max(int(valid.sum()), 1)


def adele_arm_loss(
    logits_per_scale: Sequence[torch.Tensor],
    target: torch.Tensor,
    arm: nn.Module | None,
    lam: float = 1.0,
    rho: float = 0.8,
    mask: str = "image",
    ignore_index: int = 255,
    arm_mode: str = "exact",
) -> torch.Tensor:
    """(sum_k CE_k + lam * L_ms) / S, each CE_k ARM-weighted over its own scale's valid pixels."""
    cross_entropy = sum(arm_cross_entropy(z, target, arm, ignore_index, arm_mode) for z in logits_per_scale)
    consistency = multiscale_consistency(logits_per_scale, target, rho, mask, ignore_index)
    return (cross_entropy + lam * consistency) / len(logits_per_scale)
