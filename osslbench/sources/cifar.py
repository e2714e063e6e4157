"""CIFAR-10 and CIFAR-100 in the official "python version" format.

Krizhevsky, A. (2009). *Learning Multiple Layers of Features from Tiny Images.* Technical report,
University of Toronto. https://www.cs.toronto.edu/~kriz/cifar.html

The files are the ones the authors distribute (and ``torchvision.datasets.CIFAR10/100`` reads), extracted
under a data root::

    <root>/cifar-100-python/{train,test,meta}
    <root>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}

Every file is checked against its MD5 before it is unpickled (the MD5s are the ones torchvision stores
on its dataset classes, collected in :data:`CIFAR_MD5`), so a truncated or damaged download is reported
as :class:`~osslbench.errors.DataCorruptError` naming the file instead of failing deep inside pickle.
Tests that fabricate files in the official format replace the entries of :data:`CIFAR_MD5` with the
MD5s of their files; production code never skips the check.

CIFAR-100 also carries a coarse label (one of 20 superclasses) per image:
:func:`cifar100_coarse_labels`, :func:`cifar100_coarse_classes` and :func:`cifar100_fine_to_coarse`
expose them for class splits by superclass.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torchvision.datasets import CIFAR10, CIFAR100
from torchvision.datasets.utils import calculate_md5, check_integrity, download_and_extract_archive

from osslbench.errors import DataCorruptError, DataMissingError
from osslbench.sources.base import Source
from osslbench.sources.images import ImageSet


def _torchvision_md5s(tv_class: type[CIFAR10]) -> dict[str, str]:
    """File name -> MD5 as stored by torchvision on ``tv_class`` (train, test and meta files)."""
    md5s = {fname: md5 for fname, md5 in [*tv_class.train_list, *tv_class.test_list]}
    md5s[tv_class.meta["filename"]] = tv_class.meta["md5"]
    return md5s


#: Expected MD5 of every file, per source name then file name. Production code checks these (they are
#: torchvision's own); tests replace entries (e.g. with ``monkeypatch.setitem``) to load fabricated files.
CIFAR_MD5: dict[str, dict[str, str]] = {
    "cifar10": _torchvision_md5s(CIFAR10),
    "cifar100": _torchvision_md5s(CIFAR100),
}

# (path, size, mtime_ns, md5) of files already verified in this process: the 155 MB CIFAR-100 train file
# takes a noticeable fraction of a second to hash, and several loaders read the same file.
_VERIFIED: set[tuple[str, int, int, str]] = set()


def _file_matches(path: Path, md5: str) -> bool:
    """Whether ``path`` is a file whose MD5 is ``md5`` (torchvision's ``check_integrity``, memoised per file)."""
    try:
        st = path.stat()
    except OSError:
        return False
    key = (str(path), st.st_size, st.st_mtime_ns, md5)
    if key in _VERIFIED:
        return True
    if not check_integrity(path, md5):
        return False
    _VERIFIED.add(key)
    return True


class _CifarSource(Source):
    """Shared code of the CIFAR sources; subclasses set ``name``, ``description`` and ``tv_class``."""

    tv_class: ClassVar[type[CIFAR10]]
    splits = ("train", "test")
    native_size = 32

    # -- files ---------------------------------------------------------------------------------------
    def folder(self, root: Path) -> Path:
        """The extracted folder, e.g. ``<root>/cifar-100-python``."""
        return Path(root) / self.tv_class.base_folder

    def split_files(self, split: str) -> list[str]:
        """The data files of ``split`` (in torchvision's order), without the meta file."""
        self.check_split(split)
        listing = self.tv_class.train_list if split == "train" else self.tv_class.test_list
        return [fname for fname, _ in listing]

    @property
    def meta_file(self) -> str:
        return str(self.tv_class.meta["filename"])

    def all_files(self) -> list[str]:
        return [*self.split_files("train"), *self.split_files("test"), self.meta_file]

    def expected_files(self, root: Path) -> str:
        names = ",".join(self.all_files())
        return f"{self.folder(root)}/{{{names}}}"

    def _how_to_get(self, root: Path) -> str:
        return (
            f"rerun the osslbench command with --download (needs internet), or download {self.tv_class.url} "
            f"and extract it into {root}"
        )

    def verify(self, root: Path, files: list[str], download: bool = False) -> None:
        """Check that ``files`` exist under :meth:`folder` with the MD5s of :data:`CIFAR_MD5`.

        With ``download``, fetch and extract the official archive first when any file is missing or damaged.

        :raises DataMissingError: a file is absent (one line naming it, the expected files, and how to get them).
        :raises DataCorruptError: a file's MD5 differs (one line naming the file).
        """
        root = Path(root)
        md5s = CIFAR_MD5[self.name]
        folder = self.folder(root)

        def problems() -> list[str]:
            return [f for f in files if not _file_matches(folder / f, md5s[f])]

        bad = problems()
        if bad and download:
            self._download(root)
            bad = problems()
        if not bad:
            return
        missing = [f for f in bad if not (folder / f).is_file()]
        if missing:
            raise DataMissingError(
                f"{self.name}: missing {folder / missing[0]} (expected {self.expected_files(root)}); "
                + self._how_to_get(root)
            )
        path = folder / bad[0]
        try:
            actual = calculate_md5(path)
        except OSError as exc:
            raise DataCorruptError(f"{self.name}: cannot read {path}: {exc}") from exc
        raise DataCorruptError(
            f"{self.name}: {path} is corrupt (MD5 {actual}, expected {md5s[bad[0]]}; truncated or damaged "
            f"download): delete it and {self._how_to_get(root)}"
        )

    def _download(self, root: Path) -> None:
        tv = self.tv_class
        try:
            download_and_extract_archive(tv.url, str(root), filename=tv.filename, md5=tv.tgz_md5)
        except Exception as exc:  # network, disk, or checksum failure: report it as one line
            raise DataMissingError(
                f"{self.name}: download of {tv.url} into {root} failed ({type(exc).__name__}: {exc}); "
                f"download and extract it by hand so that {self.expected_files(root)} exist"
            ) from exc

    def fingerprint(self, split: str, root: Path) -> str:
        """The official MD5s of the split's files plus their sizes and modification times (no rehashing: a
        changed file changes its stat, and the load that follows verifies its MD5)."""
        folder = self.folder(Path(root))
        md5s = CIFAR_MD5[self.name]
        parts = []
        for fname in [*self.split_files(split), self.meta_file]:
            try:
                st = (folder / fname).stat()
            except OSError:
                raise DataMissingError(
                    f"{self.name}: missing {folder / fname} (expected {self.expected_files(root)}); "
                    + self._how_to_get(root)
                ) from None
            parts.append(f"{fname}:{md5s[fname]}:{st.st_size}:{st.st_mtime_ns}")
        return hashlib.sha1("|".join(parts).encode()).hexdigest()

    # -- loading -------------------------------------------------------------------------------------
    def _reader_class(self) -> type[CIFAR10]:
        """torchvision's dataset class, pointed at the MD5s of :data:`CIFAR_MD5`.

        Its whole-dataset integrity check is replaced by ours (:meth:`verify`, done before), which checks only
        the files of the requested split and reports which file is wrong.
        """
        tv = self.tv_class
        md5s = CIFAR_MD5[self.name]
        attrs: dict[str, Any] = {
            "train_list": [[f, md5s[f]] for f, _ in tv.train_list],
            "test_list": [[f, md5s[f]] for f, _ in tv.test_list],
            "meta": {**tv.meta, "md5": md5s[tv.meta["filename"]]},
            "_check_integrity": lambda self: True,
        }
        return type(f"_Verified{tv.__name__}", (tv,), attrs)

    def load(self, split: str, root: Path, download: bool) -> ImageSet:
        """Decode ``split`` (``train`` or ``test``) into uint8 ``N x 3 x 32 x 32`` with the fine labels."""
        root = Path(root)
        self.verify(root, [*self.split_files(split), self.meta_file], download=download)
        try:
            ds = self._reader_class()(str(root), train=(split == "train"), download=False)
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError, RuntimeError, OSError) as exc:
            raise DataCorruptError(
                f"{self.name}: cannot read {self.folder(root)} ({type(exc).__name__}: {exc})"
            ) from exc
        data = np.asarray(ds.data)
        if data.dtype != np.uint8 or data.shape[1:] != (32, 32, 3):
            raise DataCorruptError(f"{self.name}: {self.folder(root)} holds {data.dtype} images of shape {data.shape}")
        images = torch.from_numpy(data).permute(0, 3, 1, 2).contiguous()
        labels = torch.as_tensor(np.asarray(ds.targets, dtype=np.int64))
        classes = tuple(str(c) for c in ds.classes)
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(classes)):
            raise DataCorruptError(
                f"{self.name}: labels in {self.folder(root)} outside 0..{len(classes) - 1} ({len(classes)} classes)"
            )
        return ImageSet(images=images, labels=labels, classes=classes, name=f"{self.name}:{split}")


