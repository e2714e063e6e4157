"""The shipped protocol catalogue: exact split counts of every protocol at its smoke scale (labels of the
official sizes, no images needed), superclass splits, ``extends``, sweeps and the class-overlap list."""

from __future__ import annotations

import numpy as np
import pytest

from osslbench.config import parse_overrides
from osslbench.data.overlap import overlap_report, shared_classes
from osslbench.data.splits import build_splits
from osslbench.errors import ConfigError
from osslbench.protocol_loader import load_protocol, protocol_files
from osslbench.sweep import parse_sweep, resolve_key, sweep_protocols

# CIFAR-100's real superclass structure is 20 x 5; the fabricated one groups classes c -> c // 5 (the counts
# only depend on 5 classes per superclass; the real mapping is checked on the real files in test_realdata).
CIFAR = tuple(f"class{i:02d}" for i in range(100))
TIN = tuple(f"n{i:08d}" for i in range(200))
PLACES = tuple(f"/p/place{i}" for i in range(365))
OFFICIAL = {  # (labels, classes) with the official sizes of every split the catalogue uses
    "cifar100:train": (np.repeat(np.arange(100), 500), CIFAR),
    "cifar100:test": (np.repeat(np.arange(100), 100), CIFAR),
    "tinyimagenet:train": (np.repeat(np.arange(200), 500), TIN),
    "tinyimagenet:val": (np.repeat(np.arange(200), 50), TIN),
    "places365:train": (np.arange(1_803_460) % 365, PLACES),
    "places365:val": (np.repeat(np.arange(365), 100), PLACES),
}


def _labels(spec: str):
    if spec.startswith("digits:"):
        from osslbench.data.dataset import labels_fn

        return labels_fn(load_protocol("digits-openset"), "unused")(spec)
    return OFFICIAL[spec]


