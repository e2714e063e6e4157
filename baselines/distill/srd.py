"""SRD: Semantic Representational Distillation.

Yang, Zhu, Bulat, Martinez, Tzimiropoulos, "Knowledge Distillation Meets Open-Set Semi-Supervised
Learning", IJCV 2024 (arXiv 2205.06701); the authors' code ``jingyang2017/SRD_ossl``.

The student's last feature map goes through a connector ``g`` into the teacher's feature space and
is judged by the teacher's frozen classifier ``W_t`` (the cross-network logit); the teacher's seen
classes act as a basis of the semantic space, so unlabelled images of unseen classes are used as
they are, with no OOD filtering:

    L = gamma * CE(z_s, y)  [labelled]  +  alpha * KL_T(z_s || z_t)
        + beta * (w_feat * MSE(pool(g(f_s)), pool(f_t)) + MSE(W_t(pool(g(f_s))), z_t))   [all images]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from osslbench.distill import DistillConfig, Distiller
from osslbench.method import Batch, cross_entropy, kl_div_t
from osslbench.models.base import Net


@dataclass
class SRDConfig(DistillConfig):
    """The authors' SRD settings (docs/srd.md, "The loss").

    :param gamma: cross-entropy weight on labelled images (1).
    :param alpha: KD weight (0: SRD uses no KL term on the student's own logits).
    :param beta: weight of the representation terms (1).
    :param w_feat: weight of the feature term inside beta (1; 10 for a ShuffleNet student).
    :param logit_loss: ``"mse"`` between cross-network and teacher logits (authors' code, no
        temperature) or ``"kl"`` with ``temperature`` (the paper's text); recorded with every result.
    :param temperature: temperature of the ``kl`` logit option and of the alpha KD term (4).
    """

    beta: float = 1.0
    w_feat: float = 1.0
    logit_loss: Literal["mse", "kl"] = "mse"


def connector(in_channels: int, out_channels: int) -> nn.Sequential:
    """SRD's ``g``: 1x1 conv (no bias) + BatchNorm + ReLU, He-normal initialised."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return nn.Sequential(conv, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


def srd_terms(f_s: Tensor, f_t: Tensor, student: Net, teacher: Net, g: nn.Module,
              logit_loss: str = "mse", temperature: float = 4.0) -> tuple[Tensor, Tensor]:
    """SRD's (feature term, logit term) for student / teacher final feature maps ``f_s``, ``f_t``.

    ``f_t`` must come from the frozen teacher without gradient; gradients reach the student and
    ``g`` through the teacher's classifier, whose weights are frozen.
    """
    return srd_terms_pooled(f_s, teacher.pool(f_t), student, teacher, g, logit_loss, temperature)


def srd_terms_pooled(f_s: Tensor, h_t: Tensor, student: Net, teacher: Net, g: nn.Module,
                     logit_loss: str = "mse", temperature: float = 4.0) -> tuple[Tensor, Tensor]:
    """:func:`srd_terms` from the teacher's pooled final map ``h_t = pool(f_t)``: both terms read ``f_t`` only
    through it, so the teacher-output cache stores C values per image instead of the C x h x w map."""
    h_s = student.pool(g(f_s)).float()
    h_t = h_t.float()
    z_c = teacher.classifier(h_s)  # cross-network logit: the student's representation judged by W_t
    z_t = teacher.classifier(h_t)
    feat = F.mse_loss(h_s, h_t)
    logit = F.mse_loss(z_c, z_t) if logit_loss == "mse" else kl_div_t(z_c, z_t, temperature)
    return feat, logit


class SRD(Distiller):
    name = "srd"
    description = "Semantic Representational Distillation (Yang et al., IJCV 2024): teacher classifier judges the student"
    Config = SRDConfig
    teacher_outputs = ("pooled", "logits")
    cfg: SRDConfig

    def __init__(self, cfg: SRDConfig, student: Net, teacher: Net | None = None, **kwargs: int) -> None:
        super().__init__(cfg, student, teacher, **kwargs)
        self.connector = connector(student.feature_channels[-1], self.teacher.feature_channels[-1])
        # the loss reads the teacher's map only through pool(f_t); its logits only for the alpha KD term
        self.teacher_outputs = ("pooled", "logits") if cfg.alpha else ("pooled",)

    def losses(self, batch: Batch) -> dict[str, Tensor]:
        cfg = self.cfg
        logits_lb, logits_ulb, feats = self.forward_student(batch, features=True)
        t = self.teacher_on(batch)
        feat, logit = srd_terms_pooled(feats[-1], t["pooled"], self.student, self.teacher, self.connector,
                                       cfg.logit_loss, cfg.temperature)
        out = {"ce": cfg.gamma * cross_entropy(logits_lb, batch.y_lb),
               "srd_feat": cfg.beta * cfg.w_feat * feat,
               "srd_logit": cfg.beta * logit}
        if cfg.alpha:
            out["kd"] = self.kd(torch.cat([logits_lb, logits_ulb]), t["logits"])
        return out
