"""The dataset folder format (see docs/architecture.md) and its loaders.

```
DATA_DIR/
  dataset.json          {"name", "classes", "ignore_index", "modality", "image_format", "patients"}
  images/<slice_id>.npy float32 (H, W) raw intensities (or .png grey/RGB)
  masks/<slice_id>.png  uint8 (H, W) class ids, 255 = ignore (or .npy)
  splits/<split>.txt    one slice id per line
```

Images are z-score normalised per slice (per channel) when loaded, never on disk. A separate
`labels_root` (a noisy-label folder holding `masks/<slice_id>.png`) can replace the masks, so
training can read noisy labels while images come from the data folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from noisyseg.io import atomic_write_bytes, atomic_write_json, file_sha256, read_text

log = logging.getLogger(__name__)

IGNORE_INDEX = 255
SPLITS = ("train", "val", "test")
DATASET_FILE = "dataset.json"
IMAGE_DIR = "images"
MASK_DIR = "masks"
SPLIT_DIR = "splits"
IMAGE_SUFFIXES = (".npy", ".png")
# What `predict` reads from a folder: the folder layout's images and the RGB layouts' JPEGs.
PREDICT_SUFFIXES = (*IMAGE_SUFFIXES, ".jpg", ".jpeg")
MASK_SUFFIXES = (".png", ".npy")
# A noisy-label folder's description (`data corrupt`), and in it the fingerprint of the clean
# training masks it was made from (`clean_masks_fingerprint`), checked by `train --labels`.
NOISE_FILE = "noise.json"
CLEAN_MASKS_FINGERPRINT = "clean_masks_sha256"
# Guards the z-score against constant slices (for example an all-air slice).
NORMALIZATION_EPS = 1e-6
NORMALIZATIONS = ("zscore", "imagenet")
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])


@dataclass
class DatasetInfo:
    """The contents of `dataset.json`."""

    name: str
    classes: list[str]
    ignore_index: int = IGNORE_INDEX
    modality: str = "CT"
    image_format: str = "npy"
    patients: dict[str, list[str]] = field(default_factory=dict)
    # How images are normalised before the network (`normalize_image`): "zscore" per image and
    # channel (CT slices, the default) or "imagenet" (RGB 0-255 scaled to [0, 1], then the
    # ImageNet mean/std that pretrained backbones expect).
    normalization: str = "zscore"

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass
class SplitArrays:
    """A whole split in memory: normalised images, masks and their slice ids."""

    images: np.ndarray  # (N, C, H, W) float32, z-score per slice and channel
    masks: np.ndarray  # (N, H, W) uint8 class ids, 255 = ignore
    ids: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(image (C, H, W) float32, mask (H, W) int64): the item protocol evaluation reads."""
        return torch.from_numpy(self.images[index]), torch.from_numpy(self.masks[index].astype(np.int64))


def read_dataset_info(root: str | Path) -> DatasetInfo:
    """Read `root/dataset.json`, checking the fields the loaders rely on."""
    path = Path(root) / DATASET_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: dataset description not found (is {root} a noisyseg data folder?)")
    raw = read_json_object(path, "dataset description")
    classes = raw.get("classes")
    if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) for c in classes):
        raise ValueError(f"{path}: field 'classes' must be a list of at least two class names")
    ignore_index = raw.get("ignore_index", IGNORE_INDEX)
    if not isinstance(ignore_index, int) or not len(classes) <= ignore_index <= 255:
        raise ValueError(
            f"{path}: field 'ignore_index' must be an integer in [{len(classes)}, 255], got {ignore_index!r}"
        )
    return DatasetInfo(
        name=str(raw.get("name", Path(root).name)),
        classes=list(classes),
        ignore_index=ignore_index,
        modality=str(raw.get("modality", "unknown")),
        image_format=str(raw.get("image_format", "npy")),
        patients=_patients_field(raw.get("patients", {}), path),
        normalization=_normalization_field(raw.get("normalization", "zscore"), path),
    )


def _patients_field(value: object, path: Path) -> dict[str, list[str]]:
    if not isinstance(value, dict) or not all(
        isinstance(ids, list) and all(isinstance(i, str) for i in ids) for ids in value.values()
    ):
        raise ValueError(
            f"{path}: field 'patients' must map each split to a list of patient ids, got {json.dumps(value)[:80]}"
        )
    return {str(split): list(ids) for split, ids in value.items()}


def _normalization_field(value: object, path: Path) -> str:
    if value not in NORMALIZATIONS:
        raise ValueError(f"{path}: field 'normalization' must be one of {', '.join(NORMALIZATIONS)}, got {value!r}")
    return str(value)


