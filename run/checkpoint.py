"""The full training state of a run, saved every epoch in `RUN_DIR/checkpoint/`.

Layout of one checkpoint (a directory, replaced as a whole):

    checkpoint/state.safetensors  tensors: `model.*`, `arm.*`, optimiser buffers flattened as
                                  `opt.<name>.state.<i>.<key>` (e.g. `opt.net.state.3.momentum_buffer`),
                                  RNG states `rng.torch`, `rng.shuffle`
    checkpoint/state.json         everything else: epoch, iteration, optimiser param groups,
                                  numpy/python RNG states, trigger state, metric history, best
                                  validation tracking, the config and its hash (checked on
                                  resume), the sha256 of state.safetensors (checked on read)
    checkpoint/labels.npy/.json   the label store (see `label_store.py`)
    checkpoint/predictions.npy/.json  each training pixel's last training-pass prediction
                                  (`prediction_changes.py`)

Crash safety: a new checkpoint is written completely into `checkpoint.tmp/` (files fsynced),
then `checkpoint/` is renamed to `checkpoint.old/`, `checkpoint.tmp/` to `checkpoint/`, and
`checkpoint.old/` removed. A crash at any point leaves either `checkpoint/` or, between the two
renames, `checkpoint.old/` complete; `find_checkpoint` returns whichever exists. `state.json` is
written last inside the directory and marks it complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load, save

from noisyseg.config import TrainConfig
from noisyseg.io import _fsync_directory, atomic_write_bytes, atomic_write_json
from noisyseg.run.run_dir import RUN_ID, RunDir, config_differences, stored_config_from_dict
from noisyseg.runtime.distributed import fault_point

STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"
# state.json's sha256 of state.safetensors: a damaged file is refused, not resumed from.
TENSORS_HASH = "tensors_sha256"
FORMAT_VERSION = 1


def flatten_optimizer(name: str, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors keyed `opt.<name>.state.<i>.<key>`, JSON-ready rest: param groups, scalar state)."""
    state_dict = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entries in state_dict["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt.{name}.state.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def unflatten_optimizer(name: str, tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    """The optimiser state dict that `flatten_optimizer` took apart."""
    prefix = f"opt.{name}.state."
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix):
            index, field = key[len(prefix) :].split(".", 1)
            state.setdefault(int(index), {})[field] = value
    for index, entries in rest["scalars"].items():
        state.setdefault(int(index), {}).update(entries)
    return {"state": state, "param_groups": rest["param_groups"]}


def prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v.detach().cpu().contiguous() for k, v in tensors.items()}


def unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    start = len(prefix) + 1
    return {k[start:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def find_checkpoint(run_dir: str | Path) -> Path | None:
    """The complete checkpoint directory of a run, or None when it has none."""
    final = RunDir(run_dir).checkpoint_dir
    for candidate in (final, final.with_name(final.name + ".old")):
        if (candidate / STATE_JSON).is_file():
            return candidate
    return None


def write_checkpoint(
    run_dir: str | Path, tensors: dict[str, torch.Tensor], state: dict[str, Any], write_extra: Any
) -> Path:
    """Write a checkpoint crash-safely; `write_extra(directory)` adds files (the label store)."""
    run_dir = Path(run_dir)
    final = RunDir(run_dir).checkpoint_dir
    staging, previous = (final.with_name(final.name + suffix) for suffix in (".tmp", ".old"))
    shutil.rmtree(staging, ignore_errors=True)
    run_id = RunDir(run_dir).run_id()
    try:
        staging.mkdir(parents=True)
        payload = save(tensors)
        atomic_write_bytes(staging / STATE_TENSORS, payload)
        fault_point("checkpoint-write")
        write_extra(staging)
        atomic_write_json(
            staging / STATE_JSON,
            {
                "format_version": FORMAT_VERSION,
                TENSORS_HASH: hashlib.sha256(payload).hexdigest(),
                RUN_ID: run_id,
                **state,
            },
        )
    except OSError:
        # A full disk, say: drop the partial staging copy; `checkpoint/` is untouched.
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if final.exists():
        if previous.exists():
            shutil.rmtree(previous)
        os.replace(final, previous)
        fault_point("checkpoint-swap")
    os.replace(staging, final)
    _fsync_directory(run_dir)
    shutil.rmtree(previous, ignore_errors=True)
    return final


def read_checkpoint(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, state) of a checkpoint directory; ValueError if damaged."""
    try:
        state = json.loads((directory / STATE_JSON).read_text(encoding="utf-8"))
        payload = (directory / STATE_TENSORS).read_bytes()
    except (OSError, ValueError) as err:
        raise ValueError(f"{directory}: unreadable checkpoint ({err})") from err
    if state.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{directory / STATE_JSON}: checkpoint format {state.get('format_version')!r}, expected {FORMAT_VERSION}"
        )
    # Checkpoints written before the hash existed carry none: they are read unchecked.
    expected = state.get(TENSORS_HASH)
    if expected is not None and hashlib.sha256(payload).hexdigest() != expected:
        raise ValueError(
            f"{directory / STATE_TENSORS}: damaged checkpoint tensors (their sha256 "
            f"differs from the one in {STATE_JSON}); restore the file or start the run anew"
        )
    try:
        tensors = load(payload)
    except Exception as err:  # safetensors raises its own error type for damaged files
        raise ValueError(f"{directory / STATE_TENSORS}: unreadable checkpoint tensors ({err})") from err
    return tensors, state


