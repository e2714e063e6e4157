"""``torch.compile`` against eager for one training step of a student: compile time, img/s and exactness.

    python benchmarks/compile_speed.py --model wrn-40-1 --batch 128 --steps 10 [--bf16]

One step = forward + cross-entropy + backward + SGD update on a batch of 32 x 32 images (SRD's 64 + 64), in
channels-last. Both copies start from the same weights and see the same batches; the report gives the compile
time (the first compiled step), the steady img/s of each, and the largest difference between the two copies'
losses and weights after the timed steps, so a reader can judge "exact enough" (issue 12: measure, don't assume).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import time

import torch
import torch.nn.functional as F

from osslbench.hardware import cpu_model
from osslbench.models import build_model


def make_step(model: torch.nn.Module, bf16: bool):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        with ctx():
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="wrn-40-1")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (only where the CPU has it natively)")
    args = ap.parse_args()

    torch.manual_seed(0)
    eager = build_model(args.model, 100).to(memory_format=torch.channels_last).train()
    compiled = copy.deepcopy(eager)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(args.batch, 3, 32, 32, generator=gen).contiguous(memory_format=torch.channels_last),
                torch.randint(0, 100, (args.batch,), generator=gen)) for _ in range(args.steps + 1)]
    steps = {"eager": make_step(eager, args.bf16), "compiled": make_step(torch.compile(compiled), args.bf16)}
    report: dict = {"model": args.model, "batch": args.batch, "precision": "bf16" if args.bf16 else "fp32",
                    "cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__}
    losses: dict[str, list[float]] = {}
    for name, step in steps.items():
        t0 = time.perf_counter()
        first = step(*batches[0])  # the compiled copy compiles here
        report[f"{name}_first_step_s"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        losses[name] = [first] + [step(x, y) for x, y in batches[1:]]
        report[f"{name}_img_s"] = round(args.steps * args.batch / (time.perf_counter() - t0), 1)
    report["speedup"] = round(report["compiled_img_s"] / report["eager_img_s"], 2)
    report["max_loss_diff"] = max(abs(a - b) for a, b in zip(losses["eager"], losses["compiled"], strict=True))
    report["max_weight_diff"] = max(float((a - b).abs().max()) for a, b in
                                    zip(eager.state_dict().values(), compiled.state_dict().values(), strict=True)
                                    if a.is_floating_point())
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
