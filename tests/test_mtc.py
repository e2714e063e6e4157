"""MTC (Yu et al., ECCV 2020): the domain loss, the authors' domain-label update, the Otsu curriculum re-selected
from the whole pool every epoch, the MixMatch terms on the selected stream, and the OOD score's orientation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from osslbench.method import Batch, PoolAccess
from osslbench.models import build_model
from osslbench.ood import otsu_select
from osslbench.registry import get_method
from osslbench.semisup import mixup

from helpers import fixed

K_CLASSES = 3


def make(pool_size: int = 8, **cfg):
    torch.manual_seed(0)
    cls = get_method("mtc")
    method = cls(cls.Config(**cfg), build_model("cnn-small", K_CLASSES, 1), num_classes=K_CLASSES, pool_size=pool_size)
    return method.train()


def hand_domain_logit(method, x: torch.Tensor) -> torch.Tensor:
    """``d(x) = w . avgpool(final feature map) + b``, written out."""
    _, feats = method.student(x, features=True)
    h = feats[-1].mean(dim=(2, 3))
    return h @ method.domain_head.weight[0] + method.domain_head.bias[0]


def hand_bce(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``-mean[t log sigmoid(z) + (1 - t) log(1 - sigmoid(z))]``."""
    return -(t * F.logsigmoid(z) + (1 - t) * F.logsigmoid(-z)).mean()


def fake_pool(scores_by_epoch: dict[int, torch.Tensor], epoch: int, epochs: int) -> PoolAccess:
    """A pool whose scoring returns fixed predictions (the model is not consulted)."""
    scores = scores_by_epoch.get(epoch, torch.zeros(len(next(iter(scores_by_epoch.values())))))
    return PoolAccess(size=len(scores), map=lambda fn: scores.clone(), epoch=epoch, epochs=epochs)


def test_defaults_follow_the_authors_schedule():
    method = make()
    cfg = method.cfg
    assert (cfg.k, cfg.temperature, cfg.alpha, cfg.lambda_u, cfg.ema_decay, cfg.mu) == (2, 0.5, 0.75, 75.0, 0.999, 1.0)
    assert (cfg.start_label, cfg.bins, cfg.lambda_domain) == (0.0, 256, 1.0)
    assert method.optim_defaults["name"] == "adam" and method.optim_defaults["lr"] == 0.002
    # the authors' own schedule: 100 warm-up epochs of 1124, domain labels averaged over the past 10 epochs
    assert method.warmup_epochs(1124) == 100 and method.window(1124) == 10
    # a shorter run keeps the shares (240 epochs: 22 warm-up epochs, a 3-epoch window), never less than 1 epoch
    assert method.warmup_epochs(240) == 22 and method.window(240) == 3 and method.window(4) == 1
    assert method.selected_views == ("weak", "weak") and method.unlabelled_views == ("weak",)
    assert method.soft_labels.shape == (8,) and torch.equal(method.soft_labels, torch.zeros(8))


def test_warmup_loss_is_bce_with_labelled_one_and_unlabelled_domain_labels():
    method = make(pool_size=8)
    method.soft_labels.copy_(torch.tensor([0.0, 0.125, 0.25, 0.5, 0.75, 0.875, 1.0, 0.375]))
    x = fixed(7, 1, 8, 8)
    idx = torch.tensor([6, 1, 3, 0])
    batch = Batch(x[:3], torch.tensor([0, 1, 2]), [x[3:]], idx, epoch=0, step=5, steps_per_epoch=10, epochs=10)
    terms = method.losses(batch)
    assert set(terms) == {"domain"}  # the authors' domain_train: the head's loss alone
    with torch.no_grad():
        z = hand_domain_logit(method, x)
    target = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.125, 0.5, 0.0])  # labelled = 1, unlabelled = buffer[idx]
    assert terms["domain"].item() == pytest.approx(hand_bce(z, target).item(), rel=1e-5)
    # the head is trained: its gradient is that of the BCE
    terms["domain"].backward()
    assert method.domain_head.weight.grad.abs().sum() > 0


