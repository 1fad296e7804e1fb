"""The stacks' smoothed-mode point estimate as a user gets it: ``DeepzStackEstimator(mode_smoothing=w)``.

``benchmarks/point_estimates.py`` chooses, per stack and on the stack-validation rows only, the
point-estimate kind with the lowest sigma_IQR, among them the mode of the PDF smoothed by a
Gaussian of width w; it computes that mode itself, on a fine grid. This script reruns each
stack whose chosen kind is a smoothed mode through the stage (option ``mode_smoothing`` = the
chosen width, the stack's own ``<label>.pkl`` and inputs, as ``benchmarks/stack.py`` ran it)
and scores the stage's output with the comparison harness, so that the table's number is what
a pipeline running the stage gets. Nothing is chosen here: the widths are read from the point
estimates' JSON (``chosen_on_validation``).

    python benchmarks/stack_mode_smoothing.py --out benchmarks/out/accuracy_dc2_ensembles \\
        --stack-report benchmarks/results/accuracy_dc2_ensembles_refit.json \\
        --choices benchmarks/results/accuracy_dc2_point_estimates_refit.json \\
        --stem accuracy_dc2_stack_mode_smoothing
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from accuracy import git_commit, machine_info  # noqa: E402

REPORT = ("rail_sigma_iqr", "rail_outlier_rate", "sigma_nmad", "eta", "crps", "pit_ks", "cde_loss")
PREFIX = "mode_smooth_"


def stack_inputs(report: dict, label: str, out: Path) -> dict:
    """{estimator: qp file} the stack ``label`` was applied to in ``benchmarks/stack.py``'s run
    (``<label>_refit``: the refitted members' test files; otherwise ``<key>_test.hdf5``), all in
    ``out`` (the run's recorded paths may be relative to another checkout)."""
    if label.endswith("_refit"):
        return {k: str(out / Path(v).name) for k, v in report["refit"]["stacks"][label]["inputs"].items()}
    return {k: str(out / f"{k}_test.hdf5") for k in report["stack_inputs"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="benchmarks/stack.py's --out folder (stack .pkl, qp files, "
                   "test_table.hdf5)")
    p.add_argument("--stack-report", required=True, help="benchmarks/stack.py's JSON of that run")
    p.add_argument("--choices", required=True, help="benchmarks/point_estimates.py's JSON with "
                   "chosen_on_validation")
    p.add_argument("--metric", default="rail_sigma_iqr", help="the choice made for this metric")
    p.add_argument("--stem", required=True, help="name of the results files")
    p.add_argument("--results", default=str(HERE / "results"))
    p.add_argument("--load-note", default="", help="what else ran on the machine")
    a = p.parse_args(argv)

    from rail.core.data import TableHandle

    from rail.estimation.algos import deepz_stack as dst
    from rail.evaluation.deepz_compare import compare, format_table, overall_table

    out = Path(a.out)
    report = json.loads(Path(a.stack_report).read_text())
    choices = json.loads(Path(a.choices).read_text())["chosen_on_validation"]
    work = out / "mode_smoothing"
    work.mkdir(parents=True, exist_ok=True)
    estimates, widths, times = {}, {}, {}
    for label, chosen in choices.items():
        kind = chosen.get(a.metric, {}).get("kind", "")
        base = label[: -len("_refit")] if label.endswith("_refit") else label
        if not kind.startswith(PREFIX) or not (out / f"{base}.pkl").exists():
            continue  # not a stack, or its chosen kind is not a smoothed mode
        widths[label] = float(kind[len(PREFIX):])
        dest = work / f"{label}_smooth.hdf5"
        est = dst.DeepzStackEstimator.make_stage(
            name=f"stack_smooth_{label}", model=str(out / f"{base}.pkl"), inputs=stack_inputs(report, label, out),
            hdf5_groupname="", mode_smoothing=widths[label], output=str(dest))
        t0 = time.perf_counter()
        est.estimate(TableHandle("input", path=str(out / "test_table.hdf5")))
        times[label] = time.perf_counter() - t0
        estimates[f"{label} (zmode of the stage, mode_smoothing={widths[label]:g})"] = str(dest)
        estimates[f"{label} (zmode, as in the table)"] = str(out / f"{label}.hdf5")
        print(f"[mode_smoothing] {label}: mode_smoothing={widths[label]:g}, estimate {times[label]:.1f} s", flush=True)
    if not estimates:
        raise SystemExit(f"{a.choices}: no stack of {out} has a smoothed mode chosen for {a.metric}")
    import h5py
    import numpy as np

    with h5py.File(out / "test_table.hdf5", "r") as f:
        truth = {k: np.asarray(f[k]) for k in f}
    # stack.py writes the test table as the redshift, the reference band (float) and the ids (integer)
    ids = [k for k, v in truth.items() if k != "redshift" and v.dtype.kind in "iu"]
    mags = [k for k, v in truth.items() if k != "redshift" and v.dtype.kind == "f"]
    if "redshift" not in truth or len(ids) != 1 or len(mags) != 1:
        raise SystemExit(f"{out / 'test_table.hdf5'}: expected 'redshift', one integer id and one float magnitude "
                         f"column (benchmarks/stack.py's test table), got {sorted(truth)}")
    id_col, mag = ids[0], mags[0]
    res = compare(estimates=estimates, truth=truth, redshift_col="redshift", mag_col=mag, id_col=id_col,
                  zmin=0.0, zmax=3.0, outdir=work / "compare", plots=False, print_table=False, progress=False)
    wide = overall_table(res.table, REPORT)
    metrics = {e: {k: (None if v != v else float(v)) for k, v in row.items()} for e, row in wide.iterrows()}
    date = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    commit = git_commit()
    res_dir = Path(a.results)
    res_dir.mkdir(parents=True, exist_ok=True)
    (res_dir / f"{a.stem}.json").write_text(json.dumps({
        "benchmark": "stack_mode_smoothing", "date": date, "git_commit": commit, "machine": machine_info(),
        "load_note": a.load_note, "out": str(out), "stack_report": a.stack_report, "choices": a.choices,
        "metric": a.metric, "mode_smoothing": widths, "estimate_time_s": times, "metrics": metrics,
        "argv": list(sys.argv if argv is None else argv)}, indent=1) + "\n")
    lines = [f"# The stacks' smoothed mode from the stage: {a.stem}", "",
             f"{date}, commit {commit}; load: {a.load_note or 'not stated'}. Each stack rerun by "
             "`DeepzStackEstimator` with `mode_smoothing` = the width chosen on the stack-validation rows "
             f"for {a.metric} (`{a.choices}`), on the inputs of `{a.stack_report}`'s run, and scored by the "
             "comparison harness on the test file beside the table's own zmode row.", "",
             format_table(res.table, "markdown", REPORT), ""]
    (res_dir / f"{a.stem}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
