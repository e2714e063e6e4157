"""PseudoLabel, Mean Teacher and MixMatch: loss values, ramps, EMA and MixUp on hand-built tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from osslbench.baselines.ssl.meanteacher import MeanTeacher, MeanTeacherConfig, softmax_mse
from osslbench.baselines.ssl.mixmatch import MixMatch, MixMatchConfig
from osslbench.baselines.ssl.pseudolabel import PseudoLabel, PseudoLabelConfig
from osslbench.method import Batch
from osslbench.models import build_model
from osslbench.semisup import (
    guess_labels,
    hard_pseudo_labels,
    linear_rampup,
    mixup,
    probability_mse,
    pseudo_label_loss,
    ramp_length,
    sharpen,
    sigmoid_rampup,
    soft_cross_entropy,
)

from helpers import fixed

C = 3  # classes of the tiny models


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("cnn-small", C, 1)


def batch_of(x_lb, y_lb, x_ulb, step=0, steps_per_epoch=1, epochs=1, seed=0) -> Batch:
    n_u = x_ulb[0].shape[0] if x_ulb else 0
    return Batch(x_lb, y_lb, x_ulb, torch.arange(n_u), step // steps_per_epoch, step, steps_per_epoch, epochs,
                 gen=torch.Generator().manual_seed(seed))


# --- ramps ----------------------------------------------------------------------------------------
def test_sigmoid_rampup_values():
    assert sigmoid_rampup(0.0, 30.0) == pytest.approx(math.exp(-5.0))
    assert sigmoid_rampup(15.0, 30.0) == pytest.approx(math.exp(-1.25))  # 1 - 15/30 = 0.5, 5 * 0.25
    assert sigmoid_rampup(24.0, 30.0) == pytest.approx(math.exp(-0.2))  # 1 - 0.8 = 0.2, 5 * 0.04
    assert sigmoid_rampup(30.0, 30.0) == 1.0
    assert sigmoid_rampup(45.0, 30.0) == 1.0
    assert sigmoid_rampup(-3.0, 30.0) == pytest.approx(math.exp(-5.0))  # clipped at the start
    assert sigmoid_rampup(5.0, 0.0) == 1.0  # no ramp


def test_ramp_length_is_30_epochs_at_paper_scale_and_the_same_fraction_of_a_short_run():
    assert ramp_length(30.0, 30.0 / 240.0, 240) == pytest.approx(30.0)
    assert ramp_length(30.0, 30.0 / 240.0, 400) == pytest.approx(30.0)  # never longer than 30 epochs
    assert ramp_length(30.0, 30.0 / 240.0, 8) == pytest.approx(1.0)


def test_linear_rampup_values():
    assert linear_rampup(0.0, 0.25) == 0.0
    assert linear_rampup(0.125, 0.25) == pytest.approx(0.5)
    assert linear_rampup(0.25, 0.25) == 1.0
    assert linear_rampup(0.9, 0.25) == 1.0
    assert linear_rampup(-0.1, 0.25) == 0.0
    assert linear_rampup(0.0, 0.0) == 1.0


# --- PseudoLabel ------------------------------------------------------------------------------------
def test_pseudolabel_masks_exactly_the_samples_below_the_probability_threshold():
    probs = torch.tensor([[0.96, 0.02, 0.02], [0.94, 0.03, 0.03], [0.01, 0.95, 0.04], [0.3, 0.3, 0.4]])
    targets, mask = hard_pseudo_labels(probs.log(), threshold=0.95)  # softmax(log p) = p
    assert targets.tolist() == [0, 0, 1, 2]
    assert mask.tolist() == [1.0, 0.0, 1.0, 0.0]
    # a max LOGIT above the threshold, max probability below it (e^5 / (e^5 + e^4.9 + e^4.8) ~ 0.37): masked
    _, m_big_logit = hard_pseudo_labels(torch.tensor([[5.0, 4.9, 4.8]]), threshold=0.95)
    assert m_big_logit.item() == 0.0
    # a max LOGIT below the threshold, max probability above it (e^0.9 / (e^0.9 + 2 e^-5) ~ 0.995): kept
    _, m_small_logit = hard_pseudo_labels(torch.tensor([[0.9, -5.0, -5.0]]), threshold=0.95)
    assert m_small_logit.item() == 1.0
    # the bound itself is kept (>=)
    logits = torch.tensor([[1.0, 0.0, -1.0]])
    exact = float(torch.softmax(logits, dim=1).max())
    assert hard_pseudo_labels(logits, exact)[1].item() == 1.0
    # threshold 0 (Lee 2013): every argmax is a target
    assert hard_pseudo_labels(probs.log(), 0.0)[1].tolist() == [1.0] * 4


def test_pseudolabel_loss_value_and_no_gradient_through_the_targets():
    probs = torch.tensor([[0.96, 0.02, 0.02], [0.5, 0.3, 0.2], [0.1, 0.85, 0.05]])
    logits = probs.log().requires_grad_(True)
    loss, mask = pseudo_label_loss(logits, threshold=0.8)
    assert mask.tolist() == [1.0, 0.0, 1.0]
    # mean over ALL unlabelled samples of mask * CE(z, argmax): (-log 0.96 - log 0.85) / 3
    assert loss.item() == pytest.approx((-math.log(0.96) - math.log(0.85)) / 3, rel=1e-5)
    loss.backward()
    # hard targets are constants: d/dz = mask * (softmax(z) - onehot(argmax)) / N
    onehot = F.one_hot(torch.tensor([0, 0, 1]), 3).float()
    expected = (probs - onehot) * mask[:, None] / 3
    assert torch.allclose(logits.grad, expected, atol=1e-6)
    assert logits.grad[1].abs().sum() == 0.0


def test_pseudolabel_weight_ramps_over_30_epochs():
    method = PseudoLabel(PseudoLabelConfig(lambda_u=2.0), tiny_model(), num_classes=C)
    x = fixed(2, 1, 8, 8)
    at = lambda step, spe, epochs: method.unlabelled_weight(batch_of(x, torch.tensor([0, 1]), [x], step, spe, epochs))  # noqa: E731
    assert at(0, 10, 240) == pytest.approx(2.0 * math.exp(-5.0))
    assert at(150, 10, 240) == pytest.approx(2.0 * math.exp(-1.25))  # epoch 15 of 30
    assert at(240, 10, 240) == pytest.approx(2.0 * math.exp(-0.2))  # epoch 24 of 30
    assert at(300, 10, 240) == 2.0  # epoch 30: full weight
    assert at(5, 10, 8) == pytest.approx(2.0 * math.exp(-1.25))  # 8 epochs: ramp of 1 epoch, half-way


def test_pseudolabel_losses_on_a_batch():
    student = tiny_model()
    method = PseudoLabel(PseudoLabelConfig(threshold=0.4), student, num_classes=C).train()
    x_lb, x_u, y = fixed(2, 1, 8, 8), fixed(4, 1, 8, 8, scale=2.0, phase=1.0), torch.tensor([0, 2])
    batch = batch_of(x_lb, y, [x_u], step=150, steps_per_epoch=10, epochs=240)
    terms = method.losses(batch)
    assert set(terms) == {"ce", "pseudo"}
    logits = student(torch.cat([x_lb, x_u])).detach()  # one pass over labelled + unlabelled (train-mode BatchNorm)
    unsup, mask = pseudo_label_loss(logits[2:], 0.4)
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(logits[:2], y).item(), rel=1e-5)
    assert terms["pseudo"].item() == pytest.approx(math.exp(-1.25) * unsup.item(), rel=1e-5)
    rec = method.pop_records()
    assert rec["mask_rate"] == pytest.approx(mask.mean().item())
    assert rec["unlabelled_weight"] == pytest.approx(math.exp(-1.25))


def test_pseudolabel_threshold_is_a_probability():
    with pytest.raises(ValueError, match="probability"):
        PseudoLabelConfig(threshold=2.0)


# --- Mean Teacher -------------------------------------------------------------------------------------
def perturb_student(method: MeanTeacher) -> None:
    """Make the student differ from its EMA teacher (as after an optimiser step), RNG-free."""
    with torch.no_grad():
        for i, p in enumerate(method.student.parameters()):
            p.add_(fixed(*p.shape, scale=0.1, phase=float(i)))


def test_meanteacher_ema_update_is_exactly_d_teacher_plus_1_minus_d_student():
    method = MeanTeacher(MeanTeacherConfig(ema_teacher=0.9, ema_warmup=False), tiny_model(), num_classes=C)
    perturb_student(method)
    teacher0 = [p.clone() for p in method.mean_teacher.parameters()]
    student = [p.clone() for p in method.student.parameters()]
    buffers0 = {k: v.clone() for k, v in method.mean_teacher.named_buffers()}
    assert method.teacher_decay() == 0.9  # the configured decay is the one used (no hard-coded value)
    method.after_step()
    for t0, s, t1 in zip(teacher0, student, method.mean_teacher.parameters(), strict=True):
        assert torch.allclose(t1, t0 * 0.9 + (1.0 - 0.9) * s, rtol=0, atol=1e-6)
        assert not torch.equal(t1, t0)
    assert all(torch.equal(p, s) for p, s in zip(method.student.parameters(), student, strict=True))
    # the teacher's BatchNorm statistics are its own, not averaged
    assert all(torch.equal(v, buffers0[k]) for k, v in method.mean_teacher.named_buffers())
    assert int(method.ema_steps) == 1


def test_meanteacher_warmup_decay():
    """The project's one EMA warm-up (osslbench.ema): update t uses min(d, (1 + t) / (10 + t))."""
    method = MeanTeacher(MeanTeacherConfig(ema_teacher=0.999), tiny_model(), num_classes=C)
    perturb_student(method)
    teacher0 = [p.clone() for p in method.mean_teacher.parameters()]  # = the initial student
    student = [p.clone() for p in method.student.parameters()]
    assert method.teacher_decay() == pytest.approx(1 / 10)
    method.after_step()  # update 0: d = min(0.999, 1 / 10) = 0.1
    for t0, s, t1 in zip(teacher0, student, method.mean_teacher.parameters(), strict=True):
        assert torch.allclose(t1, t0 * 0.1 + 0.9 * s, rtol=0, atol=1e-6)
    assert method.teacher_decay() == pytest.approx(2 / 11)  # before the next update
    method.after_step()
    assert method.teacher_decay() == pytest.approx(3 / 12)
    method.ema_steps.fill_(10000)
    assert method.teacher_decay() == 0.999  # warm-up over: the configured decay


