"""Protocol files: scales, overrides, and errors that name the file and the key."""

from __future__ import annotations

import pytest

from osslbench.config import config_hash, parse_overrides
from osslbench.errors import ConfigError
from osslbench.protocol_loader import load_protocol, protocol_files
from osslbench.registry import get_method, method_config


def write(tmp_path, text: str):
    path = tmp_path / "p.toml"
    path.write_text(text)
    return str(path)


BASE = """
[data]
labelled = "digits:train"
test = "digits:test"
[split]
seen_classes = [0, 1]
[models]
teacher = "cnn-large"
student = "cnn-small"
[scales.tiny]
train = { epochs = 2 }
"""


def test_builtin_protocols_load_at_every_scale():
    for name in protocol_files():
        proto = load_protocol(name)
        for scale in proto.scales:
            assert load_protocol(name, scale).scale == scale


def test_scale_then_set_override_order(tmp_path):
    path = write(tmp_path, BASE)
    assert load_protocol(path).train.epochs == 240
    assert load_protocol(path, "tiny").train.epochs == 2
    # --set beats the scale, which beats the file
    assert load_protocol(path, "tiny", parse_overrides(["train.epochs=7"])).train.epochs == 7
    assert load_protocol(path, None, parse_overrides(["optim.lr=0.1"])).optim.lr == 0.1


def test_paper_schedule_of_the_main_protocol():
    p = load_protocol("cifar100-tinyimagenet", "full")
    assert (p.models.teacher, p.models.student) == ("wrn-40-2", "wrn-40-1")
    assert (p.train.epochs, p.train.batch_size, p.optim.lr, p.optim.weight_decay) == (240, 64, 0.05, 5e-4)
    assert [round(m * 240) for m in p.optim.milestones] == [150, 180, 210]
    assert p.data.outlier_test == "tinyimagenet:val" and p.data.unlabelled == "tinyimagenet:train"


@pytest.mark.parametrize(
    ("text", "overrides", "fragment"),
    [
        ("bogus = 1\n" + BASE, [], "unknown key 'bogus'"),
        (BASE + "bogus = 1\n", [], "[scales.tiny]: unknown key 'bogus'"),
        (BASE, ["split.bogus=1"], "split: unknown key 'bogus'"),
        (BASE, ["train.epochs=ten"], "train.epochs: expected int"),
        (BASE, ["split.mismatch=1.5"], "outside [0, 1]"),
        (BASE, ["split.labels_per_class=0"], "labels_per_class"),
        (BASE.replace('student = "cnn-small"', ""), [], "missing required key 'student'"),
        ("[data\n", [], "malformed TOML"),
    ],
)
def test_errors_name_file_and_key(tmp_path, text, overrides, fragment):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_protocol(path, None, parse_overrides(overrides))
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)
    # the error names where the bad key was written: the file, or --set (not the file)
    if overrides:
        assert str(err.value).startswith("--set: ") and "p.toml" not in str(err.value)
    else:
        assert "p.toml" in str(err.value)


def test_a_set_that_only_another_scale_rejects_names_that_scale(tmp_path):
    text = BASE.replace("[split]", "[split]\nunlabelled = 100") + 'split = { unlabelled = "all" }\n'
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:  # full has a fixed pool, tiny does not
        load_protocol(path, "full", parse_overrides(["split.mismatch=0.5"]))
    assert str(err.value).startswith(f"--set (on {path} [scales.tiny]): split: a mismatch ratio strictly between")


def test_an_error_in_the_file_is_the_files_even_with_a_valid_set(tmp_path):
    path = write(tmp_path, BASE.replace("[split]", "[train]\nepohcs = 3\n[split]"))
    with pytest.raises(ConfigError, match=r"p.toml.*unknown key 'epohcs'") as err:
        load_protocol(path, None, parse_overrides(["train.epochs=2"]))
    assert "--set" not in str(err.value)


def test_unknown_protocol_and_scale():
    with pytest.raises(ConfigError, match="unknown protocol 'nope'; known: .*digits-openset"):
        load_protocol("nope")
    with pytest.raises(ConfigError, match="unknown scale 'huge'"):
        load_protocol("digits-openset", "huge")


def test_method_config_layers():
    p = load_protocol("digits-openset", None, parse_overrides(["method.srd.beta=2", "method.fixmatch.optim.lr=0.1"]))
    srd, srd_optim = method_config(get_method("srd"), p)
    assert srd.beta == 2.0 and srd.logit_loss == "mse" and srd_optim.lr == p.optim.lr
    fm, fm_optim = method_config(get_method("fixmatch"), p)
    # method defaults (Nesterov, cosine) beat the protocol's generic [optim]; the method's optim table beats both
    assert fm_optim.nesterov and fm_optim.schedule == "cosine" and fm_optim.lr == 0.1 and not fm_optim.decay_bn_bias
    with pytest.raises(ConfigError, match="method.srd: unknown key 'betta'"):
        method_config(get_method("srd"), load_protocol("digits-openset", None, parse_overrides(["method.srd.betta=2"])))


def test_config_hash_is_stable_and_sensitive():
    a = load_protocol("digits-openset")
    b = load_protocol("digits-openset", None, parse_overrides(["optim.lr=0.2"]))
    assert config_hash(a) == config_hash(load_protocol("digits-openset"))
    assert config_hash(a) != config_hash(b)
