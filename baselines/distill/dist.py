"""DIST: Huang, You, Wang, Qian, Xu, "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022 (authors'
code: ``hunto/DIST_KD``, the loss in ``hunto/image_classification_sota``, ``lib/models/losses/dist_kd.py``).

KL divergence replaced by Pearson correlations of the softened predictions ``Y = softmax(z / tau)``, both ways:

    L = gamma_ce * CE(z_s, y)  [labelled]
        + tau^2 * (beta * (1 - mean_i rho(Y_s[i, :], Y_t[i, :]))       inter-class: each image's class distribution
                   + gamma * (1 - mean_c rho(Y_s[:, c], Y_t[:, c])))   intra-class: each class across the batch

**Open set.** Both relations are taken over the one batch of labelled + unlabelled images (64 + 64): the
inter-class term sees every image on its own; the intra-class term correlates, for each class, the teacher's and
the student's scores *across the batch*, so the unlabelled images (outliers included) are part of what it ranks.
Nothing needs a label, so the loss is the authors' unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from osslbench.distill import Distiller
from osslbench.method import Batch, MethodConfig, cross_entropy


@dataclass
class DISTConfig(MethodConfig):
    """The paper's CIFAR-100 settings (Sec. 4.2: ``beta = gamma = 2``, ``tau = 4``; ImageNet uses 1, 1, 1).

    :param gamma_ce: cross-entropy weight on labelled images (1).
    :param beta: inter-class relation weight (2 on CIFAR-100).
    :param gamma: intra-class relation weight (2 on CIFAR-100).
    :param tau: temperature (4 on CIFAR-100).
    """

    gamma_ce: float = 1.0
    beta: float = 2.0
    gamma: float = 2.0
    tau: float = 4.0


def pearson_rows(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b`` (the authors' ``pearson_correlation``)."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_terms(s_logits: Tensor, t_logits: Tensor, tau: float) -> tuple[Tensor, Tensor]:
    """(inter-class, intra-class) relation losses of Huang et al. 2022, Eq. 6-9, each scaled by ``tau^2``."""
    y_s = (s_logits.float() / tau).softmax(dim=1)
    y_t = (t_logits.float() / tau).softmax(dim=1)
    inter = 1 - pearson_rows(y_s, y_t).mean()
    intra = 1 - pearson_rows(y_s.t(), y_t.t()).mean()
    return tau * tau * inter, tau * tau * intra


class DIST(Distiller):
    name = "dist"
    description = "DIST (Huang et al., NeurIPS 2022): inter- and intra-class Pearson relations of teacher and student"
    Config = DISTConfig
    teacher_outputs = ("logits",)
    cfg: DISTConfig  # DIST's own weights (gamma_ce, beta, gamma, tau): no KD term, not a DistillConfig

    def losses(self, batch: Batch) -> dict[str, Tensor]:
        cfg = self.cfg
        logits_lb, logits_ulb = self.forward_student(batch)
        inter, intra = dist_terms(torch.cat([logits_lb, logits_ulb]), self.teacher_on(batch)["logits"], cfg.tau)
        return {"ce": cfg.gamma_ce * cross_entropy(logits_lb, batch.y_lb),
                "inter": cfg.beta * inter, "intra": cfg.gamma * intra}
