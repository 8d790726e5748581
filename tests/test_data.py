"""Folder and NIfTI loaders: round trips, normalisation, patient splits and every input error."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from noisyseg.cli import main
from noisyseg.data.datasets import FolderSource
from noisyseg.data.folder import (
    DatasetInfo,
    read_dataset_info,
    read_mask,
    split_by_patient,
    write_dataset_info,
    write_image,
    write_mask,
    write_split_ids,
)
from noisyseg.data.nifti import SegthorConfig, convert_segthor
from noisyseg.data.pipeline import ImageDataset
from noisyseg.data.run_data import load_split

CLASSES = ["background", "esophagus", "heart", "trachea", "aorta"]


def make_folder(
    root: Path, ids_by_split: dict[str, list[str]], size: int = 8
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A tiny data folder with random images and masks; returns the slices written."""
    rng = np.random.default_rng(0)
    slices = {}
    for ids in ids_by_split.values():
        for slice_id in ids:
            image = rng.normal(40, 300, (size, size)).astype(np.float32)
            mask = rng.integers(0, len(CLASSES), (size, size)).astype(np.uint8)
            write_image(root / "images" / f"{slice_id}.npy", image)
            write_mask(root / "masks" / f"{slice_id}.png", mask)
            slices[slice_id] = (image, mask)
    for split, ids in ids_by_split.items():
        write_split_ids(root, split, ids)
    write_dataset_info(root, DatasetInfo(name="tiny", classes=CLASSES))
    return slices


@pytest.fixture
def folder(tmp_path: Path) -> tuple[Path, dict[str, tuple[np.ndarray, np.ndarray]]]:
    root = tmp_path / "data"
    return root, make_folder(root, {"train": ["P000_000", "P000_001"], "val": ["P001_000"], "test": ["P002_000"]})


