"""What every loss backend shares: the loss terms, ARM's parameter layout, the limits and the
input checks.

* `LossTerms` describes what a fused call computes, ``ce_weight * sum_k CE_k^ARM + kl_weight *
  L_ms`` over the S scales, with the rho mask and the ignored id; `noisyseg.kernels.functional`
  builds it from the public arguments, and each fused backend (Triton, numba) reads it.
* ARM's weight comes from a table of K node values with linear interpolation (``arm_mode
  "table"``, the default) or from the MLP per pixel (``"exact"``); the table's size, nodes,
  interpolation and how its gradient reaches ARM's parameters are defined here once.
* ARM's 53 parameters reach the kernels as one flat fp32 vector (`pack_arm_parameters`); the
  offsets of each layer's weight (out x in, row-major) and bias in it are `ARM_W0` ... `ARM_B3`
  (layer l is the module's ``layers.l``). Both backends' kernels are written for the 1-4-4-4-1
  shape, checked here once.
* `MAX_SCALES`: the fused backends take at most 4 scales. The Triton kernels take one pointer
  argument per scale (Triton has no arrays of pointers), so the limit is a number of kernel
  arguments; numba compiles one kernel per number of scales and takes the same limit, so a loss
  that runs on one fused backend runs on the other. The method uses 3 (scales 1.0, 0.7, 1.5);
  the reference (``backend="torch"``) has no limit.
* The checks raise the reference's errors, so every backend names a bad input the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

# ---------------------------------------------------------------------------------------------
# ARM's parameter layout

ARM_WIDTHS = (1, 4, 4, 4, 1)


def _parameter_offsets() -> dict[str, tuple[int, int]]:
    offsets, start = {}, 0
    for layer, (width_in, width_out) in enumerate(zip(ARM_WIDTHS[:-1], ARM_WIDTHS[1:])):
        for name, size in (("weight", width_in * width_out), ("bias", width_out)):
            offsets[f"layers.{layer}.{name}"] = (start, start + size)
            start += size
    return offsets


ARM_PARAMETER_OFFSETS = _parameter_offsets()
ARM_NUM_PARAMETERS = max(end for _, end in ARM_PARAMETER_OFFSETS.values())
# The kernels hard-code the 1-4-4-4-1 shape (three 4-wide hidden layers).
if ARM_WIDTHS != (1, 4, 4, 4, 1) or ARM_NUM_PARAMETERS != 53:
    raise RuntimeError(f"the fused ARM kernels are written for widths (1, 4, 4, 4, 1), got {ARM_WIDTHS}")
ARM_HIDDEN = 4
# Start of each layer's weight and bias in the flat vector, as plain ints (compile-time
# constants to numba; Triton reads them as attributes of this module).
ARM_W0, ARM_B0 = ARM_PARAMETER_OFFSETS["layers.0.weight"][0], ARM_PARAMETER_OFFSETS["layers.0.bias"][0]
ARM_W1, ARM_B1 = ARM_PARAMETER_OFFSETS["layers.1.weight"][0], ARM_PARAMETER_OFFSETS["layers.1.bias"][0]
ARM_W2, ARM_B2 = ARM_PARAMETER_OFFSETS["layers.2.weight"][0], ARM_PARAMETER_OFFSETS["layers.2.bias"][0]
ARM_W3, ARM_B3 = ARM_PARAMETER_OFFSETS["layers.3.weight"][0], ARM_PARAMETER_OFFSETS["layers.3.bias"][0]


# ---------------------------------------------------------------------------------------------
# ARM's weight from a table (the default) or the exact MLP
#
# ARM maps one scalar per pixel, the confidence v in [-1, 1], to its weight w(v). ``"table"``
# evaluates the MLP at ARM_TABLE_SIZE evenly spaced nodes v_k = -1 + 2k / (K - 1) once per call
# and interpolates linearly between the two nodes around each pixel's v (`arm_table_position`):
# w~(v) = (1 - f) w(v_k) + f w(v_k+1). The loss is then a function of the K node values, so
# ARM's 53 parameter gradients are sum_k u_k dw(v_k)/dtheta with u_k = sum_i g_i phi_k(v_i),
# the per-pixel upstream gradients g_i accumulated into K bins with the same interpolation
# weights phi (1 - f at node k, f at node k + 1): one MLP backward over K nodes instead of one
# per pixel. Every backend computes exactly this function and its gradient (the reference with
# autograd through the table: `reference.arm_table_weights`); ``"exact"`` runs the MLP per pixel.
#
# K: linear interpolation is off by at most h^2 / 8 max |w''| (h = 2 / (K - 1)), and trained ARMs
# are steep (a step from 1 to 0 about 0.1 wide in v: max |w''| in the hundreds). Measured in
# fp64 against the exact path (benchmarks/arm_table_error.py; docs/benchmarks.md, "ARM's
# table"): for a step with max |w''| = 251, ARM's gradient is off by 1.7e-5 at K = 4096 and
# 3.3e-6 at K = 8192 (loss 1.6e-8, logit gradients 2.1e-6), within ARM_TABLE_RTOL; ARMs near
# their initialisation are off by under 1e-7. The exact path's own fp32 rounding moves ARM's
# gradient by more on the same batches (4e-6 to 1.9e-5): the sums it is made of cancel.

ARM_MODES = ("table", "exact")
ARM_TABLE_SIZE = 8192
ARM_TABLE_SCALE = (ARM_TABLE_SIZE - 1) / 2.0  # t = (v + 1) * ARM_TABLE_SCALE, node spacing 1
ARM_TABLE_RTOL = 1e-5  # the table path's stated bound against the exact path (tests)


def check_arm_mode(arm_mode: str) -> None:
    if arm_mode not in ARM_MODES:
        raise ValueError(f"arm_mode: expected one of {ARM_MODES}, got {arm_mode!r}")


def arm_table_nodes(dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """The K confidences at which the table holds ARM's weight: -1, ..., 1, evenly spaced."""
    return torch.linspace(-1.0, 1.0, ARM_TABLE_SIZE, dtype=dtype, device=device)


