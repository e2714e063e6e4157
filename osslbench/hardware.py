"""What the machine computes natively, decided once per device: precision (bf16 or fp32) and its name.

bf16 autocast pays only where the hardware multiplies bf16 natively: CUDA GPUs with bf16 (Ampere and later) and
CPUs with AVX512-BF16 or AMX (x86) or the BF16 extension (Arm). Elsewhere oneDNN emulates it and a step is several
times slower than fp32 (measured on a 2-core AVX2 EPYC: the default digits run 169 s in bf16, 42 s in fp32), and
bf16 also moves the numbers (SRD's gradient by ~50% relative L2 on a random-init pair). So ``train.amp = "auto"``
(the default) takes bf16 only where it is native, and every result records what was used.

Native is not enough for tiny networks: on a 2-core CPU with AVX512-BF16 (one thread, batch 64, forward + backward +
SGD, channels-last) bf16 ran cnn-small on 8 x 8 digits (0.17 MFLOP per image) at 0.89x fp32's img/s and
cnn-large (4.8 MFLOP) at 1.12x, where WRN-16-1 (53 MFLOP) gained 1.76x, WRN-16-2 (202) 1.68x and ResNet-8x4
(354) 1.84x; the default digits run took 34.4 s in bf16 against 30.0 s in fp32. Autocast's casts cost per layer,
not per FLOP, so ``auto`` also asks for :data:`BF16_MIN_MFLOP` forward MFLOP per image (a fact of the model
and the image size, so the choice is the same on every run and resume on the machine).
"""

from __future__ import annotations

import platform
from functools import cache
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

#: forward MFLOP per image below which ``amp = "auto"`` keeps fp32 even where bf16 is native (see above)
BF16_MIN_MFLOP = 10.0


@cache
def _cpuinfo_flags() -> frozenset[str]:
    """Flags / Features of the first CPU in ``/proc/cpuinfo`` (empty off Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return frozenset(value.split())
    return frozenset()


@cache
def cpu_native_bf16() -> bool:
    """True where the CPU multiplies bf16 in hardware: AVX512-BF16 or AMX-BF16 (x86), BF16 (Arm)."""
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):  # torch's own CPUID checks
        fn = getattr(torch.cpu, probe, None)
        if fn is not None and fn():
            return True
    return bool(_cpuinfo_flags() & {"avx512_bf16", "amx_bf16", "bf16"})


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively (CUDA: ``torch.cuda.is_bf16_supported``)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return cpu_native_bf16()
    return False


def forward_mflop(models: list[nn.Module], image: tuple[int, ...]) -> float:
    """Forward MFLOP of ``models`` on one image of shape ``image`` (C, H, W), counted by torch's FlopCounterMode."""
    x = torch.zeros(1, *image)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        for m in models:
            was = m.training
            m.eval()
            m(x.to(next(m.parameters()).device))
            m.train(was)
    return counter.get_total_flops() / 1e6


def use_bf16(device: torch.device, amp: bool | str, mflop: float | None = None) -> bool:
    """The precision a run uses: ``amp = "auto"`` -> bf16 only where native and, when the network's forward
    MFLOP per image ``mflop`` is given, only from :data:`BF16_MIN_MFLOP` up; ``true`` forces bf16 wherever
    autocast supports it (any CPU, CUDA with bf16); ``false`` -> fp32."""
    if amp == "auto":
        return native_bf16(device) and (mflop is None or mflop >= BF16_MIN_MFLOP)
    if not amp:
        return False
    return device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported())


@cache
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``, else :func:`platform.processor`)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(device: torch.device) -> dict[str, str | bool]:
    """What a result records about the hardware it ran on."""
    info: dict[str, str | bool] = {"cpu": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                                   "native_bf16": native_bf16(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
