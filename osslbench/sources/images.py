"""The in-memory form of every data source: decoded once, held as uint8 tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ImageSet:
    """A decoded split of a data source.

    :param images: uint8 tensor ``N x C x H x W`` (decoded once; augmentation runs on batches of it).
    :param labels: int64 tensor ``N``, indices into ``classes``.
    :param classes: class names (for ImageNet-style sources the WordNet id, e.g. ``n01443537``).
    :param name: ``"<source>:<split>"``, e.g. ``"cifar100:train"``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    name: str

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            shape = tuple(self.images.shape)
            raise ValueError(f"{self.name}: images must be uint8 N x C x H x W, got {self.images.dtype} {shape}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"{self.name}: {self.labels.shape[0]} labels for {self.images.shape[0]} images")

    def __len__(self) -> int:
        return int(self.images.shape[0])
