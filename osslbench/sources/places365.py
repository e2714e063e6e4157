"""Places365-Standard, small (256x256) images, in the official layout.

Zhou, B., Lapedriza, A., Khosla, A., Oliva, A. & Torralba, A. (2018). *Places: A 10 Million Image Database for
Scene Recognition.* IEEE TPAMI 40(6). http://places2.csail.mit.edu/

The files are the ones the authors distribute at http://data.csail.mit.edu/places/places365/ (the devkit
``filelist_places365-standard.tar`` and the image archives ``train_256_places365standard.tar``,
``val_256.tar``), extracted as ``torchvision.datasets.Places365(root, split=..., small=True)`` expects::

    <root>/places365/categories_places365.txt        "/a/airfield 0" per line: category and label index
    <root>/places365/places365_train_standard.txt    "/a/airfield/00000001.jpg 0" per line
    <root>/places365/places365_val.txt               "Places365_val_00000001.jpg 0" per line
    <root>/places365/data_256_standard/a/airfield/00000001.jpg
    <root>/places365/val_256/Places365_val_00000001.jpg

The list files define the splits (and their order): a listed image that is absent is an error, files that are
not listed are ignored. ``train`` is the standard training set (1,803,460 images), ``val`` the official validation
set (36,500, 100 per class). Classes are the category names (``"/a/airfield"``) in label order.

Images are decoded in chunks of :data:`DECODE_CHUNK`, each chunk resized at once to the size asked for
(``load_split(..., image_size=32)``, the SRD paper's 32x32): the full ``train`` split then takes 5.5 GB as uint8
(at the native 256x256 it would take 354 GB, ``val`` 7.2 GB), decoded once into the on-disk cache.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from osslbench.errors import DataCorruptError, DataMissingError
from osslbench.sources.base import Source
from osslbench.sources.images import ImageSet
from osslbench.sources.tinyimagenet import decode_jpegs

PLACES365_URL = "http://data.csail.mit.edu/places/places365/"
FOLDER = "places365"
CATEGORIES = "categories_places365.txt"
#: Our split -> (torchvision's split name, list file, image folder).
SPLIT_FILES: dict[str, tuple[str, str, str]] = {
    "train": ("train-standard", "places365_train_standard.txt", "data_256_standard"),
    "val": ("val", "places365_val.txt", "val_256"),
}
#: Images decoded per call of ``decode_jpegs`` (bounds the list of pending work, not the output size).
DECODE_CHUNK = 4096


def _folder(root: Path) -> Path:
    return Path(root) / FOLDER


class Places365Source(Source):
    """Places365-Standard (Zhou et al. 2018): 365 scene categories, 256x256 RGB, splits ``train`` and ``val``.

    Images are in the order of the list file; labels are the list file's label indices, classes the names of
    ``categories_places365.txt`` in label order.
    """

    name = "places365"
    description = "Places365-Standard (Zhou et al. 2018), 365 scenes, 256x256 RGB, 1,803,460 train / 36,500 val"
    splits = ("train", "val")
    native_size = 256

    # -- files ---------------------------------------------------------------------------------------
    def expected_files(self, root: Path) -> str:
        f = _folder(root)
        return (
            f"{f}/{CATEGORIES}, {f}/places365_train_standard.txt with {f}/data_256_standard/<c>/<category>/<i>.jpg, "
            f"{f}/places365_val.txt with {f}/val_256/Places365_val_<i>.jpg"
        )

    def _how_to_get(self, root: Path, split: str) -> str:
        from torchvision.datasets import Places365

        devkit = Places365._DEVKIT_META["standard"][0]
        images = Places365._IMAGES_META[(SPLIT_FILES[split][0], True)][0]
        return (
            f"rerun the osslbench command with --download (needs internet), or download {devkit} and {images} "
            f"from {PLACES365_URL} and extract them into {_folder(root)}"
        )

    def _missing(self, root: Path, split: str, what: Path) -> DataMissingError:
        return DataMissingError(
            f"{self.name}: missing {what} (expected {self.expected_files(root)}); " + self._how_to_get(root, split)
        )

    def _required(self, root: Path, split: str) -> list[Path]:
        f = _folder(root)
        _, listing, images = SPLIT_FILES[split]
        return [f / CATEGORIES, f / listing, f / images]

    def _download(self, root: Path, split: str) -> None:
        """Fetch the devkit and the image archive of ``split`` with torchvision (which checks their MD5s)."""
        from torchvision.datasets import Places365

        try:
            Places365(str(_folder(root)), split=SPLIT_FILES[split][0], small=True, download=True)
        except Exception as exc:  # network, disk, or checksum failure: report it as one line
            raise DataMissingError(
                f"{self.name}: download from {PLACES365_URL} into {_folder(root)} failed "
                f"({type(exc).__name__}: {exc}); download and extract it by hand so that "
                f"{self.expected_files(root)} exist"
            ) from exc

    # -- file listings -------------------------------------------------------------------------------
    def read_categories(self, root: Path) -> tuple[str, ...]:
        """Category names of ``categories_places365.txt`` in label order (the labels must be 0..K-1, each once)."""
        path = _folder(root) / CATEGORIES
        by_label: dict[int, str] = {}
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            fields = line.split()
            if len(fields) != 2 or not fields[1].isdigit() or int(fields[1]) in by_label:
                raise DataCorruptError(
                    f"{self.name}: {path} line {lineno} is not '<category> <new label index>': {line!r}"
                )
            by_label[int(fields[1])] = fields[0]
        if not by_label:
            raise DataCorruptError(f"{self.name}: {path} lists no category")
        if sorted(by_label) != list(range(len(by_label))):
            raise DataCorruptError(f"{self.name}: the label indices of {path} are not 0..{len(by_label) - 1}")
        return tuple(by_label[i] for i in range(len(by_label)))

    def split_entries(
        self, root: Path, split: str, download: bool = False
    ) -> tuple[tuple[str, ...], list[Path], list[int]]:
        """(classes, image paths, labels) of ``split`` from its list file; every listed image must exist.

        :raises DataMissingError: a list file, the image folder or a listed image is absent.
        :raises DataCorruptError: a malformed line or a label outside the categories.
        """
        self.check_split(split)
        root = Path(root)
        absent = [p for p in self._required(root, split) if not p.exists()]
        if absent and download:
            self._download(root, split)
            absent = [p for p in self._required(root, split) if not p.exists()]
        if absent:
            raise self._missing(root, split, absent[0])
        classes = self.read_categories(root)
        _, listing, images = SPLIT_FILES[split]
        list_path = _folder(root) / listing
        image_dir = _folder(root) / images
        paths: list[Path] = []
        labels: list[int] = []
        for lineno, line in enumerate(list_path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            fields = line.split()
            if len(fields) != 2 or not fields[1].isdigit() or int(fields[1]) >= len(classes):
                raise DataCorruptError(
                    f"{self.name}: {list_path} line {lineno} is not '<image> <label 0..{len(classes) - 1}>': {line!r}"
                )
            paths.append(image_dir / fields[0].lstrip("/"))
            labels.append(int(fields[1]))
        if not paths:
            raise DataCorruptError(f"{self.name}: {list_path} lists no image")
        return classes, paths, labels

    def fingerprint(self, split: str, root: Path) -> str:
        """sha1 of the categories and list files' contents and of every listed image's (path, size, mtime_ns)."""
        root = Path(root)
        _, paths, _ = self.split_entries(root, split)
        f = _folder(root)
        h = hashlib.sha1()
        for meta in (f / CATEGORIES, f / SPLIT_FILES[split][1]):
            h.update(meta.read_bytes())
            h.update(b"\0")
        for path in paths:
            try:
                st = os.stat(path)
            except OSError:
                raise self._missing(root, split, path) from None
            h.update(f"{path.relative_to(f)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    # -- loading -------------------------------------------------------------------------------------
    def load(self, split: str, root: Path, download: bool) -> ImageSet:
        """Decode every listed JPEG of ``split`` into uint8 ``N x 3 x 256 x 256``, in list order."""
        return self.load_resized(split, root, download, self.native_size)

    def load_resized(self, split: str, root: Path, download: bool, size: int) -> ImageSet:
        """Decode every listed JPEG of ``split`` in list order, each chunk resized to ``size`` at once (the
        SRD paper's 32x32: the 1.8 M train images then take 5.5 GB instead of 354 GB)."""
        from osslbench.sources import resize_images

        root = Path(root)
        classes, paths, labels = self.split_entries(root, split, download=download)
        missing = next((p for p in paths if not p.is_file()), None)
        if missing is not None:
            raise self._missing(root, split, missing)
        images = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)
        for start in range(0, len(paths), DECODE_CHUNK):
            chunk = paths[start : start + DECODE_CHUNK]
            try:
                decoded = decode_jpegs(chunk, self.native_size, desc=f"decode {self.name}:{split} {start}/{len(paths)}")
            except DataCorruptError as exc:
                raise DataCorruptError(f"{self.name}: {exc}") from exc
            images[start : start + len(chunk)] = decoded if size == self.native_size else resize_images(decoded, size)
        return ImageSet(
            images=images,
            labels=torch.tensor(labels, dtype=torch.int64),
            classes=classes,
            name=f"{self.name}:{split}",
        )
