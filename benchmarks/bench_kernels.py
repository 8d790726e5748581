"""Fused loss kernels against the reference: forward+backward time and peak memory.

Run: ``.venv/bin/python -m pytest benchmarks/bench_kernels.py --benchmark-only``
(``--benchmark-json=FILE`` keeps the figures); as a script
(``.venv/bin/python benchmarks/bench_kernels.py --shape cityscapes --calls 20``) it prints the time
of each of consecutive calls of one case. Shapes (N, C, H, W): Cityscapes-like
(4, 19, 256, 256), ADE20K-like (2, 150, 128, 128), SegTHOR-like (5, 5, 256, 256); single scale
(ARM-weighted cross-entropy) and S = 3 (the ADELE+ARM loss), for the eager reference,
`torch.compile` of it, the numba fused kernels (CPU), the Triton fused kernels (CUDA only) and,
single scale, PyTorch's plain `F.cross_entropy`. Every case of a shape runs in the same session,
and each implementation's speed-up over the ones measured before it is stored in
`benchmark.extra_info` (and summarised in the file named by ``NOISYSEG_BENCH_SUMMARY``, default
``.benchmarks/kernels_summary.md``), so ratios compare figures measured side by side.

Allocator state: times are taken with glibc's large-buffer thresholds fixed where its own dynamic
adjustment settles in a training loop after the first large free (buffers up to 32 MiB come back
from the heap, not as fresh zero-filled pages), the same for every implementation.

On a machine with CUDA every implementation but numba runs on the GPU (the timed call ends with
`torch.cuda.synchronize()`), and each CUDA case also stores its roofline in `extra_info`: the
fewest bytes a forward + backward must move (read the logits and the target once, write the
logits' gradient) over the median time, as a fraction of the device-to-device copy bandwidth
(read + write bytes of a 1 GiB `copy_`, best of 20) measured once in the same session.

ARM at the cost of plain cross-entropy (`test_cost_against_plain_cross_entropy`): ARM-weighted
CE against ``F.cross_entropy`` and the three-scale ADELE+ARM loss against three of them, at
(4, C, 256, 256) for C = 5 and 19, the two alternating within each round, threads pinned (see
the section below); ``-k cost`` runs these alone, and NOISYSEG_BENCH_COST_LOGIT_SCALE=10 runs them
on confident logits.

Peak memory: torch's CPU allocator keeps no statistics and tracemalloc does not see it, so the
extra peak is measured as the process's resident high-water mark (VmHWM, reset through
/proc/self/clear_refs) minus the resident size before the call, with glibc's mmap threshold
pinned at 64 KiB for that call so every large buffer is mapped and unmapped (a freed tensor
leaves RSS at once). It counts everything the call allocates, the returned gradients included,
and is given as a multiple of the bytes of the logits (all scales).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from side_by_side import record_side_by_side

from noisyseg.kernels import functional, reference
from noisyseg.kernels.reference import ARM

LOGGER = logging.getLogger(__name__)

SHAPES = {
    "cityscapes": (4, 19, 256, 256),
    "ade20k": (2, 150, 128, 128),
    "segthor": (5, 5, 256, 256),
}
# Baselines first: every later implementation reports its speed-up over each earlier one.
SINGLE_SCALE = ("cross_entropy", "eager", "compile", "numba", "triton")
MULTI_SCALE = ("eager", "compile", "numba", "triton")
CASES = [
    pytest.param(shape, scales, impl, id=f"{shape}-S{scales}-{impl}")
    for shape in SHAPES
    for scales, impls in ((1, SINGLE_SCALE), (3, MULTI_SCALE))
    for impl in impls
]
ROUNDS = int(os.environ.get("NOISYSEG_BENCH_ROUNDS", "3"))
_MEDIANS: dict[tuple[str, int], dict[str, float]] = {}
_MEMORY: dict[tuple[str, int], dict[str, float]] = {}


# ------------------------------------------------------------------------------------------
# Peak memory.

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
# Where glibc's dynamic thresholds end up once a 32 MiB buffer was freed (its maximum), and its
# static defaults, used while measuring memory.
_STEADY_THRESHOLDS = (32 << 20, 64 << 20)
_MEASURING_THRESHOLDS = (64 << 10, 128 << 10)


def _set_malloc_thresholds(mmap_bytes: int, trim_bytes: int) -> bool:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_bytes) and libc.mallopt(_M_TRIM_THRESHOLD, trim_bytes))


_MEMORY_MEASURABLE = _set_malloc_thresholds(*_STEADY_THRESHOLDS) and Path("/proc/self/clear_refs").exists()


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status: no field {field}")


def extra_peak_bytes(fn: Callable[[], object]) -> int | None:
    """Resident high-water mark of one call of `fn` above the resident size before it."""
    if not _MEMORY_MEASURABLE:
        return None
    _set_malloc_thresholds(*_MEASURING_THRESHOLDS)
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand back what the timed rounds left cached
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
        before = _status_kib("VmRSS")
        result = fn()
        peak = _status_kib("VmHWM")
        del result
    finally:
        _set_malloc_thresholds(*_STEADY_THRESHOLDS)
    return (peak - before) * 1024


# ------------------------------------------------------------------------------------------
# GPU roofline.

CUDA = torch.cuda.is_available()
_COPY_BANDWIDTH: list[float] = []


def copy_bandwidth_bytes_per_s() -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), measured once: the
    best of 20 copies of a 1 GiB buffer, far larger than the L2 cache."""
    if not _COPY_BANDWIDTH:
        source = torch.empty(1 << 28, dtype=torch.float32, device="cuda")
        destination = torch.empty_like(source)
        times = []
        for _ in range(23):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            destination.copy_(source)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        _COPY_BANDWIDTH.append(2 * source.numel() * source.element_size() / min(times[3:]))
        del source, destination
        torch.cuda.empty_cache()
    return _COPY_BANDWIDTH[0]


