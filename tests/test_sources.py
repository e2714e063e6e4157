"""Data sources on fabricated files in the exact official formats (no real data, no network, fast)."""

from __future__ import annotations

import io
import os
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets.utils import calculate_md5

from osslbench.errors import ConfigError, DataCorruptError, DataMissingError
from osslbench.sources import cache_clear, describe_sources, get_source, load_split, resize_images, source_names
from osslbench.sources import cifar as cifar_mod
from osslbench.sources.cifar import cifar100_coarse_classes, cifar100_coarse_labels, cifar100_fine_to_coarse
from osslbench.sources.digits import DIGITS_SPLIT_SIZES
from osslbench.sources.tinyimagenet import read_words


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    cache_clear()


# --------------------------------------------------------------------------------------------------------
# CIFAR-100: pickles written the way the originals were (Python 2, protocol 2: byte-string keys and data
# are SHORT_BINSTRING / BINSTRING opcodes, which Python 3 reads back as str with encoding="latin1").


class _Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Write ``bytes`` as Python 2 ``str`` opcodes, as in the official CIFAR pickles."""

    def save_bytes(self, obj: bytes) -> None:
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]
    dispatch[bytes] = save_bytes


def _py2_dump(obj: Any, path: Path) -> None:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    path.write_bytes(buf.getvalue())


FINE = [b"apple", b"bear", b"maple_tree", b"oak_tree"]
COARSE = [b"fruit_and_vegetables", b"large_carnivores", b"trees"]
FINE_TO_COARSE = [0, 1, 2, 2]
TRAIN_FINE = [3, 0, 1, 2, 2, 1, 0, 3]
TEST_FINE = [1, 3, 0, 2]


def _cifar_batch(fine: list[int], seed: int, label: bytes) -> dict[bytes, Any]:
    rng = np.random.default_rng(seed)
    return {
        b"filenames": [b"img_%d.png" % i for i in range(len(fine))],
        b"batch_label": label,
        b"fine_labels": list(fine),
        b"coarse_labels": [FINE_TO_COARSE[f] for f in fine],
        b"data": rng.integers(0, 256, size=(len(fine), 3072), dtype=np.uint8),
    }


@pytest.fixture
def cifar_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A data root with fabricated cifar-100-python/{train,test,meta}; their MD5s injected into CIFAR_MD5."""
    root = tmp_path / "data"
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    _py2_dump(_cifar_batch(TRAIN_FINE, 1, b"training batch 1 of 1"), folder / "train")
    _py2_dump(_cifar_batch(TEST_FINE, 2, b"testing batch 1 of 1"), folder / "test")
    _py2_dump({b"fine_label_names": FINE, b"coarse_label_names": COARSE}, folder / "meta")
    md5s = {name: calculate_md5(folder / name) for name in ("train", "test", "meta")}
    monkeypatch.setitem(cifar_mod.CIFAR_MD5, "cifar100", md5s)
    return root


