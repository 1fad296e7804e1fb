"""One call to compare photo-z estimators: :func:`compare`.

Two ways in:

(a) existing estimate files: ``compare(estimates={"nnc": "nnc.hdf5", ...}, truth="test.hdf5")``
    -- any number of qp files (rows aligned with the truth table);
(b) a data set and estimator keys: ``compare(data="dc2", estimators="all")`` -- each
    registered estimator (:mod:`rail.evaluation.deepz_registry`) is informed on the
    training table and run on the test table (both timed); the qp files go to ``outdir``.

Either way the estimates are streamed chunk by chunk through
:mod:`rail.evaluation.deepz_metrics`; a truth HDF5 file is read in slices alongside them
(:mod:`rail.evaluation.deepz_truth`: memory flat in the number of objects, unless an estimate's
ids are in another order, which needs the whole columns), and ``outdir`` receives

* ``metrics.csv`` and ``metrics.hdf5``: one tidy table, columns
  ``estimator, bin_type, bin_lo, bin_hi, metric, value, n`` (``bin_type`` = ``all``,
  ``redshift`` or ``magnitude``; inform/estimate wall times are rows with metric
  ``inform_time_s`` / ``estimate_time_s``; the latter is RAIL's ``estimate()`` call, which
  after writing the output reads it back whole (for ``qp.interp`` outputs on fine grids qp's
  re-normalisation on reading can be most of it); the throughput of the stages themselves
  is measured by ``benchmarks/speed_memory.py``);
* ``pit_qq.png``, ``zphot_zspec.png``, ``metrics_vs_redshift.png``,
  ``metrics_vs_magnitude.png``, ``example_pdfs.png``;

and the overall table is printed. The same function backs the command line
(:mod:`rail.evaluation.deepz_cli`) and the ceci stage
(:class:`rail.evaluation.deepz_stages.DeepzCompareEvaluator`).
"""

from __future__ import annotations

import itertools
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from . import deepz_metrics as dm
from .deepz_truth import HDF5_SUFFIXES

# columns of the overall printed table, in order
SUMMARY_METRICS = [
    "sigma_nmad", "eta", "bias_median", "rail_sigma_iqr", "rail_outlier_rate", "crps", "pco",
    "pit_ks", "pit_cvm", "pit_ad", "pit_outlier_rate", "cde_loss", "brier", "n_bad_pdf", "n_bad_truth",
    "inform_time_s", "estimate_time_s",
]
TIME_METRICS = ("inform_time_s", "estimate_time_s")
_uid = itertools.count()


@dataclass
class CompareResult:
    """What :func:`compare` produced.

    Attributes
    ----------
    table : pandas.DataFrame
        The tidy metrics table (also written to ``metrics.csv``/``metrics.hdf5``).
    per_object : dict
        estimator -> per-object arrays (``ztrue, zphot, pit, crps, ...``) of the scored rows;
        empty unless ``compare(per_object=True)`` (they grow with the number of objects; the
        metrics and plots come from ``summaries``).
    estimates : dict
        estimator -> qp file (or ensemble) that was evaluated.
    timings : dict
        estimator -> {"inform_time_s", "estimate_time_s", "n_train", "n_test"} (mode b).
    files : dict
        name -> path of everything written.
    """

    table: object
    per_object: dict
    estimates: dict
    timings: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)
    example_pdfs: dict = field(default_factory=dict)
    zgrid: np.ndarray | None = None
    #: estimator -> :class:`~rail.evaluation.deepz_metrics.MetricGroups` (bounded summaries:
    #: the PIT sketch and zphot-ztrue histogram of the plots)
    summaries: dict = field(default_factory=dict)
    #: row index -> true redshift of the example PDFs
    example_ztrue: dict = field(default_factory=dict)

    def overall(self):
        """Wide table: one row per estimator, the overall (``bin_type == 'all'``) metrics."""
        return overall_table(self.table)


def _printer(progress):
    if progress is True:
        return lambda msg: print(msg, flush=True)
    if callable(progress):
        return progress
    return None


# ----------------------------------------------------------------- truth


