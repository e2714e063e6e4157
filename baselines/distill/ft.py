"""FT: Kim, Park & Kwak, "Paraphrasing Complex Network: Network Compression via Factor Transfer", NeurIPS 2018,
as RepDistiller runs it (``distiller_zoo/FT.py``; ``models/util.py``, ``Paraphraser`` and ``Translator``;
``helper/pretrain.py``) and the SRD authors in the open set (``jingyang2017/SRD_ossl``).

A paraphraser (conv encoder / transposed-conv decoder, LeakyReLU 0.1, rate k = 0.5) is first trained to
reconstruct the teacher's last map; its encoder then gives the teacher factor, and a translator (conv + BN
encoder) gives the student factor:

    init stage:         L_rec = MSE( dec(enc(f_t)), f_t )                                   [labelled images]
    distillation stage: L_FT = mean | phi(tr(f_s)) - phi(enc(f_t)) |,  phi(f) = vec(mean_c f_c^2) / ||.||_2   [all]

The init stage (``init``, 30 epochs of the labelled loader) trains the paraphraser alone, at lr 0.01 (the
authors' rule for ResNet / WRN students; MobileNet / ShuffleNet students use their lr, also 0.01). In the
distillation stage the paraphraser is frozen (not in the authors' optimiser) and only the student and the
translator train; the larger factor map of the pair is average-pooled to the other's size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from osslbench.distill import FeatureDistiller, InitStageConfig
from osslbench.feature_maps import Shape, attention_map, match_spatial


@dataclass
class FTConfig(InitStageConfig):
    """FT's settings (RepDistiller ``train_student.py`` / SRD authors ``runs/run_kd_ssl.sh``: ``--distill factor
    -a 0 -b 200``, ``--init_epochs 30``; ``Paraphraser(k=0.5, use_bn=False)``, ``Translator(k=0.5, use_bn=True)``,
    ``FactorTransfer(p1=2, p2=1)``).

    :param beta: weight of the factor loss (200).
    :param layer: the layer paraphrased, into RepDistiller's feature list (-2: the last map, ``feat[-2]``).
    :param rate: paraphrase rate k: factor channels = k x the teacher's channels (0.5).
    :param init_epochs: init stage as a fraction of the protocol's epochs (0.125: 30 of 240).
    :param init_lr: the init stage's lr (0.01, ``pretrain.py``).
    """

    beta: float = 200.0
    layer: int = -2
    rate: float = 0.5
    init_lr: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.rate <= 1:
            raise ValueError("rate must be in (0, 1]")


def conv_stack(channels: list[int], bn: bool, transposed: bool = False) -> nn.Sequential:
    """3x3 (transposed) convolutions with bias, each followed by BN (optional) and LeakyReLU(0.1)."""
    conv = nn.ConvTranspose2d if transposed else nn.Conv2d
    layers: list[nn.Module] = []
    for c_in, c_out in zip(channels, channels[1:], strict=False):
        layers += [conv(c_in, c_out, 3, 1, 1), *([nn.BatchNorm2d(c_out)] if bn else []), nn.LeakyReLU(0.1)]
    return nn.Sequential(*layers)


class FT(FeatureDistiller):
    name = "ft"
    description = "FT (Kim et al. 2018): paraphraser trained on the teacher (init stage), then factor transfer"
    Config = FTConfig
    layers_key = "layer"
    cfg: FTConfig

    def build(self, s_shapes: list[Shape], t_shapes: list[Shape]) -> None:
        [(self.i, self.j)] = self.layer_pairs
        c_s, c_t = s_shapes[self.i][0], t_shapes[self.j][0]
        k = int(c_t * self.cfg.rate)
        self.encoder = conv_stack([c_t, c_t, k, k], bn=False)  # the paraphraser (use_bn=False)
        self.decoder = conv_stack([k, k, c_t, c_t], bn=False, transposed=True)
        self.translator = conv_stack([c_s, c_s, k, k], bn=True)

    def init_loss(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            f_t = self.features(self.teacher, x)[1][self.j].float()
        return F.mse_loss(self.decoder(self.encoder(f_t)).float(), f_t)

    def distill(self, feat_s: list[Tensor], feat_t: list[Tensor]) -> Tensor:
        with torch.no_grad():  # the paraphraser is frozen after the init stage
            factor_t = self.encoder(feat_t[self.j])
        factor_s, factor_t = match_spatial(self.translator(feat_s[self.i]), factor_t)
        # the factor phi: AT's attention map with p = 2 (``FactorTransfer.factor`` with p1 = 2)
        return (attention_map(factor_s, 2) - attention_map(factor_t, 2)).abs().mean()
