"""`train(config)`, the entry point of a run, and its set-up: the run directory, the data, the
parts of the trainer (`loop.Trainer`) composed in the order the random streams expect, and the
checkpoint restored."""

from __future__ import annotations

import logging
import os
import random
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from noisyseg.config import TrainConfig
from noisyseg.data.label_store import LabelStore
from noisyseg.data.pipeline import check_network_input_size, with_default_crop
from noisyseg.data.run_data import RunData, load_run_data
from noisyseg.evaluation.inference import forward_scales
from noisyseg.kernels import ARM
from noisyseg.method_table import METHOD_SPECS
from noisyseg.methods.correction import LabelCorrections
from noisyseg.methods.hooks import ArmHook, LabelHook
from noisyseg.methods.objective import MethodObjective
from noisyseg.models import create_model
from noisyseg.run.checkpoint import find_checkpoint
from noisyseg.run.run_dir import RunDir
from noisyseg.runtime.distributed import (
    SINGLE_PROCESS,
    DistContext,
    agree_on_error,
    convert_sync_batchnorm,
    init_distributed,
    peer_errors,
    reset_fault_counts,
    shutdown,
)
from noisyseg.training.fork import (
    branch_config,
    fork_summary,
    keep_branch_model,
    selected_models_confusion,
    start_branch,
)
from noisyseg.training.loop import Trainer
from noisyseg.training.optim import make_optimizer

log = logging.getLogger(__name__)


def training_memory_format(architecture: str) -> torch.memory_format:
    """channels_last for the UNet: about 20% faster convolutions on CPU (measured, 1 thread).

    Not for the others: on torch 2.13 CPU the backward of a strided 1x1 convolution (DeepLab's
    residual shortcuts) in channels_last crashes the process (segmentation fault).
    """
    return torch.channels_last if architecture == "unet" else torch.contiguous_format


class MultiScaleNetwork(nn.Module):
    """`forward_scales` as one module call, so DDP sees one forward (one all-reduce) per step."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, scales: list[float]) -> list[torch.Tensor]:
        return forward_scales(self.model, images, scales)


def make_trainer(config: TrainConfig, data: RunData, ctx: DistContext = SINGLE_PROCESS) -> Trainer:
    """The trainer of `config` on `data`: seeds, then the network, its optimiser, ARM, the label
    store and the hooks, in the order that fixes what each draws from the random streams."""
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    random.seed(config.seed)
    spec = METHOD_SPECS[config.method]
    device = ctx.device
    memory_format = training_memory_format(config.model.architecture)
    model_kwargs = {**config.model.kwargs, "in_channels": data.in_channels, "num_classes": data.num_classes}
    model = create_model(config.model.architecture, **model_kwargs)
    if config.distributed.sync_batchnorm:
        model = convert_sync_batchnorm(model, ctx)
    model = model.to(device=device, memory_format=memory_format)
    # Images of several sizes and no crop set: a default crop, before anything reads the augmentation.
    config = with_default_crop(
        config, data.train_labels.shapes, int(getattr(model, "stride", 1)), f"{config.data} (training split)"
    )
    objective = MethodObjective(config, data.info.ignore_index).to(device)
    optimizer = make_optimizer(
        [*model.parameters(), *objective.parameters()], config.optim
    )  # a loss may learn (T-Loss's nu)
    arm = None
    if spec.arm:
        module = ARM().to(device)
        momentum = config.optim.momentum if config.arm.momentum is None else config.arm.momentum
        arm_optim = replace(config.optim, momentum=momentum, weight_decay=0.0)
        arm = ArmHook(config, module, make_optimizer(module.parameters(), arm_optim, maximize=True))
    workdir = str(config.out) if not data.cached and Path(config.out).is_dir() else None
    store = LabelStore.from_original(data.train_labels, data.train_ids, workdir)
    corrections = LabelCorrections(store, ctx, device, data.cached, config.adele, data.info.ignore_index)
    labels = LabelHook(config, spec, corrections, data.train_labels, data.train_ids, list(data.info.classes), workdir)
    network = distributed_network(model, config, ctx)
    return Trainer(config, data, ctx, model, network, objective, optimizer, labels, arm, memory_format)


def distributed_network(model: nn.Module, config: TrainConfig, ctx: DistContext) -> nn.Module:
    """The multiscale forward (through `torch.compile` with `model.compile`), in DDP when
    several ranks train; `model` stays the plain module that checkpoints and evaluation use."""
    network = MultiScaleNetwork(torch.compile(model) if config.model.compile else model)
    if not ctx.enabled:
        return network
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    with peer_errors(ctx, "the initial weight broadcast"):
        return nn.parallel.DistributedDataParallel(network, device_ids=device_ids)


def check_input_size(trainer: Trainer) -> None:
    """Refuse training images (or crops) too small for the network at the step's smallest scale."""
    config = trainer.config
    stride = int(getattr(trainer.model, "stride", 1))
    where = f"{config.data} (training split)"
    check_network_input_size(
        stride,
        config.model.architecture,
        trainer.data.train_labels.shapes,
        trainer.scales,
        config.loader.augment,
        where,
    )


