"""The runner: grids of protocol x method x seed, in this process, in parallel (joblib) or on a
Dask cluster (joblib's ``dask`` backend); each run is skipped when its result already exists."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import joblib
import torch
from tqdm.auto import tqdm

from .config import as_tree, config_hash
from .data.dataset import load_run_data, make_splits
from .errors import CheckpointError, ConfigError, OsslbenchError
from .method import Method, MethodConfig
from .models import build_model
from .models.checkpoint import load_state
from .protocol import Protocol
from .registry import get_method, method_config
from .results import RESULT, read_result, run_dir, versions, write_result
from .teacher import get_teacher, teacher_config
from .trainer import Schedule, Trainer, pick_device, seeded_init, summarize

# Protocol keys that do not change a run's outcome, left out of its config hash.
_NOT_HASHED = {"description", "paper", "methods", "seeds", "scales", "source_file", "method", "sweep"}


@dataclass
class RunOptions:
    """How to run (not what): folders, device, parallelism."""

    data_root: Path
    out: Path
    teacher: str | None = None
    device: str = "auto"
    jobs: int = 1
    cluster: str | None = None
    download: bool = False
    overwrite: bool = False
    progress: bool = True
    threads: int = 0  # torch threads per run; 0 = all cores inline, cores / jobs in parallel, the worker's own on a cluster
    stop_after: int | None = None  # epochs; for tests of resume


def run_config(protocol: Protocol, method: str, seed: int, teacher: str | None) -> dict:
    """The resolved config of one run: everything its outcome depends on (hashed into ``config_hash``)."""
    cls = get_method(method)
    cfg, optim = method_config(cls, protocol)
    proto = {k: v for k, v in as_tree(protocol).items() if k not in _NOT_HASHED}
    tree = {"protocol": proto, "method": {"name": method, **as_tree(cfg)}, "optim": as_tree(optim), "seed": seed}
    if cls.needs_teacher:
        tree["teacher"] = {"path": teacher} if teacher else {"trained": config_hash(teacher_config(protocol, seed))}
    return tree


def finished(protocol: Protocol, method: str, seed: int, opts: RunOptions) -> dict | None:
    """The ``result.json`` of this run when it holds exactly this config, else None."""
    done = read_result(run_dir(opts.out, protocol, method, seed) / RESULT)
    h = config_hash(run_config(protocol, method, seed, opts.teacher))
    return done if done is not None and done["config_hash"] == h else None


def run_one(protocol: Protocol, method: str, seed: int, opts: RunOptions) -> dict:
    """Train and evaluate one (protocol, method, seed); returns its ``result.json`` content."""
    cls = get_method(method)
    cfg, optim = method_config(cls, protocol)
    tree = run_config(protocol, method, seed, opts.teacher)
    h = config_hash(tree)
    folder = run_dir(opts.out, protocol, method, seed)
    done = read_result(folder / RESULT)
    if done is not None and done["config_hash"] == h:
        return done
    if (done is not None or (folder / "checkpoint.pt").exists()) and opts.overwrite:
        shutil.rmtree(folder)
    elif done is not None:
        raise CheckpointError(f"{folder} holds a result of another config (hash {done['config_hash']} != {h}); "
                              "use another --out or --overwrite")
    t0 = time.perf_counter()
    device = pick_device(opts.device)
    splits = make_splits(protocol, seed, opts.data_root, opts.download)
    data = load_run_data(protocol, splits, opts.data_root, opts.download)
    teacher, teacher_record = (None, {})
    if cls.needs_teacher:
        teacher, teacher_record = get_teacher(protocol, seed, data, opts.out, device, opts.teacher, opts.progress, opts.overwrite)
    folder.mkdir(parents=True, exist_ok=True)
    splits.save(folder / "splits.npz")
    with seeded_init(seed):
        student = build_model(protocol.models.student, data.num_classes, data.in_channels)
        m = cls(cfg, student, teacher, num_classes=data.num_classes, pool_size=len(data.unlabelled_x),
                image_size=protocol.data.image_size)
    schedule = Schedule(epochs=protocol.train.epochs, train=protocol.train, optim=optim, seed=seed)
    trainer = Trainer(m, data, schedule, folder, h, device, desc=f"{method} s{seed}", progress=opts.progress)
    history = trainer.fit(stop_after=opts.stop_after)
    if len(history) < trainer.epochs:  # the protocol's epochs plus the method's init stage
        return {"incomplete": True, "epochs_done": len(history)}
    result = {
        "role": "student", "protocol": protocol.name, "scale": protocol.scale, "sweep": protocol.sweep,
        "method": method, "seed": seed,
        "config_hash": h, "config": tree, "teacher": teacher_record, "metrics": summarize(history, protocol.train.last_k),
        "split": splits.summary()["sizes"], "wall_s": time.perf_counter() - t0, "device": str(device),
        "threads": torch.get_num_threads(), "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": versions(),
    }
    write_result(folder / RESULT, result)
    (folder / "checkpoint.pt").unlink(missing_ok=True)  # the result is final; the checkpoint was for resume
    return result


def _teacher_job(protocol: Protocol, seed: int, opts: RunOptions) -> None:
    splits = make_splits(protocol, seed, opts.data_root, opts.download)
    data = load_run_data(protocol, splits, opts.data_root, opts.download)
    get_teacher(protocol, seed, data, opts.out, pick_device(opts.device), opts.teacher, opts.progress,
                opts.overwrite)


def _threads_then(fn, threads: int):
    """``fn`` with torch limited to ``threads`` (0 = unchanged); the float reductions, hence the exact
    figures, depend on the thread count, which every result records. Not restored after: runs sharing a
    worker process (Dask threads) would undo each other's setting mid-run."""
    def call(*args):
        if threads:
            torch.set_num_threads(threads)
        return fn(*args)

    return call


