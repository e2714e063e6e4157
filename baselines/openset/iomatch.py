"""IOMatch: Li, Qi, Shi & Gao, "IOMatch: Simplifying Open-Set Semi-Supervised Learning with Joint Inliers and
Outliers Utilization", ICCV 2023; the authors' code ``nukezil/IOMatch`` (USB-based, ``algorithms/iomatch``).

No unlabelled image is thrown away. A projection head feeds one-vs-all (multi-binary) classifiers and a
(K+1)-way open-set classifier. From the weak view, the closed-set probabilities ``p`` (distribution-aligned)
and the OVA inlier probabilities ``r_in`` form open-set targets over the K seen classes plus "outlier":

    q_k = p_k * r_in(k)   (k < K),        q_K = sum_k p_k * r_out(k) = 1 - sum_k q_k

The strong view learns ``p`` where the weak view is a confident inlier (closed-set term, the paper's "double
filtering") and ``q`` on every image (open-set term). No image is dropped as an outlier: the open-set term's
mask only asks that ``q`` be confident over the K + 1 classes, so a likely outlier (``q_K >= tau_q``) is
trained towards the outlier class instead of being filtered out, and every term is a mean over the whole
unlabelled batch:

    L = CE(z, y) + lambda_mb * L_ova(z_mb, y)                                      [labelled]
        + lambda_u  * mean[ 1(max p >= tau_p) 1(q_K < 0.5) H(p, softmax(z(strong))) ]     [unlabelled]
        + lambda_op * mean[ 1(max q >= tau_q) H(q, softmax(z_open(strong))) ]             [unlabelled]

OOD score: the open-set classifier's probability of the outlier class ``K``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from osslbench.method import Batch, Method, MethodConfig, cross_entropy
from osslbench.models.base import Net
from osslbench.ood import ova_loss, ova_probs, pooled
from osslbench.semisup import FIXMATCH_OPTIM, soft_cross_entropy


@dataclass
class IOMatchConfig(MethodConfig):
    """IOMatch's CIFAR-100 settings (the authors' ``IOMatch.get_argument`` defaults and
    ``config/openset_cv/iomatch/iomatch_cifar100_*.yaml``; paper Sec. 4).

    :param mu: unlabelled images per labelled image (7, ``uratio``).
    :param ema_decay: EMA of the weights used for evaluation (0.999, ``ema_m``).
    :param p_cutoff: ``tau_p``, confidence threshold on the (aligned) closed-set PROBABILITIES (0.95).
    :param q_cutoff: ``tau_q``, threshold on the open-set target's largest probability (0.5, ``q_cutoff``).
    :param lambda_mb: weight of the labelled multi-binary (OVA) loss (1, ``mb_loss_ratio``).
    :param lambda_u: weight of the closed-set unlabelled term (1, ``ulb_loss_ratio``).
    :param lambda_op: weight of the open-set term (1, ``op_loss_ratio``).
    :param dist_align: distribution alignment of ``p`` to the uniform prior (``dist_align``: on by default and
        in the CIFAR-100 configs; the CIFAR-10 configs switch it off).
    :param da_len: batches in the distribution-alignment queue (128, ``da_len``).
    :param proj_size: output width of the projection head (128, ``IOMatchNet``).
    :param open_warmup: fraction of training without the open-set term (1 / 256: the authors zero it during
        the first of their 256 epochs, ``if self.epoch == 0``).
    """

    mu: float = 7.0
    ema_decay: float = 0.999
    p_cutoff: float = 0.95
    q_cutoff: float = 0.5
    lambda_mb: float = 1.0
    lambda_u: float = 1.0
    lambda_op: float = 1.0
    dist_align: bool = True
    da_len: int = 128
    proj_size: int = 128
    open_warmup: float = 1 / 256

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.da_len < 1 or self.proj_size < 1:
            raise ValueError("da_len and proj_size must be >= 1")
        if not (0.0 <= self.p_cutoff <= 1.0 and 0.0 <= self.q_cutoff <= 1.0 and 0.0 <= self.open_warmup <= 1.0):
            raise ValueError("p_cutoff, q_cutoff and open_warmup must be in [0, 1]")


def open_targets(p: Tensor, logits_mb: Tensor) -> Tensor:
    """``B x (K+1)`` open-set targets from closed-set probabilities ``p`` and OVA logits (sums to 1 per row)."""
    r = ova_probs(logits_mb)
    return torch.cat([p * r[:, 1], (p * r[:, 0]).sum(dim=1, keepdim=True)], dim=1)


class IOMatch(Method):
    name = "iomatch"
    description = "IOMatch (Li et al. 2023): every unlabelled image trains an open-set (K+1) head; no filtering"
    Config = IOMatchConfig
    unlabelled_views = ("weak", "strong")
    padding_mode = "reflect"  # USB (IOMatch's code): RandomCrop(padding=4, padding_mode="reflect")
    needs_unlabelled = True
    # USB's optimiser (the authors' configs), FixMatch's: SGD Nesterov lr 0.03, momentum 0.9, cosine, no weight decay
    # on BN and biases. Weight decay 5e-4 (the authors' CIFAR-10 configs; their CIFAR-100 ones use 1e-3) as this
    # harness's FixMatch, so that the two differ only in the method.
    optim_defaults = FIXMATCH_OPTIM
    cfg: IOMatchConfig

    def __init__(self, cfg: IOMatchConfig, student: Net, teacher: Net | None = None, **kwargs: int) -> None:
        super().__init__(cfg, student, teacher, **kwargs)
        c, k = student.classifier.in_features, self.num_classes
        self.proj = nn.Sequential(nn.Linear(c, c), nn.ReLU(), nn.Linear(c, cfg.proj_size))
        self.mb = nn.Linear(cfg.proj_size, 2 * k, bias=False)  # the multi-binary (OVA) classifiers
        self.open = nn.Linear(cfg.proj_size, k + 1)  # the open-set classifier
        nn.init.xavier_normal_(self.mb.weight)
        nn.init.xavier_normal_(self.open.weight)
        nn.init.zeros_(self.open.bias)
        # USB's DistAlignQueueHook: the last da_len batch means of p (zeros until filled, as there).
        self.register_buffer("p_model", torch.zeros(cfg.da_len, k))

    def heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Closed-set, open-set (K+1) and multi-binary (2K) logits."""
        logits, h = pooled(self.student, x)
        return (logits, *self.open_heads(h))

    def open_heads(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """Open-set (K+1) and multi-binary (2K) logits of pooled features ``h``."""
        z = self.proj(h)
        return self.open(z), self.mb(z)

    def ood_score(self, x: Tensor, logits: Tensor, features: Tensor) -> Tensor:
        """The open-set classifier's probability of the outlier class K+1 (the authors' open-set score)."""
        return self.open_heads(features)[0].float().softmax(dim=1)[:, -1]

    @torch.no_grad()
    def align(self, p: Tensor, step: int) -> Tensor:
        """Distribution alignment to the uniform prior: ``p * (1/K) / mean(queue)``, renormalised."""
        self.p_model[step % self.cfg.da_len] = p.mean(dim=0)
        uniform = 1.0 / p.shape[1]
        aligned = p * (uniform + 1e-6) / (self.p_model.mean(dim=0) + 1e-6)
        return aligned / aligned.sum(dim=1, keepdim=True)

    def losses(self, batch: Batch) -> dict[str, Tensor]:
        cfg, n, m = self.cfg, batch.x_lb.shape[0], batch.x_ulb[0].shape[0]
        logits, logits_open, logits_mb = self.heads(torch.cat([batch.x_lb, *batch.x_ulb]))
        logits_w, logits_s = logits[n:].chunk(2)
        with torch.no_grad():
            p = logits_w.float().softmax(dim=1)
            if cfg.dist_align:
                p = self.align(p, batch.step)
            q = open_targets(p, logits_mb[n:n + m])
            in_mask = (q[:, -1] < 0.5).float()  # the OVA heads call it an inlier of its likely classes
            p_mask = (p.amax(dim=1) >= cfg.p_cutoff).float()
            q_mask = (q.amax(dim=1) >= cfg.q_cutoff).float()
        ui = (soft_cross_entropy(logits_s, p, "none") * p_mask * in_mask).mean()
        op = (soft_cross_entropy(logits_open[n + m:], q, "none") * q_mask).mean()
        if batch.progress < cfg.open_warmup:
            op = op * 0.0
        self.record(p_mask_rate=p_mask.mean(), in_mask_rate=in_mask.mean(), q_mask_rate=q_mask.mean())
        return {"ce": cross_entropy(logits[:n], batch.y_lb),
                "mb": cfg.lambda_mb * ova_loss(logits_mb[:n], batch.y_lb),
                "ui": cfg.lambda_u * ui,
                "op": cfg.lambda_op * op}
