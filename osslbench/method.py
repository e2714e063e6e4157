"""The common method interface: a method declares what it needs and computes named losses.

In the spirit of mdistiller's ``Distiller`` and USB's ``train_step``: the Trainer owns the
optimiser, schedule, precision, EMA, checkpoints and logging; a method owns its loss equation,
its extra trainable modules (connector, heads) and, optionally, epoch hooks that re-score the
unlabelled pool. A new method is one file under ``baselines/<family>/`` holding a ``Method`` subclass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .models.base import Net
from .ood import pooled
from .protocol import OptimConfig, lr_factor
from .teacher_cache import teacher_outputs


@dataclass
class MethodConfig:
    """Settings every method has; a method's ``Config`` subclasses this with its paper's defaults.

    :param mu: unlabelled images per labelled image in a batch (SRD paper: 1, i.e. 64 + 64;
        FixMatch: 7). Ignored by methods that use no unlabelled data.
    :param ema_decay: decay of an exponential moving average of the method's weights used for
        evaluation; 0 = evaluate the trained weights (FixMatch / MeanTeacher: 0.999).
    :param ema_warmup: every EMA of the method (the evaluated one, Mean Teacher's teacher, OpenMatch's selection
        model) warms up as TensorFlow's ``ExponentialMovingAverage`` with ``num_updates``:
        ``min(d, (1 + t) / (10 + t))`` at update ``t`` (:mod:`osslbench.ema`); ``false`` = ``d`` from step 0.
    :param optim: overrides of the protocol's ``[optim]`` for this method (e.g. FixMatch's SGD
        Nesterov lr 0.03 with a cosine schedule); the method class's ``optim_defaults`` come first.
    """

    mu: float = 1.0
    ema_decay: float = 0.0
    ema_warmup: bool = True
    optim: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mu < 0:
            raise ValueError(f"mu = {self.mu} must be >= 0")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay = {self.ema_decay} must be in [0, 1)")


@dataclass
class Batch:
    """One training step's inputs, already augmented, normalised and on the device.

    :param x_lb: labelled images (weak view).
    :param y_lb: their labels (0..num_seen-1).
    :param x_ulb: views of the unlabelled images, in the order of ``Method.unlabelled_views``.
    :param idx_ulb: positions of the unlabelled images in the pool (for per-sample state).
    :param epoch: current epoch (0-based).
    :param step: global iteration (0-based).
    :param steps_per_epoch: iterations per epoch (ramp-ups defined in epochs use ``step / steps_per_epoch``).
    :param epochs: total epochs of the run (an init stage's included).
    :param x_sel: views of images drawn from the method's selected subset (``Method.selection``), in the
        order of ``Method.selected_views``; empty when the method selects nothing or the subset is empty.
    :param idx_sel: their positions in the pool.
    :param flips_ulb: for each view of ``x_ulb`` that is ``"flip"``, which images are mirrored (bool, CPU); None
        for the other views (the teacher-output cache serves the matching entry).
    :param teacher_ulb: serves the frozen teacher's outputs on ``x_ulb[0]`` (``Method.teacher_outputs``) from the
        teacher-output cache; None = computed live. Read through :meth:`Method.teacher_on`.
    :param x_lb_extra: further views of the same labelled images, in the order of ``Method.labelled_views[1:]``
        (OpenMatch's second labelled view); empty for most methods.
    :param gen: the CPU generator of this epoch's random draws, seeded from ``(seed, epoch)``. A method
        draws its own random numbers (MixUp's lambda, random classes) from it, never from torch's global
        generator: that keeps runs reproducible, resumable and independent of other runs in the process.
    :param idx_lb: positions of the labelled images in the labelled set (per-sample state over the whole
        training set, e.g. CRD's memory bank: labelled position ``i`` and pool position ``labelled_size + j``).
    :param init_epochs: epochs of the method's initialisation stage at the start of the run (``Method.init_epochs``).
    :param views_lb: which crop + flip each labelled image got when ``Method.labelled_views[0]`` is ``"weak"``
        (:attr:`osslbench.data.augment.CropFlip.ids`, CPU); None for the other views.
    :param teacher_lb: serves the frozen teacher's outputs on ``x_lb`` from the labelled-view cache (computing only
        the views it has not seen yet, ``osslbench/teacher_view_cache.py``); None = computed live. Read through
        :meth:`Method.teacher_on`.
    """

    x_lb: Tensor
    y_lb: Tensor
    x_ulb: list[Tensor]
    idx_ulb: Tensor
    epoch: int
    step: int
    steps_per_epoch: int
    epochs: int
    x_sel: list[Tensor] = field(default_factory=list)
    idx_sel: Tensor | None = None
    gen: torch.Generator = field(default_factory=torch.Generator)
    x_lb_extra: list[Tensor] = field(default_factory=list)
    idx_lb: Tensor | None = None
    init_epochs: int = 0
    flips_ulb: list[Tensor | None] = field(default_factory=list)
    teacher_ulb: Callable[[], dict[str, Tensor]] | None = None
    views_lb: Tensor | None = None
    teacher_lb: Callable[[], dict[str, Tensor]] | None = None

    @property
    def in_init(self) -> bool:
        """The step belongs to the method's initialisation stage (``Method.init_epochs``)."""
        return self.epoch < self.init_epochs

    @property
    def progress(self) -> float:
        """Fraction of training completed, in [0, 1)."""
        return self.step / (self.steps_per_epoch * self.epochs)


@dataclass
class PoolAccess:
    """What an epoch hook may use: the whole unlabelled pool and a batched, no-grad evaluator.

    :param size: number of images in the unlabelled pool.
    :param map: ``map(fn)`` applies ``fn(x) -> Tensor`` (x normalised, unaugmented) to the whole
        pool in evaluation batches with the model in eval mode and returns the concatenation.
    :param epoch: the epoch about to start.
    :param epochs: total epochs (an init stage's included).
    :param init_epochs: epochs of the method's initialisation stage at the start of the run.
    """

    size: int
    map: Callable[[Callable[[Tensor], Tensor]], Tensor]
    epoch: int
    epochs: int
    init_epochs: int = 0


class _Frozen:
    """Holds a module outside the method's parameters, state dict and deep copies (the teacher)."""

    def __init__(self, module: nn.Module | None) -> None:
        self.module = module

    def __deepcopy__(self, memo: dict) -> _Frozen:
        return self


class Method(nn.Module):
    """Base class of every baseline. Subclasses set the class attributes and ``losses``.

    :cvar name: registry name (``osslbench run --methods <name>``).
    :cvar description: one line for ``osslbench list methods``.
    :cvar Config: the typed config dataclass (paper defaults, cited in its docstring).
    :cvar needs_teacher: the Trainer supplies a frozen, eval-mode teacher.
    :cvar unlabelled_views: views of each unlabelled image the method wants: ``"weak"`` (flip +
        padded crop), ``"strong"`` (weak + RandAugment + Cutout), ``"plain"``; ``()`` = no unlabelled data.
    :cvar labelled_views: views of each labelled image (``"weak"``: one, ``Batch.x_lb``; OpenMatch: two, the second
        in ``Batch.x_lb_extra``).
    :cvar selected_views: views of a second unlabelled stream drawn from the subset the method
        selects each epoch (OpenMatch, MTC, T2T: re-selected from the WHOLE pool by ``on_epoch_start``,
        returned by ``selection``); ``()`` = no such stream. A subset smaller than one batch forms no batch
        that epoch (the authors' ``drop_last`` loaders), so a tiny selection is never drawn hundreds of times.
    :cvar padding_mode: padding of the random crop of the weak and strong views: ``"constant"`` (zeros,
        RepDistiller's ``RandomCrop(32, padding=4)``, the distillers) or ``"reflect"`` (the FixMatch family's
        ``RandomCrop(32, padding=4, padding_mode="reflect")``).
    :cvar needs_unlabelled: the method is meaningless without unlabelled images (every SSL method):
        ``mu = 0`` is a config error instead of an empty unlabelled batch (distillers may run closed-set).
    :cvar teacher_outputs: what the method reads from the frozen teacher through :meth:`teacher_on`:
        ``"logits"``, ``"pooled"`` (pooled final feature map) and/or ``"final_map"``. With ``unlabelled_views``
        starting with ``"flip"``, the Trainer may serve the unlabelled rows from the teacher-output cache
        (``osslbench/teacher_cache.py``); an instance may narrow it from its config (SRD without its KD term).
    :cvar optim_defaults: the method's own optimiser settings, over the protocol's ``[optim]``.
    :cvar family: ``distill``, ``ssl``, ``openset``, ...; empty = the ``baselines/`` folder the file lives in.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    needs_teacher: ClassVar[bool] = False
    unlabelled_views: ClassVar[tuple[str, ...]] = ()
    labelled_views: ClassVar[tuple[str, ...]] = ("weak",)
    selected_views: ClassVar[tuple[str, ...]] = ()
    padding_mode: ClassVar[Literal["constant", "reflect"]] = "constant"
    needs_unlabelled: ClassVar[bool] = False
    teacher_outputs: tuple[str, ...] = ()
    optim_defaults: ClassVar[dict[str, Any]] = {}
    family: ClassVar[str] = ""

    def __init__(self, cfg: MethodConfig, student: Net, teacher: Net | None = None, num_classes: int = 0,
                 pool_size: int = 0, labelled_size: int = 0, image_size: int = 32) -> None:
        super().__init__()
        self.cfg = cfg
        self.student = student
        self.num_classes = num_classes or student.classifier.out_features
        self.pool_size = pool_size  # images in the unlabelled pool (for per-sample state buffers)
        self.labelled_size = labelled_size  # images in the labelled set (state over the whole training set)
        self.image_size = image_size  # side of the training images (modules sized from feature-map shapes)
        if self.needs_teacher and teacher is None:
            raise ValueError(f"method {self.name} needs a teacher")
        if teacher is not None:
            teacher.eval().requires_grad_(False)
        self._teacher = _Frozen(teacher)
        self._records: dict[str, list[float]] = {}

    @property
    def teacher(self) -> Net:
        """The frozen teacher (never trained, never saved with the method, never copied)."""
        assert self._teacher.module is not None, f"{self.name} has no teacher"
        return self._teacher.module

    def train(self, mode: bool = True) -> Method:
        super().train(mode)
        if self._teacher.module is not None:
            self._teacher.module.eval()  # the teacher's BatchNorm statistics stay frozen
        return self

    @property
    def uses_unlabelled(self) -> bool:
        return bool(self.unlabelled_views) and self.cfg.mu > 0

    # --- what a method defines -------------------------------------------------------------
    @classmethod
    def check(cls, cfg: MethodConfig, student: Net, teacher: Net | None, image_size: int = 32) -> None:
        """Refuse a config that does not fit the architectures on ``image_size`` inputs (a layer choice out of
        range, too few feature maps) with a ``ConfigError`` naming the key. Runs in the preflight on freshly
        built models, before anything is trained or written; a method may check again in ``__init__``."""

    def init_epochs(self, epochs: int) -> int:
        """Epochs of an initialisation stage run BEFORE the protocol's ``epochs`` (RepDistiller's ``init`` of
        AB, FT and FSP); default 0. The Trainer runs ``init + epochs`` epochs, restarts the optimiser's state
        (momentum) when the main stage begins, as a paper's separate stage optimiser would, and tells the
        method the stage through ``Batch.init_epochs`` / ``PoolAccess.init_epochs``."""
        return 0

    def losses(self, batch: Batch) -> dict[str, Tensor]:
        """Named loss terms of one step; the Trainer optimises their sum and logs each."""
        raise NotImplementedError

    def predict(self, x: Tensor, features: bool = False) -> Any:
        """Logits used for evaluation (default: the student's). With ``features``: ``(logits, h)``, ``h`` the pooled
        final features of the SAME forward pass (the input of every head), which evaluation hands to
        :meth:`ood_score`. A method that evaluates another network (Mean Teacher's EMA teacher) overrides both forms."""
        return pooled(self.student, x) if features else self.student(x)

    def ood_score(self, x: Tensor, logits: Tensor, features: Tensor) -> Tensor:
        """Outlier score, higher = more likely an outlier (default: 1 - max softmax probability).

        ``logits`` and ``features`` come from the forward pass of ``predict(x, features=True)``: a method with an
        OOD head applies it to ``features`` instead of running the backbone on ``x`` a second time."""
        return 1.0 - logits.float().softmax(dim=1).amax(dim=1)

    def on_epoch_start(self, pool: PoolAccess) -> dict[str, float]:
        """Hook before each epoch (re-scoring the unlabelled pool, stages); returns figures to log.

        Runs again on resume from the restored weights, so it must depend only on the method's state.
        """
        return {}

    def after_step(self) -> None:
        """Hook after each optimiser step (e.g. MeanTeacher's EMA teacher update)."""

    def selection(self) -> Tensor | None:
        """Pool positions the ``selected_views`` stream samples from this epoch (None = no stream)."""
        return None

    def lr_schedule(self, optim: OptimConfig, epochs: int, steps_per_epoch: int) -> Callable[[int], float]:
        """Learning-rate multiplier of each iteration (step counted from the start of the run): by default the
        schedule's starting value through an init stage (``init_epochs``; RepDistiller's ``init`` trains at the
        base lr), then ``optim.schedule`` over the protocol's ``epochs``; a method whose paper runs stages with
        their own schedules (T2T, FT's init lr) overrides it. A function of the step alone, so that resume
        restores it."""
        total = epochs * steps_per_epoch
        init = self.init_epochs(epochs) * steps_per_epoch
        return lambda step: lr_factor(optim, max(0, step - init), total, steps_per_epoch)

    # --- helpers shared by the baselines -------------------------------------------------------
    def teacher_on(self, batch: Batch) -> dict[str, Tensor]:
        """The frozen teacher's ``teacher_outputs`` on labelled + unlabelled view 0 (labelled rows first), without
        gradient. The unlabelled rows come from the teacher-output cache when the Trainer attached them
        (``batch.teacher_ulb``) and the labelled rows from the labelled-view cache (``batch.teacher_lb``) when the
        Trainer attached them, bitwise equal to the forward pass they replace."""
        with torch.no_grad():
            if batch.teacher_ulb is None and batch.teacher_lb is None:
                return teacher_outputs(self.teacher, torch.cat([batch.x_lb, *batch.x_ulb[:1]]), self.teacher_outputs)
            names = self.teacher_outputs
            lb = batch.teacher_lb() if batch.teacher_lb is not None else teacher_outputs(self.teacher, batch.x_lb, names)
            if batch.teacher_ulb is not None:
                ulb = batch.teacher_ulb()
            else:  # (the Trainer serves labelled rows alone only to runs without an unlabelled batch)
                ulb = teacher_outputs(self.teacher, batch.x_ulb[0], names) if batch.x_ulb else {k: lb[k][:0] for k in names}
            return {k: torch.cat([lb[k], ulb[k]]) for k in names}

    def record(self, **values: Tensor | float) -> None:
        """Figures to log, averaged over the epoch and not optimised (e.g. FixMatch's mask rate)."""
        for key, value in values.items():
            self._records.setdefault(key, []).append(float(value))

    def pop_records(self) -> dict[str, float]:
        """The epoch means of :meth:`record`'s figures, then forget them."""
        out = {k: sum(v) / len(v) for k, v in self._records.items()}
        self._records.clear()
        return out

    def forward_student(self, batch: Batch, view: int = 0, features: bool = False) -> Any:
        """One student forward over labelled + unlabelled view ``view`` (one pass: BatchNorm sees both).

        Returns ``(logits_lb, logits_ulb)`` or, with ``features``, ``(logits_lb, logits_ulb, feats)``
        where ``feats`` covers the concatenated batch.
        """
        n = batch.x_lb.shape[0]
        x = torch.cat([batch.x_lb, batch.x_ulb[view]]) if batch.x_ulb else batch.x_lb
        if features:
            logits, feats = self.student(x, features=True)
            return logits[:n], logits[n:], feats
        logits = self.student(x)
        return logits[:n], logits[n:]


def cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy in float32 (logits may come out of bf16 autocast)."""
    return F.cross_entropy(logits.float(), target)


def kl_div_t(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Hinton et al. 2015 distillation loss ``KL(p_t^T || p_s^T) * T^2``, batch mean (RepDistiller's DistillKL)."""
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=1)
    p_t = F.softmax(teacher_logits.float() / t, dim=1)
    return F.kl_div(log_p_s, p_t, reduction="batchmean") * t * t
