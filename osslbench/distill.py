"""What the distillers share: :class:`Distiller` (a frozen teacher, the SRD paper's flipped unlabelled view, one
student and one teacher pass over labelled + unlabelled images), :class:`DistillConfig` (the CE / KD weights and the
temperature), logit standardisation (Sun et al. 2024), and the shared step of RepDistiller's feature distillers
(FitNet, AT, SP, CC, VID, RKD, PKT, AB, FT, FSP, NST) in the open set, as the SRD authors run them
(``jingyang2017/SRD_ossl``, ``helper/loops.py``, ``train_ssldistill``):

    L = gamma * CE(z_s, y) [labelled]  +  alpha * KL_T(z_s || z_t) [all]  +  beta * L_distiller(feat_s, feat_t) [all]

with the labelled and the unlabelled images of a batch (64 + 64) in ONE student pass and one no-grad pass of the
frozen, eval-mode teacher. A baseline file only says which layers it reads and writes its paper's loss.

Layers are chosen as in RepDistiller (``train_student.py``, ``helper/loops.py``; :mod:`osslbench.feature_maps`): by index into its
``is_feat`` list, i.e. the network's stage maps, shallow to deep, followed by the pooled final vector (``feat[-1]``;
``feat[-2]`` is the last map, ``feat[1:-1]`` the stage outputs). Here that list is built from ``Net``'s feature
maps (minus a head convolution's map that RepDistiller leaves out, ``Net.head_maps``) plus ``Net.pool`` of the
final map. The chosen layers of student and teacher are paired in order, cut to the shorter list (RepDistiller's
``zip``); a choice that selects nothing, the pooled vector where a map is needed, or shapes a loss cannot pair is
a :class:`ConfigError` naming the key, raised by :meth:`FeatureDistiller.check` in the preflight (and again when
the method is built).

Two-stage methods (AB, FT, FSP) run RepDistiller's initialisation stage (``helper/pretrain.py``, ``init``) before
the protocol's epochs through ``Method.init_epochs``: see :class:`InitStageConfig`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from .errors import ConfigError
from .feature_maps import Shape, match_spatial, pick, probe, regressor_fits, repdistiller_feats
from .method import Batch, Method, MethodConfig, cross_entropy, kl_div_t
from .models.base import Net
from .protocol import OptimConfig


@dataclass
class DistillConfig(MethodConfig):
    """Loss weights of RepDistiller's ``train_student.py`` (``-r``, ``-a``, ``--kd_T``), which the SRD authors keep
    for every distiller they run (``runs/run_kd_ssl.sh``); a method's config overrides a default its paper sets.

    :param gamma: cross-entropy weight on the labelled images (1, ``-r``'s default).
    :param alpha: weight of the term on the teacher's logits, on all images (0, ``-a 0``): Hinton's KL for KD, SRD,
        CRD and the feature distillers; DKD's target-class term.
    :param temperature: temperature of that term (4, ``--kd_T``).
    """

    gamma: float = 1.0
    alpha: float = 0.0
    temperature: float = 4.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.temperature <= 0:  # the KL divides the logits by T
            raise ValueError(f"temperature = {self.temperature} must be > 0")
        if min(self.gamma, self.alpha) < 0:
            raise ValueError("gamma and alpha must be >= 0")


def standardize(logits: Tensor, eps: float = 1e-7) -> Tensor:
    """Logit standardisation (Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024, Eq. 8 /
    Alg. 1): ``(z - mean(z)) / (eps + std(z))`` per image, over the classes; ``std`` is the unbiased one, as in the
    authors' ``normalize`` (``logit.std(dim=-1)``). KD and DKD offer it (``logit_std``)."""
    z = logits.float()
    return (z - z.mean(dim=1, keepdim=True)) / (eps + z.std(dim=1, keepdim=True))


class Distiller(Method):
    """Base of every distiller: a frozen, eval-mode teacher; the unlabelled images resized to 32 and flipped, not
    cropped (the SRD paper's open-set setting); the teacher sees the student's batch (:meth:`Method.teacher_on` for
    what a distiller declares in ``teacher_outputs``, so that the teacher-output cache can serve it)."""

    needs_teacher = True
    unlabelled_views = ("flip",)  # SRD paper: unlabelled images are resized to 32 and flipped, not cropped
    cfg: DistillConfig

    def kd(self, logits: Tensor, t_logits: Tensor) -> Tensor:
        """``alpha * KL_T(z_s || z_t)`` (Hinton et al. 2015) over the whole batch."""
        return self.cfg.alpha * kl_div_t(logits, t_logits, self.cfg.temperature)


@dataclass
class FeatureDistillConfig(DistillConfig):
    """The weights RepDistiller's ``train_student.py`` gives a feature distiller (``-r``, ``-a``, ``-b``), as the SRD
    authors pass them (``runs/run_kd_ssl.sh``: ``-a 0 -b <beta>``, ``-r`` left at its default 1).

    :param beta: weight of the distiller's own term on all images (each method's ``-b``).
    """

    beta: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta < 0:
            raise ValueError("beta must be >= 0")


@dataclass
class InitStageConfig(FeatureDistillConfig):
    """RepDistiller's initialisation stage (``helper/pretrain.py``, ``init``), run before the distillation stage.

    The authors train only the stage's modules (AB: connectors + the student's feature layers; FT: the teacher's
    paraphraser; FSP: the student's feature layers) on the init loss alone, unweighted, for ``--init_epochs 30``
    epochs of the labelled loader, with a fresh SGD (momentum 0.9, wd 5e-4) at a constant lr, then start the 240
    epochs of distillation with a new optimiser. Here: the first ``ceil(init_epochs * epochs)`` epochs of the run
    (30 on top of the protocol's 240), labelled images only, the main stage's optimiser state (momentum) restarted
    when it begins (the Trainer does it for every method with an init stage); parameters the init loss does not
    reach get no gradient, hence no update and no weight decay, as in the authors' separate optimiser.

    :param init_epochs: length of the init stage as a fraction of the protocol's epochs, rounded up (0.125: 30
        of 240, ``train_student.py``'s ``--init_epochs 30`` with ``--epochs 240``); 0 = no init stage.
    :param init_lr: the stage's constant learning rate; 0 = the optimiser's ``lr`` (``pretrain.py``:
        ``opt.learning_rate``, 0.05, or 0.01 for MobileNet / ShuffleNet students).
    """

    init_epochs: float = 0.125
    init_lr: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_epochs < 0 or self.init_lr < 0:
            raise ValueError("init_epochs and init_lr must be >= 0")


class FeatureDistiller(Distiller):
    """Base of the feature distillers: one student pass over labelled + unlabelled images, CE on the labelled,
    the optional KD term and ``beta * distill(feat_s, feat_t)`` on all of them.

    A subclass sets ``Config``, optionally ``preact`` and ``layers_key``, and defines :meth:`distill` (its paper's
    loss on RepDistiller's feature lists), :meth:`check_shapes` (its layer choice against the two networks' shapes)
    and :meth:`build` (its trainable modules) where the ``layers_key`` defaults do not do, and, with an init stage,
    :meth:`init_loss`.

    :cvar preact: the distiller reads pre-activation maps (RepDistiller's ``preact=True``: AB only).
    :cvar layers_key: the config field holding the layer choice (e.g. ``"layers"``): the default
        :meth:`check_shapes` checks it and ``self.layer_pairs`` holds its pairs before :meth:`build`; ``""`` = the
        distiller reads the pooled vector only (CC, RKD, PKT).
    :cvar regressed: each chosen student map is mapped onto its teacher map by a
        :class:`~osslbench.feature_maps.ConvRegressor` (FitNet's hint regressor, AB's connectors): the default
        :meth:`check_shapes` also checks that one fits.
    """

    preact: ClassVar[bool] = False
    layers_key: ClassVar[str] = ""
    regressed: ClassVar[bool] = False
    cfg: FeatureDistillConfig
    layer_pairs: list[tuple[int, int]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.teacher_outputs and (cls.layers_key or cls.preact):
            raise TypeError(f"{cls.__name__}: teacher_outputs serves the teacher's pooled vector and logits only; a "
                            "distiller of feature maps or pre-activations reads the teacher live")

    def __init__(self, cfg: FeatureDistillConfig, student: Net, teacher: Net | None = None, **kwargs: int) -> None:
        super().__init__(cfg, student, teacher, **kwargs)
        s_shapes = probe(student, self.image_size, self.preact)
        t_shapes = probe(self.teacher, self.image_size, self.preact)
        self.check_shapes(cfg, s_shapes, t_shapes)
        self.layer_pairs = self.chosen_pairs(cfg, s_shapes, t_shapes) if self.layers_key else []
        self.build(s_shapes, t_shapes)

    # --- what a distiller defines ------------------------------------------------------------
    @classmethod
    def check_shapes(cls, cfg: FeatureDistillConfig, s_shapes: list[Shape], t_shapes: list[Shape]) -> None:
        """Raise ``ConfigError`` (naming the key) when the layer choice does not fit these feature lists (by
        default: the choice in ``layers_key`` pairs at least one map of each network, a regressor fits each pair)."""
        if not cls.layers_key:
            return
        for i, j in cls.chosen_pairs(cfg, s_shapes, t_shapes):
            if cls.regressed and not regressor_fits(s_shapes[i], t_shapes[j]):
                raise ConfigError(f"{cls.key(cls.layers_key)} = {getattr(cfg, cls.layers_key)!r}: the student's map "
                                  f"{s_shapes[i]} cannot be regressed onto the teacher's {t_shapes[j]} (needs the same, "
                                  "double or half size, or larger)")

    def build(self, s_shapes: list[Shape], t_shapes: list[Shape]) -> None:
        """Create the distiller's trainable modules (regressor, embeddings, connectors) for these shapes; called with
        ``self.layer_pairs`` already set (the (student, teacher) positions of the choice in ``layers_key``)."""

    def distill(self, feat_s: list[Tensor], feat_t: list[Tensor]) -> Tensor:
        """The distiller's term (unweighted) on RepDistiller's feature lists of the whole batch."""
        raise NotImplementedError

    def init_loss(self, x: Tensor) -> Tensor:
        """The init stage's loss on the labelled images ``x`` (two-stage methods only); by default the distiller's own
        term, unweighted (RepDistiller's ``init`` of AB and FSP)."""
        feat_s = self.features(self.student, x)[1]
        with torch.no_grad():
            feat_t = self.features(self.teacher, x)[1]
        return self.distill(feat_s, feat_t)

    # --- the shared machinery ----------------------------------------------------------------
    @classmethod
    def check(cls, cfg: MethodConfig, student: Net, teacher: Net | None, image_size: int = 32) -> None:
        assert teacher is not None and isinstance(cfg, FeatureDistillConfig)
        cls.check_shapes(cfg, probe(student, image_size, cls.preact), probe(teacher, image_size, cls.preact))

    @classmethod
    def key(cls, field: str) -> str:
        return f"method.{cls.name}.{field}"

    @classmethod
    def pairs(cls, field: str, spec: str, s_shapes: list[Shape], t_shapes: list[Shape],
              maps: bool = True) -> list[tuple[int, int]]:
        """The (student, teacher) positions the choice ``spec`` of config key ``field`` pairs, in order and cut to
        the shorter list (RepDistiller's ``zip``); with ``maps``, the pooled vector may not be chosen."""
        key = cls.key(field)
        sel_s = pick(spec, len(s_shapes), key, "student")
        sel_t = pick(spec, len(t_shapes), key, "teacher")
        for net, sel, shapes in (("student", sel_s, s_shapes), ("teacher", sel_t, t_shapes)):
            if maps and len(shapes) - 1 in sel:
                raise ConfigError(f"{key} = {spec!r} selects the {net}'s pooled vector (entry {len(shapes) - 1} of "
                                  f"its feature list), where {cls.name} needs feature maps (entries 0..{len(shapes) - 2})")
        out = list(zip(sel_s, sel_t, strict=False))
        if not out:
            raise ConfigError(f"{key} = {spec!r} selects no layer of the {'student' if not sel_s else 'teacher'} "
                              f"(feature lists of {len(s_shapes)} and {len(t_shapes)} entries, the pooled vector last)")
        return out

    @classmethod
    def chosen_pairs(cls, cfg: FeatureDistillConfig, s_shapes: list[Shape], t_shapes: list[Shape]) -> list[tuple[int, int]]:
        """:meth:`pairs` of the choice held in the config field ``layers_key``."""
        return cls.pairs(cls.layers_key, str(getattr(cfg, cls.layers_key)), s_shapes, t_shapes)

    def paired_maps(self, feat_s: list[Tensor], feat_t: list[Tensor], match: bool = True) -> Iterator[tuple[Tensor, Tensor]]:
        """The (student, teacher) maps of ``self.layer_pairs``, in order; with ``match``, the larger map of each pair
        average-pooled to the smaller one's size (:func:`match_spatial`)."""
        for i, j in self.layer_pairs:
            yield match_spatial(feat_s[i], feat_t[j]) if match else (feat_s[i], feat_t[j])

    def init_epochs(self, epochs: int) -> int:
        frac = getattr(self.cfg, "init_epochs", 0.0)
        return math.ceil(frac * epochs - 1e-9) if frac > 0 else 0

    def lr_schedule(self, optim: OptimConfig, epochs: int, steps_per_epoch: int) -> Callable[[int], float]:
        main = super().lr_schedule(optim, epochs, steps_per_epoch)
        init_lr = getattr(self.cfg, "init_lr", 0.0)
        init_steps = self.init_epochs(epochs) * steps_per_epoch
        if not init_lr or not init_steps:
            return main
        return lambda step: init_lr / optim.lr if step < init_steps else main(step)

    def features(self, net: Net, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """``(logits, RepDistiller's feature list)`` of ``net`` on ``x`` (pre-activations when ``preact``)."""
        return repdistiller_feats(net, x, self.preact)

    def losses(self, batch: Batch) -> dict[str, Tensor]:
        if batch.in_init:
            return {f"{self.name}_init": self.init_loss(batch.x_lb)}
        cfg = self.cfg
        n = batch.x_lb.shape[0]
        x = torch.cat([batch.x_lb, *batch.x_ulb[:1]])  # one pass: BatchNorm sees labelled and unlabelled
        logits, feat_s = self.features(self.student, x)
        out = {"ce": cfg.gamma * cross_entropy(logits[:n], batch.y_lb)}
        if cfg.alpha or cfg.beta:
            if self.teacher_outputs:  # a distiller of the pooled vector alone (CC, RKD, PKT): cache-servable
                teacher = self.teacher_on(batch)
                t_logits, feat_t = teacher["logits"], [teacher["pooled"]]
            else:
                with torch.no_grad():
                    t_logits, feat_t = self.features(self.teacher, x)
            if cfg.alpha:
                out["kd"] = self.kd(logits, t_logits)
            if cfg.beta:
                out[self.name] = cfg.beta * self.distill(feat_s, feat_t)
        return out
