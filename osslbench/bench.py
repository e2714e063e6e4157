"""``osslbench bench``: osslbench's training step against the conventional pipeline, side by side.

For one protocol, method and model pair, times ``steps`` training steps (after ``warmup`` untimed ones) of
osslbench's own loop (the real ``Trainer.batches`` + ``Trainer.step``, with its precision, memory format and
teacher-output cache) and of the conventional reference pipeline (:mod:`osslbench.reference_pipeline`: PIL
transforms in ``DataLoader`` workers, fp32, NCHW; the same models, loss code, batch sizes and images), in one
process, taking turns in ``rounds`` (each pipeline's first step of a round untimed), so that a change in a shared
machine's load falls on both. It reports images/s of each and their ratio (the figure of merit: absolute times
vary between machines and with their load), the share of the step spent on data, teacher, student and loss, the
precision, the CPU/GPU model, the FLOPs of one step (``torch.utils.flop_counter.FlopCounterMode``) and the
achieved GFLOP/s.

``os_share`` is the part of the step's CPU time (all threads, this process) spent in the kernel, mostly on
``faults_per_step`` (minor page faults: memory the allocator returned to the OS and takes back, zeroed).

Shares: ``data`` = producing the batch (augmentation, normalisation, transfer, cache lookup); ``teacher`` = the
frozen teacher's forward passes; ``student`` = the student's forward + the whole backward pass + the optimiser
(and EMA) update; ``loss`` = the rest of the method's ``losses`` (connector, heads, loss terms).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.flop_counter import FlopCounterMode

from .data.dataset import load_run_data, make_splits
from .device import pick_device, seeded_init
from .errors import OsslbenchError
from .hardware import describe
from .method import Batch, Method
from .models import build_model
from .models.checkpoint import load_state
from .optim import Schedule, make_optimizer
from .protocol import Protocol
from .reference_pipeline import reference_batches, reference_data, reference_step
from .registry import get_method, method_config
from .teacher_view_cache import MIN_BATCH, mean_hit_rate, prefill
from .trainer import Trainer

try:
    import resource  # POSIX: kernel time and page faults of the timed steps
except ImportError:  # Windows
    resource = None

SHARES = ("data", "teacher", "student", "loss")


@dataclass
class BenchOptions:
    """How to bench: steps, warm-up, loader workers of the reference, device, threads, data."""

    data_root: Path
    steps: int = 20
    warmup: int = 3
    workers: int = -1  # reference DataLoader workers; -1 = min(8, cores) (the authors' 8, capped)
    device: str = "auto"
    threads: int = 0  # torch threads; 0 = torch's default (one per core)
    teacher: str | None = None  # a teacher checkpoint; default: the architecture, initialised from the seed
    seed: int = 0
    reference: bool = True
    labelled_hit_rate: float | None = None  # None = the mean of a whole run at the protocol's scale
    prior_runs: int = 0  # whole runs before it that shared the labelled-view cache (a grid's later runs)
    rounds: int = 4  # the timed steps run in this many rounds, the two pipelines taking turns


def device_model(device: torch.device) -> str:
    """The CPU or GPU model, in words (from :func:`osslbench.hardware.describe`)."""
    info = describe(device)
    bf16 = "native bf16" if info["native_bf16"] else "no native bf16"
    cpu = f"{info['cpu']}, {os.cpu_count()} logical cores, {info['cpu_capability']}"
    return f"{info['gpu']} ({bf16}; host {cpu})" if "gpu" in info else f"{cpu}, {bf16}"


class StepClock:
    """Accumulates the time of a pipeline's steps by part (see :data:`SHARES`), via forward hooks on the
    teacher and the student and a wrapper around the method's ``losses``."""

    def __init__(self, method: Method, device: torch.device) -> None:
        self.device = device
        self.totals = dict.fromkeys((*SHARES, "step"), 0.0)
        self.images = 0
        self.steps = 0
        self.cpu = dict.fromkeys(("user_s", "os_s", "faults"), 0.0)  # getrusage of the timed steps
        self.on = False
        self._t: dict[str, float] = {}
        self._losses_s = 0.0
        self._student_fwd = 0.0
        self._teacher = 0.0
        self.handles = []
        for part, module in (("teacher", method._teacher.module), ("student", method.student)):
            if module is not None:
                self.handles.append(module.register_forward_pre_hook(self._start(part)))
                self.handles.append(module.register_forward_hook(self._stop(part)))
        inner = method.losses

        def losses(batch: Batch) -> dict[str, torch.Tensor]:
            t0 = self.now()
            out = inner(batch)
            self._losses_s += self.now() - t0
            return out

        method.losses = losses  # an instance attribute: only this method object is timed
        self._method = method

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _start(self, part: str) -> Callable:
        def hook(module: torch.nn.Module, args: object) -> None:
            self._t[part] = self.now()
        return hook

    def _stop(self, part: str) -> Callable:
        def hook(module: torch.nn.Module, args: object, out: object) -> None:
            dt = self.now() - self._t.pop(part)
            if part == "teacher":
                self._teacher += dt
            else:
                self._student_fwd += dt
        return hook

    def run(self, batches: Iterator[Batch], step: Callable[[Batch], object], n: int, timed: bool) -> None:
        """``n`` steps; counted in the totals when ``timed``."""
        before = _usage()
        for _ in range(n):
            self._losses_s = self._student_fwd = self._teacher = 0.0
            t0 = self.now()
            batch = next(batches)
            t1 = self.now()
            step(batch)
            t2 = self.now()
            if timed:
                self.steps += 1
                self.images += batch.x_lb.shape[0] + len(batch.idx_ulb)
                self.totals["data"] += t1 - t0
                self.totals["teacher"] += self._teacher
                self.totals["loss"] += self._losses_s - self._teacher - self._student_fwd
                self.totals["student"] += (t2 - t1) - self._losses_s + self._student_fwd
                self.totals["step"] += t2 - t0
        if timed and before is not None:
            for k, v in _usage().items():
                self.cpu[k] += v - before[k]

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        del self._method.losses

    def report(self, flops: float, precision: str) -> dict:
        total = self.totals["step"]
        return {"images": self.images, "steps": self.steps, "seconds": round(total, 6),
                "img_per_s": round(self.images / total, 2), "step_s": round(total / self.steps, 4),
                "shares": {k: round(self.totals[k] / total, 4) for k in SHARES}, "precision": precision,
                "gflop_per_step": round(flops / 1e9, 3),
                "gflop_per_image": round(flops / 1e9 / (self.images / self.steps), 4),
                "gflop_per_s": round(flops / 1e9 / (total / self.steps), 2),
                "os_share": round(self.cpu["os_s"] / max(self.cpu["os_s"] + self.cpu["user_s"], 1e-9), 4)
                if resource else None,
                "faults_per_step": round(self.cpu["faults"] / self.steps) if resource else None}


