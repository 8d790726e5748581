"""A training run directory: every file name in it, and reading and writing its files.

    config.json          the configuration (a rerun or resume must match it), the run's id
                         (in its checkpoints too) and, with --labels, their `labels_origin`
    metrics.jsonl        one JSON object per epoch: epoch, iteration, method, lr, loss terms,
                         train_iou (foreground, vs the labels trained on), val/test per-class IoU
                         and mIoU with/without background (val_noisy too when the labels folder
                         holds noisy validation masks), trigger state and fits,
                         labels_changed_fraction, corrected_pixels, prediction_change (Label
                         Wave's input, `prediction_changes.py`), and iou_el/iou_m when clean
                         training labels are known; NaN written as null
    summary.json         test mIoU at the best validation epoch / last / max, trigger epochs; the
                         selected epoch and rule, every rule's epoch and the test mIoU there
                         (`selection.py`); with `adele.fork`, `fork`: its epoch, both runs'
                         validation and test mIoU at their selected epochs, the branch's share
                         of bootstrap resamples (`p_branch_better`), the bar, the run kept
    model.safetensors    the model at the epoch the run's selection rule chooses
                         (`checkpoint.save_model`; its metadata names the epoch and the rule)
    checkpoint/          full training state, every epoch (`run_checkpoint.py`), with the label
                         store (`label_store.py`: labels.npy, labels.json) and the last training
                         predictions (predictions.npy, predictions.json) inside it
    curves.png           from `noisyseg.experiments.plots.plot_run_curves`
    tensorboard/         TensorBoard event files, one point per epoch (`tensorboard_log.py`)
    fork_point/          with `adele.fork`, from the first trigger until the branch starts: the
                         checkpoint and the selected model of the epoch before it
    branch/              with `adele.fork`, the run directory of the branch (`training/fork.py`);
                         when it scores higher, `model.safetensors` is a copy of its model

No torch here: the model-file and serving code read the names without importing the trainer.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from noisyseg.config import TrainConfig, config_from_dict, semantic_fields
from noisyseg.io import atomic_write_json, atomic_write_text, probe_writable_folder

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoint"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
MODEL_FILE = "model.safetensors"
CURVES_FILE = "curves.png"
FORK_POINT_DIR = "fork_point"
BRANCH_DIR = "branch"
# The key of the run's id in config.json and in each checkpoint's state.json.
RUN_ID = "run_id"


def _file(name: str, doc: str = "") -> property:
    """A path in the run directory, as a read-only attribute."""
    return property(lambda self: self.path / name, doc=doc or f"`{name}` in the run directory")


# Fields added after runs had been stored, whose default is not what those runs did: a stored
# configuration without the field ran with this value (the guard came on 2026-11-29, the
# consistency term's start on 2026-12-07 with the paper's `always`, later made `first_trigger`;
# the fork on 2026-12-07).
VALUES_BEFORE_ADDED: dict[str, Any] = {
    "adele.guard": False,
    "adele.consistency_start": "always",
    "adele.fork": False,
}


def stored_config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """The configuration a run stored (`config.json`, a checkpoint of `run/checkpoint.py`). Stored
    configurations are complete, so a field one lacks was added after it was written: it takes
    the value the run ran with (`VALUES_BEFORE_ADDED`), not today's default, so that a resumed old
    run stays itself."""
    if not isinstance(values, dict):
        raise ValueError(f"configuration must be a mapping of keys to values, got {type(values).__name__}")
    completed = json.loads(json.dumps(values))
    for dotted, value in VALUES_BEFORE_ADDED.items():
        *sections, key = dotted.split(".")
        node = completed
        for section in sections:
            node = node.setdefault(section, {})
        node.setdefault(key, value)
    return config_from_dict(completed)


class RunDir:
    """The files of one run directory (which need not exist yet)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    config_file = _file(CONFIG_FILE)
    checkpoint_dir = _file(CHECKPOINT_DIR, "full training state and the label store (`run_checkpoint.py`)")
    metrics_file = _file(METRICS_FILE)
    summary_file = _file(SUMMARY_FILE)
    model_file = _file(MODEL_FILE)
    curves_file = _file(CURVES_FILE)
    fork_point_dir = _file(FORK_POINT_DIR, "`adele.fork`'s starting checkpoint and model (`training/fork.py`)")
    branch_dir = _file(BRANCH_DIR, "`adele.fork`'s branch, a run directory (`training/fork.py`)")

    def has_config(self) -> bool:
        """A run was started here (a rerun must resume it)."""
        return self.config_file.is_file()

    def is_finished(self) -> bool:
        """The run wrote its summary: it trained all its epochs."""
        return self.summary_file.is_file()

    # ---- the configuration

    def read_config(self) -> TrainConfig:
        """The configuration stored in `config.json`."""
        path = self.config_file
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not a noisyseg run directory (no {CONFIG_FILE})")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as err:
            raise ValueError(f"{path}: unreadable run configuration ({err})") from err
        return stored_config_from_dict(raw["config"])

    def write_config(self, config: TrainConfig) -> None:
        """`config.json` of a new run: the configuration, its hash, a new run id (written into
        every checkpoint too, so that a checkpoint of another run is refused on resume) and,
        with `labels`, what is known of their origin."""
        record: dict[str, Any] = {
            "config": config.to_dict(),
            "config_hash": config.semantic_hash(),
            RUN_ID: uuid.uuid4().hex,
        }
        if config.labels:
            # data.py imports torch: only when a run is created, not when run files are read.
            from noisyseg.data.folder import labels_origin

            record["labels_origin"] = labels_origin(config.labels)
        atomic_write_json(self.config_file, record)

    def run_id(self) -> str | None:
        """The id `write_config` gave the run (None for a run made before ids existed, or a
        directory without config.json)."""
        if not self.config_file.is_file():
            return None
        try:
            run_id = json.loads(self.config_file.read_text(encoding="utf-8")).get(RUN_ID)
        except (OSError, ValueError) as err:
            raise ValueError(f"{self.config_file}: unreadable run configuration ({err})") from err
        return None if run_id is None else str(run_id)

    def prepare(self, config: TrainConfig, resume: bool) -> None:
        """Refuse a directory that holds another configuration (or any run, unless resuming);
        else create it and store `config`."""
        run_dir = self.path
        if self.has_config():
            differences = config_differences(self.read_config(), config)
            if differences:
                raise ValueError(
                    f"{run_dir}: run directory holds a run with another configuration "
                    f"(differs in {', '.join(differences)}); use another --out"
                )
            if not resume:
                raise FileExistsError(
                    f"{run_dir}: run directory already holds this run; "
                    f"continue it with --resume {run_dir} or choose another --out"
                )
            self.probe()
            return
        if resume:
            raise FileNotFoundError(f"{self.config_file}: nothing to resume (no run configuration in {run_dir})")
        if run_dir.exists() and any(run_dir.iterdir()):
            raise FileExistsError(f"{run_dir}: run directory exists and is not empty; choose another --out")
        self.probe()
        self.write_config(config)

    def discard_unstarted(self) -> None:
        """Remove the configuration `prepare` stored for a run that never trained an epoch."""
        if not (self.checkpoint_dir.exists() or self.metrics_file.exists()):
            self.config_file.unlink(missing_ok=True)

    def probe(self) -> None:
        """Create the directory and write and remove a file in it: fail now, not after an epoch."""
        probe_writable_folder(self.path, "run directory", "--out")

    # ---- metrics and summary

    def write_metrics(self, history: list[dict[str, Any]]) -> None:
        """Rewrite `metrics.jsonl` from the whole history (so it always matches the checkpoint)."""
        atomic_write_text(self.metrics_file, "".join(json_line(r) + "\n" for r in history))

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.metrics_file)

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_json(self.summary_file, summary)

    def read_summary(self) -> dict[str, Any]:
        return json.loads(self.summary_file.read_text(encoding="utf-8"))


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a `metrics.jsonl`, one per epoch in epoch order (a later line for the same
    epoch, as a resumed run may write, replaces the earlier one)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics file (a run directory holds {METRICS_FILE})")
    by_epoch: dict[int, dict[str, Any]] = {}
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            by_epoch[int(record["epoch"])] = record
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}:{line_number}: not a metrics record with an 'epoch' ({err})") from err
    if not by_epoch:
        raise ValueError(f"{path}: holds no epoch record")
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def json_line(record: dict[str, Any]) -> str:
    """One JSON line, keys sorted (as in the checkpoint it is rebuilt from); never NaN."""
    return json.dumps(record, allow_nan=False, sort_keys=True)


