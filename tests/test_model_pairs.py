"""The paper's model pairs as protocols, the student models' rules (data in the zoo, recorded in results), student-only
(binary) models, ``--methods`` groups, the capped test set of smoke scales, and the binary network itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from osslbench.cli import main
from osslbench.config import parse_overrides
from osslbench.data.splits import hashed_subset
from osslbench.errors import ConfigError
from osslbench.models import MODEL_INFO, build_model
from osslbench.models.bireal import BinaryConv2d, approx_sign
from osslbench.protocol_loader import load_protocol, protocol_files, read_tree
from osslbench.registry import family, get_method, method_config, methods, resolve_method_names
from osslbench.runner import run_config
from osslbench.teacher import teacher_config

PAIRS = {
    "cifar100-tinyimagenet": ("wrn-40-2", "wrn-40-1"),
    "cifar100-tinyimagenet-resnet8x4": ("resnet32x4", "resnet8x4"),
    "cifar100-tinyimagenet-shufflev1": ("resnet32x4", "ShuffleV1"),
    "cifar100-tinyimagenet-shufflev2": ("resnet32x4", "ShuffleV2"),
    "cifar100-tinyimagenet-mobilenetv2": ("wrn-40-2", "MobileNetV2"),
    "cifar100-tinyimagenet-bireal": ("resnet32x4", "resnet8x4-bireal"),
}


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_each_pair_is_one_protocol_that_changes_only_the_models(name):
    full, smoke = load_protocol(name), load_protocol(name, "smoke")
    assert (full.models.teacher, full.models.student) == PAIRS[name]
    assert (smoke.models.teacher, smoke.models.student) == PAIRS[name]  # smoke runs the pair itself
    base = load_protocol("cifar100-tinyimagenet")
    assert (full.data, full.split, full.train, full.optim) == (base.data, base.split, base.train, base.optim)
    if name != "cifar100-tinyimagenet":
        assert read_tree(protocol_files()[name])["extends"] == "cifar100-tinyimagenet"


def test_shufflenet_student_rules_apply_to_the_student_only_and_are_recorded():
    p = load_protocol("cifar100-tinyimagenet-shufflev1")
    srd_cfg, srd_optim = method_config(get_method("srd"), p)
    kd_cfg, kd_optim = method_config(get_method("kd"), p)
    assert srd_cfg.w_feat == 10.0 and srd_optim.lr == 0.01  # SRD's loops.py x10; RepDistiller's lr 0.01
    assert kd_optim.lr == 0.01
    assert teacher_config(p, 0)["optim"]["lr"] == 0.05  # the ResNet-32x4 teacher keeps the protocol's lr
    assert run_config(p, "srd", 0, None)["student_rules"] == {"model": "ShuffleV1", "optim": {"lr": 0.01},
                                                              "method": {"srd": {"w_feat": 10.0}}}
    assert run_config(p, "kd", 0, None)["student_rules"] == {"model": "ShuffleV1", "optim": {"lr": 0.01}}
    # the scale and --set beat a rule; the rule beats the file (cifar100-tinyimagenet.toml says lr = 0.05)
    q = load_protocol("cifar100-tinyimagenet-shufflev1", None, parse_overrides(["optim.lr=0.03", "method.srd.w_feat=2"]))
    cfg, optim = method_config(get_method("srd"), q)
    assert (cfg.w_feat, optim.lr) == (2.0, 0.03) and "student_rules" not in run_config(q, "srd", 0, None)
    v2 = load_protocol("cifar100-tinyimagenet-shufflev2")
    assert method_config(get_method("srd"), v2)[0].w_feat == 1.0  # the authors' x10 is for ShuffleV1 only
    assert method_config(get_method("srd"), v2)[1].lr == 0.01
    assert "student_rules" not in run_config(load_protocol("cifar100-tinyimagenet-resnet8x4"), "srd", 0, None)


def test_binary_models_are_student_only():
    assert MODEL_INFO["resnet8x4-bireal"].teacher is False
    with pytest.raises(ConfigError, match="models: teacher = 'resnet8x4-bireal' is a student-only model"):
        load_protocol("cifar100-tinyimagenet-bireal", None, parse_overrides(["models.teacher=resnet8x4-bireal"]))


@pytest.mark.parametrize(("overrides", "fragment"), [
    (["--set", "models.student=resnet9x4"], "models: student = 'resnet9x4' is not a known model"),
    (["--set", "models.teacher=wrn-99-9"], "models: teacher = 'wrn-99-9' is not a known model"),
    (["--set", "models.teacher=resnet8x4-bireal"], "models: teacher = 'resnet8x4-bireal' is a student-only model"),
    (["--protocol", "cifar100-tinyimagenet-bireal", "--set", "models.teacher=resnet8x4-bireal"], "student-only"),
    (["--methods", "distillers,nope"], "unknown method 'nope'"),
])
def test_bad_pairs_are_one_line_exit_2_and_write_nothing(capsys, tmp_path, monkeypatch, overrides, fragment):
    monkeypatch.chdir(tmp_path)
    code = main(["run", *overrides, "--out", str(tmp_path / "out"), "--data-root", str(tmp_path / "none"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


def test_method_groups():
    p = load_protocol("digits-openset")
    distill = [n for n, c in methods().items() if family(c) == "distill"]
    assert {"kd", "srd", "crd", "dkd", "dist"} <= set(distill)
    assert resolve_method_names("distillers", p) == ["supervised", *distill]  # the student-alone reference first
    for group, fam in (("ssl", "ssl"), ("openset", "openset")):
        names = resolve_method_names(group, p)
        assert names[0] == "supervised" and set(names[1:]) == {n for n, c in methods().items() if family(c) == fam}
    assert resolve_method_names("all", p) == list(methods()) and len(methods()) >= 14
    assert resolve_method_names("distillers,fixmatch,kd", p) == ["supervised", *distill, "fixmatch"]


def test_max_test_is_a_fixed_hashed_nested_subset():
    idx = np.arange(1000, 3000)
    a, b = hashed_subset(idx, 100), hashed_subset(idx, 300)
    assert len(a) == 100 and len(set(a)) == 100 and set(a) <= set(b) and np.all(np.diff(a) > 0)
    assert np.array_equal(hashed_subset(idx, 0), idx) and np.array_equal(hashed_subset(idx, 5000), idx)
    assert not np.array_equal(a, idx[:100])  # spread over the set, not its head
    with pytest.raises(ConfigError, match="max_test = -1 must be >= 0"):
        load_protocol("digits-openset", None, parse_overrides(["split.max_test=-1"]))
    from osslbench.data.dataset import make_splits

    s = make_splits(load_protocol("digits-openset", None, parse_overrides(["split.max_test=50"])), 0, "unused")
    s1 = make_splits(load_protocol("digits-openset", None, parse_overrides(["split.max_test=50"])), 1, "unused")
    assert len(s.test) == len(s.outlier_test) == 50 and np.array_equal(s.test, s1.test)  # the same for every seed


def test_bireal_binary_conv_and_approx_sign():
    """Bi-Real Net: sign forward, ApproxSign gradient max(0, 2 - 2|x|); weights mean|W| * sign(W) per channel."""
    x = torch.tensor([-2.0, -0.5, -0.1, 0.0, 0.3, 0.9, 1.5], requires_grad=True)
    y = approx_sign(x)
    y.sum().backward()
    assert y.tolist() == [-1, -1, -1, 1, 1, 1, 1]
    assert x.grad.tolist() == pytest.approx([0, 1.0, 1.8, 2.0, 1.4, 0.2, 0])
    conv = BinaryConv2d(2, 3, kernel_size=3, padding=1, bias=False)
    inp = approx_sign(torch.randn(1, 2, 5, 5))
    w = conv.weight.detach()
    wb = w.abs().mean(dim=(1, 2, 3), keepdim=True) * torch.where(w >= 0, 1.0, -1.0)
    assert torch.allclose(conv(inp), F.conv2d(inp, wb, padding=1), atol=1e-6)
    magnitude = conv.binary_weight().detach()[0].abs()
    assert torch.allclose(magnitude, magnitude.flatten()[0].expand_as(magnitude), rtol=1e-6)  # one per output channel
    net = build_model("resnet8x4-bireal", 10)
    ref = build_model("resnet8x4", 10)
    logits, feats = net(torch.randn(2, 3, 32, 32), features=True)
    assert [f.shape[1] for f in feats] == ref.feature_channels == net.feature_channels  # same layer choices fit
    assert sum(isinstance(m, BinaryConv2d) for m in net.modules()) == 6  # 2 units x 3 stages, every 3x3 conv binary
