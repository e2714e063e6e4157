"""Peak memory of one run: the process's resident set (the run's data arrays included) and, on CUDA, the peak of
torch's allocator.

Runs that follow one another in one process (``--jobs 1``) each get their own peak: on Linux, writing ``5`` to
``/proc/self/clear_refs`` resets the process's high-water mark ``VmHWM`` (proc(5)). Where that is not possible
the figure is the process's peak since it started, and the result says so (``rss_scope = "process"``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

_MiB = 1024 * 1024


def reset_peak(device: torch.device) -> str:
    """Start measuring a run's peak here; the scope the RSS peak will cover (``"run"`` or ``"process"``)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return "process"
    return "run"


def _vmhwm_kib() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak(device: torch.device, scope: str) -> dict[str, float | str]:
    """The peaks since :func:`reset_peak` (``scope`` is what it returned), in MiB."""
    kib = _vmhwm_kib()
    if kib is None:
        try:
            import resource
        except ImportError:  # Windows
            return {}
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        kib, scope = (maxrss // 1024 if sys.platform == "darwin" else maxrss), "process"
    out: dict[str, float | str] = {"peak_rss_MiB": round(kib / 1024, 1), "rss_scope": scope}
    if device.type == "cuda":
        out["cuda_peak_MiB"] = round(torch.cuda.max_memory_allocated(device) / _MiB, 1)
    return out


def device_bytes(device: torch.device) -> int:
    """The memory of ``device``: the GPU's, or the machine's physical memory for the CPU (0 if unknown)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows)
        return 0
