"""CC: Peng, Jin, Liu, Li, Wu, Liu, Zhou & Zhang, "Correlation Congruence for Knowledge Distillation", ICCV 2019,
as RepDistiller runs it (``distiller_zoo/CC.py``, the original authors' code restructured; ``models/util.py``,
``LinearEmbed``) and the SRD authors in the open set (``jingyang2017/SRD_ossl``, ``helper/loops.py``):

    e_s = W_s h_s,  e_t = W_t h_t              (linear embeddings of the pooled features, both trained)
    d_i = | e_s,i - e_t,i |
    L_CC = mean_{i = 1..b-1} sum_c d_i,c d_i+1,c        [all images, in batch order: labelled then unlabelled]

(the correlation of consecutive images' embedding gaps, the authors' implementation of the congruence term).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from osslbench.distill import FeatureDistillConfig, FeatureDistiller
from osslbench.feature_maps import Shape


@dataclass
class CCConfig(FeatureDistillConfig):
    """CC's settings (RepDistiller ``train_student.py`` / SRD authors ``runs/run_kd_ssl.sh``: ``--distill
    correlation -a 0 -b 0.02``; ``--feat_dim 128``).

    :param beta: weight of the correlation loss (0.02).
    :param feat_dim: width of the two linear embeddings (128).
    """

    beta: float = 0.02
    feat_dim: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.feat_dim < 1:
            raise ValueError("feat_dim must be >= 1")


def correlation_congruence(e_s: Tensor, e_t: Tensor) -> Tensor:
    delta = (e_s.float() - e_t.float()).abs()
    return (delta[:-1] * delta[1:]).sum(1).mean()


class CC(FeatureDistiller):
    name = "cc"
    description = "CC (Peng et al. 2019): correlation congruence of linear embeddings of the pooled features"
    Config = CCConfig
    teacher_outputs = ("pooled", "logits")  # the pooled vector only: servable from the teacher-output cache
    cfg: CCConfig

    def build(self, s_shapes: list[Shape], t_shapes: list[Shape]) -> None:
        self.embed_s = nn.Linear(s_shapes[-1][0], self.cfg.feat_dim)
        self.embed_t = nn.Linear(t_shapes[-1][0], self.cfg.feat_dim)  # trained too (RepDistiller's trainable_list)

    def distill(self, feat_s: list[Tensor], feat_t: list[Tensor]) -> Tensor:
        return correlation_congruence(self.embed_s(feat_s[-1]), self.embed_t(feat_t[-1]))
