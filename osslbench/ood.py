"""Shared pieces of the open-set (OOD-filtering) semi-supervised baselines.

* :func:`otsu_threshold` — Otsu, "A Threshold Selection Method from Gray-Level Histograms", IEEE Trans. SMC
  1979: the threshold of a 1-d score set that maximises the between-class variance. MTC (Yu et al. 2020) and
  T2T (Huang et al. 2021) split the unlabelled pool with it (their code: ``skimage.filters.threshold_otsu``,
  256 bins); here a short torch version, so scikit-image is not a dependency. :func:`otsu_select` splits a
  pool with it, inclusive (MTC) or strict (T2T) at the threshold.
* One-vs-all (OVA) heads of OpenMatch (Saito, Kim & Saenko, NeurIPS 2021), also used by IOMatch (Li et al.,
  ICCV 2023): ``K`` binary classifiers in one ``nn.Linear(C, 2K)``; the outputs are read as ``B x 2 x K``
  (``logits.view(B, 2, K)``, the authors' layout), a softmax over the middle axis gives for every class ``k``
  the probability that the image is an outlier to ``k`` (``[:, 0, k]``) or an inlier of ``k`` (``[:, 1, k]``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ova_entropy", "ova_head", "ova_loss", "ova_outlier_score", "ova_probs", "otsu_select", "otsu_threshold", "pooled"]

_EPS = 1e-8  # inside the logarithms of OpenMatch's ova_loss / ova_ent


def otsu_threshold(scores: Tensor, bins: int = 256) -> float:
    """Otsu's threshold of a 1-d score set: ``scores > t`` is the upper class, the rest the lower class.

    The scores are binned into ``bins`` equal bins over ``[min, max]`` (``threshold_otsu(nbins=256)`` of
    scikit-image, used by the MTC and T2T authors); every split between two bins is scored by the
    between-class variance ``w0 * w1 * (m0 - m1)^2`` (class weights ``w``, class means ``m``) and the first
    maximiser is taken. The class means use the scores themselves (per-bin sums), not the bin centres, so
    when every score falls in a bin of its own the result is exactly the brute-force maximiser over all
    splits of the sorted scores. The returned threshold lies midway between the largest score of the lower
    class and the smallest of the upper one, so that ``scores > t`` reproduces the chosen split exactly
    (scikit-image returns a bin centre, which can put scores of the split's bin on either side).

    :param scores: any shape, at least one finite value (flattened; computed in float64 on the CPU).
    :param bins: histogram resolution (256, scikit-image's default).
    :return: the threshold; the score itself when all scores are equal (then no score is above it).
    """
    s = scores.detach().flatten().to("cpu", torch.float64)
    if s.numel() == 0 or not torch.isfinite(s).all():
        raise ValueError("otsu_threshold needs a non-empty set of finite scores")
    if bins < 2:
        raise ValueError(f"bins = {bins} must be >= 2")
    lo, hi = s.min(), s.max()
    if hi <= lo:
        return float(hi)
    which = ((s - lo) / (hi - lo) * bins).floor().long().clamp_(0, bins - 1)
    count = torch.zeros(bins, dtype=torch.float64).index_add_(0, which, torch.ones_like(s))
    total = torch.zeros(bins, dtype=torch.float64).index_add_(0, which, s)
    w0, s0 = count.cumsum(0)[:-1], total.cumsum(0)[:-1]  # lower class = bins 0..k, for k = 0..bins-2
    w1, s1 = count.sum() - w0, total.sum() - s0
    between = w0 * w1 * (s0 / w0.clamp(min=1) - s1 / w1.clamp(min=1)) ** 2
    between = torch.where((w0 > 0) & (w1 > 0), between, torch.full_like(between, -1.0))
    k = int(between.argmax())  # the first maximiser, as numpy's argmax in scikit-image
    return float((s[which <= k].max() + s[which > k].min()) / 2)


def otsu_select(scores: Tensor, bins: int = 256, *, inclusive: bool) -> tuple[Tensor, float]:
    """Positions of the upper class of Otsu's split of ``scores`` (on the CPU) and the threshold ``t``.

    ``inclusive`` selects ``scores >= t`` (MTC: the authors' ``weights >= th``), otherwise ``scores > t`` (T2T: the
    authors' ``filter_ood``, ``s > thresh``). Compared in float64, as ``t`` is computed, where the midpoint of two
    float32 scores is exact: ``t`` lies strictly between the two classes, so the two rules differ only when every
    score is equal (``t`` is that score): then the inclusive rule selects the whole pool and the strict one nothing,
    as in either authors' code.
    """
    t = otsu_threshold(scores, bins)
    s = scores.detach().cpu().double()
    return ((s >= t) if inclusive else (s > t)).nonzero().flatten(), t


def pooled(student: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(logits, pooled final features)`` of a :class:`~osslbench.models.base.Net` (the input of the heads)."""
    logits, feats = student(x, features=True)
    return logits, student.pool(feats[-1])


def ova_head(in_features: int, num_classes: int) -> nn.Linear:
    """OpenMatch's OVA head: ``nn.Linear(C, 2K, bias=False)`` (``fc_open`` of the authors' WideResNet)."""
    return nn.Linear(in_features, 2 * num_classes, bias=False)


def ova_probs(logits_open: Tensor) -> Tensor:
    """``B x 2K`` OVA logits -> ``B x 2 x K`` probabilities: ``[:, 0]`` outlier, ``[:, 1]`` inlier, per class."""
    return logits_open.float().view(logits_open.shape[0], 2, -1).softmax(dim=1)


def ova_outlier_score(logits_open: Tensor, logits: Tensor) -> Tensor:
    """Outlier probability of the closed-set predicted class (OpenMatch's ``exclude_dataset`` and test score)."""
    pred = logits.argmax(dim=1)
    return ova_probs(logits_open)[torch.arange(len(pred), device=pred.device), 0, pred]


def ova_loss(logits_open: Tensor, label: Tensor) -> Tensor:
    """OpenMatch's OVA loss on labelled images (``ova_loss`` of the authors' code, Eq. 1 of the paper):

        L_ova = mean_b [ -log p_in(b, y_b) ]  +  mean_b [ max_{k != y_b} -log p_out(b, k) ]

    the positive term for the true class and, for the negatives, only the hardest one.
    """
    p = ova_probs(logits_open)
    positive = F.one_hot(label, p.shape[2]).to(p.dtype)
    l_pos = (-torch.log(p[:, 1] + _EPS) * positive).sum(dim=1).mean()
    l_neg = (-torch.log(p[:, 0] + _EPS) * (1 - positive)).amax(dim=1).mean()
    return l_pos + l_neg


def ova_entropy(logits_open: Tensor) -> Tensor:
    """Open-set entropy of the OVA outputs, mean over batch and classes (``ova_ent``; OpenMatch's L_em)."""
    p = ova_probs(logits_open)
    return (-(p * torch.log(p + _EPS)).sum(dim=1)).mean()
