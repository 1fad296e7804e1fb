"""Embedding MDN basis benchmark (issue 18): comb-shaped PDFs before / after tying the basis to the range.

The embedding MDN's PDF is a mixture of fixed Gaussians evenly spaced over [zmin, zmax]. The
old default, 200 Gaussians of sigma 0.0037, puts them 4.1 sigma apart on [0, 3] (the paper:
~2.2 sigma on z < 1.6). Variants (all else the registry's default settings, one seed):

* ``embed_200``: the old basis, ``n_components=200``, sigma 0.0037 (``basis_spacing=5`` allows it);
* ``embed_count``: the width kept at 0.0037 and the count derived so that the spacing is at most
  2 sigma (``n_components=0``: 407 Gaussians on [0, 3], 164 on [0, 1.2]);
* ``embed``: the new default, 200 Gaussians and the width derived, sigma = spacing / 2
  (``component_sigma=0``: 0.0075 on [0, 3], 0.0030 on [0, 1.2]);
* ``embed_wide``: as ``embed`` with sigma = spacing / 1.98 (run before the default was chosen).

Beside them the baselines (default: FlexZBoost), all through
:func:`rail.evaluation.deepz_compare` (same data, metrics and grids as ``accuracy.py``:
DC2 = the pz-rail-base training / validation files; boss = ``../shared/data/sdss_boss_dr10``).
Added here: the comb measure, the mean number of local maxima per PDF
(:func:`rail.evaluation.deepz_metrics.local_maxima_count`: maxima above 1% of the PDF's peak that
dip by >= 10% on both sides) on a grid of spacing 0.001, and the fraction of PDFs with more than 3.

    python benchmarks/embed_basis.py --data dc2           # -> results/embed_basis_dc2.{json,md}
    python benchmarks/embed_basis.py --data boss --variants embed_200,embed
    python benchmarks/embed_basis.py --reuse              # reuse the qp files and times of an earlier run
    python benchmarks/embed_basis.py --quick              # smoke run (quick configs, 2k/2k objects)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from accuracy import REPORT_METRICS, git_commit, machine_info  # noqa: E402

SIGMA = 0.0037
#: variant -> (inform options over the registry's, what it is)
VARIANTS = {
    "embed_200": (dict(n_components=200, component_sigma=SIGMA, basis_spacing=5.0),
                  "old default: 200 Gaussians, sigma 0.0037"),
    "embed_count": (dict(n_components=0, component_sigma=SIGMA), "count derived, spacing <= 2 sigma, sigma 0.0037"),
    "embed": ({}, "new default: 200 Gaussians, sigma = spacing / 2"),
    "embed_wide": (None, "200 Gaussians, sigma = spacing / 1.98"),
}
DEFAULT_VARIANTS = "embed_200,embed_count,embed"
PEAK_GRID_DZ = 0.001


def variant_options(name: str, zmin: float, zmax: float) -> dict:
    opts, _ = VARIANTS[name]
    if opts is None:  # embed_wide: width from the range
        from rail.deepz.mixtures import fixed_grid_spacing

        opts = dict(n_components=200, component_sigma=round(fixed_grid_spacing(zmin, zmax, 200) / 1.98, 6))
    return opts


def peak_stats(path, zmin: float, zmax: float, chunk: int = 2000, rel_height: float = 0.01,
               rows=()) -> dict:
    """Comb measure of a qp file: mean / median local maxima per PDF, fraction with > 3, and the
    counts of the given rows."""
    from rail.evaluation.deepz_metrics import iterate_blocks, local_maxima_count

    grid = np.linspace(zmin, zmax, int(round((zmax - zmin) / PEAK_GRID_DZ)) + 1)
    counts = np.concatenate([local_maxima_count(block.prepared().pdf(grid), rel_height)
                             for _, _, block in iterate_blocks(path, chunk)])
    return {"mean_local_maxima": float(counts.mean()), "median_local_maxima": float(np.median(counts)),
            "frac_over_3_maxima": float((counts > 3).mean()),
            "rows": {str(r): int(counts[r]) for r in rows if r < counts.size}}


def _earlier(results: Path, stem: str, outdir: Path, reuse: bool) -> dict:
    """name -> (qp file, timings) of an earlier run's estimates that can be reused."""
    path = results / f"{stem}.json"
    if not reuse or not path.exists():
        return {}
    old = json.loads(path.read_text())
    out = {}
    for name, m in old["metrics"].items():
        qp_file = outdir / f"{name}.hdf5"
        if qp_file.exists() and m.get("inform_time_s") is not None:
            out[name] = (qp_file, {"inform_time_s": m["inform_time_s"], "estimate_time_s": m["estimate_time_s"],
                                   "reused_from": old.get("date")},
                         old.get("variants", {}).get(name))
    return out


