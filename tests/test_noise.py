"""Annotation noise: erode/dilate rules and ladder, coarse polygons, Markov process, `data corrupt`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from noisyseg.cli import main
from noisyseg.data.folder import read_mask, read_split_ids
from noisyseg.data.noise import (
    LEVEL_ITERATIONS,
    CoarseNoise,
    ErodeDilateNoise,
    MarkovNoise,
    corrupt_dataset,
    erode_dilate,
    slice_rng,
)
from noisyseg.data.phantom import PhantomConfig, generate_phantom

ESOPHAGUS, HEART, TRACHEA, AORTA = 1, 2, 3, 4


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("noise") / "data"
    generate_phantom(out, num_patients=5, seed=5, config=PhantomConfig(size=128, slices_per_patient=10))
    return out


@pytest.fixture(scope="module")
def clean_masks(phantom_dir: Path) -> list[np.ndarray]:
    return [read_mask(phantom_dir / "masks" / f"{i}.png") for i in read_split_ids(phantom_dir, "train")]


def folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


# ------------------------------------------------------------------ erode / dilate


def rectangles_case() -> np.ndarray:
    """Organs of exactly 1000 pixels (so the rescaling is the identity): hand-checkable.

    Esophagus rows 10..29 x cols 10..59 touches the heart (rows 30..54 x cols 10..49) from above;
    the aorta (rows 57..81 x cols 10..49) sits 2 background rows below the heart.
    """
    mask = np.zeros((100, 80), dtype=np.uint8)
    mask[10:30, 10:60] = ESOPHAGUS
    mask[30:55, 10:50] = HEART
    mask[57:82, 10:50] = AORTA
    return mask


def test_over_annotation_lets_earlier_organs_win() -> None:
    mask = rectangles_case()
    noisy = erode_dilate(mask, "over", 2)
    expected = np.zeros_like(mask)
    # Order 1, 3, 4, 2: esophagus grows by 2 first, then the aorta, the heart last.
    expected[8:32, 8:62] = ESOPHAGUS
    expected[55:84, 8:52] = AORTA
    heart = np.zeros_like(mask, dtype=bool)
    heart[28:57, 8:52] = True
    expected[heart & (expected == 0)] = HEART
    expected[mask == HEART] = HEART  # the heart keeps its own pixels
    expected[mask == ESOPHAGUS] = ESOPHAGUS
    np.testing.assert_array_equal(noisy, expected)
    # The 2-row gap between heart and aorta went to the aorta (processed before the heart).
    assert (noisy[55:57, 10:50] == AORTA).all()


def test_under_annotation_turns_eroded_pixels_into_background() -> None:
    mask = rectangles_case()
    noisy = erode_dilate(mask, "under", 3)
    expected = np.zeros_like(mask)
    expected[13:27, 13:57] = ESOPHAGUS
    expected[33:52, 13:47] = HEART
    expected[60:79, 13:47] = AORTA
    np.testing.assert_array_equal(noisy, expected)


def test_small_organs_are_rescaled_before_the_morphology() -> None:
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[30:34, 30:34] = TRACHEA  # 16 pixels: scaled by sqrt(1000/16) ~ 7.9 before eroding
    noisy = erode_dilate(mask, "under", 2)
    # Two erosions at ~8x scale remove only a fraction of a pixel: the tiny organ survives,
    # whereas eroding the 4x4 square twice at its own scale would delete it.
    assert (noisy == TRACHEA).sum() >= 4
    assert not ndimage.binary_erosion(mask == TRACHEA, np.ones((3, 3)), iterations=2).any()


def test_erode_dilate_is_deterministic_per_slice(clean_masks: list[np.ndarray]) -> None:
    noise = ErodeDilateNoise()
    a = noise.apply(clean_masks[0], slice_rng(1, "P000_003"))
    b = noise.apply(clean_masks[0], slice_rng(1, "P000_003"))
    np.testing.assert_array_equal(a, b)
    draws = {tuple(slice_rng(1, f"P000_{z:03d}").random(2)) for z in range(20)}
    assert len(draws) == 20, "every slice id gets its own generator"


def test_reference_setting_and_ladder_match_the_paper(phantom_dir: Path, tmp_path: Path) -> None:
    reference = corrupt_dataset(phantom_dir, tmp_path / "reference", "erode-dilate", level=None, seed=0)
    assert 0.55 <= reference["annotation_miou_fg"] <= 0.70
    ladder = [
        corrupt_dataset(phantom_dir, tmp_path / f"level{level}", "erode-dilate", level=level, seed=0)[
            "annotation_miou_fg"
        ]
        for level in range(len(LEVEL_ITERATIONS))
    ]
    assert ladder[0] == 1.0
    assert all(later < earlier for earlier, later in zip(ladder, ladder[1:], strict=False)), ladder
    assert 0.2 <= ladder[-1] <= 0.45


# ------------------------------------------------------------------ coarse polygons


def test_coarse_labels_are_a_subset_of_the_clean_regions(clean_masks: list[np.ndarray]) -> None:
    noise = CoarseNoise()
    labelled_organ_pixels = 0
    for index, clean in enumerate(clean_masks[:12]):
        noisy = noise.apply(clean, slice_rng(0, str(index)))
        labelled = noisy != 255
        np.testing.assert_array_equal(noisy[labelled], clean[labelled])
        # Any pixel with a differently labelled 8-neighbour (a class boundary) is unlabelled.
        boundary = ndimage.maximum_filter(clean, size=3) != ndimage.minimum_filter(clean, size=3)
        assert (noisy[boundary] == 255).all()
        labelled_organ_pixels += int((labelled & (clean > 0)).sum())
        assert (noisy == 0).sum() > 0.8 * (clean == 0).sum()
    assert labelled_organ_pixels > 0


# ------------------------------------------------------------------ Markov boundary process


def test_markov_is_deterministic_and_changes_only_near_organs(clean_masks: list[np.ndarray]) -> None:
    noise = MarkovNoise()
    changed_somewhere = False
    for index, clean in enumerate(clean_masks[:12]):
        noisy = noise.apply(clean, slice_rng(2, str(index)))
        np.testing.assert_array_equal(noisy, noise.apply(clean, slice_rng(2, str(index))))
        changed = noisy != clean
        changed_somewhere |= bool(changed.any())
        distance_to_organ = ndimage.distance_transform_edt(clean == 0)
        assert distance_to_organ[changed].max(initial=0) <= noise.steps + 2
    assert changed_somewhere


# ------------------------------------------------------------------ data corrupt command


def test_corrupt_command_reports_ious_and_leaves_clean_masks(
    phantom_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = folder_digest(phantom_dir)
    out = tmp_path / "noisy"
    assert (
        main(["data", "corrupt", "--data", str(phantom_dir), "--noise", "coarse", "--seed", "3", "--out", str(out)])
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert folder_digest(phantom_dir) == before
    train_ids = read_split_ids(phantom_dir, "train")
    assert sorted(p.stem for p in (out / "masks").glob("*.png")) == sorted(train_ids)
    assert json.loads((out / "noise.json").read_text())["annotation_miou"] == summary["annotation_miou"]
    # Independent IoU: union/intersection over all labelled pixels of the split.
    clean = np.stack([read_mask(phantom_dir / "masks" / f"{i}.png") for i in train_ids])
    noisy = np.stack([read_mask(out / "masks" / f"{i}.png") for i in train_ids])
    keep = noisy != 255
    ious = {}
    for class_id, name in enumerate(["background", "esophagus", "heart", "trachea", "aorta"]):
        a, b = clean[keep] == class_id, noisy[keep] == class_id
        ious[name] = (a & b).sum() / (a | b).sum()
        assert summary["per_class_iou"][name] == pytest.approx(ious[name])
        recall = ((clean == class_id) & (noisy == class_id)).sum() / (clean == class_id).sum()
        assert summary["per_class_recall"][name] == pytest.approx(recall)
    assert summary["annotation_miou"] == pytest.approx(np.mean(list(ious.values())))
    assert summary["annotation_miou_fg"] == pytest.approx(np.mean([v for k, v in ious.items() if k != "background"]))
    assert summary["labelled_fraction"] == pytest.approx(keep.mean())
    assert 0.0 < summary["labelled_fraction"] < 1.0


def test_corrupt_splits_train_and_val_draws_the_same_noise_independently(
    phantom_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train_only, both = tmp_path / "train", tmp_path / "both"
    assert (
        main(
            [
                "data",
                "corrupt",
                "--data",
                str(phantom_dir),
                "--noise",
                "erode-dilate",
                "--level",
                "3",
                "--seed",
                "4",
                "--out",
                str(train_only),
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert (
        main(
            [
                "data",
                "corrupt",
                "--data",
                str(phantom_dir),
                "--noise",
                "erode-dilate",
                "--level",
                "3",
                "--seed",
                "4",
                "--splits",
                "train,val",
                "--out",
                str(both),
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    train_ids, val_ids = read_split_ids(phantom_dir, "train"), read_split_ids(phantom_dir, "val")
    assert sorted(p.stem for p in (both / "masks").glob("*.png")) == sorted(train_ids + val_ids)
    # The training masks are those of a train-only corruption; its summary keeps the train split's quality.
    for slice_id in train_ids:
        assert (both / "masks" / f"{slice_id}.png").read_bytes() == (
            train_only / "masks" / f"{slice_id}.png"
        ).read_bytes()
    assert summary["annotation_miou"] == json.loads((train_only / "noise.json").read_text())["annotation_miou"]
    assert summary["splits"] == ["train", "val"] and json.loads((train_only / "noise.json").read_text())["splits"] == [
        "train"
    ]
    # Each validation slice is the same noise model drawn from its own generator.
    noise = ErodeDilateNoise(level=3)
    clean = {i: read_mask(phantom_dir / "masks" / f"{i}.png") for i in val_ids}
    for slice_id in val_ids:
        np.testing.assert_array_equal(
            read_mask(both / "masks" / f"{slice_id}.png"), noise.apply(clean[slice_id], slice_rng(4, slice_id))
        )
    # The validation split's quality: an independent IoU over its pixels.
    noisy = np.stack([read_mask(both / "masks" / f"{i}.png") for i in val_ids])
    stacked = np.stack([clean[i] for i in val_ids])
    ious = [((stacked == c) & (noisy == c)).sum() / ((stacked == c) | (noisy == c)).sum() for c in range(5)]
    assert summary["val"]["annotation_miou"] == pytest.approx(np.mean(ious))
    assert summary["val"]["slices"] == len(val_ids) and summary["val"]["annotation_miou"] < 0.9
    with pytest.raises(ValueError, match="--splits: expected train, optionally with val"):
        corrupt_dataset(phantom_dir, tmp_path / "x", "erode-dilate", splits=["val"])


def test_corrupt_is_stable_when_slices_are_added(phantom_dir: Path, tmp_path: Path) -> None:
    clean = read_mask(phantom_dir / "masks" / f"{read_split_ids(phantom_dir, 'train')[0]}.png")
    noise = ErodeDilateNoise(level=4)
    first = noise.apply(clean, slice_rng(9, "P000_004"))
    for other in ("P000_001", "P000_002"):
        noise.apply(clean, slice_rng(9, other))
    np.testing.assert_array_equal(noise.apply(clean, slice_rng(9, "P000_004")), first)


def test_corrupt_refuses_the_data_folder_itself(phantom_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = folder_digest(phantom_dir)
    assert main(["data", "corrupt", "--data", str(phantom_dir), "--noise", "markov", "--out", str(phantom_dir)]) == 2
    assert "refusing to write noisy labels into the data folder" in capsys.readouterr().err
    assert folder_digest(phantom_dir) == before


def test_level_is_only_for_erode_dilate(phantom_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="erode-dilate noise only"):
        corrupt_dataset(phantom_dir, tmp_path / "x", "markov", level=2)


def test_erosion_does_not_erode_an_organ_from_the_image_border() -> None:
    # OpenCV's erosion (the reference code's) treats the outside of the image as part of the
    # organ: an organ touching the border shrinks only from its sides inside the image.
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[0:20, 0:40] = HEART  # 800 pixels: the morphology runs at ~1.1x
    noisy = erode_dilate(mask, "under", 3)
    assert (noisy[0, :34] == HEART).all() and (noisy[:14, 0] == HEART).all()
    # ... while the sides inside the image lose about three pixels.
    assert not (noisy[17:20] == HEART).any() and not (noisy[:, 37:40] == HEART).any()
    assert (noisy[:16, :36] == HEART).all()
