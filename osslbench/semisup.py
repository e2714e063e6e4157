"""The building blocks of the semi-supervised baselines (``baselines/ssl/``, ``baselines/openset/``), each written once.

A baseline file holds its paper's idea; what several papers share lives here, so that no baseline imports another:

* optimisers: :data:`FIXMATCH_OPTIM` (FixMatch, OpenMatch, IOMatch, T2T), :data:`SRD_SSL_OPTIM` (the SRD authors'
  PseudoLabel / Mean Teacher scripts), :data:`MIXMATCH_OPTIM` (MixMatch, MTC);
* targets and losses: hard pseudo-labels with a confidence mask and their masked cross-entropy (Lee 2013; FixMatch),
  soft cross-entropy with an explicit reduction, the probability MSE of MixMatch;
* ramps and warm-ups: the sigmoid ramp of Laine & Aila (``ramp_length`` epochs), linear ramps over a fraction of
  training or over steps, the authors' epoch counts shrunk for a shorter run (``scaled_epochs``);
* the selected-subset stream (:class:`PoolSelection`): a subset of the pool re-selected at every epoch start;
* MixMatch (Berthelot et al. 2019): label guessing, MixUp, its two loss terms, the decoupled weight decay and the
  settings MixMatch and MTC (which runs MixMatch on its selected images) share (:class:`MixMatchBaseConfig`).

Otsu's selection of MTC and T2T is :func:`osslbench.ood.otsu_select`, beside the threshold it splits at.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .method import Batch, MethodConfig

# FixMatch (paper Table 7; FixMatch-pytorch): SGD Nesterov lr 0.03, momentum 0.9, cosine decay, weight decay 5e-4 not
# applied to BN and biases. OpenMatch's parser and USB (IOMatch) use it unchanged; T2T decays every parameter.
FIXMATCH_OPTIM: dict[str, Any] = {"name": "sgd", "lr": 0.03, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4,
                                  "decay_bn_bias": False, "schedule": "cosine"}
# The SRD authors' train_pseudolabel.py / train_meanteacher.py: SGD Nesterov lr 0.1, momentum 0.9, weight decay 5e-4,
# CosineAnnealingLR(T_max=epochs, eta_min=1e-4) stepped per epoch, not FixMatch's 7/16 cosine.
SRD_SSL_OPTIM: dict[str, Any] = {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4,
                                 "schedule": "cosine_annealing", "lr_min": 1e-4}
# MixMatch (official code; MTC's --lr 0.002): Adam lr 0.002, constant; weight decay applied decoupled after each step
# (:func:`decoupled_weight_decay`), not by Adam.
MIXMATCH_OPTIM: dict[str, Any] = {"name": "adam", "lr": 0.002, "weight_decay": 0.0, "schedule": "constant"}


# --- targets and losses ------------------------------------------------------------------------------------------
def hard_pseudo_labels(logits: Tensor, threshold: float, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Argmax targets (no gradient) and the 0/1 mask of the samples whose max softmax PROBABILITY of
    ``logits / temperature`` is >= ``threshold`` (FixMatch's ``max(p) >= tau``; 0 keeps every sample, Lee 2013)."""
    probs = torch.softmax(logits.detach().float() / temperature, dim=1)
    confidence, targets = probs.max(dim=1)
    return targets, (confidence >= threshold).float()


