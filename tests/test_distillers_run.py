"""Every distiller (every registered method of family ``distill``, built-in or plugin) runs end to end: on
``digits-openset`` at smoke scale, and on the real data with every model pair of the paper (each pair protocol's
smoke scale runs the pair's real architectures). One teacher per pair, shared by its methods (one out folder)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from osslbench.protocol import load_protocol, protocol_files, read_tree
from osslbench.registry import family, methods
from osslbench.runner import RunOptions, run_one

DISTILLERS = sorted(n for n, cls in methods().items() if family(cls) == "distill")


def _same_data_and_split(name: str) -> bool:
    a, b = load_protocol(name), load_protocol("cifar100-tinyimagenet")
    return (a.data, a.split) == (b.data, b.split)


# the paper's pairs: cifar100-tinyimagenet and every protocol that extends it with other models on the same data
PAIRS = ["cifar100-tinyimagenet", *sorted(n for n, p in protocol_files().items()
                                          if read_tree(p).get("extends") == "cifar100-tinyimagenet"
                                          and _same_data_and_split(n))]


@pytest.fixture(scope="module")
def shared_out(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One out folder per protocol for the whole module, so the runner trains one teacher per pair."""
    folders: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in folders:
            folders[name] = tmp_path_factory.mktemp(name)
        return folders[name]

    return get  # type: ignore[return-value]


def check(result: dict, protocol: str, method: str) -> None:
    m = result["metrics"]
    assert result["protocol"] == protocol and result["method"] == method and result["scale"] == "smoke"
    assert 0.0 <= m["top1_last"] <= 100.0 and math.isfinite(m["auroc_last"])


def test_the_registry_has_the_distillers():
    assert {"kd", "srd", "crd", "dkd", "dist"} <= set(DISTILLERS)
    assert len(PAIRS) == 6  # WRN-40-1, ResNet-8x4, ShuffleV1, ShuffleV2, MobileNetV2, binary ResNet-8x4


@pytest.mark.parametrize("method", DISTILLERS)
def test_every_distiller_runs_on_digits(shared_out, tmp_path, method):
    protocol = load_protocol("digits-openset", "smoke")
    result = run_one(protocol, method, 0, RunOptions(data_root=tmp_path, out=shared_out("digits"), progress=False))
    check(result, "digits-openset", method)


@pytest.mark.realdata
@pytest.mark.parametrize("method", DISTILLERS)
@pytest.mark.parametrize("pair", PAIRS)
def test_every_distiller_runs_with_every_pair_on_real_data(shared_out, real_data, pair, method):
    protocol = load_protocol(pair, "smoke", {"train": {"amp": False}})
    result = run_one(protocol, method, 0, RunOptions(data_root=real_data, out=shared_out(pair), progress=False))
    check(result, pair, method)
    assert result["split"]["test"] == result["split"]["outlier_test"] == 64  # smoke evaluates a capped subset
    assert result["config"]["protocol"]["models"]["student"] == protocol.models.student