def test_main_phase_terms_match_the_definition():
    method = make(pool_size=8)
    method.soft_labels.copy_(torch.tensor([0.0, 0.125, 0.25, 0.5, 0.75, 0.875, 1.0, 0.375]))
    x = fixed(12, 1, 8, 8)
    x_lb, y_lb, x_ulb, idx = x[:3], torch.tensor([2, 0, 1]), x[3:6], torch.tensor([4, 7, 2])
    x_sel = [x[6:9], x[9:12]]  # K = 2 weak views of 3 selected images
    epochs, spe, step = 10, 100, 107  # warm-up = 1 epoch: the MixMatch phase starts at step 100
    batch = Batch(x_lb, y_lb, [x_ulb], idx, 1, step, spe, epochs, x_sel, torch.tensor([1, 3, 5]),
                  torch.Generator().manual_seed(5))
    before = {k: v.clone() for k, v in method.student.state_dict().items() if "running" in k}
    method.domain_loss(batch, freeze_bn=True)
    after = {k: v for k, v in method.student.state_dict().items() if "running" in k}
    assert before and all(torch.equal(before[k], after[k]) for k in before)  # batch statistics, no update

    terms = method.losses(batch)
    assert set(terms) == {"domain", "ce", "unsup"}
    with torch.no_grad():
        z = hand_domain_logit(method, torch.cat([x_lb, x_ulb]))
        expected_domain = hand_bce(z, torch.tensor([1.0, 1.0, 1.0, 0.75, 0.375, 0.25]))
        # MixMatch written out: sharpened mean of the K views' softmax, MixUp with the same random draws
        probs = method.student(torch.cat(x_sel)).softmax(dim=1).view(2, 3, K_CLASSES).mean(dim=0)
        q = probs ** 2 / (probs ** 2).sum(dim=1, keepdim=True)  # T = 0.5
        targets = torch.cat([F.one_hot(y_lb, K_CLASSES).float(), q, q])
        x_mix, t_mix, _ = mixup(torch.cat([x_lb, *x_sel]), targets, 0.75, torch.Generator().manual_seed(5))
        logits = method.student(x_mix)
        expected_ce = -(t_mix[:3] * logits[:3].log_softmax(dim=1)).sum(dim=1).mean()
        w = 75.0 * min(1.0, ((step - 100) / 900) / (16 / 1024))  # ramp counted from the end of the warm-up
        expected_unsup = w * ((logits[3:].softmax(dim=1) - t_mix[3:]) ** 2).mean()
    assert 0 < w < 75
    assert terms["domain"].item() == pytest.approx(expected_domain.item(), rel=1e-5)
    assert terms["ce"].item() == pytest.approx(expected_ce.item(), rel=1e-5)
    assert terms["unsup"].item() == pytest.approx(expected_unsup.item(), rel=1e-5)
    assert method.pop_records()["unlabelled_weight"] == pytest.approx(w)


def test_decoupled_weight_decay_only_after_the_warmup():
    method = make(pool_size=4)
    x = fixed(6, 1, 8, 8)
    w0 = method.domain_head.weight.detach().clone()
    warm = Batch(x[:2], torch.tensor([0, 1]), [x[2:4]], torch.tensor([0, 1]), 0, 0, 10, 10)
    method.losses(warm)
    method.after_step()
    assert torch.equal(method.domain_head.weight, w0)
    main = Batch(x[:2], torch.tensor([0, 1]), [x[2:4]], torch.tensor([0, 1]), 1, 10, 10, 10, [x[4:], x[4:]],
                 torch.tensor([2, 3]), torch.Generator().manual_seed(0))
    method.losses(main)
    method.after_step()
    assert torch.allclose(method.domain_head.weight, w0 * (1 - 0.02 * 0.002), rtol=0, atol=1e-9)


def test_domain_labels_are_the_mean_of_the_last_window_of_predictions():
    method = make(pool_size=4, avg_epochs=2, avg_epochs_fraction=1.0, pre_epochs=0)
    preds = {1: torch.tensor([0.25, 0.5, 0.75, 1.0]), 2: torch.tensor([0.75, 0.5, 0.25, 0.0]),
             3: torch.tensor([0.125, 0.875, 0.5, 0.5]), 4: torch.tensor([1.0, 0.0, 0.5, 0.25])}
    expected = {0: [0.0, 0.0, 0.0, 0.0],  # nothing trained yet: the initial label (all OOD)
                1: [0.0, 0.0, 0.0, 0.0],  # one epoch recorded, the window of 2 is not full: unchanged
                2: [0.5, 0.5, 0.5, 0.5],  # (p1 + p2) / 2
                3: [0.4375, 0.6875, 0.375, 0.25],  # (p2 + p3) / 2: p1 left the ring
                4: [0.5625, 0.4375, 0.5, 0.375]}  # (p3 + p4) / 2
    for epoch in range(5):
        method.on_epoch_start(fake_pool(preds, epoch, epochs=10))
        assert torch.equal(method.soft_labels, torch.tensor(expected[epoch])), epoch
    # the labels are state: a checkpoint of the method restores them
    fresh = make(pool_size=4, avg_epochs=2, avg_epochs_fraction=1.0, pre_epochs=0)
    fresh.load_state_dict(method.state_dict())
    assert torch.equal(fresh.soft_labels, method.soft_labels) and torch.equal(fresh.domain_history, method.domain_history)


