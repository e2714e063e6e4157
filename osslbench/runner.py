"""The runner: grids of protocol x method x seed, in this process, in parallel (joblib) or on a
Dask cluster (joblib's ``dask`` backend); each run is skipped when its result already exists."""

from __future__ import annotations

import os
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
from .device import pick_device, seeded_init
from .errors import CheckpointError, ConfigError, HostError, OsslbenchError
from .fsio import RunLock, check_out_folder, clear_folder
from .memory import peak, reset_peak
from .method import Method, MethodConfig
from .models import build_model
from .models.checkpoint import load_state, weights_sha256
from .protocol import Protocol
from .registry import get_method, method_config, student_rules_of
from .results import RESULT, read_result, run_dir, summarize, versions, write_result
from .teacher import get_teacher, teacher_config
from .trainer import CHECKPOINT, METRICS, Schedule, Trainer

# Protocol keys that do not change a run's outcome, left out of its config hash.
_NOT_HASHED = {"description", "paper", "methods", "seeds", "scales", "source_file", "method", "sweep", "overrides",
               "student_rules"}


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
    rules = student_rules_of(cls, protocol)
    if rules:  # which of the student model's rules shaped this run (lr 0.01 for a ShuffleNet student, ...)
        tree["student_rules"] = {"model": protocol.models.student, **rules}
    if cls.needs_teacher:
        tree["teacher"] = {"path": teacher} if teacher else {"trained": config_hash(teacher_config(protocol, seed))}
    return tree


def finished(protocol: Protocol, method: str, seed: int, opts: RunOptions) -> dict | None:
    """The ``result.json`` of this run when it holds exactly this config, else None."""
    done = read_result(run_dir(opts.out, protocol, method, seed) / RESULT)
    h = config_hash(run_config(protocol, method, seed, opts.teacher))
    return done if done is not None and done["config_hash"] == h else None


def run_one(protocol: Protocol, method: str, seed: int, opts: RunOptions) -> dict:
    """Train and evaluate one (protocol, method, seed); returns its ``result.json`` content.

    The run folder is owned by this process while it runs (:class:`~osslbench.fsio.RunLock`): another process
    asking for the same run waits, then finds the result (same config) or refuses (another config).
    """
    folder = run_dir(opts.out, protocol, method, seed)
    with RunLock(folder):
        return _run_owned(protocol, method, seed, opts, folder)


def _run_owned(protocol: Protocol, method: str, seed: int, opts: RunOptions, folder: Path) -> dict:
    cls = get_method(method)
    cfg, optim = method_config(cls, protocol)
    tree = run_config(protocol, method, seed, opts.teacher)
    h = config_hash(tree)
    done = read_result(folder / RESULT)
    same = done is not None and done["config_hash"] == h
    other_teacher = _other_teacher(done, opts) if same else ""
    if same and not other_teacher:
        (folder / CHECKPOINT).unlink(missing_ok=True)  # left by a crash between the result and its clean-up
        return done
    if (done is not None or (folder / CHECKPOINT).exists()) and opts.overwrite:
        clear_folder(folder)
    elif other_teacher:
        raise CheckpointError(f"{folder} holds a result trained against {other_teacher}; use another --out or --overwrite")
    elif done is not None:
        raise CheckpointError(f"{folder} holds a result of another config (hash {done['config_hash']} != {h}); "
                              "use another --out or --overwrite")
    t0 = time.perf_counter()
    device = pick_device(opts.device)
    scope = reset_peak(device)
    splits = make_splits(protocol, seed, opts.data_root, opts.download)
    data = load_run_data(protocol, splits, opts.data_root, opts.download)
    teacher, teacher_record = (None, {})
    if cls.needs_teacher:
        teacher, teacher_record = get_teacher(protocol, seed, data, opts.out, device, opts.teacher, opts.progress, opts.overwrite)
    resuming = (folder / CHECKPOINT).exists()
    try:
        splits.save(folder / "splits.npz")
        with seeded_init(seed):
            student = build_model(protocol.models.student, data.num_classes, data.in_channels)
            m = cls(cfg, student, teacher, num_classes=data.num_classes, pool_size=len(data.unlabelled_x),
                    labelled_size=len(data.labelled_x), image_size=protocol.data.image_size)
        schedule = Schedule(epochs=protocol.train.epochs, train=protocol.train, optim=optim, seed=seed)
        trainer = Trainer(m, data, schedule, folder, h, device, desc=f"{method} s{seed}", progress=opts.progress,
                          cache_dir=protocol.folder(opts.out) / "teacher-cache",
                          teacher_sha256=teacher_record.get("sha256"))
        history = trainer.fit(stop_after=opts.stop_after)
    except BaseException:
        if not resuming and not (folder / CHECKPOINT).exists():  # nothing to resume from: leave nothing behind
            for name in ("splits.npz", METRICS):
                (folder / name).unlink(missing_ok=True)
        raise
    if len(history) < trainer.epochs:  # the protocol's epochs plus the method's init stage
        return {"incomplete": True, "epochs_done": len(history)}
    result = {
        "role": "student", "protocol": protocol.name, "scale": protocol.scale, "sweep": protocol.sweep,
        "overrides": protocol.overrides, "method": method, "seed": seed,
        "config_hash": h, "config": tree, "teacher": teacher_record, "metrics": summarize(history, protocol.train.last_k),
        "split": splits.summary()["sizes"], "wall_s": time.perf_counter() - t0, **trainer.run_facts(),
        "memory": peak(device, scope),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"), "versions": versions(),
    }
    write_result(folder / RESULT, result)
    (folder / CHECKPOINT).unlink(missing_ok=True)  # the result is final; the checkpoint was for resume
    return result


