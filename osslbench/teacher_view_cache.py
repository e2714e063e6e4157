"""The labelled-view cache: a frozen teacher's outputs on every labelled crop + flip it has already seen.

A labelled image's weak view (RepDistiller's ``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip()``, the view
of SRD, KD and every distiller) is one of ``V = (2 * padding + 1) ** 2 x 2`` arrays, 162 at ``padding = 4``. The
frozen, eval-mode teacher's outputs on it are therefore fixed values, which the conventional loop (the authors'
``helper/loops.py``) recomputes every time the image is drawn: 240 times per image in the paper's 240 epochs.
Building all 162 views up front would cost 162 forwards per image for 240 uses; this cache is filled as the run
goes instead: a view's outputs are computed the first time it is drawn (one teacher pass over the batch's unseen
views) and served from memory after. Each draw is uniform over the ``V`` views, so over a run that draws every
image ``D`` times the expected share served from the cache is ``1 - (V / D) (1 - exp(-D / V))``
(:func:`mean_hit_rate`): 48% of the labelled teacher pass at the paper's full scale (``D = 240``), none at the
mini scale (``D = 5``), where it stays off.

It changes no number: the unseen views go through the teacher in a batch padded to at least ``MIN_BATCH`` rows,
and before it is used, rows computed that way (for several numbers of unseen views) are compared bitwise with the
rows of the live forward pass of the training shape; a device whose per-sample results depend on the batch runs
live and says why (fp32 linear layers on a CPU differ below 8 rows: hence the padding).

Stored: ``"logits"`` and ``"pooled"`` only (a method reading the final map runs live), in the dtype the forward
pass produced, ``N x V`` entries in the run's device memory, untouched until first written, and never on disk (a
resumed run refills it). SRD at full scale: 50,000 images x 162 views x 128 values x 2 bytes (bf16) = 2.1 GB. A
run whose cache would exceed a quarter of the device's memory runs live and says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .data.augment import crop_flip_views
from .memory import device_bytes
from .models.base import Net
from .teacher_cache import bitwise_diff, teacher_outputs

if TYPE_CHECKING:
    from .method import Batch
    from .trainer import Trainer

#: unseen views go through the teacher in batches of at least this many rows (see the module docstring)
MIN_BATCH = 16
#: the outputs this cache may hold (a vector per image)
STORABLE = ("logits", "pooled")


def mean_hit_rate(draws_per_image: float, views: int) -> float:
    """Expected share of a run's labelled teacher outputs served from the cache when every image is drawn
    ``draws_per_image`` times, each draw uniform over ``views`` crops + flips (a view is computed at its first draw)."""
    if draws_per_image <= 0:
        return 0.0
    return 1.0 - views / draws_per_image * (1.0 - math.exp(-draws_per_image / views))


class LabelledViewCache:
    """The teacher's ``names`` outputs on view ``v`` of labelled image ``i`` at row ``i * views + v``, filled
    as views are first drawn; counts what it served (``hits``) of what it was asked (``lookups``)."""

    def __init__(self, teacher: Net, names: tuple[str, ...], images: int, views: int,
                 memory_format: torch.memory_format = torch.contiguous_format) -> None:
        self.teacher, self.names, self.images, self.views = teacher, names, images, views
        self.memory_format = memory_format  # the run's: a batch in another format may take other kernels
        self.store: dict[str, Tensor] = {}
        self.filled = torch.zeros(images * views, dtype=torch.bool)
        self.lookups = self.hits = 0

    def compute(self, x: Tensor) -> dict[str, Tensor]:
        """The teacher's outputs on ``x``, passed in a batch padded to :data:`MIN_BATCH` rows (call under no_grad
        and the run's precision)."""
        n = len(x)
        if n < MIN_BATCH:
            x = torch.cat([x, x[:1].expand(MIN_BATCH - n, *x.shape[1:])])
        x = x.contiguous(memory_format=self.memory_format)
        return {k: v[:n] for k, v in teacher_outputs(self.teacher, x, self.names).items()}

    def serve(self, x: Tensor, idx: Tensor, views: Tensor) -> dict[str, Tensor]:
        """The outputs on labelled images ``idx`` seen as views ``views`` (the batch ``x``): stored rows where the
        view was seen before, the others computed now (and stored)."""
        rows = idx.long().cpu() * self.views + views.long().cpu()
        unseen = (~self.filled[rows]).nonzero().squeeze(1)
        self.lookups += len(rows)
        self.hits += len(rows) - len(unseen)
        if len(unseen):
            fresh = self.compute(x[unseen.to(x.device)])
            if not self.store:  # allocated at the first write, in the forward pass's dtype (pages untouched till then)
                self.store = {k: torch.empty(self.images * self.views, *v.shape[1:], dtype=v.dtype, device=v.device)
                              for k, v in fresh.items()}
            where = rows[unseen].to(x.device)
            for k, v in fresh.items():
                self.store[k][where] = v
            self.filled[rows[unseen]] = True
        served = rows.to(x.device)
        return {k: self.store[k][served] for k in self.names}

    def counts(self) -> dict[str, float]:
        """What it served so far, for ``result.json``."""
        rate = self.hits / self.lookups if self.lookups else 0.0
        return {"lookups": self.lookups, "hits": self.hits, "hit_rate": round(rate, 4)}


