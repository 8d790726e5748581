"""The trainer: ADELE, ARM and the comparison losses on in-memory data, on a CPU or GPU, resumable.

`train(config)` trains `config.method` (`methods.py`) on `config.data` (training masks from
`config.labels` when given) and writes into the run directory `config.out` (its files:
`run_dir.py`). The trainer owns the loop, the step, the optimisers and the checkpoint state;
evaluation passes are in `evaluation.py`, the ADELE trigger state in `adele.py`.

Design decisions (method-spec sections 2 to 5; the config docstrings give the defaults):
- Data: cached (`loader.cache`, the folder layout's default without augmentation) each split
  lives in memory (`load_split`, per-slice z-score) and the training split, its annotations and
  the current (corrected) labels are copied to the training device once; streamed, a DataLoader
  (`pipeline.py`) reads and augments each batch's items and the label store stays on the host,
  one memory-mapped map per image (corrections of crops are written back through each crop's
  flip and crop at the host's looks). Batches are drawn from a permutation of a seeded
  `torch.Generator`, whose state is checkpointed, and augmentation draws from generators seeded by
  (seed, epoch, item), so an interrupted and resumed run gives the same weights as an
  uninterrupted one, with or without workers (deterministic CPU algorithms; on CUDA
  deterministic kernels are asked for where PyTorch has them).
- Device and precision (`device.py`): the network's forward runs under autocast (bf16 by
  default on CUDA); the loss reads the half-precision logits (the fused kernels accumulate in
  fp32) and ARM stays fp32; fp16 scales the loss with a GradScaler.
- Host synchronisation: a step queues its work and returns. Loss terms, confusion counts,
  corrected-pixel counts, the first non-finite loss and the label corrections (into a device copy
  of the label store) stay on the device. The host waits only at logging points (every
  `SYNC_EVERY` steps: the progress bar's loss and the non-finite check), at the epoch's end
  (the label store, the trigger, evaluation, the checkpoint), and inside fp16's GradScaler (which
  must read whether a gradient overflowed before it steps).
- Multiscale: the input is resized by each scale (bilinear, align_corners=True) and each
  output's logits back to label size. `baseline-ms` (the ADELE paper's baseline, "multiscale
  input augmentation") averages the CE of all scales at every step: ADELE's loss without the
  consistency term, so both see the same views and compute.
- Training IoU (what the trigger fits) and IoU_el/IoU_m come for free from the training passes:
  the scale-1.0 prediction against the labels trained on in that step, counts summed per epoch.
- ARM: for the first `arm.warmup_fraction` of all iterations the network trains on uniformly
  weighted losses while ARM ascends the reweighted detached per-pixel losses; then jointly.
- The trigger and the fits are computed only for methods that correct labels (fits are logged
  for every method, for the curves); model selection is by validation mIoU with background.
- Several processes (torchrun): DDP with global batches sharded over the ranks, training and
  evaluation counts, losses and label corrections exchanged so every rank decides the same;
  only rank 0 writes (`training/distributed.py`, `docs/distributed.md`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from noisyseg.kernels import ARM
from noisyseg.training import adele
from noisyseg.training.checkpoint import ModelInfo, load_weights, save_model
from noisyseg.training.config import OptimConfig, TrainConfig
from noisyseg.training.correction import LabelCorrections
from noisyseg.training.data import RunData, load_run_data
from noisyseg.training.device import resolve_precision
from noisyseg.training.distributed import (
    SINGLE_PROCESS,
    DistContext,
    agree_on_error,
    all_reduce_counts,
    all_reduce_sum,
    average_gradients,
    broadcast_buffers,
    convert_sync_batchnorm,
    fault_point,
    init_distributed,
    peer_errors,
    reset_fault_counts,
    shard_batch,
    shard_indices,
    shutdown,
    state_digest,
    verify_agreement,
)
from noisyseg.training.evaluation import (
    evaluate_split,
    foreground_dict,
    forward_scales,
    mean_probabilities,
    predict_batches,
    predict_image,
    split_items,
    worker_errors_as_raised,
)
from noisyseg.training.label_store import LabelStore
from noisyseg.training.methods import METHOD_SPECS
from noisyseg.training.metrics import (
    ConfidenceMeter,
    ConfusionMeter,
    NoiseMeter,
    early_learning_memorization_iou,
    iou_per_class,
)
from noisyseg.training.models import create_model
from noisyseg.training.objective import MethodObjective
from noisyseg.training.pipeline import (
    EpochBatches,
    ImageDataset,
    TrainingItems,
    check_network_input_size,
    training_loader,
    with_default_crop,
    worker_count,
)
from noisyseg.training.run_checkpoint import (
    check_checkpoint_config,
    find_checkpoint,
    flatten_optimizer,
    prefixed,
    read_checkpoint,
    unflatten_optimizer,
    unprefixed,
    write_checkpoint,
)
from noisyseg.training.run_dir import RunDir, build_summary
from noisyseg.training.tensorboard_log import TensorBoardLog

log = logging.getLogger(__name__)

# Steps between the host's looks at the device (progress bar loss, non-finite check): each look
# waits for the queued GPU work, so looking every step would serialise host and GPU.
SYNC_EVERY = 10


# ----------------------------------------------------------------------------- the trainer


@dataclass
class EpochCounters:
    """What one epoch's training passes accumulate, on the training device (no host waits)."""

    train_meter: ConfusionMeter
    noise: NoiseMeter | None
    confidence: ConfidenceMeter | None  # ARM's inputs over the pass (ARM methods only)
    corrected_pixels: torch.Tensor  # () int64
    first_nonfinite: torch.Tensor  # () int64: the first iteration with a non-finite loss, or -1
    loss_sums: dict[str, torch.Tensor] = field(default_factory=dict)
    steps: int = 0

    @classmethod
    def zeros(cls, num_classes: int, ignore_index: int, device: torch.device, noise: bool, confidence: bool = False) -> EpochCounters:
        return cls(
            train_meter=ConfusionMeter(num_classes, ignore_index, device),
            noise=NoiseMeter(num_classes, ignore_index, device) if noise else None,
            confidence=ConfidenceMeter(ignore_index, device) if confidence else None,
            corrected_pixels=torch.zeros((), dtype=torch.int64, device=device),
            first_nonfinite=torch.full((), -1, dtype=torch.int64, device=device),
        )

    def add_losses(self, values: dict[str, torch.Tensor], weight: float = 1.0) -> None:
        """Add one step's (detached) loss terms, scaled by this rank's share of the batch."""
        for key, value in values.items():
            term = value.float() * weight
            self.loss_sums[key] = self.loss_sums[key] + term if key in self.loss_sums else term
        self.steps += 1

    def note_nonfinite(self, loss: torch.Tensor, iteration: int) -> None:
        """Remember `iteration` if `loss` is not finite and none was before (on the device)."""
        first = (~torch.isfinite(loss.detach())) & (self.first_nonfinite < 0)
        self.first_nonfinite = torch.where(first, iteration, self.first_nonfinite)

    def mean_losses(self) -> dict[str, float]:
        return {key: float(total) / max(self.steps, 1) for key, total in self.loss_sums.items()}


