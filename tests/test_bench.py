"""``osslbench bench``: both pipelines run the same work and the report has every field."""

from __future__ import annotations

import json
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from osslbench.bench import SHARES, BenchOptions, StepClock, _rounds, format_report, run_bench
from osslbench.cli import main
from osslbench.config import parse_overrides
from osslbench.errors import OsslbenchError
from osslbench.protocol_loader import load_protocol
from osslbench.teacher_view_cache import mean_hit_rate

PIPELINE_FIELDS = {"images", "steps", "seconds", "img_per_s", "step_s", "shares", "precision", "gflop_per_step",
                   "gflop_per_image", "gflop_per_s", "memory_format", "os_share", "faults_per_step"}


@pytest.mark.parametrize("method", ["srd", "kd", "fixmatch"])
def test_both_pipelines_run_the_same_images_and_report_every_field(tmp_path, method):
    protocol = load_protocol("digits-openset", None, parse_overrides(["data.flip=true"]))
    r = run_bench(protocol, method, BenchOptions(data_root=tmp_path, steps=3, warmup=1, workers=0))
    ours, ref = r["osslbench"], r["reference"]
    n_ulb = round(protocol.method.get(method, {}).get("mu", 1.0) * protocol.train.batch_size)
    assert ours["images"] == ref["images"] == 3 * (protocol.train.batch_size + n_ulb)
    assert ours["steps"] == ref["steps"] == 3
    # 3 timed steps in 3 rounds (4 asked, no empty round), the two pipelines taking turns
    assert r["rounds"] == 3 and len(r["round_ratios"]) == 3 and all(x > 0 for x in r["round_ratios"])
    for p in (ours, ref):
        assert set(p) >= PIPELINE_FIELDS and set(p["shares"]) == set(SHARES)
        assert sum(p["shares"].values()) == pytest.approx(1.0, abs=1e-3)
        assert all(v >= -1e-3 for v in p["shares"].values())
        assert p["gflop_per_step"] > 0 and p["img_per_s"] > 0
        assert p["img_per_s"] == pytest.approx(p["images"] / p["seconds"], rel=1e-2)
        assert 0.0 <= p["os_share"] <= 1.0 and p["faults_per_step"] >= 0
    assert ref["precision"] == "fp32" and ref["memory_format"] == "contiguous" and ref["workers"] == 0
    assert r["ratio"] == pytest.approx(ours["img_per_s"] / ref["img_per_s"], rel=1e-2)
    assert ours["teacher_cache"]["used"] is (method != "fixmatch")
    if method != "fixmatch":  # the cache removes the unlabelled half of the teacher's forward pass
        assert ours["gflop_per_step"] < ref["gflop_per_step"]
        assert r["osslbench"]["shares"]["teacher"] > 0 and r["reference"]["shares"]["teacher"] > 0
    assert {"device_model", "threads", "epoch_s", "epoch_iters", "torch"} <= set(r)
    labelled = ours["teacher_cache_labelled"]
    assert labelled["used"] is (method != "fixmatch")
    if labelled["used"]:  # stored beforehand: a whole run's mean share of its labelled draws
        assert 0.0 < labelled["share_stored"] < 1.0 and 0.0 <= labelled["hit_rate"] <= 1.0
        assert labelled["views"] == 18 and labelled["run_draws_per_image"] > 0
    text = format_report(r)
    assert "ratio osslbench / reference" in text and "CPU time in the kernel: osslbench" in text
    assert ("stored as pooled" in text) is (method != "fixmatch")  # KD's logits too: classifier of the pooled vector


@pytest.mark.parametrize(("share", "low", "high"), [(1.0, 1.0, 1.0), (0.0, 0.0, 0.2)])
def test_bench_times_the_labelled_view_cache_at_the_share_asked(tmp_path, share, low, high):
    """Every labelled view of the timed steps stored beforehand: all served; none: only repeats of a view."""
    protocol = load_protocol("digits-openset", None, parse_overrides(["data.flip=true"]))
    opts = BenchOptions(data_root=tmp_path, steps=3, warmup=1, workers=0, reference=False, labelled_hit_rate=share)
    labelled = run_bench(protocol, "srd", opts)["osslbench"]["teacher_cache_labelled"]
    assert labelled["share_stored"] == share and low <= labelled["hit_rate"] <= high
    assert "labelled-view cache: served" in format_report(run_bench(protocol, "kd", opts))


