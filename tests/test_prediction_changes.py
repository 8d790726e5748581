"""Label Wave's measure: training pixels whose predicted class changed since the previous epoch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from noisyseg.runtime.distributed import SINGLE_PROCESS
from noisyseg.training.prediction_changes import ARRAY_FILE, PredictionChanges

CPU = torch.device("cpu")
K = 4  # classes


def prediction_of(classes: np.ndarray) -> torch.Tensor:
    """A step's prediction (N, h, w) as the trainer gives it: int64 class ids."""
    return torch.from_numpy(np.ascontiguousarray(classes)).long()


def test_cached_rows_count_the_changed_fraction_of_all_pixels() -> None:
    rng = np.random.default_rng(0)
    first = rng.integers(0, K, size=(3, 4, 5))
    second = first.copy()
    second[0, 0, :3] = (second[0, 0, :3] + 1) % K  # 3 pixels of row 0
    second[2, 1:3, 4] = (second[2, 1:3, 4] + 2) % K  # 2 pixels of row 2
    changes = PredictionChanges([(4, 5)] * 3, CPU, cached=True, ctx=SINGLE_PROCESS)
    for batch in ([0, 2], [1]):  # epoch 1 in two batches: nothing to compare with yet
        changes.observe(prediction_of(first[batch]), torch.tensor(batch))
    assert changes.end_epoch() is None
    for batch in ([1], [2, 0]):
        changes.observe(prediction_of(second[batch]), torch.tensor(batch))
    assert changes.end_epoch() == pytest.approx(5 / 60)
    assert np.array_equal(changes.maps.stacked(), second)  # the host maps follow the device's
    for batch in ([0, 1, 2],):
        changes.observe(prediction_of(second[batch]), torch.tensor(batch))
    assert changes.end_epoch() == 0.0


def geometry(index: int, top: int, left: int, valid_h: int, valid_w: int, flipped: int, rescaled: int = 0) -> list[int]:
    return [index, top, left, valid_h, valid_w, flipped, rescaled]


def test_streamed_crops_are_compared_where_they_overlap_in_the_image() -> None:
    image = np.arange(24).reshape(4, 6) % K  # the class each image pixel is predicted as
    changes = PredictionChanges([(4, 6)], CPU, cached=False, ctx=SINGLE_PROCESS)
    # Epoch 1: the crop of columns 0-3 (4x4 crop, no padding).
    changes.observe(
        prediction_of(image[None, :, 0:4]),
        torch.tensor([0]),
        torch.tensor([geometry(0, 0, 0, 4, 4, 0)]),
    )
    assert changes.end_epoch() is None
    # Epoch 2: columns 2-5, flipped, with two pixels of column 3 predicted differently; the crop
    # overlaps epoch 1's in columns 2-3 (8 pixels), of which 2 changed.
    seen = image.copy()
    seen[1:3, 3] = (seen[1:3, 3] + 1) % K
    crop = seen[:, 2:6][:, ::-1].copy()
    changes.observe(prediction_of(crop[None]), torch.tensor([0]), torch.tensor([geometry(0, 0, 2, 4, 4, 1)]))
    assert changes.end_epoch() == pytest.approx(2 / 8)
    assert np.array_equal(changes.maps[0], seen)
    # A padded crop (valid 2x3 of 4x4) compares only its valid part; a rescaled crop nothing.
    padded = np.full((4, 4), 3)
    padded[:2, :3] = image[2:4, 3:6]
    changes.observe(prediction_of(padded[None]), torch.tensor([0]), torch.tensor([geometry(0, 2, 3, 2, 3, 0)]))
    changes.observe(
        prediction_of(np.zeros((1, 4, 4), int)),
        torch.tensor([0]),
        torch.tensor([geometry(0, 0, 0, 4, 4, 0, rescaled=1)]),
    )
    # Of the 6 valid pixels, (2, 3) changes back to the image's class: one change.
    assert changes.end_epoch() == pytest.approx(1 / 6)


def test_saved_maps_resume_the_same_measure(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    first, second = rng.integers(0, K, size=(2, 2, 3, 3))
    changes = PredictionChanges([(3, 3)] * 2, CPU, cached=True, ctx=SINGLE_PROCESS)
    changes.observe(prediction_of(first), torch.tensor([0, 1]))
    changes.end_epoch()
    changes.save(tmp_path)
    resumed = PredictionChanges([(3, 3)] * 2, CPU, cached=True, ctx=SINGLE_PROCESS)
    resumed.load(tmp_path)
    for measure in (changes, resumed):
        measure.observe(prediction_of(second), torch.tensor([0, 1]))
    expected = np.count_nonzero(first != second) / first.size
    assert changes.end_epoch() == resumed.end_epoch() == pytest.approx(expected)
    # A checkpoint from before the measure: nothing to compare with in the first resumed epoch.
    fresh = PredictionChanges([(3, 3)] * 2, CPU, cached=True, ctx=SINGLE_PROCESS)
    fresh.load(tmp_path / "nowhere")
    fresh.observe(prediction_of(second), torch.tensor([0, 1]))
    assert fresh.end_epoch() is None
    # A damaged array is refused with the file named.
    damaged = np.load(tmp_path / ARRAY_FILE)
    damaged[0, 0, 0] = (damaged[0, 0, 0] + 1) % K
    np.save(tmp_path / ARRAY_FILE, damaged)
    with pytest.raises(
        ValueError,
        match=r"predictions\.npy: stored training predictions do not match their description",
    ):
        PredictionChanges([(3, 3)] * 2, CPU, cached=True, ctx=SINGLE_PROCESS).load(tmp_path)
    with pytest.raises(ValueError, match="do not match the training split"):
        PredictionChanges([(3, 4)] * 2, CPU, cached=True, ctx=SINGLE_PROCESS).load(tmp_path)
