"""The PASCAL VOC 2012 segmentation layout (with the SBD-augmented masks as an option):

```
VOC2012/JPEGImages/<id>.jpg
VOC2012/SegmentationClass/<id>.png        palette PNGs: pixel values are class ids, 255 boundaries
VOC2012/SegmentationClassAug/<id>.png     SBD's augmented training masks (option `aug`)
VOC2012/ImageSets/Segmentation/<split>.txt   train, trainaug, val (one id per line)
```

The root is the `VOC2012` folder or the `VOCdevkit` folder above it. With `aug`, the `train`
split is `trainaug.txt` read with `SegmentationClassAug` masks; the evaluation splits keep
`SegmentationClass`. `pseudo_labels` names a folder of `<id>.png` masks that replace the
training splits' masks (ADELE's weakly supervised setting); evaluation splits keep theirs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from noisyseg.data.datasets.base import (
    SegmentationSource,
    read_index_png,
    read_rgb_image,
    register_layout,
)
from noisyseg.data.folder import IGNORE_INDEX, DatasetInfo
from noisyseg.io import read_text

CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]  # fmt: skip
IMAGE_DIR = "JPEGImages"
MASK_DIR = "SegmentationClass"
AUG_MASK_DIR = "SegmentationClassAug"
LIST_DIR = Path("ImageSets") / "Segmentation"
TRAIN_SPLITS = ("train", "trainaug")
# VOC 2012's test masks are not public, so `test` is opened only when asked for by name.
LISTED_SPLITS = ("train", "trainaug", "val")


def voc_info() -> DatasetInfo:
    return DatasetInfo(
        name="voc2012",
        classes=list(CLASSES),
        ignore_index=IGNORE_INDEX,
        modality="RGB",
        image_format="jpg",
        normalization="imagenet",
    )


def voc_root(root: Path) -> Path | None:
    """The `VOC2012` folder of `root` (itself or `root/VOC2012`), or None."""
    for candidate in (root, root / "VOC2012"):
        if (candidate / IMAGE_DIR).is_dir() and (candidate / LIST_DIR).is_dir():
            return candidate
    return None


def _is_voc(root: Path) -> bool:
    return voc_root(root) is not None


def read_list_file(path: Path) -> list[str]:
    """Image ids of a split list: the first token of each line, as a bare id (lists written as
    `/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png` give `<id>` too)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: split list file not found (expected one image id per line)")
    return [Path(line.split()[0]).stem for line in read_text(path, "split list").splitlines() if line.strip()]


@register_layout("voc", _is_voc)
class VocSource(SegmentationSource):
    """One split of PASCAL VOC 2012; item ids are the image ids (`2007_000032`)."""

    def __init__(
        self, root: str | Path, split: str, aug: bool = False, pseudo_labels: str | Path | None = None
    ) -> None:
        given = Path(root)
        found = voc_root(given)
        if found is None:
            raise FileNotFoundError(
                f"{given}: not a PASCAL VOC 2012 folder (expected "
                f"{IMAGE_DIR}/ and {LIST_DIR}/ in it or in {given / 'VOC2012'})"
            )
        if not isinstance(aug, bool):
            raise ValueError(f"voc option 'aug': expected true or false, got {aug!r}")
        training = split in TRAIN_SPLITS
        self.list_file = found / LIST_DIR / f"{'trainaug' if aug and split == 'train' else split}.txt"
        if pseudo_labels is not None and training:
            self.mask_dir = Path(pseudo_labels)
        elif training and (aug or split == "trainaug"):
            self.mask_dir = found / AUG_MASK_DIR
        else:
            self.mask_dir = found / MASK_DIR
        self.image_dir = found / IMAGE_DIR
        if not self.mask_dir.is_dir():
            raise FileNotFoundError(
                f"{self.mask_dir}: mask folder not found (expected <id>.png class-index masks for split '{split}')"
            )
        ids = read_list_file(self.list_file)
        if not ids:
            raise ValueError(f"{self.list_file}: split '{split}' is empty")
        super().__init__(found, split, voc_info(), ids)

    @classmethod
    def splits(cls, root: str | Path, **options: Any) -> list[str]:
        """The annotated splits whose list file exists (`train` reads `trainaug.txt` with `aug`,
        so then `trainaug` is not listed twice)."""
        found = voc_root(Path(root))
        if found is None:
            return []
        names = [s for s in LISTED_SPLITS if (found / LIST_DIR / f"{s}.txt").is_file()]
        if options.get("aug"):
            names = ["train"] + [s for s in names if s not in TRAIN_SPLITS]
        return names

    def image_path(self, index: int) -> Path:
        return self.image_dir / f"{self.ids[index]}.jpg"

    def mask_path(self, index: int) -> Path:
        return self.mask_dir / f"{self.ids[index]}.png"

    def read_image(self, index: int) -> np.ndarray:
        path = self.image_path(index)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: image not found (listed in {self.list_file})")
        return read_rgb_image(path)

    def read_mask(self, index: int) -> np.ndarray:
        return read_index_png(self.mask_path(index), f"mask of image {self.ids[index]} (listed in {self.list_file})")
