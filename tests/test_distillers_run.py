"""Every distiller (every registered method of family ``distill``, built-in or plugin) runs end to end: on
``digits-openset`` at smoke scale; one training step with every model pair of the paper (the pairs' real
architectures); and SRD on the real data with every pair (each pair protocol's smoke scale)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from osslbench.device import seeded_init
from osslbench.method import Batch
from osslbench.models import build_model
from osslbench.protocol_loader import load_protocol, protocol_files, read_tree
from osslbench.registry import family, get_method, method_config, methods
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


@pytest.mark.parametrize("method", DISTILLERS)
@pytest.mark.parametrize("pair", PAIRS)
def test_every_distiller_trains_every_pair_of_the_paper(pair, method):
    """One step of every distiller on every pair's real architectures (random weights, 32 x 32 images, the pair's
    student rules applied): finite losses, and a gradient reaches the student and nothing reaches the teacher."""
    protocol = load_protocol(pair)
    cls = get_method(method)
    cfg, _ = method_config(cls, protocol)
    k = 10  # classes: the head's width does not change which layers a distiller reads
    with seeded_init(0):
        teacher = build_model(protocol.models.teacher, k, 3)
        student = build_model(protocol.models.student, k, 3)
    m = cls(cfg, student, teacher, num_classes=k, pool_size=8, labelled_size=8, image_size=32).train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4 + 4 * len(m.unlabelled_views), 3, 32, 32, generator=g)
    init = m.init_epochs(10)
    batch = Batch(x[:4], torch.tensor([0, 3, 5, 9]), list(x[4:].split(4)), torch.tensor([1, 2, 5, 7]), init, 0, 1,
                  init + 10, idx_lb=torch.tensor([0, 2, 4, 6]), init_epochs=init)
    losses = m.losses(batch)
    total = sum(losses.values())
    assert all(torch.isfinite(v) for v in losses.values()) and total.requires_grad, losses
    total.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.realdata
@pytest.mark.parametrize("pair", PAIRS)
def test_every_pair_runs_srd_on_real_data(shared_out, real_data, pair):
    protocol = load_protocol(pair, "smoke", {"train": {"amp": False}})
    result = run_one(protocol, "srd", 0, RunOptions(data_root=real_data, out=shared_out(pair), progress=False))
    check(result, pair, "srd")
    assert result["split"]["test"] == result["split"]["outlier_test"] == 64  # smoke evaluates a capped subset
    assert result["config"]["protocol"]["models"]["student"] == protocol.models.student
