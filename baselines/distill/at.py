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

from osslbench.distill import FeatureDistillConfig, FeatureDistiller
from osslbench.feature_maps import attention_map


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


class AT(FeatureDistiller):
    name = "at"
    description = "AT (Zagoruyko & Komodakis 2017): match the normalised spatial attention maps of every stage"
    Config = ATConfig
    layers_key = "layers"
    cfg: ATConfig

    def distill(self, feat_s: list[Tensor], feat_t: list[Tensor]) -> Tensor:
        p = self.cfg.p
        return sum((attention_map(f_s, p) - attention_map(f_t, p)).pow(2).mean() for f_s, f_t in self.paired_maps(feat_s, feat_t))
