"""Every semi-supervised method beats the student trained alone on the default protocol, same seed and budget.

``digits-openset`` at its default scale: 60 labels, an unlabelled pool half from unseen digits, 600 steps.
"""

from __future__ import annotations

import pytest

from osslbench.protocol import load_protocol
from osslbench.runner import RunOptions, run_one

pytestmark = pytest.mark.slow

# Measured (seed 0): supervised 94.79; FixMatch, MixMatch 96.01, MTC 95.40, OpenMatch and IOMatch beat it.
# PseudoLabel 93.87, Mean Teacher 94.48 and T2T 94.79 do not at this budget (half the pool are outliers: the
# open-set failure the SRD paper reports for SSL); strict, so the day they do, this file has to change.
_DO_NOT_YET = pytest.mark.xfail(strict=True, reason="does not beat supervised on digits-openset at 600 steps")
SSL = ["mixmatch", "fixmatch", "mtc", "openmatch", "iomatch",
       *(pytest.param(m, marks=_DO_NOT_YET) for m in ("pseudolabel", "meanteacher", "t2t"))]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ssl")
    protocol = load_protocol("digits-openset", None, {})
    opts = RunOptions(data_root=root, out=root, progress=False)
    return lambda method: run_one(protocol, method, 0, opts)["metrics"]


@pytest.mark.parametrize("method", SSL)
def test_beats_supervised(runs, method):
    alone = runs("supervised")["top1_last"]
    assert runs(method)["top1_last"] > alone
