"""SegTHOR-layout NIfTI volumes, sliced axially and converted into the dataset folder format.

Layout: `ROOT/Patient_XX/Patient_XX.nii.gz` (CT, HU) and `ROOT/Patient_XX/GT.nii.gz` (labels).
Slices are taken along the volume's third axis, transposed so rows follow the second voxel axis,
resized (images bilinear with antialiasing, masks nearest) and split by patient.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from noisyseg.data.folder import (
    DatasetWriter,
    check_finite,
    check_mask_values,
    has_foreground,
    split_by_patient,
    staged_directory,
)
from noisyseg.data.phantom import CLASS_NAMES

log = logging.getLogger(__name__)

GT_FILE = "GT.nii.gz"


@dataclass
class SegthorPatient:
    patient_id: str
    image_path: Path
    label_path: Path


@dataclass
class SegthorConfig:
    """size: output slice size; foreground_only: keep only slices with an organ (paper setup);
    split_fractions: train/val/test fractions of patients; seed: the patient shuffle."""

    size: int = 256
    foreground_only: bool = True
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"--size: slice size must be at least 1 pixel, got {self.size}")


def find_segthor_patients(root: str | Path) -> list[SegthorPatient]:
    """Every `Patient_XX` folder under `root` holding both its CT and GT.nii.gz."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: SegTHOR folder not found")
    patients = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("Patient_")):
        image_path = folder / f"{folder.name}.nii.gz"
        label_path = folder / GT_FILE
        for path in (image_path, label_path):
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path}: missing (every Patient_XX folder needs {folder.name}.nii.gz and {GT_FILE})"
                )
        patients.append(SegthorPatient(folder.name, image_path, label_path))
    if not patients:
        raise FileNotFoundError(
            f"{root}: no Patient_XX folders found (expected Patient_XX/Patient_XX.nii.gz and Patient_XX/{GT_FILE})"
        )
    return patients


def read_volume(path: str | Path) -> tuple[nib.spatialimages.SpatialImage, np.ndarray]:
    """(the NIfTI image, its voxels as a (Z, H, W) array): axial slices along the third voxel
    axis, rows following the second; the file's scaling (HU for CT) is applied."""
    try:
        image = nib.load(str(path))
        if not isinstance(image, nib.spatialimages.SpatialImage):
            raise TypeError(f"{type(image).__name__} is not a volume image")
        data = np.asanyarray(image.dataobj)
    except Exception as err:  # nibabel raises several error types for damaged files
        raise ValueError(f"{path}: unreadable NIfTI file ({err})") from err
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3D volume, got shape {data.shape}")
    if np.issubdtype(data.dtype, np.floating):  # integer voxels (scaled or not) are always finite
        check_finite(data, path, "volume", "voxel")
    return image, np.transpose(data, (2, 1, 0))


def load_volume(path: Path) -> np.ndarray:
    """A NIfTI volume as a (Z, H, W) array: axial slices along the third voxel axis."""
    return read_volume(path)[1]


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """(Z, H, W) float volume to (Z, size, size), bilinear with antialiasing."""
    tensor = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))[:, None]
    if tuple(tensor.shape[-2:]) != (size, size):
        tensor = F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return tensor[:, 0].numpy()


def resize_masks(masks: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """(Z, H, W) label volume to (Z, size, size) (or (Z, *size) for a (height, width) pair),
    nearest neighbour at pixel centres."""
    height, width = (size, size) if isinstance(size, int) else size
    rows = ((np.arange(height) + 0.5) * masks.shape[1] / height).astype(np.int64)
    cols = ((np.arange(width) + 0.5) * masks.shape[2] / width).astype(np.int64)
    return masks[:, rows[:, None], cols[None, :]]


def load_patient(patient: SegthorPatient, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(images (Z, size, size) float32 HU, masks (Z, size, size) uint8) of one patient."""
    images = load_volume(patient.image_path)
    labels = load_volume(patient.label_path)
    if images.shape != labels.shape:
        raise ValueError(
            f"{patient.label_path}: label volume shape {labels.shape} does not "
            f"match CT {patient.image_path} shape {images.shape} (as Z, H, W)"
        )
    labels = np.rint(labels).astype(np.int64)
    if labels.min() < 0 or labels.max() > 255:
        raise ValueError(f"{patient.label_path}: labels must be in [0, 255], found {labels.min()}..{labels.max()}")
    masks = labels.astype(np.uint8)
    check_mask_values(masks, len(CLASS_NAMES), 255, patient.label_path)
    return resize_images(images, size), resize_masks(masks, size)


def convert_segthor(root: str | Path, out: str | Path, config: SegthorConfig | None = None) -> dict[str, Any]:
    """Convert a SegTHOR-layout folder into the dataset folder format; returns its summary."""
    config = config or SegthorConfig()
    patients = find_segthor_patients(root)
    splits = split_by_patient([p.patient_id for p in patients], config.split_fractions, config.seed)
    with staged_directory(out) as staging:
        writer = DatasetWriter(staging, name="segthor", classes=CLASS_NAMES, modality="CT")
        for patient in tqdm(patients, desc="segthor patients", unit="patient"):
            images, masks = load_patient(patient, config.size)
            for z, (image, mask) in enumerate(zip(images, masks, strict=True)):
                if config.foreground_only and not has_foreground(mask):
                    continue
                writer.add(patient.patient_id, z, image, mask)
        summary = writer.finish(splits, out)
    log.info("SegTHOR converted to %s: %s slices", out, summary["slices_per_split"])
    return summary