def _execute(calls: Iterable[tuple], opts: RunOptions, what: str) -> list:
    """Run ``(fn, *args)`` calls: inline when ``jobs == 1``, else joblib (loky or a Dask cluster)."""
    calls = list(calls)
    if not calls:
        return []
    if opts.jobs == 1 and not opts.cluster:
        before = torch.get_num_threads()
        try:
            return [_threads_then(fn, opts.threads)(*args) for fn, *args in calls]
        finally:
            torch.set_num_threads(before)
    threads = opts.threads or (0 if opts.cluster else max(1, (os.cpu_count() or 1) // opts.jobs))
    jobs = [joblib.delayed(_threads_then(fn, threads))(*args) for fn, *args in calls]
    if opts.cluster:
        try:
            from dask.distributed import Client
        except ImportError:
            raise OsslbenchError("--cluster needs Dask: pip install 'osslbench[cluster]'") from None
        with Client(opts.cluster), joblib.parallel_config(backend="dask"):
            return list(joblib.Parallel(n_jobs=-1)(jobs))
    parallel = joblib.Parallel(n_jobs=opts.jobs, return_as="generator")
    return list(tqdm(parallel(jobs), total=len(jobs), desc=what, disable=not opts.progress))


def check_architectures(protocol: Protocol, cls: type[Method], cfg: MethodConfig) -> None:
    """``cls.check`` on freshly built student and teacher of the protocol (a layer choice that does not fit the
    architectures is refused before anything is trained); the error is prefixed with the protocol file."""
    in_channels = len(protocol.data.mean)  # one normalisation value per channel
    classes = 2  # the layer shapes do not depend on the number of classes
    with seeded_init(0):  # never touch torch's global generator
        student = build_model(protocol.models.student, classes, in_channels)
        teacher = build_model(protocol.models.teacher, classes, in_channels) if cls.needs_teacher else None
    try:
        cls.check(cfg, student, teacher, protocol.data.image_size)
    except ConfigError as exc:
        raise ConfigError(f"{protocol.source_file}: {exc}") from None


def preflight(protocol: Protocol, methods: list[str], seeds: list[int], opts: RunOptions) -> None:
    """Fail before anything is written or trained: every method's config, the data and the split of
    every seed, and a ``--teacher`` checkpoint that must fit the protocol's teacher architecture."""
    for m in methods:
        cls = get_method(m)
        cfg, _ = method_config(cls, protocol)
        check_architectures(protocol, cls, cfg)
    for seed in seeds:
        splits = make_splits(protocol, seed, opts.data_root, opts.download)
    if opts.teacher and any(get_method(m).needs_teacher for m in methods):
        if not Path(opts.teacher).is_file():
            raise CheckpointError(f"teacher checkpoint {opts.teacher} does not exist")
        in_channels = load_run_data(protocol, splits, opts.data_root).in_channels
        load_state(build_model(protocol.models.teacher, len(splits.seen_classes), in_channels), opts.teacher)


def run_grid(protocol: Protocol | Sequence[Protocol], methods: list[str], seeds: list[int],
             opts: RunOptions) -> list[dict]:
    """Every (sweep point, method, seed): teachers first (one per point and seed, shared by all methods),
    only where a run that needs it is not finished (teacher weights are not kept with the results)."""
    points = [protocol] if isinstance(protocol, Protocol) else list(protocol)
    if opts.jobs > 1 or opts.cluster:
        opts = RunOptions(**{**opts.__dict__, "progress": False})
    if not opts.teacher:
        distillers = [m for m in methods if get_method(m).needs_teacher]
        _execute([(_teacher_job, p, s, opts) for p in points for s in seeds
                  if any(finished(p, m, s, opts) is None for m in distillers)], opts, "teachers")
    return _execute([(run_one, p, m, s, opts) for p in points for s in seeds for m in methods], opts, "runs")
