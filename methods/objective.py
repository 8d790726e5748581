"""A method's loss (method-spec sections 4 and 5): what one training step backpropagates.

`MethodObjective` composes the terms a `MethodSpec` switches on: the per-pixel loss (CE, GCE,
OHEM or the T-Loss; ARM-weighted when ARM is on) averaged over the input scales, ADELE's
multiscale consistency, and during ARM's warm-up ARM's own objective on detached losses. The
trainer owns when (the step) and with which ARM (warming up or not); this module owns what. It is
a module because a loss may learn: the T-Loss's tolerance is its parameter, which the trainer
optimises with the network's and checkpoints with the run.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from noisyseg.config import TrainConfig
from noisyseg.kernels import arm_cross_entropy, arm_reweighted_loss, multiscale_consistency
from noisyseg.method_table import METHOD_SPECS
from noisyseg.methods.losses import TLoss, pixel_loss, segmentation_loss

log = logging.getLogger(__name__)


class MethodObjective(nn.Module):
    """The loss of `config.method` on the logits of every input scale (its parameters: the
    T-Loss's tolerance, for `tloss`)."""

    def __init__(self, config: TrainConfig, ignore_index: int) -> None:
        super().__init__()
        self.spec = METHOD_SPECS[config.method]
        self.adele, self.loss = config.adele, config.loss
        self.ignore_index = ignore_index
        self.tloss = TLoss(config.loss.tloss_log_nu) if self.spec.pixel_loss == "tloss" else None
        if self.tloss is not None and config.optim.optimizer != "adam":
            # Measured on the phantom (docs/results.md): under SGD at lr 0.2 the T-Loss, whose
            # gradient goes through the softmax's probabilities, never left all-background.
            log.warning(
                "method tloss with optim.optimizer=%s: the T-Loss's authors train it with Adam "
                "(--set optim.optimizer=adam --set optim.lr=0.001); under SGD it can stay at background",
                config.optim.optimizer,
            )

    def forward(
        self,
        logits_per_scale: list[torch.Tensor],
        target: torch.Tensor,
        arm: nn.Module | None,
        arm_warming_up: bool,
        consistency: bool = True,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(what to backpropagate, logged terms as detached tensors). The network minimises the
        method's loss; `arm` ascends the same loss, or while `arm_warming_up` its own detached
        objective (the network then sees uniform weights). `consistency` False leaves out the
        method's consistency term (`adele.consistency_start`: the trainer knows the triggers)."""
        weighting = None if arm_warming_up else arm
        # The reference code's temperature divides the logits inside its CE only: the consistency
        # term and its rho mask see the undivided logits (method-spec section 4).
        divisor = self.adele.logit_divisor
        logits = [z / divisor for z in logits_per_scale] if divisor != 1.0 else logits_per_scale
        supervised = torch.stack([self.pixel_loss_mean(z, target, weighting) for z in logits]).mean()
        terms = {self.spec.pixel_loss: supervised.detach()}
        if self.tloss is not None:
            terms["tloss_nu"] = self.tloss.nu.detach()
        network_loss = supervised
        if self.spec.consistency and consistency:
            kl_term = multiscale_consistency(
                logits_per_scale,
                target,
                self.adele.rho,
                self.adele.rho_mask,
                self.ignore_index,
                backend=self.loss.backend,
            )
            # (sum_k CE_k + lambda L_ms) / S, method-spec section 4.
            network_loss = supervised + self.adele.lam * kl_term / len(logits)
            terms["consistency"] = kl_term.detach()
        terms["total"] = network_loss.detach()
        if arm is not None and arm_warming_up:
            objective = self.arm_warmup_objective(logits, target, arm)
            terms["arm_objective"] = objective.detach()
            return network_loss + objective, terms
        return network_loss, terms

    def pixel_loss_mean(self, logits: torch.Tensor, target: torch.Tensor, arm: nn.Module | None) -> torch.Tensor:
        if self.spec.pixel_loss == "ce":
            return arm_cross_entropy(logits, target, arm, self.ignore_index, backend=self.loss.backend)
        return segmentation_loss(
            self.spec.pixel_loss,
            logits,
            target,
            arm,
            self.ignore_index,
            gce_q=self.loss.gce_q,
            ohem_threshold=self.loss.ohem_threshold,
            ohem_min_kept=self.loss.ohem_min_kept,
            tloss=self.tloss,
        )

    def arm_warmup_objective(
        self, logits_per_scale: list[torch.Tensor], target: torch.Tensor, arm: nn.Module
    ) -> torch.Tensor:
        """ARM's objective on detached per-pixel losses: only ARM's parameters get a gradient."""
        objectives = []
        for logits in logits_per_scale:
            detached = logits.detach()
            losses, counted = pixel_loss(
                self.spec.pixel_loss,
                detached,
                target,
                self.ignore_index,
                gce_q=self.loss.gce_q,
                ohem_threshold=self.loss.ohem_threshold,
                ohem_min_kept=self.loss.ohem_min_kept,
                tloss=self.tloss,
            )
            objectives.append(
                arm_reweighted_loss(losses.detach(), torch.softmax(detached.float(), dim=1), counted, arm)
            )
        return torch.stack(objectives).mean()
