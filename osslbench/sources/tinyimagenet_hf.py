"""Tiny-ImageNet-200 through Hugging Face ``datasets``: the hub data set ``zh-plus/tiny-imagenet``.

Le, Y. & Yang, X. (2015). *Tiny ImageNet Visual Recognition Challenge.* Stanford CS231N.
https://huggingface.co/datasets/zh-plus/tiny-imagenet

The same images as the ``tinyimagenet`` source (which reads the official zip), stored by the hub as parquet.
A local copy in the hub repository layout is read under a data root::

    <root>/tiny-imagenet-hf/data/train-*.parquet     100,000 rows
    <root>/tiny-imagenet-hf/data/valid-*.parquet      10,000 rows
    <root>/tiny-imagenet-hf/wnids.txt                 optional: class ids, used only if the parquet lacks them

Each row has ``image`` (encoded image bytes, 64x64, a few greyscale: converted to RGB) and ``label`` (a
``ClassLabel`` whose names are the wnids). Our split ``val`` is the hub's ``valid``. The class names come from the
``huggingface`` metadata that ``datasets`` writes into the parquet schema (their order is the label index, so the
labels agree with the ``tinyimagenet`` source exactly when that order is the one of its ``wnids.txt``).

With ``download``, missing files are fetched with ``datasets.load_dataset("zh-plus/tiny-imagenet", split=...)``
and written as ``<split>-00000-of-00001.parquet`` into the layout above, so the next run reads them offline
through the same code. The parquet files are read with ``pyarrow`` directly (not ``datasets.load_dataset``,
which would first copy them into the Hugging Face cache); ``datasets`` (``pip install 'osslbench[hf]'``,
which brings ``pyarrow``) is needed for downloading and for reading the class names.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from osslbench.errors import DataCorruptError, DataMissingError, OsslbenchError
from osslbench.sources.base import Source
from osslbench.sources.images import ImageSet
from osslbench.sources.tinyimagenet import decode_jpegs

HUB_ID = "zh-plus/tiny-imagenet"
FOLDER = "tiny-imagenet-hf"
#: Our split -> the hub's split (and parquet file prefix).
HUB_SPLITS: dict[str, str] = {"train": "train", "val": "valid"}


def _folder(root: Path) -> Path:
    return Path(root) / FOLDER


class _Blob(io.BytesIO):
    """Encoded image bytes that print as where they come from (``decode_jpegs`` names the failing item)."""

    def __init__(self, data: bytes, where: str) -> None:
        super().__init__(data)
        self.where = where

    def __str__(self) -> str:
        return self.where


class _Blobs:
    """A lazy sequence of :class:`_Blob` over a list of byte strings (one file-like object per image on demand)."""

    def __init__(self, data: list[bytes | None], where: list[str]) -> None:
        self.data, self.where = data, where

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> Any:
        blob = self.data[i]
        if blob is None:
            raise DataCorruptError(f"{self.where[i]} has no image bytes")
        return _Blob(blob, self.where[i])


def _import(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise OsslbenchError(f"tinyimagenet-hf needs {module}: pip install 'osslbench[hf]'") from None


class TinyImageNetHFSource(Source):
    """Tiny-ImageNet-200 (Le & Yang 2015) from the hub's parquet files: splits ``train`` and ``val``, 64x64 RGB.

    Images are in file order (files sorted by name, then rows); classes are the ``ClassLabel`` names (wnids).
    """

    name = "tinyimagenet-hf"
    description = "Tiny-ImageNet-200 via Hugging Face (zh-plus/tiny-imagenet), 200 classes, 64x64 RGB, 100,000 / 10,000"
    splits = ("train", "val")
    native_size = 64

    # -- files ---------------------------------------------------------------------------------------
    def expected_files(self, root: Path) -> str:
        return f"{_folder(root)}/data/{{train,valid}}-*.parquet"

    def _missing(self, root: Path, split: str) -> DataMissingError:
        pattern = _folder(root) / "data" / f"{HUB_SPLITS[split]}-*.parquet"
        return DataMissingError(
            f"{self.name}: missing {pattern} (expected {self.expected_files(root)}); rerun with --download "
            f"(needs internet) or huggingface-cli download {HUB_ID} --repo-type dataset --local-dir {_folder(root)}"
        )

    def split_files(self, root: Path, split: str) -> list[Path]:
        """The parquet files of ``split``, sorted by name (possibly none)."""
        self.check_split(split)
        return sorted(p for p in (_folder(root) / "data").glob(f"{HUB_SPLITS[split]}-*.parquet") if p.is_file())

    def _download(self, root: Path, split: str) -> None:
        """Fetch ``split`` from the hub and store it as one parquet file in the local layout."""
        datasets = _import("datasets")
        target = _folder(root) / "data" / f"{HUB_SPLITS[split]}-00000-of-00001.parquet"
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            ds = datasets.load_dataset(HUB_ID, split=HUB_SPLITS[split])
            target.parent.mkdir(parents=True, exist_ok=True)
            ds.to_parquet(str(tmp))
            os.replace(tmp, target)
        except Exception as exc:  # network, hub, or disk failure: report it as one line
            raise DataMissingError(
                f"{self.name}: download of {HUB_ID} ({HUB_SPLITS[split]}) into {target} failed "
                f"({type(exc).__name__}: {exc}); "
                f"huggingface-cli download {HUB_ID} --repo-type dataset --local-dir {_folder(root)}"
            ) from exc
        finally:
            tmp.unlink(missing_ok=True)

    def fingerprint(self, split: str, root: Path) -> str:
        """sha1 of every parquet file's (name, size, mtime_ns) and of ``wnids.txt``'s contents if present."""
        root = Path(root)
        files = self.split_files(root, split)
        if not files:
            raise self._missing(root, split)
        h = hashlib.sha1()
        for path in files:
            st = path.stat()
            h.update(f"{path.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        wnids = _folder(root) / "wnids.txt"
        if wnids.is_file():
            h.update(wnids.read_bytes())
        return h.hexdigest()

    # -- loading -------------------------------------------------------------------------------------
    def _classes(self, root: Path, files: list[Path], schemas: list[Any]) -> tuple[str, ...]:
        """ClassLabel names of ``label`` from the parquet metadata (equal in every file), else ``wnids.txt``."""
        datasets = _import("datasets")
        found: tuple[str, ...] | None = None
        for path, schema in zip(files, schemas, strict=True):
            if not schema.metadata or b"huggingface" not in schema.metadata:
                continue
            try:
                feature = datasets.Features.from_arrow_schema(schema).get("label")
            except Exception as exc:  # malformed JSON metadata
                raise DataCorruptError(f"{self.name}: bad huggingface metadata in {path} ({exc})") from exc
            if not isinstance(feature, datasets.ClassLabel):
                continue
            names = tuple(str(n) for n in feature.names)
            if found is not None and names != found:
                raise DataCorruptError(f"{self.name}: {path} names its classes differently from {files[0]}")
            found = names
        if found is None:
            wnids = _folder(root) / "wnids.txt"
            if not wnids.is_file():
                raise DataCorruptError(
                    f"{self.name}: {files[0]} has no ClassLabel names in its huggingface metadata and there is no "
                    f"{wnids} to name the classes"
                )
            found = tuple(line.strip() for line in wnids.read_text(encoding="utf-8").splitlines() if line.strip())
        if not found or len(set(found)) != len(found):
            raise DataCorruptError(f"{self.name}: the class names of {files[0]} are empty or repeated")
        return found

    def load(self, split: str, root: Path, download: bool) -> ImageSet:
        """Decode every row of ``split`` into uint8 ``N x 3 x 64 x 64`` with labels indexing the wnids."""
        root = Path(root)
        files = self.split_files(root, split)
        if not files and download:
            self._download(root, split)
            files = self.split_files(root, split)
        if not files:
            raise self._missing(root, split)
        pq = _import("pyarrow.parquet")
        blobs: list[bytes | None] = []
        where: list[str] = []
        labels: list[np.ndarray] = []
        schemas = []
        for path in files:
            try:
                table = pq.read_table(path, columns=["image", "label"])
                image = table.column("image").combine_chunks()
                data = image.field("bytes").to_pylist()
                if table.column("label").null_count:
                    raise ValueError("the label column has null entries")
                label = table.column("label").to_numpy()
            except Exception as exc:  # pyarrow raises its own ArrowInvalid / KeyError for damaged or foreign files
                raise DataCorruptError(
                    f"{self.name}: cannot read {path} as a parquet file with image.bytes and label "
                    f"({type(exc).__name__}: {exc})"
                ) from exc
            schemas.append(table.schema)
            blobs.extend(data)
            where.extend(f"{path} row {i}" for i in range(len(data)))
            labels.append(np.asarray(label, dtype=np.int64))
        classes = self._classes(root, files, schemas)
        label_array = np.concatenate(labels)
        if len(label_array) and (int(label_array.min()) < 0 or int(label_array.max()) >= len(classes)):
            raise DataCorruptError(
                f"{self.name}: labels in {', '.join(map(str, files))} outside 0..{len(classes) - 1}"
            )
        if not blobs:
            raise DataCorruptError(f"{self.name}: {', '.join(map(str, files))} hold no rows")
        try:
            images = decode_jpegs(_Blobs(blobs, where), self.native_size, desc=f"decode {self.name}:{split}")  # type: ignore[arg-type]
        except DataCorruptError as exc:
            raise DataCorruptError(f"{self.name}: {exc}") from exc
        return ImageSet(
            images=images,
            labels=torch.from_numpy(label_array),
            classes=classes,
            name=f"{self.name}:{split}",
        )
