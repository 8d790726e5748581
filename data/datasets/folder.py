"""noisyseg's own folder layout (`data phantom` writes it; docs/architecture.md, "Dataset folder")."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from noisyseg.data.datasets.base import SegmentationSource, register_layout
from noisyseg.data.folder import (
    DATASET_FILE,
    IMAGE_DIR,
    IMAGE_SUFFIXES,
    MASK_DIR,
    MASK_SUFFIXES,
    find_slice_file,
    read_dataset_info,
    read_image,
    read_mask,
    read_split_ids,
)


def _is_folder_layout(root: Path) -> bool:
    return (root / DATASET_FILE).is_file()


@register_layout("folder", _is_folder_layout)
class FolderSource(SegmentationSource):
    """`images/<id>`, `masks/<id>`, `splits/<split>.txt`, `dataset.json`; `labels_root` names a
    folder whose `masks/` replace the training masks (a noisy-label folder)."""

    def __init__(self, root: str | Path, split: str, labels_root: str | Path | None = None) -> None:
        super().__init__(root, split, read_dataset_info(root), read_split_ids(root, split))
        self.image_dir = self.root / IMAGE_DIR
        self.mask_dir = Path(labels_root if labels_root is not None else root) / MASK_DIR
        for directory in (self.image_dir, self.mask_dir):
            if not directory.is_dir():
                raise FileNotFoundError(f"{directory}: folder not found")

    def image_path(self, index: int) -> Path:
        return find_slice_file(self.image_dir, self.ids[index], IMAGE_SUFFIXES, "image")

    def mask_path(self, index: int) -> Path:
        return find_slice_file(self.mask_dir, self.ids[index], MASK_SUFFIXES, "mask")

    def read_image(self, index: int) -> np.ndarray:
        return read_image(self.image_path(index))

    def read_mask(self, index: int) -> np.ndarray:
        return read_mask(self.mask_path(index))
