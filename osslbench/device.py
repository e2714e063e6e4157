"""Where and how a run computes: the device, bf16 autocast, and model construction under a fixed seed.

Kept apart from the Trainer (optimisation, EMA, checkpoints) because the runner and the teacher use them too.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import torch

from .hardware import use_bf16

_INIT_LOCK = threading.Lock()


@contextlib.contextmanager
def seeded_init(seed: int) -> Iterator[None]:
    """Build models under ``torch.manual_seed(seed)``: layers initialise from torch's global generator, so
    runs sharing a process (Dask threads) take turns, and the caller's generator state is restored after."""
    with _INIT_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` = CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_context(device: torch.device, amp: bool | str,
                     mflop: float | None = None) -> Callable[[], contextlib.AbstractContextManager]:
    """bf16 autocast where ``amp`` resolves to bf16 on ``device`` for a network of ``mflop`` forward MFLOP per
    image (:func:`osslbench.hardware.use_bf16`), else a no-op."""
    ok = use_bf16(device, amp, mflop)
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16) if ok else contextlib.nullcontext()
