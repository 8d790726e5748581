"""Label Studio import: one task per image, the corrected mask as brush pre-annotations.

Label Studio stores a brush mask as `value.rle`: the bytes of `@thi.ng/rle-pack`'s encoding of
the mask's RGBA pixels (each pixel's 0/255 repeated in all four channels, row-major). The stream
is big-endian bits: the value count (32 bits), word size - 1 (5 bits, 8-bit words here), four run
length field widths - 1 (4 bits each: 3, 4, 8, 16), then records `1 | width index (2 bits) |
run length - 1 | value` (a repeated value; this encoder writes only these), zero-padded to a byte.

Written into `OUT/label-studio/`: `tasks.json` (import it into a project), `config.xml` (the
labelling interface: an Image and one BrushLabels label per class) and `images/<id>.png`, which
the tasks name as `<image_url>/<id>.png` (default `images/<id>.png`: serve the folder, or set
the prefix to where Label Studio finds the files, such as `/data/local-files/?d=...`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from xml.sax.saxutils import quoteattr

import numpy as np

from noisyseg.data.colors import class_color, png_bytes
from noisyseg.io import atomic_write_bytes, atomic_write_text

RUN_WIDTHS = (3, 4, 8, 16)  # bits of a run length; rle-pack's defaults, as Label Studio writes them
WORD_BITS = 8
FROM_NAME, TO_NAME = "label", "image"
MODEL_VERSION = "noisyseg-review"


def brush_rle(mask: np.ndarray) -> list[int]:
    """A binary (H, W) mask in Label Studio's brush RLE (a list of byte values)."""
    values = np.repeat(np.where(np.asarray(mask).reshape(-1) != 0, 255, 0).astype(np.uint8), 4)
    fields = [f"{len(values):032b}", f"{WORD_BITS - 1:05b}", *(f"{w - 1:04b}" for w in RUN_WIDTHS)]
    if len(values):
        starts = np.flatnonzero(np.concatenate([[True], values[1:] != values[:-1]]))
        lengths = np.diff(np.append(starts, len(values)))
        for start, length in zip(starts.tolist(), lengths.tolist()):
            while length > 0:
                chunk = min(length, 1 << RUN_WIDTHS[-1])
                index = next(i for i, width in enumerate(RUN_WIDTHS) if chunk <= 1 << width)
                fields.append(f"1{index:02b}{chunk - 1:0{RUN_WIDTHS[index]}b}{int(values[start]):0{WORD_BITS}b}")
                length -= chunk
    bits = "".join(fields)
    bits += "0" * (-len(bits) % 8)
    return list(int(bits, 2).to_bytes(len(bits) // 8, "big"))


def brush_results(mask: np.ndarray, class_names: Sequence[str]) -> list[dict]:
    """One `brushlabels` result per foreground class present in `mask` (class ids)."""
    height, width = mask.shape
    return [
        {
            "id": f"c{class_id}",
            "from_name": FROM_NAME,
            "to_name": TO_NAME,
            "type": "brushlabels",
            "origin": "prediction",
            "original_width": int(width),
            "original_height": int(height),
            "image_rotation": 0,
            "value": {"format": "rle", "rle": brush_rle(mask == class_id), "brushlabels": [class_names[class_id]]},
        }
        for class_id in range(1, len(class_names))
        if bool((mask == class_id).any())
    ]


def labelling_config(class_names: Sequence[str]) -> str:
    """The labelling interface: the image and a brush label per foreground class."""
    labels = "".join(
        f'    <Label value={quoteattr(name)} background="#{"".join(f"{c:02x}" for c in class_color(class_id))}"/>\n'
        for class_id, name in enumerate(class_names)
        if class_id > 0
    )
    return (
        f'<View>\n  <Image name="{TO_NAME}" value="$image" zoom="true"/>\n  <BrushLabels '
        f'name="{FROM_NAME}" toName="{TO_NAME}">\n{labels}  </BrushLabels>\n</View>\n'
    )


def write_label_studio(
    directory: Path,
    items: Iterable[tuple[str, np.ndarray, np.ndarray, float]],
    class_names: Sequence[str],
    image_url: str = "images",
) -> Path:
    """`tasks.json`, `config.xml` and `images/` for (id, display image, corrected mask, label
    quality) items; returns the tasks file."""
    tasks = []
    for slice_id, image, mask, quality in items:
        atomic_write_bytes(directory / "images" / f"{slice_id}.png", png_bytes(image))
        score = None if np.isnan(quality) else float(quality)
        tasks.append(
            {
                "data": {
                    TO_NAME: f"{image_url.rstrip('/')}/{slice_id}.png",
                    "slice_id": slice_id,
                    "label_quality": score,
                },
                "predictions": [
                    {"model_version": MODEL_VERSION, "score": score, "result": brush_results(mask, class_names)}
                ],
            }
        )
    atomic_write_text(directory / "config.xml", labelling_config(class_names))
    atomic_write_text(directory / "tasks.json", json.dumps(tasks) + "\n")
    return directory / "tasks.json"