def check_free_space(trainer: Trainer) -> None:
    """Refuse to start when the run directory cannot hold two checkpoints (old and new)."""
    arm = [] if trainer.arm is None else list(trainer.arm.arm.state_dict().values())
    tensors = [*trainer.model.state_dict().values(), *arm]
    # Weights, SGD momentum of the same size, the best model file, the label store.
    checkpoint_bytes = 3 * sum(t.numel() * t.element_size() for t in tensors) + trainer.labels.store.maps.flat.nbytes
    free = shutil.disk_usage(trainer.run_dir.path).free
    if free < 2 * checkpoint_bytes:
        raise ValueError(
            f"{trainer.run_dir}: only {free / 1e6:.1f} MB free, a checkpoint needs about "
            f"{checkpoint_bytes / 1e6:.1f} MB and twice that while it "
            "replaces the previous one; free space or choose another --out"
        )


def set_up_run(config: TrainConfig, resume: bool, ctx: DistContext) -> Trainer:
    """Prepare the run directory (rank 0), load the data, build the trainer, restore the
    checkpoint; a failure on any rank stops all of them with its message."""
    error: BaseException | None = None
    if ctx.is_main:
        try:
            RunDir(config.out).prepare(config, resume)
        except (ValueError, OSError) as err:
            error = err
    agree_on_error(ctx, error, "preparing the run directory")
    try:
        return build_trainer(config, resume, ctx)
    except BaseException:
        if ctx.is_main and not resume:
            # Nothing was trained: leave no run behind that a corrected rerun would have to --resume.
            RunDir(config.out).discard_unstarted()
        raise


def build_trainer(config: TrainConfig, resume: bool, ctx: DistContext) -> Trainer:
    """Load the data, build the trainer and restore the checkpoint (every rank)."""
    data, error = None, None
    try:
        data = load_run_data(config, workdir=config.out)
    except (ValueError, OSError) as err:
        error = err
    agree_on_error(ctx, error, "loading the data")
    assert data is not None
    trainer = make_trainer(config, data, ctx)
    error = None
    try:
        check_input_size(trainer)
        checkpoint = find_checkpoint(config.out) if resume else None
        if checkpoint is not None:
            trainer.load_checkpoint(checkpoint)
            log.info("resuming %s after epoch %d", config.out, trainer.epoch)
        if ctx.is_main:
            check_free_space(trainer)
    except (ValueError, OSError) as err:
        error = err
    agree_on_error(ctx, error, "restoring the checkpoint")
    return trainer


def train(config: TrainConfig, resume: bool = False) -> dict[str, Any]:
    """Train `config.method`; write everything into `config.out`; return the summary.

    With `resume=True` the run in `config.out` continues from its last checkpoint (its stored
    configuration must equal `config` except for `epochs`, `quiet`, `threads` and `out`). A
    resumed run with more epochs follows the new total for the ARM warm-up and the poly lr.

    Under torchrun (several ranks) every rank calls this; they train one model with DDP and only
    rank 0 writes files (`docs/distributed.md`). Every rank returns the same summary. The
    curves are drawn by the callers (`experiments.plots.plot_run_curves`).
    """
    config.validate()
    reset_fault_counts()
    ctx = init_distributed(config.distributed.backend, config.distributed.timeout_s, config.device)
    if not ctx.is_main:
        logging.getLogger("noisyseg").setLevel(logging.WARNING)  # progress is rank 0's to report
    previous_threads, previous_deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        # Process-wide torch settings, restored afterwards so callers are not surprised.
        if config.threads:
            torch.set_num_threads(config.threads)
        if ctx.device.type == "cuda" and config.deterministic:
            # cuBLAS is deterministic only with a fixed workspace (read when its handle is made);
            # some CUDA kernels (bilinear upsampling's backward) have no deterministic version,
            # so CUDA runs warn about those instead of stopping: exact resume is a CPU guarantee.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(config.deterministic, warn_only=ctx.device.type == "cuda")
        summary = train_run(config, resume, ctx)
        shutdown(ctx)
        return summary
    finally:
        torch.set_num_threads(previous_threads)
        torch.use_deterministic_algorithms(previous_deterministic)


def train_run(config: TrainConfig, resume: bool, ctx: DistContext) -> dict[str, Any]:
    """Train the run of `config` (and, with `adele.fork`, its branch); write its summary."""
    trainer = set_up_run(config, resume, ctx)
    summary = trainer.fit()
    fork_epoch = trainer.labels.triggers.first_epoch()
    if trainer.forks and fork_epoch is not None:
        run, branch = RunDir(config.out), branch_config(config)
        error = None
        if ctx.is_main:
            try:
                start_branch(run, branch)
            except (ValueError, OSError) as err:
                error = err
        agree_on_error(ctx, error, "starting the branch of adele.fork")
        log.info(
            "adele.fork: %s continues as %s from epoch %d in %s",
            config.method,
            branch.method,
            fork_epoch - 1,
            branch.out,
        )
        branch_summary = train_run(branch, True, ctx)
        confusion = selected_models_confusion(trainer, run, summary["selection"]["rule"])
        summary["fork"] = fork_summary(summary, branch_summary, config.method, branch.method, fork_epoch - 1, confusion)
        if ctx.is_main and summary["fork"]["kept"] == branch.method:
            keep_branch_model(run)
        log.info(
            "adele.fork: kept %s (validation mIoU %s; the branch higher in %s of resamples)",
            summary["fork"]["kept"],
            summary["fork"]["val_miou"],
            summary["fork"]["p_branch_better"],
        )
    if ctx.is_main:
        RunDir(config.out).write_summary(summary)
    return summary
