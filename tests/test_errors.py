"""Every bad input or fault of issue 11 is one line on stderr, exit status 2 (input) or 3 (machine), and leaves
nothing written (or nothing lost); checkpoints are data, never code."""

from __future__ import annotations

import argparse
import ast
import errno
import json
import os
from pathlib import Path

import pytest
import torch

from osslbench import fsio
from osslbench.models import build_model

from helpers import run_cli

SMOKE = ["--scale", "smoke", "--quiet", "--set", "train.amp=false"]


def files(root: Path) -> dict[str, int]:
    """Every file under ``root`` with its size (what a command wrote)."""
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def one_error(err: str, code: int, expected: int, fragment: str) -> None:
    assert code == expected, err
    lines = [line for line in err.strip().splitlines() if " -> " not in line]  # run's banner: "osslbench: <what> -> <out>"
    assert len(lines) == 1 and lines[0].startswith("osslbench: error: "), err
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in err


class Exec:
    """Unpickling this calls ``exec``: what a poisoned checkpoint carries."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self):
        return (exec, (self.code,))


# --- code execution ----------------------------------------------------------------------------------------------

def test_poisoned_teacher_file_is_refused_and_runs_nothing(capsys, tmp_path):
    marker = tmp_path / "pwned"
    poisoned = tmp_path / "teacher_last.pth"
    state = build_model("cnn-large", 6, 1).state_dict()
    torch.save({"model": state, "opt": argparse.Namespace(model="cnn-large"),
                "x": Exec(f"open({str(marker)!r}, 'w').write('ran')")}, poisoned)
    before = files(tmp_path)
    code, _, err = run_cli(capsys, "run", "--methods", "kd", "--teacher", str(poisoned), "--out", str(tmp_path / "o"),
                           *SMOKE)
    one_error(err, code, 2, "it references 'exec', which could run code")
    assert not marker.exists() and files(tmp_path) == before


def test_repdistiller_last_checkpoint_with_namespace_loads(capsys, tmp_path):
    """RepDistiller's ``*_last.pth``: ``{"opt": Namespace, "model": state_dict}``: allowed, not a fallback."""
    path = tmp_path / "cnn-large_last.pth"
    torch.save({"opt": argparse.Namespace(model="cnn-large", lr_decay_epochs=[150, 180, 210]),
                "model": build_model("cnn-large", 6, 1).state_dict()}, path)
    from osslbench.models import load_state

    meta = load_state(build_model("cnn-large", 6, 1), path)
    assert meta["opt"].lr_decay_epochs == [150, 180, 210]


def test_poisoned_resume_checkpoint_is_refused_and_kept(capsys, tmp_path):
    out = tmp_path / "o"
    code, _, err = run_cli(capsys, "run", "--methods", "supervised", "--out", str(out), *SMOKE,
                           "--set", "train.epochs=3")
    assert code == 0, err
    folder = out / "digits-openset" / "smoke" / "supervised" / "seed0"
    (folder / "result.json").unlink()
    marker = tmp_path / "pwned"
    torch.save({"epoch": 1, "config_hash": "x", "evil": Exec(f"open({str(marker)!r}, 'w')")}, folder / "checkpoint.pt")
    before = files(out)
    code, _, err = run_cli(capsys, "run", "--methods", "supervised", "--out", str(out), *SMOKE, "--set", "train.epochs=3")
    one_error(err, code, 2, "checkpoint.pt: it references 'exec'")
    assert not marker.exists() and files(out) == before  # refused, never overwritten


