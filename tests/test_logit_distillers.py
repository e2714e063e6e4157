"""DKD, DIST, CRD and KD's logit standardisation: each loss's value on fixed tensors against the paper's equation
written out here, and which images (labelled / unlabelled) each term sees."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from osslbench.baselines.distill.crd import ContrastMemory, nce_loss, sample_negatives
from osslbench.baselines.distill.dkd import warmup_factor
from osslbench.method import Batch
from osslbench.models.base import Net
from osslbench.registry import get_method

from helpers import fixed


class LinearNet(Net):
    """Logits = W x + b of a D x 1 x 1 input: no BatchNorm, so a batch's logits are those of its images alone."""

    def __init__(self, d: int, k: int, phase: float) -> None:
        super().__init__()
        self.fc = nn.Linear(d, k)
        with torch.no_grad():
            self.fc.weight.copy_(fixed(k, d, phase=phase))
            self.fc.bias.copy_(fixed(k, scale=0.3, phase=phase + 1))
        self.feature_channels = [d]

    def forward_features(self, x: Tensor) -> list[Tensor]:
        return [x]


D, K = 6, 5
X = fixed(5, D, 1, 1, scale=2.0, phase=0.3)  # 2 labelled + 3 unlabelled images
Y = torch.tensor([3, 0])


def logits_of(net: LinearNet, x: Tensor) -> Tensor:
    return x.flatten(1) @ net.fc.weight.T + net.fc.bias


def make(name: str, **cfg):
    student, teacher = LinearNet(D, K, phase=0.0), LinearNet(D, K, phase=2.0)
    cls = get_method(name)
    return cls(cls.Config(**cfg), student, teacher, num_classes=K, pool_size=10, labelled_size=4), student, teacher


def batch(epoch: int = 0, epochs: int = 240) -> Batch:
    return Batch(X[:2], Y, [X[2:]], torch.tensor([7, 1, 4]), epoch, 0, 1, epochs, idx_lb=torch.tensor([2, 0]))


def kl(p: Tensor, q: Tensor) -> Tensor:
    """sum_c p log(p / q), per row."""
    return (p * (p.log() - q.log())).sum(dim=1)


def ce(logits: Tensor, y: Tensor) -> Tensor:
    return (logits.exp().sum(1).log() - logits[torch.arange(len(y)), y]).mean()


# ------------------------------------------------------------------------------------------------- DKD
def test_dkd_terms_equal_the_papers_decomposition_on_every_image():
    """Zhao et al. 2022, Eq. 7: TCKD on the binary (target, rest) split, NCKD on the softmax over the other classes;
    labelled images take their label, unlabelled ones the teacher's argmax; CE on labelled images only."""
    method, student, teacher = make("dkd")
    terms = method.losses(batch())
    s, t = logits_of(student, X), logits_of(teacher, X)
    target = torch.cat([Y, t[2:].argmax(1)])
    T = 4.0
    tckd, nckd = [], []
    for i in range(5):
        ps, pt = torch.softmax(s[i] / T, 0), torch.softmax(t[i] / T, 0)
        c = int(target[i])
        bs, bt = torch.stack([ps[c], 1 - ps[c]]), torch.stack([pt[c], 1 - pt[c]])
        tckd.append((bt * (bt / bs).log()).sum())
        rest = [j for j in range(K) if j != c]
        qs, qt = torch.softmax(s[i, rest] / T, 0), torch.softmax(t[i, rest] / T, 0)
        nckd.append((qt * (qt / qs).log()).sum())
    w = 1 / 20  # epoch 1 of the authors' 20-epoch warm-up
    assert terms["tckd"].item() == pytest.approx(w * 1.0 * T * T * torch.stack(tckd).mean().item(), rel=1e-5)
    assert terms["nckd"].item() == pytest.approx(w * 8.0 * T * T * torch.stack(nckd).mean().item(), rel=1e-5)
    assert terms["ce"].item() == pytest.approx(ce(s[:2], Y).item(), rel=1e-5)
    # pinned: a change here is a change of the method
    assert (terms["tckd"].item(), terms["nckd"].item()) == pytest.approx((0.5492942, 7.5887957), rel=1e-4)


