"""FixMatch's RandAugment + Cutout (the "strong" view), vectorised over the batch; see :func:`rand_augment`.

Source: ``RandAugmentMC(n=2, m=10)`` of the FixMatch PyTorch reimplementation (kekmodel/FixMatch-pytorch,
``dataset/randaugment.py``, ``fixmatch_augment_pool``), which follows Table 12 of the FixMatch paper (Sohn et al.
2020), followed by its ``CutoutAbs(img, 16)`` (16 = 0.5 * 32). Random values come from an explicit CPU generator and
their number depends only on the batch size and the arguments (see :mod:`.augment`).
"""

from __future__ import annotations

import functools
import math

import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor

from .augment import check_batch, check_fill, check_generator

__all__ = ["MAX_MAGNITUDE", "OPS", "apply_op", "rand_augment"]

#: The FixMatch RandAugment op set, in the order of ``fixmatch_augment_pool()`` (kekmodel/FixMatch-pytorch).
OPS: tuple[str, ...] = (
    "AutoContrast",
    "Brightness",
    "Color",
    "Contrast",
    "Equalize",
    "Identity",
    "Posterize",
    "Rotate",
    "Sharpness",
    "ShearX",
    "ShearY",
    "Solarize",
    "TranslateX",
    "TranslateY",
)
#: ``PARAMETER_MAX`` of the FixMatch reimplementation: an op's parameter is ``magnitude / MAX_MAGNITUDE`` of its max.
MAX_MAGNITUDE = 10
_OP_ID = {name: i for i, name in enumerate(OPS)}
_IDENTITY = _OP_ID["Identity"]
_GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")
_GEOMETRIC_IDS = torch.tensor([_OP_ID[name] for name in _GEOMETRIC])
_COLOUR = tuple(name for name in OPS if name not in _GEOMETRIC and name != "Identity")
# (max_v, bias) of fixmatch_augment_pool(): parameter = magnitude * max_v / 10 + bias.
_ENHANCE_MAX, _ENHANCE_BIAS = 0.9, 0.05
_ROTATE_MAX = 30
_SHEAR_MAX = 0.3
_TRANSLATE_MAX = 0.3
_POSTERIZE_MAX, _POSTERIZE_BIAS = 4, 4
_SOLARIZE_MAX = 256


# ------------------------------------------------------------------------------------------------------ strong view


def _enhance_factor(magnitude: Tensor) -> Tensor:
    """``_float_parameter(v, 0.9) + 0.05`` of the FixMatch reimplementation, in float64."""
    return magnitude.double() * _ENHANCE_MAX / MAX_MAGNITUDE + _ENHANCE_BIAS


def _blend(image: Tensor, degenerate: Tensor, factor: Tensor) -> Tensor:
    """PIL's ``Image.blend(degenerate, image, factor)`` with a per-sample factor: ``trunc(d + f * (x - d))``.

    This is how ``PIL.ImageEnhance`` applies every enhancement (``ImagingBlend`` truncates the float result to uint8);
    torchvision's ``_blend`` uses the algebraically equal ``x * f + d * (1 - f)``, which can differ by one grey level.
    """
    f = factor.to(device=image.device, dtype=torch.float32).view(-1, 1, 1, 1)
    d = degenerate.to(torch.float32)
    return (image.to(torch.float32) - d).mul_(f).add_(d).clamp_(0, 255).to(torch.uint8)


def _pil_grey(x: Tensor) -> Tensor:
    """PIL's ``convert("L")``: ``(19595 R + 38470 G + 7471 B + 2**15) >> 16`` (int32 ``N x 1 x H x W``).

    torchvision's grey level (``floor(0.2989 R + 0.587 G + 0.114 B)``) is often one level lower; PIL's is used so that
    Color and Contrast equal the source's ``PIL.ImageEnhance`` exactly.
    """
    if x.shape[1] == 1:
        return x.to(torch.int32)
    w = x.to(torch.int32)
    return (w[:, 0:1] * 19595 + w[:, 1:2] * 38470 + w[:, 2:3] * 7471 + 0x8000) >> 16


