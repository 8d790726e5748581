"""ARM's MLP on the numba backend, over a block of pixels: forward, backward, and the pass that
back-propagates ARM from per-pixel scratch (confidence, loss) once the weight sums are known
(the exact path); and ARM's table (`contract`, the default): the MLP at the K nodes, the
interpolated weights of a block, the bins its pixels accumulate, and ARM's gradient from them.

The parameters are the flat vector of `contract.pack_arm_parameters`, read at the offsets
`contract.ARM_W0` ... `contract.ARM_B3`.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange

from noisyseg.kernels.contract import (
    ARM_B0,
    ARM_B1,
    ARM_B2,
    ARM_B3,
    ARM_HIDDEN,
    ARM_NUM_PARAMETERS,
    ARM_TABLE_SCALE,
    ARM_TABLE_SIZE,
    ARM_W0,
    ARM_W1,
    ARM_W2,
    ARM_W3,
)
from noisyseg.kernels.numba_common import (
    HELPER_JIT,
    PARALLEL_JIT,
    add_widened_float32x4,
    block_span,
    fast_sigmoid,
    flush_denormals,
    restore_denormals,
)

_TABLE_SCALE = np.float32(ARM_TABLE_SCALE)
_TABLE_TOP = np.float32(ARM_TABLE_SIZE - 1)

# ---------------------------------------------------------------------------------------------
# ARM's MLP over a block of pixels: 1 -> 4 -> 4 -> 4 -> 1, Swish between layers, sigmoid last.
# pre[l, o, j] is hidden layer l's pre-activation, sig[l, o, j] its sigmoid (Swish = pre * sig).


@numba.njit(**HELPER_JIT)
def block_arm_forward(params, confidence, width, pre, sig, weight):
    for o in range(ARM_HIDDEN):
        for j in range(width):
            value = params[ARM_W0 + o] * confidence[j] + params[ARM_B0 + o]
            pre[0, o, j] = value
            sig[0, o, j] = fast_sigmoid(value)
    for layer, w_at, b_at in ((1, ARM_W1, ARM_B1), (2, ARM_W2, ARM_B2)):
        for o in range(ARM_HIDDEN):
            for j in range(width):
                pre[layer, o, j] = params[b_at + o]
            for i in range(ARM_HIDDEN):
                coeff = params[w_at + o * ARM_HIDDEN + i]
                for j in range(width):
                    pre[layer, o, j] += coeff * pre[layer - 1, i, j] * sig[layer - 1, i, j]
            for j in range(width):
                sig[layer, o, j] = fast_sigmoid(pre[layer, o, j])
    for j in range(width):
        weight[j] = params[ARM_B3]
    for i in range(ARM_HIDDEN):
        coeff = params[ARM_W3 + i]
        for j in range(width):
            weight[j] += coeff * pre[2, i, j] * sig[2, i, j]
    for j in range(width):
        weight[j] = fast_sigmoid(weight[j])


# Reductions over a block's pixels: float32 running sums that LLVM may reassociate (fastmath
# "reassoc" on these helpers alone), so they vectorise into per-lane partial sums: 2.5x faster
# than the pairwise folds of a scratch buffer they replace. The compiled order is fixed, so the
# sums are deterministic from run to run on a machine (the last bits may differ between vector
# widths).
_REDUCE_JIT = {**HELPER_JIT, "fastmath": {"reassoc"}}


@numba.njit(**_REDUCE_JIT)
def _dot3(a, b, c, width):
    """sum_j a[j] b[j] c[j]."""
    total = np.float32(0.0)
    for j in range(width):
        total += a[j] * b[j] * c[j]
    return total


@numba.njit(**_REDUCE_JIT)
def dot(a, b, width):
    """sum_j a[j] b[j]."""
    total = np.float32(0.0)
    for j in range(width):
        total += a[j] * b[j]
    return total


@numba.njit(**_REDUCE_JIT)
def valid_dot(a, b, valid, width):
    """sum_j a[j] b[j] over the j where valid[j]: the others' b may be inf or NaN."""
    total = np.float32(0.0)
    for j in range(width):
        total += a[j] * b[j] if valid[j] else np.float32(0.0)
    return total


@numba.njit(**_REDUCE_JIT)
def total_of(a, width):
    """sum_j a[j]."""
    total = np.float32(0.0)
    for j in range(width):
        total += a[j]
    return total