def masked_cross_entropy(logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """``mean_u(mask_u * CE(z_u, t_u))``: the mean over ALL samples, masked ones counting as 0 (FixMatch Eq. 4)."""
    return (F.cross_entropy(logits.float(), targets, reduction="none") * mask).mean()


def pseudo_label_loss(logits: Tensor, threshold: float, temperature: float = 1.0,
                      target_logits: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The masked cross-entropy of ``logits`` against the hard pseudo-labels of ``target_logits`` (default: the same
    logits, Pseudo-Label; FixMatch: the weak view's) and the mask."""
    targets, mask = hard_pseudo_labels(logits if target_logits is None else target_logits, threshold, temperature)
    return masked_cross_entropy(logits, targets, mask), mask


def soft_cross_entropy(logits: Tensor, targets: Tensor, reduction: Literal["mean", "none"]) -> Tensor:
    """``H(t_i, softmax(z_i)) = -sum_c t_ic log softmax(z_i)_c`` per sample (``"none"``; USB's ``ce_loss`` with soft
    targets) or its batch mean (``"mean"``; MixMatch's labelled loss on mixed targets)."""
    per_sample = -(targets * F.log_softmax(logits.float(), dim=1)).sum(dim=1)
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "none":
        return per_sample
    raise ValueError(f"reduction = {reduction!r}: expected 'mean' or 'none'")


def probability_mse(logits: Tensor, targets: Tensor) -> Tensor:
    """``|| q - softmax(z) ||^2 / L`` averaged over the batch (mean over batch x classes), MixMatch Eq. 4."""
    return F.mse_loss(logits.float().softmax(dim=1), targets)


# --- ramps and warm-ups ----------------------------------------------------------------------------------------------
def sigmoid_rampup(current: float, length: float) -> float:
    """``exp(-5 (1 - t / L)^2)`` for ``t < L``, else 1 (Laine & Aila 2017, "Temporal Ensembling", Sec. 3.1).

    The ramp of Tarvainen's Mean Teacher code and of the SRD authors' PseudoLabel / MeanTeacher scripts
    (``exp_rampup``); ``current`` and ``length`` in the same unit (epochs here, fractional).
    """
    if length <= 0:
        return 1.0
    t = min(max(current, 0.0), length)
    phase = 1.0 - t / length
    return math.exp(-5.0 * phase * phase)


def linear_rampup(progress: float, fraction: float) -> float:
    """``clip(progress / fraction, 0, 1)``; 1 when ``fraction`` is 0 (MixMatch's ramp of ``lambda_u``)."""
    return 1.0 if fraction <= 0 else min(max(progress / fraction, 0.0), 1.0)


def linear_ramp(step: int, start: int, length: float) -> float:
    """0 before ``start``, then linear from 0 to 1 over ``length`` steps, then 1 (1 at once when ``length <= 0``)."""
    if step < start:
        return 0.0
    return 1.0 if length <= 0 else min(1.0, (step - start) / length)


def ramp_length(ramp_epochs: float, ramp_fraction: float, epochs: int) -> float:
    """Epochs a ramp-up lasts: ``min(ramp_epochs, ramp_fraction * epochs)``.

    At the paper's scale (240 epochs, ``ramp_fraction`` = 30 / 240) this is the authors' 30 epochs; a
    shorter run (a mini scale, a test) ramps over the same fraction of its training instead of never
    reaching full weight.
    """
    return min(ramp_epochs, ramp_fraction * epochs)


def scaled_epochs(n: int, fraction: float, epochs: int) -> int:
    """``min(n, ceil(fraction * epochs))``: an epoch count of the authors' schedule (OpenMatch's ``start_fix``, MTC's
    ``pre_epochs``), shrunk in proportion for a shorter run instead of taking most of it."""
    return min(n, math.ceil(fraction * epochs))


def epoch_position(batch: Batch) -> float:
    """The current position in epochs, fractional (``step / steps_per_epoch``)."""
    return batch.step / batch.steps_per_epoch


@dataclass
class SigmoidRampConfig(MethodConfig):
    """The sigmoid ramp-up of an unlabelled weight in the SRD authors' PseudoLabel / Mean Teacher scripts.

    :param ramp_epochs: epochs of the sigmoid ramp-up of the unlabelled weight (30: the authors' scripts).
    :param ramp_fraction: cap of the ramp as a fraction of training (30 / 240: the 30 epochs on the paper's
        240-epoch schedule; a shorter run ramps over the same fraction of its training, see :func:`ramp_length`).
    """

    ramp_epochs: float = 30.0
    ramp_fraction: float = 30.0 / 240.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ramp_epochs < 0 or not 0.0 < self.ramp_fraction <= 1.0:
            raise ValueError("ramp_epochs must be >= 0 and ramp_fraction in (0, 1]")


def sigmoid_ramp(cfg: SigmoidRampConfig, batch: Batch) -> float:
    """``sigmoid_rampup(epoch position, ramp length)`` of the ramp ``cfg`` at ``batch``."""
    return sigmoid_rampup(epoch_position(batch), ramp_length(cfg.ramp_epochs, cfg.ramp_fraction, batch.epochs))


# --- the selected-subset stream --------------------------------------------------------------------------------------
class PoolSelection:
    """Mixin of the methods that re-select a subset of the unlabelled pool at every epoch start (OpenMatch, MTC, T2T):
    ``on_epoch_start`` sets ``_selected`` (pool positions, or None for no stream this epoch) from the weights alone, so
    a resumed run selects the same; :meth:`selection` hands it to the batch pipeline's ``selected_views`` stream.
    List it before :class:`~osslbench.method.Method` among the bases."""

    _selected: Tensor | None = None

    def selection(self) -> Tensor | None:
        return self._selected


# --- MixMatch ----------------------------------------------------------------------------------------------------------
@dataclass
class MixMatchBaseConfig(MethodConfig):
    """MixMatch's settings (paper Sec. 4, official code ``google-research/mixmatch``; docs/baselines.md), shared by
    MixMatch and MTC, whose authors run MixMatch with the same values (``train_multi.py``'s parser).

    :param mu: unlabelled images per labelled image (1: 64 + 64).
    :param ema_decay: EMA of the weights used for evaluation (0.999).
    :param k: weak views of each unlabelled image averaged to guess its label (K = 2).
    :param temperature: sharpening temperature T (0.5).
    :param alpha: MixUp's Beta(alpha, alpha) parameter (0.75).
    :param lambda_u: maximum weight of the unlabelled loss (75 for CIFAR-10 in the paper; the SRD authors'
        script uses 75 for CIFAR-100 too).
    :param rampup_fraction: fraction of training over which ``lambda_u`` ramps up linearly from 0: the official
        code ramps over 1024 kimg = 16 "epochs" of 1024 iterations out of the 1024 "epochs" of the PyTorch
        reimplementation the SRD authors run, i.e. 16 / 1024 (the paper: "the first 16,000 steps"); MTC counts
        it over its MixMatch phase, after the warm-up.
    :param decoupled_wd: per-step decoupled weight decay ``w <- w * (1 - decoupled_wd)`` of the conv / linear
        weights after each Adam step (official code: ``wd = 0.02 * lr`` = 0.02 x 0.002 = 4e-5); Adam itself has
        no weight decay.
    """

    mu: float = 1.0
    ema_decay: float = 0.999
    k: int = 2
    temperature: float = 0.5
    alpha: float = 0.75
    lambda_u: float = 75.0
    rampup_fraction: float = 16.0 / 1024.0
    decoupled_wd: float = 0.02 * 0.002

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.k < 1:
            raise ValueError(f"k = {self.k} must be >= 1")
        if self.temperature <= 0 or self.alpha <= 0:
            raise ValueError("temperature and alpha must be > 0")
        if not 0.0 <= self.rampup_fraction <= 1.0 or not 0.0 <= self.decoupled_wd < 1.0:
            raise ValueError("rampup_fraction must be in [0, 1] and decoupled_wd in [0, 1)")


def sharpen(p: Tensor, temperature: float) -> Tensor:
    """``p_i^(1/T) / sum_j p_j^(1/T)`` per row (MixMatch Eq. 7)."""
    pt = p.pow(1.0 / temperature)
    return pt / pt.sum(dim=1, keepdim=True)


def guess_labels(logits_views: Tensor, k: int, temperature: float) -> Tensor:
    """Sharpened mean softmax over the ``k`` views; ``logits_views`` stacks the views: ``(k * n) x C``."""
    p = logits_views.detach().float().softmax(dim=1).view(k, -1, logits_views.shape[1]).mean(dim=0)
    return sharpen(p, temperature)


def mixup(x: Tensor, targets: Tensor, alpha: float, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """MixUp of every row with a row of a shuffled copy, ``lambda' = max(lambda, 1 - lambda)`` per row.

    Random numbers come from ``gen`` (the Trainer's per-epoch generator; torch's Beta sampler takes no
    generator, so lambda is drawn by numpy from a seed taken out of ``gen``).
    Returns the mixed inputs, the mixed targets and the per-row ``lambda'``.
    """
    n = x.shape[0]
    rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=gen)))
    lam = torch.from_numpy(rng.beta(alpha, alpha, n)).float()
    lam = torch.maximum(lam, 1.0 - lam).to(x.device)
    perm = torch.randperm(n, generator=gen).to(x.device)
    lam_x = lam.view(-1, *([1] * (x.dim() - 1)))
    x_mix = lam_x * x + (1.0 - lam_x) * x[perm]
    t_mix = lam[:, None] * targets + (1.0 - lam[:, None]) * targets[perm]
    return x_mix, t_mix, lam


def mix_batch(student: nn.Module, x_lb: Tensor, y_lb: Tensor, views: list[Tensor], num_classes: int,
              cfg: MixMatchBaseConfig, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """MixMatch's Algorithm 1: the mixed inputs and targets, labelled rows first, then the K ``views`` of the
    unlabelled images (their targets: the sharpened mean prediction over the views, without gradient)."""
    with torch.no_grad():
        q = guess_labels(student(torch.cat(views)), len(views), cfg.temperature)
    p = F.one_hot(y_lb, num_classes).float()
    x_mix, t_mix, _ = mixup(torch.cat([x_lb, *views]), torch.cat([p, *([q] * len(views))]), cfg.alpha, gen)
    return x_mix, t_mix


def mixmatch_terms(student: nn.Module, x_mix: Tensor, t_mix: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """MixMatch's ``(L_x, L_u)`` (unweighted): soft cross-entropy on the ``n`` mixed labelled rows and probability MSE
    on the rest, from ONE forward over the whole mixed batch (BatchNorm sees labelled and unlabelled rows together,
    where the official code interleaves 1 + K chunks and keeps the first chunk's BatchNorm updates)."""
    logits = student(x_mix)
    return soft_cross_entropy(logits[:n], t_mix[:n], "mean"), probability_mse(logits[n:], t_mix[n:])


@torch.no_grad()
def decoupled_weight_decay(module: nn.Module, wd: float) -> None:
    """``w <- w * (1 - wd)`` of the conv / linear weights (the official code's ``'kernel'`` variables), not of the
    BatchNorm parameters and biases; nothing when ``wd`` is 0."""
    if wd:
        for p in module.parameters():
            if p.ndim > 1:
                p.mul_(1.0 - wd)
