"""The split builder: exact counts, the mismatch ratio, determinism per seed."""

from __future__ import annotations

import numpy as np
import pytest

from osslbench.config import parse_overrides
from osslbench.data.splits import Splits, build_splits
from osslbench.errors import ConfigError
from osslbench.protocol_loader import load_protocol

# A fake labelled source: 10 classes x 100 images; a foreign source of 500 images; a test source 10 x 20.
LABELS = {
    "fake:train": (np.repeat(np.arange(10), 100), tuple(f"c{i}" for i in range(10))),
    "fake:test": (np.repeat(np.arange(10), 20), tuple(f"c{i}" for i in range(10))),
    "foreign:train": (np.zeros(500, dtype=int), ("x",)),
    "foreign:val": (np.zeros(50, dtype=int), ("x",)),
}


def protocol(tmp_path, split: str, data_extra: str = ""):
    path = tmp_path / "p.toml"
    path.write_text(f"""
[data]
labelled = "fake:train"
test = "fake:test"
{data_extra}
[split]
{split}
[models]
teacher = "cnn-large"
student = "cnn-small"
""")
    return load_protocol(str(path))


def build(p, seed=0):
    return build_splits(p, seed, LABELS.__getitem__)


def test_class_split_exact_counts_and_ratio(tmp_path):
    p = protocol(tmp_path, "seen_classes = [0, 1, 2, 3, 4, 5]\nlabels_per_class = 10\nunlabelled = 200\nmismatch = 0.25")
    s = build(p)
    sizes = s.summary()["sizes"]
    assert sizes == {"labelled": 60, "unlabelled_seen": 150, "unlabelled_unseen": 50, "test": 120, "outlier_test": 80}
    lab_y = LABELS["fake:train"][0]
    assert (np.bincount(lab_y[s.labelled], minlength=10)[:6] == 10).all()
    assert set(lab_y[s.unlabelled_seen]) <= set(range(6)) and set(lab_y[s.unlabelled_unseen]) <= {6, 7, 8, 9}
    assert not set(s.labelled) & set(s.unlabelled_seen)  # labelled images never reappear as unlabelled
    assert s.summary()["mismatch"] == 0.25
    assert set(LABELS["fake:test"][0][s.outlier_test]) == {6, 7, 8, 9}


@pytest.mark.parametrize("r", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_mismatch_sweep_exact(tmp_path, r):
    p = protocol(tmp_path, f"seen_classes = [0, 1, 2, 3, 4]\nlabels_per_class = 20\nunlabelled = 300\nmismatch = {r}")
    s = build(p)
    assert len(s.unlabelled_unseen) == round(300 * r) and len(s.unlabelled_seen) == 300 - round(300 * r)


def test_natural_pool_with_and_without_foreign_source(tmp_path):
    own = build(protocol(tmp_path, "seen_classes = [0, 1]\nlabels_per_class = 30"))
    assert own.summary()["sizes"]["unlabelled_seen"] == 2 * 70 and len(own.unlabelled_unseen) == 8 * 100
    foreign = build(protocol(tmp_path, 'labels_per_class = "all"',
                             'unlabelled = "foreign:train"\noutlier_test = "foreign:val"'))
    assert foreign.summary()["sizes"] == {"labelled": 1000, "unlabelled_seen": 0, "unlabelled_unseen": 500,
                                          "test": 200, "outlier_test": 50}
    assert foreign.sources["unlabelled_unseen"] == "foreign:train" and foreign.sources["outlier_test"] == "foreign:val"


def test_determinism(tmp_path):
    p = protocol(tmp_path, "seen_classes = [0, 1, 2]\nlabels_per_class = 5\nunlabelled = 100\nmismatch = 0.5")
    a, b, c = build(p, 0), build(p, 0), build(p, 1)
    for key in Splits._ARRAYS:
        assert np.array_equal(getattr(a, key), getattr(b, key))
    assert not np.array_equal(a.labelled, c.labelled) and not np.array_equal(a.unlabelled_unseen, c.unlabelled_unseen)


def test_saved_index_files_reproduce_the_split(tmp_path):
    s = build(protocol(tmp_path, "seen_classes = [0, 1]\nlabels_per_class = 5\nunlabelled = 40\nmismatch = 0.5"))
    s.save(tmp_path / "splits.npz")
    t = Splits.load(tmp_path / "splits.npz")
    assert t.summary() == s.summary() and all(np.array_equal(getattr(s, k), getattr(t, k)) for k in Splits._ARRAYS)


@pytest.mark.parametrize(
    ("split", "fragment"),
    [
        ("seen_classes = [0]\nlabels_per_class = 101", "labels_per_class = 101 but class 'c0' of fake:train has only 100"),
        ("seen_classes = [0, 1]\nlabels_per_class = 10\nunlabelled = 900\nmismatch = 0.1", "seen-class part"),
        ('seen_classes = ["c0", "zebra"]', "unknown class 'zebra'"),
        ("seen_classes = [0, 42]", "class index 42"),
    ],
)
def test_impossible_splits_name_file_and_key(tmp_path, split, fragment):
    with pytest.raises(ConfigError, match="p.toml") as err:
        build(protocol(tmp_path, split))
    assert fragment in str(err.value)


def test_digits_default_counts():
    from osslbench.data.dataset import make_splits

    s = make_splits(load_protocol("digits-openset"), 0, "unused")
    assert s.summary()["sizes"] == {"labelled": 60, "unlabelled_seen": 240, "unlabelled_unseen": 240,
                                    "test": 326, "outlier_test": 214}
    smoke = make_splits(load_protocol("digits-openset", None, parse_overrides(["split.unlabelled=100"])), 0, "unused")
    assert smoke.summary()["sizes"]["unlabelled_unseen"] == 50
