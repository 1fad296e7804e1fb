"""Loaders for the data sets used by the benchmarks, examples and tests.

Each loader returns a :class:`Dataset`: training and test tables as numpyDicts, plus the
column conventions (bands, error columns, limiting magnitudes, redshift column and range)
that every estimator config needs. Nothing here downloads anything.

* :func:`load_dc2` — the cosmoDC2 test files shipped inside pz-rail-base (default data).
* :func:`load_boss` — SDSS BOSS DR10 galaxies from ``../shared/data/sdss_boss_dr10``.

Data under ``shared/data`` is found through :func:`shared_data_dir` (env var
``DEEPZ_SHARED_DATA`` or ``../shared/data`` relative to the repository or the current
directory); loaders raise :class:`FileNotFoundError` when it is absent so tests can skip.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

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
        Loader-specific extras.
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


def subsample(table: dict, n: int | None, seed: int = 0) -> dict:
    """Random (not first-N: the DC2 files are sorted by redshift) subset of ``n`` rows."""
    size = len(next(iter(table.values())))
    if n is None or n >= size:
        return table
    idx = np.sort(np.random.default_rng(seed).choice(size, n, replace=False))
    return {k: np.asarray(v)[idx] for k, v in table.items()}


def load_dc2(n_train: int | None = None, n_test: int | None = None, seed: int = 0) -> Dataset:
    """cosmoDC2 test catalogues from pz-rail-base (10,225 train / 20,449 test, ugrizy).

    ``n_train``/``n_test`` draw random subsets (seeded) for quick runs.
    """
    import tables_io
    from rail.core.common_params import lsst_def_maglims
    from rail.utils.path_utils import find_rail_file

    def read(name):
        return tables_io.read(find_rail_file(f"examples_data/testdata/{name}"))["photometry"]

    train = subsample(read("test_dc2_training_9816.hdf5"), n_train, seed)
    test = subsample(read("test_dc2_validation_9816.hdf5"), n_test, seed + 1)
    bands = [f"mag_{b}_lsst" for b in LSST_BANDS]
    return Dataset(
        name="dc2",
        train=train,
        test=test,
        bands=bands,
        err_bands=[f"mag_err_{b}_lsst" for b in LSST_BANDS],
        mag_limits=dict(lsst_def_maglims),
        redshift_col="redshift",
        zmin=0.0,
        zmax=3.0,
        wavelengths=[3671.0, 4827.0, 6223.0, 7546.0, 8691.0, 9712.0],
        ref_band="mag_i_lsst",
        extra={"id_col": "id"},
    )


SDSS_BANDS = list("ugriz")
SDSS_WAVELENGTHS = [3551.0, 4686.0, 6166.0, 7480.0, 8932.0]


def load_boss(test_fraction: float = 0.3, seed: int = 0, n_max: int | None = None) -> Dataset:
    """SDSS BOSS DR10 galaxies (merged, de-duplicated ANNZ2 file), random train/test split.

    Magnitude limits are set at the 99.5th percentile of each band (SDSS u-band drop-outs
    with mag > limit or errors > 5 mag are non-detections); redshifts are spectroscopic,
    range [0, 1] (the 35 rows with z < 0, down to -0.011, are clipped to 0).
    """
    import pandas as pd

    path = require_shared("sdss_boss_dr10") / "annz2_boss_dr10_merged_dedup.csv"
    df = pd.read_csv(path)
    df = df.drop(columns=["source_file"])
    df["Z"] = df["Z"].clip(lower=0.0)
    df["object_id"] = np.arange(len(df))
    table = {c: df[c].to_numpy() for c in df.columns}
    table = subsample(table, n_max, seed)
    n = len(table["Z"])
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(test_fraction * n))
    te, tr = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    bands = [f"MAG_{b.upper()}" for b in SDSS_BANDS]
    limits = {b: float(np.percentile(table[b], 99.5)) for b in bands}
    return Dataset(
        name="boss",
        train={k: v[tr] for k, v in table.items()},
        test={k: v[te] for k, v in table.items()},
        bands=bands,
        err_bands=[f"MAGERR_{b.upper()}" for b in SDSS_BANDS],
        mag_limits=limits,
        redshift_col="Z",
        zmin=0.0,
        zmax=1.2,
        wavelengths=list(SDSS_WAVELENGTHS),
        ref_band="MAG_I",
        extra={"id_col": "object_id"},
    )


LOADERS = {"dc2": load_dc2, "boss": load_boss}


def load(name: str, **kwargs) -> Dataset:
    if name not in LOADERS:
        raise KeyError(f"Unknown data set {name!r}; known: {sorted(LOADERS)}")
    return LOADERS[name](**kwargs)


#: zCOSMOS-bright bands of the COSMOS ``photzi25`` catalogue (column prefix) and effective
#: wavelengths in Angstrom: GALEX FUV/NUV, CFHT u*, Subaru B/V/g+/r+/i+/z+, CFHT i* (``ic``),
#: J and Ks. Listed in increasing wavelength.
ZCOSMOS_BANDS = ["fuv", "nuv", "u", "b", "g", "v", "r", "ic", "i", "z", "j", "k"]
ZCOSMOS_WAVELENGTHS = [1539.0, 2316.0, 3798.0, 4458.0, 4777.0, 5478.0, 6288.0, 7676.0, 7683.0,
                       9037.0, 12500.0, 21500.0]


def load_zcosmos(test_fraction: float = 0.3, seed: int = 0, n_max: int | None = None,
                 secure_only: bool = True) -> Dataset:
    """zCOSMOS-bright 20k with COSMOS photometry (``../shared/data/zcosmos_vvds``), 12 bands FUV-Ks.

    Keeps the secure spectroscopic classes (confidence class 3.x and 4.x, 11,934 rows) unless
    ``secure_only`` is False. The catalogue marks missing photometry with -99 / -99.9 in the
    magnitude or error column: those become NaN here, so every estimator's photometry
    handling treats them as missing bands (``missing_policy``). Magnitude limits are the
    99.5th percentile of each band's measured magnitudes. Random train/test split (seeded).
    """
    import pandas as pd

    path = require_shared("zcosmos_vvds") / "zcosmost_bright20k.csv"
    df = pd.read_csv(path)
    if secure_only:
        cc = df["cc"].to_numpy()
        df = df[(cc >= 3.0) & (cc < 5.0)].reset_index(drop=True)
    bands = [f"{b}_photzi25" for b in ZCOSMOS_BANDS]
    err_bands = [f"e{b}_photzi25" for b in ZCOSMOS_BANDS]
    table = {"object_id": df["id_zcosmos"].to_numpy(), "redshift": df["zpec"].to_numpy(dtype=np.float64),
             "cc": df["cc"].to_numpy(dtype=np.float64)}
    limits = {}
    for b, e in zip(bands, err_bands):
        mag = df[b].to_numpy(dtype=np.float64, copy=True)
        err = df[e].to_numpy(dtype=np.float64, copy=True)
        bad = ~np.isfinite(mag) | ~np.isfinite(err) | (mag < -90) | (err < -90)
        mag[bad], err[bad] = np.nan, np.nan
        table[b], table[e] = mag, err
        limits[b] = float(np.nanpercentile(mag, 99.5))
    table = subsample(table, n_max, seed)
    n = len(table["redshift"])
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(test_fraction * n))
    te, tr = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    return Dataset(
        name="zcosmos",
        train={k: v[tr] for k, v in table.items()},
        test={k: v[te] for k, v in table.items()},
        bands=bands,
        err_bands=err_bands,
        mag_limits=limits,
        redshift_col="redshift",
        zmin=0.0,
        zmax=2.0,
        wavelengths=list(ZCOSMOS_WAVELENGTHS),
        ref_band="i_photzi25",
        extra={"id_col": "object_id"},
    )


LOADERS["zcosmos"] = load_zcosmos
