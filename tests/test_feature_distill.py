"""RepDistiller's feature distillers in the open set: each loss against its paper's equation written out here on
fixed small tensors (which images each term sees), the init stage of AB / FT / FSP (what trains when, at which
lr), and layer choices that do not fit the architectures (one line, exit 2, nothing written)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from osslbench.cli import main
from osslbench.method import Batch
from osslbench.models import build_model
from osslbench.protocol import OptimConfig
from osslbench.registry import get_method

N_LB, N_ULB, K = 3, 2, 6  # labelled, unlabelled images; classes
DISTILLERS = ["fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "ab", "ft", "fsp", "nst"]


def make(name: str, **cfg):
    """The method on the digits pair (cnn-small <- cnn-large, 1 x 8 x 8 images), built from seed 0."""
    torch.manual_seed(0)
    student, teacher = build_model("cnn-small", K, 1), build_model("cnn-large", K, 1)
    for p in teacher.parameters():  # a teacher whose BN is not the identity
        p.data.normal_(0, 0.5)
    cls = get_method(name)
    if name == "fitnet":
        cfg.setdefault("hint_layer", 1)  # as the digits protocol: cnn-small has two maps
    return cls(cls.Config(**cfg), student, teacher, num_classes=K, image_size=8).train()


def batch(epoch: int = 0, init_epochs: int = 0) -> Batch:
    g = torch.Generator().manual_seed(1)
    return Batch(x_lb=torch.randn(N_LB, 1, 8, 8, generator=g), y_lb=torch.tensor([0, 3, 5]),
                 x_ulb=[torch.randn(N_ULB, 1, 8, 8, generator=g)], idx_ulb=torch.arange(N_ULB), epoch=epoch, step=0,
                 steps_per_epoch=1, epochs=4, init_epochs=init_epochs)


def maps(net, x, preact=False):
    """The nets' own stage maps and pooled vector (RepDistiller's list: [f0, f1, (f2,) pooled])."""
    if preact:
        post, pre = net.forward_preact(x)
        return [*pre, post[-1].mean((2, 3))]
    feats = net.forward_features(x)
    return [*feats, feats[-1].mean((2, 3))]


def bn(y, module):
    """BatchNorm in training mode, written out: batch statistics over (N, H, W), biased variance."""
    mean = y.mean((0, 2, 3), keepdim=True)
    var = y.var((0, 2, 3), unbiased=False, keepdim=True)
    return (y - mean) / torch.sqrt(var + module.eps) * module.weight.view(1, -1, 1, 1) + module.bias.view(1, -1, 1, 1)


def pool_to(a, b):
    """Average-pool the larger (square) map to the smaller one's side."""
    if a.shape[2] > b.shape[2]:
        a = F.avg_pool2d(a, a.shape[2] // b.shape[2])
    elif b.shape[2] > a.shape[2]:
        b = F.avg_pool2d(b, b.shape[2] // a.shape[2])
    return a, b


# --- each paper's equation, written from the paper (and the authors' code's reductions) -----------------
def fitnet(m, s, t):  # hint layer 1 (digits): conv 1x1 (same 4x4 size) + BN + ReLU, then MSE
    r = m.regressor
    u = F.relu(bn(F.conv2d(s[1], r.conv.weight, r.conv.bias), r.bn))
    return ((u - t[1]) ** 2).sum() / u.numel()


def at(m, s, t):  # pairs (1, 1): student f1 32x4x4, teacher f1 64x4x4
    def a(f):
        q = (f ** 2).mean(1).reshape(len(f), -1)
        return q / q.norm(dim=1, keepdim=True)
    return ((a(s[1]) - a(t[1])) ** 2).mean()


def sp(m, s, t):  # feat[-2]: student f1, teacher f2
    def g(f):
        f = f.reshape(len(f), -1)
        gram = f @ f.T
        return gram / gram.norm(dim=1, keepdim=True)
    b = len(s[1])
    return ((g(t[2]) - g(s[1])) ** 2).sum() / b ** 2


def cc(m, s, t):
    e_s = s[-1] @ m.embed_s.weight.T + m.embed_s.bias
    e_t = t[-1] @ m.embed_t.weight.T + m.embed_t.bias
    d = (e_s - e_t).abs()
    return sum((d[i] * d[i + 1]).sum() for i in range(len(d) - 1)) / (len(d) - 1)


def vid(m, s, t):
    r = m.regressors[0].mean
    mu = F.conv2d(F.relu(F.conv2d(F.relu(F.conv2d(s[1], r[0].weight)), r[2].weight)), r[4].weight)
    var = torch.log1p(torch.exp(m.regressors[0].log_scale)).view(1, -1, 1, 1) + 1e-5
    return (0.5 * ((mu - t[1]) ** 2 / var + torch.log(var))).mean()


def huber(a, b):
    d = (a - b).abs()
    return torch.where(d < 1, 0.5 * d ** 2, d - 0.5).mean()


def rkd(m, s, t):
    def dist(h):
        b = len(h)
        d = torch.stack([torch.stack([(h[i] - h[j]).norm() if i != j else h.new_zeros(()) for j in range(b)])
                         for i in range(b)])
        return d / d[d > 0].mean()

    def angle(h):
        b = len(h)
        out = []
        for j, i, k in itertools.product(range(b), repeat=3):  # angle at h_j between h_i and h_k
            u, v = h[i] - h[j], h[k] - h[j]
            out.append((u / u.norm().clamp(min=1e-12)) @ (v / v.norm().clamp(min=1e-12)))
        return torch.stack(out)
    hs, ht = s[-1], t[-1]
    return 25 * huber(dist(hs), dist(ht)) + 50 * huber(angle(hs), angle(ht))


def pkt(m, s, t):
    eps = 1e-7

    def p(h):
        h = h / (h.norm(dim=1, keepdim=True) + eps)
        c = (h @ h.T + 1) / 2
        return c / c.sum(1, keepdim=True)
    ps, pt = p(s[-1]), p(t[-1])
    return (pt * torch.log((pt + eps) / (ps + eps))).mean()


def ab(m, s, t):  # pre-activations, pair (1, 1), connector conv 1x1 + BN (no ReLU), weight 2^(0 - 1 + 1)
    c = m.connectors[0]
    u, v = bn(F.conv2d(s[1], c.conv.weight, c.conv.bias), c.bn), t[1]
    hinge = (u + 1) ** 2 * ((u > -1) & (v <= 0)) + (u - 1) ** 2 * ((u <= 1) & (v > 0))
    return 1.0 * hinge.sum() / len(u) * 3 / 1000


def leaky_stack(x, seq, transposed=False):
    conv = F.conv_transpose2d if transposed else F.conv2d
    for layer in seq:
        if isinstance(layer, torch.nn.Conv2d | torch.nn.ConvTranspose2d):
            x = conv(x, layer.weight, layer.bias, padding=1)
        elif isinstance(layer, torch.nn.BatchNorm2d):
            x = bn(x, layer)
        else:
            x = F.leaky_relu(x, 0.1)
    return x


def ft(m, s, t):  # student f1 (32x4x4) -> translator; teacher feat[-2] = f2 (128x2x2) -> paraphraser encoder
    f_s = leaky_stack(s[1], m.translator)
    f_t = leaky_stack(t[2], m.encoder)
    f_s, f_t = pool_to(f_s, f_t)

    def phi(f):
        q = (f ** 2).mean(1).reshape(len(f), -1)
        return q / q.norm(dim=1, keepdim=True)
    return (phi(f_s) - phi(f_t)).abs().mean()


def fsp(m, s, t):  # maps ":-1" -> pairs (0, 0), (1, 1); student widths 16, 32 projected to 32, 64 (1x1 convs)
    s0 = F.conv2d(s[0], m.projections[0].weight)
    s1 = F.conv2d(s[1], m.projections[1].weight)

    def g(bot, top):
        bot, top = pool_to(bot, top)
        return torch.einsum("nahw,nbhw->nba", bot, top) / (bot.shape[2] * bot.shape[3])
    return ((g(s0, s1) - g(t[0], t[1])) ** 2).mean()


def nst(m, s, t):
    def norm(f):
        f = f.reshape(f.shape[0], f.shape[1], -1)
        return f / f.norm(dim=2, keepdim=True).clamp(min=1e-12)  # an all-zero (post-ReLU) channel stays zero
    a, b = norm(s[1]), norm(t[1])

    def k(x, y):
        return torch.einsum("nid,njd->nij", x, y) ** 2
    return k(b, b).mean() + k(a, a).mean() - 2 * k(a, b).mean()


EQUATIONS = {"fitnet": fitnet, "at": at, "sp": sp, "cc": cc, "vid": vid, "rkd": rkd, "pkt": pkt, "nst": nst,
             "ft": ft, "ab": ab, "fsp": fsp}


@pytest.mark.parametrize("name", DISTILLERS)
def test_loss_matches_the_papers_equation_on_labelled_and_unlabelled_images(name):
    """CE on the 3 labelled images only; the distiller's term on all 3 + 2 images of the one pass (beta = 1 for
    AB / FSP, whose authors' distillation stage has it at 0)."""
    m = make(name, **({"beta": 1.0} if name in ("ab", "fsp") else {}))
    b = batch()
    terms = m.losses(b)
    x = torch.cat([b.x_lb, b.x_ulb[0]])
    with torch.no_grad():
        s, t = maps(m.student, x, m.preact), maps(m.teacher, x, m.preact)
        logits = m.student(x)
        expected = m.cfg.beta * EQUATIONS[name](m, s, t)
        on_labelled = m.cfg.beta * EQUATIONS[name](m, [f[:N_LB] for f in s], [f[:N_LB] for f in t])
    assert set(terms) == {"ce", name}
    assert torch.allclose(terms["ce"], F.cross_entropy(logits[:N_LB], b.y_lb), rtol=1e-5)
    assert torch.allclose(terms[name], expected, rtol=1e-4, atol=1e-7), (float(terms[name]), float(expected))
    assert not torch.allclose(expected, on_labelled, rtol=1e-3), "the unlabelled images must change the term"
    terms[name].backward()  # the term trains the student
    assert m.student.stages[0][0][0].weight.grad is not None
    assert all(p.grad is None for p in m.teacher.parameters())


@pytest.mark.parametrize("name", ["at", "ab"])
def test_kd_term_on_all_images_when_alpha_is_set(name):
    m = make(name, alpha=0.9, gamma=0.1)
    b = batch()
    terms = m.losses(b)
    x = torch.cat([b.x_lb, b.x_ulb[0]])
    with torch.no_grad():
        p_t = F.softmax(m.teacher(x) / 4, dim=1)
        log_p_s = F.log_softmax(m.student(x) / 4, dim=1)
    kl = (torch.special.xlogy(p_t, p_t) - p_t * log_p_s).sum(1).mean() * 16
    assert torch.allclose(terms["kd"], 0.9 * kl, rtol=1e-5)
    assert (name in terms) is (name != "ab")  # AB's term is 0 in the authors' distillation stage


def grads(module) -> dict[str, bool]:
    return {n: p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in module.named_parameters()}


def test_ab_init_stage_trains_connectors_and_student_features_on_labelled_images():
    m = make("ab")
    b = batch(epoch=0, init_epochs=1)
    terms = m.losses(b)
    assert set(terms) == {"ab_init"}
    with torch.no_grad():
        s, t = maps(m.student, b.x_lb, preact=True), maps(m.teacher, b.x_lb, preact=True)
        assert torch.allclose(terms["ab_init"], ab(m, s, t), rtol=1e-5)  # weight 1, labelled images only
    terms["ab_init"].backward()
    g = grads(m)
    assert g["connectors.0.conv.weight"] and g["student.stages.0.0.0.weight"] and g["student.stages.1.0.0.weight"]
    assert not g["student.fc.weight"]  # the classifier is not part of the init stage
    # distillation stage: CE only (the authors' loss_kd = 0), the connector unused
    m.zero_grad()
    terms = m.losses(batch(epoch=1, init_epochs=1))
    assert set(terms) == {"ce"}


def test_ft_init_stage_trains_the_paraphraser_alone_then_freezes_it():
    m = make("ft")
    b = batch(epoch=0, init_epochs=1)
    terms = m.losses(b)
    with torch.no_grad():
        f_t = maps(m.teacher, b.x_lb)[2]
        rec = leaky_stack(leaky_stack(f_t, m.encoder), m.decoder, transposed=True)
        assert torch.allclose(terms["ft_init"], ((rec - f_t) ** 2).mean(), rtol=1e-5)
    terms["ft_init"].backward()
    g = grads(m)
    assert all(v for k, v in g.items() if k.startswith(("encoder", "decoder")) and k.endswith("weight"))
    assert not any(v for k, v in g.items() if k.startswith(("student", "translator")))
    m.zero_grad()
    sum(m.losses(batch(epoch=1, init_epochs=1)).values()).backward()
    g = grads(m)
    assert not any(v for k, v in g.items() if k.startswith(("encoder", "decoder")))
    assert g["translator.0.weight"] and g["student.stages.0.0.0.weight"]


def test_fsp_init_stage_trains_student_features_and_projections():
    m = make("fsp")
    b = batch(epoch=0, init_epochs=1)
    terms = m.losses(b)
    with torch.no_grad():
        assert torch.allclose(terms["fsp_init"], fsp(m, maps(m.student, b.x_lb), maps(m.teacher, b.x_lb)), rtol=1e-5)
    terms["fsp_init"].backward()
    g = grads(m)
    assert g["projections.0.weight"] and g["student.stages.0.0.0.weight"] and not g["student.fc.weight"]


@pytest.mark.parametrize(("name", "init_factor"), [("ab", 1.0), ("fsp", 1.0), ("ft", 0.2)])
def test_init_stage_length_and_learning_rate(name, init_factor):
    """30 init epochs on top of 240 (RepDistiller's --init_epochs 30), at the base lr (AB, FSP) or 0.01 (FT);
    then the protocol's multistep schedule over the 240 epochs."""
    m = make(name)
    assert m.init_epochs(240) == 30 and m.init_epochs(30) == 4 and m.init_epochs(2) == 1
    optim = OptimConfig(lr=0.05)  # multistep x0.1 at 150, 180, 210 of 240 by default
    f = m.lr_schedule(optim, 240, 10)
    assert [f(s) for s in (0, 299)] == pytest.approx([init_factor] * 2)
    assert f(300) == pytest.approx(1.0) and f(300 + 1499) == pytest.approx(1.0)
    assert f(300 + 1500) == pytest.approx(0.1) and f(300 + 2399) == pytest.approx(0.001)
    assert make("at").init_epochs(240) == 0


def test_init_stage_runs_before_the_protocols_epochs(tmp_path):
    from osslbench.config import parse_overrides
    from osslbench.protocol_loader import load_protocol
    from osslbench.runner import RunOptions, run_one
    protocol = load_protocol("digits-openset", "smoke", parse_overrides(["train.epochs=8"]))
    result = run_one(protocol, "ft", 0, RunOptions(data_root=tmp_path, out=tmp_path, progress=False))
    rows = [r for r in result_rows(tmp_path)]
    assert result["metrics"]["epochs"] == 9 and len(rows) == 9  # ceil(0.125 * 8) = 1 init epoch + 8
    assert "loss_ft_init" in rows[0] and "loss_ce" not in rows[0]
    assert all("loss_ft" in r and "loss_ce" in r and "loss_ft_init" not in r for r in rows[1:])


def result_rows(root):
    import json
    [path] = root.rglob("ft/seed0/metrics.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize(("student", "teacher"), [("cnn-small", "cnn-large"), ("wrn-16-1", "wrn-16-2")])
@pytest.mark.parametrize("name", DISTILLERS)
def test_every_distiller_fits_the_digits_and_wrn_pairs(name, student, teacher):
    size, ch = (8, 1) if student.startswith("cnn") else (32, 3)
    cls = get_method(name)
    cfg = cls.Config(**({"hint_layer": 1} if name == "fitnet" and size == 8 else {}))
    torch.manual_seed(0)
    s, t = build_model(student, 5, ch), build_model(teacher, 5, ch)
    cls.check(cfg, s, t, size)
    m = cls(cfg, s, t, num_classes=5, image_size=size)
    g = torch.Generator().manual_seed(0)
    b = Batch(torch.randn(4, ch, size, size, generator=g), torch.arange(4) % 5, [torch.randn(4, ch, size, size, generator=g)],
              torch.arange(4), 1, 0, 1, 2, init_epochs=1)
    loss = sum(m.losses(b).values())
    assert math.isfinite(float(loss.detach()))
    loss.backward()


BAD = [
    (["--methods", "at", "--set", "method.at.layers=3:-1"], "method.at.layers = '3:-1' selects no layer"),
    (["--methods", "fitnet", "--set", "method.fitnet.hint_layer=2"],
     "method.fitnet.hint_layer = '2' selects the student's pooled vector"),
    (["--methods", "fitnet", "--set", "method.fitnet.hint_layer=7"], "index 7 is out of range"),
    (["--methods", "nst", "--set", "method.nst.layers=one"], "method.nst.layers = 'one': expected indices"),
    (["--methods", "fsp", "--set", "method.fsp.project=false"], "method.fsp.project = false: FSP needs equal"),
    (["--methods", "fsp", "--set", "method.fsp.layers=1:-1"], "FSP needs at least 2"),
]


@pytest.mark.parametrize(("argv", "fragment"), BAD)
def test_layer_choice_that_does_not_fit_is_one_line_exit_2(capsys, tmp_path, monkeypatch, argv, fragment):
    monkeypatch.chdir(tmp_path)
    code = main(["run", *argv, "--scale", "smoke", "--quiet", "--out", str(tmp_path / "out"),
                 "--data-root", str(tmp_path / "no-data")])
    err = capsys.readouterr().err
    assert code == 2 and fragment in err and "digits-openset.toml" in err, err
    assert len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