def _usage() -> dict[str, float] | None:
    """This process's CPU seconds in user and kernel mode and its minor page faults (None without ``resource``)."""
    if resource is None:
        return None
    r = resource.getrusage(resource.RUSAGE_SELF)
    return {"user_s": r.ru_utime, "os_s": r.ru_stime, "faults": float(r.ru_minflt)}


def _flops(step: Callable[[Batch], object], batch: Batch) -> float:
    with FlopCounterMode(display=False) as counter:
        step(batch)
    return float(counter.get_total_flops())


def _build(protocol: Protocol, method_name: str, data, teacher_path: str | None, seed: int) -> Method:
    cls = get_method(method_name)
    cfg, _ = method_config(cls, protocol)
    teacher = None
    if cls.needs_teacher:
        with seeded_init(seed + 1):
            teacher = build_model(protocol.models.teacher, data.num_classes, data.in_channels)
        if teacher_path:
            load_state(teacher, teacher_path)
    with seeded_init(seed):
        student = build_model(protocol.models.student, data.num_classes, data.in_channels)
        return cls(cfg, student, teacher, num_classes=data.num_classes, pool_size=len(data.unlabelled_x),
                   labelled_size=len(data.labelled_x), image_size=protocol.data.image_size)


def _rounds(steps: int, rounds: int) -> list[int]:
    """``steps`` timed steps split into ``rounds`` near-equal rounds (no empty one)."""
    rounds = max(1, min(rounds, steps))
    return [steps // rounds + (i < steps % rounds) for i in range(rounds)]


def run_bench(protocol: Protocol, method_name: str, opts: BenchOptions) -> dict:
    """Time osslbench's step and the reference's on the same work; the report (see the module docstring)."""
    if opts.steps < 1 or opts.warmup < 0 or opts.rounds < 1:
        raise OsslbenchError("--steps and --rounds must be >= 1 and --warmup >= 0")
    if opts.labelled_hit_rate is not None and not 0.0 <= opts.labelled_hit_rate <= 1.0:
        raise OsslbenchError(f"--labelled-hit-rate must be in [0, 1], got {opts.labelled_hit_rate}")
    if opts.prior_runs < 0:
        raise OsslbenchError(f"--prior-runs must be >= 0, got {opts.prior_runs}")
    if opts.threads < 0:
        raise OsslbenchError(f"--threads must be >= 0 (0 = torch's default), got {opts.threads}")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    device = pick_device(opts.device)
    splits = make_splits(protocol, opts.seed, opts.data_root)
    data = load_run_data(protocol, splits, opts.data_root)
    cls = get_method(method_name)
    _, optim = method_config(cls, protocol)
    rounds = _rounds(opts.steps, opts.rounds if opts.reference else 1)
    settle = len(rounds) if len(rounds) > 1 else 0  # one untimed step per pipeline at each switch
    iters = opts.warmup + settle + opts.steps + 1
    full_iters = protocol.train.iters_per_epoch or max(1, len(data.labelled_x) // protocol.train.batch_size)
    schedule = Schedule(epochs=1, train=replace(protocol.train, iters_per_epoch=iters), optim=optim, seed=opts.seed)
    report: dict = {"protocol": protocol.name, "scale": protocol.scale, "method": method_name,
                    "teacher": protocol.models.teacher if cls.needs_teacher else None,
                    "student": protocol.models.student, "device": str(device), "device_model": device_model(device),
                    "threads": torch.get_num_threads(), "torch": torch.__version__, "warmup": opts.warmup,
                    "rounds": len(rounds)}

    # osslbench: the Trainer's own batches and step
    method = _build(protocol, method_name, data, opts.teacher, opts.seed)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(method, data, schedule, Path(tmp), "bench", device, progress=False)
        cache = trainer.use_teacher_cache(force=True)  # the steady state of a long run
        labelled = trainer.kernels["teacher_cache_labelled"]
        lcache = trainer.labelled_cache
        if lcache is not None:  # the labelled-view cache as a run has it on average (or at opts.labelled_hit_rate)
            draws = (method.init_epochs(protocol.train.epochs) + protocol.train.epochs) * full_iters \
                * protocol.train.batch_size / len(data.labelled_x)
            share = opts.labelled_hit_rate
            if share is None:
                share = mean_hit_rate(draws, lcache.views, prior_draws=opts.prior_runs * draws)
                labelled["prior_runs"] = opts.prior_runs
            ahead = islice(trainer.pipeline.batches(0, method), iters)
            gen = torch.Generator().manual_seed(opts.seed)
            labelled.update(run_draws_per_image=round(draws, 1), share_stored=round(share, 4),
                            views_stored=prefill(lcache, ahead, share, gen, trainer.autocast))
            # the unseen views of a step go through the teacher in a batch of any size from MIN_BATCH to the batch
            # size; a run has the kernels of every size ready after its first steps (oneDNN builds them per shape)
            x = trainer.prepare(data.labelled_x[: protocol.train.batch_size])
            with torch.no_grad(), trainer.autocast():
                for n in range(MIN_BATCH, len(x) + 1):
                    lcache.compute(x[:n])
        method.train()
        clock = StepClock(method, device)
        pipes = [(clock, trainer.batches(0), trainer.step)]

        # the reference: the authors' loop on the same models, losses and images
        if opts.reference:
            workers = opts.workers if opts.workers >= 0 else min(8, os.cpu_count() or 1)
            ref_method = _build(protocol, method_name, data, opts.teacher, opts.seed).to(device)
            if ref_method._teacher.module is not None:
                ref_method.teacher.to(device)
            ref_method.train()
            params = [(n, p) for n, p in ref_method.named_parameters() if p.requires_grad]
            optimizer = make_optimizer(params, optim)
            decay = ref_method.cfg.ema_decay
            ema = AveragedModel(ref_method, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True) if decay else None
            rdata = reference_data(protocol, splits, opts.data_root, ref_method)
            ref_batches = reference_batches(rdata, protocol.train.batch_size, trainer.pipeline.unlabelled, workers,
                                            device, opts.seed)
            step = lambda b: reference_step(ref_method, optimizer, b, ema)  # noqa: E731
            pipes.append((StepClock(ref_method, device), ref_batches, step))

        # warm-up, then the timed steps in rounds, the two pipelines taking turns: a change in the machine's load
        # (a shared host) falls on both instead of on whichever ran during it
        for c, batches, step in pipes:
            c.run(batches, step, opts.warmup, timed=False)
        hits = lookups = 0
        round_ratios = []
        for n in rounds:
            speed = []
            for c, batches, step in pipes:
                if settle:  # the other pipeline's leftovers (its loader workers' prefetch) land on an untimed step
                    c.run(batches, step, 1, timed=False)
                images, seconds = c.images, c.totals["step"]
                before = lcache.counts() if lcache is not None and c is clock else None
                c.run(batches, step, n, timed=True)
                if before is not None:  # the share of the timed labelled rows the labelled-view cache served
                    after = lcache.counts()
                    hits, lookups = hits + after["hits"] - before["hits"], lookups + after["lookups"] - before["lookups"]
                speed.append((c.images - images) / (c.totals["step"] - seconds))
            if len(speed) == 2:
                round_ratios.append(round(speed[0] / speed[1], 3))
        if lcache is not None:
            labelled["hit_rate"] = round(hits / lookups, 4)
        for c, _, _ in pipes:
            c.close()
        flops = [_flops(step, next(batches)) for _, batches, step in pipes]
    ours = clock.report(flops[0], trainer.precision)
    ours["memory_format"] = "channels_last" if protocol.train.channels_last else "contiguous"
    ours["teacher_cache"] = cache
    ours["teacher_cache_labelled"] = labelled
    report["osslbench"] = ours
    report["epoch_iters"] = full_iters
    report["epoch_s"] = {"osslbench": round(full_iters * ours["step_s"], 1)}
    if opts.reference:
        ref = pipes[1][0].report(flops[1], "fp32")
        ref["memory_format"] = "contiguous"
        ref["workers"] = workers
        report["reference"] = ref
        report["ratio"] = round(ours["img_per_s"] / ref["img_per_s"], 3)
        report["round_ratios"] = round_ratios
        report["epoch_s"]["reference"] = round(full_iters * ref["step_s"], 1)
    return report


def format_report(r: dict) -> str:
    """The report as a short table."""
    lines = [f"osslbench bench: {r['protocol']} [{r['scale']}] {r['method']}: "
             f"{(r['teacher'] + ' -> ') if r['teacher'] else ''}{r['student']}",
             f"device: {r['device']} ({r['device_model']}), {r['threads']} threads, torch {r['torch']}",
             f"{'pipeline':<11} {'img/s':>8} {'step ms':>8} {'data':>6} {'teacher':>8} {'student':>8} {'loss':>6} "
             f"{'GFLOP/step':>10} {'GFLOP/s':>8}  precision"]
    for name in ("osslbench", "reference"):
        if name not in r:
            continue
        p = r[name]
        s = p["shares"]
        lines.append(f"{name:<11} {p['img_per_s']:>8.1f} {1000 * p['step_s']:>8.1f} {s['data']:>6.1%} "
                     f"{s['teacher']:>8.1%} {s['student']:>8.1%} {s['loss']:>6.1%} {p['gflop_per_step']:>10.2f} "
                     f"{p['gflop_per_s']:>8.1f}  {p['precision']}, {p['memory_format']}"
                     + (f", {p['workers']} workers" if "workers" in p else ""))
    if "ratio" in r:
        lines.append(f"ratio osslbench / reference: {r['ratio']:.2f}x "
                     f"({r['osslbench']['images']} images each, {r['osslbench']['steps']} timed steps after {r['warmup']}, "
                     f"in {r['rounds']} rounds taking turns: {', '.join(f'{x:.2f}x' for x in r['round_ratios'])})")
    os_parts = [f"{name} {r[name]['os_share']:.1%} ({r[name]['faults_per_step']:,} page faults per step)"
                for name in ("osslbench", "reference") if name in r and r[name].get("os_share") is not None]
    if os_parts:
        lines.append("CPU time in the kernel: " + ", ".join(os_parts))
    c = r["osslbench"]["teacher_cache"]
    lines.append("teacher cache: " + (f"on ({', '.join(c['outputs'])}, stored as {c['stored']}; {c['MiB']} MiB; "
                                      f"built in {c['build_s']} s)"
                                      if c.get("used") else c.get("why", "off")))
    lc = r["osslbench"]["teacher_cache_labelled"]
    prior = lc.get("prior_runs")
    mean = ("a set share" if prior is None else "a whole run's mean" + (f" after {prior} earlier runs" if prior else ""))
    lines.append("labelled-view cache: " + (
        f"served {lc['hit_rate']:.1%} of the timed labelled rows (stored beforehand: {lc['share_stored']:.1%} of "
        f"the views drawn, {mean} at {lc['run_draws_per_image']:g} draws per image of {lc['views']} "
        f"views; at most {lc['MiB']:,.0f} MiB)" if lc.get("used") else lc.get("why", "off")))
    epoch = ", ".join(f"{k} {v:,.0f} s" for k, v in r["epoch_s"].items())
    lines.append(f"one epoch of {r['epoch_iters']} steps at this scale: {epoch}")
    return "\n".join(lines)
