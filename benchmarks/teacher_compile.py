"""``torch.compile`` with Inductor's weight freezing against eager for the frozen teacher's forward pass.

    python benchmarks/teacher_compile.py --model wrn-40-2 --batch 64 --steps 20 [--bf16]

The teacher of a distiller only runs forward, in eval mode, under no_grad, with fixed weights: the case where
Inductor can fold each BatchNorm into its convolution and pre-pack the weights for oneDNN
(``torch._inductor.config.freezing``). The report gives the compile time (the first compiled call), the steady img/s
of each, and the largest logit difference of the compiled teacher and of eager bf16 against eager fp32 on the same
batches, so a reader can judge "exact enough" (issue 12: measure, don't assume).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch
import torch._inductor.config as inductor_config

from osslbench.hardware import cpu_model
from osslbench.models import build_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="wrn-40-2")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (only where the CPU has it natively)")
    args = ap.parse_args()

    torch.manual_seed(0)
    model = build_model(args.model, 100).to(memory_format=torch.channels_last).eval()
    for _ in range(3):  # BatchNorm statistics that are not the identity, as a trained teacher's
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(args.batch, 3, 32, 32, generator=gen).contiguous(memory_format=torch.channels_last)
               for _ in range(args.steps + 1)]
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.bf16 else contextlib.nullcontext
    inductor_config.freezing = True
    compiled = torch.compile(model)
    report: dict = {"model": args.model, "batch": args.batch, "precision": "bf16" if args.bf16 else "fp32",
                    "cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__}
    logits: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        logits["fp32"] = [model(x).float() for x in batches]
        for name, fn in (("eager", model), ("compiled", compiled)):
            with ctx():
                t0 = time.perf_counter()
                first = fn(batches[0]).float()
                report[f"{name}_first_call_s"] = round(time.perf_counter() - t0, 2)
                t0 = time.perf_counter()
                logits[name] = [first] + [fn(x).float() for x in batches[1:]]
                report[f"{name}_img_s"] = round(args.steps * args.batch / (time.perf_counter() - t0), 1)
    report["speedup"] = round(report["compiled_img_s"] / report["eager_img_s"], 2)
    for name in ("eager", "compiled"):
        report[f"max_logit_diff_{name}_vs_fp32"] = max(float((a - b).abs().max())
                                                      for a, b in zip(logits[name], logits["fp32"], strict=True))
    report["max_logit_diff_compiled_vs_eager"] = max(float((a - b).abs().max()) for a, b in
                                                     zip(logits["compiled"], logits["eager"], strict=True))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