def test_dkd_is_kd_decoupled():
    """The paper's Eq. 4: KD = TCKD + (1 - p_t^target) NCKD, per image (checks both terms together)."""
    method, student, teacher = make("dkd", alpha=1.0, beta=1.0, warmup=0)
    s, t = logits_of(student, X), logits_of(teacher, X)
    target = torch.cat([Y, t[2:].argmax(1)])
    from osslbench.baselines.distill.dkd import dkd_terms

    for i in range(5):
        tckd, nckd = dkd_terms(s[i:i + 1], t[i:i + 1], target[i:i + 1], 4.0)
        pt = torch.softmax(t[i] / 4, 0)
        kd = 16 * kl(pt[None], torch.softmax(s[i] / 4, 0)[None])
        assert (tckd + (1 - pt[target[i]]) * nckd).item() == pytest.approx(kd.item(), rel=1e-4)


def test_dkd_warmup_follows_the_authors_epochs_and_shrinks_with_the_run():
    assert [warmup_factor(e, 240, 20, 20 / 240) for e in (0, 9, 19, 100)] == pytest.approx([1 / 20, 0.5, 1, 1])
    assert [warmup_factor(e, 24, 20, 20 / 240) for e in (0, 1, 5)] == pytest.approx([0.5, 1, 1])  # 2 epochs of 24
    method, _, _ = make("dkd")
    late = method.losses(batch(epoch=30))
    early = method.losses(batch(epoch=0))
    assert late["nckd"].item() == pytest.approx(20 * early["nckd"].item(), rel=1e-5)


def test_dkd_with_logit_standardisation():
    method, student, teacher = make("dkd", logit_std=True, warmup=0)
    s, t = logits_of(student, X), logits_of(teacher, X)
    target = torch.cat([Y, t[2:].argmax(1)])  # the target class is the raw teacher's argmax (z-scoring keeps it)
    zs = (s - s.mean(1, keepdim=True)) / (1e-7 + ((s - s.mean(1, keepdim=True)) ** 2).sum(1, keepdim=True).div(K - 1).sqrt())
    zt = (t - t.mean(1, keepdim=True)) / (1e-7 + ((t - t.mean(1, keepdim=True)) ** 2).sum(1, keepdim=True).div(K - 1).sqrt())
    from osslbench.baselines.distill.dkd import dkd_terms

    tckd, nckd = dkd_terms(zs, zt, target, 4.0)
    terms = method.losses(batch())
    assert terms["tckd"].item() == pytest.approx(tckd.item(), rel=1e-5)
    assert terms["nckd"].item() == pytest.approx(8.0 * nckd.item(), rel=1e-5)


# ------------------------------------------------------------------------------------------------- DIST
def test_dist_relations_over_labelled_and_unlabelled_images():
    """Huang et al. 2022: inter-class = 1 - mean over images of Pearson(Y_s[i], Y_t[i]); intra-class = 1 - mean over
    classes of Pearson(Y_s[:, c], Y_t[:, c]) across the whole 2 + 3 batch; both x tau^2; CE on labelled only."""
    method, student, teacher = make("dist")
    terms = method.losses(batch())
    tau = 4.0
    ys = torch.softmax(logits_of(student, X) / tau, 1)
    yt = torch.softmax(logits_of(teacher, X) / tau, 1)
    inter = 1 - torch.stack([torch.corrcoef(torch.stack([ys[i], yt[i]]))[0, 1] for i in range(5)]).mean()
    intra = 1 - torch.stack([torch.corrcoef(torch.stack([ys[:, c], yt[:, c]]))[0, 1] for c in range(K)]).mean()
    assert terms["inter"].item() == pytest.approx(2.0 * tau * tau * inter.item(), rel=1e-4)
    assert terms["intra"].item() == pytest.approx(2.0 * tau * tau * intra.item(), rel=1e-4)
    assert terms["ce"].item() == pytest.approx(ce(logits_of(student, X[:2]), Y).item(), rel=1e-5)
    cfg = get_method("dist").Config()
    assert (cfg.beta, cfg.gamma, cfg.tau) == (2.0, 2.0, 4.0)
    assert (terms["inter"].item(), terms["intra"].item()) == pytest.approx((46.4872856, 43.9536591), rel=1e-4)