def read_truth(truth, redshift_col: str = "redshift", mag_col: str | None = None,
               groupname: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """True redshifts (and reference magnitudes) from a table or a file.

    ``truth`` is a numpyDict / DataFrame / DataHandle or a path. For HDF5 files only the
    two columns are read (bounded memory); ``groupname`` ``None`` finds them at the top
    level or in the only group that has them (DC2 files use ``photometry``).
    """
    if hasattr(truth, "data") and hasattr(truth, "path") and not isinstance(truth, (str, Path)):
        truth = truth.data if truth.data is not None else truth.path
    if isinstance(truth, (str, Path)):
        path = Path(truth)
        if not path.exists():
            raise FileNotFoundError(f"truth table {path} not found")
        if path.suffix in HDF5_SUFFIXES:
            from .deepz_truth import TruthFile

            tf = TruthFile(path, redshift_col, mag_col, groupname)
            with tf.open() as f:
                return tf.slice(f, 0, tf.n)
        import tables_io

        truth = tables_io.read(str(path))
    if groupname and isinstance(truth, Mapping) and groupname in truth:
        truth = truth[groupname]
    if isinstance(truth, Mapping) and redshift_col not in truth and len(truth) == 1:
        only = next(iter(truth.values()))
        if isinstance(only, Mapping) or hasattr(only, "columns"):
            truth = only
    cols = truth.columns if hasattr(truth, "columns") else truth.keys()
    if redshift_col not in cols:
        raise KeyError(f"truth table has no column {redshift_col!r} (option redshift_col); has {list(cols)[:20]}")
    z = np.asarray(truth[redshift_col], dtype=np.float64).reshape(-1)
    mag = None
    if mag_col:
        if mag_col not in cols:
            raise KeyError(f"truth table has no column {mag_col!r} (option mag_col)")
        mag = np.asarray(truth[mag_col], dtype=np.float64).reshape(-1)
    return z, mag


# ----------------------------------------------------------------- tables


def overall_table(table, metrics: Sequence[str] = SUMMARY_METRICS):
    """Pivot the tidy table's ``bin_type == 'all'`` rows to estimator x metric."""
    sub = table[table.bin_type == "all"]
    wide = sub.pivot_table(index="estimator", columns="metric", values="value", aggfunc="first", sort=False)
    cols = [m for m in metrics if m in wide.columns]
    wide = wide[cols]
    n = sub[sub.metric == "sigma_nmad"].set_index("estimator")["n"]
    wide.insert(0, "n", n.reindex(wide.index).astype("Int64"))
    return wide


def format_table(table, fmt: str = "text", metrics: Sequence[str] = SUMMARY_METRICS) -> str:
    """Overall metrics as aligned text (``text``) or a markdown table (``markdown``)."""
    wide = overall_table(table, metrics)
    header = ["estimator", *wide.columns]
    rows = []
    for est, r in wide.iterrows():
        cells = [str(est)]
        for c in wide.columns:
            v = r[c]
            if c == "n":
                cells.append(str(v))
            elif v is None or (isinstance(v, float) and not np.isfinite(v)):
                cells.append("-")
            elif c in TIME_METRICS:
                cells.append(f"{v:.1f}")
            else:
                cells.append(f"{v:.4g}")
        rows.append(cells)
    if fmt == "markdown":
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def write_table(table, outdir: Path) -> dict:
    """Write the tidy table as ``metrics.csv`` and ``metrics.hdf5`` (one dataset per column)."""
    import h5py

    outdir.mkdir(parents=True, exist_ok=True)
    csv = outdir / "metrics.csv"
    table.to_csv(csv, index=False)
    h5 = outdir / "metrics.hdf5"
    with h5py.File(h5, "w") as f:
        grp = f.create_group("metrics")
        for col in table.columns:
            v = table[col].to_numpy()
            if v.dtype == object:
                v = np.asarray([str(x).encode() for x in v], dtype="S")
            grp.create_dataset(col, data=v)
    return {"metrics_csv": csv, "metrics_hdf5": h5}


def read_metrics_hdf5(path):
    """Read ``metrics.hdf5`` back into a DataFrame."""
    import h5py
    import pandas as pd

    with h5py.File(path, "r") as f:
        g = f["metrics"]
        cols = {k: g[k][()] for k in g}
    for k, v in cols.items():
        if v.dtype.kind == "S":
            cols[k] = v.astype(str)
    order = ["estimator", "bin_type", "bin_lo", "bin_hi", "metric", "value", "n"]
    return pd.DataFrame({k: cols[k] for k in order if k in cols})


# ----------------------------------------------------------------- running estimators


def _split_names(estimators) -> list[str]:
    if estimators is None:
        return ["all"]
    if isinstance(estimators, str):
        return [e.strip() for e in estimators.split(",") if e.strip()]
    return list(estimators)


def _resolve_specs(estimators) -> list:
    """Registry entries for ``estimators``: keys, groups (``all``, ``peers``) or import paths.

    ``all`` runs the deep estimators first and the baselines last (FlexZBoost leaves a
    joblib process pool behind that slows torch's multi-threaded training; run_estimator
    shuts it down after every estimator, see rail.deepz.training.release_joblib_workers, and
    CHANGELOG.md for the measurement). An explicit order is kept.
    """
    from . import deepz_registry as reg

    specs, seen = [], set()
    for name in _split_names(estimators):
        if name in reg.GROUPS:
            group = sorted(reg.GROUPS[name](), key=lambda k: reg.ESTIMATORS[k].baseline)
            new = [reg.ESTIMATORS[k] for k in group]
        else:
            new = [reg.resolve(name)]  # KeyError naming the known keys, or ImportError
        for spec in new:
            if spec.key in seen:
                continue
            seen.add(spec.key)
            specs.append(spec)
    return specs


def _resolve_keys(estimators) -> list[str]:
    """Keys of :func:`_resolve_specs` (registered names and groups only)."""
    return [s.key for s in _resolve_specs(estimators)]


def _supported(spec, ds) -> str | None:
    """Reason this estimator cannot run on this data set, or None."""
    datasets = spec.extra.get("datasets")
    if datasets and ds.name not in datasets:
        return f"only configured for data sets {list(datasets)}"
    have = set(ds.extra.get("provides", ("catalog",)))
    if ds.extra.get("bpz_filters"):
        have.add("bpz_filters")
    missing = [n for n in spec.needs if n not in have]
    if missing == ["bpz_filters"]:
        return (f"no BPZ filter curves known for the bands {list(ds.bands)}: give --bpz-filters (built in for "
                "LSST/DC2, DECam and HSC band names, e.g. the dc2 preset)")
    if missing:
        return f"needs {missing}, data set {ds.name!r} provides {sorted(have)}"
    return spec.available() if hasattr(spec, "available") else None


def _private_copy(table: dict) -> dict:
    """Each estimator gets its own copy of the table: some RAIL stages write into their input
    columns (BPZ subtracts its zero-point offsets in place), which must not reach the next one."""
    return {k: np.array(v, copy=True) for k, v in table.items()}


def run_estimator(spec, ds, outdir: Path, *, quick: bool = False, chunk_size: int = 10_000,
                  device: str | None = None, log=None, progress: bool | None = None) -> tuple[Path, dict]:
    """Inform ``spec`` on ``ds.train``, estimate ``ds.test``; returns (qp file, timings).

    ``progress`` (default: whether ``log`` is set) is passed to stages with a ``progress``
    option (one line per training epoch with elapsed time and ETA).
    """
    from rail.core.data import TableHandle

    from rail.deepz.training import release_joblib_workers

    inform_cfg, est_cfg = spec.make_configs(ds, quick)
    inf_cls, est_cls = spec.informer_class, spec.estimator_class
    if device:
        for cfg, cls in ((inform_cfg, inf_cls), (est_cfg, est_cls)):
            if "device" in cls.config_options:
                cfg["device"] = device
    show = bool(log) if progress is None else bool(progress)
    if "progress" in inf_cls.config_options and "progress" not in inform_cfg:
        inform_cfg["progress"] = show
    uid = next(_uid)
    model_path = outdir / f"{spec.key}_model.pkl"
    out_path = outdir / f"{spec.key}.hdf5"
    n_train = len(next(iter(ds.train.values())))
    n_test = len(next(iter(ds.test.values())))
    if log:
        log(f"[compare] {spec.key}: inform on {n_train} objects ...")
    inf = inf_cls.make_stage(name=f"deepz_cmp_inform_{spec.key}_{uid}", model=str(model_path), **inform_cfg)
    t0 = time.perf_counter()
    inf.inform(TableHandle("input", data=_private_copy(ds.train)))
    t_inf = time.perf_counter() - t0
    if log:
        log(f"[compare] {spec.key}: inform took {t_inf:.1f} s; estimate {n_test} objects ...")
    est_cfg = dict(est_cfg)
    est_cfg.setdefault("chunk_size", chunk_size)
    est = est_cls.make_stage(name=f"deepz_cmp_estimate_{spec.key}_{uid}", model=inf.get_handle("model"),
                             output=str(out_path), **est_cfg)
    t0 = time.perf_counter()
    handle = est.estimate(TableHandle("input", data=_private_copy(ds.test)))
    t_est = time.perf_counter() - t0
    path = Path(handle.path) if getattr(handle, "path", None) else out_path
    if not path.exists():  # pragma: no cover - stage returned data only
        handle.data.write_to(str(out_path))
        path = out_path
    if release_joblib_workers() and log:  # FlexZBoost's pool slows torch down: see its docstring
        log(f"[compare] {spec.key}: shut down the joblib process pool it left behind")
    if log:
        log(f"[compare] {spec.key}: estimate took {t_est:.1f} s -> {path}")
    return path, {"inform_time_s": t_inf, "estimate_time_s": t_est, "n_train": n_train, "n_test": n_test}


def _write_truth(ds, path: Path, mag_col: str) -> None:
    import h5py

    id_col = ds.extra.get("id_col")
    with h5py.File(path, "w") as f:
        for col in {ds.redshift_col, mag_col, id_col} - {None}:
            if col in ds.test:
                f.create_dataset(col, data=np.asarray(ds.test[col]))


def load_dataset(data, n_train: int | None = None, n_test: int | None = None, seed: int = 0):
    """A :class:`rail.deepz.datasets.Dataset` (a preset name or a Dataset), with random subsets if asked."""
    from rail.deepz import datasets

    ds = datasets.load(data) if isinstance(data, str) else data
    ds.train = datasets.subsample(ds.train, n_train, seed)
    ds.test = datasets.subsample(ds.test, n_test, seed + 1)
    return ds


def _check_settings(zmin, zmax, chunk_size) -> None:
    """Settings errors before any work: one line naming the option."""
    if chunk_size is None or int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size}")
    if zmin is not None and zmax is not None and not float(zmax) > float(zmin):
        raise ValueError(f"zmax ({zmax}) must be larger than zmin ({zmin})")


