"""The exponential moving average of weights every method shares (evaluation EMA, Mean Teacher's teacher,
OpenMatch's selection model), with a warm-up that fits short schedules.

A constant decay ``d`` from step 0 averages over ~1/(1-d) steps: at 0.999 and 4,000 steps (the ``mini`` scale) the
model evaluated after epoch 1 would be ~82% random initialisation. The warm-up is TensorFlow's
``tf.train.ExponentialMovingAverage(decay, num_updates)``: the ``t``-th update (``t = 0, 1, ...``) uses

    d_t = min(d, (1 + t) / (10 + t)),    e_t = d_t * e_{t-1} + (1 - d_t) * w_t,    e_{-1} = the initial weights,

so early averages forget the initialisation within tens of steps and ``d`` is reached after ``(10 d - 1) / (1 - d)``
updates (~9,000 at 0.999). Floating-point buffers (BatchNorm statistics) are averaged the same way; integer buffers
(``num_batches_tracked``) are copied.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def warmup_decay(decay: float, t: int, warmup: bool = True) -> float:
    """The decay of update ``t`` (0-based): ``min(decay, (1 + t) / (10 + t))``, or ``decay`` without warm-up."""
    return min(decay, (1.0 + t) / (10.0 + t)) if warmup else decay


@torch.no_grad()
def ema_update(average: nn.Module, live: nn.Module, decay: float, buffers: bool = True) -> None:
    """``average <- decay * average + (1 - decay) * live`` over parameters and float buffers; other buffers copied.
    ``buffers=False`` leaves the average's buffers alone (Mean Teacher's teacher keeps its own BN statistics)."""
    for e, w in zip(average.parameters(), live.parameters(), strict=True):
        e.lerp_(w.detach(), 1.0 - decay)
    for e, w in zip(average.buffers(), live.buffers(), strict=True) if buffers else ():
        if e.is_floating_point():
            e.lerp_(w, 1.0 - decay)
        else:
            e.copy_(w)


class EMA(nn.Module):
    """An averaged copy of ``model`` (its teacher, held outside the state dict, is shared, never copied).

    :param decay: the target decay ``d`` (FixMatch, OpenMatch, Mean Teacher: 0.999).
    :param warmup: TensorFlow's ``min(d, (1 + t) / (10 + t))`` warm-up (default on).
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True) -> None:
        super().__init__()
        self.module = copy.deepcopy(model).requires_grad_(False)
        self.decay, self.warmup = decay, warmup
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def current_decay(self) -> float:
        """The decay the next :meth:`update` will use."""
        return warmup_decay(self.decay, int(self.updates), self.warmup)

    def update(self, live: nn.Module) -> None:
        ema_update(self.module, live, self.current_decay())
        self.updates += 1
