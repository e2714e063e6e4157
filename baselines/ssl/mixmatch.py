"""MixMatch: Berthelot, Carlini, Goodfellow, Papernot, Oliver, Raffel, "MixMatch: A Holistic Approach to
Semi-Supervised Learning", NeurIPS 2019 (Algorithm 1; code ``google-research/mixmatch``).

Label guessing: the average softmax over K weak views of each unlabelled image, sharpened with temperature
T (``Sharpen(p, T)_i = p_i^(1/T) / sum_j p_j^(1/T)``). Labelled images (one-hot targets) and the K views
(each with the guessed target) are concatenated, and every row is MixUp-ed with a row of a shuffled copy
of the concatenation, ``lambda ~ Beta(alpha, alpha)``, ``lambda' = max(lambda, 1 - lambda)`` per sample
(the official ``MixMode.augment_pair``), so each mixed row stays closer to its own image:

    L = H(p', softmax(z(x')))  [mixed labelled rows, soft cross-entropy]
        + lambda_u * w(t) * || q' - softmax(z(u')) ||^2 / L  [mixed unlabelled rows, mean over batch x classes]

with ``w(t)`` a linear ramp over the first ``rampup_fraction`` of training. Evaluation uses an EMA of the
weights (the Trainer's ``ema_decay``).

Simplification: the official code splits the mixed batch into ``1 + K`` interleaved chunks and keeps only the
first chunk's BatchNorm updates; here the whole mixed batch goes through the network in ONE forward pass,
so BatchNorm sees labelled and unlabelled rows together (as in every other method of the harness).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from osslbench.method import Batch, Method
from osslbench.models.base import Net
from osslbench.semisup import (
    MIXMATCH_OPTIM,
    MixMatchBaseConfig,
    decoupled_weight_decay,
    linear_rampup,
    mix_batch,
    mixmatch_terms,
)


@dataclass
class MixMatchConfig(MixMatchBaseConfig):
    """MixMatch's CIFAR settings (paper, Sec. 4 / official code; docs/baselines.md): the fields and defaults of
    :class:`~osslbench.semisup.MixMatchBaseConfig`, documented there (``mu`` 1, ``ema_decay`` 0.999, ``k`` 2,
    ``temperature`` 0.5, ``alpha`` 0.75, ``lambda_u`` 75, ``rampup_fraction`` 16 / 1024, ``decoupled_wd`` 4e-5)."""


class MixMatch(Method):
    name = "mixmatch"
    description = "MixMatch (Berthelot et al. 2019): sharpened K-view label guesses, MixUp of labelled + unlabelled"
    Config = MixMatchConfig
    unlabelled_views = ("weak", "weak")  # K weak views; set per instance from cfg.k
    padding_mode = "reflect"  # MixMatch-pytorch: pad(x, 4) in "reflect" mode before the random crop
    needs_unlabelled = True
    optim_defaults = MIXMATCH_OPTIM  # Adam lr 0.002, constant; weight decay decoupled (after_step), not by Adam
    cfg: MixMatchConfig

    def __init__(self, cfg: MixMatchConfig, student: Net, teacher: Net | None = None, **kwargs: int) -> None:
        super().__init__(cfg, student, teacher, **kwargs)
        self.unlabelled_views = ("weak",) * cfg.k  # type: ignore[misc]  # K comes from the config

    def unlabelled_weight(self, batch: Batch) -> float:
        """``lambda_u * clip(progress / rampup_fraction, 0, 1)``."""
        return self.cfg.lambda_u * linear_rampup(batch.progress, self.cfg.rampup_fraction)

    def mix(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """MixMatch's Algorithm 1 on the labelled batch and the K views of the unlabelled one."""
        return mix_batch(self.student, batch.x_lb, batch.y_lb, batch.x_ulb, self.num_classes, self.cfg, batch.gen)

    def losses(self, batch: Batch) -> dict[str, Tensor]:
        ce, unsup = mixmatch_terms(self.student, *self.mix(batch), batch.x_lb.shape[0])
        w = self.unlabelled_weight(batch)
        self.record(unlabelled_weight=w)
        return {"ce": ce, "unsup": w * unsup}

    def after_step(self) -> None:
        """The official code's decoupled weight decay of the conv / linear weights (``'kernel'`` variables)."""
        decoupled_weight_decay(self.student, self.cfg.decoupled_wd)
