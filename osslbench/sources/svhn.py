"""SVHN (Street View House Numbers), cropped digits, in the official MATLAB format.

Netzer, Y., Wang, T., Coates, A., Bissacco, A., Wu, B. & Ng, A. Y. (2011). *Reading Digits in Natural Images
with Unsupervised Feature Learning.* NIPS Workshop on Deep Learning and Unsupervised Feature Learning.
http://ufldl.stanford.edu/housenumbers/

The files are the ones the authors distribute (and ``torchvision.datasets.SVHN`` reads), under a data root::

    <root>/svhn/train_32x32.mat     73,257 images
    <root>/svhn/test_32x32.mat      26,032 images
    <root>/svhn/extra_32x32.mat    531,131 images (easier, extra training data)

Each holds ``X`` (uint8, 32 x 32 x 3 x N) and ``y`` (N x 1, labels 1..10 where 10 is the digit 0). Every file is
checked against its MD5 (torchvision's, collected in :data:`SVHN_MD5`) before it is read, so a truncated or
damaged download is reported as :class:`~osslbench.errors.DataCorruptError` naming the file. Tests that fabricate
files replace the entries of :data:`SVHN_MD5`; production code never skips the check.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.datasets import SVHN
from torchvision.datasets.utils import calculate_md5

from osslbench.errors import DataCorruptError, DataMissingError
from osslbench.sources.base import Source
from osslbench.sources.cifar import _file_matches
from osslbench.sources.images import ImageSet

FOLDER = "svhn"

#: Expected MD5 per file name (torchvision's ``SVHN.split_list``). Tests replace entries to load fabricated files.
SVHN_MD5: dict[str, str] = {fname: md5 for _, fname, md5 in SVHN.split_list.values()}


def _folder(root: Path) -> Path:
    return Path(root) / FOLDER


class SvhnSource(Source):
    """SVHN cropped digits (Netzer et al. 2011): 10 classes ``"0"`` .. ``"9"``, 32x32 RGB, in file order.

    The label 10 of the files (digit 0) becomes 0, as in torchvision, so label ``d`` is the digit ``d``.
    """

    name = "svhn"
    description = "SVHN cropped digits (Netzer et al. 2011), 10 classes, 32x32 RGB, 73,257 train / 26,032 test / extra"
    splits = ("train", "test", "extra")
    native_size = 32

    # -- files ---------------------------------------------------------------------------------------
    def split_file(self, split: str) -> str:
        """The ``.mat`` file of ``split``, e.g. ``train_32x32.mat``."""
        self.check_split(split)
        return str(SVHN.split_list[split][1])

    def expected_files(self, root: Path) -> str:
        names = ",".join(self.split_file(s) for s in self.splits)
        return f"{_folder(root)}/{{{names}}}"

    def _how_to_get(self, root: Path, split: str) -> str:
        return (
            f"rerun the osslbench command with --download (needs internet), or download {SVHN.split_list[split][0]} "
            f"into {_folder(root)}"
        )

    def _missing(self, root: Path, split: str) -> DataMissingError:
        return DataMissingError(
            f"{self.name}: missing {_folder(root) / self.split_file(split)} (expected {self.expected_files(root)}); "
            + self._how_to_get(root, split)
        )

    def verify(self, root: Path, split: str, download: bool = False) -> Path:
        """Check the file of ``split`` against :data:`SVHN_MD5` (downloading it first if ``download`` and needed).

        :returns: the verified file.
        :raises DataMissingError: it is absent (or the download failed).
        :raises DataCorruptError: its MD5 differs (one line naming the file).
        """
        fname = self.split_file(split)
        path = _folder(root) / fname
        md5 = SVHN_MD5[fname]
        ok = _file_matches(path, md5)
        if not ok and download:
            self._download(root, split)
            ok = _file_matches(path, md5)
        if ok:
            return path
        if not path.is_file():
            raise self._missing(root, split)
        try:
            actual = calculate_md5(path)
        except OSError as exc:
            raise DataCorruptError(f"{self.name}: cannot read {path}: {exc}") from exc
        raise DataCorruptError(
            f"{self.name}: {path} is corrupt (MD5 {actual}, expected {md5}; truncated or damaged download): "
            f"delete it and {self._how_to_get(root, split)}"
        )

    def _download(self, root: Path, split: str) -> None:
        """Fetch the file as ``SVHN(..., download=True)`` does (``download_url`` with torchvision's MD5)."""
        from torchvision.datasets.utils import download_url

        url, fname, md5 = SVHN.split_list[split]
        try:
            download_url(url, str(_folder(root)), fname, md5)
        except Exception as exc:  # network, disk, or checksum failure: report it as one line
            raise DataMissingError(
                f"{self.name}: download of {url} into {_folder(root)} failed ({type(exc).__name__}: {exc}); "
                f"download it by hand so that {_folder(root) / fname} exists"
            ) from exc

    def fingerprint(self, split: str, root: Path) -> str:
        """sha1 of the file's name, size, mtime (ns) and expected MD5."""
        fname = self.split_file(split)
        path = _folder(root) / fname
        try:
            st = path.stat()
        except OSError:
            raise self._missing(root, split) from None
        key = f"{fname}\0{st.st_size}\0{st.st_mtime_ns}\0{SVHN_MD5[fname]}"
        return hashlib.sha1(key.encode()).hexdigest()

    # -- loading -------------------------------------------------------------------------------------
    def _reader_class(self) -> type[SVHN]:
        """torchvision's SVHN pointed at :data:`SVHN_MD5`, its integrity check replaced by :meth:`verify`."""
        attrs: dict[str, Any] = {
            "split_list": {s: [url, f, SVHN_MD5[f]] for s, (url, f, _) in SVHN.split_list.items()},
            "_check_integrity": lambda self: True,
        }
        return type("_VerifiedSVHN", (SVHN,), attrs)

    def load(self, split: str, root: Path, download: bool) -> ImageSet:
        """Decode ``split`` into uint8 ``N x 3 x 32 x 32`` with labels 0..9 (the digit)."""
        root = Path(root)
        path = self.verify(root, split, download=download)
        try:
            ds = self._reader_class()(str(_folder(root)), split=split, download=False)
        except (ValueError, KeyError, TypeError, RuntimeError, OSError, NotImplementedError) as exc:
            raise DataCorruptError(f"{self.name}: cannot read {path} ({type(exc).__name__}: {exc})") from exc
        data = np.asarray(ds.data)
        labels = np.asarray(ds.labels, dtype=np.int64).reshape(-1)
        if data.dtype != np.uint8 or data.ndim != 4 or data.shape[1:] != (3, 32, 32):
            raise DataCorruptError(f"{self.name}: {path} holds {data.dtype} X of shape {data.shape} (N x 3 x 32 x 32)")
        if len(labels) != len(data):
            raise DataCorruptError(f"{self.name}: {path} has {len(labels)} labels for {len(data)} images")
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) > 9):
            raise DataCorruptError(f"{self.name}: labels in {path} outside 1..10")
        return ImageSet(
            images=torch.from_numpy(np.ascontiguousarray(data)),
            labels=torch.from_numpy(labels.copy()),
            classes=tuple(str(d) for d in range(10)),
            name=f"{self.name}:{split}",
        )
