"""Network passes outside the training step: multiscale forwards, prediction and evaluation.

The trainer (per-epoch validation/test, end-of-epoch label correction) and the `eval` command
share these; they hold no training state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from noisyseg.training.data import SplitArrays
from noisyseg.training.distributed import (
    SINGLE_PROCESS,
    DistContext,
    all_reduce_counts,
    shard_indices,
)
from noisyseg.training.io import json_float, json_floats
from noisyseg.training.metrics import ConfusionMeter, iou_per_class, mean_iou


def resize(tensor: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(tensor.shape[-2:]) == size:
        return tensor
    return F.interpolate(tensor, size=size, mode="bilinear", align_corners=True)


def forward_scales(model: nn.Module, images: torch.Tensor, scales: list[float]) -> list[torch.Tensor]:
    """Logits at label resolution for each input scale (bilinear, align_corners=True both ways)."""
    height, width = images.shape[-2:]
    outputs = []
    for scale in scales:
        scaled_size = (max(1, round(height * scale)), max(1, round(width * scale)))
        outputs.append(resize(model(resize(images, scaled_size)), (height, width)))
    return outputs


def mean_probabilities(logits_per_scale: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([torch.softmax(z.detach().float(), dim=1) for z in logits_per_scale]).mean(dim=0)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode (BatchNorm running statistics) for the block, then the previous mode again."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def predict_batches(model: nn.Module, images: torch.Tensor, batch_size: int, scales: list[float] | None = None) -> torch.Tensor:
    """Class probabilities (N, C, H, W) in eval mode, averaged over `scales` (default: 1.0 only)."""
    device = model_device(model)
    with eval_mode(model):
        chunks = [mean_probabilities(forward_scales(model, images[i : i + batch_size].to(device), scales or [1.0])) for i in range(0, len(images), batch_size)]
    return torch.cat(chunks)


@torch.no_grad()
def evaluate_split(model: nn.Module, split: SplitArrays, num_classes: int, ignore_index: int, batch_size: int, ctx: DistContext = SINGLE_PROCESS) -> dict[str, Any]:
    """Single-scale evaluation: {"per_class_iou", "miou", "miou_fg"} (NaN as None), dataset-level.

    With several ranks each evaluates its block of slices and the confusion counts are summed.
    """
    device = model_device(model)
    meter = ConfusionMeter(num_classes, ignore_index, device)  # counts on the model's device
    images = torch.from_numpy(split.images)
    block = shard_indices(len(images), ctx.rank, ctx.world_size)
    with eval_mode(model):
        for start in range(block.start, block.stop, batch_size):
            stop = min(start + batch_size, block.stop)
            prediction = model(images[start:stop].to(device)).argmax(dim=1)
            meter.update(prediction, torch.from_numpy(split.masks[start:stop]))
    matrix = all_reduce_counts(ctx, meter.matrix, "evaluation")
    return {
        "per_class_iou": json_floats(iou_per_class(matrix)),
        "miou": json_float(mean_iou(matrix, include_background=True)),
        "miou_fg": json_float(mean_iou(matrix, include_background=False)),
    }


def foreground_dict(values: Any) -> dict[str, float | None]:
    """{"1": v1, ...}: the foreground entries of a per-class sequence, JSON keys."""
    return {str(c): json_float(float(values[c])) for c in range(1, len(values))}
