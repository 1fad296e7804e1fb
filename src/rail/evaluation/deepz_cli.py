"""Command line of the comparison harness: ``deepz-compare`` (or ``python -m rail.evaluation.deepz_cli``).

Examples::

    # train and run every registered estimator (and the baselines) on DC2
    deepz-compare --data dc2 --estimators all --out out/dc2
    # smoke run: quick configurations on 2,000 / 2,000 objects
    deepz-compare --data dc2 --estimators nnc,flexzboost --quick --out out/dc2_quick
    # your own catalogue (HDF5, parquet, FITS or CSV), your column names, peer RAIL estimators
    deepz-compare --train train.parquet --test test.parquet \\
        --bands mag_g_des,mag_r_des,mag_i_des,mag_z_des \\
        --err-bands magerr_g_des,magerr_r_des,magerr_i_des,magerr_z_des \\
        --redshift-col z_spec --id-col objid --estimators nnc,lstm,flexzboost,bpz,knn,dnf --out out/mine
    # the same with the columns in a YAML file (keys: bands, err_bands, redshift_col, id_col,
    # ref_band, mag_limits, nondetect_val, wavelengths, zmin, zmax, group, bpz_filters)
    deepz-compare --train cat.fits --columns cols.yml --estimators all,peers --out out/mine
    # any RAIL estimator by import path (estimator class by RAIL's naming convention)
    deepz-compare --data dc2 --estimators rail.estimation.algos.k_nearneigh:KNearNeighInformer
    # compare existing qp files against a truth table
    deepz-compare --truth truth.hdf5 --estimate nnc=nnc.hdf5 --estimate fzb=fzb.hdf5 --out out/
    # what each registered estimator is and what the harness changes from its defaults
    deepz-compare --list
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="deepz-compare",
        description="Compare photo-z estimators: tidy metrics table (CSV/HDF5), printed table and plots.",
        epilog=__doc__.split("Examples::", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_argument_group("what to compare")
    src.add_argument("--data", help="a preset data set: dc2, boss or zcosmos (or a table file: same as --train)")
    src.add_argument("--train", help="training table file (HDF5, parquet, FITS, CSV) with spectroscopic redshifts")
    src.add_argument("--test", help="test table file (default: a random --test-fraction of --train)")
    src.add_argument("--test-fraction", type=float, default=0.3, help="test share when --test is not given")
    src.add_argument("--estimators", default="all",
                     help="comma list of registry keys, 'all' (default: deep estimators + FlexZBoost + BPZ), "
                          "'peers' (kNN, DNF, GPz, CMNN) or import paths pkg.module:XInformer[:XEstimator]")
    src.add_argument("--estimate", action="append", default=[], metavar="LABEL=PATH",
                     help="an existing qp estimate file (repeatable)")
    src.add_argument("--truth", help="truth table file (with --estimate)")
    src.add_argument("--list", action="store_true", help="list the registered estimators and their settings")
    cols = p.add_argument_group("columns of --train/--test (given once for every estimator)")
    cols.add_argument("--columns", metavar="YAML", help="column spec file; the options below override it")
    cols.add_argument("--bands", help="comma list of magnitude columns")
    cols.add_argument("--err-bands", help="comma list of magnitude-error columns (same order)")
    cols.add_argument("--redshift-col", default=None, help="true-redshift column (default from data set or 'redshift')")
    cols.add_argument("--id-col", default=None,
                      help="object id column; truth rows are matched to the estimates' ids by it "
                           "(default: id, object_id, ...)")
    cols.add_argument("--ref-band", default=None, help="reference magnitude column (default: the i band)")
    cols.add_argument("--mag-limits", default=None,
                      help="limiting magnitudes: one value, a comma list in band order, or band=value pairs "
                           "(default: 99.5th percentile of each band)")
    cols.add_argument("--nondetect-val", default=None, help="non-detection marker(s), comma list (default 99)")
    cols.add_argument("--wavelengths", default=None,
                      help="effective wavelengths (Angstrom), comma list in band order (default: from band names)")
    cols.add_argument("--bpz-filters", default=None,
                      help="BPZ filter curves: comma list in band order or band=filter pairs, names from RAIL's "
                           "FILTER folder (e.g. DECam_g,DECam_r,...); default from LSST/DECam/HSC band names")
    cols.add_argument("--group", default=None, help="HDF5 group of the tables")
    run = p.add_argument_group("settings")
    run.add_argument("--out", default="out/compare", help="output folder (default out/compare)")
    run.add_argument("--quick", action="store_true", help="quick configurations on 2,000/2,000 objects")
    run.add_argument("--n-train", type=int, default=None, help="random training subset size")
    run.add_argument("--n-test", type=int, default=None, help="random test subset size")
    run.add_argument("--seed", type=int, default=0, help="seed of the subsets")
    run.add_argument("--device", default=None, help="cpu, cuda or auto for estimators with a device option")
    run.add_argument("--mag-col", default=None, help="magnitude column of the magnitude bins (default: reference band)")
    run.add_argument("--truth-group", default=None, help="HDF5 group of the truth table")
    run.add_argument("--zmin", type=float, default=None, help="lower end of the redshift grid (default 0)")
    run.add_argument("--zmax", type=float, default=None,
                     help="upper end of the redshift grid (default: training maximum rounded up to 0.1)")
    run.add_argument("--point-estimate", default="zmode", help="ancil key of the point estimate (default zmode)")
    run.add_argument("--chunk-size", type=int, default=10_000, help="PDFs per chunk (memory bound)")
    run.add_argument("--exclude-bad", action="store_true",
                     help="leave rows with a non-finite PDF or truth out of the metrics (counted in "
                          "n_bad_pdf / n_bad_truth) instead of stopping with an error")
    run.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    run.add_argument("--markdown", action="store_true", help="also print the overall table as markdown")
    run.add_argument("--quiet", action="store_true", help="no progress lines (training epochs included)")
    run.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return p


class UsageError(ValueError):
    """A command-line mistake (exit status 2)."""


def _parse_estimates(items) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise UsageError(f"--estimate expects LABEL=PATH, got {item!r}")
        label, path = item.split("=", 1)
        if label in out:
            raise UsageError(f"--estimate label {label!r} given twice")
        out[label] = path
    return out


def _split(text) -> list:
    return [t.strip() for t in str(text).split(",") if t.strip()]


def _floats(text, option) -> list:
    try:
        return [float(t) for t in _split(text)]
    except ValueError:
        raise UsageError(f"{option} expects numbers, got {text!r}") from None


def _pairs_or_list(text, bands, option, cast=str):
    """``a=1,b=2`` -> dict, ``1,2`` -> list (band order), one value -> that value."""
    items = _split(text)
    if all("=" in t for t in items):
        out = {}
        for t in items:
            k, v = t.split("=", 1)
            try:
                out[k.strip()] = cast(v.strip())
            except ValueError:
                raise UsageError(f"{option}: bad value {v!r} for {k!r}") from None
        return out
    try:
        vals = [cast(t) for t in items]
    except ValueError:
        raise UsageError(f"{option} expects a value, a comma list or band=value pairs, got {text!r}") from None
    if len(vals) == 1 and cast is float:
        return vals[0]
    if bands is not None and len(vals) != len(bands):
        raise UsageError(f"{option}: {len(vals)} values for {len(bands)} bands")
    return vals if bands is None or cast is not float else dict(zip(bands, vals))


def column_spec(args):
    """A :class:`rail.deepz.datasets.ColumnSpec` from ``--columns`` and the column options."""
    from rail.deepz.datasets import ColumnSpec

    d = {}
    if args.columns:
        import yaml

        with open(args.columns) as f:
            d = yaml.safe_load(f) or {}
        if not isinstance(d, dict):
            raise UsageError(f"--columns {args.columns}: expected a mapping (bands: [...], err_bands: [...], ...)")
    if args.bands:
        d["bands"] = _split(args.bands)
    if args.err_bands:
        d["err_bands"] = _split(args.err_bands)
    if "bands" not in d or "err_bands" not in d:
        raise UsageError("--train needs the magnitude and error columns: --bands and --err-bands "
                         "(or --columns cols.yml)")
    bands = d["bands"] if isinstance(d["bands"], list) else _split(d["bands"])
    for key, val in (("redshift_col", args.redshift_col), ("id_col", args.id_col), ("ref_band", args.ref_band),
                     ("group", args.group), ("zmin", args.zmin), ("zmax", args.zmax)):
        if val is not None:
            d[key] = val
    if args.mag_limits is not None:
        d["mag_limits"] = _pairs_or_list(args.mag_limits, bands, "--mag-limits", float)
    if args.nondetect_val is not None:
        vals = _floats(args.nondetect_val, "--nondetect-val")
        d["nondetect_val"] = vals[0] if len(vals) == 1 else vals
    if args.wavelengths is not None:
        d["wavelengths"] = _floats(args.wavelengths, "--wavelengths")
    if args.bpz_filters is not None:
        d["bpz_filters"] = _pairs_or_list(args.bpz_filters, None, "--bpz-filters")
    src = f"column file {args.columns}" if args.columns else "column options"
    return ColumnSpec.from_dict(d, source=src)


def _dataset(args):
    """The Dataset of a file run (--train/--test) or a preset (--data), with --zmin/--zmax applied."""
    from rail.deepz import datasets

    if args.data and Path(args.data).is_file() and args.data not in datasets.PRESETS:
        if args.train:
            raise UsageError("give either --data FILE or --train FILE, not both")
        args.train, args.data = args.data, None
    if args.train:
        if args.data:
            raise UsageError("give either --data (a preset) or --train/--test (your files), not both")
        spec = column_spec(args)
        return datasets.from_files(args.train, args.test, spec, test_fraction=args.test_fraction, seed=args.seed)
    if args.test:
        raise UsageError("--test needs --train")
    if args.data not in datasets.PRESETS:
        raise UsageError(f"unknown data set {args.data!r}: presets are {sorted(datasets.PRESETS)}; "
                         "for a catalogue file use --train FILE [--test FILE] with --bands/--err-bands")
    ds = datasets.load(args.data)
    if args.bpz_filters is not None:
        ds.extra["bpz_filters"] = datasets.resolve_bpz_filters(
            ds.bands, _pairs_or_list(args.bpz_filters, None, "--bpz-filters"))
    if args.zmin is not None:
        ds.zmin = float(args.zmin)
    if args.zmax is not None:
        ds.zmax = float(args.zmax)
    return ds


def _list_estimators() -> str:
    from . import deepz_registry as reg

    return "\n".join(s.describe() for s in reg.ESTIMATORS.values())


def run(args) -> int:
    if args.list:
        print(_list_estimators())
        return 0
    estimates = _parse_estimates(args.estimate)
    data_mode = bool(args.data or args.train)
    if not data_mode and not estimates:
        raise UsageError("give --data (a preset), --train FILE [--test FILE] (your catalogue), "
                         "or --estimate LABEL=PATH with --truth")
    if estimates and not data_mode and not args.truth:
        raise UsageError("--estimate needs --truth")
    if args.chunk_size < 1:
        raise UsageError(f"--chunk-size must be >= 1, got {args.chunk_size}")
    if args.zmin is not None and args.zmax is not None and not args.zmax > args.zmin:
        raise UsageError(f"--zmax ({args.zmax}) must be larger than --zmin ({args.zmin})")
    from .deepz_compare import compare, format_table

    ds = _dataset(args) if data_mode else None
    result = compare(
        estimates or None, args.truth, data=ds, estimators=args.estimators if data_mode else None,
        outdir=args.out, quick=args.quick, n_train=args.n_train, n_test=args.n_test, seed=args.seed,
        device=args.device, redshift_col=args.redshift_col, mag_col=args.mag_col,
        truth_groupname=args.truth_group, zmin=None if data_mode else args.zmin,
        zmax=None if data_mode else args.zmax, point_estimate=args.point_estimate,
        chunk_size=args.chunk_size, id_col=args.id_col, exclude_bad=args.exclude_bad,
        plots=not args.no_plots, progress=not args.quiet,
    )
    if args.markdown:
        print(format_table(result.table, "markdown"))
    return 0


def main(argv=None) -> int:
    """Run the command; errors are one line on stderr (exit 2 for usage, 1 otherwise), ``--debug`` re-raises."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("deepz-compare: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - one line unless --debug
        if args.debug:
            raise
        msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        msg = " ".join(str(msg).split()) or type(err).__name__
        if isinstance(err, UsageError):
            parser.print_usage(sys.stderr)
            print(f"deepz-compare: error: {msg}", file=sys.stderr)
            return 2
        print(f"deepz-compare: error: {type(err).__name__}: {msg} (--debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