def _colour_op(name: str, x: Tensor, magnitude: Tensor) -> Tensor:
    """One pixel-wise or histogram op applied to every sample of ``x`` with per-sample (CPU) magnitudes."""
    device = x.device
    if name == "AutoContrast":
        return TF.autocontrast(x)
    if name == "Equalize":
        return TF.equalize(x)
    if name == "Posterize":
        bits = (magnitude.double() * _POSTERIZE_MAX / MAX_MAGNITUDE).long() + _POSTERIZE_BIAS  # int(v * 4 / 10) + 4
        mask = ((0xFF << (8 - bits)) & 0xFF).to(device=device, dtype=torch.uint8).view(-1, 1, 1, 1)
        return x & mask
    if name == "Solarize":
        # 256 - int(v * 256 / 10)
        threshold = _SOLARIZE_MAX - (magnitude.double() * _SOLARIZE_MAX / MAX_MAGNITUDE).long()
        threshold = threshold.to(device).view(-1, 1, 1, 1)
        return torch.where(x >= threshold, 255 - x, x)
    factor = _enhance_factor(magnitude)
    if name == "Brightness":
        return _blend(x, torch.zeros((), device=device), factor)
    if name == "Color":
        if x.shape[1] == 1:  # PIL's Color enhancer of an "L" image is the identity (so is torchvision's)
            return x.clone()
        return _blend(x, _pil_grey(x), factor)
    if name == "Contrast":
        grey = _pil_grey(x).to(torch.float64)
        return _blend(x, grey.mean(dim=(-3, -2, -1), keepdim=True).add_(0.5).floor_(), factor)
    if name == "Sharpness":
        # adjust_sharpness(x, 0) is PIL's degenerate: the SMOOTH-filtered image, border pixels left as they are.
        return _blend(x, TF.adjust_sharpness(x, 0.0), factor)
    raise AssertionError(f"not a colour op: {name}")  # pragma: no cover


@functools.lru_cache(maxsize=64)
def _rotation_table(height: int, width: int) -> Tensor:
    """PIL ``Image.rotate(angle)``'s inverse matrices for the integer angles ``-30 .. 30`` (``61 x 2 x 3`` float64).

    Built with Python floats exactly as Pillow builds them (``angle % 360``, cos / sin rounded to 15 decimals, centre
    ``(w / 2, h / 2)``), so that the fixed-point coefficients of :func:`_warp` equal PIL's.
    """
    table = []
    for degrees in range(-_ROTATE_MAX, _ROTATE_MAX + 1):
        phi = -math.radians(degrees % 360.0)
        a, b, d, e = (round(math.cos(phi), 15), round(math.sin(phi), 15), round(-math.sin(phi), 15), round(math.cos(phi), 15))
        cx, cy = width / 2, height / 2
        c = a * -cx + b * -cy + 0.0 + cx
        f = d * -cx + e * -cy + 0.0 + cy
        table.append([[a, b, c], [d, e, f]])
    return torch.tensor(table, dtype=torch.float64)


