"""Results as data: one ``result.json`` per run, leaderboards aggregated from them with pandas."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import CheckpointError, OsslbenchError
from .fsio import RunLock, atomic_write_text
from .protocol import Protocol

RESULT = "result.json"
# Columns averaged over seeds (mean and std), in leaderboard order.
METRICS = ["top1_last", "top1_lastk", "top1_raw_last", "top5_last", "auroc_last", "auroc_lastk", "train_s", "peak_rss_MiB",
           "hook_s"]


def summarize(history: list[dict], last_k: int) -> dict[str, float]:
    """Last-epoch and mean-of-last-k figures (never the best epoch: that would select on the test set)."""
    evals = [r for r in history if "top1" in r]
    if not evals:
        return {}
    last, tail = evals[-1], evals[-last_k:]
    out: dict[str, float] = {"epochs": history[-1]["epoch"], "last_k": len(tail),
                             "train_s": sum(r["train_s"] + r.get("eval_s", 0.0) for r in history),
                             "hook_s": sum(r.get("hook_s", 0.0) for r in history)}
    for key in ("top1", "top5", "auroc", "top1_raw"):
        if key in last:
            out[f"{key}_last"] = last[key]
            out[f"{key}_lastk"] = float(np.mean([r[key] for r in tail]))
    return out


def run_dir(out: Path, protocol: Protocol, method: str, seed: int) -> Path:
    """``<out>/<protocol>/<scale>[/<sweep point>]/<method>/seed<k>``: where a run keeps everything it writes."""
    return protocol.folder(out) / method / f"seed{seed}"


def versions() -> dict[str, str]:
    """Versions recorded with every result."""
    import sklearn
    import torch
    import torchvision

    from . import __version__

    return {"osslbench": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "numpy": np.__version__, "sklearn": sklearn.__version__}


def read_result(path: Path) -> dict | None:
    """A finished run's result, or None when absent; a damaged file is a :class:`CheckpointError` naming it."""
    if not path.exists():
        return None
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is damaged ({type(exc).__name__} at position {getattr(exc, 'pos', '?')}); "
                              "delete it to run that run again") from None
    if not isinstance(result, dict) or not {"config_hash", "metrics"} <= set(result):
        raise CheckpointError(f"{path} is not an osslbench result (no config_hash / metrics); delete it to run that "
                              "run again")
    return result


def write_result(path: Path, result: dict) -> None:
    """Atomically write a run's ``result.json``."""
    atomic_write_text(path, json.dumps(result, indent=2, sort_keys=True) + "\n")


def _precision(result: dict) -> str:
    """The precision a run used; results from before it was recorded ran with ``train.amp = true``, which was bf16
    autocast on every CPU and bf16-capable GPU."""
    if "precision" in result:
        return result["precision"]
    amp = result.get("config", {}).get("protocol", {}).get("train", {}).get("amp", True)
    return "bf16" if amp is True else "fp32"


def collect(out: Path, protocol: str | None = None) -> pd.DataFrame:
    """One row per student run found under ``out`` (teachers excluded)."""
    rows = []
    for folder in sorted(out.glob(protocol or "*")):
        for path in sorted(folder.rglob(f"seed*/{RESULT}")):
            r = read_result(path)
            if r is None or r.get("role") != "student":
                continue
            sizes = r.get("split", {})
            pool = sizes.get("unlabelled_seen", 0) + sizes.get("unlabelled_unseen", 0)
            # a run whose --set changed its named scale is labelled so (``full+custom``), never plainly ``full``
            scale = f"{r['scale']}+custom" if r.get("overrides") else r["scale"]
            rows.append({"protocol": r["protocol"], "scale": scale,
                         **{f"sweep_{k}": v for k, v in r.get("sweep", {}).items()},
                         "method": r["method"], "seed": r["seed"], "config_hash": r["config_hash"],
                         "teacher_top1": r.get("teacher", {}).get("top1"),
                         # the teacher's weights (``teacher.sha256``; older results did not record them)
                         "teacher_sha256": _teacher_digest(r.get("teacher")),
                         # the unlabelled pool's real fraction of unseen-class images
                         "mismatch": sizes.get("unlabelled_unseen", 0) / pool if pool else float("nan"),
                         "steps": r.get("steps"), "precision": _precision(r),
                         # the run's peak resident memory (``memory.py``); absent from results older than it
                         "peak_rss_MiB": r.get("memory", {}).get("peak_rss_MiB", float("nan")),
                         **r["metrics"]})
    return pd.DataFrame(rows)


def unfinished(out: Path, protocol: str | None = None) -> list[Path]:
    """Run folders under ``out`` holding a checkpoint but no result: interrupted or running, so in no leaderboard
    yet (the same ``run`` command resumes them)."""
    found = []
    for folder in sorted(out.glob(protocol or "*")):
        found += [p.parent for p in sorted(folder.rglob("seed*/checkpoint.pt")) if not (p.parent / RESULT).exists()]
    return found


