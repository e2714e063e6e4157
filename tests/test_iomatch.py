"""IOMatch: open-set targets on fixed probabilities, both unlabelled terms on a hand-built batch (every unlabelled
image reaches the open-set term, outliers included), distribution alignment, the warm-up, the OOD score."""

from __future__ import annotations

import dataclasses
import inspect
import math

import pytest
import torch
import torch.nn.functional as F

import osslbench.baselines.openset.iomatch as iomatch_module
from osslbench.baselines.openset.iomatch import IOMatch, IOMatchConfig, open_targets
from osslbench.method import Batch
from osslbench.models import build_model
from osslbench.ood import ova_loss
from osslbench.registry import get_method
from osslbench.semisup import soft_cross_entropy

from helpers import fixed

K = 3  # seen classes


def ova_logits(p_in: list[list[float]]) -> torch.Tensor:
    """``B x 2K`` OVA logits (outlier logits 0 first, then the inlier log-odds) with inlier probabilities ``p_in``."""
    p = torch.tensor(p_in, dtype=torch.float64)
    return torch.cat([torch.zeros_like(p), torch.log(p / (1 - p))], dim=1).float()


def tiny_method(**cfg) -> IOMatch:
    torch.manual_seed(0)
    return IOMatch(IOMatchConfig(**cfg), build_model("cnn-small", K, 1), num_classes=K)


def test_open_targets_values():
    p = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    r_in = [[0.8, 0.5, 0.25], [0.5, 0.5, 0.1]]
    q = open_targets(p, ova_logits(r_in))
    # q_k = p_k r_in(k); q_K = sum_k p_k (1 - r_in(k)): 0.5 * 0.2 + 0.3 * 0.5 + 0.2 * 0.75 = 0.4, and 0.82
    assert q[0].tolist() == pytest.approx([0.4, 0.15, 0.05, 0.4], abs=1e-6)
    assert q[1].tolist() == pytest.approx([0.05, 0.05, 0.08, 0.82], abs=1e-6)
    assert q.sum(dim=1).tolist() == pytest.approx([1.0, 1.0], abs=1e-6)


# The hand-built batch: 2 labelled images, 3 unlabelled (weak + strong). On the weak view:
#   u0: p = (0.96, .02, .02), r_in = (0.9, .5, .5) -> q = (.864, .01, .01, .116): confident inlier
#   u1: p = (0.96, .02, .02), r_in = (0.1, .5, .5) -> q = (.096, .01, .01, .884): confident OUTLIER
#   u2: p = (0.5, .3, .2),    r_in = (.8, .5, .25) -> q = (.4, .15, .05, .4):     unsure
P_WEAK = [[0.96, 0.02, 0.02], [0.96, 0.02, 0.02], [0.5, 0.3, 0.2]]
R_IN = [[0.9, 0.5, 0.5], [0.1, 0.5, 0.5], [0.8, 0.5, 0.25]]
Q = [[0.864, 0.01, 0.01, 0.116], [0.096, 0.01, 0.01, 0.884], [0.4, 0.15, 0.05, 0.4]]
Y_LB = torch.tensor([0, 2])


class FakeHeads:
    """Stands in for ``IOMatch.heads`` on the hand-built batch: fixed closed, open (K+1) and OVA logits,
    leaves with gradients. Strong-view closed and open logits are 0, so every cross-entropy against them
    is ``log K`` (closed) or ``log (K+1)`` (open) whatever the target."""

    def __init__(self) -> None:
        closed = torch.cat([fixed(2, K), torch.tensor(P_WEAK).log(), torch.zeros(3, K)])
        self.closed = closed.requires_grad_(True)
        self.open = torch.cat([fixed(5, K + 1, phase=1.0), torch.zeros(3, K + 1)]).requires_grad_(True)
        self.mb = torch.cat([fixed(2, 2 * K, phase=2.0), ova_logits(R_IN), fixed(3, 2 * K)]).requires_grad_(True)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        assert len(x) == 2 + 3 + 3
        return self.closed, self.open, self.mb


def hand_batch(step: int = 5) -> Batch:
    x = fixed(8, 1, 8, 8)
    return Batch(x[:2], Y_LB, [x[2:5], x[5:8]], torch.arange(3), step, step, 1, 10)


def test_unlabelled_terms_on_the_hand_built_batch():
    method = tiny_method(dist_align=False)
    fake = FakeHeads()
    method.heads = fake
    terms = method.losses(hand_batch())
    assert set(terms) == {"ce", "mb", "ui", "op"}
    # closed-set term: only u0 (confident AND inlier: q_K < 0.5); u1 is an outlier, u2 is not confident
    assert terms["ui"].item() == pytest.approx(math.log(K) / 3, rel=1e-5)
    # open-set term: u0 and u1 (max q >= 0.5), the outlier included; mean over all three images
    assert terms["op"].item() == pytest.approx(2 * math.log(K + 1) / 3, rel=1e-5)
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(fake.closed[:2], Y_LB).item(), rel=1e-6)
    assert terms["mb"].item() == pytest.approx(ova_loss(fake.mb[:2], Y_LB).item(), rel=1e-6)
    rates = method.pop_records()
    assert rates == pytest.approx({"p_mask_rate": 2 / 3, "in_mask_rate": 2 / 3, "q_mask_rate": 2 / 3})
    # gradients: the outlier u1 trains the open-set head towards q(u1) (mostly the outlier class), not the closed set
    (terms["ui"] + terms["op"]).backward()
    g_closed, g_open = fake.closed.grad[5:], fake.open.grad[5:]
    assert g_closed[0].abs().sum() > 0 and g_closed[1].abs().sum() == 0 and g_closed[2].abs().sum() == 0
    expected_g_open = (torch.full((K + 1,), 1 / (K + 1)) - torch.tensor(Q[1])) / 3  # d/dz H(q, softmax(z)) / batch
    assert g_open[1].tolist() == pytest.approx(expected_g_open.tolist(), abs=1e-5)
    assert g_open[1, K] < 0  # pushed towards the outlier class
    assert fake.open.grad[:5].abs().sum() == 0  # the open-set head learns from the strong view only


