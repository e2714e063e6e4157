"""T2T (baselines/t2t.py): matching, rotation and consistency terms on tiny batches with hand-computed values,
the stage switch, the Otsu selection re-made from the whole pool every epoch, and the OOD score's orientation."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from osslbench.baselines.openset.t2t import (
    T2T,
    CrossModalMatchingHead,
    T2TConfig,
    binary_entropy,
    matching_pairs,
    other_class,
    rotation_batch,
    stage2_start,
    uda_consistency,
)
from osslbench.config import parse_overrides
from osslbench.evaluate import auroc
from osslbench.method import Batch, PoolAccess
from osslbench.models import build_model
from osslbench.ood import otsu_select, pooled
from osslbench.protocol import OptimConfig
from osslbench.protocol_loader import load_protocol
from osslbench.registry import get_method
from osslbench.runner import RunOptions, run_one

K = 5
BIAS = [0.5, 3.0, 1.0, 2.0, -1.0]  # the student's logits for every image (classifier weight zeroed): ranks 1, 3, 2, 0, 4


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def h_b(p: float) -> float:
    """Binary entropy in nats."""
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


class TableHead(nn.Module):
    """A matching head whose logit depends only on the label; records what it is called with."""

    def __init__(self, table: list[float]) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.tensor(table))
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, h: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        self.calls.append((h.detach().clone(), label.clone()))
        return self.table[label] + 0.0 * h.sum(dim=1)


def make(fixed_logits: bool = False, **cfg) -> T2T:
    torch.manual_seed(0)
    student = build_model("cnn-small", K, 1)
    if fixed_logits:
        with torch.no_grad():
            student.classifier.weight.zero_()
            student.classifier.bias.copy_(torch.tensor(BIAS))
    method = T2T(T2TConfig(**cfg), student, num_classes=K)
    return method.train()


def images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def batch(n: int = 3, y: list[int] | None = None, ulb: int = 6, sel: int = 0, epoch: int = 0, step: int = 0,
          steps_per_epoch: int = 4, epochs: int = 10, seed: int = 0) -> Batch:
    y_lb = torch.tensor(y if y is not None else [i % K for i in range(n)])
    x_sel = [images(sel, 3), images(sel, 4)] if sel else []
    return Batch(images(n, 1), y_lb, [images(ulb, 2)] if ulb else [], torch.arange(ulb), epoch, step, steps_per_epoch,
                 epochs, x_sel, torch.arange(sel) if sel else None, torch.Generator().manual_seed(seed))


def test_registered_with_the_authors_settings():
    assert get_method("t2t") is T2T
    cfg = T2TConfig()
    assert (cfg.mu, cfg.ema_decay, cfg.stage1, cfg.ramp, cfg.temperature, cfg.p_cutoff) == (5.0, 0.0, 0.2, 0.2, 0.4, 0.8)
    assert (cfg.lambda_mx, cfg.lambda_rot, cfg.lambda_un, cfg.embed_dim, cfg.bins) == (1.0, 1.0, 1.0, 128, 256)
    assert (cfg.stage1_lr, cfg.stage1_milestones, cfg.stage1_gamma) == (0.1, (0.3, 0.6, 0.8), 0.2)
    assert T2T.selected_views == ("weak", "strong") and T2T.unlabelled_views == ("weak",)
    assert T2T.optim_defaults["lr"] == 0.03 and T2T.optim_defaults["nesterov"] and T2T.optim_defaults["decay_bn_bias"]
    for bad in ({"stage1": 1.0}, {"ramp": -0.1}, {"temperature": 0.0}, {"p_cutoff": 1.5}, {"bins": 1},
                {"stage1_lr": 0.0}, {"stage1_milestones": (0.5, 1.0)}, {"stage1_gamma": 0.0}):
        with pytest.raises(ValueError):
            T2TConfig(**bad)
    with pytest.raises(ValueError, match="two classes"):
        T2T(T2TConfig(), build_model("cnn-small", 1, 1), num_classes=1)


def test_learning_rate_follows_both_scripts():
    """Stage 1 (2 of 10 epochs of 10 steps): lr 0.1, x0.2 after 30%, 60%, 80% of its 20 steps; stage 2: lr 0.03 with
    FixMatch's cosine restarted at step 20 and reaching cos(7 pi / 16) after the remaining 80 steps."""
    method = make()
    optim = OptimConfig(lr=0.03, schedule="cosine")
    factor = method.lr_schedule(optim, epochs=10, steps_per_epoch=10)
    lr = [optim.lr * factor(k) for k in (0, 5, 6, 11, 12, 15, 16, 19, 20, 60, 100)]
    stage2 = [0.03, 0.03 * math.cos(7 * math.pi * 40 / (16 * 80)), 0.03 * math.cos(7 * math.pi / 16)]
    assert lr == pytest.approx([0.1, 0.1, 0.02, 0.02, 0.004, 0.004, 0.0008, 0.0008, *stage2])
    no_stage1 = make(stage1=0.0).lr_schedule(optim, epochs=10, steps_per_epoch=10)
    assert [no_stage1(k) for k in (0, 50)] == pytest.approx([1.0, math.cos(7 * math.pi / 32)])


