"""The batch pipeline: the one place that turns an epoch of a run into :class:`~osslbench.method.Batch` es.

An epoch's batches are a function of ``(seed, epoch)`` alone: one CPU generator seeded from them draws, in this order,

1. the labelled index stream (concatenated random permutations of the labelled set),
2. the unlabelled index stream (when the method uses unlabelled images),
3. the selected-subset index stream (when the method selects a subset, :meth:`Method.selection`),
4. per step: each labelled view, each unlabelled view, each selected view, in the order the method lists them,

and is then handed to the method as ``Batch.gen`` for its own draws (MixUp's lambda, random classes). So an epoch run
after a restart draws exactly what it would have drawn without the interruption (resume is exact at epoch
boundaries), and two runs sharing a process never touch each other's random state (torch's global generator is never
used). Changing this order changes every committed result: keep it.

Every view kind a method may ask for is in one table, :data:`VIEWS`; the Trainer, the tests and the benchmarks all
read it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from ..method import Batch
from ..teacher_cache import flip_mask
from .augment import check_batch, draw_crop_flip, normalize, random_crop_flip
from .randaugment import rand_augment

if TYPE_CHECKING:
    from ..method import Method
    from .dataset import RunData

__all__ = ["VIEWS", "VIEW_KINDS", "BatchPipeline", "derived_seed", "index_stream", "view", "views"]

View = Callable[[Tensor, torch.Generator, int, bool, str], Tensor]

#: Every view kind: ``kind -> fn(x, gen, padding, flip, mode)`` on a uint8 batch. ``padding`` and ``flip`` are the
#: protocol's ``data.crop_padding`` and ``data.flip``; ``mode`` the method's ``padding_mode`` of the crop
#: (``"constant"``: RepDistiller's zeros; ``"reflect"``: the FixMatch family's).
VIEWS: dict[str, View] = {
    # the image as it is (no augmentation, no copy)
    "plain": lambda x, gen, padding, flip, mode: x,
    # padded random crop + horizontal flip: RandomCrop(32, padding=4) + RandomHorizontalFlip (RepDistiller, FixMatch)
    "weak": lambda x, gen, padding, flip, mode: random_crop_flip(x, gen, padding=padding, flip=flip, padding_mode=mode),
    # flip only: the SRD paper's unlabelled images are resized to 32 and flipped, never cropped
    "flip": lambda x, gen, padding, flip, mode: random_crop_flip(x, gen, padding=0, flip=flip),
    # weak + RandAugment + Cutout: the FixMatch reimplementation's strong transform (RandAugmentMC(n=2, m=10))
    "strong": lambda x, gen, padding, flip, mode: rand_augment(
        random_crop_flip(x, gen, padding=padding, flip=flip, padding_mode=mode), gen),
}


def _weak_ids(x: Tensor, gen: torch.Generator, padding: int, flip: bool, mode: str) -> tuple[Tensor, Tensor]:
    """:data:`VIEWS`' ``"weak"`` view (same draws) and which crop + flip each image got (the labelled-view cache's
    key)."""
    check_batch(x)
    draws = draw_crop_flip(len(x), gen, padding, flip)
    return random_crop_flip(x, gen, padding, flip, padding_mode=mode, draws=draws), draws.ids  # type: ignore[arg-type]


#: The view kinds of :data:`VIEWS`.
VIEW_KINDS: tuple[str, ...] = tuple(VIEWS)


def _check_kinds(kinds: Sequence[str]) -> None:
    unknown = [kind for kind in kinds if kind not in VIEWS]
    if unknown:
        raise ValueError(f"unknown view kind(s) {unknown}; expected among {', '.join(VIEW_KINDS)}")


def view(kind: str, x: Tensor, gen: torch.Generator, padding: int, flip: bool, mode: str = "constant") -> Tensor:
    """One view of a uint8 batch (see :data:`VIEWS`); draws from ``gen`` as the view's function does."""
    _check_kinds([kind])
    return VIEWS[kind](x, gen, padding, flip, mode)


