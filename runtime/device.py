"""Where a run computes and in which precision: `--device` and `--precision`, resolved once.

`resolve_device("auto")` is CUDA when this torch sees a GPU (the local rank's under torchrun),
else the CPU. `resolve_precision("auto", device)` is bf16 on a CUDA device that supports it
(Ampere and newer), fp32 elsewhere: bf16 needs no loss scaling and halves the activations'
memory, while on the CPU fp32 stays the default because the exact-resume guarantee is stated
for it (bf16 autocast works there too and is tested) and because bf16 moved Table 1's accuracy
by more than the ±1 point allowed for that switch (5 paired seeds, docs/results.md).

`Precision.autocast(device)` wraps the network's forward (never the loss: the fused kernels read
half-precision logits and accumulate in fp32, and ARM with its optimiser stays fp32); fp16 also
needs `Precision.grad_scaler(device)`, a `torch.amp.GradScaler` (disabled for the others).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from noisyseg.config import DEVICES, PRECISIONS, valid_device_name


def resolve_device(name: str, local_rank: int = 0, field: str = "device") -> torch.device:
    """The torch device for a `--device` value; `cuda` is the local rank's GPU under torchrun.

    ValueError names `field` when the value is malformed or asks for a GPU this process lacks.
    """
    if not valid_device_name(name):
        raise ValueError(f"{field}: expected one of {', '.join(DEVICES)}, got {name!r}")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        build = (
            f"this torch {torch.__version__} is built without CUDA"
            if torch.version.cuda is None
            else "torch.cuda.is_available() is False (no GPU or driver visible)"
        )
        raise ValueError(f"{field}: {name!r} asks for a CUDA GPU, but {build}; use --device cpu or auto")
    index = local_rank if name in ("auto", "cuda") else int(name.partition(":")[2])
    count = torch.cuda.device_count()
    if index >= count:
        raise ValueError(f"{field}: {name!r} resolves to GPU {index}, but this process sees {count} GPU(s)")
    return torch.device("cuda", index)


@dataclass(frozen=True)
class Precision:
    """A resolved precision: its name and the autocast dtype (None for fp32)."""

    name: str
    dtype: torch.dtype | None

    @property
    def needs_scaler(self) -> bool:
        return self.dtype == torch.float16

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager[object]:
        """Autocast for the network's forward on `device`; a no-op context for fp32."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)

    def grad_scaler(self, device: torch.device) -> torch.amp.GradScaler:
        """Loss scaling for fp16 (disabled, a pass-through, for bf16 and fp32)."""
        return torch.amp.GradScaler(device.type, enabled=self.needs_scaler)


_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(name: str, device: torch.device, field: str = "precision") -> Precision:
    """`auto` -> bf16 on a CUDA device that supports it, else fp32; ValueError names `field`."""
    if name not in PRECISIONS:
        raise ValueError(f"{field}: expected one of {', '.join(PRECISIONS)}, got {name!r}")
    if name == "auto":
        name = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"{field}: bf16 is not supported by {torch.cuda.get_device_name(device)}; use fp16 or fp32")
    return Precision(name, _DTYPES[name])
