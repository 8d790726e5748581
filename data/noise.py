"""Synthetic annotation noise: erode/dilate (ADELE's SegTHOR procedure), coarse polygons, Markov.

Every noise is deterministic from a seed, per slice: each slice's generator is derived from
(seed, crc32(slice_id)), so adding slices never changes the noise of the others. Clean masks
are never modified; `corrupt_dataset` writes noisy training masks into a separate folder.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage
from tqdm import tqdm

from noisyseg.data.folder import (
    CLEAN_MASKS_FINGERPRINT,
    IGNORE_INDEX,
    MASK_DIR,
    MASK_SUFFIXES,
    NOISE_FILE,
    clean_masks_fingerprint,
    encode_mask,
    find_slice_file,
    read_dataset_info,
    read_mask,
    read_split_ids,
    staged_directory,
    write_new_file,
)
from noisyseg.data.noise_options import LEVEL_ITERATIONS, NOISE_FAMILIES, NOISY_SPLITS
from noisyseg.evaluation.metrics import confusion_matrix, iou_per_class, mean_iou
from noisyseg.io import atomic_write_json

log = logging.getLogger(__name__)

# SegTHOR organ order of the reference code: esophagus, trachea, aorta, heart. Other ids follow.
REFERENCE_ORGAN_ORDER = (1, 3, 4, 2)
# The reference rescales every organ to about this many pixels before eroding/dilating it.
REFERENCE_AREA = 1000.0
REFERENCE_ITERATIONS = (2, 3, 4)
SQUARE_3X3 = np.ones((3, 3), dtype=bool)


def slice_rng(seed: int, slice_id: str) -> np.random.Generator:
    """The generator of one slice, stable across runs and independent of the other slices."""
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(slice_id.encode("utf-8"))]))


def organ_order(mask: np.ndarray) -> list[int]:
    """Organ ids present in `mask`: the reference order first, then any other ids ascending."""
    present = {int(v) for v in np.unique(mask)} - {0, IGNORE_INDEX}
    ordered = [c for c in REFERENCE_ORGAN_ORDER if c in present]
    return ordered + sorted(present - set(ordered))


# ---------------------------------------------------------------- erode / dilate (ADELE)


def resize_binary(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bicubic resize of a binary mask, thresholded at 0.5.

    The reference code resizes uint8 0/1 masks and keeps values > 0; uint8 rounding makes that
    the same as a 0.5 threshold on the interpolated value.
    """
    if mask.shape == shape:
        return mask.copy()
    image = Image.fromarray(mask.astype(np.float32), mode="F")
    return np.asarray(image.resize((shape[1], shape[0]), Image.Resampling.BICUBIC)) >= 0.5


def erode_or_dilate_organ(organ: np.ndarray, mode: str, iterations: int) -> np.ndarray:
    """Rescale the organ to ~1000 pixels, erode/dilate it `iterations` times (3x3), rescale back.

    Works in the organ's bounding box, padded by what the dilation and the bicubic kernel can
    reach, so a small organ is not upscaled together with the whole slice.
    """
    scale = math.sqrt(REFERENCE_AREA / organ.sum())
    pad = math.ceil((iterations + 2) / scale) + 2
    rows, cols = (slice(max(int(a.min()) - pad, 0), int(a.max()) + pad + 1) for a in np.nonzero(organ))
    box = organ[rows, cols]
    work_shape = (max(1, round(box.shape[0] * scale)), max(1, round(box.shape[1] * scale)))
    work = resize_binary(box, work_shape)
    if mode == "under":
        # OpenCV's erosion (the reference code's) counts the outside of the image as organ, so an
        # organ touching the image border is not eroded from it; box sides inside the image are
        # padded with background, which border_value=1 cannot reach.
        work = ndimage.binary_erosion(work, structure=SQUARE_3X3, iterations=iterations, border_value=1)
    else:
        work = ndimage.binary_dilation(work, structure=SQUARE_3X3, iterations=iterations)
    result = np.zeros_like(organ)
    result[rows, cols] = resize_binary(work, box.shape)
    return result


