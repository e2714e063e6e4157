"""Pseudo-Label: Lee, "Pseudo-Label: The Simple and Efficient Semi-Supervised Learning Method for Deep
Neural Networks", ICML 2013 Workshop on Challenges in Representation Learning.

Each unlabelled image's class with the highest predicted probability is taken as if it were its true
label (a hard target, no gradient through it); optionally only predictions whose maximum softmax
PROBABILITY reaches a threshold are kept (Oliver et al. 2018):

    L = CE(z, y)  [labelled]  +  lambda_u * w(t) * mean_u( 1[max p(u) >= tau] * CE(z(u), argmax p(u)) )

with ``w(t)`` the sigmoid ramp of Laine & Aila 2017 (as in Oliver et al.'s code and the SRD authors'
``train_pseudolabel.py``) over ``ramp_length(...)`` epochs (:mod:`osslbench.semisup`).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from osslbench.method import Batch, Method, cross_entropy
from osslbench.semisup import SRD_SSL_OPTIM, SigmoidRampConfig, pseudo_label_loss, sigmoid_ramp


@dataclass
class PseudoLabelConfig(SigmoidRampConfig):
    """PseudoLabel as the SRD authors ran it (``train_pseudolabel.py``; docs/baselines.md), defects fixed.

    :param mu: unlabelled images per labelled image (1: 100 + 100 in the authors' script).
    :param threshold: keep a pseudo-label only if its softmax PROBABILITY is >= threshold (0 = plain argmax,
        Lee 2013 and the authors' default; the authors' script compares the threshold to logits, a defect
        fixed here; Oliver et al. 2018 use 0.95).
    :param lambda_u: maximum weight of the unlabelled loss (1: the authors' script).
    :param ramp_epochs: epochs of the sigmoid ramp-up of the unlabelled weight (30: the authors' script).
    :param ramp_fraction: cap of the ramp as a fraction of training (30 / 240).
    """

    mu: float = 1.0
    threshold: float = 0.0
    lambda_u: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold = {self.threshold} is a probability, must be in [0, 1]")


class PseudoLabel(Method):
    name = "pseudolabel"
    description = "Pseudo-Label (Lee 2013): the model's own argmax on unlabelled images as targets, ramped up"
    Config = PseudoLabelConfig
    unlabelled_views = ("weak",)
    needs_unlabelled = True
    optim_defaults = SRD_SSL_OPTIM  # the authors' script: SGD Nesterov lr 0.1, CosineAnnealingLR to 1e-4 per epoch
    cfg: PseudoLabelConfig

    def unlabelled_weight(self, batch: Batch) -> float:
        """``lambda_u * sigmoid_rampup(epoch position, ramp length)``."""
        return self.cfg.lambda_u * sigmoid_ramp(self.cfg, batch)

    def losses(self, batch: Batch) -> dict[str, Tensor]:
        logits_lb, logits_ulb = self.forward_student(batch)
        unsup, mask = pseudo_label_loss(logits_ulb, self.cfg.threshold)
        w = self.unlabelled_weight(batch)
        self.record(mask_rate=mask.mean(), unlabelled_weight=w)
        return {"ce": cross_entropy(logits_lb, batch.y_lb), "pseudo": w * unsup}
