"""CIFAR ResNets (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, section 4.2).

The family and the wide ``x4`` variants are those of RepDistiller (Tian et al., "Contrastive Representation
Distillation", ICLR 2020, ``models/resnet.py``); module and parameter names match it so that its published
teachers load unchanged: ``conv1``, ``bn1``, ``layer{1,2,3}.<i>.{conv1,bn1,conv2,bn2,downsample.{0,1}}``, ``fc``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from osslbench.models.base import Net, register_model

__all__ = ["BasicBlock", "ResNet"]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and no bias."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Post-activation basic block: conv3x3-BN-ReLU-conv3x3-BN, plus identity or 1x1 conv-BN, then ReLU."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)  # only ever applied to a fresh BN output
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.forward_pre(x))

    def forward_pre(self, x: Tensor) -> Tensor:
        """The block's output before its final ReLU (RepDistiller's ``preact``)."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = x if self.downsample is None else self.downsample(x)
        return out + residual


class ResNet(Net):
    """CIFAR ResNet-depth with filters ``num_filters`` = [stem, stage1, stage2, stage3] and (depth-2)/6 basic
    blocks per stage, strides 1,2,2. Features: [after stem ReLU, layer1, layer2, layer3]."""

    def __init__(self, depth: int, num_filters: Sequence[int], num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        if len(num_filters) != 4:
            raise ValueError("num_filters must have 4 entries (stem and three stages)")
        n = (depth - 2) // 6
        self.inplanes = num_filters[0]
        self.conv1 = nn.Conv2d(in_channels, num_filters[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(num_filters[1], n, stride=1)
        self.layer2 = self._make_layer(num_filters[2], n, stride=2)
        self.layer3 = self._make_layer(num_filters[3], n, stride=2)
        self.fc = nn.Linear(num_filters[3] * BasicBlock.expansion, num_classes)
        self.feature_channels = [num_filters[0], *(c * BasicBlock.expansion for c in num_filters[1:])]

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * BasicBlock.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * BasicBlock.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * BasicBlock.expansion),
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * BasicBlock.expansion
        layers += [BasicBlock(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_features(self, x: Tensor) -> list[Tensor]:
        f0 = self.relu(self.bn1(self.conv1(x)))
        f1 = self.layer1(f0)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        return [f0, f1, f2, f3]

    @staticmethod
    def _stage_pre(layer: nn.Sequential, x: Tensor) -> tuple[Tensor, Tensor]:
        for block in layer[:-1]:
            x = block(x)
        pre = layer[-1].forward_pre(x)
        return F.relu(pre), pre

    def forward_preact(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Each map before its final ReLU (RepDistiller's ``preact=True``; it keeps the stem's post-ReLU map)."""
        p0 = self.bn1(self.conv1(x))
        f0 = F.relu(p0)
        f1, p1 = self._stage_pre(self.layer1, f0)
        f2, p2 = self._stage_pre(self.layer2, f1)
        f3, p3 = self._stage_pre(self.layer3, f2)
        return [f0, f1, f2, f3], [p0, p1, p2, p3]


_THIN = (16, 16, 32, 64)
_WIDE = (32, 64, 128, 256)


@register_model("resnet8", "ResNet-8 (He et al. 2016), CIFAR-style, filters 16-16-32-64, 0.08M params")
def resnet8(num_classes: int, in_channels: int = 3) -> ResNet:
    """ResNet-8 (1 block per stage)."""
    return ResNet(8, _THIN, num_classes, in_channels)


@register_model("resnet14", "ResNet-14 (He et al. 2016), CIFAR-style, filters 16-16-32-64, 0.18M params")
def resnet14(num_classes: int, in_channels: int = 3) -> ResNet:
    """ResNet-14 (2 blocks per stage)."""
    return ResNet(14, _THIN, num_classes, in_channels)


@register_model("resnet20", "ResNet-20 (He et al. 2016), CIFAR-style, filters 16-16-32-64, 0.28M params")
def resnet20(num_classes: int, in_channels: int = 3) -> ResNet:
    """ResNet-20 (3 blocks per stage)."""
    return ResNet(20, _THIN, num_classes, in_channels)


@register_model("resnet32", "ResNet-32 (He et al. 2016), CIFAR-style, filters 16-16-32-64, 0.47M params")
def resnet32(num_classes: int, in_channels: int = 3) -> ResNet:
    """ResNet-32 (5 blocks per stage)."""
    return ResNet(32, _THIN, num_classes, in_channels)


@register_model("resnet44", "ResNet-44 (He et al. 2016), CIFAR-style, filters 16-16-32-64, 0.67M params")
def resnet44(num_classes: int, in_channels: int = 3) -> ResNet:
    """ResNet-44 (7 blocks per stage)."""
    return ResNet(44, _THIN, num_classes, in_channels)


@register_model("resnet56", "ResNet-56 (He et al. 2016), CIFAR-style, filters 16-16-32-64, 0.86M params")
def resnet56(num_classes: int, in_channels: int = 3) -> ResNet:
    """ResNet-56 (9 blocks per stage), RepDistiller's usual teacher of ResNet-20."""
    return ResNet(56, _THIN, num_classes, in_channels)


@register_model("resnet110", "ResNet-110 (He et al. 2016), CIFAR-style, filters 16-16-32-64, 1.7M params")
def resnet110(num_classes: int, in_channels: int = 3) -> ResNet:
    """ResNet-110 (18 blocks per stage)."""
    return ResNet(110, _THIN, num_classes, in_channels)


@register_model("resnet8x4", "ResNet-8x4 (RepDistiller, Tian et al. 2020), filters 32-64-128-256, 1.2M params")
def resnet8x4(num_classes: int, in_channels: int = 3) -> ResNet:
    """ResNet-8x4, RepDistiller's usual student of ResNet-32x4."""
    return ResNet(8, _WIDE, num_classes, in_channels)


@register_model("resnet32x4", "ResNet-32x4 (RepDistiller, Tian et al. 2020), filters 32-64-128-256, 7.4M params")
def resnet32x4(num_classes: int, in_channels: int = 3) -> ResNet:
    """ResNet-32x4, RepDistiller's strongest CIFAR-100 teacher."""
    return ResNet(32, _WIDE, num_classes, in_channels)
