"""The protocol schema: the typed configs a protocol file is validated into (data, split, models, train,
optimiser) and the learning-rate schedules. Finding, reading and merging the files is
:mod:`osslbench.protocol_loader`'s.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .config import ADDED_LATER
from .errors import ConfigError

# CIFAR-100 channel statistics used by RepDistiller and the SRD code for every image,
# labelled and unlabelled alike (docs/protocols.md, "Augmentation").
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)


@dataclass
class DataConfig:
    """Where the images come from; sources are ``"<source>:<split>"`` (see ``osslbench list sources``).

    :param labelled: source of the labelled images (its seen classes).
    :param test: source of the test images (its seen classes are the closed-set test).
    :param unlabelled: a foreign source for the unseen part of the unlabelled pool (SRD paper:
        ``tinyimagenet:train``); empty = the unseen classes of the labelled source.
    :param outlier_test: held-out source of outlier test images for AUROC (never images used for
        training: Tiny-ImageNet *val* when its train split is the unlabelled pool); empty = the
        unseen classes of the test source (no outlier test when every class is seen).
    :param image_size: every source is resized to this size (the paper resizes Tiny-ImageNet to 32).
    :param mean: per-channel normalisation mean (CIFAR-100 statistics in the paper).
    :param std: per-channel normalisation std.
    :param crop_padding: padding of the random crop (RandomCrop(32, padding=4) in the paper).
    :param flip: random horizontal flip (on in the paper; off for digits, where it changes meaning).
    """

    labelled: str
    test: str
    unlabelled: str = ""
    outlier_test: str = ""
    image_size: int = 32
    mean: list[float] = field(default_factory=lambda: list(CIFAR100_MEAN))
    std: list[float] = field(default_factory=lambda: list(CIFAR100_STD))
    crop_padding: int = 4
    flip: bool = True

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std):
            raise ValueError("mean and std must have one value per channel")
        if self.image_size < 1 or self.crop_padding < 0:
            raise ValueError("image_size must be >= 1 and crop_padding >= 0")


@dataclass
class SplitConfig:
    """How the labelled / unlabelled / test / outlier-test index sets are drawn (per seed).

    :param seen_classes: the classes that are labelled: ``"all"``, or a list of class indices or
        names of the labelled source.
    :param seen_superclasses: when > 0, the seen classes are every class of the first
        ``seen_superclasses`` superclasses of the labelled source, in superclass-label order: CIFAR-100
        10 -> 50 seen classes, 11 -> 55, 16 -> 80, 4 -> 20 (OpenMatch, Saito et al. 2021; IOMatch, Li et
        al. 2023; SSB, Fan et al. 2023). Excludes ``seen_classes``.
    :param labels_per_class: labelled images per seen class, or ``"all"`` (SRD paper: all 500).
    :param unlabelled: size of the unlabelled pool, or ``"all"``.
    :param mismatch: fraction of the unlabelled pool drawn from unseen classes (exact counts:
        ``round(mismatch * unlabelled)``), or ``"natural"``: the pool is the foreign source when
        there is one (SRD paper), else every labelled-source image not labelled (OpenMatch-style).
    :param max_test: at most this many test images, and as many outlier-test images (0 = all): a fixed subset
        chosen by a hash of the image index, the same for every seed and method, so figures stay comparable.
        For smoke scales (evaluating a ResNet-32x4 teacher on 10,000 + 10,000 images takes minutes on a CPU);
        a reported figure is always on the whole test set.
    """

    seen_classes: list[int | str] | Literal["all"] = "all"
    seen_superclasses: int = field(default=0, metadata=ADDED_LATER)
    labels_per_class: int | Literal["all"] = "all"
    unlabelled: int | Literal["all"] = "all"
    mismatch: float | Literal["natural"] = "natural"
    max_test: int = field(default=0, metadata=ADDED_LATER)

    def __post_init__(self) -> None:
        if self.max_test < 0:
            raise ValueError(f"max_test = {self.max_test} must be >= 0 (0 = the whole test set)")
        if self.seen_superclasses < 0:
            raise ValueError(f"seen_superclasses = {self.seen_superclasses} must be >= 0")
        if self.seen_superclasses and self.seen_classes != "all":
            raise ValueError("give seen_classes or seen_superclasses, not both")
        if isinstance(self.mismatch, float) and not 0.0 <= self.mismatch <= 1.0:
            raise ValueError(f"mismatch = {self.mismatch} is outside [0, 1]")
        if isinstance(self.labels_per_class, int) and self.labels_per_class < 1:
            raise ValueError(f"labels_per_class = {self.labels_per_class} must be >= 1")
        if isinstance(self.unlabelled, int) and self.unlabelled < 0:
            raise ValueError(f"unlabelled = {self.unlabelled} must be >= 0")
        if isinstance(self.mismatch, float) and self.unlabelled == "all" and self.mismatch not in (0.0, 1.0):
            raise ValueError("a mismatch ratio strictly between 0 and 1 needs a fixed unlabelled count")


@dataclass
class ModelsConfig:
    """Teacher and student architectures (``osslbench list models``).

    SRD paper pairs: wrn-40-2 -> wrn-40-1, resnet32x4 -> resnet8x4, resnet32x4 -> ShuffleV1.
    """

    teacher: str
    student: str

    def __post_init__(self) -> None:  # an unknown student must not wait until the teacher has trained to be found
        from .models import MODELS

        for role in ("teacher", "student"):
            name = getattr(self, role)
            if name not in MODELS:
                close = difflib.get_close_matches(name, list(MODELS), n=1, cutoff=0.75)
                hint = f"; did you mean {close[0]!r}?" if close else " (osslbench list models)"
                raise ValueError(f"{role} = {name!r} is not a known model{hint}")
        from .models import MODEL_INFO

        if not MODEL_INFO[self.teacher].teacher:
            raise ValueError(f"teacher = {self.teacher!r} is a student-only model and cannot be a teacher")


@dataclass
class TrainConfig:
    """The training schedule (SRD paper: 240 epochs of one pass over the labelled set, 64 + 64).

    :param epochs: student epochs.
    :param teacher_epochs: epochs of a teacher trained by the harness (RepDistiller: 240).
    :param iters_per_epoch: iterations per epoch; 0 = one pass over the labelled set
        (50,000 / 64 = 781 in the paper).
    :param batch_size: labelled images per batch (64); a method's ``mu`` sets the unlabelled count.
    :param eval_every: evaluate every this many epochs (and always at the last epoch).
    :param last_k: the reported ``top1_lastk`` is the mean of the last k evaluations (never the best).
    :param eval_batch_size: batch size for evaluation and pool scoring.
    :param amp: bf16 autocast: ``"auto"`` (default) only where the device computes bf16 natively (CUDA with
        bf16; CPUs with AVX512-BF16 / AMX / Arm BF16), fp32 elsewhere (emulated bf16 is several times slower and
        moves the numbers; see ``osslbench.hardware``); ``true`` forces it, ``false`` is fp32. Every result records
        the precision used.
    :param channels_last: channels-last memory format (faster convolutions; measured on a 2-core AVX2 CPU in fp32,
        training img/s NCHW -> channels-last: cnn-small 35.7k -> 45.9k, WRN-16-1 533 -> 637, WRN-16-2 178 -> 189).
    :param teacher_cache: serve a frozen teacher's outputs on ``"flip"``-view unlabelled images from a cache
        computed once per pool image and flip (``osslbench/teacher_cache.py``), and on labelled crops + flips it
        has already seen from a cache filled as the run goes (``osslbench/teacher_view_cache.py``); bitwise equal
        to the live forward pass, checked before use, so it changes no number and is on by default.
    """

    epochs: int = 240
    teacher_epochs: int = 240
    iters_per_epoch: int = 0
    batch_size: int = 64
    eval_every: int = 1
    last_k: int = 5
    eval_batch_size: int = 512
    amp: bool | Literal["auto"] = "auto"
    channels_last: bool = True
    teacher_cache: bool = field(default=True, metadata=ADDED_LATER)

    def __post_init__(self) -> None:
        for key in ("epochs", "teacher_epochs", "batch_size", "eval_every", "last_k", "eval_batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} = {getattr(self, key)} must be >= 1")
        if self.iters_per_epoch < 0:
            raise ValueError("iters_per_epoch must be >= 0")


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule.

    Defaults are the SRD paper's for every distillation method: SGD momentum 0.9, weight decay
    5e-4, lr 0.05, x0.1 at epochs 150, 180, 210 of 240 (``milestones`` are fractions of training).
    ``cosine`` is FixMatch's ``lr * cos(7 pi k / 16 K)`` per iteration. ``cosine_annealing`` is PyTorch's
    ``CosineAnnealingLR(T_max=epochs, eta_min=lr_min)`` stepped once per epoch, as the SRD authors' PseudoLabel and
    Mean Teacher scripts run it (``train_pseudolabel.py``: ``eta_min=1e-4``):
    ``lr_min + (lr - lr_min) * (1 + cos(pi * e / E)) / 2`` in epoch ``e`` of ``E``.
    """

    name: Literal["sgd", "adam"] = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    decay_bn_bias: bool = True
    schedule: Literal["multistep", "cosine", "cosine_annealing", "constant"] = "multistep"
    milestones: list[float] = field(default_factory=lambda: [150 / 240, 180 / 240, 210 / 240])
    gamma: float = 0.1
    lr_min: float = field(default=0.0, metadata=ADDED_LATER)

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr = {self.lr} must be > 0")
        if any(not 0 < m < 1 for m in self.milestones):
            raise ValueError("milestones are fractions of training, each in (0, 1)")
        if not 0 <= self.lr_min <= self.lr:
            raise ValueError(f"lr_min = {self.lr_min} must be in [0, lr]")


