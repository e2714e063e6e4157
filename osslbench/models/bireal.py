"""Binary CIFAR ResNets after Bi-Real Net (Liu, Wu, Luo, Yang, Liu, Cheng, "Bi-Real Net: Enhancing the Performance
of 1-bit CNNs with Improved Representational Capability and Advanced Training Algorithm", ECCV 2018; authors'
code ``liuzechun/Bi-Real-net``, ``pytorch_implementation/BiReal18_34/birealnet.py``).

Every 3x3 convolution inside the stages has binary weights and binary activations:

* activations: ``sign(x)`` forward; backward through Bi-Real's ApproxSign, the derivative of the piecewise
  polynomial ``F(x) = -1 (x < -1), 2x + x^2 (-1 <= x < 0), 2x - x^2 (0 <= x < 1), 1 (x >= 1)``, i.e.
  ``max(0, 2 - 2|x|)`` (paper Eq. 5-6);
* weights: ``mean(|W|) * sign(W)`` per output channel forward (the magnitude-aware scaling, Eq. 7-8), and the
  straight-through gradient of ``clamp(W, -1, 1)`` backward (the authors' ``HardBinaryConv``);
* structure: Bi-Real's identity shortcut around *every* binary convolution (each ResNet basic block becomes two
  units ``x + BN(binconv(sign(x)))``), so the real-valued activations before the sign are carried forward; a
  down-sampling shortcut is real-valued average pooling + 1x1 convolution + BN.

The stem convolution and the classifier stay real-valued (as in every binary network). The stage layout is the
CIFAR ResNet's (He et al. 2016; RepDistiller's ``resnet8x4``), so the features match those of the real-valued
network of the same name, ``[stem, layer1, layer2, layer3]``, and every distiller's layer choice fits both.
A binary network is registered student-only: ``models.teacher`` naming it is a config error.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from osslbench.models.base import Net, register_model

__all__ = ["BinaryConv2d", "BiRealResNet", "approx_sign"]


def approx_sign(x: Tensor) -> Tensor:
    """``sign(x)`` (+1 at 0) forward, Bi-Real's ApproxSign gradient ``max(0, 2 - 2|x|)`` backward."""
    inner = torch.where(x < 0, 2 * x + x * x, 2 * x - x * x)  # F(x) on [-1, 1)
    poly = torch.where(x < -1, -torch.ones_like(x), torch.where(x < 1, inner, torch.ones_like(x)))
    hard = torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))
    return hard.detach() - poly.detach() + poly


class BinaryConv2d(nn.Conv2d):
    """3x3 convolution with weights ``mean(|W|) * sign(W)`` per output channel (straight-through gradient of
    ``clamp(W, -1, 1)``); its input is binarised by the caller."""

    def binary_weight(self) -> Tensor:
        w = self.weight
        scale = w.abs().mean(dim=(1, 2, 3), keepdim=True).detach()
        clipped = w.clamp(-1.0, 1.0)
        return (scale * torch.where(w >= 0, 1.0, -1.0)).detach() - clipped.detach() + clipped

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.binary_weight(), None, self.stride, self.padding, self.dilation, self.groups)


class BiRealUnit(nn.Module):
    """``shortcut(x) + BN(binconv3x3(sign(x)))``; the shortcut is the identity, or real-valued average pooling +
    1x1 conv + BN where the resolution or the width changes."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = BinaryConv2d(inplanes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            pool: nn.Module = nn.AvgPool2d(kernel_size=2, stride=stride) if stride != 1 else nn.Identity()
            self.downsample = nn.Sequential(pool, nn.Conv2d(inplanes, planes, kernel_size=1, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        return self.bn(self.conv(approx_sign(x))) + residual


class BiRealResNet(Net):
    """A CIFAR ResNet-depth (filters ``num_filters`` = [stem, stage1, stage2, stage3], (depth-2)/6 basic blocks per
    stage, strides 1, 2, 2) made binary in Bi-Real Net's way: two binary units per basic block.
    Features: [after the stem BN, layer1, layer2, layer3] (real-valued, as Bi-Real's shortcuts carry them)."""

    def __init__(self, depth: int, num_filters: Sequence[int], num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, num_filters[0], kernel_size=3, padding=1, bias=False)  # real-valued stem
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.inplanes = num_filters[0]
        self.layer1 = self._make_layer(num_filters[1], n, stride=1)
        self.layer2 = self._make_layer(num_filters[2], n, stride=2)
        self.layer3 = self._make_layer(num_filters[3], n, stride=2)
        self.fc = nn.Linear(num_filters[3], num_classes)  # real-valued classifier
        self.feature_channels = list(num_filters)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        units = [BiRealUnit(self.inplanes, planes, stride), BiRealUnit(planes, planes)]
        for _ in range(1, blocks):
            units += [BiRealUnit(planes, planes), BiRealUnit(planes, planes)]
        self.inplanes = planes
        return nn.Sequential(*units)

    def forward_features(self, x: Tensor) -> list[Tensor]:
        f0 = self.bn1(self.conv1(x))
        f1 = self.layer1(f0)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        return [f0, f1, f2, f3]

    def forward_preact(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """No ReLU ends any of these maps (Bi-Real's shortcuts carry real values; the sign is taken inside each unit),
        so each map is its own pre-activation."""
        feats = self.forward_features(x)
        return feats, feats


@register_model("resnet8x4-bireal", "ResNet-8x4 with binary weights and activations (Bi-Real Net, Liu et al. 2018), "
                "student only", teacher=False)
def resnet8x4_bireal(num_classes: int, in_channels: int = 3) -> BiRealResNet:
    """The binary counterpart of RepDistiller's ``resnet8x4`` student (filters 32-64-128-256)."""
    return BiRealResNet(8, (32, 64, 128, 256), num_classes, in_channels)