# ------------------------------------------------------------------------------------------------- KD + LS
def test_kd_logit_standardisation_value():
    """Sun et al. 2024: z-score each image's logits (unbiased std, + 1e-7), then Hinton's T^2 KL on all images."""
    method, student, teacher = make("kd", logit_std=True)
    terms = method.losses(batch())

    def z(v: Tensor) -> Tensor:
        c = v - v.mean(1, keepdim=True)
        return c / (1e-7 + (c.pow(2).sum(1, keepdim=True) / (K - 1)).sqrt())

    s, t = z(logits_of(student, X)), z(logits_of(teacher, X))
    expected = 16 * kl(torch.softmax(t / 4, 1), torch.softmax(s / 4, 1)).mean()
    assert terms["kd"].item() == pytest.approx(0.9 * expected.item(), rel=1e-5)
    plain, _, _ = make("kd")
    assert plain.losses(batch())["kd"].item() != pytest.approx(terms["kd"].item(), rel=1e-3)
    assert get_method("kd").Config().logit_std is False


# ------------------------------------------------------------------------------------------------- CRD
def test_nce_loss_is_tian_et_al_eq_18():
    p = torch.tensor([[0.9, 0.1, 0.3, 0.05], [0.2, 0.4, 0.01, 0.7]])  # column 0: the positive
    n_data, k = 50, 3
    h = p / (p + k / n_data)  # P(D = 1 | x)
    expected = -(h[:, 0].log() + (1 - h[:, 1:]).log().sum(1)).mean()
    assert nce_loss(p, n_data).item() == pytest.approx(expected.item(), rel=1e-5)


def test_negatives_are_uniform_over_the_bank_without_the_anchor():
    gen = torch.Generator().manual_seed(0)
    idx = torch.tensor([0, 5, 9])
    neg = sample_negatives(idx, 10, 20_000, gen)
    assert neg.shape == (3, 20_000) and int(neg.min()) >= 0 and int(neg.max()) <= 9
    assert not (neg == idx[:, None]).any()
    counts = torch.bincount(neg[1], minlength=10).float()
    assert counts[5] == 0 and (counts[[0, 1, 2, 3, 4, 6, 7, 8, 9]] / 20_000 - 1 / 9).abs().max() < 0.01


def test_contrast_memory_scores_and_momentum_update():
    mem = ContrastMemory(feat_dim=3, n_data=4, nce_t=0.5, nce_m=0.25)
    bank_s, bank_t = fixed(4, 3, phase=1.0), fixed(4, 3, phase=2.0)
    mem.memory_s.copy_(bank_s)
    mem.memory_t.copy_(bank_t)
    e_s = torch.nn.functional.normalize(fixed(2, 3, phase=3.0), dim=1)
    e_t = torch.nn.functional.normalize(fixed(2, 3, phase=4.0), dim=1)
    idx = torch.tensor([2, 0])
    contrast = torch.tensor([[2, 1, 3], [0, 3, 3]])
    out_s, out_t = mem(e_s, e_t, idx, contrast)
    raw_s = torch.stack([torch.exp(bank_t[contrast[i]] @ e_s[i] / 0.5) for i in range(2)])
    raw_t = torch.stack([torch.exp(bank_s[contrast[i]] @ e_t[i] / 0.5) for i in range(2)])
    assert torch.allclose(out_s, raw_s / (raw_s.mean() * 4), rtol=1e-5)  # Z fixed at the first step: mean * N
    assert torch.allclose(out_t, raw_t / (raw_t.mean() * 4), rtol=1e-5)
    for bank, old, e in ((mem.memory_s, bank_s, e_s), (mem.memory_t, bank_t, e_t)):
        for row, i in zip(e, idx, strict=True):
            v = 0.25 * old[i] + 0.75 * row
            assert torch.allclose(bank[i], v / v.norm(), rtol=1e-5)
        assert torch.equal(bank[[1, 3]], old[[1, 3]])  # rows of images not in the batch are untouched
    z = mem.z.clone()
    mem(e_s, e_t, idx, contrast)
    assert torch.equal(mem.z, z)  # Z is set once


