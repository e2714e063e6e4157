"""FixMatch: Sohn et al., "FixMatch: Simplifying Semi-Supervised Learning with Consistency and
Confidence", NeurIPS 2020.

A weak view's confident prediction (max probability >= threshold) is the hard target of the
strong view of the same image; evaluation uses an EMA of the weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from osslbench.method import Batch, Method, MethodConfig, cross_entropy
from osslbench.semisup import FIXMATCH_OPTIM, pseudo_label_loss


@dataclass
class FixMatchConfig(MethodConfig):
    """FixMatch's CIFAR settings (paper, Table 7; docs/baselines.md, "Semi-supervised baselines").

    :param mu: unlabelled images per labelled image (7).
    :param ema_decay: EMA of the weights used for evaluation (0.999).
    :param threshold: confidence threshold on the weak view's softmax PROBABILITY (0.95).
    :param lambda_u: weight of the unlabelled loss (1).
    :param temperature: temperature of the pseudo-labelling softmax (1).
    """

    mu: float = 7.0
    ema_decay: float = 0.999
    threshold: float = 0.95
    lambda_u: float = 1.0
    temperature: float = 1.0


class FixMatch(Method):
    name = "fixmatch"
    description = "FixMatch (Sohn et al. 2020): confident weak-view pseudo-labels train the strong view"
    Config = FixMatchConfig
    unlabelled_views = ("weak", "strong")
    padding_mode = "reflect"  # FixMatch-pytorch: RandomCrop(32, padding=4, padding_mode="reflect")
    needs_unlabelled = True
    optim_defaults = FIXMATCH_OPTIM  # SGD Nesterov lr 0.03, cosine decay, weight decay 5e-4 not on BN and biases
    cfg: FixMatchConfig

    def losses(self, batch: Batch) -> dict[str, Tensor]:
        n = batch.x_lb.shape[0]
        logits = self.student(torch.cat([batch.x_lb, *batch.x_ulb]))
        logits_lb = logits[:n]
        logits_w, logits_s = logits[n:].chunk(2)
        unsup, mask = pseudo_label_loss(logits_s, self.cfg.threshold, self.cfg.temperature, target_logits=logits_w)
        self.record(mask_rate=mask.mean())
        return {"ce": cross_entropy(logits_lb, batch.y_lb), "unsup": self.cfg.lambda_u * unsup}
