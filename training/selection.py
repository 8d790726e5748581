"""Which epoch's model a run keeps: the checkpoint-selection rules, as pure functions of the
per-epoch history (the records of `metrics.jsonl`).

Every figure chosen on the dataset's clean validation masks is an oracle that no user has: their
validation masks are as noisy as their training masks, or they have none. So a run keeps
`model.safetensors` at the epoch its *default rule* chooses (`default_rule`), and its summary gives
the test mIoU at every rule's epoch, side by side (`selection_summary`):

    noisy-val           the best mIoU on the noisy validation masks (`record["val_noisy"]`: a
                        labels folder that holds validation masks, `data corrupt --splits train,val`)
    clean-val           the best mIoU on the dataset's validation masks (`record["val"]`): a user's
                        own masks when they have no separate labels folder, the oracle in the
                        experiments, where they are clean
    label-free          Label Wave (Yuan et al., ICLR 2024): the first minimum of the moving average
                        of the prediction changes on the training set between epochs
                        (`record["prediction_change"]`, `prediction_changes.py`)
    label-free-curves   ADELE's fitted per-class training-IoU curves: the first epoch at which every
                        foreground class's fitted curve has ended its early learning (the trigger's
                        slope rule, `adele.fit_triggers`); the default without validation masks
    last                the last epoch

Ties go to the earlier epoch. Every rule is causal in a way the trainer relies on: the rule's
choice after epoch t is either its choice after epoch t - 1 or t itself (`keeps_epoch`), so
saving the model whenever the choice moves to the newest epoch keeps the chosen model, even
for a rule (the first minimum of a moving average) that is only decided epochs later.

Label Wave, as implemented here: PC_t is the fraction of training pixels whose scale-1.0 argmax in
epoch t's training pass differs from epoch t - 1's (the paper counts examples whose predicted
class changed; a pixel is a segmentation network's example). The moving average over
`LABEL_WAVE_WINDOW` epochs ends at its epoch (trailing, so it is known when the epoch ends). Its
first minimum is the lowest average so far that no later epoch beats within
`LABEL_WAVE_PATIENCE` epochs; until then the current lowest is the choice, and before the first
average exists, the newest epoch. Window 3 and patience 5 are noisyseg's choices for runs of
30 to 100 epochs (the paper smooths over a few epochs and stops on a patience); a patience
longer than the plateau of a short run would let a late, memorising minimum win.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from noisyseg.config import AdeleConfig
from noisyseg.methods.adele import MIN_RISE, CurveFit, fit_triggers

Record = dict[str, Any]
LABEL_WAVE_WINDOW = 3
LABEL_WAVE_PATIENCE = 5


def _epoch(record: Record) -> int:
    return int(record["epoch"])


def _best_value(history: Sequence[Record], value: Callable[[Record], float | None]) -> int | None:
    """The first epoch with the highest finite `value`, or None when no epoch has one."""
    best, best_value = None, -math.inf
    for record in history:
        current = value(record)
        if current is not None and math.isfinite(current) and current > best_value:
            best, best_value = _epoch(record), current
    return best


def _miou(split: str) -> Callable[[Record], float | None]:
    return lambda record: (record.get(split) or {}).get("miou")


# The record entry each validation rule scores on (the other rules score on none).
RULE_SPLITS = {"noisy-val": "val_noisy", "clean-val": "val"}


def noisy_val_epoch(history: Sequence[Record]) -> int | None:
    """The best mIoU on the noisy validation masks; None when the run has none."""
    return _best_value(history, _miou(RULE_SPLITS["noisy-val"]))


def clean_val_epoch(history: Sequence[Record]) -> int | None:
    """The best mIoU on the dataset's validation masks; None when it has no validation split."""
    return _best_value(history, _miou(RULE_SPLITS["clean-val"]))


def last_epoch(history: Sequence[Record]) -> int | None:
    return _epoch(history[-1]) if history else None


def moving_average(values: Sequence[float | None], window: int) -> list[float | None]:
    """Trailing means over `window` entries, None where any entry of the window is None."""
    averages: list[float | None] = []
    for end in range(len(values)):
        part = [v for v in values[max(0, end - window + 1) : end + 1] if v is not None]
        averages.append(sum(part) / window if len(part) == window else None)
    return averages