def lr_factor(cfg: OptimConfig, step: int, total: int, steps_per_epoch: int = 1) -> float:
    """Learning-rate multiplier at iteration ``step`` of ``total`` (``steps_per_epoch`` for per-epoch schedules)."""
    if cfg.schedule == "cosine":  # FixMatch: lr * cos(7 pi k / (16 K))
        return math.cos(7 * math.pi * step / (16 * total))
    if cfg.schedule == "cosine_annealing":  # CosineAnnealingLR(T_max=epochs, eta_min=lr_min), stepped per epoch
        epoch, epochs = step // steps_per_epoch, max(1, total // steps_per_epoch)
        low = cfg.lr_min / cfg.lr
        return low + (1 - low) * (1 + math.cos(math.pi * epoch / epochs)) / 2
    if cfg.schedule == "multistep":
        return cfg.gamma ** sum(step >= m * total for m in cfg.milestones)
    return 1.0


@dataclass
class Protocol:
    """A fully resolved protocol: the file, then its scale, then ``--set`` overrides."""

    name: str
    description: str
    paper: str
    scale: str
    data: DataConfig
    split: SplitConfig
    models: ModelsConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    methods: list[str] = field(default_factory=lambda: ["supervised", "kd", "srd", "fixmatch"])
    seeds: list[int] = field(default_factory=lambda: [0])
    method: dict[str, Any] = field(default_factory=dict)  # per-method config tables, validated by each method
    source_file: str = ""
    scales: list[str] = field(default_factory=list)
    sweep: dict[str, Any] = field(default_factory=dict)  # the point of a --sweep (osslbench.sweep), e.g. {"mismatch": 0.5}
    overrides: dict[str, Any] = field(default_factory=dict)  # the --set tree: non-empty = a custom config, not the named scale

    @property
    def scale_label(self) -> str:
        """The scale as results name it: ``"full"``, or ``"full+custom"`` when ``--set`` changed the named scale (a run
        with ``train.epochs=3`` is not a full-scale result). Sweep points are named, not custom."""
        return f"{self.scale}+custom" if self.overrides else self.scale

    def __post_init__(self) -> None:
        bad = [s for s in self.seeds if not 0 <= s < SEED_LIMIT]
        if bad:
            raise ValueError(f"seeds: {bad[0]} is outside [0, 2**32)")
        if not self.seeds:
            raise ValueError("seeds: no seed given")
        self.seeds = list(dict.fromkeys(self.seeds))  # a repeated seed is one run, not two at once
        self.methods = list(dict.fromkeys(self.methods))
    # the student model's rules that hold (``register_model(student_defaults=...)``), after the scale and --set
    student_rules: dict[str, Any] = field(default_factory=dict)

    @property
    def variant(self) -> str:
        """The sweep point as a folder name, ``"mismatch=0.5"`` (empty outside a sweep)."""
        return ",".join(f"{k}={v}" for k, v in self.sweep.items())

    def folder(self, out: Path) -> Path:
        """Where this protocol's runs live: ``<out>/<protocol>/<scale>[/<sweep point>]``."""
        base = out / self.name / self.scale
        return base / self.variant if self.sweep else base

    def method_tree(self, name: str) -> dict[str, Any]:
        """The ``[method.<name>]`` table of this protocol (empty when absent)."""
        tree = self.method.get(name, {})
        if not isinstance(tree, dict):
            raise ConfigError(f"{self.source_file}: method.{name} must be a table")
        return tree


#: Seeds are numpy / torch generator seeds: non-negative and below 2**32 (numpy's legacy seeding limit).
SEED_LIMIT = 2**32
