"""Semi-supervised methods beat the student trained alone on the default protocol, same seeds and budget.

``digits-openset`` at its default scale: 60 labels, an unlabelled pool half from unseen digits, 600 steps;
mean top-1 (last epoch) over 3 seeds, torch pinned to 2 threads so the figures do not depend on the machine's
thread count. Measured: supervised 94.38; MixMatch 95.50, MTC 95.30, OpenMatch 95.19, FixMatch 95.09,
IOMatch 94.99. Not asserted, because they do not clearly win at this budget (half the pool are outliers, the
open-set failure the SRD paper reports for SSL): Mean Teacher 94.68, T2T 94.07, PseudoLabel 92.64.
"""

from __future__ import annotations

import numpy as np
import pytest

from osslbench.protocol import load_protocol
from osslbench.runner import RunOptions, run_grid

pytestmark = pytest.mark.slow

SSL = ["mixmatch", "fixmatch", "mtc", "openmatch", "iomatch"]
SEEDS = [0, 1, 2]


@pytest.fixture(scope="module")
def top1(tmp_path_factory) -> dict[str, float]:
    root = tmp_path_factory.mktemp("ssl")
    protocol = load_protocol("digits-openset", None, {})
    results = run_grid(protocol, ["supervised", *SSL], SEEDS, RunOptions(data_root=root, out=root, progress=False,
                                                                            threads=2))
    return {m: float(np.mean([r["metrics"]["top1_last"] for r in results if r["method"] == m]))
            for m in ["supervised", *SSL]}


@pytest.mark.parametrize("method", SSL)
def test_beats_supervised(top1, method):
    assert top1[method] > top1["supervised"]
