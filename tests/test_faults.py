"""Fault tolerance: SIGKILL at exact and random moments, a rank that dies, a full or unwritable disk.

Every training process here is a real `python -m noisyseg train` subprocess (except where a
fault is injected in-process), killed by the `NOISYSEG_FAULT_POINT` hook or by the test itself.
The reference is an uninterrupted single-process run with the same configuration; under
deterministic CPU settings the resumed run must end bit-for-bit equal to it.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from dist_helpers import child_env, command, free_port, make_phantom, train_args
from safetensors.torch import load_file

from noisyseg.cli import build_parser, main
from noisyseg.commands.train import train_config_from_args
from noisyseg.run.checkpoint import find_checkpoint
from noisyseg.runtime.distributed import FAULT_ENV, FAULT_RANK_ENV
from noisyseg.training.trainer import train

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_phantom(tmp_path_factory.mktemp("phantom"))


@pytest.fixture(scope="module")
def reference(phantom: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run (in-process, the same configuration the subprocesses parse)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    train(train_config_from_args(build_parser().parse_args(train_args(phantom, out))))
    return out


def assert_nothing_corrupt(run_dir: Path) -> None:
    """Every JSON parses, every JSONL line parses, every safetensors and npy file loads."""
    for path in run_dir.rglob("*"):
        if path.name.startswith(".") and path.name.endswith(".tmp"):
            continue  # an atomic write's own temporary file, never read
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".jsonl":
            [json.loads(line) for line in path.read_text().splitlines()]
        elif path.suffix == ".safetensors":
            load_file(str(path))
        elif path.suffix == ".npy":
            np.load(path, allow_pickle=False)


def checkpoint_epoch(run_dir: Path) -> int:
    found = find_checkpoint(run_dir)
    return 0 if found is None else int(json.loads((found / "state.json").read_text())["epoch"])


def kill_at_random_time(args: list[str], rng: random.Random) -> None:
    """Start training, wait for its first training log line, SIGKILL it a random moment later
    (at most 0.5 s: well before the two or more epochs left in every trial that uses this)."""
    process = subprocess.Popen(
        command(args, log_level="INFO"), env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    assert process.stderr is not None
    seen = []
    for line in process.stderr:
        seen.append(line)
        if "noisyseg.training.loop: training " in line:
            break
    time.sleep(rng.uniform(0.0, 0.5))
    process.send_signal(signal.SIGKILL)
    rest = process.communicate(timeout=120)[1]
    assert process.returncode == -signal.SIGKILL, "".join(seen) + rest


def test_killed_at_exact_and_random_moments_resume_to_the_uninterrupted_result(
    phantom: tuple[Path, Path], reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    rng = random.Random(7)
    # Each entry: one process; a fault point (its N-th visit in that process) or a random-time
    # kill. Random kills come where at least two epochs remain; `label-store-update` happens in
    # epoch 4 only, `checkpoint-swap` / `label-store-write` then hit epoch 4's checkpoint.
    trials = [
        "random",
        "checkpoint-write:2",
        "random",
        "label-store-update:1",
        "checkpoint-swap:1",
        "label-store-write:1",
    ]
    epochs_seen = []
    for index, trial in enumerate(trials):
        args = train_args(phantom, out) if index == 0 else ["train", "--resume", str(out), "--quiet"]
        if trial == "random":
            kill_at_random_time(args, rng)
        else:
            result = subprocess.run(
                command(args), env=child_env(**{FAULT_ENV: trial}), capture_output=True, timeout=180
            )
            assert result.returncode == -signal.SIGKILL, f"{trial}: {result.stderr.decode()}"
        assert_nothing_corrupt(out)
        epochs_seen.append(checkpoint_epoch(out))
    assert epochs_seen == sorted(epochs_seen), "a kill never loses a complete checkpoint"
    final = subprocess.run(
        command(["train", "--resume", str(out), "--quiet"]), env=child_env(), capture_output=True, timeout=180
    )
    assert final.returncode == 0, final.stderr.decode()
    assert_nothing_corrupt(out)
    expected = load_file(str(reference / "checkpoint" / "state.safetensors"))
    got = load_file(str(out / "checkpoint" / "state.safetensors"))
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    reference_labels = np.load(reference / "checkpoint" / "labels.npy")
    assert np.array_equal(reference_labels, np.load(out / "checkpoint" / "labels.npy"))
    assert json.loads((reference / "summary.json").read_text()) == json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4] and records[-1]["labels_changed_fraction"] > 0


def test_full_disk_during_a_checkpoint_stops_cleanly_and_keeps_the_last_one(
    phantom: tuple[Path, Path],
    reference: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "run"
    monkeypatch.setenv(FAULT_ENV, "label-store-write:3:enospc")  # the epoch-3 checkpoint
    assert main(train_args(phantom, out)) == 2
    error = capsys.readouterr().err
    assert "No space left on device" in error and "epoch 2" in error and str(out) in error
    assert checkpoint_epoch(out) == 2
    assert_nothing_corrupt(out)
    monkeypatch.delenv(FAULT_ENV)
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    expected = load_file(str(reference / "checkpoint" / "state.safetensors"))
    got = load_file(str(out / "checkpoint" / "state.safetensors"))
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_unwritable_run_directory_is_refused_before_training(
    phantom: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Tests run as root, where chmod does not stop writes: a path below a regular file cannot
    # be created by anyone.
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    started = time.monotonic()
    assert main(train_args(phantom, blocker / "run")) == 2
    error = capsys.readouterr().err
    assert "run directory" in error and "not writable" in error and str(blocker / "run") in error
    assert time.monotonic() - started < 30  # refused up front, not after an epoch of training
    assert blocker.read_text() == "not a directory"


@pytest.mark.parametrize("fault", ["killed", "stalled"])
def test_a_lost_rank_stops_the_others_with_a_clear_error(
    phantom: tuple[Path, Path], tmp_path: Path, fault: str
) -> None:
    """Two ranks started as torchrun would. `killed`: rank 1 SIGKILLs itself at its 3rd training
    step (its sockets close, rank 0 fails at once); `stalled`: rank 1 is stopped (SIGSTOP) after
    the first checkpoint and never answers, so rank 0 fails when the collective times out."""
    timeout_s = 8
    run_dir = tmp_path / "run"
    args = command(train_args(phantom, run_dir, f"--set=distributed.timeout_s={timeout_s}", "--epochs", "50"))
    common = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    if fault == "killed":
        common.update({FAULT_ENV: "train-step:3", FAULT_RANK_ENV: "1"})
    ranks = [
        subprocess.Popen(
            args,
            env=child_env(**common, RANK=str(r), LOCAL_RANK=str(r)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for r in range(2)
    ]
    try:
        if fault == "stalled":
            deadline = time.monotonic() + 120
            while not (run_dir / "checkpoint").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            ranks[1].send_signal(signal.SIGSTOP)
        lost_at = time.monotonic()
        _, rank0_err = ranks[0].communicate(timeout=180)
        waited = time.monotonic() - lost_at
    finally:
        ranks[1].kill()
        ranks[1].communicate(timeout=60)
    assert ranks[0].returncode == 2, rank0_err.decode()
    message = rank0_err.decode().strip().splitlines()[-1]
    assert message.startswith("noisyseg train: error: rank 0 of 2: lost the other ranks"), message
    assert f"distributed.timeout_s={timeout_s}" in message and "--resume" in message
    # Killed: the rank notices the closed connection at once (bounded by start-up of the
    # processes); stalled: the timeout plus one more collective's worth of slack.
    assert waited < (60 if fault == "killed" else 3 * timeout_s), waited
    assert checkpoint_epoch(run_dir) >= (1 if fault == "stalled" else 0)
    assert_nothing_corrupt(run_dir)
