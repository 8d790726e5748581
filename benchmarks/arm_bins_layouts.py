"""ARM's gradient bins alone, in two layouts: what a piecewise-cubic ARM table would cost to
accumulate before anyone builds it (docs/benchmarks.md, "ARM's gradient bins").

``taskset -c 1 .venv/bin/python benchmarks/arm_bins_layouts.py`` times, on one thread, a loop
over 786,432 confidences (one scale of (4, C, 256, 256); v = u^3 for u uniform in [-1, 1], so
most pixels sit near the middle and a few near the ends) that finds each pixel's place in the
table and adds its two coefficients (the loss l and the weight w, as the fused pass does):
- linear, as the kernels do now: two nodes per pixel, (1 - f, f) x (l, w), K nodes;
- cubic in moment form: one segment per pixel, f^0..f^3 x (l, w), its 8 sums in one 64-byte
  row, from which the four Lagrange nodes' sums follow after the loop (not timed: K x 8 work).
Medians over 15 interleaved calls. The loop alone keeps its bins in cache; inside the fused pass
the linear table's 8192 nodes also compete with the gradient buffers (docs/benchmarks.md).
"""

from __future__ import annotations

import time

import numba
import numpy as np

PIXELS = 786_432


@numba.njit(fastmath=False, error_model="numpy")
def linear_bins(conf: np.ndarray, loss: np.ndarray, weight: np.ndarray, bins: np.ndarray) -> None:
    nodes = bins.shape[0]
    scale = (nodes - 1) / 2.0
    for i in range(conf.shape[0]):
        t = min(max((conf[i] + 1.0) * scale, 0.0), nodes - 1.0)
        k = min(int(t), nodes - 2)
        f = t - k
        li, wi = np.float64(loss[i]), np.float64(weight[i])
        bins[k, 0] += (1 - f) * li
        bins[k, 1] += (1 - f) * wi
        bins[k + 1, 0] += f * li
        bins[k + 1, 1] += f * wi


@numba.njit(fastmath=False, error_model="numpy")
def cubic_moment_bins(conf: np.ndarray, loss: np.ndarray, weight: np.ndarray, bins: np.ndarray) -> None:
    segments = bins.shape[0]
    scale = segments / 2.0
    for i in range(conf.shape[0]):
        t = min(max((conf[i] + 1.0) * scale, 0.0), segments - 1e-6)
        k = int(t)
        f = np.float64(t - k)
        f2 = f * f
        f3 = f2 * f
        li, wi = np.float64(loss[i]), np.float64(weight[i])
        bins[k, 0] += li
        bins[k, 1] += f * li
        bins[k, 2] += f2 * li
        bins[k, 3] += f3 * li
        bins[k, 4] += wi
        bins[k, 5] += f * wi
        bins[k, 6] += f2 * wi
        bins[k, 7] += f3 * wi


def main(rounds: int = 15) -> None:
    numba.set_num_threads(1)
    rng = np.random.default_rng(0)
    conf = ((rng.random(PIXELS) * 2 - 1) ** 3).astype(np.float32)
    loss, weight = rng.random(PIXELS).astype(np.float32), rng.random(PIXELS).astype(np.float32)
    cases = {
        "linear, K = 8192 nodes (now)": (linear_bins, np.zeros((8192, 2))),
        "linear, K = 1024 nodes": (linear_bins, np.zeros((1024, 2))),
        "cubic moments, 1024 segments": (cubic_moment_bins, np.zeros((1024, 8))),
        "cubic moments, 512 segments": (cubic_moment_bins, np.zeros((512, 8))),
    }
    for accumulate, bins in cases.values():
        accumulate(conf, loss, weight, bins)  # compiles
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, (accumulate, bins) in cases.items():
            started = time.perf_counter()
            accumulate(conf, loss, weight, bins)
            times[name].append(time.perf_counter() - started)
    for name, measured in times.items():
        print(f"{name}: median {1e3 * np.median(measured):.2f} ms, min {1e3 * min(measured):.2f} ms")


if __name__ == "__main__":
    main()
