"""The split builder: labelled / unlabelled / test / outlier-test index sets, deterministic per seed.

Works on label arrays only (no images), so the exact counts of any protocol can be computed and
audited cheaply; :mod:`osslbench.data.dataset` turns the index sets into image tensors.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..fsio import atomic_write
from ..protocol import Protocol

LabelsFn = Callable[[str], tuple[np.ndarray, tuple[str, ...]]]
"""``spec -> (labels, class names)`` of a source split, e.g. ``"cifar100:train"``."""
SuperclassesFn = Callable[[str], tuple[list[int], tuple[str, ...]]]
"""``spec -> (superclass of each class, superclass names)`` (:meth:`osslbench.sources.base.Source.superclasses`)."""


@dataclass
class Splits:
    """Index sets of one protocol and seed (indices into the source named in ``sources``).

    ``unlabelled_seen`` indexes the labelled source (its seen-class images that are not labelled);
    ``unlabelled_unseen`` indexes ``sources["unlabelled_unseen"]`` (a foreign source, or the unseen
    classes of the labelled source).
    """

    seen_classes: list[int]
    unseen_classes: list[int]
    class_names: list[str]
    labelled: np.ndarray
    unlabelled_seen: np.ndarray
    unlabelled_unseen: np.ndarray
    test: np.ndarray
    outlier_test: np.ndarray
    sources: dict[str, str] = field(default_factory=dict)

    _ARRAYS = ("labelled", "unlabelled_seen", "unlabelled_unseen", "test", "outlier_test")

    def summary(self) -> dict:
        """Sizes and classes of every split (``osslbench splits`` prints this)."""
        names = self.class_names
        return {
            "sizes": {k: int(len(getattr(self, k))) for k in self._ARRAYS},
            "unlabelled_total": int(len(self.unlabelled_seen) + len(self.unlabelled_unseen)),
            "mismatch": round(len(self.unlabelled_unseen) / max(1, len(self.unlabelled_seen) + len(self.unlabelled_unseen)), 6),
            "sources": self.sources,
            "seen_classes": [names[c] for c in self.seen_classes],
            "unseen_classes": [names[c] for c in self.unseen_classes],
        }

    def save(self, path: Path) -> None:
        """Write the index sets (``.npz``) so a run's exact split can be audited and reused."""
        meta = json.dumps({"seen_classes": self.seen_classes, "unseen_classes": self.unseen_classes,
                           "class_names": self.class_names, "sources": self.sources})
        arrays = {k: getattr(self, k) for k in self._ARRAYS}

        def write(tmp: Path) -> None:
            with tmp.open("wb") as fh:
                np.savez_compressed(fh, meta=np.array(meta), **arrays)

        atomic_write(path, write)

    @classmethod
    def load(cls, path: Path) -> Splits:
        """Read index sets written by :meth:`save`."""
        with np.load(path) as z:
            meta = json.loads(str(z["meta"]))
            return cls(**meta, **{k: z[k] for k in cls._ARRAYS})


def _resolve_classes(spec: list[int | str] | str, names: tuple[str, ...], where: str) -> list[int]:
    if spec == "all":
        return list(range(len(names)))
    out = []
    for c in spec:
        if isinstance(c, str):
            if c not in names:
                raise ConfigError(f"{where}: split.seen_classes: unknown class {c!r}")
            out.append(names.index(c))
        elif not 0 <= c < len(names):
            raise ConfigError(f"{where}: split.seen_classes: class index {c} outside 0..{len(names) - 1}")
        else:
            out.append(c)
    if len(set(out)) != len(out) or not out:
        raise ConfigError(f"{where}: split.seen_classes must be distinct and non-empty")
    return out


def _take(rng: np.random.Generator, pool: np.ndarray, n: int, where: str, what: str) -> np.ndarray:
    if n > len(pool):
        raise ConfigError(f"{where}: {what} needs {n} images but only {len(pool)} are available")
    return np.sort(rng.choice(pool, size=n, replace=False)) if n < len(pool) else np.sort(pool)


def _superclass_members(k: int, spec: str, superclasses_of: SuperclassesFn | None, n_classes: int,
                        where: str) -> list[int]:
    """Every class of the first ``k`` superclasses of ``spec``, by class index."""
    if superclasses_of is None:
        raise ConfigError(f"{where}: split.seen_superclasses needs the superclasses of {spec}")
    try:
        mapping, names = superclasses_of(spec)
    except ConfigError as exc:
        raise ConfigError(f"{where}: split.seen_superclasses: {exc}") from None
    if len(mapping) != n_classes:
        raise ConfigError(f"{where}: {spec} has {n_classes} classes but {len(mapping)} superclass entries")
    if k > len(names):
        raise ConfigError(f"{where}: split.seen_superclasses = {k} but {spec} has {len(names)} superclasses")
    return [c for c in range(n_classes) if mapping[c] < k]