def test_meanteacher_teacher_after_k_updates_is_the_warmup_closed_form():
    """``e_k = prod_t d_t e_init + sum_t (1 - d_t) prod_{s > t} d_s w_t``, ``d_t = min(d, (1+t)/(10+t))``."""
    method = MeanTeacher(MeanTeacherConfig(ema_teacher=0.999), tiny_model(), num_classes=C)
    history = [[p.clone() for p in method.student.parameters()]]
    for _ in range(3):
        perturb_student(method)
        history.append([p.clone() for p in method.student.parameters()])
        method.after_step()
    d = [min(0.999, (1 + t) / (10 + t)) for t in range(3)]
    for j, t in enumerate(method.mean_teacher.parameters()):
        expect = d[0] * d[1] * d[2] * history[0][j]
        for k in range(3):
            expect = expect + (1 - d[k]) * math.prod(d[k + 1:]) * history[k + 1][j]
        assert torch.allclose(t, expect, atol=1e-6)


def test_meanteacher_consistency_is_mse_of_softmaxes():
    s = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])  # softmax: [0.5, 0.5], [0.75, 0.25]
    t = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])  # softmax: [0.75, 0.25], [0.5, 0.5]
    # every entry differs by 0.25: mean over batch x classes of 0.0625
    assert softmax_mse(s, t).item() == pytest.approx(0.0625, rel=1e-6)
    # shifting logits leaves the softmax, hence the cost, unchanged (it is not an MSE of logits)
    assert softmax_mse(s + 7.0, t).item() == pytest.approx(0.0625, rel=1e-6)
    assert softmax_mse(t, t).item() == 0.0


