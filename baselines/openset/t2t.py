"""T2T: Huang, Fang, Chen, Chai, Wei, Wei, Lin & Li, "Trash to Treasure: Harvesting OOD Data with Cross-Modal
Matching for Open-Set Semi-Supervised Learning", ICCV 2021; the authors' code (``train_t2t_stage1.py`` /
``train_t2t_stage2.py``, ``utils/t2t.py``) as adapted by the SRD authors (``jingyang2017/SRD_ossl``).

A cross-modal matching (CMM) head ``m(h, y)`` says whether an image's pooled features ``h`` and a (one-hot)
label ``y`` belong together; a rotation head predicts which of four rotations an unlabelled image underwent
(self-supervision that lets every unlabelled image, outliers included, train the backbone). Stage 1 trains them:

    L_1 = CE(z, y) + lambda_mx * L_cm^l + lambda_rot * L_rot
    L_cm^l = mean over the 3B pairs of BCE(m(h, y), 1), BCE(m(h, y_hard), 0), BCE(m(h, y_easy), 0)   [labelled]
    L_rot  = mean over the 4R images of CE(rot(h(rotate(u, k))), k), k in {0, 90, 180, 270} degrees [unlabelled]

``y_hard`` is the highest-scoring wrong class, ``y_easy`` a uniformly drawn class that is neither ``y`` nor
``y_hard``. Stage 2 re-selects, at the start of EVERY epoch and from the WHOLE pool, the images whose matching
score with their predicted class, ``sigmoid(m(h, argmax z))``, is above Otsu's threshold of the pool's scores,
and adds, ramped up linearly by ``alpha``:

    L_2 = L_1 + alpha * lambda_un * (L_cm^u + L_cc)
    L_cm^u = mean over 2R pairs of H_b(sigmoid(m(h_u, argmax z_u))), H_b(sigmoid(m(h_u, random other class)))
    L_cc   = KL( softmax(z(weak) / T) || softmax(z(strong)) ), mean over the selected images with
             max softmax(z(weak)) >= p_cutoff                                                      [selected]

``H_b`` is the binary entropy (the authors' ``BCE_with_logits(s, sigmoid(s))``, whose value and gradient are
those of ``H_b(sigmoid(s))``); ``L_cc`` is UDA's consistency (Xie et al. 2020) between a weak and a STRONG view
(the trainer's ``"strong"``: crop + flip + RandAugment + Cutout, the authors' ``RandAugmentMC(n=2, m=10)``).
OOD score: ``sigmoid(-m(h, argmax z))``, i.e. 1 - the matching score of the predicted class.

As in the authors' code, the rotation batch (the unrotated images first, whose features also serve ``L_cm^u``)
goes through the network in its own forward pass, and the labelled images with the selected views in another,
so that BatchNorm's batch statistics of the classification batch never include rotated images.

Deviations from the authors' scripts (the harness trains each method in one run):

* one run with one optimiser: the learning rate follows both scripts' schedules (stage 1: lr 0.1, x0.2 at 30%,
  60% and 80% of the stage; stage 2: lr 0.03, FixMatch's cosine restarted at the stage's first step), but the
  momentum buffers carry over into stage 2, where the authors' second script starts a new optimiser;
* the selection is re-made every epoch (the authors: every 20 epochs of 1,000 steps), which keeps it a function
  of the weights alone (exact resume);
* the rotation batch is the first ``batch_size`` images of the unlabelled stream (``mu * batch_size`` images), the
  authors' separate rotation loader of ``batch_size`` images.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from osslbench.data.augment import rotate90
from osslbench.method import Batch, Method, MethodConfig, PoolAccess, cross_entropy
from osslbench.models.base import Net
from osslbench.ood import otsu_select, pooled
from osslbench.protocol import OptimConfig, lr_factor
from osslbench.semisup import FIXMATCH_OPTIM, PoolSelection, linear_ramp


@dataclass
class T2TConfig(MethodConfig):
    """T2T's settings (the authors' stage scripts as run by the SRD authors, ``jingyang2017/SRD_ossl``).

    :param mu: unlabelled images per labelled image in each unlabelled stream (5, stage 2's ``--mu``); the
        rotation task uses the first ``batch_size`` images of the unlabelled stream (the authors' rotation
        loader has the labelled batch size), the consistency loss all ``mu * batch_size`` selected images.
    :param ema_decay: 0: the authors evaluate the trained weights.
    :param stage1: fraction of the epochs spent in stage 1 (0.2: 50k of 50k + 200k steps, the two scripts'
        ``--total-steps``).
    :param stage1_lr: stage 1's learning rate (0.1, ``train_t2t_stage1.py``'s ``optim.SGD(..., lr=0.1)``); stage 2
        uses the optimiser's ``lr`` (0.03).
    :param stage1_milestones: where stage 1's learning rate is multiplied by ``stage1_gamma``, as fractions of
        stage 1 (0.3, 0.6, 0.8: ``MultiStepLR(milestones=[30, 60, 80, 100])`` over its 100 epochs; 100 is never
        reached).
    :param stage1_gamma: stage 1's decay factor (0.2, ``gamma=0.2``).
    :param lambda_mx: weight of the labelled matching loss (1, ``--lmx``).
    :param lambda_rot: weight of the rotation loss (1, ``--lrot``).
    :param lambda_un: weight of the stage-2 unlabelled terms (1, ``--lun``).
    :param ramp: length of the linear ramp-up of ``alpha``, as a fraction of stage 2 (0.2: 40 of 200 epochs,
        ``linear_rampup(step, 40 * eval_step)``).
    :param temperature: UDA's sharpening temperature of the weak-view target (0.4, hard-coded ``T``).
    :param p_cutoff: UDA's confidence threshold on the weak view's softmax PROBABILITY (0.8, ``p_cutoff``).
    :param embed_dim: width of the label embedding and of the matching MLP (128, ``CrossModalMatchingHead``).
    :param bins: histogram bins of Otsu's threshold (256, ``skimage.filters.threshold_otsu``'s default).
    """

    mu: float = 5.0
    ema_decay: float = 0.0
    stage1: float = 0.2
    stage1_lr: float = 0.1
    stage1_milestones: tuple[float, ...] = (0.3, 0.6, 0.8)
    stage1_gamma: float = 0.2
    lambda_mx: float = 1.0
    lambda_rot: float = 1.0
    lambda_un: float = 1.0
    ramp: float = 0.2
    temperature: float = 0.4
    p_cutoff: float = 0.8
    embed_dim: int = 128
    bins: int = 256

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.stage1 < 1.0 or not 0.0 <= self.ramp <= 1.0:
            raise ValueError("stage1 must be in [0, 1) and ramp in [0, 1]")
        if self.stage1_lr <= 0 or self.stage1_gamma <= 0 or any(not 0 < m < 1 for m in self.stage1_milestones):
            raise ValueError("stage1_lr and stage1_gamma must be > 0 and stage1_milestones fractions in (0, 1)")
        if self.temperature <= 0 or not 0.0 <= self.p_cutoff <= 1.0:
            raise ValueError("temperature must be > 0 and p_cutoff in [0, 1]")
        if self.embed_dim < 1 or self.bins < 2:
            raise ValueError("embed_dim must be >= 1 and bins >= 2")


def stage2_start(stage1: float, epochs: int) -> int:
    """First epoch of stage 2: ``stage1 * epochs`` rounded half up (Python's ``round`` would round 2.5 to 2)."""
    return math.floor(stage1 * epochs + 0.5)


class CrossModalMatchingHead(nn.Module):
    """``m(h, y)``: a logit saying whether features ``h`` and one-hot label ``y`` match (the authors' head:
    ``Linear(K, 128)`` label embedding, then ``Linear(C + 128, 128) - BN - ReLU - Linear(128, 1)``)."""

    def __init__(self, num_classes: int, feat_dim: int, embed_dim: int = 128) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.label_embedding = nn.Linear(num_classes, embed_dim)
        self.mlp = nn.Sequential(nn.Linear(feat_dim + embed_dim, embed_dim), nn.BatchNorm1d(embed_dim),
                                 nn.ReLU(inplace=True), nn.Linear(embed_dim, 1))

    def forward(self, h: Tensor, label: Tensor) -> Tensor:
        y = F.one_hot(label, self.num_classes).to(self.label_embedding.weight.dtype)
        e = self.label_embedding(y)
        return self.mlp(torch.cat([h.to(e.dtype), e], dim=1)).squeeze(1)


def other_class(num_classes: int, exclude: list[Tensor], gen: torch.Generator) -> Tensor:
    """One class per row, uniform over the classes not in ``exclude``, drawn from ``gen`` (``Batch.gen``)."""
    weights = torch.ones(len(exclude[0]), num_classes)
    for e in exclude:
        weights.scatter_(1, e[:, None].cpu(), 0.0)
    return torch.multinomial(weights, 1, generator=gen).squeeze(1).to(exclude[0].device)


def matching_pairs(logits: Tensor, y: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """The labelled negatives: the hardest (highest-scoring) wrong class and a uniform other class.

    ``easy`` avoids both ``y`` and ``hard`` (the authors: drawn from the classes ranked below the top one(s));
    with two classes there is only one wrong class and ``easy == hard``.
    """
    num_classes = logits.shape[1]
    top2 = logits.detach().topk(2, dim=1).indices
    hard = torch.where(top2[:, 0] == y, top2[:, 1], top2[:, 0])
    easy = other_class(num_classes, [y, hard], gen) if num_classes > 2 else hard
    return hard, easy


def rotation_batch(x: Tensor) -> tuple[Tensor, Tensor]:
    """``[x; rot90(x); rot180(x); rot270(x)]`` (counter-clockwise, the authors' ``torch.rot90(x, i, [2, 3])``)
    and the rotation targets ``[0]*R + [1]*R + [2]*R + [3]*R``."""
    turns = torch.arange(4, device=x.device).repeat_interleave(len(x))
    return rotate90(x.repeat(4, 1, 1, 1), turns), turns


def binary_entropy(logit: Tensor) -> Tensor:
    """``H_b(sigmoid(s))``, batch mean (value and gradient of the authors' ``BCE_with_logits(s, sigmoid(s))``)."""
    s = logit.float()
    p = torch.sigmoid(s)
    return -(p * F.logsigmoid(s) + (1 - p) * F.logsigmoid(-s)).mean()


def uda_consistency(logits_w: Tensor, logits_s: Tensor, temperature: float, p_cutoff: float) -> tuple[Tensor, Tensor]:
    """UDA's masked ``KL(softmax(z_w / T) || softmax(z_s))``, mean over the confident samples, and the 0/1 mask.

    Confident: ``max softmax(z_w) >= p_cutoff`` (T = 1); the weak view is the target (no gradient). With no
    confident sample the loss is 0 (the authors' ``zeros(1)``), still attached to the graph.
    """
    logits_w = logits_w.detach().float()
    mask = logits_w.softmax(dim=1).amax(dim=1) >= p_cutoff
    if not mask.any():
        return logits_s.float().sum() * 0.0 + 0.0, mask.float()  # (+ 0.0: never a -0.0 in the logs)
    target = (logits_w[mask] / temperature).softmax(dim=1)
    return F.kl_div(F.log_softmax(logits_s[mask].float(), dim=1), target, reduction="batchmean"), mask.float()


class T2T(PoolSelection, Method):
    name = "t2t"
    description = "T2T (Huang et al. 2021): cross-modal matching + rotation; UDA on Otsu-selected inliers (stage 2)"
    Config = T2TConfig
    unlabelled_views = ("weak",)  # rotation task and unlabelled matching (the authors' labelled transform)
    needs_unlabelled = True
    selected_views = ("weak", "strong")  # UDA's consistency between a weak and a STRONG view
    # Both scripts' optimiser: FixMatch's (SGD Nesterov, momentum 0.9, weight decay 5e-4), but the decay on EVERY
    # parameter (``optim.SGD(grouped_parameters, ...)``, no BN/bias exclusion); lr 0.03 is stage 2's (``lr_schedule``).
    optim_defaults = {**FIXMATCH_OPTIM, "decay_bn_bias": True}
    cfg: T2TConfig

    def __init__(self, cfg: T2TConfig, student: Net, teacher: Net | None = None, **kwargs: int) -> None:
        super().__init__(cfg, student, teacher, **kwargs)
        if self.num_classes < 2:
            raise ValueError("T2T needs at least two classes (its matching negatives are other classes)")
        c = student.classifier.in_features
        self.cmm = CrossModalMatchingHead(self.num_classes, c, cfg.embed_dim)
        self.rot = nn.Linear(c, 4)

    def matching_logit(self, x: Tensor) -> Tensor:
        """``m(h, predicted class)``: the matching logit of each image with its predicted class."""
        logits, h = pooled(self.student, x)
        return self.cmm(h, logits.argmax(dim=1)).float()

    def matching_score(self, x: Tensor) -> Tensor:
        """``sigmoid(m(h, predicted class))`` (the authors' ``filter_ood``; high = inlier)."""
        return torch.sigmoid(self.matching_logit(x))

    def ood_score(self, x: Tensor, logits: Tensor, features: Tensor) -> Tensor:
        """``1 - sigmoid(m(h, predicted class))`` on the evaluation pass, computed as ``sigmoid(-m)`` so that
        confident inliers keep distinct scores in float32."""
        return torch.sigmoid(-self.cmm(features, logits.argmax(dim=1)).float())

    def on_epoch_start(self, pool: PoolAccess) -> dict[str, float]:
        self._selected = None
        if pool.epoch < stage2_start(self.cfg.stage1, pool.epochs) or pool.size == 0:
            return {"stage": 1.0}
        scores = pool.map(self.matching_score)  # the WHOLE pool, every epoch
        self._selected, threshold = otsu_select(scores, self.cfg.bins, inclusive=False)  # the authors' s > thresh
        return {"stage": 2.0, "threshold": threshold, "selected": len(self._selected) / pool.size}

    def lr_schedule(self, optim: OptimConfig, epochs: int, steps_per_epoch: int) -> Callable[[int], float]:
        """Stage 1: ``stage1_lr`` with its step decays; stage 2: ``optim.lr`` with ``optim.schedule`` (cosine)
        restarted at its first step."""
        start, total = stage2_start(self.cfg.stage1, epochs) * steps_per_epoch, epochs * steps_per_epoch
        stage1 = replace(optim, schedule="multistep", milestones=list(self.cfg.stage1_milestones),
                         gamma=self.cfg.stage1_gamma)
        scale = self.cfg.stage1_lr / optim.lr

        def factor(step: int) -> float:
            if step < start:
                return scale * lr_factor(stage1, step, start)
            return lr_factor(optim, step - start, total - start)
        return factor

    def alpha(self, batch: Batch) -> float:
        """Weight of the stage-2 terms: 0 in stage 1, then linear from 0 to 1 over ``ramp`` of stage 2."""
        start = stage2_start(self.cfg.stage1, batch.epochs) * batch.steps_per_epoch
        return linear_ramp(batch.step, start, self.cfg.ramp * (batch.steps_per_epoch * batch.epochs - start))

    def losses(self, batch: Batch) -> dict[str, Tensor]:
        cfg, n, k = self.cfg, batch.x_lb.shape[0], self.num_classes
        logits, h = pooled(self.student, torch.cat([batch.x_lb, *batch.x_sel]))
        logits_lb, h_lb = logits[:n], h[:n]

        # labelled matching: 1 positive + 2 negatives per image (the hardest wrong class, a random other class)
        with torch.no_grad():
            hard, easy = matching_pairs(logits_lb, batch.y_lb, batch.gen)
        pairs = torch.cat([batch.y_lb, hard, easy])
        match_gt = torch.cat([torch.ones(n), torch.zeros(2 * n)]).to(h.device)
        out = {"ce": cross_entropy(logits_lb, batch.y_lb),
               "match_lb": cfg.lambda_mx * F.binary_cross_entropy_with_logits(
                   self.cmm(h_lb.repeat(3, 1), pairs).float(), match_gt)}

        # rotation prediction on the first n unlabelled images, in its own forward pass
        unrotated: tuple[Tensor, Tensor] | None = None
        if batch.x_ulb and len(batch.x_ulb[0]):
            x_u = batch.x_ulb[0][:n]
            x_rot, turns = rotation_batch(x_u)
            logits_r, h_r = pooled(self.student, x_rot)
            out["rot"] = cfg.lambda_rot * cross_entropy(self.rot(h_r), turns)
            unrotated = logits_r[:len(x_u)], h_r[:len(x_u)]  # the 0-degree block comes first

        alpha = self.alpha(batch)
        self.record(alpha=alpha)
        if alpha > 0:
            if unrotated is not None:
                logits_u, h_u = unrotated
                with torch.no_grad():
                    pred = logits_u.argmax(dim=1)
                    rest = other_class(k, [pred], batch.gen)
                match_u = binary_entropy(self.cmm(h_u.repeat(2, 1), torch.cat([pred, rest])))
                out["match_ulb"] = alpha * cfg.lambda_un * match_u
            if batch.x_sel:
                logits_w, logits_s = logits[n:].chunk(2)
                cc, mask = uda_consistency(logits_w, logits_s, cfg.temperature, cfg.p_cutoff)
                out["consistency"] = alpha * cfg.lambda_un * cc
                self.record(mask_rate=mask.mean())
        return out
