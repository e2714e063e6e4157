"""A run's images: the split index sets materialised as uint8 tensors, labels remapped to 0..S-1."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError
from ..protocol import Protocol
from ..sources import load_split, parse_spec
from .overlap import overlap_report
from .splits import Splits, build_splits


@dataclass
class RunData:
    """Everything the Trainer reads: uint8 ``N x C x H x W`` images and int64 labels.

    ``unlabelled_unseen`` marks which unlabelled images come from unseen classes (for analysis only;
    methods never see it).
    """

    labelled_x: Tensor
    labelled_y: Tensor
    unlabelled_x: Tensor
    unlabelled_unseen: Tensor
    test_x: Tensor
    test_y: Tensor
    outlier_x: Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int
    flip: bool

    @property
    def in_channels(self) -> int:
        return int(self.labelled_x.shape[1])


def labels_fn(protocol: Protocol, root: str | Path, download: bool = False):
    """``spec -> (labels, classes)`` for :func:`build_splits`, reading through the source cache."""

    def labels_of(spec: str) -> tuple[np.ndarray, tuple[str, ...]]:
        images = load_split(spec, root, protocol.data.image_size, download)
        return images.labels.numpy(), images.classes

    return labels_of


def superclasses_fn(root: str | Path):
    """``spec -> (superclass of each class, names)`` for :func:`build_splits`."""

    def superclasses_of(spec: str) -> tuple[list[int], tuple[str, ...]]:
        source, _ = parse_spec(spec)
        return source.superclasses(Path(root))

    return superclasses_of


def check_sources(protocol: Protocol) -> None:
    """Every ``data`` spec names a known source and one of its splits (the error names the file and key)."""
    for key in ("labelled", "test", "unlabelled", "outlier_test"):
        spec = getattr(protocol.data, key)
        if spec or key in ("labelled", "test"):
            try:
                parse_spec(spec)
            except ConfigError as exc:
                raise ConfigError(f"{protocol.source_file}: data.{key}: {exc}") from None


def make_splits(protocol: Protocol, seed: int, root: str | Path, download: bool = False) -> Splits:
    """The protocol's index sets for ``seed``."""
    check_sources(protocol)
    return build_splits(protocol, seed, labels_fn(protocol, root, download), superclasses_fn(root))


def splits_report(protocol: Protocol, splits: Splits, root: str | Path, download: bool = False) -> dict:
    """:meth:`Splits.summary` plus, for every split, the classes its images actually belong to."""
    labels_of = labels_fn(protocol, root, download)
    classes = {}
    for role in Splits._ARRAYS:
        labels, names = labels_of(splits.sources[role])
        present = np.unique(labels[getattr(splits, role)]) if len(getattr(splits, role)) else []
        classes[role] = [names[c] for c in present]
    report = {**splits.summary(), "classes": classes}
    labelled_src, foreign_src = (splits.sources[k].split(":")[0] for k in ("labelled", "unlabelled_unseen"))
    if foreign_src != labelled_src:
        labels, names = labels_of(splits.sources["unlabelled_unseen"])
        overlap = overlap_report(labelled_src, foreign_src, labels[splits.unlabelled_unseen], names)
        if overlap:
            report["unlabelled_in_labelled_classes"] = overlap
    return report


def load_run_data(protocol: Protocol, splits: Splits, root: str | Path, download: bool = False) -> RunData:
    """Gather the images of every split (decoded once per process by the source cache)."""

    def images(role: str, idx: np.ndarray) -> tuple[Tensor, Tensor]:
        s = load_split(splits.sources[role], root, protocol.data.image_size, download)
        index = torch.as_tensor(idx, dtype=torch.long)
        return s.images[index], s.labels[index]

    remap = torch.full((len(splits.class_names),), -1, dtype=torch.long)
    remap[torch.as_tensor(splits.seen_classes)] = torch.arange(len(splits.seen_classes))
    lab_x, lab_y = images("labelled", splits.labelled)
    us_x, _ = images("unlabelled_seen", splits.unlabelled_seen)
    uu_x, _ = images("unlabelled_unseen", splits.unlabelled_unseen)
    test_x, test_y = images("test", splits.test)
    out_x, _ = images("outlier_test", splits.outlier_test)
    return RunData(
        labelled_x=lab_x, labelled_y=remap[lab_y],
        unlabelled_x=torch.cat([us_x, uu_x]),
        unlabelled_unseen=torch.cat([torch.zeros(len(us_x), dtype=torch.bool), torch.ones(len(uu_x), dtype=torch.bool)]),
        test_x=test_x, test_y=remap[test_y], outlier_x=out_x,
        num_classes=len(splits.seen_classes),
        mean=tuple(protocol.data.mean), std=tuple(protocol.data.std),
        crop_padding=protocol.data.crop_padding, flip=protocol.data.flip,
    )
