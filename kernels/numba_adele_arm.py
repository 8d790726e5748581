"""Fused CPU loss kernels (numba): ARM-weighted cross-entropy, multiscale consistency and the
combined ADELE+ARM loss, forward and backward, without softmax/weight/loss maps of logits size
(one gradient-sized buffer besides the gradient on one schedule, below).
This module holds the fused pass, the host scheduler and the autograd Function; ARM's MLP is in
`numba_arm`, threads, exp/log and block scheduling in `numba_common`, and what the loss is
(`contract.LossTerms`) comes from `noisyseg.kernels.functional`.

One kernel, `fused_pass`, serves all three losses. It works on blocks of pixels of one image
(a block never straddles two images), one run of consecutive blocks per thread, and, per
block, computes the softmax of every
scale in fp32 (the exponentials kept in a block-local buffer), the per-pixel cross-entropy,
ARM's confidence and weight, the KL terms against q = mean_k p_k, and optionally writes the
gradient of every logit. Sums over pixels are written per block and reduced in block order
(deterministic whatever the thread count, no atomics). Pixel loops index row views
(`z[n, c, start:end][j]`): numba's negative-index handling on `z[n, c, start + j]` kept LLVM
from vectorising them.

The loss normalisers (sum of ARM weights per scale, which images pass the rho mask) are only
known after every pixel was seen. The schedules, picked per call by `_FusedCall.run`:

* normalisers known up front (no ARM; per-pixel or no rho mask): one pass writes the final
  gradient;
* ARM from its table (`contract`, the default): each pixel's weight is read from the table and
  its loss and weight go into K bins, from which ARM's gradient comes after the pass (one MLP
  backward over the nodes). Without the consistency term one pass writes w_i (p - onehot) and
  1/sum(w) is applied in backward with grad_output;
* the consistency term with ARM's table (a CE and a KL normaliser, per scale and per image,
  cannot share one deferred scale): one pass writes the CE and the KL parts of the gradient to
  two buffers, and a light pass (`combine_split_gradient`) scales and adds them. The second
  buffer, of the gradient's size, is the memory traded for reading the logits and computing
  every softmax once instead of twice (`docs/benchmarks.md`);
* the consistency term without ARM under the per-image rho mask: one pass writes the final
  gradient assuming the mask keeps every image, and a second pass with the mask runs only when
  it did not (early in training, before the network is confident anywhere in an image);
* exact ARM, CE alone, 10 classes or more: one pass writes w_i (p - onehot) and keeps
  (confidence, loss) per pixel, two floats; a light pass over that scratch back-propagates
  ARM's 53-parameter MLP and applies the deferred 1/sum(w) to the gradient in the same loop
  (Liger-style deferral);
* otherwise (exact ARM with several scales or the consistency term, or few classes): a
  statistics-only pass, then a pass that recomputes the softmax, writes the gradient already
  scaled and back-propagates ARM per pixel.

Backward scales the gradient buffer in place by grad_output (skipped when it is 1).

Inputs: fp32 logits are read in place when C-contiguous; fp16/bf16 (numba has no half
arithmetic) and non-contiguous inputs are first copied to contiguous fp32, and the fp32 gradient
is cast back to the input dtype. float64 inputs are computed in fp32.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from noisyseg.kernels.contract import (
    ARM_NUM_PARAMETERS,
    ARM_TABLE_SIZE,
    LossTerms,
    check_arm_classes,
    check_class_ids,
    check_fused_scales,
    check_logits_and_target,
    pack_arm_parameters,
)
from noisyseg.kernels.numba_adele_arm_pass import (
    MASK_IMAGE,
    MASK_OFF,
    MASK_PIXEL,
    combine_split_gradient,
    fused_pass,
)
from noisyseg.kernels.numba_arm import (
    arm_gradient_pass,
    arm_table_forward,
    arm_table_gradient,
)
from noisyseg.kernels.numba_common import (
    MAX_BLOCK,
    block_size,
    float32_buffer,
    parallel_chunks,
    threads_like_torch,
)

_PACKED_SCALES = 3
_Gradient = tuple[np.ndarray, ...]  # one (N, C, L) float32 array per scale
_NO_SCRATCH = np.empty((1, 1), np.float32)
_NO_TABLE = np.empty(1, np.float32)
_NO_ACTIVATIONS = np.empty((3, 1, 1), np.float32)
_NO_BINS = np.empty((1, 1, 1, 4))
_NO_GRAD = np.empty((1, 1, 1), np.float32)
# Deferred scaling keeps 2 floats per pixel: at most 0.2x the logits from 10 classes on. Below,
# two passes over the logits take about as long (measured at C = 5) and keep no scratch.
_MIN_CLASSES_TO_DEFER = 10


# ---------------------------------------------------------------------------------------------
# Block steps. A block is `width` pixels starting at `start` in image `n`.


# ---------------------------------------------------------------------------------------------
# The kernel.


# ---------------------------------------------------------------------------------------------
# Host side: normalisers between the passes, autograd.


@dataclass
class _Partials:
    ce: np.ndarray
    kl: np.ndarray
    max_q: np.ndarray
    arm: np.ndarray
    labels: np.ndarray  # (blocks, 2): bad targets, valid pixels


@dataclass
class _Normalisers:
    """Global quantities a pass needs to write scaled gradients."""

    ce_grad_scale: np.ndarray
    arm_upstream: np.ndarray
    kl_grad_scale: np.ndarray


class _FusedCall:
    """One loss evaluation: flat fp32 views of the inputs, the passes, the final reduction."""

    def __init__(
        self,
        logits: Sequence[torch.Tensor],
        target: torch.Tensor,
        arm_params: torch.Tensor | None,
        terms: LossTerms,
    ) -> None:
        self.terms = terms
        self.mask_mode = _mask_mode(terms)
        self.shape = logits[0].shape
        num_images, num_classes = self.shape[0], self.shape[1]
        self.logits = tuple(_as_float32_pixels(z) for z in logits)
        self.target = target.reshape(num_images, -1).long().contiguous().numpy()
        self.use_arm = arm_params is not None and terms.ce_weight != 0.0
        self.arm_params = (
            arm_params.detach().float().contiguous().numpy()
            if self.use_arm
            else np.zeros(ARM_NUM_PARAMETERS, np.float32)
        )
        self.table = self.use_arm and terms.arm_table
        self.arm_table, *self.arm_activations = (
            arm_table_forward(self.arm_params) if self.table else (_NO_TABLE, _NO_ACTIVATIONS, _NO_ACTIVATIONS)
        )
        self.block = block_size(len(logits), num_classes)
        self.tiles = -(-self.target.shape[1] // self.block)

    def _num_valid(self, partials: _Partials | None) -> int:
        """Pixels whose target is valid: the pass's count once one ran, else counted from the
        target, and only where a normaliser needs it before a pass (the consistency term, uniform
        CE weights): the target's count cost 0.2-0.4 ms a call at (4, 256, 256)."""
        if partials is not None:
            return int(partials.labels[:, 1].sum())
        return self._target_valid

    @functools.cached_property
    def _target_valid(self) -> int:
        return int((self.target != self.terms.ignore_index).sum())

    def needs_statistics_pass(self) -> bool:
        return self.use_arm or self.mask_mode == MASK_IMAGE

    def defers_ce_scale(self) -> bool:
        """Exact ARM-weighted CE alone: one pass writes w_i (p - onehot) and keeps (confidence,
        loss) per pixel; a light pass over that scratch gives ARM's gradient and applies 1/sum(w)
        to the logit gradient, so the logits are read once instead of twice. With few classes the
        scratch (2/C of the logits) costs more memory than the second read costs time."""
        single_ce = self.use_arm and self.mask_mode == MASK_OFF and len(self.logits) == 1
        return single_ce and self.shape[1] >= _MIN_CLASSES_TO_DEFER

    def splits_kl_gradient(self) -> bool:
        """The consistency term with ARM's table: the weight sums are only known after the pass,
        so one pass writes the CE and the KL parts of the gradient apart, and a light pass adds
        them with their normalisers."""
        return self.mask_mode != MASK_OFF and self.table

    def assumes_images_kept(self) -> bool:
        """The consistency term under the per-image rho mask without ARM: every normaliser but
        the mask is known up front, and once the network is confident anywhere in an image the
        mask keeps it, so one pass assumes every image kept and a second runs only if not."""
        return self.mask_mode == MASK_IMAGE and not self.use_arm

    def run(self, write_grad: bool, arm_grad: bool) -> tuple[float, _Gradient | None, np.ndarray | None, np.ndarray]:
        """Loss value, the gradient of every scale ((N, C, L) float32 each) or None, ARM's
        gradient (53,) or None, and the factor per scale (S,) the gradient still needs (1 unless
        deferred to backward)."""
        if write_grad and self.splits_kl_gradient():
            return self._run_split(arm_grad)
        if write_grad and self.assumes_images_kept():
            return self._run_assuming_kept()
        if self.table:
            return self._run_table(write_grad, arm_grad)
        write_grad = write_grad or arm_grad  # the exact path back-propagates ARM in the gradient pass
        done = np.ones(len(self.logits))
        if write_grad and self.defers_ce_scale():
            return (*self._run_deferred(), done)
        partials = None
        if self.needs_statistics_pass():
            partials = self._pass(self._normalisers(None), write_grad=False)
            if not write_grad:
                return self._value(partials), None, None, done
        grad = self._gradient_buffers() if write_grad else None
        final = self._pass(self._normalisers(partials), write_grad, grad)
        arm_grad_out = final.arm.sum(axis=0) if (write_grad and self.use_arm) else None
        return self._value(partials if partials is not None else final), grad, arm_grad_out, done

    def _run_table(
        self, write_grad: bool, arm_grad: bool
    ) -> tuple[float, _Gradient | None, np.ndarray | None, np.ndarray]:
        """ARM's table: the pixels' loss and weight go into K bins in the pass that sees them
        first, and ARM's gradient comes from the bins. Without the consistency term one pass
        writes the gradient with ce_weight w_i (p - onehot) and the 1/sum(w) of each scale is
        applied in backward together with grad_output; with it, one pass gives the value and
        ARM's gradient (the logits' gradient is `_run_split`'s)."""
        num_scales = len(self.logits)
        grad = None
        bins = self._bins()
        if self.mask_mode == MASK_OFF:
            grad = self._gradient_buffers() if write_grad else None
            unnormalised = self._fixed_normalisers(num_scales, self.terms.ce_weight, 0.0)
            partials = self._pass(unnormalised, write_grad, grad, bins=bins)
            norm = self._normalisers(partials)
            pending = norm.ce_grad_scale.astype(np.float64) / self.terms.ce_weight
        else:
            partials = self._pass(self._normalisers(None), write_grad=False, bins=bins)
            norm = self._normalisers(partials)
            pending = np.ones(num_scales)
        arm_grad_out = self._arm_table_gradient(bins, norm.arm_upstream) if arm_grad else None
        return self._value(partials), grad, arm_grad_out, pending

    def _run_split(self, arm_grad: bool) -> tuple[float, _Gradient, np.ndarray | None, np.ndarray]:
        """One pass writes the CE part of the gradient (w_i (p - onehot), ARM's weights from the
        table) and the KL part (unmasked, unnormalised) to two buffers and fills ARM's bins; then
        `combine_split_gradient` scales and adds them. Replaces a statistics pass and a pass
        that recomputed every softmax, for a second buffer of the gradient's size."""
        num_scales = len(self.logits)
        grad, kl_grad = self._gradient_buffers(), self._gradient_buffers()
        bins = self._bins() if arm_grad else None
        partials = self._pass(self._fixed_normalisers(num_scales, 1.0, 1.0), True, grad, bins=bins, kl_grad=kl_grad)
        norm = self._normalisers(partials)
        combine_split_gradient(
            num_scales, _packed(grad, _NO_GRAD), _packed(kl_grad, _NO_GRAD), norm.ce_grad_scale, norm.kl_grad_scale
        )
        arm_grad_out = self._arm_table_gradient(bins, norm.arm_upstream) if arm_grad else None
        return self._value(partials), grad, arm_grad_out, np.ones(num_scales)

    def _run_assuming_kept(self) -> tuple[float, _Gradient, None, np.ndarray]:
        grad = self._gradient_buffers()
        partials = self._pass(self._normalisers(None), True, grad)
        if not self._kept_images(partials).all():  # early in training: the mask dropped an image
            partials = self._pass(self._normalisers(partials), True, grad)
        return self._value(partials), grad, None, np.ones(len(self.logits))

    def _run_deferred(self) -> tuple[float, _Gradient, np.ndarray]:
        grad = self._gradient_buffers()
        scratch = (float32_buffer(self.target.shape), float32_buffer(self.target.shape))
        partials = self._pass(self._fixed_normalisers(1, self.terms.ce_weight, 0.0), True, grad, scratch)
        norm = self._normalisers(partials)
        blocks = self.shape[0] * -(-self.target.shape[1] // MAX_BLOCK)
        arm_partials = np.zeros((blocks, ARM_NUM_PARAMETERS))
        arm_gradient_pass(
            *scratch, self.target, self.terms.ignore_index, self.arm_params,
            norm.arm_upstream[0, 0], norm.arm_upstream[0, 1], MAX_BLOCK, parallel_chunks(blocks),
            arm_partials,
            grad[0], np.float32(norm.ce_grad_scale[0] / self.terms.ce_weight),
        )  # fmt: skip
        return self._value(partials), grad, arm_partials.sum(axis=0)

    def _pass(
        self,
        norm: _Normalisers,
        write_grad: bool,
        grad: _Gradient | None = None,
        scratch: tuple[np.ndarray, np.ndarray] | None = None,
        bins: np.ndarray | None = None,
        kl_grad: _Gradient | None = None,
    ) -> _Partials:
        blocks = self.shape[0] * self.tiles
        partials = _Partials(
            ce=np.zeros((blocks, len(self.logits), 3)),
            kl=np.zeros(blocks),
            max_q=np.full(blocks, -np.inf, np.float32),
            arm=np.zeros(
                (
                    blocks if write_grad and self.use_arm and not self.table else 1,
                    ARM_NUM_PARAMETERS,
                )
            ),
            labels=np.zeros((blocks, 2), np.int64),
        )
        fused_pass(
            _packed(self.logits, self.logits[0]), len(self.logits), self.target, self.terms.ignore_index,
            self.terms.ce_weight != 0.0, self.arm_params, self.use_arm, self.mask_mode,
            np.float32(self.terms.rho), self.block, parallel_chunks(blocks),
            write_grad, norm.ce_grad_scale, norm.arm_upstream, norm.kl_grad_scale,
            _packed(grad or (), _NO_GRAD),
            partials.ce, partials.kl, partials.max_q, partials.arm, partials.labels,
            scratch is not None, *(scratch if scratch is not None else (_NO_SCRATCH, _NO_SCRATCH)),
            self.arm_table, self.table, bins if bins is not None else _NO_BINS, bins is not None,
            kl_grad is not None, _packed(kl_grad or (), _NO_GRAD),
        )  # fmt: skip
        if partials.labels[:, 0].any():  # the reference's check names the offending id
            check_class_ids(torch.from_numpy(self.target), self.shape[1], self.terms.ignore_index)
        return partials

    def _fixed_normalisers(self, num_scales: int, ce_scale: float, kl_scale: float) -> _Normalisers:
        """Normalisers fixed before the pass (the CE's and the KL's factors; no ARM upstream),
        for schedules that apply the real ones after it."""
        return _Normalisers(
            np.full(num_scales, ce_scale, np.float32),
            np.zeros((num_scales, 2)),
            np.full(self.shape[0], kl_scale, np.float32),
        )

    def _arm_table_gradient(self, bins: np.ndarray, arm_upstream: np.ndarray) -> np.ndarray:
        return arm_table_gradient(self.arm_params, self.arm_table, *self.arm_activations, bins, arm_upstream)

    def _bins(self) -> np.ndarray:
        """ARM's gradient bins: per parallel chunk and scale, the four sums of each of the K
        table intervals (`numba_arm.block_table_bins`), from torch's allocator: 64-byte aligned,
        so no interval's 32-byte row straddles a cache line (numpy's large arrays start 16 bytes
        into a page). One scale gets two copies, which halve the chain of adds where pixels share
        an interval (256 KiB more); three scales keep one, since six copies (1.5 MiB) outgrew the
        L2 cache and made spread confidences 7% slower (docs/benchmarks.md)."""
        chunks = parallel_chunks(self.shape[0] * self.tiles)
        copies = 2 if len(self.logits) == 1 else 1
        return torch.zeros((chunks, len(self.logits), copies * ARM_TABLE_SIZE, 4), dtype=torch.float64).numpy()

    def _gradient_buffers(self) -> _Gradient:
        """One (N, C, L) fp32 buffer per scale, each the size of a plain cross-entropy's
        gradient: one (S, N, C, L) buffer was three times that, over glibc's largest mmap threshold
        (32 MiB) from Cityscapes' shape on, and came back as fresh pages that the pass then
        faulted in (docs/benchmarks.md, "Twelfth session")."""
        return tuple(float32_buffer(self.logits[0].shape) for _ in self.logits)

    def _weight_sums(self, partials: _Partials | None) -> np.ndarray:
        """(S, 3): sum w, sum w^2, sum w l per scale (sums in block order: deterministic)."""
        if partials is None:  # uniform weights: known without a pass (sum w l is not needed)
            num_valid = self._num_valid(None)
            return np.tile(np.array([num_valid, num_valid, 0.0]), (len(self.logits), 1))
        return partials.ce.sum(axis=0)

    def _kept_images(self, partials: _Partials | None) -> np.ndarray:
        num_images = self.shape[0]
        if self.mask_mode != MASK_IMAGE or partials is None:
            return np.ones(num_images)
        image_max_q = partials.max_q.reshape(num_images, self.tiles).max(axis=1)
        return (image_max_q > np.float32(self.terms.rho)).astype(np.float64)

    def _normalisers(self, partials: _Partials | None) -> _Normalisers:
        sums = self._weight_sums(partials)
        sum_w, sum_w2, sum_wl = sums[:, 0], sums[:, 1], sums[:, 2]
        has_pixels = sum_w > 0
        safe_w = np.where(has_pixels, sum_w, 1.0)
        ce_scale = np.where(has_pixels, self.terms.ce_weight / safe_w, 0.0)
        # dQ/dw_i = (l_i - w_i sum(w l) / sum(w^2)) / sum(w): w / ||w||_2 differentiable, the L1
        # normaliser constant.
        arm_upstream = np.stack([ce_scale, ce_scale * sum_wl / np.where(has_pixels, sum_w2, 1.0)], axis=1)
        kl_scale = np.zeros(self.shape[0])
        if self.mask_mode != MASK_OFF:
            kl_scale = self.terms.kl_weight * self._kept_images(partials) / max(self._num_valid(partials), 1)
        return _Normalisers(ce_scale.astype(np.float32), arm_upstream, kl_scale.astype(np.float32))

    def _value(self, partials: _Partials) -> float:
        sums = partials.ce.sum(axis=0)
        ce = sum(wl / w for w, _, wl in sums if w > 0) if self.terms.ce_weight != 0.0 else 0.0
        kl = 0.0
        if self.mask_mode != MASK_OFF:
            per_image = partials.kl.reshape(self.shape[0], self.tiles).sum(axis=1)
            kl = float((per_image * self._kept_images(partials)).sum()) / max(self._num_valid(partials), 1)
        return self.terms.ce_weight * ce + self.terms.kl_weight * kl


def _packed(arrays: Sequence[np.ndarray], filler: np.ndarray) -> tuple[np.ndarray, ...]:
    """At least _PACKED_SCALES arrays (`filler` after the given ones), so 1, 2 and 3 scales share
    one compiled kernel (numba specialises on a tuple's length)."""
    return (*arrays, *(filler,) * max(_PACKED_SCALES - len(arrays), 0))


def _as_float32_pixels(logits: torch.Tensor) -> np.ndarray:
    """(N, C, L) fp32 C-contiguous numpy view (a copy only for other dtypes or layouts)."""
    flat = logits.detach().reshape(logits.shape[0], logits.shape[1], -1)
    return flat.to(torch.float32).contiguous().numpy()


class _FusedLoss(torch.autograd.Function):
    """autograd wrapper: the gradient is computed in forward; backward scales it in place by
    grad_output, skipped when that is 1."""

    @staticmethod
    def forward(
        ctx,
        terms: LossTerms,
        target: torch.Tensor,
        arm_params: torch.Tensor | None,
        *logits: torch.Tensor,
    ) -> torch.Tensor:  # type: ignore[override]
        call = _FusedCall(logits, target, arm_params, terms)
        with threads_like_torch():
            value, grad, arm_grad, pending = call.run(
                any(ctx.needs_input_grad[3:]), bool(ctx.needs_input_grad[2]) and call.use_arm
            )
        ctx.pending = pending
        ctx.applied_scales = [None] * len(logits)
        ctx.handed_out = [None] * len(logits)  # the buffer's version when handed out
        ctx.logit_dtypes = [z.dtype for z in logits]
        # Plain attributes, not save_for_backward: these are our own buffers, scaled in place.
        ctx.grad = [torch.from_numpy(g).reshape(logits[0].shape) for g in grad] if grad is not None else None
        ctx.arm_grad = torch.from_numpy(arm_grad).float() if arm_grad is not None else None
        out_dtype = torch.float64 if logits[0].dtype == torch.float64 else torch.float32
        return torch.tensor(value, dtype=out_dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        upstream = float(grad_output)
        logit_grads = _scaled_logit_grads(ctx, upstream)
        arm_out = ctx.arm_grad * upstream if (ctx.arm_grad is not None and ctx.needs_input_grad[2]) else None
        return (None, None, arm_out, *logit_grads)


def _scaled_logit_grads(ctx, upstream: float) -> list[torch.Tensor | None]:
    """Each scale's gradient times grad_output and what forward left pending (1/sum(w) on the
    table path). The first backward scales a scale's buffer in place and hands out a view of it:
    no copy, for autograd keeps a gradient that nothing else references (it clones one that is
    still referenced, as the buffer itself is by ctx). A leaf's .grad is then that memory, and
    accumulating into it changes the buffer, so a repeated backward (retain_graph) first keeps an
    unscaled copy of the buffer, provided nothing changed it since it was handed out (its version
    counter, shared with the view, says so), and scales that copy from then on. A zero factor
    gives fresh zeros and leaves the buffer as it is."""
    grads: list[torch.Tensor | None] = []
    for k, dtype in enumerate(ctx.logit_dtypes):
        if ctx.grad is None or not ctx.needs_input_grad[3 + k]:
            grads.append(None)
            continue
        scale, buffer, handed_out = upstream * float(ctx.pending[k]), ctx.grad[k], ctx.handed_out[k]
        if scale == 0.0:
            grad = torch.zeros_like(buffer)
        elif ctx.applied_scales[k] is None:
            if scale != 1.0:
                buffer.mul_(scale)
            ctx.applied_scales[k], ctx.handed_out[k] = scale, buffer._version
            grad = buffer.view_as(buffer)
        else:
            if handed_out is not None:
                if buffer._version != handed_out:
                    raise RuntimeError(
                        f"numba fused loss: backward ran again after the gradient of logits[{k}] it "
                        "handed out was changed in place (accumulated into .grad, or zeroed); call "
                        "torch.autograd.grad for repeated backward passes, or compute the loss again"
                    )
                ctx.grad[k] = buffer = buffer / ctx.applied_scales[k]
                ctx.applied_scales[k], ctx.handed_out[k] = 1.0, None
            grad = buffer * scale
        grads.append(grad.to(dtype))
    return grads


def _mask_mode(terms: LossTerms) -> int:
    """The kernel's encoding of the consistency term: off, per-image or per-pixel rho mask."""
    if not terms.has_consistency:
        return MASK_OFF
    return MASK_PIXEL if terms.pixel_mask else MASK_IMAGE


def _fused_loss(
    logits: Sequence[torch.Tensor], target: torch.Tensor, arm: nn.Module | None, terms: LossTerms
) -> torch.Tensor:
    check_arm_classes(arm, logits[0].shape[1], "logits")
    arm_params = pack_arm_parameters(arm) if arm is not None else None
    return _FusedLoss.apply(terms, target, arm_params, *logits)


def arm_cross_entropy(
    logits_per_scale: Sequence[torch.Tensor],
    target: torch.Tensor,
    arm: nn.Module | None,
    terms: LossTerms,
) -> torch.Tensor:
    """`functional.arm_cross_entropy` on the numba backend: one scale, ``LossTerms.cross_entropy``."""
    check_logits_and_target(logits_per_scale[0], target)
    return _fused_loss(list(logits_per_scale[:1]), target, arm, terms)


def multiscale_loss(
    logits_per_scale: Sequence[torch.Tensor],
    target: torch.Tensor,
    arm: nn.Module | None,
    terms: LossTerms,
) -> torch.Tensor:
    """`functional.multiscale_consistency` and `functional.adele_arm_loss` on the numba backend:
    every scale's CE and the KL term of `terms` in one pass per call."""
    check_fused_scales(logits_per_scale, target, "numba")
    return _fused_loss(list(logits_per_scale), target, arm if terms.has_cross_entropy else None, terms)
