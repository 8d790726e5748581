"""The label store: the labels a run currently trains on, beside the untouched originals.

ADELE corrects training labels as it goes. The corrections never touch the annotation files:
they live in a fixed-shape uint8 array (N, H, W), one row per training slice, saved in the run
directory as two files:

    <dir>/labels.npy    the array (plain .npy, so `np.load(..., mmap_mode="r")` maps it)
    <dir>/labels.json   slice ids, shape, and the SHA-256 of the original labels and of the array

Both are written atomically, array first. The JSON records the array's hash, so a store whose
array and description come from different saves is refused on load, as is a store whose ids,
shape or original-label fingerprint do not match the data it is loaded against.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from noisyseg.training.distributed import fault_point
from noisyseg.training.io import atomic_write_bytes, atomic_write_json

ARRAY_FILE = "labels.npy"
INFO_FILE = "labels.json"
FORMAT_VERSION = 1


def labels_fingerprint(labels: np.ndarray, ids: Sequence[str]) -> str:
    """SHA-256 over the slice ids, the shape and the bytes of a uint8 label array."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"ids": list(ids), "shape": list(labels.shape)}).encode())
    digest.update(np.ascontiguousarray(labels, dtype=np.uint8).tobytes())
    return digest.hexdigest()


def _array_digest(labels: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(labels).tobytes()).hexdigest()


class LabelStore:
    """Current training labels (a private copy) plus the fingerprint of the originals."""

    def __init__(self, labels: np.ndarray, ids: Sequence[str], original_fingerprint: str) -> None:
        if labels.ndim != 3 or labels.dtype != np.uint8:
            raise ValueError(f"label store: expected a (N, H, W) uint8 array, got {labels.dtype} {labels.shape}")
        if len(ids) != labels.shape[0]:
            raise ValueError(f"label store: {len(ids)} slice ids for {labels.shape[0]} label rows")
        self.labels = labels
        self.ids = list(ids)
        self.original_fingerprint = original_fingerprint

    @classmethod
    def from_original(cls, original: np.ndarray, ids: Sequence[str]) -> LabelStore:
        """A store starting from (a copy of) the original labels."""
        original = np.asarray(original)
        if original.dtype != np.uint8:
            raise ValueError(f"label store: original labels must be uint8, got {original.dtype}")
        return cls(original.copy(), ids, labels_fingerprint(original, ids))

    def update(self, rows: np.ndarray, labels: np.ndarray) -> None:
        """Replace the labels of the slices at positions `rows`."""
        fault_point("label-store-update")
        self.labels[rows] = labels

    def changed_fraction(self, original: np.ndarray) -> float:
        """Fraction of all training pixels whose current label differs from the original."""
        return float(np.count_nonzero(self.labels != original)) / max(self.labels.size, 1)

    def save(self, directory: str | Path) -> None:
        """Write `labels.npy` then `labels.json` into `directory`, each atomically."""
        directory = Path(directory)
        buffer = io.BytesIO()
        np.save(buffer, self.labels, allow_pickle=False)
        atomic_write_bytes(directory / ARRAY_FILE, buffer.getvalue())
        fault_point("label-store-write")
        atomic_write_json(
            directory / INFO_FILE,
            {
                "format_version": FORMAT_VERSION,
                "ids": self.ids,
                "shape": list(self.labels.shape),
                "original_fingerprint": self.original_fingerprint,
                "labels_sha256": _array_digest(self.labels),
            },
        )

    @classmethod
    def load(cls, directory: str | Path, original: np.ndarray, ids: Sequence[str]) -> LabelStore:
        """Load a saved store, refusing it unless it belongs to exactly these original labels."""
        directory = Path(directory)
        info_path, array_path = directory / INFO_FILE, directory / ARRAY_FILE
        for path in (info_path, array_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path}: label store file missing")
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
            labels = np.load(array_path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise ValueError(f"{directory}: unreadable label store ({err})") from err
        expected_fingerprint = labels_fingerprint(np.asarray(original), ids)
        if info.get("ids") != list(ids):
            raise ValueError(f"{info_path}: label store slice ids do not match the training split of the data ({len(info.get('ids', []))} stored, {len(ids)} in the data)")
        if info.get("shape") != list(np.shape(original)) or list(labels.shape) != list(np.shape(original)):
            raise ValueError(f"{info_path}: label store shape {labels.shape} does not match the training labels {np.shape(original)}")
        if info.get("original_fingerprint") != expected_fingerprint:
            raise ValueError(f"{info_path}: label store was made from different original labels than the ones given (fingerprint mismatch)")
        if labels.dtype != np.uint8 or info.get("labels_sha256") != _array_digest(labels):
            raise ValueError(f"{array_path}: label array does not match its description in {INFO_FILE} (damaged or from another save)")
        return cls(labels, ids, expected_fingerprint)
