"""``osslbench leaderboard``: ``--versus M`` (each method against M on the seeds both ran, a paired t-test per
metric) and the note on runs that are not in it yet."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from osslbench.errors import OsslbenchError
from osslbench.results import collect, leaderboard, markdown, versus

from helpers import run_cli


def write_run(out: Path, method: str, seed: int, top1: float, auroc: float = 70.0, sweep: dict | None = None,
              teacher: dict | None = None) -> None:
    """A finished run's ``result.json`` as ``run`` leaves it (the fields the leaderboard reads)."""
    point = "_".join(f"{k}{v}" for k, v in (sweep or {}).items())
    folder = out / "digits-openset" / "smoke" / point / method / f"seed{seed}"
    folder.mkdir(parents=True)
    metrics = {"top1_last": top1, "top1_lastk": top1, "top5_last": 99.0, "auroc_last": auroc, "auroc_lastk": auroc,
               "train_s": 1.0, "hook_s": 0.0}
    folder.joinpath("result.json").write_text(json.dumps({
        "role": "student", "protocol": "digits-openset", "scale": "smoke", "sweep": sweep or {}, "method": method,
        "seed": seed, "config_hash": f"{method}{seed}", "teacher": teacher or {}, "metrics": metrics, "split": {}}))


def t_test_p_two_seeds_of_freedom(diffs: list[float]) -> float:
    """Two-sided paired t-test p for three pairs, from the t distribution's closed form at 2 degrees of freedom:
    P(|T| > t) = 1 - t / sqrt(t^2 + 2)."""
    n = len(diffs)
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    t = abs(mean) / (sd / math.sqrt(n))
    return 1 - t / math.sqrt(t * t + 2)


def test_mean_difference_and_paired_p_on_the_seeds_both_ran(tmp_path):
    for seed, (ref, better, worse) in enumerate([(49.0, 50.0, 40.0), (49.5, 51.0, 41.0), (50.6, 52.0, 39.0)]):
        write_run(tmp_path, "srd", seed, ref, auroc=60.0 + seed)
        write_run(tmp_path, "dist", seed, better, auroc=60.0 + seed)  # every AUROC difference is 0
        write_run(tmp_path, "kd", seed, worse)
    write_run(tmp_path, "fitnet", 0, 45.0)
    write_run(tmp_path, "fitnet", 7, 46.0)  # srd has no seed 7: nothing to pair it with
    write_run(tmp_path, "at", 9, 44.0)  # no pair at all: no row
    table = versus(collect(tmp_path), "srd").set_index("method")

    assert list(table.index) == ["dist", "fitnet", "kd"]  # best difference first; the reference has no row
    assert set(table["versus"]) == {"srd"}
    assert table.loc["dist", "paired_seeds"] == 3 and table.loc["dist", "top1_last_delta"] == pytest.approx(1.3)
    assert table.loc["dist", "top1_last_p"] == pytest.approx(t_test_p_two_seeds_of_freedom([1.0, 1.5, 1.4]))
    assert table.loc["dist", "top1_last_p"] == pytest.approx(0.01353, abs=1e-5)
    assert table.loc["dist", "auroc_last_delta"] == 0.0 and math.isnan(table.loc["dist", "auroc_last_p"])
    assert table.loc["kd", "top1_last_delta"] == pytest.approx((-9.0 - 8.5 - 11.6) / 3, abs=0.005)
    assert table.loc["kd", "top1_last_p"] == pytest.approx(t_test_p_two_seeds_of_freedom([-9.0, -8.5, -11.6]))
    assert table.loc["fitnet", "paired_seeds"] == 1 and table.loc["fitnet", "top1_last_delta"] == -4.0
    assert math.isnan(table.loc["fitnet", "top1_last_p"])  # one pair: no test


def test_seeds_pair_only_within_one_sweep_point(tmp_path):
    for seed in (0, 1):
        write_run(tmp_path, "srd", seed, 50.0 + seed, sweep={"mismatch": 0.0})
        write_run(tmp_path, "kd", seed, 45.0 + 2 * seed, sweep={"mismatch": 0.0})
        write_run(tmp_path, "srd", seed, 30.0, sweep={"mismatch": 1.0})
        write_run(tmp_path, "kd", seed, 40.0, sweep={"mismatch": 1.0})
    table = versus(collect(tmp_path), "srd").set_index("sweep_mismatch")
    assert table.loc[0.0, "top1_last_delta"] == -4.5 and table.loc[0.0, "paired_seeds"] == 2
    assert table.loc[1.0, "top1_last_delta"] == 10.0 and table.loc[1.0, "paired_seeds"] == 2
    assert math.isnan(table.loc[1.0, "top1_last_p"])  # equal differences: nothing to test against


