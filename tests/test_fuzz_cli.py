"""Property test of the command line (hypothesis): generated protocol files (valid, mutated, garbage) and command
lines never give a traceback, exit with 0, 2 or 3, and write nothing when they fail.

Runs that pass every check do not train here (``run_grid`` is replaced by a stub: the training paths have their
own tests); everything before it runs for real: protocol loading and validation of every scale and method table,
``--set``, ``--sweep``, seeds, devices, ``--out``, the data and splits of every seed, a ``--teacher`` file.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import osslbench.runner
from osslbench.cli import main

METHODS = ["supervised", "kd", "srd", "fixmatch", "mixmatch", "kdd", "fixmtch", ""]
SECTIONS = {
    "data": ["labelled", "test", "unlabelled", "outlier_test", "image_size", "mean", "std", "crop_padding", "flip", "bogus"],
    "split": ["seen_classes", "seen_superclasses", "labels_per_class", "unlabelled", "mismatch", "bogus"],
    "models": ["teacher", "student", "bogus"],
    "train": ["epochs", "teacher_epochs", "iters_per_epoch", "batch_size", "eval_every", "last_k", "amp", "bogus"],
    "optim": ["name", "lr", "momentum", "weight_decay", "schedule", "milestones", "gamma", "bogus"],
}
METHOD_KEYS = ["alpha", "beta", "gamma", "temperature", "mu", "ema_decay", "threshold", "betta", "optim"]
WORDS = ["digits:train", "digits:test", "cifar100:train", "nope:x", "cnn-large", "cnn-small", "wrn-16-3", "sgd", "adam",
         "all", "natural", "cosine", "multistep", "smoke", "mini", "full", "huge"]

scalars = st.one_of(
    st.integers(-3, 40), st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
    st.sampled_from(WORDS), st.text(st.characters(blacklist_categories=("Cs",)), max_size=6),
)
values = st.one_of(scalars, st.lists(st.one_of(st.integers(-2, 12), st.sampled_from(WORDS)), max_size=4))


def tables(keys: list[str]) -> st.SearchStrategy[dict]:
    return st.dictionaries(st.sampled_from(keys), values, max_size=3)


protocol_trees = st.fixed_dictionaries(
    {"extends": st.sampled_from(["digits-openset", "digits-openset", "base.toml", "nope", "missing.toml"])},
    optional={
        "methods": st.lists(st.sampled_from(METHODS), max_size=3),
        "seeds": st.lists(st.one_of(st.integers(0, 3), st.integers(-2**40, 2**40)), max_size=3),
        "default_scale": st.sampled_from(["smoke", "full", "mini", "huge"]),
        "description": st.text(max_size=10),
        "unknown_top": scalars,
        **{name: tables(keys) for name, keys in SECTIONS.items()},
        "method": st.dictionaries(st.sampled_from(METHODS[:-1]), tables(METHOD_KEYS), max_size=2),
        "scales": st.dictionaries(st.sampled_from(["smoke", "mini", "tiny"]),
                                  st.dictionaries(st.sampled_from(list(SECTIONS)), tables(sum(SECTIONS.values(), [])),
                                                  max_size=2), max_size=2),
    },
)


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + "}"


def toml(tree: dict) -> str:
    return "".join(f"{json.dumps(k)} = {toml_value(v)}\n" for k, v in tree.items())


@st.composite
def protocol_files(draw) -> bytes:
    """A protocol file: a valid-looking tree, that tree with bytes mutated, or garbage."""
    text = toml(draw(protocol_trees)).encode()
    kind = draw(st.sampled_from(["tree", "tree", "mutated", "garbage"]))
    if kind == "mutated":
        data = bytearray(text)
        for _ in range(draw(st.integers(1, 4))):
            at = draw(st.integers(0, max(0, len(data) - 1)))
            data[at:at + draw(st.integers(0, 3))] = draw(st.binary(max_size=3))
        return bytes(data)
    if kind == "garbage":
        return draw(st.binary(max_size=40))
    return text


set_items = st.one_of(
    st.builds(lambda s, k, v: f"{s}.{k}={toml_value(v)}", st.sampled_from(list(SECTIONS)),
              st.sampled_from(sum(SECTIONS.values(), [])), scalars),
    st.builds(lambda m, k, v: f"method.{m}.{k}={toml_value(v)}", st.sampled_from(METHODS), st.sampled_from(METHOD_KEYS),
              scalars),
    st.text(max_size=12),
)


@st.composite
def command_lines(draw, files: dict[str, Path]) -> list[str]:
    verb = draw(st.sampled_from(["run", "run", "run", "show", "splits", "list", "leaderboard", "plot", "garbage"]))
    protocol = draw(st.sampled_from([str(files["mine"]), "digits-openset", "cifar100-tinyimagenet", "nope",
                                     str(files["garbage"])]))
    common = []
    if draw(st.booleans()):
        common += ["--scale", draw(st.sampled_from(["smoke", "mini", "full", "huge", ""]))]
    for item in draw(st.lists(set_items, max_size=2)):
        common += ["--set", item]
    out = str(files["root"] / "out")
    if verb == "run":
        argv = ["run", "--protocol", protocol, "--out", draw(st.sampled_from([out, str(files["garbage"])])),
                "--data-root", str(files["root"] / "no-data"), "--quiet", *common]
        options = {
            "--seeds": st.one_of(st.sampled_from(["0", "0,0", "-1", ",", "1,a", "12345678901234567890", ""]),
                                 st.lists(st.integers(-3, 2**33), min_size=1, max_size=3).map(lambda s: ",".join(map(str, s)))),
            "--methods": st.sampled_from(["supervised", "kd,kd", "all", "kdd", ",", "srd,fixmatch"]),
            "--device": st.sampled_from(["cpu", "auto", "tpu", "cuda", "cuda:7", "mps", "meta", "", "cpu:0"]),
            "--jobs": st.sampled_from(["1", "2", "0", "-1", "x"]),
            "--threads": st.sampled_from(["0", "1", "-2"]),
            "--teacher": st.sampled_from([str(files["garbage"]), str(files["root"] / "missing.pth"), str(files["weights"])]),
            "--sweep": st.sampled_from(["mismatch=0,1", "mismatch=0,0", "mismatsch=1", "lr=", "method.kd.alpha=0.5,1",
                                        "split.mismatch=2"]),
        }
        for flag in draw(st.lists(st.sampled_from(sorted(options)), max_size=3, unique=True)):
            argv += [flag, draw(options[flag])]
        return argv
    if verb == "show":
        return ["show", protocol, *common]
    if verb == "splits":
        return ["splits", "--protocol", protocol, "--data-root", str(files["root"] / "no-data"),
                "--seed", str(draw(st.sampled_from([0, 1, -1, 2**32, 2**70]))), *common]
    if verb == "list":
        return ["list", draw(st.sampled_from(["methods", "models", "protocols", "sources", "things"]))]
    if verb in ("leaderboard", "plot"):
        return [verb, "--out", draw(st.sampled_from([out, str(files["garbage"])]))]
    return draw(st.lists(st.text(max_size=8), max_size=4))


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def no_training(monkeypatch):
    monkeypatch.setattr(osslbench.runner, "run_grid", lambda *a, **k: [])


@settings(max_examples=500, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large])
@given(st.data())
def test_no_traceback_exit_0_2_3_and_nothing_written_on_error(no_training, data):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files = {"root": root, "mine": root / "mine.toml", "garbage": root / "garbage.pth", "weights": root / "w.pth"}
        files["mine"].write_bytes(data.draw(protocol_files(), label="protocol file"))
        (root / "base.toml").write_bytes(data.draw(protocol_files(), label="extended file"))
        files["garbage"].write_bytes(data.draw(st.binary(max_size=20), label="garbage file"))
        files["weights"].write_bytes(b"PK\x03\x04")
        argv = data.draw(command_lines(files), label="argv")
        before = snapshot(root)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.chdir(root), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exc:  # argparse: usage errors (2) and --help (0)
                code = exc.code
        text = err.getvalue()
        verb = argv[0] if argv and argv[0] in ("run", "show", "splits", "list", "leaderboard", "plot") else "garbage"
        event(f"{verb} exit {code}")  # pytest --hypothesis-show-statistics: the mix of outcomes
        assert code in (0, 2, 3), (argv, text)
        assert "Traceback" not in text, text
        if code != 0:
            errors = [line for line in text.splitlines() if "error:" in line]
            assert len(errors) == 1 and text.rstrip().splitlines()[-1] == errors[0], text
            assert snapshot(root) == before, f"{argv} failed with {text!r} but wrote files"
