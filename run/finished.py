"""A finished run, opened for use: its selected model on a device, what the model file says,
and, for a run directory, its configuration and the data it was trained on. `eval`, `predict`,
`review` and the analyses open runs through `open_run` instead of each rebuilding it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from noisyseg.config import TrainConfig
from noisyseg.data.datasets import SegmentationSource, open_source
from noisyseg.models.model_file import ModelInfo, load_model
from noisyseg.run.run_dir import RunDir, resolve_model_file
from noisyseg.runtime.device import resolve_device


@dataclass
class FinishedRun:
    """`model` (eval mode, fp32, on `device`) and its `info`; `config` is None for a bare
    model file."""

    path: Path
    model: nn.Module
    info: ModelInfo
    device: torch.device
    config: TrainConfig | None

    def require_config(self, what: str) -> TrainConfig:
        if self.config is None:
            raise ValueError(f"{self.path}: a model file does not record {what}; pass a run directory")
        return self.config

    def source(self, split: str, data: str | Path | None = None, given_labels: bool = False) -> SegmentationSource:
        """`split` of the run's data folder (or `data`) in the run's layout and options; the
        training masks it was trained on (`--labels`) with `given_labels`, else the folder's own."""
        config = self.require_config("its data")
        options: dict[str, Any] = dict(config.layout_options)
        if given_labels and split == "train" and config.labels:
            options["labels_root"] = config.labels
        return open_source(data or config.data, split, config.layout, **options)


def open_run(
    path: str | Path, device: str = "auto", field: str = "--device", run_directory: bool = False
) -> FinishedRun:
    """The model of a run directory (`model.safetensors`) or of a model file, on `device`;
    `run_directory` refuses a model file (the caller needs the run's configuration)."""
    path = Path(path)
    run = RunDir(path)
    config = run.read_config() if run_directory or path.is_dir() else None
    model, info = load_model(resolve_model_file(path))
    target = resolve_device(device, field=field)
    return FinishedRun(path, model.to(target).eval(), info, target, config)
