"""Optimisers and the learning-rate schedules."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from noisyseg.config import OptimConfig


def make_optimizer(
    parameters: Iterable[nn.Parameter], optim: OptimConfig, maximize: bool = False
) -> torch.optim.Optimizer:
    """SGD (the papers) or Adam with `optim.momentum` as beta1; `maximize` for ARM's ascent."""
    if optim.optimizer == "adam":
        betas = (optim.momentum, 0.999)
        return torch.optim.Adam(
            parameters, lr=optim.lr, betas=betas, weight_decay=optim.weight_decay, maximize=maximize
        )
    return torch.optim.SGD(
        parameters, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay, maximize=maximize
    )


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


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