def _other_teacher(done: dict, opts: RunOptions) -> str:
    """Which other weights a finished run was trained against, when the ``--teacher`` file it names (its config
    holds the path) now holds other weights than its ``result.json`` records; '' when the same (or unrecorded)."""
    recorded = (done.get("teacher") or {}).get("sha256")
    if not (opts.teacher and recorded):
        return ""
    now = weights_sha256(opts.teacher)
    if now == recorded:
        return ""
    return f"other teacher weights than {opts.teacher} holds now (sha256 {recorded[:12]} != {now[:12]})"


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


def check_device(name: str) -> torch.device:
    """The device ``--device`` names, refused before any training: an unknown name is a :class:`ConfigError`
    (exit 2), a device this machine does not have is a :class:`HostError` (exit 3)."""
    try:
        device = pick_device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {name!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise HostError(f"--device {name}: no CUDA device is available on this machine "
                            f"(torch {torch.__version__}); use --device cpu or auto")
        if device.index is not None and device.index >= count:
            raise HostError(f"--device {name}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
        return device
    if device.type == "mps" and torch.backends.mps.is_available():
        return device
    raise HostError(f"--device {name}: no {device.type} device is available to torch here; use --device cpu or auto")


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
    """Fail before anything is written or trained: the device, every method's config, the data and the split of
    every seed, a ``--teacher`` checkpoint (given, so it must fit the protocol's teacher architecture, whether or
    not a method of this command uses it: a wrong path is a mistake found now, not at the next distiller's
    run), and an ``--out`` that can be written."""
    check_device(opts.device)
    for m in methods:
        cls = get_method(m)
        cfg, _ = method_config(cls, protocol)
        check_architectures(protocol, cls, cfg)
    for seed in seeds:
        splits = make_splits(protocol, seed, opts.data_root, opts.download)
    if opts.teacher:
        if not Path(opts.teacher).is_file():
            raise CheckpointError(f"teacher checkpoint {opts.teacher} does not exist")
        in_channels = load_run_data(protocol, splits, opts.data_root).in_channels
        load_state(build_model(protocol.models.teacher, len(splits.seen_classes), in_channels), opts.teacher)
    check_out_folder(opts.out)


def run_grid(protocol: Protocol | Sequence[Protocol], methods: list[str], seeds: list[int],
             opts: RunOptions) -> list[dict]:
    """Every (sweep point, method, seed): teachers first (one per point and seed, shared by all methods),
    only where a run that needs it is not finished (teacher weights are not kept with the results)."""
    points = [protocol] if isinstance(protocol, Protocol) else list(protocol)
    methods, seeds = list(dict.fromkeys(methods)), list(dict.fromkeys(seeds))  # one run each, never two at once
    if opts.jobs > 1 or opts.cluster:
        opts = RunOptions(**{**opts.__dict__, "progress": False})
    if not opts.teacher:
        distillers = [m for m in methods if get_method(m).needs_teacher]
        _execute([(_teacher_job, p, s, opts) for p in points for s in seeds
                  if any(finished(p, m, s, opts) is None for m in distillers)], opts, "teachers")
    return _execute([(run_one, p, m, s, opts) for p in points for s in seeds for m in methods], opts, "runs")
