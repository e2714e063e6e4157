"""The on-disk decoded cache: first load decodes and stores, later loads memory-map, changes invalidate."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from osslbench import sources
from osslbench.errors import DataMissingError
from osslbench.sources import cache
from osslbench.sources.base import Source
from osslbench.sources.images import ImageSet


class _Counting(Source):
    """A source whose 'files' are one text file; counts how often it really decodes."""

    splits = ("train",)
    native_size = 4

    def __init__(self) -> None:
        self.loads = 0

    def _file(self, root: Path) -> Path:
        return root / "data.txt"

    def fingerprint(self, split: str, root: Path) -> str:
        if not self._file(root).is_file():
            raise DataMissingError(f"missing {self._file(root)}")
        return "fp-" + self._file(root).read_text().strip()

    def load(self, split: str, root: Path, download: bool) -> ImageSet:
        self.loads += 1
        value = int(self._file(root).read_text().strip())
        images = torch.full((5, 3, 4, 4), value, dtype=torch.uint8)
        images[:, 0, 0, 0] = torch.arange(5, dtype=torch.uint8)
        return ImageSet(images=images, labels=torch.arange(5) % 2, classes=("a", "b"), name="counting:train")


_Counting.name = "counting"  # set after class creation: tests must not add it to the package registry


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[_Counting, Path, Path]:
    root, store = tmp_path / "data", tmp_path / "cache"
    root.mkdir()
    (root / "data.txt").write_text("7")
    monkeypatch.setenv(cache.CACHE_ENV, str(store))
    return _Counting(), root, store


def test_first_load_stores_later_loads_read(setup: tuple[_Counting, Path, Path]) -> None:
    src, root, store = setup
    first = sources._decode(src, "train", root, None, False)
    assert src.loads == 1
    entries = list((store / "counting").iterdir())
    assert len(entries) == 1 and entries[0].name.startswith("train-4px-fp-7")
    second = sources._decode(src, "train", root, None, False)
    assert src.loads == 1  # served from disk
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    assert second.classes == ("a", "b") and second.name == "counting:train"
    assert second.labels.dtype == torch.int64


def test_resized_entry_is_separate(setup: tuple[_Counting, Path, Path]) -> None:
    src, root, store = setup
    native = sources._decode(src, "train", root, None, False)
    small = sources._decode(src, "train", root, 2, False)
    assert small.images.shape == (5, 3, 2, 2) and native.images.shape == (5, 3, 4, 4)
    assert sorted(p.name.split("-")[1] for p in (store / "counting").iterdir()) == ["2px", "4px"]
    again = sources._decode(src, "train", root, 2, False)
    assert torch.equal(again.images, small.images) and src.loads == 2


def test_changed_files_are_decoded_again(setup: tuple[_Counting, Path, Path]) -> None:
    src, root, _ = setup
    assert int(sources._decode(src, "train", root, None, False).images[0, 1, 0, 0]) == 7
    (root / "data.txt").write_text("9")
    assert int(sources._decode(src, "train", root, None, False).images[0, 1, 0, 0]) == 9
    assert src.loads == 2


def test_cache_off(setup: tuple[_Counting, Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    src, root, store = setup
    monkeypatch.setenv(cache.CACHE_ENV, "off")
    sources._decode(src, "train", root, None, False)
    sources._decode(src, "train", root, None, False)
    assert src.loads == 2 and not store.exists()


def test_truncated_entry_is_ignored_and_rewritten(setup: tuple[_Counting, Path, Path]) -> None:
    src, root, store = setup
    good = sources._decode(src, "train", root, None, False)
    (entry,) = (store / "counting").iterdir()
    data = (entry / "images.npy").read_bytes()
    (entry / "images.npy").write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="unreadable cache entry"):
        again = sources._decode(src, "train", root, None, False)
    assert torch.equal(again.images, good.images) and src.loads == 2
    assert (entry / "meta.json").is_file()  # rewritten
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sources._decode(src, "train", root, None, False)
    assert src.loads == 2


def test_unwritable_cache_warns_and_still_loads(setup: tuple[_Counting, Path, Path],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    src, root, store = setup
    blocker = store.parent / "file-not-folder"
    blocker.write_text("x")
    monkeypatch.setenv(cache.CACHE_ENV, str(blocker / "sub"))
    with pytest.warns(UserWarning, match="cannot write the decoded cache"):
        out = sources._decode(src, "train", root, None, False)
    assert len(out) == 5


def test_missing_files_are_reported_before_decoding(setup: tuple[_Counting, Path, Path]) -> None:
    src, root, _ = setup
    (root / "data.txt").unlink()
    with pytest.raises(DataMissingError, match="data.txt"):
        sources._decode(src, "train", root, None, False)
    assert src.loads == 0


def test_cached_images_are_memory_mapped(setup: tuple[_Counting, Path, Path]) -> None:
    src, root, store = setup
    sources._decode(src, "train", root, None, False)
    (entry,) = (store / "counting").iterdir()
    hit = cache.read_entry(entry, "counting:train")
    assert hit is not None
    base = np.load(entry / "images.npy", mmap_mode="c")
    assert isinstance(base, np.memmap)
    hit.images[0, 0, 0, 0] = 200  # copy-on-write: the file keeps its pixels
    assert int(np.load(entry / "images.npy")[0, 0, 0, 0]) == 0
