"""Plots made from the data: the leaderboard CSV (bars, the open-set trade-off, sweeps) and the runs'
``metrics.jsonl`` (training curves).

One colour per method everywhere (:func:`method_colours`): a family has a hue range (distill: reds to oranges,
ssl: blues, openset: greens, baseline: greys, anything else: purples) and its methods get evenly spaced shades of
it, alternately darker and lighter, so that a family of 25 methods still tells its members apart and every plot of
every protocol gives a method the same colour. Bars start at 0 and carry their values; error bars and bands are
the standard deviation over seeds. Every file is written as PNG and SVG, each through a temporary file and
``os.replace`` (a reader never sees half a picture).
"""

from __future__ import annotations

import colorsys
import json
from collections.abc import Iterable
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .errors import OsslbenchError  # noqa: E402
from .fsio import atomic_write  # noqa: E402
from .results import collect, leaderboard  # noqa: E402

matplotlib.rcParams["svg.hashsalt"] = "osslbench"  # reproducible SVG ids
FORMATS = ("png", "svg")
#: Family -> (first hue, last hue, saturation) in HSV; the order is the order of the groups in every plot.
FAMILIES: dict[str, tuple[float, float, float]] = {
    "baseline": (0.0, 0.0, 0.0), "distill": (0.99, 0.10, 0.85), "ssl": (0.52, 0.68, 0.75),
    "openset": (0.22, 0.42, 0.75), "plugin": (0.74, 0.86, 0.55),
}
MARKERS = {"baseline": "s", "distill": "o", "ssl": "^", "openset": "D", "plugin": "v"}
METRICS = (("top1_last", "test top-1 (%), last epoch"), ("auroc_last", "outlier AUROC (%), last epoch"))


def family_of(method: str) -> str:
    """The registry's family of ``method`` (``plugin`` for a name no longer registered)."""
    from .registry import family, methods

    cls = methods().get(method)
    fam = family(cls) if cls is not None else "plugin"
    return fam if fam in FAMILIES else "plugin"


def method_colours(names: Iterable[str] = ()) -> dict[str, tuple[float, float, float]]:
    """One RGB colour per method: every registered method plus ``names``, shades of its family's hue."""
    from .registry import methods

    by_family: dict[str, list[str]] = {}
    for name in sorted(set(methods()) | set(names)):
        by_family.setdefault(family_of(name), []).append(name)
    colours = {}
    for fam, members in by_family.items():
        h0, h1, sat = FAMILIES[fam]
        for i, name in enumerate(members):
            t = i / max(1, len(members) - 1)
            value = (0.55 if i % 2 else 0.85) if fam != "baseline" else 0.15 + 0.5 * t
            hue = (h0 + t * ((h1 - h0) % 1.0 if h1 < h0 else h1 - h0)) % 1.0
            colours[name] = colorsys.hsv_to_rgb(hue, sat, value)
    return colours


def grouped(table: pd.DataFrame, metric: str = "top1_last") -> pd.DataFrame:
    """Rows grouped by family (in :data:`FAMILIES` order), best ``metric`` first within a family."""
    order = {f: i for i, f in enumerate(FAMILIES)}
    out = table.assign(family=[family_of(m) for m in table["method"]])
    out = out.assign(_f=out["family"].map(order), _m=-out[metric].fillna(-1e9))
    return out.sort_values(["_f", "_m", "method"]).drop(columns=["_f", "_m"])


def describe(rows: pd.DataFrame, scale: str, point: str = "") -> str:
    """Scale, sweep point, steps, precision, seeds and a custom-config marker, from the columns present."""
    parts = [f"scale {scale}"] + ([point] if point else [])
    for col, fmt in (("steps", "{} steps"), ("precision", "{}")):
        if col in rows and rows[col].notna().any():
            # 4000, not 4000.0: a column with a missing value (a run older than the field) is float
            values = sorted({str(int(v)) if isinstance(v, float) and v.is_integer() else str(v) for v in rows[col].dropna()})
            parts.append(fmt.format("/".join(values)))
    seeds = sorted({int(s) for s in rows["seeds"].dropna()}) if "seeds" in rows else []
    if seeds:
        parts.append(f"{seeds[0]} seeds (mean ± std)" if seeds == [seeds[0]] and seeds[0] > 1
                     else "1 seed (no spread)" if seeds == [1] else f"{seeds[0]}-{seeds[-1]} seeds")
    for col in ("custom", "custom_config"):
        if col in rows and rows[col].fillna(False).astype(bool).any():
            parts.append("custom config")
    return " · ".join(parts)


