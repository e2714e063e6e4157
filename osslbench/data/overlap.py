"""Natural class overlap between a labelled source and a foreign unlabelled source, kept as data.

The SRD paper uses Tiny-ImageNet-200 as the unlabelled pool of CIFAR-100 with no filtering, so part of that pool
shows classes CIFAR-100 labels. ``cifar100_tinyimagenet_overlap.csv`` lists the 37 Tiny-ImageNet classes that are
a CIFAR-100 class: 10 by the same name (``snail``, ``bee``, ``lion``, ...) and 27 that are a kind of one
(``school bus`` -> ``bus``, ``tarantula`` -> ``spider``, ``alp`` -> ``mountain``), judged by hand from the WordNet
names in ``words.txt``. Left out on purpose: look-alikes that WordNet does not place under the CIFAR class
(``goldfish`` vs ``aquarium_fish``, ``American alligator`` vs ``crocodile``, ``koala`` and ``teddy bear`` vs
``bear``, ``desk`` vs ``table``, ``seashore`` vs ``sea``), and classes CIFAR-100 lacks (cats, dogs, birds, cars).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: (labelled source, foreign source) -> the overlap file beside this module.
OVERLAP_FILES: dict[tuple[str, str], str] = {
    ("cifar100", "tinyimagenet"): "cifar100_tinyimagenet_overlap.csv",
    ("cifar100", "tinyimagenet-hf"): "cifar100_tinyimagenet_overlap.csv",
}


@dataclass(frozen=True)
class SharedClass:
    """A foreign class that is also a labelled-source class."""

    foreign: str  # class id in the foreign source (a Tiny-ImageNet wnid)
    foreign_name: str
    labelled: str  # the labelled source's class name
    relation: str  # "same name" or "kind of"


def shared_classes(labelled: str, foreign: str) -> list[SharedClass]:
    """The classes of source ``foreign`` that are classes of source ``labelled`` (empty when none are listed)."""
    name = OVERLAP_FILES.get((labelled, foreign))
    if name is None:
        return []
    with (Path(__file__).with_name(name)).open(newline="", encoding="utf-8") as fh:
        return [SharedClass(r["wnid"], r["tinyimagenet_name"], r["cifar100_class"], r["relation"])
                for r in csv.DictReader(fh)]


def overlap_report(labelled: str, foreign: str, labels: np.ndarray, classes: tuple[str, ...] | list[str]) -> dict:
    """How many images (``labels`` index ``classes`` of the foreign source) fall in classes shared with
    ``labelled``; ``{}`` when no overlap list exists for the pair."""
    shared = shared_classes(labelled, foreign)
    if not shared:
        return {}
    ids = {s.foreign for s in shared}
    in_shared = np.isin(labels, [i for i, c in enumerate(classes) if c in ids])
    n = int(in_shared.sum())
    return {"images_in_shared_classes": n, "fraction": round(n / max(1, len(labels)), 4),
            "shared_classes": len(ids), "foreign_classes": len(classes),
            "list": f"osslbench/data/{OVERLAP_FILES[(labelled, foreign)]}"}
