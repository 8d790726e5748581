"""Raw images of a dataset in any supported layout, batched for an exported model.

An exported graph takes raw pixels (it normalises itself) with a dynamic height and width that
must be multiples of the model's stride (`stride` in its metadata). `shape_batches` stacks
consecutive items of one shape, up to a batch size, and zero-pads each batch on the bottom and
right to the stride; predictions are cropped back to `sizes`. Data of one size whose size is a
multiple of the stride thus gives exactly the batches a stacked split gives.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np

from noisyseg.data.datasets import SegmentationSource, open_source

T = TypeVar("T")


def open_data(
    root: str | Path, split: str, layout: str = "auto", options: Mapping[str, Any] | None = None
) -> SegmentationSource:
    """Split `split` of the dataset at `root` (`layout` and its `options` as `open_source` takes them)."""
    return open_source(root, split, layout, **dict(options or {}))


def metadata_stride(metadata: Mapping[str, str]) -> int:
    """The size multiple an exported model needs (its `stride` metadata; 1 when absent)."""
    return int(metadata.get("stride", "1") or 1)


def pad_to_stride(images: np.ndarray, stride: int) -> np.ndarray:
    """Zero-pad (N, C, H, W) raw images on the bottom and right to multiples of `stride`."""
    pad_h, pad_w = -images.shape[-2] % stride, -images.shape[-1] % stride
    if not (pad_h or pad_w):
        return images
    return np.pad(images, ((0, 0), (0, 0), (0, pad_h), (0, pad_w)))


@dataclass
class ImageBatch(Generic[T]):
    """Images of one shape, stacked and padded to the stride; `size` is their unpadded (H, W)."""

    images: np.ndarray
    items: list[T]
    size: tuple[int, int]

    def crop(self, predictions: np.ndarray) -> np.ndarray:
        """Predictions (N, ..., H', W') cropped back to the images' own size."""
        return predictions[..., : self.size[0], : self.size[1]]


def shape_batches(pairs: Iterable[tuple[np.ndarray, T]], batch_size: int, stride: int) -> Iterator[ImageBatch[T]]:
    """Consecutive (image (C, H, W), item) pairs of one image shape, up to `batch_size` per batch,
    stacked as float32 and padded to `stride`."""
    images: list[np.ndarray] = []
    items: list[T] = []

    def flush() -> ImageBatch[T]:
        stacked = np.stack(images).astype(np.float32, copy=False)
        batch = ImageBatch(
            np.ascontiguousarray(pad_to_stride(stacked, stride)), list(items), (stacked.shape[-2], stacked.shape[-1])
        )
        images.clear()
        items.clear()
        return batch

    for image, item in pairs:
        if images and (image.shape != images[0].shape or len(images) == batch_size):
            yield flush()
        images.append(image)
        items.append(item)
    if images:
        yield flush()


def source_pairs(
    source: SegmentationSource, indices: Iterable[int] | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(raw image, mask) of each item of `source` (all, or `indices`), read on demand."""
    for index in range(len(source)) if indices is None else indices:
        yield source.read(index)
