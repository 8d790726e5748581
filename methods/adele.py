"""ADELE's class-adaptive trigger and its label-correction rule (method-spec sections 2 and 3).

Trigger. For each foreground class, the training IoU against the labels currently trained on
(one value per epoch, epochs 1-based) is fitted with the paper's model

    f(t) = a (1 - exp(-b t^c)),  0 < a <= 1, b >= 0, c >= 0,   f'(t) = a b c exp(-b t^c) t^(c-1)

by bounded least squares (scipy `curve_fit`, method `trf`), on every epoch seen so far with equal
weights (`adele.fit_weights=reference`: the reference code's, later epochs up to 100x; not the
default, it fires early on noisy slow rises, `docs/method.md`). The exponent is first bounded by
c <= 1, the reference code's bound: a concave curve, whose slope only falls. A sharper knee
(c > 1, an S-shaped rise) is taken only when the data demand it: the unbounded fit must beat the
concave one by an F-test at p < 0.001 (one extra degree of freedom). With the paper's unbounded
c alone, a few noisy epochs of a slow rise fit a sharp knee and fire absurdly early (measured on
20 noise draws of sd 0.03: a slow exponential whose noise-free trigger is epoch 30 fired at epoch
5 or earlier in 9 of 20; with the selection, never, and within 25% of epoch 30 in 19-20 of 20 on
three sets of draws; `docs/method.md`).
Correction of the class starts at epoch t when the slope has *fallen* by the fraction r:

    f'(t) <= (1 - r) f'(1),  f'(1) > 0

which is |f'(1) - f'(t)| / |f'(1)| > r restricted to a falling slope, so a curve that is still
accelerating never triggers. Unlike the reference code there is no rule that drops slowly rising
leading epochs: a slowly rising curve is fitted on all its points and triggers once its slope has
fallen enough. Fewer than `min_points` finite values, or a failed fit, never trigger.

One guard of noisyseg's own (the papers never meet the case): the fitted curve must have risen
by at least `min_rise` (0.05 IoU) between epoch 1 and now, f(t) - f(1) >= min_rise. Without it a
class the network has not started to predict (training IoU stuck near 0, common in the first
epochs of a small network) fits a curve that is "saturated" from epoch 1, triggers at once, and
correction then turns every label of that class into background: there was no early learning
whose end could be detected.

Guard (noisyseg's, method-spec section 3). Correction must never erase a class the network has
learned: when a corrected class's labelled area in the store falls below `guard_min_area` (0.5)
of its annotated area, its correction stops for good and the pixels correction turned from it to
background are given back. Why the area and why a half: the failure seen (ladder level 4: the
heart's prediction collapsed after its trigger and correction turned its labels into background)
drives the area towards zero, while a faithful correction moves it little: erode-dilate noise
erodes half the slices and dilates the other half, and even at 8 iterations a correct label is
about 0.8 of the annotated area (an organ rescaled to 1000 pixels, radius about 18, loses or
gains 8 pixels of radius).

Correction. A pixel's label becomes the prediction's argmax when the confidence exceeds tau, the
current label is background or a triggered class, and the predicted class is background or a
triggered class; optionally an organ absent from the slice's current label is never added.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.optimize import OptimizeWarning, curve_fit
from scipy.special import fdtrc

from noisyseg.config import FIT_WEIGHTS, AdeleConfig
from noisyseg.io import json_float

log = logging.getLogger(__name__)

MIN_FIT_POINTS = 3
# Significance at which a knee sharper than an exponential (c > 1) replaces the concave fit.
KNEE_ALPHA = 1e-3
# Smallest rise of the fitted training-IoU curve since epoch 1 that counts as early learning.
MIN_RISE = 0.05


@dataclass(frozen=True)
class CurveFit:
    """Fitted parameters of f(t) = a (1 - exp(-b t^c))."""

    a: float
    b: float
    c: float

    def value(self, t: float | np.ndarray) -> float | np.ndarray:
        return curve_value(t, self.a, self.b, self.c)

    def slope(self, t: float) -> float:
        """f'(t) = a b c exp(-b t^c) t^(c-1)."""
        return float(self.a * self.b * self.c * math.exp(-self.b * t**self.c) * t ** (self.c - 1.0))

    def as_dict(self) -> dict[str, float]:
        return {"a": self.a, "b": self.b, "c": self.c}


def curve_value(t: float | np.ndarray, a: float, b: float, c: float) -> float | np.ndarray:
    return a * (1.0 - np.exp(-b * np.power(t, c)))


