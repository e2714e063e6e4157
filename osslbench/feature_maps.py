"""RepDistiller's feature list and the pieces several feature distillers share.

The list (``train_student.py``, ``helper/loops.py``: ``model(x, is_feat=True)``) is the network's stage maps,
shallow to deep, followed by the pooled final vector; a distiller picks its layers by Python index into it
(:func:`pick`), e.g. ``"-2"`` the last map, ``"1:-1"`` the stage outputs. The shared pieces are RepDistiller's:
spatial matching of two maps, AT's attention map, and the ``ConvReg`` connector.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .errors import ConfigError
from .models.base import Net

Shape = tuple[int, ...]


def parse_layers(spec: str, key: str) -> slice | list[int]:
    """A layer choice: a Python slice ``"1:-1"`` or indices ``"-2"`` / ``"1,2,3"`` into RepDistiller's list."""
    text = spec.replace(" ", "")
    try:
        if ":" in text:
            parts = text.split(":")
            if len(parts) != 2:
                raise ValueError
            start, stop = (int(p) if p else None for p in parts)
            return slice(start, stop)
        return [int(p) for p in text.split(",")]
    except ValueError:
        raise ConfigError(f"{key} = {spec!r}: expected indices like '-2' or '1,2' or a slice like '1:-1' into "
                          "RepDistiller's feature list") from None


def pick(spec: str, n: int, key: str, net: str) -> list[int]:
    """Positions (0..n-1) that ``spec`` selects in a list of ``n`` entries; an index out of range is an error."""
    sel = parse_layers(spec, key)
    if isinstance(sel, slice):
        return list(range(n))[sel]
    for i in sel:
        if not -n <= i < n:
            raise ConfigError(f"{key} = {spec!r}: index {i} is out of range for the {net}, whose feature list "
                              f"has {n} entries ({n - 1} maps + the pooled vector)")
    return [i % n for i in sel]


def first_conv(net: nn.Module) -> nn.Conv2d:
    return next(m for m in net.modules() if isinstance(m, nn.Conv2d))


def probe(net: Net, image_size: int, preact: bool = False) -> list[Shape]:
    """Shapes (without batch) of RepDistiller's feature list of ``net`` on ``image_size`` inputs: maps ``(C, H, W)``
    then the pooled vector ``(C,)``. Two zero images in eval mode: no BatchNorm statistic and no random draw."""
    was = net.training
    net.eval()
    with torch.no_grad():
        x = torch.zeros(2, first_conv(net).in_channels, image_size, image_size,
                        device=next(net.parameters()).device)
        feats = repdistiller_feats(net, x, preact)[1]
    net.train(was)
    return [tuple(f.shape[1:]) for f in feats]


def repdistiller_feats(net: Net, x: Tensor, preact: bool = False) -> tuple[Tensor, list[Tensor]]:
    """``(logits, feats)`` with ``feats`` RepDistiller's ``is_feat`` list: the stage maps (pre-activations with
    ``preact``, RepDistiller's ``preact=True``) then the pooled final vector; one forward pass."""
    if preact:
        post, maps = net.forward_preact(x)
    else:
        post = maps = net.forward_features(x)
    pooled = net.pool(post[-1])
    return net.classifier(pooled), [*maps[:len(maps) - net.head_maps], pooled]


def match_spatial(f_s: Tensor, f_t: Tensor) -> tuple[Tensor, Tensor]:
    """Average-pool the larger of two maps to the other's size (RepDistiller's AT, VID, FT, NST)."""
    if f_s.shape[2:] == f_t.shape[2:]:
        return f_s, f_t
    if f_s.shape[2] > f_t.shape[2]:
        return nn.functional.adaptive_avg_pool2d(f_s, f_t.shape[2:]), f_t
    return f_s, nn.functional.adaptive_avg_pool2d(f_t, f_s.shape[2:])


def attention_map(f: Tensor, p: float) -> Tensor:
    """``vec(mean_c f_c^p)``, L2-normalised per image: AT's spatial attention map (Zagoruyko & Komodakis 2017) and,
    with ``p = 2``, FT's factor (``FactorTransfer.factor``, Kim et al. 2018)."""
    return nn.functional.normalize(f.float().pow(p).mean(1).flatten(1))


def regressor_fits(s: Shape, t: Shape) -> bool:
    """RepDistiller's ``ConvReg`` maps a student map of side ``s_H`` to the teacher's ``t_H`` when ``s_H = 2 t_H``
    (stride-2 conv), ``2 s_H = t_H`` (transposed conv) or ``s_H >= t_H`` (valid conv); square maps."""
    return s[1] == 2 * t[1] or 2 * s[1] == t[1] or s[1] >= t[1]


class ConvRegressor(nn.Module):
    """RepDistiller's ``ConvReg`` (``models/util.py``): a convolution from the student's map shape ``(C, H, W)``
    to the teacher's, then BatchNorm and (FitNet's hint regressor) ReLU; AB's connector has no ReLU."""

    def __init__(self, s: Shape, t: Shape, relu: bool = True) -> None:
        super().__init__()
        (s_c, s_h, s_w), (t_c, t_h, t_w) = s, t
        if s_h == 2 * t_h:
            self.conv: nn.Module = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
        elif s_h * 2 == t_h:
            self.conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
        elif s_h >= t_h:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
        else:
            raise ValueError(f"no regressor from a {s_h}x{s_w} map to a {t_h}x{t_w} map")
        self.bn = nn.BatchNorm2d(t_c)
        self.relu = relu

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn(self.conv(x))
        return nn.functional.relu(out) if self.relu else out