def arm_table_position(confidence: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(k, f) per pixel: v lies between nodes k and k + 1, a fraction f of the way (confidences
    rounded past [-1, 1] are clamped to the end nodes). The kernels compute the same in fp32."""
    position = ((confidence + 1.0) * ARM_TABLE_SCALE).clamp(0.0, ARM_TABLE_SIZE - 1.0)
    index = position.floor().clamp(max=ARM_TABLE_SIZE - 2)
    return index.long(), position - index


def pack_arm_parameters(arm: nn.Module) -> torch.Tensor:
    """ARM's 53 parameters as one flat fp32 vector, differentiable (gradients flow back to
    the module's parameters through the concatenation).

    Layout, layer by layer: weight (out x in, row-major) then bias; offsets in
    `ARM_PARAMETER_OFFSETS`. This is the form the fused kernels read.
    """
    flat = torch.cat([p.reshape(-1).float() for p in arm.parameters()])
    if flat.numel() != ARM_NUM_PARAMETERS:
        raise ValueError(f"arm: expected {ARM_NUM_PARAMETERS} parameters (widths {ARM_WIDTHS}), got {flat.numel()}")
    return flat


# ---------------------------------------------------------------------------------------------
# The loss terms

MASK_MODES = ("image", "pixel")
# Logit dtypes the fused kernels read (they accumulate in fp32); fp64 goes to the reference.
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_SCALES = 4


@dataclass(frozen=True)
class LossTerms:
    """What a fused call computes: ce_weight * sum_k CE_k^ARM + kl_weight * L_ms.

    A term with weight 0 is not computed. ``mask`` is the consistency term's rho mask
    (`reference.consistency_mask`); ARM weights the cross-entropy when an ARM is passed.
    """

    ce_weight: float
    kl_weight: float
    rho: float = 0.8
    mask: str = "image"
    ignore_index: int = 255
    arm_mode: str = "table"

    def __post_init__(self) -> None:
        check_mask(self.mask)
        check_arm_mode(self.arm_mode)

    @classmethod
    def cross_entropy(cls, ignore_index: int = 255, arm_mode: str = "table") -> LossTerms:
        """`arm_cross_entropy`: one scale's (ARM-weighted) cross-entropy."""
        return cls(ce_weight=1.0, kl_weight=0.0, ignore_index=ignore_index, arm_mode=arm_mode)

    @classmethod
    def consistency(cls, rho: float = 0.8, mask: str = "image", ignore_index: int = 255) -> LossTerms:
        """`multiscale_consistency`: the KL term alone."""
        return cls(ce_weight=0.0, kl_weight=1.0, rho=rho, mask=mask, ignore_index=ignore_index)

    @classmethod
    def adele_arm(
        cls,
        num_scales: int,
        lam: float = 1.0,
        rho: float = 0.8,
        mask: str = "image",
        ignore_index: int = 255,
        arm_mode: str = "table",
    ) -> LossTerms:
        """`adele_arm_loss`: (sum_k CE_k + lam * L_ms) / S."""
        scales = max(num_scales, 1)  # no scale at all is refused by check_scales
        return cls(
            ce_weight=1.0 / scales,
            kl_weight=lam / scales,
            rho=rho,
            mask=mask,
            ignore_index=ignore_index,
            arm_mode=arm_mode,
        )

    @property
    def has_cross_entropy(self) -> bool:
        return self.ce_weight != 0.0

    @property
    def has_consistency(self) -> bool:
        return self.kl_weight != 0.0

    @property
    def pixel_mask(self) -> bool:
        return self.mask == "pixel"

    @property
    def arm_table(self) -> bool:
        return self.arm_mode == "table"


# ---------------------------------------------------------------------------------------------
# Input checks (the reference's errors)


def check_mask(mask: str) -> None:
    """The consistency term's mask modes, checked before any work is done."""
    if mask not in MASK_MODES:
        raise ValueError(f"mask: expected one of {MASK_MODES}, got {mask!r}")


def check_logits_and_target(logits: torch.Tensor, target: torch.Tensor, name: str = "logits") -> None:
    """Clear errors for the shape and dtype mistakes a caller can make."""
    if logits.dim() < 2:
        raise ValueError(f"{name}: expected (N, C, *spatial), got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got {logits.dtype}")
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise ValueError(f"target: expected integer class ids, got {target.dtype}")
    expected = (logits.shape[0], *logits.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(
            f"target: expected shape {expected} to match {name} {tuple(logits.shape)}, got {tuple(target.shape)}"
        )


def check_class_ids(target: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """The valid-pixel mask; a ValueError when a non-ignored id is outside [0, num_classes).

    On a GPU the check is an asynchronous device assertion instead: reading the ids' range on the
    host would make every loss call wait for the GPU (the trainer's step avoids such waits).
    """
    valid = target != ignore_index
    if target.is_cuda:
        in_range = (target >= 0) & (target < num_classes)
        torch._assert_async(
            (in_range | ~valid).all(), f"target: class ids must be in [0, {num_classes}) or {ignore_index} (ignored)"
        )
        return valid
    if valid.any():
        ids = target[valid]
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= num_classes:
            raise ValueError(
                f"target: class ids must be in [0, {num_classes}) or {ignore_index} (ignored), "
                f"found {low if low < 0 else high}"
            )
    return valid


def check_scales(logits_per_scale: Sequence[torch.Tensor], target: torch.Tensor) -> None:
    """Every scale's logits match the target and each other (all at label resolution)."""
    if len(logits_per_scale) == 0:
        raise ValueError("logits_per_scale: expected at least one logits tensor, got none")
    first = logits_per_scale[0]
    for index, logits in enumerate(logits_per_scale):
        check_logits_and_target(logits, target, name=f"logits_per_scale[{index}]")
        if logits.shape != first.shape:
            raise ValueError(
                f"logits_per_scale[{index}]: every scale must be resized to label resolution "
                f"{tuple(first.shape)}, got {tuple(logits.shape)}"
            )


def check_fused_scales(logits_per_scale: Sequence[torch.Tensor], target: torch.Tensor, backend: str) -> None:
    """`check_scales`, and no more than the fused backends' `MAX_SCALES`."""
    check_scales(logits_per_scale, target)
    if len(logits_per_scale) > MAX_SCALES:
        raise ValueError(
            f"logits_per_scale: the {backend} backend fuses at most {MAX_SCALES} scales, got "
            f"{len(logits_per_scale)} (backend='torch' takes any number)"
        )


def check_arm_classes(arm: nn.Module | None, num_classes: int, name: str) -> None:
    """The reference's rule: ARM's confidence is undefined for fewer than two classes."""
    if arm is not None and num_classes < 2:
        raise ValueError(f"{name}: ARM's confidence needs at least 2 classes, got C={num_classes}")