def test_matching_head_is_the_authors_architecture():
    """m(h, y) = W2 relu(BN(W1 [h ; W_e onehot(y) + b_e] + b1)) + b2 (BN with batch statistics in training)."""
    torch.manual_seed(0)
    head = CrossModalMatchingHead(4, 6, embed_dim=8).train()
    h, y = torch.randn(5, 6), torch.tensor([0, 3, 1, 1, 2])
    we, be = head.label_embedding.weight, head.label_embedding.bias
    w1, b1 = head.mlp[0].weight, head.mlp[0].bias
    w2, b2 = head.mlp[3].weight, head.mlp[3].bias
    z = torch.cat([h, we[:, y].T + be], dim=1) @ w1.T + b1
    z = (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + 1e-5)  # BN's affine starts at (1, 0)
    expected = (z.relu() @ w2.T + b2).squeeze(1)
    assert torch.allclose(head(h, y), expected, atol=1e-5)
    assert [type(m) for m in head.mlp] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert head.mlp[0].in_features == 6 + 8 and head.mlp[3].out_features == 1


def test_negatives_hardest_wrong_class_and_a_uniform_other():
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.0], [3.0, 1.0, 2.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    y = torch.tensor([1, 2, 0])
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([matching_pairs(logits, y, gen)[1] for _ in range(3000)])
    hard, _ = matching_pairs(logits, y, gen)
    assert hard.tolist() == [3, 0, 3]  # right: the runner-up; wrong: the top class
    allowed = [{0, 2}, {1, 3}, {1, 2}]
    for i in range(3):
        counts = torch.bincount(draws[:, i], minlength=4).float() / len(draws)
        assert {c for c in range(4) if counts[c] > 0} == allowed[i]
        assert all(abs(counts[c] - 0.5) < 0.05 for c in allowed[i])  # uniform over the others
    # two classes: the only negative is the other class, twice
    hard2, easy2 = matching_pairs(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([0, 1]), gen)
    assert hard2.tolist() == easy2.tolist() == [1, 0]
    # reproducible from the generator, never from torch's global one
    state = torch.random.get_rng_state()
    a = other_class(6, [torch.tensor([0, 1, 2])], torch.Generator().manual_seed(5))
    b = other_class(6, [torch.tensor([0, 1, 2])], torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and torch.equal(torch.random.get_rng_state(), state)


def test_labelled_matching_loss_is_bce_over_one_positive_and_two_negatives():
    method = make(fixed_logits=True, lambda_mx=2.0)
    # table: classes 0, 2, 4 (the only possible easy negatives below) share one logit
    method.cmm = TableHead([0.3, -0.4, 0.3, 0.7, 0.3])
    b = batch(n=3, y=[1, 3, 3], ulb=0)
    out = method.losses(b)
    assert set(out) == {"ce", "match_lb"}  # no unlabelled data: a supervised step
    (h, labels), = method.cmm.calls
    assert labels[:3].tolist() == [1, 3, 3]  # positives: the true classes
    assert labels[3:6].tolist() == [3, 1, 1]  # hardest wrong class: logits rank 1 > 3 > 2 > 0 > 4
    assert set(labels[6:].tolist()) <= {0, 2, 4}  # easy: neither the class nor the hard negative
    assert torch.allclose(h, pooled(method.student, b.x_lb)[1].repeat(3, 1), atol=1e-6)
    # BCE, mean over the 9 pairs: -log sigmoid(s) for the positives, -log(1 - sigmoid(s)) for the negatives
    pos = softplus(0.4) + 2 * softplus(-0.7)  # s = -0.4, 0.7, 0.7
    neg = softplus(0.7) + 2 * softplus(-0.4) + 3 * softplus(0.3)  # hard s = 0.7, -0.4, -0.4; easy s = 0.3
    assert out["match_lb"].item() == pytest.approx(2.0 * (pos + neg) / 9, rel=1e-6)
    assert out["match_lb"].item() == pytest.approx(2.0 * 0.7124075, rel=1e-6)
    lse = math.log(sum(math.exp(v) for v in BIAS))
    assert out["ce"].item() == pytest.approx((3 * lse - BIAS[1] - 2 * BIAS[3]) / 3, rel=1e-6)


def test_rotation_batch_and_loss_over_the_four_rotations():
    x = images(2, 9)
    x_rot, turns = rotation_batch(x)
    assert turns.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    for k in range(4):  # counter-clockwise, as torch.rot90(x, k, [2, 3]) in the authors' code
        assert torch.equal(x_rot[2 * k:2 * k + 2], torch.rot90(x, k, dims=(2, 3)))
    method = make()
    with torch.no_grad():  # rotation head: logits log(1), log(2), log(3), log(4) for every image
        method.rot.weight.zero_()
        method.rot.bias.copy_(torch.log(torch.tensor([1.0, 2.0, 3.0, 4.0])))
    seen = []
    method.rot.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach()))
    b = batch(n=3, ulb=7)
    out = method.losses(b)
    # CE for target k is log(10) - log(k + 1); each rotation appears equally often
    assert out["rot"].item() == pytest.approx(math.log(10) - math.log(24) / 4, rel=1e-6)
    # the first n = 3 unlabelled images, rotated, in a forward pass of their own
    expected_h = pooled(method.student, rotation_batch(b.x_ulb[0][:3])[0])[1]
    assert seen[0].shape == (12, 32) and torch.allclose(seen[0], expected_h, atol=1e-6)
    method2 = make(lambda_rot=0.5)
    with torch.no_grad():
        method2.rot.weight.zero_()
        method2.rot.bias.copy_(torch.log(torch.tensor([1.0, 2.0, 3.0, 4.0])))
    assert method2.losses(b)["rot"].item() == pytest.approx(0.5 * (math.log(10) - math.log(24) / 4), rel=1e-6)