def hashed_subset(idx: np.ndarray, n: int) -> np.ndarray:
    """At most ``n`` of ``idx`` (0 = all), chosen by a fixed hash of each index (Knuth's multiplicative hash), sorted:
    the same images for every seed, and a subset of a larger cap's subset."""
    if n <= 0 or n >= len(idx):
        return idx
    h = (idx.astype(np.uint64) * np.uint64(2654435761)) % np.uint64(2**32)
    return np.sort(idx[np.argsort(h, kind="stable")[:n]])


def build_splits(protocol: Protocol, seed: int, labels_of: LabelsFn,
                 superclasses_of: SuperclassesFn | None = None) -> Splits:
    """Draw the index sets of ``protocol`` for ``seed`` (same seed, same indices).

    Labelled images are drawn first, so the labelled set of a seed does not depend on the unlabelled
    settings (a mismatch sweep keeps its labelled set).
    """
    where, data, split = protocol.source_file, protocol.data, protocol.split
    rng = np.random.default_rng(seed)
    lab_y, names = labels_of(data.labelled)
    if split.seen_superclasses:
        seen = _superclass_members(split.seen_superclasses, data.labelled, superclasses_of, len(names), where)
    else:
        seen = _resolve_classes(split.seen_classes, names, where)
    unseen = [c for c in range(len(names)) if c not in seen]

    labelled, leftover_seen = [], []
    for c in seen:
        idx = rng.permutation(np.flatnonzero(lab_y == c))
        n = len(idx) if split.labels_per_class == "all" else split.labels_per_class
        if n > len(idx):
            raise ConfigError(f"{where}: split.labels_per_class = {n} but class {names[c]!r} of "
                              f"{data.labelled} has only {len(idx)} images")
        labelled.append(idx[:n])
        leftover_seen.append(idx[n:])
    labelled_idx = np.sort(np.concatenate(labelled))
    seen_pool = np.sort(np.concatenate(leftover_seen))

    if data.unlabelled:
        unseen_source = data.unlabelled
        unseen_pool = np.arange(len(labels_of(data.unlabelled)[0]))
    else:
        unseen_source = data.labelled
        unseen_pool = np.flatnonzero(np.isin(lab_y, unseen))

    if split.mismatch == "natural":
        # The foreign set alone (SRD paper), or every image of the labelled source not labelled.
        parts = [(unseen_pool, True)] if data.unlabelled else [(seen_pool, False), (unseen_pool, True)]
        pool = np.concatenate([p for p, _ in parts])
        is_unseen = np.concatenate([np.full(len(p), u) for p, u in parts])
        n = len(pool) if split.unlabelled == "all" else split.unlabelled
        chosen = _take(rng, np.arange(len(pool)), n, where, f"split.unlabelled = {n}")
        u_seen, u_unseen = pool[chosen[~is_unseen[chosen]]], pool[chosen[is_unseen[chosen]]]
    else:
        r = split.mismatch
        if split.unlabelled == "all":
            n_unseen, n_seen = (len(unseen_pool), 0) if r == 1.0 else (0, len(seen_pool))
        else:
            n_unseen = round(r * split.unlabelled)
            n_seen = split.unlabelled - n_unseen
        u_seen = _take(rng, seen_pool, n_seen, where, f"split.mismatch = {r} (seen-class part)")
        u_unseen = _take(rng, unseen_pool, n_unseen, where, f"split.mismatch = {r} (unseen-class part)")

    test_y, test_names = labels_of(data.test)
    if test_names != names:
        raise ConfigError(f"{where}: data.test ({data.test}) has other classes than data.labelled ({data.labelled})")
    test_idx = np.flatnonzero(np.isin(test_y, seen))
    if data.outlier_test:
        outlier_source = data.outlier_test
        outlier_idx = np.arange(len(labels_of(data.outlier_test)[0]))
    else:
        outlier_source = data.test
        outlier_idx = np.flatnonzero(np.isin(test_y, unseen))

    return Splits(
        seen_classes=seen, unseen_classes=unseen, class_names=list(names),
        labelled=labelled_idx, unlabelled_seen=np.sort(u_seen), unlabelled_unseen=np.sort(u_unseen),
        test=hashed_subset(test_idx, split.max_test), outlier_test=hashed_subset(outlier_idx, split.max_test),
        sources={"labelled": data.labelled, "unlabelled_seen": data.labelled, "unlabelled_unseen": unseen_source,
                 "test": data.test, "outlier_test": outlier_source},
    )
