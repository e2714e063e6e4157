"""PKT: Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer", ECCV 2018, as
RepDistiller runs it (``distiller_zoo/PKT.py``, from the authors' code) and the SRD authors in the open set
(``jingyang2017/SRD_ossl``, ``helper/loops.py``): the batch's cosine similarities of the pooled features, moved
to [0, 1] and normalised per row into conditional probabilities, matched with a KL divergence:

    p_{j|i} = (1 + cos(h_i, h_j)) / sum_k (1 + cos(h_i, h_k))
    L_PKT = mean_{i, j} p^t_{j|i} log( (p^t_{j|i} + eps) / (p^s_{j|i} + eps) )          [all images]

Deviation: the SRD authors' script runs PKT alone with ``--v2`` (``train_ssldistill2``: the labelled and the
unlabelled batches in two separate passes, each with its own b x b matrix); here, like every distiller, one
pass over the 64 + 64 images, whose 128 x 128 matrix also relates labelled to unlabelled images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from osslbench.distill import FeatureDistillConfig, FeatureDistiller


@dataclass
class PKTConfig(FeatureDistillConfig):
    """PKT's settings (RepDistiller ``train_student.py`` / SRD authors ``runs/run_kd_ssl.sh``: ``--distill pkt -a 0
    -b 30000``; ``eps = 1e-7``).

    :param beta: weight of the PKT loss (30000).
    :param eps: the authors' guard against division by zero and log(0) (1e-7).
    """

    beta: float = 30000.0
    eps: float = 1e-7


def conditional_probabilities(h: Tensor, eps: float) -> Tensor:
    h = h.float()
    h = h / (h.pow(2).sum(1, keepdim=True).sqrt() + eps)
    h = torch.nan_to_num(h, nan=0.0)
    sim = (h @ h.t() + 1.0) / 2.0
    return sim / sim.sum(1, keepdim=True)


class PKT(FeatureDistiller):
    name = "pkt"
    description = "PKT (Passalis & Tefas 2018): KL between the batch's cosine-similarity distributions"
    Config = PKTConfig
    teacher_outputs = ("pooled", "logits")  # the pooled vector only: servable from the teacher-output cache
    cfg: PKTConfig

    def distill(self, feat_s: list[Tensor], feat_t: list[Tensor]) -> Tensor:
        eps = self.cfg.eps
        p_s = conditional_probabilities(feat_s[-1], eps)
        p_t = conditional_probabilities(feat_t[-1], eps)
        return (p_t * ((p_t + eps) / (p_s + eps)).log()).mean()
