"""Photometry handling shared by every estimator in this package.

Everything that turns catalog columns into numbers a network may see goes through
:func:`extract_photometry`, so the conventions below hold for all methods:

* Inputs are magnitudes (AB) with magnitude errors, or fluxes with flux errors in
  ``nJy`` or ``nanomaggies`` (``input_units``). Fluxes are converted to AB magnitudes
  (zero points 31.4 for nJy, 22.5 for nanomaggies; every conversion in the package goes
  through :func:`mag_to_flux`, :func:`flux_to_mag` and their error twins); a flux <= 0 is a non-detection.
* A measurement is *bad* when its magnitude is NaN or +/-inf; lies outside the open
  interval ``valid_mag_range`` (default (0, 50): no astronomical source is brighter than
  magnitude 0 in a photometric survey, nor fainter than 50; -99, 0 and -1e30 are markers,
  not measurements); equals one of the sentinels ``nondetect_val`` (a number or a list,
  e.g. ``[99, -99, -9999]``, compared with a 0.01 tolerance; RAIL's default 99); is
  fainter than the band's entry in ``mag_limits``; or has a non-finite or non-positive
  error. For flux units a flux <= 0 is a non-detection, the sentinels are not compared
  (99 nJy is a real flux) and the range applies to the converted AB magnitude.
* Bad measurements are treated according to ``missing_policy``:

  - ``"limit"``: magnitude replaced by the band's limit from ``mag_limits`` and the error
    by ``nondetect_err`` (RAIL's convention, as FlexZBoost and BPZ do);
  - ``"mask"``: the value is flagged in :attr:`Photometry.valid` (False); methods then
    hide it from the network (masked sequence step, or zeroed standardised feature plus a
    per-band indicator, :meth:`Photometry.feature_valid`; a colour with a masked band is
    masked too). The stored magnitude is the limit, so that colours stay finite;
  - ``"raise"``: a :class:`BadPhotometryError` naming the column and the number of rows.

* A band that is bad in more than ``BAD_BAND_WARN_FRACTION`` of the rows of a table
  (or chunk) gets a :class:`BadBandWarning` naming it, whatever the policy.
* Detected errors are clipped to ``max_mag_err`` magnitudes (SDSS catalogues carry
  errors of 1e4 mag for u-band drop-outs).

Nothing here ever passes NaN or inf on to a network.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import warnings

import numpy as np

#: AB zero points of the supported flux units (m = -2.5 log10(f) + ZP).
FLUX_ZEROPOINTS = {"nJy": 31.4, "nanomaggies": 22.5}
#: 2.5 / ln(10): converts a relative flux error into a magnitude error.
MAG_ERR_FACTOR = 2.5 / np.log(10.0)
MISSING_POLICIES = ("limit", "mask", "raise")
INPUT_UNITS = ("mag", "nJy", "nanomaggies")
#: default ``valid_mag_range``: magnitudes outside this open interval are not measurements
VALID_MAG_RANGE = (0.0, 50.0)
#: a band bad in more than this share of a table's rows gets a :class:`BadBandWarning`
BAD_BAND_WARN_FRACTION = 0.5
#: tolerance (mag) of the comparison with the ``nondetect_val`` sentinels
SENTINEL_ATOL = 0.01


# ------------------------------------------------ AB magnitude <-> flux: the one home
# Convention: m = -2.5 log10(f) + zeropoint, so a flux is in the unit whose AB zero point is
# ``zeropoint``: 0 (the default) = units of 3631 Jy ("maggies", f = 10**(-0.4 m)), 22.5 =
# nanomaggies, 31.4 = nJy (:data:`FLUX_ZEROPOINTS`). Errors are first order: sigma_m =
# (2.5 / ln 10) sigma_f / f. The helpers are the bare formulas on whatever they are given
# (arrays keep their dtype, Python floats stay Python floats); callers guard f <= 0 themselves.


def mag_to_flux(mag, zeropoint: float = 0.0):
    """Flux of AB magnitude ``mag``, ``10**(-0.4 (mag - zeropoint))``, in the unit of ``zeropoint``."""
    return 10.0 ** (-0.4 * (mag - zeropoint))


def flux_to_mag(flux, zeropoint: float = 0.0):
    """AB magnitude ``-2.5 log10(flux) + zeropoint`` of a positive ``flux`` in the unit of ``zeropoint``."""
    return -2.5 * np.log10(flux) + zeropoint


def mag_err_to_flux_err(flux, mag_err):
    """Flux error (unit of ``flux``) of a magnitude error (mag): ``flux x mag_err / (2.5 / ln 10)``."""
    return flux * mag_err / MAG_ERR_FACTOR


def flux_err_to_mag_err(flux, flux_err):
    """Magnitude error (mag) of a flux error (unit of ``flux``): ``(2.5 / ln 10) x flux_err / flux``."""
    return MAG_ERR_FACTOR * flux_err / flux


class BadPhotometryError(ValueError):
    """Raised when the input photometry cannot be used as configured."""


class BadBandWarning(UserWarning):
    """A band is bad (non-detected, sentinel, out of range...) in most or all rows."""


def sentinel_values(nondetect_val) -> list[float]:
    """``nondetect_val`` (a number or a list of numbers) as a list of floats."""
    vals = list(nondetect_val) if isinstance(nondetect_val, (list, tuple, np.ndarray)) else [nondetect_val]
    out = []
    for v in vals:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise ValueError(
                f"Option 'nondetect_val'={nondetect_val!r} must be a number or a list of numbers "
                "(the magnitude values that mark a non-detection, e.g. [99, -99])"
            )
        out.append(float(v))
    return out


@dataclass
class Photometry:
    """Cleaned photometry of one chunk.

    Attributes
    ----------
    bands : list of str
        Magnitude column names, in the order of the columns of the arrays.
    mags : ndarray, shape (N, B), float32
        AB magnitudes; bad entries hold the band's limiting magnitude.
    errs : ndarray, shape (N, B), float32
        Magnitude errors; bad entries hold ``nondetect_err``.
    valid : ndarray, shape (N, B), bool
        True where the measurement is a real detection.
    """

    bands: list
    mags: np.ndarray
    errs: np.ndarray
    valid: np.ndarray

    def __len__(self) -> int:
        return self.mags.shape[0]

    @property
    def n_bands(self) -> int:
        return self.mags.shape[1]

    def take(self, idx) -> "Photometry":
        """The rows ``idx`` (indices or a boolean mask) of every per-object array, same bands."""
        return type(self)(**{k: (v[idx] if isinstance(v, np.ndarray) else v)
                             for k, v in ((f, getattr(self, f)) for f in self.__dataclass_fields__)})

    def colors(self) -> tuple[np.ndarray, np.ndarray]:
        """Adjacent-band colours ``m_b - m_{b+1}`` and their errors, shape (N, B-1)."""
        col = self.mags[:, :-1] - self.mags[:, 1:]
        err = np.sqrt(self.errs[:, :-1] ** 2 + self.errs[:, 1:] ** 2)
        return col, err

    def fluxes(self, unit: str = "nJy") -> tuple[np.ndarray, np.ndarray]:
        """Fluxes and flux errors in ``unit`` (``nJy`` or ``nanomaggies``), shape (N, B)."""
        flux = mag_to_flux(self.mags.astype(np.float64), FLUX_ZEROPOINTS[unit])
        ferr = mag_err_to_flux_err(flux, self.errs)
        return flux.astype(np.float32), ferr.astype(np.float32)

    def features(self, include: Sequence[str] = ("mags", "colors", "errors")) -> np.ndarray:
        """Stack the requested feature blocks into one (N, F) float32 array.

        Blocks: ``mags`` (B), ``colors`` (B-1), ``errors`` (B magnitude errors),
        ``color_errors`` (B-1), ``valid`` (B indicators, 1 = detected).
        """
        blocks = []
        col, colerr = self.colors()
        avail = {
            "mags": lambda: self.mags,
            "colors": lambda: col,
            "errors": lambda: self.errs,
            "color_errors": lambda: colerr,
            "valid": lambda: self.valid.astype(np.float32),
        }
        for name in include:
            if name not in avail:
                raise ValueError(
                    f"Unknown feature block {name!r}; choose from {sorted(avail)}"
                )
            blocks.append(avail[name]())
        return np.concatenate(blocks, axis=1).astype(np.float32)

    def feature_valid(self, include: Sequence[str]) -> np.ndarray:
        """(N, F) bool, aligned with :meth:`features`: True where a feature depends only on
        valid measurements (a colour or colour error needs both bands; indicators are always
        valid). ``missing_policy='mask'`` zeroes the standardised features where this is False."""
        v = self.valid
        pair = v[:, :-1] & v[:, 1:]
        avail = {"mags": v, "colors": pair, "errors": v, "color_errors": pair, "valid": np.ones_like(v)}
        return np.concatenate([avail[name] for name in include], axis=1)

    def masked_features(self, include: Sequence[str], mask: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """:meth:`features` and, when ``mask`` (``missing_policy='mask'``), :meth:`feature_valid`
        for :class:`rail.deepz.scaling.Standardizer` to zero; None otherwise."""
        return self.features(include), (self.feature_valid(include) if mask else None)

    @staticmethod
    def feature_names(bands: Sequence[str], include: Sequence[str]) -> list[str]:
        """Names of the columns produced by :meth:`features` (for documentation/SHAP)."""
        names: list[str] = []
        for name in include:
            if name == "mags":
                names += list(bands)
            elif name == "errors":
                names += [f"err({b})" for b in bands]
            elif name == "valid":
                names += [f"valid({b})" for b in bands]
            elif name == "colors":
                names += [f"{a}-{b}" for a, b in zip(bands[:-1], bands[1:])]
            elif name == "color_errors":
                names += [f"err({a}-{b})" for a, b in zip(bands[:-1], bands[1:])]
        return names


#: the feature blocks of :meth:`Photometry.features` (the one list every method checks against)
FEATURE_BLOCKS = ("mags", "colors", "errors", "color_errors", "valid")


def _column(data: Mapping, name: str, role: str, n_rows: int | None) -> np.ndarray:
    if name not in data:
        available = ", ".join(sorted(map(str, data.keys()))[:30])
        raise BadPhotometryError(
            f"Input is missing the {role} column {name!r} that this configuration/model "
            f"needs. Available columns: {available}"
        )
    arr = np.asarray(data[name])
    if arr.ndim != 1:
        raise BadPhotometryError(
            f"{role} column {name!r} must be one-dimensional, got shape {arr.shape}"
        )
    if n_rows is not None and arr.shape[0] != n_rows:
        raise BadPhotometryError(
            f"{role} column {name!r} has {arr.shape[0]} rows, expected {n_rows}"
        )
    if arr.dtype.kind not in "fiu":
        raise BadPhotometryError(
            f"{role} column {name!r} must be numeric, got dtype {arr.dtype}"
        )
    return arr.astype(np.float64)


def validate_photometry_options(
    bands: Sequence[str],
    err_bands: Sequence[str],
    mag_limits: Mapping[str, float],
    missing_policy: str,
    input_units: str,
    nondetect_val=99.0,
    nondetect_err: float = 1.0,
    max_mag_err: float = 5.0,
    valid_mag_range: Sequence[float] = VALID_MAG_RANGE,
) -> None:
    """Check the photometry options together; raise ValueError naming the bad option."""
    if len(bands) == 0:
        raise ValueError("Option 'bands' is empty: give at least one magnitude column")
    if len(bands) != len(err_bands):
        raise ValueError(
            f"Options 'bands' ({len(bands)} columns) and 'err_bands' ({len(err_bands)} "
            "columns) must have the same length"
        )
    if len(set(bands)) != len(bands):
        raise ValueError(f"Option 'bands' lists a column twice: {list(bands)}")
    if missing_policy not in MISSING_POLICIES:
        raise ValueError(
            f"Option 'missing_policy'={missing_policy!r} is not one of {MISSING_POLICIES}"
        )
    if input_units not in INPUT_UNITS:
        raise ValueError(f"Option 'input_units'={input_units!r} is not one of {INPUT_UNITS}")
    sentinel_values(nondetect_val)
    for key, val in (("nondetect_err", nondetect_err), ("max_mag_err", max_mag_err)):
        if not (np.isfinite(val) and val > 0):
            raise ValueError(f"Option {key!r} must be a positive magnitude error, got {val}")
    rng = list(valid_mag_range)
    if len(rng) != 2 or not all(np.isfinite(rng)) or not rng[0] < rng[1]:
        raise ValueError(
            f"Option 'valid_mag_range'={rng} must be two finite magnitudes [low, high] with low < high"
        )
    for band, limit in mag_limits.items():
        if band in bands and not rng[0] < float(limit) < rng[1]:
            raise ValueError(
                f"Option 'mag_limits' gives band {band!r} the limit {limit}, outside "
                f"valid_mag_range {rng}"
            )
    if missing_policy != "raise":
        lacking = [b for b in bands if b not in mag_limits]
        if lacking:
            raise ValueError(
                f"Option 'mag_limits' has no limiting magnitude for band(s) {lacking}; "
                f"missing_policy={missing_policy!r} needs one per band"
            )


def extract_photometry(
    data: Mapping,
    bands: Sequence[str],
    err_bands: Sequence[str],
    *,
    mag_limits: Mapping[str, float] | None = None,
    nondetect_val: float | Sequence[float] = 99.0,
    nondetect_err: float = 1.0,
    missing_policy: str = "limit",
    input_units: str = "mag",
    max_mag_err: float = 5.0,
    valid_mag_range: Sequence[float] = VALID_MAG_RANGE,
) -> Photometry:
    """Read, validate and clean the photometry of one table chunk.

    Parameters
    ----------
    data : mapping of column name to 1-D array
        A numpyDict table (use ``CatEstimator._convert_table_format`` first).
    bands, err_bands : list of str
        Magnitude (or flux) columns and their error columns, same order.
    mag_limits : dict
        Limiting AB magnitude per column in ``bands``; used for bad values.
    nondetect_val : float or list of float
        Magnitude value(s) that mark a non-detection (RAIL convention: 99). NaN works too.
    nondetect_err : float
        Magnitude error assigned to replaced values (mag).
    missing_policy : {"limit", "mask", "raise"}
        What to do with bad values (see the module docstring).
    input_units : {"mag", "nJy", "nanomaggies"}
        Units of the ``bands`` columns.
    max_mag_err : float
        Detected magnitude errors are clipped to this value (mag).
    valid_mag_range : (float, float)
        Open interval of AB magnitudes that can be measurements; outside it a value is bad.
    """
    mag_limits = dict(mag_limits or {})
    validate_photometry_options(bands, err_bands, mag_limits, missing_policy, input_units,
                                nondetect_val, nondetect_err, max_mag_err, valid_mag_range)
    sentinels = [v for v in sentinel_values(nondetect_val) if np.isfinite(v)]
    lo, hi = (float(v) for v in valid_mag_range)
    n_rows = None
    mags_l, errs_l, valid_l = [], [], []
    for band, eband in zip(bands, err_bands):
        val = _column(data, band, "band", n_rows)
        n_rows = val.shape[0]
        err = _column(data, eband, "error", n_rows)
        if input_units == "mag":
            mag = val
            magerr = err
            with np.errstate(invalid="ignore"):
                bad = ~np.isfinite(mag) | ~np.isfinite(magerr) | (magerr <= 0)
                for sentinel in sentinels:
                    bad |= np.abs(mag - sentinel) <= SENTINEL_ATOL
        else:
            zp = FLUX_ZEROPOINTS[input_units]
            with np.errstate(divide="ignore", invalid="ignore"):
                bad = ~np.isfinite(val) | ~np.isfinite(err) | (val <= 0) | (err <= 0)
                mag = np.where(bad, np.nan, flux_to_mag(np.where(bad, 1.0, val), zp))
                magerr = np.where(bad, np.nan, flux_err_to_mag_err(np.where(bad, 1.0, val), err))
        limit = mag_limits.get(band)
        with np.errstate(invalid="ignore"):
            bad |= (mag <= lo) | (mag >= hi)
            if limit is not None:
                bad |= mag > limit
        n_bad = int(bad.sum())
        if n_bad and missing_policy == "raise":
            raise BadPhotometryError(
                f"Column {band!r} has {n_bad} bad value(s) of {n_rows}: non-detection sentinel "
                f"{sentinels}, NaN/inf, outside valid_mag_range ({lo}, {hi}), beyond the limit, "
                f"or a non-finite/non-positive error in {eband!r}; set missing_policy='limit' or "
                "'mask' to handle them"
            )
        if n_rows and n_bad > BAD_BAND_WARN_FRACTION * n_rows:
            warnings.warn(
                f"Band {band!r} is bad (non-detected, sentinel, NaN, out of range or bad error) "
                f"in {n_bad} of {n_rows} rows ({n_bad / n_rows:.0%}, warning threshold "
                f"{BAD_BAND_WARN_FRACTION:.0%}); missing_policy={missing_policy!r} applies",
                BadBandWarning, stacklevel=2,
            )
        fill = limit if limit is not None else 0.0
        mags_l.append(np.where(bad, fill, mag))
        errs_l.append(np.where(bad, nondetect_err, np.minimum(magerr, max_mag_err)))
        valid_l.append(~bad)
    mags = np.stack(mags_l, axis=1).astype(np.float32)
    errs = np.stack(errs_l, axis=1).astype(np.float32)
    valid = np.stack(valid_l, axis=1)
    return Photometry(bands=list(bands), mags=mags, errs=errs, valid=valid)


def check_model_bands(model_bands: Sequence[str], config_bands: Sequence[str], what: str) -> None:
    """Refuse to run a model on bands other than the ones it was trained on."""
    if list(model_bands) != list(config_bands):
        missing = [b for b in model_bands if b not in config_bands]
        extra = [b for b in config_bands if b not in model_bands]
        raise BadPhotometryError(
            f"{what}: the model was trained on bands {list(model_bands)} but the "
            f"configuration asks for {list(config_bands)} (missing: {missing}, extra: {extra}). "
            "Use the band list the model was trained with, or retrain."
        )
