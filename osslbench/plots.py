"""Plots made from the data: leaderboard bars (from the CSV) and training curves (from metrics.jsonl)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import pandas as pd

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

from .errors import OsslbenchError  # noqa: E402
from .fsio import atomic_write  # noqa: E402
from .results import collect, leaderboard  # noqa: E402


def _save(fig, path: Path) -> None:
    """Save and close ``fig`` atomically (a killed ``plot`` never leaves a truncated image)."""
    try:
        atomic_write(path, lambda p: fig.savefig(p, dpi=120, format=path.suffix.lstrip(".")))
    finally:
        plt.close(fig)


def plot_leaderboard(table, path: Path, title: str) -> Path:
    """Top-1 (last epoch, mean +- std over seeds) and AUROC per method, side by side."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.5 * len(table) + 1.8))
    for ax, metric, label in ((axes[0], "top1_last", "top-1 (%) last epoch"), (axes[1], "auroc_last", "AUROC (%)")):
        if metric not in table:
            ax.set_visible(False)
            continue
        err = table.get(f"{metric}_std")
        ax.barh(table["method"], table[metric], xerr=None if err is None else err.fillna(0), color="tab:blue")
        ax.set_xlabel(label)
        ax.invert_yaxis()
        lo = max(0.0, float(table[metric].min()) - 10)
        ax.set_xlim(lo, min(100.0, float(table[metric].max()) + 5))
    seeds = ",".join(str(s) for s in sorted(set(table["seeds"])))
    fig.suptitle(f"{title} (seeds per row: {seeds})")
    fig.tight_layout()
    _save(fig, path)
    return path


def plot_curves(folder: Path, path: Path, title: str) -> Path:
    """Test top-1 per epoch of every method's seed-0 run under ``folder`` (a ``<protocol>/<scale>`` folder)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for metrics in sorted(folder.glob("*/seed0/metrics.jsonl")):
        try:
            rows = [json.loads(line) for line in metrics.read_text().splitlines()]
        except (OSError, ValueError) as exc:
            raise OsslbenchError(f"{metrics} is damaged ({type(exc).__name__}); delete it or rerun that run") from None
        rows = [r for r in rows if "top1" in r]
        ax.plot([r["epoch"] for r in rows], [r["top1"] for r in rows], label=metrics.parent.parent.name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    return path


def plot_sweep(table, key: str, path: Path, title: str) -> Path:
    """Top-1 (last epoch) and AUROC against a swept key, one line per method (Oliver et al. 2018, Fig. 2)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric, label in ((axes[0], "top1_last", "top-1 (%) last epoch"), (axes[1], "auroc_last", "AUROC (%)")):
        for method, rows in table.sort_values(key).groupby("method"):
            ax.errorbar(rows[key], rows[metric], yerr=rows.get(f"{metric}_std"), marker="o", capsize=3, label=method)
        ax.set_xlabel(key.removeprefix("sweep_"))
        ax.set_ylabel(label)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)
    return path


def plot_all(out: Path, protocol: str | None = None) -> list[Path]:
    """Every (protocol, scale, sweep point) under ``out``: ``<out>/<protocol>/<scale>[_<point>]_leaderboard.png``
    and ``_curves.png``, plus ``<scale>_sweep_<key>.png`` for a protocol swept over one key."""
    runs = collect(out, protocol)
    if runs.empty:
        raise OsslbenchError(f"no results under {out}" + (f" for protocol {protocol}" if protocol else ""))
    table = leaderboard(runs)
    paths = []
    for (proto, scale), part in table.groupby(["protocol", "scale"]):
        swept = [c for c in part.columns if c.startswith("sweep_") and part[c].notna().any()]
        points = part.groupby(swept, dropna=False) if swept else [((), part)]
        for values, rows in points:
            values = values if isinstance(values, tuple) else (values,)
            point = ",".join(f"{k.removeprefix('sweep_')}={v}" for k, v in zip(swept, values, strict=True) if pd.notna(v))
            title = f"{proto} [{scale}]" + (f" {point}" if point else "")
            stem = f"{scale}_{point}" if point else scale
            paths.append(plot_leaderboard(rows, out / proto / f"{stem}_leaderboard.png", title))
            folder = out / proto / scale / point if point else out / proto / scale
            paths.append(plot_curves(folder, out / proto / f"{stem}_curves.png", title))
        if len(swept) == 1:
            paths.append(plot_sweep(part, swept[0], out / proto / f"{scale}_{swept[0]}.png", f"{proto} [{scale}]"))
    return paths
