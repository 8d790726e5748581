"""Where a training step's batch comes from: one interface, two sources (MONAI's `Dataset`
and `CacheDataset` share theirs).

- `CachedBatches` (`loader.cache`): the training split, its annotations and the clean masks
  when known live on the training device (on the CPU they share the arrays' memory); a step's
  labels are rows of the device copy of the label store that corrections write into.
- `StreamedBatches`: a DataLoader (`data/pipeline.py`) reads and augments each batch's items;
  the label store stays on the host, one memory-mapped map per image, and corrections of crops
  go back through each crop's flip and crop.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from noisyseg.config import TrainConfig
from noisyseg.data.pipeline import (
    EpochBatches,
    ImageDataset,
    TrainingItems,
    training_loader,
    worker_count,
)
from noisyseg.data.run_data import RunData
from noisyseg.evaluation.inference import (
    predict_batches,
    predict_image,
    split_items,
    worker_errors_as_raised,
)
from noisyseg.methods.correction import LabelCorrections
from noisyseg.runtime.device import Precision


@dataclass
class Batch:
    """One step's inputs: `rows` of the training split, their images and current labels, the
    annotations and clean masks when clean masks are known, and streamed crops' geometry."""

    rows: torch.Tensor
    images: torch.Tensor
    target: torch.Tensor
    annotations: torch.Tensor | None = None
    clean: torch.Tensor | None = None
    geometry: torch.Tensor | None = None


class BatchSource:
    """What the loop asks of a batch source: `start_epoch` with this rank's shards, then
    `next(rows)` for each step (read when its step comes, so it sees the corrections of the
    steps before), `correct_whole_images` (the `epoch`-timing correction over this rank's block
    of whole training images: the changed pixel count on the device), and `close`."""

    eval_workers = 0  # DataLoader workers for evaluation passes

    def __init__(
        self,
        config: TrainConfig,
        data: RunData,
        corrections: LabelCorrections,
        device: torch.device,
        memory_format: torch.memory_format,
    ) -> None:
        self.config, self.data, self.corrections = config, data, corrections
        self.device, self.memory_format = device, memory_format
        self.prepare()

    def prepare(self) -> None:
        """A source's own set-up, after the shared fields are set."""

    def start_epoch(self, epoch: int, shards: list[Any]) -> None:
        """Nothing to prepare: rows are read when their step comes."""

    def close(self) -> None:
        """Nothing runs in the background."""


class CachedBatches(BatchSource):
    def prepare(self) -> None:
        data, device = self.data, self.device
        assert data.train_images is not None
        self.images = data.train_images.to(device)
        self.annotations = torch.from_numpy(data.train_labels.stacked()).to(device)
        clean = data.clean_train_labels
        self.clean = None if clean is None else torch.from_numpy(clean.stacked()).to(device)

    def next(self, rows: torch.Tensor) -> Batch:
        rows = rows.to(self.device)
        images = self.images[rows].contiguous(memory_format=self.memory_format)
        target = self.corrections.labels[rows].long()
        if self.clean is None:
            return Batch(rows, images, target)
        return Batch(rows, images, target, self.annotations[rows], self.clean[rows])

    def correct_whole_images(
        self, model: nn.Module, precision: Precision, block: range, scales: list[float], classes: torch.Tensor
    ) -> torch.Tensor:
        """`epoch` timing: predict this rank's `block` of training images, correct their rows."""
        if not len(block):
            return torch.zeros((), dtype=torch.int64, device=self.device)
        with precision.autocast(self.device):
            images = self.images[block.start : block.stop]
            probs = predict_batches(
                model, images, self.config.eval_batch_size, scales, self.config.adele.correction_flip
            )
        rows = torch.arange(block.start, block.stop, device=self.device)
        return self.corrections.correct_rows(rows, self.corrections.labels[rows].long(), probs, classes)


class StreamedBatches(BatchSource):
    def prepare(self) -> None:
        self.eval_workers = worker_count(self.config.loader.num_workers)
        self.loader: DataLoader | None = None
        self.sampler: EpochBatches | None = None
        self.items: Iterator[Any] | None = None

    def start_epoch(self, epoch: int, shards: list[Any]) -> None:
        """This epoch's batches (this rank's shards) from the DataLoader, built once after any
        checkpoint was restored, so its workers map the store that training continues from."""
        if self.loader is None:
            data = self.data
            items = TrainingItems(
                data.train_source,
                self.corrections.store,
                data.train_labels,
                data.clean_train_labels,
                self.config.loader.augment,
                self.config.seed,
            )
            self.loader, self.sampler = training_loader(items, self.config.loader, self.device)
        assert self.sampler is not None
        self.sampler.epoch = epoch
        self.sampler.batches = [shard.rows.tolist() for shard in shards]
        self.items = worker_errors_as_raised(iter(self.loader))

    def next(self, rows: torch.Tensor) -> Batch:
        assert self.items is not None
        images, maps, geometry = next(self.items)
        images = images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        maps = maps.to(self.device, non_blocking=True)
        clean = maps[:, 2] if maps.shape[1] > 2 else None
        return Batch(rows, images, maps[:, 0].long(), maps[:, 1], clean, geometry)

    def correct_whole_images(
        self, model: nn.Module, precision: Precision, block: range, scales: list[float], classes: torch.Tensor
    ) -> torch.Tensor:
        """`epoch` timing: each whole training image of `block`, unaugmented, at its own size."""
        changed = torch.zeros((), dtype=torch.int64, device=self.device)
        items = split_items(ImageDataset(self.data.train_source), block, self.eval_workers)
        for index, (image, _) in zip(block, items, strict=True):
            with precision.autocast(self.device):
                probs = predict_image(model, image[None].to(self.device), scales, self.config.adele.correction_flip)
            changed += self.corrections.correct_item(index, probs, classes)
        return changed

    def close(self) -> None:
        """Stop the DataLoader's workers."""
        self.loader = self.sampler = self.items = None
