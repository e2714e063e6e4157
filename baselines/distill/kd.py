"""KD: Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015.

Cross-entropy on labelled images plus the temperature-scaled KL divergence to the teacher on every
image of the batch, labelled and unlabelled (the SRD paper's open-set setting, docs/baselines.md, "Distillation baselines").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from osslbench.method import Batch, Method, MethodConfig, cross_entropy, kl_div_t


@dataclass
class KDConfig(MethodConfig):
    """Loss weights of RepDistiller's KD run, used unchanged by the SRD paper.

    :param gamma: cross-entropy weight (0.1).
    :param alpha: KL weight (0.9).
    :param temperature: softmax temperature T (4).
    """

    gamma: float = 0.1
    alpha: float = 0.9
    temperature: float = 4.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.temperature <= 0:  # the KL divides the logits by T
            raise ValueError(f"temperature = {self.temperature} must be > 0")


class KD(Method):
    name = "kd"
    description = "Hinton KD: CE on labelled + KL_T(student || teacher) on labelled and unlabelled images"
    Config = KDConfig
    needs_teacher = True
    unlabelled_views = ("flip",)  # SRD paper: unlabelled images are resized to 32 and flipped, not cropped
    cfg: KDConfig

    def losses(self, batch: Batch) -> dict[str, Tensor]:
        logits_lb, logits_ulb = self.forward_student(batch)
        with torch.no_grad():
            t_logits = self.teacher(torch.cat([batch.x_lb, *batch.x_ulb[:1]]))
        s_logits = torch.cat([logits_lb, logits_ulb])
        return {
            "ce": self.cfg.gamma * cross_entropy(logits_lb, batch.y_lb),
            "kd": self.cfg.alpha * kl_div_t(s_logits, t_logits, self.cfg.temperature),
        }