def test_project_never_loads_without_weights_only():
    """Every ``torch.load`` call in the project's code (parsed, not grepped) passes ``weights_only=True`` literally:
    a file it reads is data, never code (left to torch's default or set from a variable, it fails here)."""
    root = Path(__file__).resolve().parents[1]
    calls, offenders = 0, []
    for path in [*root.glob("osslbench/**/*.py"), *root.glob("baselines/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                calls += 1
                flag = next((k.value for k in node.keywords if k.arg == "weights_only"), None)
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    offenders.append(f"{path.relative_to(root)}:{node.lineno}")
    assert calls >= 4 and offenders == []  # checkpoints (safe_load), both teacher caches' files


# --- one line, exit 2, nothing written -----------------------------------------------------------------------------

BAD_PROTOCOL = {
    "non_utf8": (b"description = \"caf\xe9\"\n", "not UTF-8 text (byte 0xe9 at offset 18)"),
    "typo_method_table": (b'extends = "digits-openset"\n[method.kdd]\nalpha = 5\n', "unknown method 'kdd'; did you mean 'kd'?"),
    "unused_method_key": (b'extends = "digits-openset"\nmethods = ["supervised"]\n[method.srd]\nbetta = 1\n',
                          "method.srd: unknown key 'betta'"),
    "other_scale_typo": (b'extends = "digits-openset"\n[scales.smoke]\ntrain = {epohcs = 2}\n',
                         "[scales.smoke].train: unknown key 'epohcs'"),
    "unknown_student": (b'extends = "digits-openset"\n[models]\nstudent = "wrn-16-3"\n',
                        "student = 'wrn-16-3' is not a known model; did you mean"),
    "seed_range": (b'extends = "digits-openset"\nseeds = [0, 4294967296]\n', "seeds: 4294967296 is outside [0, 2**32)"),
    "nan_lr": (b'extends = "digits-openset"\n[optim]\nlr = nan\n', "optim.lr: expected a finite number, got nan"),
}


@pytest.mark.parametrize("case", sorted(BAD_PROTOCOL))
def test_bad_protocol_file_is_one_line(capsys, tmp_path, monkeypatch, case):
    text, fragment = BAD_PROTOCOL[case]
    (tmp_path / "mine.toml").write_bytes(text)
    monkeypatch.chdir(tmp_path)
    before = files(tmp_path)
    code, _, err = run_cli(capsys, "run", "--protocol", "mine.toml", "--scale", "full", "--out", "o", "--quiet")
    one_error(err, code, 2, fragment)
    assert files(tmp_path) == before


@pytest.mark.parametrize(
    ("argv", "status", "fragment"),
    [
        (["run", "--seeds", "-1"], 2, "--seeds: seed -1 is outside [0, 2**32)"),
        (["run", "--seeds", ","], 2, "--seeds ',': no seed given"),
        (["run", "--seeds", "12345678901234567890"], 2, "seed 12345678901234567890 is outside"),
        (["splits", "--protocol", "digits-openset", "--seed", "-1"], 2, "--seed: seed -1 is outside"),
        (["run", "--device", "tpu"], 2, "--device 'tpu' is not a device"),
        (["run", "--set", "method.kdd.alpha=5"], 2, "method.kdd (a [method.kdd] table or --set method.kdd.*)"),
        (["run", "--set", "method.kd.temperature=0"], 2, "method.kd: temperature = 0.0 must be > 0"),
        (["run", "--methods", "supervised", "--teacher", "missing.pth"], 2, "teacher checkpoint missing.pth does not exist"),
        (["run", "--set", "models.student=wrn-16-3"], 2, "student = 'wrn-16-3' is not a known model"),
        (["run", "--jobs", "0"], 2, "--jobs 0: must be >= 1"),
        (["run", "--threads", "-1"], 2, "--threads -1: must be >= 0"),
        (["run", "--set", "train.epochs=ten"], 2, "--set: train.epochs: expected int, got 'ten'"),
        (["show", "digits-openset", "--set", "method.srd.betta=1"], 2, "method.srd: unknown key 'betta'"),
    ],
)
def test_bad_command_line_is_one_line_and_writes_nothing(capsys, tmp_path, monkeypatch, argv, status, fragment):
    monkeypatch.chdir(tmp_path)
    extra = ["--out", "o", "--data-root", "no-data", *SMOKE] if argv[0] == "run" else []
    code, _, err = run_cli(capsys, *argv, *extra)
    one_error(err, code, status, fragment)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_missing_gpu_is_exit_3(capsys, tmp_path, device):
    code, _, err = run_cli(capsys, "run", "--device", device, "--out", str(tmp_path / "o"), *SMOKE)
    one_error(err, code, 3, f"--device {device}: no CUDA device is available")
    assert list(tmp_path.iterdir()) == []


def test_bad_teacher_is_an_error_even_when_no_method_uses_it(capsys, tmp_path):
    wrong = tmp_path / "wrong.pth"
    torch.save({"model": build_model("cnn-small", 6, 1).state_dict()}, wrong)
    code, _, err = run_cli(capsys, "run", "--methods", "supervised", "--teacher", str(wrong), "--out", str(tmp_path / "o"),
                           *SMOKE)
    one_error(err, code, 2, "does not fit cnn-large")
    assert not (tmp_path / "o").exists()


def test_protocol_named_like_a_builtin_is_refused(capsys, tmp_path):
    (tmp_path / "digits-openset.toml").write_text('extends = "digits-openset"\n[train]\nepochs = 3\n')
    code, _, err = run_cli(capsys, "run", "--protocol", str(tmp_path / "digits-openset.toml"), "--out",
                           str(tmp_path / "o"), *SMOKE)
    one_error(err, code, 2, "named like the built-in protocol 'digits-openset'")
    assert not (tmp_path / "o").exists()


def test_extends_is_relative_to_the_extending_file(capsys, tmp_path, monkeypatch):
    folder = tmp_path / "protos"
    folder.mkdir()
    (folder / "base.toml").write_text('extends = "digits-openset"\n[train]\nepochs = 7\n')
    (folder / "child.toml").write_text('extends = "base.toml"\n[optim]\nlr = 0.01\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, out, err = run_cli(capsys, "show", str(folder / "child.toml"), "--scale", "full")
    assert code == 0, err
    shown = json.loads(out)
    assert shown["train"]["epochs"] == 7 and shown["optim"]["lr"] == 0.01 and shown["name"] == "child"


def test_file_as_out_is_exit_2(capsys, tmp_path):
    (tmp_path / "o").write_text("not a folder")
    code, _, err = run_cli(capsys, "run", "--methods", "supervised", "--out", str(tmp_path / "o" / "x"), *SMOKE)
    one_error(err, code, 2, "is a file, not a folder")
    assert files(tmp_path) == {"o": 12}


def read_only(monkeypatch) -> None:
    """Make every write through osslbench.fsio fail as on a read-only mount (the tests run as root, for whom
    permission bits do not stop writes)."""
    def refuse(folder: Path, name: str) -> Path:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(folder))

    monkeypatch.setattr(fsio, "_temp_in", refuse)


def test_read_only_out_is_exit_3_before_training(capsys, tmp_path, monkeypatch):
    read_only(monkeypatch)
    code, _, err = run_cli(capsys, "run", "--methods", "supervised", "--out", str(tmp_path / "o"), *SMOKE)
    one_error(err, code, 3, "Read-only file system; choose a writable --out")
    assert list(tmp_path.iterdir()) == []


def fake_results(out: Path) -> None:
    """Two finished runs, as ``run`` leaves them (for the read-only commands)."""
    for method, top1 in (("supervised", 80.0), ("kd", 85.0)):
        folder = out / "digits-openset" / "smoke" / method / "seed0"
        folder.mkdir(parents=True)
        metrics = {"top1_last": top1, "top1_lastk": top1, "top5_last": 99.0, "auroc_last": 70.0, "auroc_lastk": 70.0,
                   "train_s": 1.0, "hook_s": 0.0}
        (folder / "result.json").write_text(json.dumps({
            "role": "student", "protocol": "digits-openset", "scale": "smoke", "sweep": {}, "method": method, "seed": 0,
            "config_hash": "abc", "teacher": {}, "metrics": metrics, "split": {}}))
        (folder / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "top1": top1}) + "\n")


