"""The same grid inline, in parallel processes (joblib) and on a Dask cluster gives the same results."""

from __future__ import annotations

import pytest

from osslbench.config import parse_overrides
from osslbench.protocol_loader import load_protocol
from osslbench.runner import RunOptions, run_grid

pytestmark = pytest.mark.slow


def figures(results: list[dict]) -> dict:
    return {(r["method"], r["seed"]): (r["metrics"]["top1_last"], r["metrics"]["auroc_last"]) for r in results}


def test_joblib_and_dask_match_inline(tmp_path):
    """One torch thread per run everywhere, so float reductions run in the same order: figures equal exactly.
    The Dask workers are processes, one run at a time each, as osslbench asks of a cluster (README)."""
    protocol = load_protocol("digits-openset", "smoke", parse_overrides(["train.amp=false"]))
    methods, seeds = ["supervised", "kd", "mixmatch"], [0, 1]
    opts = {"data_root": tmp_path, "progress": False, "threads": 1}
    inline = run_grid(protocol, methods, seeds, RunOptions(out=tmp_path / "a", **opts))
    parallel = run_grid(protocol, methods, seeds, RunOptions(out=tmp_path / "b", jobs=2, **opts))
    assert figures(parallel) == figures(inline)
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        on_cluster = run_grid(protocol, methods, seeds, RunOptions(out=tmp_path / "c", cluster=cluster.scheduler_address,
                                                                   **opts))
    assert figures(on_cluster) == figures(inline)