def test_meanteacher_losses_use_view_1_for_the_student_and_view_2_for_the_teacher():
    student = tiny_model()
    method = MeanTeacher(MeanTeacherConfig(), student, num_classes=C).train()
    perturb_student(method)
    x_lb, y = fixed(2, 1, 8, 8), torch.tensor([1, 0])
    u1, u2 = fixed(3, 1, 8, 8, phase=0.5), fixed(3, 1, 8, 8, phase=2.0)
    batch = batch_of(x_lb, y, [u1, u2], step=240, steps_per_epoch=10, epochs=240)  # epoch 24 of a 30-epoch ramp
    terms = method.losses(batch)
    with torch.no_grad():
        z_s = student(torch.cat([x_lb, u1]))
        z_t = method.mean_teacher(torch.cat([x_lb, u2]))
    w = 30.0 * math.exp(-0.2)
    assert method.consistency_weight(batch) == pytest.approx(w)
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(z_s[:2], y).item(), rel=1e-5)
    assert terms["consistency"].item() == pytest.approx(w * softmax_mse(z_s[2:], z_t[2:]).item(), rel=1e-5)
    sum(terms.values()).backward()
    assert student.fc.weight.grad is not None
    assert all(p.grad is None and not p.requires_grad for p in method.mean_teacher.parameters())
    trainable = {n for n, p in method.named_parameters() if p.requires_grad}
    assert trainable and not any(n.startswith("mean_teacher") for n in trainable)


