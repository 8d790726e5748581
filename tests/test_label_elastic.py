"""NSegment's label-only elastic deformation: the warp against scipy, seeding, what it touches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import test_pipeline
from scipy import ndimage
from test_trainer import train_until_crash

from noisyseg.config import AugmentConfig, build_config
from noisyseg.data.datasets import open_source
from noisyseg.data.label_store import LabelMaps, LabelStore
from noisyseg.data.pipeline import (
    Augmenter,
    TrainingItems,
    deform_labels,
    elastic_displacement,
    warp_nearest,
)
from noisyseg.training.trainer import train

# The pipeline tests' data folder of mixed image sizes (a module fixture).
mixed = test_pipeline.mixed
TINY = ["model.kwargs.base_width=4", "model.kwargs.depth=2", "loss.backend=torch", "quiet=true"]


def disc(size: int = 48, radius: float = 12.0) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    labels = np.zeros((size, size), np.uint8)
    labels[(yy - size / 2) ** 2 + (xx - size / 2) ** 2 <= radius**2] = 2
    labels[:3] = 255  # an ignored band
    return labels


def test_the_warp_is_scipys_nearest_neighbour_resampling() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, size=(13, 17)).astype(np.uint8)
    # A hand-made field: shifts of up to 3.3 px, some pointing outside the image (clipped);
    # never a half-integer coordinate, where rounding conventions differ.
    yy, xx = np.mgrid[:13, :17]
    dy = 3.3 * np.sin(xx / 3.0) + 0.2
    dx = -2.7 * np.cos(yy / 2.0) + 0.1
    expected = ndimage.map_coordinates(labels, [yy + dy, xx + dx], order=0, mode="nearest")
    np.testing.assert_array_equal(warp_nearest(labels, dy, dx), expected)
    # A whole-pixel shift is a translation with the border repeated.
    shifted = warp_nearest(labels, np.zeros((13, 17)), np.full((13, 17), 2.0))
    np.testing.assert_array_equal(shifted[:, :-2], labels[:, 2:])
    np.testing.assert_array_equal(shifted[:, -2:], np.repeat(labels[:, -1:], 2, axis=1))


def test_the_field_is_smoothed_noise_scaled_by_alpha() -> None:
    dy, dx = elastic_displacement((64, 64), alpha=30.0, sigma=4.0, rng=np.random.default_rng(1))
    dy2, dx2 = elastic_displacement((64, 64), alpha=60.0, sigma=4.0, rng=np.random.default_rng(1))
    np.testing.assert_allclose(dy2, 2 * dy)
    np.testing.assert_allclose(dx2, 2 * dx)
    # Uniform noise of sd 1/sqrt(3) smoothed by a 2D Gaussian of sd 4 keeps sd 1/(sqrt(3) 2 sqrt(pi) 4).
    assert np.std(dx) == pytest.approx(30.0 / (np.sqrt(3) * 2 * np.sqrt(np.pi) * 4.0), rel=0.25)
    assert abs(np.corrcoef(dx[:, :-1].ravel(), dx[:, 1:].ravel())[0, 1]) > 0.9  # smooth: neighbours agree


def test_deformation_is_seeded_keeps_the_classes_and_moves_only_boundaries() -> None:
    config = AugmentConfig(
        label_elastic=True,
        label_elastic_p=1.0,
        label_elastic_alpha=[40.0],
        label_elastic_sigma=[3.0],
    )
    labels = disc(size=96, radius=30.0)
    first = deform_labels(labels, config, np.random.default_rng([0, 1, 5, 1]))
    np.testing.assert_array_equal(first, deform_labels(labels, config, np.random.default_rng([0, 1, 5, 1])))
    assert not np.array_equal(first, deform_labels(labels, config, np.random.default_rng([0, 2, 5, 1])))
    assert set(np.unique(first)) <= set(np.unique(labels))
    changed = first != labels
    assert changed.any()
    # alpha 40, sigma 3: each axis's displacement has sd 40 / (sqrt(3) 2 sqrt(pi) 3) = 2.2 px, so
    # 15 px is beyond 6 sd: every changed pixel lies within 15 px of a boundary of the input,
    # and pixels farther away (the disc's centre, the corners) exist and keep their label.
    boundary = np.zeros_like(changed)
    for value in np.unique(labels):
        region = labels == value
        boundary |= region & ~ndimage.binary_erosion(region, border_value=1)
    far = ndimage.distance_transform_edt(~boundary) > 15
    assert far.sum() > 1000 and not (changed & far).any()
    never = AugmentConfig(label_elastic=True, label_elastic_p=0.0)
    assert deform_labels(labels, never, np.random.default_rng(0)) is labels


def test_half_of_the_items_are_deformed() -> None:
    config = AugmentConfig(label_elastic=True, label_elastic_alpha=[40.0], label_elastic_sigma=[3.0])
    labels = disc()
    deformed = [
        not np.array_equal(deform_labels(labels, config, np.random.default_rng([7, 1, i, 1])), labels)
        for i in range(400)
    ]
    assert np.mean(deformed) == pytest.approx(0.5, abs=0.08)


def test_only_the_mask_trained_on_changes(mixed: Path) -> None:
    """The image and every other augmentation draw are those of the run without the deformation;
    the annotations and clean masks (what the diagnostics compare with) are never deformed."""
    source = open_source(mixed, "train", "folder")
    annotations = LabelMaps.from_arrays(
        [source.read_mask(i) for i in range(len(source))],
        [source.read_mask(i).shape for i in range(len(source))],
    )
    plain = AugmentConfig(crop_size=[24, 24], flip=True, jitter=True)
    elastic = AugmentConfig(
        crop_size=[24, 24],
        flip=True,
        jitter=True,
        label_elastic=True,
        label_elastic_p=1.0,
        label_elastic_alpha=[30.0],
        label_elastic_sigma=[3.0],
    )
    items = {
        name: TrainingItems(
            source,
            LabelStore.from_original(annotations, source.ids),
            annotations,
            annotations,
            augment,
            seed=3,
        )
        for name, augment in (("plain", plain), ("elastic", elastic))
    }
    moved = 0
    for index in range(len(source)):
        image_a, maps_a, geometry_a = items["plain"][(2, index)]
        image_b, maps_b, geometry_b = items["elastic"][(2, index)]
        np.testing.assert_array_equal(image_a.numpy(), image_b.numpy())
        np.testing.assert_array_equal(geometry_a.numpy(), geometry_b.numpy())
        np.testing.assert_array_equal(maps_a[1:].numpy(), maps_b[1:].numpy())
        moved += int((maps_a[0] != maps_b[0]).sum())
    assert moved > 0
    with pytest.raises(ValueError, match="needs its own generator"):
        Augmenter(elastic, 255)(
            np.zeros((1, 8, 8), np.float32), np.zeros((1, 8, 8), np.uint8), np.random.default_rng(0)
        )


def test_a_run_with_label_elastic_resumes_exactly_and_refuses_iteration_corrections(
    mixed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def config(out: Path, *extra: str):
        return build_config(
            None,
            [
                f"data={mixed}",
                f"out={out}",
                "epochs=3",
                "batch_size=2",
                "method=adele",
                "loader.num_workers=0",
                "loader.augment.crop_size=[24,24]",
                "loader.augment.label_elastic=true",
                *TINY,
                *extra,
            ],
        )

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(config(straight))
    train_until_crash(config(resumed), 2, monkeypatch)
    train(config(resumed), resume=True)
    assert (straight / "metrics.jsonl").read_text() == (resumed / "metrics.jsonl").read_text()
    assert config(tmp_path / "x").correction_timing() == "epoch"
    with pytest.raises(ValueError, match="adele.correction_timing.*label_elastic"):
        config(tmp_path / "y", "adele.correction_timing=iteration")
    with pytest.raises(ValueError, match="loader.cache"):
        config(tmp_path / "z", "loader.cache=true")
    with pytest.raises(ValueError, match="loader.augment.label_elastic_sigma"):
        config(tmp_path / "w", "loader.augment.label_elastic_sigma=[]")