def test_leaderboard_and_plot_on_read_only_results(capsys, tmp_path, monkeypatch):
    fake_results(tmp_path)
    before = files(tmp_path)
    read_only(monkeypatch)
    code, out, err = run_cli(capsys, "leaderboard", "--out", str(tmp_path))
    assert code == 0 and "kd" in out and "supervised" in out
    assert err.count("\n") == 1 and err.startswith("osslbench: warning: cannot write") and "printing the leaderboard only" in err
    code, _, err = run_cli(capsys, "plot", "--out", str(tmp_path))
    one_error(err, code, 3, "Read-only file system")
    assert files(tmp_path) == before


def test_truncated_result_is_named(capsys, tmp_path):
    fake_results(tmp_path)
    result = tmp_path / "digits-openset" / "smoke" / "kd" / "seed0" / "result.json"
    result.write_text(result.read_text()[:40])
    code, _, err = run_cli(capsys, "leaderboard", "--out", str(tmp_path))
    one_error(err, code, 2, f"{result} is damaged (JSONDecodeError")


def test_a_killed_write_leaves_the_old_file_whole(tmp_path):
    target = tmp_path / "leaderboard.csv"
    fsio.atomic_write_text(target, "old,table\n")

    def dies_half_way(p: Path) -> None:
        p.write_text("new,ta")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fsio.atomic_write(target, dies_half_way)
    assert target.read_text() == "old,table\n" and [p.name for p in tmp_path.iterdir()] == ["leaderboard.csv"]