class Cifar100Source(_CifarSource):
    """CIFAR-100 (Krizhevsky 2009): 100 fine classes in 20 superclasses, 50,000 train / 10,000 test, 32x32 RGB.

    Classes are the fine label names of the ``meta`` file, in its order (``apple``, ``aquarium_fish``, ...).
    """

    name = "cifar100"
    description = "CIFAR-100 (Krizhevsky 2009), 100 classes, 50,000 train / 10,000 test, 32x32 RGB"
    tv_class = CIFAR100

    def superclasses(self, root: Path) -> tuple[list[int], tuple[str, ...]]:
        """The 20 coarse labels of the files (fine class -> superclass read from the labels, names from ``meta``)."""
        mapping = cifar100_fine_to_coarse(root)
        if (mapping < 0).any():
            raise DataCorruptError(f"cifar100: class {int(np.argmax(mapping < 0))} has no image in {self.folder(root)}")
        return mapping.tolist(), cifar100_coarse_classes(root)


class Cifar10Source(_CifarSource):
    """CIFAR-10 (Krizhevsky 2009): 10 classes, 50,000 train / 10,000 test, 32x32 RGB."""

    name = "cifar10"
    description = "CIFAR-10 (Krizhevsky 2009), 10 classes, 50,000 train / 10,000 test, 32x32 RGB"
    tv_class = CIFAR10