def _superclasses(spec: str):
    assert spec.startswith("cifar100:")
    return [c // 5 for c in range(100)], tuple(f"super{i}" for i in range(20))


def sizes(name: str, scale: str = "smoke", overrides: dict | None = None, seed: int = 0) -> dict[str, int]:
    p = load_protocol(name, scale, overrides)
    return build_splits(p, seed, _labels, _superclasses).summary()["sizes"]


EXPECTED = {  # protocol -> labelled, unlabelled_seen, unlabelled_unseen, test, outlier_test at scale smoke
    "digits-openset": (60, 240, 240, 326, 214),
    "cifar100-tinyimagenet": (50_000, 0, 100_000, 64, 64),  # smoke evaluates a hashed subset (split.max_test)
    "cifar100-tinyimagenet-resnet8x4": (50_000, 0, 100_000, 64, 64),
    "cifar100-tinyimagenet-shufflev1": (50_000, 0, 100_000, 64, 64),
    "cifar100-tinyimagenet-shufflev2": (50_000, 0, 100_000, 64, 64),
    "cifar100-tinyimagenet-mobilenetv2": (50_000, 0, 100_000, 64, 64),
    "cifar100-tinyimagenet-bireal": (50_000, 0, 100_000, 64, 64),
    "cifar100-tinyimagenet-mismatch": (10_000, 10_000, 10_000, 64, 64),  # extends cifar100-tinyimagenet
    "cifar100-places365": (50_000, 0, 1_803_460, 64, 64),  # extends cifar100-tinyimagenet: its smoke cap too
    "cifar100-seen50": (1_250, 23_750, 25_000, 5_000, 5_000),
    "cifar100-seen55": (1_375, 26_125, 22_500, 5_500, 4_500),
    "cifar100-seen80": (2_000, 38_000, 10_000, 8_000, 2_000),
    "cifar100-seen20": (500, 9_500, 40_000, 2_000, 8_000),
    "cifar100-mismatch": (1_250, 10_000, 10_000, 5_000, 5_000),
}
KEYS = ("labelled", "unlabelled_seen", "unlabelled_unseen", "test", "outlier_test")


def test_every_shipped_protocol_is_covered() -> None:
    assert set(protocol_files()) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_smoke_split_counts(name: str) -> None:
    assert sizes(name) == dict(zip(KEYS, EXPECTED[name], strict=True))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_protocol_has_full_mini_smoke(name: str) -> None:
    for scale in ("full", "mini", "smoke"):
        p = load_protocol(name, scale)
        assert p.scale == scale and p.description and p.paper


def test_mini_scale_counts() -> None:
    assert sizes("cifar100-tinyimagenet-mismatch", "mini")["unlabelled_unseen"] == 5_000
    assert sizes("cifar100-places365", "mini")["unlabelled_unseen"] == 10_000
    assert sizes("cifar100-seen50", "mini") == sizes("cifar100-seen50", "full")


@pytest.mark.parametrize("r, seen, unseen", [(0, 20_000, 0), (0.25, 15_000, 5_000), (0.5, 10_000, 10_000),
                                             (0.75, 5_000, 15_000), (1, 0, 20_000)])
def test_mismatch_sweep_points_exact(r: float, seen: int, unseen: int) -> None:
    (point,) = sweep_protocols("cifar100-mismatch", "mini", {}, [f"mismatch={r}"])
    s = build_splits(point, 0, _labels, _superclasses).summary()
    assert (s["sizes"]["unlabelled_seen"], s["sizes"]["unlabelled_unseen"]) == (seen, unseen)
    assert s["mismatch"] == pytest.approx(r)
    assert point.sweep == {"mismatch": float(r)} and point.variant == f"mismatch={float(r)}"


def test_labelled_set_is_the_same_at_every_mismatch() -> None:
    points = sweep_protocols("cifar100-mismatch", "mini", {}, ["mismatch=0,1"])
    a, b = (build_splits(p, 3, _labels, _superclasses) for p in points)
    assert np.array_equal(a.labelled, b.labelled)
    assert not np.array_equal(a.unlabelled_seen, b.unlabelled_seen)


def test_seen_superclasses_selects_whole_superclasses() -> None:
    p = load_protocol("cifar100-seen50")
    s = build_splits(p, 0, _labels, _superclasses)
    assert s.seen_classes == list(range(50)) and s.unseen_classes == list(range(50, 100))
    p20 = load_protocol("cifar100-seen20", None, parse_overrides(["split.labels_per_class=4"]))
    s20 = build_splits(p20, 0, _labels, _superclasses)
    assert s20.seen_classes == list(range(20)) and len(s20.labelled) == 80


def test_seen_superclasses_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match="seen_superclasses = 21 but cifar100:train has 20 superclasses"):
        build_splits(load_protocol("cifar100-seen50", None, {"split": {"seen_superclasses": 21}}), 0, _labels,
                     _superclasses)
    with pytest.raises(ConfigError, match="not both"):
        load_protocol("cifar100-seen50", None, {"split": {"seen_classes": [0, 1]}})
    with pytest.raises(ConfigError, match="needs the superclasses"):
        build_splits(load_protocol("cifar100-seen50"), 0, _labels)


def test_source_without_superclasses_is_a_config_error() -> None:
    from osslbench.sources import get_source

    with pytest.raises(ConfigError, match="has no superclasses"):
        get_source("tinyimagenet").superclasses("unused")


def test_seen_superclasses_keeps_old_hashes() -> None:
    """A key added later is left out of config trees at its default: earlier results keep their hashes."""
    from osslbench.config import as_tree

    assert "seen_superclasses" not in as_tree(load_protocol("digits-openset").split)
    assert as_tree(load_protocol("cifar100-seen50").split)["seen_superclasses"] == 10


def test_extends_merges_and_names_problems(tmp_path) -> None:
    seen80 = load_protocol("cifar100-seen80", "mini")
    assert seen80.split.seen_superclasses == 16 and seen80.models.student == "wrn-16-1"
    assert seen80.method_tree("fixmatch")["mu"] == 2.0 and seen80.description.startswith("CIFAR-100, seen = first 16")
    bad = tmp_path / "child.toml"
    bad.write_text('extends = "no-such-protocol"\n')
    with pytest.raises(ConfigError, match="unknown protocol 'no-such-protocol'"):
        load_protocol(str(bad))
    bad.write_text('extends = "cifar100-seen50"\n[split]\nlabels_per_klass = 3\n')
    with pytest.raises(ConfigError, match="labels_per_klass"):
        load_protocol(str(bad))