def _finite_points(iou_history: Sequence[float | None]) -> tuple[np.ndarray, np.ndarray]:
    """(epochs, values) of the finite entries; epochs are 1-based positions in the history."""
    values = np.array([math.nan if v is None else float(v) for v in iou_history], dtype=np.float64)
    epochs = np.arange(1, len(values) + 1, dtype=np.float64)
    finite = np.isfinite(values)
    return epochs[finite], values[finite]


def fit_sigma(n: int, weights: str) -> np.ndarray | None:
    """Per-point sigma of the fit of n epochs: None for `equal` weights; for `reference`, the
    reference code's geomspace(1, 0.1, n), which weighs the latest epoch 100x the first."""
    if weights not in FIT_WEIGHTS:
        raise ValueError(f"adele.fit_weights: expected one of {', '.join(FIT_WEIGHTS)}, got {weights!r}")
    return np.geomspace(1.0, 0.1, n) if weights == "reference" else None


def fit_iou_curve(
    iou_history: Sequence[float | None], min_points: int = MIN_FIT_POINTS, weights: str = "equal"
) -> CurveFit | None:
    """Least-squares fit of the paper's curve to a training-IoU history (None/NaN entries skipped).

    The concave fit (c <= 1) unless the unbounded one is better by an F-test at `KNEE_ALPHA`.
    `weights` (`fit_sigma`) weighs the epochs of both fits and of the test.
    Returns None when fewer than `min_points` finite values exist or the solver fails (logged).
    """
    epochs, values = _finite_points(iou_history)
    if len(values) < max(min_points, MIN_FIT_POINTS):
        return None
    sigma = fit_sigma(len(values), weights)
    concave = _least_squares(epochs, values, c_max=1.0, sigma=sigma)
    if concave is None or len(values) <= MIN_FIT_POINTS + 1:
        return concave
    knee = _least_squares(epochs, values, c_max=np.inf, sigma=sigma)
    if knee is None or knee.c <= 1.0:
        return concave
    w = np.ones_like(values) if sigma is None else sigma**-2.0
    residual_concave = float(np.sum(w * (concave.value(epochs) - values) ** 2))
    residual_knee = float(np.sum(w * (knee.value(epochs) - values) ** 2))
    dof = len(values) - 3
    if residual_knee <= 0.0:
        return knee
    f_statistic = (residual_concave - residual_knee) / (residual_knee / dof)
    # fdtrc is the F distribution's survival function (scipy.stats.f.sf without importing
    # scipy.stats, about 1 s of every training process's start).
    return knee if fdtrc(1, dof, f_statistic) < KNEE_ALPHA else concave


def _least_squares(
    epochs: np.ndarray, values: np.ndarray, c_max: float, sigma: np.ndarray | None = None
) -> CurveFit | None:
    """The bounded least-squares fit with the exponent in [0, c_max]; None (logged) on failure."""
    # Start near a saturating curve through the data: a at the highest value seen, c = 1 and b
    # from the first point, which puts the solver close to the fast-saturating shapes.
    a0 = float(np.clip(values.max(), 1e-3, 1.0))
    ratio = float(np.clip(values[0] / a0, 1e-3, 1 - 1e-3))
    b0 = float(np.clip(-math.log(1.0 - ratio) / epochs[0], 1e-3, 50.0))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OptimizeWarning)
            params, _ = curve_fit(
                curve_value,
                epochs,
                values,
                p0=(a0, b0, min(1.0, c_max)),
                sigma=sigma,
                bounds=([1e-9, 0.0, 0.0], [1.0, np.inf, c_max]),
                method="trf",
                maxfev=5000,
            )
    except (RuntimeError, ValueError) as err:
        log.warning("IoU curve fit failed on %d points (%s); no trigger from this fit", len(values), err)
        return None
    if not np.all(np.isfinite(params)):
        log.warning("IoU curve fit gave non-finite parameters %s; no trigger from this fit", params)
        return None
    return CurveFit(a=float(params[0]), b=float(params[1]), c=float(params[2]))


def slope_has_fallen(fit: CurveFit, epoch: float, r: float = 0.9) -> bool:
    """True when f'(epoch) <= (1 - r) f'(1) with f'(1) > 0: the slope dropped by the fraction r."""
    initial = fit.slope(1.0)
    current = fit.slope(float(epoch))
    if not (math.isfinite(initial) and math.isfinite(current)) or initial <= 0.0:
        return False
    return current <= (1.0 - r) * initial


def curve_has_risen(fit: CurveFit, epoch: float, min_rise: float = MIN_RISE) -> bool:
    """True when the fitted curve rose by at least `min_rise` from epoch 1 to `epoch`."""
    return float(fit.value(float(epoch))) - float(fit.value(1.0)) >= min_rise


