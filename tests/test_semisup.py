"""The shared building blocks (osslbench.semisup, osslbench.ood.otsu_select, osslbench.distill's bases): values on
hand-built tensors, the inclusive / strict Otsu rules on tied scores, and the rule that no baseline imports another."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from osslbench.baselines.distill.crd import CRDConfig
from osslbench.baselines.openset.mtc import MTCConfig
from osslbench.baselines.ssl.mixmatch import MixMatchConfig
from osslbench.distill import DistillConfig, FeatureDistillConfig
from osslbench.ood import otsu_select
from osslbench.registry import get_method, methods
from osslbench.semisup import (
    FIXMATCH_OPTIM,
    PoolSelection,
    linear_ramp,
    masked_cross_entropy,
    pseudo_label_loss,
    scaled_epochs,
    soft_cross_entropy,
)

BASELINES = Path(__file__).resolve().parents[1] / "baselines"


def test_otsu_select_inclusive_and_strict_differ_only_when_every_score_ties():
    # two tied modes: the threshold lies strictly between them, so both rules select the upper mode
    scores = torch.tensor([0.2, 0.9, 0.2, 0.9, 0.2, 0.9], dtype=torch.float32)
    for inclusive in (True, False):
        chosen, t = otsu_select(scores, inclusive=inclusive)
        assert chosen.tolist() == [1, 3, 5] and 0.2 < t < 0.9
        assert t == pytest.approx((0.2 + 0.9) / 2, abs=1e-7)
    # every score tied: t is that score; MTC's rule (weights >= th) keeps the whole pool, T2T's (s > thresh) nothing
    tied = torch.full((4,), 0.7)
    inc, t_inc = otsu_select(tied, inclusive=True)
    strict, t_strict = otsu_select(tied, inclusive=False)
    assert t_inc == t_strict == pytest.approx(0.7)
    assert inc.tolist() == [0, 1, 2, 3] and strict.tolist() == []


def test_otsu_select_compares_float32_scores_in_float64():
    # neighbouring float32 values: their float64 midpoint separates them exactly, in both rules
    lo = torch.tensor(0.5, dtype=torch.float32)
    hi = torch.nextafter(lo, torch.tensor(1.0))
    scores = torch.stack([lo, hi, lo, hi])
    for inclusive in (True, False):
        chosen, t = otsu_select(scores, inclusive=inclusive)
        assert chosen.tolist() == [1, 3] and float(lo) < t < float(hi)


def test_soft_cross_entropy_reduces_as_told():
    logits = torch.tensor([[math.log(0.5), math.log(0.25), math.log(0.25)], [0.0, 0.0, 0.0]])
    targets = torch.tensor([[0.6, 0.4, 0.0], [0.0, 0.0, 1.0]])
    per_sample = torch.tensor([1.4 * math.log(2), math.log(3)])  # -(0.6 log 0.5 + 0.4 log 0.25), -log(1/3)
    assert torch.allclose(soft_cross_entropy(logits, targets, "none"), per_sample, rtol=1e-6)
    assert soft_cross_entropy(logits, targets, "mean").item() == pytest.approx(per_sample.mean().item(), rel=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        soft_cross_entropy(logits, targets, "sum")  # type: ignore[arg-type]


def test_pseudo_label_loss_takes_targets_from_the_weak_view_and_averages_over_all_samples():
    weak = torch.tensor([[0.96, 0.02, 0.02], [0.5, 0.3, 0.2], [0.01, 0.98, 0.01]]).log()  # confident: rows 0 and 2
    strong = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 3.0]], requires_grad=True)
    loss, mask = pseudo_label_loss(strong, 0.95, target_logits=weak)
    assert mask.tolist() == [1.0, 0.0, 1.0]
    expected = (F.cross_entropy(strong[0:1], torch.tensor([0])) + F.cross_entropy(strong[2:3], torch.tensor([1]))) / 3
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert masked_cross_entropy(strong, torch.tensor([0, 0, 1]), mask).item() == pytest.approx(loss.item(), rel=1e-7)
    loss.backward()
    assert strong.grad is not None and torch.equal(strong.grad[1], torch.zeros(3))  # the masked row gets nothing


def test_ramps_and_scaled_epochs():
    assert [linear_ramp(s, 10, 20.0) for s in (0, 9, 10, 20, 30, 99)] == [0.0, 0.0, 0.0, 0.5, 1.0, 1.0]
    assert linear_ramp(10, 10, 0.0) == 1.0
    assert [scaled_epochs(10, 10 / 240, e) for e in (240, 512, 20, 48)] == [10, 10, 1, 2]
    assert scaled_epochs(100, 100 / 1124, 240) == 22  # MTC's warm-up on a 240-epoch run


def test_selection_stream_mixin_and_shared_settings():
    for name in ("openmatch", "mtc", "t2t"):
        cls = get_method(name)
        assert issubclass(cls, PoolSelection) and cls.selected_views
        assert cls.selection is PoolSelection.selection
    for name in ("fixmatch", "openmatch", "iomatch"):
        assert get_method(name).optim_defaults == FIXMATCH_OPTIM
    assert get_method("t2t").optim_defaults == {**FIXMATCH_OPTIM, "decay_bn_bias": True}
    assert get_method("pseudolabel").optim_defaults == get_method("meanteacher").optim_defaults
    # MTC runs MixMatch with MixMatch's settings: one definition, same defaults
    mixmatch, mtc = MixMatchConfig(), MTCConfig()
    shared = ("mu", "ema_decay", "k", "temperature", "alpha", "lambda_u", "rampup_fraction", "decoupled_wd")
    assert all(getattr(mixmatch, f) == getattr(mtc, f) for f in shared)
    with pytest.raises(ValueError):
        MTCConfig(k=0)
    with pytest.raises(ValueError):
        CRDConfig(temperature=0.0)  # the distillers' shared check (CRD's KD term divides by T)
    assert issubclass(FeatureDistillConfig, DistillConfig) and issubclass(CRDConfig, DistillConfig)


def test_no_baseline_imports_another():
    """What baselines share lives in the engine (osslbench.distill / semisup / ood): a baseline file imports no other."""
    assert len(methods()) > 20
    checked = 0
    for path in BASELINES.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            for name in names:
                assert not name.startswith(".") and "baselines" not in name, f"{path.relative_to(BASELINES)} imports {name}"
        checked += 1
    assert checked >= 29