def test_uda_consistency_masks_on_the_weak_probability_and_sharpens_its_target():
    ln = math.log
    logits_w = torch.tensor([[ln(18), 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, ln(38), 0.0]], requires_grad=True)
    logits_s = torch.tensor([[0.0, 0.0, 0.0], [5.0, -5.0, 0.0], [1.0, 0.0, -1.0]], requires_grad=True)
    loss, mask = uda_consistency(logits_w, logits_s, temperature=0.4, p_cutoff=0.8)
    assert mask.tolist() == [1.0, 0.0, 1.0]  # max probabilities 0.9, 1/3, 0.95

    def kl(w: list[float], s: list[float]) -> float:
        t = [math.exp(v / 0.4) for v in w]
        t = [v / sum(t) for v in t]
        lse = math.log(sum(math.exp(v) for v in s))
        return sum(ti * (math.log(ti) - (si - lse)) for ti, si in zip(t, s, strict=True))

    expected = (kl([ln(18), 0, 0], [0, 0, 0]) + kl([0, ln(38), 0], [1, 0, -1])) / 2  # mean over the confident
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert logits_w.grad is None  # the weak view is the target
    assert torch.equal(logits_s.grad[1], torch.zeros(3)) and logits_s.grad[0].abs().sum() > 0
    # the cut-off is inclusive (>=) and applies to the probability, not the logit
    assert uda_consistency(torch.zeros(1, 2), torch.zeros(1, 2), 0.4, 0.5)[1].tolist() == [1.0]
    assert uda_consistency(torch.zeros(1, 2), torch.zeros(1, 2), 0.4, 0.5001)[1].tolist() == [0.0]
    # no confident sample: 0, still differentiable
    s = torch.randn(2, 3, requires_grad=True)
    zero, none = uda_consistency(torch.zeros(2, 3), s, 0.4, 0.8)
    assert zero.item() == 0.0 and math.copysign(1, zero.item()) == 1 and none.sum() == 0 and zero.requires_grad
    zero.backward()
    assert torch.equal(s.grad, torch.zeros(2, 3))


