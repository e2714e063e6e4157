"""Loading (and saving) network weights.

:func:`load_state` accepts RepDistiller checkpoints (Tian et al., ICLR 2020: ``{"model": state_dict,
"epoch": ..., "opt": Namespace, ...}``), osslbench checkpoints (``{"model": state_dict, "arch": name, ...}``,
written by :func:`save_state`) and bare state dicts, with or without a DataParallel ``module.`` prefix.
Every failure is a :class:`~osslbench.errors.CheckpointError` with a one-line message naming the file.
"""

from __future__ import annotations

import argparse
import hashlib
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from osslbench.errors import CheckpointError
from osslbench.fsio import atomic_write

__all__ = ["hash_state", "hash_tensor", "load_state", "safe_load", "save_state", "weights_sha256"]

_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DistributedDataParallel, torch.compile
_SHOW = 3  # how many offending keys an error message lists


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _numpy_scalars() -> list[Any]:
    """What a numpy scalar (an accuracy kept as ``np.float64`` by some training scripts) unpickles through: the
    ``scalar`` constructor (under its numpy 2 and numpy 1 module names), ``dtype`` and the numeric dtype classes.
    They rebuild a number from bytes and call nothing else."""
    from numpy._core.multiarray import scalar

    kinds = (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
             np.float16, np.float32, np.float64)
    return [scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype, *[type(np.dtype(k)) for k in kinds]]


#: What a checkpoint may hold besides tensors and plain containers: RepDistiller's ``*_last.pth`` pickles its
#: argparse ``opt`` (``train_student.py``: ``state = {"opt": opt, ...}``), and numpy scalars. Nothing else is
#: ever unpickled: there is no fallback to an unrestricted load.
SAFE_GLOBALS: list[Any] = [argparse.Namespace, *_numpy_scalars()]


def _refused_global(exc: Exception) -> str:
    """The ``module.name`` a weights-only load refused, from torch's message."""
    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    return found.group(1) if found else ""


def safe_load(path: Path, map_location: Any = "cpu") -> Any:
    """``torch.load(weights_only=True)`` with :data:`SAFE_GLOBALS` allowed: tensors, numbers, strings,
    containers and argparse Namespaces load; anything else (a class whose unpickling could run code) is
    refused with a :class:`CheckpointError` naming the file and the refused global.
    """
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        refused = _refused_global(e)
        if refused:
            raise CheckpointError(f"refused to load {path}: it references {refused!r}, which could run code when "
                                  "unpickled (only tensors, plain values, numpy scalars and argparse.Namespace are "
                                  "loaded)") from None
        raise CheckpointError(f"cannot read checkpoint {path}: not a PyTorch checkpoint ({_one_line(e)})") from None
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or _one_line(e)}") from None
    except Exception as e:  # zip / legacy-format decoding errors, truncated files
        why = type(e).__name__ + (f": {_one_line(e)}" if _one_line(e) else "")
        raise CheckpointError(f"cannot read checkpoint {path}: not a PyTorch checkpoint ({why})") from None


def _read(path: Path) -> Any:
    """The loaded checkpoint object (see :func:`safe_load`)."""
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} not found")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file")
    return safe_load(path)


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


