"""Estimation throughput and peak memory of trained estimators on resampled DC2 input.

For each size N, an HDF5 input (group ``photometry``) of N rows is made by resampling the
DC2 test file (seeded, written in blocks, so making it needs bounded memory). Each
estimator then runs from that file in a *separate process* with the registry's estimate
configuration and ``chunk_size`` rows per chunk, writing its qp output to disk; the child
reports wall time and its own peak RSS (``ru_maxrss``). Models come from a previous
``benchmarks/accuracy.py`` run (``<models-dir>/<key>_model.pkl``).

    python benchmarks/speed_memory.py --sizes 100000,1000000 --estimators nnc,lstm

Writes ``benchmarks/results/speed_memory.{json,md}`` with machine, date, commit and settings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent

CHILD = r"""
import json, resource, sys, time, os
import torch
torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
from rail.core.data import TableHandle
from rail.deepz.datasets import load_dc2
from rail.evaluation.deepz_registry import get
key, model, infile, outfile, chunk, device = sys.argv[1:7]
spec = get(key)
_, est_cfg = spec.make_configs(load_dc2(n_train=10, n_test=10))
est_cfg.update(hdf5_groupname="photometry", chunk_size=int(chunk), output=outfile, device=device, id_col="id")
est = spec.estimator_class.make_stage(name="bench_" + key, model=model, **est_cfg)
t0 = time.perf_counter()
est.estimate(TableHandle("input", path=infile))
wall = time.perf_counter() - t0
print("RESULT " + json.dumps({"wall_s": wall, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def make_input(n: int, path: Path, seed: int = 0, block: int = 1_000_000) -> None:
    """Resample the DC2 test file to ``n`` rows, written block by block with h5py."""
    import h5py

    from rail.deepz.datasets import load_dc2

    src = load_dc2().test
    cols = [c for c in src if c != "id"]
    m = len(src["redshift"])
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        g = f.create_group("photometry")
        dsets = {c: g.create_dataset(c, shape=(n,), dtype=np.asarray(src[c]).dtype) for c in cols}
        ids = g.create_dataset("id", shape=(n,), dtype=np.int64)
        for start in range(0, n, block):
            stop = min(n, start + block)
            idx = rng.integers(0, m, stop - start)
            for c in cols:
                dsets[c][start:stop] = np.asarray(src[c])[idx]
            ids[start:stop] = np.arange(start, stop)


def machine() -> dict:
    import torch

    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip()
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "commit": commit,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="100000,1000000")
    p.add_argument("--estimators", default="nnc,lstm,embed")
    p.add_argument("--models-dir", default=str(HERE / "out" / "accuracy_dc2"))
    p.add_argument("--chunk-size", type=int, default=100_000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--workdir", default=None, help="where inputs/outputs go (default: a temp dir)")
    p.add_argument("--results", default=str(HERE / "results"))
    args = p.parse_args(argv)
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    keys = args.estimators.split(",")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="deepz_speed_"))
    work.mkdir(parents=True, exist_ok=True)
    runs = []
    for n in sizes:
        infile = work / f"dc2_resampled_{n}.hdf5"
        t0 = time.perf_counter()
        make_input(n, infile)
        print(f"[speed] input of {n:,} rows written in {time.perf_counter() - t0:.1f} s", flush=True)
        for key in keys:
            model = Path(args.models_dir) / f"{key}_model.pkl"
            if not model.exists():
                print(f"[speed] skip {key}: no model at {model}", flush=True)
                continue
            outfile = work / f"{key}_{n}.hdf5"
            env = dict(os.environ, BENCH_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads))
            res = subprocess.run(
                [sys.executable, "-c", CHILD, key, str(model), str(infile), str(outfile), str(args.chunk_size), args.device],
                capture_output=True, text=True, env=env,
            )
            line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
            if res.returncode != 0 or not line:
                print(f"[speed] {key} N={n:,} FAILED:\n{res.stderr[-2000:]}", flush=True)
                continue
            r = json.loads(line[0][7:])
            r.update(estimator=key, rows=n, objects_per_s=n / r["wall_s"],
                     output_mb=outfile.stat().st_size / 2**20 if outfile.exists() else None)
            runs.append(r)
            print(f"[speed] {key:6s} N={n:>10,}  {r['wall_s']:7.1f} s  {r['objects_per_s']:9.0f} obj/s  "
                  f"peak RSS {r['peak_rss_mb']:7.0f} MB  output {r['output_mb']:.0f} MB", flush=True)
            outfile.unlink(missing_ok=True)
        infile.unlink(missing_ok=True)
    info = machine()
    report = {"machine": info, "data": "DC2 test file resampled with replacement (seed 0)",
              "settings": {"chunk_size": args.chunk_size, "torch_threads": args.threads, "device": args.device,
                           "estimate_config": "registry defaults, output written to local disk"},
              "runs": runs}
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed_memory.json").write_text(json.dumps(report, indent=2))
    lines = [f"# Estimation speed and memory ({info['date']}, commit {info['commit'][:8]})", "",
             f"{info['platform']}, {info['cpu_count']} CPUs, torch {info['torch']} ({args.threads} threads), "
             f"device {args.device}; chunk_size {args.chunk_size:,}; input: DC2 test rows resampled; "
             "qp output written to disk.", "",
             "| estimator | rows | wall s | objects/s | peak RSS MB | output MB |", "|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['estimator']} | {r['rows']:,} | {r['wall_s']:.1f} | {r['objects_per_s']:,.0f} | "
                     f"{r['peak_rss_mb']:,.0f} | {r['output_mb']:,.0f} |")
    (out / "speed_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
