"""The checkpoint-selection rules on constructed curves, epochs worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from noisyseg.training.selection import (
    RULES,
    default_rule,
    keeps_epoch,
    label_wave_epoch,
    moving_average,
    selected_epoch,
    selection_summary,
)

# f(t) = 1 - exp(-t): f'(t) = exp(-t) falls to a tenth of f'(1) at t = 1 + ln 10 = 3.30, so the
# trigger rule first holds at epoch 4 (risen by e^-1 - e^-4 = 0.35 > 0.05 by then).
FIT_EPOCH_4 = {"a": 1.0, "b": 1.0, "c": 1.0}
# f(t) = 1 - exp(-t / 2): f'(t) / f'(1) = exp(-(t - 1) / 2) <= 0.1 from t = 1 + 2 ln 10 = 5.61: epoch 6.
FIT_EPOCH_6 = {"a": 1.0, "b": 0.5, "c": 1.0}


def history(n: int, **columns: list) -> list[dict]:
    """n records; `val`, `val_noisy`, `test` give mIoU per epoch, `pc` the prediction changes,
    `fits` the per-class fit dicts (the same in every record)."""
    records = []
    for index in range(n):
        record = {
            "epoch": index + 1,
            "test": {"miou": columns.get("test", [0.5] * n)[index], "miou_fg": 0.4},
        }
        for key, name in (("val", "val"), ("val_noisy", "val_noisy")):
            if key in columns:
                record[name] = {"miou": columns[key][index]}
        record["prediction_change"] = columns["pc"][index] if "pc" in columns else None
        record["trigger"] = {c: {"fit": fit} for c, fit in columns.get("fits", {}).items()}
        records.append(record)
    return records


def test_validation_rules_take_the_first_best_epoch() -> None:
    records = history(6, val=[0.1, 0.5, 0.7, 0.7, 0.6, None], val_noisy=[0.2, 0.6, 0.55, 0.4, 0.6, 0.3])
    assert selected_epoch("clean-val", records) == 3  # 0.7 first at epoch 3, the tie at 4 loses
    assert selected_epoch("noisy-val", records) == 2  # 0.6 at epoch 2 beats the tie at 5
    assert selected_epoch("last", records) == 6
    assert selected_epoch("noisy-val", history(3, val=[0.1, 0.2, 0.3])) is None  # no noisy masks
    assert selected_epoch("clean-val", history(2, val=[None, None])) is None  # no validation split


def test_moving_average_is_trailing_and_undefined_across_gaps() -> None:
    averages = moving_average([None, 0.9, 0.6, 0.3, 0.0], 3)
    assert averages[:3] == [None, None, None]
    assert averages[3] == pytest.approx(0.6) and averages[4] == pytest.approx(0.3)
    assert moving_average([0.3, None, 0.3, 0.3, 0.3], 2) == [None, None, None, 0.3, 0.3]


# Prediction changes per epoch (none at epoch 1). Window-3 averages, by hand:
# e4 (.9+.6+.3)/3 = .6, e5 .4, e6 (.3+.3+.6)/3 = .4 (a tie: epoch 5 stays), e7 .6, e8 .8, e9 .9,
# e10 .9; at epoch 11, six epochs after epoch 5 with nothing lower, the first minimum is settled,
# so the later, lower averages (e12 .6, e13 .3, e14 0) do not count.
FIRST_MINIMUM_PC = [None, 0.9, 0.6, 0.3, 0.3, 0.6, 0.9, 0.9, 0.9, 0.9, 0.9, 0.0, 0.0, 0.0]


def test_label_wave_keeps_the_first_minimum_of_the_moving_average() -> None:
    records = history(len(FIRST_MINIMUM_PC), pc=FIRST_MINIMUM_PC)
    assert selected_epoch("label-free", records) == 5
    assert label_wave_epoch(records[:8]) == 5  # still within the patience: the lowest so far
    assert label_wave_epoch(records[:3]) == 3  # no average yet: the newest epoch
    # A patience of 10 would still be waiting at epoch 14 and take the late minimum (epoch 14).
    assert label_wave_epoch(records, patience=10) == 14


def test_label_wave_moves_to_a_lower_average_within_the_patience() -> None:
    # e4 .6, e5 .4, e6 (.3+.3+.6)/3 = .4, e7 (.3+.6+.3)/3 = .4, e8 (.6+.3+0)/3 = .3, e9 (.3+0+0)/3 = .1
    records = history(9, pc=[None, 0.9, 0.6, 0.3, 0.3, 0.6, 0.3, 0.0, 0.0])
    assert selected_epoch("label-free", records) == 9


def test_label_wave_without_measured_changes_is_the_last_epoch() -> None:
    assert selected_epoch("label-free", history(5)) == 5


def test_fitted_curves_wait_for_every_class() -> None:
    records = history(8, fits={"1": FIT_EPOCH_4, "2": FIT_EPOCH_6})
    assert selected_epoch("label-free-curves", records) == 6
    assert selected_epoch("label-free-curves", history(8, fits={"1": FIT_EPOCH_4})) == 4
    assert selected_epoch("label-free-curves", records[:5]) == 5  # class 2 not yet: the newest epoch
    # A class without a fit (never learned) never meets the rule: the last epoch.
    assert selected_epoch("label-free-curves", history(8, fits={"1": FIT_EPOCH_4, "2": None})) == 8


def test_every_rule_moves_only_to_the_newest_epoch() -> None:
    """What the trainer's saving relies on: after epoch t a rule chooses its previous choice or t."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = 30
        fits = {
            str(c): {
                "a": float(rng.uniform(0.2, 1.0)),
                "b": float(rng.uniform(0.05, 2.0)),
                "c": float(rng.uniform(0.3, 2.0)),
            }
            for c in (1, 2)
        }
        records = history(
            n,
            val=list(rng.uniform(0, 1, n).round(2)),
            val_noisy=[None if rng.random() < 0.2 else float(v) for v in rng.uniform(0, 1, n).round(2)],
            pc=[
                None,
                *(None if rng.random() < 0.1 else float(v) for v in rng.uniform(0, 1, n - 1).round(2)),
            ],
            fits=fits,
        )
        for rule in RULES:
            previous = None
            for t in range(1, n + 1):
                choice = selected_epoch(rule, records[:t])
                assert choice is None or choice == t or choice == previous, (
                    rule,
                    t,
                    choice,
                    previous,
                )
                assert keeps_epoch(rule, records[:t]) == (choice == t)
                previous = choice


