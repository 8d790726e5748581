"""The Cityscapes layout, as the dataset's archives unpack:

```
ROOT/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
ROOT/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png
ROOT/gtCoarse/<split>/<city>/<city>_<seq>_<frame>_gtCoarse_labelIds.png
```

Masks hold Cityscapes label ids (0..33); they are mapped to the 19 training ids with the table
of the `cityscapesscripts` package (`helpers.labels`), every other label to 255 (ignored).
`annotations` chooses the training splits' masks (`train`, `train_extra`) and
`eval_annotations` the others', so `annotations="gtCoarse"` is the ARM paper's setting: train
on the coarse annotations, evaluate on the fine `val` ones.
"""

from __future__ import annotations

import functools
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

IMAGE_DIR = "leftImg8bit"
ANNOTATIONS = ("gtFine", "gtCoarse")
TRAIN_SPLITS = ("train", "train_extra")
IMAGE_SUFFIX = "_leftImg8bit.png"


@functools.cache
def _training_labels() -> tuple[list[str], np.ndarray, frozenset[int]]:
    """(the 19 class names by training id, label id -> training id lookup of 256 entries with
    255 for ignored labels, the label ids the table knows). Read on first use: registering the
    layout must not need cityscapesscripts, which the GPU machines lack (tests/test_gpu_check.py)."""
    from cityscapesscripts.helpers.labels import labels as CITYSCAPES_LABELS

    trained = sorted(
        (label.trainId, label.id, label.name)
        for label in CITYSCAPES_LABELS
        if 0 <= label.trainId < IGNORE_INDEX and not label.ignoreInEval
    )
    names: dict[int, str] = {}
    lookup = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for train_id, label_id, name in trained:
        names.setdefault(train_id, name)
        lookup[label_id] = train_id
    if sorted(names) != list(range(len(names))):  # pragma: no cover - a changed upstream table
        raise RuntimeError(f"cityscapesscripts: training ids {sorted(names)} are not 0..{len(names) - 1}")
    known = frozenset(label.id for label in CITYSCAPES_LABELS if 0 <= label.id < 256)
    return [names[i] for i in range(len(names))], lookup, known


def cityscapes_info() -> DatasetInfo:
    return DatasetInfo(
        name="cityscapes",
        classes=list(_training_labels()[0]),
        ignore_index=IGNORE_INDEX,
        modality="RGB",
        image_format="png",
        normalization="imagenet",
    )


def _is_cityscapes(root: Path) -> bool:
    return (root / IMAGE_DIR).is_dir() and any((root / name).is_dir() for name in ANNOTATIONS)


def _check_annotations(value: object, option: str) -> str:
    if value not in ANNOTATIONS:
        raise ValueError(f"cityscapes option '{option}': expected one of {', '.join(ANNOTATIONS)}, got {value!r}")
    return str(value)


@register_layout("cityscapes", _is_cityscapes)
class CityscapesSource(SegmentationSource):
    """One split of a Cityscapes root; item ids are `<city>/<city>_<seq>_<frame>`."""

    def __init__(
        self, root: str | Path, split: str, annotations: str = "gtFine", eval_annotations: str = "gtFine"
    ) -> None:
        root = Path(root)
        train_annotations = _check_annotations(annotations, "annotations")
        chosen = (
            train_annotations if split in TRAIN_SPLITS else _check_annotations(eval_annotations, "eval_annotations")
        )
        self.image_dir = root / IMAGE_DIR / split
        self.annotations = chosen
        self.mask_dir = root / chosen / split
        for directory, expected in (
            (self.image_dir, f"{IMAGE_DIR}/{split}/<city>/*{IMAGE_SUFFIX}"),
            (self.mask_dir, f"{chosen}/{split}/<city>/*_{chosen}_labelIds.png"),
        ):
            if not directory.is_dir():
                raise FileNotFoundError(f"{directory}: folder not found (expected {expected})")
        ids = sorted(
            f"{path.parent.name}/{path.name[: -len(IMAGE_SUFFIX)]}"
            for path in self.image_dir.glob(f"*/*{IMAGE_SUFFIX}")
        )
        super().__init__(root, split, cityscapes_info(), ids)

    @classmethod
    def splits(cls, root: str | Path, **options: Any) -> list[str]:
        """Every split folder under `leftImg8bit` whose annotation folder exists too. A split
        without one is skipped (gtFine has no `train_extra`, a download may lack `test`'s masks),
        unless it is `train` or the chosen annotations' folder is missing altogether: then the
        options name annotations the tree does not hold, and the missing folder is named."""
        root = Path(root)
        found = []
        for folder in sorted(p for p in (root / IMAGE_DIR).iterdir() if p.is_dir()):
            option = "annotations" if folder.name in TRAIN_SPLITS else "eval_annotations"
            annotations = _check_annotations(options.get(option, "gtFine"), option)
            masks = root / annotations / folder.name
            if masks.is_dir():
                found.append(folder.name)
            elif folder.name == "train" or not masks.parent.is_dir():
                raise FileNotFoundError(
                    f"{masks}: folder not found (the masks of split '{folder.name}' with {option}={annotations}; "
                    f"expected {annotations}/{folder.name}/<city>/*_{annotations}_labelIds.png)"
                )
        return found

    def image_path(self, index: int) -> Path:
        return self.image_dir / f"{self.ids[index]}{IMAGE_SUFFIX}"

    def mask_path(self, index: int) -> Path:
        return self.mask_dir / f"{self.ids[index]}_{self.annotations}_labelIds.png"

    def read_image(self, index: int) -> np.ndarray:
        return read_rgb_image(self.image_path(index))

    def read_mask(self, index: int) -> np.ndarray:
        """Training ids: the label ids of the file mapped through cityscapesscripts' table."""
        path = self.mask_path(index)
        label_ids = read_index_png(path, f"{self.annotations} label-id mask of image {self.image_path(index).name}")
        _, label_to_train_id, known_label_ids = _training_labels()
        unknown = sorted(set(np.unique(label_ids).tolist()) - known_label_ids)
        if unknown:
            raise ValueError(
                f"{path}: label id(s) {unknown} are not Cityscapes label ids "
                f"(expected {min(known_label_ids)}..{max(known_label_ids)}, cityscapesscripts.helpers.labels)"
            )
        return label_to_train_id[label_ids]
