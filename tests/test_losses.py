"""Loss values on fixed tensors (SRD, KD, FixMatch) and where their gradients go."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from osslbench.baselines.distill.srd import connector, srd_terms
from osslbench.method import Batch, kl_div_t
from osslbench.models import build_model
from osslbench.registry import get_method
from osslbench.semisup import hard_pseudo_labels

from helpers import fixed


def srd_setup():
    torch.manual_seed(0)
    student, teacher = build_model("wrn-16-1", 5), build_model("wrn-16-2", 5)
    teacher.eval().requires_grad_(False)
    with torch.no_grad():
        teacher.classifier.weight.copy_(fixed(5, 128, scale=0.1))
        teacher.classifier.bias.copy_(fixed(5, scale=0.05))
    g = connector(64, 128)
    with torch.no_grad():
        g[0].weight.copy_(fixed(128, 64, 1, 1, scale=0.2))
    return student, teacher, g


def test_srd_terms_pinned_and_equal_to_the_definition():
    student, teacher, g = srd_setup()
    f_s = fixed(4, 64, 2, 2).relu()
    f_t = fixed(4, 128, 2, 2, scale=2.0).relu()
    feat, logit = srd_terms(f_s, f_t, student, teacher, g)
    # The definition written out: 1x1 conv, BatchNorm (batch statistics), ReLU, pool; W_t judges both.
    y = torch.einsum("bchw,oc->bohw", f_s, g[0].weight[:, :, 0, 0])
    mean, var = y.mean(dim=(0, 2, 3), keepdim=True), y.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    h_s = ((y - mean) / torch.sqrt(var + 1e-5)).relu().mean(dim=(2, 3))
    h_t = f_t.mean(dim=(2, 3))
    w, b = teacher.classifier.weight, teacher.classifier.bias
    assert feat.item() == pytest.approx(((h_s - h_t) ** 2).mean().item(), rel=1e-5)
    assert logit.item() == pytest.approx((((h_s @ w.T + b) - (h_t @ w.T + b)) ** 2).mean().item(), rel=1e-5)
    # pinned values: a change here is a change of the method
    assert feat.item() == pytest.approx(0.2963926, rel=1e-5)
    assert logit.item() == pytest.approx(0.0495707, rel=1e-5)


def test_srd_kl_option_is_hinton_kl_on_cross_network_logits():
    student, teacher, g = srd_setup()
    f_s, f_t = fixed(4, 64, 2, 2).relu(), fixed(4, 128, 2, 2, scale=2.0).relu()
    _, logit_kl = srd_terms(f_s, f_t, student, teacher, g, logit_loss="kl", temperature=4.0)
    z_c = teacher.classifier(student.pool(g(f_s)))
    z_t = teacher.classifier(teacher.pool(f_t))
    expected = F.kl_div(F.log_softmax(z_c / 4, 1), F.softmax(z_t / 4, 1), reduction="batchmean") * 16
    assert logit_kl.item() == pytest.approx(expected.item(), rel=1e-5)


def test_srd_gradients_reach_student_and_connector_but_not_the_teacher():
    torch.manual_seed(0)
    student, teacher = build_model("wrn-16-1", 5), build_model("wrn-16-2", 5)
    cls = get_method("srd")
    method = cls(cls.Config(), student, teacher, num_classes=5)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    x = fixed(4, 3, 32, 32)
    batch = Batch(x[:2], torch.tensor([0, 1]), [x[2:]], torch.tensor([0, 1]), 0, 0, 1, 1)
    method.train()
    terms = method.losses(batch)
    assert set(terms) == {"ce", "srd_feat", "srd_logit"}
    opt = torch.optim.SGD(method.parameters(), lr=0.1)
    sum(terms.values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.connector.parameters())
    assert student.conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert not any(n.startswith("_teacher") or "teacher" in n for n, _ in method.named_parameters())
    opt.step()
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BatchNorm statistics frozen
    assert not teacher.training


def test_srd_logit_term_uses_gradient_through_frozen_classifier():
    student, teacher, g = srd_setup()
    f_s = fixed(4, 64, 2, 2).relu().requires_grad_(True)
    f_t = fixed(4, 128, 2, 2, scale=2.0).relu()
    _, logit = srd_terms(f_s, f_t, student, teacher, g)
    logit.backward()
    assert f_s.grad.abs().sum() > 0 and teacher.classifier.weight.grad is None


def test_kd_loss_value():
    s = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 1.0]])
    t = torch.tensor([[3.0, 2.0, 1.0], [1.0, 0.0, 0.0]])
    p_t, log_p_s = F.softmax(t / 4, 1), F.log_softmax(s / 4, 1)
    expected = (p_t * (p_t.log() - log_p_s)).sum(1).mean() * 16
    assert kl_div_t(s, t, 4.0).item() == pytest.approx(expected.item(), rel=1e-6)
    assert kl_div_t(s, s, 4.0).item() == pytest.approx(0.0, abs=1e-7)
    cfg = get_method("kd").Config()
    assert (cfg.gamma, cfg.alpha, cfg.temperature) == (0.1, 0.9, 4.0)


def test_fixmatch_masks_exactly_the_samples_under_the_threshold():
    probs = torch.tensor([[0.96, 0.02, 0.02], [0.94, 0.03, 0.03], [0.01, 0.95, 0.04], [0.4, 0.3, 0.3]])
    targets, mask = hard_pseudo_labels(probs.log(), threshold=0.95)
    assert mask.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert targets.tolist() == [0, 0, 1, 0]
    # a logit above the threshold whose probability is not: masked (thresholds are on probabilities)
    _, mask2 = hard_pseudo_labels(torch.tensor([[2.0, 1.9, 1.8]]), threshold=0.95)
    assert mask2.item() == 0.0


def test_fixmatch_unsupervised_term_only_counts_confident_samples():
    torch.manual_seed(0)
    cls = get_method("fixmatch")
    method = cls(cls.Config(threshold=0.0), build_model("cnn-small", 3, 1), num_classes=3)
    x = fixed(6, 1, 8, 8)
    batch = Batch(x[:2], torch.tensor([0, 1]), [x[2:4], x[4:6]], torch.arange(2), 0, 0, 1, 1)
    terms = method.losses(batch)
    assert terms["unsup"] > 0 and method.pop_records()["mask_rate"] == 1.0
    method.cfg.threshold = 1.01
    assert method.losses(batch)["unsup"].item() == 0.0 and method.pop_records()["mask_rate"] == 0.0
