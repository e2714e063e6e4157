"""MTC: Yu, Ikami, Irie & Aizawa, "Multi-Task Curriculum Framework for Open-Set Semi-Supervised Learning",
ECCV 2020 (arXiv 2007.11330); the authors' code ``YU1ut/Multi-Task-Curriculum-Framework-for-Open-Set-SSL``
(``train_multi.py``, ``dataset/cifar10.py``), as run by the SRD authors (``jingyang2017/SRD_ossl``:
``train_mtcr.py``, ``dataset/mtcr_data.py``, same rules).

A one-logit OOD head ``d`` (``nn.Linear(C, 1)`` on the pooled final features, ``fc2`` of the authors'
``WideResNet2``) says whether an image belongs to the labelled distribution. It is trained with binary
cross-entropy against *domain labels*: 1 for labelled images, and for every image of the unlabelled pool a
soft label ``y_i`` that starts at 0 (``--start-label``: everything unlabelled is first taken as OOD) and is
re-estimated from the head's own predictions, the noisy-label joint optimisation of Tanaka et al. (CVPR 2018)
that alternates between the network's weights and the labels. The authors' update rule (``label_update``;
the paper's implementation details: "we used the average output probability of the network of the past 10
epochs"): after each epoch the head's probabilities on the pool are written into a ring of the last
``A = 10`` epochs and, once ``A`` epochs have been recorded, ``y_i`` = the mean of the ring (before that the
labels keep their initial value). Here the ring and the labels are buffers sized to the pool, so a checkpoint
restores them.

Curriculum: at the start of every epoch after the warm-up, Otsu's threshold ``t`` of the domain labels of the
WHOLE pool is computed and the images with ``y_i >= t`` (the high, in-distribution mode) are selected; MixMatch
(:mod:`osslbench.semisup`, as ``baselines/ssl/mixmatch.py`` runs it) trains on them with the labelled batch. The
selection is re-done from the whole pool every epoch, so an image rejected once can come back (docs/deviations.md,
"Pitfalls"). The code's domain labels are ``1 - OOD score`` of the paper (the authors' note in ``train``): higher =
in-distribution.

    warm-up (``pre_epochs``):  L = L_d
    then:                      L = lambda_d * L_d + L_x + lambda_u * w(t) * L_u
    L_d = mean over [labelled | unlabelled stream] of BCE(d(x), [1 | y_idx])
    L_x, L_u = MixMatch's mixed soft cross-entropy and probability MSE on [labelled | K views of selected images]

with ``w(t)`` MixMatch's linear ramp, counted from the end of the warm-up (the authors restart their epoch
counter after the warm-up). In the main phase the head's forward uses batch statistics without updating the
BatchNorm running statistics (``set_bn_eval`` / ``set_bn_train`` around it), so they follow the MixMatch
batches only. OOD score: ``1 - sigmoid(d(x))``.

Deviations (each for a reason of the harness):

* The domain labels are re-estimated from a scoring of the WHOLE pool at each epoch start (``PoolAccess.map``:
  eval mode, unaugmented), where the authors store the head's outputs of the training forward passes of the
  epoch. Their per-epoch buffer starts at zeros and a main-phase epoch (1024 batches of 64 from a loader over
  labelled + pool) need not draw every image, so an image not drawn enters the 10-epoch mean as 0; scoring the
  whole pool avoids that, and makes the hook depend only on the weights (exact resume).
* The unlabelled images of ``L_d`` come from the harness's uniform pool stream (``mu`` per labelled image) beside
  the labelled batch, instead of a loader over the union labelled + pool (so the labelled share of the domain
  batch is ``1 / (1 + mu)`` instead of the union's share).
* The MixMatch part is the harness's MixMatch exactly (per-row ``lambda'``, one forward over the whole mixed batch,
  decoupled weight decay of the conv / linear weights, here also the head's): the authors' PyTorch port draws one
  ``lambda`` per batch, interleaves and decays every parameter. As in the authors' code, the decoupled weight
  decay is not applied during the warm-up; the Trainer's EMA, however, runs through the warm-up too.
* The warm-up and the averaging window are in epochs of the run; on a run shorter than the authors' 100 + 1024
  epochs they shrink in proportion (``pre_epochs_fraction``, ``avg_epochs_fraction``), as OpenMatch's warm-up does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from osslbench.method import Batch, Method, PoolAccess, cross_entropy
from osslbench.models.base import Net
from osslbench.ood import otsu_select, pooled
from osslbench.semisup import (
    MIXMATCH_OPTIM,
    MixMatchBaseConfig,
    PoolSelection,
    decoupled_weight_decay,
    linear_rampup,
    mix_batch,
    mixmatch_terms,
    scaled_epochs,
)

_AUTHORS_EPOCHS = 100 + 1024  # the authors' warm-up (--pre-epochs) + MixMatch epochs (--epochs)


@dataclass
class MTCConfig(MixMatchBaseConfig):
    """MTC's settings (``train_multi.py``'s parser, ``dataset/cifar10.py``; the SRD authors' ``train_mtcr.py``
    keeps them all): MixMatch's (:class:`~osslbench.semisup.MixMatchBaseConfig`, the same values) and its own.

    :param mu: unlabelled images per labelled image, in the pool stream of ``L_d`` and in the selected stream of
        MixMatch (1: three loaders of batch 64, ``--batch-size``).
    :param ema_decay: EMA of the weights used for evaluation (0.999, ``--ema-decay``).
    :param k: weak views of each selected image for MixMatch's label guess (2, ``TransformTwice``).
    :param temperature: MixMatch's sharpening temperature (0.5, ``--T``).
    :param alpha: MixUp's Beta(alpha, alpha) (0.75, ``--alpha``).
    :param lambda_u: maximum weight of MixMatch's unlabelled loss (75, ``--lambda-u``).
    :param rampup_fraction: linear ramp of ``lambda_u`` as a fraction of the MixMatch phase (16 / 1024: the
        authors' ``linear_rampup(epoch, 16)`` over their 1024 main epochs, counted from the end of the warm-up).
    :param decoupled_wd: per-step decoupled weight decay after Adam, ``w <- w * (1 - decoupled_wd)``
        (``WeightEMA``: ``wd = 0.02 * lr`` = 4e-5), MixMatch phase only (``domain_train`` does not step it).
    :param lambda_domain: weight of the domain loss in the MixMatch phase (1: ``loss = Ld + Lx + w * Lu``).
    :param pre_epochs: warm-up epochs training the OOD head alone (100, ``--pre-epochs``; ``domain_train``).
    :param pre_epochs_fraction: cap of the warm-up as a fraction of the run (100 / 1124, the authors' share of
        their 100 + 1024 epochs): ``min(pre_epochs, ceil(pre_epochs_fraction * epochs))``.
    :param avg_epochs: epochs of predictions averaged into the domain labels (10, ``label_update``; the paper's
        "past 10 epochs").
    :param avg_epochs_fraction: cap of that window as a fraction of the run (10 / 1124), as for the warm-up.
    :param start_label: initial domain label of every unlabelled image (0, ``--start-label``: all OOD).
    :param bins: histogram bins of Otsu's threshold (256, ``skimage.filters.threshold_otsu``).
    """

    lambda_domain: float = 1.0
    pre_epochs: int = 100
    pre_epochs_fraction: float = 100 / _AUTHORS_EPOCHS
    avg_epochs: int = 10
    avg_epochs_fraction: float = 10 / _AUTHORS_EPOCHS
    start_label: float = 0.0
    bins: int = 256

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pre_epochs < 0 or not 0.0 <= self.pre_epochs_fraction <= 1.0:
            raise ValueError("pre_epochs must be >= 0 and pre_epochs_fraction in [0, 1]")
        if self.avg_epochs < 1 or not 0.0 < self.avg_epochs_fraction <= 1.0:
            raise ValueError("avg_epochs must be >= 1 and avg_epochs_fraction in (0, 1]")
        if not 0.0 <= self.start_label <= 1.0 or self.lambda_domain < 0:
            raise ValueError("start_label must be in [0, 1] and lambda_domain >= 0")


@contextlib.contextmanager
def frozen_bn_stats(module: nn.Module) -> Iterator[None]:
    """Train-mode BatchNorm on batch statistics without updating the running ones (the authors' ``set_bn_eval``)."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in bns:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in bns:
            m.track_running_stats = True


class MTC(PoolSelection, Method):
    name = "mtc"
    description = "MTC (Yu et al. 2020): OOD head on self-refined domain labels; MixMatch on Otsu-selected inliers"
    Config = MTCConfig
    unlabelled_views = ("weak",)  # the pool stream of the domain loss (the authors' transform_train)
    padding_mode = "reflect"  # MixMatch-pytorch: pad(x, 4) in "reflect" mode before the random crop
    needs_unlabelled = True
    selected_views = ("weak", "weak")  # MixMatch's K weak views of the selected images; set from cfg.k
    optim_defaults = MIXMATCH_OPTIM  # MixMatch's (``--lr 0.002``, Adam, constant); weight decay decoupled (after_step)
    cfg: MTCConfig

    def __init__(self, cfg: MTCConfig, student: Net, teacher: Net | None = None, **kwargs: int) -> None:
        super().__init__(cfg, student, teacher, **kwargs)
        self.selected_views = ("weak",) * cfg.k  # type: ignore[misc]  # K comes from the config
        self.domain_head = nn.Linear(student.classifier.in_features, 1)
        nn.init.xavier_normal_(self.domain_head.weight)  # the authors' init of every nn.Linear of WideResNet2
        nn.init.zeros_(self.domain_head.bias)
        # per pool image: the domain label y_i (1 = in-distribution) and the ring of the last avg_epochs predictions
        self.register_buffer("soft_labels", torch.full((self.pool_size,), float(cfg.start_label)))
        self.register_buffer("domain_history", torch.zeros(self.pool_size, cfg.avg_epochs))
        self._main_phase = False  # set by losses(), read by after_step()

    # --- the OOD head ---------------------------------------------------------------------------
    def domain_logit(self, x: Tensor) -> Tensor:
        """``d(x)``, one logit per image (float32): high = in-distribution."""
        return self.domain_head(pooled(self.student, x)[1]).squeeze(1).float()

    def inlier_probability(self, x: Tensor) -> Tensor:
        """``sigmoid(d(x))``: the head's in-distribution probability (the authors' ``probs``)."""
        return torch.sigmoid(self.domain_logit(x))

    def ood_score(self, x: Tensor, logits: Tensor, features: Tensor) -> Tensor:
        """``1 - sigmoid(d(h))``: the head's outlier probability, on the evaluation pass's features."""
        return 1.0 - torch.sigmoid(self.domain_head(features).squeeze(1).float())

    # --- schedule -------------------------------------------------------------------------------
    def warmup_epochs(self, epochs: int) -> int:
        return scaled_epochs(self.cfg.pre_epochs, self.cfg.pre_epochs_fraction, epochs)

    def window(self, epochs: int) -> int:
        """Epochs averaged into the domain labels, at least 1."""
        return max(1, scaled_epochs(self.cfg.avg_epochs, self.cfg.avg_epochs_fraction, epochs))

    @torch.no_grad()
    def update_domain_labels(self, predictions: Tensor, completed: int, window: int) -> None:
        """The authors' ``label_update`` after the ``completed``-th epoch (1-based): the predictions go into column
        ``(completed - 1) % window`` of the ring; from ``completed >= window`` on, ``y`` = the ring's mean."""
        self.domain_history[:, (completed - 1) % window] = predictions.to(self.domain_history)
        if completed >= window:
            self.soft_labels.copy_(self.domain_history[:, :window].mean(dim=1))

    def on_epoch_start(self, pool: PoolAccess) -> dict[str, float]:
        self._selected = None
        if pool.size == 0:
            return {}
        if pool.epoch >= 1:  # the weights of the epoch just finished score the WHOLE pool
            self.update_domain_labels(pool.map(self.inlier_probability), pool.epoch, self.window(pool.epochs))
        out = {"soft_label_mean": float(self.soft_labels.mean())}
        if pool.epoch < self.warmup_epochs(pool.epochs):
            return {"warmup": 1.0, **out}
        self._selected, threshold = otsu_select(self.soft_labels, self.cfg.bins, inclusive=True)  # from all of it
        return {"warmup": 0.0, "threshold": threshold, "selected": len(self._selected) / pool.size,
                "selected_count": float(len(self._selected)), **out}

    def unlabelled_weight(self, batch: Batch) -> float:
        """``lambda_u * clip(progress of the MixMatch phase / rampup_fraction, 0, 1)``."""
        start = self.warmup_epochs(batch.epochs) * batch.steps_per_epoch
        length = batch.epochs * batch.steps_per_epoch - start
        progress = (batch.step - start) / length if length > 0 else 1.0
        return self.cfg.lambda_u * linear_rampup(progress, self.cfg.rampup_fraction)

    # --- losses ---------------------------------------------------------------------------------
    def domain_loss(self, batch: Batch, freeze_bn: bool) -> Tensor:
        """BCE of the head on [labelled | pool stream] against [1 | their domain labels], mean over the batch."""
        n = batch.x_lb.shape[0]
        x = torch.cat([batch.x_lb, *batch.x_ulb[:1]])
        with frozen_bn_stats(self.student) if freeze_bn else contextlib.nullcontext():
            z = self.domain_logit(x)
        target = torch.cat([torch.ones(n, device=z.device), self.soft_labels[batch.idx_ulb.to(z.device)]])
        return F.binary_cross_entropy_with_logits(z, target)

    def mix(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """MixMatch's Algorithm 1 on [labelled | K views of the selected images], labelled rows first."""
        return mix_batch(self.student, batch.x_lb, batch.y_lb, batch.x_sel, self.num_classes, self.cfg, batch.gen)

    def losses(self, batch: Batch) -> dict[str, Tensor]:
        cfg, n = self.cfg, batch.x_lb.shape[0]
        self._main_phase = batch.epoch >= self.warmup_epochs(batch.epochs)
        domain = self.domain_loss(batch, freeze_bn=self._main_phase)
        if not self._main_phase:
            return {"domain": domain}  # the authors' domain_train: the head's loss alone
        out = {"domain": cfg.lambda_domain * domain}
        if not batch.x_sel:  # no selected stream (no unlabelled data): labelled cross-entropy only
            out["ce"] = cross_entropy(self.student(batch.x_lb), batch.y_lb)
            return out
        out["ce"], unsup = mixmatch_terms(self.student, *self.mix(batch), n)
        w = self.unlabelled_weight(batch)
        self.record(unlabelled_weight=w)
        out["unsup"] = w * unsup
        return out

    def after_step(self) -> None:
        """Decoupled weight decay of the conv / linear weights (student and head), MixMatch phase only."""
        if self._main_phase:
            decoupled_weight_decay(self, self.cfg.decoupled_wd)
