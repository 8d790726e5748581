"""The SegTHOR-like phantom: determinism, patient splits, anatomy and contrast, folder round trip."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from noisyseg.cli import main
from noisyseg.data.folder import read_dataset_info, read_image, read_mask, read_split_ids
from noisyseg.data.phantom import (
    AORTA,
    CLASS_NAMES,
    ESOPHAGUS,
    HEART,
    HU_SOFT_TISSUE,
    TRACHEA,
    PhantomConfig,
    generate_phantom,
    random_anatomy,
    render_patient,
)
from noisyseg.data.run_data import load_split

SMALL = PhantomConfig(size=64, slices_per_patient=10)


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("phantom") / "data"
    generate_phantom(out, num_patients=5, seed=3, config=SMALL)
    return out


def render(seed: int, config: PhantomConfig = SMALL) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return render_patient(random_anatomy(rng), config, rng)


def test_rendering_is_deterministic_and_seed_dependent() -> None:
    images_a, masks_a = render(7)
    images_b, masks_b = render(7)
    images_c, masks_c = render(8)
    np.testing.assert_array_equal(images_a, images_b)
    np.testing.assert_array_equal(masks_a, masks_b)
    assert not np.array_equal(masks_a, masks_c)
    assert np.abs(images_a - images_c).mean() > 1.0


def test_dataset_folder_is_deterministic(tmp_path: Path, phantom_dir: Path) -> None:
    again = tmp_path / "again"
    generate_phantom(again, num_patients=5, seed=3, config=SMALL)
    ids = read_split_ids(phantom_dir, "train")
    assert read_split_ids(again, "train") == ids
    np.testing.assert_array_equal(
        read_image(again / "images" / f"{ids[0]}.npy"), read_image(phantom_dir / "images" / f"{ids[0]}.npy")
    )


def test_patients_are_never_in_two_splits(phantom_dir: Path) -> None:
    info = read_dataset_info(phantom_dir)
    assert info.classes == CLASS_NAMES
    split_patients = {split: set(info.patients[split]) for split in ("train", "val", "test")}
    assert all(split_patients.values()), "every split needs at least one patient"
    assert not split_patients["train"] & split_patients["val"]
    assert not split_patients["train"] & split_patients["test"]
    assert not split_patients["val"] & split_patients["test"]
    for split, patients in split_patients.items():
        assert {slice_id.split("_")[0] for slice_id in read_split_ids(phantom_dir, split)} == patients


def test_every_written_slice_has_foreground_by_default(phantom_dir: Path) -> None:
    arrays = load_split(phantom_dir, "val")
    assert all((mask > 0).any() for mask in arrays.masks)


def test_organ_sizes_and_contrasts_follow_the_anatomy() -> None:
    config = PhantomConfig(size=96, slices_per_patient=16, noise_hu=0.0, texture_hu=0.0)
    images, masks = render(11, config)
    areas = {c: int((masks == c).sum()) for c in (ESOPHAGUS, HEART, TRACHEA, AORTA)}
    assert all(area > 0 for area in areas.values()), areas
    assert areas[HEART] > areas[AORTA] > max(areas[ESOPHAGUS], areas[TRACHEA])
    assert areas[HEART] > 5 * areas[ESOPHAGUS] and areas[HEART] > 5 * areas[TRACHEA]

    def interior_mean(class_id: int) -> float:
        # Away from partial-volume edges: eroded per slice.
        core = ndimage.binary_erosion(masks == class_id, structure=np.ones((1, 3, 3)))
        return float(images[core].mean())

    esophagus_surround = ndimage.binary_dilation(masks == ESOPHAGUS, structure=np.ones((1, 5, 5))) & (masks == 0)
    surround_hu = float(np.median(images[esophagus_surround]))
    assert interior_mean(AORTA) > HU_SOFT_TISSUE + 100
    assert interior_mean(HEART) > HU_SOFT_TISSUE
    assert interior_mean(TRACHEA) < -300
    # The esophagus is low contrast: close to the soft tissue around it, far less than the aorta.
    assert abs(interior_mean(ESOPHAGUS) - surround_hu) < 40
    assert interior_mean(AORTA) - surround_hu > 100


def test_a_smaller_field_of_view_magnifies_the_organs() -> None:
    """Same anatomy, 0.6 of the field of view: every organ covers about 1/0.6^2 times the pixels
    (organs lie well inside the cropped field), and the mediastinum stays in the picture."""
    base = PhantomConfig(size=96, slices_per_patient=16, noise_hu=0.0, texture_hu=0.0)
    _, full_masks = render(11, base)
    _, zoomed_masks = render(11, replace(base, field_of_view=0.6))
    for organ in (ESOPHAGUS, HEART, TRACHEA, AORTA):
        ratio = (zoomed_masks == organ).sum() / (full_masks == organ).sum()
        assert 2.3 < ratio < 3.3, (organ, ratio)  # 1 / 0.36 = 2.8, up to pixelisation


def test_folder_round_trip_matches_rendering(phantom_dir: Path) -> None:
    # Patient P000 is rendered from the first child of SeedSequence(3).
    rng = np.random.default_rng(np.random.SeedSequence(3).spawn(5)[0])
    images, masks = render_patient(random_anatomy(rng), SMALL, rng)
    written = sorted(p.stem for p in (phantom_dir / "masks").glob("P000_*.png"))
    assert written == [f"P000_{z:03d}" for z in range(len(masks)) if masks[z].any()]
    for slice_id in written:
        z = int(slice_id.split("_")[1])
        np.testing.assert_array_equal(read_mask(phantom_dir / "masks" / f"{slice_id}.png"), masks[z])
        np.testing.assert_array_equal(read_image(phantom_dir / "images" / f"{slice_id}.npy")[0], images[z])


def test_phantom_command_prints_json_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    code = main(
        [
            "data",
            "phantom",
            "--out",
            str(out),
            "--patients",
            "3",
            "--size",
            "32",
            "--slices-per-patient",
            "6",
            "--seed",
            "1",
            "--field-of-view",
            "0.8",
        ]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    for split in ("train", "val", "test"):
        assert summary["slices_per_split"][split] == len(read_split_ids(out, split))
    masks = np.stack([read_mask(p) for p in sorted((out / "masks").glob("*.png"))])
    assert summary["pixels_per_class"] == {name: int((masks == c).sum()) for c, name in enumerate(CLASS_NAMES)}


def test_phantom_command_refuses_a_non_empty_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "keep.txt").write_text("user data")
    assert main(["data", "phantom", "--out", str(tmp_path), "--patients", "3", "--size", "32"]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text() == "user data"


def test_bad_config_is_rejected() -> None:
    with pytest.raises(ValueError, match="size must be at least 16"):
        PhantomConfig(size=8)
    with pytest.raises(ValueError, match="field_of_view must be in"):
        PhantomConfig(field_of_view=1.5)