def build_summary(
    history: list[dict[str, Any]], trigger_epoch: dict[int, int | None], best_epoch: int | None
) -> dict[str, Any]:
    """The `summary.json` shape: {"test_miou": {best_val,last,max}, "test_miou_fg": {...}, "trigger_epoch": {...}}."""
    by_epoch = {r["epoch"]: r for r in history}

    def three(key: str) -> dict[str, float | None]:
        values = [r["test"][key] for r in history if r["test"][key] is not None]
        best = by_epoch[best_epoch]["test"][key] if best_epoch in by_epoch else None
        return {
            "best_val": best,
            "last": history[-1]["test"][key] if history else None,
            "max": max(values) if values else None,
        }

    return {
        "test_miou": three("miou"),
        "test_miou_fg": three("miou_fg"),
        "trigger_epoch": {str(c): e for c, e in sorted(trigger_epoch.items())},
        "best_val_epoch": best_epoch,
        "epochs": len(history),
        "method": history[-1]["method"] if history else None,
    }


def config_differences(stored: TrainConfig, given: TrainConfig) -> list[str]:
    """Dotted names of the fields (other than RESUMABLE_FIELDS) whose values differ."""

    def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        flat: dict[str, Any] = {}
        for key, value in values.items():
            if isinstance(value, dict) and key != "kwargs":
                flat.update(flatten(value, f"{prefix}{key}."))
            else:
                flat[prefix + key] = value
        return flat

    old, new = flatten(semantic_fields(stored)), flatten(semantic_fields(given))
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


def resolve_model_file(path: str | Path) -> Path:
    """A model file, or a run directory holding `model.safetensors`."""
    path = Path(path)
    if path.is_dir():
        path = RunDir(path).model_file
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no model checkpoint (expected a .safetensors file or a run directory holding {MODEL_FILE})"
        )
    return path
