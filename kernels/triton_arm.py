"""ARM on the GPU (Triton): its table of weights at K nodes (`arm_table_kernel`, the default
`arm_mode`), and the gradient of the 53 parameters from the per-pixel coefficients the loss
kernels leave (through the table's node Jacobian, or exactly through the MLP), summed per block
and reduced in a fixed order (deterministic)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from noisyseg.kernels import contract
from noisyseg.kernels.contract import ARM_NUM_PARAMETERS
from noisyseg.kernels.triton_common import (
    ARM_BLOCK_P,
    ARM_LAUNCH,
    ARM_TABLE,
    ARM_TABLE_BLOCK,
    PARAMETER_SPAN,
    arm_forward,
    arm_forward_intermediates,
    load_target,
    pixel_block,
    reduce_partials,
    safe_reciprocal,
    silu,
    silu_derivative,
    store_terms,
    table_position,
    table_weight,
)


def forward_table(arm_params: torch.Tensor, arm_mode: int) -> torch.Tensor:
    """The table the forward kernels read: ARM's weight at the K nodes on the table path, a
    one-element placeholder otherwise."""
    if arm_mode == ARM_TABLE:
        return arm_table(arm_params.detach())
    return arm_params.new_empty(1)


@triton.jit
def _backprop_hidden_layer(upstream, arm_params, W_OFFSET: tl.constexpr):
    """Gradient w.r.t. a 4x4 layer's input: upstream (P, out) @ weight (out, in)."""
    j = tl.arange(0, contract.ARM_HIDDEN)
    weight = tl.load(arm_params + W_OFFSET + j[:, None] * contract.ARM_HIDDEN + j[None, :])
    return tl.sum(upstream[:, :, None] * weight[None, :, :], axis=1)


@triton.jit
def store_arm_gradient(out, x, upstream, arm_params, rows, ROWS: tl.constexpr):
    """Backpropagate per-pixel upstream gradients (dQ/dw_i, 0 for excluded pixels) through
    ARM; store the block's sum of the 53 parameter gradients at ``out`` or (ROWS) each pixel's
    own 53 at ``out + rows * 53``."""
    j = tl.arange(0, contract.ARM_HIDDEN)
    u1, u2, u3, weight = arm_forward_intermediates(x, arm_params)
    h1 = silu(u1)
    h2 = silu(u2)
    d4 = upstream * weight * (1.0 - weight)
    store_terms(out, d4[:, None] * silu(u3), contract.ARM_W3, rows, ROWS, 2)
    store_terms(out, d4, contract.ARM_B3, rows, ROWS, 1)
    d3 = d4[:, None] * tl.load(arm_params + contract.ARM_W3 + j)[None, :] * silu_derivative(u3)
    store_terms(out, d3[:, :, None] * h2[:, None, :], contract.ARM_W2, rows, ROWS, 3)
    store_terms(out, d3, contract.ARM_B2, rows, ROWS, 2)
    d2 = _backprop_hidden_layer(d3, arm_params, contract.ARM_W2) * silu_derivative(u2)
    store_terms(out, d2[:, :, None] * h1[:, None, :], contract.ARM_W1, rows, ROWS, 3)
    store_terms(out, d2, contract.ARM_B1, rows, ROWS, 2)
    d1 = _backprop_hidden_layer(d2, arm_params, contract.ARM_W1) * silu_derivative(u1)
    store_terms(out, d1 * x[:, None], contract.ARM_W0, rows, ROWS, 2)
    store_terms(out, d1, contract.ARM_B0, rows, ROWS, 2)


@triton.jit
def arm_table_kernel(arm_params, table, jacobian, WITH_JACOBIAN: tl.constexpr, BLOCK: tl.constexpr):
    """ARM's table: its weight at nodes v_k = -1 + 2k / (K - 1), and (WITH_JACOBIAN) each
    node's 53 parameter gradients dw(v_k)/dtheta as a (K, 53) row-major matrix."""
    nodes = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = nodes.to(tl.float32) / contract.ARM_TABLE_SCALE - 1.0
    if WITH_JACOBIAN:
        store_arm_gradient(jacobian, x, tl.full([BLOCK], 1.0, tl.float32), arm_params, nodes.to(tl.int64), True)
    else:
        tl.store(table + nodes, arm_forward(x, arm_params))


@triton.jit
def _store_table_gradient(out, node, fraction, upstream, jacobian, BLOCK_P: tl.constexpr):
    """The block's sum of upstream * ((1 - f) J_k + f J_k+1) over its pixels, J the (K, 53)
    node Jacobian: the K bins of `contract` summed pixel by pixel instead of bin by bin (a
    deterministic scatter into K bins is what a GPU does worst; a per-block sum it does best)."""
    low = upstream * (1.0 - fraction)
    high = upstream * fraction
    rows = node.to(tl.int64)[:, None] * contract.ARM_NUM_PARAMETERS
    for start in tl.static_range(0, PARAMETER_SPAN, 16):
        columns = start + tl.arange(0, 16)
        mask = columns[None, :] < contract.ARM_NUM_PARAMETERS
        left = tl.load(jacobian + rows + columns[None, :], mask=mask, other=0.0)
        right = tl.load(jacobian + rows + contract.ARM_NUM_PARAMETERS + columns[None, :], mask=mask, other=0.0)
        total = tl.sum(low[:, None] * left + high[:, None] * right, axis=0)
        tl.store(out + columns, total, mask=columns < contract.ARM_NUM_PARAMETERS)