def training_memory_format(architecture: str) -> torch.memory_format:
    """channels_last for the UNet: about 20% faster convolutions on CPU (measured, 1 thread).

    Not for the others: on torch 2.13 CPU the backward of a strided 1x1 convolution (DeepLab's
    residual shortcuts) in channels_last crashes the process (segmentation fault).
    """
    return torch.channels_last if architecture == "unet" else torch.contiguous_format


def make_optimizer(parameters: Iterable[nn.Parameter], optim: OptimConfig, maximize: bool = False) -> torch.optim.Optimizer:
    """SGD (the papers) or Adam with `optim.momentum` as beta1; `maximize` for ARM's ascent."""
    if optim.optimizer == "adam":
        return torch.optim.Adam(parameters, lr=optim.lr, betas=(optim.momentum, 0.999), weight_decay=optim.weight_decay, maximize=maximize)
    return torch.optim.SGD(parameters, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay, maximize=maximize)


class MultiScaleNetwork(nn.Module):
    """`forward_scales` as one module call, so DDP sees one forward (one all-reduce) per step."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, scales: list[float]) -> list[torch.Tensor]:
        return forward_scales(self.model, images, scales)



def lr_factor(schedule: str, iteration: int, total: int, poly_power: float = 0.9) -> float:
    """The learning rate's multiplier at `iteration` of `total`. `multistep` is the ARM paper's
    policy (section 4.1): linear from 1/100 to 1 over the first 5% of iterations, then x0.1
    from 60% and x0.01 from 90%."""
    if schedule == "poly":
        return (1.0 - iteration / total) ** poly_power
    if schedule == "multistep":
        warmup = 0.05 * total
        if iteration < warmup:
            return 0.01 + 0.99 * iteration / warmup
        return 0.01 if iteration >= 0.9 * total else 0.1 if iteration >= 0.6 * total else 1.0
    return 1.0

class Trainer:
    """Holds the model, optimisers, ARM, label store and histories of one run."""

    def __init__(self, config: TrainConfig, data: RunData, ctx: DistContext = SINGLE_PROCESS) -> None:
        self.config = config
        self.ctx = ctx
        self.device = ctx.device
        self.precision = resolve_precision(config.precision, self.device)
        self.scaler = self.precision.grad_scaler(self.device)
        self.data = data
        self.spec = METHOD_SPECS[config.method]
        self.objective = MethodObjective(config, data.info.ignore_index)
        self.run_dir = RunDir(config.out)
        self.ignore_index = data.info.ignore_index
        self.scales = list(config.adele.scales) if self.spec.multiscale else [1.0]
        torch.manual_seed(config.seed)
        np.random.seed(config.seed)
        random.seed(config.seed)
        self.model_kwargs = {**config.model.kwargs, "in_channels": data.in_channels, "num_classes": data.num_classes}
        self.memory_format = training_memory_format(config.model.architecture)
        model = create_model(config.model.architecture, **self.model_kwargs)
        # Images of several sizes and no crop set: a default crop, before anything reads the augmentation.
        config = self.config = with_default_crop(config, data.train_labels.shapes, int(getattr(model, "stride", 1)), f"{config.data} (training split)")
        self.timing = config.correction_timing()
        if config.distributed.sync_batchnorm:
            model = convert_sync_batchnorm(model, ctx)
        self.model = model.to(device=self.device, memory_format=self.memory_format)
        self.optimizer = make_optimizer(self.model.parameters(), config.optim)
        self.arm: nn.Module | None = None
        self.arm_optimizer: torch.optim.Optimizer | None = None
        if self.spec.arm:
            self.arm = ARM().to(self.device)
            momentum = config.optim.momentum if config.arm.momentum is None else config.arm.momentum
            self.arm_optimizer = make_optimizer(self.arm.parameters(), replace(config.optim, momentum=momentum, weight_decay=0.0), maximize=True)
        self.shuffle = torch.Generator().manual_seed(config.seed)
        self.workdir = str(config.out) if not data.cached and Path(config.out).is_dir() else None
        store = LabelStore.from_original(data.train_labels, data.train_ids, self.workdir)
        self.has_clean = data.clean_train_labels is not None
        # Cached: the training split on the device, once (on the CPU these share the arrays'
        # memory): images, the annotations trained on (never modified), the clean masks when
        # known; corrections write into a device copy of the store (`correction.py`).
        # Streamed: items come from `training_loader`, corrections go into the host store.
        self.corrections = LabelCorrections(store, ctx, self.device, data.cached, config.adele, self.ignore_index)
        self.train_images = self.annotations = self.clean_labels = None
        if data.cached:
            self.train_images = data.train_images.to(self.device)
            self.annotations = torch.from_numpy(data.train_labels.stacked()).to(self.device)
            self.clean_labels = None if data.clean_train_labels is None else torch.from_numpy(data.clean_train_labels.stacked()).to(self.device)
        self.loader: DataLoader | None = None
        self.sampler: EpochBatches | None = None
        self.triggers = adele.TriggerState(data.num_classes)
        self.annotated_area: np.ndarray | None = None  # pixels per class in the annotations (the guard's reference)
        self.epoch = 0
        self.iteration = 0
        self.history: list[dict[str, Any]] = []
        self.best_val: float | None = None
        self.best_epoch: int | None = None
        self.saved_epoch = 0  # the epoch of the last complete checkpoint
        self.tensorboard: TensorBoardLog | None = None  # rank 0's event files, opened by fit()
        self.network = self.distributed_network()

    @property
    def store(self) -> LabelStore:
        return self.corrections.store

    def distributed_network(self) -> nn.Module:
        """The multiscale forward (through `torch.compile` with `model.compile`), in DDP when
        several ranks train. `self.model` stays the plain module that checkpoints and evaluation use."""
        network = MultiScaleNetwork(torch.compile(self.model) if self.config.model.compile else self.model)
        if not self.ctx.enabled:
            return network
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        with peer_errors(self.ctx, "the initial weight broadcast"):
            return nn.parallel.DistributedDataParallel(network, device_ids=device_ids)

    # ---- schedule

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(len(self.data.train_ids) / self.config.batch_size)

    @property
    def total_iterations(self) -> int:
        return self.batches_per_epoch * self.config.epochs

    def arm_warming_up(self) -> bool:
        return self.iteration < math.ceil(self.config.arm.warmup_fraction * self.total_iterations)

    def set_learning_rate(self) -> float:
        """This step's learning rates (the network's returned); ARM's follows the same schedule."""
        factor = lr_factor(self.config.optim.schedule, self.iteration, self.total_iterations, self.config.optim.poly_power)
        arm_lr = self.config.optim.lr if self.config.arm.lr is None else self.config.arm.lr
        for optimizer, lr in ((self.optimizer, self.config.optim.lr), (self.arm_optimizer, arm_lr)):
            for group in optimizer.param_groups if optimizer is not None else []:
                group["lr"] = lr * factor
        return self.config.optim.lr * factor

    # ---- losses

    def loss_terms(self, logits_per_scale: list[torch.Tensor], target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The method's loss and its logged terms (`objective.py`), with ARM warming up or not."""
        return self.objective(logits_per_scale, target, self.arm, self.arm is not None and self.arm_warming_up())

    # ---- one epoch

    def correction_classes(self, epoch: int) -> torch.Tensor | None:
        """(C,) bools of the classes corrected during/at the end of `epoch`, or None if none."""
        if not self.spec.correction:
            return None
        return self.triggers.correction_classes(epoch, self.timing, self.config.adele.correction_every)

    def train_step(self, rows: torch.Tensor, counters: EpochCounters, correct: torch.Tensor | None, loss_weight: float = 1.0, padding: bool = False, batch: Any = None) -> None:
        """One step on `rows`: this rank's shard of a global batch (all of it for one process).

        `loss_weight` rescales this rank's mean loss so that DDP's gradient average is the
        global batch mean; `padding` rows (weight 0) are neither counted nor corrected. `batch`:
        the streamed (images, label maps, geometry) of `rows` (None: rows of the cached split).
        """
        fault_point("train-step")
        annotations = clean = geometry = None
        if batch is None:
            rows = rows.to(self.device)
            images = self.train_images[rows].contiguous(memory_format=self.memory_format)
            target = self.corrections.labels[rows].long()
        else:
            images, maps, geometry = batch
            images = images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
            maps = maps.to(self.device, non_blocking=True)
            target, annotations = maps[:, 0].long(), maps[:, 1]
            clean = maps[:, 2] if maps.shape[1] > 2 else None
        self.set_learning_rate()
        with peer_errors(self.ctx, "the forward pass (DDP's buffer broadcast)"), self.precision.autocast(self.device):
            logits = self.network(images, self.scales)
        loss, terms = self.loss_terms(logits, target)
        if loss_weight != 1.0:
            loss = loss * loss_weight
        counters.note_nonfinite(loss, self.iteration + 1)
        self.optimise(loss)
        counters.add_losses(terms, loss_weight)
        if padding:
            return
        self.count_training_pass(rows, logits[self.scales.index(1.0)].detach(), target, counters, annotations, clean)
        if correct is not None and self.timing == "iteration":
            if geometry is None:
                counters.corrected_pixels += self.corrections.correct_rows(rows, target, self.correction_probs(logits), correct)
            else:
                counters.corrected_pixels += self.corrections.correct_crops(geometry, target, self.correction_probs(logits), correct)

    def check_finite(self, counters: EpochCounters) -> None:
        """Stop (every rank) if a step of this epoch had a non-finite loss (a host wait)."""
        first = int(counters.first_nonfinite)
        anywhere = self.total_over_ranks(torch.tensor(int(first >= 0)))
        if anywhere:
            where = f"iteration {first}" if first >= 0 else f"another rank, by iteration {self.iteration}"
            raise RuntimeError(
                f"non-finite loss at epoch {self.epoch + 1}, {where}: "
                f"training stopped, the last complete checkpoint in {self.run_dir} is kept (try a lower optim.lr)"
            )

    def optimise(self, loss: torch.Tensor) -> None:
        """One step: the network descends, ARM (when present) ascends (`maximize=True`).

        With several ranks DDP averages the network's gradients during the backward pass and
        ARM's are averaged here, so every replica takes the same step.
        """
        optimizers = [o for o in (self.optimizer, self.arm_optimizer) if o is not None]
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        with peer_errors(self.ctx, "the gradient all-reduce"):
            self.scaler.scale(loss).backward()
        if self.arm is not None:
            average_gradients(self.ctx, list(self.arm.parameters()), "the ARM gradient all-reduce")
        for optimizer in optimizers:
            self.scaler.step(optimizer)  # a plain step unless fp16 scales the loss
        self.scaler.update()
        self.iteration += 1

    def correction_probs(self, logits_per_scale: list[torch.Tensor]) -> torch.Tensor:
        if self.config.adele.correction_prediction == "single":
            return torch.softmax(logits_per_scale[self.scales.index(1.0)].detach().float(), dim=1)
        return mean_probabilities(logits_per_scale)

    def count_training_pass(self, rows: torch.Tensor, logits: torch.Tensor, target: torch.Tensor, counters: EpochCounters, annotations: torch.Tensor | None = None, clean: torch.Tensor | None = None) -> None:
        """Dataset-level counts of the scale-1.0 `logits`: the prediction against the labels
        trained on (the training IoU the trigger fits) and, when clean masks are known, the noise
        diagnostics; with ARM, the histogram of its confidence input. Streamed batches bring
        their (cropped) annotations and clean masks; cached rows index them."""
        prediction = logits.argmax(dim=1)
        counters.train_meter.update(prediction, target)
        if annotations is None and self.clean_labels is not None:
            annotations, clean = self.annotations[rows], self.clean_labels[rows]
        if counters.noise is not None and clean is not None:
            counters.noise.update(prediction, annotations, clean)
        if counters.confidence is not None:
            counters.confidence.update(torch.softmax(logits.float(), dim=1), target, clean)

    def run_epoch(self) -> EpochCounters:
        """Train one epoch (self.epoch is the number of completed epochs before it)."""
        epoch = self.epoch + 1
        counters = EpochCounters.zeros(self.data.num_classes, self.ignore_index, self.device, noise=self.has_clean, confidence=self.arm is not None)
        correct = self.correction_classes(epoch)
        order = torch.randperm(len(self.data.train_ids), generator=self.shuffle)
        self.model.train()
        shards = [shard_batch(batch, self.ctx.rank, self.ctx.world_size) for batch in order.split(self.config.batch_size)]
        streamed = None if self.data.cached else self.streamed_batches(epoch, shards)
        with tqdm(shards, desc=f"{self.config.method} epoch {epoch}/{self.config.epochs}", unit="batch", disable=self.config.quiet or not self.ctx.is_main, leave=False) as progress:
            for step, shard in enumerate(progress, start=1):
                self.train_step(shard.rows, counters, correct, shard.loss_weight, shard.padding, None if streamed is None else next(streamed))
                if step % SYNC_EVERY == 0:
                    self.check_finite(counters)
                    self.corrections.flush()
                    progress.set_postfix(loss=f"{float(counters.loss_sums['total']) / counters.steps:.4f}")
        self.check_finite(counters)
        broadcast_buffers(self.ctx, self.model, "the batch-norm statistics broadcast")
        self.corrections.sync()
        self.reduce_counters(counters)
        return counters

    def streamed_batches(self, epoch: int, shards: list[Any]) -> Iterator[Any]:
        """This epoch's batches (this rank's shards) from the DataLoader (built once, after any
        checkpoint was restored, so its workers map the store that training continues from)."""
        if self.loader is None:
            items = TrainingItems(self.data.train_source, self.store, self.data.train_labels, self.data.clean_train_labels, self.config.loader.augment, self.config.seed)
            self.loader, self.sampler = training_loader(items, self.config.loader, self.device)
        assert self.sampler is not None
        self.sampler.epoch = epoch
        self.sampler.batches = [shard.rows.tolist() for shard in shards]
        return worker_errors_as_raised(iter(self.loader))

    def close(self) -> None:
        """Stop the DataLoader's workers; close the event files."""
        self.loader = self.sampler = None
        if self.tensorboard is not None:
            self.tensorboard.close()

    def reduce_counters(self, counters: EpochCounters) -> None:
        """Sum the epoch's training-pass counts over ranks (what the trigger fits)."""
        if not self.ctx.enabled:
            return
        counters.train_meter.matrix = all_reduce_counts(self.ctx, counters.train_meter.matrix, "the training-IoU all-reduce")
        if counters.noise is not None:
            counters.noise.vs_clean.matrix = all_reduce_counts(self.ctx, counters.noise.vs_clean.matrix, "the IoU_el all-reduce")
            counters.noise.vs_noisy.matrix = all_reduce_counts(self.ctx, counters.noise.vs_noisy.matrix, "the IoU_m all-reduce")
        if counters.confidence is not None:
            counters.confidence.counts = all_reduce_sum(self.ctx, counters.confidence.counts, "the ARM confidence all-reduce")
        counters.corrected_pixels = torch.tensor(self.total_over_ranks(counters.corrected_pixels))
        # The mean over ranks of the weighted terms: every rank logs the global batch's loss.
        for key, total in counters.loss_sums.items():
            counters.loss_sums[key] = all_reduce_sum(self.ctx, total.double().reshape(1), "the loss all-reduce")[0] / self.ctx.world_size

    def total_over_ranks(self, count: torch.Tensor) -> int:
        """Sum of an integer count over ranks, on the host."""
        return int(all_reduce_sum(self.ctx, count.reshape(1).to(torch.int64), "a count all-reduce").item())

    def correct_after_epoch(self, epoch: int) -> int:
        """`epoch` timing: recompute predictions on the whole train split, then correct."""
        classes = self.correction_classes(epoch)
        if classes is None or self.timing != "epoch":
            return 0
        scales = self.scales if self.config.adele.correction_prediction == "multiscale" else [1.0]
        block = shard_indices(len(self.data.train_ids), self.ctx.rank, self.ctx.world_size)
        changed = torch.zeros((), dtype=torch.int64, device=self.device)
        if not self.data.cached:
            # Streamed: each whole training image, unaugmented, at its own size.
            items = split_items(ImageDataset(self.data.train_source), block, worker_count(self.config.loader.num_workers))
            for index, (image, _) in zip(block, items, strict=True):
                with self.precision.autocast(self.device):
                    probs = predict_image(self.model, image[None].to(self.device), scales, self.config.adele.correction_flip)
                changed += self.corrections.correct_item(index, probs, classes)
        elif len(block):
            with self.precision.autocast(self.device):
                probs = predict_batches(self.model, self.train_images[block.start : block.stop], self.config.eval_batch_size, scales, self.config.adele.correction_flip)
            rows = torch.arange(block.start, block.stop, device=self.device)
            changed = self.corrections.correct_rows(rows, self.corrections.labels[rows].long(), probs, classes)
        self.corrections.sync()
        return self.total_over_ranks(changed)

    def finish_epoch(self, counters: EpochCounters) -> dict[str, Any]:
        """Trigger, end-of-epoch correction, evaluation; returns the epoch's metrics record."""
        self.epoch += 1
        epoch = self.epoch
        train_iou = iou_per_class(counters.train_meter.matrix)
        fired = self.triggers.update(epoch, train_iou, self.config.adele, detect=self.spec.correction, adaptive=self.spec.adaptive)
        for c in fired:
            log.info("epoch %d: label correction triggered for class %d (%s)", epoch, c, self.data.info.classes[c])
        corrected = int(counters.corrected_pixels) + self.correct_after_epoch(epoch)
        if corrected:
            log.info("epoch %d: %d training label pixels corrected", epoch, corrected)
        self.guard_classes(epoch)
        record: dict[str, Any] = {
            "epoch": epoch,
            "iteration": self.iteration,
            "method": self.config.method,
            "lr": self.optimizer.param_groups[0]["lr"],
            "loss": counters.mean_losses(),
            "train_iou": foreground_dict(train_iou),
            "val": self.evaluate(self.data.val),
            "test": self.evaluate(self.data.test),
            "trigger": self.triggers.record(),
            "labels_changed_fraction": self.store.changed_fraction(self.data.train_labels),
            "corrected_pixels": corrected,
        }
        if counters.noise is not None:
            iou_el, iou_m = early_learning_memorization_iou(counters.noise.counts())
            record["iou_el"], record["iou_m"] = foreground_dict(iou_el), foreground_dict(iou_m)
        if counters.confidence is not None:
            record["arm"] = self.arm_record(counters.confidence)
        return record

    def arm_record(self, meter: ConfidenceMeter) -> dict[str, Any]:
        """ARM's weight function w(v^) at the histogram's bin centres (before the batch
        normalisation) and the epoch's pixel counts per bin, right and wrong labels."""
        assert self.arm is not None
        centres = ConfidenceMeter.centres()
        with torch.no_grad():
            weights = self.arm(centres.to(self.device)).float().cpu()
        right, wrong = meter.histogram()
        return {"v": [round(float(v), 4) for v in centres], "w": [float(w) for w in weights], "pixels": right.tolist(), "pixels_wrong": wrong.tolist()}

    def guard_classes(self, epoch: int) -> None:
        """The guard (`adele.py`): stop and undo the correction of a class whose labelled area
        collapsed. Reads the store after the epoch's corrections are in it (same on every rank)."""
        corrected = self.triggers.corrected_classes()
        if not (self.config.adele.guard and corrected):
            return
        if self.annotated_area is None:
            self.annotated_area = self.data.train_labels.class_counts(self.data.num_classes)
        areas = self.store.maps.class_counts(self.data.num_classes)
        for c in adele.collapsed_classes(areas, self.annotated_area, corrected, self.config.adele.guard_min_area):
            self.triggers.stop(c, epoch)
            restored = self.corrections.give_back(c, self.data.train_labels)
            log.warning(
                "epoch %d: class %d (%s) kept %d of its %d annotated pixels under correction; the guard stopped its correction and restored %d pixels",
                epoch, c, self.data.info.classes[c], areas[c], self.annotated_area[c], restored,
            )

    def evaluate(self, split: Any) -> dict[str, Any]:
        with self.precision.autocast(self.device):
            loader = self.config.loader
            workers = 0 if self.data.cached else worker_count(loader.num_workers)
            return evaluate_split(self.model, split, self.data.num_classes, self.ignore_index, self.config.eval_batch_size, self.ctx, loader.eval_window, loader.eval_overlap, workers)

    # ---- bookkeeping

    def model_info(self) -> ModelInfo:
        return ModelInfo(
            architecture=self.config.model.architecture,
            model_kwargs=self.model_kwargs,
            class_names=list(self.data.info.classes),
            normalization=self.data.info.normalization,
            method=self.config.method,
            extra={"epoch": self.epoch, "val_miou": self.best_val, "config_hash": self.config.semantic_hash()},
        )

    def track_best(self, record: dict[str, Any]) -> None:
        """Keep `model.safetensors` at the epoch with the best validation mIoU."""
        val_miou = record["val"]["miou"]
        if val_miou is not None and (self.best_val is None or val_miou > self.best_val):
            self.best_val, self.best_epoch = val_miou, record["epoch"]
            save_model(self.run_dir.model_file, self.model, self.model_info())

    def save_checkpoint(self) -> None:
        tensors = {**prefixed("model", self.model.state_dict()), "rng.torch": torch.get_rng_state(), "rng.shuffle": self.shuffle.get_state()}
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        optimizers: dict[str, Any] = {}
        for name, optimizer in (("net", self.optimizer), ("arm", self.arm_optimizer)):
            if optimizer is not None:
                opt_tensors, optimizers[name] = flatten_optimizer(name, optimizer)
                tensors.update(opt_tensors)
        if self.arm is not None:
            tensors.update(prefixed("arm", self.arm.state_dict()))
        numpy_state: tuple[Any, ...] = np.random.get_state(legacy=True)  # type: ignore[assignment]
        state = {
            "epoch": self.epoch,
            "iteration": self.iteration,
            "config": self.config.to_dict(),
            "config_hash": self.config.semantic_hash(),
            "optimizers": optimizers,
            "rng": {
                "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
                "python": json_ready(random.getstate()),
            },
            "triggers": self.triggers.to_json(),
            "history": self.history,
            "best": {"val_miou": self.best_val, "epoch": self.best_epoch},
            "world_size": self.ctx.world_size,
            "grad_scaler": self.scaler.state_dict(),
        }
        write_checkpoint(self.run_dir.path, tensors, state, self.store.save)
        self.saved_epoch = self.epoch

    def load_checkpoint(self, directory: Path) -> None:
        tensors, state = read_checkpoint(directory)
        check_checkpoint_config(directory, state, self.config)
        load_weights(self.model, unprefixed("model", tensors), directory, self.config.model.architecture)
        try:
            self.optimizer.load_state_dict(unflatten_optimizer("net", tensors, state["optimizers"]["net"]))
            if self.arm is not None and self.arm_optimizer is not None:
                load_weights(self.arm, unprefixed("arm", tensors), directory, "ARM")
                self.arm_optimizer.load_state_dict(unflatten_optimizer("arm", tensors, state["optimizers"]["arm"]))
            torch.set_rng_state(tensors["rng.torch"])
            self.shuffle.set_state(tensors["rng.shuffle"])
            if self.device.type == "cuda" and "rng.cuda" in tensors:  # a CPU checkpoint has none
                torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        except (KeyError, RuntimeError) as err:
            raise ValueError(f"{directory}: checkpoint does not match this run's model/method ({err})") from err
        numpy_state = state["rng"]["numpy"]
        np.random.set_state((numpy_state[0], np.array(numpy_state[1], dtype=np.uint32), *numpy_state[2:]))
        python_state = state["rng"]["python"]
        random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
        self.corrections.replace_store(LabelStore.load(directory, self.data.train_labels, self.data.train_ids, self.workdir))
        if self.scaler.is_enabled() and state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])
        self.triggers = adele.TriggerState.from_json(self.data.num_classes, state["triggers"])
        self.epoch, self.iteration = int(state["epoch"]), int(state["iteration"])
        self.history = list(state["history"])
        self.best_val, self.best_epoch = state["best"]["val_miou"], state["best"]["epoch"]
        self.saved_epoch = self.epoch
        saved_world = int(state.get("world_size", 1))
        if saved_world != self.ctx.world_size:
            log.warning("%s was written by %d rank(s), resuming with %d: batches are sharded differently from here on", directory, saved_world, self.ctx.world_size)

    def write_metrics(self) -> None:
        """Rewrite metrics.jsonl from the history (so it always matches the checkpoint)."""
        fault_point("metrics-write")
        self.run_dir.write_metrics(self.history)

    def summary(self) -> dict[str, Any]:
        """Test mIoU at the best validation epoch, the last epoch and the maximum; trigger epochs."""
        return build_summary(self.history, self.triggers.trigger_epoch, self.best_epoch)

    # ---- the run

    def fit(self) -> dict[str, Any]:
        """Train from the current epoch to `config.epochs`; writes outputs; returns the summary."""
        log.info("training %s for %d epochs (%d batches each) on %s in %s into %s", self.config.method, self.config.epochs, self.batches_per_epoch, self.device, self.precision.name, self.run_dir)
        if self.ctx.is_main:
            self.tensorboard = TensorBoardLog(self.run_dir.path, self.data.info.classes, self.ignore_index, self.config.epochs, resume_after=self.epoch)
        try:
            self.train_epochs()
        finally:
            self.close()
        summary = self.summary()
        if self.ctx.is_main:
            self.run_dir.write_summary(summary)
            plot_curves(self.run_dir.path)
        return summary

    def train_epochs(self) -> None:
        while self.epoch < self.config.epochs:
            record = self.finish_epoch(self.run_epoch())
            self.history.append(record)
            self.verify_replicas()
            self.persist(record)
            log.info("epoch %d: loss %.4f, val mIoU %s, test mIoU %s, labels changed %.4f", record["epoch"], record["loss"]["total"], percent(record["val"]["miou"]), percent(record["test"]["miou"]), record["labels_changed_fraction"])

    def persist(self, record: dict[str, Any]) -> None:
        """Rank 0 writes the best model, the checkpoint and the metrics; a failed write (a full
        disk) stops every rank with one clear error and leaves the last complete checkpoint."""
        error = None
        if self.ctx.is_main:
            try:
                # Before the checkpoint: a resumed run purges events after its checkpoint's epoch.
                if self.tensorboard is not None:
                    self.tensorboard.write_epoch(record, self.model, self.data.val)
                self.track_best(record)
                self.save_checkpoint()
                self.write_metrics()
            except OSError as err:
                kept = f"the last complete checkpoint (epoch {self.saved_epoch}) is kept" if self.saved_epoch else "no checkpoint was completed"
                error = RuntimeError(f"{self.run_dir}: could not write the outputs of epoch {record['epoch']} ({err}); training stopped, {kept}; free space and continue with --resume {self.run_dir}")
        agree_on_error(self.ctx, error, f"writing the outputs of epoch {record['epoch']}")

    def verify_replicas(self) -> None:
        """Stop unless every rank holds the same weights, ARM, trigger state and label store."""
        if not (self.ctx.enabled and self.config.distributed.verify_replicas):
            return
        tensors = [*self.model.state_dict().values(), *(self.arm.state_dict().values() if self.arm is not None else [])]
        digest = state_digest(tensors, [self.store.maps.flat], json.dumps(self.triggers.to_json(), sort_keys=True))
        verify_agreement(self.ctx, digest, f"the state after epoch {self.epoch}")
        if self.ctx.is_main:
            log.info("epoch %d: replicas agree across %d ranks (weights, ARM, triggers, label store: sha256 %s)", self.epoch, self.ctx.world_size, digest[:16])

    def check_input_size(self) -> None:
        """Refuse training images (or crops) too small for the network at the step's smallest scale."""
        stride = int(getattr(self.model, "stride", 1))
        check_network_input_size(stride, self.config.model.architecture, self.data.train_labels.shapes, self.scales, self.config.loader.augment, f"{self.config.data} (training split)")

    def check_free_space(self) -> None:
        """Refuse to start when the run directory cannot hold two checkpoints (old and new)."""
        tensors = [*self.model.state_dict().values(), *(self.arm.state_dict().values() if self.arm is not None else [])]
        # Weights, SGD momentum of the same size, the best model file, the label store.
        checkpoint_bytes = 3 * sum(t.numel() * t.element_size() for t in tensors) + self.store.maps.flat.nbytes
        free = shutil.disk_usage(self.run_dir.path).free
        if free < 2 * checkpoint_bytes:
            raise ValueError(f"{self.run_dir}: only {free / 1e6:.1f} MB free, a checkpoint needs about {checkpoint_bytes / 1e6:.1f} MB and twice that while it replaces the previous one; free space or choose another --out")


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def json_ready(value: Any) -> Any:
    """Tuples to lists, recursively (RNG states)."""
    if isinstance(value, (tuple, list)):
        return [json_ready(v) for v in value]
    return value


def plot_curves(run_dir: Path) -> None:
    """curves.png through `noisyseg.training.plots` when that module exists."""
    try:
        from noisyseg.training.plots import plot_run_curves
    except ModuleNotFoundError as err:
        if err.name != "noisyseg.training.plots":
            raise
        log.info("noisyseg.training.plots not available; curves.png not written")
        return
    plot_run_curves(run_dir)


# ----------------------------------------------------------------------------- entry points


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
    trainer = Trainer(config, data, ctx)
    error = None
    try:
        trainer.check_input_size()
        checkpoint = find_checkpoint(config.out) if resume else None
        if checkpoint is not None:
            trainer.load_checkpoint(checkpoint)
            log.info("resuming %s after epoch %d", config.out, trainer.epoch)
        if ctx.is_main:
            trainer.check_free_space()
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
    rank 0 writes files (`docs/distributed.md`). Every rank returns the same summary.
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
        summary = set_up_run(config, resume, ctx).fit()
        shutdown(ctx)
        return summary
    finally:
        torch.set_num_threads(previous_threads)
        torch.use_deterministic_algorithms(previous_deterministic)
