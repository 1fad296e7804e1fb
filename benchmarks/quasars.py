"""LSTM-MDN on real quasars (issue 18): the LSTM-MDNz paper's setting, next to FlexZBoost, NNC and the embedding MDN.

Data: the ``qso`` preset of :mod:`rail.deepz.datasets` (``../shared/data/sdss_qso_stamps/TrainingDatasets.csv``:
SDSS ugriz magnitudes and errors of spectroscopic quasars, z 2.75-7.04; one row per photometric
object, 4,379 objects), a seeded random 70/30 train/test split per ``--seeds``; grid [2.5, 7.5].
Every estimator is trained and scored by :func:`rail.evaluation.deepz_compare.compare` with the
registry's default settings (as ``accuracy.py``): sigma_IQR and outlier rate (RAIL), eta, PIT KS,
CRPS, CDE loss, inform / estimate times, point estimate zmode (RAIL's convention).

The paper's own metrics (LSTM-MDNz, Luo et al.; section 4.1) are scored on the same files with its
point estimate, the PDF mean (zmean): sigma_NMAD = 1.48 median(|dz|) (eq. 13, no median subtracted),
f_out = fraction with |dz| > 0.15 (eq. 12), bias = median(dz) (eq. 14), MSE and MAE of z_phot - z_spec
(eqs. 10-11, not divided by 1 + z) and the mean CRPS (eq. 15), with dz = (z_phot - z_spec) / (1 + z_spec).
The paper's numbers (550k quasars, 0 <= z <= 5, 14 bands; its SDSS-only optical rows use 8 bands)
are not comparable one to one: this catalogue is 5 SDSS bands at z >= 2.75.

    python benchmarks/quasars.py                     # -> benchmarks/results/quasars_lstm.{json,md}
    python benchmarks/quasars.py --seeds 0,1,2 --estimators lstm,flexzboost
    python benchmarks/quasars.py --quick             # smoke run (quick configs)

Without the data the script says so and exits with status 1.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from accuracy import git_commit, machine_info  # noqa: E402

ESTIMATORS = "lstm,flexzboost,nnc,embed"
HARNESS = ["rail_sigma_iqr", "rail_outlier_rate", "sigma_nmad", "eta", "bias_median", "crps", "pit_ks", "cde_loss",
           "pco", "inform_time_s", "estimate_time_s"]
PAPER = ["sigma_nmad_nomedian", "eta", "bias_median", "mse", "mae", "crps"]


def paper_metrics(per_object: dict) -> dict:
    """MSE and MAE (LSTM-MDNz eqs. 10-11) of the point estimates in ``per_object`` (zphot, ztrue)."""
    d = np.asarray(per_object["zphot"], dtype=np.float64) - np.asarray(per_object["ztrue"], dtype=np.float64)
    return {"mse": float(np.mean(d * d)), "mae": float(np.mean(np.abs(d)))}


def _rows(table, metrics) -> dict:
    from rail.evaluation.deepz_compare import overall_table

    wide = overall_table(table, metrics)
    return {est: {k: (None if v != v else float(v)) for k, v in row.items()} for est, row in wide.iterrows()}


def run_seed(seed: int, estimators: str, quick: bool, out_root: Path) -> dict:
    from rail.deepz import datasets
    from rail.evaluation.deepz_compare import compare

    ds = datasets.load_qso(seed=seed)
    outdir = out_root / f"quasars_seed{seed}{'_quick' if quick else ''}"
    res = compare(data=ds, estimators=estimators, outdir=outdir, quick=quick, point_estimate="zmode",
                  print_table=False)
    harness = _rows(res.table, HARNESS)
    # the paper's convention: the PDF mean as point estimate, on the same qp files
    paper_res = compare(estimates=dict(res.estimates), truth=ds.test, redshift_col=ds.redshift_col, mag_col=ds.ref_band,
                        zmin=ds.zmin, zmax=ds.zmax, id_col=ds.extra.get("id_col"), point_estimate="zmean",
                        outdir=outdir / "zmean", plots=False, print_table=False, progress=False,
                        per_object=True)
    paper = _rows(paper_res.table, PAPER)
    for est, po in paper_res.per_object.items():
        paper.setdefault(est, {}).update(paper_metrics(po))
    return {"seed": seed, "n_train": len(ds.train[ds.redshift_col]), "n_test": len(ds.test[ds.redshift_col]),
            "harness_zmode": harness, "paper_zmean": paper}


def _mean_sd(runs, part, est, key):
    vals = [r[part].get(est, {}).get(key) for r in runs]
    vals = [v for v in vals if v is not None]
    if not vals:
        return None, None
    return float(np.mean(vals)), (float(np.std(vals, ddof=1)) if len(vals) > 1 else None)


def _fmt(m, s):
    if m is None:
        return ""
    return f"{m:.4g}" + (f" ± {s:.2g}" if s is not None else "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--estimators", default=ESTIMATORS, help="comma list of registry keys")
    p.add_argument("--seeds", default="0", help="comma list of train/test split seeds (the stages' own seed is "
                   "their default)")
    p.add_argument("--quick", action="store_true", help="quick configs (smoke run, not representative)")
    p.add_argument("--out", default=str(HERE / "out"))
    p.add_argument("--results", default=str(HERE / "results"))
    a = p.parse_args(argv)
    from rail.deepz.datasets import require_shared

    try:
        require_shared("sdss_qso_stamps")
    except FileNotFoundError as err:
        print(f"[quasars] cannot run: {err} (this benchmark needs sdss_qso_stamps/TrainingDatasets.csv)")
        return 1
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    when = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    mach = machine_info()
    runs = [run_seed(s, a.estimators, a.quick, Path(a.out)) for s in seeds]
    report = {
        "benchmark": "quasars", "date": when, "git_commit": git_commit(), "machine": mach,
        "load": "shared 2-core machine, other helpers' jobs running (under load): times are indicative",
        "data": "qso preset: sdss_qso_stamps/TrainingDatasets.csv, one row per objID, 70/30 random split",
        "quick": a.quick, "estimators": a.estimators, "seeds": seeds,
        "command": "python benchmarks/quasars.py" + (f" --seeds {a.seeds}" if a.seeds != "0" else "")
        + (f" --estimators {a.estimators}" if a.estimators != ESTIMATORS else ""), "runs": runs, "notes": [],
    }
    write_report(report, Path(a.results))
    return 0


def write_report(report: dict, results: Path) -> None:
    """``quasars_lstm[_quick].{json,md}`` from a report (also to re-render a merged one)."""
    runs, seeds, mach = report["runs"], report["seeds"], report["machine"]
    ests = list(runs[0]["harness_zmode"])
    stem = f"quasars_lstm{'_quick' if report['quick'] else ''}"
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{stem}.json").write_text(json.dumps(report, indent=2))
    spread = " (mean ± sd over split seeds)" if len(seeds) > 1 else ""
    md = ["# Quasars (SDSS ugriz, z 2.75-7.0): LSTM-MDN beside FlexZBoost, NNC, embedding MDN", "",
          f"{report['date']}, commit {report['git_commit']}; {mach['platform']}, {mach['cpu_count']} CPUs, torch "
          f"{mach['torch']} ({mach['torch_threads']} thread), {report['load']}.",
          f"Data: {report['data']}; train {runs[0]['n_train']} / test {runs[0]['n_test']} objects; split seeds {seeds}; "
          f"{'QUICK settings (not representative)' if report['quick'] else 'registry default settings'}. "
          f"Produced by `{report['command']}`.", *[f"Note: {n}" for n in report.get("notes", [])],
          "", f"## Harness metrics, point estimate zmode{spread}", "",
          "| estimator | " + " | ".join(HARNESS) + " |", "|---" * (len(HARNESS) + 1) + "|"]
    for est in ests:
        md.append(f"| {est} | " + " | ".join(_fmt(*_mean_sd(runs, "harness_zmode", est, k)) for k in HARNESS) + " |")
    md += ["", f"## The LSTM-MDNz paper's metrics, point estimate zmean (the paper's){spread}", "",
           "sigma_nmad_nomedian = 1.48 median(|dz|) (eq. 13), eta = f_out (|dz| > 0.15, eq. 12), bias_median (eq. 14), "
           "MSE / MAE of z_phot - z_spec (eqs. 10-11), mean CRPS (eq. 15).", "",
           "| estimator | " + " | ".join(PAPER) + " |", "|---" * (len(PAPER) + 1) + "|"]
    for est in ests:
        md.append(f"| {est} | " + " | ".join(_fmt(*_mean_sd(runs, "paper_zmean", est, k)) for k in PAPER) + " |")
    md += ["", "For scale, the paper (550k quasars at 0 <= z <= 5): 14 bands sigma_NMAD 0.037, f_out 3.4%, CRPS 0.078; "
           "8 optical bands (SDSS + DESI-LS) sigma_NMAD 0.068, f_out 20.6%, CRPS 0.166 (Table 2). Not the same sample "
           "or bands (here 5 SDSS bands, z >= 2.75).", ""]
    (results / f"{stem}.md").write_text("\n".join(md))
    print("\n".join(md), flush=True)


if __name__ == "__main__":
    sys.exit(main())