def test_dataset_items_are_normalised_images_and_int64_masks(folder: tuple[Path, dict]) -> None:
    root, slices = folder
    dataset = ImageDataset(FolderSource(root, "train"))
    assert len(dataset) == 2
    (image, mask), slice_id = dataset[1], dataset.ids[1]
    raw, raw_mask = slices["P000_001"]
    assert slice_id == "P000_001" and image.dtype == torch.float32 and mask.dtype == torch.int64
    assert image.shape == (1, 8, 8) and mask.shape == (8, 8)
    reference = torch.from_numpy(raw)
    expected = (reference - reference.mean()) / reference.std(unbiased=False)
    torch.testing.assert_close(image[0], expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(mask, torch.from_numpy(raw_mask).long())


def test_load_split_stacks_the_whole_split(folder: tuple[Path, dict]) -> None:
    root, slices = folder
    arrays = load_split(root, "train")
    assert arrays.ids == ["P000_000", "P000_001"]
    assert arrays.images.shape == (2, 1, 8, 8) and arrays.images.dtype == np.float32
    assert arrays.masks.dtype == np.uint8
    np.testing.assert_array_equal(arrays.masks[0], slices["P000_000"][1])
    np.testing.assert_allclose(arrays.images.mean(axis=(1, 2, 3)), 0.0, atol=1e-5)
    np.testing.assert_allclose(arrays.images.std(axis=(1, 2, 3)), 1.0, atol=1e-4)


def test_labels_root_replaces_the_masks(folder: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = folder
    noisy_root = tmp_path / "noisy"
    noisy = np.full((8, 8), 2, dtype=np.uint8)
    noisy[0, 0] = 255
    for slice_id in ("P000_000", "P000_001"):
        write_mask(noisy_root / "masks" / f"{slice_id}.png", noisy)
    arrays = load_split(root, "train", labels_root=noisy_root)
    np.testing.assert_array_equal(arrays.masks[1], noisy)
    np.testing.assert_array_equal(arrays.images, load_split(root, "train").images)


def test_png_images_and_npy_masks_are_accepted(tmp_path: Path) -> None:
    root = tmp_path / "png"
    make_folder(root, {"train": ["A_000"], "val": ["B_000"], "test": ["C_000"]})
    rgb = np.random.default_rng(1).integers(0, 256, (8, 8, 3)).astype(np.uint8)
    (root / "images" / "A_000.npy").unlink()
    Image.fromarray(rgb).save(root / "images" / "A_000.png")
    mask = np.eye(8, dtype=np.uint8) * 3
    (root / "masks" / "A_000.png").unlink()
    np.save(root / "masks" / "A_000.npy", mask)
    image, loaded_mask = ImageDataset(FolderSource(root, "train"))[0]
    assert image.shape == (3, 8, 8)
    channel = rgb[..., 2].astype(np.float64)
    np.testing.assert_allclose(image[2].numpy(), (channel - channel.mean()) / channel.std(), atol=1e-4)
    np.testing.assert_array_equal(loaded_mask.numpy(), mask)


def test_mask_png_round_trip(tmp_path: Path) -> None:
    mask = np.arange(64, dtype=np.uint8).reshape(8, 8) % 5
    mask[0, :] = 255
    write_mask(tmp_path / "m.png", mask)
    with Image.open(tmp_path / "m.png") as img:
        assert img.mode == "L"
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png"), mask)


# ------------------------------------------------------------------ loader errors


def test_unreadable_image_is_named(folder: tuple[Path, dict]) -> None:
    root, _ = folder
    (root / "images" / "P000_001.npy").write_bytes(b"not an array")
    with pytest.raises(ValueError, match=r"P000_001\.npy: unreadable image"):
        load_split(root, "train")


def test_size_mismatch_is_named(folder: tuple[Path, dict]) -> None:
    root, _ = folder
    write_mask(root / "masks" / "P001_000.png", np.zeros((6, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"P001_000\.png: mask size \(6, 8\) does not match image .*P001_000\.npy"):
        load_split(root, "val")


def test_class_id_out_of_range_is_named_but_ignore_index_is_fine(folder: tuple[Path, dict]) -> None:
    root, _ = folder
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[0, 0] = 255
    write_mask(root / "masks" / "P002_000.png", mask)
    assert load_split(root, "test").masks[0, 0, 0] == 255
    mask[1, 1] = 7
    write_mask(root / "masks" / "P002_000.png", mask)
    with pytest.raises(ValueError, match=r"P002_000\.png: class id\(s\) \[7\] out of range"):
        ImageDataset(FolderSource(root, "test"))[0]


def test_empty_split_is_named(folder: tuple[Path, dict]) -> None:
    root, _ = folder
    (root / "splits" / "val.txt").write_text("\n\n")
    with pytest.raises(ValueError, match=r"val\.txt: split 'val' is empty"):
        load_split(root, "val")


def test_missing_list_file_is_named(folder: tuple[Path, dict]) -> None:
    root, _ = folder
    with pytest.raises(FileNotFoundError, match=r"splits/extra\.txt: split list file not found"):
        FolderSource(root, "extra")


def test_missing_mask_is_named(folder: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = folder
    noisy_root = tmp_path / "noisy_incomplete"
    write_mask(noisy_root / "masks" / "P000_000.png", np.zeros((8, 8), dtype=np.uint8))
    with pytest.raises(FileNotFoundError, match=r"masks/P000_001\.png: no mask for slice 'P000_001'"):
        load_split(root, "train", labels_root=noisy_root)


def test_bad_dataset_json_is_named(folder: tuple[Path, dict]) -> None:
    root, _ = folder
    (root / "dataset.json").write_text(json.dumps({"classes": ["only"]}))
    with pytest.raises(ValueError, match=r"dataset\.json: field 'classes'"):
        read_dataset_info(root)


def test_split_by_patient_is_disjoint_deterministic_and_complete() -> None:
    patients = [f"Patient_{i:02d}" for i in range(10)]
    splits = split_by_patient(patients, (0.6, 0.2, 0.2), seed=4)
    assert split_by_patient(patients, (0.6, 0.2, 0.2), seed=4) == splits
    assert sorted(sum(splits.values(), [])) == patients
    assert [len(splits[s]) for s in ("train", "val", "test")] == [6, 2, 2]
    assert split_by_patient(patients[:3], (0.9, 0.05, 0.05), seed=0)["val"]
    with pytest.raises(ValueError, match="at least 3 patients"):
        split_by_patient(["a", "b"])


# ------------------------------------------------------------------ NIfTI (SegTHOR layout)

NIFTI_SHAPE = (16, 16, 6)  # x, y, z as stored in the file


def write_segthor_patient(root: Path, name: str, index: int) -> tuple[np.ndarray, np.ndarray]:
    """A tiny CT volume (a ramp along x, offset per patient) and labels on slices 1..3 only."""
    x = np.arange(NIFTI_SHAPE[0], dtype=np.float32)
    ct = np.broadcast_to(x[:, None, None] * 10.0 + 100.0 * index, NIFTI_SHAPE).astype(np.float32)
    gt = np.zeros(NIFTI_SHAPE, dtype=np.uint8)
    gt[4:12, 2:6, 1:4] = 2  # heart: x 4..11, y 2..5
    gt[0:2, 0:2, 2] = 4
    folder = root / name
    folder.mkdir(parents=True)
    nib.save(nib.Nifti1Image(ct, np.eye(4)), folder / f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(gt, np.eye(4)), folder / "GT.nii.gz")
    return ct, gt


@pytest.fixture
def segthor_root(tmp_path: Path) -> Path:
    root = tmp_path / "segthor"
    for index in range(5):
        write_segthor_patient(root, f"Patient_{index + 1:02d}", index)
    return root


def test_segthor_conversion_splits_by_patient_and_keeps_foreground_slices(segthor_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "converted"
    summary = convert_segthor(segthor_root, out, SegthorConfig(size=8, seed=1))
    info = read_dataset_info(out)
    all_patients = [p for split in ("train", "val", "test") for p in info.patients[split]]
    assert sorted(all_patients) == [f"Patient_{i:02d}" for i in range(1, 6)]
    assert len(set(all_patients)) == 5 and all(info.patients[s] for s in ("train", "val", "test"))
    for split in ("train", "val", "test"):
        ids = [line for line in (out / "splits" / f"{split}.txt").read_text().split() if line]
        assert {i.rsplit("_", 1)[0] for i in ids} == set(info.patients[split])
        # Slices 1, 2, 3 of each patient carry labels; 0, 4, 5 are dropped.
        assert sorted({i.rsplit("_", 1)[1] for i in ids}) == ["001", "002", "003"]
    assert sum(summary["slices_per_split"].values()) == 15


def test_segthor_resize_is_bilinear_for_images_and_nearest_for_masks(segthor_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "converted"
    convert_segthor(segthor_root, out, SegthorConfig(size=8, foreground_only=False))
    arrays = load_split(out, "train")
    slice_id = arrays.ids[2]
    patient_index = int(slice_id.split("_")[1]) - 1
    z = int(slice_id.rsplit("_", 1)[1])
    raw = np.load(out / "images" / f"{slice_id}.npy")
    # A linear ramp survives bilinear downsampling: output pixel j sits at input x = 2j + 0.5.
    expected_row = (2 * np.arange(8) + 0.5) * 10.0 + 100.0 * patient_index
    np.testing.assert_allclose(raw[3, 1:-1], expected_row[1:-1], atol=1e-3)
    # Rows follow the file's y axis, columns its x axis; nearest picks source pixel 2j + 1.
    expected_mask = np.zeros((8, 8), dtype=np.uint8)
    if z in (1, 2, 3):
        expected_mask[1:3, 2:6] = 2  # y 3, 5 -> rows 1, 2; x 5..11 -> columns 2..5
    if z == 2:
        expected_mask[0, 0] = 4
    np.testing.assert_array_equal(read_mask(out / "masks" / f"{slice_id}.png"), expected_mask)


def test_segthor_shape_mismatch_names_the_gt_file(segthor_root: Path, tmp_path: Path) -> None:
    bad = segthor_root / "Patient_02" / "GT.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 5), dtype=np.uint8), np.eye(4)), bad)
    with pytest.raises(ValueError, match=r"Patient_02/GT\.nii\.gz: label volume shape"):
        convert_segthor(segthor_root, tmp_path / "out", SegthorConfig(size=8))
    assert not (tmp_path / "out").exists(), "a failed conversion must not leave a half-written folder"


def test_segthor_missing_gt_is_named(segthor_root: Path, tmp_path: Path) -> None:
    (segthor_root / "Patient_04" / "GT.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"Patient_04/GT\.nii\.gz: missing"):
        convert_segthor(segthor_root, tmp_path / "out")


def test_segthor_command_prints_json(segthor_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    assert main(["data", "segthor", "--root", str(segthor_root), "--out", str(out), "--size", "8"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["slices_per_split"] == {
        s: len((out / "splits" / f"{s}.txt").read_text().split()) for s in ("train", "val", "test")
    }
    assert summary["pixels_per_class"]["heart"] == 15 * 2 * 4


def test_segthor_unreadable_volume_is_named(segthor_root: Path, tmp_path: Path) -> None:
    (segthor_root / "Patient_05" / "Patient_05.nii.gz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"Patient_05\.nii\.gz: unreadable NIfTI file"):
        convert_segthor(segthor_root, tmp_path / "out", SegthorConfig(size=8))
