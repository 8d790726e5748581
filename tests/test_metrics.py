"""Metrics against hand-computed cases and an independent per-class boolean-mask computation."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from noisyseg.evaluation.metrics import (
    ConfidenceMeter,
    ConfusionMeter,
    NoiseCounts,
    bootstrap_win_probability,
    confusion_matrix,
    dice_per_class,
    early_learning_memorization_iou,
    iou_per_class,
    mean_iou,
    noise_diagnostics,
)

# Hand case, 3 classes: the 255 pixel is ignored, the other five pixels are
# (target, pred) = (0,0) (0,1) (1,1) (1,2) (2,2).
HAND_TARGET = np.array([[0, 0, 1], [1, 2, 255]])
HAND_PRED = np.array([[0, 1, 1], [2, 2, 0]])
HAND_CONF = np.array([[1, 1, 0], [0, 1, 1], [0, 0, 1]])


def mask_iou(pred: np.ndarray, target: np.ndarray, cls: int, ignore_index: int = 255) -> float:
    """IoU of one class from boolean masks, the definition itself."""
    valid = target != ignore_index
    predicted, actual = (pred == cls) & valid, (target == cls) & valid
    union = (predicted | actual).sum()
    return float((predicted & actual).sum() / union) if union else math.nan


def test_hand_computed_confusion_iou_dice() -> None:
    conf = confusion_matrix(HAND_PRED, HAND_TARGET, num_classes=3)
    assert conf.dtype == np.int64
    np.testing.assert_array_equal(conf, HAND_CONF)
    np.testing.assert_allclose(iou_per_class(conf), [1 / 2, 1 / 3, 1 / 2])
    np.testing.assert_allclose(dice_per_class(conf), [2 / 3, 2 / 4, 2 / 3])
    assert mean_iou(conf) == pytest.approx((1 / 2 + 1 / 3 + 1 / 2) / 3)
    assert mean_iou(conf, include_background=False) == pytest.approx((1 / 3 + 1 / 2) / 2)


@pytest.mark.parametrize("shape", [(500,), (3, 17, 23), (2, 1, 9, 31)])
def test_iou_matches_boolean_masks_on_random_labels(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(sum(shape))
    num_classes = 6
    target = rng.integers(0, num_classes, size=shape)
    target[rng.random(shape) < 0.1] = 255
    pred = rng.integers(0, num_classes, size=shape)
    ious = iou_per_class(confusion_matrix(pred, target, num_classes))
    expected = [mask_iou(pred, target, cls) for cls in range(num_classes)]
    np.testing.assert_allclose(ious, expected)


def test_torch_tensors_give_the_same_matrix_as_numpy() -> None:
    generator = torch.Generator().manual_seed(3)
    target = torch.randint(0, 4, (2, 8, 8), generator=generator)
    target[0, :2] = 255
    pred = torch.randint(0, 4, (2, 8, 8), generator=generator, dtype=torch.int32)
    from_torch = confusion_matrix(pred, target, num_classes=4)
    np.testing.assert_array_equal(from_torch, confusion_matrix(pred.numpy(), target.numpy(), 4))
    assert from_torch.sum() == (target != 255).sum().item()


def test_ignored_pixels_do_not_count_whatever_the_prediction() -> None:
    target = np.array([0, 1, 255, 255])
    conf_a = confusion_matrix(np.array([0, 1, 0, 0]), target, 2)
    conf_b = confusion_matrix(np.array([0, 1, 1, 1]), target, 2)
    np.testing.assert_array_equal(conf_a, conf_b)
    np.testing.assert_array_equal(conf_a, np.eye(2))
    # A custom ignore index works the same way.
    np.testing.assert_array_equal(confusion_matrix(np.array([0, 1]), np.array([0, 9]), 2, 9), [[1, 0], [0, 0]])


def test_absent_class_is_nan_and_left_out_of_the_means() -> None:
    conf = np.zeros((4, 4), dtype=np.int64)
    conf[:3, :3] = HAND_CONF  # class 3 appears in neither prediction nor target
    ious = iou_per_class(conf)
    assert math.isnan(ious[3]) and math.isnan(dice_per_class(conf)[3])
    assert mean_iou(conf) == pytest.approx(mean_iou(HAND_CONF))
    assert mean_iou(conf, include_background=False) == pytest.approx((1 / 3 + 1 / 2) / 2)
    # A class predicted but never present has IoU 0, not NaN: it does count.
    conf[0, 3] = 1
    assert iou_per_class(conf)[3] == 0.0
    assert math.isnan(mean_iou(np.zeros((3, 3), dtype=np.int64)))


def test_dice_and_iou_satisfy_dice_equals_2iou_over_1_plus_iou() -> None:
    rng = np.random.default_rng(0)
    conf = rng.integers(0, 50, size=(5, 5))
    iou, dice = iou_per_class(conf), dice_per_class(conf)
    np.testing.assert_allclose(dice, 2 * iou / (1 + iou))


@pytest.mark.parametrize(
    ("pred", "target", "message"),
    [
        (np.zeros(3, dtype=int), np.zeros(4, dtype=int), "same shape"),
        (np.zeros(2, dtype=int), np.array([0, 7]), "target: class ids must lie in \\[0, 2\\]"),
        (np.array([0, -1]), np.zeros(2, dtype=int), "pred: class ids"),
        (np.zeros(2), np.zeros(2, dtype=int), "pred: expected integer class ids"),
    ],
)
def test_bad_inputs_name_the_problem(pred: np.ndarray, target: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        confusion_matrix(pred, target, num_classes=3)


def test_meter_accumulates_resets_and_summarises_as_json() -> None:
    meter = ConfusionMeter(num_classes=4)
    meter.update(HAND_PRED[0], HAND_TARGET[0])
    meter.update(torch.as_tensor(HAND_PRED[1]), torch.as_tensor(HAND_TARGET[1]))
    expected = np.zeros((4, 4), dtype=np.int64)
    expected[:3, :3] = HAND_CONF
    np.testing.assert_array_equal(meter.matrix, expected)
    summary = json.loads(json.dumps(summary_before := meter.summary(), allow_nan=False))
    assert summary == summary_before
    assert summary["iou"] == pytest.approx([1 / 2, 1 / 3, 1 / 2, None])
    assert summary["dice"][3] is None
    assert summary["miou"] == pytest.approx(4 / 9)
    assert summary["miou_no_background"] == pytest.approx(5 / 12)
    meter.reset()
    assert meter.matrix.sum() == 0 and meter.summary()["miou"] is None


# Noise diagnostics hand case (3 classes). Pixels 1, 3 and 5 are wrongly labelled; pixel 6 has an
# ignored clean label and pixel 7 an ignored noisy label, so both are left out.
CLEAN = np.array([0, 1, 1, 2, 2, 0, 255, 1])
NOISY = np.array([0, 2, 1, 1, 2, 1, 0, 255])
PRED = np.array([0, 1, 2, 1, 0, 0, 1, 1])
# On pixels {1, 3, 5}: pred = (1, 1, 0), clean = (1, 2, 0), noisy = (2, 1, 1).
EXPECTED_IOU_EL = [1.0, 1 / 2, 0.0]  # class 1: pred {1,3} vs clean {1}; class 2: {} vs {3}
EXPECTED_IOU_M = [0.0, 1 / 3, 0.0]  # class 1: pred {1,3} vs noisy {3,5}; class 0: {5} vs {}


def test_noise_diagnostics_hand_case() -> None:
    counts = noise_diagnostics(PRED, NOISY, CLEAN, num_classes=3)
    assert counts.pred_vs_clean.sum() == counts.pred_vs_noisy.sum() == 3
    iou_el, iou_m = early_learning_memorization_iou(counts)
    np.testing.assert_allclose(iou_el, EXPECTED_IOU_EL)
    np.testing.assert_allclose(iou_m, EXPECTED_IOU_M)


def test_noise_counts_accumulate_over_batches() -> None:
    total = NoiseCounts.zeros(3)
    for part in (slice(0, 3), slice(3, 8)):
        total = total + noise_diagnostics(torch.as_tensor(PRED[part]), torch.as_tensor(NOISY[part]), CLEAN[part], 3)
    whole = noise_diagnostics(PRED, NOISY, CLEAN, 3)
    np.testing.assert_array_equal(total.pred_vs_clean, whole.pred_vs_clean)
    np.testing.assert_array_equal(total.pred_vs_noisy, whole.pred_vs_noisy)


def test_noise_diagnostics_match_boolean_masks_on_random_labels() -> None:
    rng = np.random.default_rng(5)
    clean = rng.integers(0, 4, size=(4, 12, 12))
    noisy = np.where(rng.random(clean.shape) < 0.3, rng.integers(0, 4, size=clean.shape), clean)
    noisy[rng.random(clean.shape) < 0.05] = 255
    pred = rng.integers(0, 4, size=clean.shape)
    wrong = (noisy != clean) & (noisy != 255)
    # Setting the target to 255 off the wrong pixels restricts mask_iou to them.
    expected_el = [mask_iou(pred, np.where(wrong, clean, 255), cls) for cls in range(4)]
    expected_m = [mask_iou(pred, np.where(wrong, noisy, 255), cls) for cls in range(4)]
    iou_el, iou_m = early_learning_memorization_iou(noise_diagnostics(pred, noisy, clean, 4))
    np.testing.assert_allclose(iou_el, expected_el)
    np.testing.assert_allclose(iou_m, expected_m)


def test_noise_diagnostics_reject_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="pred, noisy and clean must have the same shape"):
        noise_diagnostics(PRED[:4], NOISY, CLEAN, 3)


def test_meter_defers_the_range_check_to_reading_the_counts() -> None:
    meter = ConfusionMeter(num_classes=3)
    meter.update(torch.tensor([0, 1, 2]), torch.tensor([0, 255, 7]))  # no error while updating
    with pytest.raises(ValueError, match="1 pixel\\(s\\) had class ids outside \\[0, 2\\]"):
        _ = meter.matrix


def test_meter_matches_confusion_matrix_on_random_labels_with_ignored_pixels() -> None:
    rng = np.random.default_rng(3)
    pred = rng.integers(0, 5, size=(4, 17, 9))
    target = np.where(rng.random((4, 17, 9)) < 0.2, 255, rng.integers(0, 5, size=(4, 17, 9)))
    meter = ConfusionMeter(num_classes=5)
    for i in range(4):
        meter.update(torch.as_tensor(pred[i]), torch.as_tensor(target[i]))
    np.testing.assert_array_equal(meter.matrix, confusion_matrix(pred, target, 5))


def test_confidence_meter_bins_arms_input_by_label_correctness() -> None:
    # Three classes. A one-hot pixel has v^ = 1 (last bin), a uniform one v^ = -1 (first bin).
    probs = torch.tensor([[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3], [0.0, 1.0, 0.0], [0.5, 0.5, 0.0]]).T.reshape(
        1, 3, 1, 4
    )
    target = torch.tensor([[[0, 1, 255, 2]]])
    clean = torch.tensor([[[0, 2, 1, 2]]])
    meter = ConfidenceMeter(device="cpu")
    meter.update(probs, target, clean)
    right, wrong = meter.histogram()
    # [0.5, 0.5, 0]: v = ((1/6)^2 * 2 + (1/3)^2) / 3 = 1/18; v^ = 2 * 9 / 2 * v - 1 = -0.5 -> bin 10 of 40.
    assert right.sum() == 2 and right[39] == 1 and right[10] == 1
    assert wrong.sum() == 1 and wrong[0] == 1  # the uniform pixel, labelled 1 where clean says 2
    meter.update(probs, target)  # clean unknown: every valid pixel counts as right
    assert meter.histogram()[0].sum() == 5


def _two_class_confusions(correct: list[int], pixels: int = 10) -> np.ndarray:
    """Per image, class 0's `pixels` target pixels of which `correct[i]` are predicted right
    (the rest as class 1), and `pixels` class-1 pixels all right."""
    return np.array([[[c, pixels - c], [0, pixels]] for c in correct], np.int64)


def test_bootstrap_win_probability_matches_every_resample_enumerated() -> None:
    """Three images: the 27 equally likely ordered resamples, scored with `mean_iou`."""
    first, second = _two_class_confusions([9, 4, 7]), _two_class_confusions([6, 8, 7])
    wins = sum(
        mean_iou(second[list(pick)].sum(0)) > mean_iou(first[list(pick)].sum(0))
        for pick in itertools.product(range(3), repeat=3)
    )
    exact = wins / 27
    estimate = bootstrap_win_probability(first, second, draws=20000)
    assert 0 < exact < 1 and abs(estimate - exact) < 0.02  # binomial sd <= 0.0036
    assert bootstrap_win_probability(first, second, draws=20000) == estimate  # seeded


def test_bootstrap_win_probability_edges() -> None:
    better = _two_class_confusions([5, 6, 7, 4]), _two_class_confusions([9, 9, 8, 8])
    assert bootstrap_win_probability(*better) == 1.0
    assert bootstrap_win_probability(better[1], better[0]) == 0.0
    assert bootstrap_win_probability(better[0], better[0]) == 0.0  # a tie counts for the first
    with pytest.raises(ValueError, match="per-image confusion matrices"):
        bootstrap_win_probability(better[0], better[1][:2])
