"""Two processes, one ``--out``: a run folder has one owner at a time, nothing is lost or mixed, and a killed
owner's lock does not outlive it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from osslbench.fsio import RunLock, RunLockedError
from osslbench.protocol_loader import load_protocol

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["--scale", "smoke", "--quiet", "--set", "train.amp=false", "--threads", "1"]


def start(tmp_path: Path, tag: str, *argv: str) -> tuple[subprocess.Popen, Path]:
    err = tmp_path / f"{tag}.err"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "osslbench", "run", *argv], cwd=tmp_path, env=env,
                            stdout=open(tmp_path / f"{tag}.out", "w"), stderr=open(err, "w"))
    return proc, err


def wait_for(paths: list[Path], text: str, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if all(p.exists() and text in p.read_text() for p in paths):
            return
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not seen in {[p.read_text() for p in paths]}")


def finish(proc: subprocess.Popen, err: Path) -> tuple[int, str]:
    return proc.wait(timeout=300), err.read_text()


def leftovers(out: Path) -> list[str]:
    return [str(p) for p in out.rglob("*") if p.name.endswith(".tmp") or p.name in (".lock", "checkpoint.pt")]


def test_two_configs_into_one_run_folder_one_wins_the_other_refuses(tmp_path):
    """Both processes are made to wait on the same run folder, then race for it: one trains, the other then
    finds a result of another config and refuses with one line; result.json is the winner's."""
    out = tmp_path / "out"
    folder = out / "digits-openset" / "smoke" / "supervised" / "seed0"
    lrs = {"a": 0.05, "b": 0.1}
    with RunLock(folder):
        procs = {tag: start(tmp_path, tag, "--methods", "supervised", "--out", str(out), *SMOKE, "--set", f"optim.lr={lr}")
                 for tag, lr in lrs.items()}
        wait_for([err for _, err in procs.values()], "is in use by process")
    done = {tag: finish(*procs[tag]) for tag in procs}
    assert sorted(code for code, _ in done.values()) == [0, 2], done
    winner = next(tag for tag, (code, _) in done.items() if code == 0)
    loser = next(tag for tag in done if tag != winner)
    errors = [line for line in done[loser][1].splitlines() if line.startswith("osslbench: error: ")]
    assert len(errors) == 1 and "holds a result of another config" in errors[0] and "Traceback" not in done[loser][1]
    result = json.loads((folder / "result.json").read_text())
    assert result["config"]["optim"]["lr"] == lrs[winner]
    printed = (tmp_path / f"{winner}.out").read_text()
    assert f"{result['metrics']['top1_last']:.2f}" in printed  # the figures it printed are the ones kept
    assert leftovers(out) == []


def test_two_methods_sharing_a_teacher_train_it_once(tmp_path):
    """kd and srd in two processes need the same teacher: one trains it, the other waits and reuses it."""
    out = tmp_path / "out"
    teacher = out / "digits-openset" / "smoke" / "teacher-cnn-large" / "seed0"
    with RunLock(teacher):
        procs = {m: start(tmp_path, m, "--methods", m, "--out", str(out), *SMOKE) for m in ("kd", "srd")}
        wait_for([err for _, err in procs.values()], "is in use by process")
    done = {m: finish(*procs[m]) for m in procs}
    assert all(code == 0 for code, _ in done.values()), done
    records = [json.loads((out / "digits-openset" / "smoke" / m / "seed0" / "result.json").read_text())["teacher"]
               for m in ("kd", "srd")]
    assert records[0] == records[1] and records[0]["source"] == "trained"
    rows = (teacher / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == load_protocol("digits-openset", "smoke").train.teacher_epochs  # written once
    board = (out / "digits-openset" / "leaderboard.csv").read_text()
    assert ",kd," in board and ",srd," in board  # the last writer saw both results
    assert leftovers(out) == []


def test_lock_names_its_holder_and_dies_with_it(tmp_path):
    folder = tmp_path / "run"
    code = ("import sys, time; from osslbench.fsio import RunLock; lock = RunLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=f"is in use by process {holder.pid}; wait for it"):
            RunLock(folder, wait=False).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (folder / ".lock").exists()  # a killed holder cannot clean up, but its lock went with it
    (folder / ".x.checkpoint.pt.tmp").write_bytes(b"half")  # and a temporary file it was writing is stale
    with RunLock(folder, wait=False):
        assert (folder / ".lock").read_text().strip() == str(os.getpid())
        assert not (folder / ".x.checkpoint.pt.tmp").exists()
    assert not folder.exists()  # nothing was written: nothing is left
