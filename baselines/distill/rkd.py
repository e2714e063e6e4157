"""RKD: Park, Kim, Lu & Cho, "Relational Knowledge Distillation", CVPR 2019, as RepDistiller runs it
(``distiller_zoo/RKD.py``) and the SRD authors in the open set (``jingyang2017/SRD_ossl``, ``helper/loops.py``):
relations among the batch's pooled features, distances and angles,

    psi_D(i, j) = ||h_i - h_j|| / mean_{k != l} ||h_k - h_l||
    psi_A(i, j, k) = < (h_i - h_j) / ||h_i - h_j||, (h_k - h_j) / ||h_k - h_j|| >
    L_RKD = w_d * Huber(psi_D^s, psi_D^t) + w_a * Huber(psi_A^s, psi_A^t)       [all images, every pair / triple]

(Huber = smooth L1 with threshold 1, mean over the entries; the mean distance over the positive ones).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from osslbench.distill import FeatureDistillConfig, FeatureDistiller


@dataclass
class RKDConfig(FeatureDistillConfig):
    """RKD's settings (RepDistiller ``train_student.py`` / SRD authors ``runs/run_kd_ssl.sh``: ``--distill rkd -a 0
    -b 1``; ``RKDLoss(w_d=25, w_a=50)``).

    :param beta: weight of the RKD loss (1).
    :param w_dist: weight of the distance term (25).
    :param w_angle: weight of the angle term (50).
    """

    beta: float = 1.0
    w_dist: float = 25.0
    w_angle: float = 50.0


def pairwise_distance(e: Tensor, eps: float = 1e-12) -> Tensor:
    """Euclidean distances of the rows, zero diagonal (squared distances clamped at ``eps`` before the root)."""
    sq = e.pow(2).sum(1)
    d = (sq[:, None] + sq[None, :] - 2 * e @ e.t()).clamp(min=eps).sqrt()
    return d * (1 - torch.eye(len(e), device=e.device, dtype=d.dtype))


def distance_potential(e: Tensor) -> Tensor:
    d = pairwise_distance(e)
    return d / d[d > 0].mean()


def angle_potential(e: Tensor) -> Tensor:
    diff = F.normalize(e[None, :, :] - e[:, None, :], p=2, dim=2)  # diff[j, i] = e_i - e_j, normalised
    return torch.bmm(diff, diff.transpose(1, 2)).flatten()


class RKD(FeatureDistiller):
    name = "rkd"
    description = "RKD (Park et al. 2019): match the distance and angle relations among the batch's pooled features"
    Config = RKDConfig
    teacher_outputs = ("pooled", "logits")  # the pooled vector only: servable from the teacher-output cache
    cfg: RKDConfig

    def distill(self, feat_s: list[Tensor], feat_t: list[Tensor]) -> Tensor:
        s, t = feat_s[-1].float(), feat_t[-1].float()
        loss_d = F.smooth_l1_loss(distance_potential(s), distance_potential(t))
        loss_a = F.smooth_l1_loss(angle_potential(s), angle_potential(t))
        return self.cfg.w_dist * loss_d + self.cfg.w_angle * loss_a
