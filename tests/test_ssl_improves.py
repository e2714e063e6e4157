"""Semi-supervised methods beat the student trained alone on the default protocol, same seeds and budget.

``digits-openset`` at its default scale: 60 labels, 600 steps, an unlabelled pool of 480 digits; mean top-1
(last epoch) over 5 seeds, torch pinned to 2 threads so the figures do not depend on the machine's thread
count. The labelled set of a seed is the same at every mismatch ratio, so ``supervised`` (which never sees the
pool) has the same figure at r = 0 and r = 0.5.

* At the protocol's mismatch (r = 0.5: half the pool from unseen digits) MixMatch, FixMatch, MTC, OpenMatch,
  T2T, IOMatch and Mean Teacher beat ``supervised``. T2T runs with the protocol's rotation weight 0.1 (see
  ``protocols/digits-openset.toml``: rotation is ill-posed on digits; at the authors' 1 it stays below).
* PseudoLabel (argmax targets, the SRD authors' setting) beats it clearly on a pool of seen digits only
  (r = 0) and falls below it at r = 0.5: confident wrong targets on outliers, the failure Oliver et al. (2018,
  Fig. 2) and the SRD paper report for SSL under class mismatch. Both are asserted.
"""

from __future__ import annotations

import numpy as np
import pytest

from osslbench.protocol_loader import load_protocol
from osslbench.runner import RunOptions, run_grid

pytestmark = pytest.mark.slow

SSL = ["mixmatch", "fixmatch", "mtc", "openmatch", "t2t", "iomatch", "meanteacher"]
SEEDS = [0, 1, 2, 3, 4]


def _mean_top1(root, methods: list[str], overrides: dict) -> dict[str, float]:
    protocol = load_protocol("digits-openset", None, overrides)
    results = run_grid(protocol, methods, SEEDS, RunOptions(data_root=root, out=root, progress=False, threads=2))
    return {m: float(np.mean([r["metrics"]["top1_last"] for r in results if r["method"] == m])) for m in methods}


@pytest.fixture(scope="module")
def top1(tmp_path_factory) -> dict[str, float]:
    return _mean_top1(tmp_path_factory.mktemp("ssl"), ["supervised", *SSL, "pseudolabel"], {})


@pytest.fixture(scope="module")
def top1_no_mismatch(tmp_path_factory) -> dict[str, float]:
    return _mean_top1(tmp_path_factory.mktemp("ssl_r0"), ["supervised", "pseudolabel"], {"split": {"mismatch": 0.0}})


@pytest.mark.parametrize("method", SSL)
def test_beats_supervised(top1, method):
    assert top1[method] > top1["supervised"]


def test_pseudolabel_helps_without_outliers_and_hurts_with_them(top1, top1_no_mismatch):
    assert top1_no_mismatch["supervised"] == top1["supervised"]  # same labelled set, pool unused
    assert top1_no_mismatch["pseudolabel"] > top1["supervised"] + 1.0
    assert top1["pseudolabel"] < top1["supervised"]
