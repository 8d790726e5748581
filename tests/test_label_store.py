"""The label store: round trip, refusal of stores that do not match the data, private copy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from noisyseg.data.label_store import ARRAY_FILE, INFO_FILE, LabelStore


@pytest.fixture()
def original() -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 5, size=(4, 6, 7), dtype=np.uint8), [f"P000_{z:03d}" for z in range(4)]


def test_round_trip_keeps_corrections(tmp_path: Path, original: tuple[np.ndarray, list[str]]) -> None:
    labels, ids = original
    store = LabelStore.from_original(labels, ids)
    store.update(np.array([1, 3]), np.full((2, 6, 7), 2, dtype=np.uint8))
    store.save(tmp_path)
    loaded = LabelStore.load(tmp_path, labels, ids)
    assert np.array_equal(loaded.labels, store.labels)
    assert loaded.ids == ids
    # Saved as plain .npy, so it can be memory-mapped.
    mapped = np.load(tmp_path / ARRAY_FILE, mmap_mode="r")
    assert np.array_equal(mapped, store.labels)


def test_changed_fraction_counts_pixels_that_differ_from_the_original(original: tuple[np.ndarray, list[str]]) -> None:
    labels, ids = original
    store = LabelStore.from_original(labels, ids)
    assert store.changed_fraction(labels) == 0.0
    new_row = labels[0].copy()
    new_row[:2, :3] = (new_row[:2, :3] + 1) % 5  # 6 pixels changed
    store.update(np.array([0]), new_row[None])
    assert store.changed_fraction(labels) == pytest.approx(6 / labels.size)


def test_store_is_a_private_copy_of_the_original(original: tuple[np.ndarray, list[str]]) -> None:
    labels, ids = original
    before = labels.copy()
    store = LabelStore.from_original(labels, ids)
    store.update(np.array([0, 1, 2, 3]), np.zeros_like(labels))
    assert np.array_equal(labels, before)


@pytest.mark.parametrize("mismatch", ["ids", "shape", "labels"])
def test_load_refuses_a_store_of_other_data(
    tmp_path: Path, original: tuple[np.ndarray, list[str]], mismatch: str
) -> None:
    labels, ids = original
    LabelStore.from_original(labels, ids).save(tmp_path)
    if mismatch == "ids":
        other_labels, other_ids = labels, [*ids[:-1], "P009_000"]
    elif mismatch == "shape":
        other_labels, other_ids = labels[:, :5], ids
    else:
        other_labels, other_ids = labels.copy(), ids
        other_labels[0, 0, 0] = (other_labels[0, 0, 0] + 1) % 5
    with pytest.raises(ValueError, match=str(tmp_path / INFO_FILE)):
        LabelStore.load(tmp_path, other_labels, other_ids)


def test_load_refuses_an_array_from_another_save(tmp_path: Path, original: tuple[np.ndarray, list[str]]) -> None:
    labels, ids = original
    store = LabelStore.from_original(labels, ids)
    store.save(tmp_path)
    tampered = store.labels.copy()
    tampered[0, 0, 0] = (tampered[0, 0, 0] + 1) % 5
    np.save(tmp_path / ARRAY_FILE, tampered)
    with pytest.raises(ValueError, match="does not match its description"):
        LabelStore.load(tmp_path, labels, ids)


def test_load_names_a_missing_file(tmp_path: Path, original: tuple[np.ndarray, list[str]]) -> None:
    labels, ids = original
    with pytest.raises(FileNotFoundError, match=INFO_FILE):
        LabelStore.load(tmp_path, labels, ids)


def test_store_rejects_labels_that_are_not_uint8_slices() -> None:
    with pytest.raises(ValueError, match="uint8"):
        LabelStore.from_original(np.zeros((2, 3, 3), dtype=np.int64), ["a", "b"])
    with pytest.raises(ValueError, match="slice ids"):
        LabelStore.from_original(np.zeros((2, 3, 3), dtype=np.uint8), ["a"])
