"""CRD: Tian, Krishnan, Isola, "Contrastive Representation Distillation", ICLR 2020 (authors' code:
``HobbitLong/RepDistiller``, ``crd/criterion.py``, ``crd/memory.py``).

Student and teacher penultimate features are embedded (linear + L2 norm, one head each) and contrasted by NCE
with a memory bank holding a momentum-averaged embedding of every training image, one bank per network:

    L = gamma * CE(z_s, y)  [labelled]  +  alpha * KL_T(z_s || z_t)  [all]
        + beta * (NCE(student anchor vs teacher bank) + NCE(teacher anchor vs student bank))   [all]

    NCE = -1/B sum_i [ log h(i, i) + sum_{k=1..K} log(1 - h(i, n_ik)) ],
    h(i, j) = P / (P + K / N),  P = exp(e_i . m_j / tau) / Z

with ``N`` images in the bank, ``K`` negatives per anchor, ``Z`` the normalisation constant fixed at the first step
(``mean(exp(.)) * N``, the authors' ``ContrastMemory``), and after each step ``m_i <- normalise(m * m_i + (1 - m) e_i)``.

**Open set.** The bank covers the *whole training set*: the labelled images (positions ``0..L-1``,
``Batch.idx_lb``) and the unlabelled pool (``L + Batch.idx_ulb``), so unlabelled images, outliers included, are
anchors, positives and negatives like labelled ones. The positive of an anchor is **the same image** in the other
network's bank (RepDistiller's default ``--mode exact``). Negatives are drawn **uniformly from all other images of
the bank**: the authors draw a labelled anchor's negatives from the other classes only (``cls_negative`` of
``CIFAR100InstanceSample``), which needs a label that unlabelled images do not have; uniform noise is the NCE
noise distribution the loss assumes (``Pn = 1/N``) and the authors' own fallback (``AliasMethod`` over uniform
unigrams). The label-based "positive by class" variant (``--mode relax``, CRDSoft) does not apply: an unlabelled
image has no class, and a teacher pseudo-label would pair an outlier of an unseen class with images of a seen class
as positives, exactly the mistake the open-set protocol tests; it is not offered.

The banks and ``Z`` are buffers, saved with the method: a resumed run continues with the same bank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from osslbench.distill import DistillConfig, Distiller
from osslbench.method import Batch, cross_entropy
from osslbench.models.base import Net


@dataclass
class CRDConfig(DistillConfig):
    """RepDistiller's CRD settings (``train_student.py`` argument defaults; README: ``--distill crd -a 0 -b 0.8``).

    :param gamma: cross-entropy weight on labelled images (``-r 1``).
    :param alpha: KL weight (``-a 0``; 1 is the paper's CRD+KD).
    :param beta: CRD weight (``-b 0.8``).
    :param temperature: temperature of the alpha KD term (``--kd_T 4``).
    :param feat_dim: embedding dimension (``--feat_dim 128``).
    :param nce_k: negatives per anchor (``--nce_k 16384``).
    :param nce_t: NCE temperature tau (``--nce_t 0.07``).
    :param nce_m: momentum of the memory bank update (``--nce_m 0.5``).
    """

    beta: float = 0.8
    feat_dim: int = 128
    nce_k: int = 16384
    nce_t: float = 0.07
    nce_m: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.feat_dim < 1 or self.nce_k < 1 or self.nce_t <= 0 or not 0.0 <= self.nce_m < 1.0:
            raise ValueError("feat_dim and nce_k must be >= 1, nce_t > 0 and nce_m in [0, 1)")


class Embed(nn.Module):
    """RepDistiller's ``Embed``: linear projection then L2 normalisation."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.linear(x.flatten(1)), dim=1)


def nce_loss(p: Tensor, n_data: int, eps: float = 1e-7) -> Tensor:
    """NCE of Tian et al. 2020, Eq. 18 (``crd/criterion.py`` ``ContrastLoss``): ``p`` is B x (1 + K) normalised
    scores, column 0 the positive; noise is uniform over the ``n_data`` images of the bank."""
    k = p.shape[1] - 1
    noise = k / n_data
    log_pos = torch.log(p[:, 0] / (p[:, 0] + noise + eps))
    log_neg = torch.log(noise / (p[:, 1:] + noise + eps))
    return -(log_pos.sum() + log_neg.sum()) / p.shape[0]


def sample_negatives(idx: Tensor, n_data: int, k: int, gen: torch.Generator) -> Tensor:
    """B x K bank positions drawn uniformly from ``0..n_data-1`` without the anchor's own position."""
    r = torch.randint(0, n_data - 1, (idx.shape[0], k), generator=gen)
    return r + (r >= idx.unsqueeze(1)).long()  # skip the anchor: uniform over the other n_data - 1 images


class ContrastMemory(nn.Module):
    """The two memory banks and normalisation constants (buffers: saved with the method, restored on resume)."""

    def __init__(self, feat_dim: int, n_data: int, nce_t: float, nce_m: float) -> None:
        super().__init__()
        self.n_data, self.nce_t, self.nce_m = n_data, nce_t, nce_m
        stdv = 1.0 / math.sqrt(feat_dim / 3)  # the authors' uniform initialisation
        self.register_buffer("memory_s", torch.rand(n_data, feat_dim) * 2 * stdv - stdv)
        self.register_buffer("memory_t", torch.rand(n_data, feat_dim) * 2 * stdv - stdv)
        self.register_buffer("z", torch.full((2,), -1.0))  # Z of the student and teacher scores; < 0 = not yet set

    @staticmethod
    def scores(bank: Tensor, e: Tensor, contrast: Tensor) -> Tensor:
        """``bank[contrast[i, j]] . e[i]``, B x (1 + K). Gathering B x (1 + K) bank rows (the authors' way) moves
        B (1 + K) D floats: 1 GB per bank and step at 64 + 64 images and K = 16,384, memory-bound on a CPU. When the
        bank is not much larger than that, scoring every bank row with one matrix product and picking the columns
        is the same number, several times faster."""
        if bank.shape[0] <= 8 * contrast.shape[1]:
            return torch.gather(e @ bank.t().clone(), 1, contrast)  # a copy: the bank is updated in place after
        rows = bank[contrast.flatten()].view(contrast.shape[0], contrast.shape[1], -1)
        return torch.bmm(rows, e.unsqueeze(2)).squeeze(2)

    def forward(self, e_s: Tensor, e_t: Tensor, idx: Tensor, contrast: Tensor) -> tuple[Tensor, Tensor]:
        """Normalised scores (student anchor vs teacher bank, teacher anchor vs student bank), B x (1 + K), for
        anchors at bank positions ``idx`` and ``contrast`` = [idx, negatives]; then the banks are updated."""
        out_s = torch.exp(self.scores(self.memory_t, e_s, contrast) / self.nce_t)
        out_t = torch.exp(self.scores(self.memory_s, e_t, contrast) / self.nce_t)
        with torch.no_grad():
            if self.z[0] < 0:  # fixed once, at the first step (the authors' ContrastMemory)
                self.z[0] = out_s.mean() * self.n_data
                self.z[1] = out_t.mean() * self.n_data
            for bank, e in ((self.memory_s, e_s), (self.memory_t, e_t)):
                pos = bank[idx] * self.nce_m + e.detach() * (1 - self.nce_m)
                bank.index_copy_(0, idx, F.normalize(pos, dim=1))
        return out_s / self.z[0], out_t / self.z[1]


class CRD(Distiller):
    name = "crd"
    description = "Contrastive Representation Distillation (Tian et al., ICLR 2020): NCE over a bank of labelled + pool"
    Config = CRDConfig
    teacher_outputs = ("pooled", "logits")
    cfg: CRDConfig

    def __init__(self, cfg: CRDConfig, student: Net, teacher: Net | None = None, **kwargs: int) -> None:
        super().__init__(cfg, student, teacher, **kwargs)
        n_data = self.labelled_size + self.pool_size
        if n_data < 2:
            raise ValueError("crd needs the labelled and pool sizes (labelled_size, pool_size) for its memory bank")
        self.embed_s = Embed(student.feature_channels[-1], cfg.feat_dim)
        self.embed_t = Embed(self.teacher.feature_channels[-1], cfg.feat_dim)
        self.memory = ContrastMemory(cfg.feat_dim, n_data, cfg.nce_t, cfg.nce_m)

    def bank_positions(self, batch: Batch) -> Tensor:
        """Bank positions of the batch's images: labelled ``idx_lb``, then unlabelled ``labelled_size + idx_ulb``."""
        if batch.idx_lb is None:
            raise ValueError("crd needs Batch.idx_lb (the labelled images' positions)")
        parts = [batch.idx_lb.cpu()]
        if batch.x_ulb:
            parts.append(batch.idx_ulb.cpu() + self.labelled_size)
        return torch.cat(parts)

    def losses(self, batch: Batch) -> dict[str, Tensor]:
        cfg = self.cfg
        logits_lb, logits_ulb, feats = self.forward_student(batch, features=True)
        teacher = self.teacher_on(batch)
        idx = self.bank_positions(batch)
        contrast = torch.cat([idx.unsqueeze(1), sample_negatives(idx, self.memory.n_data, cfg.nce_k, batch.gen)], 1)
        device = feats[-1].device
        with torch.autocast(device.type, enabled=False):  # exp(x / 0.07) needs float32
            e_s = self.embed_s(self.student.pool(feats[-1]).float())
            e_t = self.embed_t(teacher["pooled"].float())
            out_s, out_t = self.memory(e_s, e_t, idx.to(device), contrast.to(device))
            crd = nce_loss(out_s, self.memory.n_data) + nce_loss(out_t, self.memory.n_data)
        out = {"ce": cfg.gamma * cross_entropy(logits_lb, batch.y_lb), "crd": cfg.beta * crd}
        if cfg.alpha:
            out["kd"] = self.kd(torch.cat([logits_lb, logits_ulb]), teacher["logits"])
        return out