def fit_triggers(fit: CurveFit | None, epoch: int, r: float = 0.9, min_rise: float = MIN_RISE) -> bool:
    """The trigger rule on a fit: slope fallen by the fraction r, after a rise of `min_rise`."""
    return fit is not None and slope_has_fallen(fit, epoch, r) and curve_has_risen(fit, epoch, min_rise)


def correction_started(
    iou_history: Sequence[float | None],
    r: float = 0.9,
    min_points: int = MIN_FIT_POINTS,
    min_rise: float = MIN_RISE,
    weights: str = "equal",
) -> bool:
    """Whether label correction of a class starts now, at the last epoch of `iou_history`.

    `iou_history[t - 1]` is the class's training IoU at epoch t (1-based). Fits the paper's curve
    (`fit_iou_curve`) and triggers when the fitted slope at the current epoch has fallen by the
    fraction `r` of the slope at epoch 1, provided the fitted curve has risen by `min_rise` since
    epoch 1. Never triggers on fewer than `min_points` finite values or on a failed fit. The
    caller keeps a triggered class triggered (sticky).
    """
    return fit_triggers(fit_iou_curve(iou_history, min_points, weights), len(iou_history), r, min_rise)


def collapsed_classes(areas: np.ndarray, annotated: np.ndarray, corrected: Sequence[int], min_area: float) -> list[int]:
    """The classes among `corrected` whose labelled area fell below `min_area` of the annotated
    area (classes the annotation does not hold are never reported)."""
    return [c for c in corrected if annotated[c] > 0 and areas[c] < min_area * annotated[c]]


def correct_labels(
    labels: torch.Tensor,
    probs: torch.Tensor,
    triggered: torch.Tensor,
    tau: float = 0.7,
    refuse_absent_classes: bool = True,
    ignore_index: int = 255,
) -> torch.Tensor:
    """The corrected labels of a batch (a new tensor; `labels` is not modified).

    labels: (N, H, W) integer class ids, `ignore_index` never changes.
    probs: (N, C, H, W) class probabilities used for correction.
    triggered: (C,) bool, the classes whose correction has started (background is always
        allowed: index 0 is treated as True).
    A pixel takes argmax(probs) when max(probs) > tau, its current label is background or
    triggered, and the predicted class is background or triggered; with
    `refuse_absent_classes`, a predicted organ must already occur in that slice's label.
    """
    if probs.dim() != 4 or labels.shape != (probs.shape[0], *probs.shape[2:]):
        raise ValueError(
            f"probs (N, C, H, W) and labels (N, H, W) must agree, got {tuple(probs.shape)} and {tuple(labels.shape)}"
        )
    num_classes = probs.shape[1]
    if triggered.shape != (num_classes,):
        raise ValueError(f"triggered: expected ({num_classes},) bools, got shape {tuple(triggered.shape)}")
    allowed = triggered.to(device=labels.device, dtype=torch.bool).clone()
    allowed[0] = True
    confidence, prediction = probs.max(dim=1)
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels)).long()
    change = valid & (confidence > tau) & allowed[safe_labels] & allowed[prediction]
    if refuse_absent_classes:
        # (N, C): which classes each slice's current label holds; background may always be written.
        present = torch.stack([(labels == c).flatten(1).any(dim=1) for c in range(num_classes)], dim=1)
        present[:, 0] = True
        change &= present.gather(1, prediction.flatten(1)).reshape(prediction.shape)
    return torch.where(change, prediction.to(labels.dtype), labels)