def test_unknown_source_in_a_protocol_names_file_and_key(tmp_path) -> None:
    from osslbench.data.dataset import make_splits

    path = tmp_path / "p.toml"
    path.write_text('extends = "cifar100-tinyimagenet"\n[data]\nunlabelled = "imagenet21k:train"\n')
    with pytest.raises(ConfigError, match=r"p.toml: data.unlabelled: unknown data source 'imagenet21k'"):
        make_splits(load_protocol(str(path)), 0, "unused")
    path.write_text('extends = "cifar100-tinyimagenet"\n[data]\noutlier_test = "tinyimagenet:test"\n')
    with pytest.raises(ConfigError, match=r"data.outlier_test: source 'tinyimagenet' has no split 'test'"):
        make_splits(load_protocol(str(path)), 0, "unused")


def test_unknown_scale_names_the_file() -> None:
    with pytest.raises(ConfigError, match="protocols/cifar100-seen55.toml: unknown scale 'huge'"):
        load_protocol("cifar100-seen55", "huge")


def test_sweep_keys() -> None:
    p = load_protocol("cifar100-mismatch")
    assert resolve_key("mismatch", p) == "split.mismatch"
    assert resolve_key("train.epochs", p) == "train.epochs"
    assert resolve_key("method.fixmatch.mu", p) == "method.fixmatch.mu"
    assert parse_sweep("mismatch=0,0.5,1", p) == ("split.mismatch", [0, 0.5, 1])
    for bad, msg in [("mismatsch=0,1", "unknown key 'mismatsch'"), ("split.nope=1", "unknown key 'split.nope'"),
                     ("mismatch", "expected KEY=V1"), ("mismatch=0,,1", "expected KEY=V1"),
                     ("mismatch=0,0", "repeated"), ("lr=0.1", None)]:
        if msg is None:
            assert resolve_key("lr", p) == "optim.lr"
            continue
        with pytest.raises(ConfigError, match=msg):
            parse_sweep(bad, p)
    with pytest.raises(ConfigError, match="mismatch = 1.5 is outside"):
        sweep_protocols("cifar100-mismatch", None, {}, ["mismatch=0.5,1.5"])


def test_sweep_grid_and_folders(tmp_path) -> None:
    points = sweep_protocols("cifar100-mismatch", "smoke", {}, ["mismatch=0,1", "method.fixmatch.mu=1,3"])
    assert [p.sweep for p in points] == [
        {"mismatch": 0.0, "method.fixmatch.mu": 1}, {"mismatch": 0.0, "method.fixmatch.mu": 3},
        {"mismatch": 1.0, "method.fixmatch.mu": 1}, {"mismatch": 1.0, "method.fixmatch.mu": 3}]
    assert points[1].folder(tmp_path) == tmp_path / "cifar100-mismatch" / "smoke" / "mismatch=0.0,method.fixmatch.mu=3"
    assert load_protocol("cifar100-mismatch", "smoke").folder(tmp_path) == tmp_path / "cifar100-mismatch" / "smoke"


def test_overlap_list() -> None:
    shared = shared_classes("cifar100", "tinyimagenet")
    assert len(shared) == 37 and len({s.foreign for s in shared}) == 37
    assert {s.relation for s in shared} == {"same name", "kind of"}
    assert sum(s.relation == "same name" for s in shared) == 10
    by_wnid = {s.foreign: s.labelled for s in shared}
    assert by_wnid["n04146614"] == "bus" and by_wnid["n02129165"] == "lion"
    assert {s.labelled for s in shared} <= set(_CIFAR100_NAMES)
    assert shared_classes("cifar100", "places365") == []


_CIFAR100_NAMES = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can "
    "castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin "
    "elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster "
    "man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck "
    "pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk "
    "skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger "
    "tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm"
).split()


def test_overlap_report_counts_images() -> None:
    classes = ("n04146614", "n00000001", "n02129165")
    labels = np.array([0, 0, 1, 2, 1, 1])
    report = overlap_report("cifar100", "tinyimagenet", labels, classes)
    assert report["images_in_shared_classes"] == 3 and report["fraction"] == 0.5 and report["shared_classes"] == 37
    assert overlap_report("cifar100", "places365", labels, classes) == {}
