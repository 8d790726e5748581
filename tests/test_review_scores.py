"""The review's measures on hand-made cases, and against cleanlab where it is installed."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from noisyseg.review.scores import class_iou, review_image, softmin_quality

IGNORE = 255


def test_softmin_of_hand_computed_self_confidences() -> None:
    s = np.array([0.9, 0.2, 0.6])
    weights = np.exp((1 - s) / 0.1) / np.exp((1 - s) / 0.1).sum()
    assert softmin_quality(torch.tensor(s)) == pytest.approx(float((s * weights).sum()), rel=1e-12)
    # A soft minimum: between the minimum and the mean, near the minimum at a low temperature.
    assert s.min() < softmin_quality(torch.tensor(s)) < s.mean()
    assert softmin_quality(torch.tensor(s), temperature=1e-3) == pytest.approx(0.2, abs=1e-6)
    assert math.isnan(softmin_quality(torch.tensor([])))


def probabilities(prediction: np.ndarray, confidence: float, num_classes: int) -> torch.Tensor:
    """(K, H, W) with `confidence` on `prediction`, the rest spread evenly."""
    probs = np.full((num_classes, *prediction.shape), (1 - confidence) / (num_classes - 1))
    np.put_along_axis(probs, prediction[None], confidence, axis=0)
    return torch.tensor(probs, dtype=torch.float32)


def test_one_image_by_hand() -> None:
    given = np.array([[0, 0, 1, 1], [0, 2, 1, IGNORE]], dtype=np.uint8)
    prediction = np.array([[0, 1, 1, 1], [0, 2, 2, 2]])
    probs = probabilities(prediction, 0.95, 3)
    probs[:, 1, 2] = torch.tensor([0.3, 0.4, 0.3])  # predicted 1 (= given) at low confidence
    review = review_image(probs, torch.from_numpy(given), IGNORE, confidence=0.9)
    expected_issue = np.zeros_like(given, dtype=bool)
    expected_issue[0, 1] = True  # 0 given, 1 predicted at 0.95
    assert np.array_equal(review.issue.numpy(), expected_issue)
    corrected = given.copy()
    corrected[0, 1] = 1
    assert np.array_equal(review.corrected.numpy(), corrected)
    assert review.changed_fraction == pytest.approx(1 / 7) and review.issue_fraction == pytest.approx(1 / 7)
    self_conf = np.array([0.95, 0.025, 0.95, 0.95, 0.95, 0.95, 0.4])
    assert review.label_quality == pytest.approx(softmin_quality(torch.tensor(self_conf)), rel=1e-6)
    # Given vs predicted over the 7 labelled pixels: class 0 {(0,0),(0,1),(1,0)} vs {(0,0),(1,0)},
    # class 1 {(0,2),(0,3),(1,2)} vs those and (0,1), class 2 {(1,1)} vs {(1,1)}.
    assert review.class_iou == pytest.approx([2 / 3, 3 / 4, 1.0])
    transitions = np.zeros((3, 3), dtype=np.int64)
    transitions[0, 0], transitions[0, 1], transitions[1, 1], transitions[2, 2] = 2, 1, 3, 1
    assert np.array_equal(review.transitions.numpy(), transitions)


def test_a_given_correction_replaces_the_prediction() -> None:
    given = np.array([[0, 1], [1, IGNORE]], dtype=np.uint8)
    store = np.array([[1, 1], [0, IGNORE]], dtype=np.uint8)
    review = review_image(
        probabilities(np.zeros((2, 2), dtype=np.int64), 0.99, 2),
        torch.from_numpy(given),
        IGNORE,
        corrected=torch.from_numpy(store),
    )
    assert np.array_equal(review.corrected.numpy(), store)
    assert review.changed_fraction == pytest.approx(2 / 3)
    assert review.issue.sum() == 2  # the two 1s under a confident 0


def test_class_iou_is_nan_for_a_class_in_neither() -> None:
    iou = class_iou(torch.tensor([0, 0, 1]), torch.tensor([0, 1, 1]), 3)
    assert iou[:2] == pytest.approx([0.5, 0.5]) and math.isnan(iou[2])


def test_bad_shapes_and_class_ids_are_refused() -> None:
    with pytest.raises(ValueError, match="must be"):
        review_image(torch.zeros(2, 3, 3), torch.zeros(2, 2, dtype=torch.uint8), IGNORE)
    with pytest.raises(ValueError, match="class ids >= 2"):
        review_image(torch.full((2, 1, 1), 0.5), torch.tensor([[7]], dtype=torch.uint8), IGNORE)


def test_label_quality_matches_cleanlab() -> None:
    rank = pytest.importorskip(
        "cleanlab.segmentation.rank", reason="cleanlab is the optional benchmark extra (pip install .[bench])"
    )
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 4, 9, 11))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = rng.integers(0, 4, size=(3, 9, 11))
    theirs, _ = rank.get_label_quality_scores(labels, probs, verbose=False)
    ours = [review_image(torch.tensor(p), torch.tensor(m), IGNORE).label_quality for p, m in zip(probs, labels)]
    assert ours == pytest.approx(theirs.tolist(), rel=1e-9)
