"""Small plain CNNs for tiny inputs (e.g. scikit-learn's 8x8 one-channel digits), any spatial size.

Stacks of conv3x3-BN-ReLU blocks (the VGG recipe of Simonyan & Zisserman 2015 with batch normalisation of
Ioffe & Szegedy 2015) grouped in stages; every stage after the first starts with a stride-2 block, and the
head is global average pooling plus a linear layer, so any input size of at least 1x1 works.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from osslbench.models.base import Net, register_model

__all__ = ["ConvBNReLU", "SmallCNN"]


class ConvBNReLU(nn.Sequential):
    """conv3x3 (no bias) - BatchNorm - ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class SmallCNN(Net):
    """Plain CNN: ``stages[i]`` lists the widths of the conv-BN-ReLU blocks of stage ``i``.

    Features: the output of every stage (each ends in ReLU); the last one is pooled and classified.
    """

    def __init__(self, stages: Sequence[Sequence[int]], num_classes: int, in_channels: int = 1) -> None:
        super().__init__()
        if not stages or any(not s for s in stages):
            raise ValueError("SmallCNN needs at least one non-empty stage")
        built = []
        c_in = in_channels
        for i, widths in enumerate(stages):
            blocks = []
            for j, c_out in enumerate(widths):
                blocks.append(ConvBNReLU(c_in, c_out, stride=2 if (i > 0 and j == 0) else 1))
                c_in = c_out
            built.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*built)
        self.fc = nn.Linear(c_in, num_classes)
        self.feature_channels = [s[-1] for s in stages]

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> list[Tensor]:
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats

    def forward_preact(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Each stage's output before its last ReLU (the BatchNorm output)."""
        feats, pre = [], []
        for stage in self.stages:
            for block in stage[:-1]:
                x = block(x)
            conv, bn, _ = stage[-1]
            p = bn(conv(x))
            x = F.relu(p)
            feats.append(x)
            pre.append(p)
        return feats, pre


@register_model("cnn-small", "small CNN student for tiny inputs (e.g. 8x8 digits): 16 | 32 (stride 2), ~5K params")
def cnn_small(num_classes: int, in_channels: int = 3) -> SmallCNN:
    """Student for tiny inputs: two conv-BN-ReLU blocks of 16 and 32 channels (the second with stride 2)."""
    return SmallCNN([[16], [32]], num_classes, in_channels)


@register_model("cnn-large", "larger CNN teacher for tiny inputs (e.g. 8x8 digits): 32,32 | 64,64 | 128,128, ~0.29M params")
def cnn_large(num_classes: int, in_channels: int = 3) -> SmallCNN:
    """Teacher for tiny inputs: three stages of two conv-BN-ReLU blocks (32, 64, 128 channels), ~55x cnn-small."""
    return SmallCNN([[32, 32], [64, 64], [128, 128]], num_classes, in_channels)