# -- CIFAR-100 superclasses -------------------------------------------------------------------------------

def _unpickle(path: Path) -> dict[str, Any]:
    """Load one official CIFAR pickle (written by Python 2: ``latin1`` turns its byte strings into ``str``)."""
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, ValueError, OSError) as exc:
        raise DataCorruptError(f"cifar100: cannot unpickle {path} ({type(exc).__name__}: {exc})") from exc
    if not isinstance(entry, dict):
        raise DataCorruptError(f"cifar100: {path} does not hold a dict")
    return entry


@functools.lru_cache(maxsize=4)
def _label_arrays(root: str, split: str, md5s: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(fine, coarse) int64 labels of CIFAR-100 ``split``; ``md5s`` is part of the cache key only."""
    src = Cifar100Source()
    files = src.split_files(split)
    src.verify(Path(root), files)
    fine, coarse = [], []
    for fname in files:
        path = src.folder(Path(root)) / fname
        entry = _unpickle(path)
        if "fine_labels" not in entry or "coarse_labels" not in entry:
            raise DataCorruptError(f"cifar100: {path} has no fine_labels / coarse_labels")
        fine.append(np.asarray(entry["fine_labels"], dtype=np.int64))
        coarse.append(np.asarray(entry["coarse_labels"], dtype=np.int64))
        if len(fine[-1]) != len(coarse[-1]):
            raise DataCorruptError(f"cifar100: {path} has {len(fine[-1])} fine but {len(coarse[-1])} coarse labels")
    return np.concatenate(fine), np.concatenate(coarse)


def _labels(root: str | os.PathLike[str], split: str) -> tuple[np.ndarray, np.ndarray]:
    src = Cifar100Source()
    files = src.split_files(split)  # raises ConfigError for an unknown split
    md5s = tuple(CIFAR_MD5[src.name][f] for f in files)
    return _label_arrays(str(Path(root).expanduser().resolve()), split, md5s)


def cifar100_coarse_labels(root: str | os.PathLike[str], split: str) -> np.ndarray:
    """The superclass index (0..19) of every image of CIFAR-100 ``split`` (``train`` / ``test``).

    Aligned with the images of ``load_split("cifar100:<split>", root)`` (same file order).

    :raises DataMissingError, DataCorruptError: as for loading the split.
    """
    return _labels(root, split)[1].copy()


def cifar100_coarse_classes(root: str | os.PathLike[str]) -> tuple[str, ...]:
    """The 20 superclass names from the ``meta`` file (``coarse_label_names``), indexed by coarse label."""
    src = Cifar100Source()
    folder = src.folder(Path(root).expanduser().resolve())
    src.verify(folder.parent, [src.meta_file])
    path = folder / src.meta_file
    entry = _unpickle(path)
    if "coarse_label_names" not in entry or "fine_label_names" not in entry:
        raise DataCorruptError(f"cifar100: {path} has no fine_label_names / coarse_label_names")
    return tuple(str(c) for c in entry["coarse_label_names"])


def cifar100_fine_to_coarse(root: str | os.PathLike[str]) -> np.ndarray:
    """Array ``m`` with ``m[fine] = coarse`` for every fine class index, derived from the labels in the files.

    The fine -> superclass mapping of CIFAR-100 is a function (each of the 100 classes belongs to exactly one of
    the 20 superclasses, 5 classes each). It is read from the ``test`` split, and from ``train`` as well if some
    class does not occur in ``test``; a class occurring in neither maps to -1.

    :raises DataCorruptError: a fine class occurs with two different superclasses.
    """
    src = Cifar100Source()
    folder = src.folder(Path(root).expanduser().resolve())
    src.verify(folder.parent, [src.meta_file])
    meta = _unpickle(folder / src.meta_file)
    mapping = np.full(len(meta.get("fine_label_names", [])), -1, dtype=np.int64)
    for split in ("test", "train"):
        fine, coarse = _labels(root, split)
        if len(fine) and int(fine.max()) >= len(mapping):
            raise DataCorruptError(f"cifar100: fine label {int(fine.max())} in {split} but {len(mapping)} classes")
        pairs = np.unique(np.stack([fine, coarse], axis=1), axis=0)
        for f, c in pairs.tolist():
            if mapping[f] not in (-1, c):
                raise DataCorruptError(f"cifar100: fine class {f} has superclasses {mapping[f]} and {c}")
            mapping[f] = c
        if (mapping >= 0).all():
            break
    return mapping
