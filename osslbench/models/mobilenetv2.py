"""MobileNetV2 (Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018).

The CIFAR variant of RepDistiller (Tian et al., "Contrastive Representation Distillation", ICLR 2020,
``models/mobilenetv2.py``, there called ``mobile_half``: expansion 6, width 0.5, stride-2 stem, 1280-channel
head), with the same module and parameter names (``conv1.{0,1}``, ``blocks.<s>.<i>.conv.{0..7}``,
``conv2.{0,1}``, ``classifier.0``) so that its checkpoints load unchanged.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from osslbench.models.base import Net, register_model

__all__ = ["InvertedResidual", "MobileNetV2"]


def _conv_bn_relu(inp: int, oup: int, kernel_size: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel_size, stride, kernel_size // 2, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    """Pointwise expansion - depthwise 3x3 - linear pointwise projection, residual when shapes allow."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return x + out if self.use_res_connect else out


class MobileNetV2(Net):
    """MobileNetV2 for 32x32 inputs (final map 2x2). Features: [stem, after stage 1, stage 2, stage 4,
    stage 6, head conv2] — the first five are RepDistiller's f0..f4, the last is the map before pooling."""

    classifier_path = "classifier.0"
    head_maps = 1  # the conv2 head: RepDistiller's feature list ends at f4 (blocks[6])
    # t (expansion), c (channels), n (blocks), s (stride of the first block)
    SETTING = ((1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2), (None, 96, 3, 1),
               (None, 160, 3, 2), (None, 320, 1, 1))  # fmt: skip

    def __init__(self, num_classes: int, in_channels: int = 3, expansion: int = 6, width_mult: float = 0.5) -> None:
        super().__init__()
        c_in = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(in_channels, c_in, 3, 2)
        blocks = []
        for t, c, n, s in self.SETTING:
            c_out = int(c * width_mult)
            layers = []
            for i in range(n):
                layers.append(InvertedResidual(c_in, c_out, s if i == 0 else 1, expansion if t is None else t))
                c_in = c_out
            blocks.append(nn.Sequential(*layers))
        self.blocks = nn.ModuleList(blocks)
        last = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(c_in, last, 1, 1)
        # registered directly: ``Net.classifier`` is the property returning this Sequential's Linear
        self._modules["classifier"] = nn.Sequential(nn.Linear(last, num_classes))  # keys classifier.0.*
        w = [int(c * width_mult) for _, c, _, _ in self.SETTING]
        self.feature_channels = [int(32 * width_mult), w[1], w[2], w[4], w[6], last]

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> list[Tensor]:
        out = self.conv1(x)
        feats = [out]
        for i, block in enumerate(self.blocks):
            out = block(out)
            if i in (1, 2, 4, 6):
                feats.append(out)
        feats.append(self.conv2(out))
        return feats

    def forward_preact(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """The stem and the head before their ReLU; the stages end in a linear bottleneck (no ReLU): their own."""
        conv, bn, _ = self.conv1
        p0 = bn(conv(x))
        out = F.relu(p0)
        feats, pre = [out], [p0]
        for i, block in enumerate(self.blocks):
            out = block(out)
            if i in (1, 2, 4, 6):
                feats.append(out)
                pre.append(out)
        conv, bn, _ = self.conv2
        p5 = bn(conv(out))
        return [*feats, F.relu(p5)], [*pre, p5]


@register_model("MobileNetV2", "MobileNetV2 (Sandler et al. 2018), RepDistiller's CIFAR mobile_half (x0.5), 0.81M params",
                student_defaults={"optim": {"lr": 0.01}})  # RepDistiller train_student.py: lr 0.01 for MobileNetV2
def mobilenetv2(num_classes: int, in_channels: int = 3) -> MobileNetV2:
    """RepDistiller's ``mobile_half``: expansion 6, width multiplier 0.5."""
    return MobileNetV2(num_classes, in_channels, expansion=6, width_mult=0.5)
