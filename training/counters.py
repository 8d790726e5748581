"""What one epoch's training passes accumulate, on the training device (no host waits), and
their sum over ranks: each count says how it is reduced, as torchmetrics' states do."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from noisyseg.evaluation.metrics import ConfidenceMeter, ConfusionMeter, NoiseMeter
from noisyseg.runtime.distributed import DistContext, all_reduce_counts, all_reduce_sum


@dataclass
class EpochCounters:
    """One epoch's training-pass counts and loss sums."""

    train_meter: ConfusionMeter
    noise: NoiseMeter | None
    confidence: ConfidenceMeter | None  # ARM's inputs over the pass (ARM methods only)
    corrected_pixels: torch.Tensor  # () int64
    first_nonfinite: torch.Tensor  # () int64: the first iteration with a non-finite loss, or -1
    loss_sums: dict[str, torch.Tensor] = field(default_factory=dict)
    steps: int = 0

    @classmethod
    def zeros(
        cls, num_classes: int, ignore_index: int, device: torch.device, noise: bool, confidence: bool = False
    ) -> EpochCounters:
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

    def reduce(self, ctx: DistContext) -> None:
        """Sum the counts over ranks (what the trigger fits); every rank then logs the global
        batch's loss, the mean over ranks of the weighted terms."""
        if not ctx.enabled:
            return
        self.train_meter.matrix = all_reduce_counts(ctx, self.train_meter.matrix, "the training-IoU all-reduce")
        if self.noise is not None:
            self.noise.vs_clean.matrix = all_reduce_counts(ctx, self.noise.vs_clean.matrix, "the IoU_el all-reduce")
            self.noise.vs_noisy.matrix = all_reduce_counts(ctx, self.noise.vs_noisy.matrix, "the IoU_m all-reduce")
        if self.confidence is not None:
            self.confidence.counts = all_reduce_sum(ctx, self.confidence.counts, "the ARM confidence all-reduce")
        self.corrected_pixels = torch.tensor(total_over_ranks(ctx, self.corrected_pixels))
        for key, total in self.loss_sums.items():
            summed = all_reduce_sum(ctx, total.double().reshape(1), "the loss all-reduce")
            self.loss_sums[key] = summed[0] / ctx.world_size


def total_over_ranks(ctx: DistContext, count: torch.Tensor) -> int:
    """Sum of an integer count over ranks, on the host."""
    return int(all_reduce_sum(ctx, count.reshape(1).to(torch.int64), "a count all-reduce").item())
