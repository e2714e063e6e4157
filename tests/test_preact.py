"""Pre-activation features (RepDistiller's ``preact=True``, used by AB) of every zoo model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from osslbench.models import MODELS, build_model

# models whose every map ends in a ReLU: the map is relu(its pre-activation)
POST_RELU = {"cnn-small", "cnn-large", "ShuffleV1"} | {n for n in MODELS if n.startswith("resnet") and not n.endswith("bireal")}


NO_RELU = {"resnet8x4-bireal"}


def make(name: str):
    ch, size = (1, 8) if name.startswith("cnn") else (3, 32)
    torch.manual_seed(0)
    return build_model(name, 5, ch), torch.randn(2, ch, size, size)


@pytest.mark.parametrize("name", list(MODELS))
def test_preact_features_match_the_plain_pass(name):
    model, x = make(name)
    model.eval()
    with torch.no_grad():
        logits, feats = model(x, features=True)
        post, pre = model.forward_preact(x)
        logits2, pre2 = model(x, features=True, preact=True)
    assert torch.allclose(logits2, logits, atol=1e-5)
    assert len(pre) == len(post) == len(feats)
    for f, g, p, q in zip(feats, post, pre, pre2, strict=True):
        assert torch.allclose(f, g, atol=1e-5) and p.shape == f.shape and torch.equal(p, q)
    if name in NO_RELU:  # Bi-Real: real-valued shortcuts, no ReLU ends a map: each is its own pre-activation
        assert all(torch.equal(p, f) for p, f in zip(pre, feats, strict=True))
    else:
        assert (pre[-1] < 0).any() and torch.allclose(F.relu(pre[-1]), feats[-1], atol=1e-5)  # the last map's ReLU
    if name in POST_RELU:
        assert all(torch.allclose(F.relu(p), f, atol=1e-5) for p, f in zip(pre, feats, strict=True))
    if name.startswith("wrn"):  # RepDistiller: the next block's bn1 of f1, f2; bn1 of block3's output
        assert torch.allclose(pre[1], model.block2.layer[0].bn1(feats[1]), atol=1e-5)
        assert torch.allclose(pre[2], model.block3.layer[0].bn1(feats[2]), atol=1e-5)


@pytest.mark.parametrize("name", ["wrn-16-1", "resnet8", "cnn-small", "ShuffleV1", "ShuffleV2", "MobileNetV2"])
def test_preact_pass_runs_each_batchnorm_once(name):
    model, x = make(name)
    model.train()
    model.forward_preact(x)
    counts = {int(m.num_batches_tracked) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert counts == {1}
