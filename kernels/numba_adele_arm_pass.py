"""The fused CPU pass of `numba_adele_arm` (numba): per block of pixels of one image, the
softmax of every scale, the per-pixel cross-entropy, ARM's confidence and weight, the KL terms
against q = mean_k p_k and, optionally, the gradient of every logit. The host scheduler and the
autograd Function that call it are in `numba_adele_arm`."""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import prange

from noisyseg.kernels.contract import ARM_HIDDEN, ARM_NUM_PARAMETERS
from noisyseg.kernels.numba_arm import (
    block_arm_backward,
    block_arm_forward,
    block_table_bins,
    block_table_weights,
    dot,
    total_of,
    valid_dot,
)
from noisyseg.kernels.numba_common import (
    HELPER_JIT,
    PARALLEL_JIT,
    block_span,
    fast_exp,
    fast_log,
    flush_denormals,
    prefetch_row,
    restore_denormals,
    stream_fence,
    stream_row,
)

# The rho mask of the consistency term: none, per image (the paper), per pixel.
MASK_OFF, MASK_IMAGE, MASK_PIXEL = 0, 1, 2

# Below this sum of p_k (near the bottom of fp32's normal range) log q uses a stable logsumexp.
_TINY = np.float32(1e-30)


@numba.njit(**HELPER_JIT)
def _block_softmax(z, n, start, width, probs, peak, total, sum_p2, lse):
    """The softmax per class into `probs` (C x B), and per pixel sum_c p_c^2 and the logsumexp
    (`total` is scratch). Every later step reads p itself: normalised once here, not by a
    multiply and a load of 1/total in each of the four loops that read it."""
    num_classes = z.shape[1]
    end = start + width
    first = z[n, 0, start:end]
    for j in range(width):
        peak[j] = first[j]
    for c in range(1, num_classes):
        logit = z[n, c, start:end]
        for j in range(width):
            peak[j] = max(peak[j], logit[j])
    for j in range(width):
        total[j] = 0.0
        sum_p2[j] = 0.0
    for c in range(num_classes):
        row = probs[c]
        logit = z[n, c, start:end]
        for j in range(width):
            e = fast_exp(logit[j] - peak[j])
            row[j] = e
            total[j] += e
            sum_p2[j] += e * e
    for j in range(width):
        lse[j] = fast_log(total[j]) + peak[j]  # total >= 1: a positive normal number
        inv = np.float32(1.0) / total[j]
        total[j] = inv
        sum_p2[j] *= inv * inv
    for c in range(num_classes):
        row = probs[c]
        for j in range(width):
            row[j] *= total[j]


@numba.njit(**HELPER_JIT)
def _block_log_q(logits, num_scales, n, start, width, probs, lse, log_q, pixel_max_q, underflow):
    """log q per class (C x B) for q = mean_k p_k, and max_c q per pixel."""
    num_classes = probs.shape[1]
    log_scales = np.float32(math.log(num_scales))
    inv_scales = np.float32(1.0 / num_scales)
    for j in range(width):
        pixel_max_q[j] = 0.0
    for c in range(num_classes):
        row = log_q[c]
        for j in range(width):
            row[j] = probs[0, c, j]
        for k in range(1, num_scales):
            for j in range(width):
                row[j] += probs[k, c, j]
        underflows = 0
        for j in range(width):
            pixel_max_q[j] = max(pixel_max_q[j], row[j] * inv_scales)
            underflow[j] = row[j] <= _TINY
            underflows += underflow[j]
            row[j] = fast_log(max(row[j], _TINY)) - log_scales
        # Skipped unless needed: the scalar loop over every pixel cost up to 5% of the pass even
        # when no pixel underflowed (docs/benchmarks.md, "Eleventh session").
        for j in range(width if underflows > 0 else 0):
            if underflow[j]:  # every p_k underflowed: logsumexp of the log-probabilities
                row[j] = _stable_log_mean(logits, num_scales, n, c, start + j, j, lse)


@numba.njit(fastmath=False, cache=True)
def _stable_log_mean(logits, num_scales, n, c, pixel, j, lse):
    top = np.float32(-np.inf)
    for k in range(num_scales):
        top = max(top, logits[k][n, c, pixel] - lse[k, j])
    acc = np.float32(0.0)
    for k in range(num_scales):
        acc += np.exp(logits[k][n, c, pixel] - lse[k, j] - top)
    return top + np.log(acc) - np.float32(math.log(num_scales))


