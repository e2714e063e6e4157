"""The same grid inline, in parallel processes (joblib) and on a Dask cluster gives the same results."""

from __future__ import annotations

import pytest

from osslbench.config import parse_overrides
from osslbench.protocol import load_protocol
from osslbench.runner import RunOptions, run_grid

pytestmark = pytest.mark.slow


def figures(results: list[dict]) -> dict:
    return {(r["method"], r["seed"]): (r["metrics"]["top1_last"], r["metrics"]["auroc_last"]) for r in results}


def same(a: dict, b: dict) -> bool:
    """Equal up to float reduction order: workers use fewer threads than the inline run."""
    return a.keys() == b.keys() and all(x == pytest.approx(y, abs=0.5) for k in a for x, y in zip(a[k], b[k], strict=True))


def test_joblib_and_dask_match_inline(tmp_path):
    protocol = load_protocol("digits-openset", "smoke", parse_overrides(["train.amp=false"]))
    methods, seeds = ["supervised", "kd"], [0, 1]
    inline = run_grid(protocol, methods, seeds, RunOptions(data_root=tmp_path, out=tmp_path / "a", progress=False))
    parallel = run_grid(protocol, methods, seeds, RunOptions(data_root=tmp_path, out=tmp_path / "b", jobs=2,
                                                             progress=False))
    assert same(figures(parallel), figures(inline))
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster:
        on_cluster = run_grid(protocol, methods, seeds, RunOptions(data_root=tmp_path, out=tmp_path / "c",
                                                                   cluster=cluster.scheduler_address, progress=False))
    assert same(figures(on_cluster), figures(inline))
