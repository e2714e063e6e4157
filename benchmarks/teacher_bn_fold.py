"""Folding the frozen teacher's BatchNorm into the preceding convolutions: speed and logit difference.

    python benchmarks/teacher_bn_fold.py --model wrn-40-2 --batch 64

A BN that directly follows a convolution (eval mode: a per-channel affine map) is folded into that convolution's
weights and bias (``torch.nn.utils.fusion.fuse_conv_bn_eval``); pairs are found by tracing the network with
``torch.fx``. In a pre-activation WRN only ``conv1 -> bn2`` of every block qualifies (the other BNs follow a
residual sum). Reports the eval-mode forward img/s with and without folding and the largest logit difference on
random inputs (BN statistics randomised so that the fold is not the identity).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from osslbench.models import build_model


def fold_bn(model: nn.Module) -> tuple[nn.Module, int]:
    """A copy of the eval-mode ``model`` with every conv -> BN pair folded; the number of pairs folded."""
    model = copy.deepcopy(model).eval()
    graph = fx.symbolic_trace(model, concrete_args={"features": False}).graph
    modules = dict(model.named_modules())
    folded = 0
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], nn.BatchNorm2d):
            continue
        src = node.args[0]
        if not (isinstance(src, fx.Node) and src.op == "call_module" and isinstance(modules[src.target], nn.Conv2d)
                and len(src.users) == 1):
            continue
        conv_parent, _, conv_name = src.target.rpartition(".")
        bn_parent, _, bn_name = node.target.rpartition(".")
        setattr(modules[conv_parent] if conv_parent else model, conv_name,
                fuse_conv_bn_eval(modules[src.target], modules[node.target]))
        setattr(modules[bn_parent] if bn_parent else model, bn_name, nn.Identity())
        folded += 1
    return model, folded


def img_per_s(model: nn.Module, x: torch.Tensor, reps: int) -> float:
    with torch.no_grad():
        model(x)
        t0 = time.perf_counter()
        for _ in range(reps):
            model(x)
    return reps * len(x) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="wrn-40-2")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    torch.manual_seed(0)
    net = build_model(args.model, 100).eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
    fused, n = fold_bn(net)
    x = torch.randn(args.batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    net, fused = net.to(memory_format=torch.channels_last), fused.to(memory_format=torch.channels_last)
    with torch.no_grad():
        a, b = net(x), fused(x)
    diff = float((a - b).abs().max())
    rel = diff / float(a.abs().max())
    print(f"{args.model}: {n} conv->BN pairs folded; max |logit diff| {diff:.3g} (relative {rel:.2g}); "
          f"argmax agreement {float((a.argmax(1) == b.argmax(1)).float().mean()):.4f}")
    rounds = [(img_per_s(net, x, args.reps), img_per_s(fused, x, args.reps)) for _ in range(3)]  # interleaved
    plain, folded = max(r[0] for r in rounds), max(r[1] for r in rounds)
    print(f"eval forward, batch {args.batch}, {torch.get_num_threads()} threads, fp32 channels-last: "
          f"{plain:.0f} img/s plain, {folded:.0f} img/s folded ({folded / plain:.3f}x)")


if __name__ == "__main__":
    main()