def test_selection_summary_gives_the_test_score_at_each_rule() -> None:
    test = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 1.0]
    records = history(
        14,
        val=[0.1] * 13 + [0.2],
        val_noisy=[0.3] * 14,
        pc=FIRST_MINIMUM_PC,
        test=test,
        fits={"1": FIT_EPOCH_6},
    )
    summary = selection_summary(records, "noisy-val")
    assert summary["selection"] == {"rule": "noisy-val", "epoch": 1, "val_miou": 0.3}
    assert selection_summary(records, "clean-val")["selection"] == {"rule": "clean-val", "epoch": 14, "val_miou": 0.2}
    assert selection_summary(records, "label-free")["selection"]["val_miou"] is None
    assert summary["selected_epoch"] == {
        "noisy-val": 1,
        "clean-val": 14,
        "label-free": 5,
        "label-free-curves": 6,
        "last": 14,
    }
    assert summary["test_miou_at"] == {
        "noisy-val": 0.1,
        "clean-val": 1.0,
        "label-free": 0.5,
        "label-free-curves": 0.6,
        "last": 1.0,
    }
    assert summary["test_miou_fg_at"]["label-free"] == 0.4
    without = selection_summary(history(3, val=[0.1, 0.2, 0.1]), "clean-val")
    assert without["selected_epoch"]["noisy-val"] is None and without["test_miou_at"]["noisy-val"] is None


def test_default_rule_follows_the_masks_a_user_has() -> None:
    assert default_rule(has_noisy_val=True, has_val=True) == "noisy-val"
    assert default_rule(has_noisy_val=False, has_val=True) == "clean-val"
    assert default_rule(has_noisy_val=False, has_val=False) == "label-free-curves"
    with pytest.raises(ValueError, match="selection rule: expected one of"):
        selected_epoch("best", history(2))
