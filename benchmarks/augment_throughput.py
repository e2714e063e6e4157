"""Throughput of the batch augmentations on the CPU, in images per second.

The default batch is FixMatch's unlabelled batch, mu * B = 7 * 64 = 448 CIFAR images (3 x 32 x 32, uint8).

    python benchmarks/augment_throughput.py [--batch 448] [--size 32] [--seconds 2] [--threads N]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from osslbench.data.augment import random_crop_flip
from osslbench.data.pipeline import views
from osslbench.data.randaugment import rand_augment


def _images_per_second(fn: Callable[[torch.Tensor, torch.Generator], object], x: torch.Tensor, seconds: float) -> float:
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):  # warm-up
        fn(x, gen)
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        fn(x, gen)
        calls += 1
    return calls * x.shape[0] / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=448, help="images per batch (FixMatch: mu * B = 7 * 64)")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0, help="time spent measuring each function")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    x = torch.randint(0, 256, (args.batch, args.channels, args.size, args.size), dtype=torch.uint8, generator=torch.Generator())
    cases: list[tuple[str, Callable[[torch.Tensor, torch.Generator], object]]] = [
        ("random_crop_flip", lambda b, g: random_crop_flip(b, g)),
        ("rand_augment", lambda b, g: rand_augment(b, g)),
        ("strong view (crop+flip+rand_augment)", lambda b, g: views(b, ["strong"], g, padding=4, flip=True)),
    ]
    print(f"batch {tuple(x.shape)} uint8 on CPU, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, fn in cases:
        print(f"{name:40s} {_images_per_second(fn, x, args.seconds):12,.0f} images/s")


if __name__ == "__main__":
    main()
