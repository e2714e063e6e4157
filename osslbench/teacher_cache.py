"""The teacher-output cache: a frozen teacher's outputs on both flips of every unlabelled image, computed once.

SRD, KD and every distiller that takes the SRD paper's unlabelled view (``"flip"``: resize to 32 + horizontal
flip, no crop; Yang et al., IJCV 2024, Sec. 4) feed the frozen, eval-mode teacher an unlabelled image that is one
of exactly two arrays: the image or its mirror. The teacher's outputs on them are therefore two fixed values per
image, which the conventional loop (the authors' ``helper/loops.py``) recomputes every epoch (240 times at full
scale). Here they are computed once per pool image and flip, kept in memory or memory-mapped from
``<out>/<protocol>/<scale>/teacher-cache/<key>.pt``, and served instead of the forward pass; the teacher forward
on labelled images (random crops) stays live.

The cache changes no number: the key holds everything the teacher's bits depend on (its weights, the pool's
pixels, normalisation, precision, memory format, device, thread count, torch version), and before it is used
its rows are compared bitwise with the live forward pass on a batch of the training shape; a device whose
kernels give per-sample results that depend on the batch (seen as a mismatch) runs live and says why.

A method declares what it reads from the teacher (``Method.teacher_outputs``): ``"logits"`` (K values per image),
``"pooled"`` (the globally pooled final feature map, C values) or ``"final_map"`` (the whole C x h x w map). What
is stored (:func:`stored_outputs`) is the pooled vector for a method reading logits and/or the pooled vector, its
logits served as ``teacher.classifier(pooled)`` over the batch's rows (:func:`derive`), the operation the forward
pass ends with (``Net.head``): so KD, DKD, DIST (logits), SRD (the pooled vector) and CRD, CC, RKD, PKT (both)
share one file, which the first of them builds while runs that need it at the same time wait for it (a lock
beside the file), then load it (WRN-40-2 on the paper's 100,000-image pool, fp32: 0.5 KiB per image
and flip, 98 MiB); a method reading the final map stores it (32 KiB per image and flip, 6.1 GiB).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .fsio import RunLock, atomic_write
from .models.base import Net
from .models.checkpoint import hash_state, hash_tensor

if TYPE_CHECKING:
    from .trainer import Trainer

#: what a method may ask the teacher-output cache to serve (see the module docstring)
OUTPUTS = ("logits", "pooled", "final_map")
#: what both caches store for methods reading logits and/or the pooled vector: logits are derived (:func:`derive`)
STORED = "pooled"


def teacher_outputs(teacher: Net, x: Tensor, names: Sequence[str]) -> dict[str, Tensor]:
    """The teacher's ``names`` outputs on the normalised batch ``x`` (one forward pass; call under no_grad)."""
    unknown = [n for n in names if n not in OUTPUTS]
    if unknown:
        raise ValueError(f"unknown teacher output {unknown[0]!r} (known: {', '.join(OUTPUTS)})")
    if "pooled" not in names and "final_map" not in names:
        return {"logits": teacher(x)}
    logits, feats = teacher(x, features=True)
    out = {"logits": logits, "pooled": teacher.pool(feats[-1]), "final_map": feats[-1]}
    return {n: out[n] for n in names}


def stored_outputs(names: Sequence[str]) -> tuple[str, ...]:
    """What a cache stores to serve ``names``: the pooled vector where they are logits and/or the pooled vector
    (logits derived by :func:`derive`), else ``names`` themselves."""
    return (STORED,) if set(names) <= {"logits", STORED} else tuple(names)


def derive(teacher: Net, stored: dict[str, Tensor], names: Sequence[str]) -> dict[str, Tensor]:
    """The ``names`` outputs of a batch from its stored rows: logits not stored are ``teacher.classifier`` of the
    pooled vectors, over these rows as the forward pass does (call under no_grad and the run's precision)."""
    out = dict(stored)
    if "logits" in names and "logits" not in out:
        out["logits"] = teacher.classifier(out[STORED])
    return {k: out[k] for k in names}


def flip_mask(view: Tensor, raw: Tensor) -> Tensor:
    """Which images of a ``"flip"`` view are mirrored: the view differs from the stored image (uint8 N x C x H x W).

    Exact for the cache's purpose: an image that equals its own mirror is served the unflipped entry, computed
    from the very same pixels.
    """
    return (view != raw).flatten(1).any(dim=1).cpu()