def run(data: str, variants: list, baselines: str, quick: bool, out_root: Path, results: Path,
        reuse: bool = False) -> dict:
    from rail.evaluation import deepz_registry as reg
    from rail.evaluation.deepz_compare import compare, format_table, load_dataset, overall_table, run_estimator

    when = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    mach = machine_info()
    outdir = out_root / f"embed_basis_{data}{'_quick' if quick else ''}"
    outdir.mkdir(parents=True, exist_ok=True)
    ds = load_dataset(data, 2000 if quick else None, 2000 if quick else None)
    print(f"[embed_basis] {data}: {len(ds.test[ds.redshift_col])} test objects, z in [{ds.zmin}, {ds.zmax}]; "
          f"{mach['platform']}, torch threads {mach['torch_threads']}, {when}", flush=True)
    base = reg.get("embed")
    earlier = _earlier(results, f"embed_basis_{data}{'_quick' if quick else ''}", outdir, reuse)
    estimates, timings, settings = {}, {}, {}
    for name in variants:
        opts = variant_options(name, ds.zmin, ds.zmax)
        settings[name] = {"inform_options": opts, "what": VARIANTS[name][1]}
        if name in earlier:
            print(f"[embed_basis] {name}: reusing {earlier[name][0]} (--reuse)", flush=True)
            estimates[name], timings[name] = earlier[name][0], earlier[name][1]
            settings[name] = earlier[name][2] or settings[name]
            continue
        spec = dataclasses.replace(base, key=name, inform_options=dict(base.inform_options, **opts))
        path, t = run_estimator(spec, ds, outdir, quick=quick, log=print)
        estimates[name], timings[name] = path, t
    keys = [k.strip() for k in (baselines or "").split(",") if k.strip()]
    for key in [k for k in keys if k in earlier]:
        print(f"[embed_basis] {key}: reusing {earlier[key][0]} (--reuse)", flush=True)
        estimates[key], timings[key] = earlier[key][0], earlier[key][1]
    res = compare(estimates=dict(estimates), data=ds, estimators=[k for k in keys if k not in earlier],
                  outdir=outdir, quick=quick, print_table=False)
    timings.update(res.timings)
    wide = overall_table(res.table, REPORT_METRICS)
    metrics = {est: {k: (None if v != v else float(v)) for k, v in row.items()} for est, row in wide.iterrows()}
    for name, t in timings.items():
        if name in metrics:
            metrics[name].update(inform_time_s=t["inform_time_s"], estimate_time_s=t["estimate_time_s"])
    report = {
        "benchmark": "embed_basis", "date": when, "git_commit": git_commit(), "machine": mach,
        "load": "shared 2-core machine, other helpers' jobs running (under load): times are indicative",
        "data": data, "n_train": len(ds.train[ds.redshift_col]), "n_test": len(ds.test[ds.redshift_col]),
        "zrange": [float(ds.zmin), float(ds.zmax)], "quick": quick, "variants": settings, "metrics": metrics,
        "estimates": {k: str(v) for k, v in res.estimates.items()}, "metrics_csv": str(res.files.get("metrics_csv")),
    }
    return add_peaks_and_write(report, res.table, results)


