"""The Trainer: optimiser, schedule, precision, EMA, evaluation, checkpoints and resume.

Resume is exact at epoch boundaries: every random stream of an epoch (sampling order, augmentation, the
methods' own randomness through ``Batch.gen``) is seeded from ``(seed, epoch)`` by the batch pipeline
(:mod:`osslbench.data.pipeline`), so an epoch run after a restart draws the same numbers as it would have
without the interruption. Torch's global generator is never used while training: runs sharing a process
(Dask threads) would reseed each other.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .data.dataset import RunData
from .data.pipeline import BatchPipeline
from .device import autocast_context
from .ema import EMA
from .errors import CheckpointError, TrainingDiverged
from .evaluate import evaluate
from .fsio import atomic_write, atomic_write_text
from .hardware import describe, forward_mflop, use_bf16
from .method import Batch, Method, PoolAccess
from .models.checkpoint import safe_load
from .optim import Schedule, make_optimizer
from .teacher_cache import TeacherCache, attach_teacher_cache
from .teacher_view_cache import SHARD_SHARE, LabelledViewCache, attach_labelled_cache

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


class Trainer:
    """Trains ``method`` on ``data``; writes ``metrics.jsonl`` and ``checkpoint.pt`` into ``run_dir``.

    :param config_hash: hash of the resolved config; a checkpoint with another hash is refused.
    :param teacher_sha256: digest of the teacher's weights; a checkpoint trained against other weights is refused.
    """

    def __init__(self, method: Method, data: RunData, schedule: Schedule, run_dir: Path, config_hash: str,
                 device: torch.device, desc: str = "", progress: bool = True, cache_dir: Path | None = None,
                 teacher_sha256: str | None = None) -> None:
        self.method, self.data, self.s = method, data, schedule
        self.run_dir, self.config_hash, self.device = run_dir, config_hash, device
        self.teacher_sha256 = teacher_sha256
        self.cache_dir = cache_dir  # where the teacher-output cache is memory-mapped from (None = memory only)
        self.teacher_cache: TeacherCache | None = None
        self.labelled_cache: LabelledViewCache | None = None
        self.kernels: dict = {}  # the kernel choices of this run, recorded with its result
        self.desc, self.progress = desc or method.name, progress
        tc = schedule.train
        self.memory_format = torch.channels_last if tc.channels_last else torch.contiguous_format
        method.to(device=device, memory_format=self.memory_format)
        if method._teacher.module is not None:
            method.teacher.to(device=device, memory_format=self.memory_format)
        # the networks a step runs forward (student, frozen teacher): what decides amp = "auto" (hardware.py)
        nets = [method.student] + ([method.teacher] if method._teacher.module is not None else [])
        mflop = forward_mflop(nets, tuple(data.labelled_x.shape[1:]))
        self.kernels["forward_mflop"] = round(mflop, 2)
        self.precision = "bf16" if use_bf16(device, tc.amp, mflop) else "fp32"
        self.autocast = autocast_context(device, tc.amp, mflop)
        self.iters = tc.iters_per_epoch or max(1, len(data.labelled_x) // tc.batch_size)
        # a method's init stage (AB / FT / FSP) runs before the protocol's epochs
        self.init_epochs = method.init_epochs(schedule.epochs)
        self.epochs = self.init_epochs + schedule.epochs
        n_ulb = round(method.cfg.mu * tc.batch_size) if method.uses_unlabelled and len(data.unlabelled_x) else 0
        self.pipeline = BatchPipeline(data, schedule.seed, tc.batch_size, self.iters, self.epochs, n_ulb, device,
                                      self.memory_format, self.init_epochs)
        self.optimizer = make_optimizer([(n, p) for n, p in method.named_parameters() if p.requires_grad],
                                        schedule.optim)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, method.lr_schedule(schedule.optim, schedule.epochs, self.iters))
        decay = method.cfg.ema_decay
        self.ema = EMA(method, decay, method.cfg.ema_warmup) if decay else None
        self.history: list[dict] = []

    # --- data ------------------------------------------------------------------------------
    def prepare(self, x: Tensor) -> Tensor:
        """uint8 batch -> normalised float on the device (the pipeline's)."""
        return self.pipeline.prepare(x)

    def batches(self, epoch: int) -> Iterator[Batch]:
        """The pipeline's batches of ``epoch``, with the teacher-output caches' rows attached where they serve."""
        for batch in self.pipeline.batches(epoch, self.method):
            if self.teacher_cache is not None:
                batch.teacher_ulb = partial(self.teacher_cache.serve, batch.idx_ulb, batch.flips_ulb[0], self.device)
            if self.labelled_cache is not None and batch.views_lb is not None:
                batch.teacher_lb = partial(self.labelled_cache.serve, batch.x_lb, batch.idx_lb, batch.views_lb)
            yield batch

    def use_teacher_cache(self, force: bool = False) -> dict:
        """Serve the teacher's outputs from the caches where they apply: on the pool (``osslbench.teacher_cache``),
        then on the labelled views (``osslbench.teacher_view_cache``); the pool cache's record."""
        self.teacher_cache, self.kernels["teacher_cache"] = attach_teacher_cache(self, force)
        self.labelled_cache, self.kernels["teacher_cache_labelled"] = attach_labelled_cache(self, force)
        return self.kernels["teacher_cache"]

    def pool_map(self, fn: Callable[[Tensor], Tensor]) -> Tensor:
        """``fn`` over the whole unlabelled pool, in eval mode and without gradients (epoch hooks)."""
        return self.pipeline.pool_map(self.method, fn, self.s.train.eval_batch_size, self.autocast)

    # --- checkpoints --------------------------------------------------------------------------
    def save(self, epoch: int) -> None:
        """The checkpoint (which holds the history), then ``metrics.jsonl``, each written atomically: a crash
        between the two is repaired by :meth:`resume`, which rewrites the metrics from the checkpoint."""
        state = {"epoch": epoch, "config_hash": self.config_hash, "teacher_sha256": self.teacher_sha256,
                 "method": self.method.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "ema": self.ema.state_dict() if self.ema else None, "history": self.history}
        atomic_write(self.run_dir / CHECKPOINT, lambda p: torch.save(state, p))
        self.write_metrics()
        self.share_views(SHARD_SHARE if epoch < self.epochs else 0.0)

    def share_views(self, min_share: float) -> None:
        """Write the labelled views computed since the last shard for the runs that share them (and this one
        when it resumes), if they reach ``min_share`` of all views; counted in ``result.json``."""
        if self.labelled_cache is not None:
            record = self.kernels["teacher_cache_labelled"]
            record["views_saved"] = record.get("views_saved", 0) + self.labelled_cache.save(min_share)

    def write_metrics(self) -> None:
        """``metrics.jsonl``: one line per epoch of the history (rewritten whole, atomically)."""
        atomic_write_text(self.run_dir / METRICS, "".join(json.dumps(row) + "\n" for row in self.history))

    def resume(self) -> int:
        """Load the run's checkpoint if there is one; the number of epochs already done. ``metrics.jsonl`` is
        rebuilt from the checkpoint's history, so the two never disagree (whatever a crash left)."""
        path = self.run_dir / CHECKPOINT
        if not path.exists():
            (self.run_dir / METRICS).unlink(missing_ok=True)  # rows of a run whose checkpoint never landed
            return 0
        try:  # weights only: a checkpoint is data, never code (a damaged or poisoned file is refused, not overwritten)
            state = safe_load(path, map_location=self.device)
        except CheckpointError as exc:
            raise CheckpointError(f"{exc}; delete it to restart the run") from None
        if not isinstance(state, dict) or "epoch" not in state:
            raise CheckpointError(f"{path} is not an osslbench checkpoint; delete it to restart the run")
        if state.get("config_hash") != self.config_hash:
            raise CheckpointError(f"{path} was written by another config (hash {state.get('config_hash')} != "
                                  f"{self.config_hash}); use another --out or --overwrite")
        saved = state.get("teacher_sha256")  # (absent from checkpoints written before it was recorded)
        if saved and saved != self.teacher_sha256:  # a --teacher file replaced, or a teacher retrained, mid-run
            raise CheckpointError(f"{path} was trained against other teacher weights (sha256 {saved[:12]} != "
                                  f"{str(self.teacher_sha256)[:12]}); restore that teacher, or use another --out "
                                  "or --overwrite")
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.history = state["history"]
        self.write_metrics()
        return int(state["epoch"])

    def run_facts(self) -> dict:
        """How the run was computed, for its ``result.json``: steps, precision, memory format, threads, hardware and
        the kernel choices (the teacher-output caches: used or why not, size, build time, what they served)."""
        if self.labelled_cache is not None:  # (this process's share, when the run resumed)
            self.kernels["teacher_cache_labelled"].update(self.labelled_cache.counts())
        return {"steps": self.epochs * self.iters, "precision": self.precision,
                "memory_format": "channels_last" if self.memory_format == torch.channels_last else "contiguous",
                "device": str(self.device), "threads": torch.get_num_threads(), "hardware": describe(self.device),
                "kernels": self.kernels}

    def diverged(self, terms: dict[str, Tensor], epoch: int, step: int) -> None:
        """Stop on a non-finite loss with one line naming the epoch, the step and the term; nothing of this
        epoch is written, so the run resumes from the checkpoint of the last finished epoch."""
        bad = [f"{k} = {float(v.detach())}" for k, v in terms.items() if not torch.isfinite(v.detach()).all()]
        done = f"resumes from epoch {epoch}" if epoch else "has no checkpoint yet"
        raise TrainingDiverged(f"{self.run_dir}: loss {', '.join(bad) or 'sum is not finite'} at epoch {epoch + 1}, "
                               f"step {step + 1} of {self.iters}; the run {done}; lower optim.lr or check the "
                               f"method's settings (method.{self.method.name}.*)")

    # --- the loop -----------------------------------------------------------------------------
    def step(self, batch: Batch, epoch: int = 0, i: int = 0) -> dict[str, Tensor]:
        """One optimisation step on ``batch`` (step ``i`` of ``epoch``: what ``fit`` runs and ``osslbench bench``
        times); the loss terms."""
        with self.autocast():
            terms = self.method.losses(batch)
        loss = sum(terms.values())
        if not torch.isfinite(loss):
            self.diverged(terms, epoch, i)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.method.after_step()
        if self.ema is not None:
            self.ema.update(self.method)
        return terms

    def evaluate(self, bar: bool) -> dict[str, float]:
        """The reported model's figures (the EMA's, when the method has one) and, beside them, the raw trained
        weights' top-1 / top-5 (``top1_raw``), so a reader sees what the EMA changes."""
        model = self.ema.module if self.ema is not None else self.method
        progress = (lambda it: tqdm(it, desc=f"{self.desc} eval", leave=False, disable=not bar)) if bar else None
        d, bs = self.data, self.s.train.eval_batch_size
        out = evaluate(model, d.test_x, d.test_y, d.outlier_x, self.prepare, bs, self.autocast, progress)
        if self.ema is not None:
            raw = evaluate(self.method, d.test_x, d.test_y, d.outlier_x[:0], self.prepare, bs, self.autocast, progress)
            out.update({f"{k}_raw": v for k, v in raw.items()})
        return out

    def fit(self, stop_after: int | None = None) -> list[dict]:
        """Train to the last epoch (or stop after ``stop_after`` epochs, for tests); the epoch history."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        start = self.resume()
        epochs, tc = self.epochs, self.s.train
        if "teacher_cache" not in self.kernels:
            self.use_teacher_cache()
        self.method.train()
        for epoch in range(start, epochs if stop_after is None else min(epochs, stop_after)):
            t0 = time.perf_counter()
            if epoch == self.init_epochs > 0:  # the main stage starts with a fresh optimiser state (momentum)
                self.optimizer.state.clear()
            pool = PoolAccess(size=len(self.data.unlabelled_x), map=self.pool_map, epoch=epoch, epochs=epochs,
                              init_epochs=self.init_epochs)
            row: dict = {"epoch": epoch + 1, **{f"hook_{k}": v for k, v in self.method.on_epoch_start(pool).items()}}
            row["hook_s"] = time.perf_counter() - t0  # the cost of re-scoring the pool (selection methods)
            sums: dict[str, float] = {}
            bar = tqdm(self.batches(epoch), total=self.iters, desc=f"{self.desc} {epoch + 1}/{epochs}",
                       leave=False, disable=not self.progress)
            for i, batch in enumerate(bar):
                terms = self.step(batch, epoch, i)
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                if i % 10 == 0:
                    bar.set_postfix(loss=f"{float(sum(terms.values()).detach()):.3f}")
            row.update({f"loss_{k}": v / self.iters for k, v in sums.items()})
            row.update(self.method.pop_records())
            row["lr"] = self.optimizer.param_groups[0]["lr"]
            row["train_s"] = time.perf_counter() - t0
            if (epoch + 1) % tc.eval_every == 0 or epoch + 1 == epochs:
                t1 = time.perf_counter()
                row.update(self.evaluate(self.progress))
                row["eval_s"] = time.perf_counter() - t1
            self.history.append(row)
            self.save(epoch + 1)
        return self.history

