"""The model zoo: the Net interface on every registered model, RepDistiller key names and sizes, checkpoints."""

from __future__ import annotations

import argparse
import pkgutil
import sys

import numpy as np
import pytest
import torch
from torch import nn

import osslbench.models as zoo
from osslbench.errors import CheckpointError, ConfigError
from osslbench.models import MODELS, build_model, describe_models, load_state, save_state
from osslbench.models.base import register_model

torch.set_num_threads(1)

TINY_INPUT = {"cnn-small", "cnn-large"}  # 8x8 one-channel (scikit-learn digits); the rest are 32x32 RGB nets
# final feature map (the map before global pooling) on a 2-image batch
FINAL_MAP = {
    "wrn-40-2": (2, 128, 8, 8),
    "wrn-40-1": (2, 64, 8, 8),
    "wrn-16-2": (2, 128, 8, 8),
    "wrn-16-1": (2, 64, 8, 8),
    "wrn-28-2": (2, 128, 8, 8),
    "wrn-28-8": (2, 512, 8, 8),
    "resnet8": (2, 64, 8, 8),
    "resnet20": (2, 64, 8, 8),
    "resnet110": (2, 64, 8, 8),
    "resnet8x4": (2, 256, 8, 8),
    "resnet32x4": (2, 256, 8, 8),
    "cnn-small": (2, 32, 4, 4),
    "cnn-large": (2, 128, 2, 2),
    "MobileNetV2": (2, 1280, 2, 2),
    "ShuffleV1": (2, 960, 4, 4),
    "ShuffleV2": (2, 1024, 4, 4),
}
WRN = ["wrn-40-2", "wrn-40-1", "wrn-16-2", "wrn-16-1", "wrn-28-2", "wrn-28-8"]
RESNET = ["resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet8x4", "resnet32x4"]


def _make(name: str, num_classes: int = 7, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    in_channels = 1 if name in TINY_INPUT else 3
    size = 8 if name in TINY_INPUT else 32
    model = build_model(name, num_classes=num_classes, in_channels=in_channels)
    x = torch.randn(2, in_channels, size, size, generator=torch.Generator().manual_seed(seed + 1))
    return model, x


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * max(1.0, b.abs().max().item()))


def test_registry_holds_the_zoo_and_describes_it() -> None:
    for name in [*WRN, *RESNET, "cnn-small", "cnn-large"]:
        assert name in MODELS
    desc = describe_models()
    assert list(desc) == list(MODELS)
    assert all(d and "\n" not in d for d in desc.values())
    assert "Zagoruyko" in desc["wrn-40-2"] and "He et al." in desc["resnet20"]
    # discovery: every module of the package was imported by osslbench.models
    for info in pkgutil.iter_modules(zoo.__path__):
        assert f"osslbench.models.{info.name}" in sys.modules


def test_register_model_sets_arch_and_refuses_duplicates() -> None:
    @register_model("test-tiny", "a throw-away test model")
    def tiny(num_classes: int, in_channels: int = 3) -> zoo.Net:
        from osslbench.models.smallcnn import SmallCNN

        return SmallCNN([[4]], num_classes, in_channels)

    try:
        assert build_model("test-tiny", 3).arch == "test-tiny"
        with pytest.raises(ValueError, match="registered twice"):
            register_model("test-tiny", "again")(tiny)
    finally:
        MODELS.pop("test-tiny")
        zoo.base.DESCRIPTIONS.pop("test-tiny")


@pytest.mark.parametrize("name", list(MODELS))
def test_net_interface(name: str) -> None:
    model, x = _make(name)
    model.eval()
    assert model.arch == name
    assert isinstance(model.classifier, nn.Linear) and model.classifier.out_features == 7
    # the classifier is registered once: state dict = named parameters + named buffers
    names = {k for k, _ in model.named_parameters()} | {k for k, _ in model.named_buffers()}
    assert set(model.state_dict()) == names
    with torch.no_grad():
        logits = model(x)
        logits2, feats = model(x, features=True)
        head = model.head(feats[-1])
        pooled = model.pool(feats[-1])
    assert logits.shape == (2, 7)
    assert torch.equal(logits2, logits)
    assert torch.equal(head, logits)
    assert torch.equal(model.classifier(pooled), logits)
    assert len(feats) == len(model.feature_channels) >= 2
    for f, c in zip(feats, model.feature_channels, strict=True):
        assert f.dim() == 4 and f.shape[:2] == (2, c)
    assert [f.shape[-1] for f in feats] == sorted((f.shape[-1] for f in feats), reverse=True)  # shallow to deep
    if name in FINAL_MAP:
        assert tuple(feats[-1].shape) == FINAL_MAP[name]
    if name in WRN or name in RESNET:
        assert [tuple(f.shape[2:]) for f in feats] == [(32, 32), (32, 32), (16, 16), (8, 8)]
        assert (feats[-1] >= 0).all()  # after the final (BN-)ReLU
    # channels_last model and input give the same logits
    model_cl = model.to(memory_format=torch.channels_last)
    with torch.no_grad():
        logits_cl = model_cl(x.to(memory_format=torch.channels_last))
    _close(logits_cl, logits)


