"""ARM-weighted cross-entropy as one Triton pass over the logits (Liger-Kernel's structure).

Forward, per block of pixels: online softmax in fp32 over channel blocks, ARM's normalised
confidence v_hat and weight w = ARM(v_hat) (read from ARM's table, built by one small launch per
call, or the MLP itself: `contract`, ``arm_mode``), the pixel loss l, and the gradient w (p - onehot)
written straight into a buffer in the logits' dtype, plus per-block partial sums of w, w^2 and
w l. The global normalisation 1/sum(w) is not known until every block is done, so it is
applied as a deferred scale in backward together with grad_output (one fp32 rescale pass).
ARM's 53 parameter gradients come from a light second pass over two floats of per-pixel
scratch (v_hat, l): through the table's node Jacobian, or ARM's MLP per pixel. With
``arm=None`` every valid pixel has weight 1: the plain mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import triton
import triton.language as tl
from torch import nn

from noisyseg.kernels.contract import (
    LossTerms,
    check_arm_classes,
    check_class_ids,
    check_logits_and_target,
)
from noisyseg.kernels.triton_arm import arm_backward_coefficients, arm_parameter_gradient, forward_table
from noisyseg.kernels.triton_common import (
    ARM_NONE,
    CE_TILES,
    LaunchGeometry,
    arm_kernel_mode,
    arm_parameter_vector,
    channel_block,
    check_device,
    check_dtype,
    confidence_constants,
    cross_entropy_gradient,
    cross_entropy_terms,
    flatten_logits,
    flatten_target,
    load_channels,
    load_target,
    pixel_block,
    reduce_partials,
    safe_reciprocal,
    softmax_statistics,
)


# write_grad is a runtime switch (not specialised on its value): the gradient loop is skipped
# by a uniform branch, and one compiled kernel serves training and evaluation.
@triton.jit(do_not_specialize=["write_grad"])
def _arm_cross_entropy_forward_kernel(
    logits,
    stride_n,
    stride_c,
    stride_l,
    target,
    target_stride_n,
    target_stride_l,
    grad,
    arm_params,
    table,
    confidence_out,
    loss_out,
    partials,
    C,
    L,
    num_blocks,
    ignore_index,
    inv_c,
    confidence_scale,
    write_grad,
    ARM: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    image, offsets, in_range = pixel_block(L, BLOCK_P)
    labels, valid = load_target(target, target_stride_n, target_stride_l, image, offsets, in_range, ignore_index)
    base = image * stride_n + offsets * stride_l
    row_max, sum_exp, sum_exp_sq, target_logit = softmax_statistics(
        logits + base, stride_c, labels, in_range, C, BLOCK_P, BLOCK_C
    )
    log_norm, loss, confidence, weight = cross_entropy_terms(
        row_max, sum_exp, sum_exp_sq, target_logit, valid, arm_params, table, inv_c, confidence_scale, ARM
    )
    if ARM != 0:
        tl.store(confidence_out + image * L + offsets, confidence, mask=in_range)
        tl.store(loss_out + image * L + offsets, loss, mask=in_range)
    if write_grad != 0:
        # Unnormalised gradient w (p - onehot), target term in fp32 (cancels in half precision).
        for c_start in range(0, C, BLOCK_C):
            channels, channel_mask = channel_block(c_start, C, BLOCK_C)
            z = load_channels(logits + base, stride_c, channels, channel_mask, in_range)
            p = tl.exp(z - log_norm[:, None])
            g = cross_entropy_gradient(p, channels, labels) * weight[:, None]
            pointers = grad + base[:, None] + channels.to(tl.int64)[None, :] * stride_c
            tl.store(pointers, g.to(grad.dtype.element_ty), mask=in_range[:, None] & channel_mask[None, :])
    block = (image * num_blocks + tl.program_id(1).to(tl.int64)) * 3
    tl.store(partials + block, tl.sum(weight, axis=0))
    tl.store(partials + block + 1, tl.sum(weight * weight, axis=0))
    tl.store(partials + block + 2, tl.sum(weight * loss, axis=0))


@triton.jit
def _rescale_kernel(grad, stride_n, stride_c, stride_l, factor, C, L, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """grad *= factor (a device scalar) in place, computed in fp32."""
    image, offsets, in_range = pixel_block(L, BLOCK_P)
    base = grad + image * stride_n + offsets * stride_l
    scale = tl.load(factor)
    for c_start in range(0, C, BLOCK_C):
        channels, channel_mask = channel_block(c_start, C, BLOCK_C)
        g = load_channels(base, stride_c, channels, channel_mask, in_range) * scale
        pointers = base[:, None] + channels.to(tl.int64)[None, :] * stride_c
        tl.store(pointers, g.to(grad.dtype.element_ty), mask=in_range[:, None] & channel_mask[None, :])


class ArmCrossEntropyFunction(torch.autograd.Function):
    """Fused ARM-weighted cross-entropy on validated, flattened inputs: logits (N, C, L),
    target (N, L), ARM's flat parameters (53,). Without a gradient to compute (no_grad,
    evaluation) the forward kernel skips writing it."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, logits: torch.Tensor, target: torch.Tensor, arm_params: torch.Tensor, arm_mode: int, ignore_index: int
    ) -> torch.Tensor:
        num_images, num_classes, num_pixels = logits.shape
        geometry = LaunchGeometry.for_logits(logits, CE_TILES)
        write_grad = bool(ctx.needs_input_grad[0])
        grad = torch.empty_like(logits) if write_grad else logits.new_empty(1)
        scratch_shape = (1, num_images, num_pixels) if arm_mode != ARM_NONE else (1, 1, 1)
        confidence = torch.empty(scratch_shape, dtype=torch.float32, device=logits.device)
        pixel_loss = torch.empty(scratch_shape, dtype=torch.float32, device=logits.device)
        partials = torch.empty(num_images, geometry.num_blocks, 3, dtype=torch.float32, device=logits.device)
        inv_c, confidence_scale = confidence_constants(num_classes)
        table = forward_table(arm_params, arm_mode)
        _arm_cross_entropy_forward_kernel[(num_images, geometry.num_blocks)](
            logits,
            *logits.stride(),
            target,
            *target.stride(),
            grad,
            arm_params.detach(),
            table,
            confidence,
            pixel_loss,
            partials,
            num_classes,
            num_pixels,
            geometry.num_blocks,
            ignore_index,
            inv_c,
            confidence_scale,
            int(write_grad),
            ARM=arm_mode,
            BLOCK_P=geometry.block_p,
            BLOCK_C=geometry.block_c,
            **geometry.options,
        )
        sums = reduce_partials(partials, (0, 1))  # (sum w, sum w^2, sum w l), float64
        ctx.save_for_backward(grad, target, arm_params.detach(), table, confidence, pixel_loss, sums)
        ctx.geometry = geometry
        ctx.arm_mode = arm_mode
        ctx.ignore_index = ignore_index
        ctx.consumed = False
        return (sums[2] * safe_reciprocal(sums[0])).float()

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        if ctx.consumed:
            raise RuntimeError(
                "triton arm_cross_entropy: backward ran twice (retain_graph); the gradient is rescaled in place"
            )
        ctx.consumed = True
        grad, target, arm_params, table, confidence, pixel_loss, sums = ctx.saved_tensors
        upstream = grad_output.double()
        grad_params = None
        if ctx.needs_input_grad[2] and ctx.arm_mode != ARM_NONE:
            coefficients = arm_backward_coefficients(sums[None, :], upstream)
            grad_params = arm_parameter_gradient(
                confidence, pixel_loss, target, coefficients, arm_params, table, ctx.arm_mode, ctx.ignore_index
            )
        if not ctx.needs_input_grad[0]:  # ARM's own step: logits detached, nothing to rescale
            return None, None, grad_params, None, None
        factor = (upstream * safe_reciprocal(sums[0])).float().reshape(1)
        geometry = ctx.geometry
        _rescale_kernel[(grad.shape[0], geometry.num_blocks)](
            grad,
            *grad.stride(),
            factor,
            grad.shape[1],
            grad.shape[2],
            BLOCK_P=geometry.block_p,
            BLOCK_C=geometry.block_c,
            **geometry.options,
        )
        return grad, None, grad_params, None, None


def arm_cross_entropy(
    logits_per_scale: Sequence[torch.Tensor],
    target: torch.Tensor,
    arm: nn.Module | None,
    config: LossTerms,
) -> torch.Tensor:
    """`functional.arm_cross_entropy` on the Triton backend: one scale, ``LossTerms.cross_entropy``."""
    logits = logits_per_scale[0]
    check_logits_and_target(logits, target)
    check_dtype(logits, "logits")
    check_device(logits, "logits")
    check_class_ids(target, logits.shape[1], config.ignore_index)
    check_arm_classes(arm, logits.shape[1], "logits")
    flat_logits = flatten_logits(logits)
    arm_params = arm_parameter_vector(arm, logits)
    arm_mode = arm_kernel_mode(arm is not None, config)
    return ArmCrossEntropyFunction.apply(flat_logits, flatten_target(target), arm_params, arm_mode, config.ignore_index)
