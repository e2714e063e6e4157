"""OpenMatch: Saito, Kim & Saenko, "OpenMatch: Open-set Consistency Regularization for Semi-supervised Learning
with Outliers", NeurIPS 2021; the authors' code ``VisionLearningGroup/OP_Match`` (``trainer.py``, ``utils/misc.py``).

One-vs-all (OVA) heads beside the closed-set classifier learn, for every seen class, "inlier of this class
or not" on the labelled images; on every unlabelled image their outputs are made confident (open-set entropy
minimisation) and consistent between two augmentations (soft open-set consistency regularisation, SOCR).
After a warm-up, the unlabelled images whose OVA head of the predicted class calls them inliers (outlier
probability < 0.5) are selected, and FixMatch trains on them. The selection is made again from the WHOLE
pool at the start of every epoch (as ``exclude_dataset`` does after ``init_index``); it never shrinks the
pool for good (docs/deviations.md, "Pitfalls"). Per step:

    L = CE(z(x), y) + L_ova(z_open(x), y)                                          [labelled, weak view]
        + lambda_em * (H_ova(u1) + H_ova(u2)) / 2 + lambda_socr * SOCR(u1, u2)     [all unlabelled, two weak views]
        + lambda_fix * FixMatch(weak, strong)                                      [selected, after the warm-up]

    L_ova = mean_b [-log p_in(b, y_b)] + mean_b [max_{k != y_b} -log p_out(b, k)]     (osslbench.ood.ova_loss)
    H_ova = mean_{b,k} [-p_in log p_in - p_out log p_out]                            (osslbench.ood.ova_entropy)
    SOCR  = mean_b sum_k sum_{j in {in, out}} (p_j(u1, k) - p_j(u2, k))^2

The labelled images and both views of the whole-pool stream share one forward pass; the selected weak and
strong views go through a second one (the authors' ``model(inputs_ws)``), so BatchNorm sees the same batches.

OOD score: the OVA outlier probability of the closed-set predicted class (the authors' test score).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from osslbench.ema import ema_update, warmup_decay
from osslbench.method import Batch, Method, MethodConfig, PoolAccess, cross_entropy
from osslbench.models.base import Net
from osslbench.ood import ova_entropy, ova_head, ova_loss, ova_outlier_score, ova_probs, pooled
from osslbench.semisup import FIXMATCH_OPTIM, PoolSelection, pseudo_label_loss, scaled_epochs


@dataclass
class OpenMatchConfig(MethodConfig):
    """OpenMatch's CIFAR settings (paper Sec. 4 and appendix; authors' ``utils/parser.py``, ``run_cifar100.sh``).

    :param mu: unlabelled images per labelled image, in each of the two unlabelled streams (2, ``--mu 2``).
    :param ema_decay: EMA of the weights (0.999, ``--ema-decay``): the model that is evaluated AND the one
        that scores the pool for the selection (the authors' ``exclude_dataset(..., ema_model.ema)``).
    :param lambda_em: weight of the open-set entropy minimisation (0.1 in all experiments, ``--lambda_oem``).
    :param lambda_socr: weight of SOCR (``--lambda_socr``; tuned per dataset: 1.0 for CIFAR-100, the labelled
        set of the paper protocol here, ``run_cifar100.sh``; 0.5 for CIFAR-10 and ImageNet).
    :param lambda_fix: weight of the FixMatch term after the warm-up (1, "lambda_fm ... set to 1").
    :param threshold: FixMatch confidence threshold on the weak view's softmax PROBABILITY over the selected
        images (0.0: ``--threshold`` defaults to 0 and no script sets it; OP_Match issue #7; USB's OpenMatch
        configs in ``nukezil/IOMatch`` also use ``p_cutoff: 0``). The OVA selection is the filter.
    :param temperature: temperature of the pseudo-labelling softmax (1, ``--T``).
    :param inlier_threshold: a pool image is selected when the OVA outlier probability of its predicted
        class is below this (0.5, ``exclude_dataset``: ``unk_score < 0.5``).
    :param start_fix: warm-up epochs before the selection and FixMatch start (E_fix = 10 in all experiments).
    :param start_fix_fraction: cap of the warm-up as a fraction of training (10 / 240): the warm-up lasts
        ``min(start_fix, ceil(start_fix_fraction * epochs))`` epochs, i.e. the authors' 10 epochs in a run of
        the paper protocol's 240 epochs or longer, and the same share of a shorter run (a mini scale, a test)
        instead of most of it without FixMatch.
    """

    mu: float = 2.0
    ema_decay: float = 0.999
    lambda_em: float = 0.1
    lambda_socr: float = 1.0
    lambda_fix: float = 1.0
    threshold: float = 0.0
    temperature: float = 1.0
    inlier_threshold: float = 0.5
    start_fix: int = 10
    start_fix_fraction: float = 10 / 240

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.start_fix < 0 or not 0.0 <= self.start_fix_fraction <= 1.0:
            raise ValueError("start_fix must be >= 0 and start_fix_fraction in [0, 1]")
        if not 0.0 < self.inlier_threshold <= 1.0:
            raise ValueError(f"inlier_threshold = {self.inlier_threshold} must be in (0, 1]")


def socr_loss(logits_open_1: Tensor, logits_open_2: Tensor) -> Tensor:
    """Soft open-set consistency: squared difference of the OVA probabilities, summed over (in/out, class),
    mean over the batch (the authors' ``L_socr``)."""
    return ((ova_probs(logits_open_1) - ova_probs(logits_open_2)) ** 2).sum(dim=(1, 2)).mean()


def inliers(outlier_scores: Tensor, threshold: float) -> Tensor:
    """Pool positions whose OVA outlier probability (of the predicted class) is strictly below ``threshold``."""
    return (outlier_scores < threshold).nonzero().flatten()


class OpenMatch(PoolSelection, Method):
    name = "openmatch"
    description = "OpenMatch (Saito et al. 2021): OVA heads + SOCR; FixMatch on the inliers, re-selected every epoch"
    Config = OpenMatchConfig
    labelled_views = ("weak", "weak")  # the authors' labelled loader gives two weak views; CE and OVA see both
    unlabelled_views = ("weak", "weak")  # SOCR's two augmentations (TransformOpenMatch: two weak views)
    padding_mode = "reflect"  # FixMatch-pytorch's RandomCrop(padding=4, padding_mode="reflect")
    needs_unlabelled = True
    selected_views = ("weak", "strong")  # FixMatch on the selected inliers (TransformFixMatch)
    optim_defaults = FIXMATCH_OPTIM  # the authors' parser (FixMatch's): SGD Nesterov lr 0.03, cosine
    cfg: OpenMatchConfig

    def __init__(self, cfg: OpenMatchConfig, student: Net, teacher: Net | None = None, **kwargs: int) -> None:
        super().__init__(cfg, student, teacher, **kwargs)
        self.ova = ova_head(student.classifier.in_features, self.num_classes)
        nn.init.xavier_normal_(self.ova.weight)  # WideResNet_Open initialises every Linear so
        # The model that scores the pool: an EMA of student + OVA head (the authors select with their EMA model;
        # PoolAccess maps this module's own weights, so it keeps its copy). A submodule: checkpoints save it.
        self.select_model: nn.ModuleDict | None = None
        if cfg.ema_decay:
            self.select_model = copy.deepcopy(nn.ModuleDict({"student": student, "ova": self.ova})).requires_grad_(False)
            self.register_buffer("select_updates", torch.zeros((), dtype=torch.long))

    def heads(self, x: Tensor, select: bool = False) -> tuple[Tensor, Tensor]:
        """Closed-set logits and OVA logits (``B x 2K``) of the trained weights, or of the selection model."""
        if select and self.select_model is not None:
            logits, h = pooled(self.select_model["student"], x)
            return logits, self.select_model["ova"](h)
        logits, h = pooled(self.student, x)
        return logits, self.ova(h)

    def outlier_score(self, x: Tensor, select: bool = False) -> Tensor:
        """OVA outlier probability of the predicted class (the selection's score and the OOD score)."""
        logits, logits_open = self.heads(x, select)
        return ova_outlier_score(logits_open, logits)

    def ood_score(self, x: Tensor, logits: Tensor, features: Tensor) -> Tensor:
        """The OVA outlier probability of the predicted class, on the evaluation pass's logits and features."""
        return ova_outlier_score(self.ova(features), logits)

    def after_step(self) -> None:
        """Selection model: parameters ``e = d * e + (1 - d) * w`` with the project's EMA warm-up
        (:mod:`osslbench.ema`), buffers copied (FixMatch-pytorch's ModelEMA)."""
        if self.select_model is None:
            return
        d = warmup_decay(self.cfg.ema_decay, int(self.select_updates), self.cfg.ema_warmup)
        for ema, live in ((self.select_model["student"], self.student), (self.select_model["ova"], self.ova)):
            ema_update(ema, live, d, buffers=False)
            for e, w in zip(ema.buffers(), live.buffers(), strict=True):
                e.copy_(w)
        self.select_updates += 1

    def on_epoch_start(self, pool: PoolAccess) -> dict[str, float]:
        self._selected = None
        if pool.epoch < scaled_epochs(self.cfg.start_fix, self.cfg.start_fix_fraction, pool.epochs):
            return {}
        scores = pool.map(lambda x: self.outlier_score(x, select=True))  # the WHOLE pool, every epoch
        self._selected = inliers(scores, self.cfg.inlier_threshold)
        return {"selected": len(self._selected) / max(1, pool.size)}

    def losses(self, batch: Batch) -> dict[str, Tensor]:
        # One forward over both labelled views and both unlabelled views (the authors' ``inputs``); CE and OVA
        # on both labelled views (``targets_x.repeat(2)``).
        x_lb = [batch.x_lb, *batch.x_lb_extra]
        cfg, n, m = self.cfg, sum(len(x) for x in x_lb), batch.x_ulb[0].shape[0]
        y = batch.y_lb.repeat(len(x_lb))
        logits, logits_open = self.heads(torch.cat([*x_lb, *batch.x_ulb]))
        open_u1, open_u2 = logits_open[n:n + m], logits_open[n + m:n + 2 * m]
        out = {"ce": cross_entropy(logits[:n], y),
               "ova": ova_loss(logits_open[:n], y),
               "em": cfg.lambda_em * (ova_entropy(open_u1) + ova_entropy(open_u2)) / 2,
               "socr": cfg.lambda_socr * socr_loss(open_u1, open_u2)}
        if batch.x_sel:  # only after the warm-up, and only when something was selected
            logits_w, logits_s = self.student(torch.cat(batch.x_sel)).chunk(2)
            fix, mask = pseudo_label_loss(logits_s, cfg.threshold, cfg.temperature, target_logits=logits_w)
            out["fix"] = cfg.lambda_fix * fix
            self.record(mask_rate=mask.mean())
        return out
