"""The common network interface (`Net`) and the model registry decorator (`register_model`).

Every architecture of the zoo subclasses :class:`Net` and implements :meth:`Net.forward_features`; the
logits are always computed as ``head(feats[-1])`` so that the three views of a network (plain logits, logits
with features, the classifier applied to the final feature map) agree exactly.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MODELS", "DESCRIPTIONS", "MODEL_INFO", "ModelInfo", "Net", "register_model"]


class Net(nn.Module):
    """A classification network that exposes its intermediate feature maps.

    Subclasses set ``feature_channels`` in ``__init__``, implement :meth:`forward_features` and name the
    final linear layer through ``classifier_path`` (``"fc"`` by default; RepDistiller's MobileNetV2 keeps it
    in ``classifier.0`` and its ShuffleNets in ``linear``, so that their checkpoint keys stay unchanged).
    """

    #: dotted path of the final ``nn.Linear`` inside the module tree (kept where the checkpoint keys want it)
    classifier_path: str = "fc"
    #: the name the network was registered under (set by the registry; recorded in checkpoints)
    arch: str = ""
    #: channels of each entry of the feature list, shallow to deep (final map last)
    feature_channels: list[int]
    #: trailing entries of the feature list computed by a head convolution after the last stage (ShuffleV2,
    #: MobileNetV2): RepDistiller's ``is_feat`` list leaves them out and gives only their pooled vector
    head_maps: int = 0

    @property
    def classifier(self) -> nn.Linear:
        """The final linear layer; callable on its own on pooled features (B x C -> B x num_classes)."""
        module: nn.Module = self
        for atom in self.classifier_path.split("."):
            module = module._modules[atom]  # not getattr: `classifier` may itself be a submodule name
        assert isinstance(module, nn.Linear)
        return module

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """Intermediate spatial feature maps, shallow to deep; the last one is the map before global pooling."""
        raise NotImplementedError

    def forward_preact(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """``(feats, preact)``: the maps of :meth:`forward_features` and, entry for entry, their pre-activations
        (RepDistiller's ``preact=True``, used by AB): each map as it enters the ReLU that ends it (ResNet,
        ShuffleNet, MobileNetV2's head, the small CNNs) or, in a pre-activation WRN, the next block's BN output
        that its first ReLU reads (RepDistiller's ``get_bn_before_relu``); a map no ReLU follows is its own
        pre-activation (WRN's stem, MobileNetV2's linear bottlenecks). Each BatchNorm runs once per forward."""
        raise NotImplementedError(f"{type(self).__name__} does not expose pre-activation features")

    def pool(self, f: Tensor) -> Tensor:
        """Global average pooling and flatten: B x C x H x W -> B x C (any spatial size, any memory format)."""
        return torch.flatten(F.adaptive_avg_pool2d(f, 1), 1)

    def head(self, f: Tensor) -> Tensor:
        """Logits from the final feature map: ``classifier(pool(f))``."""
        return self.classifier(self.pool(f))

    def forward(self, x: Tensor, features: bool = False, preact: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Logits; with ``features=True``, ``(logits, feats)`` where ``feats`` are the intermediate spatial
        feature maps, shallow to deep, and ``feats[-1]`` is the last map before global pooling; with
        ``preact=True`` as well, ``feats`` are their pre-activations (:meth:`forward_preact`)."""
        if features and preact:
            feats, pre = self.forward_preact(x)
            return self.head(feats[-1]), pre
        feats = self.forward_features(x)
        logits = self.head(feats[-1])
        if features:
            return logits, feats
        return logits


#: name -> constructor ``(num_classes, in_channels=3) -> Net``; filled by :func:`register_model`
MODELS: dict[str, Callable[..., Net]] = {}
#: name -> one-line description
DESCRIPTIONS: dict[str, str] = {}

#: protocol sections a model's ``student_defaults`` may set (the student's optimiser and method tables)
STUDENT_DEFAULT_KEYS = ("optim", "method")


@dataclass(frozen=True)
class ModelInfo:
    """What the harness knows about a registered model besides its constructor.

    :param description: one line for ``osslbench list models``.
    :param student_defaults: protocol keys (a tree under ``optim`` / ``method``) that hold whenever this model is
        the *student*: the authors' per-student rules (RepDistiller's lr 0.01 for ShuffleNet / MobileNet students,
        SRD's feature term x10 for a ShuffleV1 student). They beat the protocol file and lose to its scales and
        ``--set``; the teacher's optimiser never sees them. Each result records the rules that applied.
    :param teacher: whether the model may be a teacher (False for a binary network: a student-only model).
    """

    description: str
    student_defaults: dict[str, Any] = field(default_factory=dict)
    teacher: bool = True


#: name -> :class:`ModelInfo`
MODEL_INFO: dict[str, ModelInfo] = {}


def register_model(name: str, description: str, student_defaults: dict[str, Any] | None = None,
                   teacher: bool = True) -> Callable[[Callable[..., Net]], Callable[..., Net]]:
    """Decorator registering a constructor ``fn(num_classes, in_channels=3) -> Net`` under ``name``.

    The returned constructor sets ``model.arch = name`` on what it builds. Decorators may be stacked to
    register aliases (the outermost name wins for ``arch``). ``student_defaults`` and ``teacher``: see
    :class:`ModelInfo`.
    """
    if not name or any(c.isspace() for c in name):
        raise ValueError(f"invalid model name {name!r}")
    if "\n" in description:
        raise ValueError(f"description of model {name!r} must be one line")
    bad = sorted(set(student_defaults or {}) - set(STUDENT_DEFAULT_KEYS))
    if bad:
        raise ValueError(f"student_defaults of model {name!r}: {bad[0]!r} is not one of {', '.join(STUDENT_DEFAULT_KEYS)}")

    def decorate(fn: Callable[..., Net]) -> Callable[..., Net]:
        if name in MODELS:
            raise ValueError(f"model {name!r} is registered twice")

        @functools.wraps(fn)
        def build(num_classes: int, in_channels: int = 3, **kwargs: Any) -> Net:
            model = fn(num_classes=num_classes, in_channels=in_channels, **kwargs)
            model.arch = name
            return model

        MODELS[name] = build
        DESCRIPTIONS[name] = description
        MODEL_INFO[name] = ModelInfo(description, dict(student_defaults or {}), teacher)
        return build

    return decorate