def test_binary_entropy_is_the_authors_self_targeted_bce():
    assert binary_entropy(torch.tensor([0.0])).item() == pytest.approx(math.log(2), rel=1e-6)
    assert binary_entropy(torch.tensor([math.log(3), -math.log(3)])).item() == pytest.approx(0.5623351, rel=1e-6)
    assert binary_entropy(torch.tensor([40.0])).item() == pytest.approx(0.0, abs=1e-15)
    s1 = torch.linspace(-4, 4, 9, requires_grad=True)
    s2 = s1.detach().clone().requires_grad_(True)
    binary_entropy(s1).backward()
    authors = F.binary_cross_entropy_with_logits(s2, torch.sigmoid(s2))  # target NOT detached
    authors.backward()
    assert binary_entropy(s1.detach()).item() == pytest.approx(authors.item(), rel=1e-6)
    assert torch.allclose(s1.grad, s2.grad, atol=1e-7)


def test_stage_switch_and_ramp_of_the_unlabelled_terms():
    assert stage2_start(0.2, 10) == 2 and stage2_start(0.2, 4) == 1 and stage2_start(0.25, 10) == 3
    assert stage2_start(0.0, 10) == 0
    method = make()
    calls = []

    def whole_pool(fn):
        calls.append(1)
        return fn(images(8, 5))

    for epoch in (0, 1):
        assert method.on_epoch_start(PoolAccess(8, whole_pool, epoch, 10)) == {"stage": 1.0}
        assert method.selection() is None
    assert not calls  # stage 1 never scores the pool
    hook = method.on_epoch_start(PoolAccess(8, whole_pool, 2, 10))
    assert hook["stage"] == 2.0 and len(calls) == 1 and method.selection() is not None
    # 4 steps per epoch, 10 epochs: stage 2 from step 8; ramp over 0.2 * 32 = 6.4 steps
    alphas = {s: method.alpha(batch(step=s, epoch=s // 4)) for s in (0, 7, 8, 10, 12, 14, 15, 39)}
    assert alphas == pytest.approx({0: 0.0, 7: 0.0, 8: 0.0, 10: 2 / 6.4, 12: 4 / 6.4, 14: 6 / 6.4, 15: 1.0, 39: 1.0})
    assert set(method.losses(batch(step=7, epoch=1))) == {"ce", "match_lb", "rot"}
    assert set(method.losses(batch(step=12, epoch=3, sel=4))) == {"ce", "match_lb", "rot", "match_ulb", "consistency"}
    assert set(method.losses(batch(step=12, epoch=3))) == {"ce", "match_lb", "rot", "match_ulb"}  # empty selection
    records = method.pop_records()
    assert records["alpha"] == pytest.approx((0 + 2 * 4 / 6.4) / 3) and "mask_rate" in records


def test_unlabelled_matching_entropy_on_the_unrotated_images_and_its_weight():
    method = make(fixed_logits=True, lambda_un=3.0)
    method.cmm = TableHead([0.3, 1.2, 0.3, 0.3, 0.3])  # predicted class 1 for every image; all others 0.3
    b = batch(n=3, ulb=6, step=12, epoch=3)  # alpha = 4 / 6.4
    out = method.losses(b)
    _, (h_u, labels_u) = method.cmm.calls
    assert labels_u[:3].tolist() == [1, 1, 1] and 1 not in labels_u[3:].tolist()  # predicted class, another class
    x_rot = rotation_batch(b.x_ulb[0][:3])[0]
    assert torch.allclose(h_u, pooled(method.student, x_rot)[1][:3].repeat(2, 1), atol=1e-6)  # unrotated block
    expected = (h_b(sigmoid(1.2)) + h_b(sigmoid(0.3))) / 2
    assert out["match_ulb"].item() == pytest.approx(4 / 6.4 * 3.0 * expected, rel=1e-6)


def test_consistency_term_uses_the_weak_and_strong_views_of_the_selected_stream():
    method = make(p_cutoff=0.0, lambda_un=2.0)  # every sample confident
    b = batch(n=3, ulb=6, sel=4, step=20, epoch=5)  # alpha = 1
    out = method.losses(b)
    logits = pooled(method.student, torch.cat([b.x_lb, *b.x_sel]))[0]  # labelled + selected: one forward
    expected, mask = uda_consistency(logits[3:7], logits[7:], 0.4, 0.0)
    assert mask.tolist() == [1.0] * 4
    assert out["consistency"].item() == pytest.approx(2.0 * expected.item(), rel=1e-5)
    strict = make(p_cutoff=0.99)  # an untrained 5-class net is never that confident
    assert strict.losses(b)["consistency"].item() == 0.0
    assert strict.pop_records()["mask_rate"] == 0.0


class TablePool:
    """A pool of N images whose matching scores are read from a table that the test changes between epochs."""

    def __init__(self, method: T2T, scores: list[float]) -> None:
        self.scores = torch.tensor(scores)
        self.seen: list[int] = []
        method.matching_score = lambda x: self.scores[x[:, 0, 0, 0].long()]  # type: ignore[method-assign]

    def map(self, fn):
        pool = torch.arange(len(self.scores)).float().view(-1, 1, 1, 1).expand(-1, 1, 8, 8)
        self.seen.append(len(pool))
        return fn(pool)


def test_otsu_selection_is_remade_from_the_whole_pool_every_epoch():
    # hand-computed Otsu: splits of 0.1, 0.2, 0.3, 0.8 have between-class variances 0.0208, 0.04, 0.0675
    chosen, t = otsu_select(torch.tensor([0.3, 0.8, 0.1, 0.2]), inclusive=False)
    assert chosen.tolist() == [1] and t == pytest.approx(0.55, abs=1e-7)
    method = make()
    pool = TablePool(method, [0.9, 0.1, 0.95, 0.2, 0.85, 0.15])
    hook = method.on_epoch_start(PoolAccess(6, pool.map, 2, 10))
    assert method.selection().tolist() == [0, 2, 4]
    assert hook["threshold"] == pytest.approx(0.525, abs=1e-6) and hook["selected"] == 0.5
    pool.scores = torch.tensor([0.92, 0.88, 0.1, 0.2, 0.15, 0.9])  # sample 1 was rejected: it comes back
    method.on_epoch_start(PoolAccess(6, pool.map, 3, 10))
    assert method.selection().tolist() == [0, 1, 5]
    assert pool.seen == [6, 6]  # the WHOLE pool is scored at every epoch, not the last selection
    # saturated scores (1.0 and its float32 neighbour): the split is kept (compared in float64)
    below_one = float(torch.tensor(1.0).nextafter(torch.tensor(0.0)))
    pool.scores = torch.tensor([below_one, 1.0, below_one, 1.0])
    method.on_epoch_start(PoolAccess(4, pool.map, 4, 10))
    assert method.selection().tolist() == [1, 3]
    pool.scores = torch.full((4,), 0.7)  # all equal: nothing above the threshold
    method.on_epoch_start(PoolAccess(4, pool.map, 5, 10))
    assert method.selection().tolist() == []


def test_matching_score_is_computed_in_eval_mode_over_the_pool():
    """The default path: sigmoid(m(h, predicted class)) with the model as the trainer's pool_map leaves it."""
    method = make().eval()
    x = images(6, 11)
    logits, h = pooled(method.student, x)
    expected = torch.sigmoid(method.cmm(h, logits.argmax(dim=1)))
    assert torch.allclose(method.matching_score(x), expected, atol=1e-6)
    assert torch.allclose(method.matching_score(x[:2]), expected[:2], atol=1e-6)  # eval BN: per-sample


def test_ood_score_is_high_for_images_the_matching_head_rejects():
    method = make().eval()

    class FeatureHead(nn.Module):  # matching logit = 20 * (h_0 - median h_0): half accepted, half rejected
        def forward(self, h, label):
            return 20 * (h[:, 0] - h[:, 0].median())

    method.cmm = FeatureHead()
    x = images(9, 12)
    with torch.no_grad():  # as in evaluate()
        logits, h = method.predict(x, features=True)
        m = method.matching_logit(x)
        ood = method.ood_score(x, logits, h)
        assert torch.allclose(ood, 1 - method.matching_score(x), atol=1e-6)
    assert torch.equal(ood.argsort(), m.argsort(descending=True))  # higher match, lower outlier score
    accepted, rejected = m > 0, m < 0
    assert auroc(ood[accepted], ood[rejected]) == 100.0  # rejected images are the positives of the AUROC

    class Saturated(nn.Module):
        def forward(self, h, label):
            return torch.tensor([20.0, 25.0, 30.0])

    method.cmm = Saturated()
    with torch.no_grad():
        ood = method.ood_score(x[:3], logits[:3], h[:3])
    assert (ood > 0).all() and ood[0] > ood[1] > ood[2]  # 1 - sigmoid would tie them at 0 in float32


@pytest.mark.slow
def test_trainer_run_switches_stage_and_selects(tmp_path):
    protocol = load_protocol("digits-openset", None, parse_overrides(
        ["train.epochs=4", "train.teacher_epochs=2", "train.iters_per_epoch=4", "train.last_k=2"]))
    run_one(protocol, "t2t", 0, RunOptions(data_root=tmp_path, out=tmp_path, progress=False))
    rows = [json.loads(line) for line in
            (tmp_path / "digits-openset" / "full" / "t2t" / "seed0" / "metrics.jsonl").read_text().splitlines()]
    assert [r["hook_stage"] for r in rows] == [1.0, 2.0, 2.0, 2.0]  # round(0.2 * 4) = 1 epoch of stage 1
    assert "loss_match_ulb" not in rows[0] and "loss_consistency" not in rows[0]
    batch = 5 * 32  # mu x batch: a selection smaller than one batch forms no batch (the authors' drop_last loader)
    for r in rows[1:]:
        assert 0.0 < r["hook_selected"] < 1.0
        full = round(r["hook_selected"] * 480) >= batch
        assert "loss_match_ulb" in r and ("loss_consistency" in r) == full
    assert any("loss_consistency" in r for r in rows)
    assert "auroc" in rows[-1]
    # the lr after each epoch (that of its next step): stage 2 starts at step 4 of 16 with 0.03, then its cosine
    assert [r["lr"] for r in rows] == pytest.approx([0.03 * math.cos(7 * math.pi * k / 192) for k in (0, 4, 8, 12)])
