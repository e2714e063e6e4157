"""Supervised baseline: the student trained on the labelled set alone (no teacher, no unlabelled data).

Also the method the harness uses to train teachers (RepDistiller's ``train_teacher.py``: cross-entropy,
the protocol's SGD schedule).
"""

from __future__ import annotations

from torch import Tensor

from osslbench.method import Batch, Method, cross_entropy


class Supervised(Method):
    name = "supervised"
    description = "Labelled images only, cross-entropy (the student-alone reference)"

    def losses(self, batch: Batch) -> dict[str, Tensor]:
        return {"ce": cross_entropy(self.student(batch.x_lb), batch.y_lb)}