def _check_estimate(label, est) -> None:
    """An estimate given as a file must exist and be a qp ensemble file (error naming the file)."""
    if not isinstance(est, (str, Path)):
        return
    import qp

    path = Path(est)
    if not path.is_file():
        raise FileNotFoundError(f"estimate {label!r}: file {path} not found")
    try:
        meta = qp.read_metadata(str(path))
        if "pdf_name" not in meta:
            raise KeyError("pdf_name")
    except Exception as err:  # noqa: BLE001 - any reader error means "not a qp file"
        raise ValueError(f"estimate {label!r}: {path} is not a qp ensemble file "
                         f"({type(err).__name__}: {err})") from None


def _estimate_grid(est) -> tuple[float, float] | None:
    """(zmin, zmax) of the grid a qp file or ensemble was tabulated on (interp/hist), or None."""
    import qp

    try:
        if isinstance(est, (str, Path)):
            meta = qp.read_metadata(str(est))
        else:
            meta = est.metadata
        for key in ("xvals", "bins"):
            if key in meta:
                grid = np.asarray(meta[key], dtype=np.float64).reshape(-1)
                return float(grid.min()), float(grid.max())
    except Exception:  # noqa: BLE001 - no grid: the caller falls back to the truth rule
        return None
    return None


def metric_zrange(estimates: Mapping, ztrue) -> tuple[float, float]:
    """The redshift range of the metric grids when none is given: one rule for both modes.

    The estimators' own grid (qp ``interp``/``hist`` files: the widest over the files), else
    [0, :func:`rail.deepz.datasets.default_zmax` of the true redshifts]. Run by the harness
    (mode b) the estimators' grid is the data set's range, so a file scored later in mode (a)
    gets the same grid as in the run that wrote it.
    """
    from rail.deepz.datasets import default_zmax

    grids = [g for g in (_estimate_grid(e) for e in estimates.values()) if g is not None]
    if grids:
        return min(0.0, min(g[0] for g in grids)), max(g[1] for g in grids)
    return 0.0, default_zmax(ztrue)


