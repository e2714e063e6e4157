"""The command line: verbs, one-line errors with exit status 2 that write nothing, an end-to-end run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from osslbench.models import build_model

from helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["--scale", "smoke", "--quiet"]


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["run", "--protocol", "nope"], "unknown protocol 'nope'"),
        (["run", "--methods", "kd,bogus"], "unknown method 'bogus'"),
        (["run", "--scale", "huge"], "unknown scale 'huge'"),
        (["run", "--set", "split.mismatch=2"], "outside [0, 1]"),
        (["run", "--set", "train.epochs"], "expected key=value"),
        (["run", "--set", "split.labels_per_class=500"], "labels_per_class = 500 but class '0' of digits:train has only"),
        (["run", "--seeds", "a,b"], "--seeds 'a,b'"),
        (["run", "--protocol", "cifar100-tinyimagenet", "--scale", "smoke"], "cifar-100-python"),
        (["run", "--methods", "srd", "--teacher", "missing.pth"], "does not exist"),
        (["run", "--bogus-flag"], "unrecognized arguments"),
        (["list", "things"], "invalid choice"),
        (["run", "--sweep", "mismatsch=0,1"], "--sweep: unknown key 'mismatsch'"),
        (["run", "--methods", "fixmatch", "--set", "method.fixmatch.mu=0"], "fixmatch needs unlabelled data"),
        (["run", "--sweep", "mismatch=0,2"], "mismatch = 2.0 is outside [0, 1]"),
        (["run", "--protocol", "cifar100-seen50", "--scale", "smoke"], "cifar-100-python"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(capsys, tmp_path, monkeypatch, argv, fragment):
    monkeypatch.chdir(tmp_path)
    out_dir = tmp_path / "out"
    extra = ["--out", str(out_dir), "--data-root", str(tmp_path / "no-data")] if argv[0] == "run" else []
    code, _, err = run_cli(capsys, *argv, *extra)
    assert code == 2
    assert fragment in err
    assert len(err.strip().splitlines()) == 1, err
    assert not out_dir.exists() and list(tmp_path.iterdir()) == []


def test_wrong_teacher_checkpoint_is_refused_before_anything_is_written(capsys, tmp_path):
    wrong = tmp_path / "wrong.pth"
    torch.save({"model": build_model("cnn-small", 6, 1).state_dict()}, wrong)  # protocol's teacher is cnn-large
    code, _, err = run_cli(capsys, "run", "--methods", "srd", "--teacher", str(wrong), "--out", str(tmp_path / "o"),
                           *SMOKE)
    assert code == 2 and "does not fit cnn-large" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_list_show_splits(capsys):
    code, out, _ = run_cli(capsys, "list", "methods")
    assert code == 0 and {"supervised", "kd", "srd", "fixmatch"} <= {line.split()[0] for line in out.splitlines()}
    code, out, _ = run_cli(capsys, "list", "protocols")
    assert "digits-openset" in out and "cifar100-tinyimagenet" in out
    code, out, _ = run_cli(capsys, "list", "models")
    assert "wrn-40-2" in out and "resnet8x4" in out
    code, out, _ = run_cli(capsys, "show", "cifar100-tinyimagenet", "--scale", "mini", "--set", "method.srd.beta=3")
    shown = json.loads(out)
    assert shown["scale"] == "mini" and shown["models"]["student"] == "wrn-16-1" and shown["method"]["srd"]["beta"] == 3
    assert shown["method"]["fixmatch"]["mu"] == 2 and shown["method"]["fixmatch"]["optim"]["nesterov"] is True
    code, out, _ = run_cli(capsys, "splits", "--protocol", "digits-openset", "--seed", "1")
    splits = json.loads(out)
    assert splits["sizes"]["labelled"] == 60 and splits["unseen_classes"] == ["6", "7", "8", "9"]
    assert splits["classes"]["labelled"] == ["0", "1", "2", "3", "4", "5"] == splits["classes"]["test"]
    assert splits["classes"]["unlabelled_unseen"] == ["6", "7", "8", "9"] == splits["classes"]["outlier_test"]


def test_splits_of_the_paper_protocol_on_real_data(capsys, real_data):
    code, out, err = run_cli(capsys, "splits", "--protocol", "cifar100-tinyimagenet", "--data-root", str(real_data))
    assert code == 0, err
    s = json.loads(out)
    n_tin = sum(1 for _ in (real_data / "tiny-imagenet-200" / "train").glob("*/images/*.JPEG"))
    n_val = sum(1 for _ in (real_data / "tiny-imagenet-200" / "val" / "images").glob("*.JPEG"))
    assert s["sizes"] == {"labelled": 50000, "unlabelled_seen": 0, "unlabelled_unseen": n_tin, "test": 10000,
                          "outlier_test": n_val}
    wnids = (real_data / "tiny-imagenet-200" / "wnids.txt").read_text().split()
    assert len(s["classes"]["labelled"]) == 100 and sorted(s["classes"]["unlabelled_unseen"]) == sorted(wnids)


@pytest.mark.slow
def test_end_to_end_smoke_run_and_leaderboard(capsys, tmp_path):
    out = tmp_path / "out"
    code, printed, err = run_cli(capsys, "run", "--out", str(out), "--seeds", "0,1", *SMOKE)
    assert code == 0, err
    assert "| digits-openset | smoke" in printed
    table = (out / "digits-openset" / "leaderboard.csv").read_text().splitlines()
    assert table[0].startswith("protocol,scale,method,top1_last")
    assert len(table) == 1 + 4 and all(",2," in row for row in table[1:])  # 4 methods, 2 seeds each
    for method in ("supervised", "kd", "srd", "fixmatch"):
        for seed in (0, 1):
            assert (out / "digits-openset" / "smoke" / method / f"seed{seed}" / "result.json").exists()
    code, printed, _ = run_cli(capsys, "leaderboard", "--out", str(out))
    assert code == 0 and printed.splitlines()[0] == table[0]
    code, printed, _ = run_cli(capsys, "plot", "--out", str(out))
    assert code == 0 and all(Path(p).exists() for p in printed.split())


def test_sweep_runs_every_point_and_keeps_the_ratio(capsys, tmp_path):
    out = tmp_path / "out"
    code, printed, err = run_cli(capsys, "run", "--out", str(out), "--methods", "supervised,kd",
                                 "--sweep", "mismatch=0,1", *SMOKE)
    assert code == 0, err
    import pandas as pd

    table = pd.read_csv(out / "digits-openset" / "leaderboard.csv")
    assert sorted(zip(table["sweep_mismatch"], table["method"], strict=True)) == [
        (0.0, "kd"), (0.0, "supervised"), (1.0, "kd"), (1.0, "supervised")]
    assert (table["mismatch"] == table["sweep_mismatch"]).all()  # the pools really have those ratios
    for r in ("0.0", "1.0"):
        point = out / "digits-openset" / "smoke" / f"mismatch={r}"
        assert (point / "kd" / "seed0" / "result.json").exists()
        assert (point / "teacher-cnn-large" / "seed0" / "teacher.pt").exists()
        result = json.loads((point / "kd" / "seed0" / "result.json").read_text())
        assert result["sweep"] == {"mismatch": float(r)}
        assert result["config"]["protocol"]["split"]["mismatch"] == float(r)
    code, printed, _ = run_cli(capsys, "plot", "--out", str(out))
    names = sorted(Path(p).name for p in printed.split())
    assert code == 0 and "smoke_sweep_mismatch.png" in names and "smoke_mismatch=0.0_curves.png" in names
    # a second identical command finds every result and trains nothing
    results = sorted(out.rglob("result.json"))
    stamps = [p.stat().st_mtime_ns for p in results]
    code, _, err = run_cli(capsys, "run", "--out", str(out), "--methods", "supervised,kd",
                           "--sweep", "mismatch=0,1", *SMOKE)
    assert code == 0 and len(results) == 6  # 2 points x (teacher + 2 methods)
    assert [p.stat().st_mtime_ns for p in results] == stamps


@pytest.mark.slow
def test_non_editable_install_finds_protocols_and_baselines(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(ROOT)], check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = ("import osslbench, osslbench.protocol_loader as p, osslbench.registry as r;"
            "assert str(target) in osslbench.__file__, osslbench.__file__;"
            "print(sorted(p.protocol_files()), sorted(r.methods()))").replace("target", repr(str(target)))
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "digits-openset" in done.stdout and "'srd'" in done.stdout and "'fixmatch'" in done.stdout
