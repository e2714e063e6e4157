"""NST: Huang & Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer", arXiv 1707.01219,
2017, as RepDistiller runs it (``distiller_zoo/NST.py``) and the SRD authors in the open set
(``jingyang2017/SRD_ossl``, ``helper/loops.py``, ``train_ssldistill``): the squared MMD with the polynomial
kernel ``k(a, b) = (a . b)^2`` between the channels of student and teacher, each channel a distribution over
positions (its map flattened and L2-normalised):

    L_NST = sum over layer pairs of  mean k(t, t') + mean k(s, s') - 2 mean k(s, t)       [all images]

means over the images and the channel pairs (the teacher-teacher term has no gradient). The larger map of a
pair is average-pooled to the smaller one's size first.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor
from torch.nn import functional as F

from osslbench.distill import FeatureDistillConfig, FeatureDistiller


@dataclass
class NSTConfig(FeatureDistillConfig):
    """NST's settings (RepDistiller ``train_student.py`` / SRD authors ``runs/run_kd_ssl.sh``: ``--distill nst -a 0
    -b 50``).

    :param beta: weight of the MMD loss (50).
    :param layers: layers compared, into RepDistiller's feature list (``"1:-1"``: every stage output).
    """

    beta: float = 50.0
    layers: str = "1:-1"


def poly_kernel(a: Tensor, b: Tensor) -> Tensor:
    """``(a_i . b_j)^2`` for every channel pair: a (n, c_a, d), b (n, c_b, d) -> (n, c_b, c_a)."""
    return (b @ a.transpose(1, 2)).pow(2)


def selectivity_mmd(f_s: Tensor, f_t: Tensor) -> Tensor:
    """The squared MMD of one layer pair (maps of the same size); the teacher-teacher term without gradient."""
    s = F.normalize(f_s.float().flatten(2), dim=2)
    t = F.normalize(f_t.float().flatten(2), dim=2)
    return poly_kernel(t, t).mean().detach() + poly_kernel(s, s).mean() - 2 * poly_kernel(s, t).mean()


class NST(FeatureDistiller):
    name = "nst"
    description = "NST (Huang & Wang 2017): polynomial-kernel MMD between the neuron selectivity patterns"
    Config = NSTConfig
    layers_key = "layers"
    cfg: NSTConfig

    def distill(self, feat_s: list[Tensor], feat_t: list[Tensor]) -> Tensor:
        return sum(selectivity_mmd(f_s, f_t) for f_s, f_t in self.paired_maps(feat_s, feat_t))
