"""The training methods: what each `--method` switches on, in one table.

Adding a method is one entry in `METHOD_SPECS`; `config.METHODS`, the `train --method` choices
and the trainer all read it. Light on purpose (no torch): the configuration imports it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class MethodSpec:
    """What a `--method` switches on (method-spec sections 2 to 5)."""

    description: str
    multiscale: bool = False  # train on the input at every `adele.scales`, averaging the losses
    consistency: bool = False  # ADELE's multiscale consistency term
    correction: bool = False  # trigger and label correction
    adaptive: bool = True  # per-class trigger (False: one trigger on the mean foreground curve)
    arm: bool = False  # ARM reweights the per-pixel losses
    pixel_loss: str = "ce"  # "ce", "gce", "ohem" or "tloss" (`losses.py`)
    branch: str | None = None  # what `adele.fork` continues as, from the first trigger (`fork.py`)


METHOD_SPECS = {
    "baseline": MethodSpec("single-scale cross-entropy"),
    "baseline-ms": MethodSpec("cross-entropy averaged over the input scales (ADELE's baseline)", multiscale=True),
    "adele": MethodSpec(
        "ADELE: multiscale consistency and class-adaptive label correction",
        multiscale=True,
        consistency=True,
        correction=True,
        branch="baseline-ms",
    ),
    "adele-correction": MethodSpec(
        "ADELE's label correction alone, on the multiscale baseline (Table 6's ablation)",
        multiscale=True,
        correction=True,
    ),
    "adele-consistency": MethodSpec(
        "ADELE's multiscale consistency alone, without correction (Table 6's ablation)",
        multiscale=True,
        consistency=True,
    ),
    "adele-nonadaptive": MethodSpec(
        "ADELE with one trigger for all classes (the paper's ablation)",
        multiscale=True,
        consistency=True,
        correction=True,
        adaptive=False,
    ),
    "arm": MethodSpec("cross-entropy reweighted by ARM", arm=True),
    "adele+arm": MethodSpec(
        "ADELE with ARM-reweighted cross-entropy", multiscale=True, consistency=True, correction=True, arm=True
    ),
    "gce": MethodSpec("generalized cross-entropy", pixel_loss="gce"),
    "ohem": MethodSpec("online hard example mining cross-entropy", pixel_loss="ohem"),
    "gce+arm": MethodSpec("generalized cross-entropy reweighted by ARM", pixel_loss="gce", arm=True),
    # A drop-in loss: baseline-ms with the T-Loss in place of CE (same views, same compute).
    "tloss": MethodSpec(
        "T-Loss: Student-t likelihood with a learned tolerance, over the input scales",
        multiscale=True,
        pixel_loss="tloss",
    ),
}
METHODS = tuple(METHOD_SPECS)


def method_names(names: Iterable[str]) -> tuple[str, ...]:
    """`names` as a tuple, refusing any that is not a method (a typo fails at import)."""
    names = tuple(names)
    unknown = [name for name in names if name not in METHOD_SPECS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    return names
