"""The truth table of the metric pass read in slices: memory flat in the number of objects.

:func:`rail.evaluation.deepz_compare.compare` scores estimates against a truth table's true
redshift, reference magnitude and id columns. For a truth HDF5 file (columns at the top level or
in a group, as :func:`~rail.evaluation.deepz_compare.read_truth` finds them) whose rows are in
the estimate's order, :class:`TruthFile` reads those columns ``SLICE`` rows at a time:

* :meth:`TruthFile.summarize`: one pass with fixed-size state for what needs all rows: the
  largest finite redshift (the default ``zmax``), the magnitude bins' edges
  (:class:`~rail.evaluation.deepz_sketch.MagnitudeSketch`: the same edges as the whole-array
  rule); :meth:`TruthFile.example_rows`: a second pass choosing the example objects by
  true-redshift quantiles (:class:`~rail.evaluation.deepz_sketch.QuantileRows`, as
  :func:`example_rows` does for arrays: the same rows either way);
* :meth:`TruthFile.id_mismatch`: the estimate's ancil ids against the truth ids, slice by slice;
* :meth:`TruthFile.slice`: the redshifts and magnitudes of the rows of one estimate chunk.

When the ids of an estimate differ from the truth's (another row order, or other ids),
:func:`rail.evaluation.deepz_metrics.accumulate_estimate` falls back to :meth:`TruthFile.whole`
(the whole columns in memory: the permutation needs them; the log line says so), where
:func:`~rail.evaluation.deepz_metrics.align_to_truth` reorders or refuses as before. In-memory
tables and other file formats always take that whole-array path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

HDF5_SUFFIXES = (".hdf5", ".h5", ".hdf", ".hd5")
SLICE = 1 << 16  # rows per slice of the pre-passes and id checks (0.5 MB per float64 column)
EXAMPLE_BINS = 4096  # true-redshift bins of the example-object choice


def is_hdf5_path(truth) -> bool:
    """Whether ``truth`` is a path (or a DataHandle without data) to an existing HDF5 file."""
    if hasattr(truth, "data") and hasattr(truth, "path") and not isinstance(truth, (str, Path)):
        if truth.data is not None:
            return False
        truth = truth.path
    if not isinstance(truth, (str, Path)) or truth is None:
        return False
    path = Path(truth)
    return path.suffix in HDF5_SUFFIXES and path.is_file()


def h5_column_group(f, redshift_col: str, groupname: str | None = None):
    """The group of an open h5py file holding ``redshift_col``: ``groupname`` if given, else the
    top level, else the only group that has it (DC2 files use ``photometry``); the top level when
    none has it (the caller names the missing column)."""
    import h5py

    if groupname:
        return f[groupname]
    if redshift_col in f:
        return f
    cands = [k for k in f if isinstance(f[k], h5py.Group) and redshift_col in f[k]]
    return f[cands[0]] if len(cands) == 1 else f


def h5_id_dataset(f, cands, groupname: str | None = None) -> str | None:
    """Path in an open h5py file of the first id column of ``cands`` (in ``groupname``, else the top
    level, then its groups), or None."""
    import h5py

    groups = [f[groupname]] if groupname else [f] + [f[k] for k in f if isinstance(f[k], h5py.Group)]
    for g in groups:
        for c in cands:
            if c in g and isinstance(g[c], h5py.Dataset):
                return g[c].name
    return None


def example_rows(ztrue, zmin: float, zmax: float, n_examples: int) -> np.ndarray:
    """Rows of up to ``n_examples`` objects spread over the sorted true redshifts in [zmin, zmax]
    (ranks ``linspace(0, m - 1, n_examples)`` of the m there), the same for every estimator: each
    the first row of the ``EXAMPLE_BINS`` bin holding its rank
    (:class:`~rail.evaluation.deepz_sketch.QuantileRows`), so its true redshift is within
    (zmax - zmin) / ``EXAMPLE_BINS`` of the value at that rank; ranks sharing a bin give one row."""
    from .deepz_sketch import QuantileRows

    q = QuantileRows(zmin, zmax, EXAMPLE_BINS)
    q.add(ztrue, 0)
    return _spread(q, n_examples)


def _spread(q, n_examples: int) -> np.ndarray:
    m = q.n
    if m == 0 or n_examples < 1:
        return np.zeros(0, dtype=np.int64)
    return np.unique(q.rows(np.linspace(0, m - 1, min(n_examples, m)).astype(int)))


class TruthFile:
    """Columns of a truth HDF5 file read in row slices (see the module docstring).

    ``redshift_col`` / ``mag_col`` / ``groupname``: as :func:`~rail.evaluation.deepz_compare.read_truth`
    (errors naming the option of a missing column); ``id_col``: as
    :func:`~rail.evaluation.deepz_metrics.truth_ids`. Holds dataset names, not data.
    """

    def __init__(self, path, redshift_col: str = "redshift", mag_col: str | None = None,
                 groupname: str | None = None, id_col: str | None = None):
        import h5py

        from .deepz_metrics import ID_COLUMNS

        self.path = Path(path)
        self.redshift_col, self.mag_col, self.groupname, self.id_col = redshift_col, mag_col, groupname, id_col
        with h5py.File(self.path, "r") as f:
            grp = h5_column_group(f, redshift_col, groupname)
            if redshift_col not in grp:
                raise KeyError(f"truth file {self.path} has no column {redshift_col!r} (option redshift_col)")
            if mag_col and mag_col not in grp:
                raise KeyError(f"truth file {self.path} has no column {mag_col!r} (option mag_col)")
            self.z_name = grp[redshift_col].name
            self.mag_name = grp[mag_col].name if mag_col else None
            self.id_name = h5_id_dataset(f, (id_col,) if id_col else ID_COLUMNS, groupname)
            self.n = int(np.prod(f[self.z_name].shape))
        self._whole = None

    @property
    def has_ids(self) -> bool:
        return self.id_name is not None

    def open(self):
        """The h5py file, for a sequence of :meth:`slice` calls (a context manager)."""
        import h5py

        return h5py.File(self.path, "r")

    def slice(self, f, s: int, e: int) -> tuple[np.ndarray, np.ndarray | None]:
        """True redshifts and magnitudes (None without ``mag_col``) of rows s:e, float64."""
        z = np.asarray(f[self.z_name][s:e], dtype=np.float64).reshape(-1)
        mag = None if self.mag_name is None else np.asarray(f[self.mag_name][s:e], dtype=np.float64).reshape(-1)
        return z, mag

    def summarize(self) -> tuple[float | None, np.ndarray | None]:
        """One pass with fixed-size state: ``(zmax_finite, mag_edges)``: the largest finite true
        redshift (None if none; what :func:`rail.deepz.datasets.default_zmax` reads) and the edges
        :func:`~rail.evaluation.deepz_metrics.default_mag_edges` gives on the whole magnitude
        column, the same numbers (None without ``mag_col``)."""
        from .deepz_metrics import default_mag_edges
        from .deepz_sketch import MagnitudeSketch

        top = -np.inf
        mags = MagnitudeSketch() if self.mag_name else None
        with self.open() as f:
            for s in range(0, self.n, SLICE):
                z, mag = self.slice(f, s, min(s + SLICE, self.n))
                fin = z[np.isfinite(z)]
                if fin.size:
                    top = max(top, float(fin.max()))
                if mags is not None:
                    mags.add(mag)
        zmax_finite = None if top == -np.inf else top
        edges = None if mags is None else default_mag_edges(sketch=mags)
        return zmax_finite, edges

    def example_rows(self, zmin: float, zmax: float, n_examples: int) -> np.ndarray:
        """:func:`example_rows` of the redshift column, read slice by slice."""
        from .deepz_sketch import QuantileRows

        q = QuantileRows(zmin, zmax, EXAMPLE_BINS)
        with self.open() as f:
            for s in range(0, self.n, SLICE):
                q.add(self.slice(f, s, min(s + SLICE, self.n))[0], s)
        return _spread(q, n_examples)

    def id_mismatch(self, ids_of, n_est: int) -> int | None:
        """First row where the estimate's ids (``ids_of(s, e)``: its rows s:e) differ from the
        truth's, ``min(n_est, n)`` when only the lengths differ, None when they are equal."""
        from .deepz_metrics import _comparable

        with self.open() as f:
            col = f[self.id_name]
            for s in range(0, min(n_est, self.n), SLICE):
                e = min(s + SLICE, n_est, self.n)
                a, b = _comparable(ids_of(s, e), np.asarray(col[s:e]).reshape(-1))
                diff = np.flatnonzero(a != b)
                if diff.size:
                    return s + int(diff[0])
        return None if n_est == self.n else min(n_est, self.n)

    def whole(self) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """The whole columns ``(ztrue, mag, ids)`` in memory (the fallback that reorders rows by
        id), read once and kept for the next estimate."""
        if self._whole is None:
            with self.open() as f:
                z, mag = self.slice(f, 0, self.n)
                ids = None if self.id_name is None else np.asarray(f[self.id_name][()]).reshape(-1)
            self._whole = (z, mag, ids)
        return self._whole