def cache_key(teacher: Net, pool: Tensor, names: Sequence[str], context: dict[str, object]) -> str:
    """Hash of what the cached bits depend on: teacher weights and buffers, the pool's pixels, the outputs
    stored and ``context`` (normalisation, precision, memory format, device, threads, chunk size, torch)."""
    h = hashlib.sha256()
    hash_state(h, teacher.state_dict())
    hash_tensor(h, pool)
    h.update(repr((tuple(names), sorted(context.items()), torch.__version__)).encode())
    return h.hexdigest()[:16]


def kernel_context(trainer: Trainer) -> dict[str, object]:
    """What a teacher's output bits depend on besides its weights and the images, in ``trainer``'s run: the
    normalisation, precision, device, memory format and thread count (part of both caches' keys)."""
    t = trainer
    probe = t.autocast()
    precision = f"autocast-{probe.fast_dtype}" if isinstance(probe, torch.autocast) else "fp32"
    return {"mean": tuple(t.data.mean), "std": tuple(t.data.std), "precision": precision, "device": t.device.type,
            "memory_format": str(t.memory_format), "threads": torch.get_num_threads()}


@dataclass
class TeacherCache:
    """The teacher's stored outputs (:func:`stored_outputs` of ``names``) on both flips of every pool image:
    ``outputs[name][f, i]`` is image ``i`` mirrored (``f = 1``) or not (``f = 0``), in the dtype the forward pass
    produced; served as ``names``."""

    outputs: dict[str, Tensor]
    key: str
    teacher: Net
    names: tuple[str, ...]
    build_s: float = 0.0
    loaded: bool = False

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.outputs.values())

    def serve(self, idx: Tensor, flipped: Tensor, device: torch.device) -> dict[str, Tensor]:
        """The ``names`` outputs on pool images ``idx`` with flips ``flipped`` (bool), on ``device`` (call under
        no_grad and the run's precision: logits are derived from the stored rows)."""
        f, i = flipped.long().cpu(), idx.long().cpu()
        return derive(self.teacher, {k: v[f, i].to(device, non_blocking=True) for k, v in self.outputs.items()},
                      self.names)


def build_teacher_cache(teacher: Net, pool: Tensor, names: Sequence[str], prepare: Callable[[Tensor], Tensor],
                        autocast: Callable[[], object], chunk: int, key: str,
                        folder: Path | None = None) -> TeacherCache:
    """Compute (or memory-map from ``folder/<key>.pt``) what serves the teacher's ``names`` outputs
    (:func:`stored_outputs`) on both flips of ``pool``.

    :param pool: uint8 ``N x C x H x W`` unlabelled images as stored (the ``"flip"`` view mirrors them).
    :param prepare: uint8 batch -> normalised float on the device (the Trainer's, so the bits are the live ones).
    :param autocast: the Trainer's precision context.
    :param chunk: images per forward pass; the last chunk is padded to this size (per-sample results may differ
        at batch size 1, never seen to differ between larger batches).
    """
    names, stored = tuple(names), stored_outputs(names)
    if folder is None:
        return _build(teacher, pool, names, stored, prepare, autocast, chunk, key)
    path = folder / f"{key}.pt"
    outputs = _load(path, stored)
    if outputs is None:
        # runs started together (a grid's methods in parallel, several processes) need the same file: one builds
        # it, the others wait and load it
        with RunLock(folder / f".{key}.building", own_temporaries=False):
            outputs = _load(path, stored)
            if outputs is None:
                return _build(teacher, pool, names, stored, prepare, autocast, chunk, key, path)
    return TeacherCache(outputs, key, teacher, names, loaded=True)


def _load(path: Path, stored: tuple[str, ...]) -> dict[str, Tensor] | None:
    """The stored outputs memory-mapped from ``path``; None when it is absent, damaged or holds others."""
    if not path.exists():
        return None
    try:
        outputs = torch.load(path, mmap=True, weights_only=True)
    except Exception:  # a damaged cache file is rebuilt (it holds nothing that cannot be recomputed)
        return None
    return outputs if set(outputs) == set(stored) else None