@numba.njit(**HELPER_JIT)
def _silu_slope_times(values, pre, sig, width):
    """values *= d Swish(pre) / d pre = s (1 + pre (1 - s))."""
    for j in range(width):
        s = sig[j]
        values[j] *= s * (np.float32(1.0) + pre[j] * (np.float32(1.0) - s))


@numba.njit(**HELPER_JIT)
def block_arm_backward(params, confidence, width, pre, sig, weight, upstream, grad, delta, back):
    """Add sum_j upstream[j] * d weight[j] / d params to `grad` (53, float64).

    delta[o] holds dL/d(pre-activation) of the layer being processed; `back` the layer below.
    """
    out = back[0]
    for j in range(width):
        out[j] = upstream[j] * weight[j] * (np.float32(1.0) - weight[j])
    grad[ARM_B3] += total_of(out, width)
    for i in range(ARM_HIDDEN):
        grad[ARM_W3 + i] += _dot3(out, pre[2, i], sig[2, i], width)
    for i in range(ARM_HIDDEN):
        coeff = params[ARM_W3 + i]
        for j in range(width):
            delta[i, j] = out[j] * coeff
        _silu_slope_times(delta[i], pre[2, i], sig[2, i], width)
    for layer, w_at, b_at in ((2, ARM_W2, ARM_B2), (1, ARM_W1, ARM_B1)):
        for o in range(ARM_HIDDEN):
            grad[b_at + o] += total_of(delta[o], width)
            for i in range(ARM_HIDDEN):
                grad[w_at + o * ARM_HIDDEN + i] += _dot3(delta[o], pre[layer - 1, i], sig[layer - 1, i], width)
        for i in range(ARM_HIDDEN):
            for j in range(width):
                back[i, j] = 0.0
            for o in range(ARM_HIDDEN):
                coeff = params[w_at + o * ARM_HIDDEN + i]
                for j in range(width):
                    back[i, j] += delta[o, j] * coeff
            _silu_slope_times(back[i], pre[layer - 1, i], sig[layer - 1, i], width)
        for i in range(ARM_HIDDEN):
            for j in range(width):
                delta[i, j] = back[i, j]
    for o in range(ARM_HIDDEN):
        grad[ARM_W0 + o] += dot(delta[o], confidence, width)
        grad[ARM_B0 + o] += total_of(delta[o], width)