@numba.njit(**HELPER_JIT)
def _block_kl(logits, num_scales, n, start, width, probs, lse, log_q, kl):
    """KL(p_k || q) per scale and pixel into `kl` (S x B); a term with p = 0 adds 0."""
    num_classes = probs.shape[1]
    for k in range(num_scales):
        z = logits[k]
        for j in range(width):
            kl[k, j] = 0.0
        for c in range(num_classes):
            logit = z[n, c, start : start + width]
            for j in range(width):
                p = probs[k, c, j]
                kl[k, j] += p * (logit[j] - lse[k, j] - log_q[c, j])


@numba.njit(**PARALLEL_JIT)
def fused_pass(
    logits,  # tuple of arrays (N, C, L) float32, C-contiguous; the first num_scales are used
    num_scales,
    target,  # (N, L) int64
    ignore_index,
    use_ce,
    arm_params,  # (53,) float32; ignored unless use_arm
    use_arm,
    mask_mode,  # MASK_OFF / MASK_IMAGE / MASK_PIXEL
    rho,
    block,
    chunks,  # parallel work items, each a run of consecutive blocks with its own buffers
    write_grad,
    ce_grad_scale,  # (S,) float32: factor on w_i (p - onehot) per scale
    arm_upstream,  # (S, 2) float64: dQ/dw_i = a_k l_i - b_k w_i
    kl_grad_scale,  # (N,) float32: factor on the KL gradient per image
    grad,  # S arrays (N, C, L) float32 (a tuple like logits), written when write_grad
    ce_partials,  # (blocks, S, 3) float64: sum w, sum w^2, sum w l
    kl_partials,  # (blocks,) float64: sum of KL over valid (pixel mask: kept) pixels
    max_q_partials,  # (blocks,) float32: max over valid pixels of max_c q
    arm_partials,  # (blocks, 53) float64: ARM's gradient, written when write_grad and use_arm
    label_partials,  # (blocks, 2) int64: targets neither ignored nor in [0, C); valid pixels
    defer_ce_scale,  # one scale, no KL: ARM's gradient left to arm_gradient_pass
    scratch_confidence,  # (N, L) float32, written when defer_ce_scale and use_arm
    scratch_loss,  # (N, L) float32, likewise (0 at ignored pixels)
    arm_table,  # (K,) float32: ARM's weight at the table's nodes; used when use_arm and table
    table,  # ARM's weight from arm_table (its gradient from arm_bins) instead of the MLP
    arm_bins,  # (chunks, S, K, 4) float64: per table interval, `block_table_bins`; when table and collect_bins
    collect_bins,
    split_kl_grad,  # write the KL part of the gradient to kl_grad instead of adding it to grad
    kl_grad,  # like grad, written when write_grad and split_kl_grad
):
    num_images, num_classes, num_pixels = logits[0].shape
    tiles = (num_pixels + block - 1) // block
    confidence_gain = np.float32(2.0 * num_classes / max(num_classes - 1, 1))
    inv_classes = np.float32(1.0 / num_classes)
    blocks = num_images * tiles
    for chunk in prange(chunks):
        saved_mode = flush_denormals()  # on this thread, until the chunk is done (numba_common)
        # Per-block buffers, allocated once per chunk of consecutive blocks: an allocation per
        # block cost a malloc/free of up to ~100 KiB each time, an mmap/munmap when glibc maps it.
        probs = np.empty((num_scales, num_classes, block), np.float32)
        peak = np.empty(block, np.float32)
        total = np.empty(block, np.float32)
        sum_p2 = np.empty((num_scales, block), np.float32)
        lse = np.empty((num_scales, block), np.float32)
        labels = np.empty(block, np.int32)  # int32 like the float lanes it is compared beside
        valid = np.empty(block, np.bool_)
        ce_weightf = np.empty((num_scales, block), np.float32)
        node = np.empty(block, np.int32)
        fraction = np.empty(block, np.float32)
        loss = np.zeros(block, np.float32)
        masked = np.empty(block, np.float32)
        weight = np.ones(block, np.float32)  # stays 1 without ARM
        confidence = np.empty(block, np.float32)
        upstream = np.empty(block, np.float32)
        pre = np.empty((3, ARM_HIDDEN, block), np.float32)
        sig = np.empty((3, ARM_HIDDEN, block), np.float32)
        delta = np.empty((ARM_HIDDEN, block), np.float32)
        back = np.empty((ARM_HIDDEN, block), np.float32)
        arm_grad = np.empty(ARM_NUM_PARAMETERS, np.float64)
        kl_weightf = np.empty(block, np.float32)
        log_q = np.empty((num_classes, block), np.float32)
        kl = np.empty((num_scales, block), np.float32)
        pixel_max_q = np.empty(block, np.float32)
        underflow = np.empty(block, np.bool_)
        staging = np.empty(block, np.float32)
        bin_rows = np.empty(4 * block, np.float32)
        last = (chunk + 1) * blocks // chunks
        for index in range(chunk * blocks // chunks, last):
            n, start, width = block_span(index, tiles, block, num_pixels)
            end = start + width
            if index + 1 < last:  # the next block's logits, read from its start (numba_common)
                n_next, start_next, width_next = block_span(index + 1, tiles, block, num_pixels)
                for k in range(num_scales):
                    for c in range(num_classes):
                        prefetch_row(logits[k][n_next, c, start_next : start_next + width_next], width_next)
            bad_labels = 0
            valid_pixels = 0
            target_row = target[n, start:end]
            for j in range(width):
                label = target_row[j]
                in_range = label >= 0 and label < num_classes
                bad_labels += label != ignore_index and not in_range
                valid[j] = in_range and label != ignore_index
                valid_pixels += valid[j]
                labels[j] = np.int32(label) if valid[j] else np.int32(-1)
            label_partials[index, 0] = bad_labels
            label_partials[index, 1] = valid_pixels
            for k in range(num_scales):
                _block_softmax(logits[k], n, start, width, probs[k], peak, total, sum_p2[k], lse[k])

            # Cross-entropy and ARM weights: ce_weightf[k, j] multiplies (p - onehot) in the gradient.
            ce_weightf[:] = 0.0
            if use_ce:
                arm_grad[:] = 0.0
                for k in range(num_scales):
                    image = logits[k][n]
                    for j in range(width):  # no branch: class 0 stands in at ignored pixels
                        loss[j] = lse[k, j] - image[max(labels[j], 0), start + j]
                    if use_arm:
                        for j in range(width):
                            confidence[j] = confidence_gain * (sum_p2[k, j] - inv_classes) - np.float32(1.0)
                        if table:
                            block_table_weights(arm_table, confidence, width, weight, node, fraction)
                            if collect_bins:
                                block_table_bins(
                                    arm_bins[chunk, k], node, fraction, loss, weight, valid, width, bin_rows
                                )
                        else:
                            block_arm_forward(arm_params, confidence, width, pre, sig, weight)
                    # float32 sums over one block (at most MAX_BLOCK pixels), vectorised; the
                    # blocks' partials add up in float64.
                    for j in range(width):
                        masked[j] = weight[j] if valid[j] else np.float32(0.0)
                        ce_weightf[k, j] = ce_grad_scale[k] * masked[j]
                    ce_partials[index, k, 0] = total_of(masked, width)
                    ce_partials[index, k, 1] = dot(masked, masked, width)
                    # The stand-in's loss may be inf (a -inf logit): selected out, not
                    # multiplied by 0 (NaN). A select in the loss loop above cost ARM-CE 3-4%.
                    ce_partials[index, k, 2] = valid_dot(masked, loss, valid, width)
                    if use_arm and defer_ce_scale:  # ARM's gradient comes later, from this scratch
                        confidence_row = scratch_confidence[n, start:end]
                        loss_row = scratch_loss[n, start:end]
                        for j in range(width):
                            confidence_row[j] = confidence[j]
                            loss_row[j] = loss[j] if valid[j] else np.float32(0.0)
                    elif use_arm and write_grad and not table:
                        for j in range(width):
                            gain = arm_upstream[k, 0] * loss[j] - arm_upstream[k, 1] * weight[j]
                            upstream[j] = gain if valid[j] else np.float32(0.0)
                        block_arm_backward(
                            arm_params,
                            confidence,
                            width,
                            pre,
                            sig,
                            weight,
                            upstream,
                            arm_grad,
                            delta,
                            back,
                        )
                if use_arm and write_grad and not defer_ce_scale and not table:
                    arm_partials[index, :] = arm_grad

            # Multiscale consistency: kl_weightf[j] multiplies the KL gradient of pixel j (every
            # pixel's is written below; without the term no gradient loop reads it).
            if mask_mode != MASK_OFF:
                _block_log_q(
                    logits,
                    num_scales,
                    n,
                    start,
                    width,
                    probs,
                    lse,
                    log_q,
                    pixel_max_q,
                    underflow,
                )
                _block_kl(logits, num_scales, n, start, width, probs, lse, log_q, kl)
                # The kept pixels' KL as float32 sums over one block, vectorised like the CE sums.
                for j in range(width):
                    keep = valid[j] and (mask_mode != MASK_PIXEL or pixel_max_q[j] > rho)
                    masked[j] = np.float32(1.0) if keep else np.float32(0.0)
                    kl_weightf[j] = kl_grad_scale[n] * masked[j]
                kl_sum = 0.0
                for k in range(num_scales):
                    kl_sum += dot(masked, kl[k], width)
                kl_partials[index] = kl_sum
                max_q = np.float32(-np.inf)
                for j in range(width):
                    max_q = max(max_q, pixel_max_q[j] if valid[j] else np.float32(-np.inf))
                max_q_partials[index] = max_q

            # Two loops, not one with a branch on split_kl_grad inside: the merged loop took the
            # no-ARM three-scale loss from 29 to 45 ms at C = 5 (from 209 to 309 ms at C = 19).
            # Every gradient row is computed into `staging` and streamed out (numba_common): no
            # pass reads a gradient row again before its end.
            if write_grad and split_kl_grad:
                for k in range(num_scales):
                    z = logits[k]
                    for c in range(num_classes):
                        logit = z[n, c, start:end]
                        grad_row = grad[k][n, c, start:end]
                        kl_row = kl_grad[k][n, c, start:end]
                        # One loop per buffer: the loop writing both took the three-scale loss
                        # at C = 5 from 1.29-1.37x to 1.41-1.63x plain CE.
                        p_row, ce_w, lse_k, kl_k, lq = probs[k, c], ce_weightf[k], lse[k], kl[k], log_q[c]
                        label = np.int32(c)
                        for j in range(width):
                            onehot = np.float32(1.0) if labels[j] == label else np.float32(0.0)
                            staging[j] = ce_w[j] * (p_row[j] - onehot)
                        stream_row(grad_row, staging, width)
                        for j in range(width):
                            staging[j] = kl_weightf[j] * p_row[j] * (logit[j] - lse_k[j] - lq[j] - kl_k[j])
                        stream_row(kl_row, staging, width)
            elif write_grad:
                for k in range(num_scales):
                    z = logits[k]
                    for c in range(num_classes):
                        logit = z[n, c, start:end]
                        grad_row = grad[k][n, c, start:end]
                        label = np.int32(c)
                        for j in range(width):
                            p = probs[k, c, j]
                            onehot = np.float32(1.0) if labels[j] == label else np.float32(0.0)
                            g = ce_weightf[k, j] * (p - onehot)
                            if mask_mode != MASK_OFF:
                                log_p = logit[j] - lse[k, j]
                                g += kl_weightf[j] * p * (log_p - log_q[c, j] - kl[k, j])
                            staging[j] = g
                        stream_row(grad_row, staging, width)
        stream_fence()
        restore_denormals(saved_mode)


@numba.njit(**PARALLEL_JIT)
def combine_split_gradient(num_scales, grad, kl_grad, ce_factor, kl_factor):
    """grad[k][n] = ce_factor[k] grad[k][n] + kl_factor[n] kl_grad[k][n] for the first
    num_scales arrays of each tuple, in place: the two parts of a gradient written apart by
    `fused_pass` (split_kl_grad), each with its own normaliser."""
    num_images, num_classes = grad[0].shape[0], grad[0].shape[1]
    for slab in prange(num_scales * num_images):
        saved_mode = flush_denormals()
        k, n = slab // num_images, slab % num_images
        ce, kl = ce_factor[k], kl_factor[n]
        for c in range(num_classes):
            row = grad[k][n, c]
            kl_row = kl_grad[k][n, c]
            for j in range(row.shape[0]):
                row[j] = ce * row[j] + kl * kl_row[j]
        restore_denormals(saved_mode)