def clean_masks_fingerprint(root: str | Path) -> str:
    """sha256 over the training split's mask files (slice id and file hash, in split order),
    each file read in chunks: which clean masks a noisy-label folder was made from."""
    digest = hashlib.sha256()
    for slice_id in read_split_ids(root, "train"):
        path = find_slice_file(Path(root) / MASK_DIR, slice_id, MASK_SUFFIXES, "mask")
        digest.update(f"{slice_id} {file_sha256(path)}\n".encode())
    return digest.hexdigest()


def check_labels_source(root: str | Path, labels_root: str | Path) -> None:
    """Refuse a noisy-label folder made from another data folder: its noise.json fingerprints
    the clean training masks it was made from. A folder without noise.json (a user's own masks,
    or another dataset's) or with one from before the fingerprint is accepted unchecked, with a
    warning (and `labels_origin` records it in the run's config.json)."""
    path = Path(labels_root) / NOISE_FILE
    if not path.is_file():
        log.warning(
            "%s: no %s, so the origin of these masks cannot be checked "
            "(that they label the images of %s); training on them unchecked",
            labels_root,
            NOISE_FILE,
            root,
        )
        return
    noise = read_json_object(path, "noisy-label description")
    expected = noise.get(CLEAN_MASKS_FINGERPRINT)
    if expected is None:
        log.warning(
            "%s: no fingerprint of its source's clean masks (an older `data corrupt` wrote it); not checked against %s",
            path,
            root,
        )
        return
    if clean_masks_fingerprint(root) != expected:
        raise ValueError(
            f"{path}: the labels were made from {noise.get('data', 'another data folder')}, "
            f"whose clean training masks differ from those of {root}; "
            f"make labels from this folder with `noisyseg data corrupt --data {root}`"
        )


def labels_origin(labels_root: str | Path) -> dict[str, Any]:
    """What a run's config.json records of where its `--labels` come from: the noise.json that
    describes them (None: masks of unknown origin) and whether it fingerprints the clean masks
    they were made from (`checked`: `check_labels_source` compared them before training)."""
    path = Path(labels_root) / NOISE_FILE
    if not path.is_file():
        return {"noise_file": None, "checked": False}
    return {
        "noise_file": str(path),
        "checked": CLEAN_MASKS_FINGERPRINT in read_json_object(path, "noisy-label description"),
    }


