"""Backend dispatch for the public loss functions of `noisyseg.kernels`.

Each backend is a module exposing `arm_cross_entropy`, `multiscale_consistency` and
`adele_arm_loss` with the reference's signatures (without `backend`).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from types import ModuleType

import torch
from torch import nn

BACKEND_MODULES = {
    "torch": "noisyseg.kernels.reference",
    "triton": "noisyseg.kernels.triton_backend",
    "numba": "noisyseg.kernels.numba_backend",
}
BACKENDS = ("auto", *BACKEND_MODULES)


def resolve_backend(backend: str, example: torch.Tensor) -> str:
    """The concrete backend name for `backend`.

    "auto": the fused kernels (Triton on CUDA, numba on CPU) for fp16/bf16/fp32 logits; the
    reference for fp64, since the fused kernels accumulate in fp32.
    """
    if backend == "auto":
        if example.dtype == torch.float64:
            return "torch"
        return "triton" if example.is_cuda else "numba"
    if backend not in BACKEND_MODULES:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    return backend


def _backend_module(backend: str, example: torch.Tensor) -> ModuleType:
    name = resolve_backend(backend, example)
    try:
        return importlib.import_module(BACKEND_MODULES[name])
    except ImportError as error:
        package = (error.name or "").split(".")[0]
        if package in ("triton", "numba"):
            raise RuntimeError(
                f"backend {name!r} needs the {package!r} package, which is not installed here; "
                "use backend='torch' (the reference) instead"
            ) from error
        raise


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
