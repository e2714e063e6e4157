"""ShuffleNet V1 (Zhang et al., CVPR 2018) and V2 (Ma et al., ECCV 2018), CIFAR variants.

Architectures, module and parameter names follow RepDistiller (Tian et al., "Contrastive Representation
Distillation", ICLR 2020, ``models/ShuffleNetv1.py`` and ``models/ShuffleNetv2.py``): a 1x1 stem of 24
channels (no downsampling), three stages that each halve the resolution (4x4 final map on 32x32 inputs) and a
``linear`` classifier, so that RepDistiller checkpoints of ``ShuffleV1`` / ``ShuffleV2`` load unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from osslbench.models.base import Net, register_model

__all__ = ["ShuffleBlock", "ShuffleNetV1", "ShuffleNetV2"]


class ShuffleBlock(nn.Module):
    """Channel shuffle: [N, g*c, H, W] -> [N, c*g, H, W] (interleaves the channels of the ``g`` groups)."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        g = self.groups
        return x.reshape(n, g, c // g, h, w).transpose(1, 2).reshape(n, c, h, w)


def _init(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # PyTorch defaults elsewhere, as in RepDistiller
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# ------------------------------------------------------------------------------------------------ ShuffleNet V1


def _stages_preact(stem: Tensor, stages: tuple[nn.Sequential, ...]) -> tuple[list[Tensor], list[Tensor]]:
    """Features and pre-activations of the stem (``stem`` before its ReLU) and of each stage (its last unit's
    ``forward_pre``: the unit's output and its map before the last ReLU)."""
    feats, pre = [F.relu(stem)], [stem]
    for stage in stages:
        out = feats[-1]
        for unit in stage[:-1]:
            out = unit(out)
        out, p = stage[-1].forward_pre(out)
        feats.append(out)
        pre.append(p)
    return feats, pre


class Bottleneck(nn.Module):
    """ShuffleNet V1 unit: grouped 1x1 - shuffle - depthwise 3x3 - grouped 1x1; stride 2 concatenates an
    average-pooled shortcut, stride 1 adds the identity."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int) -> None:
        super().__init__()
        self.stride = stride
        mid = out_planes // 4
        g = 1 if in_planes == 24 else groups  # the first unit sees the 24-channel stem: no grouping
        self.conv1 = nn.Conv2d(in_planes, mid, kernel_size=1, groups=g, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.shuffle1 = ShuffleBlock(groups=g)
        self.conv2 = nn.Conv2d(mid, mid, kernel_size=3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_planes, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1)) if stride == 2 else nn.Sequential()

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_pre(x)[0]

    def forward_pre(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(output, pre-activation)``: the latter before the unit's final ReLU (RepDistiller's ``preact``)."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.shuffle1(out)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        pre = torch.cat([out, res], 1) if self.stride == 2 else out + res
        return F.relu(pre), pre


class ShuffleNetV1(Net):
    """ShuffleNet V1 with stage widths ``out_planes``, ``num_blocks`` units per stage and ``groups`` groups.
    Features: [stem, layer1, layer2, layer3]."""

    classifier_path = "linear"

    def __init__(
        self,
        out_planes: Sequence[int],
        num_blocks: Sequence[int],
        groups: int,
        num_classes: int,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_planes = 24
        self.layer1 = self._make_layer(out_planes[0], num_blocks[0], groups)
        self.layer2 = self._make_layer(out_planes[1], num_blocks[1], groups)
        self.layer3 = self._make_layer(out_planes[2], num_blocks[2], groups)
        self.linear = nn.Linear(out_planes[2], num_classes)
        self.feature_channels = [24, *out_planes]
        _init(self)

    def _make_layer(self, out_planes: int, num_blocks: int, groups: int) -> nn.Sequential:
        layers = []
        for i in range(num_blocks):
            # the stride-2 unit concatenates its input, so its convolutions produce the remaining channels
            cat_planes = self.in_planes if i == 0 else 0
            layers.append(Bottleneck(self.in_planes, out_planes - cat_planes, stride=2 if i == 0 else 1, groups=groups))
            self.in_planes = out_planes
        return nn.Sequential(*layers)

    def forward_features(self, x: Tensor) -> list[Tensor]:
        f0 = F.relu(self.bn1(self.conv1(x)))
        f1 = self.layer1(f0)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        return [f0, f1, f2, f3]

    def forward_preact(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Each map before its final ReLU (the last unit's ``forward_pre`` per stage)."""
        return _stages_preact(self.bn1(self.conv1(x)), (self.layer1, self.layer2, self.layer3))


# RepDistiller train_student.py: `if opt.model_s in ['MobileNetV2', 'ShuffleV1', 'ShuffleV2']: learning_rate = 0.01`;
# SRD authors' helper/loops.py (train_ssldistill): `if opt.model_s == 'ShuffleV1': loss_kd = feat * 10 + logit`.
@register_model("ShuffleV1", "ShuffleNetV1 (Zhang et al. 2018), RepDistiller's CIFAR variant, g=3, 0.95M params",
                student_defaults={"optim": {"lr": 0.01}, "method": {"srd": {"w_feat": 10.0}}})
def shufflev1(num_classes: int, in_channels: int = 3) -> ShuffleNetV1:
    """RepDistiller's ``ShuffleV1``: widths 240, 480, 960, units 4, 8, 4, 3 groups."""
    return ShuffleNetV1([240, 480, 960], [4, 8, 4], 3, num_classes, in_channels)


# ------------------------------------------------------------------------------------------------ ShuffleNet V2


class SplitBlock(nn.Module):
    """Split the channels at ``ratio``: returns (first part, second part)."""

    def __init__(self, ratio: float) -> None:
        super().__init__()
        self.ratio = ratio

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        c = int(x.size(1) * self.ratio)
        return x[:, :c], x[:, c:]


class BasicBlock(nn.Module):
    """ShuffleNet V2 unit: split; 1x1 - depthwise 3x3 - 1x1 on one half; concatenate; shuffle."""

    def __init__(self, in_channels: int, split_ratio: float = 0.5) -> None:
        super().__init__()
        self.split = SplitBlock(split_ratio)
        c = int(in_channels * split_ratio)
        self.conv1 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, kernel_size=3, stride=1, padding=1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.shuffle = ShuffleBlock(groups=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_pre(x)[0]

    def forward_pre(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(output, pre-activation)``: the latter with the branch taken before its last ReLU (RepDistiller's
        ``preact``: the concatenation and shuffle of the untouched half and ``bn3(conv3(...))``)."""
        x1, x2 = self.split(x)
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        pre = self.bn3(self.conv3(out))
        return self.shuffle(torch.cat([x1, F.relu(pre)], 1)), self.shuffle(torch.cat([x1, pre], 1))


class DownBlock(nn.Module):
    """ShuffleNet V2 spatial down-sampling unit: two stride-2 branches, concatenated and shuffled."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        # left branch
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        # right branch
        self.conv3 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, kernel_size=3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, kernel_size=1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.shuffle = ShuffleBlock(groups=2)

    def forward(self, x: Tensor) -> Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return self.shuffle(torch.cat([left, right], 1))


class ShuffleNetV2(Net):
    """ShuffleNet V2 with stage widths ``out_channels[:3]``, head width ``out_channels[3]`` and
    ``num_blocks`` basic units after each down-sampling unit. Features: [stem, layer1, layer2, layer3,
    relu(bn2(conv2(layer3)))]."""

    classifier_path = "linear"
    head_maps = 1  # relu(bn2(conv2(layer3))): RepDistiller's feature list ends at layer3

    def __init__(self, out_channels: Sequence[int], num_blocks: Sequence[int], num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_channels = 24
        self.layer1 = self._make_layer(out_channels[0], num_blocks[0])
        self.layer2 = self._make_layer(out_channels[1], num_blocks[1])
        self.layer3 = self._make_layer(out_channels[2], num_blocks[2])
        self.conv2 = nn.Conv2d(out_channels[2], out_channels[3], kernel_size=1, stride=1, padding=0, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.linear = nn.Linear(out_channels[3], num_classes)
        self.feature_channels = [24, *out_channels[:4]]
        _init(self)

    def _make_layer(self, out_channels: int, num_blocks: int) -> nn.Sequential:
        layers: list[nn.Module] = [DownBlock(self.in_channels, out_channels)]
        layers += [BasicBlock(out_channels) for _ in range(num_blocks)]
        self.in_channels = out_channels
        return nn.Sequential(*layers)

    def forward_features(self, x: Tensor) -> list[Tensor]:
        f0 = F.relu(self.bn1(self.conv1(x)))
        f1 = self.layer1(f0)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        f4 = F.relu(self.bn2(self.conv2(f3)))
        return [f0, f1, f2, f3, f4]

    def forward_preact(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Each map before its last ReLU (a stage: its last unit's ``forward_pre``; the head: ``bn2(conv2(.))``)."""
        feats, pre = _stages_preact(self.bn1(self.conv1(x)), (self.layer1, self.layer2, self.layer3))
        p4 = self.bn2(self.conv2(feats[-1]))
        return [*feats, F.relu(p4)], [*pre, p4]


@register_model("ShuffleV2", "ShuffleNetV2 1x (Ma et al. 2018), RepDistiller's CIFAR variant, 1.36M params",
                student_defaults={"optim": {"lr": 0.01}})  # RepDistiller train_student.py (SRD's x10 is ShuffleV1 only)
def shufflev2(num_classes: int, in_channels: int = 3) -> ShuffleNetV2:
    """RepDistiller's ``ShuffleV2`` (net size 1): widths 116, 232, 464, head 1024, units 3, 7, 3."""
    return ShuffleNetV2([116, 232, 464, 1024], [3, 7, 3], num_classes, in_channels)
