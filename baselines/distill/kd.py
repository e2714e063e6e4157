"""KD: Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015.

Cross-entropy on labelled images plus the temperature-scaled KL divergence to the teacher on every
image of the batch, labelled and unlabelled (the SRD paper's open-set setting, docs/baselines.md, "Distillation baselines").

Option ``logit_std`` (Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024; the authors'
``mdistiller/distillers/KD.py``): both networks' logits are z-scored per image before the temperature, so the
student matches the teacher's logit *relations* rather than its logit range.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from osslbench.config import ADDED_LATER
from osslbench.distill import DistillConfig, Distiller, standardize
from osslbench.method import Batch, cross_entropy


@dataclass
class KDConfig(DistillConfig):
    """Loss weights of RepDistiller's KD run, used unchanged by the SRD paper.

    :param gamma: cross-entropy weight (0.1).
    :param alpha: KL weight (0.9).
    :param temperature: softmax temperature T (4).
    :param logit_std: z-score both logits before the temperature (Sun et al., CVPR 2024; off = Hinton's KD). The
        authors pair it with a lower base temperature and a larger KL weight on CIFAR-100 (``T 2``, KD weight 9,
        CE 0.1: the tag ``kd,resnet32x4,resnet8x4,2,9`` of their ``configs/cifar100/kd/``); this option changes
        only the standardisation: ``--set method.kd.logit_std=true method.kd.temperature=2 method.kd.alpha=9``
        is their recipe.
    """

    gamma: float = 0.1
    alpha: float = 0.9
    logit_std: bool = field(default=False, metadata=ADDED_LATER)


class KD(Distiller):
    name = "kd"
    description = "Hinton KD: CE on labelled + KL_T(student || teacher) on labelled and unlabelled images"
    Config = KDConfig
    teacher_outputs = ("logits",)
    cfg: KDConfig

    def losses(self, batch: Batch) -> dict[str, Tensor]:
        logits_lb, logits_ulb = self.forward_student(batch)
        t_logits = self.teacher_on(batch)["logits"]
        s_logits = torch.cat([logits_lb, logits_ulb])
        if self.cfg.logit_std:
            s_logits, t_logits = standardize(s_logits), standardize(t_logits)
        return {"ce": self.cfg.gamma * cross_entropy(logits_lb, batch.y_lb), "kd": self.kd(s_logits, t_logits)}
