"""Fault injection: a crash before, or in the middle of, every file write of a run (teacher included), then the
same command again: nothing is lost and the results equal those of an uninterrupted run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from osslbench import fsio
from osslbench.config import parse_overrides
from osslbench.protocol_loader import load_protocol
from osslbench.runner import RunOptions, run_grid

TINY = ["train.amp=false", "train.epochs=2", "train.teacher_epochs=1", "train.iters_per_epoch=2", "train.last_k=2"]


class Crash(BaseException):
    """A kill: nothing in osslbench catches it."""


def timeless(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.endswith("_s")} for row in rows]


def outcome(out: Path) -> dict:
    """What a finished grid leaves, minus wall times: every result's metrics and every metrics.jsonl."""
    found = {}
    for path in sorted(out.rglob("result.json")):
        r = json.loads(path.read_text())
        found[str(path.parent.relative_to(out))] = {
            "metrics": {k: v for k, v in r["metrics"].items() if not k.endswith("_s")}, "hash": r["config_hash"],
            "rows": timeless([json.loads(x) for x in (path.parent / "metrics.jsonl").read_text().splitlines()])}
    return found


def patch_writes(monkeypatch, crash_at: int | None, mid_write: bool) -> list[str]:
    """Count every ``fsio.atomic_write`` (in every module that imported it); raise :class:`Crash` at write number
    ``crash_at``: before it starts, or once its temporary file is written but not yet renamed."""
    real = fsio.atomic_write
    seen: list[str] = []

    def counted(path, write):
        seen.append(Path(path).name)
        if crash_at is not None and len(seen) - 1 == crash_at:
            if not mid_write:
                raise Crash(path)

            def write_then_die(tmp):
                write(tmp)
                raise Crash(path)

            return real(path, write_then_die)
        return real(path, write)

    for name, module in list(sys.modules.items()):
        if name.startswith("osslbench") and getattr(module, "atomic_write", None) is real:
            monkeypatch.setattr(module, "atomic_write", counted)
    return seen


def test_crash_at_every_write_then_resume_equals_uninterrupted(tmp_path, monkeypatch):
    protocol = load_protocol("digits-openset", "smoke", parse_overrides(TINY))

    def grid(out: Path) -> list[dict]:
        return run_grid(protocol, ["kd"], [0], RunOptions(data_root=tmp_path, out=out, progress=False, threads=1))

    with monkeypatch.context() as m:
        writes = patch_writes(m, None, False)
        grid(tmp_path / "whole")
    expected = outcome(tmp_path / "whole")
    # teacher: (checkpoint, metrics) per epoch, teacher.pt, result; kd: splits, (checkpoint, metrics) per epoch, result
    assert writes == ["checkpoint.pt", "metrics.jsonl", "teacher.pt", "result.json", "splits.npz",
                      "checkpoint.pt", "metrics.jsonl", "checkpoint.pt", "metrics.jsonl", "result.json"]
    assert set(expected) == {"digits-openset/smoke/teacher-cnn-large/seed0", "digits-openset/smoke/kd/seed0"}
    for k in range(len(writes)):
        for mid_write in (False, True):
            out = tmp_path / f"crash{k}{'m' if mid_write else ''}"
            with monkeypatch.context() as m:
                patch_writes(m, k, mid_write)
                with pytest.raises(Crash):
                    grid(out)
            assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")], "a temporary file was left"
            grid(out)  # the same command again
            assert outcome(out) == expected, f"crash at write {k} ({writes[k]}, mid-write={mid_write})"
            assert not list(out.rglob("checkpoint.pt")) and not list(out.rglob(".lock"))