def leaderboard(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over seeds, one row per (protocol, scale, sweep point, method); best top-1 first."""
    if runs.empty:
        return runs
    keys = ["protocol", "scale", *[c for c in runs.columns if c.startswith("sweep_")], "method"]
    present = [m for m in METRICS if m in runs.columns]
    grouped = runs.groupby(keys, dropna=False)
    table = grouped[present].agg(["mean", "std"])
    table.columns = [f"{m}" if s == "mean" else f"{m}_std" for m, s in table.columns]
    table["seeds"] = grouped["seed"].nunique()
    table["teacher_top1"] = grouped["teacher_top1"].mean()
    table["mismatch"] = grouped["mismatch"].mean()
    table["steps"] = grouped["steps"].max().astype("Int64")  # a count: 4000, not 4000.0 beside runs older than the field
    table["precision"] = grouped["precision"].agg(lambda s: "+".join(sorted(set(map(str, s)))))
    table["config_hashes"] = grouped["config_hash"].agg(lambda s: ",".join(sorted(set(s))))
    table["teacher_weights"] = grouped["teacher_sha256"].agg(_teacher_weights)
    table = table.reset_index().sort_values([*keys[:-1], "top1_last"], ascending=[True] * (len(keys) - 1) + [False])
    return table.round(2)


def _teacher_digest(teacher: dict | None) -> str | None:
    """A run's teacher weights by the first 12 hex digits of their SHA-256; ``unrecorded`` for a result older than
    the digest; None without a teacher."""
    if not teacher:
        return None
    return teacher["sha256"][:12] if teacher.get("sha256") else "unrecorded"


def _teacher_weights(digests: pd.Series) -> str:
    """The teacher weights of a row's runs (:func:`_teacher_digest`), ``,`` between several (a row mixing
    teachers, or runs of which some predate the digest); empty without a teacher."""
    return ",".join(sorted(set(digests.dropna())))


#: The metrics :func:`versus` compares per seed.
PAIRED = ["top1_last", "auroc_last"]


def versus(runs: pd.DataFrame, reference: str) -> pd.DataFrame:
    """Every method against ``reference`` on the seeds both ran in the same (protocol, scale, sweep point), hence on
    the same splits: per metric of :data:`PAIRED`, the mean of the per-seed differences (``<metric>_delta``, method
    minus reference) and the two-sided paired t-test's p-value (``<metric>_p``; empty below two paired seeds or
    when the differences are all equal).
    Seeds are paired rather than the two means compared: a split that is hard for one method is usually hard for
    the other, so the paired test resolves differences that the seeds' spread would hide. Each p-value is for its
    own comparison (no correction for the number of methods compared)."""
    from scipy.stats import ttest_rel  # (scikit-learn's own dependency)

    if runs.empty or reference not in set(runs["method"]):
        raise OsslbenchError(f"--versus {reference}: no results of method {reference!r} to compare with")
    keys = ["protocol", "scale", *[c for c in runs.columns if c.startswith("sweep_")]]
    ref = runs[runs["method"] == reference][[*keys, "seed", *PAIRED]]
    pairs = runs[runs["method"] != reference].merge(ref, on=[*keys, "seed"], suffixes=("", "_ref"))
    rows = []
    for key, group in pairs.groupby([*keys, "method"], dropna=False):
        row = {**dict(zip([*keys, "method"], key, strict=True)), "versus": reference, "paired_seeds": len(group)}
        for m in PAIRED:
            diffs = group[m] - group[f"{m}_ref"]
            row[f"{m}_delta"] = diffs.mean()
            testable = len(diffs) >= 2 and diffs.std() > 0  # (equal differences have no spread to test against)
            row[f"{m}_p"] = ttest_rel(group[m], group[f"{m}_ref"]).pvalue if testable else float("nan")
        rows.append(row)
    if not rows:
        return pd.DataFrame(columns=[*keys, "method", "versus", "paired_seeds"])
    table = pd.DataFrame(rows).sort_values([*keys, f"{PAIRED[0]}_delta"], ascending=[True] * len(keys) + [False])
    return table.round({f"{m}_delta": 2 for m in PAIRED})


def versus_markdown(table: pd.DataFrame) -> str:
    """:func:`versus` as Markdown: p-values to three decimals ("<0.001" below), none below two paired seeds."""
    shown = table.copy()
    for m in PAIRED:
        if f"{m}_p" in shown.columns:
            shown[f"{m}_p"] = ["" if pd.isna(p) else "<0.001" if p < 0.001 else f"{p:.3f}" for p in shown[f"{m}_p"]]
    return shown.to_markdown(index=False) + "\n"


def markdown(table: pd.DataFrame) -> str:
    """The leaderboard as Markdown, ``mean ± std`` per metric."""
    if table.empty:
        return "(no results)\n"
    hidden = {"config_hashes", "teacher_weights"}  # digests: in the CSV, too wide for the table
    shown = table[[c for c in table.columns if not c.endswith("_std") and c not in hidden]].copy()
    for m in METRICS:  # "mean ± std" over seeds; a single seed has no spread to show
        if m in shown.columns and f"{m}_std" in table.columns:
            pairs = zip(table[m], table[f"{m}_std"], strict=True)
            shown[m] = [None if pd.isna(a) else f"{a:.2f}" if pd.isna(b) else f"{a:.2f} ± {b:.2f}" for a, b in pairs]
    # a metric the method does not have (raw weights without an EMA, a teacher's top-1 without a teacher) reads "-"
    return shown.astype(object).where(shown.notna(), None).to_markdown(index=False, missingval="-", floatfmt=".2f") + "\n"


def write_leaderboard(out: Path, protocol: str, reference: str | None = None) -> pd.DataFrame:
    """Write ``<out>/<protocol>/leaderboard.csv`` and ``.md`` from the runs' ``result.json`` files, and
    ``versus-<reference>.csv`` / ``.md`` (:func:`versus`) when the protocol has runs of ``reference``."""
    folder = out / protocol
    with RunLock(folder, own_temporaries=False):  # collected and written as one step: a concurrent run's result is never dropped
        runs = collect(out, protocol)
        table = leaderboard(runs)
        atomic_write_text(folder / "leaderboard.csv", table.to_csv(index=False))
        atomic_write_text(folder / "leaderboard.md", markdown(table))
        if reference and reference in set(runs["method"]):
            paired = versus(runs, reference)
            atomic_write_text(folder / f"versus-{reference}.csv", paired.to_csv(index=False))
            atomic_write_text(folder / f"versus-{reference}.md", versus_markdown(paired))
    return table
