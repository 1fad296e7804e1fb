"""Data sets of the comparison harness: a :class:`Dataset` built from table files and a column spec.

A :class:`Dataset` holds training and test tables as numpyDicts plus the column conventions
(bands, error columns, limiting magnitudes, redshift column and range, band wavelengths) that
every estimator config needs. There is one way to build one: :func:`from_files` (or
:func:`from_tables`) with a :class:`ColumnSpec`. The data sets the benchmarks and examples use
are named presets of that same mechanism (:data:`PRESETS`, :func:`load`):

* ``dc2`` -- the cosmoDC2 test files shipped inside pz-rail-base (default data);
* ``boss`` -- SDSS BOSS DR10 galaxies from ``../shared/data/sdss_boss_dr10``;
* ``zcosmos`` -- zCOSMOS-bright with COSMOS photometry from ``../shared/data/zcosmos_vvds``;
* ``qso`` -- SDSS spectroscopic quasars (z 2.75-7.0, ugriz) from ``../shared/data/sdss_qso_stamps``.

Rules shared by every data set (presets included):

* the redshift range is ``[0, zmax]`` with ``zmax`` the training maximum rounded up to the next
  multiple of 0.1 (:func:`default_zmax`), unless the spec gives ``zmin``/``zmax``;
* missing ``mag_limits`` are the 99.5th percentile of each band's valid magnitudes in the table
  read (the training file, or the single file before its train/test split);
* band wavelengths (LSTM band order) come from :data:`FILTER_WAVELENGTHS` by band name where
  the name says which survey and band it is, else the given band order is used as is.

Nothing here downloads anything. Data under ``shared/data`` is found through
:func:`shared_data_dir` (env var ``DEEPZ_SHARED_DATA`` or ``../shared/data`` relative to the
repository or the current directory); loaders raise :class:`FileNotFoundError` when it is
absent so tests can skip.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np

from .photometry import FLUX_ZEROPOINTS, flux_to_mag

LSST_BANDS = list("ugrizy")


@dataclass
class Dataset:
    """Training/test tables and the column conventions estimators need.

    Attributes
    ----------
    name : str
    train, test : dict of str -> ndarray
        numpyDict tables (one row per object).
    bands, err_bands : list of str
        Magnitude and magnitude-error column names, in increasing wavelength.
    mag_limits : dict
        Limiting magnitude per band column (used for non-detections).
    redshift_col : str
    zmin, zmax : float
        Redshift range for PDFs.
    wavelengths : list of float
        Effective wavelength of each band (Angstrom), same order as ``bands``.
    ref_band : str
        Reference magnitude column (FlexZBoost input, magnitude bins of metrics).
    extra : dict
        Extras: ``id_col``, ``nondetect_val``, ``bpz_filters`` (band -> BPZ filter name),
        ``provides`` (``catalog``, ``images``...).
    """

    name: str
    train: dict
    test: dict
    bands: list
    err_bands: list
    mag_limits: dict
    redshift_col: str
    zmin: float
    zmax: float
    wavelengths: list
    ref_band: str
    extra: dict = field(default_factory=dict)

    def catalog_config(self) -> dict:
        """Config options shared by all catalog estimators for this data set."""
        return dict(
            bands=list(self.bands),
            err_bands=list(self.err_bands),
            mag_limits=dict(self.mag_limits),
            redshift_col=self.redshift_col,
            zmin=self.zmin,
            zmax=self.zmax,
            ref_band=self.ref_band,
            hdf5_groupname="",
        )


# ----------------------------------------------------------------- column spec


@dataclass
class ColumnSpec:
    """Which columns of a catalogue hold what (given once, for every estimator).

    Attributes
    ----------
    bands : list of str
        Magnitude columns (AB mag). Order them by wavelength unless their names are known to
        :func:`guess_wavelengths` (then they are sorted for the LSTM by wavelength anyway).
    err_bands : list of str
        Magnitude-error columns, same order as ``bands``.
    redshift_col : str
        Spectroscopic (true) redshift column.
    id_col : str or None
        Object id column (carried into the estimates and the truth table).
    ref_band : str or None
        Reference magnitude column (FlexZBoost/BPZ/kNN input, magnitude bins of the metrics);
        default the i band if there is one, else the middle band.
    mag_limits : dict, float or None
        Limiting magnitude per band column, one value for all, or None for the 99.5th
        percentile of each band's valid magnitudes.
    nondetect_val : float or list of float
        Marker(s) of a non-detection in a magnitude column (e.g. 99, -99).
    wavelengths : list of float or None
        Effective wavelength of each band in Angstrom; None = from band names, else band order.
    zmin, zmax : float or None
        Redshift range of the PDFs; None = 0 and :func:`default_zmax` of the training redshifts.
    group : str
        HDF5 group of the tables ('' = top level or the only group holding the columns).
    bpz_filters : dict or list or None
        BPZ filter curve names (files of RAIL's ``FILTER`` folder) for each band; None = from
        the band names where known (LSST, DECam, HSC).
    """

    bands: list
    err_bands: list
    redshift_col: str = "redshift"
    id_col: str | None = None
    ref_band: str | None = None
    mag_limits: dict | float | None = None
    nondetect_val: float | list = 99.0
    wavelengths: list | None = None
    zmin: float | None = None
    zmax: float | None = None
    group: str = ""
    bpz_filters: dict | list | None = None

    @classmethod
    def from_dict(cls, d: dict, source: str = "column spec") -> "ColumnSpec":
        """Build from a plain dict (e.g. a YAML file); unknown keys are an error naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {unknown}; known: {sorted(known)}")
        for key in ("bands", "err_bands"):
            if key not in d:
                raise ValueError(f"{source}: '{key}' is required")
        d = dict(d)
        for key in ("bands", "err_bands", "wavelengths"):
            if isinstance(d.get(key), str):
                d[key] = [s.strip() for s in d[key].split(",") if s.strip()]
        return cls(**d)

    @classmethod
    def from_yaml(cls, path) -> "ColumnSpec":
        import yaml

        with open(path) as f:
            d = yaml.safe_load(f) or {}
        if not isinstance(d, dict):
            raise ValueError(f"column file {path}: expected a mapping of keys such as bands, err_bands")
        return cls.from_dict(d, source=f"column file {path}")

    def check(self) -> None:
        """Consistency of the spec itself (before any data is read)."""
        if not self.bands:
            raise ValueError("column spec: 'bands' is empty")
        if len(self.err_bands) != len(self.bands):
            raise ValueError(f"column spec: {len(self.bands)} bands but {len(self.err_bands)} err_bands "
                             f"({self.bands} vs {self.err_bands})")
        if self.wavelengths is not None and len(self.wavelengths) != len(self.bands):
            raise ValueError(f"column spec: {len(self.wavelengths)} wavelengths for {len(self.bands)} bands")
        if self.ref_band is not None and self.ref_band not in self.bands:
            raise ValueError(f"column spec: ref_band {self.ref_band!r} is not one of the bands {self.bands}")
        if self.zmin is not None and self.zmax is not None and not self.zmax > self.zmin:
            raise ValueError(f"column spec: zmax ({self.zmax}) must be larger than zmin ({self.zmin})")


# ----------------------------------------------------------------- band names -> wavelengths, BPZ filters

#: Effective wavelengths (Angstrom) of common filter systems, by survey token and band.
FILTER_WAVELENGTHS = {
    "lsst": dict(u=3671.0, g=4827.0, r=6223.0, i=7546.0, z=8691.0, y=9712.0),
    "sdss": dict(u=3551.0, g=4686.0, r=6166.0, i=7480.0, z=8932.0),
    "des": dict(u=3850.0, g=4730.0, r=6420.0, i=7840.0, z=9260.0, y=10090.0),
    "hsc": dict(g=4754.0, r=6175.0, i=7711.0, z=8898.0, y=9762.0),
    "ukidss": dict(y=10305.0, j=12483.0, h=16313.0, k=22010.0),
    "vista": dict(z=8762.0, y=10184.0, j=12464.0, h=16310.0, ks=21497.0, k=21497.0),
    "2mass": dict(j=12350.0, h=16620.0, ks=21590.0, k=21590.0),
    "wise": dict(w1=33526.0, w2=46028.0, w3=115608.0, w4=220883.0),
    "galex": dict(fuv=1539.0, nuv=2316.0),
}
_SURVEY_ALIASES = {"decam": "des", "dc2": "lsst", "lsstcam": "lsst", "comcam": "lsst", "boss": "sdss",
                   "unwise": "wise", "vhs": "vista", "viking": "vista", "2m": "2mass"}
#: band -> wavelength for names without a survey token (SDSS-like ugriz, near-IR, WISE, GALEX)
_GENERIC = {**FILTER_WAVELENGTHS["sdss"], "y": 9712.0, **{k: v for k, v in FILTER_WAVELENGTHS["2mass"].items()},
            **FILTER_WAVELENGTHS["wise"], **FILTER_WAVELENGTHS["galex"]}
#: survey token -> BPZ filter file prefix in RAIL's FILTER folder
_BPZ_PREFIX = {"lsst": "DC2LSST", "des": "DECam", "hsc": "hsc"}
_NOISE = {"mag", "mags", "magnitude", "err", "error", "magerr", "sigma", "e", "ab", "model", "cmodel", "psf",
          "auto", "aper", "kron", "petro", "dered", "corr", "obs", "flux", "fluxerr"}


def _band_of(name: str) -> tuple[str | None, str | None]:
    """(survey, band) parsed from a magnitude column name such as mag_g_des or MAG_I; None if unclear."""
    tokens = [t for t in re.split(r"[^a-z0-9]+", name.lower()) if t]
    survey = None
    rest = []
    for t in tokens:
        s = _SURVEY_ALIASES.get(t, t)
        if s in FILTER_WAVELENGTHS and survey is None and t not in _GENERIC:
            survey = s
        elif t not in _NOISE:
            rest.append(t)
    bands = [t for t in rest if t in _GENERIC or (survey and t in FILTER_WAVELENGTHS[survey])]
    if len(bands) != 1:
        return survey, None
    return survey, bands[0]


def guess_wavelengths(bands) -> list | None:
    """Effective wavelength of each band column from its name, or None if any band is unknown."""
    out = []
    for b in bands:
        survey, band = _band_of(b)
        if band is None:
            return None
        table = FILTER_WAVELENGTHS.get(survey, {}) if survey else {}
        wl = table.get(band, _GENERIC.get(band))
        if wl is None:
            return None
        out.append(float(wl))
    return out


def bpz_filter_dir() -> Path:
    """RAIL's folder of BPZ filter curves (``<name>.res``)."""
    from rail.utils.path_utils import RAILDIR

    return Path(RAILDIR) / "rail" / "examples_data" / "estimation_data" / "data" / "FILTER"


def bpz_filter_names() -> list:
    """Names of the BPZ filter curves RAIL ships (e.g. ``DECam_g``, ``DC2LSST_u``, ``hsc_i``)."""
    d = bpz_filter_dir()
    return sorted(p.stem for p in d.glob("*.res")) if d.is_dir() else []


def guess_bpz_filters(bands) -> list | None:
    """BPZ filter names for the band columns from their names (LSST, DECam, HSC), or None."""
    have = set(bpz_filter_names())
    out = []
    for b in bands:
        survey, band = _band_of(b)
        prefix = _BPZ_PREFIX.get(survey)
        name = f"{prefix}_{band}" if prefix and band else None
        if name not in have:
            return None
        out.append(name)
    return out


def resolve_bpz_filters(bands, filters) -> list:
    """Filter names for ``bands`` from a list (same order) or a band -> name mapping; checked."""
    if isinstance(filters, str):
        filters = [f.strip() for f in filters.split(",") if f.strip()]
    if isinstance(filters, dict):
        missing = [b for b in bands if b not in filters]
        if missing:
            raise ValueError(f"BPZ filters: no filter given for band(s) {missing}")
        filters = [filters[b] for b in bands]
    filters = list(filters)
    if len(filters) != len(bands):
        raise ValueError(f"BPZ filters: {len(filters)} filter names for {len(bands)} bands {list(bands)}")
    have = bpz_filter_names()
    unknown = [f for f in filters if f not in have]
    if unknown:
        raise ValueError(f"BPZ filters {unknown} are not in RAIL's filter folder {bpz_filter_dir()}; "
                         f"available: {', '.join(have)}")
    return filters


# ----------------------------------------------------------------- reading tables


def shared_data_dir() -> Path | None:
    """Folder of the shared survey data, or None when it is not available."""
    cands = []
    if os.environ.get("DEEPZ_SHARED_DATA"):
        cands.append(Path(os.environ["DEEPZ_SHARED_DATA"]))
    here = Path(__file__).resolve()
    for parent in here.parents:
        cands.append(parent / "shared" / "data")
        cands.append(parent.parent / "shared" / "data")
    cands.append(Path.cwd().parent / "shared" / "data")
    cands.append(Path.cwd() / "shared" / "data")
    for c in cands:
        if c.is_dir():
            return c
    return None


def require_shared(sub: str) -> Path:
    base = shared_data_dir()
    if base is None or not (base / sub).exists():
        raise FileNotFoundError(
            f"shared data folder {sub!r} not found (set DEEPZ_SHARED_DATA to the shared/data folder)"
        )
    return base / sub


def _columns_dict(obj) -> dict:
    if hasattr(obj, "to_pandas") and not hasattr(obj, "colnames"):  # pyarrow Table
        obj = obj.to_pandas()
    if hasattr(obj, "columns") and hasattr(obj, "to_numpy"):  # DataFrame (pandas 3 hands out read-only
        # views; some RAIL estimators write into their input columns, so each column is a copy)
        return {str(c): np.array(obj[c].to_numpy(), copy=True) for c in obj.columns}
    if hasattr(obj, "colnames"):  # astropy Table
        return {c: np.asarray(obj[c]) for c in obj.colnames}
    return {k: np.asarray(v) for k, v in obj.items()}


def read_table(path, group: str = "", need=()) -> dict:
    """Read a table file (HDF5, parquet, FITS, CSV) into a numpyDict.

    ``group`` picks an HDF5 group / FITS extension; with ``''`` the top level is used, or the
    only group holding the ``need`` columns. Errors name the file and the missing columns.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"table file {path} not found")
    suffix = path.suffix.lower().lstrip(".")
    try:
        if suffix in ("csv", "txt", "dat", "ecsv"):
            import pandas as pd

            sep = r"\s+" if suffix in ("txt", "dat") else ","
            data = _columns_dict(pd.read_csv(path, sep=sep, comment="#" if suffix != "csv" else None))
        elif suffix in ("parquet", "parq", "pq"):
            import pandas as pd

            data = _columns_dict(pd.read_parquet(path))
        elif suffix in ("fits", "fit", "fz"):
            from astropy.table import Table

            data = _columns_dict(Table.read(path, hdu=group or 1))
        else:
            import tables_io

            data = tables_io.read(str(path))
    except Exception as err:  # noqa: BLE001 - re-raised with the file named
        raise ValueError(f"cannot read table file {path}: {type(err).__name__}: {err}") from err
    if isinstance(data, dict) and data and all(isinstance(v, dict) or hasattr(v, "columns") for v in data.values()):
        groups = {k: _columns_dict(v) for k, v in data.items()}
        if group:
            if group not in groups:
                raise KeyError(f"table file {path} has no group {group!r}; groups: {sorted(groups)}")
            data = groups[group]
        else:
            cands = [k for k, v in groups.items() if all(c in v for c in need)] or list(groups)
            if len(cands) != 1:
                raise KeyError(f"table file {path} has groups {sorted(groups)}: give the group (option group)")
            data = groups[cands[0]]
    else:
        data = _columns_dict(data)
    missing = [c for c in need if c not in data]
    if missing:
        raise KeyError(f"table file {path} has no column(s) {missing}; it has {sorted(data)[:30]}")
    return {k: np.asarray(v).reshape(len(v), *np.shape(v)[1:]) for k, v in data.items()}


def subsample(table: dict, n: int | None, seed: int = 0) -> dict:
    """Random (not first-N: the DC2 files are sorted by redshift) subset of ``n`` rows."""
    size = len(next(iter(table.values())))
    if n is None or n >= size:
        return table
    idx = np.sort(np.random.default_rng(seed).choice(size, n, replace=False))
    return {k: np.asarray(v)[idx] for k, v in table.items()}


def split(table: dict, test_fraction: float, seed: int = 0) -> tuple[dict, dict]:
    """Random train/test split (seeded; rows keep their order within each part)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    n = len(next(iter(table.values())))
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(test_fraction * n))
    te, tr = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    return {k: v[tr] for k, v in table.items()}, {k: v[te] for k, v in table.items()}