def label_wave_epoch(
    history: Sequence[Record], window: int = LABEL_WAVE_WINDOW, patience: int = LABEL_WAVE_PATIENCE
) -> int | None:
    """Label Wave's epoch: the first minimum of the moving average of the prediction changes
    (module docstring); the newest epoch while no average exists yet."""
    averages = moving_average([r.get("prediction_change") for r in history], window)
    best, best_value = None, math.inf
    for record, average in zip(history, averages, strict=True):
        if best is not None and _epoch(record) - best > patience:
            return best  # no lower average within `patience` epochs: the first minimum
        if average is not None and average < best_value:
            best, best_value = _epoch(record), average
    return best if best is not None else last_epoch(history)


def fitted_curves_epoch(history: Sequence[Record], r: float = AdeleConfig.r, min_rise: float = MIN_RISE) -> int | None:
    """The first epoch by which every foreground class's fitted training-IoU curve (the fit each
    record holds, `record["trigger"][c]["fit"]`) has met ADELE's trigger rule at its epoch: its
    slope fell by the fraction `r` after a rise of `min_rise`. A class meets it once for good.
    The newest epoch while some class has not (a class the network never learns keeps it there)."""
    met: set[str] = set()
    for record in history:
        classes = record.get("trigger") or {}
        for c, entry in classes.items():
            if (
                c not in met
                and entry.get("fit")
                and fit_triggers(CurveFit(**entry["fit"]), _epoch(record), r, min_rise)
            ):
                met.add(c)
        if classes and met >= set(classes):
            return _epoch(record)
    return last_epoch(history)


RULES: dict[str, Callable[[Sequence[Record]], int | None]] = {
    "noisy-val": noisy_val_epoch,
    "clean-val": clean_val_epoch,
    "label-free": label_wave_epoch,
    "label-free-curves": fitted_curves_epoch,
    "last": last_epoch,
}


def default_rule(has_noisy_val: bool, has_val: bool) -> str:
    """The rule a run keeps its model by: noisy validation masks when the labels folder has them,
    else the dataset's validation masks, else no masks at all."""
    if has_noisy_val:
        return "noisy-val"
    # The fitted curves, not Label Wave: on the phantom's first noisy-validation runs Label Wave
    # chose epochs 5 to 20, 20 to 40 points below the last epoch (docs/results.md).
    return "clean-val" if has_val else "label-free-curves"


def selected_epoch(rule: str, history: Sequence[Record]) -> int | None:
    if rule not in RULES:
        raise ValueError(f"selection rule: expected one of {', '.join(RULES)}, got {rule!r}")
    return RULES[rule](history)


def keeps_epoch(rule: str, history: Sequence[Record]) -> bool:
    """Whether the model of the newest epoch of `history` is the one `rule` now chooses (then
    the trainer saves it; the choice never moves back to an epoch whose model is gone)."""
    return bool(history) and selected_epoch(rule, history) == _epoch(history[-1])


def selection_summary(history: Sequence[Record], rule: str) -> dict[str, Any]:
    """The summary's selection part: the rule and epoch of `model.safetensors` with its mIoU on
    the validation masks the rule scores on (`val_miou`, None for the rules that use none: two
    runs on the same data compare by it, as a user can), every rule's epoch and the test mIoU
    (with and without background) at it (None where a rule has no epoch)."""
    by_epoch = {_epoch(r): r for r in history}
    epochs = {name: choose(history) for name, choose in RULES.items()}

    def at(key: str) -> dict[str, float | None]:
        return {name: by_epoch[e]["test"][key] if e in by_epoch else None for name, e in epochs.items()}

    chosen, split = by_epoch.get(epochs[rule]), RULE_SPLITS.get(rule)
    return {
        "selection": {
            "rule": rule,
            "epoch": epochs[rule],
            "val_miou": _miou(split)(chosen) if chosen and split else None,
        },
        "selected_epoch": epochs,
        "test_miou_at": at("miou"),
        "test_miou_fg_at": at("miou_fg"),
    }