def _build(teacher: Net, pool: Tensor, names: tuple[str, ...], stored: tuple[str, ...],
           prepare: Callable[[Tensor], Tensor], autocast: Callable[[], object], chunk: int, key: str,
           path: Path | None = None) -> TeacherCache:
    """Compute the ``stored`` outputs on both flips of ``pool``; written to ``path`` (then memory-mapped) if given."""
    t0 = time.perf_counter()
    n = len(pool)
    parts: dict[str, list[Tensor]] = {k: [] for k in stored}
    was = teacher.training
    teacher.eval()
    with torch.no_grad():
        for flip in (False, True):
            for start in range(0, n, chunk):
                x = pool[start:start + chunk]
                real = len(x)
                if real < chunk:
                    x = torch.cat([x, x[:1].expand(chunk - real, *x.shape[1:])])
                if flip:
                    x = x.flip(-1)
                with autocast():
                    out = teacher_outputs(teacher, prepare(x), stored)
                for k in stored:
                    parts[k].append(out[k][:real].cpu().contiguous())
    teacher.train(was)
    outputs = {k: torch.cat(v).view(2, n, *v[0].shape[1:]) for k, v in parts.items()}
    if path is not None:
        atomic_write(path, lambda tmp: torch.save(outputs, tmp))
        outputs = torch.load(path, mmap=True, weights_only=True)
    return TeacherCache(outputs, key, teacher, names, build_s=time.perf_counter() - t0)


def bitwise_diff(served: dict[str, Tensor], fresh: dict[str, Tensor]) -> float | None:
    """None when every output of ``served`` is bitwise ``fresh``'s (same dtype too), else the largest absolute
    difference (inf for another shape, nan for equal values in another dtype)."""
    diffs = [float((v.float() - fresh[k].float()).abs().max()) if v.shape == fresh[k].shape else float("inf")
             for k, v in served.items() if not (v.dtype == fresh[k].dtype and torch.equal(v, fresh[k]))]
    return (max(diffs) or float("nan")) if diffs else None


def cache_applies(trainer: Trainer, force: bool = False) -> str:
    """Empty when the teacher-output cache can serve ``trainer``'s run, else why not.

    Unless ``force`` (``osslbench bench`` times the steady state), the cache is built only where it pays off:
    building it costs two teacher forwards per pool image (both flips); a run that feeds the teacher fewer
    unlabelled images than that (a smoke run on a large pool) runs it live.
    """
    m = trainer.method
    if not trainer.s.train.teacher_cache:
        return "off (train.teacher_cache = false)"
    if m._teacher.module is None or not m.teacher_outputs:
        return "n/a (the method reads no teacher outputs through teacher_on)"
    if not trainer.pipeline.unlabelled or m.unlabelled_views[:1] != ("flip",):
        return "n/a (the method's first unlabelled view is not 'flip')"
    live, build = trainer.epochs * trainer.iters * trainer.pipeline.unlabelled, 2 * len(trainer.data.unlabelled_x)
    if not force and live < build:
        return f"off (the run's {live} teacher forwards on the pool cost less than the cache's {build})"
    return ""


def attach_teacher_cache(trainer: Trainer, force: bool = False) -> tuple[TeacherCache | None, dict]:
    """Build or memory-map the cache of ``trainer``'s run where it applies and check it bitwise against the live
    forward pass on a batch of the training shape: the cache to serve (None: the teacher runs live) and its record
    for ``result.json`` (``kernels.teacher_cache``); ``force`` builds it even where it does not pay off."""
    why = cache_applies(trainer, force)
    if why:
        return None, {"used": False, "why": why}
    t, m, d, tc = trainer, trainer.method, trainer.data, trainer.s.train
    names = tuple(m.teacher_outputs)
    chunk = max(2, min(tc.eval_batch_size, len(d.unlabelled_x)))
    key = cache_key(m.teacher, d.unlabelled_x, stored_outputs(names), {**kernel_context(t), "chunk": chunk})
    cache = build_teacher_cache(m.teacher, d.unlabelled_x, names, t.prepare, t.autocast, chunk, key, t.cache_dir)
    # the live path's shape: labelled + unlabelled images through the teacher in one pass; served: a batch's
    # unlabelled rows (logits derived over them, as a step does)
    n = min(t.pipeline.unlabelled, len(d.unlabelled_x))
    idx, flips = torch.arange(n), torch.arange(n) % 2 == 1
    x_lb, raw = t.prepare(d.labelled_x[: tc.batch_size]), d.unlabelled_x[idx]
    x_u = t.prepare(torch.where(flips[:, None, None, None], raw.flip(-1), raw))
    with torch.no_grad(), t.autocast():
        live = teacher_outputs(m.teacher, torch.cat([x_lb, x_u]), names)
        diff = bitwise_diff(cache.serve(idx, flips, t.device), {k: v[len(x_lb):] for k, v in live.items()})
    record = {"used": diff is None, "outputs": list(names), "stored": ", ".join(cache.outputs),
              "MiB": round(cache.nbytes / 2**20, 2), "build_s": round(cache.build_s, 2), "loaded": cache.loaded,
              "key": key}
    if diff is not None:
        record["why"] = f"off (cached rows differ from the live forward pass by up to {diff:.3g} on this device)"
    return (cache if diff is None else None), record
