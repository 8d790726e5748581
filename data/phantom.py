"""A SegTHOR-like thoracic CT phantom: synthetic patients as 3D volumes sliced axially.

Classes use SegTHOR's ids (0 background, 1 esophagus, 2 heart, 3 trachea, 4 aorta). Each patient
draws its own anatomy (body outline, lungs, spine, organ positions and sizes); every shape is a
smooth function of the axial position z, so neighbouring slices look alike. Organs differ on
purpose in size and contrast, as in real thoracic CT: the heart is large, the esophagus small and
nearly as bright as the soft tissue around it, the trachea small and dark (air, upper slices,
bifurcating lower down), the aorta round and bright (arch at the top, descending beside the
spine). That makes classes learned (and noisy labels memorised) at different speeds.

Images are in Hounsfield units. Rendering happens at `supersample` times the output size and is
averaged down (partial-volume edges), then blurred and given acquisition noise.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from noisyseg.data.folder import DatasetWriter, has_foreground, split_by_patient, staged_directory

log = logging.getLogger(__name__)

CLASS_NAMES = ["background", "esophagus", "heart", "trachea", "aorta"]
BACKGROUND, ESOPHAGUS, HEART, TRACHEA, AORTA = range(5)

# Hounsfield units of the tissues.
HU_AIR = -1000.0
HU_LUNG = -850.0
HU_FAT = -100.0
HU_SOFT_TISSUE = 40.0
HU_AORTA = 200.0
HU_BONE = 700.0
HU_MARROW = 250.0

# Where a reduced field of view is centred: the middle of the organs' vertical extent.
MEDIASTINUM_Y = 0.05


@dataclass
class PhantomConfig:
    """How the phantom looks. Defaults give a quick CPU demo that is still not trivial.

    size: output slice size in pixels (128 for CPU runs; the paper uses 256).
    slices_per_patient: axial slices rendered per patient over the scanned range (organs cover
        about 90% of it; slices without foreground are dropped when `foreground_only`).
    supersample: render at this factor and average down: partial-volume edges (1 leaves
        partial volume to the blur alone; 2 costs about 4x the time).
    soft_tissue_contrast: scales how far heart (+60 HU) and esophagus (+12 HU) stand out from
        the surrounding soft tissue; lower is harder.
    texture_hu: amplitude of smooth per-patient tissue texture inside the body.
    field_of_view: fraction of the full field of view rendered, centred on the mediastinum (1
        shows the whole body; 0.6 crops to the organs and lung hila, as a cardiac or mediastinal
        reconstruction does, so organs cover 1/0.6 times as many pixels per side at the same size).
    noise_hu: standard deviation of the acquisition noise (white Gaussian, per pixel).
    blur_sigma: Gaussian blur (output pixels) mimicking the scanner's point spread.
    foreground_only: keep only slices that contain at least one organ (the paper's setup).
    split_fractions: train/val/test fractions of patients (each split gets at least one).
    """

    size: int = 128
    slices_per_patient: int = 24
    supersample: int = 1
    soft_tissue_contrast: float = 1.0
    texture_hu: float = 15.0
    field_of_view: float = 1.0
    noise_hu: float = 20.0
    blur_sigma: float = 0.6
    foreground_only: bool = True
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)

    def __post_init__(self) -> None:
        if self.size < 16:
            raise ValueError(f"phantom size must be at least 16 pixels, got {self.size}")
        if self.slices_per_patient < 1 or self.supersample < 1:
            raise ValueError("phantom slices_per_patient and supersample must be at least 1")
        if not 0.0 < self.field_of_view <= 1.0:
            raise ValueError(f"phantom field_of_view must be in (0, 1], got {self.field_of_view}")
        if min(self.noise_hu, self.texture_hu, self.blur_sigma, self.soft_tissue_contrast) < 0:
            raise ValueError("phantom noise_hu, texture_hu, blur_sigma and soft_tissue_contrast must be non-negative")


@dataclass
class Anatomy:
    """One patient's random anatomy parameters (coordinates in [-1, 1], y pointing posterior)."""

    body_axes: tuple[float, float]
    fat_thickness: float
    lung_axes: tuple[float, float]
    spine_y: float
    spine_radius: float
    heart_center: tuple[float, float]
    heart_axes: tuple[float, float]
    heart_angle: float
    heart_top: float
    trachea_y: float
    trachea_radius: float
    carina: float
    esophagus_offset: tuple[float, float]
    esophagus_radius: float
    aorta_radius: float
    arch_z: float
    hu_offset: float
    phase: float


def random_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draw one patient's anatomy."""

    def jitter(value: float, spread: float) -> float:
        return float(value + rng.uniform(-spread, spread))

    return Anatomy(
        body_axes=(jitter(0.9, 0.05), jitter(0.66, 0.05)),
        fat_thickness=jitter(0.06, 0.02),
        lung_axes=(jitter(0.3, 0.03), jitter(0.42, 0.04)),
        spine_y=jitter(0.45, 0.03),
        spine_radius=jitter(0.11, 0.015),
        heart_center=(jitter(0.08, 0.04), jitter(-0.08, 0.04)),
        heart_axes=(jitter(0.32, 0.04), jitter(0.25, 0.03)),
        heart_angle=jitter(0.5, 0.2),
        heart_top=jitter(0.45, 0.06),
        trachea_y=jitter(0.08, 0.03),
        trachea_radius=jitter(0.055, 0.01),
        carina=jitter(0.45, 0.05),
        esophagus_offset=(jitter(0.04, 0.02), jitter(0.14, 0.02)),
        esophagus_radius=jitter(0.04, 0.006),
        aorta_radius=jitter(0.065, 0.01),
        arch_z=jitter(0.18, 0.04),
        hu_offset=jitter(0.0, 10.0),
        phase=float(rng.uniform(0, 2 * np.pi)),
    )


def ellipse(x: np.ndarray, y: np.ndarray, cx: Any, cy: Any, ax: Any, ay: Any, angle: float = 0.0) -> np.ndarray:
    """Inside test of a (rotated) ellipse; parameters broadcast over z (shape (Z, 1, 1))."""
    u, v = x - cx, y - cy
    if angle:
        cos, sin = np.cos(angle), np.sin(angle)
        u, v = u * cos + v * sin, v * cos - u * sin
    return np.square(u / np.maximum(ax, 1e-6)) + np.square(v / np.maximum(ay, 1e-6)) <= 1.0


def capsule(x: np.ndarray, y: np.ndarray, p0: tuple[float, float], p1: tuple[float, float], radius: Any) -> np.ndarray:
    """Points within `radius` of the segment p0-p1 (the aortic arch)."""
    (x0, y0), (x1, y1) = p0, p1
    length2 = (x1 - x0) ** 2 + (y1 - y0) ** 2
    t = np.clip(((x - x0) * (x1 - x0) + (y - y0) * (y1 - y0)) / length2, 0.0, 1.0)
    return (x - (x0 + t * (x1 - x0))) ** 2 + (y - (y0 + t * (y1 - y0))) ** 2 <= np.square(radius)


def ramp(z: np.ndarray, start: float, width: float) -> np.ndarray:
    """Smooth 0 -> 1 step over [start, start + width] (organs appear or vanish gradually)."""
    t = np.clip((z - start) / width, 0.0, 1.0)
    return t * t * (3 - 2 * t)


def render_patient(anatomy: Anatomy, config: PhantomConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Render one patient: (images (Z, S, S) float32 HU, masks (Z, S, S) uint8)."""
    n_hi = config.size * config.supersample
    # z runs from the thoracic inlet (0) to below the heart (1); organs live in about [0.05, 0.95].
    z = np.linspace(-0.05, 1.05, config.slices_per_patient, dtype=np.float32)[:, None, None]
    coords = ((np.arange(n_hi) + 0.5) / n_hi * 2.0 - 1.0) * config.field_of_view
    # Broadcastable grids: shapes that do not change with z are computed once, in 2D.
    y = (coords + MEDIASTINUM_Y * (1.0 - config.field_of_view)).astype(np.float32)[None, :, None]
    x = coords.astype(np.float32)[None, None, :]
    shape = (len(z), n_hi, n_hi)
    wobble = 0.03 * np.sin(2 * np.pi * z + anatomy.phase)  # smooth left-right drift along z

    hu = np.full(shape, HU_AIR, dtype=np.float32)
    labels = np.zeros(hu.shape, dtype=np.uint8)
    body_ax, body_ay = anatomy.body_axes
    hu[full(ellipse(x, y, 0.0, 0.05, body_ax, body_ay), shape)] = HU_FAT
    hu[full(ellipse(x, y, 0.0, 0.05, body_ax - anatomy.fat_thickness, body_ay - anatomy.fat_thickness), shape)] = (
        HU_SOFT_TISSUE
    )

    lung_scale = 0.75 + 0.25 * ramp(z, 0.0, 0.4)  # lungs widen below the apex
    lung_ax, lung_ay = anatomy.lung_axes
    for side in (-1.0, 1.0):
        hu[ellipse(x, y, side * 0.42, 0.02, lung_ax * lung_scale, lung_ay * lung_scale, side * 0.15)] = HU_LUNG

    hu[full(ellipse(x, y, 0.0, anatomy.spine_y, anatomy.spine_radius, anatomy.spine_radius * 0.9), shape)] = HU_BONE
    hu[full(ellipse(x, y, 0.0, anatomy.spine_y, anatomy.spine_radius * 0.7, anatomy.spine_radius * 0.6), shape)] = (
        HU_MARROW
    )

    contrast = config.soft_tissue_contrast
    # Heart: large, appears at heart_top, grows, then tapers to the apex near the bottom.
    heart_size = np.sqrt(ramp(z, anatomy.heart_top, 0.2)) * (1.0 - 0.6 * ramp(z, 0.85, 0.12))
    hcx, hcy = anatomy.heart_center
    heart = ellipse(
        x,
        y,
        hcx + wobble,
        hcy,
        anatomy.heart_axes[0] * heart_size,
        anatomy.heart_axes[1] * heart_size,
        anatomy.heart_angle,
    )
    paint(hu, labels, heart, HU_SOFT_TISSUE + 60.0 * contrast, HEART)

    aorta = aorta_mask(x, y, z, anatomy)
    paint(hu, labels, aorta, HU_AORTA, AORTA)

    # Esophagus: between trachea and spine, slightly left; nearly the soft-tissue value.
    ecx = anatomy.esophagus_offset[0] + wobble
    ecy = anatomy.trachea_y + anatomy.esophagus_offset[1] + 0.02 * ramp(z, 0.3, 0.5)
    er = (
        anatomy.esophagus_radius
        * (1.0 + 0.15 * np.sin(3 * z + anatomy.phase))
        * ramp(z, 0.0, 0.06)
        * (1 - ramp(z, 0.93, 0.05))
    )
    esophagus = ellipse(x, y, ecx, ecy, er * 1.2, er)
    paint(hu, labels, esophagus, HU_SOFT_TISSUE + 12.0 * contrast, ESOPHAGUS)

    trachea, lumen = trachea_masks(x, y, z, anatomy, wobble)
    paint(hu, labels, trachea, HU_SOFT_TISSUE, TRACHEA)
    hu[full(lumen, shape)] = HU_AIR

    hu += anatomy.hu_offset
    return finish_slices(hu, labels, config, rng)


def full(region: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return np.broadcast_to(region, shape)


def paint(hu: np.ndarray, labels: np.ndarray, region: np.ndarray, value: float, class_id: int) -> None:
    region = full(region, hu.shape)
    hu[region] = value
    labels[region] = class_id


def aorta_mask(x: np.ndarray, y: np.ndarray, z: np.ndarray, anatomy: Anatomy) -> np.ndarray:
    """Arch at the top, ascending part in front (until the heart), descending beside the spine."""
    radius = anatomy.aorta_radius
    descending_c = (0.17, anatomy.spine_y - 0.12)
    ascending_c = (-0.1, anatomy.trachea_y - 0.15)
    below_arch = z >= anatomy.arch_z
    descending = ellipse(x, y, *descending_c, radius, radius) & below_arch & (z <= 0.96)
    ascending = ellipse(x, y, *ascending_c, radius * 1.2, radius * 1.2) & below_arch & (z <= anatomy.heart_top + 0.1)
    arch_band = (z >= anatomy.arch_z - 0.1) & (z < anatomy.arch_z)
    arch = capsule(x, y, ascending_c, descending_c, radius) & arch_band
    return descending | ascending | arch


def trachea_masks(
    x: np.ndarray, y: np.ndarray, z: np.ndarray, anatomy: Anatomy, wobble: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(trachea label, air lumen): one tube above the carina, two main bronchi just below it."""
    r = anatomy.trachea_radius
    cx = wobble
    above = z < anatomy.carina
    tube = ellipse(x, y, cx, anatomy.trachea_y, r * 1.1, r) & above & (z >= 0.02)
    lumen = ellipse(x, y, cx, anatomy.trachea_y, r * 0.8, r * 0.7) & above & (z >= 0.02)
    # Below the carina the bronchi move apart and the label ends after ~0.1 of the scan.
    spread = 0.15 * ramp(z, anatomy.carina, 0.1)
    bronchi_band = (z >= anatomy.carina) & (z < anatomy.carina + 0.1)
    for side in (-1.0, 1.0):
        tube |= ellipse(x, y, cx + side * spread, anatomy.trachea_y, r * 0.75, r * 0.7) & bronchi_band
        lumen |= ellipse(x, y, cx + side * spread, anatomy.trachea_y, r * 0.5, r * 0.45) & bronchi_band
    return tube, lumen


def add_texture(images: np.ndarray, config: PhantomConfig, rng: np.random.Generator) -> None:
    """Smooth random texture on soft tissue and organs (not air or lung), in place."""
    if config.texture_hu <= 0:
        return
    field = ndimage.gaussian_filter(rng.standard_normal(images.shape), sigma=(1.0, 3.0, 3.0))
    field /= field.std() + 1e-12
    tissue_weight = np.clip((images + 500.0) / 400.0, 0.0, 1.0)  # 0 in air/lung, 1 in tissue
    images += config.texture_hu * tissue_weight * field


def finish_slices(
    hu: np.ndarray, labels: np.ndarray, config: PhantomConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Average down (partial volume), label by majority coverage, texture, blur, add noise."""
    s, f = config.size, config.supersample
    images = hu.reshape(len(hu), s, f, s, f).mean(axis=(2, 4))
    blocks = labels.reshape(len(labels), s, f, s, f)
    coverage = np.stack([(blocks == c).sum(axis=(2, 4), dtype=np.uint16) for c in range(len(CLASS_NAMES))])
    masks = coverage.argmax(axis=0).astype(np.uint8)
    add_texture(images, config, rng)
    if config.blur_sigma > 0:
        images = ndimage.gaussian_filter(images, sigma=(0.0, config.blur_sigma, config.blur_sigma))
    images = images + config.noise_hu * rng.standard_normal(images.shape)
    return images.astype(np.float32), masks


def patient_ids(num_patients: int) -> list[str]:
    return [f"P{i:03d}" for i in range(num_patients)]


def generate_phantom(
    out: str | Path, num_patients: int = 20, seed: int = 0, config: PhantomConfig | None = None
) -> dict[str, Any]:
    """Write a phantom dataset folder (docs/architecture.md format); returns its summary."""
    config = config or PhantomConfig()
    ids = patient_ids(num_patients)
    splits = split_by_patient(ids, config.split_fractions, seed)
    children = np.random.SeedSequence(seed).spawn(num_patients)
    with staged_directory(out) as staging:
        writer = DatasetWriter(staging, name="phantom-segthor", classes=CLASS_NAMES, modality="CT")
        for patient, seed_seq in zip(tqdm(ids, desc="phantom patients", unit="patient"), children, strict=True):
            rng = np.random.default_rng(seed_seq)
            images, masks = render_patient(random_anatomy(rng), config, rng)
            for z, (image, mask) in enumerate(zip(images, masks, strict=True)):
                if config.foreground_only and not has_foreground(mask):
                    continue
                writer.add(patient, z, image, mask)
        summary = writer.finish(splits, out)
    summary["seed"] = seed
    log.info("phantom written to %s: %s slices", out, summary["slices_per_split"])
    return summary
