"""Where the fused three-scale ADELE+ARM loss spends its time, against three plain cross-entropies.

``.venv/bin/python benchmarks/adele_arm_cost_parts.py [--rounds 7] [--backend numba]`` times
forward + backward of `adele_arm_loss` with its terms switched off one at a time (ARM's
gradient off, ARM off, the consistency term off with lam = 0, both) beside three
`F.cross_entropy`, at (4, C, 256, 256) for C = 5 and 19, interleaved within every round, on one
thread bound to one CPU. Prints the medians.
The figures behind docs/benchmarks.md, "ARM at the cost of plain cross-entropy".
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from bench_kernels import forward_backward, make_inputs, seeded_arm

from noisyseg.kernels import functional


def loss_cases(fused: Any) -> dict[str, Callable]:
    """The losses timed side by side, each loss(logits, target, arm) as `forward_backward` takes
    them: three plain CEs, then the fused loss with its terms switched off one at a time."""
    return {
        "three plain CEs": lambda logits, target, arm: sum(
            F.cross_entropy(z, target, ignore_index=255) for z in logits
        ),
        "ADELE+ARM": lambda logits, target, arm: fused.adele_arm_loss(logits, target, arm),
        "ADELE+ARM, ARM frozen": lambda logits, target, arm: frozen_arm_loss(fused, logits, target, arm),
        "ADELE, no ARM": lambda logits, target, arm: fused.adele_arm_loss(logits, target, None),
        "ADELE+ARM, lam = 0": lambda logits, target, arm: fused.adele_arm_loss(logits, target, arm, lam=0.0),
        "ADELE, no ARM, lam = 0": lambda logits, target, arm: fused.adele_arm_loss(logits, target, None, lam=0.0),
    }


def frozen_arm_loss(fused: Any, logits: list[torch.Tensor], target: torch.Tensor, arm: torch.nn.Module) -> torch.Tensor:
    """The full loss with ARM's parameters out of the graph: no ARM gradient, so no K bins of it."""
    arm.requires_grad_(False)
    try:
        return fused.adele_arm_loss(logits, target, arm)
    finally:
        arm.requires_grad_(True)


def timed_ms(loss: Callable, logits: list[torch.Tensor], target: torch.Tensor, arm: torch.nn.Module) -> float:
    started = time.perf_counter()
    forward_backward(loss, logits, target, arm)
    return (time.perf_counter() - started) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--backend", default="numba")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:1])
    fused = functional.losses_on(args.backend)
    for num_classes in (5, 19):
        logits, target = make_inputs((4, num_classes, 256, 256), 3, "cpu")
        arm = seeded_arm()
        cases = loss_cases(fused)
        times: dict[str, list[float]] = {name: [] for name in cases}
        for loss in cases.values():  # warm-up: numba's cache, the allocator
            timed_ms(loss, logits, target, arm)
        for _ in range(args.rounds):
            for name, loss in cases.items():
                times[name].append(timed_ms(loss, logits, target, arm))
        plain = statistics.median(times["three plain CEs"])
        for name, values in times.items():
            median = statistics.median(values)
            print(f"C={num_classes:3d} {name:24s} {median:8.1f} ms  {median / plain:5.2f}x")


if __name__ == "__main__":
    main()
