"""AB: Heo, Lee, Yun & Choi, "Knowledge Transfer via Distillation of Activation Boundaries Formed by Hidden
Neurons", AAAI 2019, as RepDistiller runs it (``distiller_zoo/AB.py``, from the authors' code; ``models/util.py``,
``Connector``; ``helper/pretrain.py``) and the SRD authors in the open set (``jingyang2017/SRD_ossl``).

On PRE-activation maps (``preact=True``), a connector ``c`` (identity when the shapes agree, else conv + BN)
maps each student stage onto the teacher's; the alternative (hinge-squared) loss pushes each student neuron to
the teacher's side of the activation boundary with margin ``m``:

    l(s, t) = sum over neurons  (s + m)^2 [s > -m and t <= 0]  +  (s - m)^2 [s <= m and t > 0]
    L_AB = sum over stage pairs k of  w_k * l(c(f_s^k), f_t^k) / b * 3 / 1000,    w_k = 2^(k - K + 1)

Two stages, as the authors run it: the init stage (``init``, 30 epochs on the labelled images) trains the
connectors and the student's feature layers on ``L_AB`` alone (weight 1); the distillation stage
(``train_ssldistill``) then has ``loss_kd = 0`` for AB ("can also add loss to this stage"), so with the scripts'
``-a 0 -b 1`` it is the cross-entropy on the labelled images only (the unlabelled images still pass through the
student and shape its BatchNorm statistics). ``beta`` here weights ``L_AB`` on all images in that stage: 0 is
the authors' run; the script's ``-b 1`` multiplies a term their loop sets to 0.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from osslbench.distill import FeatureDistiller, InitStageConfig
from osslbench.feature_maps import ConvRegressor, Shape


@dataclass
class ABConfig(InitStageConfig):
    """AB's settings (RepDistiller ``train_student.py`` / SRD authors ``runs/run_kd_ssl.sh``: ``--distill abound
    -a 0 -b 1``, ``--init_epochs 30``; ``ABLoss(margin=1.0)``).

    :param beta: weight of ``L_AB`` in the distillation stage (0: the authors' loop sets AB's term to 0 there).
    :param layers: layers compared, into RepDistiller's feature list (``"1:-1"``: every stage output).
    :param margin: the activation-boundary margin (1).
    :param init_epochs: init stage as a fraction of the protocol's epochs (0.125: 30 of 240).
    :param init_lr: 0: the optimiser's lr (``pretrain.py``: ``opt.learning_rate`` for AB).
    """

    beta: float = 0.0
    layers: str = "1:-1"
    margin: float = 1.0


def boundary_loss(s: Tensor, t: Tensor, margin: float) -> Tensor:
    """The authors' ``criterion_alternative_l2``: squared hinge towards the teacher's side, summed."""
    s, t = s.float(), t.float()
    return ((s + margin).pow(2) * ((s > -margin) & (t <= 0)) + (s - margin).pow(2) * ((s <= margin) & (t > 0))).sum()


class AB(FeatureDistiller):
    name = "ab"
    description = "AB (Heo et al. 2019): activation-boundary transfer in an init stage, then CE (two stages)"
    Config = ABConfig
    preact = True
    layers_key = "layers"
    regressed = True
    cfg: ABConfig

    def build(self, s_shapes: list[Shape], t_shapes: list[Shape]) -> None:
        self.connectors = nn.ModuleList(
            nn.Identity() if s_shapes[i] == t_shapes[j] else ConvRegressor(s_shapes[i], t_shapes[j], relu=False)
            for i, j in self.layer_pairs)

    def distill(self, feat_s: list[Tensor], feat_t: list[Tensor]) -> Tensor:
        k = len(self.layer_pairs)
        b = feat_s[0].shape[0]
        pairs = zip(self.connectors, self.paired_maps(feat_s, feat_t, match=False), strict=True)
        return sum(2.0 ** (n - k + 1) * boundary_loss(c(f_s), f_t, self.cfg.margin) / b * 3 / 1000
                   for n, (c, (f_s, f_t)) in enumerate(pairs))
