"""Tiny-ImageNet-200 from the official folder layout.

Le, Y. & Yang, X. (2015). *Tiny ImageNet Visual Recognition Challenge.* Stanford CS231N.
http://cs231n.stanford.edu/tiny-imagenet-200.zip

Layout under a data root (as in the official zip)::

    <root>/tiny-imagenet-200/wnids.txt                        class ids, one per line; their order = label index
    <root>/tiny-imagenet-200/words.txt                        wnid <TAB> names (metadata only)
    <root>/tiny-imagenet-200/train/<wnid>/images/<wnid>_<i>.JPEG
    <root>/tiny-imagenet-200/val/images/val_<j>.JPEG
    <root>/tiny-imagenet-200/val/val_annotations.txt          filename <TAB> wnid <TAB> x0 y0 x1 y1

The split sizes are whatever files exist (the full set has 500 train images per class and 10,000 val images;
a subset with fewer files loads just as well). The ``val`` labels come from ``val_annotations.txt``, which
may list more files than exist (only the files on disk are loaded); a file on disk that the annotations do
not list is an error. Images are 64x64 JPEG, a few greyscale (converted to RGB). The unlabelled ``test``
split of the original is not supported.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from osslbench.errors import DataCorruptError, DataMissingError
from osslbench.sources.base import Source
from osslbench.sources.images import ImageSet

TINYIMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINYIMAGENET_ZIP_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
FOLDER = "tiny-imagenet-200"

_VAL_NAME = re.compile(r"val_(\d+)\.JPEG", re.IGNORECASE)
_DECODE_CHUNK = 64  # images per thread-pool task


def _folder(root: Path) -> Path:
    return Path(root) / FOLDER


def _how_to_get(root: Path) -> str:
    return (
        f"rerun the osslbench command with --download (needs internet), or download {TINYIMAGENET_URL} "
        f"and extract it into {root}"
    )


def read_wnids(root: str | os.PathLike[str]) -> tuple[str, ...]:
    """The class ids of ``<root>/tiny-imagenet-200/wnids.txt`` in file order (label ``i`` is line ``i``).

    :raises DataMissingError: the file is absent.
    :raises DataCorruptError: it is empty or lists a wnid twice.
    """
    path = _folder(Path(root)) / "wnids.txt"
    if not path.is_file():
        raise DataMissingError(
            f"tinyimagenet: missing {path} (expected {TinyImageNetSource().expected_files(Path(root))}); "
            + _how_to_get(Path(root))
        )
    wnids = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    if not wnids:
        raise DataCorruptError(f"tinyimagenet: {path} lists no class")
    if len(set(wnids)) != len(wnids):
        dup = next(w for w in wnids if wnids.count(w) > 1)
        raise DataCorruptError(f"tinyimagenet: {path} lists {dup} twice")
    return wnids


def read_words(root: str | os.PathLike[str]) -> dict[str, str]:
    """Metadata: wnid -> human-readable names (``"goldfish, Carassius auratus"``) for the classes of wnids.txt.

    Read from ``words.txt`` (which in the official zip covers all of ImageNet's 82,115 synsets; only the
    classes of ``wnids.txt`` are returned, in label order). A class absent from words.txt maps to its wnid.

    :raises DataMissingError: words.txt or wnids.txt is absent.
    """
    wnids = read_wnids(root)
    path = _folder(Path(root)) / "words.txt"
    if not path.is_file():
        raise DataMissingError(f"tinyimagenet: missing {path} (class names); " + _how_to_get(Path(root)))
    wanted = set(wnids)
    names: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        wnid, _, words = line.partition("\t")
        if wnid in wanted:
            names[wnid] = words.strip()
    return {w: names.get(w, w) for w in wnids}


def decode_jpegs(paths: Sequence[Path], size: int, desc: str = "decode") -> torch.Tensor:
    """Decode RGB images of ``size`` x ``size`` pixels into a uint8 ``N x 3 x size x size`` tensor.

    Decoding runs on a thread pool (PIL releases the GIL while decoding) with a tqdm bar on stderr
    (shown on a terminal only). The order of the output follows ``paths``.

    :raises DataCorruptError: a file cannot be decoded or is not ``size`` x ``size`` (names the file).
    """
    n = len(paths)
    out = np.empty((n, 3, size, size), dtype=np.uint8)

    def work(start: int, stop: int) -> int:
        for i in range(start, stop):
            path = paths[i]
            try:
                with Image.open(path) as im:
                    rgb = im.convert("RGB")  # greyscale / CMYK -> RGB; convert() decodes the whole file
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
                raise DataCorruptError(f"cannot decode image {path} ({type(exc).__name__}: {exc})") from exc
            if rgb.size != (size, size):
                raise DataCorruptError(f"image {path} is {rgb.size[0]}x{rgb.size[1]}, expected {size}x{size}")
            out[i] = np.asarray(rgb).transpose(2, 0, 1)
        return stop - start

    workers = max(1, min(16, 2 * (os.cpu_count() or 1)))
    with ThreadPoolExecutor(max_workers=workers) as pool, tqdm(
        total=n, desc=desc, unit="img", file=sys.stderr, disable=None, leave=False
    ) as bar:
        futures = [pool.submit(work, s, min(s + _DECODE_CHUNK, n)) for s in range(0, n, _DECODE_CHUNK)]
        try:
            for fut in as_completed(futures):
                bar.update(fut.result())
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise
    return torch.from_numpy(out)


class TinyImageNetSource(Source):
    """Tiny-ImageNet-200 (Le & Yang 2015): 200 ImageNet classes at 64x64, splits ``train`` and ``val``.

    Classes are the wnids of ``wnids.txt`` in file order (their count is read from the file). Train images are
    ordered by class (wnids.txt order) then by the numeric index ``i`` of ``<wnid>_<i>.JPEG``; val images by
    the numeric index ``j`` of ``val_<j>.JPEG``. So indices are stable across machines and file systems.
    """

    name = "tinyimagenet"
    description = "Tiny-ImageNet-200 (Le & Yang 2015), 200 classes, 64x64 RGB, train (500/class) / val (10,000)"
    splits = ("train", "val")
    native_size = 64

    def expected_files(self, root: Path) -> str:
        f = _folder(root)
        return (
            f"{f}/wnids.txt, {f}/train/<wnid>/images/<wnid>_<i>.JPEG, {f}/val/images/val_<j>.JPEG "
            f"and {f}/val/val_annotations.txt"
        )

    def _missing(self, root: Path, what: Path) -> DataMissingError:
        return DataMissingError(
            f"tinyimagenet: missing {what} (expected {self.expected_files(root)}); " + _how_to_get(root)
        )

    def _required(self, root: Path, split: str) -> list[Path]:
        f = _folder(root)
        if split == "train":
            return [f / "wnids.txt", f / "train"]
        return [f / "wnids.txt", f / "val" / "images", f / "val" / "val_annotations.txt"]

    def _download(self, root: Path) -> None:
        from torchvision.datasets.utils import download_and_extract_archive

        try:
            download_and_extract_archive(TINYIMAGENET_URL, str(root), md5=TINYIMAGENET_ZIP_MD5)
        except Exception as exc:  # network, disk, or checksum failure: report it as one line
            raise DataMissingError(
                f"tinyimagenet: download of {TINYIMAGENET_URL} into {root} failed ({type(exc).__name__}: {exc}); "
                f"download and extract it by hand so that {self.expected_files(root)} exist"
            ) from exc

    # -- file listings -------------------------------------------------------------------------------
    def train_files(self, root: Path, wnids: Sequence[str]) -> tuple[list[Path], list[int]]:
        """Train JPEGs in class order then numeric index, with their labels."""
        paths: list[Path] = []
        labels: list[int] = []
        for label, wnid in enumerate(wnids):
            folder = _folder(root) / "train" / wnid / "images"
            if not folder.is_dir():
                raise self._missing(root, folder)
            pattern = re.compile(rf"{re.escape(wnid)}_(\d+)\.JPEG", re.IGNORECASE)
            found: list[tuple[int, str]] = []
            with os.scandir(folder) as it:
                for entry in it:
                    if not entry.name.upper().endswith(".JPEG"):
                        continue  # e.g. editor or OS droppings
                    m = pattern.fullmatch(entry.name)
                    if m is None:
                        raise DataCorruptError(
                            f"tinyimagenet: unexpected file {folder / entry.name} (expected {wnid}_<i>.JPEG)"
                        )
                    found.append((int(m.group(1)), entry.name))
            found.sort()
            paths.extend(folder / fname for _, fname in found)
            labels.extend([label] * len(found))
        return paths, labels

    def val_files(self, root: Path, wnids: Sequence[str]) -> tuple[list[Path], list[int]]:
        """Val JPEGs present on disk in numeric order, labelled from val_annotations.txt."""
        folder = _folder(root) / "val" / "images"
        ann_path = _folder(root) / "val" / "val_annotations.txt"
        index = {w: i for i, w in enumerate(wnids)}
        annotations: dict[str, int] = {}
        for lineno, line in enumerate(ann_path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) < 2 or fields[1].strip() not in index:
                raise DataCorruptError(
                    f"tinyimagenet: {ann_path} line {lineno} is not '<file>\\t<wnid of wnids.txt>\\t...': {line!r}"
                )
            annotations[fields[0].strip()] = index[fields[1].strip()]
        found: list[tuple[int, str]] = []
        with os.scandir(folder) as it:
            for entry in it:
                if not entry.name.upper().endswith(".JPEG"):
                    continue
                m = _VAL_NAME.fullmatch(entry.name)
                if m is None:
                    raise DataCorruptError(
                        f"tinyimagenet: unexpected file {folder / entry.name} (expected val_<j>.JPEG)"
                    )
                if entry.name not in annotations:
                    raise DataCorruptError(f"tinyimagenet: {folder / entry.name} is not listed in {ann_path}")
                found.append((int(m.group(1)), entry.name))
        found.sort()
        return [folder / fname for _, fname in found], [annotations[fname] for _, fname in found]

    def fingerprint(self, split: str, root: Path) -> str:
        """SHA-1 of ``wnids.txt`` (and ``val_annotations.txt``) and of the listing of the split's images:
        relative path, size and modification time of every file (listing 100,000 files takes well under
        a second; hashing their contents would take longer than decoding them)."""
        self.check_split(split)
        root = Path(root)
        absent = [p for p in self._required(root, split) if not p.exists()]
        if absent:
            raise self._missing(root, absent[0])
        f = _folder(root)
        digest = hashlib.sha1(split.encode())
        texts = [f / "wnids.txt"] + ([f / "val" / "val_annotations.txt"] if split == "val" else [])
        for path in texts:
            digest.update(path.read_bytes())
        top = f / split
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames.sort()
            for fname in sorted(filenames):
                st = os.stat(os.path.join(dirpath, fname))
                rel = os.path.relpath(os.path.join(dirpath, fname), top)
                digest.update(f"{rel}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        return digest.hexdigest()

    # -- loading -------------------------------------------------------------------------------------
    def load(self, split: str, root: Path, download: bool) -> ImageSet:
        """Decode every JPEG of ``split`` into uint8 ``N x 3 x 64 x 64`` with labels indexing ``wnids.txt``."""
        self.check_split(split)
        root = Path(root)
        absent = [p for p in self._required(root, split) if not p.exists()]
        if absent and download:
            self._download(root)
            absent = [p for p in self._required(root, split) if not p.exists()]
        if absent:
            raise self._missing(root, absent[0])
        wnids = read_wnids(root)
        lister = self.train_files if split == "train" else self.val_files
        paths, labels = lister(root, wnids)
        if not paths:
            where = _folder(root) / ("train/<wnid>/images" if split == "train" else "val/images")
            raise DataMissingError(f"tinyimagenet: no JPEG files under {where}; " + _how_to_get(root))
        try:
            images = decode_jpegs(paths, self.native_size, desc=f"decode {self.name}:{split}")
        except DataCorruptError as exc:
            raise DataCorruptError(f"tinyimagenet: {exc}") from exc
        return ImageSet(
            images=images,
            labels=torch.tensor(labels, dtype=torch.int64),
            classes=wnids,
            name=f"{self.name}:{split}",
        )
