"""FixMatch: Sohn et al., "FixMatch: Simplifying Semi-Supervised Learning with Consistency and
Confidence", NeurIPS 2020.

A weak view's confident prediction (max probability >= threshold) is the hard target of the
strong view of the same image; evaluation uses an EMA of the weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from osslbench.method import Batch, Method, MethodConfig, cross_entropy


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


def pseudo_labels(logits_weak: Tensor, threshold: float, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Hard targets and the 0/1 mask of samples whose max probability reaches ``threshold``."""
    probs = torch.softmax(logits_weak.detach().float() / temperature, dim=1)
    confidence, targets = probs.max(dim=1)
    return targets, (confidence >= threshold).float()


class FixMatch(Method):
    name = "fixmatch"
    description = "FixMatch (Sohn et al. 2020): confident weak-view pseudo-labels train the strong view"
    Config = FixMatchConfig
    unlabelled_views = ("weak", "strong")
    padding_mode = "reflect"  # FixMatch-pytorch: RandomCrop(32, padding=4, padding_mode="reflect")
    needs_unlabelled = True
    # SGD Nesterov lr 0.03, cosine decay, weight decay 5e-4 not applied to BN and biases.
    optim_defaults = {"name": "sgd", "lr": 0.03, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4,
                      "decay_bn_bias": False, "schedule": "cosine"}
    cfg: FixMatchConfig

    def losses(self, batch: Batch) -> dict[str, Tensor]:
        n = batch.x_lb.shape[0]
        logits = self.student(torch.cat([batch.x_lb, *batch.x_ulb]))
        logits_lb = logits[:n]
        logits_w, logits_s = logits[n:].chunk(2)
        targets, mask = pseudo_labels(logits_w, self.cfg.threshold, self.cfg.temperature)
        unsup = (F.cross_entropy(logits_s.float(), targets, reduction="none") * mask).mean()
        self.record(mask_rate=mask.mean())
        return {"ce": cross_entropy(logits_lb, batch.y_lb), "unsup": self.cfg.lambda_u * unsup}
