"""ADELE's multiscale consistency, sum_k KL(p_k || q) over the rho-masked pixels divided by
the batch's valid pixels, on the Triton backend.

It runs the fused multiscale kernels of `triton_adele_arm` with the cross-entropy compiled
out (constexpr HAS_CE=False): the forward kernel reads the S maps of a block of pixels once
and writes per-block partial sums (masked KL, max of q over valid pixels, valid count), the
per-image rho mask is a reduction over those partials, and the backward kernel writes
dL/dz_k = p_k (log p_k - log q - KL_k) with the mask, 1/valid and grad_output folded in.
(Why the gradient is not written in the forward pass: see `triton_adele_arm`.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from noisyseg.kernels.reference import check_mask
from noisyseg.kernels.triton_adele_arm import FusedLossConfig, fused_multiscale_loss


def multiscale_consistency(
    logits_per_scale: Sequence[torch.Tensor],
    target: torch.Tensor,
    rho: float = 0.8,
    mask: str = "image",
    ignore_index: int = 255,
) -> torch.Tensor:
    """Multiscale KL term on the Triton backend; semantics of `reference.multiscale_consistency`."""
    check_mask(mask)
    config = FusedLossConfig(
        ce_weight=0.0,
        kl_weight=1.0,
        has_cross_entropy=False,
        has_arm=False,
        has_consistency=True,
        rho=rho,
        pixel_mask=mask == "pixel",
        ignore_index=ignore_index,
    )
    return fused_multiscale_loss(logits_per_scale, target, None, config)
