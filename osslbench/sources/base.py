"""The interface every data source implements.

A *source* turns files in the official distribution format of a data set (or data bundled with a library)
into :class:`~osslbench.sources.images.ImageSet` splits. Sources are discovered automatically by
:mod:`osslbench.sources`: any module of that package may define subclasses of :class:`Source` that set
``name``; no registration call is needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from osslbench.errors import ConfigError
from osslbench.sources.images import ImageSet


class Source:
    """A data source: a named collection of splits decoded into uint8 ``N x C x H x W`` image sets.

    Subclasses set the class attributes and implement :meth:`load` and :meth:`expected_files`.
    A subclass that leaves ``name`` empty is treated as an abstract helper and is not registered.

    :cvar name: registry key, used in split specs ``"<name>:<split>"`` (lower case, no colon).
    :cvar description: one line shown by ``describe_sources()`` (data set, paper, size).
    :cvar splits: the split names :meth:`load` accepts.
    :cvar native_size: height (= width) of the images as stored, before any resize.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    splits: ClassVar[tuple[str, ...]] = ()
    native_size: ClassVar[int] = 0

    def load(self, split: str, root: Path, download: bool) -> ImageSet:
        """Decode ``split`` from the files under ``root`` (downloading them first if ``download``).

        :raises DataMissingError: files are absent (and ``download`` is off or failed).
        :raises DataCorruptError: a file is present but damaged.
        :raises ConfigError: ``split`` is not one of :attr:`splits`.
        """
        raise NotImplementedError

    def load_resized(self, split: str, root: Path, download: bool, size: int) -> ImageSet:
        """:meth:`load`, resized to ``size`` x ``size`` (bilinear, antialiased, uint8 kept).

        Sources of many large images override this to resize chunk by chunk while decoding, so the split
        never exists at its native size in memory (Places365 train: 1.8 M images, 354 GB at 256x256).
        """
        from osslbench.sources import resize_images

        native = self.load(split, root, download)
        return ImageSet(images=resize_images(native.images, size), labels=native.labels, classes=native.classes,
                        name=native.name)

    def expected_files(self, root: Path) -> str:
        """Describe, in a short phrase, the files this source expects under ``root`` (for error messages)."""
        raise NotImplementedError

    def fingerprint(self, split: str, root: Path) -> str | None:
        """A cheap checksum of the files ``split`` is decoded from, the key of the on-disk decoded cache
        (:mod:`osslbench.sources.cache`): it must change whenever those files change.

        ``None`` (the default) means "do not cache on disk" (sources that decode in milliseconds, or whose
        files cannot be summarised cheaply). Called before :meth:`load` (and again after a ``download``); when
        the files are absent it raises :class:`DataMissingError` with the same message :meth:`load` would.
        """
        return None

    def superclasses(self, root: Path) -> tuple[list[int], tuple[str, ...]]:
        """``(m, names)``: ``m[c]`` is the superclass index of class ``c``, ``names`` the superclass names
        (CIFAR-100's 20 coarse labels), for seen-class splits by superclass (``split.seen_superclasses``).

        :raises ConfigError: the source has no superclasses (the default).
        """
        raise ConfigError(f"source {self.name!r} has no superclasses (split.seen_superclasses needs e.g. cifar100)")

    def check_split(self, split: str) -> None:
        """Raise :class:`ConfigError` unless ``split`` is one of :attr:`splits`."""
        if split not in self.splits:
            raise ConfigError(
                f"source {self.name!r} has no split {split!r}; its splits are: {', '.join(self.splits)}"
            )

    def __repr__(self) -> str:
        return f"<Source {self.name}: splits={self.splits}, native_size={self.native_size}>"