# ----------------------------------------------------------------- building a Dataset


def default_zmax(z, step: float = 0.1) -> float:
    """The grid's upper end: the largest finite redshift rounded up to the next multiple of ``step``.

    One rule for every data set and for the metric grid of estimate files without a grid of
    their own (DC2 training maximum 2.987 -> 3.0; a catalogue reaching 3.97 -> 4.0).
    """
    z = np.asarray(z, dtype=np.float64)
    z = z[np.isfinite(z)]
    if z.size == 0:
        raise ValueError("no finite redshift to derive zmax from")
    top = float(z.max())
    return round(step * (math.floor(top / step + 1e-9) + 1), 10) if top > 0 else step


def percentile_limits(table: dict, bands, nondetect_val=99.0, q: float = 99.5) -> dict:
    """Per-band limiting magnitude: the ``q`` percentile of the band's valid magnitudes."""
    markers = np.atleast_1d(np.asarray(nondetect_val, dtype=np.float64))
    limits = {}
    for b in bands:
        mag = np.asarray(table[b], dtype=np.float64)
        ok = np.isfinite(mag) & ~np.isin(mag, markers) & (mag > 0) & (mag < 50)
        if not ok.any():
            raise ValueError(f"band {b!r} has no valid magnitude (0 < mag < 50, not a non-detection marker)")
        limits[b] = float(np.percentile(mag[ok], q))
    return limits


