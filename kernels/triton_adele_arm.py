"""The combined ADELE+ARM loss, (sum_k CE_k^ARM + lam * L_ms) / S, as Triton kernels that
read the S logit maps of a block of pixels together.

Why two kernels and not Liger's single pass with a deferred scale: the gradient of z_k is
``c_k w_k (p_k - onehot) + d_n keep_i p_k (log p_k - log q - KL_k)`` with two global factors
of different kinds, c_k = 1/sum(w) per scale and d_n = [image n kept by the rho mask] /
(valid pixels) per image, neither known until every block has been seen. One buffer rescaled
afterwards cannot carry two factors, so:

* forward, `_statistics_kernel`: online softmax per scale, ARM weights, losses, KL(p_k || q)
  and max_c q per pixel; writes per-block partial sums (w, w^2, w l per scale; masked KL sum,
  max q over valid pixels, valid count per block) and two floats of per-pixel scratch per scale
  (v_hat, l) for ARM's backward. The loss value is reduced from the partials in a fixed order.
* backward, `_gradient_kernel`: recomputes the per-pixel softmax statistics and writes the
  final gradient of every z_k with c_k, d_n and grad_output folded in, then ARM's parameter
  gradient from the scratch (`triton_common.arm_parameter_gradient`).

That moves the logits three times (read, read, write the gradient) against four for a
single pass plus a rescale, and no gradient buffer is held between forward and backward.
The multiscale term alone (`functional.multiscale_consistency`, ``LossTerms.consistency``) is
the same kernels with the cross-entropy switched off (runtime has_ce = 0): the forward
kernel reads the S maps of a block of pixels once and writes per-block partial sums (masked KL,
max of q over valid pixels, valid count), the per-image rho mask is a reduction over those
partials, and the backward kernel writes dL/dz_k = p_k (log p_k - log q - KL_k) with the mask,
1/valid and grad_output folded in. What the kernels compute comes as `contract.LossTerms`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import triton
import triton.language as tl
from torch import nn

from noisyseg.kernels.contract import (
    MAX_SCALES,
    LossTerms,
    check_arm_classes,
    check_class_ids,
    check_fused_scales,
)
from noisyseg.kernels.triton_arm import arm_backward_coefficients, arm_parameter_gradient, forward_table
from noisyseg.kernels.triton_common import (
    ARM_NONE,
    MULTISCALE_TILES,
    SCALE_SLOTS,
    LaunchGeometry,
    arm_kernel_mode,
    arm_parameter_vector,
    channel_block,
    check_device,
    check_dtype,
    column,
    confidence_constants,
    cross_entropy_gradient,
    cross_entropy_terms,
    flatten_logits,
    flatten_target,
    load_target,
    log_mean_prob_tile,
    log_prob_tile,
    multiscale_kl,
    pixel_block,
    reduce_partials,
    safe_reciprocal,
    select_scale,
    softmax_statistics,
)


@triton.jit
def _per_scale_statistics(
    z0,
    z1,
    z2,
    z3,
    base,
    stride_c,
    labels,
    valid,
    in_range,
    arm_params,
    table,
    C,
    inv_c,
    confidence_scale,
    num_scales,
    ARM: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """(BLOCK_P, SCALE_SLOTS) matrices of log-normaliser, loss, confidence and weight per scale
    (columns past num_scales stay 0)."""
    scale_columns = tl.arange(0, SCALE_SLOTS)
    log_norms = tl.zeros([BLOCK_P, SCALE_SLOTS], tl.float32)
    losses = tl.zeros([BLOCK_P, SCALE_SLOTS], tl.float32)
    confidences = tl.zeros([BLOCK_P, SCALE_SLOTS], tl.float32)
    weights = tl.zeros([BLOCK_P, SCALE_SLOTS], tl.float32)
    for k in tl.static_range(SCALE_SLOTS):
        if k < num_scales:
            row_max, sum_exp, sum_exp_sq, target_logit = softmax_statistics(
                select_scale(k, z0, z1, z2, z3) + base, stride_c, labels, in_range, C, BLOCK_P, BLOCK_C
            )
            log_norm, loss, confidence, weight = cross_entropy_terms(
                row_max, sum_exp, sum_exp_sq, target_logit, valid, arm_params, table, inv_c, confidence_scale, ARM
            )
            is_k = scale_columns[None, :] == k
            log_norms = tl.where(is_k, log_norm[:, None], log_norms)
            losses = tl.where(is_k, loss[:, None], losses)
            confidences = tl.where(is_k, confidence[:, None], confidences)
            weights = tl.where(is_k, weight[:, None], weights)
    return log_norms, losses, confidences, weights


# The number of scales and the switches of the loss are runtime values, not specialised on
# (do_not_specialize): one compiled kernel per logit dtype, layout, tile and ARM mode serves
# every loss of `functional` (see kernels/compile_report.py), at the price of uniform branches.
_RUNTIME_SWITCHES = ["num_scales", "has_ce", "has_kl"]


@triton.jit(do_not_specialize=_RUNTIME_SWITCHES)
def _statistics_kernel(
    z0,
    z1,
    z2,
    z3,
    stride_n,
    stride_c,
    stride_l,
    target,
    target_stride_n,
    target_stride_l,
    arm_params,
    table,
    confidence_out,
    loss_out,
    ce_partials,
    kl_partials,
    C,
    L,
    num_blocks,
    ignore_index,
    inv_c,
    confidence_scale,
    log_num_scales,
    pixel_rho,
    num_scales,
    has_ce,
    has_kl,
    ARM: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    image, offsets, in_range = pixel_block(L, BLOCK_P)
    labels, valid = load_target(target, target_stride_n, target_stride_l, image, offsets, in_range, ignore_index)
    base = image * stride_n + offsets * stride_l
    block = image * num_blocks + tl.program_id(1).to(tl.int64)
    scale_columns = tl.arange(0, SCALE_SLOTS)
    log_norms, losses, confidences, weights = _per_scale_statistics(
        z0,
        z1,
        z2,
        z3,
        base,
        stride_c,
        labels,
        valid,
        in_range,
        arm_params,
        table,
        C,
        inv_c,
        confidence_scale,
        num_scales,
        ARM,
        BLOCK_P,
        BLOCK_C,
    )
    if has_ce != 0:
        for k in tl.static_range(SCALE_SLOTS):
            if k < num_scales:
                loss = column(losses, scale_columns, k)
                weight = column(weights, scale_columns, k)
                if ARM != 0:
                    scratch = (k * tl.num_programs(0).to(tl.int64) + image) * L + offsets
                    tl.store(confidence_out + scratch, column(confidences, scale_columns, k), mask=in_range)
                    tl.store(loss_out + scratch, loss, mask=in_range)
                partial = (block * num_scales + k) * 3
                tl.store(ce_partials + partial, tl.sum(weight, axis=0))
                tl.store(ce_partials + partial + 1, tl.sum(weight * weight, axis=0))
                tl.store(ce_partials + partial + 2, tl.sum(weight * loss, axis=0))
    if has_kl != 0:
        kl, max_q = multiscale_kl(
            z0,
            z1,
            z2,
            z3,
            base,
            stride_c,
            in_range,
            log_norms,
            scale_columns,
            log_num_scales,
            C,
            num_scales,
            BLOCK_P,
            BLOCK_C,
            SCALE_SLOTS,
        )
        keep = valid & (max_q > pixel_rho)
        tl.store(kl_partials + block * 3, tl.sum(tl.where(keep, tl.sum(kl, axis=1), 0.0), axis=0))
        tl.store(kl_partials + block * 3 + 1, tl.max(tl.where(valid, max_q, float("-inf")), axis=0))
    tl.store(kl_partials + block * 3 + 2, tl.sum(valid.to(tl.float32), axis=0))


@triton.jit(do_not_specialize=_RUNTIME_SWITCHES)
def _gradient_kernel(
    z0,
    z1,
    z2,
    z3,
    g0,
    g1,
    g2,
    g3,
    stride_n,
    stride_c,
    stride_l,
    target,
    target_stride_n,
    target_stride_l,
    arm_params,
    table,
    ce_factors,
    kl_factors,
    C,
    L,
    ignore_index,
    inv_c,
    confidence_scale,
    log_num_scales,
    pixel_rho,
    num_scales,
    has_ce,
    has_kl,
    ARM: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """d loss / d z_k for every scale, all global factors (and grad_output) already folded
    into ce_factors (per scale) and kl_factors (per image)."""
    image, offsets, in_range = pixel_block(L, BLOCK_P)
    labels, valid = load_target(target, target_stride_n, target_stride_l, image, offsets, in_range, ignore_index)
    base = image * stride_n + offsets * stride_l
    scale_columns = tl.arange(0, SCALE_SLOTS)
    log_norms, _, _, weights = _per_scale_statistics(
        z0,
        z1,
        z2,
        z3,
        base,
        stride_c,
        labels,
        valid,
        in_range,
        arm_params,
        table,
        C,
        inv_c,
        confidence_scale,
        num_scales,
        ARM,
        BLOCK_P,
        BLOCK_C,
    )
    ce_scales = weights * tl.load(ce_factors + scale_columns, mask=scale_columns < num_scales, other=0.0)[None, :]
    kl = tl.zeros([BLOCK_P, SCALE_SLOTS], tl.float32)
    kl_scale = tl.zeros([BLOCK_P], tl.float32)
    if has_kl != 0:
        kl, max_q = multiscale_kl(
            z0,
            z1,
            z2,
            z3,
            base,
            stride_c,
            in_range,
            log_norms,
            scale_columns,
            log_num_scales,
            C,
            num_scales,
            BLOCK_P,
            BLOCK_C,
            SCALE_SLOTS,
        )
        keep = valid & (max_q > pixel_rho)
        kl_scale = tl.where(keep, tl.load(kl_factors + image), 0.0)
    for c_start in range(0, C, BLOCK_C):
        channels, channel_mask = channel_block(c_start, C, BLOCK_C)
        log_q = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
        if has_kl != 0:
            log_q = log_mean_prob_tile(
                z0,
                z1,
                z2,
                z3,
                base,
                stride_c,
                channels,
                channel_mask,
                in_range,
                log_norms,
                scale_columns,
                log_num_scales,
                num_scales,
            )
        for k in tl.static_range(SCALE_SLOTS):
            if k < num_scales:
                log_p = log_prob_tile(
                    k, z0, z1, z2, z3, base, stride_c, channels, channel_mask, in_range, log_norms, scale_columns
                )
                p = tl.exp(log_p)
                g = cross_entropy_gradient(p, channels, labels) * column(ce_scales, scale_columns, k)[:, None]
                if has_kl != 0:
                    kl_k = column(kl, scale_columns, k)
                    g += p * (log_p - log_q - kl_k[:, None]) * kl_scale[:, None]
                grad = select_scale(k, g0, g1, g2, g3)
                pointers = grad + base[:, None] + channels.to(tl.int64)[None, :] * stride_c
                tl.store(pointers, g.to(grad.dtype.element_ty), mask=in_range[:, None] & channel_mask[None, :])


def _switches(config: LossTerms, num_scales: int) -> dict[str, int | float]:
    """The kernels' runtime switches: scale count, which terms, and the per-pixel rho threshold
    (-1 in image mode, where every valid pixel counts and images are kept on the host: max_c q
    is always above -1)."""
    return {
        "num_scales": num_scales,
        "has_ce": int(config.has_cross_entropy),
        "has_kl": int(config.has_consistency),
        "pixel_rho": config.rho if config.pixel_mask else -1.0,
    }


def _padded_scales(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Exactly MAX_SCALES pointer arguments (unused slots repeat the first tensor)."""
    return [*tensors, *([tensors[0]] * (MAX_SCALES - len(tensors)))]


