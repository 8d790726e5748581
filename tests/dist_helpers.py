"""Shared by the distributed and fault tests: a tiny phantom, training arguments, subprocesses."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from noisyseg.data.noise import corrupt_dataset
from noisyseg.data.phantom import PhantomConfig, generate_phantom
from noisyseg.runtime.distributed import FAULT_ENV, FAULT_RANK_ENV

# adele+arm on 12 phantom slices of 32 px, batches of 4: 3 steps per epoch; r = 0 and no
# minimum rise trigger at epoch 3 (the first fit), iteration timing corrects labels in epoch 4.
# The guard is off: at tau 0.3 these settings erase most of a class, which it would undo.
TRAIN_OPTIONS = [
    "--method",
    "adele+arm",
    "--epochs",
    "4",
    "--batch-size",
    "4",
    "--quiet",
    *(
        f"--set={o}"
        for o in (
            "model.kwargs.base_width=4",
            "model.kwargs.depth=2",
            "optim.momentum=0.9",
            "adele.r=0.0",
            "adele.min_rise=0.0",
            "adele.tau=0.3",
            "adele.guard=false",
            "arm.warmup_fraction=0.1",
        )
    ),
]


def make_phantom(root: Path) -> tuple[Path, Path]:
    """(data folder, noisy-label folder): 6 phantom patients at 32 px, erode-dilate noise."""
    generate_phantom(root / "data", num_patients=6, seed=0, config=PhantomConfig(size=32, slices_per_patient=4))
    corrupt_dataset(root / "data", root / "noisy", "erode-dilate", seed=0)
    return root / "data", root / "noisy"


def train_args(phantom: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    """`noisyseg train` arguments for the tiny run into `out`."""
    data, labels = phantom
    return ["train", "--data", str(data), "--labels", str(labels), "--out", str(out), *TRAIN_OPTIONS, *extra]


def command(args: list[str], log_level: str = "WARNING") -> list[str]:
    """`python -m noisyseg ARGS` with this interpreter."""
    return [sys.executable, "-m", "noisyseg", "--log-level", log_level, *args]


def child_env(**extra: str) -> dict[str, str]:
    """This environment without fault or rank variables, one OpenMP thread, plus `extra`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in (FAULT_ENV, FAULT_RANK_ENV, "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
