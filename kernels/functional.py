"""The public loss functions of `noisyseg.kernels` and the registry of backends serving them.

`BACKEND_REGISTRY` says, one row per backend, which device type and logit dtypes ``"auto"``
sends to it, which package it needs, and which function serves each loss. The fused backends'
functions take ``(logits_per_scale, target, arm, terms)`` with the loss described by a
`contract.LossTerms`; the reference (``"torch"``) is the specification itself and takes the
public arguments. `noisyseg.kernels.functional` imports a backend's module only when it is
chosen, so importing `noisyseg.kernels` works without triton or numba.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn

from noisyseg.kernels.contract import FUSED_DTYPES, LossTerms

REFERENCE = "torch"


@dataclass(frozen=True)
class Backend:
    """One row of the registry. ``device``/``dtypes`` None: any (the reference's row)."""

    name: str
    device: str | None
    dtypes: tuple[torch.dtype, ...] | None
    package: str | None
    ops: Mapping[str, str]  # loss name -> "module:function"

    def serves(self, example: torch.Tensor) -> bool:
        device_ok = self.device is None or example.device.type == self.device
        return device_ok and (self.dtypes is None or example.dtype in self.dtypes)

    def op(self, name: str) -> Callable:
        module_name, function = self.ops[name].split(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            package = (error.name or "").split(".")[0]
            if self.package is not None and package == self.package:
                raise RuntimeError(
                    f"backend {self.name!r} needs the {package!r} package, which is not installed here; "
                    "use backend='torch' (the reference) instead"
                ) from error
            raise
        return getattr(module, function)


_TRITON = "noisyseg.kernels.triton_"
_NUMBA = "noisyseg.kernels.numba_adele_arm:"
# "auto" takes the first row that serves the logits' device and dtype: the fused kernels
# accumulate in fp32, so fp64 (gradcheck) and every other device go to the reference.
BACKEND_REGISTRY: tuple[Backend, ...] = (
    Backend(
        "triton",
        "cuda",
        FUSED_DTYPES,
        "triton",
        {
            "arm_cross_entropy": _TRITON + "arm_cross_entropy:arm_cross_entropy",
            "multiscale_consistency": _TRITON + "adele_arm:fused_multiscale_loss",
            "adele_arm_loss": _TRITON + "adele_arm:fused_multiscale_loss",
        },
    ),
    Backend(
        "numba",
        "cpu",
        FUSED_DTYPES,
        "numba",
        {
            "arm_cross_entropy": _NUMBA + "arm_cross_entropy",
            "multiscale_consistency": _NUMBA + "multiscale_loss",
            "adele_arm_loss": _NUMBA + "multiscale_loss",
        },
    ),
    Backend(
        REFERENCE,
        None,
        None,
        None,
        {
            name: f"noisyseg.kernels.reference:{name}"
            for name in ("arm_cross_entropy", "multiscale_consistency", "adele_arm_loss")
        },
    ),
)
_BY_NAME = {backend.name: backend for backend in BACKEND_REGISTRY}
BACKENDS = ("auto", REFERENCE, "triton", "numba")


def resolve_backend(backend: str, example: torch.Tensor) -> str:
    """The concrete backend name for `backend` ("auto": the first registry row serving `example`)."""
    if backend == "auto":
        return next(row.name for row in BACKEND_REGISTRY if row.serves(example))
    if backend not in _BY_NAME:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    return backend


def _dispatch(op: str, backend: str, example: torch.Tensor) -> tuple[str, Callable]:
    name = resolve_backend(backend, example)
    return name, _BY_NAME[name].op(op)


def arm_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    arm: nn.Module | None,
    ignore_index: int = 255,
    backend: str = "auto",
    arm_mode: str = "table",
) -> torch.Tensor:
    """ARM-weighted cross-entropy; see `reference.arm_cross_entropy` for the semantics.
    ``arm_mode``: ARM's weight from its table (default) or the exact MLP (`contract`)."""
    terms = LossTerms.cross_entropy(ignore_index, arm_mode)
    name, loss = _dispatch("arm_cross_entropy", backend, logits)
    if name == REFERENCE:
        return loss(logits, target, arm, ignore_index, arm_mode)
    return loss([logits], target, arm, terms)


def multiscale_consistency(
    logits_per_scale: Sequence[torch.Tensor],
    target: torch.Tensor,
    rho: float = 0.8,
    mask: str = "image",
    ignore_index: int = 255,
    backend: str = "auto",
) -> torch.Tensor:
    """ADELE's multiscale KL term; see `reference.multiscale_consistency`."""
    name, loss = _dispatch("multiscale_consistency", backend, logits_per_scale[0])
    if name == REFERENCE:
        return loss(logits_per_scale, target, rho, mask, ignore_index)
    return loss(logits_per_scale, target, None, LossTerms.consistency(rho, mask, ignore_index))


def adele_arm_loss(
    logits_per_scale: Sequence[torch.Tensor],
    target: torch.Tensor,
    arm: nn.Module | None,
    lam: float = 1.0,
    rho: float = 0.8,
    mask: str = "image",
    ignore_index: int = 255,
    backend: str = "auto",
    arm_mode: str = "table",
) -> torch.Tensor:
    """The combined ADELE+ARM loss; see `reference.adele_arm_loss` (``arm_mode`` as in
    `arm_cross_entropy`)."""
    terms = LossTerms.adele_arm(len(logits_per_scale), lam, rho, mask, ignore_index, arm_mode)
    name, loss = _dispatch("adele_arm_loss", backend, logits_per_scale[0])
    if name == REFERENCE:
        return loss(logits_per_scale, target, arm, lam, rho, mask, ignore_index, arm_mode)
    return loss(logits_per_scale, target, arm, terms)


def losses_on(backend: str, arm_mode: str | None = None) -> SimpleNamespace:
    """The three losses with `backend` fixed (``losses_on("numba").adele_arm_loss(...)``), and
    ARM's mode too when given, for tests and benchmarks that run one backend."""
    fixed_mode = {} if arm_mode is None else {"arm_mode": arm_mode}
    return SimpleNamespace(
        arm_cross_entropy=functools.partial(arm_cross_entropy, backend=backend, **fixed_mode),
        multiscale_consistency=functools.partial(multiscale_consistency, backend=backend),
        adele_arm_loss=functools.partial(adele_arm_loss, backend=backend, **fixed_mode),
    )
