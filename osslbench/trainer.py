"""The Trainer: optimiser, schedule, precision, EMA, evaluation, checkpoints and resume.

Resume is exact at epoch boundaries: every random stream of an epoch (sampling order,
augmentation, the methods' own randomness through ``Batch.gen``) is seeded from ``(seed, epoch)``, so an
epoch run after a restart draws the same numbers as it would have without the interruption. Torch's global
generator is never used while training: runs sharing a process (Dask threads) would reseed each other.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from .data.augment import normalize, rand_augment, random_crop_flip
from .data.dataset import RunData
from .errors import CheckpointError
from .evaluate import evaluate
from .method import Batch, Method, PoolAccess
from .protocol import OptimConfig, TrainConfig

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers (e.g. run seed, epoch, stream id), stable across runs and platforms."""
    return int(np.random.SeedSequence(list(parts)).generate_state(2, np.uint64)[0] >> np.uint64(1))


_INIT_LOCK = threading.Lock()


@contextlib.contextmanager
def seeded_init(seed: int) -> Iterator[None]:
    """Build models under ``torch.manual_seed(seed)``: layers initialise from torch's global generator, so
    runs sharing a process (Dask threads) take turns, and the caller's generator state is restored after."""
    with _INIT_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def atomic_write_bytes(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file and rename, so a crash never leaves a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` = CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def make_optimizer(params: list[tuple[str, torch.nn.Parameter]], cfg: OptimConfig) -> torch.optim.Optimizer:
    """SGD or Adam; with ``decay_bn_bias = false`` no weight decay on 1-d parameters (BN, biases)."""
    decay = [p for n, p in params if cfg.decay_bn_bias or p.ndim > 1]
    no_decay = [p for n, p in params if not cfg.decay_bn_bias and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


def autocast_context(device: torch.device, enabled: bool) -> Callable[[], contextlib.AbstractContextManager]:
    """bf16 autocast where the device supports it, else a no-op context."""
    ok = enabled and (device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported()))
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16) if ok else contextlib.nullcontext()


@dataclass
class Schedule:
    """The schedule of one training run (student or teacher)."""

    epochs: int
    train: TrainConfig
    optim: OptimConfig
    seed: int


class Trainer:
    """Trains ``method`` on ``data``; writes ``metrics.jsonl`` and ``checkpoint.pt`` into ``run_dir``.

    :param config_hash: hash of the resolved config; a checkpoint with another hash is refused.
    """

    def __init__(self, method: Method, data: RunData, schedule: Schedule, run_dir: Path, config_hash: str,
                 device: torch.device, desc: str = "", progress: bool = True) -> None:
        self.method, self.data, self.s = method, data, schedule
        self.run_dir, self.config_hash, self.device = run_dir, config_hash, device
        self.desc, self.progress = desc or method.name, progress
        tc = schedule.train
        self.memory_format = torch.channels_last if tc.channels_last else torch.contiguous_format
        method.to(device=device, memory_format=self.memory_format)
        if method._teacher.module is not None:
            method.teacher.to(device=device, memory_format=self.memory_format)
        self.autocast = autocast_context(device, tc.amp)
        self.iters = tc.iters_per_epoch or max(1, len(data.labelled_x) // tc.batch_size)
        self.n_ulb = round(method.cfg.mu * tc.batch_size) if method.uses_unlabelled and len(data.unlabelled_x) else 0
        self.optimizer = make_optimizer([(n, p) for n, p in method.named_parameters() if p.requires_grad],
                                        schedule.optim)
        # a method's init stage (AB / FT / FSP) runs before the protocol's epochs
        self.init_epochs = method.init_epochs(schedule.epochs)
        self.epochs = self.init_epochs + schedule.epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, method.lr_schedule(schedule.optim, schedule.epochs, self.iters))
        decay = method.cfg.ema_decay
        self.ema = AveragedModel(method, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True) if decay else None
        self.history: list[dict] = []

    # --- data ------------------------------------------------------------------------------
    def prepare(self, x: Tensor) -> Tensor:
        """uint8 batch -> normalised float on the device in the chosen memory format."""
        x = normalize(x.to(self.device, non_blocking=True), self.data.mean, self.data.std)
        return x.contiguous(memory_format=self.memory_format)

    def view(self, kind: str, x: Tensor, gen: torch.Generator) -> Tensor:
        """One augmented view of a uint8 batch (see ``Method.unlabelled_views``)."""
        d = self.data
        if kind == "weak":
            return random_crop_flip(x, gen, padding=d.crop_padding, flip=d.flip)
        if kind == "flip":
            return random_crop_flip(x, gen, padding=0, flip=d.flip)
        if kind == "strong":
            return rand_augment(random_crop_flip(x, gen, padding=d.crop_padding, flip=d.flip), gen)
        if kind == "plain":
            return x
        raise ValueError(f"unknown view {kind!r}")

    @staticmethod
    def index_stream(n: int, per_step: int, steps: int, gen: torch.Generator) -> Tensor:
        """``steps x per_step`` indices: concatenated random permutations of ``range(n)``."""
        need = per_step * steps
        perms = [torch.randperm(n, generator=gen) for _ in range(-(-need // n))]
        return torch.cat(perms)[:need].view(steps, per_step)

    def batches(self, epoch: int) -> Iterator[Batch]:
        """The epoch's batches; every random draw comes from ``(seed, epoch)``."""
        seed, d, b, m = self.s.seed, self.data, self.s.train.batch_size, self.method
        gen = torch.Generator().manual_seed(derived_seed(seed, epoch, 1))
        lab = self.index_stream(len(d.labelled_x), b, self.iters, gen)
        ulb = self.index_stream(len(d.unlabelled_x), self.n_ulb, self.iters, gen) if self.n_ulb else None
        subset = m.selection() if m.selected_views and self.n_ulb else None
        sel = None
        if subset is not None and len(subset):
            sel = subset.cpu()[self.index_stream(len(subset), self.n_ulb, self.iters, gen)]
        for i in range(self.iters):
            x = self.prepare(self.view("weak", d.labelled_x[lab[i]], gen))
            idx_u = ulb[i] if ulb is not None else torch.empty(0, dtype=torch.long)
            x_u = [self.prepare(self.view(k, d.unlabelled_x[idx_u], gen)) for k in m.unlabelled_views] if ulb is not None else []
            idx_s = sel[i] if sel is not None else None
            x_s = [self.prepare(self.view(k, d.unlabelled_x[idx_s], gen)) for k in m.selected_views] if sel is not None else []
            step = epoch * self.iters + i
            yield Batch(x, d.labelled_y[lab[i]].to(self.device), x_u, idx_u, epoch, step, self.iters, self.epochs,
                        x_s, idx_s, gen, self.init_epochs)

    def pool_map(self, fn: Callable[[Tensor], Tensor]) -> Tensor:
        """``fn`` over the whole unlabelled pool, in eval mode and without gradients (epoch hooks)."""
        was = self.method.training
        self.method.eval()
        out = []
        bs = self.s.train.eval_batch_size
        with torch.no_grad():
            for start in range(0, len(self.data.unlabelled_x), bs):
                with self.autocast():
                    out.append(fn(self.prepare(self.data.unlabelled_x[start:start + bs])).float().cpu())
        self.method.train(was)
        return torch.cat(out) if out else torch.empty(0)

    # --- checkpoints --------------------------------------------------------------------------
    def save(self, epoch: int) -> None:
        state = {"epoch": epoch, "config_hash": self.config_hash, "method": self.method.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "ema": self.ema.state_dict() if self.ema else None, "history": self.history}
        atomic_write_bytes(self.run_dir / CHECKPOINT, lambda p: torch.save(state, p))
        lines = "".join(json.dumps(row) + "\n" for row in self.history)
        atomic_write_bytes(self.run_dir / METRICS, lambda p: p.write_text(lines))

    def resume(self) -> int:
        """Load the run's checkpoint if there is one; the number of epochs already done."""
        path = self.run_dir / CHECKPOINT
        if not path.exists():
            return 0
        try:
            state = torch.load(path, map_location=self.device, weights_only=False)
        except Exception as exc:  # a damaged file is reported, never silently overwritten
            raise CheckpointError(f"{path}: cannot read checkpoint ({type(exc).__name__}); delete it to restart") from None
        if state.get("config_hash") != self.config_hash:
            raise CheckpointError(f"{path} was written by another config (hash {state.get('config_hash')} != "
                                  f"{self.config_hash}); use another --out or --overwrite")
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.history = state["history"]
        return int(state["epoch"])

    # --- the loop -----------------------------------------------------------------------------
    def evaluate(self, bar: bool) -> dict[str, float]:
        model = self.ema.module if self.ema is not None else self.method
        progress = (lambda it: tqdm(it, desc=f"{self.desc} eval", leave=False, disable=not bar)) if bar else None
        return evaluate(model, self.data.test_x, self.data.test_y, self.data.outlier_x, self.prepare,
                        self.s.train.eval_batch_size, self.autocast, progress)

    def fit(self, stop_after: int | None = None) -> list[dict]:
        """Train to the last epoch (or stop after ``stop_after`` epochs, for tests); the epoch history."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        start = self.resume()
        epochs, tc = self.epochs, self.s.train
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
                with self.autocast():
                    terms = self.method.losses(batch)
                loss = sum(terms.values())
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{self.desc}: loss is {loss.item()} at epoch {epoch + 1}, step {i}")
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                self.scheduler.step()
                self.method.after_step()
                if self.ema is not None:
                    self.ema.update_parameters(self.method)
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                if i % 10 == 0:
                    bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
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


def summarize(history: list[dict], last_k: int) -> dict[str, float]:
    """Last-epoch and mean-of-last-k figures (never the best epoch: that would select on the test set)."""
    evals = [r for r in history if "top1" in r]
    if not evals:
        return {}
    last, tail = evals[-1], evals[-last_k:]
    out: dict[str, float] = {"epochs": history[-1]["epoch"], "last_k": len(tail),
                             "train_s": sum(r["train_s"] + r.get("eval_s", 0.0) for r in history),
                             "hook_s": sum(r.get("hook_s", 0.0) for r in history)}
    for key in ("top1", "top5", "auroc"):
        if key in last:
            out[f"{key}_last"] = last[key]
            out[f"{key}_lastk"] = float(np.mean([r[key] for r in tail]))
    return out
