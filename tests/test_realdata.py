"""Data sources on the real data folder (``../shared/data``, or ``$OSSLBENCH_DATA``); skipped when absent.

Read-only: nothing here writes into the data folder (``download`` stays off).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from osslbench.sources import load_split
from osslbench.sources.cifar import cifar100_coarse_classes, cifar100_coarse_labels, cifar100_fine_to_coarse
from osslbench.sources.tinyimagenet import read_words

DATA = Path(os.environ.get("OSSLBENCH_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")
CIFAR = DATA / "cifar-100-python"
TINY = DATA / "tiny-imagenet-200"

pytestmark = [
    pytest.mark.realdata,
    pytest.mark.skipif(not DATA.is_dir(), reason=f"real data folder {DATA} absent"),
]
needs_cifar = pytest.mark.skipif(not CIFAR.is_dir(), reason=f"{CIFAR} absent")
needs_tiny = pytest.mark.skipif(not TINY.is_dir(), reason=f"{TINY} absent")


@needs_cifar
def test_cifar100_real() -> None:
    train = load_split("cifar100:train", DATA)
    test = load_split("cifar100:test", DATA)
    assert train.images.shape == (50_000, 3, 32, 32) and test.images.shape == (10_000, 3, 32, 32)
    assert train.images.dtype == torch.uint8
    assert len(train.classes) == 100 and train.classes == test.classes
    assert train.classes[:3] == ("apple", "aquarium_fish", "baby")
    assert torch.bincount(train.labels, minlength=100).tolist() == [500] * 100
    assert torch.bincount(test.labels, minlength=100).tolist() == [100] * 100


@needs_cifar
def test_cifar100_superclasses_real() -> None:
    coarse = cifar100_coarse_labels(DATA, "test")
    assert coarse.shape == (10_000,) and set(coarse.tolist()) == set(range(20))
    assert len(cifar100_coarse_classes(DATA)) == 20
    mapping = cifar100_fine_to_coarse(DATA)
    assert mapping.shape == (100,)
    assert sorted(torch.bincount(torch.from_numpy(mapping), minlength=20).tolist()) == [5] * 20  # 5 classes each


@needs_tiny
def test_tinyimagenet_real() -> None:
    wnids = [w for w in (TINY / "wnids.txt").read_text().split() if w]
    n_train = sum(1 for p in (TINY / "train").glob("*/images/*.JPEG"))
    n_val = sum(1 for p in (TINY / "val" / "images").glob("*.JPEG"))
    train = load_split("tinyimagenet:train", DATA)
    val = load_split("tinyimagenet:val", DATA)
    assert len(train.classes) == len(wnids) and train.classes == tuple(wnids) == val.classes
    assert train.images.shape == (n_train, 3, 64, 64) and val.images.shape == (n_val, 3, 64, 64)
    assert int(train.labels.max()) < len(wnids) and int(val.labels.max()) < len(wnids)
    small = load_split("tinyimagenet:train", DATA, image_size=32)
    assert small.images.shape == (n_train, 3, 32, 32) and small.images.dtype == torch.uint8
    assert len(read_words(DATA)) == len(wnids)


@needs_cifar
def test_seen50_on_the_real_superclasses() -> None:
    """The first 10 superclasses of the real files: 50 classes, aquatic mammals .. large natural outdoor scenes."""
    from osslbench.data.dataset import make_splits
    from osslbench.protocol_loader import load_protocol

    s = make_splits(load_protocol("cifar100-seen50", "mini"), 0, DATA)
    names = [s.class_names[c] for c in s.seen_classes]
    assert len(names) == 50 and {"beaver", "dolphin", "otter", "seal", "whale", "aquarium_fish", "flatfish"} <= set(names)
    coarse = cifar100_coarse_classes(DATA)
    mapping = cifar100_fine_to_coarse(DATA)
    assert {coarse[mapping[c]] for c in s.seen_classes} == set(coarse[:10])
    assert s.summary()["sizes"] == {"labelled": 1250, "unlabelled_seen": 23750, "unlabelled_unseen": 25000,
                                    "test": 5000, "outlier_test": 5000}


@needs_cifar
@needs_tiny
def test_decoded_cache_on_real_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """First use decodes and stores; a fresh process (in-memory cache cleared) memory-maps identical pixels."""
    from osslbench.sources import cache_clear

    monkeypatch.setenv("OSSLBENCH_CACHE", str(tmp_path))
    for spec, size in (("cifar100:test", None), ("tinyimagenet:val", 32)):
        cache_clear()
        first = load_split(spec, DATA, image_size=size)
        cache_clear()
        second = load_split(spec, DATA, image_size=size)
        assert second is not first
        assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
        assert first.classes == second.classes
    assert len(list(tmp_path.glob("*/*/images.npy"))) == 2


@needs_cifar
@needs_tiny
def test_overlap_count_on_real_tinyimagenet() -> None:
    from osslbench.data.dataset import make_splits, splits_report
    from osslbench.protocol_loader import load_protocol

    p = load_protocol("cifar100-tinyimagenet", "mini")
    s = make_splits(p, 0, DATA)
    overlap = splits_report(p, s, DATA)["unlabelled_in_labelled_classes"]
    per_class = len(s.unlabelled_unseen) // 200  # the local subset has the same count in every class
    assert overlap["shared_classes"] == 37 and overlap["images_in_shared_classes"] == 37 * per_class