def labelled_cache_applies(trainer: Trainer, force: bool = False) -> str:
    """Empty when the labelled-view cache can serve ``trainer``'s run, else why not. Unless ``force`` (``osslbench
    bench``), it is used where the run draws at least as many labelled views as there are (a mean hit rate of 37% or
    more, :func:`mean_hit_rate`)."""
    t, m = trainer, trainer.method
    if not t.s.train.teacher_cache:
        return "off (train.teacher_cache = false)"
    if m._teacher.module is None or not m.teacher_outputs:
        return "n/a (the method reads no teacher outputs through teacher_on)"
    if m.labelled_views[0] != "weak":
        return "n/a (the method's first labelled view is not 'weak')"
    if not set(m.teacher_outputs) <= set(STORABLE):
        return f"n/a (it stores only {' and '.join(STORABLE)}, the method reads {', '.join(m.teacher_outputs)})"
    if t.pipeline.unlabelled and t.teacher_cache is None:
        return "n/a (the unlabelled rows go through the teacher live, in the same pass)"
    views = crop_flip_views(t.data.crop_padding)
    draws, distinct = t.epochs * t.iters * t.s.train.batch_size, len(t.data.labelled_x) * views
    if not force and draws < distinct:
        return f"off (the run draws {draws} labelled views of {distinct}: few would be drawn twice)"
    return ""


def attach_labelled_cache(trainer: Trainer, force: bool = False) -> tuple[LabelledViewCache | None, dict]:
    """The labelled-view cache of ``trainer``'s run where it applies and its rows are bitwise the live forward
    pass's (None: the labelled rows run live), and its record for ``result.json`` (``kernels.teacher_cache_labelled``)."""
    why = labelled_cache_applies(trainer, force)
    if why:
        return None, {"used": False, "why": why}
    t, d, tc = trainer, trainer.data, trainer.s.train
    names, views = tuple(t.method.teacher_outputs), crop_flip_views(d.crop_padding)
    cache = LabelledViewCache(t.method.teacher, names, len(d.labelled_x), views, t.memory_format)
    # the live pass's shape (no cache at all): the labelled batch + the unlabelled batch
    n_lb, n_ulb = min(tc.batch_size, len(d.labelled_x)), min(t.pipeline.unlabelled, len(d.unlabelled_x))
    x = t.prepare(torch.cat([d.labelled_x[:n_lb], d.unlabelled_x[:n_ulb]]))
    with torch.no_grad(), t.autocast():
        live = teacher_outputs(t.method.teacher, x, names)
        rows = {n: cache.compute(x[torch.arange(n, device=x.device)]) for n in sorted({1, n_lb // 2 + 1, n_lb})}
    found = [bitwise_diff(out, {k: v[:n] for k, v in live.items()}) for n, out in rows.items()]
    diffs = [x for x in found if x is not None]
    entry = sum(v[0].numel() * v.element_size() for v in live.values())
    need, budget = len(d.labelled_x) * views * entry, device_bytes(t.device) // 4
    record = {"used": False, "outputs": list(names), "views": views, "MiB": round(need / 2**20, 1)}
    if diffs:
        return None, {**record, "why": f"off (rows of a smaller batch differ from the live pass by up to {max(diffs):.3g})"}
    if budget and need > budget:
        return None, {**record, "why": f"off ({need / 2**30:.1f} GiB would exceed a quarter of the device's memory)"}
    return cache, {**record, "used": True}


def prefill(cache: LabelledViewCache, batches: Iterable[Batch], share: float, gen: torch.Generator,
            autocast: Callable[[], object]) -> int:
    """Store the outputs of a random ``share`` of the labelled views drawn by ``batches`` (a run's next batches): the
    cache as a run has it when that share of its draws is served (``osslbench bench`` times a whole run's mean);
    the number of views stored. Its counts start from zero after."""
    stored = 0
    with torch.no_grad():
        for b in batches:
            pick = (torch.rand(len(b.idx_lb), generator=gen) < share).nonzero().squeeze(1)
            if len(pick) and b.views_lb is not None:
                with autocast():  # type: ignore[attr-defined]
                    cache.serve(b.x_lb[pick.to(b.x_lb.device)], b.idx_lb[pick], b.views_lb[pick])
                stored += len(pick)
    cache.lookups = cache.hits = 0
    return stored
