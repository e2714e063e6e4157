"""``torch.compile`` against eager: compile time, img/s and exactness, for a student's training step or (``--frozen``)
a frozen teacher's forward pass.

    python benchmarks/compile_speed.py --model wrn-40-1 --batch 128 --steps 10 [--bf16]
    python benchmarks/compile_speed.py --frozen --model wrn-40-2 --batch 64 --steps 20 [--bf16]

Training step = forward + cross-entropy + backward + SGD update on a batch of 32 x 32 images (SRD's 64 + 64), in
channels-last; both copies start from the same weights and see the same batches, and the report gives the largest
difference between their losses and weights after the timed steps. ``--frozen``: the model in eval mode under
no_grad with fixed weights, the case where Inductor can fold each BatchNorm into its convolution and pre-pack the
weights for oneDNN (``torch._inductor.config.freezing``); the report gives the largest logit difference of the
compiled model and of eager (bf16 with ``--bf16``) against eager fp32 on the same batches. Both report the compile
time (the first compiled call) and the steady img/s of each, so a reader can judge "faster and exact enough"
(issue 12: measure, don't assume).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import time

import torch
import torch._inductor.config as inductor_config
import torch.nn.functional as F

from osslbench.hardware import cpu_model
from osslbench.models import build_model


def autocast(bf16: bool):
    return (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext


def make_step(model: torch.nn.Module, bf16: bool):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ctx = autocast(bf16)

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        with ctx():
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def timed(report: dict, name: str, fn, inputs: list, steps: int, batch: int) -> list:
    """Outputs of ``fn`` on every input; records the first call's time and the steady img/s of the others."""
    t0 = time.perf_counter()
    first = fn(*inputs[0])  # a compiled function compiles here
    report[f"{name}_first_call_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    outs = [first] + [fn(*x) for x in inputs[1:]]
    report[f"{name}_img_s"] = round(steps * batch / (time.perf_counter() - t0), 1)
    return outs


def train_step(args: argparse.Namespace, report: dict) -> None:
    torch.manual_seed(0)
    eager = build_model(args.model, 100).to(memory_format=torch.channels_last).train()
    compiled = copy.deepcopy(eager)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(args.batch, 3, 32, 32, generator=gen).contiguous(memory_format=torch.channels_last),
                torch.randint(0, 100, (args.batch,), generator=gen)) for _ in range(args.steps + 1)]
    losses = {name: timed(report, name, make_step(model, args.bf16), batches, args.steps, args.batch)
              for name, model in (("eager", eager), ("compiled", torch.compile(compiled)))}
    report["max_loss_diff"] = max(abs(a - b) for a, b in zip(losses["eager"], losses["compiled"], strict=True))
    report["max_weight_diff"] = max(float((a - b).abs().max()) for a, b in
                                    zip(eager.state_dict().values(), compiled.state_dict().values(), strict=True)
                                    if a.is_floating_point())


def frozen_forward(args: argparse.Namespace, report: dict) -> None:
    torch.manual_seed(0)
    model = build_model(args.model, 100).to(memory_format=torch.channels_last).eval()
    with torch.no_grad():  # BatchNorm statistics that are not the identity, as a trained teacher's
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(args.batch, 3, 32, 32, generator=gen).contiguous(memory_format=torch.channels_last),)
               for _ in range(args.steps + 1)]
    inductor_config.freezing = True
    ctx = autocast(args.bf16)

    def forward(fn):
        def run(x: torch.Tensor) -> torch.Tensor:
            with ctx():
                return fn(x).float()
        return run

    with torch.no_grad():
        logits = {"fp32": [model(*x) for x in batches]}
        for name, fn in (("eager", model), ("compiled", torch.compile(model))):
            logits[name] = timed(report, name, forward(fn), batches, args.steps, args.batch)
    for a, b in (("eager", "fp32"), ("compiled", "fp32"), ("compiled", "eager")):
        report[f"max_logit_diff_{a}_vs_{b}"] = max(float((x - y).abs().max())
                                                   for x, y in zip(logits[a], logits[b], strict=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="wrn-40-1")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (only where the CPU has it natively)")
    ap.add_argument("--frozen", action="store_true", help="a frozen teacher's forward pass instead of a training step")
    args = ap.parse_args()
    report: dict = {"model": args.model, "batch": args.batch, "precision": "bf16" if args.bf16 else "fp32",
                    "what": "frozen forward" if args.frozen else "training step", "cpu": cpu_model(),
                    "threads": torch.get_num_threads(), "torch": torch.__version__}
    (frozen_forward if args.frozen else train_step)(args, report)
    report["speedup"] = round(report["compiled_img_s"] / report["eager_img_s"], 2)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
