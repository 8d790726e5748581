"""The label store: the labels a run currently trains on, beside the untouched originals.

ADELE corrects training labels as it goes. The corrections never touch the annotation files:
they live in the store, one uint8 label map per training image at that image's own size
(`LabelMaps`: the maps concatenated in one flat buffer, memory-mapped from an unlinked file in
the run directory when the run streams its data, so the store never has to fit in memory). A
checkpoint holds it as two files:

    <dir>/labels.npy    the maps' bytes in item order (plain .npy, so `np.load(..., mmap_mode="r")`
                        maps it): shape (N, H, W) when every image has one size, else (total,)
    <dir>/labels.json   slice ids, each map's (H, W), the SHA-256 of the original labels and of
                        the array

Both are written atomically, array first (streamed in chunks). The JSON records the array's hash,
so a store whose array and description come from different saves is refused on load, as is a
store whose ids, sizes or original-label fingerprint do not match the data it is loaded against.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from noisyseg.io import atomic_open, atomic_write_json
from noisyseg.runtime.distributed import fault_point

ARRAY_FILE = "labels.npy"
INFO_FILE = "labels.json"
FORMAT_VERSION = 2
CHUNK = 1 << 20  # bytes hashed, compared or written at a time (a bounded transient)


class LabelMaps:
    """N uint8 label maps of (possibly) different sizes in one flat buffer, item order."""

    def __init__(self, flat: np.ndarray, shapes: Sequence[tuple[int, int]]) -> None:
        self.shapes = [(int(h), int(w)) for h, w in shapes]
        self.offsets = np.concatenate([[0], np.cumsum([h * w for h, w in self.shapes], dtype=np.int64)])
        if flat.dtype != np.uint8 or flat.ndim != 1 or len(flat) != self.offsets[-1]:
            raise ValueError(
                f"label maps: expected {self.offsets[-1]} uint8 values for "
                f"{len(self.shapes)} maps, got {flat.dtype} {flat.shape}"
            )
        self.flat = flat

    @classmethod
    def allocate(cls, shapes: Sequence[tuple[int, int]], workdir: str | Path | None = None) -> LabelMaps:
        """Zeroed maps: in memory, or memory-mapped from an unlinked file in `workdir`."""
        total = int(sum(h * w for h, w in shapes))
        if workdir is None:
            return cls(np.zeros(total, dtype=np.uint8), shapes)
        fd, name = tempfile.mkstemp(dir=workdir, prefix=".labels-", suffix=".tmp")
        try:
            os.ftruncate(fd, max(total, 1))
            flat = np.memmap(name, dtype=np.uint8, mode="r+", shape=(max(total, 1),))[:total]
        finally:
            os.close(fd)
            os.unlink(name)  # the mapping keeps the pages; nothing is left behind
        return cls(flat, shapes)

    @classmethod
    def from_arrays(
        cls,
        maps: Iterable[np.ndarray],
        shapes: Sequence[tuple[int, int]] | None = None,
        workdir: str | Path | None = None,
    ) -> LabelMaps:
        """Maps copied from `maps` (an (N, H, W) array or one (H, W) array at a time, `shapes`
        given then so the buffer is allocated before the first map is read)."""
        if isinstance(maps, np.ndarray):
            if maps.ndim != 3 or maps.dtype != np.uint8:
                raise ValueError(f"label store: expected a (N, H, W) uint8 array, got {maps.dtype} {maps.shape}")
            shapes = [maps.shape[1:]] * len(maps)
            if workdir is None:
                return cls(np.ascontiguousarray(maps).reshape(-1).copy(), shapes)
        if shapes is None:
            maps = list(maps)
            shapes = [m.shape for m in maps]
        result = cls.allocate(shapes, workdir)
        for index, array in enumerate(maps):
            result[index] = array
        return result

    @classmethod
    def from_stream(cls, maps: Iterable[np.ndarray], workdir: str | Path | None = None) -> LabelMaps:
        """Maps read one at a time (sizes unknown up front): appended to an unlinked file in
        `workdir` that is then memory-mapped, so no list of all maps is held; in memory without."""
        if workdir is None:
            arrays = [np.asarray(m, dtype=np.uint8) for m in maps]
            return cls(
                np.concatenate([a.reshape(-1) for a in arrays]) if arrays else np.zeros(0, np.uint8),
                [a.shape for a in arrays],
            )
        shapes = []
        with tempfile.TemporaryFile(dir=workdir, prefix=".labels-") as handle:
            for array in maps:
                handle.write(np.ascontiguousarray(array, dtype=np.uint8).tobytes())
                shapes.append(array.shape)
            handle.flush()
            total = int(sum(h * w for h, w in shapes))
            flat = (
                np.memmap(handle, dtype=np.uint8, mode="r+", shape=(max(total, 1),))[:total]
                if total
                else np.zeros(0, np.uint8)
            )
        return cls(flat, shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, index: int) -> np.ndarray:
        """Map `index` as a writable (H, W) view."""
        return self.flat[self.offsets[index] : self.offsets[index + 1]].reshape(self.shapes[index])

    def __setitem__(self, index: int, labels: np.ndarray) -> None:
        if np.shape(labels) != self.shapes[index]:
            raise ValueError(f"label store: map {index} is {self.shapes[index]}, got {np.shape(labels)}")
        self[index][...] = labels

    @property
    def uniform(self) -> bool:
        return len(set(self.shapes)) == 1

    def stacked(self) -> np.ndarray:
        """The maps as one (N, H, W) view (every image of one size)."""
        if not self.uniform:
            raise ValueError(
                f"label store: images differ in size ({sorted(set(self.shapes))[:3]} ...); no stacked view"
            )
        return self.flat.reshape(len(self.shapes), *self.shapes[0])

    def chunks(self) -> Iterable[np.ndarray]:
        for start in range(0, len(self.flat), CHUNK):
            yield self.flat[start : start + CHUNK]
        self.release()

    def save_npy(self, path: str | Path) -> None:
        """Write the maps' bytes in item order as one .npy file, streamed and atomically: shape
        (N, H, W) when every map has one size, else (total,)."""
        shape = (len(self), *self.shapes[0]) if self.uniform else (len(self.flat),)
        with atomic_open(path) as handle:
            np.lib.format.write_array_header_1_0(handle, {"descr": "|u1", "fortran_order": False, "shape": shape})
            for chunk in self.chunks():
                handle.write(memoryview(chunk))

    def release(self, index: int | None = None) -> None:
        """Drop this process's mapping of the pages of map `index` (all maps: None) from its
        resident set; the bytes stay in the file and the page cache. Without this every page
        a pass touched would count in the process's RSS, which would grow with the dataset."""
        handle = getattr(self.flat, "_mmap", None)
        if handle is None or not len(self.flat):
            return
        base = (
            self.flat.ctypes.data - np.frombuffer(handle, dtype=np.uint8, count=1).ctypes.data
        )  # the maps' start in the mapping
        start, stop = (0, len(self.flat)) if index is None else (int(self.offsets[index]), int(self.offsets[index + 1]))
        start, stop = base + start, base + stop
        page = mmap.PAGESIZE
        first = start // page * page
        length = min(-(-stop // page) * page, len(handle)) - first
        if length > 0:
            handle.madvise(mmap.MADV_DONTNEED, first, length)

    def digest(self) -> str:
        digest = hashlib.sha256()
        for chunk in self.chunks():
            digest.update(memoryview(chunk))
        return digest.hexdigest()

    def fingerprint(self, ids: Sequence[str]) -> str:
        """SHA-256 over the slice ids, the sizes and the bytes of the maps (for one size the
        shape is recorded as (N, H, W), as version 1 of the store did)."""
        digest = hashlib.sha256()
        shape = [len(self.shapes), *self.shapes[0]] if self.uniform else [list(s) for s in self.shapes]
        digest.update(json.dumps({"ids": list(ids), "shape": shape}).encode())
        for chunk in self.chunks():
            digest.update(memoryview(chunk))
        return digest.hexdigest()

    def class_counts(self, num_classes: int) -> np.ndarray:
        """(num_classes,) int64: pixels of each class id over all maps (ignored pixels not counted)."""
        counts = np.zeros(256, dtype=np.int64)
        for chunk in self.chunks():
            counts += np.bincount(chunk, minlength=256)
        return counts[:num_classes]

    def count_different(self, other: LabelMaps) -> int:
        return sum(int(np.count_nonzero(a != b)) for a, b in zip(self.chunks(), other.chunks(), strict=True))

    def copy(self, workdir: str | Path | None = None) -> LabelMaps:
        result = LabelMaps.allocate(self.shapes, workdir)
        for start in range(0, len(self.flat), CHUNK):
            result.flat[start : start + CHUNK] = self.flat[start : start + CHUNK]
        self.release()
        result.release()
        return result


def labels_fingerprint(labels: np.ndarray | LabelMaps, ids: Sequence[str]) -> str:
    """SHA-256 over the slice ids, the sizes and the bytes of the uint8 label maps."""
    return as_label_maps(labels).fingerprint(ids)


def as_label_maps(labels: np.ndarray | LabelMaps) -> LabelMaps:
    return labels if isinstance(labels, LabelMaps) else LabelMaps.from_arrays(np.asarray(labels))


class LabelStore:
    """Current training labels (a private copy) plus the fingerprint of the originals."""

    def __init__(self, maps: LabelMaps, ids: Sequence[str], original_fingerprint: str) -> None:
        if len(ids) != len(maps):
            raise ValueError(f"label store: {len(ids)} slice ids for {len(maps)} label maps")
        self.maps = maps
        self.ids = list(ids)
        self.original_fingerprint = original_fingerprint

    @property
    def labels(self) -> np.ndarray:
        """The (N, H, W) view of a store whose images share one size."""
        return self.maps.stacked()

    @classmethod
    def from_original(
        cls, original: np.ndarray | LabelMaps, ids: Sequence[str], workdir: str | Path | None = None
    ) -> LabelStore:
        """A store starting from (a copy of) the original labels."""
        if isinstance(original, np.ndarray) and original.dtype != np.uint8:
            raise ValueError(f"label store: original labels must be uint8, got {original.dtype}")
        maps = as_label_maps(original)
        if len(ids) != len(maps):
            raise ValueError(f"label store: {len(ids)} slice ids for {len(maps)} label maps")
        return cls(maps.copy(workdir), ids, maps.fingerprint(ids))

    def update(self, rows: np.ndarray, labels: np.ndarray | Sequence[np.ndarray]) -> None:
        """Replace the label maps of the images at positions `rows`."""
        fault_point("label-store-update")
        for row, value in zip(np.asarray(rows).tolist(), labels, strict=True):
            self.maps[row] = value

    def give_back(self, class_id: int, original: np.ndarray | LabelMaps) -> int:
        """Undo correction's erasure of `class_id`: every pixel the original labels as the class
        and the store as background takes the class again. Returns the pixels restored."""
        original_flat = as_label_maps(original).flat
        restored = 0
        for start in range(0, len(self.maps.flat), CHUNK):
            current = self.maps.flat[start : start + CHUNK]
            erased = (original_flat[start : start + CHUNK] == class_id) & (current == 0)
            current[erased] = class_id
            restored += int(np.count_nonzero(erased))
        self.maps.release()
        return restored

    def changed_fraction(self, original: np.ndarray | LabelMaps) -> float:
        """Fraction of all training pixels whose current label differs from the original."""
        return float(self.maps.count_different(as_label_maps(original))) / max(len(self.maps.flat), 1)

    def save(self, directory: str | Path) -> None:
        """Write `labels.npy` (streamed) then `labels.json` into `directory`, each atomically."""
        directory = Path(directory)
        self.maps.save_npy(directory / ARRAY_FILE)
        fault_point("label-store-write")
        atomic_write_json(
            directory / INFO_FILE,
            {
                "format_version": FORMAT_VERSION,
                "ids": self.ids,
                "shapes": [list(s) for s in self.maps.shapes],
                "original_fingerprint": self.original_fingerprint,
                "labels_sha256": self.maps.digest(),
            },
        )

    @classmethod
    def load(
        cls,
        directory: str | Path,
        original: np.ndarray | LabelMaps,
        ids: Sequence[str],
        workdir: str | Path | None = None,
    ) -> LabelStore:
        """Load a saved store, refusing it unless it belongs to exactly these original labels."""
        directory = Path(directory)
        info_path, array_path = directory / INFO_FILE, directory / ARRAY_FILE
        for path in (info_path, array_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path}: label store file missing")
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
            array = np.load(array_path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as err:
            raise ValueError(f"{directory}: unreadable label store ({err})") from err
        original = as_label_maps(original)
        if info.get("ids") != list(ids):
            raise ValueError(
                f"{info_path}: label store slice ids do not match the training split of "
                f"the data ({len(info.get('ids', []))} stored, {len(ids)} in the data)"
            )
        if info.get("shapes") != [list(s) for s in original.shapes] or array.size != len(original.flat):
            raise ValueError(
                f"{info_path}: label store sizes do not match the training labels "
                f"({array.size} stored pixels, {len(original.flat)} in the data)"
            )
        expected_fingerprint = original.fingerprint(ids)
        if info.get("original_fingerprint") != expected_fingerprint:
            raise ValueError(
                f"{info_path}: label store was made from different "
                "original labels than the ones given (fingerprint mismatch)"
            )
        if array.dtype != np.uint8:
            raise ValueError(
                f"{array_path}: label array does not match its "
                f"description in {INFO_FILE} (damaged or from another save)"
            )
        maps = LabelMaps(array.reshape(-1), original.shapes).copy(workdir)
        if info.get("labels_sha256") != maps.digest():
            raise ValueError(
                f"{array_path}: label array does not match its "
                f"description in {INFO_FILE} (damaged or from another save)"
            )
        return cls(maps, ids, expected_fingerprint)
