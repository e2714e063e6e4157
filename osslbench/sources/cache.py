"""The on-disk decoded cache: a split decoded once into uint8 arrays, memory-mapped by every later run.

Decoding 100,000 JPEGs (Tiny-ImageNet train) or unpickling CIFAR takes seconds to minutes; reading the same
pixels back from a ``.npy`` file takes milliseconds. An entry is keyed by the source, the split, the
resolution and the source's :meth:`~osslbench.sources.base.Source.fingerprint` of its files (checksums, sizes,
modification times), so a changed or replaced file is decoded afresh instead of served stale::

    <cache>/<source>/<split>-<size>-<fingerprint>/{images.npy, labels.npy, meta.json}

``<cache>`` is ``$OSSLBENCH_CACHE``, else ``$XDG_CACHE_HOME/osslbench/decoded`` (``~/.cache/...``);
``OSSLBENCH_CACHE=off`` disables it. The cache is an optimisation only: an entry that cannot be written
(read-only disk, full disk) or read (truncated by a crash) is reported once as a warning and ignored.
Entries are written to a temporary folder and renamed into place, so concurrent runs never see half an entry.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
import warnings
from pathlib import Path

import numpy as np
import torch

from osslbench.sources.images import ImageSet

CACHE_ENV = "OSSLBENCH_CACHE"
_OFF = {"off", "0", "none", "false", "no"}
FORMAT = 1  # bump when the entry layout changes


def cache_root() -> Path | None:
    """The cache folder, or ``None`` when ``$OSSLBENCH_CACHE`` turns the cache off."""
    value = os.environ.get(CACHE_ENV)
    if value is not None and value.strip().lower() in _OFF:
        return None
    if value:
        return Path(value).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "osslbench" / "decoded"


def entry_dir(source: str, split: str, size: int, fingerprint: str) -> Path | None:
    """Where the entry for ``(source, split, size, fingerprint)`` lives (``None``: cache off)."""
    root = cache_root()
    if root is None:
        return None
    return root / source / f"{split}-{size}px-{fingerprint[:24]}"


def read_entry(path: Path, name: str) -> ImageSet | None:
    """The cached split at ``path`` (images memory-mapped copy-on-write), or ``None`` when absent or unreadable."""
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT:
            return None
        # mode "c": pages are read lazily and private writes never reach the file (torch wants a writable array).
        images = np.load(path / "images.npy", mmap_mode="c")
        labels = np.load(path / "labels.npy")
        if images.dtype != np.uint8 or images.ndim != 4 or labels.shape != (images.shape[0],):
            raise ValueError(f"unexpected arrays {images.dtype} {images.shape} / {labels.shape}")
        return ImageSet(images=torch.from_numpy(images), labels=torch.from_numpy(labels.astype(np.int64)),
                        classes=tuple(meta["classes"]), name=name)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        warnings.warn(f"osslbench: ignoring unreadable cache entry {path} ({exc}); decoding afresh", stacklevel=2)
        shutil.rmtree(path, ignore_errors=True)
        return None


def write_entry(path: Path, images: ImageSet) -> None:
    """Store ``images`` at ``path`` atomically; a failure to write is a warning, never an error."""
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        tmp.mkdir(parents=True)
        np.save(tmp / "images.npy", images.images.numpy())
        np.save(tmp / "labels.npy", images.labels.numpy())
        (tmp / "meta.json").write_text(json.dumps({"format": FORMAT, "name": images.name,
                                                   "classes": list(images.classes)}))
        try:
            os.rename(tmp, path)
        except OSError:
            if not (path / "meta.json").is_file():  # not "another process stored it first"
                raise
    except OSError as exc:
        warnings.warn(f"osslbench: cannot write the decoded cache at {path} ({exc}); continuing without it",
                      stacklevel=2)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
