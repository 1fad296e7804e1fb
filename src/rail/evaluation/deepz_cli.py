"""Command line of the comparison harness: ``deepz-compare`` (or ``python -m rail.evaluation.deepz_cli``).

Examples::

    # train and run every registered estimator (and the baselines) on DC2
    deepz-compare --data dc2 --estimators all --out out/dc2
    # smoke run: quick configurations on 2,000 / 2,000 objects
    deepz-compare --data dc2 --estimators nnc,flexzboost --quick --out out/dc2_quick
    # compare existing qp files against a truth table
    deepz-compare --truth truth.hdf5 --estimate nnc=nnc.hdf5 --estimate fzb=fzb.hdf5 --out out/
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="deepz-compare",
        description="Compare photo-z estimators: tidy metrics table (CSV/HDF5), printed table and plots.",
        epilog=__doc__.split("Examples::", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_argument_group("what to compare")
    src.add_argument("--data", help="data set to train and run estimators on: dc2 or boss")
    src.add_argument("--estimators", default="all",
                     help="comma list of registry keys, or 'all' (default), with --data")
    src.add_argument("--estimate", action="append", default=[], metavar="LABEL=PATH",
                     help="an existing qp estimate file (repeatable)")
    src.add_argument("--truth", help="truth table file (with --estimate)")
    run = p.add_argument_group("settings")
    run.add_argument("--out", default="out/compare", help="output folder (default out/compare)")
    run.add_argument("--quick", action="store_true", help="quick configurations on 2,000/2,000 objects")
    run.add_argument("--n-train", type=int, default=None, help="random training subset size")
    run.add_argument("--n-test", type=int, default=None, help="random test subset size")
    run.add_argument("--seed", type=int, default=0, help="seed of the subsets")
    run.add_argument("--device", default=None, help="cpu, cuda or auto for estimators with a device option")
    run.add_argument("--redshift-col", default=None, help="true-redshift column (default from data set or 'redshift')")
    run.add_argument("--mag-col", default=None, help="reference magnitude column for magnitude bins")
    run.add_argument("--truth-group", default=None, help="HDF5 group of the truth table")
    run.add_argument("--zmin", type=float, default=None)
    run.add_argument("--zmax", type=float, default=None)
    run.add_argument("--point-estimate", default="zmode", help="ancil key of the point estimate (default zmode)")
    run.add_argument("--chunk-size", type=int, default=10_000, help="PDFs per chunk (memory bound)")
    run.add_argument("--id-col", default=None,
                     help="id column of the truth table and the estimates' ancil; rows are matched by id "
                          "when both have ids (default: id, object_id, ... if present)")
    run.add_argument("--exclude-bad", action="store_true",
                     help="leave rows with a non-finite PDF or truth out of the metrics (counted in "
                          "n_bad_pdf / n_bad_truth) instead of stopping with an error")
    run.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    run.add_argument("--markdown", action="store_true", help="also print the overall table as markdown")
    run.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def _parse_estimates(items) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--estimate expects LABEL=PATH, got {item!r}")
        label, path = item.split("=", 1)
        if label in out:
            raise SystemExit(f"--estimate label {label!r} given twice")
        out[label] = path
    return out


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    estimates = _parse_estimates(args.estimate)
    if not args.data and not estimates:
        build_parser().print_usage(sys.stderr)
        print("deepz-compare: error: give --data (train and run estimators) or --estimate/--truth", file=sys.stderr)
        return 2
    if estimates and not args.data and not args.truth:
        print("deepz-compare: error: --estimate needs --truth", file=sys.stderr)
        return 2
    from .deepz_compare import compare, format_table

    result = compare(
        estimates or None, args.truth, data=args.data, estimators=args.estimators if args.data else None,
        outdir=args.out, quick=args.quick, n_train=args.n_train, n_test=args.n_test, seed=args.seed,
        device=args.device, redshift_col=args.redshift_col, mag_col=args.mag_col,
        truth_groupname=args.truth_group, zmin=args.zmin, zmax=args.zmax, point_estimate=args.point_estimate,
        chunk_size=args.chunk_size, id_col=args.id_col, exclude_bad=args.exclude_bad, plots=not args.no_plots, progress=not args.quiet,
    )
    if args.markdown:
        print(format_table(result.table, "markdown"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
