"""Evaluation: top-1 / top-5 on the test split and AUROC of the method's OOD score (scikit-learn)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import Tensor

from .method import Method


def topk_accuracy(logits: Tensor, labels: Tensor, k: int) -> float:
    """Percentage of samples whose label is among the ``k`` highest logits."""
    k = min(k, logits.shape[1])
    hits = (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1)
    return 100.0 * hits.float().mean().item()


def auroc(score_in: Tensor, score_out: Tensor) -> float:
    """AUROC (percent) of separating outliers (positives) from test images by an outlier score."""
    y = np.concatenate([np.zeros(len(score_in)), np.ones(len(score_out))])
    s = torch.cat([score_in, score_out]).float().numpy()
    return 100.0 * float(roc_auc_score(y, s))


@torch.no_grad()
def infer(method: Method, images: Tensor, prepare: Callable[[Tensor], Tensor], batch_size: int,
          autocast: Callable[[], object], progress: Callable | None = None) -> tuple[Tensor, Tensor]:
    """Logits and OOD scores of ``method`` on uint8 ``images`` (eval mode restored by the caller)."""
    logits_all, scores_all = [], []
    starts = range(0, len(images), batch_size)
    for start in progress(starts) if progress else starts:
        x = prepare(images[start:start + batch_size])
        with autocast():
            logits, feats = method.predict(x, features=True)  # one backbone pass: the OOD score reads its features
            scores = method.ood_score(x, logits, feats)
        logits_all.append(logits.float().cpu())
        scores_all.append(scores.float().cpu())
    if not logits_all:
        return torch.empty(0, 0), torch.empty(0)
    return torch.cat(logits_all), torch.cat(scores_all)


def evaluate(method: Method, test_x: Tensor, test_y: Tensor, outlier_x: Tensor, prepare: Callable[[Tensor], Tensor],
             batch_size: int, autocast: Callable[[], object], progress: Callable | None = None) -> dict[str, float]:
    """``top1``, ``top5`` and, when there are outlier images, ``auroc`` (all in percent)."""
    was_training = method.training
    method.eval()
    try:
        logits, score_in = infer(method, test_x, prepare, batch_size, autocast, progress)
        out = {"top1": topk_accuracy(logits, test_y, 1), "top5": topk_accuracy(logits, test_y, 5)}
        if len(outlier_x):
            _, score_out = infer(method, outlier_x, prepare, batch_size, autocast, progress)
            out["auroc"] = auroc(score_in, score_out)
    finally:
        method.train(was_training)
    return out