def save(fig: plt.Figure, stem: Path) -> list[Path]:
    """``stem.png`` and ``stem.svg``, each written to a temporary file then renamed."""
    paths = []
    try:
        for ext in FORMATS:
            path = stem.with_name(f"{stem.name}.{ext}")
            atomic_write(path, lambda p, ext=ext: fig.savefig(p, dpi=120, format=ext,
                                                             metadata={"Date": None} if ext == "svg" else None))
            paths.append(path)
    finally:
        plt.close(fig)
    return paths


def _family_legend(fig: plt.Figure, shown: Iterable[str]) -> None:
    """One patch per family present, in the colour of its first method shown."""
    colours = method_colours(shown)
    handles = []
    for fam in FAMILIES:
        member = next((m for m in shown if family_of(m) == fam), None)
        if member is not None:
            handles.append(Patch(color=colours[member], label=fam))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)


def plot_leaderboard(table: pd.DataFrame, stem: Path, title: str) -> list[Path]:
    """Top-1 and AUROC per method (mean +- std over seeds), bars from 0 with their values, grouped by family;
    the teacher's top-1 as a dashed line where a distiller had one."""
    rows = grouped(table)
    colours = method_colours(rows["method"])
    panels = [(m, label) for m, label in METRICS if m in rows and rows[m].notna().any()]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 0.42 * len(rows) + 1.9), squeeze=False)
    y = np.arange(len(rows))
    for ax, (metric, label) in zip(axes[0], panels, strict=True):
        mean = rows[metric].to_numpy(float)
        std = rows[f"{metric}_std"].to_numpy(float) if f"{metric}_std" in rows else np.full(len(rows), np.nan)
        ax.barh(y, mean, color=[colours[m] for m in rows["method"]])
        spread = np.isfinite(std)  # one seed: no error bar at all (not a zero-width one)
        ax.errorbar(mean[spread], y[spread], xerr=std[spread], fmt="none", ecolor="black", elinewidth=1, capsize=3)
        for yi, m, s in zip(y, mean, std, strict=True):
            text = f"{m:.1f}" + (f" ± {s:.1f}" if np.isfinite(s) else "")
            if np.isfinite(m) and m >= 25:  # inside the bar, clear of the error bar
                ax.text(m - (s if np.isfinite(s) else 0) - 1.5, yi, text, va="center", ha="right", fontsize=8, color="white")
            elif np.isfinite(m):
                ax.text(m + (s if np.isfinite(s) else 0) + 1.5, yi, text, va="center", fontsize=8)
        ax.set_yticks(y, rows["method"])
        teacher = float(rows["teacher_top1"].dropna().mean()) if "teacher_top1" in rows else float("nan")
        top = np.nanmax([*mean, teacher if metric == "top1_last" else np.nan])
        ax.set_xlim(0, 115 if metric == "auroc_last" else min(115.0, max(10.0, float(top) * 1.2 + 5)))
        ax.set_xlabel(label)
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
        if metric == "top1_last" and np.isfinite(teacher):
            ax.axvline(teacher, color="black", ls="--", lw=1)
            ax.text(teacher, 1.0, f"teacher {teacher:.1f}", fontsize=8, va="bottom", ha="center",
                    transform=ax.get_xaxis_transform())
        if metric == "auroc_last":
            ax.axvline(50, color="grey", ls=":", lw=1)
            ax.text(50, 1.0, "chance", fontsize=8, va="bottom", ha="center", color="grey", transform=ax.get_xaxis_transform())
    fig.suptitle(title, fontsize=10)
    _family_legend(fig, list(rows["method"]))
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return save(fig, stem)


