"""OpenMatch: OVA loss, OVA entropy and SOCR values on hand-built logits; the OVA selection rule; selection
made again from the whole pool every epoch; no FixMatch term during the warm-up; the OOD score."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F

import osslbench.baselines.openset.openmatch as openmatch_module
from osslbench.baselines.openset.openmatch import OpenMatch, OpenMatchConfig, inliers, socr_loss
from osslbench.data.dataset import RunData
from osslbench.method import Batch, PoolAccess
from osslbench.models import build_model
from osslbench.ood import ova_entropy, ova_loss, ova_outlier_score, ova_probs
from osslbench.protocol import OptimConfig, TrainConfig
from osslbench.registry import get_method
from osslbench.semisup import scaled_epochs
from osslbench.trainer import Schedule, Trainer

from helpers import fixed

K = 3  # seen classes of the tiny problems


def ova_logits(p_in: list[list[float]]) -> torch.Tensor:
    """``B x 2K`` OVA logits in the authors' layout (outlier logits first, then inlier logits) whose inlier
    probabilities are exactly ``p_in``: outlier logits 0, inlier logits the log-odds."""
    p = torch.tensor(p_in, dtype=torch.float64)
    return torch.cat([torch.zeros_like(p), torch.log(p / (1 - p))], dim=1).float()


def closed_logits(pred: list[int]) -> torch.Tensor:
    """Closed-set logits whose argmax is ``pred``."""
    return 2.0 * F.one_hot(torch.tensor(pred), K).float()


def binary_entropy(p: float) -> float:
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


def tiny_method(**cfg) -> OpenMatch:
    torch.manual_seed(0)
    return OpenMatch(OpenMatchConfig(**cfg), build_model("cnn-small", K, 1), num_classes=K)


# --- OVA loss, entropy, SOCR on fixed logits -------------------------------------------------------
P0 = [3 / 4, 1 / 4, 1 / 2]
P1 = [1 / 5, 2 / 3, 4 / 5]


def test_ova_layout_outlier_first_then_inlier():
    p = ova_probs(ova_logits([P0, P1]))
    assert p.shape == (2, 2, K)
    assert p[:, 1].flatten().tolist() == pytest.approx(P0 + P1, abs=1e-6)
    assert p[:, 0].flatten().tolist() == pytest.approx([1 - v for v in P0 + P1], abs=1e-6)


def test_ova_loss_value_positive_term_and_hardest_negative():
    # sample 0, label 0: positive -log(3/4); negatives -log(3/4) (class 1) and -log(1/2) (class 2) -> hardest log 2
    # sample 1, label 2: positive -log(4/5); negatives -log(4/5) (class 0) and -log(1/3) (class 1) -> hardest log 3
    loss = ova_loss(ova_logits([P0, P1]), torch.tensor([0, 2]))
    expected = (math.log(4 / 3) + math.log(5 / 4)) / 2 + (math.log(2) + math.log(3)) / 2
    assert expected == pytest.approx(0.5 * math.log(10))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_ova_entropy_value_is_the_mean_binary_entropy_over_batch_and_classes():
    expected = sum(binary_entropy(p) for p in P0 + P1) / 6
    assert ova_entropy(ova_logits([P0, P1])).item() == pytest.approx(expected, rel=1e-6)
    # (2 H(1/4) + H(1/2) + 2 H(1/5) + H(2/3)) / 6 = (1.124670 + 0.693147 + 1.000805 + 0.636514) / 6
    assert expected == pytest.approx(0.575856, abs=1e-6)
    # certain outputs have (almost) no entropy
    assert ova_entropy(ova_logits([[1e-6, 1 - 1e-6, 0.5]])).item() == pytest.approx(math.log(2) / 3, abs=1e-4)


def test_socr_value_squared_difference_summed_over_in_out_and_classes():
    u1 = ova_logits([P0, P1])
    u2 = ova_logits([[1 / 2, 1 / 2, 1 / 2], P1])
    # sample 0: per class (dp_in)^2 + (dp_out)^2 = 2 dp_in^2: 2/16 + 2/16 + 0 = 1/4; sample 1: 0; batch mean 1/8
    assert socr_loss(u1, u2).item() == pytest.approx(1 / 8, rel=1e-6)
    assert socr_loss(u1, u1).item() == 0.0


# --- the selection rule ------------------------------------------------------------------------------
def test_selection_rule_outlier_probability_of_the_predicted_class_below_one_half():
    p_in = [P0, P0, P1, [1 / 2, 1 / 2, 1 / 2], P1]
    pred = [0, 1, 2, 1, 0]
    scores = ova_outlier_score(ova_logits(p_in), closed_logits(pred))
    # outlier probability 1 - p_in of the predicted class: 1/4, 3/4, 1/5, 1/2, 4/5
    assert scores.tolist() == pytest.approx([1 / 4, 3 / 4, 1 / 5, 1 / 2, 4 / 5], abs=1e-6)
    assert inliers(scores, 0.5).tolist() == [0, 2]  # 0.5 itself is not an inlier (unk_score < 0.5)


class FakeHeads:
    """Stands in for ``OpenMatch.heads``: per-epoch tables of (closed, OVA) logits looked up by the image
    index written into pixel (0, 0); records the images it scored and the ``select`` flag."""

    def __init__(self, tables: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.tables, self.epoch, self.seen, self.select = tables, 0, [], []

    def __call__(self, x: torch.Tensor, select: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        idx = x[:, 0, 0, 0].long()
        self.seen.append(idx)
        self.select.append(select)
        closed, open_ = self.tables[self.epoch]
        return closed[idx], open_[idx]


def pool_of(n: int, epoch: int, epochs: int, chunk: int = 2) -> PoolAccess:
    """A pool of ``n`` images whose pixel (0, 0) holds their index, mapped in chunks as the Trainer does."""
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 8, 8).clone()
    return PoolAccess(size=n, map=lambda fn: torch.cat([fn(x[i:i + chunk]) for i in range(0, n, chunk)]),
                      epoch=epoch, epochs=epochs)


def test_selection_is_made_again_from_the_whole_pool_every_epoch():
    method = tiny_method(start_fix=1, start_fix_fraction=1.0)
    # epoch 1 outlier scores 1/4, 3/4, 1/5, 4/5 -> {0, 2}; epoch 2: 3/4, 1/4, 1/5, 1/3 -> {1, 2, 3}
    tables = {1: (closed_logits([0, 1, 2, 0]), ova_logits([P0, P0, P1, P1])),
              2: (closed_logits([1, 0, 2, 1]), ova_logits([P0, P0, P1, P1]))}
    fake = FakeHeads(tables)
    method.heads = fake
    for epoch, expected in ((1, [0, 2]), (2, [1, 2, 3])):
        fake.epoch, fake.seen = epoch, []
        logged = method.on_epoch_start(pool_of(4, epoch, epochs=5))
        assert method.selection().tolist() == expected
        assert sorted(torch.cat(fake.seen).tolist()) == [0, 1, 2, 3]  # every image of the pool scored again
        assert logged == {"selected": len(expected) / 4}
    assert all(fake.select)  # scored by the selection model
    # sample 1, rejected at epoch 1, is back at epoch 2; the selection is not a shrinking subset of the last one


def test_no_selection_and_no_fixmatch_term_during_the_warm_up():
    method = tiny_method(start_fix=2, start_fix_fraction=1.0)

    def refuse(fn):
        raise AssertionError("the pool must not be scored during the warm-up")

    for epoch in (0, 1):
        assert method.on_epoch_start(PoolAccess(size=4, map=refuse, epoch=epoch, epochs=10)) == {}
        assert method.selection() is None
    x = fixed(2 + 2 * 2, 1, 8, 8)
    batch = Batch(x[:2], torch.tensor([0, 1]), [x[2:4], x[4:6]], torch.arange(2), 0, 0, 1, 10)
    assert set(method.losses(batch)) == {"ce", "ova", "em", "socr"}
    method.heads = FakeHeads({0: (closed_logits([0, 1, 2, 0]), ova_logits([P0, P0, P1, P1]))})
    method.on_epoch_start(pool_of(4, 2, epochs=10))
    assert method.selection().tolist() == [0, 2]


def test_warm_up_length_is_ten_epochs_at_paper_scale_and_the_same_share_of_a_short_run():
    assert scaled_epochs(10, 10 / 240, 240) == 10
    assert scaled_epochs(10, 10 / 240, 512) == 10  # the authors' run
    assert scaled_epochs(10, 10 / 240, 20) == 1  # mini scale
    assert scaled_epochs(10, 10 / 240, 48) == 2
    assert scaled_epochs(0, 10 / 240, 240) == 0


def test_trainer_gives_the_selected_stream_only_after_the_warm_up(tmp_path):
    """End to end: no selection and no ``fix`` loss in the warm-up epochs, then the pool is scored whole
    every epoch and FixMatch trains on the selected stream."""
    g = torch.Generator().manual_seed(0)
    images = lambda n: torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8)  # noqa: E731
    data = RunData(images(12), torch.arange(12) % K, images(10), torch.zeros(10, dtype=torch.bool), images(6),
                   torch.arange(6) % K, images(4), K, (0.5,), (0.25,), 1, False)
    method = tiny_method(start_fix=2, start_fix_fraction=1.0, ema_decay=0.0, inlier_threshold=1.0)
    sizes: list[int] = []
    scorer = method.outlier_score
    method.outlier_score = lambda x, select=False: (sizes.append(len(x)), scorer(x, select))[1]
    train = TrainConfig(epochs=4, iters_per_epoch=2, batch_size=4, eval_batch_size=4, amp=False, channels_last=False)
    trainer = Trainer(method, data, Schedule(4, train, OptimConfig(), 0), tmp_path, "h", torch.device("cpu"),
                      progress=False)
    history = trainer.fit()
    assert ["loss_fix" in row for row in history] == [False, False, True, True]
    assert ["hook_selected" in row for row in history] == [False, False, True, True]
    assert all(row["hook_selected"] == 1.0 for row in history[2:])  # inlier_threshold 1: every image is selected
    # two epochs of scoring the whole pool (10 images) for the selection; evaluation's OOD scores reuse the
    # evaluation pass's features (one backbone pass per image: tests/test_evaluate.py counts it)
    assert sum(sizes) == 2 * 10


# --- the FixMatch term, the heads, the OOD score ------------------------------------------------------
def openmatch_batch(with_selection: bool) -> Batch:
    x = fixed(2 + 2 * 2 + 2 * 2, 1, 8, 8)
    sel = [x[6:8], x[8:10]] if with_selection else []
    return Batch(x[:2], torch.tensor([0, 2]), [x[2:4], x[4:6]], torch.arange(2), 3, 3, 1, 10, sel,
                 torch.tensor([5, 7]) if with_selection else None)


def test_losses_equal_their_definitions_and_fixmatch_uses_a_second_forward():
    method = tiny_method(threshold=0.0)
    method.train()
    batch = openmatch_batch(with_selection=True)
    terms = method.losses(batch)
    assert set(terms) == {"ce", "ova", "em", "socr", "fix"}
    with torch.no_grad():  # the same two forward passes written out (train mode: BatchNorm uses batch statistics)
        logits, logits_open = method.heads(torch.cat([batch.x_lb, *batch.x_ulb]))
        u1, u2 = logits_open[2:4], logits_open[4:6]
        weak, strong = method.student(torch.cat(batch.x_sel)).chunk(2)
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(logits[:2], batch.y_lb).item(), rel=1e-5)
    assert terms["ova"].item() == pytest.approx(ova_loss(logits_open[:2], batch.y_lb).item(), rel=1e-5)
    assert terms["em"].item() == pytest.approx(0.1 * (ova_entropy(u1) + ova_entropy(u2)).item() / 2, rel=1e-5)
    assert terms["socr"].item() == pytest.approx(1.0 * socr_loss(u1, u2).item(), rel=1e-5)
    # threshold 0 (the authors'): every selected image trains on its weak view's argmax
    expected_fix = F.cross_entropy(strong, weak.argmax(dim=1)).item()
    assert terms["fix"].item() == pytest.approx(expected_fix, rel=1e-5)
    assert method.pop_records()["mask_rate"] == 1.0
    method.cfg.threshold = 1.01
    assert method.losses(batch)["fix"].item() == 0.0


def test_gradients_reach_the_ova_head_and_the_backbone():
    method = tiny_method()
    terms = method.losses(openmatch_batch(with_selection=True))
    sum(terms.values()).backward()
    assert method.ova.weight.grad.abs().sum() > 0 and method.student.classifier.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in method.select_model.parameters())


def test_ood_score_is_the_outlier_probability_of_the_predicted_class():
    method = tiny_method().eval()
    x = fixed(5, 1, 8, 8)
    with torch.no_grad():
        logits, h = method.predict(x, features=True)
        scores = method.ood_score(x, logits, h)
        _, logits_open = method.heads(x)
        assert torch.allclose(scores, ova_outlier_score(logits_open, logits))
        # orientation: inlier logits above the outlier logits -> low score; below -> high score (higher = outlier)
        method.ova.weight.zero_()
        method.ova.weight[K:] = 1.0  # pooled features are >= 0 (ReLU), so every inlier logit is >= 0
        inlier_like = method.ood_score(x, logits, h)
        method.ova.weight[K:] = -1.0
        outlier_like = method.ood_score(x, logits, h)
    assert (inlier_like < 0.5).all() and (outlier_like > 0.5).all()


@pytest.mark.parametrize(("warmup", "decay"), [(False, 0.9), (True, 0.1)])  # update 0 of the warm-up: min(0.9, 1/10)
def test_selection_model_is_an_ema_of_the_trained_weights(warmup, decay):
    method = tiny_method(ema_decay=0.9, ema_warmup=warmup)
    assert all(not p.requires_grad for p in method.select_model.parameters())
    before = [p.clone() for p in method.select_model.parameters()]
    with torch.no_grad():
        for p in (*method.student.parameters(), *method.ova.parameters()):
            p.add_(1.0)
        method.student(fixed(4, 1, 8, 8))  # train mode: the BatchNorm running statistics move
    method.after_step()
    live = [*method.student.parameters(), *method.ova.parameters()]
    for e, b, w in zip(method.select_model.parameters(), before, live, strict=True):
        assert torch.allclose(e, decay * b + (1 - decay) * w, atol=1e-6)
    for e, w in zip(method.select_model.buffers(), [*method.student.buffers(), *method.ova.buffers()], strict=True):
        assert torch.equal(e, w)  # buffers copied, as FixMatch-pytorch's ModelEMA
    x = fixed(3, 1, 8, 8)
    with torch.no_grad():
        method.eval()
        logits, feats = method.select_model["student"](x, features=True)
        logits_open = method.select_model["ova"](method.student.pool(feats[-1]))
        assert torch.allclose(method.outlier_score(x, select=True), ova_outlier_score(logits_open, logits))
    assert tiny_method(ema_decay=0.0).select_model is None  # no EMA: the trained weights select


def test_defaults_registry_and_import_paths():
    cfg = OpenMatchConfig()
    assert (cfg.mu, cfg.ema_decay, cfg.lambda_em, cfg.lambda_socr, cfg.lambda_fix) == (2.0, 0.999, 0.1, 1.0, 1.0)
    assert (cfg.threshold, cfg.temperature, cfg.inlier_threshold, cfg.start_fix) == (0.0, 1.0, 0.5, 10)
    assert get_method("openmatch") is OpenMatch
    assert OpenMatch.unlabelled_views == ("weak", "weak") and OpenMatch.selected_views == ("weak", "strong")
    source = inspect.getsource(openmatch_module)
    assert "from baselines" not in source and "import baselines" not in source
    with pytest.raises(ValueError):
        OpenMatchConfig(start_fix=-1)
