"""What a dataset folder holds, in any supported layout (`noisyseg data inspect`).

Every item of every split is read and checked as training would read it (`SegmentationSource.read`:
readable image and mask, same size, class ids in range); the first wrong file stops the walk with
its reader's one-line error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from noisyseg.data.datasets.base import LAYOUTS, open_source, resolve_layout

# More distinct image sizes than this are summarised as min/max only.
MAX_LISTED_SIZES = 10
# Network strides the default training crop is shown for: UNet depth 3/4/5, DeepLab's output strides 8 and 16.
CROP_STRIDES = (8, 16, 32)


def inspect_dataset(
    root: str | Path, layout: str = "auto", options: dict[str, Any] | None = None, quiet: bool = False
) -> dict[str, Any]:
    """A JSON-ready summary: layout, classes, and per split the number of images, their sizes
    (min/max height and width, and the distinct sizes when few), pixels per class and the
    unlabelled fraction; when the training images differ in size, the crop training would choose
    without `loader.augment.crop_size` per network stride (`crop_when_unset`). Raises the
    reader's error for the first wrong file."""
    options = dict(options or {})
    name = resolve_layout(root, layout, options)
    splits = LAYOUTS[name][0].splits(root, **options)
    if not splits:
        raise ValueError(f"{root}: no splits found in the {name} layout")
    summary: dict[str, Any] = {"data": str(root), "layout": name, "options": options, "splits": {}}
    for split in splits:
        source = open_source(root, split, name, **options)
        info = source.info
        summary.update(
            name=info.name,
            classes=info.classes,
            ignore_index=info.ignore_index,
            modality=info.modality,
            normalization=info.normalization,
        )
        summary["splits"][split] = _inspect_split(source, quiet)
    train = summary["splits"].get("train")
    if train is not None and train["distinct_sizes"] > 1:
        from noisyseg.data.pipeline import default_crop

        # What training crops to without loader.augment.crop_size (depends on the network's stride).
        train["crop_when_unset"] = {
            str(stride): default_crop([tuple(train["size_min"])], stride) for stride in CROP_STRIDES
        }
    return summary


def _inspect_split(source: Any, quiet: bool) -> dict[str, Any]:
    info = source.info
    counts = np.zeros(256, dtype=np.int64)
    sizes: dict[tuple[int, int], int] = {}
    channels: set[int] = set()
    with tqdm(total=len(source), desc=f"inspect {source.split}", unit="image", disable=quiet) as progress:
        for index in range(len(source)):
            image, mask = source.read(index)
            channels.add(int(image.shape[0]))
            size = (int(mask.shape[0]), int(mask.shape[1]))
            sizes[size] = sizes.get(size, 0) + 1
            counts += np.bincount(mask.ravel(), minlength=256)
            progress.update()
    heights, widths = [h for h, _ in sizes], [w for _, w in sizes]
    total = int(counts.sum())
    result: dict[str, Any] = {
        "images": len(source),
        "channels": sorted(channels),
        "size_min": [min(heights), min(widths)],
        "size_max": [max(heights), max(widths)],
        "distinct_sizes": len(sizes),
        "pixels_per_class": {name: int(counts[i]) for i, name in enumerate(info.classes)},
        "unlabelled_fraction": float(counts[info.ignore_index]) / total if total else 0.0,
    }
    if len(sizes) <= MAX_LISTED_SIZES:
        result["sizes"] = {f"{h}x{w}": n for (h, w), n in sorted(sizes.items())}
    return result