def _truth_columns(truth, groupname) -> list:
    if isinstance(truth, (str, Path)):
        path = Path(truth)
        if path.suffix in HDF5_SUFFIXES and path.is_file():
            import h5py

            with h5py.File(path, "r") as f:
                grp = f[groupname] if groupname and groupname in f else f
                names = [k for k in grp if not isinstance(grp[k], h5py.Group)]
                if not names:
                    subs = [k for k in grp if isinstance(grp[k], h5py.Group)]
                    names = list(grp[subs[0]]) if len(subs) == 1 else []
                return names
        return []
    if hasattr(truth, "columns"):
        return [str(c) for c in truth.columns]
    if isinstance(truth, Mapping):
        if groupname and groupname in truth:
            truth = truth[groupname]
        return list(truth.keys())
    return []


def _guess_mag_col(truth, groupname) -> str | None:
    """An i-band magnitude column of the truth table (by name), the default reference band."""
    from rail.deepz.datasets import _band_of

    for col in _truth_columns(truth, groupname):
        low = col.lower()
        if _band_of(col)[1] == "i" and "err" not in low and not low.startswith("e"):
            return col
    return None


# ----------------------------------------------------------------- compare


def compare(
    estimates: Mapping | None = None,
    truth=None,
    *,
    data=None,
    estimators=None,
    outdir="out/compare",
    quick: bool = False,
    n_train: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
    device: str | None = None,
    redshift_col: str | None = None,
    mag_col: str | None = None,
    truth_groupname: str | None = None,
    zmin: float | None = None,
    zmax: float | None = None,
    z_edges=None,
    z_nbins: int = 6,
    mag_edges=None,
    point_estimate: str = "zmode",
    chunk_size: int = 10_000,
    id_col: str | None = None,
    exclude_bad: bool = False,
    n_example_pdfs: int = 6,
    plots: bool = True,
    print_table: bool = True,
    progress=True,
    per_object: bool = False,
) -> CompareResult:
    """Compare estimators on one truth table; write the tidy table and plots to ``outdir``.

    Parameters
    ----------
    estimates : dict label -> qp file path (or ``qp.Ensemble``), optional
        Mode (a): existing estimates, rows aligned with ``truth``.
    truth : path, numpyDict or DataFrame
        Mode (a): the table with the true redshifts (``redshift_col``) and, for the
        magnitude bins, ``mag_col``. An HDF5 file is read in slices (bounded memory; see
        :mod:`rail.evaluation.deepz_truth`); other tables are held whole.
    data : str or Dataset, optional
        Mode (b): a preset name of :mod:`rail.deepz.datasets` (``dc2``, ``boss``, ``zcosmos``)
        or a :class:`~rail.deepz.datasets.Dataset` built from your files
        (:func:`rail.deepz.datasets.from_files`); ``estimators`` (registry keys, ``all``,
        ``peers``, import paths ``pkg.module:XInformer``; a comma list) are informed on its
        training table and run on
        its test table. Can be combined with ``estimates`` (extra files on the same test
        table, e.g. from an earlier run).
    quick : bool
        Mode (b): the registry's quick configurations (seconds, not good models), and by
        default 2,000 training / 2,000 test objects.
    n_train, n_test, seed : random subsets of the data set (mode b).
    device : str, optional
        ``cpu``/``cuda``/``auto`` passed to estimators that have a ``device`` option.
    redshift_col, mag_col, truth_groupname : truth columns (defaults from the data set, or
        ``redshift`` and an i-band column found by name for the magnitude bins).
    zmin, zmax : redshift range of the metric grids and redshift bins (default: the data set's
        range, else :func:`metric_zrange`: the estimates' own grid, else [0, zmax rule]).
    z_edges, mag_edges : bin edges (default ``z_nbins`` = 6 equal bins over [zmin, zmax]; 1-mag
        bins over the 1-99 % range of the magnitudes).
    point_estimate : ancil key of the point estimate (``zmode``, RAIL's default).
    chunk_size : PDFs per chunk when streaming the estimates (memory bound).
    id_col : id column of the truth table and of the estimates' ancil (default: the data set's,
        else the first of ``id``/``object_id``/... found); when both sides have it, rows are
        matched by id (reordered if only the order differs, an error if the ids differ).
    exclude_bad : leave rows with a non-finite PDF, point estimate or truth out of the metrics
        (their counts are the rows ``n_bad_pdf``/``n_bad_truth``); by default they are an error.
    progress : True (print), a callable, or False.
    per_object : also return the per-object arrays (``CompareResult.per_object``; memory grows
        with the number of objects). The metrics and plots never need them: they come from
        bounded summaries (:mod:`rail.evaluation.deepz_sketch`).
    """
    import pandas as pd

    log = _printer(progress)
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    estimates = dict(estimates or {})
    timings: dict = {}
    files: dict = {}
    if data is None and not estimates:
        raise ValueError("compare() needs estimate files (estimates=..., truth=...) or a data set (data=...)")
    _check_settings(zmin, zmax, chunk_size)
    for label, est in estimates.items():
        _check_estimate(label, est)

    if data is not None:
        if quick:
            n_train = 2000 if n_train is None else n_train
            n_test = 2000 if n_test is None else n_test
        ds = load_dataset(data, n_train, n_test, seed)
        redshift_col = redshift_col or ds.redshift_col
        if not mag_col:
            mag_col = ds.ref_band
            if log:
                log(f"[compare] magnitude bins: reference band {mag_col} (--mag-col to change)")
        zmin = ds.zmin if zmin is None else zmin
        zmax = ds.zmax if zmax is None else zmax
        _check_settings(zmin, zmax, chunk_size)
        truth_path = outdir / f"truth_{ds.name}.hdf5"
        _write_truth(ds, truth_path, mag_col)
        files["truth"] = truth_path
        if truth is None:
            truth = ds.test
        specs = _resolve_specs(estimators)
        keys = [s.key for s in specs]
        if log:
            log(f"[compare] data set {ds.name}: {len(next(iter(ds.train.values())))} train / "
                f"{len(next(iter(ds.test.values())))} test objects, z in [{ds.zmin:g}, {ds.zmax:g}]; "
                f"estimators {keys}")
        for i, spec in enumerate(specs):
            key = spec.key
            why = _supported(spec, ds)
            if why:
                if log:
                    log(f"[compare] ({i + 1}/{len(keys)}) skipping {key}: {why}")
                continue
            if key in estimates:
                raise ValueError(f"estimator {key!r} is both run and given as an estimate file")
            if log:
                log(f"[compare] ({i + 1}/{len(keys)}) {key} ({spec.label})")
            path, t = run_estimator(spec, ds, outdir, quick=quick, chunk_size=chunk_size, device=device, log=log)
            estimates[key] = path
            timings[key] = t
            files[f"estimate_{key}"] = path
    if truth is None:
        raise ValueError("compare(estimates=...) needs truth= (table or file with the true redshifts)")
    redshift_col = redshift_col or "redshift"
    if not mag_col:
        mag_col = _guess_mag_col(truth, truth_groupname)
        if log:
            log(f"[compare] magnitude bins: {'i-band column ' + mag_col if mag_col else 'none'} "
                f"({'--mag-col to change' if mag_col else 'no i-band column found: give --mag-col'})")
    if id_col is None and data is not None:
        id_col = ds.extra.get("id_col")
    from .deepz_truth import TruthFile, example_rows, is_hdf5_path

    if is_hdf5_path(truth):
        # streamed: a pre-pass with fixed-size state, then the columns slice by slice per estimate
        tpath = truth.path if hasattr(truth, "path") and not isinstance(truth, (str, Path)) else truth
        stream = TruthFile(tpath, redshift_col, mag_col, truth_groupname, id_col)
        top, edges_seen = stream.summarize()
        ztop = np.zeros(0) if top is None else np.array([top])
        if log:
            log(f"[compare] truth {stream.path}: {stream.n} rows, read in slices with each estimate's chunks")
    else:
        stream = None
        ztrue, mag = read_truth(truth, redshift_col, mag_col, truth_groupname)
        ztop = ztrue
        edges_seen = None if mag is None else dm.default_mag_edges(mag)
        if log:
            log("[compare] truth table held in memory (not an HDF5 file)")
    if zmin is None or zmax is None:
        lo, hi = metric_zrange(estimates, ztop)
        zmin = lo if zmin is None else zmin
        zmax = hi if zmax is None else zmax
    zmin, zmax = float(zmin), float(zmax)
    _check_settings(zmin, zmax, chunk_size)
    cfg = dm.MetricConfig.for_range(zmin, zmax, point_estimate=point_estimate)
    z_edges = dm.default_z_edges(zmin, zmax, z_nbins) if z_edges is None else np.asarray(z_edges, dtype=float)
    if mag_edges is None:
        mag_edges = edges_seen
    # example objects: spread over the true-redshift range, the same for every estimator
    # (only objects whose true redshift is inside the plotted range [zmin, zmax])
    if stream is not None:
        keep = stream.example_rows(zmin, zmax, n_example_pdfs)
        truth_arg, tids = stream, None
    else:
        keep = example_rows(ztrue, zmin, zmax, n_example_pdfs)
        truth_arg, tids = ztrue, dm.truth_ids(truth, id_col, truth_groupname)
    rows, per_objects, examples, summaries, example_z = [], {}, {}, {}, {}
    for j, (label, est) in enumerate(estimates.items()):
        if log:
            log(f"[compare] metrics ({j + 1}/{len(estimates)}) {label} ...")
        acc = dm.accumulate_estimate(est, truth_arg, None if stream is not None else mag, config=cfg,
                                     chunk_size=chunk_size, keep_pdfs=keep, progress=log, label=label,
                                     truth_ids=tids, id_col=id_col if stream is not None or tids is not None
                                     else None, exclude_bad=exclude_bad,
                                     z_edges=z_edges, mag_edges=mag_edges, per_object=per_object)
        rows += acc.tidy(label)  # counts the flagged rows
        summaries[label] = acc.groups
        if per_object:
            po = acc.per_object()
            good = dm.good_rows(po)
            per_objects[label] = po if good.all() else {k: v[good] for k, v in po.items()}  # (--exclude-bad)
        examples[label] = acc.kept_pdfs
        example_z.update(acc.kept_ztrue)
        for tkey in TIME_METRICS:
            if label in timings:
                n = timings[label]["n_train" if tkey == "inform_time_s" else "n_test"]
                rows.append(dict(estimator=label, bin_type="all", bin_lo=np.nan, bin_hi=np.nan, metric=tkey,
                                 value=float(timings[label][tkey]), n=int(n)))
    table = pd.DataFrame(rows, columns=["estimator", "bin_type", "bin_lo", "bin_hi", "metric", "value", "n"])
    files.update(write_table(table, outdir))
    result = CompareResult(table=table, per_object=per_objects, estimates=estimates, timings=timings,
                           files=files, example_pdfs=examples, zgrid=cfg.zgrid, summaries=summaries,
                           example_ztrue=example_z)
    if plots and summaries:
        from . import deepz_plots

        if log:
            log("[compare] plots ...")
        files.update(deepz_plots.make_all(result, outdir, zmin=zmin, zmax=zmax, mag_label=mag_col,
                                          z_label=redshift_col, point_estimate=point_estimate))
    if print_table and not table.empty:
        print(format_table(table), flush=True)
        sys.stdout.flush()
    if log:
        log(f"[compare] wrote {', '.join(str(p) for p in files.values())}")
    return result
