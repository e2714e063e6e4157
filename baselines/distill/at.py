"""AT: Zagoruyko & Komodakis, "Paying More Attention to Attention: Improving the Performance of Convolutional
Neural Networks via Attention Transfer", ICLR 2017, as RepDistiller runs it (``distiller_zoo/AT.py``) and the SRD
authors in the open set (``jingyang2017/SRD_ossl``, ``helper/loops.py``, ``train_ssldistill``):

    a(f) = vec( mean_c f_c^p ) / || vec( mean_c f_c^p ) ||_2          (spatial attention map, p = 2)
    L_AT = sum over layer pairs l of  mean_{i, positions} ( a(f_s^l) - a(f_t^l) )^2      [all images]

The larger map of a pair is average-pooled to the smaller one's size first.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor
from torch.nn import functional as F

from osslbench.distill import FeatureDistillConfig, FeatureDistiller, Shape, match_spatial


@dataclass
class ATConfig(FeatureDistillConfig):
    """AT's settings (RepDistiller ``train_student.py`` / SRD authors ``runs/run_kd_ssl.sh``: ``--distill attention
    -a 0 -b 1000``; ``distiller_zoo/AT.py``: ``p = 2``).

    :param beta: weight of the attention loss (1000).
    :param layers: layers compared, into RepDistiller's feature list (``"1:-1"``: every stage output,
        ``feat_s[1:-1]`` in ``helper/loops.py``).
    :param p: power of the attention map (2).
    """

    beta: float = 1000.0
    layers: str = "1:-1"
    p: float = 2.0


def attention(f: Tensor, p: float) -> Tensor:
    """The L2-normalised spatial attention map ``mean_c f_c^p`` of each image, flattened."""
    return F.normalize(f.float().pow(p).mean(1).flatten(1))


class AT(FeatureDistiller):
    name = "at"
    description = "AT (Zagoruyko & Komodakis 2017): match the normalised spatial attention maps of every stage"
    Config = ATConfig
    cfg: ATConfig

    @classmethod
    def check_shapes(cls, cfg: ATConfig, s_shapes: list[Shape], t_shapes: list[Shape]) -> None:
        cls.pairs("layers", cfg.layers, s_shapes, t_shapes)

    def build(self, s_shapes: list[Shape], t_shapes: list[Shape]) -> None:
        self.layer_pairs = self.pairs("layers", self.cfg.layers, s_shapes, t_shapes)

    def distill(self, feat_s: list[Tensor], feat_t: list[Tensor]) -> Tensor:
        loss = feat_s[0].new_zeros((), dtype=feat_s[0].float().dtype)
        for i, j in self.layer_pairs:
            f_s, f_t = match_spatial(feat_s[i], feat_t[j])
            loss = loss + (attention(f_s, self.cfg.p) - attention(f_t, self.cfg.p)).pow(2).mean()
        return loss