def test_meanteacher_predict_uses_the_ema_teacher():
    method = MeanTeacher(MeanTeacherConfig(), tiny_model(), num_classes=C)
    perturb_student(method)
    method.eval()
    x = fixed(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(method.predict(x), method.mean_teacher(x))
        assert not torch.allclose(method.predict(x), method.student(x))
    assert "mean_teacher.fc.weight" in method.state_dict() and "ema_steps" in method.state_dict()


def test_meanteacher_refuses_double_averaging():
    with pytest.raises(ValueError, match="ema_teacher"):
        MeanTeacherConfig(ema_decay=0.999)
    assert MeanTeacherConfig().ema_teacher == 0.999 and MeanTeacherConfig().consistency == 30.0


# --- MixMatch -----------------------------------------------------------------------------------------
def test_sharpen_values():
    p = torch.tensor([[0.6, 0.4], [0.5, 0.5]])
    # T = 0.5 squares: [0.36, 0.16] / 0.52
    assert torch.allclose(sharpen(p, 0.5), torch.tensor([[0.36 / 0.52, 0.16 / 0.52], [0.5, 0.5]]), atol=1e-6)
    q = torch.tensor([[0.5, 0.25, 0.25]])
    assert torch.allclose(sharpen(q, 0.5), torch.tensor([[2 / 3, 1 / 6, 1 / 6]]), atol=1e-6)
    assert torch.allclose(sharpen(q, 1.0), q)


def test_guessed_labels_are_the_sharpened_mean_over_the_k_views():
    view1 = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    view2 = torch.tensor([[0.5, 0.3, 0.2], [0.3, 0.3, 0.4]])
    logits = torch.cat([view1.log(), view2.log()]).requires_grad_(True)  # views stacked: (K * n) x C
    q = guess_labels(logits, 2, 0.5)
    # means [0.6, 0.25, 0.15] and [0.2, 0.2, 0.6], squared and renormalised
    expected = torch.tensor([[0.36, 0.0625, 0.0225], [0.04, 0.04, 0.36]])
    expected = expected / expected.sum(dim=1, keepdim=True)
    assert torch.allclose(q, expected, atol=1e-6)
    assert not q.requires_grad  # a guessed label is a target, no gradient through it
    # sharpening the mean, not averaging sharpened views
    assert not torch.allclose(q, (sharpen(view1, 0.5) + sharpen(view2, 0.5)) / 2, atol=1e-3)


def mixing_coefficients(n: int, alpha: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix the identity (row i = e_i): row i of the result holds the weights each image got in mixed row i."""
    coef, _, lam = mixup(torch.eye(n).view(n, 1, 1, n), torch.zeros(n, 2), alpha, torch.Generator().manual_seed(seed))
    return coef.view(n, n), lam


def partners(coef: torch.Tensor) -> list[int]:
    """The row each mixed row was mixed with (itself when it drew itself)."""
    off = coef.clone()
    off.fill_diagonal_(0.0)
    return [int(off[i].argmax()) if off[i].max() > 0 else i for i in range(coef.shape[0])]


def test_mixup_mixes_inputs_and_targets_with_the_same_lambda_and_permutation():
    n = 8
    coef, lam = mixing_coefficients(n, 0.75, seed=3)
    perm = partners(coef)
    assert sorted(perm) == list(range(n))  # a permutation of the batch
    assert bool((lam >= 0.5).all()) and bool((lam <= 1.0).all())  # lambda' = max(lambda, 1 - lambda)
    assert len(set(lam.tolist())) == n  # one lambda per row
    for i, j in enumerate(perm):  # row i = lambda'_i e_i + (1 - lambda'_i) e_perm(i)
        want = torch.zeros(n)
        want[i] += lam[i]
        want[j] += 1.0 - lam[i]
        assert torch.allclose(coef[i], want, atol=1e-6)
    # any input and any soft target, with the same generator seed: lambda' x + (1 - lambda') x[perm]
    x = fixed(n, 3, 2, 2)
    t = torch.softmax(fixed(n, 4, scale=3.0, phase=0.3), dim=1)
    x_mix, t_mix, lam2 = mixup(x, t, 0.75, torch.Generator().manual_seed(3))
    assert torch.equal(lam2, lam)
    lam_x = lam.view(n, 1, 1, 1)
    assert torch.allclose(x_mix, lam_x * x + (1 - lam_x) * x[perm], atol=1e-6)
    assert torch.allclose(t_mix, lam[:, None] * t + (1 - lam[:, None]) * t[perm], atol=1e-6)
    assert torch.allclose(t_mix.sum(dim=1), torch.ones(n), atol=1e-6)  # the label mass of every row is 1


def test_mixup_is_deterministic_given_the_generator_seed_and_leaves_global_rngs_alone():
    x, t = fixed(16, 1, 4, 4), torch.softmax(fixed(16, 5, scale=2.0), dim=1)
    torch_state, np_state = torch.random.get_rng_state(), np.random.get_state()
    a = mixup(x, t, 0.75, torch.Generator().manual_seed(11))
    b = mixup(x, t, 0.75, torch.Generator().manual_seed(11))
    c = mixup(x, t, 0.75, torch.Generator().manual_seed(12))
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert not torch.equal(a[2], c[2])
    assert torch.equal(torch.random.get_rng_state(), torch_state)
    assert all(np.array_equal(u, v) for u, v in zip(np.random.get_state()[1:3], np_state[1:3], strict=True))


def test_mixmatch_loss_terms_on_fixed_values():
    logits = torch.tensor([[math.log(0.5), math.log(0.25), math.log(0.25)], [0.0, 0.0, 0.0]])
    targets = torch.tensor([[0.6, 0.4, 0.0], [0.0, 0.0, 1.0]])
    # row 1: -(0.6 log 0.5 + 0.4 log 0.25) = 1.4 log 2; row 2: -log(1/3) = log 3
    assert soft_cross_entropy(logits, targets, "mean").item() == pytest.approx((1.4 * math.log(2) + math.log(3)) / 2, rel=1e-6)
    y = torch.tensor([2, 0])
    assert soft_cross_entropy(logits, F.one_hot(y, 3).float(), "mean").item() == pytest.approx(
        F.cross_entropy(logits, y).item(), rel=1e-6)
    z = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])  # probabilities [0.5, 0.5], [0.75, 0.25]
    q = torch.tensor([[1.0, 0.0], [0.75, 0.25]])
    # squared errors 0.25, 0.25, 0, 0: mean over batch x classes
    assert probability_mse(z, q).item() == pytest.approx(0.125, rel=1e-6)


def test_mixmatch_lambda_u_ramp():
    method = MixMatch(MixMatchConfig(), tiny_model(), num_classes=C)
    x = fixed(2, 1, 8, 8)
    at = lambda step: method.unlabelled_weight(batch_of(x, torch.tensor([0, 1]), [x, x], step, 1024, 1024))  # noqa: E731
    assert at(0) == 0.0
    assert at(8 * 1024) == pytest.approx(37.5)  # half of the 16 / 1024 ramp: 75 / 2
    assert at(16 * 1024) == pytest.approx(75.0)
    assert at(500 * 1024) == 75.0


def test_mixmatch_settings():
    cfg = MixMatchConfig()
    assert (cfg.k, cfg.temperature, cfg.alpha, cfg.lambda_u, cfg.ema_decay) == (2, 0.5, 0.75, 75.0, 0.999)
    assert MixMatch.optim_defaults["name"] == "adam" and MixMatch.optim_defaults["lr"] == 0.002
    assert MixMatch(MixMatchConfig(k=3), tiny_model(), num_classes=C).unlabelled_views == ("weak",) * 3


def probe_batch(seed: int) -> tuple[Batch, torch.Tensor]:
    """2 labelled + 2 x 2 unlabelled 8x8 images, image r lit at pixel r only (mixing weights readable)."""
    images = torch.zeros(6, 64)
    images[torch.arange(6), torch.arange(6)] = 1.0 + torch.arange(6, dtype=torch.float32)
    images = images.view(6, 1, 8, 8)
    return batch_of(images[:2], torch.tensor([2, 0]), [images[2:4], images[4:6]], seed=seed), images


def test_mixmatch_mixes_across_labelled_and_unlabelled_with_guessed_targets():
    student = tiny_model()
    method = MixMatch(MixMatchConfig(), student, num_classes=C).train()
    crossed_lb, crossed_ulb = False, False
    for seed in range(10):
        batch, images = probe_batch(seed)
        with torch.no_grad():
            q = guess_labels(student(torch.cat(batch.x_ulb)), 2, 0.5)
        x_mix, t_mix = method.mix(batch)
        coef = x_mix.view(6, 64)[:, :6] / (1.0 + torch.arange(6, dtype=torch.float32))  # weight of image j in row i
        targets = torch.cat([F.one_hot(batch.y_lb, C).float(), q, q])  # labelled one-hot, then each view's guess
        assert torch.allclose(coef.sum(dim=1), torch.ones(6), atol=1e-6)
        assert bool((coef.diagonal() >= 0.5 - 1e-6).all())  # each row stays closest to its own image
        assert torch.allclose(t_mix, coef @ targets, atol=1e-5)
        assert torch.allclose(t_mix.sum(dim=1), torch.ones(6), atol=1e-5)
        perm = partners(coef)
        crossed_lb |= any(j >= 2 for j in perm[:2])
        crossed_ulb |= any(j < 2 for j in perm[2:])
    assert crossed_lb and crossed_ulb  # partners come from the whole concatenation


def test_mixmatch_losses_are_soft_ce_on_labelled_rows_and_probability_mse_on_the_rest():
    student = tiny_model()
    method = MixMatch(MixMatchConfig(), student, num_classes=C).train()
    x_lb, y = fixed(2, 1, 8, 8), torch.tensor([1, 2])
    u1, u2 = fixed(2, 1, 8, 8, phase=0.5), fixed(2, 1, 8, 8, phase=2.0)
    step = 4 * 1024  # a quarter of the ramp
    x_mix, t_mix = method.mix(batch_of(x_lb, y, [u1, u2], step, 1024, 1024, seed=5))
    terms = method.losses(batch_of(x_lb, y, [u1, u2], step, 1024, 1024, seed=5))
    assert set(terms) == {"ce", "unsup"}
    with torch.no_grad():
        logits = student(x_mix)
    assert terms["ce"].item() == pytest.approx(soft_cross_entropy(logits[:2], t_mix[:2], "mean").item(), rel=1e-5)
    assert terms["unsup"].item() == pytest.approx(75.0 / 4 * probability_mse(logits[2:], t_mix[2:]).item(), rel=1e-5)


def test_mixmatch_decoupled_weight_decay_only_on_conv_and_linear_weights():
    method = MixMatch(MixMatchConfig(decoupled_wd=0.1), tiny_model(), num_classes=C)
    before = {n: p.clone() for n, p in method.student.named_parameters()}
    method.after_step()
    for n, p in method.student.named_parameters():
        assert torch.equal(p, before[n] * 0.9 if p.ndim > 1 else before[n]), n
