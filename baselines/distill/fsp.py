"""FSP: Yim, Joo, Bae & Kim, "A Gift from Knowledge Distillation: Fast Optimization, Network Minimization and
Transfer Learning", CVPR 2017, as RepDistiller runs it (``distiller_zoo/FSP.py``, ``helper/pretrain.py``) and the
SRD authors in the open set (``jingyang2017/SRD_ossl``). The "flow of solution procedure" between two consecutive
chosen maps (the larger average-pooled to the smaller's size) is their channel Gram matrix over positions:

    G(f^a, f^b)_{c, c'} = mean_{positions} f^b_c f^a_c'                       (one per image: b x C_b x C_a)
    L_FSP = sum over consecutive pairs (a, b) of  mean ( G_s(a, b) - G_t(a, b) )^2

Two stages, as the authors run it: the init stage (``init``, 30 epochs of the labelled loader, lr = the
optimiser's) trains the student's feature layers on ``L_FSP`` alone (weight 1); the distillation stage
(``train_ssldistill``) has ``loss_kd = 0`` for FSP, so with the scripts' ``-a 0 -b 50`` it is the cross-entropy
on the labelled images (the unlabelled images only reach the student's BatchNorm statistics). ``beta`` weights
``L_FSP`` on all images in that stage: 0 is the authors' run (their ``-b 50`` multiplies a term set to 0).

FSP compares student and teacher matrices entry by entry, so the chosen maps must have equal widths (the
authors' ``FSP`` raises otherwise: no WRN-40-2 -> WRN-40-1 run exists). With ``project`` (default) a 1x1
convolution per chosen map, trained with the student, first maps a student map to the teacher's width where
they differ (an adaptation, so that FSP runs on every pair); ``project = false`` makes different widths a
config error.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn
from torch.nn import functional as F

from osslbench.distill import FeatureDistiller, InitStageConfig
from osslbench.errors import ConfigError
from osslbench.feature_maps import Shape


@dataclass
class FSPConfig(InitStageConfig):
    """FSP's settings (RepDistiller ``train_student.py`` / SRD authors ``runs/run_kd_ssl.sh``: ``--distill fsp -a 0
    -b 50``, ``--init_epochs 30``; the maps ``feat[:-1]``).

    :param beta: weight of ``L_FSP`` in the distillation stage (0: the authors' loop sets FSP's term to 0 there).
    :param layers: the maps whose consecutive pairs give FSP matrices, into RepDistiller's feature list
        (``":-1"``: every map, stem included).
    :param project: 1x1 projections of student maps whose width differs from the teacher's (see above).
    :param init_epochs: init stage as a fraction of the protocol's epochs (0.125: 30 of 240).
    :param init_lr: 0: the optimiser's lr (``pretrain.py``: ``opt.learning_rate`` for FSP).
    """

    beta: float = 0.0
    layers: str = ":-1"
    project: bool = True


def fsp_matrices(maps: list[Tensor]) -> list[Tensor]:
    """The FSP matrix of each consecutive pair of ``maps``."""
    out = []
    for bot, top in zip(maps, maps[1:], strict=False):
        if bot.shape[2] > top.shape[2]:
            bot = F.adaptive_avg_pool2d(bot, top.shape[2:])
        elif bot.shape[2] < top.shape[2]:
            top = F.adaptive_avg_pool2d(top, bot.shape[2:])
        out.append(top.float().flatten(2) @ bot.float().flatten(2).transpose(1, 2) / bot[0, 0].numel())
    return out


class FSP(FeatureDistiller):
    name = "fsp"
    description = "FSP (Yim et al. 2017): match flow (Gram) matrices between stages in an init stage, then CE"
    Config = FSPConfig
    layers_key = "layers"
    cfg: FSPConfig

    @classmethod
    def check_shapes(cls, cfg: FSPConfig, s_shapes: list[Shape], t_shapes: list[Shape]) -> None:
        pairs = cls.chosen_pairs(cfg, s_shapes, t_shapes)
        if len(pairs) < 2:
            raise ConfigError(f"{cls.key('layers')} = {cfg.layers!r} pairs {len(pairs)} map(s); FSP needs at least 2")
        widths = [(s_shapes[i][0], t_shapes[j][0]) for i, j in pairs]
        if not cfg.project and any(s != t for s, t in widths):
            raise ConfigError(f"{cls.key('project')} = false: FSP needs equal student / teacher widths at every chosen "
                              f"map, got {widths}; set {cls.key('project')}=true to add 1x1 projections")

    def build(self, s_shapes: list[Shape], t_shapes: list[Shape]) -> None:
        self.projections = nn.ModuleList(
            nn.Identity() if s_shapes[i][0] == t_shapes[j][0] else nn.Conv2d(s_shapes[i][0], t_shapes[j][0], 1, bias=False)
            for i, j in self.layer_pairs)

    def distill(self, feat_s: list[Tensor], feat_t: list[Tensor]) -> Tensor:
        pairs = list(self.paired_maps(feat_s, feat_t, match=False))
        g_s = fsp_matrices([p(f_s) for p, (f_s, _) in zip(self.projections, pairs, strict=True)])
        g_t = fsp_matrices([f_t for _, f_t in pairs])
        return sum((s - t).pow(2).mean() for s, t in zip(g_s, g_t, strict=True))