@pytest.mark.parametrize("name", ["wrn-16-1", "resnet8", "cnn-small", "MobileNetV2", "ShuffleV1", "ShuffleV2"])
def test_bf16_autocast_and_backward_through_features(name: str) -> None:
    model, x = _make(name)
    model.train()
    x = x.to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, feats = model(x, features=True)
        loss = logits.float().logsumexp(1).mean() + sum(f.float().pow(2).mean() for f in feats)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    loss.backward()  # raises if a returned feature map was modified in place
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_small_cnns_take_any_input_size_and_the_teacher_is_bigger() -> None:
    for name in TINY_INPUT:
        model = build_model(name, 10, in_channels=1).eval()
        for size in (1, 5, 8, 28):
            assert model(torch.randn(2, 1, size, size)).shape == (2, 10)
    small = sum(p.numel() for p in build_model("cnn-small", 10, 1).parameters())
    large = sum(p.numel() for p in build_model("cnn-large", 10, 1).parameters())
    assert large > 20 * small


def test_wrn_40_2_has_repdistiller_keys() -> None:
    model = build_model("wrn-40-2", 100)
    keys = set(model.state_dict())
    for k in [
        "conv1.weight",
        "block1.layer.0.bn1.weight",
        "block1.layer.0.convShortcut.weight",  # 16 -> 32 channels already in block1 for k=2
        "block2.layer.0.convShortcut.weight",
        "block3.layer.5.conv2.weight",
        "block3.layer.5.bn2.running_var",
        "bn1.running_mean",
        "bn1.num_batches_tracked",
        "fc.weight",
        "fc.bias",
    ]:
        assert k in keys, k
    assert "block1.layer.1.convShortcut.weight" not in keys and "block3.layer.6.bn1.weight" not in keys
    # 3 stages x 6 blocks x (bn1 w+b, conv1, bn2 w+b, conv2) = 108, + 3 shortcuts, + conv1, bn1 w+b, fc w+b = 116
    assert sum(1 for _ in model.parameters()) == 116
    # + 3 buffers for each of the 3*6*2 + 1 = 37 BatchNorms
    assert len(keys) == 116 + 3 * 37
    # WRN-40-1 keeps 16 channels in block1: no shortcut there
    keys1 = set(build_model("wrn-40-1", 100).state_dict())
    assert "block1.layer.0.convShortcut.weight" not in keys1 and "block2.layer.0.convShortcut.weight" in keys1
    assert len(keys1) == 115 + 3 * 37


def test_resnet8x4_has_repdistiller_keys() -> None:
    model = build_model("resnet8x4", 100)
    keys = set(model.state_dict())
    for k in [
        "conv1.weight",
        "bn1.running_mean",
        "layer1.0.conv1.weight",
        "layer1.0.bn2.bias",
        "layer1.0.downsample.0.weight",  # 32 -> 64 channels at stride 1
        "layer2.0.downsample.0.weight",
        "layer2.0.downsample.1.running_var",
        "layer3.0.conv2.weight",
        "fc.weight",
        "fc.bias",
    ]:
        assert k in keys, k
    assert not any(k.startswith("layer1.1.") for k in keys)  # one block per stage
    # stem conv + bn (3), 3 stages x (conv1, bn1 w+b, conv2, bn2 w+b, downsample conv, bn w+b = 9), fc w+b
    assert sum(1 for _ in model.parameters()) == 3 + 3 * 9 + 2
    assert len(keys) == 32 + 3 * (1 + 3 * 3)  # 10 BatchNorms
    assert "layer1.0.downsample.0.weight" not in build_model("resnet8", 100).state_dict()  # 16 -> 16 channels


@pytest.mark.parametrize(
    ("name", "millions"),
    [
        ("wrn-40-2", 2.25),
        ("wrn-40-1", 0.57),
        ("resnet8x4", 1.23),
        ("resnet32x4", 7.43),
        ("MobileNetV2", 0.81),
        ("ShuffleV1", 0.95),
        ("ShuffleV2", 1.36),
    ],
)
def test_parameter_counts_match_repdistiller(name: str, millions: float) -> None:
    n = sum(p.numel() for p in build_model(name, 100).parameters())  # RepDistiller reports CIFAR-100 sizes
    assert abs(n / 1e6 - millions) <= 0.02 * millions


def _trained_resnet8() -> nn.Module:
    model, x = _make("resnet8", num_classes=10, seed=1)
    model.train()
    with torch.no_grad():
        model(x * 3 + 1)  # move the BatchNorm running statistics away from their initial values
    return model.eval()


