"""Trainer: resume equals uninterrupted, checkpoints are refused when they do not match, schedules."""

from __future__ import annotations

import json

import pytest
import torch

from osslbench.config import parse_overrides
from osslbench.errors import CheckpointError
from osslbench.protocol import OptimConfig, lr_factor
from osslbench.protocol_loader import load_protocol
from osslbench.registry import methods
from osslbench.runner import RunOptions, run_grid, run_one

SMALL = ["train.epochs=4", "train.teacher_epochs=2", "train.iters_per_epoch=4", "train.last_k=2"]


def timeless(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.endswith("_s")} for row in history]


def metrics(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", sorted(methods()))
def test_resumed_run_equals_uninterrupted(tmp_path, method):
    """Every method, built-in or new: its own state (EMA, moving averages, selection) survives a restart, and
    it draws its randomness from ``Batch.gen``, never torch's global generator (which would break both this
    and runs sharing a process)."""
    protocol = load_protocol("digits-openset", None, parse_overrides(SMALL))
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    whole = run_one(protocol, method, 0, RunOptions(data_root=tmp_path, out=tmp_path / "a", progress=False))
    assert torch.equal(torch.random.get_rng_state(), before), f"{method} used torch's global generator"
    opts = RunOptions(data_root=tmp_path, out=tmp_path / "b", progress=False, stop_after=2)
    partial = run_one(protocol, method, 0, opts)
    folder = tmp_path / "b" / "digits-openset" / "full" / method / "seed0"
    assert partial == {"incomplete": True, "epochs_done": 2}
    assert (folder / "checkpoint.pt").exists() and len(metrics(folder)) == 2
    resumed = run_one(protocol, method, 0, RunOptions(data_root=tmp_path, out=tmp_path / "b", progress=False))
    assert resumed["metrics"]["top1_last"] == whole["metrics"]["top1_last"]
    assert resumed["metrics"]["auroc_last"] == whole["metrics"]["auroc_last"]
    assert timeless(metrics(folder)) == timeless(metrics(tmp_path / "a" / "digits-openset" / "full" / method / "seed0"))
    assert not (folder / "checkpoint.pt").exists()  # a finished run keeps its result, not its checkpoint


def test_finished_run_is_reused_and_other_config_refused(tmp_path):
    protocol = load_protocol("digits-openset", None, parse_overrides(SMALL))
    opts = RunOptions(data_root=tmp_path, out=tmp_path, progress=False)
    first = run_one(protocol, "supervised", 0, opts)
    assert run_one(protocol, "supervised", 0, opts) == first  # same config: not run again
    other = load_protocol("digits-openset", None, parse_overrides([*SMALL, "optim.lr=0.2"]))
    with pytest.raises(CheckpointError, match="another config"):
        run_one(other, "supervised", 0, opts)
    overwritten = run_one(other, "supervised", 0, RunOptions(data_root=tmp_path, out=tmp_path, progress=False,
                                                             overwrite=True))
    assert overwritten["config_hash"] != first["config_hash"]


def test_finished_distillers_do_not_retrain_their_teacher(tmp_path):
    """teacher.pt is not committed with the results: a clone that has every distiller's result trains nothing."""
    protocol = load_protocol("digits-openset", None, parse_overrides(SMALL))
    opts = RunOptions(data_root=tmp_path, out=tmp_path, progress=False)
    first = run_grid(protocol, ["kd", "srd"], [0], opts)
    teacher = tmp_path / "digits-openset" / "full" / "teacher-cnn-large" / "seed0"
    (teacher / "teacher.pt").unlink()
    assert run_grid(protocol, ["kd", "srd"], [0], opts) == first
    assert not (teacher / "teacher.pt").exists()
    # a distiller still to run gets its teacher (retrained from the same seed: the same weights)
    (tmp_path / "digits-openset" / "full" / "kd" / "seed0" / "result.json").unlink()
    again = run_grid(protocol, ["kd", "srd"], [0], opts)
    assert (teacher / "teacher.pt").exists()
    assert again[0]["metrics"]["top1_last"] == first[0]["metrics"]["top1_last"]


def test_checkpoint_of_other_config_is_refused_on_resume(tmp_path):
    protocol = load_protocol("digits-openset", None, parse_overrides(SMALL))
    run_one(protocol, "supervised", 0, RunOptions(data_root=tmp_path, out=tmp_path, progress=False, stop_after=1))
    other = load_protocol("digits-openset", None, parse_overrides([*SMALL, "optim.lr=0.2"]))
    with pytest.raises(CheckpointError, match="written by another config"):
        run_one(other, "supervised", 0, RunOptions(data_root=tmp_path, out=tmp_path, progress=False))


def test_result_is_traceable(tmp_path):
    protocol = load_protocol("digits-openset", None, parse_overrides(SMALL))
    r = run_one(protocol, "kd", 0, RunOptions(data_root=tmp_path, out=tmp_path, progress=False))
    folder = tmp_path / "digits-openset" / "full" / "kd" / "seed0"
    saved = json.loads((folder / "result.json").read_text())
    assert saved == json.loads(json.dumps(r))
    assert saved["config"]["method"]["alpha"] == 0.9 and saved["config"]["protocol"]["scale"] == "full"
    assert saved["teacher"]["source"] == "trained" and 0 <= saved["teacher"]["top1"] <= 100
    assert set(saved["metrics"]) >= {"top1_last", "top1_lastk", "top5_last", "auroc_last", "auroc_lastk"}
    assert (folder / "splits.npz").exists() and saved["versions"]["torch"]
    teacher_dir = tmp_path / "digits-openset" / "full" / "teacher-cnn-large" / "seed0"
    assert (teacher_dir / "teacher.pt").exists()  # cached and reused by every method of this seed


def test_learning_rate_schedules():
    multi = OptimConfig(schedule="multistep", milestones=[0.5, 0.75], gamma=0.1)
    assert [lr_factor(multi, k, 100) for k in (0, 49, 50, 74, 75, 99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    cosine = OptimConfig(schedule="cosine")
    assert lr_factor(cosine, 0, 100) == 1.0
    assert lr_factor(cosine, 100, 100) == pytest.approx(0.19509, abs=1e-4)  # cos(7 pi / 16), FixMatch