def test_cifar100_train_and_test(cifar_root: Path) -> None:
    train = load_split("cifar100:train", cifar_root)
    test = load_split("cifar100:test", cifar_root)
    assert len(train) == 8 and len(test) == 4
    assert train.images.shape == (8, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64
    assert train.labels.tolist() == TRAIN_FINE and test.labels.tolist() == TEST_FINE
    assert train.classes == ("apple", "bear", "maple_tree", "oak_tree")
    assert train.name == "cifar100:train"
    # rows of b"data" are the R, G, B planes of 32x32 images
    raw = _cifar_batch(TRAIN_FINE, 1, b"")[b"data"]
    assert torch.equal(train.images, torch.from_numpy(raw.reshape(-1, 3, 32, 32)))


def test_cifar100_superclasses(cifar_root: Path) -> None:
    assert cifar100_coarse_labels(cifar_root, "train").tolist() == [FINE_TO_COARSE[f] for f in TRAIN_FINE]
    assert cifar100_coarse_labels(cifar_root, "test").tolist() == [FINE_TO_COARSE[f] for f in TEST_FINE]
    assert cifar100_coarse_classes(cifar_root) == ("fruit_and_vegetables", "large_carnivores", "trees")
    assert cifar100_fine_to_coarse(cifar_root).tolist() == FINE_TO_COARSE
    with pytest.raises(ConfigError):
        cifar100_coarse_labels(cifar_root, "val")


def test_cifar_missing_names_expected_files(tmp_path: Path) -> None:
    with pytest.raises(DataMissingError) as err:
        load_split("cifar100:train", tmp_path)
    msg = str(err.value)
    assert "\n" not in msg
    assert str(tmp_path / "cifar-100-python" / "train") in msg
    assert f"{tmp_path / 'cifar-100-python'}/{{train,test,meta}}" in msg
    assert "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz" in msg and "--download" in msg


def test_cifar_missing_meta(cifar_root: Path) -> None:
    (cifar_root / "cifar-100-python" / "meta").unlink()
    with pytest.raises(DataMissingError, match="meta"):
        load_split("cifar100:test", cifar_root)


def test_cifar_truncated_file_is_corrupt(cifar_root: Path) -> None:
    path = cifar_root / "cifar-100-python" / "train"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(DataCorruptError) as err:
        load_split("cifar100:train", cifar_root)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    load_split("cifar100:test", cifar_root)  # the other split is unaffected


def test_cifar_real_md5s_are_checked(cifar_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without injected MD5s the fabricated files fail torchvision's official checksums."""
    monkeypatch.setitem(cifar_mod.CIFAR_MD5, "cifar100", cifar_mod._torchvision_md5s(cifar_mod.CIFAR100))
    with pytest.raises(DataCorruptError, match="test"):
        load_split("cifar100:test", cifar_root)


def test_cifar_download_fetches_missing_files(
    tmp_path: Path, cifar_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``download=True`` calls torchvision's downloader when files are missing, then loads (no network here)."""
    calls: list[str] = []

    def fake_download(url: str, root: str, **kwargs: Any) -> None:
        calls.append(url)
        (Path(root) / "cifar-100-python").symlink_to(cifar_root / "cifar-100-python")

    monkeypatch.setattr(cifar_mod, "download_and_extract_archive", fake_download)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert len(load_split("cifar100:test", empty, download=True)) == 4
    assert calls == ["https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"]

    def failing_download(url: str, root: str, **kwargs: Any) -> None:
        raise OSError("network unreachable")

    monkeypatch.setattr(cifar_mod, "download_and_extract_archive", failing_download)
    with pytest.raises(DataMissingError, match="network unreachable"):
        load_split("cifar100:test", tmp_path / "nowhere", download=True)


# --------------------------------------------------------------------------------------------------------
# Tiny-ImageNet: official folder layout with a few solid-colour JPEGs.

WNIDS = ["n02", "n01", "n03"]  # deliberately not sorted: the file order defines the labels
TRAIN_INDICES = [10, 0, 2]  # listed out of numeric (and lexicographic) order on purpose
VAL = {"val_3.JPEG": "n03", "val_0.JPEG": "n02", "val_12.JPEG": "n01", "val_1.JPEG": "n02"}
VAL_LISTED_ONLY = {"val_2.JPEG": "n01", "val_4.JPEG": "n03"}  # annotated, but absent from disk


def _colour(label: int, index: int) -> tuple[int, int, int]:
    return (40 * label + 20, 5 * index + 10, 200 - 30 * label)


def _jpeg(path: Path, rgb: tuple[int, int, int], grey: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", (64, 64), rgb)
    (img.convert("L") if grey else img).save(path, format="JPEG", quality=95)


@pytest.fixture
def tiny_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    f = root / "tiny-imagenet-200"
    f.mkdir(parents=True)
    (f / "wnids.txt").write_text("".join(w + "\n" for w in WNIDS))
    (f / "words.txt").write_text("n00\tentity\nn01\tgoldfish, Carassius auratus\nn02\ttabby, tabby cat\nn03\tlemon\n")
    for label, wnid in enumerate(WNIDS):
        for i in TRAIN_INDICES:
            path = f / "train" / wnid / "images" / f"{wnid}_{i}.JPEG"
            _jpeg(path, _colour(label, i), grey=(wnid == "n01" and i == 2))
        (f / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    for name, wnid in VAL.items():
        _jpeg(f / "val" / "images" / name, _colour(WNIDS.index(wnid), 0))
    listed = {**VAL, **VAL_LISTED_ONLY}
    (f / "val" / "val_annotations.txt").write_text(
        "".join(f"{name}\t{wnid}\t0\t0\t63\t63\n" for name, wnid in sorted(listed.items()))
    )
    return root


def test_tinyimagenet_train(tiny_root: Path) -> None:
    train = load_split("tinyimagenet:train", tiny_root)
    assert train.images.shape == (9, 3, 64, 64) and train.images.dtype == torch.uint8
    assert train.classes == tuple(WNIDS)
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # within a class, files are ordered by numeric index 0, 2, 10
    means = train.images.float().mean(dim=(2, 3))
    for k, (label, i) in enumerate((label, i) for label in range(3) for i in sorted(TRAIN_INDICES)):
        expected = torch.tensor(_colour(label, i), dtype=torch.float32)
        if WNIDS[label] == "n01" and i == 2:  # the greyscale image: three equal channels
            assert torch.equal(train.images[k, 0], train.images[k, 1])
            assert torch.equal(train.images[k, 0], train.images[k, 2])
        else:
            assert torch.allclose(means[k], expected, atol=4), (k, means[k], expected)


def test_tinyimagenet_val_only_existing_files(tiny_root: Path) -> None:
    val = load_split("tinyimagenet:val", tiny_root)
    assert len(val) == len(VAL) == 4  # the annotations list 6 files, 4 exist
    order = ["val_0.JPEG", "val_1.JPEG", "val_3.JPEG", "val_12.JPEG"]
    assert val.labels.tolist() == [WNIDS.index(VAL[n]) for n in order]
    means = val.images.float().mean(dim=(2, 3))
    for k, name in enumerate(order):
        expected = torch.tensor(_colour(WNIDS.index(VAL[name]), 0), dtype=torch.float32)
        assert torch.allclose(means[k], expected, atol=4)


def test_tinyimagenet_resize_to_32(tiny_root: Path) -> None:
    native = load_split("tinyimagenet:train", tiny_root)
    small = load_split("tinyimagenet:train", tiny_root, image_size=32)
    assert small.images.shape == (9, 3, 32, 32) and small.images.dtype == torch.uint8
    assert torch.equal(small.labels, native.labels) and small.classes == native.classes
    # solid colours stay (almost) the same colour
    assert (small.images.float().mean(dim=(2, 3)) - native.images.float().mean(dim=(2, 3))).abs().max() < 2


def test_tinyimagenet_words(tiny_root: Path) -> None:
    assert read_words(tiny_root) == {"n02": "tabby, tabby cat", "n01": "goldfish, Carassius auratus", "n03": "lemon"}


def test_tinyimagenet_missing(tmp_path: Path, tiny_root: Path) -> None:
    with pytest.raises(DataMissingError) as err:
        load_split("tinyimagenet:train", tmp_path / "nothing")
    msg = str(err.value)
    assert str(tmp_path / "nothing" / "tiny-imagenet-200" / "wnids.txt") in msg and "\n" not in msg
    assert "http://cs231n.stanford.edu/tiny-imagenet-200.zip" in msg
    ann = tiny_root / "tiny-imagenet-200" / "val" / "val_annotations.txt"
    ann.unlink()
    with pytest.raises(DataMissingError, match="val_annotations.txt"):
        load_split("tinyimagenet:val", tiny_root)
    assert len(load_split("tinyimagenet:train", tiny_root)) == 9


def test_tinyimagenet_missing_class_folder(tiny_root: Path) -> None:
    with open(tiny_root / "tiny-imagenet-200" / "wnids.txt", "a") as f:
        f.write("n04\n")
    with pytest.raises(DataMissingError, match="n04"):
        load_split("tinyimagenet:train", tiny_root)


def test_tinyimagenet_corrupt_jpeg(tiny_root: Path) -> None:
    bad = tiny_root / "tiny-imagenet-200" / "train" / "n03" / "images" / "n03_2.JPEG"
    bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(DataCorruptError) as err:
        load_split("tinyimagenet:train", tiny_root)
    assert str(bad) in str(err.value) and "\n" not in str(err.value)


def test_tinyimagenet_val_file_not_annotated(tiny_root: Path) -> None:
    extra = tiny_root / "tiny-imagenet-200" / "val" / "images" / "val_99.JPEG"
    _jpeg(extra, (1, 2, 3))
    with pytest.raises(DataCorruptError, match="val_99.JPEG"):
        load_split("tinyimagenet:val", tiny_root)


# --------------------------------------------------------------------------------------------------------
# digits, registry, specs, cache


def test_digits_split() -> None:
    train = load_split("digits:train", "unused")
    test = load_split("digits:test", "unused")
    assert len(train) == DIGITS_SPLIT_SIZES["train"] == 1257
    assert len(test) == DIGITS_SPLIT_SIZES["test"] == 540
    assert train.images.shape == (1257, 1, 8, 8) and train.images.dtype == torch.uint8
    assert int(train.images.max()) == 255 and int(train.images.min()) == 0
    assert train.classes == tuple("0123456789")
    # stratified: every class keeps ~30% in test
    counts_train = torch.bincount(train.labels, minlength=10)
    counts_test = torch.bincount(test.labels, minlength=10)
    frac = counts_test.float() / (counts_train + counts_test).float()
    assert ((frac - 0.3).abs() < 0.02).all()
    # values are round(v * 255 / 16) of sklearn's 0..16 values
    from sklearn.datasets import load_digits

    allowed = {round(v * 255 / 16) for v in range(17)}
    assert set(torch.unique(train.images).tolist()) <= allowed
    assert len(load_digits().images) == len(train) + len(test)
    up = load_split("digits:test", "unused", image_size=32)
    assert up.images.shape == (540, 1, 32, 32) and up.images.dtype == torch.uint8


def test_registry() -> None:
    assert {"cifar10", "cifar100", "digits", "tinyimagenet"} <= set(source_names())
    desc = describe_sources()
    assert all(isinstance(v, str) and v and "\n" not in v for v in desc.values())
    src = get_source("tinyimagenet")
    assert src.splits == ("train", "val") and src.native_size == 64
    assert "wnids.txt" in src.expected_files(Path("/r"))


@pytest.mark.parametrize("spec", ["nosuch:train", "imagenet:val"])
def test_unknown_source(spec: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_split(spec, "unused")
    assert "cifar100" in str(err.value) and "tinyimagenet" in str(err.value) and "digits" in str(err.value)


def test_unknown_split_and_bad_spec() -> None:
    with pytest.raises(ConfigError, match="train, val"):
        load_split("tinyimagenet:test", "unused")
    with pytest.raises(ConfigError, match="train, test"):
        load_split("cifar100:val", "unused")
    for spec in ["cifar100", "cifar100:train:x", ""]:
        with pytest.raises(ConfigError):
            load_split(spec, "unused")
    with pytest.raises(ConfigError):
        load_split("digits:train", "unused", image_size=0)


def test_cache_reuses_loaded_sets(cifar_root: Path) -> None:
    a = load_split("cifar100:test", cifar_root)
    assert load_split("cifar100:test", str(cifar_root / ".." / "data")) is a  # same resolved root
    assert load_split("cifar100:test", cifar_root, image_size=32) is a  # native size: no resize
    b = load_split("cifar100:test", cifar_root, image_size=16)
    assert b is not a and b.images.shape == (4, 3, 16, 16)
    assert load_split("cifar100:test", cifar_root, image_size=16) is b


def test_resize_images_chunks() -> None:
    imgs = torch.randint(0, 256, (5, 3, 64, 64), dtype=torch.uint8)
    whole = resize_images(imgs, 32)
    chunked = resize_images(imgs, 32, chunk=2)
    assert whole.dtype == torch.uint8 and whole.shape == (5, 3, 32, 32)
    assert torch.equal(whole, chunked)


# --------------------------------------------------------------------------------------------------------
# Fingerprints: the keys of the on-disk decoded cache follow the files.


def _touch_later(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def test_cifar_fingerprint_follows_files(cifar_root: Path) -> None:
    src = get_source("cifar100")
    fp = src.fingerprint("train", cifar_root)
    assert fp == src.fingerprint("train", cifar_root)
    assert src.fingerprint("test", cifar_root) != fp
    _touch_later(cifar_root / "cifar-100-python" / "meta")
    assert src.fingerprint("train", cifar_root) != fp
    (cifar_root / "cifar-100-python" / "train").unlink()
    with pytest.raises(DataMissingError, match="cifar-100-python/train"):
        src.fingerprint("train", cifar_root)


def test_tinyimagenet_fingerprint_follows_files(tiny_root: Path) -> None:
    src = get_source("tinyimagenet")
    fp_train, fp_val = src.fingerprint("train", tiny_root), src.fingerprint("val", tiny_root)
    assert fp_train != fp_val and src.fingerprint("train", tiny_root) == fp_train
    _jpeg(tiny_root / "tiny-imagenet-200" / "train" / "n03" / "images" / "n03_0.JPEG", (1, 2, 3))
    _touch_later(tiny_root / "tiny-imagenet-200" / "train" / "n03" / "images" / "n03_0.JPEG")
    assert src.fingerprint("train", tiny_root) != fp_train
    assert src.fingerprint("val", tiny_root) == fp_val
    ann = tiny_root / "tiny-imagenet-200" / "val" / "val_annotations.txt"
    ann.write_text(ann.read_text() + "\n")
    assert src.fingerprint("val", tiny_root) != fp_val


def test_disk_cache_serves_a_fresh_process(tiny_root: Path, monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    monkeypatch.setenv("OSSLBENCH_CACHE", str(tmp_path / "cache"))
    first = load_split("tinyimagenet:train", tiny_root, image_size=32)
    cache_clear()  # as if a new process
    src = get_source("tinyimagenet")
    monkeypatch.setattr(type(src), "load", lambda *a: pytest.fail("decoded again instead of read from cache"))
    second = load_split("tinyimagenet:train", tiny_root, image_size=32)
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    assert second.classes == tuple(WNIDS)