def test_authors_window_of_ten_epochs():
    method = make(pool_size=3)
    preds = {e: torch.full((3,), e / 16) for e in range(1, 13)}
    for epoch in range(13):
        method.on_epoch_start(fake_pool(preds, epoch, epochs=1124))
        if epoch < 10:
            assert torch.equal(method.soft_labels, torch.zeros(3))
    assert method.soft_labels[0].item() == pytest.approx(sum(range(3, 13)) / 16 / 10)  # epochs 3..12


def test_otsu_selects_exactly_the_high_mode_of_a_bimodal_set():
    low = 0.05 + 0.1 * torch.linspace(0, 1, 20)
    high = 0.85 + 0.1 * torch.linspace(0, 1, 10)
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(1))
    scores = torch.cat([low, high])[perm]
    inliers = set((perm >= 20).nonzero().flatten().tolist())
    selected, t = otsu_select(scores, inclusive=True)
    assert set(selected.tolist()) == inliers and 0.15 < t < 0.85
    # through the epoch hook: window of one epoch, the labels are the predictions themselves
    method = make(pool_size=30, avg_epochs=1, pre_epochs=1, pre_epochs_fraction=1.0)
    assert method.on_epoch_start(fake_pool({0: scores}, 0, epochs=10)) == {"warmup": 1.0, "soft_label_mean": 0.0}
    assert method.selection() is None  # warm-up: no selected stream
    figures = method.on_epoch_start(fake_pool({1: scores}, 1, epochs=10))
    assert set(method.selection().tolist()) == inliers
    assert figures["selected_count"] == 10 and figures["selected"] == pytest.approx(1 / 3)
    assert figures["threshold"] == pytest.approx(t) and figures["warmup"] == 0.0


def test_selection_reexamines_the_whole_pool_every_epoch():
    method = make(pool_size=8, avg_epochs=1, pre_epochs=0)
    first = torch.tensor([0.1, 0.9, 0.1, 0.9, 0.1, 0.9, 0.1, 0.1])
    second = torch.tensor([0.9, 0.9, 0.1, 0.9, 0.1, 0.1, 0.1, 0.9])  # 0 and 7 come in, 5 goes out
    third = torch.tensor([0.1, 0.1, 0.1, 0.1, 0.1, 0.9, 0.9, 0.1])
    scores = {1: first, 2: second, 3: third}
    chosen = []
    for epoch in (1, 2, 3):
        method.on_epoch_start(fake_pool(scores, epoch, epochs=10))
        chosen.append(set(method.selection().tolist()))
    assert chosen == [{1, 3, 5}, {0, 1, 3, 7}, {5, 6}]
    assert not chosen[1] <= chosen[0] and not chosen[2] <= chosen[1]  # never a shrinking chain
    assert 5 in chosen[0] and 5 not in chosen[1] and 5 in chosen[2]  # rejected once, selected again


def test_all_equal_labels_select_the_whole_pool():
    selected, t = otsu_select(torch.zeros(5), inclusive=True)
    assert selected.tolist() == [0, 1, 2, 3, 4] and t == 0.0  # the authors' weights >= th


def test_ood_score_is_one_minus_the_inlier_probability():
    method = make(pool_size=6, avg_epochs=1, pre_epochs=0).eval()
    x = fixed(6, 1, 8, 8, phase=0.3)
    with torch.no_grad():
        method.domain_head.weight.zero_()
        method.domain_head.bias.fill_(4.0)
        expected = torch.full((6,), 1 - torch.sigmoid(torch.tensor(4.0)))
        assert torch.allclose(method.ood_score(x, *method.predict(x, features=True)), expected)
        method.domain_head.bias.fill_(-4.0)
        assert (method.ood_score(x, *method.predict(x, features=True)) > 0.98).all()  # head says "not labelled-like": outlier
        method.domain_head.weight.copy_(fixed(1, method.domain_head.in_features, scale=3.0))
        method.domain_head.bias.zero_()
        ood = method.ood_score(x, *method.predict(x, features=True))
        assert torch.allclose(ood, 1 - torch.sigmoid(hand_domain_logit(method, x)), atol=1e-6)
    # the curriculum and the score agree: every selected image is less of an outlier than every rejected one
    pool = PoolAccess(size=6, map=lambda fn: fn(x), epoch=1, epochs=10)
    with torch.no_grad():
        method.on_epoch_start(pool)
    chosen = method.selection()
    rest = torch.tensor([i for i in range(6) if i not in set(chosen.tolist())])
    assert len(chosen) and len(rest) and ood[chosen].max() < ood[rest].min()