def _default_ref_band(bands) -> str:
    for b in bands:
        if _band_of(b)[1] == "i":
            return b
    return bands[len(bands) // 2]


def from_tables(train: dict, test: dict, spec: ColumnSpec, name: str = "catalog", limits_from: dict | None = None,
                **extra) -> Dataset:
    """A :class:`Dataset` from numpyDict tables and a :class:`ColumnSpec` (columns checked)."""
    spec.check()
    need = [*spec.bands, *spec.err_bands, spec.redshift_col] + ([spec.id_col] if spec.id_col else [])
    for label, tab in (("training", train), ("test", test)):
        missing = [c for c in need if c not in tab]
        if missing:
            raise KeyError(f"{label} table has no column(s) {missing}; it has {sorted(tab)[:30]}")
        if len(tab[spec.redshift_col]) == 0:
            raise ValueError(f"{label} table has no rows")
    ml = spec.mag_limits
    if ml is None:
        limits = percentile_limits(limits_from if limits_from is not None else train, spec.bands, spec.nondetect_val)
    elif isinstance(ml, (int, float)):
        limits = {b: float(ml) for b in spec.bands}
    else:
        missing = [b for b in spec.bands if b not in ml]
        if missing:
            raise ValueError(f"mag_limits has no value for band(s) {missing}")
        limits = {b: float(ml[b]) for b in spec.bands}
    zmin = 0.0 if spec.zmin is None else float(spec.zmin)
    zmax = default_zmax(train[spec.redshift_col]) if spec.zmax is None else float(spec.zmax)
    if not zmax > zmin:
        raise ValueError(f"zmax ({zmax}) must be larger than zmin ({zmin})")
    wl = spec.wavelengths if spec.wavelengths is not None else guess_wavelengths(spec.bands)
    wl_source = "given" if spec.wavelengths is not None else ("band names" if wl is not None else "band order")
    if wl is None:  # unknown names: the given order, evenly spaced
        wl = [float(i + 1) for i in range(len(spec.bands))]
    ex = {"id_col": spec.id_col, "nondetect_val": spec.nondetect_val, "wavelength_source": wl_source, **extra}
    if spec.bpz_filters is not None:
        ex["bpz_filters"] = resolve_bpz_filters(spec.bands, spec.bpz_filters)
    else:
        guessed = guess_bpz_filters(spec.bands)
        if guessed:
            ex["bpz_filters"] = guessed
    return Dataset(
        name=name, train=train, test=test, bands=list(spec.bands), err_bands=list(spec.err_bands),
        mag_limits=limits, redshift_col=spec.redshift_col, zmin=zmin, zmax=zmax, wavelengths=[float(w) for w in wl],
        ref_band=spec.ref_band or _default_ref_band(spec.bands), extra=ex,
    )


def from_files(train, test=None, spec: ColumnSpec | dict | None = None, *, name: str | None = None,
               test_fraction: float = 0.3, seed: int = 0, n_max: int | None = None,
               prepare: Callable | None = None, **extra) -> Dataset:
    """A :class:`Dataset` from a training file and a test file (or one file split at random).

    ``train``/``test`` are paths (HDF5, parquet, FITS, CSV) or numpyDicts. Without ``test``
    the training table is (optionally subsampled to ``n_max`` rows and) split with
    ``test_fraction``. ``prepare(table) -> table`` runs on each table read (presets use it to
    rename or clean columns). Limits from percentiles use the table before the split.
    """
    if spec is None:
        raise ValueError("from_files needs a column spec (bands, err_bands, redshift_col, ...)")
    if isinstance(spec, dict):
        spec = ColumnSpec.from_dict(spec)
    spec.check()
    need = [*spec.bands, *spec.err_bands, spec.redshift_col]

    def get(src):
        if isinstance(src, (str, Path)):
            tab = read_table(src, spec.group, need if prepare is None else ())
        else:
            tab = _columns_dict(src)
        return prepare(tab) if prepare else tab

    tr = get(train)
    if name is None:
        name = Path(train).stem if isinstance(train, (str, Path)) else "catalog"
    if test is None:
        tr = subsample(tr, n_max, seed)
        full = tr
        tr, te = split(tr, test_fraction, seed)
    else:
        full = tr
        te = get(test)
    return from_tables(tr, te, spec, name=name, limits_from=full, **extra)


# ----------------------------------------------------------------- presets


def _dc2_paths():
    from rail.utils.path_utils import find_rail_file

    base = "examples_data/testdata/"
    return find_rail_file(base + "test_dc2_training_9816.hdf5"), find_rail_file(base + "test_dc2_validation_9816.hdf5")


def _dc2_spec() -> ColumnSpec:
    from rail.core.common_params import lsst_def_maglims

    return ColumnSpec(bands=[f"mag_{b}_lsst" for b in LSST_BANDS], err_bands=[f"mag_err_{b}_lsst" for b in LSST_BANDS],
                      redshift_col="redshift", id_col="id", ref_band="mag_i_lsst", mag_limits=dict(lsst_def_maglims),
                      group="photometry")


def load_dc2(n_train: int | None = None, n_test: int | None = None, seed: int = 0) -> Dataset:
    """cosmoDC2 test catalogues from pz-rail-base (10,225 train / 20,449 test, ugrizy, z up to 3.0).

    ``n_train``/``n_test`` draw random subsets (seeded) for quick runs. The grid is [0, 3.0]:
    the shared rule (:func:`default_zmax`) on the full training file (maximum 2.987), so the
    same for every subset.
    """
    train, test = _dc2_paths()
    ds = from_files(train, test, _dc2_spec(), name="dc2")
    ds.train = subsample(ds.train, n_train, seed)
    ds.test = subsample(ds.test, n_test, seed + 1)
    return ds


SDSS_BANDS = list("ugriz")
SDSS_WAVELENGTHS = [FILTER_WAVELENGTHS["sdss"][b] for b in SDSS_BANDS]


def _boss_prepare(table: dict) -> dict:
    table = {k: v for k, v in table.items() if k != "source_file"}
    table["Z"] = np.clip(np.asarray(table["Z"], dtype=np.float64), 0.0, None)
    table["object_id"] = np.arange(len(table["Z"]))
    return table


def load_boss(test_fraction: float = 0.3, seed: int = 0, n_max: int | None = None) -> Dataset:
    """SDSS BOSS DR10 galaxies (merged, de-duplicated ANNZ2 file), random train/test split.

    Magnitude limits are set at the 99.5th percentile of each band (SDSS u-band drop-outs
    with mag > limit or errors > 5 mag are non-detections); redshifts are spectroscopic,
    range [0, 1.2] (the 35 rows with z < 0, down to -0.011, are clipped to 0).
    """
    path = require_shared("sdss_boss_dr10") / "annz2_boss_dr10_merged_dedup.csv"
    bands = [f"MAG_{b.upper()}" for b in SDSS_BANDS]
    spec = ColumnSpec(bands=bands, err_bands=[f"MAGERR_{b.upper()}" for b in SDSS_BANDS], redshift_col="Z",
                      id_col="object_id", ref_band="MAG_I", zmin=0.0, zmax=1.2, wavelengths=list(SDSS_WAVELENGTHS))
    return from_files(path, None, spec, name="boss", test_fraction=test_fraction, seed=seed, n_max=n_max,
                      prepare=_boss_prepare)


#: zCOSMOS-bright bands of the COSMOS ``photzi25`` catalogue (column prefix) and effective
#: wavelengths in Angstrom: GALEX FUV/NUV, CFHT u*, Subaru B/V/g+/r+/i+/z+, CFHT i* (``ic``),
#: J and Ks. Listed in increasing wavelength.
ZCOSMOS_BANDS = ["fuv", "nuv", "u", "b", "g", "v", "r", "ic", "i", "z", "j", "k"]
ZCOSMOS_WAVELENGTHS = [1539.0, 2316.0, 3798.0, 4458.0, 4777.0, 5478.0, 6288.0, 7676.0, 7683.0,
                       9037.0, 12500.0, 21500.0]


def _zcosmos_prepare(secure_only: bool):
    def prepare(raw: dict) -> dict:
        cc = np.asarray(raw["cc"], dtype=np.float64)
        keep = (cc >= 3.0) & (cc < 5.0) if secure_only else np.ones(cc.size, bool)
        table = {"object_id": np.asarray(raw["id_zcosmos"])[keep],
                 "redshift": np.asarray(raw["zpec"], dtype=np.float64)[keep], "cc": cc[keep]}
        for b in ZCOSMOS_BANDS:
            mag = np.asarray(raw[f"{b}_photzi25"], dtype=np.float64)[keep].copy()
            err = np.asarray(raw[f"e{b}_photzi25"], dtype=np.float64)[keep].copy()
            bad = ~np.isfinite(mag) | ~np.isfinite(err) | (mag < -90) | (err < -90)
            mag[bad], err[bad] = np.nan, np.nan
            table[f"{b}_photzi25"], table[f"e{b}_photzi25"] = mag, err
        return table

    return prepare


def load_zcosmos(test_fraction: float = 0.3, seed: int = 0, n_max: int | None = None,
                 secure_only: bool = True) -> Dataset:
    """zCOSMOS-bright 20k with COSMOS photometry (``../shared/data/zcosmos_vvds``), 12 bands FUV-Ks.

    Keeps the secure spectroscopic classes (confidence class 3.x and 4.x, 11,934 rows) unless
    ``secure_only`` is False. The catalogue marks missing photometry with -99 / -99.9 in the
    magnitude or error column: those become NaN here, so every estimator's photometry
    handling treats them as missing bands (``missing_policy``). Magnitude limits are the
    99.5th percentile of each band's measured magnitudes. Random train/test split (seeded).
    """
    path = require_shared("zcosmos_vvds") / "zcosmost_bright20k.csv"
    spec = ColumnSpec(bands=[f"{b}_photzi25" for b in ZCOSMOS_BANDS],
                      err_bands=[f"e{b}_photzi25" for b in ZCOSMOS_BANDS], redshift_col="redshift",
                      id_col="object_id", ref_band="i_photzi25", zmin=0.0, zmax=2.0,
                      wavelengths=list(ZCOSMOS_WAVELENGTHS))
    return from_files(path, None, spec, name="zcosmos", test_fraction=test_fraction, seed=seed, n_max=n_max,
                      prepare=_zcosmos_prepare(secure_only))


#: SDSS quasar catalogue (``../shared/data/sdss_qso_stamps/TrainingDatasets.csv``): ugriz magnitudes and errors
QSO_BANDS = [f"{b}mag" for b in SDSS_BANDS]
QSO_ERR_BANDS = [f"e_{b}mag" for b in SDSS_BANDS]


def _qso_prepare(table: dict) -> dict:
    """One row per photometric object (SDSS ``objID``; the first of its spectra), redshift ``Z``.

    227 objects appear on 2-3 rows each (492 rows: one per spectrum, identical photometry,
    redshifts differing by a median 0.003 and up to 2.3); a random split would otherwise put the
    same photometry in the training and the test table.
    """
    obj = np.asarray(table["objID"])
    _, first = np.unique(obj, return_index=True)
    keep = np.sort(first)
    out = {c: np.asarray(table[c])[keep] for c in (*QSO_BANDS, *QSO_ERR_BANDS)}
    out["Z"] = np.asarray(table["Z"], dtype=np.float64)[keep]  # ('z' is a magnitude-like column, not the redshift)
    out["objID"] = obj[keep]
    out["object_id"] = np.arange(keep.size)
    return out


def load_qso(test_fraction: float = 0.3, seed: int = 0, n_max: int | None = None) -> Dataset:
    """SDSS spectroscopic quasars, z 2.75-7.04 (``../shared/data/sdss_qso_stamps``, the IQVIT
    catalogue of PVQNet's high-z quasar search): SDSS ugriz magnitudes (``umag``..``zmag``) and errors,
    spectroscopic redshift ``Z``; 4,644 rows, 4,379 photometric objects (one row each,
    :func:`_qso_prepare`), random train/test split (seeded). Grid [2.5, 7.5] (the sample is selected
    at z >= 2.75). Magnitude limits: the 99.5th percentile of each band. The catalogue's other 307
    quasars (``OutlierTestI.csv``) have no photometry and are not used.
    """
    path = require_shared("sdss_qso_stamps") / "TrainingDatasets.csv"
    spec = ColumnSpec(bands=list(QSO_BANDS), err_bands=list(QSO_ERR_BANDS), redshift_col="Z",
                      id_col="object_id", ref_band="imag", zmin=2.5, zmax=7.5, wavelengths=list(SDSS_WAVELENGTHS))
    return from_files(path, None, spec, name="qso", test_fraction=test_fraction, seed=seed, n_max=n_max,
                      prepare=_qso_prepare)


# ------------------------------------------------- PICZL's Legacy Survey DR10 input format

#: Legacy Survey DR10 bands of PICZL's catalogue: DECam/90Prime/Mosaic griz + WISE W1-W4
LEGACY_BANDS = ["g", "r", "i", "z", "w1", "w2", "w3", "w4"]
#: Tractor model types, in the order of the catalogue's dchisq_1..5
LEGACY_TYPES = ["PSF", "REX", "DEV", "EXP", "SER"]
#: PICZL's image files (``<name>.npy``, bands first) and the band names they give the image column
PICZL_IMAGE_PLANES = {
    "observed": ("processed_dered_griz_images", ["g", "r", "i", "z"]),
    "model": ("dered_griz_models", ["model_g", "model_r", "model_i", "model_z"]),
    "residual": ("dered_griz_residuals", ["resid_g", "resid_r", "resid_i", "resid_z"]),
    "psf": ("psf_images", ["psf_g", "psf_r", "psf_i", "psf_z"]),
}
PICZL_CATALOG = "demo_catalog_train_with_z.fits"
_OPTICAL, _WISE = LEGACY_BANDS[:4], LEGACY_BANDS[4:]
#: total-flux colours of PICZL's numerical channel: optical-WISE (16) and WISE-WISE (6); the
#: optical-optical colours are carried by the images
PICZL_COLOURS = [(a, b) for a in _OPTICAL for b in _WISE] + [(a, b) for i, a in enumerate(_WISE) for b in _WISE[i + 1:]]
#: PICZL's numerical channel (Roster et al. 2024, Table 2; 52 values): source type one-hot (5),
#: dchisq (5), WISE total flux (4, nanomaggies), fracflux (8), S/N (8), total-flux colours (22, mag)
PICZL_FEATURES = ([f"type_{t}" for t in LEGACY_TYPES] + [f"dchisq_{i}" for i in range(1, 6)]
                  + [f"flux_{b}" for b in _WISE] + [f"fracflux_{b}" for b in LEGACY_BANDS]
                  + [f"snr_{b}" for b in LEGACY_BANDS] + [f"{a}_{b}" for a, b in PICZL_COLOURS])
#: value of a colour whose flux is <= 0 (PICZL's default)
PICZL_NO_COLOUR = -99.0


def _nmgy_mag(flux):
    with np.errstate(divide="ignore", invalid="ignore"):
        return flux_to_mag(flux, FLUX_ZEROPOINTS["nanomaggies"])


def read_piczl_inputs(folder, planes=("observed",), catalog: str = PICZL_CATALOG, size: int = 23) -> tuple[dict, dict]:
    """Read PICZL's input format (a Legacy Survey DR10 catalogue + band-first image files) into a numpyDict.

    The folder holds the catalogue (FITS, one row per object, Legacy Survey DR10 column names:
    ``dered_flux_*``, ``flux_ivar_*``, ``mw_transmission_*``, ``snr_*``, ``fracflux_*``,
    ``dchisq_1..5``, ``type``, ``z``) and the images as ``<file>.npy`` of shape
    (4, N, 23, 23), g, r, i, z first (:data:`PICZL_IMAGE_PLANES`).

    Returns the table and an info dict (``bands``, ``err_bands``, ``image_bands``,
    ``mag_limits``, ``input_units``, ``features``). Columns:

    * ``flux_<b>`` / ``flux_err_<b>`` for b in g r i z w1 w2 w3 w4: dereddened Tractor total flux
      in nanomaggies and its error ``1 / (sqrt(flux_ivar) mw_transmission)`` (NaN where the
      inverse variance is <= 0; the stages' ``missing_policy`` handles it);
    * :data:`PICZL_FEATURES`: PICZL's numerical channel; colours are AB magnitude differences
      of the dereddened fluxes, -99 where a flux is <= 0 (PICZL's default);
    * ``images``: (N, 4 x len(planes), 23, 23) float32, the chosen planes stacked along axis 1,
      nanomaggies per pixel (dereddened; ``observed`` after PICZL's defect cleaning);
    * ``redshift`` (spectroscopic, the catalogue's ``z``, when present) and ``id`` (row number).

    Not read: PICZL's aperture-flux images and colour cubes (``*_colours.npy``; the CNN stage
    builds colour channels from the flux images itself) and the min-max scaling (the stage
    standardises). Errors name the file, the column, the band or the shape at fault.
    """
    folder = Path(folder)
    unknown = [p for p in planes if p not in PICZL_IMAGE_PLANES]
    if unknown or not planes:
        raise ValueError(f"planes {list(planes)}: each must be one of {sorted(PICZL_IMAGE_PLANES)}")
    need = ([f"{k}_{b}" for b in LEGACY_BANDS for k in ("dered_flux", "flux_ivar", "mw_transmission", "snr",
                                                         "fracflux")]
            + [f"dchisq_{i}" for i in range(1, 6)] + ["type"])
    cat = read_table(folder / catalog, need=need)
    n = len(cat["type"])
    table: dict = {"id": np.arange(n)}
    if "z" in cat:
        table["redshift"] = np.asarray(cat["z"], dtype=np.float64)
    info: dict = {"bands": [f"flux_{b}" for b in LEGACY_BANDS], "err_bands": [f"flux_err_{b}" for b in LEGACY_BANDS],
                  "input_units": "nanomaggies", "features": list(PICZL_FEATURES), "mag_limits": {}}
    for b in LEGACY_BANDS:
        f = np.asarray(cat[f"dered_flux_{b}"], dtype=np.float64)
        ivar = np.asarray(cat[f"flux_ivar_{b}"], dtype=np.float64)
        trans = np.asarray(cat[f"mw_transmission_{b}"], dtype=np.float64)
        ok = (ivar > 0) & (trans > 0)
        err = np.full(n, np.nan)
        err[ok] = 1.0 / (np.sqrt(ivar[ok]) * trans[ok])
        table[f"flux_{b}"], table[f"flux_err_{b}"] = f, err
        # 5-sigma depth from the catalogue's own errors: where a flux <= 0 is put by missing_policy='limit'
        info["mag_limits"][f"flux_{b}"] = float(_nmgy_mag(5.0 * np.nanmedian(err))) if ok.any() else 30.0
        table[f"fracflux_{b}"] = np.nan_to_num(np.asarray(cat[f"fracflux_{b}"], dtype=np.float64), nan=0.0,
                                               posinf=0.0, neginf=0.0)
        table[f"snr_{b}"] = np.asarray(cat[f"snr_{b}"], dtype=np.float64)
    types = np.char.strip(np.char.decode(cat["type"].astype("S"), "ascii")).astype(str)
    bad = sorted(set(types) - set(LEGACY_TYPES))
    if bad:
        raise ValueError(f"catalogue {folder / catalog}: column 'type' has value(s) {bad}; expected {LEGACY_TYPES}")
    for t in LEGACY_TYPES:
        table[f"type_{t}"] = (types == t).astype(np.float64)
    for i in range(1, 6):
        table[f"dchisq_{i}"] = np.asarray(cat[f"dchisq_{i}"], dtype=np.float64)
    for a, b in PICZL_COLOURS:
        fa, fb = table[f"flux_{a}"], table[f"flux_{b}"]
        ok = (fa > 0) & (fb > 0)
        table[f"{a}_{b}"] = np.where(ok, _nmgy_mag(np.where(ok, fa, 1.0)) - _nmgy_mag(np.where(ok, fb, 1.0)),
                                     PICZL_NO_COLOUR)
    from .images import read_band_first_stack

    stacks, image_bands = [], []
    for plane in planes:
        name, bands = PICZL_IMAGE_PLANES[plane]
        stacks.append(read_band_first_stack(folder / f"{name}.npy", bands, n, size))
        image_bands += bands
    table["images"] = np.concatenate(stacks, axis=1)
    info["image_bands"] = image_bands
    return table, info


def load_legacy_dr10(planes=("observed",)) -> tuple[dict, dict]:
    """PICZL's 50-object Legacy Survey DR10 fixture (``../shared/data/legacy_dr10_demo``) through
    :func:`read_piczl_inputs`. A format fixture: 50 objects prove the input path, not accuracy."""
    return read_piczl_inputs(require_shared("legacy_dr10_demo"), planes)


#: Named presets: each builds its Dataset with :func:`from_files` and a fixed column spec.
PRESETS = {"dc2": load_dc2, "boss": load_boss, "zcosmos": load_zcosmos, "qso": load_qso}
LOADERS = PRESETS  # former name


def load(name: str, **kwargs) -> Dataset:
    """A preset by name (``dc2``, ``boss``, ``zcosmos``, ``qso``)."""
    if name not in PRESETS:
        raise KeyError(f"Unknown data set {name!r}; known presets: {sorted(PRESETS)} "
                       "(for your own catalogue use --train/--test with a column spec)")
    return PRESETS[name](**kwargs)
