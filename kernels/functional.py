"""Backend dispatch for the public loss functions of `noisyseg.kernels`."""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType

import torch
from torch import nn

from noisyseg.kernels import reference

BACKENDS = ("auto", "torch")


def _backend_module(backend: str, example: torch.Tensor) -> ModuleType:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    return reference


def arm_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    arm: nn.Module | None,
    ignore_index: int = 255,
    backend: str = "auto",
) -> torch.Tensor:
    """ARM-weighted cross-entropy; see `reference.arm_cross_entropy` for the semantics."""
    return _backend_module(backend, logits).arm_cross_entropy(logits, target, arm, ignore_index)


def multiscale_consistency(
    logits_per_scale: Sequence[torch.Tensor],
    target: torch.Tensor,
    rho: float = 0.8,
    mask: str = "image",
    ignore_index: int = 255,
    backend: str = "auto",
) -> torch.Tensor:
    """ADELE's multiscale KL term; see `reference.multiscale_consistency`."""
    module = _backend_module(backend, logits_per_scale[0])
    return module.multiscale_consistency(logits_per_scale, target, rho, mask, ignore_index)


def adele_arm_loss(
    logits_per_scale: Sequence[torch.Tensor],
    target: torch.Tensor,
    arm: nn.Module | None,
    lam: float = 1.0,
    rho: float = 0.8,
    mask: str = "image",
    ignore_index: int = 255,
    backend: str = "auto",
) -> torch.Tensor:
    """The combined ADELE+ARM loss; see `reference.adele_arm_loss`."""
    module = _backend_module(backend, logits_per_scale[0])
    return module.adele_arm_loss(logits_per_scale, target, arm, lam, rho, mask, ignore_index)