class FusedMultiscaleLossFunction(torch.autograd.Function):
    """``forward(ctx, target (N, L), arm_params (53,), config, arm_mode, *logits (N, C, L) each)``;
    the logits share one dtype and one stride layout (see `prepare_scales`)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        target: torch.Tensor,
        arm_params: torch.Tensor,
        config: LossTerms,
        arm_mode: int,
        *logits: torch.Tensor,
    ) -> torch.Tensor:
        num_scales = len(logits)
        num_images, num_classes, num_pixels = logits[0].shape
        geometry = LaunchGeometry.for_logits(logits[0], MULTISCALE_TILES)
        device = logits[0].device
        scratch_shape = (num_scales, num_images, num_pixels) if arm_mode != ARM_NONE else (1, 1, 1)
        confidence = torch.empty(scratch_shape, dtype=torch.float32, device=device)
        pixel_loss = torch.empty(scratch_shape, dtype=torch.float32, device=device)
        ce_partials = torch.zeros(num_images, geometry.num_blocks, num_scales, 3, dtype=torch.float32, device=device)
        kl_partials = torch.zeros(num_images, geometry.num_blocks, 3, dtype=torch.float32, device=device)
        inv_c, confidence_scale = confidence_constants(num_classes)
        table = forward_table(arm_params, arm_mode)
        _statistics_kernel[(num_images, geometry.num_blocks)](
            *_padded_scales(logits),
            *logits[0].stride(),
            target,
            *target.stride(),
            arm_params.detach(),
            table,
            confidence,
            pixel_loss,
            ce_partials,
            kl_partials,
            num_classes,
            num_pixels,
            geometry.num_blocks,
            config.ignore_index,
            inv_c,
            confidence_scale,
            math.log(num_scales),
            **_switches(config, num_scales),
            ARM=arm_mode,
            BLOCK_P=geometry.block_p,
            BLOCK_C=geometry.block_c,
            **geometry.options,
        )
        ce_sums = reduce_partials(ce_partials, (0, 1))  # (S, 3): sum w, sum w^2, sum w l
        kl_per_image = reduce_partials(kl_partials[..., 0], (1,))
        valid_count = reduce_partials(kl_partials[..., 2], (0, 1))
        kept_images = _kept_images(kl_partials[..., 1], config)
        cross_entropy = (ce_sums[:, 2] * safe_reciprocal(ce_sums[:, 0])).sum()
        consistency = (kl_per_image * kept_images).sum() * safe_reciprocal(valid_count)
        loss = config.ce_weight * cross_entropy + config.kl_weight * consistency
        ctx.save_for_backward(
            target, arm_params.detach(), table, confidence, pixel_loss, ce_sums, kept_images, valid_count, *logits
        )
        ctx.config = config
        ctx.arm_mode = arm_mode
        ctx.geometry = geometry
        return loss.float()

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        target, arm_params, table, confidence, pixel_loss, ce_sums, kept_images, valid_count, *logits = (
            ctx.saved_tensors
        )
        config = ctx.config
        upstream = grad_output.double()
        grads: list[torch.Tensor | None] = [None] * len(logits)
        if any(ctx.needs_input_grad[4:]):
            ce_factors = (upstream * config.ce_weight * safe_reciprocal(ce_sums[:, 0])).float()
            kl_factors = (upstream * config.kl_weight * kept_images * safe_reciprocal(valid_count)).float()
            grads = list(
                _logit_gradients(
                    logits, target, arm_params, table, ce_factors, kl_factors, config, ctx.arm_mode, ctx.geometry
                )
            )
        grad_params = None
        if ctx.needs_input_grad[1] and ctx.arm_mode != ARM_NONE:
            coefficients = arm_backward_coefficients(ce_sums, upstream * config.ce_weight)
            grad_params = arm_parameter_gradient(
                confidence, pixel_loss, target, coefficients, arm_params, table, ctx.arm_mode, config.ignore_index
            )
        return None, grad_params, None, None, *grads


def _logit_gradients(
    logits: Sequence[torch.Tensor],
    target: torch.Tensor,
    arm_params: torch.Tensor,
    table: torch.Tensor,
    ce_factors: torch.Tensor,
    kl_factors: torch.Tensor,
    config: LossTerms,
    arm_mode: int,
    geometry: LaunchGeometry,
) -> list[torch.Tensor]:
    """Launch `_gradient_kernel`: one gradient buffer per scale, in the logits' dtype and layout."""
    grads = [torch.empty_like(z) for z in logits]
    num_images, num_classes, num_pixels = logits[0].shape
    inv_c, confidence_scale = confidence_constants(num_classes)
    _gradient_kernel[(num_images, geometry.num_blocks)](
        *_padded_scales(logits),
        *_padded_scales(grads),
        *logits[0].stride(),
        target,
        *target.stride(),
        arm_params,
        table,
        ce_factors,
        kl_factors,
        num_classes,
        num_pixels,
        config.ignore_index,
        inv_c,
        confidence_scale,
        math.log(len(logits)),
        **_switches(config, len(logits)),
        ARM=arm_mode,
        BLOCK_P=geometry.block_p,
        BLOCK_C=geometry.block_c,
        **geometry.options,
    )
    return grads