def _split(ckpt: Any, path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(state dict, metadata) of a loaded checkpoint object."""
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"checkpoint {path} holds a {type(ckpt).__name__}, not a dict of weights")
    for key in ("model", "state_dict"):
        if key in ckpt and _is_state_dict(ckpt[key]):
            return dict(ckpt[key]), {k: v for k, v in ckpt.items() if k != key}
    if _is_state_dict(ckpt):
        return dict(ckpt), {}
    keys = ", ".join(map(str, list(ckpt)[:8])) + (", ..." if len(ckpt) > 8 else "")
    raise CheckpointError(f"checkpoint {path} holds no state dict (top-level keys: {keys or 'none'})")


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def _listed(keys: list[str]) -> str:
    if not keys:
        return ""
    return " (" + ", ".join(keys[:_SHOW]) + (", ..." if len(keys) > _SHOW else "") + ")"


def _check_fit(model: nn.Module, state: dict[str, Tensor], path: Path) -> None:
    expected = model.state_dict()
    # checkpoints from before BatchNorm counted its batches (PyTorch < 0.4.1) have no num_batches_tracked at all:
    # keep the model's values
    if not any(k.endswith("num_batches_tracked") for k in state):
        for k, v in expected.items():
            if k.endswith("num_batches_tracked"):
                state[k] = v
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if not (missing or unexpected or mismatched):
        return
    name = getattr(model, "arch", "") or type(model).__name__
    msg = (
        f"checkpoint {path} does not fit {name}: {len(missing)} missing keys{_listed(missing)}, "
        f"{len(unexpected)} unexpected{_listed(unexpected)}"
    )
    if mismatched:
        k = mismatched[0]
        more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        msg += f", shape mismatch at {k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}{more}"
    raise CheckpointError(msg)


def load_state(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Load the weights of checkpoint ``path`` into ``model`` (strictly) and return the checkpoint's other
    entries (``{}`` for a bare state dict); e.g. ``{"epoch": 240, "opt": Namespace(...), ...}`` for RepDistiller.
    The file is loaded weights-only (:func:`safe_load`): a checkpoint that would run code is refused.

    Raises CheckpointError when the file is missing or unreadable, was saved from another architecture
    (osslbench ``arch`` entry) or does not fit the model (missing / unexpected keys, shape mismatches).
    """
    path = Path(path)
    state, meta = _split(_read(path), path)
    arch = getattr(model, "arch", "")
    saved = meta.get("arch")
    if arch and isinstance(saved, str) and saved and saved != arch:
        raise CheckpointError(f"checkpoint {path} was saved from {saved}, cannot load it into {arch}")
    stripped: dict[str, Tensor] = {}
    for k, v in state.items():
        stripped[_strip(k)] = v
    _check_fit(model, stripped, path)
    try:
        model.load_state_dict(stripped, strict=True)
    except RuntimeError as e:  # pragma: no cover - _check_fit catches what load_state_dict would reject
        raise CheckpointError(f"checkpoint {path} does not fit: {_one_line(e)}") from None
    return meta


def hash_tensor(h: hashlib._Hash, t: Tensor) -> None:
    """Feed ``t``'s dtype, shape and bytes to the hash ``h`` (its memory layout does not count)."""
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy())


def hash_state(h: hashlib._Hash, state: Mapping[str, Tensor]) -> None:
    """Feed a state dict to the hash ``h``: every entry in name order, its name then :func:`hash_tensor`."""
    for name, t in sorted(state.items()):
        h.update(name.encode())
        hash_tensor(h, t)


def weights_sha256(path: str | Path) -> str:
    """SHA-256 of the weights checkpoint ``path`` holds (:func:`hash_state` of its state dict, names without a
    DataParallel prefix), nothing else: the same weights saved as a RepDistiller, an osslbench or a bare checkpoint,
    at any path, have one digest; other epochs, optimizer states or metadata do not count."""
    path = Path(path)
    state, _ = _split(_read(path), path)
    h = hashlib.sha256()
    hash_state(h, {_strip(k): v for k, v in state.items()})
    return h.hexdigest()


def save_state(model: nn.Module, path: str | Path, **meta: Any) -> Path:
    """Write ``{"model": state_dict, "arch": model.arch, **meta}`` to ``path`` atomically."""
    for reserved in ("model", "arch"):
        if reserved in meta:
            raise ValueError(f"{reserved!r} is written by save_state itself")
    path = Path(path)
    state = {"model": model.state_dict(), "arch": getattr(model, "arch", ""), **meta}
    atomic_write(path, lambda p: torch.save(state, p))
    return path
