"""The Triton backend of `noisyseg.kernels` (GPU; CPU tensors through ``TRITON_INTERPRET=1``).

Exposes the three losses with the reference's signatures. The kernel modules (and triton
itself) are imported on first use, so importing this module, like importing
`noisyseg.kernels`, works on machines without triton.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from types import ModuleType

import torch
from torch import nn


def _kernel_module(name: str) -> ModuleType:
    try:
        return importlib.import_module(f"noisyseg.kernels.{name}")
    except ImportError as error:
        if error.name is not None and error.name.split(".")[0] == "triton":
            raise RuntimeError(
                "the triton backend needs the 'triton' package (Linux x86_64 with CUDA); "
                "use backend='numba' or 'torch' instead"
            ) from error
        raise


def arm_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    arm: nn.Module | None,
    ignore_index: int = 255,
) -> torch.Tensor:
    """ARM-weighted cross-entropy; see `reference.arm_cross_entropy`."""
    return _kernel_module("triton_arm_cross_entropy").arm_cross_entropy(logits, target, arm, ignore_index)


def multiscale_consistency(
    logits_per_scale: Sequence[torch.Tensor],
    target: torch.Tensor,
    rho: float = 0.8,
    mask: str = "image",
    ignore_index: int = 255,
) -> torch.Tensor:
    """ADELE's multiscale KL term; see `reference.multiscale_consistency`."""
    module = _kernel_module("triton_multiscale_consistency")
    return module.multiscale_consistency(logits_per_scale, target, rho, mask, ignore_index)


def adele_arm_loss(
    logits_per_scale: Sequence[torch.Tensor],
    target: torch.Tensor,
    arm: nn.Module | None,
    lam: float = 1.0,
    rho: float = 0.8,
    mask: str = "image",
    ignore_index: int = 255,
) -> torch.Tensor:
    """The combined ADELE+ARM loss; see `reference.adele_arm_loss`."""
    module = _kernel_module("triton_adele_arm")
    return module.adele_arm_loss(logits_per_scale, target, arm, lam, rho, mask, ignore_index)