def test_load_repdistiller_checkpoint_round_trips(tmp_path) -> None:
    src = _trained_resnet8()
    path = tmp_path / "ckpt_epoch_240.pth"
    opt = argparse.Namespace(model="resnet8", dataset="cifar100")
    torch.save({"epoch": 240, "model": src.state_dict(), "best_acc": np.float64(0.5), "opt": opt}, path)
    dst, x = _make("resnet8", num_classes=10, seed=2)
    dst.eval()
    assert not torch.equal(dst(x), src(x))
    meta = load_state(dst, path)
    assert meta["epoch"] == 240 and meta["opt"].model == "resnet8" and "model" not in meta
    assert torch.equal(dst(x), src(x))


def test_load_bare_state_dict_with_module_prefix(tmp_path) -> None:
    src = _trained_resnet8()
    path = tmp_path / "dp.pth"
    torch.save({f"module.{k}": v for k, v in src.state_dict().items()}, path)
    dst, x = _make("resnet8", num_classes=10, seed=2)
    assert load_state(dst.eval(), str(path)) == {}
    assert torch.equal(dst(x), src(x))


def test_load_tolerates_missing_num_batches_tracked(tmp_path) -> None:
    src = _trained_resnet8()
    path = tmp_path / "old.pth"
    torch.save({k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}, path)
    dst, x = _make("resnet8", num_classes=10, seed=2)
    load_state(dst.eval(), path)
    assert torch.equal(dst(x), src(x))


def test_save_state_records_arch_and_refuses_another(tmp_path) -> None:
    src = _trained_resnet8()
    path = save_state(src, tmp_path / "sub" / "teacher.pt", epoch=3)
    dst, x = _make("resnet8", num_classes=10, seed=2)
    assert load_state(dst.eval(), path) == {"arch": "resnet8", "epoch": 3}
    assert torch.equal(dst(x), src(x))
    with pytest.raises(CheckpointError, match=r"teacher\.pt.*resnet8.*resnet14"):
        load_state(build_model("resnet14", 10), path)


def test_load_checkpoint_of_another_shape_names_file_and_mismatch(tmp_path) -> None:
    path = tmp_path / "teacher.pth"
    torch.save({"model": build_model("wrn-40-2", 100).state_dict(), "epoch": 240}, path)
    with pytest.raises(CheckpointError) as err:
        load_state(build_model("wrn-40-2", 10), path)
    msg = str(err.value)
    assert "\n" not in msg and "teacher.pth" in msg and "wrn-40-2" in msg
    assert "shape mismatch at fc.weight: checkpoint (100, 128) vs model (10, 128)" in msg


def test_load_checkpoint_of_another_depth_lists_missing_keys(tmp_path) -> None:
    path = tmp_path / "wrn16.pth"
    torch.save({"model": build_model("wrn-16-2", 10).state_dict()}, path)
    with pytest.raises(CheckpointError) as err:
        load_state(build_model("wrn-40-2", 10), path)
    msg = str(err.value)
    # wrn-16-2 has the first 2 of the 6 blocks of each stage of wrn-40-2: 3 stages x 4 blocks x 12 keys missing
    assert "\n" not in msg and "wrn16.pth does not fit wrn-40-2: 144 missing keys (block1.layer.2." in msg
    assert "0 unexpected" in msg
    torch.save(build_model("resnet8x4", 10).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"wrn16\.pth does not fit wrn-40-2: \d+ missing keys.*\d+ unexpected \("):
        load_state(build_model("wrn-40-2", 10), path)


def test_load_unreadable_files(tmp_path) -> None:
    model = build_model("resnet8", 10)
    text = tmp_path / "notes.pth"
    text.write_text("this is not a checkpoint\n")
    with pytest.raises(CheckpointError, match=r"notes\.pth.*not a PyTorch checkpoint"):
        load_state(model, text)
    with pytest.raises(CheckpointError, match=r"absent\.pth not found"):
        load_state(model, tmp_path / "absent.pth")
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.pth"):
        load_state(model, empty)
    junk = tmp_path / "junk.pth"
    torch.save({"epoch": 3, "acc": 0.5}, junk)
    with pytest.raises(CheckpointError, match=r"junk\.pth holds no state dict"):
        load_state(model, junk)


def test_unknown_model_is_a_config_error_listing_known_names() -> None:
    with pytest.raises(ConfigError) as err:
        build_model("wrn_40_2", 10)
    msg = str(err.value)
    assert msg.startswith("unknown model 'wrn_40_2'; known: ")
    assert "wrn-40-2" in msg and "resnet8x4" in msg and "cnn-small" in msg
    with pytest.raises(ConfigError, match="num_classes"):
        build_model("resnet8", 0)
