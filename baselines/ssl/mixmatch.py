"""MixMatch: Berthelot, Carlini, Goodfellow, Papernot, Oliver, Raffel, "MixMatch: A Holistic Approach to
Semi-Supervised Learning", NeurIPS 2019 (Algorithm 1; code ``google-research/mixmatch``).

Label guessing: the average softmax over K weak views of each unlabelled image, sharpened with temperature
T (``Sharpen(p, T)_i = p_i^(1/T) / sum_j p_j^(1/T)``). Labelled images (one-hot targets) and the K views
(each with the guessed target) are concatenated, and every row is MixUp-ed with a row of a shuffled copy
of the concatenation, ``lambda ~ Beta(alpha, alpha)``, ``lambda' = max(lambda, 1 - lambda)`` per sample
(the official ``MixMode.augment_pair``), so each mixed row stays closer to its own image:

    L = H(p', softmax(z(x')))  [mixed labelled rows, soft cross-entropy]
        + lambda_u * w(t) * || q' - softmax(z(u')) ||^2 / L  [mixed unlabelled rows, mean over batch x classes]

with ``w(t)`` a linear ramp over the first ``rampup_fraction`` of training. Evaluation uses an EMA of the
weights (the Trainer's ``ema_decay``).

Simplification: the official code splits the mixed batch into ``1 + K`` interleaved chunks and keeps only the
first chunk's BatchNorm updates; here the whole mixed batch goes through the network in ONE forward pass,
so BatchNorm sees labelled and unlabelled rows together (as in every other method of the harness).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from osslbench.method import Batch, Method, MethodConfig
from osslbench.models.base import Net


@dataclass
class MixMatchConfig(MethodConfig):
    """MixMatch's CIFAR settings (paper, Sec. 4 / official code; docs/baselines.md).

    :param mu: unlabelled images per labelled image (1: 64 + 64).
    :param ema_decay: EMA of the weights used for evaluation (0.999).
    :param k: weak views of each unlabelled image averaged to guess its label (K = 2).
    :param temperature: sharpening temperature T (0.5).
    :param alpha: MixUp's Beta(alpha, alpha) parameter (0.75).
    :param lambda_u: maximum weight of the unlabelled loss (75 for CIFAR-10 in the paper; the SRD authors'
        script uses 75 for CIFAR-100 too).
    :param rampup_fraction: fraction of training over which ``lambda_u`` ramps up linearly from 0: the official
        code ramps over 1024 kimg = 16 "epochs" of 1024 iterations out of the 1024 "epochs" of the PyTorch
        reimplementation the SRD authors run, i.e. 16 / 1024 (the paper: "the first 16,000 steps").
    :param decoupled_wd: per-step decoupled weight decay ``w <- w * (1 - decoupled_wd)`` of the conv / linear
        weights after each Adam step (official code: ``wd = 0.02 * lr`` = 0.02 x 0.002 = 4e-5); Adam itself has
        no weight decay.
    """

    mu: float = 1.0
    ema_decay: float = 0.999
    k: int = 2
    temperature: float = 0.5
    alpha: float = 0.75
    lambda_u: float = 75.0
    rampup_fraction: float = 16.0 / 1024.0
    decoupled_wd: float = 0.02 * 0.002

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.k < 1:
            raise ValueError(f"k = {self.k} must be >= 1")
        if self.temperature <= 0 or self.alpha <= 0:
            raise ValueError("temperature and alpha must be > 0")
        if not 0.0 <= self.rampup_fraction <= 1.0 or not 0.0 <= self.decoupled_wd < 1.0:
            raise ValueError("rampup_fraction must be in [0, 1] and decoupled_wd in [0, 1)")


def sharpen(p: Tensor, temperature: float) -> Tensor:
    """``p_i^(1/T) / sum_j p_j^(1/T)`` per row (MixMatch Eq. 7)."""
    pt = p.pow(1.0 / temperature)
    return pt / pt.sum(dim=1, keepdim=True)


def guess_labels(logits_views: Tensor, k: int, temperature: float) -> Tensor:
    """Sharpened mean softmax over the ``k`` views; ``logits_views`` stacks the views: ``(k * n) x C``."""
    p = logits_views.detach().float().softmax(dim=1).view(k, -1, logits_views.shape[1]).mean(dim=0)
    return sharpen(p, temperature)


def mixup(x: Tensor, targets: Tensor, alpha: float, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """MixUp of every row with a row of a shuffled copy, ``lambda' = max(lambda, 1 - lambda)`` per row.

    Random numbers come from ``gen`` (the Trainer's per-epoch generator; torch's Beta sampler takes no
    generator, so lambda is drawn by numpy from a seed taken out of ``gen``).
    Returns the mixed inputs, the mixed targets and the per-row ``lambda'``.
    """
    n = x.shape[0]
    rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=gen)))
    lam = torch.from_numpy(rng.beta(alpha, alpha, n)).float()
    lam = torch.maximum(lam, 1.0 - lam).to(x.device)
    perm = torch.randperm(n, generator=gen).to(x.device)
    lam_x = lam.view(-1, *([1] * (x.dim() - 1)))
    x_mix = lam_x * x + (1.0 - lam_x) * x[perm]
    t_mix = lam[:, None] * targets + (1.0 - lam[:, None]) * targets[perm]
    return x_mix, t_mix, lam


def mix_batch(student: nn.Module, x_lb: Tensor, y_lb: Tensor, views: list[Tensor], num_classes: int,
              temperature: float, alpha: float, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """MixMatch's Algorithm 1: the mixed inputs and targets, labelled rows first, then the K ``views`` of the
    unlabelled images (their targets: the sharpened mean prediction over the views, without gradient)."""
    with torch.no_grad():
        q = guess_labels(student(torch.cat(views)), len(views), temperature)
    p = F.one_hot(y_lb, num_classes).float()
    x_mix, t_mix, _ = mixup(torch.cat([x_lb, *views]), torch.cat([p, *([q] * len(views))]), alpha, gen)
    return x_mix, t_mix


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """``-mean_i sum_c t_ic log softmax(z_i)_c`` (MixMatch's labelled loss on mixed targets)."""
    return -(targets * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


def probability_mse(logits: Tensor, targets: Tensor) -> Tensor:
    """``|| q - softmax(z) ||^2 / L`` averaged over the batch (mean over batch x classes), MixMatch Eq. 4."""
    return F.mse_loss(logits.float().softmax(dim=1), targets)


def linear_rampup(progress: float, fraction: float) -> float:
    """``clip(progress / fraction, 0, 1)``; 1 when ``fraction`` is 0."""
    return 1.0 if fraction <= 0 else min(max(progress / fraction, 0.0), 1.0)


class MixMatch(Method):
    name = "mixmatch"
    description = "MixMatch (Berthelot et al. 2019): sharpened K-view label guesses, MixUp of labelled + unlabelled"
    Config = MixMatchConfig
    unlabelled_views = ("weak", "weak")  # K weak views; set per instance from cfg.k
    padding_mode = "reflect"  # MixMatch-pytorch: pad(x, 4) in "reflect" mode before the random crop
    needs_unlabelled = True
    # Adam lr 0.002, constant; weight decay is applied decoupled after each step (decoupled_wd), not by Adam.
    optim_defaults = {"name": "adam", "lr": 0.002, "weight_decay": 0.0, "schedule": "constant"}
    cfg: MixMatchConfig

    def __init__(self, cfg: MixMatchConfig, student: Net, teacher: Net | None = None, **kwargs: int) -> None:
        super().__init__(cfg, student, teacher, **kwargs)
        self.unlabelled_views = ("weak",) * cfg.k  # type: ignore[misc]  # K comes from the config

    def unlabelled_weight(self, batch: Batch) -> float:
        """``lambda_u * clip(progress / rampup_fraction, 0, 1)``."""
        return self.cfg.lambda_u * linear_rampup(batch.progress, self.cfg.rampup_fraction)

    def mix(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """MixMatch's Algorithm 1 on the labelled batch and the K views of the unlabelled one."""
        cfg = self.cfg
        return mix_batch(self.student, batch.x_lb, batch.y_lb, batch.x_ulb, self.num_classes, cfg.temperature,
                         cfg.alpha, batch.gen)

    def losses(self, batch: Batch) -> dict[str, Tensor]:
        n = batch.x_lb.shape[0]
        x_mix, t_mix = self.mix(batch)
        logits = self.student(x_mix)  # one forward over the whole mixed batch (see the module docstring)
        w = self.unlabelled_weight(batch)
        self.record(unlabelled_weight=w)
        return {"ce": soft_cross_entropy(logits[:n], t_mix[:n]),
                "unsup": w * probability_mse(logits[n:], t_mix[n:])}

    @torch.no_grad()
    def after_step(self) -> None:
        """The official code's decoupled weight decay of the conv / linear weights (``'kernel'`` variables)."""
        if self.cfg.decoupled_wd:
            for p in self.student.parameters():
                if p.ndim > 1:
                    p.mul_(1.0 - self.cfg.decoupled_wd)
