"""ARM's gradient bins alone: the kernels' interval bins beside the node layout they replaced and a
piecewise-cubic layout that was measured before anyone built it (docs/benchmarks.md, "ARM's
gradient bins" and "Eleventh session").

``taskset -c 1 .venv/bin/python benchmarks/arm_bins_layouts.py`` times, on one thread, the fused
pass's table steps over 786,432 confidences (one scale of (4, C, 256, 256)) in blocks of 1,024
pixels, for three spreads of the confidence: v = u^3 for u uniform in [-1, 1] (the benchmarks'
random logits), and 70% of the pixels at v = 1 (a confident network: those pixels share the last
node), and a smooth field (v = 0.3 sin(i / 5000): neighbouring pixels in the same or the next
interval, as along an image). Each block finds its pixels' places and weights with the kernels'
own `block_table_weights`, then adds the pixels' loss and weight to the bins:
- linear by interval, the kernels' own `block_table_bins`: the four sums of the pixel's interval
  in one aligned 32-byte row, one 256-bit add; the four values of every pixel first written as
  float32 by a vectorised loop, then widened and added (thirteenth session);
- the same rows added by a scalar loop that converts each pixel's values to float64 itself (the
  kernels' own until the thirteenth session);
- linear by node (before the eleventh session): (1 - f) loss and weight at node k and f at
  node k + 1, adjacent, one 256-bit add at 16-byte steps, so pixels in neighbouring intervals
  overlap in part;
- cubic in moment form: one of `segments` segments per pixel (each spans 8192 / segments of the
  table's intervals, so its place follows from the same node and fraction), f^0..f^3 x (loss,
  weight), its 8 sums in one 64-byte row; the four Lagrange nodes' sums would follow after the
  pass (K x 8 work, not timed).
Also the position step alone, so the bins' own cost is the difference. Medians of 15 interleaved
calls. The loop keeps any of these tables in cache; inside the fused pass the 8192-node table
also competes with the gradient buffers (docs/benchmarks.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numba
import numpy as np
import torch

from noisyseg.kernels.contract import ARM_TABLE_SIZE
from noisyseg.kernels.numba_arm import block_table_bins, block_table_weights
from noisyseg.kernels.numba_common import add_float64x4

PIXELS, BLOCK = 786_432, 1024


@numba.njit(fastmath=False, error_model="numpy")
def block_cubic_moment_bins(bins, node, fraction, loss, weight, valid, width, span):
    """The valid pixels' loss and weight times f^0..f^3 into their segment's row of (segments, 8)."""
    for j in range(width):
        if valid[j]:
            segment = node[j] // span
            f = ((node[j] - segment * span) + np.float64(fraction[j])) / span
            f2 = f * f
            f3 = f2 * f
            loss_j, weight_j = np.float64(loss[j]), np.float64(weight[j])
            bins[segment, 0] += loss_j
            bins[segment, 1] += f * loss_j
            bins[segment, 2] += f2 * loss_j
            bins[segment, 3] += f3 * loss_j
            bins[segment, 4] += weight_j
            bins[segment, 5] += f * weight_j
            bins[segment, 6] += f2 * weight_j
            bins[segment, 7] += f3 * weight_j


@numba.njit(fastmath=False, error_model="numpy")
def block_scalar_bins(bins, node, fraction, loss, weight, valid, width, by_node):
    """A scalar loop converting each pixel's values to float64 itself and adding them as one row:
    by interval (bins (K, 4): loss, weight, f loss, f weight at 4k; the kernels' own until the
    thirteenth session), or by node (bins (K, 2): (1 - f) loss and weight at node k, f loss and
    weight at node k + 1, one 256-bit add at 2k; before the eleventh session)."""
    flat = bins.reshape(-1)
    for j in range(width):
        if valid[j]:
            f = np.float64(fraction[j])
            loss_j = np.float64(loss[j])
            weight_j = np.float64(weight[j])
            low = (1.0 - f) if by_node else 1.0
            add_float64x4(flat, (2 if by_node else 4) * node[j], low * loss_j, low * weight_j, f * loss_j, f * weight_j)


@numba.njit(fastmath=False, error_model="numpy")
def table_pass(conf, table, loss, valid, linear_bins, moment_bins, mode, span):
    """mode 0: places and weights only; 1: and the interval bins; 2: and the cubic moment bins;
    3: and the node bins; 4: and the interval bins added by the scalar loop."""
    weight = np.empty(BLOCK, np.float32)
    rows = np.empty(4 * BLOCK, np.float32)
    node = np.empty(BLOCK, np.int32)
    fraction = np.empty(BLOCK, np.float32)
    for start in range(0, conf.shape[0], BLOCK):
        block_table_weights(table, conf[start : start + BLOCK], BLOCK, weight, node, fraction)
        if mode == 1:
            block_table_bins(linear_bins, node, fraction, loss[start : start + BLOCK], weight, valid, BLOCK, rows)
        elif mode == 2:
            block_cubic_moment_bins(
                moment_bins, node, fraction, loss[start : start + BLOCK], weight, valid, BLOCK, span
            )
        elif mode in (3, 4):
            block_scalar_bins(linear_bins, node, fraction, loss[start : start + BLOCK], weight, valid, BLOCK, mode == 3)


def main(rounds: int = 15) -> None:
    numba.set_num_threads(1)
    rng = np.random.default_rng(0)
    spread = ((rng.random(PIXELS) * 2 - 1) ** 3).astype(np.float32)
    confident = np.where(rng.random(PIXELS) < 0.7, np.float32(1.0), spread).astype(np.float32)
    smooth = (0.3 * np.sin(np.arange(PIXELS) / 5000.0)).astype(np.float32)
    loss, table = rng.random(PIXELS).astype(np.float32), rng.random(ARM_TABLE_SIZE).astype(np.float32)
    valid = np.ones(BLOCK, np.bool_)
    no_bins = np.zeros((1, 4)), np.zeros((1, 8))
    # 64-byte aligned, as the kernels' own (`_FusedCall._bins`)
    interval_bins = torch.zeros((ARM_TABLE_SIZE, 4), dtype=torch.float64).numpy()
    node_bins = torch.zeros((ARM_TABLE_SIZE, 2), dtype=torch.float64).numpy()
    cases: dict[str, Callable[[], None]] = {}
    for spread_name, conf in (("v = u^3", spread), ("70% at v = 1", confident), ("smooth", smooth)):
        cases[f"{spread_name}: places and weights only"] = lambda conf=conf: table_pass(
            conf, table, loss, valid, *no_bins, 0, 1
        )
        cases[f"{spread_name}: + interval bins, 8192 nodes (now)"] = lambda conf=conf: table_pass(
            conf, table, loss, valid, interval_bins, no_bins[1], 1, 1
        )
        cases[f"{spread_name}: + interval bins, scalar loop (before)"] = lambda conf=conf: table_pass(
            conf, table, loss, valid, interval_bins, no_bins[1], 4, 1
        )
        cases[f"{spread_name}: + node bins, 8192 nodes (before that)"] = lambda conf=conf: table_pass(
            conf, table, loss, valid, node_bins, no_bins[1], 3, 1
        )
        for segments in (1024, 512):
            span = ARM_TABLE_SIZE // segments
            cases[f"{spread_name}: + cubic moment bins, {segments} segments"] = (
                lambda conf=conf, span=span, segments=segments: table_pass(
                    conf, table, loss, valid, no_bins[0], np.zeros((segments, 8)), 2, span
                )
            )
    for run in cases.values():
        run()  # compiles
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, run in cases.items():
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    for name, measured in times.items():
        print(f"{name}: median {1e3 * np.median(measured):.2f} ms, min {1e3 * min(measured):.2f} ms")


if __name__ == "__main__":
    main()
