"""Shared fixtures: the real data folder (tests needing it are skipped when it is absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))

REAL_DATA = Path(os.environ.get("OSSLBENCH_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture
def real_data() -> Path:
    """``../shared/data`` (or ``$OSSLBENCH_DATA``); skips the test when it does not exist."""
    if not (REAL_DATA / "cifar-100-python").is_dir():
        pytest.skip(f"real data not found at {REAL_DATA}")
    return REAL_DATA


@pytest.fixture(autouse=True, scope="session")
def _decoded_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep the on-disk decoded cache of the whole session in a temporary folder (never in ~/.cache)."""
    os.environ["OSSLBENCH_CACHE"] = str(tmp_path_factory.mktemp("decoded-cache"))
