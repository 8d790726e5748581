"""The contract of a dataset layout: the split's item ids, a `DatasetInfo`, raw items on demand.

A source never holds the split in memory: `read(index)` opens the item's files each time, so a
`torch.utils.data` pipeline (or any other reader) can stream datasets of any size and of images
of different sizes. Images come back raw (Hounsfield units, 0-255 RGB) as float32 (C, H, W) and
masks as uint8 (H, W) class ids with `info.ignore_index` for unlabelled pixels; normalisation
(`data.normalize_image` with `info.normalization`) and augmentation belong to the pipeline.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from noisyseg.data.folder import SPLITS, DatasetInfo, check_mask_values


class SegmentationSource(ABC):
    """One split of a dataset in one layout."""

    layout: str = ""

    def __init__(self, root: str | Path, split: str, info: DatasetInfo, ids: list[str]) -> None:
        if not ids:
            raise ValueError(f"{root}: split '{split}' holds no items")
        self.root = Path(root)
        self.split = split
        self.info = info
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def splits(cls, root: str | Path, **options: Any) -> list[str]:
        """The splits `root` holds in this layout (`data inspect` walks them); by default the
        standard three."""
        return list(SPLITS)

    @classmethod
    def option_names(cls) -> list[str]:
        """The layout's options: its constructor's keyword parameters after `root` and `split`
        (the one place a layout declares them)."""
        parameters = list(inspect.signature(cls.__init__).parameters.values())[3:]
        return [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]

    @abstractmethod
    def read_image(self, index: int) -> np.ndarray:
        """Item `index`'s image, raw, float32 (C, H, W)."""

    @abstractmethod
    def read_mask(self, index: int) -> np.ndarray:
        """Item `index`'s mask, uint8 (H, W) class ids, `info.ignore_index` = unlabelled."""

    @abstractmethod
    def image_path(self, index: int) -> Path:
        """The file `read_image(index)` reads (named in errors)."""

    @abstractmethod
    def mask_path(self, index: int) -> Path:
        """The file `read_mask(index)` reads (named in errors)."""

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(image, mask) of item `index`, checked: same size, class ids in range."""
        image, mask = self.read_image(index), self.read_mask(index)
        if image.shape[1:] != mask.shape:
            raise ValueError(
                f"{self.mask_path(index)}: mask size {mask.shape} does not "
                f"match image {self.image_path(index)} size {image.shape[1:]}"
            )
        check_mask_values(mask, self.info.num_classes, self.info.ignore_index, self.mask_path(index))
        return image, mask


def read_rgb_image(path: Path) -> np.ndarray:
    """An 8-bit image file (PNG, JPEG) as float32 (3, H, W) RGB, 0-255; greyscale is expanded."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image not found")
    try:
        with Image.open(path) as img:
            array = np.asarray(img.convert("RGB"))
    except Exception as err:  # PIL raises many error types for damaged files
        raise ValueError(f"{path}: unreadable image ({err})") from err
    return np.ascontiguousarray(np.moveaxis(array, -1, 0), dtype=np.float32)


def read_index_png(path: Path, what: str) -> np.ndarray:
    """A PNG of indices (greyscale `L` or palette `P`, whose pixel values are the indices, never
    converted to colours) as uint8 (H, W); `what` names the file's role in errors."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} not found")
    try:
        with Image.open(path) as img:
            mode = img.mode
            array = np.asarray(img) if mode in ("L", "P") else None
    except Exception as err:
        raise ValueError(f"{path}: unreadable {what} ({err})") from err
    if array is None:
        raise ValueError(f"{path}: {what} must be a greyscale (L) or palette (P) PNG of indices, got mode {mode}")
    return np.ascontiguousarray(array, dtype=np.uint8)


# Layout name -> (class, detector: does this root hold the layout?), in detection order.
LAYOUTS: dict[str, tuple[type[SegmentationSource], Callable[[Path], bool]]] = {}


def register_layout(
    name: str, detector: Callable[[Path], bool]
) -> Callable[[type[SegmentationSource]], type[SegmentationSource]]:
    """Class decorator: add a layout to `LAYOUTS` under `name`."""

    def add(cls: type[SegmentationSource]) -> type[SegmentationSource]:
        cls.layout = name
        LAYOUTS[name] = (cls, detector)
        return cls

    return add


def detect_layout(root: str | Path) -> str:
    """The name of the first registered layout whose detector accepts `root`."""
    path = Path(root)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: data folder not found")
    for name, (_, detector) in LAYOUTS.items():
        if detector(path):
            return name
    raise ValueError(
        f"{path}: not a dataset folder of any supported layout ({', '.join(LAYOUTS)}); see docs/training.md"
    )


def resolve_layout(root: str | Path, layout: str = "auto", options: Mapping[str, Any] | None = None) -> str:
    """The layout name of `root` (`auto`: detected from its structure), with `options` checked
    against the options that layout declares: an unknown one (a typo, or another layout's) is
    refused naming the known ones, wherever the options come from (`train`'s `layout_options`,
    `--option` of `data inspect`, `export` and `review`)."""
    name = detect_layout(root) if layout == "auto" else layout
    if name not in LAYOUTS:
        raise ValueError(f"data layout: expected auto or one of {', '.join(LAYOUTS)}, got {layout!r}")
    known = LAYOUTS[name][0].option_names()
    unknown = sorted(set(options or {}) - set(known))
    if unknown:
        raise ValueError(
            f"{name} layout of {root}: unknown option(s) {', '.join(unknown)}; known: {', '.join(known) or 'none'}"
        )
    return name


def open_source(root: str | Path, split: str, layout: str = "auto", **options: Any) -> SegmentationSource:
    """Split `split` of the dataset at `root`, in `layout` (`auto`: detected from its structure).

    `options` go to the layout's constructor (for example `labels_root` for the folder layout).
    """
    return LAYOUTS[resolve_layout(root, layout, options)][0](root, split, **options)
