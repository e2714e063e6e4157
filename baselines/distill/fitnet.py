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

from osslbench.distill import ConvRegressor, FeatureDistillConfig, FeatureDistiller, Shape, regressor_fits
from osslbench.errors import ConfigError


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
    cfg: FitNetConfig

    @classmethod
    def check_shapes(cls, cfg: FitNetConfig, s_shapes: list[Shape], t_shapes: list[Shape]) -> None:
        [(i, j)] = cls.pairs("hint_layer", str(cfg.hint_layer), s_shapes, t_shapes)
        if not regressor_fits(s_shapes[i], t_shapes[j]):
            raise ConfigError(f"{cls.key('hint_layer')} = {cfg.hint_layer}: the student's map {s_shapes[i]} cannot be "
                              f"regressed onto the teacher's {t_shapes[j]} (needs the same, double or half size, or larger)")

    def build(self, s_shapes: list[Shape], t_shapes: list[Shape]) -> None:
        [(i, j)] = self.pairs("hint_layer", str(self.cfg.hint_layer), s_shapes, t_shapes)
        self.layers = (i, j)
        self.regressor = ConvRegressor(s_shapes[i], t_shapes[j], relu=True)

    def distill(self, feat_s: list[Tensor], feat_t: list[Tensor]) -> Tensor:
        i, j = self.layers
        return F.mse_loss(self.regressor(feat_s[i]).float(), feat_t[j].float())
