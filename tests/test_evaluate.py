"""Evaluation: one backbone pass per image for every method, OOD heads included."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from osslbench.config import parse_overrides
from osslbench.evaluate import evaluate
from osslbench.models import build_model
from osslbench.protocol_loader import load_protocol
from osslbench.registry import get_method, method_config, methods

OOD_HEADS = {"openmatch", "mtc", "t2t", "iomatch"}


def stem_images(model: nn.Module, channels: int) -> list[int]:
    """Counts the images entering every backbone: a backbone pass goes once through its stem, the only
    convolution that reads the raw image channels (heads and connectors read features)."""
    seen: list[int] = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == channels:
            module.register_forward_pre_hook(lambda m, args: seen.append(int(args[0].shape[0])))
    return seen


@pytest.mark.parametrize("name", sorted(methods()))
def test_evaluation_runs_the_backbone_once_per_image(name):
    assert OOD_HEADS <= set(methods())  # the methods whose OOD head used to cost a second pass are all here
    protocol = load_protocol("digits-openset", None, parse_overrides([]))
    cls = get_method(name)
    cfg, _ = method_config(cls, protocol)
    torch.manual_seed(0)
    teacher = build_model(protocol.models.teacher, 6, 1) if cls.needs_teacher else None
    method = cls(cfg, build_model(protocol.models.student, 6, 1), teacher, num_classes=6, pool_size=20)
    seen = stem_images(method, channels=1)
    if teacher is not None:
        teacher_seen = stem_images(teacher, channels=1)
    g = torch.Generator().manual_seed(1)
    test_x = torch.randint(0, 256, (7, 1, 8, 8), dtype=torch.uint8, generator=g)
    outlier_x = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8, generator=g)
    out = evaluate(method, test_x, torch.arange(7) % 6, outlier_x, lambda x: x.float() / 255, 4,
                   contextlib.nullcontext)
    assert set(out) == {"top1", "top5", "auroc"}
    assert seen == [4, 3, 4, 1], name  # 7 test images in batches of 4, then 5 outliers: each image once
    if teacher is not None:
        assert teacher_seen == []  # the teacher is never evaluated
