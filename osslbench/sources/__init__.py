"""Data sources: registry, split specs, resizing and the in-process cache.

Every module of this package may define subclasses of :class:`~osslbench.sources.base.Source` that set
``name``; they are found automatically (``pkgutil.iter_modules``) on first use, so adding a source is adding a
module. A split is named by a spec ``"<source>:<split>"``, e.g. ``"cifar100:train"``, ``"tinyimagenet:val"``,
``"digits:test"``::

    from osslbench.sources import load_split
    train = load_split("tinyimagenet:train", "../shared/data", image_size=32)

Modules of this package must import optional dependencies lazily (inside functions), since discovery imports
every module.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import numbers
import pkgutil
import threading
from collections import OrderedDict
from pathlib import Path

import torch

from osslbench.errors import ConfigError, DataMissingError
from osslbench.sources import cache
from osslbench.sources.base import Source
from osslbench.sources.images import ImageSet

__all__ = [
    "Source",
    "cache_clear",
    "describe_sources",
    "get_source",
    "load_split",
    "parse_spec",
    "resize_images",
    "source_names",
]

#: Images resized per call of torchvision's resize (bounds the float intermediate memory).
RESIZE_CHUNK = 2048
#: Decoded image sets kept in the in-process cache (least recently used are dropped first).
CACHE_SIZE = 8


@functools.cache
def _registry() -> dict[str, Source]:
    """Import every module of the package and instantiate each :class:`Source` subclass that sets ``name``."""
    found: dict[str, Source] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for obj in vars(module).values():
            if not (inspect.isclass(obj) and issubclass(obj, Source) and obj.__module__ == module.__name__):
                continue
            name = obj.__dict__.get("name")
            if not name:
                continue  # an abstract helper class
            if ":" in name or name != name.strip():
                raise RuntimeError(f"source name {name!r} of {obj.__qualname__} must not contain ':' or spaces")
            if name in found:
                raise RuntimeError(
                    f"two sources named {name!r}: {type(found[name]).__qualname__} and {obj.__qualname__}"
                )
            found[name] = obj()
    return dict(sorted(found.items()))


def source_names() -> tuple[str, ...]:
    """Names of all registered sources, sorted."""
    return tuple(_registry())


def get_source(name: str) -> Source:
    """The registered source called ``name``.

    :raises ConfigError: no such source (the message lists the known names).
    """
    try:
        return _registry()[name]
    except KeyError:
        raise ConfigError(f"unknown data source {name!r}; known sources: {', '.join(source_names())}") from None


def describe_sources() -> dict[str, str]:
    """Source name -> one-line description, sorted by name."""
    return {name: src.description for name, src in _registry().items()}


def parse_spec(spec: str) -> tuple[Source, str]:
    """Split ``"<source>:<split>"`` into the source and a split it has.

    :raises ConfigError: malformed spec, unknown source, or unknown split (naming the source's splits).
    """
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ConfigError(f"a data split is named '<source>:<split>', e.g. 'cifar100:train'; got {spec!r}")
    name, split = (part.strip() for part in spec.split(":"))
    source = get_source(name)
    source.check_split(split)
    return source, split


def resize_images(images: torch.Tensor, size: int, chunk: int = RESIZE_CHUNK) -> torch.Tensor:
    """Resize a uint8 ``N x C x H x W`` batch to ``size`` x ``size`` (bilinear, antialiased), keeping uint8.

    Runs ``torchvision.transforms.v2.functional.resize(..., antialias=True)`` on chunks of ``chunk`` images.
    """
    from torchvision.transforms.v2 import functional as F

    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"expected uint8 N x C x H x W, got {images.dtype} {tuple(images.shape)}")
    n, c = images.shape[:2]
    out = torch.empty((n, c, size, size), dtype=torch.uint8)
    for start in range(0, n, chunk):
        out[start : start + chunk] = F.resize(images[start : start + chunk], [size, size], antialias=True)
    return out


_cache: OrderedDict[tuple[str, str, int | None], ImageSet] = OrderedDict()
_cache_lock = threading.RLock()


def cache_clear() -> None:
    """Drop every image set cached in this process (e.g. in tests, or to free memory); the disk cache stays."""
    with _cache_lock:
        _cache.clear()


def _cache_get(key: tuple[str, str, int | None]) -> ImageSet | None:
    hit = _cache.get(key)
    if hit is not None:
        _cache.move_to_end(key)
    return hit


def _cache_put(key: tuple[str, str, int | None], value: ImageSet) -> None:
    _cache[key] = value
    _cache.move_to_end(key)
    while len(_cache) > CACHE_SIZE:
        _cache.popitem(last=False)


def _fingerprint(source: Source, split: str, root: Path, download: bool) -> str | None:
    """The source's fingerprint of ``split``; ``None`` when it has none, or when its files are absent but
    ``download`` is on (then the load below fetches them and the fingerprint is taken afterwards)."""
    try:
        return source.fingerprint(split, root)
    except DataMissingError:
        if download:
            return None
        raise


def _decode(source: Source, split: str, root: Path, size: int | None, download: bool) -> ImageSet:
    """Decode (and resize) a split through the on-disk cache (:mod:`osslbench.sources.cache`)."""
    name = f"{source.name}:{split}"
    pixels = size or source.native_size
    fp = _fingerprint(source, split, root, download)
    entry = cache.entry_dir(source.name, split, pixels, fp) if fp else None
    if entry is not None:
        hit = cache.read_entry(entry, name)
        if hit is not None:
            return hit
    out = source.load(split, root, download) if size is None else source.load_resized(split, root, download, size)
    if fp is None and download:
        fp = source.fingerprint(split, root)
        entry = cache.entry_dir(source.name, split, pixels, fp) if fp else None
    if entry is not None:
        cache.write_entry(entry, out)
    return out


def load_split(
    spec: str, root: str | Path, image_size: int | None = None, download: bool = False
) -> ImageSet:
    """Load the split named by ``spec`` (``"<source>:<split>"``) from the data root ``root``.

    The first load of a split decodes its files and stores the decoded (and resized) arrays in the on-disk
    cache (:mod:`osslbench.sources.cache`); later loads, in any process, memory-map them. Within a process,
    loaded sets are also kept in memory.

    :param image_size: resize every image to ``image_size`` x ``image_size`` (bilinear, antialiased, uint8 kept)
        when it differs from the source's native size; ``None`` keeps the native size.
    :param download: let the source fetch missing files (needs internet); off by default.
    :returns: the decoded split. Results are cached in-process by (spec, resolved root, size), so several runs in
        one process share them: callers must not modify the returned tensors in place.
    :raises ConfigError: bad spec, unknown source or split, bad ``image_size``.
    :raises DataMissingError, DataCorruptError: from the source.
    """
    source, split = parse_spec(spec)
    if image_size is not None:
        if isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral) or image_size < 1:
            raise ConfigError(f"image_size must be a positive integer or None, got {image_size!r}")
        image_size = int(image_size)
    size = None if image_size is None or image_size == source.native_size else image_size
    resolved = Path(root).expanduser().resolve()
    key = (f"{source.name}:{split}", str(resolved), size)
    with _cache_lock:
        hit = _cache_get(key)
        if hit is None:
            hit = _decode(source, split, resolved, size, download)
            _cache_put(key, hit)
        return hit
