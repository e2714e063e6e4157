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
live and says why (fp32 linear layers on a CPU differ below 8 rows: hence the padding). Logits derived from stored
pooled vectors over a labelled batch (below) are compared the same way.

Served: ``"logits"`` and ``"pooled"`` (a method reading the final map runs live). Stored: the pooled vector only,
in the dtype the forward pass produced, ``N x V`` entries in the run's device memory, untouched until first written;
logits are served as ``teacher.classifier(pooled)`` over the labelled batch, the very operation the forward pass
ends with (``Net.head``), so methods reading logits (KD, DKD, DIST), the pooled vector (SRD) or both (CRD, PKT, RKD,
CC) share one store. SRD or KD at full scale: 50,000 images x 162 views x 128 values x 2 bytes (bf16) = 2.1 GB. A
run whose cache would exceed a quarter of the device's memory runs live and says so, except that a method reading
logits only then stores its logits where they fit (a wide teacher in fp32: resnet32x4's 256-value vectors take
8.3 GB, its logits 3.2 GB), in a store of its own.

Shared between runs through shards on disk (``<out>/<protocol>/<scale>/teacher-cache/labelled-<key>/*.pt``): the
key holds everything the bits depend on (teacher weights, the labelled pixels, the crop's padding, flip and fill
mode, normalisation, precision, memory format, device, threads, torch), so the runs of a grid that share a teacher
serve each other's views: every seed with the paper's one pretrained teacher, and every method of a seed that reads
logits or the pooled vector (the protocol's default grid runs KD, then SRD, on the same draws). A run writes the
views it computed as a new shard (atomically, under a unique name, so concurrent runs never clash) whenever they
reach :data:`SHARD_SHARE` of all views and when it ends, and reads every shard of its key when it starts: a resumed
run gets back what it had computed, the same seed's next method finds every view it draws, and the next seed finds
``1 - exp(-D / V)`` = 77% of the views stored (88% of its draws served, 97% for the third run;
:func:`mean_hit_rate`). Loaded rows are checked bitwise against a fresh teacher pass before use (all are dropped if
any differs); a shard that cannot be read is skipped. Disk: up to the in-memory size per key (full scale, fp32:
4.1 GB).
"""

from __future__ import annotations

import math
import sys
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .data.augment import CropFlip, crop_flip_views, random_crop_flip
from .errors import HostError
from .fsio import atomic_write
from .memory import device_bytes
from .models.base import Net
from .teacher_cache import STORED, bitwise_diff, cache_key, derive, kernel_context, teacher_outputs

if TYPE_CHECKING:
    from .method import Batch
    from .trainer import Trainer

#: unseen views go through the teacher in batches of at least this many rows (see the module docstring)
MIN_BATCH = 16
#: the outputs this cache may serve (a vector per image)
STORABLE = ("logits", "pooled")
#: a run writes a shard when the views it computed since the last one reach this share of all views (and at its end)
SHARD_SHARE = 0.05


def mean_hit_rate(draws_per_image: float, views: int, prior_draws: float = 0.0) -> float:
    """Expected share of a run's labelled teacher outputs served from the cache when every image is drawn
    ``draws_per_image`` times, each draw uniform over ``views`` crops + flips (a view is computed at its first draw),
    after ``prior_draws`` draws per image by earlier runs that share the cache (their shards)."""
    if draws_per_image <= 0:
        return 0.0
    return 1.0 - math.exp(-prior_draws / views) * views / draws_per_image * (1.0 - math.exp(-draws_per_image / views))


class LabelledViewCache:
    """The teacher's pooled vector on view ``v`` of labelled image ``i`` at row ``i * views + v``, filled as views
    are first drawn, served as the ``names`` outputs; counts what it served (``hits``) of what it was asked
    (``lookups``)."""

    def __init__(self, teacher: Net, names: tuple[str, ...], images: int, views: int,
                 memory_format: torch.memory_format = torch.contiguous_format, folder: Path | None = None,
                 stored: str = STORED) -> None:
        if not set(names) <= set(STORABLE) or not (stored == STORED or tuple(names) == (stored,)):
            raise ValueError(f"the labelled-view cache serves logits and/or pooled from stored pooled vectors, or one "
                             f"output from itself; not {', '.join(names)} from {stored}")
        self.teacher, self.names, self.images, self.views, self.stored = teacher, names, images, views, stored
        self.memory_format = memory_format  # the run's: a batch in another format may take other kernels
        self.folder = folder  # the shards of its key (None: this process only)
        self.store: dict[str, Tensor] = {}
        self.filled = torch.zeros(images * views, dtype=torch.bool)
        self.fresh = torch.zeros(images * views, dtype=torch.bool)  # computed here and not yet in a shard
        self.lookups = self.hits = 0

    def compute(self, x: Tensor) -> dict[str, Tensor]:
        """What it stores of the teacher's outputs on ``x`` (``{self.stored: ...}``), passed in a batch padded to
        :data:`MIN_BATCH` rows (call under no_grad and the run's precision)."""
        n = len(x)
        if n < MIN_BATCH:
            x = torch.cat([x, x[:1].expand(MIN_BATCH - n, *x.shape[1:])])
        x = x.contiguous(memory_format=self.memory_format)
        return {self.stored: teacher_outputs(self.teacher, x, (self.stored,))[self.stored][:n]}

    def outputs(self, stored: Tensor) -> dict[str, Tensor]:
        """The ``names`` outputs of a batch from its stored rows (call under no_grad and the run's precision)."""
        return derive(self.teacher, {self.stored: stored}, self.names)

    def serve(self, x: Tensor, idx: Tensor, views: Tensor) -> dict[str, Tensor]:
        """The outputs on labelled images ``idx`` seen as views ``views`` (the batch ``x``): stored rows where the
        view was seen before, the others computed now (and stored)."""
        rows = idx.long().cpu() * self.views + views.long().cpu()
        unseen = (~self.filled[rows]).nonzero().squeeze(1)
        self.lookups += len(rows)
        self.hits += len(rows) - len(unseen)
        if len(unseen):
            self.put(rows[unseen], self.compute(x[unseen.to(x.device)]))
            self.fresh[rows[unseen]] = True
        return self.outputs(self.store[self.stored][rows.to(x.device)])

    def put(self, rows: Tensor, out: dict[str, Tensor]) -> None:
        """Store ``out[self.stored]`` (its rows in the order of ``rows``) at ``rows``."""
        k = self.stored
        if not self.store:  # allocated at the first write, in the forward pass's dtype (pages untouched till then)
            device = next(self.teacher.parameters()).device
            self.store = {k: torch.empty(self.images * self.views, *out[k].shape[1:], dtype=out[k].dtype, device=device)}
        store = self.store[k]
        store[rows.to(store.device)] = out[k].to(store.device)
        self.filled[rows] = True

    def load(self) -> int:
        """Fill from the shards of its key (earlier and concurrent runs'); the number of views they held. A shard
        that cannot be read, or whose rows or shapes do not fit, is skipped (its views are computed again)."""
        if self.folder is None or not self.folder.is_dir():
            return 0
        before = int(self.filled.sum())
        for path in sorted(self.folder.glob("*.pt")):
            try:
                shard = torch.load(path, mmap=True, weights_only=True)
                rows, out = shard["rows"], {self.stored: shard[self.stored]}
                fits = rows.dtype == torch.int64 and rows.dim() == 1 and all(len(v) == len(rows) for v in out.values())
                fits = fits and (not len(rows) or 0 <= int(rows.min()) <= int(rows.max()) < len(self.filled))
                fits = fits and all(self.store[k].shape[1:] == v.shape[1:] and self.store[k].dtype == v.dtype
                                    for k, v in out.items() if self.store)
            except Exception:  # a damaged shard holds nothing that cannot be recomputed
                continue
            if fits:
                self.put(rows, out)
        return int(self.filled.sum()) - before

    def forget(self) -> None:
        """Drop every stored view."""
        self.store, self.filled, self.fresh = {}, torch.zeros_like(self.filled), torch.zeros_like(self.fresh)

    def save(self, min_share: float = 0.0) -> int:
        """Write the views computed here since the last shard as a new shard, if they reach ``min_share`` of all
        views; the number written. A failed write (disk full) keeps them for the next call and warns."""
        rows = self.fresh.nonzero().squeeze(1)
        if self.folder is None or not len(rows) or len(rows) < min_share * len(self.fresh):
            return 0
        shard = {"rows": rows, **{k: v[rows.to(v.device)].cpu() for k, v in self.store.items()}}
        try:
            atomic_write(self.folder / f"{uuid.uuid4().hex}.pt", lambda p: torch.save(shard, p))
        except HostError as exc:
            print(f"osslbench: warning: labelled-view cache not shared: {exc}", file=sys.stderr)
            return 0
        self.fresh[rows] = False
        return len(rows)

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
    view = {"padding": d.crop_padding, "flip": d.flip, "mode": t.method.padding_mode, "min_batch": MIN_BATCH}
    # the live pass's shape (no cache at all): the labelled batch + the unlabelled batch
    n_lb, n_ulb = min(tc.batch_size, len(d.labelled_x)), min(t.pipeline.unlabelled, len(d.unlabelled_x))
    x = t.prepare(torch.cat([d.labelled_x[:n_lb], d.unlabelled_x[:n_ulb]]))
    with torch.no_grad(), t.autocast():
        live = teacher_outputs(t.method.teacher, x, tuple(dict.fromkeys((*names, STORED))))
    need = {k: len(d.labelled_x) * views * v[0].numel() * v.element_size() for k, v in live.items()}
    budget = device_bytes(t.device) // 4
    stored = "logits" if names == ("logits",) and budget and need[STORED] > budget >= need["logits"] else STORED
    key = cache_key(t.method.teacher, d.labelled_x, [stored], {**kernel_context(t), **view})
    folder = t.cache_dir / f"labelled-{key}" if t.cache_dir is not None else None
    cache = LabelledViewCache(t.method.teacher, names, len(d.labelled_x), views, t.memory_format, folder, stored)
    with torch.no_grad(), t.autocast():
        rows = {n: cache.compute(x[torch.arange(n, device=x.device)]) for n in sorted({1, n_lb // 2 + 1, n_lb})}
        served = cache.outputs(rows[n_lb][stored])  # a labelled batch as served (logits derived over the batch)
    small = [x for x in (bitwise_diff(out, {stored: live[stored][:n]}) for n, out in rows.items()) if x is not None]
    derived = bitwise_diff(served, {k: live[k][:n_lb] for k in names})
    record = {"used": False, "outputs": list(names), "stored": stored, "views": views,
              "MiB": round(need[stored] / 2**20, 1)}
    if small:
        return None, {**record, "why": f"off (rows of a smaller batch differ from the live pass by up to {max(small):.3g})"}
    if derived is not None:
        return None, {**record, "why": f"off (outputs served from stored vectors differ from the live pass by up to "
                                       f"{derived:.3g})"}
    if budget and need[stored] > budget:
        return None, {**record, "why": f"off ({need[stored] / 2**30:.1f} GiB would exceed a quarter of the device's "
                                       "memory)"}
    record.update(used=True, key=key, views_loaded=cache.load())
    if record["views_loaded"]:
        diff = check_loaded(cache, trainer, n_lb)
        if diff is not None:
            cache.forget()
            record.update(views_loaded=0, shards=f"dropped (a stored view differs from the teacher's by up to {diff:.3g})")
    return cache, record


def check_loaded(cache: LabelledViewCache, trainer: Trainer, n: int) -> float | None:
    """Compare ``n`` stored views, spread over all stored, with the teacher's outputs on them computed now: None when
    bitwise equal, else the largest difference."""
    d = trainer.data
    stored = cache.filled.nonzero().squeeze(1)
    rows = stored[torch.linspace(0, len(stored) - 1, min(n, len(stored))).long()]
    draws = CropFlip.from_ids(rows % cache.views, d.crop_padding)
    x = random_crop_flip(d.labelled_x[rows // cache.views], torch.Generator(), d.crop_padding, d.flip,
                         padding_mode=trainer.method.padding_mode, draws=draws)
    with torch.no_grad(), trainer.autocast():
        fresh = cache.compute(trainer.prepare(x))
    return bitwise_diff({k: v[rows.to(v.device)] for k, v in cache.store.items()}, fresh)


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
