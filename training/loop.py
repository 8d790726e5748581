"""The training loop of a run, on a CPU or GPU, resumable.

`train(config)` (`trainer.py`) trains `config.method` (the method table in `config.py`) on
`config.data` (training masks from `config.labels` when given) into the run directory
`config.out` (its files: `run/run_dir.py`). The trainer decides when things happen; what
happens belongs elsewhere: the batches come from a cached or streamed source (`batches.py`),
each method's loss from `methods/objective.py`, the labels and ADELE's trigger, correction and
guard from `methods.hooks.LabelHook`, ARM's ascent from `methods.hooks.ArmHook`, the epoch's
counts from `counters.py`, evaluation from `evaluation/inference.py`.

Design decisions (method-spec sections 2 to 5; the config docstrings give the defaults):
- Batches are drawn from a permutation of a seeded `torch.Generator`, whose state is
  checkpointed, and augmentation draws from generators seeded by (seed, epoch, item), so an
  interrupted and resumed run gives the same weights as an uninterrupted one, with or without
  workers (deterministic CPU algorithms; on CUDA deterministic kernels where PyTorch has them).
- Device and precision (`runtime/device.py`): the network's forward runs under autocast (bf16
  by default on CUDA); the loss reads the half-precision logits (the fused kernels accumulate in
  fp32) and ARM stays fp32; fp16 scales the loss with a GradScaler.
- Host synchronisation: a step queues its work and returns. Loss terms, confusion counts,
  corrected-pixel counts, the first non-finite loss and the label corrections stay on the
  device. The host waits only every `SYNC_EVERY` steps (progress bar, non-finite check), at the
  epoch's end (label store, trigger, evaluation, checkpoint) and inside fp16's GradScaler.
- Multiscale: the input is resized by each scale (bilinear, align_corners=True) and each
  output's logits back to label size; `baseline-ms` averages the CE of all scales at every step.
- Training IoU (what the trigger fits) and IoU_el/IoU_m come from the training passes: the
  scale-1.0 prediction against the labels trained on in that step, counts summed per epoch.
- `model.safetensors` follows the run's selection rule (`selection.py`: noisy validation
  masks, the dataset's, or Label Wave without any); the best clean-validation epoch stays
  tracked beside it.
- Several processes (torchrun): DDP with global batches sharded over the ranks; counts, losses
  and label corrections exchanged so every rank decides the same; only rank 0 writes
  (`runtime/distributed.py`, `docs/distributed.md`).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from noisyseg.config import TrainConfig
from noisyseg.data.run_data import RunData
from noisyseg.evaluation.inference import evaluate_split, foreground_dict
from noisyseg.evaluation.metrics import early_learning_memorization_iou, iou_per_class
from noisyseg.method_table import METHOD_SPECS
from noisyseg.methods.hooks import ArmHook, LabelHook
from noisyseg.methods.objective import MethodObjective
from noisyseg.models.model_file import ModelInfo, load_weights, save_model
from noisyseg.run.checkpoint import (
    check_checkpoint_config,
    flatten_optimizer,
    prefixed,
    read_checkpoint,
    restore_rng,
    rng_state,
    unflatten_optimizer,
    unprefixed,
    write_checkpoint,
)
from noisyseg.run.run_dir import RunDir, build_summary
from noisyseg.runtime.device import resolve_precision
from noisyseg.runtime.distributed import (
    DistContext,
    agree_on_error,
    average_gradients,
    broadcast_buffers,
    fault_point,
    peer_errors,
    shard_batch,
    shard_indices,
    state_digest,
    verify_agreement,
)
from noisyseg.training.batches import Batch, BatchSource, CachedBatches, StreamedBatches
from noisyseg.training.counters import EpochCounters, total_over_ranks
from noisyseg.training.fork import forks, keep_fork_point
from noisyseg.training.optim import lr_factor, set_lr
from noisyseg.training.prediction_changes import PredictionChanges
from noisyseg.training.selection import default_rule, keeps_epoch, selection_summary
from noisyseg.training.tensorboard_log import TensorBoardLog

log = logging.getLogger(__name__)

# Steps between the host's looks at the device (progress bar loss, non-finite check): each look
# waits for the queued GPU work, so looking every step would serialise host and GPU.
SYNC_EVERY = 10


class Trainer:
    """One run: the network and its optimiser, the hooks of its method, the batch source and
    the history. Built by `trainer.make_trainer`, which composes the parts."""

    def __init__(
        self,
        config: TrainConfig,
        data: RunData,
        ctx: DistContext,
        model: nn.Module,
        network: nn.Module,
        objective: MethodObjective,
        optimizer: torch.optim.Optimizer,
        labels: LabelHook,
        arm: ArmHook | None,
        memory_format: torch.memory_format,
    ) -> None:
        self.config, self.data, self.ctx, self.device = config, data, ctx, ctx.device
        self.precision = resolve_precision(config.precision, self.device)
        self.scaler = self.precision.grad_scaler(self.device)
        self.spec = METHOD_SPECS[config.method]
        self.ignore_index = data.info.ignore_index
        self.objective = objective  # a module: a loss may learn (T-Loss's tolerance)
        self.run_dir = RunDir(config.out)
        self.scales = list(config.adele.scales) if self.spec.multiscale else [1.0]
        self.model, self.network, self.optimizer = model, network, optimizer
        self.labels, self.arm = labels, arm
        self.optimizers = [optimizer] + ([arm.optimizer] if arm is not None else [])
        self.shuffle = torch.Generator().manual_seed(config.seed)
        source: type[BatchSource] = CachedBatches if data.cached else StreamedBatches
        self.batches = source(config, data, labels.corrections, self.device, memory_format)
        self.epoch = self.iteration = 0
        self.history: list[dict[str, Any]] = []
        self.best_val: float | None = None
        self.best_epoch: int | None = None
        self.saved_epoch = 0  # the epoch of the last complete checkpoint
        # Checkpoint selection (`selection.py`): the rule model.safetensors follows; Label Wave's input.
        self.selection_rule = default_rule(data.noisy_val is not None, len(data.val) > 0)
        self.forks = forks(config, self.selection_rule)  # `adele.fork` applies to this run
        self.tensorboard: TensorBoardLog | None = None  # rank 0's event files, opened by fit()
        self.prediction_changes = PredictionChanges(
            data.train_labels.shapes, self.device, data.cached, ctx, labels.workdir
        )

    @property
    def total_iterations(self) -> int:
        return math.ceil(len(self.data.train_ids) / self.config.batch_size) * self.config.epochs

    def set_learning_rate(self) -> float:
        """This step's learning rates (the network's returned); ARM's follows the same schedule."""
        optim = self.config.optim
        factor = lr_factor(optim.schedule, self.iteration, self.total_iterations, optim.poly_power)
        set_lr(self.optimizer, optim.lr * factor)
        if self.arm is not None:
            set_lr(self.arm.optimizer, self.arm.lr * factor)
        return optim.lr * factor

    def loss_terms(
        self, logits_per_scale: list[torch.Tensor], target: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The method's loss and its logged terms (`objective.py`), with ARM warming up or not."""
        warming_up = self.arm is not None and self.arm.warming_up(self.iteration, self.total_iterations)
        # `first_trigger` waits for a trigger only in a method that corrects: the consistency-only
        # ablation (`adele-consistency`) detects none and keeps its term from the start.
        start = self.config.adele.consistency_start
        consistency = start == "always" or not self.spec.correction or self.labels.triggers.any_triggered()
        return self.objective(
            logits_per_scale, target, None if self.arm is None else self.arm.arm, warming_up, consistency
        )

    # ---- one step

    def train_step(
        self,
        batch: Batch,
        counters: EpochCounters,
        correct: torch.Tensor | None,
        loss_weight: float = 1.0,
        padding: bool = False,
    ) -> None:
        """One step on `batch`: this rank's shard of a global batch (all of it for one process).
        `loss_weight` rescales this rank's mean loss so that DDP's gradient average is the
        global batch mean; `padding` rows (weight 0) are neither counted nor corrected."""
        fault_point("train-step")
        self.set_learning_rate()
        with peer_errors(self.ctx, "the forward pass (DDP's buffer broadcast)"), self.precision.autocast(self.device):
            logits = self.network(batch.images, self.scales)
        loss, terms = self.loss_terms(logits, batch.target)
        if loss_weight != 1.0:
            loss = loss * loss_weight
        counters.note_nonfinite(loss, self.iteration + 1)
        self.optimise(loss)
        counters.add_losses(terms, loss_weight)
        if padding:
            return
        prediction = self.count_training_pass(batch, logits[self.scales.index(1.0)].detach(), counters)
        self.prediction_changes.observe(prediction, batch.rows, batch.geometry)
        corrected = self.labels.correct_step(batch.rows, batch.geometry, batch.target, logits, self.scales, correct)
        if corrected is not None:
            counters.corrected_pixels += corrected

    def optimise(self, loss: torch.Tensor) -> None:
        """The network descends, ARM (when present) ascends (`maximize=True`)."""
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        with peer_errors(self.ctx, "the gradient all-reduce"):
            self.scaler.scale(loss).backward()
        if self.arm is not None:
            self.arm.average_gradients(self.ctx)
        average_gradients(self.ctx, list(self.objective.parameters()), "the loss-parameter gradient all-reduce")
        for optimizer in self.optimizers:
            self.scaler.step(optimizer)  # a plain step unless fp16 scales the loss
        self.scaler.update()
        self.iteration += 1

    def count_training_pass(self, batch: Batch, logits: torch.Tensor, counters: EpochCounters) -> torch.Tensor:
        """Dataset-level counts of the scale-1.0 `logits`: the prediction against the labels
        trained on (the training IoU the trigger fits) and, when clean masks are known, the noise
        diagnostics; with ARM, the histogram of its confidence input. Returns the prediction."""
        prediction = logits.argmax(dim=1)
        counters.train_meter.update(prediction, batch.target)
        if counters.noise is not None and batch.clean is not None:
            counters.noise.update(prediction, batch.annotations, batch.clean)
        if counters.confidence is not None:
            counters.confidence.update(torch.softmax(logits.float(), dim=1), batch.target, batch.clean)
        return prediction

    def check_finite(self, counters: EpochCounters) -> None:
        """Stop (every rank) if a step of this epoch had a non-finite loss (a host wait)."""
        first = int(counters.first_nonfinite)
        if total_over_ranks(self.ctx, torch.tensor(int(first >= 0))):
            where = f"iteration {first}" if first >= 0 else f"another rank, by iteration {self.iteration}"
            raise RuntimeError(
                f"non-finite loss at epoch {self.epoch + 1}, {where}: "
                f"training stopped, the last complete checkpoint in {self.run_dir} is kept (try a lower optim.lr)"
            )

    # ---- one epoch

    def run_epoch(self) -> EpochCounters:
        """Train one epoch (self.epoch is the number of completed epochs before it)."""
        epoch = self.epoch + 1
        counters = EpochCounters.zeros(
            self.data.num_classes,
            self.ignore_index,
            self.device,
            noise=self.data.clean_train_labels is not None,
            confidence=self.arm is not None,
        )
        correct = self.labels.correction_classes(epoch)
        order = torch.randperm(len(self.data.train_ids), generator=self.shuffle)
        self.model.train()
        shards = [
            shard_batch(batch, self.ctx.rank, self.ctx.world_size) for batch in order.split(self.config.batch_size)
        ]
        self.batches.start_epoch(epoch, shards)
        quiet = self.config.quiet or not self.ctx.is_main
        with tqdm(
            shards,
            desc=f"{self.config.method} epoch {epoch}/{self.config.epochs}",
            unit="batch",
            disable=quiet,
            leave=False,
        ) as progress:
            for step, shard in enumerate(progress, start=1):
                self.train_step(self.batches.next(shard.rows), counters, correct, shard.loss_weight, shard.padding)
                if step % SYNC_EVERY == 0:
                    self.check_finite(counters)
                    self.labels.corrections.flush()
                    progress.set_postfix(loss=f"{float(counters.loss_sums['total']) / counters.steps:.4f}")
        self.check_finite(counters)
        broadcast_buffers(self.ctx, self.model, "the batch-norm statistics broadcast")
        self.labels.corrections.sync()
        counters.reduce(self.ctx)
        return counters

    def correct_whole_images(self, classes: torch.Tensor) -> int:
        """`epoch` timing: predictions recomputed on this rank's block of the training images."""
        scales = self.scales if self.config.adele.correction_prediction == "multiscale" else [1.0]
        block = shard_indices(len(self.data.train_ids), self.ctx.rank, self.ctx.world_size)
        changed = self.batches.correct_whole_images(self.model, self.precision, block, scales, classes)
        self.labels.corrections.sync()
        return total_over_ranks(self.ctx, changed)

    def finish_epoch(self, counters: EpochCounters) -> dict[str, Any]:
        """Trigger, end-of-epoch correction, evaluation; returns the epoch's metrics record."""
        self.epoch += 1
        train_iou = iou_per_class(counters.train_meter.matrix)
        corrected = self.labels.end_epoch(
            self.epoch, train_iou, int(counters.corrected_pixels), self.correct_whole_images
        )
        record: dict[str, Any] = {
            "epoch": self.epoch,
            "iteration": self.iteration,
            "method": self.config.method,
            "lr": self.optimizer.param_groups[0]["lr"],
            "loss": counters.mean_losses(),
            "train_iou": foreground_dict(train_iou),
            "val": self.evaluate(self.data.val),
            "test": self.evaluate(self.data.test),
            **self.labels.record(corrected),
        }
        if self.data.noisy_val is not None:
            record["val_noisy"] = self.evaluate(self.data.noisy_val)
        record["prediction_change"] = self.prediction_changes.end_epoch()
        if counters.noise is not None:
            iou_el, iou_m = early_learning_memorization_iou(counters.noise.counts())
            record["iou_el"], record["iou_m"] = foreground_dict(iou_el), foreground_dict(iou_m)
        if self.arm is not None and counters.confidence is not None:
            record["arm"] = self.arm.record(counters.confidence, self.device)
        return record

    def evaluate(self, split: Any) -> dict[str, Any]:
        loader = self.config.loader
        with self.precision.autocast(self.device):
            return evaluate_split(
                self.model,
                split,
                self.data.num_classes,
                self.ignore_index,
                self.config.eval_batch_size,
                self.ctx,
                loader.eval_window,
                loader.eval_overlap,
                self.batches.eval_workers,
            )

    # ---- the run

    def fit(self) -> dict[str, Any]:
        """Train from the current epoch to `config.epochs`; writes the run's files but the
        summary; returns the summary."""
        batches = self.total_iterations // self.config.epochs
        log.info(
            "training %s for %d epochs (%d batches each) on %s in %s into %s",
            self.config.method,
            self.config.epochs,
            batches,
            self.device,
            self.precision.name,
            self.run_dir,
        )
        if self.ctx.is_main:
            self.tensorboard = TensorBoardLog(
                self.run_dir.path,
                self.data.info.classes,
                self.ignore_index,
                self.config.epochs,
                resume_after=self.epoch,
            )
        try:
            while self.epoch < self.config.epochs:
                record = self.finish_epoch(self.run_epoch())
                self.history.append(record)
                self.verify_replicas()
                # Before the checkpoint: a resumed run purges events after its checkpoint's epoch.
                if self.tensorboard is not None:
                    self.tensorboard.write_epoch(record, self.model, self.data.val)
                self.persist(record)
                log.info(
                    "epoch %d: loss %.4f, val mIoU %s, test mIoU %s, labels changed %.4f",
                    record["epoch"],
                    record["loss"]["total"],
                    percent(record["val"]["miou"]),
                    percent(record["test"]["miou"]),
                    record["labels_changed_fraction"],
                )
        finally:
            self.batches.close()
            if self.tensorboard is not None:
                self.tensorboard.close()
        triggers = self.labels.triggers.trigger_epoch
        return {  # `trainer.train` writes it, after `adele.fork`'s branch
            **build_summary(self.history, triggers, self.best_epoch),
            **selection_summary(self.history, self.selection_rule),
        }

    def persist(self, record: dict[str, Any]) -> None:
        """Rank 0 writes the best model, the checkpoint and the metrics; a failed write (a full
        disk) stops every rank with one clear error and leaves the last complete checkpoint."""
        error = None
        if self.ctx.is_main:
            try:
                if self.forks and self.labels.triggers.first_epoch() == self.epoch:
                    keep_fork_point(self.run_dir)  # before this epoch's checkpoint and model replace them
                self.track_best(record)
                self.save_checkpoint()
                fault_point("metrics-write")
                self.run_dir.write_metrics(self.history)  # always matches the checkpoint
            except OSError as err:
                kept = (
                    f"the last complete checkpoint (epoch {self.saved_epoch}) is kept"
                    if self.saved_epoch
                    else "no checkpoint was completed"
                )
                error = RuntimeError(
                    f"{self.run_dir}: could not write the outputs of epoch {record['epoch']} ({err}); "
                    f"training stopped, {kept}; free space and continue with --resume {self.run_dir}"
                )
        agree_on_error(self.ctx, error, f"writing the outputs of epoch {record['epoch']}")

    def track_best(self, record: dict[str, Any]) -> None:
        """Keep `model.safetensors` at the epoch the run's selection rule chooses (`selection.py`);
        the best validation epoch stays tracked for the checkpoint state."""
        val_miou = record["val"]["miou"]
        if val_miou is not None and (self.best_val is None or val_miou > self.best_val):
            self.best_val, self.best_epoch = val_miou, record["epoch"]
        if keeps_epoch(self.selection_rule, self.history):
            save_model(self.run_dir.model_file, self.model, self.model_info())

    def model_info(self) -> ModelInfo:
        return ModelInfo(
            architecture=self.config.model.architecture,
            model_kwargs=self.model_kwargs,
            class_names=list(self.data.info.classes),
            normalization=self.data.info.normalization,
            method=self.config.method,
            extra={
                "epoch": self.epoch,
                "selection": self.selection_rule,
                "val_miou": self.history[-1]["val"]["miou"],
                "config_hash": self.config.semantic_hash(),
            },
        )

    @property
    def model_kwargs(self) -> dict[str, Any]:
        return {**self.config.model.kwargs, "in_channels": self.data.in_channels, "num_classes": self.data.num_classes}

    def verify_replicas(self) -> None:
        """Stop unless every rank holds the same weights, ARM, trigger state and label store."""
        if not (self.ctx.enabled and self.config.distributed.verify_replicas):
            return
        tensors = [
            *self.model.state_dict().values(),
            *(self.arm.arm.state_dict().values() if self.arm is not None else []),
        ]
        digest = state_digest(
            tensors, [self.labels.store.maps.flat], json.dumps(self.labels.state_dict(), sort_keys=True)
        )
        verify_agreement(self.ctx, digest, f"the state after epoch {self.epoch}")
        if self.ctx.is_main:
            log.info(
                "epoch %d: replicas agree across %d ranks (weights, ARM, triggers, label store: sha256 %s)",
                self.epoch,
                self.ctx.world_size,
                digest[:16],
            )

    # ---- the checkpoint: the trainer's state and each hook's entry

    def save_checkpoint(self) -> None:
        rng_tensors, rng = rng_state(self.shuffle, self.device)
        tensors = {
            **prefixed("model", self.model.state_dict()),
            **prefixed("objective", self.objective.state_dict()),
            **rng_tensors,
        }
        opt_tensors, net_state = flatten_optimizer("net", self.optimizer)
        tensors.update(opt_tensors)
        optimizers = {"net": net_state}
        if self.arm is not None:
            arm_opt_tensors, optimizers["arm"], arm_tensors = self.arm.state_dict()
            tensors.update(arm_opt_tensors)
            tensors.update(arm_tensors)
        state = {
            "epoch": self.epoch,
            "iteration": self.iteration,
            "config": self.config.to_dict(),
            "config_hash": self.config.semantic_hash(),
            "optimizers": optimizers,
            "rng": rng,
            "triggers": self.labels.state_dict(),
            "history": self.history,
            "best": {
                "selection": self.selection_rule,
                "val_miou": self.history[-1]["val"]["miou"],
                "epoch": self.best_epoch,
            },
            "world_size": self.ctx.world_size,
            "grad_scaler": self.scaler.state_dict(),
        }
        write_checkpoint(
            self.run_dir.path,
            tensors,
            state,
            lambda directory: (self.labels.store.save(directory), self.prediction_changes.save(directory)),
        )
        self.saved_epoch = self.epoch

    def load_checkpoint(self, directory: Path) -> None:
        """Restore the state `save_checkpoint` wrote into `directory`."""
        tensors, state = read_checkpoint(directory)
        check_checkpoint_config(directory, state, self.config)
        load_weights(self.model, unprefixed("model", tensors), directory, self.config.model.architecture)
        load_weights(self.objective, unprefixed("objective", tensors), directory, f"{self.config.method} loss")
        try:
            self.optimizer.load_state_dict(unflatten_optimizer("net", tensors, state["optimizers"]["net"]))
            if self.arm is not None:
                self.arm.load_state_dict(
                    tensors,
                    state["optimizers"]["arm"],
                    lambda module, weights, name: load_weights(module, weights, directory, name),
                )
            restore_rng(tensors, state["rng"], self.shuffle, self.device)
        except (KeyError, RuntimeError) as err:
            raise ValueError(f"{directory}: checkpoint does not match this run's model/method ({err})") from err
        self.labels.load_state_dict(state["triggers"], directory)
        self.prediction_changes.load(directory)
        if self.scaler.is_enabled() and state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])
        self.epoch, self.iteration = int(state["epoch"]), int(state["iteration"])
        self.history = list(state["history"])
        self.best_val, self.best_epoch = state["best"]["val_miou"], state["best"]["epoch"]
        self.saved_epoch = self.epoch
        saved_world = int(state.get("world_size", 1))
        if saved_world != self.ctx.world_size:
            log.warning(
                "%s was written by %d rank(s), resuming with %d: batches are sharded differently from here on",
                directory,
                saved_world,
                self.ctx.world_size,
            )


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"
