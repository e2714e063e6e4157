"""Helpers shared by several test modules (imported as ``helpers``: pytest puts ``tests/`` on the path)."""

from __future__ import annotations

import math

import torch

from osslbench.cli import main


def fixed(*shape: int, scale: float = 1.0, phase: float = 0.0) -> torch.Tensor:
    """Deterministic, RNG-free values in [-scale, scale]: loss values pinned on them do not depend on a seed."""
    n = math.prod(shape)
    return (torch.sin(torch.arange(n, dtype=torch.float32) * 0.7 + phase) * scale).view(*shape)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """``osslbench *argv`` in this process: (exit status, stdout, stderr), argparse's own exits included."""
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err
