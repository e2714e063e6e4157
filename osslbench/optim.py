"""A run's optimiser and schedule: what the Trainer builds from the validated ``[optim]`` and ``[train]`` tables."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .protocol import OptimConfig, TrainConfig


def make_optimizer(params: list[tuple[str, torch.nn.Parameter]], cfg: OptimConfig) -> torch.optim.Optimizer:
    """SGD or Adam; with ``decay_bn_bias = false`` no weight decay on 1-d parameters (BN, biases)."""
    decay = [p for n, p in params if cfg.decay_bn_bias or p.ndim > 1]
    no_decay = [p for n, p in params if not cfg.decay_bn_bias and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


@dataclass
class Schedule:
    """The schedule of one training run (student or teacher)."""

    epochs: int
    train: TrainConfig
    optim: OptimConfig
    seed: int