@triton.jit
def _arm_upstream(coefficients, scale, loss, weight, valid):
    """dQ/dw_i = coef0 (l_i - w_i coef1) of scale `scale`, 0 where not valid."""
    upstream = tl.load(coefficients + 2 * scale) * (loss - weight * tl.load(coefficients + 2 * scale + 1))
    return tl.where(valid, upstream, 0.0)


@triton.jit
def arm_backward_kernel(
    confidence,
    pixel_loss,
    target,
    target_stride_n,
    target_stride_l,
    coefficients,
    arm_params,
    table,
    jacobian,
    partials,
    L,
    num_blocks,
    ignore_index,
    ARM: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """ARM's parameter gradient from per-pixel scratch (v_hat, loss), one scale per grid row
    ``program_id(2)``: upstream g_i = coef0 * (l_i - w_i * coef1) with coef0 = grad_output /
    sum(w), coef1 = sum(w l) / sum(w^2). Writes one row of 53 partial sums per block: through
    the table's node Jacobian (ARM_TABLE) or ARM's MLP per pixel (ARM_EXACT)."""
    image, offsets, in_range = pixel_block(L, BLOCK_P)
    scale = tl.program_id(2).to(tl.int64)
    num_images = tl.num_programs(0).to(tl.int64)
    _, valid = load_target(target, target_stride_n, target_stride_l, image, offsets, in_range, ignore_index)
    scratch = (scale * num_images + image) * L + offsets
    x = tl.load(confidence + scratch, mask=in_range, other=0.0)
    loss = tl.load(pixel_loss + scratch, mask=in_range, other=0.0)
    row = (scale * num_images + image) * num_blocks + tl.program_id(1).to(tl.int64)
    out = partials + row * contract.ARM_NUM_PARAMETERS
    if ARM == 1:
        node, fraction = table_position(x)
        upstream = _arm_upstream(coefficients, scale, loss, table_weight(node, fraction, table), valid)
        _store_table_gradient(out, node, fraction, upstream, jacobian, BLOCK_P)
    else:
        upstream = _arm_upstream(coefficients, scale, loss, arm_forward(x, arm_params), valid)
        store_arm_gradient(out, x, upstream, arm_params, offsets, False)


def arm_table(arm_params: torch.Tensor, with_jacobian: bool = False) -> torch.Tensor:
    """ARM's weight at the K table nodes (K,), or with_jacobian its (K, 53) node Jacobian."""
    size = contract.ARM_TABLE_SIZE
    shape = (size, ARM_NUM_PARAMETERS) if with_jacobian else (size,)
    out = torch.empty(shape, dtype=torch.float32, device=arm_params.device)
    arm_table_kernel[(triton.cdiv(size, ARM_TABLE_BLOCK),)](
        arm_params, out, out, WITH_JACOBIAN=with_jacobian, BLOCK=ARM_TABLE_BLOCK, **ARM_LAUNCH
    )
    return out


def arm_parameter_gradient(
    confidence: torch.Tensor,
    pixel_loss: torch.Tensor,
    target: torch.Tensor,
    coefficients: torch.Tensor,
    arm_params: torch.Tensor,
    table: torch.Tensor,
    arm_mode: int,
    ignore_index: int,
) -> torch.Tensor:
    """Launch `arm_backward_kernel` over scratch of shape (S, N, L) and reduce the partials.

    ``coefficients`` (S, 2) fp32 holds (grad_output * loss weight / sum(w), sum(w l) / sum(w^2))
    per scale. Returns the 53-vector gradient in fp32."""
    num_scales, num_images, num_pixels = confidence.shape
    num_blocks = triton.cdiv(num_pixels, ARM_BLOCK_P)
    jacobian = arm_table(arm_params, with_jacobian=True) if arm_mode == ARM_TABLE else table
    partials = torch.empty(
        num_scales * num_images * num_blocks, ARM_NUM_PARAMETERS, dtype=torch.float32, device=confidence.device
    )
    arm_backward_kernel[(num_images, num_blocks, num_scales)](
        confidence,
        pixel_loss,
        target,
        target.stride(0),
        target.stride(1),
        coefficients.float().contiguous(),
        arm_params,
        table,
        jacobian,
        partials,
        num_pixels,
        num_blocks,
        ignore_index,
        ARM=arm_mode,
        BLOCK_P=ARM_BLOCK_P,
        **ARM_LAUNCH,
    )
    return reduce_partials(partials, (0,)).float()


def arm_backward_coefficients(weight_sums: torch.Tensor, upstream_scale: torch.Tensor) -> torch.Tensor:
    """(S, 2) coefficients for `arm_parameter_gradient` from per-scale sums (S, 3) of
    (w, w^2, w l): (upstream_scale / sum w, sum w l / sum w^2), zero where a scale is empty."""
    inverse_sum = safe_reciprocal(weight_sums[:, 0])
    ratio = weight_sums[:, 2] * safe_reciprocal(weight_sums[:, 1])
    return torch.stack([upstream_scale * inverse_sum, ratio], dim=1).float()
