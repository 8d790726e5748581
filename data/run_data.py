"""A run's data: the dataset's splits as a training run reads them, cached in memory or as
sources read on demand (`RunData`, `load_run_data`), and whole splits loaded into arrays
(`load_split`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from noisyseg.config import TrainConfig
from noisyseg.data.datasets import LAYOUTS, open_source, resolve_layout
from noisyseg.data.datasets.folder import FolderSource
from noisyseg.data.folder import (
    DatasetInfo,
    SplitArrays,
    check_labels_source,
    check_mask_values,
    has_split_masks,
    normalize_image,
    read_dataset_info,
    split_file,
)
from noisyseg.data.label_store import as_label_maps
from noisyseg.data.pipeline import ImageDataset, read_label_maps

log = logging.getLogger(__name__)


def load_split(
    root: str | Path, split: str, labels_root: str | Path | None = None, normalize: bool = True
) -> SplitArrays:
    """Load a whole split into memory (CPU training keeps everything there): images normalised
    as the dataset says (`normalize_image`), or raw pixels with `normalize=False`, which is what
    an exported model takes (it normalises inside its graph)."""
    source = FolderSource(root, split, labels_root)
    pairs = [source.read(index) for index in range(len(source))]
    shapes = {image.shape for image, _ in pairs}
    if len(shapes) > 1:
        raise ValueError(
            f"{split_file(root, split)}: slices of split '{split}' differ "
            f"in size/channels {sorted(shapes)}; stacking needs one size"
        )
    images = np.stack(
        [
            normalize_image(image, source.info.normalization) if normalize else image.astype(np.float32)
            for image, _ in pairs
        ]
    )
    masks = np.stack([mask for _, mask in pairs])
    return SplitArrays(images=images, masks=masks, ids=source.ids)


@dataclass
class RunData:
    """Everything a run reads: in memory (`loader.cache`) or as sources read on demand.

    Cached: `train_images` holds the normalised training split and `val`/`test` are in-memory
    `SplitArrays`. Streamed: `train_images` is None, `train_source` reads the training items and
    `val`/`test` are `pipeline.ImageDataset`s; the label maps are memory-mapped from the run
    directory. Either way `val`/`test` are sequences of (image, mask) tensors.
    """

    info: DatasetInfo
    train_images: torch.Tensor | None  # (N, C, H, W) float32 when cached
    train_labels: Any  # label_store.LabelMaps (an (N, H, W) uint8 array is converted): the annotations, never modified
    train_ids: list[str]
    clean_train_labels: Any  # LabelMaps or None: the data folder's masks when --labels replaces them
    val: Any
    test: Any
    train_source: Any = None  # datasets.SegmentationSource when streamed
    in_channels: int = 0
    # The validation split with the labels folder's (noisy) masks, when it holds them: what the
    # checkpoint is selected on (`selection.py`); `val` keeps the dataset's masks.
    noisy_val: Any = None

    def __post_init__(self) -> None:
        self.train_labels = as_label_maps(self.train_labels)
        if self.clean_train_labels is not None:
            self.clean_train_labels = as_label_maps(self.clean_train_labels)
        if not self.in_channels and self.train_images is not None:
            self.in_channels = int(self.train_images.shape[1])

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    @property
    def cached(self) -> bool:
        return self.train_images is not None


def use_cache(config: TrainConfig, layout: str) -> bool:
    """`loader.cache`, or when empty: cached for the folder layout without random augmentation."""
    if config.loader.cache is not None:
        return config.loader.cache
    return layout == "folder" and not config.loader.augment.random


def test_split(root: str | Path, layout: str, options: dict[str, Any]) -> str:
    """`test`, or `val` for a dataset without a labelled test split (PASCAL VOC keeps its test
    masks private): the run's test metrics then repeat the validation split's, and say so."""
    if "test" in LAYOUTS[layout][0].splits(root, **options):
        return "test"
    log.warning(
        "%s: no labelled test split in this %s dataset; the run's test metrics are computed on val", root, layout
    )
    return "val"


def load_run_data(config: TrainConfig, workdir: str | Path | None = None) -> RunData:
    """The train split (labels from `config.labels` if set) and the clean val/test splits,
    cached in memory or as sources read on demand (`use_cache`); streamed label maps are
    memory-mapped from unlinked files in `workdir` (the run directory)."""
    if config.layout != "auto" and config.layout not in LAYOUTS:
        raise ValueError(f"config field 'layout': expected auto or one of {', '.join(LAYOUTS)}, got {config.layout!r}")
    # Checked here too: the cached folder path below never opens a source.
    layout = resolve_layout(config.data, config.layout, config.layout_options)
    options = dict(config.layout_options)
    if config.labels and layout == "folder":
        check_labels_source(config.data, config.labels)
    labels_options = {**options, "labels_root": config.labels} if config.labels and layout == "folder" else options
    # A folder without a validation split evaluates an empty one (no validation mIoU: the
    # checkpoint is then selected without masks); noisy validation masks come from the labels folder.
    has_val = layout != "folder" or split_file(config.data, "val").is_file()
    if not has_val:
        log.warning(
            "%s: no validation split (%s); the checkpoint is selected without validation masks (label-free)",
            config.data,
            split_file(config.data, "val"),
        )
    noisy_val = bool(config.labels) and layout == "folder" and has_split_masks(config.data, config.labels, "val")
    if use_cache(config, layout):
        if layout != "folder":
            raise ValueError(
                "loader.cache: the in-memory mode reads noisyseg's folder layout only, "
                f"{config.data} is '{layout}'; set loader.cache=false"
            )
        train = load_split(config.data, "train", labels_root=config.labels)
        val = load_split(config.data, "val") if has_val else []
        return RunData(
            info=read_dataset_info(config.data),
            train_images=torch.from_numpy(train.images),
            train_labels=train.masks,
            train_ids=train.ids,
            clean_train_labels=load_split(config.data, "train").masks if config.labels else None,
            val=val,
            test=load_split(config.data, "test"),
            noisy_val=SplitArrays(
                val.images,
                read_masks(open_source(config.data, "val", layout, **labels_options), val.masks.shape[1:]),
                val.ids,
            )
            if noisy_val
            else None,
        )
    workdir = None if workdir is None else str(workdir)
    train_source = open_source(config.data, "train", layout, **labels_options)
    clean = read_label_maps(open_source(config.data, "train", layout, **options), workdir) if config.labels else None
    return RunData(
        info=train_source.info,
        train_images=None,
        train_labels=read_label_maps(train_source, workdir),
        train_ids=list(train_source.ids),
        clean_train_labels=clean,
        val=ImageDataset(open_source(config.data, "val", layout, **options)) if has_val else [],
        test=ImageDataset(open_source(config.data, test_split(config.data, layout, options), layout, **options)),
        train_source=train_source,
        in_channels=int(train_source.read_image(0).shape[0]),
        noisy_val=ImageDataset(open_source(config.data, "val", layout, **labels_options)) if noisy_val else None,
    )


def read_masks(source: Any, shape: tuple[int, ...]) -> np.ndarray:
    """Every mask of a split's source, stacked (N, H, W) uint8, checked: (H, W) = `shape`, class
    ids in range."""
    masks = []
    for index in range(len(source)):
        mask = source.read_mask(index)
        if mask.shape != tuple(shape):
            raise ValueError(
                f"{source.mask_path(index)}: mask of {mask.shape[0]}x{mask.shape[1]} pixels, "
                f"its image has {shape[0]}x{shape[1]}"
            )
        check_mask_values(mask, source.info.num_classes, source.info.ignore_index, source.mask_path(index))
        masks.append(mask)
    return np.stack(masks)
