"""The conventional pipeline ``osslbench bench`` measures osslbench against (its ratio is the figure of merit).

What the SRD authors' loop does (``jingyang2017/SRD_ossl``: ``dataset/cifar100.py``, ``helper/loops.py``
``train_ssldistill``), moved to the bench's device: torchvision-style datasets holding uint8 images at their
native size (CIFAR-100 32 px, Tiny-ImageNet 64 px), PIL transforms per image in ``DataLoader`` workers
(``Resize(32)``, ``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize``; the strong
view adds torchvision's ``RandAugment(2, 10)`` and a 16-px Cutout as FixMatch's code does), two loaders (labelled,
unlabelled) each shuffling and dropping the last batch, and a plain fp32, NCHW loop: the method's own ``losses``
(same models, same loss code), ``backward``, SGD step. Deliberate favours to the reference, so the ratio is a
lower bound: the images are decoded once into arrays (no JPEG decoding per step, which the authors' Tiny-ImageNet
loader does), one view per image (their ``TransformTwice`` computes two and uses one).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor
from torch.utils.data import ConcatDataset, DataLoader, Dataset
from torchvision import transforms

from .data.splits import Splits
from .method import Batch, Method
from .protocol import Protocol
from .sources import load_split, parse_spec
from .sources.images import ImageSet


class ArrayImages(Dataset):
    """uint8 ``N x C x H x W`` images served as PIL images through ``transform`` (torchvision's CIFAR100 does the
    same with its ``data`` array); items are ``(views, label, index)`` with ``index`` = position + ``offset``."""

    def __init__(self, images: Tensor, labels: Tensor | None, transform: transforms.Compose | MultiView,
                 offset: int = 0) -> None:
        self.images = images.permute(0, 2, 3, 1).numpy()  # HWC, as PIL wants it
        self.labels = labels.numpy() if labels is not None else None
        self.transform, self.offset = transform, offset

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[object, int, int]:
        arr = self.images[i]
        img = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
        label = int(self.labels[i]) if self.labels is not None else -1
        return self.transform(img), label, i + self.offset


class Cutout:
    """FixMatch's Cutout: a grey square of side ``fraction * size`` at a uniformly random centre (PIL)."""

    def __init__(self, fraction: float = 0.5) -> None:
        self.fraction = fraction

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        side = int(self.fraction * w)
        x0, y0 = np.random.uniform(0, w), np.random.uniform(0, h)
        x0, y0 = int(max(0, x0 - side / 2)), int(max(0, y0 - side / 2))
        img = img.copy()
        ImageDraw.Draw(img).rectangle((x0, y0, min(w, x0 + side), min(h, y0 + side)), fill=(127,) * len(img.getbands()))
        return img


class MultiView:
    """Several transforms of one image (the authors' ``TransformTwice``, generalised to a method's views)."""

    def __init__(self, views: list[transforms.Compose]) -> None:
        self.views = views

    def __call__(self, img: Image.Image) -> list[Tensor]:
        return [v(img) for v in self.views]


def view_transform(kind: str, protocol: Protocol) -> transforms.Compose:
    """The PIL pipeline of one view kind (``weak``, ``flip``, ``strong``, ``plain``: see ``Method.unlabelled_views``)."""
    d = protocol.data
    size = d.image_size
    flip = [transforms.RandomHorizontalFlip()] if d.flip else []
    crop = [transforms.RandomCrop(size, padding=d.crop_padding)] if d.crop_padding else []
    tail = [transforms.ToTensor(), transforms.Normalize(d.mean, d.std)]
    resize = [transforms.Resize((size, size))]
    ops = {"weak": resize + crop + flip, "flip": resize + flip, "plain": resize,
           "strong": resize + crop + flip + [transforms.RandAugment(2, 10), Cutout()]}
    if kind not in ops:
        raise ValueError(f"unknown view {kind!r}")
    return transforms.Compose(ops[kind] + tail)


def _native(spec: str, root: object) -> ImageSet:
    """A split at its source's native resolution (the conventional pipeline resizes per image)."""
    source, _ = parse_spec(spec)
    return load_split(spec, root, source.native_size or None)


@dataclass
class ReferenceData:
    """The reference's labelled and unlabelled datasets (unlabelled in the pool's order: seen part, then unseen)."""

    labelled: Dataset
    unlabelled: Dataset | None


def reference_data(protocol: Protocol, splits: Splits, root: object, method: Method) -> ReferenceData:
    """Datasets over the run's split at each source's native resolution (resized per image by the transform)."""
    idx = {k: torch.as_tensor(getattr(splits, k), dtype=torch.long) for k in ("labelled", "unlabelled_seen",
                                                                               "unlabelled_unseen")}
    lab_src = _native(splits.sources["labelled"], root)
    remap = torch.full((len(splits.class_names),), -1, dtype=torch.long)
    remap[torch.as_tensor(splits.seen_classes)] = torch.arange(len(splits.seen_classes))
    labelled = ArrayImages(lab_src.images[idx["labelled"]], remap[lab_src.labels[idx["labelled"]]],
                           view_transform("weak", protocol))
    if not method.uses_unlabelled:
        return ReferenceData(labelled, None)
    views = MultiView([view_transform(k, protocol) for k in method.unlabelled_views])
    seen = _native(splits.sources["unlabelled_seen"], root).images[idx["unlabelled_seen"]]
    unseen = _native(splits.sources["unlabelled_unseen"], root).images[idx["unlabelled_unseen"]]
    parts = [ArrayImages(seen, None, views), ArrayImages(unseen, None, views, offset=len(seen))]
    return ReferenceData(labelled, ConcatDataset([p for p in parts if len(p)]))


def _forever(loader: DataLoader) -> Iterator:
    while True:  # the authors' loops restart an exhausted iterator (the unlabelled loader is the longer one)
        yield from loader


def reference_batches(data: ReferenceData, batch_size: int, n_ulb: int, workers: int, device: torch.device,
                      seed: int = 0) -> Iterator[Batch]:
    """Batches from two shuffling ``DataLoader`` s, moved to ``device`` in NCHW fp32, as osslbench's ``Batch``."""
    gen = torch.Generator().manual_seed(seed)
    kw = {"num_workers": workers, "drop_last": True, "shuffle": True, "persistent_workers": workers > 0}
    lab = _forever(DataLoader(data.labelled, batch_size=batch_size, generator=gen, **kw))
    ulb = _forever(DataLoader(data.unlabelled, batch_size=n_ulb, generator=gen, **kw)) if data.unlabelled else None
    step = 0
    while True:
        x, y, _ = next(lab)
        views, idx = ([], torch.empty(0, dtype=torch.long))
        if ulb is not None:
            views, _, idx = next(ulb)
            views = [v.to(device) for v in views]
        yield Batch(x.to(device), y.to(device), views, idx, 0, step, 1 << 30, 1, gen=gen)
        step += 1


def reference_step(method: Method, optimizer: torch.optim.Optimizer, batch: Batch,
                   ema: torch.optim.swa_utils.AveragedModel | None = None) -> dict[str, Tensor]:
    """The authors' step: losses in fp32, sum, backward, SGD step (and an EMA update where the method has one)."""
    terms = method.losses(batch)
    loss = sum(terms.values())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    method.after_step()
    if ema is not None:
        ema.update_parameters(method)
    return terms