def test_disk_full_is_exit_3_and_leaves_no_temporary(capsys, tmp_path, monkeypatch):
    real_save = torch.save

    def full_disk(obj, f, *a, **k):  # what torch.save raises when the disk fills: a RuntimeError from its zip writer
        real_save(obj, f, *a, **k)
        Path(f).write_bytes(b"PK\x03\x04partial")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full_disk)
    out = tmp_path / "o"
    code, _, err = run_cli(capsys, "run", "--methods", "supervised", "--out", str(out), *SMOKE)
    one_error(err, code, 3, "checkpoint.pt: the write failed")
    assert [p for p in files(tmp_path) if p.endswith(".tmp") or "checkpoint" in p] == []
    assert not any(p.endswith("splits.npz") for p in files(tmp_path))  # nothing to resume: nothing left


def test_duplicate_seeds_and_methods_are_one_run(tmp_path):
    from osslbench.cli import _seeds
    from osslbench.config import parse_overrides
    from osslbench.protocol_loader import load_protocol
    from osslbench.registry import resolve_method_names
    from osslbench.runner import RunOptions, run_grid

    assert _seeds("0,0,1,0", [5]) == [0, 1]
    protocol = load_protocol("digits-openset", "smoke", parse_overrides(["train.amp=false", "seeds=[1, 1]"]))
    assert protocol.seeds == [1] and resolve_method_names("supervised,supervised", protocol) == ["supervised"]
    results = run_grid(protocol, ["supervised", "supervised"], [0, 0], RunOptions(data_root=tmp_path, out=tmp_path,
                                                                                  jobs=2, progress=False, threads=1))
    assert len(results) == 1 and results[0]["seed"] == 0


# --- NaN: one line naming epoch, step and term; resumable from the last good checkpoint ----------------------------

def test_nan_loss_names_epoch_step_term_and_stays_resumable(capsys, tmp_path, monkeypatch):
    from osslbench.baselines.supervised import Supervised

    out = tmp_path / "o"
    argv = ["run", "--methods", "supervised", "--out", str(out), *SMOKE, "--set", "train.epochs=3"]
    code, _, err = run_cli(capsys, *[a if a != str(out) else str(tmp_path / "whole") for a in argv])
    assert code == 0, err
    whole = json.loads((tmp_path / "whole" / "digits-openset" / "smoke" / "supervised" / "seed0" / "result.json").read_text())
    real = Supervised.losses

    def nan_in_epoch_2(self, batch):
        terms = real(self, batch)
        if batch.epoch == 1 and batch.step == batch.epoch * batch.steps_per_epoch + 1:
            terms["ce"] = terms["ce"] * float("nan")
        return terms

    monkeypatch.setattr(Supervised, "losses", nan_in_epoch_2)
    code, _, err = run_cli(capsys, *argv)
    one_error(err, code, 2, "loss ce = nan at epoch 2, step 2 of 12; the run resumes from epoch 1")
    folder = out / "digits-openset" / "smoke" / "supervised" / "seed0"
    assert torch.load(folder / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert len((folder / "metrics.jsonl").read_text().splitlines()) == 1 and not (folder / "result.json").exists()
    monkeypatch.setattr(Supervised, "losses", real)
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    resumed = json.loads((folder / "result.json").read_text())
    assert resumed["metrics"]["top1_last"] == whole["metrics"]["top1_last"]
    assert resumed["metrics"]["auroc_last"] == whole["metrics"]["auroc_last"]


def test_huge_learning_rate_is_one_line_and_leaves_nothing(capsys, tmp_path):
    code, _, err = run_cli(capsys, "run", "--methods", "supervised", "--out", str(tmp_path / "o"), *SMOKE,
                           "--set", "optim.lr=1e6")
    one_error(err, code, 2, "loss ce = nan at epoch ")
    folder = tmp_path / "o" / "digits-openset" / "smoke" / "supervised" / "seed0"
    assert "lower optim.lr" in err and not (folder / "result.json").exists()
