"""Plots: one colour per method, grouped by family; bars from 0 with values; titles from the CSV; PNG + SVG."""

from __future__ import annotations

import colorsys
import json

import pandas as pd
import pytest

from osslbench import plots
from osslbench.registry import methods
from osslbench.results import write_leaderboard


def test_one_colour_per_method_shaded_by_family():
    colours = plots.method_colours()
    assert set(methods()) <= set(colours)
    assert len(set(colours.values())) == len(colours)  # no two methods share a colour
    assert plots.method_colours() == colours  # the same colour in every plot
    for name in methods():
        fam = plots.family_of(name)
        h0, h1, sat = plots.FAMILIES[fam]
        hue, s, _ = colorsys.rgb_to_hsv(*colours[name])
        if fam != "baseline":
            span = (h1 - h0) % 1.0
            assert (hue - h0 + 1e-6) % 1.0 <= span + 2e-6 and s == pytest.approx(sat), name  # inside its family's hue range


def test_colours_scale_to_a_large_family(monkeypatch):
    monkeypatch.setattr(plots, "family_of", lambda m: "distill" if m.startswith("d") else "ssl")
    names = [f"d{i:02d}" for i in range(25)]
    colours = plots.method_colours(names)
    assert len({colours[n] for n in names}) == 25


def test_titles_carry_scale_steps_precision_seeds_and_custom_marker():
    rows = pd.DataFrame({"seeds": [3, 3], "steps": ["20x200", "20x200"], "precision": ["fp32", "fp32"],
                         "custom": [False, True]})
    assert plots.describe(rows, "mini", "mismatch=0.5") == \
        "scale mini · mismatch=0.5 · 20x200 steps · fp32 · 3 seeds (mean ± std) · custom config"
    assert plots.describe(pd.DataFrame({"seeds": [1]}), "full") == "scale full · 1 seed (no spread)"  # no column: no part
    older = pd.DataFrame({"seeds": [1, 3], "steps": [4000, None]})  # a run older than the steps field: a float column
    assert plots.describe(older, "mini") == "scale mini · 4000 steps · 1-3 seeds"


def _fake_results(out, protocol="toy", n_seeds=2):
    for method, acc in (("supervised", 40.0), ("srd", 55.0), ("fixmatch", 35.0)):
        for seed in range(n_seeds):
            folder = out / protocol / "mini" / method / f"seed{seed}"
            folder.mkdir(parents=True)
            result = {"role": "student", "protocol": protocol, "scale": "mini", "method": method, "seed": seed,
                      "config_hash": f"{method}{seed}", "split": {"labelled": 640},
                      "config": {"protocol": {"train": {"epochs": 3, "iters_per_epoch": 0, "batch_size": 64,
                                                        "amp": False}}},
                      "metrics": {"top1_last": acc + seed, "auroc_last": 60.0 + seed, "top1_lastk": acc}}
            (folder / "result.json").write_text(json.dumps(result))
            lines = [json.dumps({"epoch": e, "top1": acc * e / 3}) for e in (1, 2, 3)]
            (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_plot_all_writes_png_and_svg_with_bars_from_zero(tmp_path, monkeypatch):
    _fake_results(tmp_path)
    figures = []
    real_save = plots.save
    monkeypatch.setattr(plots, "save", lambda fig, stem: (figures.append((stem.name, fig)), real_save(fig, stem))[1])
    paths = plots.plot_all(tmp_path)
    names = sorted(p.name for p in paths)
    assert names == sorted(f"mini_{kind}.{ext}" for kind in ("leaderboard", "tradeoff", "curves") for ext in ("png", "svg"))
    assert all(p.stat().st_size > 0 for p in paths)
    assert not list(tmp_path.rglob("*.tmp.*"))  # written through temporary files, renamed
    bars = dict(figures)["mini_leaderboard"]
    for ax in bars.axes[:2]:
        assert ax.get_xlim()[0] == 0  # bars start at 0
    texts = [t.get_text() for t in bars.axes[0].texts]
    assert "55.5 ± 0.7" in texts  # srd: mean of 55 and 56, std over the 2 seeds
    assert [t.get_text() for t in bars.axes[0].get_yticklabels()] == ["supervised", "srd", "fixmatch"]  # by family
    assert "3x10 steps · fp32 · 2 seeds" in bars._suptitle.get_text()  # from the runs' configs: no CSV columns yet
    curves = dict(figures)["mini_curves"]
    assert all(float(t).is_integer() for t in curves.axes[0].get_xticks())  # integer epoch ticks


def test_plot_reads_the_leaderboard_csv_and_its_new_columns(tmp_path, monkeypatch):
    _fake_results(tmp_path)
    from osslbench.results import write_leaderboard

    table = write_leaderboard(tmp_path, "toy")
    table["steps"], table["precision"] = "999x1", "bf16"
    table.to_csv(tmp_path / "toy" / "leaderboard.csv", index=False)
    titles = []
    monkeypatch.setattr(plots, "save", lambda fig, stem: (titles.append(fig._suptitle), plots.plt.close(fig), [])[2])
    plots.plot_all(tmp_path)
    assert any(t is not None and "999x1 steps · bf16" in t.get_text() for t in titles)


def test_leaderboard_writes_steps_as_a_count_beside_runs_older_than_the_field(tmp_path):
    _fake_results(tmp_path)  # results without "steps", as those written before the field existed
    newer = tmp_path / "toy" / "mini" / "srd" / "seed0" / "result.json"
    newer.write_text(json.dumps({**json.loads(newer.read_text()), "steps": 4000}))
    table = write_leaderboard(tmp_path, "toy")
    assert str(table.set_index("method").loc["srd", "steps"]) == "4000"
    text = (tmp_path / "toy" / "leaderboard.csv").read_text()
    assert "4000" in text and "4000.0" not in text