def has_split_masks(root: str | Path, labels_root: str | Path, split: str) -> bool:
    """Whether a labels folder holds a mask for every slice of `split` (True) or for none (False,
    also when `root` has no such split); a folder holding some of them is refused."""
    if not split_file(root, split).is_file():
        return False
    ids = read_split_ids(root, split)
    mask_dir = Path(labels_root) / MASK_DIR
    missing = [i for i in ids if not any((mask_dir / f"{i}{suffix}").is_file() for suffix in MASK_SUFFIXES)]
    if missing and len(missing) < len(ids):
        raise ValueError(
            f"{mask_dir}: holds masks of {len(ids) - len(missing)} of the {len(ids)} slices of split "
            f"'{split}' (first missing: {missing[0]}); expected all of them (noisy {split} masks) or none"
        )
    return not missing


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from a UTF-8 file, or ValueError naming `path`."""
    try:
        raw = json.loads(read_text(path, what))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not readable JSON ({err})") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: {what} must be a JSON object, got {type(raw).__name__}")
    return raw


def write_dataset_info(root: str | Path, info: DatasetInfo) -> None:
    atomic_write_json(Path(root) / DATASET_FILE, asdict(info))


def split_file(root: str | Path, split: str) -> Path:
    return Path(root) / SPLIT_DIR / f"{split}.txt"


def read_split_ids(root: str | Path, split: str) -> list[str]:
    """The slice ids listed in `root/splits/<split>.txt` (blank lines skipped)."""
    path = split_file(root, split)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: split list file not found (expected one slice id per line)")
    ids = [line.strip() for line in read_text(path, "split list").splitlines() if line.strip()]
    if not ids:
        raise ValueError(f"{path}: split '{split}' is empty")
    return ids


def write_split_ids(root: str | Path, split: str, ids: Sequence[str]) -> None:
    atomic_write_bytes(split_file(root, split), "".join(f"{i}\n" for i in ids).encode("utf-8"))


def split_by_patient(
    patient_ids: Sequence[str], fractions: Sequence[float] = (0.6, 0.2, 0.2), seed: int = 0
) -> dict[str, list[str]]:
    """Shuffle patients deterministically and cut them into train/val/test.

    Every split gets at least one patient (so at least three patients are needed); no patient
    is in two splits.
    """
    if len(fractions) != len(SPLITS) or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(
            f"split fractions must be three non-negative numbers (train, val, test), got {list(fractions)}"
        )
    patients = sorted(set(patient_ids))
    if len(patients) < len(SPLITS):
        raise ValueError(f"need at least {len(SPLITS)} patients to split into {'/'.join(SPLITS)}, got {len(patients)}")
    random.Random(seed).shuffle(patients)
    total = float(sum(fractions))
    n_val = max(1, round(len(patients) * fractions[1] / total))
    n_test = max(1, round(len(patients) * fractions[2] / total))
    n_train = len(patients) - n_val - n_test
    if n_train < 1:  # tiny patient counts: give train one patient back
        n_train, n_val = 1, len(patients) - 1 - n_test
    return {
        "train": sorted(patients[:n_train]),
        "val": sorted(patients[n_train : n_train + n_val]),
        "test": sorted(patients[n_train + n_val :]),
    }


def find_slice_file(directory: Path, slice_id: str, suffixes: Sequence[str], what: str) -> Path:
    """`directory/<slice_id><suffix>` for the first suffix that exists."""
    for suffix in suffixes:
        path = directory / f"{slice_id}{suffix}"
        if path.is_file():
            return path
    names = " or ".join(f"{slice_id}{s}" for s in suffixes)
    raise FileNotFoundError(
        f"{directory / (slice_id + suffixes[0])}: no {what} for slice '{slice_id}' (looked for {names} in {directory})"
    )


def read_image(path: str | Path) -> np.ndarray:
    """An image as float32 (C, H, W): NPY (H, W) / (H, W, C) raw values, or PNG grey/RGB."""
    path = Path(path)
    try:
        if path.suffix == ".npy":
            array = np.load(path, allow_pickle=False)
        else:
            with Image.open(path) as img:
                array = np.asarray(img.convert("RGB") if img.mode not in ("L", "I", "I;16", "F") else img)
    except Exception as err:  # numpy and PIL raise many error types for damaged files
        raise ValueError(f"{path}: unreadable image ({err})") from err
    if array.ndim == 2:
        array = array[None]
    elif array.ndim == 3 and array.shape[-1] in (1, 3, 4):
        array = np.moveaxis(array, -1, 0)
    else:
        raise ValueError(f"{path}: image must be (H, W) or (H, W, C) with C in 1/3/4, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"{path}: image must be numeric, got dtype {array.dtype}")
    image = np.ascontiguousarray(array, dtype=np.float32)
    check_finite(image, path, "image", "value")
    return image


def check_finite(array: np.ndarray, path: str | Path, what: str, unit: str) -> None:
    """Refuse NaN and infinity: one would turn a z-scored slice, a prediction or a loss into NaN."""
    bad = array.size - int(np.count_nonzero(np.isfinite(array)))
    if bad:
        raise ValueError(
            f"{path}: {what} holds {bad} non-finite {unit}{'s' if bad > 1 else ''} "
            "(NaN or infinity); expected finite intensities"
        )


def encode_image(image: np.ndarray) -> bytes:
    """A raw float32 image as NPY bytes."""
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(image, dtype=np.float32), allow_pickle=False)
    return buffer.getvalue()


def write_image(path: str | Path, image: np.ndarray) -> None:
    """Write a raw float32 image as NPY, atomically."""
    atomic_write_bytes(path, encode_image(image))


def read_mask(path: str | Path) -> np.ndarray:
    """A mask as uint8 (H, W) class ids, from PNG (mode L or P) or NPY."""
    path = Path(path)
    try:
        if path.suffix == ".npy":
            array = np.load(path, allow_pickle=False)
        else:
            with Image.open(path) as img:
                array = np.asarray(img)
    except Exception as err:
        raise ValueError(f"{path}: unreadable mask ({err})") from err
    if array.ndim != 2:
        raise ValueError(f"{path}: mask must be a 2D (H, W) array of class ids, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer) or array.min(initial=0) < 0 or array.max(initial=0) > 255:
        raise ValueError(f"{path}: mask must hold integer class ids in [0, 255], got dtype {array.dtype}")
    return array.astype(np.uint8)


def encode_mask(path: str | Path, mask: np.ndarray) -> bytes:
    """A uint8 (H, W) mask as the bytes of `path`'s format: PNG, or NPY for a .npy path."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.min(initial=0) < 0 or mask.max(initial=0) > 255:
        raise ValueError(f"{path}: mask to write must be 2D with values in [0, 255], got shape {mask.shape}")
    buffer = io.BytesIO()
    if Path(path).suffix == ".npy":
        np.save(buffer, mask.astype(np.uint8), allow_pickle=False)
    else:
        Image.fromarray(mask.astype(np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def write_mask(path: str | Path, mask: np.ndarray) -> None:
    """Write a uint8 (H, W) mask as PNG (or NPY if `path` ends in .npy), atomically."""
    atomic_write_bytes(path, encode_mask(path, mask))


@contextlib.contextmanager
def staged_directory(out: str | Path) -> Iterator[Path]:
    """Build a new folder in a hidden sibling and move it to `out` only once it is complete.

    Readers see no folder or a complete one. Files inside are written plainly and flushed with
    one `os.sync()` at the end: per-file fsync costs ~10 ms each, minutes for a real dataset.
    `out` must not exist or be an empty folder.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: already exists and is not an empty folder; choose a new output folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial"))
    try:
        yield staging
        os.sync()
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_new_file(path: Path, data: bytes) -> None:
    """Write a file inside a staged directory (atomicity comes from the directory rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def check_mask_values(mask: np.ndarray, num_classes: int, ignore_index: int, path: Path) -> None:
    """Every value must be a class id or the ignore index."""
    bad = (mask >= num_classes) & (mask != ignore_index)
    if bad.any():
        values = sorted({int(v) for v in np.unique(mask[bad])})
        raise ValueError(
            f"{path}: class id(s) {values} out of range (expected 0..{num_classes - 1} or ignore index {ignore_index})"
        )


def has_foreground(mask: np.ndarray, ignore_index: int = IGNORE_INDEX) -> bool:
    """Whether any pixel holds an object class (not background, not ignored)."""
    return bool(((mask != 0) & (mask != ignore_index)).any())


def normalize_image(image: np.ndarray, normalization: str = "zscore") -> np.ndarray:
    """A (C, H, W) image as the network sees it: z-scored per channel over its pixels, or
    ImageNet-normalised (0-255 RGB to [0, 1], minus the mean, over the standard deviation)."""
    if normalization == "imagenet":
        if image.shape[0] != 3:
            raise ValueError(f"image: 'imagenet' normalisation needs 3 (RGB) channels, got shape {image.shape}")
        return ((image / 255.0 - IMAGENET_MEAN[:, None, None]) / IMAGENET_STD[:, None, None]).astype(np.float32)
    mean = image.mean(axis=(1, 2), keepdims=True)
    std = image.std(axis=(1, 2), keepdims=True)
    return ((image - mean) / (std + NORMALIZATION_EPS)).astype(np.float32)


class DatasetWriter:
    """Writes slices into a data folder being built (see `staged_directory`) and, on `finish`,
    the split lists and dataset.json."""

    def __init__(self, root: str | Path, name: str, classes: Sequence[str], modality: str = "CT") -> None:
        self.root = Path(root)
        self.name = name
        self.classes = list(classes)
        self.modality = modality
        self.slices_by_patient: dict[str, list[str]] = {}
        self.pixels_per_class = np.zeros(len(self.classes), dtype=np.int64)

    def add(self, patient_id: str, z: int, image: np.ndarray, mask: np.ndarray) -> str:
        """Write one slice; returns its id `<patient>_<zzz>`."""
        slice_id = f"{patient_id}_{z:03d}"
        mask_path = self.root / MASK_DIR / f"{slice_id}.png"
        write_new_file(self.root / IMAGE_DIR / f"{slice_id}.npy", encode_image(image))
        write_new_file(mask_path, encode_mask(mask_path, mask))
        self.slices_by_patient.setdefault(patient_id, []).append(slice_id)
        self.pixels_per_class += np.bincount(mask.ravel(), minlength=256)[: len(self.classes)]
        return slice_id

    def finish(self, patient_splits: dict[str, list[str]], out: str | Path) -> dict[str, Any]:
        """Write split lists and dataset.json; returns a summary (slices per split, pixels per class).

        `out` is where the folder will live once moved into place (named in the summary).
        """
        slices_per_split = {}
        for split in SPLITS:
            ids = [sid for patient in patient_splits[split] for sid in self.slices_by_patient.get(patient, [])]
            if not ids:
                raise ValueError(
                    f"{split_file(self.root, split)}: split '{split}' would be "
                    f"empty (patients {patient_splits[split]} have no slices)"
                )
            write_split_ids(self.root, split, ids)
            slices_per_split[split] = len(ids)
        info = DatasetInfo(name=self.name, classes=self.classes, modality=self.modality, patients=patient_splits)
        write_dataset_info(self.root, info)
        return {
            "out": str(out),
            "slices_per_split": slices_per_split,
            "pixels_per_class": dict(zip(self.classes, (int(n) for n in self.pixels_per_class), strict=True)),
            "patients": patient_splits,
        }
