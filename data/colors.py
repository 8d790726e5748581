"""How the review draws images and masks: a display image in 8 bits, one colour per class."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# Background black; then distinct colours (Okabe-Ito, then Tableau) for up to 16 classes, cycled beyond.
PALETTE = np.array(
    [
        (0, 0, 0),
        (230, 159, 0),
        (86, 180, 233),
        (0, 158, 115),
        (240, 228, 66),
        (0, 114, 178),
        (213, 94, 0),
        (204, 121, 167),
        (140, 86, 75),
        (148, 103, 189),
        (23, 190, 207),
        (188, 189, 34),
        (127, 127, 127),
        (174, 199, 232),
        (255, 152, 150),
        (197, 176, 213),
    ],
    dtype=np.uint8,
)
IGNORE_COLOR = (255, 255, 255)
CHANGED_COLOR = (255, 0, 255)  # difference overlay: corrected label differs from the given one
ISSUE_COLOR = (255, 255, 0)  # difference overlay: suspected by the model but left as given


def class_color(class_id: int) -> tuple[int, int, int]:
    r, g, b = PALETTE[class_id % len(PALETTE)]
    return int(r), int(g), int(b)


def display_image(image: np.ndarray) -> np.ndarray:
    """A raw (C, H, W) image as uint8 (H, W, 3): 0-255 RGB as is, anything else (CT intensities)
    stretched between its 1st and 99th percentiles."""
    if image.shape[0] == 3 and image.min() >= 0 and image.max() <= 255 and image.max() > 1:
        return np.ascontiguousarray(np.moveaxis(image, 0, -1).astype(np.uint8))
    grey = image.mean(axis=0)
    low, high = np.percentile(grey, (1, 99))
    scaled = np.clip((grey - low) / max(high - low, 1e-6), 0, 1) * 255
    return np.repeat(scaled.astype(np.uint8)[..., None], 3, axis=-1)


def color_mask(mask: np.ndarray, ignore_index: int) -> np.ndarray:
    """Class ids (H, W) as uint8 (H, W, 3) colours; unlabelled pixels white."""
    rgb = PALETTE[mask % len(PALETTE)]
    rgb[mask == ignore_index] = IGNORE_COLOR
    return rgb


def difference_overlay(
    image_rgb: np.ndarray, given: np.ndarray, corrected: np.ndarray, issue: np.ndarray
) -> np.ndarray:
    """The display image with relabelled pixels in magenta and suspected-but-kept ones in yellow."""
    out = image_rgb.astype(np.float32) * 0.6
    for where, colour in ((issue & (corrected == given), ISSUE_COLOR), (corrected != given, CHANGED_COLOR)):
        out[where] = np.asarray(colour, dtype=np.float32)
    return out.astype(np.uint8)


def png_bytes(array: np.ndarray) -> bytes:
    """(H, W) or (H, W, 3) uint8 as PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()