def test_every_unlabelled_image_reaches_the_open_set_term_without_a_confidence_cutoff():
    method = tiny_method(dist_align=False, q_cutoff=0.0)
    fake = FakeHeads()
    method.heads = fake
    terms = method.losses(hand_batch())
    assert terms["op"].item() == pytest.approx(math.log(K + 1), rel=1e-5)  # all three, whatever their q
    terms["op"].backward()
    g = fake.open.grad[5:]
    for i in range(3):
        expected = (torch.full((K + 1,), 1 / (K + 1)) - torch.tensor(Q[i])) / 3
        assert g[i].tolist() == pytest.approx(expected.tolist(), abs=1e-5)


def test_open_set_term_is_off_in_the_first_256th_of_training():
    method = tiny_method(dist_align=False)
    method.heads = FakeHeads()
    early = dataclasses.replace(hand_batch(), epoch=0, step=3, steps_per_epoch=1000, epochs=1)  # progress 0.003
    assert early.progress < 1 / 256 and method.losses(early)["op"].item() == 0.0
    later = dataclasses.replace(early, step=4)  # 0.004 >= 1/256
    assert method.losses(later)["op"].item() > 0


def test_soft_cross_entropy_definition():
    logits = torch.tensor([[1.0, 2.0, 0.0]])
    target = torch.tensor([[0.2, 0.5, 0.3]])
    expected = -(target * F.log_softmax(logits, dim=1)).sum().item()
    assert soft_cross_entropy(logits, target, "none").item() == pytest.approx(expected, rel=1e-6)


def test_distribution_alignment_queue():
    method = tiny_method(da_len=2)
    p1 = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])  # batch mean (0.4, 0.25, 0.35)
    aligned = method.align(p1, step=0)
    # queue = [(0.4, .25, .35), 0] -> mean (0.2, .125, .175); p * (1/K) / mean, renormalised
    raw = p1 / torch.tensor([0.2, 0.125, 0.175])
    assert torch.allclose(aligned, raw / raw.sum(dim=1, keepdim=True), atol=1e-5)
    p2 = torch.tensor([[0.1, 0.1, 0.8], [0.1, 0.1, 0.8]])
    method.align(p2, step=1)
    assert torch.allclose(method.p_model, torch.tensor([[0.4, 0.25, 0.35], [0.1, 0.1, 0.8]]))
    p3 = torch.full((2, K), 1 / K)
    method.align(p3, step=2)  # a ring: step 2 replaces the oldest entry
    assert torch.allclose(method.p_model, torch.tensor([[1 / 3, 1 / 3, 1 / 3], [0.1, 0.1, 0.8]]))
    assert "p_model" in method.state_dict()  # restored on resume


def test_losses_use_the_aligned_probabilities_when_on():
    method = tiny_method(da_len=1)
    fake = FakeHeads()
    method.heads = fake
    method.losses(hand_batch())
    # one-batch queue: p * (1/K) / mean_batch(p), renormalised; u0's max is then below 0.95 -> no closed-set term
    p = torch.tensor(P_WEAK)
    assert torch.allclose(method.p_model[0], p.mean(dim=0))
    assert method.pop_records()["p_mask_rate"] == 0.0


def test_ood_score_is_the_outlier_class_probability():
    method = tiny_method().eval()
    x = fixed(4, 1, 8, 8)
    with torch.no_grad():
        logits, h = method.predict(x, features=True)
        assert torch.allclose(method.ood_score(x, logits, h), method.heads(x)[1].softmax(dim=1)[:, K])
        method.open.weight.zero_()
        method.open.bias.zero_()
        method.open.bias[K] = 5.0  # the open-set head says "outlier"
        outlier_like = method.ood_score(x, logits, h)
        method.open.bias[K] = -5.0
        inlier_like = method.ood_score(x, logits, h)
    e = math.exp(5.0)
    assert outlier_like.tolist() == pytest.approx([e / (e + K)] * 4, rel=1e-5)  # higher = more likely an outlier
    assert inlier_like.tolist() == pytest.approx([1 / (1 + K * e)] * 4, rel=1e-4)


def test_gradients_reach_every_head_with_the_real_model():
    method = tiny_method(q_cutoff=0.0, p_cutoff=0.0)
    terms = method.losses(hand_batch())
    assert all(torch.isfinite(v) for v in terms.values()) and terms["op"] > 0
    sum(terms.values()).backward()
    for module in (method.proj, method.mb, method.open, method.student):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_defaults_registry_and_import_paths():
    cfg = IOMatchConfig()
    assert (cfg.mu, cfg.ema_decay, cfg.p_cutoff, cfg.q_cutoff) == (7.0, 0.999, 0.95, 0.5)
    assert (cfg.lambda_mb, cfg.lambda_u, cfg.lambda_op, cfg.dist_align, cfg.da_len, cfg.proj_size) == (
        1.0, 1.0, 1.0, True, 128, 128)
    assert get_method("iomatch") is IOMatch and IOMatch.unlabelled_views == ("weak", "strong")
    assert IOMatch.selected_views == () and tiny_method().selection() is None  # no selection, no filtering
    source = inspect.getsource(iomatch_module)
    assert "from baselines" not in source and "import baselines" not in source
    with pytest.raises(ValueError):
        IOMatchConfig(q_cutoff=1.5)