@dataclass
class TriggerState:
    """Per foreground class: training-IoU history, last fit, trigger epoch (sticky)."""

    num_classes: int
    iou_history: dict[int, list[float | None]] = field(default_factory=dict)
    fits: dict[int, dict[str, float] | None] = field(default_factory=dict)
    trigger_epoch: dict[int, int | None] = field(default_factory=dict)
    guard_epoch: dict[int, int | None] = field(default_factory=dict)  # correction stopped by the guard

    def __post_init__(self) -> None:
        for c in range(1, self.num_classes):
            self.iou_history.setdefault(c, [])
            self.fits.setdefault(c, None)
            self.trigger_epoch.setdefault(c, None)
            self.guard_epoch.setdefault(c, None)

    def update(self, epoch: int, train_iou: np.ndarray, rule: AdeleConfig, detect: bool, adaptive: bool) -> list[int]:
        """Add this epoch's IoUs, refit, trigger by `rule`'s r, min_fit_points, min_rise and
        fit_weights; returns the classes that triggered now."""
        for c in range(1, self.num_classes):
            self.iou_history[c].append(json_float(float(train_iou[c])))
            fit = fit_iou_curve(self.iou_history[c], rule.min_fit_points, rule.fit_weights)
            self.fits[c] = fit.as_dict() if fit else None
        if not detect:
            return []
        pending = [c for c in range(1, self.num_classes) if self.trigger_epoch[c] is None]
        if adaptive:
            fired = [c for c in pending if self._holds(c, epoch, rule)]
        elif pending and correction_started(
            self.mean_history(), rule.r, rule.min_fit_points, rule.min_rise, rule.fit_weights
        ):
            fired = pending
        else:
            fired = []
        for c in fired:
            self.trigger_epoch[c] = epoch
        return fired

    def _holds(self, c: int, epoch: int, rule: AdeleConfig) -> bool:
        """Whether the trigger rule held for class `c` at each of the last `rule.trigger_epochs`
        epochs, each on the fit of the history up to it (refitted here, so a resumed run needs
        no state beyond the history)."""
        if self.fits[c] is None or not fit_triggers(CurveFit(**self.fits[c]), epoch, rule.r, rule.min_rise):
            return False
        history = self.iou_history[c]
        return all(
            correction_started(history[:-back], rule.r, rule.min_fit_points, rule.min_rise, rule.fit_weights)
            for back in range(1, rule.trigger_epochs)
        )

    def mean_history(self) -> list[float | None]:
        """Mean foreground training IoU per epoch (the non-adaptive ablation's single curve)."""
        columns = zip(*(self.iou_history[c] for c in range(1, self.num_classes)), strict=True)
        means = []
        for values in columns:
            present = [v for v in values if v is not None]
            means.append(sum(present) / len(present) if present else None)
        return means

    def first_epoch(self) -> int | None:
        """The epoch of the first trigger of any class (None before one)."""
        return min((e for e in self.trigger_epoch.values() if e is not None), default=None)

    def any_triggered(self) -> bool:
        """Whether some class has triggered (a trigger is set at the end of its epoch, so during
        an epoch this is about the epochs before it)."""
        return self.first_epoch() is not None

    def triggered_mask(self, before_or_at: int) -> torch.Tensor:
        """(C,) bools: classes triggered at or before epoch `before_or_at` and not stopped by the
        guard (index 0 False)."""
        mask = torch.zeros(self.num_classes, dtype=torch.bool)
        for c, epoch in self.trigger_epoch.items():
            mask[c] = epoch is not None and epoch <= before_or_at and self.guard_epoch[c] is None
        return mask

    def corrected_classes(self) -> list[int]:
        """The classes correction works on now: triggered and not stopped by the guard."""
        return [
            c for c in range(1, self.num_classes) if self.trigger_epoch[c] is not None and self.guard_epoch[c] is None
        ]

    def stop(self, c: int, epoch: int) -> None:
        """The guard stops class `c`'s correction for good."""
        self.guard_epoch[c] = epoch

    def correction_classes(self, epoch: int, timing: str, every: int) -> torch.Tensor | None:
        """(C,) bools of the classes corrected during/at the end of `epoch`, or None if none.

        A class is corrected from its start epoch on: the trigger epoch itself for `epoch`
        timing (the end-of-epoch pass follows the trigger), the next epoch for `iteration`
        timing. With `every` k > 1, only at start epochs and multiples of k.
        """
        delay = 1 if timing == "iteration" else 0
        starts = {e + delay for e in self.trigger_epoch.values() if e is not None}
        active = self.triggered_mask(epoch - delay)
        due = every == 1 or epoch % every == 0 or epoch in starts
        return active if due and bool(active.any()) else None

    def record(self) -> dict[str, Any]:
        return {
            str(c): {
                "triggered": self.trigger_epoch[c] is not None,
                "epoch": self.trigger_epoch[c],
                "fit": self.fits[c],
                "guard_epoch": self.guard_epoch[c],
            }
            for c in range(1, self.num_classes)
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "iou_history": {str(c): h for c, h in self.iou_history.items()},
            "fits": {str(c): f for c, f in self.fits.items()},
            "trigger_epoch": {str(c): e for c, e in self.trigger_epoch.items()},
            "guard_epoch": {str(c): e for c, e in self.guard_epoch.items()},
        }

    @classmethod
    def from_json(cls, num_classes: int, raw: dict[str, Any]) -> TriggerState:
        return cls(
            num_classes,
            iou_history={int(c): list(h) for c, h in raw["iou_history"].items()},
            fits={int(c): f for c, f in raw["fits"].items()},
            trigger_epoch={int(c): e for c, e in raw["trigger_epoch"].items()},
            # Checkpoints written before the guard existed have no guard epochs.
            guard_epoch={int(c): e for c, e in raw.get("guard_epoch", {}).items()},
        )
