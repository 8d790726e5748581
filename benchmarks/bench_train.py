"""Training-step throughput: the trainer's own step (`Trainer.train_step`) in images per second.

Run: ``.venv/bin/python -m pytest benchmarks/bench_train.py --benchmark-only``
(``NOISYSEG_BENCH_ROUNDS`` rounds per case, default 5; ``--benchmark-json=FILE`` keeps them).

One ADELE step as `noisyseg train` runs it by default: UNet base width 16, depth 4, batch 5 of
256 x 256 phantom slices, input scales 1.0/0.7/1.5, the multiscale consistency term, one torch
thread. The cases vary what `--precision`, `model.compile` and `loss.backend` choose: fp32 or
bf16 autocast, eager or `torch.compile`, the fused loss (`auto`: numba on the CPU, Triton on
CUDA) or the reference (`torch`). The first case is today's default (fp32, eager, fused); every
later case stores its speed-up over each earlier one in `extra_info`, and the table of all of
them is written to ``NOISYSEG_BENCH_SUMMARY`` (default ``.benchmarks/train_summary.md``), so the
ratios compare figures measured side by side in one run. On a machine with CUDA the same cases
run on the GPU as well.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest
import torch
from side_by_side import record_side_by_side

from noisyseg.config import build_config
from noisyseg.data.phantom import PhantomConfig, generate_phantom
from noisyseg.data.run_data import load_run_data
from noisyseg.training.counters import EpochCounters
from noisyseg.training.loop import Trainer
from noisyseg.training.trainer import make_trainer

LOGGER = logging.getLogger(__name__)
ROUNDS = int(os.environ.get("NOISYSEG_BENCH_ROUNDS", "5"))
BATCH = 5
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
# (precision, compile, loss backend); the default configuration first: the baseline of the ratios.
CONFIGURATIONS = [
    ("fp32", False, "auto"),
    ("fp32", False, "torch"),
    ("bf16", False, "auto"),
    ("bf16", False, "torch"),
    ("fp32", True, "auto"),
    ("bf16", True, "auto"),
]
CASES = [
    pytest.param(
        device,
        *configuration,
        id=f"{device}-{configuration[0]}-{'compile' if configuration[1] else 'eager'}-"
        f"{'fused' if configuration[2] == 'auto' else 'reference'}",
    )
    for device in DEVICES
    for configuration in CONFIGURATIONS
]
_MEDIANS: dict[str, dict[str, float]] = {}


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """256 px phantom slices, enough for one batch of the train split."""
    root = tmp_path_factory.mktemp("bench-train") / "phantom"
    generate_phantom(root, num_patients=5, config=PhantomConfig(size=256, slices_per_patient=4))
    return root


@pytest.fixture(scope="module", autouse=True)
def summary():
    """Write the side-by-side table once every case ran."""
    yield
    if not _MEDIANS:
        return
    lines = ["| device | configuration | median ms/step | images/s | vs default |", "| --- | --- | --- | --- | --- |"]
    for device, medians in _MEDIANS.items():
        default = next(iter(medians.values()))
        for name, seconds in medians.items():
            lines.append(
                f"| {device} | {name} | {seconds * 1e3:.0f} | {BATCH / seconds:.1f} | {default / seconds:.2f}x |"
            )
    path = Path(os.environ.get("NOISYSEG_BENCH_SUMMARY", ".benchmarks/train_summary.md"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    LOGGER.warning("training-step benchmark summary written to %s", path)


def phantom_trainer(phantom: Path, out: Path, device: str, precision: str, compiled: bool, backend: str) -> Trainer:
    config = build_config(
        None,
        [
            f"data={phantom}",
            f"out={out}",
            "method=adele",
            f"batch_size={BATCH}",
            f"device={device}",
            f"precision={precision}",
            f"model.compile={str(compiled).lower()}",
            f"loss.backend={backend}",
        ],
    )
    return make_trainer(config, load_run_data(config))


@pytest.mark.parametrize(("device", "precision", "compiled", "backend"), CASES)
def test_training_step_images_per_second(
    benchmark, phantom: Path, tmp_path: Path, device: str, precision: str, compiled: bool, backend: str
) -> None:
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the trainer's default `threads`
    try:
        trainer = phantom_trainer(phantom, tmp_path / "run", device, precision, compiled, backend)
        counters = EpochCounters.zeros(trainer.data.num_classes, trainer.ignore_index, trainer.device, noise=False)
        rows = torch.arange(BATCH)

        def step() -> None:
            trainer.train_step(trainer.batches.next(rows), counters, None)
            if trainer.device.type == "cuda":
                torch.cuda.synchronize(trainer.device)

        started = time.perf_counter()
        step()  # compiles: numba's cache, torch.compile's graphs (one per input scale)
        step()
        benchmark.extra_info["first_two_steps_s"] = round(time.perf_counter() - started, 2)
        benchmark.group = f"training step on {device} (UNet 16, {BATCH}x1x256x256, S=3)"
        benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=1)
        assert torch.isfinite(counters.loss_sums["total"]), "the benchmarked steps must train"
    finally:
        torch.set_num_threads(previous_threads)
    name = f"{precision} {'compile' if compiled else 'eager'} {'fused' if backend == 'auto' else 'reference'} loss"
    median = record_side_by_side(_MEDIANS, benchmark, device, name)
    if median is not None:
        benchmark.extra_info["images_per_second"] = round(BATCH / median, 2)
