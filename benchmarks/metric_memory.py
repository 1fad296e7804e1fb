"""Memory of the metric pass itself, by Python's allocation tracer: does it grow with the objects?

For each representation and size, writes a synthetic qp file (``speed_memory.write_synthetic_qp``,
seed 0) and its truth, then runs :func:`rail.evaluation.deepz_metrics.accumulate_estimate` and
``tidy`` (6 redshift bins) in this process under ``tracemalloc``, once as the pass runs
(bounded summaries) and once with ``per_object=True`` (the per-object arrays the pass kept
before issue 20's memory work). Reported: the traced peak of the pass above what was allocated
before it (the truth array and the file are outside it), in MB. tracemalloc counts numpy's
buffers; unlike peak RSS it does not include what malloc keeps after a free, the imports or the
interpreter, so it shows what grows with N. Writes ``benchmarks/results/metric_memory.md``.

    python benchmarks/metric_memory.py --sizes 1e5,1e6 --kinds interp:301 --load-note "under load"
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
import tracemalloc
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def traced_pass(est: Path, z: np.ndarray, per_object: bool) -> tuple[float, float]:
    """(traced peak MB above the start, seconds) of one metric pass over ``est``."""
    from rail.evaluation import deepz_metrics as dm

    cfg = dm.MetricConfig.for_range(0.0, 3.0)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    t0 = time.perf_counter()
    acc = dm.accumulate_estimate(str(est), z, config=cfg, chunk_size=10_000, z_edges=np.linspace(0, 3, 7),
                                 per_object=per_object)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        acc.tidy("x")
    dt = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    del acc
    return peak / 2**20, dt


def main(argv=None):
    from speed_memory import git_commit, write_synthetic_qp

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1e5,1e6")
    p.add_argument("--kinds", default="interp:301")
    p.add_argument("--load-note", default="quiet")
    p.add_argument("--results", default=str(HERE / "results"))
    args = p.parse_args(argv)
    os.environ.setdefault("DEEPZ_METRIC_WORKERS", "2")
    rows = []
    with tempfile.TemporaryDirectory(prefix="deepz_metric_memory_") as work:
        for kind, size in (k.split(":") for k in args.kinds.split(",")):
            for n in (int(float(s)) for s in args.sizes.split(",")):
                est = Path(work) / f"{kind}_{n}.hdf5"
                z = write_synthetic_qp(kind, int(size), n, est)
                for per_object in (False, True):
                    peak, dt = traced_pass(est, z, per_object)
                    rows.append((f"{kind}:{size}", n, "per-object arrays (as before)" if per_object else "summaries",
                                 peak, dt))
                    print(f"{kind}:{size} N={n:,} per_object={per_object}: traced peak {peak:.1f} MB, {dt:.1f} s",
                          flush=True)
                est.unlink()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M")
    lines = ["# Metric pass memory: tracemalloc peak of `accumulate_estimate` + `tidy`", "",
             "Written by `benchmarks/metric_memory.py` (see its docstring): synthetic qp files (seed 0), "
             "6 redshift bins, chunks of 10,000, 2 metric threads; traced peak above the start of the pass "
             "(numpy buffers included; not RSS).", "",
             f"commit {git_commit()[:12]}, {date} UTC, load: {args.load_note}", "",
             "| representation | objects | state kept | traced peak MB | seconds (traced) |", "|---|---|---|---|---|"]
    lines += [f"| {r} | {n:,} | {how} | {peak:.1f} | {dt:.1f} |" for r, n, how, peak, dt in rows]
    out = Path(args.results) / "metric_memory.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