def record_roofline(benchmark, logits: list[torch.Tensor], target: torch.Tensor, median: float) -> None:
    """Achieved bytes/s of the fewest bytes a forward + backward moves, and its fraction of the
    copy bandwidth."""
    logits_bytes = sum(z.numel() * z.element_size() for z in logits)
    min_bytes = 2 * logits_bytes + target.numel() * target.element_size()
    bandwidth = copy_bandwidth_bytes_per_s()
    benchmark.extra_info["min_bytes"] = min_bytes
    benchmark.extra_info["achieved_gb_s"] = round(min_bytes / median / 1e9, 1)
    benchmark.extra_info["copy_bandwidth_gb_s"] = round(bandwidth / 1e9, 1)
    benchmark.extra_info["roofline_fraction"] = round(min_bytes / median / bandwidth, 4)


# ------------------------------------------------------------------------------------------
# The implementations under test.


def seeded_arm() -> ARM:
    torch.manual_seed(0)
    return ARM()


def make_inputs(shape: tuple[int, int, int, int], num_scales: int, device: str = "cpu"):
    n, c, h, w = shape
    gen = torch.Generator().manual_seed(0)
    logits = [torch.randn(shape, generator=gen) * 2 for _ in range(num_scales)]
    target = torch.randint(0, c, (n, h, w), generator=gen)
    target[torch.rand(n, h, w, generator=gen) < 0.05] = 255
    return [z.to(device) for z in logits], target.to(device)


def loss_function(impl: str, num_scales: int) -> Callable:
    """loss(logits_list, target, arm) for one implementation (raises pytest.skip if absent)."""
    if impl == "cross_entropy":
        return lambda logits, target, arm: F.cross_entropy(logits[0], target, ignore_index=255)
    if impl == "triton":
        if not CUDA:
            pytest.skip("triton fused kernels are benchmarked on CUDA only (no GPU here)")
        module = functional.losses_on("triton")
    elif impl == "numba":
        module = functional.losses_on("numba")
    else:
        module = reference
    if num_scales == 1:
        single = module.arm_cross_entropy
        if impl == "compile":
            single = torch.compile(single)
        return lambda logits, target, arm: single(logits[0], target, arm)
    combined = torch.compile(module.adele_arm_loss) if impl == "compile" else module.adele_arm_loss
    return lambda logits, target, arm: combined(logits, target, arm)


def forward_backward(loss: Callable, logits: list[torch.Tensor], target: torch.Tensor, arm: ARM) -> list:
    leaves = [z.detach().requires_grad_(True) for z in logits]
    loss(leaves, target, arm).backward()
    if leaves[0].is_cuda:
        torch.cuda.synchronize()
    return [z.grad for z in leaves]


