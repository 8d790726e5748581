"""fp32 tolerances for the fused kernels' tests, derived from the rounding error of the sums
the losses are made of rather than tuned on one passing draw.

Model (Higham & Mary, "A new approach to probabilistic rounding error analysis", 2019): a sum
of n terms computed in precision u, in any order, has error at most
    lambda * sqrt(n) * u * sum_i |a_i|
with high probability (independent, mean-zero roundings); the deterministic bound has n for
sqrt(n). Here u = 2^-24 (fp32), lambda = LAMBDA = 4, and every term carries PER_TERM u of its
own (exp, log, sigmoid, SiLU, a division: a few u each). Independent error sources add in
quadrature (the same model); the fused kernel and the fp32 reference each carry the error, so
their difference is allowed FP32_MARGIN = sqrt(2) times the bound.

* Loss values: sums over n valid pixels (per scale) of per-pixel terms that are themselves
  log-sum-exps and KL sums over S scales x C classes: rtol u (lambda (sqrt(n) + sqrt(S C)) +
  PER_TERM), and the same as atol (a per-pixel term's absolute error is O(sqrt(S C) u)
  whatever the logits' size, since log-softmax subtracts the maximum exactly).
* Logit gradients: per entry a softmax over C classes (times S scales for the consistency
  term) scaled by weights whose normalisers are sums over n pixels: rtol as for the values,
  atol that rtol times the largest |entry| of the reference gradient (entries are O(1/n))
  times 1 + the logits' largest spread over classes (log p has absolute error u |z - max z|).
* ARM's 53 parameter gradients: each entry is sum_p a_p over the valid pixels, with
  a_p = g/S * (l_p J_p - c w_p J_p) / (s ||w||) (J_p = dw_p/dtheta, l_p the pixel's loss,
  c = sum l w / ||w||^2, s = sum w / ||w||: the L2 normalisation's second term cancels part
  of the first, per pixel). Its atol combines lambda sqrt(S n) u sum_p |a_p| (accumulation),
  the per-pixel roundings of l_p - c w_p, the pixels' input errors (confidence and loss,
  O(sqrt(C) u) each) and the common normalisers' errors (see arm_gradient_error_bound), all in
  fp64 from per-pixel Jacobians of the reference ARM (torch.func).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

U = 2.0**-24  # fp32 unit roundoff
LAMBDA = 4.0  # Higham & Mary's lambda: failure probability about exp(-lambda^2 / 2) per sum
PER_TERM = 8.0  # roundings inside one term (exp, log, sigmoid, SiLU, division), in units of u
FP32_MARGIN = math.sqrt(2.0)  # kernel and reference each carry an independent error


def sum_rtol(*term_counts: int) -> float:
    """Relative error of a computation made of sums with these numbers of terms, plus the
    per-term roundings: u (lambda sum_k sqrt(n_k) + PER_TERM)."""
    return U * (LAMBDA * sum(math.sqrt(max(n, 1)) for n in term_counts) + PER_TERM)


def sum_error_bound(terms: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Probabilistic bound on the fp32 error of summing ``terms`` along ``dim``:
    lambda sqrt(n) u sum |a_i| (the per-term roundings not included)."""
    n = terms.shape[dim]
    return LAMBDA * math.sqrt(max(n, 1)) * U * terms.double().abs().sum(dim=dim)


@dataclass
class Tolerance:
    """Per-quantity tolerances: |got - want| <= atol + rtol |want| entry by entry."""

    value_rtol: float
    value_atol: float
    logit_rtol: float
    logit_atol: list[float]
    arm_atol: list[torch.Tensor]


def fp32_tolerance(
    logits_list: Sequence[torch.Tensor],
    target: torch.Tensor,
    arm: torch.nn.Module | None,
    expected_logit_grads: Sequence[torch.Tensor],
    grad_output: float = 1.0,
    ignore_index: int = 255,
) -> Tolerance:
    """Tolerances for one fp32 comparison of a fused loss against the reference (any of
    arm_cross_entropy, multiscale_consistency, adele_arm_loss: ARM's gradient is
    g / S sum_k of each scale's cross-entropy ARM gradient, S = len(logits_list))."""
    num_scales, num_classes = len(logits_list), logits_list[0].shape[1]
    valid = target != ignore_index
    num_valid = int(valid.sum())
    rtol = FP32_MARGIN * sum_rtol(num_valid, num_scales * num_classes)
    # log-softmax and log q carry an absolute error u |z_c - max z| that the KL and CE terms
    # multiply by factors of the gradient's size: the logits' spread over classes scales atol.
    spread = max(float((z.amax(dim=1) - z.amin(dim=1)).max()) if z.numel() else 0.0 for z in logits_list)
    logit_atol = [
        rtol * (1.0 + spread) * float(g.detach().abs().max()) if g.numel() else 0.0 for g in expected_logit_grads
    ]
    arm_atol = []
    if arm is not None:
        arm_atol = [torch.zeros_like(p, dtype=torch.float64) for p in arm.parameters()]
        if num_valid:
            for logits in logits_list:
                for total, bound in zip(
                    arm_atol, arm_gradient_error_bound(logits, target, arm, ignore_index, num_scales)
                ):
                    total += bound
            arm_atol = [FP32_MARGIN * abs(grad_output) / num_scales * a for a in arm_atol]
    return Tolerance(rtol, rtol, rtol, logit_atol, arm_atol)


