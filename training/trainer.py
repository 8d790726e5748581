"""The trainer: ADELE, ARM and the comparison losses on in-memory CPU data, resumable.

`train(config)` trains `config.method` (`methods.py`) on `config.data` (training masks from
`config.labels` when given) and writes into the run directory `config.out` (its files:
`run_dir.py`). The trainer owns the loop, the step, the optimisers and the checkpoint state;
evaluation passes are in `evaluation.py`, the ADELE trigger state in `adele.py`.

Design decisions (method-spec sections 2 to 5; the config docstrings give the defaults):
- Data: each split lives in memory (`load_split`, per-slice z-score). Batches are drawn from a
  permutation of a seeded `torch.Generator`, whose state is checkpointed, so an interrupted and
  resumed run gives the same weights as an uninterrupted one (deterministic CPU algorithms).
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
import random
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from noisyseg.kernels import ARM, arm_cross_entropy, arm_reweighted_loss, multiscale_consistency
from noisyseg.training import adele
from noisyseg.training.checkpoint import ModelInfo, save_model
from noisyseg.training.config import OptimConfig, TrainConfig
from noisyseg.training.data import RunData, load_run_data
from noisyseg.training.distributed import (
    SINGLE_PROCESS,
    DistContext,
    agree_on_error,
    all_gather_rows,
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
)
from noisyseg.training.label_store import LabelStore
from noisyseg.training.methods import METHOD_SPECS
from noisyseg.training.metrics import (
    ConfusionMeter,
    NoiseCounts,
    early_learning_memorization_iou,
    iou_per_class,
    noise_diagnostics,
)
from noisyseg.training.models import create_model
from noisyseg.training.run_checkpoint import (
    find_checkpoint,
    flatten_optimizer,
    prefixed,
    read_checkpoint,
    unflatten_optimizer,
    unprefixed,
    write_checkpoint,
)
from noisyseg.training.run_dir import RunDir, build_summary

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- the trainer


@dataclass
class EpochCounters:
    """What one epoch's training passes accumulate."""

    train_meter: ConfusionMeter
    noise: NoiseCounts | None
    loss_sums: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    corrected_pixels: int = 0

    def add_losses(self, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.loss_sums[key] = self.loss_sums.get(key, 0.0) + value
        self.steps += 1

    def mean_losses(self) -> dict[str, float]:
        return {key: total / max(self.steps, 1) for key, total in self.loss_sums.items()}


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


class Trainer:
    """Holds the model, optimisers, ARM, label store and histories of one run."""

    def __init__(self, config: TrainConfig, data: RunData, ctx: DistContext = SINGLE_PROCESS) -> None:
        self.config = config
        self.ctx = ctx
        self.data = data
        self.spec = METHOD_SPECS[config.method]
        self.run_dir = RunDir(config.out)
        self.ignore_index = data.info.ignore_index
        self.scales = list(config.adele.scales) if self.spec.multiscale else [1.0]
        torch.manual_seed(config.seed)
        np.random.seed(config.seed)
        random.seed(config.seed)
        self.model_kwargs = {**config.model.kwargs, "in_channels": int(data.train_images.shape[1]), "num_classes": data.num_classes}
        self.memory_format = training_memory_format(config.model.architecture)
        model = create_model(config.model.architecture, **self.model_kwargs)
        if config.distributed.sync_batchnorm:
            model = convert_sync_batchnorm(model, ctx)
        self.model = model.to(device=ctx.device, memory_format=self.memory_format)
        self.optimizer = make_optimizer(self.model.parameters(), config.optim)
        self.arm: nn.Module | None = None
        self.arm_optimizer: torch.optim.Optimizer | None = None
        if self.spec.arm:
            self.arm = ARM().to(ctx.device)
            momentum = config.optim.momentum if config.arm.momentum is None else config.arm.momentum
            self.arm_optimizer = make_optimizer(self.arm.parameters(), replace(config.optim, momentum=momentum, weight_decay=0.0), maximize=True)
        self.shuffle = torch.Generator().manual_seed(config.seed)
        self.store = LabelStore.from_original(data.train_labels, data.train_ids)
        self.triggers = adele.TriggerState(data.num_classes)
        self.epoch = 0
        self.iteration = 0
        self.history: list[dict[str, Any]] = []
        self.best_val: float | None = None
        self.best_epoch: int | None = None
        self.saved_epoch = 0  # the epoch of the last complete checkpoint
        self.network = self.distributed_network()
        # This rank's label corrections of the current epoch, for the other ranks.
        self.pending_corrections: list[tuple[np.ndarray, np.ndarray]] = []

    def distributed_network(self) -> nn.Module:
        """The multiscale forward, in DDP when several ranks train."""
        network = MultiScaleNetwork(self.model)
        if not self.ctx.enabled:
            return network
        device_ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
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
        lr = self.config.optim.lr
        if self.config.optim.schedule == "poly":
            lr *= (1.0 - self.iteration / self.total_iterations) ** self.config.optim.poly_power
        for optimizer in (o for o in (self.optimizer, self.arm_optimizer) if o is not None):
            for group in optimizer.param_groups:
                group["lr"] = lr
        return lr

    # ---- losses

    def loss_terms(self, logits_per_scale: list[torch.Tensor], target: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """(what to backpropagate, logged terms). The network minimises the method's loss;
        with ARM, ARM ascends the same loss, or during warm-up its own detached objective."""
        arm = None if self.arm is None or self.arm_warming_up() else self.arm
        divisor = self.config.adele.logit_divisor
        logits = [z / divisor for z in logits_per_scale] if divisor != 1.0 else logits_per_scale
        supervised = torch.stack([self.pixel_loss_mean(z, target, arm) for z in logits]).mean()
        terms = {self.spec.pixel_loss: supervised.item()}
        network_loss = supervised
        if self.spec.consistency:
            consistency = multiscale_consistency(logits, target, self.config.adele.rho, self.config.adele.rho_mask, self.ignore_index, backend=self.config.loss.backend)
            # (sum_k CE_k + lambda L_ms) / S, method-spec section 4.
            network_loss = supervised + self.config.adele.lam * consistency / len(logits)
            terms["consistency"] = consistency.item()
        terms["total"] = network_loss.item()
        if self.arm is not None and arm is None:
            objective = self.arm_warmup_objective(logits, target)
            terms["arm_objective"] = objective.item()
            return network_loss + objective, terms
        return network_loss, terms

    def pixel_loss_mean(self, logits: torch.Tensor, target: torch.Tensor, arm: nn.Module | None) -> torch.Tensor:
        if self.spec.pixel_loss == "ce":
            return arm_cross_entropy(logits, target, arm, self.ignore_index, backend=self.config.loss.backend)
        from noisyseg.training.losses import segmentation_loss

        loss = self.config.loss
        return segmentation_loss(self.spec.pixel_loss, logits, target, arm, self.ignore_index, gce_q=loss.gce_q, ohem_threshold=loss.ohem_threshold, ohem_min_kept=loss.ohem_min_kept)

    def arm_warmup_objective(self, logits_per_scale: list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        """ARM's objective on detached per-pixel losses: only ARM's parameters get a gradient."""
        from noisyseg.training.losses import pixel_loss

        loss = self.config.loss
        objectives = []
        for logits in logits_per_scale:
            detached = logits.detach()
            losses, counted = pixel_loss(self.spec.pixel_loss, detached, target, self.ignore_index, gce_q=loss.gce_q, ohem_threshold=loss.ohem_threshold, ohem_min_kept=loss.ohem_min_kept)
            objectives.append(arm_reweighted_loss(losses.detach(), torch.softmax(detached.float(), dim=1), counted, self.arm))
        return torch.stack(objectives).mean()

    # ---- one epoch

    def correction_classes(self, epoch: int) -> torch.Tensor | None:
        """(C,) bools of the classes corrected during/at the end of `epoch`, or None if none."""
        if not self.spec.correction:
            return None
        return self.triggers.correction_classes(epoch, self.config.adele.correction_timing, self.config.adele.correction_every)

    def correct_rows(self, rows: torch.Tensor, labels: torch.Tensor, probs: torch.Tensor, classes: torch.Tensor) -> int:
        """Correct the label-store rows `rows` from `probs`; returns the number of changed pixels."""
        corrected = adele.correct_labels(labels, probs, classes, self.config.adele.tau, self.config.adele.refuse_absent_classes, self.ignore_index)
        differs = corrected != labels
        changed = int(differs.sum())
        if changed:
            new_labels = corrected.to(torch.uint8).cpu().numpy()
            self.store.update(rows.numpy(), new_labels)
            if self.ctx.enabled:
                changed_rows = differs.flatten(1).any(dim=1).cpu().numpy()
                self.pending_corrections.append((rows.numpy()[changed_rows], new_labels[changed_rows]))
        return changed

    def share_corrections(self) -> None:
        """Apply every rank's corrections of this epoch to this rank's copy of the store.

        Within an epoch each slice belongs to exactly one rank's shard, so the rows are disjoint
        and no rank has read a row that another corrected: the copies end equal to the store a
        single process would build.
        """
        if not self.ctx.enabled:
            return
        height, width = self.store.labels.shape[1:]
        rows = np.concatenate([r for r, _ in self.pending_corrections] or [np.zeros(0, dtype=np.int64)])
        labels = np.concatenate([lab for _, lab in self.pending_corrections] or [np.zeros((0, height, width), dtype=np.uint8)])
        self.pending_corrections = []
        all_rows, all_labels = all_gather_rows(self.ctx, rows.astype(np.int64), labels, "the label-store exchange")
        if len(all_rows):
            self.store.update(all_rows, all_labels)

    def train_step(self, rows: torch.Tensor, counters: EpochCounters, correct: torch.Tensor | None, loss_weight: float = 1.0, padding: bool = False) -> None:
        """One step on `rows`: this rank's shard of a global batch (all of it for one process).

        `loss_weight` rescales this rank's mean loss so that DDP's gradient average is the
        global batch mean; `padding` rows (weight 0) are neither counted nor corrected.
        """
        fault_point("train-step")
        images = self.data.train_images[rows].to(self.ctx.device).contiguous(memory_format=self.memory_format)
        target = torch.from_numpy(self.store.labels[rows.numpy()]).long().to(self.ctx.device)
        self.set_learning_rate()
        with peer_errors(self.ctx, "the forward pass (DDP's buffer broadcast)"):
            logits = self.network(images, self.scales)
        loss, terms = self.loss_terms(logits, target)
        if loss_weight != 1.0:
            loss = loss * loss_weight
        loss_value, terms = self.global_loss(loss, terms, loss_weight)
        if not math.isfinite(loss_value):
            raise RuntimeError(
                f"non-finite loss ({loss_value}) at epoch {self.epoch + 1}, iteration {self.iteration + 1}: "
                f"training stopped, the last complete checkpoint in {self.run_dir} is kept (try a lower optim.lr)"
            )
        self.optimise(loss)
        counters.add_losses(terms)
        if padding:
            return
        self.count_training_pass(rows, logits[self.scales.index(1.0)].detach().argmax(dim=1), target, counters)
        if correct is not None and self.config.adele.correction_timing == "iteration":
            counters.corrected_pixels += self.correct_rows(rows, target, self.correction_probs(logits), correct)

    def global_loss(self, loss: torch.Tensor, terms: dict[str, float], loss_weight: float) -> tuple[float, dict[str, float]]:
        """(backpropagated loss, logged terms) of the global batch: this rank's for one process,
        else the mean over ranks of the weighted values, so every rank logs and judges the same."""
        if not self.ctx.enabled:
            return loss.item(), terms
        names = sorted(terms)
        local = torch.tensor([loss.item()] + [terms[n] * loss_weight for n in names], dtype=torch.float64)
        mean = (all_reduce_sum(self.ctx, local, "the loss all-reduce") / self.ctx.world_size).tolist()
        return mean[0], dict(zip(names, mean[1:], strict=True))

    def optimise(self, loss: torch.Tensor) -> None:
        """One step: the network descends, ARM (when present) ascends (`maximize=True`).

        With several ranks DDP averages the network's gradients during the backward pass and
        ARM's are averaged here, so every replica takes the same step.
        """
        optimizers = [o for o in (self.optimizer, self.arm_optimizer) if o is not None]
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        with peer_errors(self.ctx, "the gradient all-reduce"):
            loss.backward()
        if self.arm is not None:
            average_gradients(self.ctx, list(self.arm.parameters()), "the ARM gradient all-reduce")
        for optimizer in optimizers:
            optimizer.step()
        self.iteration += 1

    def correction_probs(self, logits_per_scale: list[torch.Tensor]) -> torch.Tensor:
        if self.config.adele.correction_prediction == "single":
            return torch.softmax(logits_per_scale[self.scales.index(1.0)].detach().float(), dim=1)
        return mean_probabilities(logits_per_scale)

    def count_training_pass(self, rows: torch.Tensor, prediction: torch.Tensor, target: torch.Tensor, counters: EpochCounters) -> None:
        counters.train_meter.update(prediction, target)
        if counters.noise is not None and self.data.clean_train_labels is not None:
            index = rows.numpy()
            counters.noise += noise_diagnostics(prediction, self.data.train_labels[index], self.data.clean_train_labels[index], self.data.num_classes, self.ignore_index)

    def run_epoch(self) -> EpochCounters:
        """Train one epoch (self.epoch is the number of completed epochs before it)."""
        epoch = self.epoch + 1
        counters = EpochCounters(
            train_meter=ConfusionMeter(self.data.num_classes, self.ignore_index),
            noise=NoiseCounts.zeros(self.data.num_classes) if self.data.clean_train_labels is not None else None,
        )
        correct = self.correction_classes(epoch)
        order = torch.randperm(len(self.data.train_ids), generator=self.shuffle)
        self.model.train()
        batches = order.split(self.config.batch_size)
        with tqdm(batches, desc=f"{self.config.method} epoch {epoch}/{self.config.epochs}", unit="batch", disable=self.config.quiet or not self.ctx.is_main, leave=False) as progress:
            for batch in progress:
                shard = shard_batch(batch, self.ctx.rank, self.ctx.world_size)
                self.train_step(shard.rows, counters, correct, shard.loss_weight, shard.padding)
                progress.set_postfix(loss=f"{counters.loss_sums['total'] / counters.steps:.4f}")
        broadcast_buffers(self.ctx, self.model, "the batch-norm statistics broadcast")
        self.share_corrections()
        self.reduce_counters(counters)
        return counters

    def reduce_counters(self, counters: EpochCounters) -> None:
        """Sum the epoch's training-pass counts over ranks (what the trigger fits)."""
        if not self.ctx.enabled:
            return
        counters.train_meter.matrix = all_reduce_counts(self.ctx, counters.train_meter.matrix, "the training-IoU all-reduce")
        if counters.noise is not None:
            counters.noise = NoiseCounts(
                all_reduce_counts(self.ctx, counters.noise.pred_vs_clean, "the IoU_el all-reduce"),
                all_reduce_counts(self.ctx, counters.noise.pred_vs_noisy, "the IoU_m all-reduce"),
            )
        counters.corrected_pixels = self.total_over_ranks(counters.corrected_pixels)

    def total_over_ranks(self, count: int) -> int:
        return int(all_reduce_sum(self.ctx, torch.tensor([count], dtype=torch.int64), "a count all-reduce").item())

    def correct_after_epoch(self, epoch: int) -> int:
        """`epoch` timing: recompute predictions on the whole train split, then correct."""
        classes = self.correction_classes(epoch)
        if classes is None or self.config.adele.correction_timing != "epoch":
            return 0
        scales = self.scales if self.config.adele.correction_prediction == "multiscale" else [1.0]
        block = shard_indices(len(self.data.train_ids), self.ctx.rank, self.ctx.world_size)
        changed = 0
        if len(block):
            probs = predict_batches(self.model, self.data.train_images[block.start : block.stop], self.config.eval_batch_size, scales)
            labels = torch.from_numpy(self.store.labels[block.start : block.stop].copy()).long().to(self.ctx.device)
            changed = self.correct_rows(torch.arange(block.start, block.stop), labels, probs, classes)
        self.share_corrections()
        return self.total_over_ranks(changed)

    def finish_epoch(self, counters: EpochCounters) -> dict[str, Any]:
        """Trigger, end-of-epoch correction, evaluation; returns the epoch's metrics record."""
        self.epoch += 1
        epoch = self.epoch
        train_iou = iou_per_class(counters.train_meter.matrix)
        fired = self.triggers.update(epoch, train_iou, self.config.adele.r, self.config.adele.min_fit_points, self.config.adele.min_rise, detect=self.spec.correction, adaptive=self.spec.adaptive)
        for c in fired:
            log.info("epoch %d: label correction triggered for class %d (%s)", epoch, c, self.data.info.classes[c])
        corrected = counters.corrected_pixels + self.correct_after_epoch(epoch)
        if corrected:
            log.info("epoch %d: %d training label pixels corrected", epoch, corrected)
        record: dict[str, Any] = {
            "epoch": epoch,
            "iteration": self.iteration,
            "method": self.config.method,
            "lr": self.optimizer.param_groups[0]["lr"],
            "loss": counters.mean_losses(),
            "train_iou": foreground_dict(train_iou),
            "val": evaluate_split(self.model, self.data.val, self.data.num_classes, self.ignore_index, self.config.eval_batch_size, self.ctx),
            "test": evaluate_split(self.model, self.data.test, self.data.num_classes, self.ignore_index, self.config.eval_batch_size, self.ctx),
            "trigger": self.triggers.record(),
            "labels_changed_fraction": self.store.changed_fraction(self.data.train_labels),
            "corrected_pixels": corrected,
        }
        if counters.noise is not None:
            iou_el, iou_m = early_learning_memorization_iou(counters.noise)
            record["iou_el"], record["iou_m"] = foreground_dict(iou_el), foreground_dict(iou_m)
        return record

    # ---- bookkeeping

    def model_info(self) -> ModelInfo:
        return ModelInfo(
            architecture=self.config.model.architecture,
            model_kwargs=self.model_kwargs,
            class_names=list(self.data.info.classes),
            normalization="zscore",
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
        }
        write_checkpoint(self.run_dir.path, tensors, state, self.store.save)
        self.saved_epoch = self.epoch

    def load_checkpoint(self, directory: Path) -> None:
        tensors, state = read_checkpoint(directory)
        try:
            self.model.load_state_dict(unprefixed("model", tensors))
            self.optimizer.load_state_dict(unflatten_optimizer("net", tensors, state["optimizers"]["net"]))
            if self.arm is not None and self.arm_optimizer is not None:
                self.arm.load_state_dict(unprefixed("arm", tensors))
                self.arm_optimizer.load_state_dict(unflatten_optimizer("arm", tensors, state["optimizers"]["arm"]))
            torch.set_rng_state(tensors["rng.torch"])
            self.shuffle.set_state(tensors["rng.shuffle"])
        except (KeyError, RuntimeError) as err:
            raise ValueError(f"{directory}: checkpoint does not match this run's model/method ({err})") from err
        numpy_state = state["rng"]["numpy"]
        np.random.set_state((numpy_state[0], np.array(numpy_state[1], dtype=np.uint32), *numpy_state[2:]))
        python_state = state["rng"]["python"]
        random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
        self.store = LabelStore.load(directory, self.data.train_labels, self.data.train_ids)
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
        log.info("training %s for %d epochs (%d batches each) into %s", self.config.method, self.config.epochs, self.batches_per_epoch, self.run_dir)
        while self.epoch < self.config.epochs:
            record = self.finish_epoch(self.run_epoch())
            self.history.append(record)
            self.verify_replicas()
            self.persist(record)
            log.info("epoch %d: loss %.4f, val mIoU %s, test mIoU %s, labels changed %.4f", record["epoch"], record["loss"]["total"], percent(record["val"]["miou"]), percent(record["test"]["miou"]), record["labels_changed_fraction"])
        summary = self.summary()
        if self.ctx.is_main:
            self.run_dir.write_summary(summary)
            plot_curves(self.run_dir.path)
        return summary

    def persist(self, record: dict[str, Any]) -> None:
        """Rank 0 writes the best model, the checkpoint and the metrics; a failed write (a full
        disk) stops every rank with one clear error and leaves the last complete checkpoint."""
        error = None
        if self.ctx.is_main:
            try:
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
        digest = state_digest(tensors, [self.store.labels], json.dumps(self.triggers.to_json(), sort_keys=True))
        verify_agreement(self.ctx, digest, f"the state after epoch {self.epoch}")
        if self.ctx.is_main:
            log.info("epoch %d: replicas agree across %d ranks (weights, ARM, triggers, label store: sha256 %s)", self.epoch, self.ctx.world_size, digest[:16])

    def check_free_space(self) -> None:
        """Refuse to start when the run directory cannot hold two checkpoints (old and new)."""
        tensors = [*self.model.state_dict().values(), *(self.arm.state_dict().values() if self.arm is not None else [])]
        # Weights, SGD momentum of the same size, the best model file, the label store.
        checkpoint_bytes = 3 * sum(t.numel() * t.element_size() for t in tensors) + self.store.labels.nbytes
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
    data, error = None, None
    try:
        data = load_run_data(config)
    except (ValueError, OSError) as err:
        error = err
    agree_on_error(ctx, error, "loading the data")
    assert data is not None
    trainer = Trainer(config, data, ctx)
    error = None
    try:
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
    ctx = init_distributed(config.distributed.backend, config.distributed.timeout_s)
    if not ctx.is_main:
        logging.getLogger("noisyseg").setLevel(logging.WARNING)  # progress is rank 0's to report
    previous_threads, previous_deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        # Process-wide torch settings, restored afterwards so callers are not surprised.
        if config.threads:
            torch.set_num_threads(config.threads)
        torch.use_deterministic_algorithms(config.deterministic)
        summary = set_up_run(config, resume, ctx).fit()
        shutdown(ctx)
        return summary
    finally:
        torch.set_num_threads(previous_threads)
        torch.use_deterministic_algorithms(previous_deterministic)
