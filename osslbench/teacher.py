"""Teachers: loaded from a checkpoint (``--teacher``), or trained by the harness once and cached.

A harness-trained teacher is an ordinary run of the ``supervised`` method on the protocol's
labelled set with the teacher architecture and ``train.teacher_epochs`` (RepDistiller's
``train_teacher.py`` schedule), kept in ``<out>/<protocol>/<scale>/teacher-<arch>/seed<k>`` and
keyed by the hash of everything it depends on; every method and later run reuses it, and an
interrupted teacher resumes like any run.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch

from .config import as_tree, config_hash
from .data.augment import normalize
from .data.dataset import RunData
from .device import autocast_context, seeded_init
from .errors import CheckpointError
from .evaluate import evaluate
from .fsio import RunLock, atomic_write, clear_folder
from .hardware import forward_mflop
from .models import build_model
from .models.base import Net
from .models.checkpoint import load_state, weights_sha256
from .protocol import Protocol
from .registry import get_method
from .results import RESULT, read_result, summarize, versions, write_result
from .trainer import Schedule, Trainer

WEIGHTS = "teacher.pt"


def teacher_config(protocol: Protocol, seed: int) -> dict:
    """What a harness-trained teacher depends on (its cache key is this tree's hash)."""
    return {"protocol": protocol.name, "scale": protocol.scale, "arch": protocol.models.teacher, "seed": seed,
            "data": as_tree(protocol.data), "split": as_tree(protocol.split),
            "train": as_tree(replace(protocol.train, epochs=protocol.train.teacher_epochs)),
            "optim": as_tree(protocol.optim)}


def teacher_dir(out: Path, protocol: Protocol, seed: int) -> Path:
    return protocol.folder(out) / f"teacher-{protocol.models.teacher}" / f"seed{seed}"


def _build(protocol: Protocol, data: RunData, seed: int) -> Net:
    with seeded_init(seed):  # also before loading weights: never touch torch's global generator
        return build_model(protocol.models.teacher, data.num_classes, data.in_channels)


def load_teacher_file(path: Path, protocol: Protocol, data: RunData, device: torch.device) -> tuple[Net, dict]:
    """A teacher from a checkpoint file (RepDistiller's or ours), evaluated on the protocol's test split."""
    if not Path(path).is_file():
        raise CheckpointError(f"teacher checkpoint {path} does not exist")
    model = _build(protocol, data, 0)
    load_state(model, path)
    cls = get_method("supervised")
    # evaluated as a run evaluates (its memory format and precision), so the same weights score the same whether
    # the harness trained them or a file holds them
    fmt = torch.channels_last if protocol.train.channels_last else torch.contiguous_format
    method = cls(cls.Config(), model).to(device=device, memory_format=fmt)
    prepare = lambda x: normalize(x.to(device), data.mean, data.std).contiguous(memory_format=fmt)  # noqa: E731
    m = evaluate(method, data.test_x, data.test_y, data.outlier_x, prepare, protocol.train.eval_batch_size,
                 autocast_context(device, protocol.train.amp, forward_mflop([model], tuple(data.test_x.shape[1:]))))
    record = {"source": "file", "path": str(path), "sha256": weights_sha256(path), "arch": protocol.models.teacher, **m}
    return model.cpu().to(memory_format=torch.contiguous_format), record


def get_teacher(protocol: Protocol, seed: int, data: RunData, out: Path, device: torch.device,
                teacher_path: str | None = None, progress: bool = True, overwrite: bool = False) -> tuple[Net, dict]:
    """The seed's teacher (frozen use is up to the method) and its record for ``result.json``, which names its
    weights by :func:`~osslbench.models.checkpoint.weights_sha256` (``sha256``)."""
    if teacher_path:
        return load_teacher_file(Path(teacher_path), protocol, data, device)
    folder = teacher_dir(out, protocol, seed)
    with RunLock(folder):  # runs of several methods (or processes) share a teacher: one trains it, the others wait
        return _cached_or_trained(protocol, seed, data, folder, device, progress, overwrite)


def _cached_or_trained(protocol: Protocol, seed: int, data: RunData, folder: Path, device: torch.device,
                       progress: bool, overwrite: bool) -> tuple[Net, dict]:
    cfg = teacher_config(protocol, seed)
    h = config_hash(cfg)
    done = read_result(folder / RESULT)
    model = _build(protocol, data, seed)
    if done is not None and done["config_hash"] == h and (folder / WEIGHTS).exists():
        load_state(model, folder / WEIGHTS)  # (teachers recorded before digests were: add it)
        return model, {**done["teacher"], "sha256": weights_sha256(folder / WEIGHTS)}
    if done is not None and done["config_hash"] != h and overwrite:
        clear_folder(folder)
    elif done is not None and done["config_hash"] != h:
        raise CheckpointError(f"{folder} holds a teacher of another config (hash {done['config_hash']} != {h}); "
                              "use another --out or --overwrite")
    model = _build(protocol, data, seed)
    method_cls = get_method("supervised")
    method = method_cls(method_cls.Config(), model)
    schedule = Schedule(epochs=protocol.train.teacher_epochs, train=protocol.train, optim=protocol.optim, seed=seed)
    t0 = time.perf_counter()
    trainer = Trainer(method, data, schedule, folder, h, device, desc=f"teacher {protocol.models.teacher}",
                      progress=progress)
    history = trainer.fit()
    summary = summarize(history, protocol.train.last_k)
    record = {"source": "trained", "arch": protocol.models.teacher, "config_hash": h,
              "top1": summary["top1_last"], "top5": summary["top5_last"], "train_s": summary["train_s"],
              "epochs": protocol.train.teacher_epochs, "precision": trainer.precision, "dir": str(folder)}
    model = model.cpu().to(memory_format=torch.contiguous_format)
    atomic_write(folder / WEIGHTS, lambda p: torch.save({"model": model.state_dict(), "arch": model.arch}, p))
    record["sha256"] = weights_sha256(folder / WEIGHTS)
    write_result(folder / RESULT, {"role": "teacher", "protocol": protocol.name, "scale": protocol.scale,
                                   "sweep": protocol.sweep,
                                   "seed": seed, "config_hash": h, "config": cfg, "teacher": record,
                                   "metrics": summary, "wall_s": time.perf_counter() - t0, **trainer.run_facts(),
                                   "versions": versions()})
    (folder / "checkpoint.pt").unlink(missing_ok=True)  # teacher.pt is the cache; the checkpoint was for resume
    return model, record
