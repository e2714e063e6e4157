"""Batch augmentation of uint8 image tensors (``N x C x H x W``), vectorised over the batch: the weak view's crop and
flip, normalisation and 90-degree rotations. The strong view's RandAugment lives in :mod:`.randaugment`; which view a
method gets, and in what order the draws happen, is :mod:`.pipeline`'s table.

Every random value is drawn on the CPU from an explicit :class:`torch.Generator` (never the global RNG), so that a run
is reproducible and resumable from the generator's state; the values are then moved to the batch's device, so the
same code runs on a CPU batch or on a GPU batch and gives the same result for the same generator state.

The number of values drawn from the generator by one call depends only on the batch size and the arguments, never on
the pixel values or on earlier draws, so the generator's stream stays aligned across runs.

Sources of the defaults:

* the weak view, :func:`random_crop_flip`: ``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip()`` of RepDistiller
  (Tian et al. 2020, ``dataset/cifar100.py``) and of FixMatch (Sohn et al. 2020); torchvision's ``RandomCrop`` draws
  the crop's top-left corner uniformly in ``[0, 2 * padding]`` of the padded image, ``RandomHorizontalFlip`` flips
  with ``p = 0.5``;
* :func:`rotate90`: the rotation-prediction task of RotNet (Gidaris et al. 2018), as used by T2T.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

__all__ = ["CropFlip", "check_batch", "check_fill", "check_generator", "crop_flip_views", "draw_crop_flip", "normalize",
           "random_crop_flip", "rotate90"]

# ----------------------------------------------------------------------------------------------------------- checks


def check_batch(x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.dtype != torch.uint8 or x.dim() != 4:
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"expected a uint8 N x C x H x W tensor, got {got}")


def check_generator(gen: torch.Generator) -> None:
    if not isinstance(gen, torch.Generator):
        raise TypeError(f"gen must be a torch.Generator, got {type(gen).__name__}")
    if gen.device.type != "cpu":
        raise ValueError(f"gen must be a CPU generator (random values are drawn on the CPU), got one on {gen.device}")


def check_fill(fill: int) -> None:
    if not 0 <= int(fill) <= 255:
        raise ValueError(f"fill must be in [0, 255], got {fill}")


# -------------------------------------------------------------------------------------------------------- weak view


@dataclass(frozen=True)
class CropFlip:
    """A batch's crop + flip draws (:func:`draw_crop_flip`): each crop's top-left corner in the padded image and
    whether it is flipped (CPU tensors)."""

    off_y: Tensor
    off_x: Tensor
    flips: Tensor
    padding: int

    @property
    def ids(self) -> Tensor:
        """Which draw each sample got, ``(row offset * (2 * padding + 1) + column offset) * 2 + flipped`` (int64), in
        ``range(crop_flip_views(padding))``: the labelled-view cache (``osslbench/teacher_view_cache.py``) keys the
        teacher's outputs by it."""
        return (self.off_y * (2 * self.padding + 1) + self.off_x) * 2 + self.flips.long()

    @classmethod
    def from_ids(cls, ids: Tensor, padding: int) -> CropFlip:
        """The draws whose :attr:`ids` are ``ids`` (to rebuild the views a cache entry was computed on)."""
        corner, side = ids.long() // 2, 2 * padding + 1
        return cls(corner // side, corner % side, ids % 2 == 1, padding)


def crop_flip_views(padding: int) -> int:
    """How many distinct crop + flip draws there are per image: ``(2 * padding + 1) ** 2`` corners x 2 flips
    (162 for RepDistiller's ``padding=4``)."""
    return 2 * (2 * padding + 1) ** 2


def draw_crop_flip(n: int, gen: torch.Generator, padding: int = 4, flip: bool = True) -> CropFlip:
    """The ``3 * n`` draws of :func:`random_crop_flip` (row offsets, column offsets, flip coins), in its order."""
    check_generator(gen)
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    off_y = torch.randint(0, 2 * padding + 1, (n,), generator=gen)
    off_x = torch.randint(0, 2 * padding + 1, (n,), generator=gen)
    flips = torch.rand(n, generator=gen) < 0.5
    return CropFlip(off_y, off_x, flips if flip else torch.zeros_like(flips), padding)


def random_crop_flip(
    x: Tensor,
    gen: torch.Generator,
    padding: int = 4,
    flip: bool = True,
    fill: int = 0,
    *,
    padding_mode: Literal["constant", "reflect"] = "constant",
    draws: CropFlip | None = None,
) -> Tensor:
    """Per-sample random crop of the padded image and random horizontal flip (the "weak" view).

    Semantics of torchvision's ``RandomCrop(size=(H, W), padding=padding, fill=fill, padding_mode=padding_mode)``
    followed by ``RandomHorizontalFlip(p=0.5)``: the image is padded by ``padding`` pixels on every side, the crop's
    top-left corner is drawn uniformly in ``{0, ..., 2 * padding}`` along each axis independently, and the crop is
    flipped left-right with probability 0.5, all independently per sample. Defaults: ``padding=4`` and zero fill as in
    RepDistiller's CIFAR-100 ``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip()``. (The FixMatch PyTorch
    reimplementation pads with ``padding_mode="reflect"``; pass it to reproduce that.)

    Vectorised: one gather with per-sample index arithmetic, no loop over the samples and no padded copy.

    Draws ``3 * N`` values from ``gen`` (row offsets, column offsets, flip coins), whatever the arguments, unless
    ``draws`` gives them (:func:`draw_crop_flip`, so that a caller keeps which crop each sample got).

    :param x: uint8 ``N x C x H x W`` (CPU or GPU).
    :param gen: CPU generator the random values come from.
    :param padding: pixels of padding on each side; 0 means no crop. Must be smaller than H and W for ``"reflect"``.
    :param flip: whether to flip horizontally with probability 0.5.
    :param fill: value of the padding pixels for ``padding_mode="constant"``.
    :param padding_mode: ``"constant"`` (torchvision's default) or ``"reflect"`` (edge pixel not repeated).
    :param draws: the draws to apply (from :func:`draw_crop_flip` with the same ``padding``, one per sample).
    :return: uint8 ``N x C x H x W``, a new tensor.
    """
    check_batch(x)
    check_generator(gen)
    check_fill(fill)
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if padding_mode not in ("constant", "reflect"):
        raise ValueError(f"padding_mode must be 'constant' or 'reflect', got {padding_mode!r}")
    n, c, h, w = x.shape
    if padding_mode == "reflect" and padding >= min(h, w):
        raise ValueError(f"reflect padding {padding} needs images larger than it, got {h} x {w}")
    if draws is not None and (draws.padding != padding or len(draws.flips) != n):
        raise ValueError(f"draws for {len(draws.flips)} samples at padding {draws.padding}, not {n} at {padding}")
    d = draws if draws is not None else draw_crop_flip(n, gen, padding, flip)
    off_y, off_x, flips = d.off_y, d.off_x, d.flips
    device = x.device
    ar_h = torch.arange(h, device=device)
    ar_w = torch.arange(w, device=device)
    # Source coordinates in the unpadded image (may fall outside it, in the padding).
    rows = off_y.to(device)[:, None] - padding + ar_h  # N x H
    cols = off_x.to(device)[:, None] - padding + torch.where(flips.to(device)[:, None], w - 1 - ar_w, ar_w)  # N x W
    if padding_mode == "reflect":
        rows = torch.where(rows < 0, -rows, torch.where(rows >= h, 2 * (h - 1) - rows, rows))
        cols = torch.where(cols < 0, -cols, torch.where(cols >= w, 2 * (w - 1) - cols, cols))
        inside = None
    else:
        inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]  # N x H x W
        rows, cols = rows.clamp(0, h - 1), cols.clamp(0, w - 1)
    index = (rows[:, :, None] * w + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
    out = x.reshape(n, c, h * w).gather(2, index).view(n, c, h, w)
    if inside is not None and padding > 0:
        out = out.masked_fill_(~inside[:, None], fill)
    return out



# ------------------------------------------------------------------------------------------------ normalise, rotate


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``(x / 255 - mean) / std`` per channel, as ``ToTensor()`` + ``Normalize(mean, std)`` of torchvision.

    :param x: uint8 ``N x C x H x W``; its memory format (e.g. channels-last) is kept.
    :param mean: C per-channel means (of images scaled to [0, 1]).
    :param std: C per-channel standard deviations.
    :return: float32 ``N x C x H x W`` on ``x``'s device.
    """
    check_batch(x)
    c = x.shape[1]
    if len(mean) != c or len(std) != c:
        raise ValueError(f"mean and std need {c} values, got {len(mean)} and {len(std)}")
    if any(s <= 0 for s in std):
        raise ValueError(f"std must be positive, got {list(std)}")
    mean_t = torch.tensor(list(mean), dtype=torch.float32, device=x.device).view(1, c, 1, 1)
    std_t = torch.tensor(list(std), dtype=torch.float32, device=x.device).view(1, c, 1, 1)
    return x.to(torch.float32).div_(255.0).sub_(mean_t).div_(std_t)


def rotate90(x: Tensor, k: Tensor) -> Tensor:
    """Rotate sample ``i`` by ``k[i] * 90`` degrees counter-clockwise (RotNet's / T2T's rotation-prediction task).

    Same as ``torch.rot90(x[i], k[i], dims=(-2, -1))`` per sample; ``k`` is taken modulo 4.

    :param x: ``N x C x H x W`` with ``H == W`` (any dtype).
    :param k: integer tensor of length N (any device).
    :return: ``N x C x H x W``, a new tensor.
    """
    if x.dim() != 4 or x.shape[2] != x.shape[3]:
        raise ValueError(f"rotate90 needs square N x C x H x W images, got {tuple(x.shape)}")
    if k.shape != (x.shape[0],) or k.is_floating_point():
        raise ValueError(f"k must be an integer tensor of shape ({x.shape[0]},), got {k.dtype} {tuple(k.shape)}")
    turns = k.to(x.device).remainder(4).view(-1, 1, 1, 1)
    out = x.clone()
    for r in (1, 2, 3):
        out = torch.where(turns == r, torch.rot90(x, r, dims=(2, 3)), out)
    return out