def _kept_images(image_max_partials: torch.Tensor, config: LossTerms) -> torch.Tensor:
    """Per image 1.0 if the rho mask keeps it (image mode: max of q over its valid pixels
    exceeds rho; pixel mode decides per pixel in the kernels, so every image counts)."""
    if config.pixel_mask:
        return torch.ones(image_max_partials.shape[0], dtype=torch.float64, device=image_max_partials.device)
    return (image_max_partials.amax(dim=1) > config.rho).double()


def prepare_scales(
    logits_per_scale: Sequence[torch.Tensor], target: torch.Tensor, ignore_index: int
) -> list[torch.Tensor]:
    """Validate the scales against the reference's rules and flatten them to (N, C, L) views
    sharing one dtype and one stride layout (the kernels take a single set of strides)."""
    check_fused_scales(logits_per_scale, target, "triton")
    dtype = logits_per_scale[0].dtype
    for index, logits in enumerate(logits_per_scale):
        name = f"logits_per_scale[{index}]"
        check_dtype(logits, name)
        check_device(logits, name)
        if logits.dtype != dtype:
            raise ValueError(
                f"{name}: every scale must have the dtype of logits_per_scale[0] ({dtype}), got {logits.dtype}"
            )
    check_class_ids(target, logits_per_scale[0].shape[1], ignore_index)
    flat = [flatten_logits(logits) for logits in logits_per_scale]
    if any(z.stride() != flat[0].stride() for z in flat):
        flat = [z.contiguous() for z in flat]
    return flat


def fused_multiscale_loss(
    logits_per_scale: Sequence[torch.Tensor],
    target: torch.Tensor,
    arm: nn.Module | None,
    config: LossTerms,
) -> torch.Tensor:
    """`functional.multiscale_consistency` and `functional.adele_arm_loss` on the Triton backend:
    validate, flatten and run `FusedMultiscaleLossFunction`."""
    flat = prepare_scales(logits_per_scale, target, config.ignore_index)
    arm = arm if config.has_cross_entropy else None
    check_arm_classes(arm, flat[0].shape[1], "logits_per_scale[0]")
    arm_params = arm_parameter_vector(arm, flat[0])
    arm_mode = arm_kernel_mode(arm is not None, config)
    return FusedMultiscaleLossFunction.apply(flatten_target(target), arm_params, config, arm_mode, *flat)
