"""SP: Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019, as RepDistiller runs it
(``distiller_zoo/SP.py``, "verified by original author") and the SRD authors in the open set
(``jingyang2017/SRD_ossl``, ``helper/loops.py``, ``train_ssldistill``):

    G = row_normalise( F F^T ),  F = the batch's maps flattened (b x chw)
    L_SP = || G_t - G_s ||_F^2 / b^2                                      [all images: b = labelled + unlabelled]

The b x b similarities span the whole batch, so labelled and unlabelled images are compared with each other.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor
from torch.nn import functional as F

from osslbench.distill import FeatureDistillConfig, FeatureDistiller


@dataclass
class SPConfig(FeatureDistillConfig):
    """SP's settings (RepDistiller ``train_student.py`` / SRD authors ``runs/run_kd_ssl.sh``: ``--distill
    similarity -a 0 -b 3000``).

    :param beta: weight of the similarity loss (3000).
    :param layers: layers compared, into RepDistiller's feature list (``"-2"``: the last map, ``[feat_s[-2]]`` in
        ``helper/loops.py``).
    """

    beta: float = 3000.0
    layers: str = "-2"


def similarity(f: Tensor) -> Tensor:
    """The row-normalised b x b Gram matrix of the flattened maps."""
    flat = f.float().flatten(1)
    return F.normalize(flat @ flat.t())


class SP(FeatureDistiller):
    name = "sp"
    description = "SP (Tung & Mori 2019): match the batch's pairwise similarity matrices of the last map"
    Config = SPConfig
    layers_key = "layers"
    cfg: SPConfig

    def distill(self, feat_s: list[Tensor], feat_t: list[Tensor]) -> Tensor:
        b = feat_s[0].shape[0]
        return sum((similarity(f_t) - similarity(f_s)).pow(2).sum() / (b * b)
                   for f_s, f_t in self.paired_maps(feat_s, feat_t, match=False))
