"""First-use and cached load times of data sources (the on-disk decoded cache, osslbench.sources.cache).

For each split: the first load into an empty cache folder (decode the official files, resize, store), then a
load as a fresh process would do it (in-process cache cleared: memory-map the stored arrays), then the same
with every pixel read once (a memory map is lazy; a run gathers its images from it right away). The OS file
cache is warm for the second load, as it is on a machine that ran the first one.

    python benchmarks/load_times.py --data-root ../shared/data [--specs cifar100:train,tinyimagenet:train@32]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from osslbench.sources import cache, cache_clear, load_split

DEFAULT = "cifar100:train,cifar100:test,tinyimagenet:train@32,tinyimagenet:val@32"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default=os.environ.get("OSSLBENCH_DATA", "data"))
    ap.add_argument("--specs", default=DEFAULT, help="comma-separated '<source>:<split>[@size]'")
    args = ap.parse_args()
    print(f"{'split':<24} {'images':>8} {'first use':>10} {'cached':>8} {'cached+read':>12}")
    with tempfile.TemporaryDirectory() as folder:
        os.environ[cache.CACHE_ENV] = folder
        for item in args.specs.split(","):
            spec, _, size = item.partition("@")
            size_arg = int(size) if size else None
            cache_clear()
            t0 = time.perf_counter()
            first = load_split(spec, args.data_root, size_arg)
            t1 = time.perf_counter()
            cache_clear()
            t2 = time.perf_counter()
            again = load_split(spec, args.data_root, size_arg)
            t3 = time.perf_counter()
            again.images.sum(dtype=None)  # touch every page of the memory map
            t4 = time.perf_counter()
            del first
            print(f"{item:<24} {len(again):>8} {t1 - t0:>9.2f}s {t3 - t2:>7.2f}s {t4 - t2:>11.2f}s")


if __name__ == "__main__":
    main()