def add_peaks_and_write(report: dict, table, results: Path) -> dict:
    """Add the comb measure of every estimate file to ``report`` and write the JSON and markdown."""
    from rail.evaluation.deepz_compare import format_table

    data, metrics = report["data"], report["metrics"]
    zmin, zmax = report["zrange"]
    rows = (4009,) if data == "dc2" else ()
    for name, path in report["estimates"].items():
        print(f"[embed_basis] local maxima of {name} ...", flush=True)
        metrics.setdefault(name, {}).update(peak_stats(path, zmin, zmax, rows=rows))
    report["peak_grid_dz"] = PEAK_GRID_DZ
    report["peak_rule"] = "rail.evaluation.deepz_metrics.local_maxima_count(rel_height=0.01, min_dip=0.1)"
    stem = f"embed_basis_{data}{'_quick' if report['quick'] else ''}"
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{stem}.json").write_text(json.dumps(report, indent=2))
    mach = report["machine"]
    cols = ["rail_sigma_iqr", "rail_outlier_rate", "eta", "crps", "pit_ks", "cde_loss", "mean_local_maxima",
            "frac_over_3_maxima", "inform_time_s", "estimate_time_s"]
    md = [f"# Embedding MDN basis: {data}", "",
          f"{report['date']}, commit {report['git_commit']}; {mach['platform']}, {mach['cpu_count']} CPUs, torch "
          f"{mach['torch']} ({mach['torch_threads']} thread), {report['load']}.",
          f"Train {report['n_train']} / test {report['n_test']}; point estimate zmode; "
          f"{'QUICK settings (not representative)' if report['quick'] else 'registry default settings otherwise'}.",
          "", "| estimator | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for est, m in metrics.items():
        md.append(f"| {est} | " + " | ".join("" if m.get(c) is None else f"{m[c]:.4g}" for c in cols) + " |")
    md += ["", "Variants: " + "; ".join(f"`{k}` = {v['what']} {v['inform_options']}"
                                         for k, v in report["variants"].items()),
           f"Local maxima on a grid of spacing {PEAK_GRID_DZ}: maxima above 1% of the PDF's peak whose density "
           "falls by >= 10% on both sides before rising again, the highest point counted once in any case "
           "(`local_maxima_count`)."]
    if rows:
        md.append("Local maxima of test row " + ", ".join(
            f"{r}: " + ", ".join(f"{e} {m['rows'].get(str(r))}" for e, m in metrics.items()) for r in rows))
    md += ["", format_table(table, "markdown", REPORT_METRICS), ""]
    (results / f"{stem}.md").write_text("\n".join(md))
    print("\n".join(md), flush=True)
    return report


def rescore(data: str, quick: bool, out_root: Path, results: Path) -> dict:
    """Recompute the comb measure of an earlier run (its JSON and qp files) and rewrite its report."""
    import pandas as pd

    from rail.evaluation.deepz_compare import load_dataset

    stem = f"embed_basis_{data}{'_quick' if quick else ''}"
    report = json.loads((results / f"{stem}.json").read_text())
    outdir = out_root / stem
    report.setdefault("estimates", {k: str(outdir / f"{k}.hdf5") for k in report["metrics"]})
    report.setdefault("metrics_csv", str(outdir / "metrics.csv"))
    if "zrange" not in report:
        ds = load_dataset(data)
        report["zrange"] = [float(ds.zmin), float(ds.zmax)]
    return add_peaks_and_write(report, pd.read_csv(report["metrics_csv"]), results)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="dc2", help="comma list: dc2, boss (boss skipped when absent)")
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma list of {list(VARIANTS)}")
    p.add_argument("--baselines", default="flexzboost", help="registry keys run beside them ('' = none)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--reuse", action="store_true", help="reuse the qp files and times of an earlier run (its JSON "
                   "in --results) for the variants and baselines it has")
    p.add_argument("--rescore", action="store_true", help="only recompute the comb measure of an earlier run "
                   "(its JSON in --results and qp files) and rewrite the report")
    p.add_argument("--out", default=str(HERE / "out"))
    p.add_argument("--results", default=str(HERE / "results"))
    a = p.parse_args(argv)
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {unknown}; known {list(VARIANTS)}")
    for data in [d.strip() for d in a.data.split(",") if d.strip()]:
        if data == "boss":
            from rail.deepz.datasets import require_shared

            try:
                require_shared("sdss_boss_dr10")
            except FileNotFoundError as err:
                print(f"[embed_basis] skipping boss: {err}")
                continue
        if a.rescore:
            rescore(data, a.quick, Path(a.out), Path(a.results))
        else:
            run(data, variants, a.baselines, a.quick, Path(a.out), Path(a.results), a.reuse)
    return 0


if __name__ == "__main__":
    sys.exit(main())
