"""VID: Ahn, Hu, Damianou, Lawrence & Dai, "Variational Information Distillation for Knowledge Transfer", CVPR
2019, as RepDistiller runs it (``distiller_zoo/VID.py``, from the authors' code) and the SRD authors in the open
set (``jingyang2017/SRD_ossl``, ``helper/loops.py``, ``train_ssldistill``): for each layer pair, the negative
log-likelihood of the teacher's map under a Gaussian whose mean a small network predicts from the student's map
and whose per-channel variance is learned:

    mu = r(f_s)   (1x1 conv - ReLU - 1x1 conv - ReLU - 1x1 conv),   sigma_c^2 = softplus(alpha_c) + eps
    L_VID = sum over layer pairs of  mean_{i, c, positions} 1/2 ( (mu - f_t)^2 / sigma_c^2 + log sigma_c^2 )   [all]

The larger map of a pair is average-pooled to the smaller one's size first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from osslbench.distill import FeatureDistillConfig, FeatureDistiller
from osslbench.feature_maps import Shape


@dataclass
class VIDConfig(FeatureDistillConfig):
    """VID's settings (RepDistiller ``train_student.py`` / SRD authors ``runs/run_kd_ssl.sh``: ``--distill vid -a 0
    -b 1``; ``VIDLoss(s, t, t)``: hidden width = the teacher's channels, ``init_pred_var=5.0``, ``eps=1e-5``).

    :param beta: weight of the VID loss (1).
    :param layers: layers compared, into RepDistiller's feature list (``"1:-1"``: every stage output).
    :param init_var: initial predicted variance (5).
    :param eps: floor of the variance (1e-5).
    """

    beta: float = 1.0
    layers: str = "1:-1"
    init_var: float = 5.0
    eps: float = 1e-5


class VIDRegressor(nn.Module):
    """The mean predictor and the per-channel log-scale of one layer pair."""

    def __init__(self, s_channels: int, t_channels: int, init_var: float, eps: float) -> None:
        super().__init__()
        self.mean = nn.Sequential(nn.Conv2d(s_channels, t_channels, 1, bias=False), nn.ReLU(),
                                  nn.Conv2d(t_channels, t_channels, 1, bias=False), nn.ReLU(),
                                  nn.Conv2d(t_channels, t_channels, 1, bias=False))
        # softplus(log_scale) + eps = init_var at the start
        self.log_scale = nn.Parameter(torch.full((t_channels,), math.log(math.expm1(init_var - eps))))
        self.eps = eps

    def forward(self, f_s: Tensor, f_t: Tensor) -> Tensor:
        """The negative log-likelihood of ``f_t`` given ``f_s`` (maps of the same size), mean over all entries."""
        mu = self.mean(f_s).float()
        var = (F.softplus(self.log_scale.float()) + self.eps).view(1, -1, 1, 1)
        return (0.5 * ((mu - f_t.float()).pow(2) / var + var.log())).mean()


class VID(FeatureDistiller):
    name = "vid"
    description = "VID (Ahn et al. 2019): Gaussian likelihood of the teacher's maps given the student's, every stage"
    Config = VIDConfig
    layers_key = "layers"
    cfg: VIDConfig

    def build(self, s_shapes: list[Shape], t_shapes: list[Shape]) -> None:
        self.regressors = nn.ModuleList(VIDRegressor(s_shapes[i][0], t_shapes[j][0], self.cfg.init_var, self.cfg.eps)
                                        for i, j in self.layer_pairs)

    def distill(self, feat_s: list[Tensor], feat_t: list[Tensor]) -> Tensor:
        return sum(r(f_s, f_t) for r, (f_s, f_t) in zip(self.regressors, self.paired_maps(feat_s, feat_t), strict=True))
