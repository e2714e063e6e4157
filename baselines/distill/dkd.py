"""DKD: Zhao, Cui, Song, Qiu, Liang, "Decoupled Knowledge Distillation", CVPR 2022 (authors' code:
``megvii-research/mdistiller``, ``mdistiller/distillers/DKD.py``).

KD's KL divergence split at the target class ``t`` into a binary target-class term (TCKD: the teacher's and the
student's probability of ``t`` against the rest) and a non-target term (NCKD: the distributions over the other
classes, renormalised), weighted independently:

    L = gamma * CE(z_s, y)  [labelled]
        + w(epoch) * (alpha * T^2 KL(b_t || b_s) + beta * T^2 KL(p~_t || p~_s))   [labelled and unlabelled]

with ``b = [p_t, 1 - p_t]`` and ``p~`` the softmax over the classes other than ``t``, all at temperature T, and
``w`` a linear warm-up (the authors' ``min(epoch / warmup, 1)``, epochs counted from 1).

**Open-set adaptation (unlabelled images).** DKD needs a target class for every image it distils; unlabelled
images have none, and half of them may belong to no seen class at all. Their target class here is the
**teacher's argmax**: TCKD then transfers how confident the teacher is in its own best guess (DKD's reading of
TCKD: "the difficulty of the sample"), which is exactly the signal that separates an outlier (low confidence)
from an inlier, and NCKD transfers the teacher's ranking of the remaining classes ("dark knowledge"), which is
defined whatever the image. The student's argmax would make the decomposition chase the student's own mistakes,
and a uniform / no target (plain KD on unlabelled images) would drop DKD's contribution on half the data. For an
image whose true class is the teacher's argmax this is the labelled definition exactly; labelled images keep
their true label (as the authors do).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from osslbench.distill import DistillConfig, Distiller, standardize
from osslbench.method import Batch, cross_entropy


@dataclass
class DKDConfig(DistillConfig):
    """mdistiller's CIFAR-100 settings (``mdistiller/engine/cfg.py`` ``CFG.DKD``; ``configs/cifar100/dkd/*.yaml``).

    :param gamma: cross-entropy weight on labelled images (``CE_WEIGHT`` 1.0).
    :param alpha: TCKD weight (``ALPHA`` 1.0).
    :param beta: NCKD weight (``BETA`` 8.0; the authors' ``wrn40_2_wrn_40_1.yaml`` uses 6.0, set by
        ``protocols/cifar100-tinyimagenet.toml``).
    :param temperature: T (``T`` 4.0).
    :param warmup: epochs of the linear warm-up of the DKD term (``WARMUP`` 20 of 240).
    :param warmup_fraction: cap of the warm-up as a fraction of training (20 / 240): the warm-up lasts
        ``min(warmup, warmup_fraction * epochs)`` epochs, the authors' 20 in a 240-epoch run and the same share of a
        shorter one (a mini scale) instead of all of it.
    :param logit_std: z-score both logits before the temperature (Sun et al., CVPR 2024; their
        ``mdistiller/distillers/DKD.py``, ``normalize``).
    """

    alpha: float = 1.0
    beta: float = 8.0
    warmup: int = 20
    warmup_fraction: float = 20 / 240
    logit_std: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.warmup < 0 or not 0.0 <= self.warmup_fraction <= 1.0:
            raise ValueError("warmup must be >= 0 and warmup_fraction in [0, 1]")


def dkd_terms(s_logits: Tensor, t_logits: Tensor, target: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """(TCKD, NCKD) of Zhao et al. 2022, Eq. 7, each ``T^2 * KL`` summed over classes and averaged over the batch."""
    t = temperature
    gt = F.one_hot(target, s_logits.shape[1]).bool()
    p_s, p_t = F.softmax(s_logits.float() / t, dim=1), F.softmax(t_logits.float() / t, dim=1)
    b_s = torch.stack([p_s[gt], (p_s * ~gt).sum(dim=1)], dim=1)  # binary: target class vs all others
    b_t = torch.stack([p_t[gt], (p_t * ~gt).sum(dim=1)], dim=1)
    tckd = F.kl_div(b_s.clamp_min(1e-12).log(), b_t, reduction="batchmean") * t * t
    # the non-target distributions: the target logit pushed to -inf-ish (the authors subtract 1000 / T-scaled)
    masked_s = (s_logits.float() / t).masked_fill(gt, -1000.0)
    masked_t = (t_logits.float() / t).masked_fill(gt, -1000.0)
    nckd = F.kl_div(F.log_softmax(masked_s, dim=1), F.softmax(masked_t, dim=1), reduction="batchmean") * t * t
    return tckd, nckd


def warmup_factor(epoch: int, epochs: int, warmup: int, fraction: float) -> float:
    """``min((epoch + 1) / W, 1)`` with ``W = min(warmup, fraction * epochs)`` (the authors count epochs from 1)."""
    w = min(float(warmup), fraction * epochs)
    return 1.0 if w <= 0 else min((epoch + 1) / w, 1.0)


class DKD(Distiller):
    name = "dkd"
    description = "Decoupled KD (Zhao et al., CVPR 2022): TCKD + NCKD; unlabelled target = teacher's argmax"
    Config = DKDConfig
    teacher_outputs = ("logits",)
    cfg: DKDConfig

    def losses(self, batch: Batch) -> dict[str, Tensor]:
        cfg = self.cfg
        n = batch.x_lb.shape[0]
        logits_lb, logits_ulb = self.forward_student(batch)
        t_logits = self.teacher_on(batch)["logits"].float()
        s_logits = torch.cat([logits_lb, logits_ulb]).float()
        target = torch.cat([batch.y_lb, t_logits[n:].argmax(dim=1)])  # labelled: the label; unlabelled: teacher's argmax
        if cfg.logit_std:
            s_logits, t_logits = standardize(s_logits), standardize(t_logits)
        w = warmup_factor(batch.epoch, batch.epochs, cfg.warmup, cfg.warmup_fraction)
        tckd, nckd = dkd_terms(s_logits, t_logits, target, cfg.temperature)
        return {"ce": cfg.gamma * cross_entropy(logits_lb, batch.y_lb),
                "tckd": w * cfg.alpha * tckd,
                "nckd": w * cfg.beta * nckd}
