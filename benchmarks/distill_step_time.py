"""Time of one training step of each distiller against SRD's (WRN-16-2 -> WRN-16-1, batch 64 + 64, 32x32).

One step = the method's ``losses`` (one student pass over labelled + unlabelled images, the no-grad teacher pass,
the terms) + backward + SGD update; timed in ``--steps`` interleaved rounds (every method once
per round, so a drifting machine load hits all alike) after two warm-up steps; the ratio to SRD is the median of
the ratios within a round. Two-stage methods (AB,
FT, FSP) are timed in their distillation stage and, on a second line, in their init stage.

    python benchmarks/distill_step_time.py [--device cpu|cuda] [--steps 10] [--methods srd,kd,at,...]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from osslbench.method import Batch
from osslbench.models import build_model
from osslbench.registry import get_method, methods

FEATURE = ["fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "ab", "ft", "fsp", "nst"]


def make_step(name: str, device: torch.device, init: bool = False) -> Callable[[], None]:
    """One training step of ``name`` on a fixed 64 + 64 batch (init stage with ``init``)."""
    cls = get_method(name)
    torch.manual_seed(0)
    student, teacher = build_model("wrn-16-1", 100), build_model("wrn-16-2", 100)
    m = cls(cls.Config(), student, teacher, num_classes=100, image_size=32).to(device).train()
    teacher.to(device)
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.05, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(0)
    x_lb, x_ulb = torch.randn(64, 3, 32, 32, generator=g).to(device), torch.randn(64, 3, 32, 32, generator=g).to(device)
    b = Batch(x_lb, torch.randint(0, 100, (64,), generator=g).to(device), [x_ulb], torch.arange(64), 0, 0, 1, 2,
              init_epochs=1 if init else 0)

    def step() -> None:
        loss = sum(m.losses(b).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step


def seconds(step: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--methods", default=",".join(["srd", "kd", *FEATURE]))
    args = ap.parse_args()
    device = torch.device(args.device)
    names = ["srd", *(n for n in args.methods.split(",") if n in methods() and n != "srd")]
    runs = {n: make_step(n, device) for n in names}
    runs.update({f"{n} init": make_step(n, device, init=True) for n in names
                 if getattr(get_method(n).Config(), "init_epochs", 0)})
    for step in runs.values():  # warm-up
        step()
        step()
    # interleaved rounds: on a shared machine the load drifts; a ratio is taken within one round
    times: dict[str, list[float]] = {k: [] for k in runs}
    ratios: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.steps):
        srd = seconds(runs["srd"])
        times["srd"].append(srd)
        for k, step in runs.items():
            if k != "srd":
                t = seconds(step)
                times[k].append(t)
                ratios[k].append(t / srd)
    print(f"device={device} threads={torch.get_num_threads()} rounds={args.steps} (median s/step; median ratio to srd "
          "within a round)")
    print(f"{'srd':<10} {statistics.median(times['srd']):8.4f}  1.00x")
    for k in runs:
        if k != "srd":
            print(f"{k:<10} {statistics.median(times[k]):8.4f}  {statistics.median(ratios[k]):4.2f}x")


if __name__ == "__main__":
    main()
