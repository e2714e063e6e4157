"""The model zoo: a registry of CIFAR-style networks and small CNNs sharing the :class:`Net` interface.

Every module of this package is imported on first import, so a new file whose constructors are decorated
with :func:`register_model` is enough to add a model.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil

from osslbench.errors import ConfigError
from osslbench.models.base import DESCRIPTIONS, MODEL_INFO, MODELS, ModelInfo, Net, register_model
from osslbench.models.checkpoint import load_state, save_state

__all__ = ["MODELS", "MODEL_INFO", "ModelInfo", "Net", "build_model", "describe_models", "load_state", "register_model",
           "save_state"]

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")
del _info


def build_model(name: str, num_classes: int, in_channels: int = 3) -> Net:
    """Build the registered network ``name`` with ``num_classes`` outputs and ``in_channels`` input planes."""
    if name not in MODELS:
        msg = f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}"
        close = difflib.get_close_matches(name, list(MODELS), n=1, cutoff=0.75)
        if close:
            msg += f"; did you mean {close[0]!r}?"
        raise ConfigError(msg)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"model {name!r}: num_classes must be a positive integer, got {num_classes!r}")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ConfigError(f"model {name!r}: in_channels must be a positive integer, got {in_channels!r}")
    return MODELS[name](num_classes=num_classes, in_channels=in_channels)


def describe_models() -> dict[str, str]:
    """Registered model names (registration order) mapped to their one-line descriptions."""
    return dict(DESCRIPTIONS)