def test_cli_prints_and_writes_the_comparison_and_refuses_an_absent_reference(capsys, tmp_path):
    for seed, (ref, other) in enumerate([(50.0, 51.0), (50.0, 52.0)]):
        write_run(tmp_path, "srd", seed, ref)
        write_run(tmp_path, "dkd", seed, other)
    code, out, _ = run_cli(capsys, "leaderboard", "--out", str(tmp_path), "--versus", "srd", "--markdown")
    assert code == 0 and "| dkd" in out and "1.5" in out
    folder = tmp_path / "digits-openset"
    assert (folder / "versus-srd.md").read_text() == out
    assert (folder / "versus-srd.csv").read_text().splitlines()[1].startswith("digits-openset,smoke,dkd,srd,2,1.5,")
    assert (folder / "leaderboard.csv").exists()  # the leaderboard is written as without --versus

    before = sorted(p.name for p in folder.iterdir())
    code, _, err = run_cli(capsys, "leaderboard", "--out", str(tmp_path), "--versus", "kd")
    assert code == 2 and err == "osslbench: error: --versus kd: no results of method 'kd' to compare with\n"
    assert sorted(p.name for p in folder.iterdir()) == before
    with pytest.raises(OsslbenchError):
        versus(collect(tmp_path / "nothing-here"), "srd")


def test_runs_without_a_result_are_named_not_counted(capsys, tmp_path):
    for seed in (0, 1):
        write_run(tmp_path, "srd", seed, 50.0)
    for method in ("kd", "dist"):  # interrupted (or running): a checkpoint, no result yet
        folder = tmp_path / "digits-openset" / "smoke" / method / "seed2"
        folder.mkdir(parents=True)
        (folder / "checkpoint.pt").write_bytes(b"")
    code, out, err = run_cli(capsys, "leaderboard", "--out", str(tmp_path))
    assert code == 0 and out.count("digits-openset,smoke,") == 1  # srd only, over its 2 seeds
    assert err == ("osslbench: note: 2 run(s) interrupted or still running, not in the leaderboard: "
                   "digits-openset/smoke/dist/seed2, digits-openset/smoke/kd/seed2\n")
    (tmp_path / "digits-openset/smoke/kd/seed2/result.json").write_text((tmp_path / "digits-openset/smoke/srd/seed0/"
                                                                         "result.json").read_text())
    assert "1 run(s)" in run_cli(capsys, "leaderboard", "--out", str(tmp_path))[2]  # kd's result landed


def test_each_row_names_the_teacher_weights_its_runs_distilled(tmp_path):
    """The CSV's ``teacher_weights``: one digest where every seed distilled the same weights, several where a row
    mixes teachers or runs older than the digest; empty for a method without a teacher."""
    a, b = {"top1": 60.0, "sha256": "a" * 64}, {"top1": 61.0, "sha256": "b" * 64}
    for seed in (0, 1):
        write_run(tmp_path, "kd", seed, 50.0, teacher=a)
        write_run(tmp_path, "supervised", seed, 40.0)
    write_run(tmp_path, "srd", 0, 55.0, teacher=a)
    write_run(tmp_path, "srd", 1, 55.0, teacher=b)
    write_run(tmp_path, "dkd", 0, 54.0, teacher={"top1": 60.0})  # a result from before the digest
    write_run(tmp_path, "dkd", 1, 54.0, teacher=a)
    table = leaderboard(collect(tmp_path)).set_index("method")["teacher_weights"]
    assert table.to_dict() == {"kd": "a" * 12, "srd": f"{'a' * 12},{'b' * 12}", "dkd": f"{'a' * 12},unrecorded",
                               "supervised": ""}
    assert "teacher_weights" not in markdown(leaderboard(collect(tmp_path)))  # the CSV's, like the config hashes


def test_markdown_shows_a_metric_a_method_lacks_as_a_dash(tmp_path):
    """No ``nan`` in the Markdown table: the student alone has no teacher's top-1, no run here has raw-weight top-1."""
    write_run(tmp_path, "kd", 0, 50.0, teacher={"top1": 60.0, "sha256": "a" * 64})
    write_run(tmp_path, "supervised", 0, 40.0)
    text = markdown(leaderboard(collect(tmp_path)))
    rows = {line.split("|")[3].strip(): [c.strip() for c in line.split("|")] for line in text.splitlines()[2:]}
    header = [c.strip() for c in text.splitlines()[0].split("|")]
    assert "nan" not in text
    assert rows["supervised"][header.index("teacher_top1")] == "-" and rows["kd"][header.index("teacher_top1")] == "60.00"
    assert rows["kd"][header.index("top1_last")] == "50.00"