@pytest.fixture(scope="module", autouse=True)
def summary():
    """Write the side-by-side table once every case of the module ran."""
    yield
    if not _MEDIANS:
        return
    lines = [
        "| shape | S | impl | median ms | extra peak / logits |",
        "| --- | --- | --- | --- | --- |",
    ]
    for (shape, scales), medians in _MEDIANS.items():
        for impl, seconds in medians.items():
            memory = _MEMORY.get((shape, scales), {}).get(impl)
            memory_text = "" if memory is None else f"{memory:.2f}x"
            label = f"{shape} {SHAPES[shape]}"
            lines.append(f"| {label} | {scales} | {impl} | {seconds * 1e3:.1f} | {memory_text} |")
    path = Path(os.environ.get("NOISYSEG_BENCH_SUMMARY", ".benchmarks/kernels_summary.md"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    LOGGER.warning("kernel benchmark summary written to %s", path)


@pytest.mark.parametrize("shape_name, num_scales, impl", CASES)
def test_loss_forward_backward(benchmark, shape_name, num_scales, impl):
    device = "cpu" if impl == "numba" or not CUDA else "cuda"
    loss = loss_function(impl, num_scales)
    logits, target = make_inputs(SHAPES[shape_name], num_scales, device)
    arm = seeded_arm().to(device)
    benchmark.group = f"{shape_name} S={num_scales}"
    started = time.perf_counter()
    try:
        forward_backward(loss, logits, target, arm)  # compiles (numba cache, torch.compile)
    except Exception as err:  # torch.compile can fail on a CPU toolchain: record, do not hide
        if impl != "compile":
            raise
        pytest.skip(f"torch.compile of the reference failed: {type(err).__name__}: {err}")
    benchmark.extra_info["first_call_s"] = round(time.perf_counter() - started, 2)
    benchmark.pedantic(forward_backward, args=(loss, logits, target, arm), rounds=ROUNDS, warmup_rounds=1)
    median = record_side_by_side(_MEDIANS, benchmark, (shape_name, num_scales), impl)
    if median is not None and device == "cuda":
        record_roofline(benchmark, logits, target, median)

    logits_bytes = sum(z.numel() * z.element_size() for z in logits)
    extra = extra_peak_bytes(lambda: forward_backward(loss, logits, target, arm)) if device == "cpu" else None
    if extra is not None:
        benchmark.extra_info["extra_peak_over_logits"] = round(extra / logits_bytes, 3)
        _MEMORY.setdefault((shape_name, num_scales), {})[impl] = extra / logits_bytes
    elif device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        forward_backward(loss, logits, target, arm)
        benchmark.extra_info["extra_peak_over_logits"] = round(
            (torch.cuda.max_memory_allocated() - base) / logits_bytes, 3
        )


# ------------------------------------------------------------------------------------------
# ARM at the cost of plain cross-entropy: ARM-weighted CE against F.cross_entropy, and the
# three-scale ADELE+ARM loss against three F.cross_entropy, forward + backward at (4, C, 256, 256).
# The fused call and its baseline alternate within every round (A B B A), so a change of machine
# load between rounds reaches both; each round's two times go to extra_info, and the ratio of
# their medians is the figure. Threads are pinned: torch's intra-op pool (which the numba kernels
# follow, `numba_common.threads_like_torch`) set to NOISYSEG_BENCH_THREADS (default 1) for both,
# and the process bound to that many CPUs (os.sched_setaffinity, inherited by the OpenMP workers
# started after it), so both sides run on the same threads whatever else the machine runs.

COST_CLASSES = (5, 19)
COST_SHAPE = (4, 256, 256)  # N, H, W
COST_SCALES = {"arm_ce": 1, "adele_arm": 3}
COST_TARGETS = {("arm_ce", 5): 1.10, ("arm_ce", 19): 1.0, ("adele_arm", 5): 1.15, ("adele_arm", 19): 1.15}
COST_THREADS = int(os.environ.get("NOISYSEG_BENCH_THREADS", "1"))
COST_ROUNDS = int(os.environ.get("NOISYSEG_BENCH_COST_ROUNDS", "11"))
# A trained network's logits: times 10 the benchmark's, half the pixels' confidence at ARM's last
# node, where exponentials underflow towards float32's subnormal range (docs/benchmarks.md).
COST_LOGIT_SCALE = float(os.environ.get("NOISYSEG_BENCH_COST_LOGIT_SCALE", "1"))


@contextlib.contextmanager
def pinned_threads(threads: int):
    """torch (and so the numba kernels) on `threads` threads, the process on as many CPUs."""
    previous_threads = torch.get_num_threads()
    previous_cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    torch.set_num_threads(threads)
    if previous_cpus is not None:
        os.sched_setaffinity(0, sorted(previous_cpus)[:threads])
    try:
        yield
    finally:
        torch.set_num_threads(previous_threads)
        if previous_cpus is not None:
            os.sched_setaffinity(0, previous_cpus)


_PAGES_PER_MIB = 256


def minor_page_faults() -> int:
    """Minor page faults of this process so far (fresh pages first touched)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def cost_pair(loss: str, impl: str) -> tuple[Callable, Callable]:
    """(fused loss, its plain cross-entropy baseline), each loss(logits_list, target, arm)."""
    if impl == "triton" and not CUDA:
        pytest.skip("triton fused kernels are benchmarked on CUDA only (no GPU here)")
    fused = functional.losses_on(impl)
    if loss == "arm_ce":
        return (
            lambda logits, target, arm: fused.arm_cross_entropy(logits[0], target, arm),
            lambda logits, target, arm: F.cross_entropy(logits[0], target, ignore_index=255),
        )
    return (
        lambda logits, target, arm: fused.adele_arm_loss(logits, target, arm),
        lambda logits, target, arm: sum(F.cross_entropy(z, target, ignore_index=255) for z in logits),
    )


@pytest.mark.parametrize("impl", ["numba", "triton"])
@pytest.mark.parametrize("num_classes", COST_CLASSES, ids=[f"C{c}" for c in COST_CLASSES])
@pytest.mark.parametrize("loss", list(COST_SCALES))
def test_cost_against_plain_cross_entropy(benchmark, loss, num_classes, impl):
    fused, plain = cost_pair(loss, impl)
    device = "cuda" if impl == "triton" else "cpu"
    n, h, w = COST_SHAPE
    logits, target = make_inputs((n, num_classes, h, w), COST_SCALES[loss], device)
    logits = [z * COST_LOGIT_SCALE for z in logits]
    arm = seeded_arm().to(device)
    times: dict[str, list[float]] = {"fused": [], "plain": []}
    faults: dict[str, list[int]] = {"fused": [], "plain": []}

    def timed(name: str, fn: Callable) -> None:
        faults_before = minor_page_faults()
        started = time.perf_counter()
        forward_backward(fn, logits, target, arm)
        times[name].append(time.perf_counter() - started)
        faults[name].append(minor_page_faults() - faults_before)

    def interleaved_round() -> None:
        for name, fn in (("fused", fused), ("plain", plain), ("plain", plain), ("fused", fused)):
            timed(name, fn)

    benchmark.group = f"cost {loss} C={num_classes}"
    load_before = os.getloadavg()[0]
    with pinned_threads(COST_THREADS):
        interleaved_round()  # warm-up (numba's cache, allocator state), not counted
        for record in (times, faults):
            record["fused"].clear()
            record["plain"].clear()
        benchmark.pedantic(interleaved_round, rounds=COST_ROUNDS)
    if benchmark.stats is None:  # --benchmark-disable: ran once as a smoke test
        return
    medians = {name: statistics.median(values) for name, values in times.items()}
    ratio = medians["fused"] / medians["plain"]
    benchmark.extra_info.update(
        threads=COST_THREADS,
        logit_scale=COST_LOGIT_SCALE,
        load_average=[round(load_before, 2), round(os.getloadavg()[0], 2)],
        fused_ms=round(medians["fused"] * 1e3, 3),
        plain_ms=round(medians["plain"] * 1e3, 3),
        ratio=round(ratio, 3),
        # Fresh pages a call touched (4 KiB each, about 1.5 us apiece here): glibc hands large
        # freed buffers back to the kernel at its own moments, and a call that faults its buffers
        # in again is slower by that much (docs/benchmarks.md, "Twelfth session").
        fused_page_faults=faults["fused"],
        plain_page_faults=faults["plain"],
        target=COST_TARGETS[(loss, num_classes)],
        target_met=ratio <= COST_TARGETS[(loss, num_classes)],
    )
    LOGGER.warning(
        "%s C=%d %s: fused %.2f ms, plain %.2f ms, ratio %.3f (target %.2f), threads %d, logits x%g, "
        "load %.1f -> %.1f, calls faulting 1 MiB or more in: fused %d, plain %d of %d",
        loss, num_classes, impl, medians["fused"] * 1e3, medians["plain"] * 1e3, ratio,
        COST_TARGETS[(loss, num_classes)], COST_THREADS, COST_LOGIT_SCALE, load_before, os.getloadavg()[0],
        *(sum(f >= _PAGES_PER_MIB for f in faults[name]) for name in ("fused", "plain")), len(faults["fused"]),
    )  # fmt: skip


def time_calls(shape_name: str, num_scales: int, impl: str, calls: int) -> list[float]:
    """Milliseconds of each of `calls` consecutive forward+backward calls (after one warm-up):
    the round-to-round spread the medians above hide. Run as a script, so that numba's
    threading layer (NUMBA_THREADING_LAYER, NUMBA_NUM_THREADS) can differ between processes."""
    loss = loss_function(impl, num_scales)
    logits, target = make_inputs(SHAPES[shape_name], num_scales)
    arm = seeded_arm()
    forward_backward(loss, logits, target, arm)
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        forward_backward(loss, logits, target, arm)
        times.append(1e3 * (time.perf_counter() - started))
    return times


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="time consecutive calls of one case")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="cityscapes")
    parser.add_argument("--scales", type=int, default=1)
    parser.add_argument("--impl", default="numba", choices=["numba", "eager", "cross_entropy"])
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()
    times = time_calls(args.shape, args.scales, args.impl, args.calls)
    print(f"{args.impl} {args.shape} S={args.scales}: ms per call " + " ".join(f"{t:.1f}" for t in times))
