"""ADELE's trigger (curve fit on training IoU) and label-correction rule."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from scipy.optimize import brentq

from noisyseg.config import AdeleConfig, build_config
from noisyseg.methods import adele
from noisyseg.methods.adele import correct_labels, correction_started, fit_iou_curve


def saturating(a: float, b: float, c: float, epochs: int) -> list[float]:
    return [a * (1 - math.exp(-b * t**c)) for t in range(1, epochs + 1)]


def first_trigger(history: list[float], r: float = 0.9, weights: str = "equal") -> int | None:
    """The first epoch at which correction starts when the history arrives one epoch at a time."""
    for epoch in range(1, len(history) + 1):
        if correction_started(history[:epoch], r, weights=weights):
            return epoch
    return None


def test_fit_recovers_the_parameters_of_an_exact_curve() -> None:
    fit = fit_iou_curve(saturating(0.8, 0.4, 1.3, 12))
    assert fit is not None
    assert (fit.a, fit.b, fit.c) == pytest.approx((0.8, 0.4, 1.3), rel=1e-4)


def test_fast_saturating_curve_triggers_where_the_analytic_slope_has_fallen_by_r() -> None:
    # c = 1: f'(t) / f'(1) = exp(-b (t - 1)) <= 0.1  <=>  t >= 1 + ln(10) / b = 5.605 for b = 0.5.
    b = 0.5
    expected = math.ceil(1 + math.log(10) / b)
    assert expected == 6
    assert first_trigger(saturating(0.85, b, 1.0, 15)) == expected


def test_trigger_with_curved_time_axis_matches_the_root_of_the_derivative_ratio() -> None:
    # c != 1: solve f'(t) = 0.1 f'(1) with f'(t) = a b c exp(-b t^c) t^(c-1) by root finding.
    a, b, c = 0.7, 0.3, 1.4

    def slope(t: float) -> float:
        return a * b * c * math.exp(-b * t**c) * t ** (c - 1)

    crossing = brentq(lambda t: slope(t) - 0.1 * slope(1.0), 2.0, 30.0)
    assert first_trigger(saturating(a, b, c, 20)) == math.ceil(crossing)


def test_slowly_rising_curve_triggers_eventually_unlike_the_reference_rule() -> None:
    history = saturating(0.9, 0.04, 1.0, 80)
    # The reference code drops leading epochs that rise by less than 0.1 per epoch: every epoch
    # of this curve does, which left it a one-point fit that could never trigger.
    assert max(np.diff([0.0, *history])) < 0.1
    assert not correction_started(history[:58])
    assert correction_started(history[:59])  # 1 + ln(10) / 0.04 = 58.56
    assert correction_started(history)


# Training-IoU shapes: the fast, medium and slow exponential rises the issue measured and an
# S-shaped rise (a class the network starts to predict late), with the noise-free trigger epoch
# of the rule f'(t) <= 0.1 f'(1) on each (root of the derivative ratio, rounded up).
NOISY_SHAPES = {
    "fast": ((0.9, 0.4, 1.0), 7),
    "medium": ((0.8, 0.15, 1.0), 17),
    "slow": ((0.7, 0.08, 1.0), 30),
    "s-shaped": ((0.6, 0.004, 2.0), 39),
}


def test_noise_free_triggers_of_the_noisy_shapes() -> None:
    for (a, b, c), epoch in NOISY_SHAPES.values():
        assert first_trigger(saturating(a, b, c, epoch + 5)) == epoch


@pytest.mark.parametrize("shape", list(NOISY_SHAPES))
def test_trigger_is_robust_to_epoch_to_epoch_noise(shape: str) -> None:
    # 20 draws of Gaussian noise (sd 0.03) on each shape: the trigger stays within 25% (at
    # least 5 epochs) of the noise-free epoch in 18 of 20, and never fires at epoch 5 or earlier
    # on a curve whose noise-free trigger is past epoch 15. The paper's unbounded fit fired at
    # epoch 5 or earlier in 9 of 20 draws of the slow curve.
    (a, b, c), expected = NOISY_SHAPES[shape]
    window = max(0.25 * expected, 5.0)
    clean = np.array(saturating(a, b, c, int(expected + window) + 1))
    epochs = []
    for seed in range(20):
        noisy = np.clip(clean + np.random.default_rng(seed).normal(0.0, 0.03, len(clean)), 0.0, 1.0)
        epochs.append(first_trigger(noisy.tolist()))
    within = [e is not None and abs(e - expected) <= window for e in epochs]
    assert sum(within) >= 18, epochs
    if expected > 15:
        assert all(e is None or e > 5 for e in epochs), epochs


def test_reference_fit_weights_fire_early_on_noisy_slow_rises() -> None:
    # Why `adele.fit_weights` stays `equal`: the reference code's weights (the latest epoch 100x
    # the first) let a few noisy recent points bend the fit. On the same 20 draws of the slow
    # shape, equal weights never fire at epoch 5 or earlier; the reference weights do.
    (a, b, c), expected = NOISY_SHAPES["slow"]
    clean = np.array(saturating(a, b, c, expected + 9))
    draws = [
        np.clip(clean + np.random.default_rng(seed).normal(0.0, 0.03, len(clean)), 0.0, 1.0).tolist()
        for seed in range(20)
    ]
    early = {
        weights: sum(1 for d in draws if (e := first_trigger(d, weights=weights)) is not None and e <= 5)
        for weights in adele.FIT_WEIGHTS
    }
    assert early["equal"] == 0 and early["reference"] >= 1, early
    # On an exact curve the weights change nothing: both recover the parameters.
    for weights in adele.FIT_WEIGHTS:
        fit = fit_iou_curve(saturating(0.8, 0.15, 1.0, 30), weights=weights)
        assert fit is not None and (fit.a, fit.b, fit.c) == pytest.approx((0.8, 0.15, 1.0), rel=1e-3)
    with pytest.raises(ValueError, match="adele.fit_weights"):
        fit_iou_curve(saturating(0.8, 0.15, 1.0, 30), weights="late")


def test_a_sharp_knee_needs_the_evidence_of_many_points() -> None:
    # Three noisy points of a slow rise: the unbounded fit bends into a knee, the concave one wins.
    history = [0.08, 0.05, 0.16]
    fit = fit_iou_curve(history)
    assert fit is not None and fit.c <= 1.0
    # An exact S-shaped rise over 12 epochs: the knee is beyond doubt.
    fit = fit_iou_curve(saturating(0.6, 0.004, 2.0, 40))
    assert fit is not None and fit.c == pytest.approx(2.0, rel=1e-3)


@pytest.mark.parametrize(
    "history",
    [
        [0.015 * t for t in range(1, 41)],  # linear: the slope never falls
        [0.0004 * t**2 for t in range(1, 41)],  # accelerating
    ],
    ids=["linear", "accelerating"],
)
def test_curves_whose_slope_does_not_fall_never_trigger(history: list[float]) -> None:
    assert first_trigger(history) is None


def test_a_class_the_network_does_not_learn_never_triggers() -> None:
    # IoU that fell to 0 after epoch 1 (a network predicting background only): the best fit is a
    # curve saturated from epoch 1 whose slope has "fallen", but it never rose: no early learning.
    stuck = [0.05, 0.0, 0.0, 0.0, 0.0]
    fit = fit_iou_curve(stuck)
    assert fit is not None and adele.slope_has_fallen(fit, len(stuck))
    assert not correction_started(stuck)
    assert correction_started(stuck, min_rise=0.0)  # the papers' rule alone would fire


def test_fewer_than_three_points_never_trigger() -> None:
    assert not correction_started([])
    assert not correction_started([0.5])
    assert not correction_started([0.5, 0.8])
    assert fit_iou_curve([0.5, 0.8]) is None
    # Missing values (class absent that epoch) do not count as points.
    assert not correction_started([0.5, None, float("nan"), 0.8, None])


def test_missing_values_keep_their_epoch_positions() -> None:
    history: list[float | None] = list(saturating(0.8, 0.5, 1.0, 8))
    history[2] = None
    fit = fit_iou_curve(history)
    assert fit is not None and (fit.a, fit.b, fit.c) == pytest.approx((0.8, 0.5, 1.0), rel=1e-4)


def test_failed_fit_never_triggers_and_is_logged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def failing_solver(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Optimal parameters not found: maximum number of function evaluations exceeded")

    monkeypatch.setattr(adele, "curve_fit", failing_solver)
    with caplog.at_level(logging.WARNING, logger="noisyseg.methods.adele"):
        assert not correction_started(saturating(0.8, 0.5, 1.0, 10))
    assert "fit failed" in caplog.text


def test_fit_with_non_finite_parameters_never_triggers(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(adele, "curve_fit", lambda *a, **k: (np.array([0.8, np.nan, 1.0]), None))
    with caplog.at_level(logging.WARNING, logger="noisyseg.methods.adele"):
        assert not correction_started(saturating(0.8, 0.5, 1.0, 10))
    assert "non-finite" in caplog.text


# ----------------------------------------------------------------------------- correction rule


def one_hot_probs(classes: list[list[int]], confidence: list[list[float]], num_classes: int = 3) -> torch.Tensor:
    """(1, C, H, W) probabilities: `confidence` on the given class, the rest spread evenly."""
    cls = torch.tensor(classes)
    conf = torch.tensor(confidence)
    probs = ((1 - conf) / (num_classes - 1)).unsqueeze(0).repeat(num_classes, 1, 1)
    probs.scatter_(0, cls.unsqueeze(0), conf.unsqueeze(0))
    return probs.unsqueeze(0)


def test_correction_rule_on_a_hand_made_slice() -> None:
    # Classes: 0 background, 1 triggered, 2 not triggered. Label row 2 has class 1 and 2 present.
    labels = torch.tensor([[[0, 0, 1, 2, 255, 0]]])
    prediction = [[1, 1, 0, 1, 1, 2]]
    confidence = [[0.9, 0.6, 0.9, 0.9, 0.9, 0.9]]
    probs = one_hot_probs(prediction, confidence)
    triggered = torch.tensor([False, True, False])
    corrected = correct_labels(labels, probs, triggered, tau=0.7)
    # pixel 0: bg -> 1 (confident, 1 triggered, present in the slice)
    # pixel 1: confidence 0.6 <= tau: kept
    # pixel 2: 1 -> bg (label triggered, prediction background)
    # pixel 3: label 2 is not triggered: kept
    # pixel 4: ignore stays ignore
    # pixel 5: prediction 2 is not triggered: kept
    assert corrected.tolist() == [[[1, 0, 0, 2, 255, 0]]]
    assert labels.tolist() == [[[0, 0, 1, 2, 255, 0]]], "the input labels must not be modified"


def test_correction_refuses_to_add_an_organ_absent_from_the_slice_unless_disabled() -> None:
    labels = torch.tensor([[[0, 0, 0]], [[0, 1, 0]]])  # class 1 absent from slice 0, present in slice 1
    probs = torch.cat([one_hot_probs([[1, 1, 0]], [[0.95, 0.95, 0.95]])] * 2)
    triggered = torch.tensor([False, True, False])
    assert correct_labels(labels, probs, triggered, tau=0.7).tolist() == [[[0, 0, 0]], [[1, 1, 0]]]
    assert correct_labels(labels, probs, triggered, tau=0.7, refuse_absent_classes=False).tolist() == [
        [[1, 1, 0]],
        [[1, 1, 0]],
    ]


def test_nothing_changes_while_no_class_is_triggered() -> None:
    labels = torch.tensor([[[0, 1, 2]]])
    probs = one_hot_probs([[2, 0, 1]], [[0.99, 0.99, 0.99]])
    assert torch.equal(correct_labels(labels, probs, torch.zeros(3, dtype=torch.bool)), labels)


def test_correction_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="probs"):
        correct_labels(torch.zeros(1, 2, 2, dtype=torch.long), torch.rand(1, 3, 2, 3), torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="triggered"):
        correct_labels(torch.zeros(1, 2, 2, dtype=torch.long), torch.rand(1, 3, 2, 2), torch.ones(4, dtype=torch.bool))


def test_a_temporary_plateau_triggers_at_once_but_not_when_the_rule_must_hold_three_epochs() -> None:
    # A class learned in two steps: a plateau at epochs 4-7, then the rise to its real plateau.
    series = [0, 0, 0, 0.45, 0.44, 0.46, 0.47, 0.6, 0.68, 0.75, 0.8, 0.84, 0.87, 0.89, 0.9, 0.91]
    series += [0.91, 0.92, 0.92, 0.92, 0.92, 0.93]

    def fired(trigger_epochs: int) -> int | None:
        state = adele.TriggerState(2)
        rule = AdeleConfig(trigger_epochs=trigger_epochs)
        for epoch, value in enumerate(series, start=1):
            if state.update(epoch, np.array([1.0, value]), rule, detect=True, adaptive=True):
                return epoch
        return None

    assert fired(1) == first_trigger(series) == 6  # the paper's rule fires on the temporary plateau
    late = fired(3)
    assert late is not None and late > 15
    # The rule held on the history up to each of the last three epochs, and not at the one before.
    assert all(correction_started(series[:e]) for e in (late - 2, late - 1, late))
    assert not correction_started(series[: late - 3])
    with pytest.raises(ValueError, match="adele.trigger_epochs"):
        build_config(None, ["data=x", "out=y", "adele.trigger_epochs=0"])
