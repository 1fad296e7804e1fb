"""Accuracy benchmark (issue 2): every estimator and both baselines, same script, same data.

DC2: train on the 10,225-row training file, estimate the 20,449-row validation file (both
shipped with pz-rail-base). SDSS BOSS DR10 (``../shared/data/sdss_boss_dr10``) when present
(BPZ is DC2-only: no SDSS filter curves ship with desc-bpz/RAIL).

Reports, per estimator, through :func:`rail.evaluation.deepz_compare.compare`: sigma_IQR and
outlier rate (RAIL), sigma_NMAD, eta, bias, mean CRPS, PIT KS/CvM/AD, CDE loss, and inform
and estimate wall times. Writes ``benchmarks/results/accuracy_<data>.json`` (machine, date,
git commit, data, settings, metrics, times) and ``accuracy_<data>.md``; the full tidy table,
qp files and plots go to ``benchmarks/out/accuracy_<data>/`` (git-ignored).

    python benchmarks/accuracy.py                       # DC2 (+ BOSS if present), all estimators
    python benchmarks/accuracy.py --data dc2 --estimators nnc,flexzboost,bpz
    python benchmarks/accuracy.py --quick               # smoke run (quick configs, 2k/2k objects)
    python benchmarks/accuracy.py --ensembles           # DC2: singles, deep ensembles, stack, baselines
    python benchmarks/accuracy.py --ensembles --data boss   # the same on SDSS BOSS (no BPZ: no SDSS filter curves)

``--ensembles`` (issue 18) runs :mod:`stack` instead: every estimator is trained on the same 80%
of the DC2 training file (the singles, the deep ensembles ``<method>_x3`` and FlexZBoost; BPZ
is not trained), the stack (``DeepzStackInformer``) is fitted on the other 20% from the
ensembles' and FlexZBoost's PDFs, and every row is scored on the test file; results in
``benchmarks/results/accuracy_dc2_ensembles.{json,md}`` with the inform and estimate times of
each row. ``--ensembles --refit`` adds the refit step of stacking (rows ``*_refit``: the stacked
members retrained on all training rows under the stacks fitted on the 80% members).

Timings depend on the machine and on what else runs on it: the JSON records the machine.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPORT_METRICS = ["rail_sigma_iqr", "rail_outlier_rate", "sigma_nmad", "sigma_nmad_nomedian", "eta", "bias_median",
                  "crps", "pit_ks", "pit_cvm", "pit_ad", "cde_loss", "pco", "inform_time_s", "estimate_time_s"]


def machine_info() -> dict:
    import torch

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", ""),
    }
    return info


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE.parent, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=HERE.parent, capture_output=True,
                               text=True).stdout.strip()
        return out + ("+dirty" if dirty else "")
    except Exception:  # pragma: no cover
        return "unknown"


def run(data: str, estimators: str, quick: bool, device: str | None, out_root: Path, results: Path) -> dict:
    from rail.evaluation.deepz_compare import compare, format_table, overall_table

    outdir = out_root / f"accuracy_{data}{'_quick' if quick else ''}"
    when = _dt.datetime.now().isoformat(timespec="seconds")
    mach = machine_info()
    print(f"[accuracy] {data} on {mach['platform']}, {mach['cpu_count']} CPUs, torch threads "
          f"{mach['torch_threads']}, device {mach['device_name']}, {when}", flush=True)
    res = compare(data=data, estimators=estimators, outdir=outdir, quick=quick, device=device)
    wide = overall_table(res.table, REPORT_METRICS)
    metrics = {est: {k: (None if v != v else float(v)) for k, v in row.items()} for est, row in wide.iterrows()}
    report = {
        "benchmark": "accuracy",
        "date": when,
        "git_commit": git_commit(),
        "machine": mach,
        "data": data,
        "n_train": next(iter(res.timings.values()))["n_train"] if res.timings else None,
        "n_test": next(iter(res.timings.values()))["n_test"] if res.timings else None,
        "settings": {"quick": quick, "estimators": estimators, "point_estimate": "zmode", "device": device},
        "metrics": metrics,
        "tidy_table": str(res.files.get("metrics_csv")),
    }
    results.mkdir(parents=True, exist_ok=True)
    stem = f"accuracy_{data}{'_quick' if quick else ''}"
    (results / f"{stem}.json").write_text(json.dumps(report, indent=2))
    md = [
        f"# Accuracy benchmark: {data}",
        "",
        f"{when}, commit {report['git_commit']}; {mach['platform']}, {mach['cpu_count']} CPUs, "
        f"torch {mach['torch']} ({mach['torch_threads']} threads), device {mach['device_name']}.",
        f"Train {report['n_train']} / test {report['n_test']} objects; point estimate zmode; "
        f"{'QUICK settings (not representative)' if quick else 'registry default settings'}.",
        "Times are wall-clock seconds on this machine (shared machines make them noisy).",
        "",
        format_table(res.table, "markdown", REPORT_METRICS),
        "",
    ]
    (results / f"{stem}.md").write_text("\n".join(md))
    print(f"[accuracy] wrote {results / (stem + '.json')} and .md", flush=True)
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="dc2,boss", help="comma list: dc2, boss (boss skipped when absent)")
    p.add_argument("--estimators", default="all", help="comma list of registry keys or 'all'")
    p.add_argument("--quick", action="store_true", help="quick configs on 2,000/2,000 objects (smoke run)")
    p.add_argument("--device", default=None, help="cpu / cuda / auto")
    p.add_argument("--out", default=str(HERE / "out"), help="folder for qp files, tidy tables, plots")
    p.add_argument("--results", default=str(HERE / "results"), help="folder for the JSON/markdown reports")
    p.add_argument("--ensembles", action="store_true", help="DC2 singles, deep ensembles (x3), the stack of the "
                   "ensembles and FlexZBoost, FlexZBoost and BPZ on one 80/20 split (benchmarks/stack.py)")
    p.add_argument("--load-note", default="", help="--ensembles: what else ran on the machine (recorded)")
    p.add_argument("--members", type=int, default=3, help="--ensembles: members per ensemble (3 or 5: registry keys)")
    p.add_argument("--reuse", action="store_true", help="--ensembles: reuse the rows of an earlier run whose "
                   "recorded provenance matches the current code, configuration and split (stack.py --reuse)")
    p.add_argument("--extra", default="", help="--ensembles: comma list of further registry keys to train and "
                   "score on the same split (not stacked), e.g. embed_x3_widthcal,lstm_x5")
    p.add_argument("--variants", default="stack_crps,stack_logscore", help="--ensembles: stack variants "
                   "(stack.py --variants)")
    p.add_argument("--refit", action="store_true", help="--ensembles: also the stacked members retrained on all "
                   "training rows, the stacks fitted on the 80%% members applied to them (stack.py --refit)")
    a = p.parse_args(argv)
    if a.ensembles:
        sys.path.insert(0, str(HERE))
        import stack

        ens = [f"{m}_x{a.members}" for m in ("nnc", "lstm", "embed")]
        data = "dc2" if a.data == p.get_default("data") else a.data
        if data not in ("dc2", "boss"):
            p.error(f"--ensembles runs one data set, dc2 or boss; got --data {a.data!r}")
        bpz = ["bpz"] if data == "dc2" else []  # no SDSS filter curves ship with RAIL
        extra = [k.strip() for k in a.extra.split(",") if k.strip()]
        return stack.main(["--data", data, "--estimators",
                           ",".join(["nnc", "lstm", "embed", *ens, "flexzboost", *bpz, *extra]),
                           "--stack-inputs", ",".join([*ens, "flexzboost"]), "--variants", a.variants,
                           "--stem", f"accuracy_{data}_ensembles", "--results", a.results]
                          + (["--load-note", a.load_note] if a.load_note else [])
                          + (["--reuse"] if a.reuse else [])
                          + (["--refit"] if a.refit else [])
                          + (["--quick"] if a.quick else []))
    for data in [d.strip() for d in a.data.split(",") if d.strip()]:
        if data == "boss":
            from rail.deepz.datasets import require_shared

            try:
                require_shared("sdss_boss_dr10")
            except FileNotFoundError as err:
                print(f"[accuracy] skipping boss: {err}")
                continue
        run(data, a.estimators, a.quick, a.device, Path(a.out), Path(a.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