def erode_dilate(mask: np.ndarray, mode: str, iterations: int) -> np.ndarray:
    """ADELE's SegTHOR noise on one slice with a given mode ("under"/"over") and iteration count.

    Organs in the order 1, 3, 4, 2. Under: every organ pixel the erosion removed becomes
    background. Over: pixels the dilation adds take the organ's label only where the current
    label is background, so earlier organs win.
    """
    if mode not in ("under", "over"):
        raise ValueError(f"erode-dilate mode must be 'under' or 'over', got {mode!r}")
    noisy = mask.copy()
    if iterations == 0:
        return noisy
    for organ_id in organ_order(mask):
        organ = mask == organ_id
        changed = erode_or_dilate_organ(organ, mode, iterations)
        if mode == "under":
            noisy[organ & ~changed] = 0
        else:
            noisy[changed & ~organ & (noisy == 0)] = organ_id
    return noisy


@dataclass
class ErodeDilateNoise:
    """Per slice: mode under/over with p = 0.5; iterations uniform in {2, 3, 4} (the reference
    setting) or, with `level` 0..6, fixed at ADELE Table 6's 0, 1, 2, 3, 4, 6, 8."""

    level: int | None = None

    def __post_init__(self) -> None:
        if self.level is not None and not 0 <= self.level < len(LEVEL_ITERATIONS):
            raise ValueError(f"erode-dilate level must be in 0..{len(LEVEL_ITERATIONS) - 1}, got {self.level}")

    @property
    def iteration_choices(self) -> tuple[int, ...]:
        return REFERENCE_ITERATIONS if self.level is None else (LEVEL_ITERATIONS[self.level],)

    def apply(self, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        mode = "under" if rng.random() < 0.5 else "over"
        iterations = int(rng.choice(self.iteration_choices))
        return erode_dilate(mask, mode, iterations)


# ---------------------------------------------------------------- coarse polygons


@dataclass
class CoarseNoise:
    """Cityscapes-coarse-style labels: each object region becomes a star polygon inside it.

    margin: the region is eroded by this many pixels (fewer, but at least 1, for objects that
        would vanish) before the polygon is drawn and clipped to it, leaving an unlabelled
        (255) band along object boundaries.
    background_band: background pixels closer than this to any other label stay 255.
    min_vertices/max_vertices: polygon vertex count, drawn per region.
    min_vertex_scale: vertices are pulled towards the centroid by a factor in [this, 1].
    Regions that vanish under a 1-pixel erosion become 255; a shrunken region too small for a
    polygon (fewer than 3 vertices) is kept as it is. On the default 128-px phantom the defaults
    keep about 98% of background, 60% of heart and 13-30% of the small organs' pixels labelled
    (all correctly); use a larger margin for higher-resolution data.
    """

    margin: int = 1
    background_band: int = 2
    min_vertices: int = 6
    max_vertices: int = 12
    min_vertex_scale: float = 0.85

    def __post_init__(self) -> None:
        if self.margin < 1 or self.background_band < 0 or not 3 <= self.min_vertices <= self.max_vertices:
            raise ValueError(
                "coarse noise needs margin >= 1, background_band >= 0 and 3 <= min_vertices <= max_vertices"
            )

    def apply(self, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        noisy = np.full(mask.shape, IGNORE_INDEX, dtype=np.uint8)
        background = ndimage.binary_erosion(
            mask == 0, structure=SQUARE_3X3, iterations=self.background_band, border_value=1
        )
        noisy[background] = 0
        for class_id in organ_order(mask):
            regions, count = ndimage.label(mask == class_id)
            for index, box in enumerate(ndimage.find_objects(regions), start=1):
                self.draw_region(noisy, regions, index, box, class_id, rng)
        return noisy

    def draw_region(
        self,
        noisy: np.ndarray,
        regions: np.ndarray,
        index: int,
        box: tuple[slice, slice],
        class_id: int,
        rng: np.random.Generator,
    ) -> None:
        # Work in the region's bounding box, padded so the erosion sees a background border.
        pad = 1
        rows = slice(max(box[0].start - pad, 0), min(box[0].stop + pad, regions.shape[0]))
        cols = slice(max(box[1].start - pad, 0), min(box[1].stop + pad, regions.shape[1]))
        region = regions[rows, cols] == index
        inner = self.shrink(region)
        if inner is None:
            return
        polygon = self.star_polygon(inner, rng)
        noisy_box = noisy[rows, cols]
        noisy_box[inner if polygon is None else polygon & inner] = class_id

    def shrink(self, region: np.ndarray) -> np.ndarray | None:
        """The region eroded by `margin`, or by less (down to 1 pixel) where a small object
        would vanish; None when even one pixel of erosion leaves nothing."""
        for margin in range(self.margin, 0, -1):
            inner = ndimage.binary_erosion(region, structure=SQUARE_3X3, iterations=margin)
            if inner.any():
                return inner
        return None

    def star_polygon(self, inner: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
        """Rasterised polygon through the farthest boundary pixel of each angular sector."""
        edge_rows, edge_cols = np.nonzero(inner & ~ndimage.binary_erosion(inner))
        center_row, center_col = (float(v.mean()) for v in np.nonzero(inner))
        n_vertices = int(rng.integers(self.min_vertices, self.max_vertices + 1))
        offset = rng.uniform(0.0, 2 * np.pi / n_vertices)
        angles = np.arctan2(edge_rows - center_row, edge_cols - center_col)
        sectors = (((angles - offset) % (2 * np.pi)) / (2 * np.pi / n_vertices)).astype(int) % n_vertices
        radii = np.hypot(edge_rows - center_row, edge_cols - center_col)
        vertices = []
        for sector in range(n_vertices):
            members = np.nonzero(sectors == sector)[0]
            if members.size == 0:
                continue
            far = members[np.argmax(radii[members])]
            pull = rng.uniform(self.min_vertex_scale, 1.0)
            vertices.append(
                (center_col + pull * (edge_cols[far] - center_col), center_row + pull * (edge_rows[far] - center_row))
            )
        if len(vertices) < 3:
            return None
        canvas = Image.new("L", (inner.shape[1], inner.shape[0]), 0)
        ImageDraw.Draw(canvas).polygon(vertices, fill=1, outline=1)
        return np.asarray(canvas, dtype=bool)


# ---------------------------------------------------------------- Markov boundary process


@dataclass
class MarkovNoise:
    """The boundary Markov process, per organ (reference organ order, earlier organs win).

    steps (T): each step grows with probability `grow_probability` (theta1), else shrinks;
        the boundary pixels (outer when growing, inner when shrinking) flip with probability
        `boundary_flip_probability` (theta2).
    random_flip_probability (theta3): then every pixel of the organ's neighbourhood (its box
        grown by T + 3 pixels) flips with this probability.
    Finally a 5x5 Gaussian blur (sigma 2) and a 0.5 threshold smooth the result; isolated
    random flips vanish there, so changes stay within about T + 2 pixels of the organ.
    The defaults give a foreground annotation mIoU of about 0.63 on the default phantom (128 px),
    close to the erode-dilate reference setting, so the two families are comparable.
    """

    steps: int = 4
    grow_probability: float = 0.5
    boundary_flip_probability: float = 0.5
    random_flip_probability: float = 0.02
    blur_sigma: float = 2.0

    def apply(self, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        noisy = np.where(mask == IGNORE_INDEX, IGNORE_INDEX, 0).astype(np.uint8)
        pad = self.steps + 3
        for organ_id in organ_order(mask):
            organ = mask == organ_id
            rows, cols = (slice(max(int(a.min()) - pad, 0), int(a.max()) + pad + 1) for a in np.nonzero(organ))
            grown = self.perturb(organ[rows, cols], rng)
            noisy_box = noisy[rows, cols]
            noisy_box[grown & (noisy_box == 0)] = organ_id
        return noisy

    def perturb(self, organ: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        current = organ.copy()
        for _ in range(self.steps):
            grow = rng.random() < self.grow_probability
            if grow:
                boundary = ndimage.binary_dilation(current) & ~current
            else:
                boundary = current & ~ndimage.binary_erosion(current)
            flips = boundary & (rng.random(current.shape) < self.boundary_flip_probability)
            current = current | flips if grow else current & ~flips
        current ^= rng.random(current.shape) < self.random_flip_probability
        # truncate=1.0 with sigma 2 gives the 5x5 kernel.
        return ndimage.gaussian_filter(current.astype(np.float32), sigma=self.blur_sigma, truncate=1.0) > 0.5


# A noise family: `apply(mask, rng)` turns one clean mask into a noisy one.
NoiseModel = ErodeDilateNoise | CoarseNoise | MarkovNoise


def make_noise(family: str, level: int | None = None) -> NoiseModel:
    """The noise model of a family (`level` only applies to erode-dilate)."""
    if level is not None and family != "erode-dilate":
        raise ValueError(f"--level applies to the erode-dilate noise only, not to {family!r}")
    if family == "erode-dilate":
        return ErodeDilateNoise(level=level)
    if family == "coarse":
        return CoarseNoise()
    if family == "markov":
        return MarkovNoise()
    raise ValueError(f"unknown noise {family!r}; choose one of {', '.join(NOISE_FAMILIES)}")


# ---------------------------------------------------------------- dataset corruption


class ConfusionAccumulator:
    """Collects (clean, noisy) pixel pairs and counts them in large batches (one call per
    batch is much cheaper than one per slice)."""

    def __init__(self, num_classes: int, batch_pixels: int = 1 << 24) -> None:
        self.num_classes = num_classes
        self.batch_pixels = batch_pixels
        self.counts = np.zeros((num_classes, num_classes), dtype=np.int64)
        self.pending: list[tuple[np.ndarray, np.ndarray]] = []
        self.pending_pixels = 0

    def add(self, target: np.ndarray, pred: np.ndarray) -> None:
        self.pending.append((target.ravel(), pred.ravel()))
        self.pending_pixels += target.size
        if self.pending_pixels >= self.batch_pixels:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            target = np.concatenate([t for t, _ in self.pending])
            pred = np.concatenate([p for _, p in self.pending])
            self.counts += confusion_matrix(pred, target, self.num_classes)
        self.pending, self.pending_pixels = [], 0

    def total(self) -> np.ndarray:
        self.flush()
        return self.counts


def by_class_name(values: np.ndarray, class_names: list[str]) -> dict[str, float | None]:
    return {name: None if math.isnan(v) else float(v) for name, v in zip(class_names, values, strict=True)}


def annotation_quality(conf: np.ndarray, clean_pixels: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """Annotation quality (fractions) from clean-vs-noisy confusion counts (rows = clean).

    IoUs leave out pixels the noisy mask does not label; `per_class_recall` is the fraction of
    each class's clean pixels that keep their label, unlabelled ones counting as lost (the
    measure that matters for coarse labels, whose labelled pixels are all correct).
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = np.where(clean_pixels > 0, np.diag(conf) / np.maximum(clean_pixels, 1), np.nan)
    return {
        "annotation_miou": mean_iou(conf, include_background=True),
        "annotation_miou_fg": mean_iou(conf, include_background=False),
        "per_class_iou": by_class_name(iou_per_class(conf), class_names),
        "per_class_recall": by_class_name(recall, class_names),
        "per_class_keys": "class names; null where a class is absent",
        "labelled_fraction": float(conf.sum()) / max(int(clean_pixels.sum()), 1),
    }


def corrupt_dataset(
    data_root: str | Path,
    out: str | Path,
    family: str,
    level: int | None = None,
    seed: int = 0,
    splits: Sequence[str] = ("train",),
) -> dict[str, Any]:
    """Write noisy masks of `splits` (the train split, and optionally val) to `out/masks`, plus
    `out/noise.json`; returns the summary.

    Every slice draws its own noise (`slice_rng(seed, slice_id)`), so the validation masks get the
    same noise as the training masks in independent draws, and the training masks are the same
    whether or not val is corrupted too. The summary's annotation quality is the train split's (as
    before val could be corrupted); `splits` names the noisy splits and `val` holds the validation
    split's quality when it is one of them. IoUs are dataset-level (confusion counts summed over
    the split), noisy against clean; pixels the noisy mask leaves unlabelled (255) are excluded,
    as are ignored clean pixels.
    """
    data_root, out = Path(data_root), Path(out)
    if out.resolve() == data_root.resolve():
        raise ValueError(f"{out}: refusing to write noisy labels into the data folder itself; choose another --out")
    if "train" not in splits or not set(splits) <= set(NOISY_SPLITS):
        raise ValueError(f"--splits: expected train, optionally with val (train,val), got {','.join(splits)}")
    if not (data_root / MASK_DIR).is_dir():
        raise FileNotFoundError(f"{data_root / MASK_DIR}: clean mask folder not found")
    info = read_dataset_info(data_root)
    noise = make_noise(family, level)
    qualities, sizes = {}, {}
    with staged_directory(out) as staging:
        for split in NOISY_SPLITS:
            if split in splits:
                ids = read_split_ids(data_root, split)
                qualities[split] = corrupt_split(
                    data_root, staging, ids, noise, seed, info.classes, info.ignore_index, split
                )
                sizes[split] = len(ids)
        summary = dict(qualities["train"])
        summary.update(
            noise=family,
            level=level,
            seed=seed,
            parameters=asdict(noise),
            slices=sizes["train"],
            splits=[split for split in NOISY_SPLITS if split in splits],
            data=str(data_root),
            out=str(out),
        )
        if "val" in qualities:
            summary["val"] = {**qualities["val"], "slices": sizes["val"]}
        summary[CLEAN_MASKS_FINGERPRINT] = clean_masks_fingerprint(data_root)
        atomic_write_json(staging / NOISE_FILE, summary)
    log.info(
        "noisy labels of %s (%d training slices) written to %s (training annotation mIoU %.3f)",
        "+".join(summary["splits"]),
        sizes["train"],
        out,
        summary["annotation_miou"],
    )
    return summary


def corrupt_split(
    data_root: Path,
    staging: Path,
    ids: Sequence[str],
    noise: NoiseModel,
    seed: int,
    class_names: list[str],
    ignore_index: int,
    split: str,
) -> dict[str, Any]:
    """Write the noisy masks of one split's `ids` into `staging/masks`; their annotation quality."""
    num_classes = len(class_names)
    confusion = ConfusionAccumulator(num_classes)
    clean_pixels = np.zeros(num_classes, dtype=np.int64)
    for slice_id in tqdm(ids, desc=f"noisy {split} masks", unit="slice"):
        clean = read_mask(find_slice_file(data_root / MASK_DIR, slice_id, MASK_SUFFIXES, "mask"))
        noisy = noise.apply(clean, slice_rng(seed, slice_id))
        mask_path = staging / MASK_DIR / f"{slice_id}.png"
        write_new_file(mask_path, encode_mask(mask_path, noisy))
        labelled = (noisy != IGNORE_INDEX) & (clean != ignore_index)
        confusion.add(clean[labelled], noisy[labelled])
        clean_pixels += np.bincount(clean.ravel(), minlength=256)[:num_classes]
    return annotation_quality(confusion.total(), clean_pixels, class_names)
