"""CVAT import: a COCO 1.0 archive whose masks are run-length encoded.

`OUT/cvat/coco.zip` holds `annotations/instances_default.json` (the name CVAT's "COCO 1.0"
import looks for) and `images/<id>.png`. Each foreground class present in an image's corrected
mask is one annotation with `iscrowd` 1 and an uncompressed RLE `segmentation` ({"size": [H, W],
"counts": [...]}, COCO's layout: runs over the pixels in column-major order, starting with a run
of zeros), which CVAT imports as a mask. Category ids are the class ids (background, 0, is left
out, as COCO reserves 0).
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from noisyseg.data.colors import png_bytes
from noisyseg.io import atomic_open

ANNOTATIONS_FILE = "annotations/instances_default.json"


def rle_counts(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE counts of a binary (H, W) mask (column-major, zeros first)."""
    flat = (np.asarray(mask) != 0).reshape(-1, order="F").astype(np.int8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    return [0, *counts] if flat.size and flat[0] else counts


def bounding_box(mask: np.ndarray) -> list[int]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


def coco_document(items: Iterable[tuple[int, str, np.ndarray]], class_names: Sequence[str]) -> dict:
    """The COCO dict of (image id, file name, corrected mask) items."""
    images: list[dict] = []
    annotations: list[dict] = []
    for image_id, file_name, mask in items:
        height, width = mask.shape
        images.append({"id": image_id, "file_name": file_name, "width": int(width), "height": int(height)})
        for class_id in range(1, len(class_names)):
            region = mask == class_id
            if region.any():
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": class_id,
                        "segmentation": {"size": [int(height), int(width)], "counts": rle_counts(region)},
                        "area": int(region.sum()),
                        "bbox": bounding_box(region),
                        "iscrowd": 1,
                    }
                )
    categories = [{"id": c, "name": name, "supercategory": ""} for c, name in enumerate(class_names) if c > 0]
    return {
        "info": {"description": "noisyseg label review"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


def write_cvat_archive(
    path: Path, items: Iterable[tuple[str, np.ndarray, np.ndarray]], class_names: Sequence[str]
) -> Path:
    """`path` (a .zip, written atomically) from (id, display image, corrected mask) items."""
    masks = []
    with atomic_open(path) as handle, zipfile.ZipFile(handle, "w", zipfile.ZIP_DEFLATED) as archive:
        for image_id, (slice_id, image, mask) in enumerate(items, start=1):
            archive.writestr(f"images/{slice_id}.png", png_bytes(image))
            masks.append((image_id, f"{slice_id}.png", mask))
        archive.writestr(ANNOTATIONS_FILE, json.dumps(coco_document(masks, class_names)))
    return path