def test_crd_bank_covers_labelled_and_pool_and_the_loss_is_the_sum_of_both_nce():
    """Bank = 4 labelled + 10 pool images: labelled image i at row i, pool image j at row 4 + j. After one step only
    the rows of the batch's images moved; the loss is NCE(student anchors vs teacher bank) + NCE(teacher anchors vs
    student bank) over all 2 + 3 images, with the same image as the positive."""
    method, student, teacher = make("crd", nce_k=6, feat_dim=4)
    assert method.memory.memory_s.shape == (14, 4)
    before_s, before_t = method.memory.memory_s.clone(), method.memory.memory_t.clone()
    b = batch()
    gen_copy = torch.Generator()
    gen_copy.set_state(b.gen.get_state())
    terms = method.losses(b)
    rows = [2, 0, 4 + 7, 4 + 1, 4 + 4]
    moved = (method.memory.memory_s != before_s).any(1).nonzero().flatten().tolist()
    assert sorted(moved) == sorted(rows)
    assert sorted((method.memory.memory_t != before_t).any(1).nonzero().flatten().tolist()) == sorted(rows)
    # the value, from the banks as they were and the negatives the step drew
    idx = torch.tensor(rows)
    contrast = torch.cat([idx[:, None], sample_negatives(idx, 14, 6, gen_copy)], 1)
    h = X.flatten(1)
    e_s = torch.nn.functional.normalize(h @ method.embed_s.linear.weight.T + method.embed_s.linear.bias, dim=1)
    e_t = torch.nn.functional.normalize(h @ method.embed_t.linear.weight.T + method.embed_t.linear.bias, dim=1)
    raw_s = torch.stack([torch.exp(before_t[contrast[i]] @ e_s[i] / 0.07) for i in range(5)])
    raw_t = torch.stack([torch.exp(before_s[contrast[i]] @ e_t[i] / 0.07) for i in range(5)])
    p_s, p_t = raw_s / (raw_s.mean() * 14), raw_t / (raw_t.mean() * 14)

    def nce(p: Tensor) -> Tensor:
        hh = p / (p + 6 / 14)
        return -(hh[:, 0].log() + (1 - hh[:, 1:]).log().sum(1)).mean()

    assert terms["crd"].item() == pytest.approx(0.8 * (nce(p_s) + nce(p_t)).item(), rel=1e-4)
    sum(terms.values()).backward()  # the in-place bank update must not break the graph
    assert method.embed_s.linear.weight.grad.abs().sum() > 0 and method.embed_t.linear.weight.grad.abs().sum() > 0
    assert terms["ce"].item() == pytest.approx(ce(logits_of(student, X[:2]), Y).item(), rel=1e-5)
    assert "kd" not in terms  # alpha = 0 (RepDistiller's -a 0)


def test_crd_bank_is_in_the_state_dict():
    method, _, _ = make("crd", nce_k=6, feat_dim=4)
    method.losses(batch())
    state = method.state_dict()
    assert {"memory.memory_s", "memory.memory_t", "memory.z"} <= set(state)
    fresh, _, _ = make("crd", nce_k=6, feat_dim=4)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.memory.memory_s, method.memory.memory_s) and torch.equal(fresh.memory.z, method.memory.z)


def test_crd_scores_by_matrix_product_equal_the_gathered_rows():
    bank = fixed(40, 8, phase=0.5)
    e = torch.nn.functional.normalize(fixed(3, 8, phase=1.5), dim=1)
    small = torch.tensor([[1, 5, 7], [0, 39, 2], [3, 3, 3]])  # 40 rows <= 8 x 3: the matrix-product path
    wide = torch.arange(3 * 10).view(3, 10) % 40
    expected = torch.stack([bank[small[i]] @ e[i] for i in range(3)])
    assert torch.allclose(ContrastMemory.scores(bank, e, small), expected, atol=1e-6)
    one = small[:, :1]  # 40 rows > 8 x 1: the gather path
    assert torch.allclose(ContrastMemory.scores(bank, e, one), expected[:, :1], atol=1e-6)
    assert torch.allclose(ContrastMemory.scores(bank, e, wide),
                          torch.stack([bank[wide[i]] @ e[i] for i in range(3)]), atol=1e-6)