def check_checkpoint_config(directory: Path, state: dict[str, Any], config: TrainConfig) -> None:
    """Refuse a checkpoint written under another configuration (one copied from another run, or
    a run whose config.json was edited): resuming it would mix two runs. RESUMABLE_FIELDS may
    differ. Then `check_checkpoint_run`: the configuration alone does not tell two runs apart."""
    if state.get("config_hash") != config.semantic_hash():
        try:
            differences = config_differences(stored_config_from_dict(state["config"]), config)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{directory / STATE_JSON}: checkpoint without a readable configuration ({err})") from err
        if differences:
            raise ValueError(
                f"{directory / STATE_JSON}: checkpoint of another configuration (differs in "
                f"{', '.join(differences)}) than the run's {RunDir(config.out).config_file}; "
                "resuming it would mix two runs"
            )
    check_checkpoint_run(directory, state, RunDir(config.out))


def check_checkpoint_run(directory: Path, state: dict[str, Any], run: RunDir) -> None:
    """Refuse a checkpoint of another run (say one of the same configuration trained for more
    epochs, copied over this run's) or one out of step with the run's metrics.jsonl: resuming
    would mix the two runs' files (the summary of one, the metrics and model of the other)."""
    found, expected = state.get(RUN_ID), run.run_id()
    if found != expected:
        raise ValueError(
            f"{directory / STATE_JSON}: checkpoint of another run (run id {found or 'none'}, "
            f"{run.config_file} has {expected or 'none'}); resuming it would mix two runs"
        )
    epoch = int(state["epoch"])
    recorded = run.read_metrics()[-1]["epoch"] if run.metrics_file.is_file() else 0
    # metrics.jsonl is rewritten just after each checkpoint, so a crash between the two leaves
    # it one epoch behind; anything else is another run's (or an older) checkpoint.
    if recorded not in (epoch, epoch - 1):
        raise ValueError(
            f"{directory / STATE_JSON}: checkpoint after epoch {epoch}, but the run's "
            f"{run.metrics_file} records epochs up to {recorded}; resuming it would mix two runs"
        )


def rng_state(shuffle: torch.Generator, device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every random state a run draws from: (checkpoint tensors, the JSON `rng` entry)."""
    tensors = {"rng.torch": torch.get_rng_state(), "rng.shuffle": shuffle.get_state()}
    if device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    numpy_state: tuple[Any, ...] = np.random.get_state(legacy=True)  # type: ignore[assignment]
    python_state = random.getstate()
    rest = {
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
        "python": [python_state[0], list(python_state[1]), python_state[2]],
    }
    return tensors, rest


def restore_rng(
    tensors: dict[str, torch.Tensor], rest: dict[str, Any], shuffle: torch.Generator, device: torch.device
) -> None:
    """Put back what `rng_state` saved (a CPU checkpoint has no CUDA state to restore)."""
    torch.set_rng_state(tensors["rng.torch"])
    shuffle.set_state(tensors["rng.shuffle"])
    if device.type == "cuda" and "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)
    numpy_state = rest["numpy"]
    np.random.set_state((numpy_state[0], np.array(numpy_state[1], dtype=np.uint32), *numpy_state[2:]))
    python_state = rest["python"]
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))


def adopt_checkpoint(source: Path, run: RunDir, config: TrainConfig) -> None:
    """Make the complete checkpoint `source` (another run's) the checkpoint of `run`, a run
    directory that stores `config` and has no checkpoint yet: copied, its state.json naming `run`'s
    id and `config` (so resuming it is `run` continuing, not two runs mixed), and `run`'s
    metrics.jsonl rewritten from its history. The branch of `adele.fork` starts so."""
    final = run.checkpoint_dir
    staging = final.with_name(final.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging)
    state = json.loads((staging / STATE_JSON).read_text(encoding="utf-8"))
    state.update(config=config.to_dict(), config_hash=config.semantic_hash(), **{RUN_ID: run.run_id()})
    atomic_write_json(staging / STATE_JSON, state)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    _fsync_directory(run.path)
    run.write_metrics(state["history"])
