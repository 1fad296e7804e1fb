"""Point estimates from the same PDFs (issue 18, "tried" for the sigma_IQR and outlier targets).

For each qp file given (rows aligned with the truth table), without retraining: the
harness's point estimate (the ancil ``zmode``, what the accuracy tables score), and, from
the PDF evaluated on a fine grid (``--step``, default 0.001 over [zmin, zmax]): its mode,
median, mean, and the mode of the PDF smoothed by a Gaussian kernel of each width in
``--smooth`` (redshift units; a smoothed mode ignores narrow spikes and follows the bulk of
the probability). Each is scored by RAIL's sigma_IQR and outlier rate and by sigma_NMAD and
eta (:func:`rail.evaluation.deepz_metrics.point_metrics`). Chunked: ``--chunk`` rows at a time.

    python benchmarks/point_estimates.py --truth OUT/test_table.hdf5 \
        --estimate lstm_x3=OUT/lstm_x3_test.hdf5 --estimate stack_logscore=OUT/stack_logscore.hdf5 \
        --stem accuracy_dc2_point_estimates

With ``--validation-truth`` and ``--validation-estimate label=path`` (the same estimators'
PDFs of the stack-validation rows), every kind is also scored there and, for each metric in
``--select-by``, the kind with the lowest validation value is chosen per estimator; the
report gives that kind's test value (the choice never looks at the test rows).
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

REPORT = ("rail_sigma_iqr", "rail_outlier_rate", "sigma_nmad", "eta")


def grid_point_estimates(pdf: np.ndarray, grid: np.ndarray, smooth: list[float]) -> dict:
    """Mode, median, mean and smoothed modes of PDFs tabulated on an even ``grid`` (n, G)."""
    from scipy.ndimage import gaussian_filter1d

    p = np.nan_to_num(np.clip(pdf, 0.0, None))
    step = grid[1] - grid[0]
    cdf = np.cumsum(p, axis=1)
    total = cdf[:, -1]
    bad = ~(total > 0)
    cdf = cdf / np.where(bad, 1.0, total)[:, None]
    k = np.clip((cdf < 0.5).sum(axis=1), 1, grid.size - 1)  # first index with cdf >= 0.5
    rows = np.arange(len(p))
    c0, c1 = cdf[rows, k - 1], cdf[rows, k]
    t = np.clip((0.5 - c0) / np.where(c1 > c0, c1 - c0, 1.0), 0.0, 1.0)
    out = {
        "mode_fine": grid[np.argmax(p, axis=1)],
        "median": grid[k - 1] + t * step,
        "mean": (p * grid).sum(axis=1) / np.where(bad, 1.0, total),
    }
    for s in smooth:
        ps = gaussian_filter1d(p, s / step, axis=1, mode="constant", truncate=4.0)
        out[f"mode_smooth_{s:g}"] = grid[np.argmax(ps, axis=1)]
    return {k: np.where(bad, np.nan, v) for k, v in out.items()}


def point_estimates(path, ztrue: np.ndarray, zmin: float, zmax: float, step: float, smooth: list[float],
                    chunk: int) -> dict:
    """Per estimate kind: point metrics over all rows of ``path``."""
    from rail.evaluation.deepz_metrics import point_metrics
    from rail.evaluation.deepz_pdfblock import iterate_blocks

    grid = np.linspace(zmin, zmax, int(round((zmax - zmin) / step)) + 1)
    parts: dict[str, list] = {}
    n = 0
    for s, e, block in iterate_blocks(str(path), chunk):
        block = block.prepared()  # (normalised as qp would on reading)
        est = grid_point_estimates(block.pdf(grid), grid, smooth)
        if "zmode" in block.ancil:
            est = {"zmode_ancil": np.asarray(block.ancil["zmode"], dtype=np.float64).reshape(-1), **est}
        for k, v in est.items():
            parts.setdefault(k, []).append(v)
        n = e
    if n != len(ztrue):
        raise ValueError(f"{path}: {n} rows, the truth table has {len(ztrue)}")
    res = {}
    for k, v in parts.items():
        zp = np.concatenate(v)
        ok = np.isfinite(zp)
        m = point_metrics(zp[ok], ztrue[ok])
        res[k] = {**{r: float(m[r]) for r in REPORT}, "n": int(ok.sum())}
    return res


def select_on_validation(validation: dict, test: dict, metrics) -> dict:
    """For each estimator label in both ``validation`` and ``test`` (label -> kind -> metric ->
    value, as :func:`point_estimates` returns) and each metric in ``metrics``: the kind with the
    lowest *validation* value (first in ``validation``'s order on ties; NaN never chosen) and its
    validation and test values. The test values are looked up, never compared."""
    out: dict = {}
    for label in validation:
        if label not in test:
            continue
        for metric in metrics:
            scored = [(v[metric], k) for k, v in validation[label].items()
                      if k in test[label] and np.isfinite(v[metric])]
            if not scored:
                raise ValueError(f"{label}: no kind with a finite validation {metric} to choose from")
            best = min(scored, key=lambda t: t[0])[1]  # min keeps the first of equal values
            out.setdefault(label, {})[metric] = {"kind": best, "validation": validation[label][best][metric],
                                                 "test": test[label][best][metric]}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--truth", required=True, help="HDF5 table with the true redshifts (column --redshift-col)")
    p.add_argument("--redshift-col", default="redshift")
    p.add_argument("--estimate", action="append", required=True, help="label=qp file (rows aligned with --truth)")
    p.add_argument("--zmin", type=float, default=0.0)
    p.add_argument("--zmax", type=float, default=3.0)
    p.add_argument("--step", type=float, default=0.001)
    p.add_argument("--smooth", default="0.005,0.01,0.02", help="Gaussian kernel widths (redshift units)")
    p.add_argument("--chunk", type=int, default=2000)
    p.add_argument("--stem", default="point_estimates")
    p.add_argument("--results", default=str(HERE / "results"))
    p.add_argument("--load-note", default="machine shared with other sessions: times under load")
    p.add_argument("--validation-truth", default=None, help="HDF5 table with the validation rows' true redshifts "
                   "(column --redshift-col)")
    p.add_argument("--validation-estimate", action="append", default=[],
                   help="label=qp file of the validation rows (same labels as --estimate)")
    p.add_argument("--select-by", default="rail_sigma_iqr,eta", help="metrics for which the kind is chosen on "
                   "the validation rows (comma list of " + ", ".join(REPORT) + ")")
    a = p.parse_args(argv)
    select_by = [m.strip() for m in a.select_by.split(",") if m.strip()]
    if bad := [m for m in select_by if m not in REPORT]:
        p.error(f"--select-by {', '.join(bad)}: not one of {', '.join(REPORT)}")
    if bool(a.validation_truth) != bool(a.validation_estimate):
        p.error("--validation-truth and --validation-estimate go together")
    import h5py

    with h5py.File(a.truth, "r") as f:
        ztrue = np.asarray(f[a.redshift_col][()], dtype=np.float64)
    smooth = [float(x) for x in a.smooth.split(",") if x.strip()]
    when = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    results = {}
    for item in a.estimate:
        label, _, path = item.partition("=")
        if not path:
            p.error(f"--estimate {item!r}: expected label=path")
        results[label] = point_estimates(path, ztrue, a.zmin, a.zmax, a.step, smooth, a.chunk)
        print(f"[points] {label}: " + ", ".join(f"{k} {v['rail_sigma_iqr']:.5f}/{v['rail_outlier_rate']:.4f}"
                                                for k, v in results[label].items()), flush=True)
    val_results, chosen = {}, {}
    if a.validation_truth:
        with h5py.File(a.validation_truth, "r") as f:
            zval = np.asarray(f[a.redshift_col][()], dtype=np.float64)
        for item in a.validation_estimate:
            label, _, path = item.partition("=")
            if not path or label not in results:
                p.error(f"--validation-estimate {item!r}: expected label=path with a label of --estimate")
            val_results[label] = point_estimates(path, zval, a.zmin, a.zmax, a.step, smooth, a.chunk)
        chosen = select_on_validation(val_results, results, select_by)
        for label, c in chosen.items():
            print(f"[points] {label}: chosen on validation " + ", ".join(
                f"{m}: {v['kind']} (validation {v['validation']:.5f}, test {v['test']:.5f})" for m, v in c.items()),
                flush=True)
    report = {"benchmark": "point_estimates", "date": when, "git_commit": git_commit(), "machine": machine_info(),
              "load_note": a.load_note, "truth": a.truth, "n_truth": int(len(ztrue)),
              "estimates": dict(e.partition("=")[::2] for e in a.estimate), "grid_step": a.step, "smooth": smooth,
              "metrics": results}
    if a.validation_truth:
        report.update({"validation_truth": a.validation_truth, "n_validation": int(len(zval)),
                       "validation_estimates": dict(e.partition("=")[::2] for e in a.validation_estimate),
                       "validation_metrics": val_results, "chosen_on_validation": chosen})
    out = Path(a.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{a.stem}.json").write_text(json.dumps(report, indent=2))
    kinds = list(next(iter(results.values())))
    lines = [f"# Point estimates from the same PDFs: {a.stem}", "",
             f"{when}, commit {report['git_commit']}; truth {a.truth} ({len(ztrue)} rows); PDFs on a grid of step "
             f"{a.step:g} over [{a.zmin:g}, {a.zmax:g}]; smoothed modes with Gaussian kernels of width "
             f"{', '.join(f'{s:g}' for s in smooth)}. zmode_ancil = the estimator's own zmode (what the tables score).",
             "", "rail_sigma_iqr / rail_outlier_rate (sigma_nmad / eta):", "",
             "| estimate | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
    for label, r in results.items():
        lines.append(f"| {label} | " + " | ".join(
            f"{r[k]['rail_sigma_iqr']:.5f} / {r[k]['rail_outlier_rate']:.4f} ({r[k]['sigma_nmad']:.5f} / "
            f"{r[k]['eta']:.4f})" if k in r else "" for k in kinds) + " |")
    if chosen:
        lines += ["", f"Chosen on the {len(zval)} validation rows ({a.validation_truth}), scored on the test rows:", "",
                  "| estimate | metric | kind chosen | validation | test | test with zmode_ancil |",
                  "|---|---|---|---|---|---|"]
        for label, c in chosen.items():
            for m, v in c.items():
                base = results[label].get("zmode_ancil", {}).get(m)
                lines.append(f"| {label} | {m} | {v['kind']} | {v['validation']:.5f} | {v['test']:.5f} | "
                             f"{'' if base is None else f'{base:.5f}'} |")
    (out / f"{a.stem}.md").write_text("\n".join(lines) + "\n")
    print(f"[points] wrote {out / (a.stem + '.json')} and .md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
