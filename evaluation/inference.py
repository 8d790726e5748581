"""Network passes outside the training step: multiscale forwards, prediction and evaluation.

The trainer (per-epoch validation/test, end-of-epoch label correction) and the `eval` command
share these; they hold no training state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from noisyseg.evaluation.metrics import ConfusionMeter, confusion_matrix, iou_per_class, mean_iou
from noisyseg.io import json_float, json_floats
from noisyseg.runtime.distributed import (
    SINGLE_PROCESS,
    DistContext,
    all_reduce_counts,
    shard_indices,
)


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
def predict_batches(
    model: nn.Module, images: torch.Tensor, batch_size: int, scales: list[float] | None = None, flip: bool = False
) -> torch.Tensor:
    """Class probabilities (N, C, H, W) in eval mode, averaged over `scales` (default: 1.0 only)
    and, with `flip`, over each scale's horizontally flipped view too (flipped back)."""
    device = model_device(model)

    def views(batch: torch.Tensor) -> list[torch.Tensor]:
        logits = forward_scales(model, batch, scales or [1.0])
        return logits + [z.flip(-1) for z in forward_scales(model, batch.flip(-1), scales or [1.0])] if flip else logits

    with eval_mode(model):
        chunks = [
            mean_probabilities(views(images[i : i + batch_size].to(device))) for i in range(0, len(images), batch_size)
        ]
    return torch.cat(chunks)


def pad_to_stride(images: torch.Tensor, stride: int) -> torch.Tensor:
    """Zero-pad (bottom, right) to multiples of `stride` (a normalised image's 0 is its mean)."""
    height, width = images.shape[-2:]
    pad_h, pad_w = -height % stride, -width % stride
    return F.pad(images, (0, pad_w, 0, pad_h)) if pad_h or pad_w else images


def whole_image_logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Logits of images of any size: padded to the network's stride, cropped back."""
    height, width = images.shape[-2:]
    stride = getattr(model, "stride", 1)  # noisyseg's models' total stride (a bare layer's is a tuple)
    return model(pad_to_stride(images, stride if isinstance(stride, int) else 1))[..., :height, :width]


def sliding_window_probabilities(model: nn.Module, image: torch.Tensor, window: int, overlap: float) -> torch.Tensor:
    """Softmax (1, K, H, W) of one large image from `window`-sized tiles, averaged where they overlap."""
    height, width = image.shape[-2:]
    step = max(1, int(window * (1.0 - overlap)))
    tops = sorted({*range(0, max(height - window, 0) + 1, step), max(height - window, 0)})
    lefts = sorted({*range(0, max(width - window, 0) + 1, step), max(width - window, 0)})
    total: torch.Tensor | None = None
    count = torch.zeros((1, 1, height, width), device=image.device)
    for top in tops:
        for left in lefts:
            tile = image[..., top : top + window, left : left + window]
            probs = torch.softmax(whole_image_logits(model, tile).float(), dim=1)
            if total is None:
                total = torch.zeros((1, probs.shape[1], height, width), device=image.device)
            total[..., top : top + window, left : left + window] += probs
            count[..., top : top + window, left : left + window] += 1
    assert total is not None
    return total / count


def same_size_batches(
    items: Iterator[tuple[torch.Tensor, torch.Tensor]], batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive items of one size stacked into batches of at most `batch_size`."""
    images: list[torch.Tensor] = []
    masks: list[torch.Tensor] = []
    for image, mask in items:
        if images and (len(images) == batch_size or image.shape != images[0].shape):
            yield torch.stack(images), torch.stack(masks)
            images, masks = [], []
        images.append(image)
        masks.append(mask)
    if images:
        yield torch.stack(images), torch.stack(masks)


def split_items(split: Sequence[Any], block: range, num_workers: int = 0) -> Iterator[Any]:
    """Items `block` of a split (in memory, or read by `num_workers` DataLoader workers)."""
    if num_workers == 0:
        return (split[i] for i in block)
    return worker_errors_as_raised(
        iter(DataLoader(Subset(split, list(block)), batch_size=None, num_workers=num_workers))
    )


def worker_errors_as_raised(items: Iterator[Any]) -> Iterator[Any]:
    """`items` of a DataLoader, with a worker's ValueError or OSError (a reader's one-line error
    naming the file) raised with its own message: torch re-raises it with the worker's traceback
    folded into the message, which the command line would print whole."""
    try:
        yield from items
    except (ValueError, OSError) as err:
        text = str(err)
        _, sep, message = text.strip().splitlines()[-1].partition(": ")
        if "DataLoader worker" not in text or not sep:
            raise
        raise type(err)(message) from err


def split_predictions(
    model: nn.Module,
    items: Iterator[tuple[torch.Tensor, torch.Tensor]],
    batch_size: int,
    window: int = 0,
    overlap: float = 0.33,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(predicted classes, masks) per batch of `items` on the model's device, single-scale:
    images are evaluated whole at their own size, those of one size in batches; an image larger
    than `window` (pixels, 0 = never) in either dimension by a sliding window."""
    device = model_device(model)
    with eval_mode(model):
        for images, masks in same_size_batches(items, batch_size):
            images = images.to(device)
            if window and max(images.shape[-2:]) > window:
                prediction = torch.cat(
                    [sliding_window_probabilities(model, image[None], window, overlap) for image in images]
                ).argmax(dim=1)
            else:
                prediction = whole_image_logits(model, images).argmax(dim=1)
            yield prediction, masks