def test_bench_times_a_later_run_of_a_grid(tmp_path):
    """--prior-runs 1: the labelled views stored are the mean share of a run after one whole earlier run."""
    protocol = load_protocol("digits-openset", None, parse_overrides(["data.flip=true"]))
    opts = BenchOptions(data_root=tmp_path, steps=2, warmup=0, workers=0, reference=False)
    first = run_bench(protocol, "srd", opts)
    later = run_bench(protocol, "srd", replace(opts, prior_runs=1))
    a, b = (r["osslbench"]["teacher_cache_labelled"] for r in (first, later))
    d, v = a["run_draws_per_image"], a["views"]
    assert (a["prior_runs"], b["prior_runs"]) == (0, 1)
    assert b["share_stored"] == pytest.approx(mean_hit_rate(d, v, prior_draws=d), abs=1e-3)
    assert b["share_stored"] > a["share_stored"] == pytest.approx(mean_hit_rate(d, v), abs=1e-3)
    assert "whole run's mean after 1 earlier runs" in format_report(later)
    with pytest.raises(OsslbenchError, match="--prior-runs must be >= 0"):
        run_bench(protocol, "srd", replace(opts, prior_runs=-1))
    with pytest.raises(OsslbenchError, match="--steps and --rounds must be >= 1"):
        run_bench(protocol, "srd", replace(opts, rounds=0))
    with pytest.raises(OsslbenchError, match="--threads must be >= 0"):  # not torch's RuntimeError
        run_bench(protocol, "srd", replace(opts, threads=-1))


def test_cli_bench_json(tmp_path, capsys):
    code = main(["bench", "--protocol", "digits-openset", "--method", "kd", "--steps", "2", "--warmup", "0",
                 "--workers", "0", "--data-root", str(tmp_path), "--json"])
    assert code == 0
    r = json.loads(capsys.readouterr().out)
    assert r["method"] == "kd" and r["osslbench"]["images"] == r["reference"]["images"]


def test_cli_bench_unknown_method_is_one_line(tmp_path, capsys):
    assert main(["bench", "--method", "nope", "--data-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("osslbench: error:") and "nope" in err and len(err.strip().splitlines()) == 1


def test_timed_steps_split_into_rounds():
    assert _rounds(20, 4) == [5, 5, 5, 5] and _rounds(7, 3) == [3, 2, 2] and _rounds(2, 4) == [1, 1]
    assert _rounds(5, 1) == [5]


def test_step_clock_counts_the_page_faults_of_the_timed_steps_only():
    """A step that writes 64 MiB of fresh memory (above glibc's largest mmap threshold, so mapped anew each time)
    faults; an idle step does not; untimed steps are not counted."""
    method = SimpleNamespace(_teacher=SimpleNamespace(module=None), student=torch.nn.Identity(), losses=lambda b: {})
    batches = iter(lambda: SimpleNamespace(x_lb=torch.zeros(1, 1), idx_ulb=[]), None)
    fresh = StepClock(method, torch.device("cpu"))
    fresh.run(batches, lambda b: torch.ones(16 << 20), 3, timed=True)
    idle = StepClock(method, torch.device("cpu"))
    idle.run(batches, lambda b: torch.ones(16 << 20), 3, timed=False)  # faults, but untimed
    idle.run(batches, lambda b: None, 3, timed=True)
    a, b = fresh.report(1.0, "fp32"), idle.report(1.0, "fp32")
    assert a["faults_per_step"] > b["faults_per_step"] + 16  # 16 x 4 KiB pages at least (2 MiB huge pages: 32)
    assert idle.cpu["faults"] < 3 * 16
