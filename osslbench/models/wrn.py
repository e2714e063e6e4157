"""CIFAR Wide Residual Networks (Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016).

Module and parameter names follow RepDistiller (Tian et al., "Contrastive Representation Distillation",
ICLR 2020, ``models/wrn.py``) so that its published teachers (``ckpt_epoch_240.pth``) load unchanged:
``conv1``, ``block{1,2,3}.layer.<i>.{bn1,conv1,bn2,conv2,convShortcut}``, ``bn1``, ``fc``.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from osslbench.models.base import Net, register_model

__all__ = ["BasicBlock", "NetworkBlock", "WideResNet"]


class BasicBlock(nn.Module):
    """Pre-activation wide basic block: BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus identity or 1x1 projection."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)  # only ever applied to a fresh BN output
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes
        if self.equal_in_out and stride != 1:
            raise ValueError("a strided WRN block must change the number of channels")
        self.convShortcut: nn.Conv2d | None = (
            None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self._body(x, self.relu1(self.bn1(x)))

    def forward_bn(self, x: Tensor, bn: Tensor) -> Tensor:
        """The block given ``bn = self.bn1(x)``, computed by a caller that keeps it (a pre-activation feature)."""
        return self._body(x, F.relu(bn))

    def _body(self, x: Tensor, pre: Tensor) -> Tensor:
        if self.convShortcut is None:
            shortcut = x
        else:  # projection shortcut on the pre-activated input (as in the original WRN code)
            shortcut = self.convShortcut(pre)
        out = self.relu2(self.bn2(self.conv1(pre)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return shortcut + self.conv2(out)


class NetworkBlock(nn.Module):
    """A stage of ``n`` wide basic blocks; the first one carries the stride and the channel change."""

    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *[BasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate) for i in range(n)]
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(Net):
    """WRN-depth-k for 32x32 inputs: channels [16, 16k, 32k, 64k], (depth-4)/6 blocks per stage, strides 1,2,2.

    Features: [after conv1, after block1, after block2, relu(bn1(after block3))].
    """

    def __init__(self, depth: int, widen_factor: int, num_classes: int, in_channels: int = 3, drop_rate: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        ch = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, ch[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, ch[0], ch[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, ch[1], ch[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, ch[2], ch[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(ch[3], num_classes)
        self.feature_channels = list(ch)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> list[Tensor]:
        f0 = self.conv1(x)
        f1 = self.block1(f0)
        f2 = self.block2(f1)
        f3 = self.relu(self.bn1(self.block3(f2)))
        return [f0, f1, f2, f3]

    @staticmethod
    def _stage_from_bn(block: NetworkBlock, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(block(x), bn)`` where ``bn`` is the first unit's ``bn1(x)``, the pre-activation of ``x``."""
        first, *rest = block.layer
        bn = first.bn1(x)
        out = first.forward_bn(x, bn)
        for layer in rest:
            out = layer(out)
        return out, bn

    def forward_preact(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Pre-activations as RepDistiller's ``preact=True``: ``block2.layer[0].bn1(f1)``,
        ``block3.layer[0].bn1(f2)``, ``bn1(block3 output)``; the stem's output is its own."""
        f0 = self.conv1(x)
        f1 = self.block1(f0)
        f2, p1 = self._stage_from_bn(self.block2, f1)
        out, p2 = self._stage_from_bn(self.block3, f2)
        p3 = self.bn1(out)
        return [f0, f1, f2, F.relu(p3)], [f0, p1, p2, p3]


@register_model("wrn-40-2", "WRN-40-2 (Zagoruyko & Komodakis 2016), CIFAR-style, 2.2M params")
def wrn_40_2(num_classes: int, in_channels: int = 3) -> WideResNet:
    """WRN-40-2, RepDistiller's usual teacher."""
    return WideResNet(40, 2, num_classes, in_channels)


@register_model("wrn-40-1", "WRN-40-1 (Zagoruyko & Komodakis 2016), CIFAR-style, 0.57M params")
def wrn_40_1(num_classes: int, in_channels: int = 3) -> WideResNet:
    """WRN-40-1."""
    return WideResNet(40, 1, num_classes, in_channels)


@register_model("wrn-16-2", "WRN-16-2 (Zagoruyko & Komodakis 2016), CIFAR-style, 0.70M params")
def wrn_16_2(num_classes: int, in_channels: int = 3) -> WideResNet:
    """WRN-16-2, RepDistiller's usual student of WRN-40-2."""
    return WideResNet(16, 2, num_classes, in_channels)


@register_model("wrn-16-1", "WRN-16-1 (Zagoruyko & Komodakis 2016), CIFAR-style, 0.18M params")
def wrn_16_1(num_classes: int, in_channels: int = 3) -> WideResNet:
    """WRN-16-1."""
    return WideResNet(16, 1, num_classes, in_channels)


@register_model("wrn-28-2", "WRN-28-2 (Zagoruyko & Komodakis 2016), FixMatch's CIFAR backbone, 1.5M params")
def wrn_28_2(num_classes: int, in_channels: int = 3) -> WideResNet:
    """WRN-28-2, the backbone of FixMatch (Sohn et al. 2020) on CIFAR-10 (RepDistiller's block layout)."""
    return WideResNet(28, 2, num_classes, in_channels)


@register_model("wrn-28-8", "WRN-28-8 (Zagoruyko & Komodakis 2016), CIFAR-style, 23.4M params")
def wrn_28_8(num_classes: int, in_channels: int = 3) -> WideResNet:
    """WRN-28-8, FixMatch's CIFAR-100 backbone (RepDistiller's block layout)."""
    return WideResNet(28, 8, num_classes, in_channels)
