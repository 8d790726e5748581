"""What ARM learned, from the `arm` record of each epoch (`Trainer.arm_record`).

The record holds ARM's weight function w(v^) at 40 bin centres of its input, the normalised
confidence v^ in [-1, 1] (1 = one-hot, -1 = uniform), and the epoch's pixel counts per bin for
right and wrong labels (wrong = the label trained on differs from the clean mask). From these:

- weight share of wrong labels: sum_b w_b n_wrong,b / sum_b w_b n_b, against their pixel share
  sum_b n_wrong,b / sum_b n_b; their ratio is the weight a wrong label gets relative to uniform
  weighting (1 = ARM changes nothing for them, < 1 = ARM turns them down, as the paper intends);
- effective sample fraction (sum w n)^2 / (sum w^2 n * sum n): 1 for uniform weights, small when
  ARM puts the batch's weight on few pixels (a noisier gradient).

Both use the epoch's pooled histogram; training normalises weights per mini-batch, so these
are the epoch-level picture of the same weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from noisyseg.methods.hooks import ArmEpoch, arm_epoch


def arm_series(records: Sequence[dict[str, Any]]) -> list[ArmEpoch]:
    """Per epoch (those with an `arm` record)."""
    return [arm_epoch(r["arm"]) for r in records if "arm" in r]


def plot_weight_function(records: Sequence[dict[str, Any]], title: str, figure: Figure) -> None:
    """Left: w(v^) every tenth of training, coloured by epoch. Right: the last epoch's pixels
    per bin for right and wrong labels, with w(v^) over them."""
    arm_records = [r for r in records if "arm" in r]
    if not arm_records:
        return
    curves, histogram = figure.subplots(1, 2)
    step = max(1, len(arm_records) // 10)
    cmap = colormaps["viridis"]
    shown = arm_records[::step] + ([arm_records[-1]] if (len(arm_records) - 1) % step else [])
    for index, record in enumerate(shown):
        curves.plot(
            record["arm"]["v"],
            record["arm"]["w"],
            color=cmap(index / max(len(shown) - 1, 1)),
            label=f"epoch {record['epoch']}",
        )
    curves.set_xlabel("normalised confidence v^ (1 = one-hot)")
    curves.set_ylabel("ARM weight w(v^) before normalisation")
    curves.set_title(title, fontsize=9)
    curves.legend(fontsize=6, ncol=2)
    last = arm_records[-1]["arm"]
    centres = np.asarray(last["v"])
    width = centres[1] - centres[0]
    right, wrong = np.asarray(last["pixels"], float), np.asarray(last["pixels_wrong"], float)
    total = max((right + wrong).sum(), 1.0)
    histogram.bar(centres, right / total, width=width, color="tab:green", alpha=0.6, label="right labels")
    histogram.bar(
        centres, wrong / total, width=width, bottom=right / total, color="tab:red", alpha=0.6, label="wrong labels"
    )
    histogram.set_yscale("log")
    histogram.set_xlabel("normalised confidence v^")
    histogram.set_ylabel("fraction of pixels (last epoch)")
    weights = histogram.twinx()
    weights.plot(centres, last["w"], color="black", label="w(v^)")
    weights.set_ylabel("w(v^)")
    histogram.legend(fontsize=7, loc="upper left")
