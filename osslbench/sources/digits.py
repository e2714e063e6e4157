"""scikit-learn's bundled 8x8 handwritten digits (no data root, no download).

The data is the test part of the UCI "Optical Recognition of Handwritten Digits" data set
(Alpaydin & Kaynak, 1998; Dua & Graff, UCI Machine Learning Repository) as shipped by
``sklearn.datasets.load_digits``: 1,797 greyscale 8x8 images of the digits 0..9, pixel values 0..16.
It is tiny, so it serves for smoke tests and quick CPU experiments.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from osslbench.sources.base import Source
from osslbench.sources.images import ImageSet

#: Number of images in each split of the deterministic stratified split (tested).
DIGITS_SPLIT_SIZES: dict[str, int] = {"train": 1257, "test": 540}


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 images as uint8 ``N x 1 x 8 x 8`` (0..16 scaled by ``round(v * 255 / 16)``) and int64 labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    values = np.asarray(bunch.images, dtype=np.float64)  # N x 8 x 8, integers 0..16
    images = np.rint(values * 255.0 / 16.0).clip(0, 255).astype(np.uint8)[:, None, :, :]
    labels = np.asarray(bunch.target, dtype=np.int64)
    return images, labels


class DigitsSource(Source):
    """The 8x8 digits, split 70/30 with a fixed stratified split.

    There is no official split, so ``train`` / ``test`` come from
    ``sklearn.model_selection.train_test_split(indices, test_size=0.3, stratify=labels, random_state=0)``:
    ``train`` has 1,257 images and ``test`` 540 (see :data:`DIGITS_SPLIT_SIZES`), each in the order that
    call returns. Images are 1 x 8 x 8 uint8; classes are ``"0"`` .. ``"9"``.
    """

    name = "digits"
    description = "scikit-learn 8x8 handwritten digits (UCI optical recognition), 10 classes, 1257 train / 540 test"
    splits = ("train", "test")
    native_size = 8

    def load(self, split: str, root: Path, download: bool) -> ImageSet:
        """Return the ``split`` of the digits (``root`` and ``download`` are unused: the data ships with sklearn)."""
        from sklearn.model_selection import train_test_split

        self.check_split(split)
        images, labels = _digits_arrays()
        train_idx, test_idx = train_test_split(
            np.arange(len(labels)), test_size=0.3, stratify=labels, random_state=0
        )
        idx = train_idx if split == "train" else test_idx
        return ImageSet(
            images=torch.from_numpy(np.ascontiguousarray(images[idx])),
            labels=torch.from_numpy(labels[idx]),
            classes=tuple(str(d) for d in range(10)),
            name=f"{self.name}:{split}",
        )

    def expected_files(self, root: Path) -> str:
        return "nothing: the digits are bundled with scikit-learn"
