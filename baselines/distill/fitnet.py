"""FitNet: Romero, Ballas, Kahou, Chassang, Gatta & Bengio, "FitNets: Hints for Thin Deep Nets", ICLR 2015, as
RepDistiller runs it (``distiller_zoo/FitNet.py``, ``HintLoss``; ``models/util.py``, ``ConvReg``) and the SRD
authors in the open set (``jingyang2017/SRD_ossl``, ``helper/loops.py``, ``train_ssldistill``):

    L_hint = MSE( r(f_s[h]), f_t[h] )      [all images: labelled + unlabelled]

``r`` is the hint regressor (conv + BN + ReLU mapping the student's guided layer onto the teacher's hint layer),
trained with the student; mean over batch, channels and positions. RepDistiller trains both in one stage with
the CE term (the paper's separate hint pre-training stage is not used).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor
from torch.nn import functional as F

from osslbench.distill import FeatureDistillConfig, FeatureDistiller
from osslbench.feature_maps import ConvRegressor, Shape


@dataclass
class FitNetConfig(FeatureDistillConfig):
    """FitNet's settings (RepDistiller ``train_student.py`` / SRD authors ``runs/run_kd_ssl.sh``: ``--distill hint
    -a 0 -b 100``).

    :param beta: weight of the hint loss (100).
    :param hint_layer: index of the hint (teacher) and guided (student) layer in RepDistiller's feature list (2,
        ``--hint_layer 2``: the second stage's output of a WRN / ResNet; the digits protocol sets 1, its small
        student has two maps).
    """

    beta: float = 100.0
    hint_layer: int = 2


class FitNet(FeatureDistiller):
    name = "fitnet"
    description = "FitNet (Romero et al. 2015): MSE between a regressed student layer and the teacher's hint layer"
    Config = FitNetConfig
    layers_key = "hint_layer"
    regressed = True
    cfg: FitNetConfig

    def build(self, s_shapes: list[Shape], t_shapes: list[Shape]) -> None:
        [(i, j)] = self.layer_pairs
        self.regressor = ConvRegressor(s_shapes[i], t_shapes[j], relu=True)

    def distill(self, feat_s: list[Tensor], feat_t: list[Tensor]) -> Tensor:
        [(f_s, f_t)] = self.paired_maps(feat_s, feat_t, match=False)
        return F.mse_loss(self.regressor(f_s).float(), f_t.float())
