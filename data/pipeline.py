"""The data pipeline: `torch.utils.data` datasets over a `SegmentationSource`, augmentation, loaders.

Items are read from disk when a batch needs them (`SegmentationSource.read`), normalised with
`data.normalize_image` and, for training, augmented as mmsegmentation does it: random rescale,
photometric jitter, random crop of a fixed size (padded: image with 0 after normalisation,
labels with the ignore index), horizontal flip; before them, optionally, NSegment's label-only
elastic deformation of the mask trained on (`deform_labels`). Every random draw of item `i` in
epoch `e` comes from `numpy.random.default_rng([seed, e, i])` (the label deformation's from
`[seed, e, i, LABEL_ELASTIC_STREAM]`, so switching it on leaves the other draws as they were),
never from a global generator, so the batches of a run do not depend on the number of workers,
on which worker reads what, or on whether the run was interrupted and resumed.

A training item carries its label maps (the store's current labels, the annotations trained on,
the clean masks when known) through the same geometry, and that geometry (`GEOMETRY_FIELDS`) so
a correction made on the crop can be written back into the store (`paste_back`).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch.utils.data import DataLoader, Dataset

from noisyseg.config import AugmentConfig, LoaderConfig, TrainConfig
from noisyseg.data.datasets.base import SegmentationSource
from noisyseg.data.folder import normalize_image
from noisyseg.data.label_store import LabelMaps, LabelStore

# A training item's geometry, int64: the item's index; the crop's top and left corner in the
# (rescaled) image; the height and width of the crop's part that lies inside the image (the rest
# is padding); whether the crop was flipped; whether the image was rescaled (then not invertible).
GEOMETRY_FIELDS = ("index", "top", "left", "valid_h", "valid_w", "flipped", "rescaled")
# The fourth entropy word of the label deformation's generator: its own stream per item and epoch.
LABEL_ELASTIC_STREAM = 1
# The longest side of the crop chosen when images differ in size and none is set (`default_crop`).
DEFAULT_CROP_MAX = 512

log = logging.getLogger(__name__)


def worker_count(num_workers: int) -> int:
    """`loader.num_workers` with -1 resolved: the CPU count minus one, at most 8."""
    return min(8, max(0, (os.cpu_count() or 1) - 1)) if num_workers < 0 else num_workers


class ImageDataset(Dataset):
    """One split for evaluation and prediction: (normalised image (C, H, W) float32, mask (H, W) int64)."""

    def __init__(self, source: SegmentationSource) -> None:
        self.source = source
        self.ids = source.ids

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.source.read(index)
        return torch.from_numpy(normalize_image(image, self.source.info.normalization)), torch.from_numpy(
            mask.astype(np.int64)
        )


def read_label_maps(source: SegmentationSource, workdir: str | None = None) -> LabelMaps:
    """Every mask of `source`, read once, into `LabelMaps` (memory-mapped in `workdir`)."""
    return LabelMaps.from_stream((source.read_mask(i) for i in range(len(source))), workdir)


def elastic_displacement(
    shape: tuple[int, int], alpha: float, sigma: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """NSegment's displacement field (dy, dx), pixels: uniform noise in [-1, 1] per pixel and axis,
    Gaussian-smoothed with `sigma` (mirrored borders, as OpenCV's GaussianBlur), times `alpha`."""
    dx = ndimage.gaussian_filter(rng.uniform(-1.0, 1.0, shape), sigma, mode="mirror") * alpha
    dy = ndimage.gaussian_filter(rng.uniform(-1.0, 1.0, shape), sigma, mode="mirror") * alpha
    return dy, dx


def warp_nearest(labels: np.ndarray, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """labels (h, w) resampled at (y + dy, x + dx), nearest neighbour, coordinates clipped to the
    image (OpenCV's remap with INTER_NEAREST, as NSegment warps): no new label value appears."""
    height, width = labels.shape
    yy, xx = np.mgrid[:height, :width]
    rows = np.clip(np.rint(yy + dy), 0, height - 1).astype(np.intp)
    cols = np.clip(np.rint(xx + dx), 0, width - 1).astype(np.intp)
    return labels[rows, cols]


def deform_labels(labels: np.ndarray, config: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """NSegment's label-only elastic deformation of one mask (h, w): with probability
    `label_elastic_p` warped by a field of a random (alpha, sigma) pair, else returned as is."""
    if rng.random() >= config.label_elastic_p:
        return labels
    alpha = float(rng.choice(config.label_elastic_alpha))
    sigma = float(rng.choice(config.label_elastic_sigma))
    return warp_nearest(labels, *elastic_displacement(labels.shape, alpha, sigma, rng))


@dataclass
class Augmenter:
    """The random part of the training pipeline (mmsegmentation's order: rescale, photometric
    jitter, pad and crop, flip)."""

    config: AugmentConfig
    ignore_index: int

    def __call__(
        self,
        image: np.ndarray,
        labels: np.ndarray,
        rng: np.random.Generator,
        label_rng: np.random.Generator | None = None,
    ) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """(image (C, h, w), labels (K, h, w), geometry [top, left, valid_h, valid_w, flipped, rescaled]).
        With `label_elastic`, `label_rng` deforms `labels[0]` (the mask trained on) alone, first."""
        config = self.config
        if config.label_elastic:
            if label_rng is None:
                raise ValueError(
                    "loader.augment.label_elastic: the label deformation needs its own generator (label_rng)"
                )
            labels = np.concatenate([deform_labels(labels[0], config, label_rng)[None], labels[1:]])
        rescaled = 0
        if config.rescale:
            scale = float(rng.uniform(*config.scale_range))
            height, width = image.shape[1:]
            size = (max(1, round(height * scale)), max(1, round(width * scale)))
            if size != (height, width):
                image = F.interpolate(torch.from_numpy(image)[None], size=size, mode="bilinear", align_corners=False)[
                    0
                ].numpy()
                labels = F.interpolate(torch.from_numpy(labels)[None], size=size, mode="nearest")[0].numpy()
                rescaled = 1
        if config.jitter:
            contrast = float(rng.uniform(1.0 - config.contrast, 1.0 + config.contrast))
            brightness = float(rng.uniform(-config.brightness, config.brightness))
            image = (image * contrast + brightness).astype(np.float32)
        top = left = 0
        valid_h, valid_w = image.shape[1:]
        if config.crop_size:
            crop_h, crop_w = config.crop_size
            height, width = image.shape[1:]
            top = int(rng.integers(0, max(height - crop_h, 0) + 1))
            left = int(rng.integers(0, max(width - crop_w, 0) + 1))
            image, labels = (
                image[:, top : top + crop_h, left : left + crop_w],
                labels[:, top : top + crop_h, left : left + crop_w],
            )
            valid_h, valid_w = image.shape[1:]
            pad = ((0, 0), (0, crop_h - valid_h), (0, crop_w - valid_w))
            if valid_h < crop_h or valid_w < crop_w:
                image = np.pad(image, pad, constant_values=0.0)
                labels = np.pad(labels, pad, constant_values=self.ignore_index)
        flipped = int(config.flip and rng.random() < 0.5)
        if flipped:
            image, labels = image[:, :, ::-1], labels[:, :, ::-1]
        return (
            np.ascontiguousarray(image),
            np.ascontiguousarray(labels),
            [top, left, valid_h, valid_w, flipped, rescaled],
        )


class TrainingItems(Dataset):
    """Training items keyed by (epoch, index): (image, label maps (K, h, w) uint8, geometry (7,)).

    The label maps are the store's current labels (read when the item is, so corrections made
    before the epoch are seen; the store is a shared file mapping, so workers see them too), the
    annotations trained on and, when known, the clean masks.
    """

    def __init__(
        self,
        source: SegmentationSource,
        store: LabelStore,
        annotations: LabelMaps,
        clean: LabelMaps | None,
        augment: AugmentConfig,
        seed: int,
    ) -> None:
        self.source = source
        self.store = store
        self.annotations = annotations
        self.clean = clean
        self.augmenter = Augmenter(augment, source.info.ignore_index)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        epoch, index = key
        image = normalize_image(self.source.read_image(index), self.source.info.normalization)
        sources = [self.store.maps, self.annotations, *([] if self.clean is None else [self.clean])]
        maps = np.stack([source[index] for source in sources])
        for source in sources:
            source.release(index)  # read once per epoch: keep no page of it resident
        if image.shape[1:] != maps.shape[1:]:
            raise ValueError(
                f"{self.source.image_path(index)}: "
                f"image size {image.shape[1:]} does not match its label map {maps.shape[1:]}"
            )
        rng = np.random.default_rng([self.seed, epoch, index])
        label_rng = np.random.default_rng([self.seed, epoch, index, LABEL_ELASTIC_STREAM])
        image, labels, geometry = self.augmenter(image, maps, rng, label_rng)
        return torch.from_numpy(image), torch.from_numpy(labels), torch.tensor([index, *geometry], dtype=torch.int64)


class EpochBatches:
    """The batch sampler: the trainer sets `batches` (lists of item indices) before each epoch."""

    def __init__(self) -> None:
        self.epoch = 0
        self.batches: list[list[int]] = []

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self.batches:
            yield [(self.epoch, index) for index in batch]

    def __len__(self) -> int:
        return len(self.batches)


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)  # workers resize on the CPU; one thread each leaves the cores to the step


def training_loader(
    items: TrainingItems, loader: LoaderConfig, device: torch.device
) -> tuple[DataLoader, EpochBatches]:
    """A DataLoader over `items` driven by an `EpochBatches` sampler (persistent workers)."""
    sampler = EpochBatches()
    workers = worker_count(loader.num_workers)
    data_loader = DataLoader(
        items,
        batch_sampler=sampler,
        num_workers=workers,
        pin_memory=loader.pin_memory and device.type == "cuda",
        persistent_workers=workers > 0,
        worker_init_fn=_one_thread if workers > 0 else None,
        # Its own generator: the base seed the DataLoader draws for its workers must not come
        # from torch's global RNG (part of the checkpoint), which a resumed run would draw from
        # once more. Items draw from their own (seed, epoch, index) generators anyway.
        generator=torch.Generator().manual_seed(0),
    )
    return data_loader, sampler


def region_of_crop(maps: LabelMaps, crop: np.ndarray, geometry: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the part of its image's map in `maps` that a crop (h, w) covers, as a writable view; the
    crop's pixels there, flip undone and padding dropped). ValueError for a rescaled crop."""
    index, top, left, valid_h, valid_w, flipped, rescaled = (int(v) for v in geometry)
    if rescaled:
        raise ValueError("a rescaled crop cannot be mapped back onto its image's map without resampling it")
    if flipped:
        crop = crop[:, ::-1]
    return maps[index][top : top + valid_h, left : left + valid_w], crop[:valid_h, :valid_w]


def paste_back(store: LabelStore, corrected: np.ndarray, geometry: np.ndarray) -> bool:
    """Write a corrected crop (h, w) into its image's stored map through the item's geometry
    (flip undone, padding dropped); True when the map changed."""
    if geometry[GEOMETRY_FIELDS.index("rescaled")]:
        raise ValueError(
            "label correction: a rescaled crop cannot be mapped back "
            "onto the stored labels; use adele.correction_timing=epoch"
        )
    target, crop = region_of_crop(store.maps, corrected, geometry)
    if np.array_equal(target, crop):
        return False
    target[...] = crop
    store.maps.release(int(geometry[0]))
    return True


def check_network_input_size(
    stride: int,
    network: str,
    shapes: Sequence[tuple[int, int]],
    scales: Sequence[float],
    augment: AugmentConfig,
    where: str,
) -> None:
    """Refuse training inputs the network cannot take: it halves its input down to 1/`stride`,
    so every side must be at least `stride` pixels at the smallest scale of the step (training
    forwards whole images or crops without padding them to the stride, as evaluation does)."""
    if augment.crop_size:
        height, width = augment.crop_size
        seen = f"crops of loader.augment.crop_size {list(augment.crop_size)}"
    else:
        height, width = min(shapes, key=min)
        seen = f"training images of {height}x{width} pixels"
    factor = min(scales) * (augment.scale_range[0] if augment.rescale else 1.0)
    reached = [max(1, round(side * factor)) for side in (height, width)]
    if min(reached) < stride:
        needed = math.ceil(stride / factor)
        raise ValueError(
            f"{where}: the {network} network (stride {stride}) "
            f"needs at least {stride} pixels per side; {seen} reach it at "
            f"{reached[0]}x{reached[1]} (scale {factor:.3g}); use images (or crops) "
            f"of at least {needed} pixels per side, or a shallower network"
        )


def default_crop(shapes: Sequence[tuple[int, int]], stride: int) -> list[int]:
    """The crop [height, width] training uses when its images differ in size and no
    `loader.augment.crop_size` is set: per side, the largest multiple of the network's `stride`
    that fits the smallest training image (so no crop is padded), at most DEFAULT_CROP_MAX."""
    heights, widths = zip(*shapes)
    return [
        max(stride, min(DEFAULT_CROP_MAX // stride * stride, min(sides) // stride * stride))
        for sides in (heights, widths)
    ]


def with_default_crop(config: TrainConfig, shapes: Sequence[tuple[int, int]], stride: int, where: str) -> TrainConfig:
    """`config`, or when the training images differ in size and no crop is set (batches stack
    items of one size) a copy that crops them to `default_crop`, said in one log line."""
    sizes = sorted(set(shapes))
    if len(sizes) < 2 or config.loader.augment.crop_size:
        return config
    crop = default_crop(sizes, stride)
    listed = ", ".join(f"{h}x{w}" for h, w in sizes[:3]) + (" ..." if len(sizes) > 3 else "")
    log.info(
        "%s: training images differ in size (%s) and loader.augment.crop_size is not set: training on random "
        "%dx%d crops (per side the largest multiple of the network's stride %d that fits the smallest image, "
        "at most %d; set loader.augment.crop_size to choose)",
        where,
        listed,
        crop[0],
        crop[1],
        stride,
        DEFAULT_CROP_MAX,
    )
    augment = replace(config.loader.augment, crop_size=crop)
    return replace(config, loader=replace(config.loader, augment=augment))