@torch.no_grad()
def evaluate_split(
    model: nn.Module,
    split: Sequence[Any],
    num_classes: int,
    ignore_index: int,
    batch_size: int,
    ctx: DistContext = SINGLE_PROCESS,
    window: int = 0,
    overlap: float = 0.33,
    num_workers: int = 0,
) -> dict[str, Any]:
    """Single-scale evaluation (`split_predictions`): {"per_class_iou", "miou", "miou_fg"} (NaN
    as None), dataset-level.

    `split` is a sequence of (image (C, H, W), mask (H, W)) tensors (`SplitArrays`, or a pipeline
    `ImageDataset` reading each from disk). With several ranks each evaluates its block of items
    and the counts are summed.
    """
    meter = ConfusionMeter(num_classes, ignore_index, model_device(model))  # counts on the model's device
    block = shard_indices(len(split), ctx.rank, ctx.world_size)
    items = split_items(split, block, num_workers)
    for prediction, masks in split_predictions(model, items, batch_size, window, overlap):
        meter.update(prediction, masks)
    matrix = all_reduce_counts(ctx, meter.matrix, "evaluation")
    return {
        "per_class_iou": json_floats(iou_per_class(matrix)),
        "miou": json_float(mean_iou(matrix, include_background=True)),
        "miou_fg": json_float(mean_iou(matrix, include_background=False)),
    }


@torch.no_grad()
def per_image_confusion(
    model: nn.Module,
    split: Sequence[Any],
    num_classes: int,
    ignore_index: int,
    batch_size: int,
    window: int = 0,
    overlap: float = 0.33,
) -> np.ndarray:
    """(images, C, C) int64: each image's confusion matrix (rows target, columns prediction),
    predicted as `evaluate_split` does; their sum is its dataset-level matrix."""
    matrices = [
        confusion_matrix(pred, mask, num_classes, ignore_index)
        for prediction, masks in split_predictions(
            model, split_items(split, range(len(split))), batch_size, window, overlap
        )
        for pred, mask in zip(prediction, masks.to(prediction.device))
    ]
    return np.stack(matrices) if matrices else np.zeros((0, num_classes, num_classes), np.int64)


@torch.no_grad()
def predict_image(model: nn.Module, image: torch.Tensor, scales: list[float], flip: bool = False) -> torch.Tensor:
    """Class probabilities (1, K, H, W) of one image of any size, in eval mode, averaged over
    `scales` (each scaled input padded to the network's stride, its logits cropped and resized
    back) and, with `flip`, over each scale's horizontally flipped view too (flipped back)."""
    height, width = image.shape[-2:]
    with eval_mode(model):
        logits = []
        for view, flipped in [(image, False), *([(image.flip(-1), True)] if flip else [])]:
            for scale in scales:
                size = (max(1, round(height * scale)), max(1, round(width * scale)))
                z = resize(whole_image_logits(model, resize(view, size)), (height, width))
                logits.append(z.flip(-1) if flipped else z)
        return mean_probabilities(logits)


def foreground_dict(values: Any) -> dict[str, float | None]:
    """{"1": v1, ...}: the foreground entries of a per-class sequence, JSON keys."""
    return {str(c): json_float(float(values[c])) for c in range(1, len(values))}