def views(x: Tensor, kinds: Sequence[str], gen: torch.Generator, padding: int, flip: bool,
          mode: str = "constant") -> list[Tensor]:
    """The views ``kinds`` of one uint8 batch, in order (repeats allowed, e.g. ``["weak", "strong", "strong"]``);
    every view draws fresh values from ``gen``, in the order of ``kinds``. Unknown kinds fail before any draw."""
    check_batch(x)
    _check_kinds(kinds)
    return [VIEWS[kind](x, gen, padding, flip, mode) for kind in kinds]


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers (e.g. run seed, epoch, stream id), stable across runs and platforms."""
    return int(np.random.SeedSequence(list(parts)).generate_state(2, np.uint64)[0] >> np.uint64(1))


def index_stream(n: int, per_step: int, steps: int, gen: torch.Generator) -> Tensor:
    """``steps x per_step`` indices into ``range(n)``: concatenated random permutations, cut to length."""
    need = per_step * steps
    perms = [torch.randperm(n, generator=gen) for _ in range(-(-need // n))]
    return torch.cat(perms)[:need].view(steps, per_step)


class BatchPipeline:
    """A run's batches: index streams, views, normalisation, device and memory format.

    :param data: the run's images.
    :param seed: the run's seed (with the epoch, the seed of every draw).
    :param batch_size: labelled images per step.
    :param steps: steps per epoch.
    :param epochs: epochs of the run (carried by every ``Batch``).
    :param unlabelled: unlabelled images per step (0: none).
    :param device: where the batches go.
    :param memory_format: e.g. ``torch.channels_last``.
    :param init_epochs: epochs of the method's initialisation stage at the start of ``epochs`` (``Batch.in_init``).
    """

    def __init__(self, data: RunData, seed: int, batch_size: int, steps: int, epochs: int, unlabelled: int,
                 device: torch.device, memory_format: torch.memory_format = torch.contiguous_format,
                 init_epochs: int = 0) -> None:
        self.data, self.seed, self.batch_size, self.steps, self.epochs = data, seed, batch_size, steps, epochs
        self.unlabelled, self.device, self.memory_format, self.init_epochs = unlabelled, device, memory_format, init_epochs

    def prepare(self, x: Tensor) -> Tensor:
        """uint8 batch -> normalised float on the device in the chosen memory format."""
        x = normalize(x.to(self.device, non_blocking=True), self.data.mean, self.data.std)
        return x.contiguous(memory_format=self.memory_format)

    def _views(self, x: Tensor, kinds: Sequence[str], gen: torch.Generator, mode: str) -> list[Tensor]:
        return [self.prepare(v) for v in views(x, kinds, gen, self.data.crop_padding, self.data.flip, mode)]

    def batches(self, epoch: int, method: Method) -> Iterator[Batch]:
        """The epoch's batches for ``method`` (its ``labelled_views``, ``unlabelled_views``, ``selected_views``,
        ``selection()`` and ``padding_mode``); every random draw comes from ``(seed, epoch)`` in the order of the module
        docstring. A selected subset smaller than one batch forms no batch (the authors' ``drop_last`` loaders), so a
        tiny selection is never drawn hundreds of times per epoch."""
        d, n_ulb, steps, mode = self.data, self.unlabelled, self.steps, method.padding_mode
        gen = torch.Generator().manual_seed(derived_seed(self.seed, epoch, 1))
        lab = index_stream(len(d.labelled_x), self.batch_size, steps, gen)
        ulb = index_stream(len(d.unlabelled_x), n_ulb, steps, gen) if n_ulb else None
        subset = method.selection() if method.selected_views and n_ulb else None
        sel = None
        if subset is not None and len(subset) >= n_ulb:
            sel = subset.cpu()[index_stream(len(subset), n_ulb, steps, gen)]
        first, *extra = method.labelled_views
        for i in range(steps):
            raw_l = d.labelled_x[lab[i]]
            views_lb = None
            if first == "weak":  # which crop + flip each image got: the labelled-view cache serves that entry
                x, views_lb = _weak_ids(raw_l, gen, d.crop_padding, d.flip, mode)
                x = self.prepare(x)
            else:
                x = self._views(raw_l, (first,), gen, mode)[0]
            x_extra = self._views(raw_l, extra, gen, mode)
            idx_u = ulb[i] if ulb is not None else torch.empty(0, dtype=torch.long)
            raw_u = d.unlabelled_x[idx_u] if ulb is not None else None
            v_u = views(raw_u, method.unlabelled_views, gen, d.crop_padding, d.flip, mode) if raw_u is not None else []
            kinds = method.unlabelled_views if v_u else ()
            # which images a "flip" view mirrored: the teacher-output cache (osslbench/teacher_cache.py) serves that entry
            flips_u = [flip_mask(v, raw_u) if k == "flip" else None for k, v in zip(kinds, v_u, strict=True)]
            x_u = [self.prepare(v) for v in v_u]
            idx_s = sel[i] if sel is not None else None
            x_s = self._views(d.unlabelled_x[idx_s], method.selected_views, gen, mode) if sel is not None else []
            yield Batch(x, d.labelled_y[lab[i]].to(self.device), x_u, idx_u, epoch, epoch * steps + i, steps,
                        self.epochs, x_s, idx_s, gen, x_extra, idx_lb=lab[i], init_epochs=self.init_epochs,
                        flips_ulb=flips_u, views_lb=views_lb)

    def pool_map(self, model: torch.nn.Module, fn: Callable[[Tensor], Tensor], batch_size: int,
                 autocast: Callable[[], object]) -> Tensor:
        """``fn`` over the whole unlabelled pool (normalised, unaugmented) in batches of ``batch_size``, with
        ``model`` in eval mode (its mode restored after) and without gradients; for the methods' epoch hooks."""
        was = model.training
        model.eval()
        out = []
        with torch.no_grad():
            for start in range(0, len(self.data.unlabelled_x), batch_size):
                with autocast():  # type: ignore[attr-defined]
                    out.append(fn(self.prepare(self.data.unlabelled_x[start:start + batch_size])).float().cpu())
        model.train(was)
        return torch.cat(out) if out else torch.empty(0)