def _geometric_matrices(op: Tensor, magnitude: Tensor, sign: Tensor, height: int, width: int) -> Tensor:
    """Per-sample ``N x 2 x 3`` float64 maps from output pixel to input pixel, the ``data`` of PIL's
    ``Image.transform(size, AFFINE, data)`` that the source calls (or that ``Image.rotate`` builds).

    Coordinates are PIL's: continuous, origin at the top-left corner of the image, pixel ``i`` covering ``[i, i+1)``.
    """
    n = op.shape[0]
    m = magnitude.double()
    s = sign.double()
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    shear = s * (m * _SHEAR_MAX / MAX_MAGNITUDE)
    is_x = op == _OP_ID["ShearX"]
    theta[is_x, 0, 1] = shear[is_x]  # (1, v, 0, 0, 1, 0)
    is_y = op == _OP_ID["ShearY"]
    theta[is_y, 1, 0] = shear[is_y]  # (1, 0, 0, v, 1, 0)
    frac = s * (m * _TRANSLATE_MAX / MAX_MAGNITUDE)
    is_tx = op == _OP_ID["TranslateX"]
    theta[is_tx, 0, 2] = torch.trunc(frac[is_tx] * width)  # (1, 0, int(v * w), 0, 1, 0)
    is_ty = op == _OP_ID["TranslateY"]
    theta[is_ty, 1, 2] = torch.trunc(frac[is_ty] * height)  # (1, 0, 0, 0, 1, int(v * h))
    is_rot = op == _OP_ID["Rotate"]
    degrees = sign[is_rot] * (magnitude[is_rot] * _ROTATE_MAX // MAX_MAGNITUDE)  # int(v * 30 / 10)
    theta[is_rot] = _rotation_table(height, width)[degrees + _ROTATE_MAX]
    return theta


def _warp(x: Tensor, theta_pixels: Tensor, fill: int) -> Tensor:
    """One batched nearest-neighbour affine warp, PIL's ``Image.transform(AFFINE, resample=NEAREST)`` pixel for pixel.

    PIL's NEAREST affine transform works in 16.16 fixed point (``affine_fixed`` in Pillow's ``Geometry.c``): with
    ``FIX(v) = floor(v * 65536 + 0.5)``, output pixel ``(x, y)`` reads input pixel
    ``((FIX(c + a/2 + b/2) + y FIX(b) + x FIX(a)) >> 16, (FIX(f + d/2 + e/2) + y FIX(e) + x FIX(d)) >> 16)`` for
    ``theta = (a, b, c; d, e, f)``, or gets ``fill`` if that is outside the image. This is computed for the whole
    batch with per-sample coefficients and one ``gather``; a bilinear or float ``grid_sample`` would differ from the
    source on the pixels whose centres map to (or within float error of) a pixel edge.
    """
    n, c, h, w = x.shape
    device = x.device

    def fix(v: Tensor) -> Tensor:
        return torch.floor(v * 65536.0 + 0.5).long().to(device).view(n, 1, 1)

    a, b, cc = theta_pixels[:, 0, 0], theta_pixels[:, 0, 1], theta_pixels[:, 0, 2]
    d, e, f = theta_pixels[:, 1, 0], theta_pixels[:, 1, 1], theta_pixels[:, 1, 2]
    ys = torch.arange(h, device=device).view(1, h, 1)
    xs = torch.arange(w, device=device).view(1, 1, w)
    x_in = (fix(cc + a * 0.5 + b * 0.5) + ys * fix(b) + xs * fix(a)) >> 16  # N x H x W
    y_in = (fix(f + d * 0.5 + e * 0.5) + ys * fix(e) + xs * fix(d)) >> 16
    inside = (x_in >= 0) & (x_in < w) & (y_in >= 0) & (y_in < h)
    index = (y_in.clamp(0, h - 1) * w + x_in.clamp(0, w - 1)).view(n, 1, h * w).expand(n, c, h * w)
    out = x.reshape(n, c, h * w).gather(2, index).view(n, c, h, w)
    return out.masked_fill_(~inside[:, None], fill)


def _apply_plan(x: Tensor, op: Tensor, magnitude: Tensor, sign: Tensor, fill: int) -> Tensor:
    """Apply op ``op[i]`` with ``magnitude[i]`` and ``sign[i]`` to sample ``i`` (plan tensors on the CPU).

    All geometric ops of the batch are one warp of the samples that picked one; each other op runs once on the
    samples that picked it. ``x`` is modified in place and returned.
    """
    device = x.device
    geometric = torch.isin(op, _GEOMETRIC_IDS)
    idx = geometric.nonzero().squeeze(1)
    if idx.numel():
        theta = _geometric_matrices(op[idx], magnitude[idx], sign[idx], x.shape[2], x.shape[3])
        idx_dev = idx.to(device)
        x.index_copy_(0, idx_dev, _warp(x.index_select(0, idx_dev), theta, fill))
    for name in _COLOUR:
        idx = (op == _OP_ID[name]).nonzero().squeeze(1)
        if idx.numel():
            idx_dev = idx.to(device)
            x.index_copy_(0, idx_dev, _colour_op(name, x.index_select(0, idx_dev), magnitude[idx]))
    return x


def apply_op(x: Tensor, op_name: str, magnitude: int | Tensor, sign: int | Tensor = 1, fill: int = 128) -> Tensor:
    """Apply one RandAugment op to every sample of ``x`` (forced: no coin flip); the op code of :func:`rand_augment`.

    :param x: uint8 ``N x C x H x W``.
    :param op_name: one of :data:`OPS`; see :func:`rand_augment` for what each does at a given magnitude.
    :param magnitude: in ``[0, 10]``; an int for all samples or a length-``N`` integer tensor.
    :param sign: ``+1`` or ``-1`` (used by Rotate, ShearX/Y, TranslateX/Y only); an int or a length-``N`` tensor.
    :param fill: value of the pixels that geometric ops bring in from outside the image.
    :return: uint8 ``N x C x H x W``, a new tensor.
    """
    check_batch(x)
    check_fill(fill)
    if op_name not in _OP_ID:
        raise ValueError(f"unknown op {op_name!r}; expected one of {', '.join(OPS)}")
    if x.shape[1] not in (1, 3):
        raise ValueError(f"apply_op needs 1 or 3 channels, got {x.shape[1]}")
    n = x.shape[0]
    mags = torch.as_tensor(magnitude, dtype=torch.int64).cpu().expand(n).clone()
    signs = torch.as_tensor(sign, dtype=torch.int64).cpu().expand(n).clone()
    if bool(((mags < 0) | (mags > MAX_MAGNITUDE)).any()):
        raise ValueError(f"magnitude must be in [0, {MAX_MAGNITUDE}], got {magnitude}")
    if not bool((signs.abs() == 1).all()):
        raise ValueError(f"sign must be +1 or -1, got {sign}")
    ops = torch.full((n,), _OP_ID[op_name], dtype=torch.int64)
    return _apply_plan(x.clone(), ops, mags, signs, fill)


def _draw_plan(n: int, num_ops: int, gen: torch.Generator) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Per op slot, per sample: (op id, Identity where the 0.5 coin said no; magnitude in 1..10; sign +-1).

    Draws ``4 * N`` values per slot: op (uniform over :data:`OPS`, i.e. ``random.choices``), magnitude, apply coin,
    sign coin (the sign coin is drawn for every op and used by the signed ones only).
    """
    plan = []
    for _ in range(num_ops):
        op = torch.randint(len(OPS), (n,), generator=gen)
        magnitude = torch.randint(1, MAX_MAGNITUDE + 1, (n,), generator=gen)
        applied = torch.rand(n, generator=gen) < 0.5
        sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1, 1)
        plan.append((torch.where(applied, op, _IDENTITY), magnitude, sign))
    return plan


def _cutout(x: Tensor, gen: torch.Generator, side: int, fill: int) -> Tensor:
    """FixMatch's ``CutoutAbs(img, side)`` per sample (in place): draws ``2 * N`` values from ``gen``.

    Centre ``(cx, cy)`` uniform in ``[0, W) x [0, H)``; ``x0 = int(max(0, cx - side / 2))``,
    ``x1 = min(W, x0 + side)`` (same for y); the rows ``y0 <= r < y1`` and columns ``x0 <= c < x1`` get ``fill``.
    """
    n, _, h, w = x.shape
    cx = torch.rand(n, generator=gen, dtype=torch.float64) * w
    cy = torch.rand(n, generator=gen, dtype=torch.float64) * h
    if side <= 0:
        return x
    x0 = (cx - side / 2.0).clamp(min=0).long()
    y0 = (cy - side / 2.0).clamp(min=0).long()
    x1 = (x0 + side).clamp(max=w)
    y1 = (y0 + side).clamp(max=h)
    ar_h, ar_w = torch.arange(h), torch.arange(w)
    rows = (ar_h >= y0[:, None]) & (ar_h < y1[:, None])  # N x H
    cols = (ar_w >= x0[:, None]) & (ar_w < x1[:, None])  # N x W
    mask = (rows[:, :, None] & cols[:, None, :]).to(x.device)
    return x.masked_fill_(mask[:, None], fill)


def rand_augment(x: Tensor, gen: torch.Generator, num_ops: int = 2, cutout: float = 0.5, fill: int = 128) -> Tensor:
    """FixMatch's RandAugment + Cutout (the "strong" view), independently per sample, vectorised over the batch.

    Source: ``RandAugmentMC(n=2, m=10)`` of the FixMatch PyTorch reimplementation (kekmodel/FixMatch-pytorch,
    ``dataset/randaugment.py``), whose op set and ranges are those of Table 12 of the FixMatch paper (Sohn et al.
    2020). For each sample and each of the ``num_ops`` slots: an op is drawn uniformly from :data:`OPS` (with
    replacement, as ``random.choices``), a magnitude ``m`` uniformly from ``{1, ..., 10}``, and the op is applied with
    probability 0.5. Then Cutout. Parameters at magnitude ``m`` (``m / 10`` of the maximum; ``int()`` truncates;
    ``+-``: a random sign, drawn per sample):

    ============  =====================================================  =========================================
    op            parameter at magnitude ``m``                           range for ``m`` in 1..10
    ============  =====================================================  =========================================
    AutoContrast  none (per-channel min/max stretched to 0..255)
    Brightness    factor ``0.9 * m / 10 + 0.05``, blend with black       0.14 .. 0.95
    Color         factor as Brightness, blend with the grey image        0.14 .. 0.95 (identity for 1 channel)
    Contrast      factor as Brightness, blend with the mean grey level   0.14 .. 0.95
    Equalize      none (per-channel histogram equalisation, as PIL)
    Identity      none
    Posterize     keep the top ``int(4 * m / 10) + 4`` bits              4 .. 8 bits
    Rotate        ``+-int(30 * m / 10)`` degrees about the centre        +-3 .. +-30 degrees
    Sharpness     factor as Brightness, blend with the SMOOTH-filtered   0.14 .. 0.95
    ShearX/Y      ``+-0.3 * m / 10`` about the top-left corner (PIL)     +-0.03 .. +-0.3
    Solarize      invert pixels ``>= 256 - int(256 * m / 10)``           thresholds 231 .. 0
    TranslateX/Y  ``+-int(0.3 * m / 10 * W)`` (``H``) pixels             +-0 .. +-9 px at 32 px
    ============  =====================================================  =========================================

    Notes on the choices:

    * the enhancement factors are those of the source and of the paper's range ``[0.05, 0.95]``: they only ever
      weaken brightness / colour / contrast / sharpness (a factor above 1 is never used);
    * Posterize follows the source, ``bits = int(4 * m / 10) + 4``: a larger magnitude keeps more bits (m = 10 keeps
      all 8, the identity);
    * the source draws ``m`` with ``np.random.randint(1, 10)``, i.e. ``{1, ..., 9}``; here ``m`` is uniform in
      ``{1, ..., 10}`` as the harness specifies (10 is the top of every range of the paper's Table 12);
    * geometric ops reproduce PIL's ``Image.transform`` / ``Image.rotate`` with NEAREST resampling (the source's
      calls) pixel for pixel, including PIL's 16.16 fixed-point coordinates; shears are about the top-left corner
      (as in the source), rotations about the centre; the pixels brought in from outside get ``fill``, where PIL
      (and hence the source) fills with black;
    * colour enhancements are those of ``PIL.ImageEnhance`` (blend ``trunc(d + f * (x - d))``, PIL's grey level,
      Contrast's degenerate = the rounded mean grey level, Sharpness's = torchvision's ``adjust_sharpness(x, 0)``, the
      SMOOTH filter with the border left as is), and equal PIL's output; AutoContrast and Equalize are torchvision's
      batched ``autocontrast`` / ``equalize`` run on the samples that picked them (Equalize equals PIL's;
      AutoContrast can differ from PIL's by one grey level, float rounding);
    * Cutout is the source's ``CutoutAbs``: centre uniform in the image, ``x0 = int(max(0, cx - s / 2))``,
      ``x1 = min(W, x0 + s)`` (likewise y), so a square of side ``s = int(cutout * min(H, W))`` (16 at 32 px) that is
      cut only by the right and bottom borders; the source's PIL ``rectangle`` includes its end pixel (17 px); here
      the side is exactly ``s``. The source fills with grey 127; ``fill`` defaults to 128.

    Vectorised: per slot, one batched warp (a gather with per-sample affine maps) of all the samples that picked a
    geometric op, and each other op once on the samples that picked it; random values are drawn on the CPU from
    ``gen`` (``4 * N`` per slot, ``2 * N`` for Cutout, always) and moved to ``x``'s device.

    :param x: uint8 ``N x C x H x W`` (C = 1 or 3), CPU or GPU.
    :param gen: CPU generator the random values come from.
    :param num_ops: ops per sample (FixMatch: 2).
    :param cutout: side of the Cutout square as a fraction of ``min(H, W)`` (FixMatch: 16 / 32 = 0.5); 0 disables it.
    :param fill: grey value of Cutout and of the border brought in by geometric ops.
    :return: uint8 ``N x C x H x W``, a new tensor.
    """
    check_batch(x)
    check_generator(gen)
    check_fill(fill)
    if num_ops < 0:
        raise ValueError(f"num_ops must be >= 0, got {num_ops}")
    if not 0.0 <= cutout <= 1.0:
        raise ValueError(f"cutout must be in [0, 1], got {cutout}")
    if x.shape[1] not in (1, 3):
        raise ValueError(f"rand_augment needs 1 or 3 channels, got {x.shape[1]}")
    out = x.clone()
    for op, magnitude, sign in _draw_plan(x.shape[0], num_ops, gen):
        out = _apply_plan(out, op, magnitude, sign, fill)
    return _cutout(out, gen, int(cutout * min(x.shape[2], x.shape[3])), fill)
