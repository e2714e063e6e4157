"""Training throughput (images/s) of the model zoo on this machine: fp32 vs bf16 autocast, channels-last.

    python benchmarks/train_throughput.py --models wrn-16-1,wrn-16-2,resnet8x4 --batch 128

One step = forward + backward + SGD update on a batch of 32x32 images (the SRD setting is 64 + 64).
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
import torch.nn.functional as F

from osslbench.models import build_model


def images_per_second(name: str, batch: int, amp: bool, channels_last: bool, steps: int) -> float:
    torch.manual_seed(0)
    model = build_model(name, 100)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=fmt).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=fmt)
    y = torch.randint(0, 100, (batch,))
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if amp else contextlib.nullcontext

    def step() -> None:
        with ctx():
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", default="wrn-16-1,wrn-16-2,wrn-40-1,resnet8x4")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    print(f"threads={torch.get_num_threads()} batch={args.batch}")
    print(f"{'model':<12} {'fp32':>8} {'fp32+CL':>8} {'bf16':>8} {'bf16+CL':>8}  (images/s)")
    for name in args.models.split(","):
        figures = [images_per_second(name, args.batch, amp, cl, args.steps)
                   for amp, cl in ((False, False), (False, True), (True, False), (True, True))]
        print(f"{name:<12} " + " ".join(f"{f:8.0f}" for f in figures))


if __name__ == "__main__":
    main()