def arm_gradient_error_bound(
    logits: torch.Tensor, target: torch.Tensor, arm: torch.nn.Module, ignore_index: int, num_scales: int = 1
) -> list[torch.Tensor]:
    """Per-parameter fp32 error bound of one scale's ARM cross-entropy gradient (grad_output 1),
    in fp64 from the reference's ARM. Both implementations form, per valid pixel p, the
    upstream g_p = (l_p - c w_p) / sum(w) with c = sum(w l) / sum(w^2), and sum a_p = g_p J_p
    with J_p = dw_p/dtheta. With n = S x valid pixels:
      accumulation        lambda sqrt(n) u sum_p |a_p|
      per-pixel roundings lambda u PER_TERM sqrt(sum_p (|J_p| (|l_p| + |c w_p|) / sum w)^2)
      per-pixel inputs    sqrt(sum_p e_p^2), e_p = |da_p/dc_p| dc_p + |J_p| dl_p / sum w
      common factors      2 lambda sqrt(n) u (|sum_p a_p| + |c sum_p w_p J_p| / sum w)
    Independent per-pixel errors add in quadrature (the same probabilistic model); the pixel's
    confidence c_p and loss l_p are sums over C classes, hence dc_p, dl_p = O(sqrt(C) u)."""
    from noisyseg.kernels import reference

    valid = target != ignore_index
    z = logits.detach().double().movedim(1, -1)[valid]  # (n, C)
    num_classes = z.shape[1]
    log_p = F.log_softmax(z, dim=1)
    loss = -log_p.gather(1, target[valid].long()[:, None]).squeeze(1)
    confidence = reference.normalized_confidence(log_p.exp()[:, :, None]).squeeze(1)
    params = {name: p.detach().double() for name, p in arm.named_parameters()}

    def weight(params, conf):  # one pixel's ARM weight, conf a scalar
        return functional_call(arm, params, (conf,))

    def jacobian(conf):  # {name: (n, *shape)}: pixel p's d w_p / d theta
        return vmap(grad(weight), in_dims=(None, 0))(params, conf)

    # ARM is pointwise: one batched call gives every w_p and (through the sum) every dw_p/dc_p;
    # dJ_p/dc_p by a forward difference (step 2^-20: its error is far below the bound's).
    conf = confidence.clone().requires_grad_()
    w = functional_call(arm, params, (conf,))
    (dw_dc,) = torch.autograd.grad(w.sum(), conf)
    w = w.detach()
    step = 2.0**-20
    both = jacobian(torch.cat([confidence, confidence + step]))
    jac = {name: j[: len(confidence)] for name, j in both.items()}
    djac_dc = {name: (j[len(confidence) :] - jac[name]) / step for name, j in both.items()}
    inverse_sum = 1.0 / w.sum()
    ratio = (w * loss).sum() / (w * w).sum()  # c
    upstream = inverse_sum * (loss - ratio * w)  # g_p
    # Absolute errors of a pixel's inputs: the confidence is 2C/(C-1) (sum p^2 - 1/C) (or the
    # same from (p - 1/C)^2), a sum of C terms; the loss is a log-sum-exp over C classes.
    class_error = U * (LAMBDA * math.sqrt(num_classes) + PER_TERM)
    confidence_error = 4.0 * class_error
    loss_error = class_error * (1.0 + loss)
    root_n = math.sqrt(valid.sum().item() * num_scales)
    bounds = []
    for name in params:
        jp = jac[name].reshape(len(loss), -1)
        djp = djac_dc[name].reshape(len(loss), -1)
        terms = upstream[:, None] * jp
        accumulation = LAMBDA * root_n * U * terms.abs().sum(0)
        rounded = inverse_sum * (loss.abs() + (ratio * w).abs())[:, None] * jp.abs()
        roundings = LAMBDA * PER_TERM * U * rounded.square().sum(0).sqrt()
        sensitivity = (upstream[:, None] * djp - (inverse_sum * ratio * dw_dc)[:, None] * jp).abs()
        inputs = sensitivity * confidence_error + inverse_sum * jp.abs() * loss_error[:, None]
        common = terms.sum(0).abs() + (inverse_sum * ratio * (w[:, None] * jp).sum(0)).abs()
        common = LAMBDA * root_n * U * math.sqrt(2.0) * common  # sum w, and c's two sums
        parts = torch.stack([accumulation, roundings, inputs.square().sum(0).sqrt(), common])
        bounds.append(parts.square().sum(0).sqrt().reshape(params[name].shape))
    return bounds


def assert_within(got: torch.Tensor, want: torch.Tensor, atol, rtol: float, what: str = "") -> float:
    """|got - want| <= atol + rtol |want| everywhere (atol a number or a tensor like want);
    returns the worst ratio of error to allowance (<= 1 when it passes)."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    error = (got.detach().double() - want.detach().double()).abs()
    allowed = torch.as_tensor(atol, dtype=torch.float64) + rtol * want.detach().double().abs()
    if error.numel() == 0:
        return 0.0
    ratio = error / allowed.clamp_min(torch.finfo(torch.float64).tiny)
    worst = float(ratio.max())
    if not worst <= 1.0:
        index = int(ratio.argmax())
        raise AssertionError(
            f"{what}: error {float(error.flatten()[index]):.3g} at flat index {index} exceeds the fp32 "
            f"allowance {float(allowed.flatten()[index]):.3g} (ratio {worst:.3g}; got "
            f"{float(got.flatten()[index]):.9g}, want {float(want.flatten()[index]):.9g})"
        )
    return worst