@numba.njit(**PARALLEL_JIT)
def arm_gradient_pass(
    confidence,
    loss,
    target,
    ignore_index,
    arm_params,
    upstream_loss,
    upstream_weight,
    block,
    chunks,
    arm_partials,
    grad,
    grad_scale,
):
    """ARM's gradient from per-pixel scratch (confidence, loss) once the weight sums are known:
    sum_i (a l_i - b w_i) dw_i/dparams over the valid pixels, one partial per block. The same
    loop applies the now known 1/sum(w) to the logit gradient `grad` (N, C, L) in place."""
    num_images, num_pixels = confidence.shape
    tiles = (num_pixels + block - 1) // block
    blocks = num_images * tiles
    for chunk in prange(chunks):
        saved_mode = flush_denormals()
        pre = np.empty((3, ARM_HIDDEN, block), np.float32)
        sig = np.empty((3, ARM_HIDDEN, block), np.float32)
        weight = np.empty(block, np.float32)
        upstream = np.empty(block, np.float32)
        delta = np.empty((ARM_HIDDEN, block), np.float32)
        back = np.empty((ARM_HIDDEN, block), np.float32)
        arm_grad = np.empty(ARM_NUM_PARAMETERS, np.float64)
        for index in range(chunk * blocks // chunks, (chunk + 1) * blocks // chunks):
            n, start, width = block_span(index, tiles, block, num_pixels)
            arm_grad[:] = 0.0
            pixels = confidence[n, start : start + width]
            loss_row = loss[n, start : start + width]
            target_row = target[n, start : start + width]
            block_arm_forward(arm_params, pixels, width, pre, sig, weight)
            for j in range(width):
                gain = upstream_loss * loss_row[j] - upstream_weight * weight[j]
                upstream[j] = gain if target_row[j] != ignore_index else np.float32(0.0)
            block_arm_backward(arm_params, pixels, width, pre, sig, weight, upstream, arm_grad, delta, back)
            arm_partials[index, :] = arm_grad
            for c in range(grad.shape[1]):
                grad_row = grad[n, c, start : start + width]
                for j in range(width):
                    grad_row[j] *= grad_scale
        restore_denormals(saved_mode)


# ---------------------------------------------------------------------------------------------
# ARM's table: w at K nodes, linear interpolation per pixel, the per-pixel upstream gradients
# accumulated into K bins, and one MLP backward over the nodes (contract, arm_mode "table").


@numba.njit(**HELPER_JIT)
def _table_nodes(indices, count):
    """The confidences of nodes ``indices[:count]`` (v_k = -1 + 2k / (K - 1))."""
    nodes = np.empty(count, np.float32)
    for j in range(count):
        nodes[j] = np.float32(indices[j]) / _TABLE_SCALE - np.float32(1.0)
    return nodes


@numba.njit(**HELPER_JIT)
def arm_table_forward(params):
    """ARM's weight at the K table nodes, (K,) float32, and the MLP's hidden pre-activations and
    sigmoids there, (3, 4, K) each, which `arm_table_gradient` back-propagates through."""
    nodes = _table_nodes(np.arange(ARM_TABLE_SIZE), ARM_TABLE_SIZE)
    pre = np.empty((3, ARM_HIDDEN, ARM_TABLE_SIZE), np.float32)
    sig = np.empty((3, ARM_HIDDEN, ARM_TABLE_SIZE), np.float32)
    table = np.empty(ARM_TABLE_SIZE, np.float32)
    block_arm_forward(params, nodes, ARM_TABLE_SIZE, pre, sig, table)
    return table, pre, sig


@numba.njit(**HELPER_JIT)
def block_table_weights(table, confidence, width, weight, node, fraction):
    """Each pixel's weight interpolated in ARM's table, with its node k and fraction f
    (`contract.arm_table_position`: k = floor(t), f = t - k, t = (v + 1) (K - 1) / 2 clamped).
    Two loops: the places vectorise (int32 nodes), the table reads are scalar (LLVM does not
    gather on this target); in one loop all of it stayed scalar, twice the time."""
    for j in range(width):
        position = min(max((confidence[j] + np.float32(1.0)) * _TABLE_SCALE, np.float32(0.0)), _TABLE_TOP)
        k = min(np.int32(position), np.int32(ARM_TABLE_SIZE - 2))  # position >= 0: truncation is floor
        node[j] = k
        fraction[j] = position - np.float32(k)
    for j in range(width):
        k = node[j]
        low = table[k]
        weight[j] = low + fraction[j] * (table[k + 1] - low)


@numba.njit(**HELPER_JIT)
def block_table_bins(bins, node, fraction, loss, weight, valid, width, rows):
    """Add the valid pixels' sums to the bins (copies x K, 4) of their interval k (between nodes
    k and k + 1): loss, weight, f loss and f weight. ARM's upstream gradient at a pixel is a l - b w,
    with a and b known only once every pixel was seen; `node_sums` turns the intervals' sums into
    the nodes' (1 - f at node k, f at node k + 1).

    A pixel's four sums are one aligned 32-byte row: one 256-bit read-modify-write that never
    straddles a cache line, and pixels in neighbouring intervals touch disjoint rows. The nodes'
    layout (bins[k] and bins[k + 1] of two sums each, the 256-bit add at 16-byte steps) made
    pixels in neighbouring intervals overlap in part, which the CPU cannot forward from a pending
    store: 10.5-11.5 against 3.8-4.2 ns a pixel when consecutive pixels walk up the table, 4.6-5.9
    against 3.7-4.6 along a smooth image, 3.0-3.4 against 2.9-3.1 at random (docs/benchmarks.md,
    "Eleventh session").

    With one set of bins, consecutive pixels in one interval (a confident network's pixels share
    the last) make each add wait for the one before it through memory; with two (1 or 2 copies,
    read from the shape), even and odd pixels add to their own copy and the chain halves.
    `_FusedCall._bins` gives ARM-CE two and the multiscale losses one (docs/benchmarks.md,
    "Thirteenth session").

    The four float32 values of every pixel are first written to `rows` (4 x width, float32; zeros
    for ignored pixels) in a loop that vectorises; the scattered loop then only widens each row
    to float64 and adds it (`add_widened_float32x4`). The nodes must be at most K - 2
    (`block_table_weights` clamps them): the add is not bounds-checked."""
    for j in range(width):  # a select, not a product with 0: an ignored pixel's loss may be inf
        loss_j = loss[j] if valid[j] else np.float32(0.0)
        weight_j = weight[j] if valid[j] else np.float32(0.0)
        rows[4 * j] = loss_j
        rows[4 * j + 1] = weight_j
        rows[4 * j + 2] = fraction[j] * loss_j
        rows[4 * j + 3] = fraction[j] * weight_j
    flat = bins.reshape(-1)
    odd_copy = 4 * ARM_TABLE_SIZE * (bins.shape[0] // ARM_TABLE_SIZE - 1)  # 0 with one copy
    for j in range(width):
        add_widened_float32x4(flat, 4 * node[j] + (j & 1) * odd_copy, rows, 4 * j)


@numba.njit(**HELPER_JIT)
def node_sums(bins):
    """The nodes' (loss, weight) sums (K, 2) from the intervals' bins (copies x K, 4) of
    `block_table_bins`, the copies added: node k gets (1 - f) of its interval's pixels and f of
    the interval below's."""
    sums = np.zeros((ARM_TABLE_SIZE, 2))
    for copy in range(bins.shape[0] // ARM_TABLE_SIZE):
        rows = bins[copy * ARM_TABLE_SIZE : (copy + 1) * ARM_TABLE_SIZE]
        for column in range(2):
            below = 0.0
            for k in range(ARM_TABLE_SIZE):
                sums[k, column] += rows[k, column] - rows[k, column + 2] + below
                below = rows[k, column + 2]
    return sums


@numba.njit(**HELPER_JIT)
def arm_table_gradient(params, table, pre, sig, bins, arm_upstream):
    """ARM's 53 parameter gradients from the interval bins (chunks, S, copies x K, 4) of every scale:
    sum_k u_k dw(v_k)/dparams with u_k = sum_s a_s L_sk - b_s W_sk, (L_sk, W_sk) the node sums
    of `node_sums` (summed over chunks) and (a_s, b_s) = arm_upstream[s]. The MLP's backward runs
    over the nodes some pixel reached only, from the activations `arm_table_forward` returned
    with `table` (not a second forward: 0.1 ms a call, 2-3% of a plain CE at C = 5)."""
    chunks, num_scales = bins.shape[0], bins.shape[1]
    upstream_all = np.zeros(ARM_TABLE_SIZE)
    for chunk in range(chunks):
        for k in range(num_scales):
            part = node_sums(bins[chunk, k])
            for node in range(ARM_TABLE_SIZE):
                upstream_all[node] += arm_upstream[k, 0] * part[node, 0] - arm_upstream[k, 1] * part[node, 1]
    indices = np.empty(ARM_TABLE_SIZE, np.int64)
    count = 0
    for node in range(ARM_TABLE_SIZE):
        if upstream_all[node] != 0.0:
            indices[count] = node
            count += 1
    grad = np.zeros(ARM_NUM_PARAMETERS)
    if count == 0:
        return grad
    nodes = _table_nodes(indices, count)
    upstream = np.empty(count, np.float32)
    weight = np.empty(count, np.float32)
    reached_pre = np.empty((3, ARM_HIDDEN, count), np.float32)
    reached_sig = np.empty((3, ARM_HIDDEN, count), np.float32)
    for j in range(count):
        upstream[j] = upstream_all[indices[j]]
        weight[j] = table[indices[j]]
    for layer in range(3):
        for o in range(ARM_HIDDEN):
            pre_row, sig_row = pre[layer, o], sig[layer, o]
            reached_pre_row, reached_sig_row = reached_pre[layer, o], reached_sig[layer, o]
            for j in range(count):
                reached_pre_row[j] = pre_row[indices[j]]
                reached_sig_row[j] = sig_row[indices[j]]
    delta = np.empty((ARM_HIDDEN, count), np.float32)
    back = np.empty((ARM_HIDDEN, count), np.float32)
    block_arm_backward(params, nodes, count, reached_pre, reached_sig, weight, upstream, grad, delta, back)
    return grad
