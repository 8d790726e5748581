"""Where the fused ARM-weighted cross-entropy (numba, ARM's table) spends its time, against plain CE.

``taskset -c 1 .venv/bin/python benchmarks/arm_ce_cost_parts.py [--classes 5] [--calls 15]`` times,
at (4, C, 256, 256) on one thread bound to one CPU, medians of `--calls` calls after one warm-up:
forward + backward of `F.cross_entropy` and of the fused loss (`bench_kernels.forward_backward`),
then the fused call's own steps one at a time: `_FusedCall`'s set-up, the fused pass with and
without ARM's gradient bins, ARM's gradient from the bins, and the in-place rescale backward
applies. The figures behind docs/benchmarks.md, "Where ARM-CE's time goes at C = 5".
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import numba
import numpy as np
import torch
import torch.nn.functional as F
from bench_kernels import forward_backward, make_inputs, seeded_arm

from noisyseg.kernels import functional
from noisyseg.kernels.contract import LossTerms, pack_arm_parameters
from noisyseg.kernels.numba_adele_arm import _FusedCall
from noisyseg.kernels.numba_common import float32_buffer


def median_ms(fn: Callable[[], object], calls: int) -> float:
    fn()  # warm-up: numba's cache, the allocator
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=5)
    parser.add_argument("--calls", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:1])
    logits, target = make_inputs((4, args.classes, 256, 256), 1)
    arm = seeded_arm()
    fused = functional.losses_on("numba")
    params = pack_arm_parameters(arm)
    terms = LossTerms.cross_entropy(ignore_index=255)
    call = _FusedCall(logits, target, params, terms)
    bins = call._bins()
    unnormalised = call._fixed_normalisers(1, 1.0, 0.0)
    gradient = torch.empty(logits[0].numel())
    parts: dict[str, Callable[[], object]] = {
        "plain CE, forward + backward": lambda: forward_backward(
            lambda z, t, a: F.cross_entropy(z[0], t, ignore_index=255), logits, target, arm
        ),
        "fused ARM-CE, forward + backward": lambda: forward_backward(
            lambda z, t, a: fused.arm_cross_entropy(z[0], t, a), logits, target, arm
        ),
        "set-up (_FusedCall)": lambda: _FusedCall(logits, target, params, terms),
        "fused pass with ARM's bins": lambda: call._pass(
            unnormalised, True, (float32_buffer(call.logits[0].shape),), bins=bins
        ),
        "fused pass without them": lambda: call._pass(unnormalised, True, (float32_buffer(call.logits[0].shape),)),
        "ARM's gradient from the bins": lambda: call._arm_table_gradient(bins, np.full((1, 2), 1e-6)),
        "backward's in-place rescale": lambda: gradient.mul_(1.0001),
    }
    for name, part in parts.items():
        print(f"C={args.classes:3d} {name:34s} {median_ms(part, args.calls):7.3f} ms")


if __name__ == "__main__":
    main()