def plot_tradeoff(table: pd.DataFrame, stem: Path, title: str) -> list[Path]:
    """The open-set trade-off: top-1 against outlier AUROC, one point per method (std over seeds as bars)."""
    rows = grouped(table).dropna(subset=["top1_last", "auroc_last"])
    colours = method_colours(rows["method"])
    fig, ax = plt.subplots(figsize=(8.4, 5.2))
    for _, r in rows.iterrows():
        ax.errorbar(r["top1_last"], r["auroc_last"], xerr=np.nan_to_num(r.get("top1_last_std", np.nan)),
                    yerr=np.nan_to_num(r.get("auroc_last_std", np.nan)), fmt=MARKERS[r["family"]], ms=8,
                    color=colours[r["method"]], capsize=3, mec="black", mew=0.5, label=f"{r['method']} ({r['family']})")
    ax.axhline(50, color="grey", ls=":", lw=1)
    ax.text(ax.get_xlim()[0], 50, " chance AUROC", fontsize=7, color="grey", va="bottom")
    ax.set_xlabel(METRICS[0][1])
    ax.set_ylabel(METRICS[1][1])
    ax.grid(alpha=0.3)
    ax.set_title(f"{title}\naccuracy vs outlier detection (up and right is better)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return save(fig, stem)


def plot_sweep(table: pd.DataFrame, key: str, stem: Path, title: str) -> list[Path]:
    """Top-1 and AUROC against a swept key, one line per method with a std band over seeds (Oliver et al. 2018,
    Fig. 2)."""
    colours = method_colours(table["method"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    for ax, (metric, label) in zip(axes, METRICS, strict=True):
        for method, rows in grouped(table).groupby("method", sort=False):
            rows = rows.sort_values(key)
            x, m = rows[key].to_numpy(float), rows[metric].to_numpy(float)
            ax.plot(x, m, marker=MARKERS[family_of(method)], color=colours[method], label=method)
            if f"{metric}_std" in rows:
                s = rows[f"{metric}_std"].to_numpy(float)
                ax.fill_between(x, m - s, m + s, color=colours[method], alpha=0.18, lw=0)
        ax.set_xlabel(key.removeprefix("sweep_") + " (fraction of the unlabelled pool from unseen classes)"
                      if "mismatch" in key else key.removeprefix("sweep_"))
        ax.set_ylabel(label)
        ax.set_xticks(sorted(table[key].dropna().unique()))
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save(fig, stem)


def _curves(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per run folder name: epochs, mean and std over seeds of the test top-1."""
    out = {}
    for run in sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []:
        series = {}
        for metrics in sorted(run.glob("seed*/metrics.jsonl")):
            try:
                rows = [json.loads(line) for line in metrics.read_text().splitlines()]
            except (OSError, ValueError) as exc:
                raise OsslbenchError(f"{metrics} is damaged ({type(exc).__name__}); delete it or rerun that run") from None
            series[metrics.parent.name] = {r["epoch"]: r["top1"] for r in rows if "top1" in r}
        if series:
            frame = pd.DataFrame(series).sort_index()
            out[run.name] = (frame.index.to_numpy(), frame.mean(axis=1).to_numpy(), frame.std(axis=1).to_numpy())
    return out


def plot_curves(folder: Path, stem: Path, title: str) -> list[Path]:
    """Test top-1 per epoch (mean over seeds, std band) of the students under ``folder``; the teachers, whose
    schedules differ, in a panel of their own."""
    curves = _curves(folder)
    teachers = {k: v for k, v in curves.items() if k.startswith("teacher-")}
    students = {k: v for k, v in curves.items() if k not in teachers}
    colours = method_colours(students)
    panels = [("students", students)] + ([("teacher (its own schedule)", teachers)] if teachers else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(7.5 + 3.5 * (len(panels) - 1), 4.4), squeeze=False,
                             gridspec_kw={"width_ratios": [2, 1][:len(panels)]})
    for ax, (name, runs) in zip(axes[0], panels, strict=True):
        for run, (x, m, s) in sorted(runs.items(), key=lambda kv: (list(FAMILIES).index(family_of(kv[0])), kv[0])):
            colour = colours.get(run, (0.2, 0.2, 0.2))
            ax.plot(x, m, color=colour, label=run, marker="." if len(x) <= 30 else None)
            ax.fill_between(x, m - np.nan_to_num(s), m + np.nan_to_num(s), color=colour, alpha=0.15, lw=0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel("test top-1 (%)")
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
        if name.startswith("teacher"):
            ax.legend(fontsize=7, loc="lower right")
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=min(8, max(1, len(students))),
               fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06 * (1 + (len(students) - 1) // 8), 1, 1))
    return save(fig, stem)


def _run_facts(out: Path, protocol: str) -> pd.DataFrame:
    """Per (scale, sweep point, method): ``steps`` (epochs x iterations) and ``precision`` read from the runs'
    resolved configs, for leaderboards written before those columns existed."""
    rows = []
    for path in sorted((out / protocol).rglob("seed*/result.json")):
        r = json.loads(path.read_text())
        if r.get("role") != "student" or "config" not in r:
            continue
        train = r["config"]["protocol"]["train"]
        iters = train.get("iters_per_epoch") or max(1, r.get("split", {}).get("labelled", 0) // train["batch_size"])
        amp = train.get("amp")
        rows.append({"scale": r["scale"], **{f"sweep_{k}": v for k, v in r.get("sweep", {}).items()},
                     "method": r["method"], "steps": f"{train['epochs']}x{iters}",
                     "precision": "fp32" if amp is False else "bf16 autocast" if amp is True else f"amp {amp}"})
    return pd.DataFrame(rows).drop_duplicates()


def _table(out: Path, protocol: str) -> pd.DataFrame:
    """The protocol's leaderboard CSV (built from its ``result.json`` files when there is none), with ``steps``
    and ``precision`` from the runs' configs where the CSV has no such column."""
    csv = out / protocol / "leaderboard.csv"
    table = pd.read_csv(csv) if csv.exists() else leaderboard(collect(out, protocol))
    missing = [c for c in ("steps", "precision") if c not in table or table[c].isna().all()]
    table = table.drop(columns=[c for c in missing if c in table])
    facts = _run_facts(out, protocol) if missing else pd.DataFrame()
    if not facts.empty:
        keys = [c for c in facts.columns if c in table.columns and c not in ("steps", "precision")]
        facts = facts.groupby(keys, dropna=False)[missing].agg(lambda v: "/".join(sorted(set(map(str, v))))).reset_index()
        table = table.merge(facts, on=keys, how="left")
    return table


def plot_all(out: Path, protocol: str | None = None) -> list[Path]:
    """Every (protocol, scale, sweep point) under ``out``, into ``<out>/<protocol>/``:
    ``<scale>[_<point>]_leaderboard``, ``_tradeoff`` (when there is an AUROC) and ``_curves``, plus
    ``<scale>_sweep_<key>`` for a protocol swept over one key; each as ``.png`` and ``.svg``."""
    runs = collect(out, protocol) if out.is_dir() else pd.DataFrame()
    if runs.empty:
        raise OsslbenchError(f"no results under {out}" + (f" for protocol {protocol}" if protocol else ""))
    paths: list[Path] = []
    for proto in sorted(set(runs["protocol"])):
        table = _table(out, proto)
        for scale, part in table.groupby("scale"):
            swept = [c for c in part.columns if c.startswith("sweep_") and part[c].notna().any()]
            points = part.groupby(swept, dropna=False) if swept else [((), part)]
            for values, rows in points:
                values = values if isinstance(values, tuple) else (values,)
                point = ",".join(f"{k.removeprefix('sweep_')}={v}" for k, v in zip(swept, values, strict=True)
                                 if pd.notna(v))
                title = f"{proto} — {describe(rows, str(scale), point)}"
                stem = out / proto / (f"{scale}_{point}" if point else str(scale))
                paths += plot_leaderboard(rows, stem.with_name(stem.name + "_leaderboard"), title)
                if "auroc_last" in rows and rows["auroc_last"].notna().any():
                    paths += plot_tradeoff(rows, stem.with_name(stem.name + "_tradeoff"), title)
                folder = out / proto / str(scale) / point if point else out / proto / str(scale)
                paths += plot_curves(folder, stem.with_name(stem.name + "_curves"), title)
            if len(swept) == 1:
                key = swept[0]
                paths += plot_sweep(part, key, out / proto / f"{scale}_{key}",
                                    f"{proto} — {describe(part, str(scale))}")
    return paths
