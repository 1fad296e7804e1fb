"""Point-estimate metrics of photo-z: one home for sigma_NMAD, bias, eta and PCO.

Used by the comparison harness (:mod:`rail.evaluation.deepz_metrics`) and the per-cell SOM
statistics (:mod:`rail.deepz.som`). ``dz = (zphot - ztrue) / (1 + ztrue)``. Every function
takes an ``axis`` (``None``: all values; ``1``: one value per row of a (B, n) array, as in
bootstrap replicates).

Which paper uses which definition (the README's metric table maps them all):

* ``sigma_nmad``: 1.4826 median(|dz - median(dz)|) -- NNC paper eq. 8, RAIL ``PointSigmaMAD``.
* ``sigma_nmad_nomedian``: 1.4826 median(|dz|) -- LSTM-MDNz eq. 13, PICZL, SOM paper.
* ``bias_median``: median(dz) -- LSTM-MDNz eq. 14, RAIL ``PointBias``.
* ``bias_mean``: mean(dz) -- SOM paper; PICZL with the opposite sign (zspec - zphot).
* ``bias_inlier_mean`` / ``sigma_inlier_std``: mean / std of dz over |dz| <= 0.15 -- NNC eqs. 6, 7.
* ``eta``: fraction with |dz| > 0.15 (a fraction, not %) -- NNC eq. 5, LSTM-MDNz eq. 12
  (``f_out``), PICZL, SOM paper. Not RAIL's outlier rate (cut max(0.06, 3 sigma_IQR)).
* ``pco``: fraction whose ztrue lies outside the central 99% interval of its PDF
  (PIT < 0.005 or > 0.995) -- SOM paper.
"""

from __future__ import annotations

import numpy as np

NMAD_FACTOR = 1.4826
ETA_THRESHOLD = 0.15
PCO_LEVEL = 0.99
PCO_TAIL = 0.5 * (1.0 - PCO_LEVEL)


def dz_norm(zphot, ztrue) -> np.ndarray:
    """Normalised residual ``(zphot - ztrue) / (1 + ztrue)``."""
    zphot = np.asarray(zphot, dtype=np.float64)
    ztrue = np.asarray(ztrue, dtype=np.float64)
    return (zphot - ztrue) / (1.0 + ztrue)


def nmad_of(dz, axis=None, center: bool = True):
    """1.4826 median(|dz - median(dz)|) (``center``) or 1.4826 median(|dz|) of residuals."""
    dz = np.asarray(dz, dtype=np.float64)
    if center:
        dz = dz - np.median(dz, axis=axis, keepdims=True)
    return NMAD_FACTOR * np.median(np.abs(dz), axis=axis)


def sigma_nmad(zphot, ztrue, axis=None):
    """sigma_NMAD = 1.4826 median(|dz - median(dz)|) (NNC eq. 8; RAIL ``PointSigmaMAD``)."""
    return _scalar(nmad_of(dz_norm(zphot, ztrue), axis, center=True))


def sigma_nmad_nomedian(zphot, ztrue, axis=None):
    """1.4826 median(|dz|), no median subtracted (LSTM-MDNz eq. 13, PICZL, SOM paper)."""
    return _scalar(nmad_of(dz_norm(zphot, ztrue), axis, center=False))


def bias_median(zphot, ztrue, axis=None):
    """median(dz) (LSTM-MDNz eq. 14; RAIL ``PointBias``)."""
    return _scalar(np.median(dz_norm(zphot, ztrue), axis=axis))


def bias_mean(zphot, ztrue, axis=None):
    """mean(dz) over all objects (SOM paper; PICZL uses the opposite sign)."""
    return _scalar(np.mean(dz_norm(zphot, ztrue), axis=axis))


def outlier_indicator(dz, threshold: float = ETA_THRESHOLD) -> np.ndarray:
    """|dz| > threshold as floats (1.0 / 0.0)."""
    return (np.abs(np.asarray(dz, dtype=np.float64)) > threshold).astype(np.float64)


def eta(zphot, ztrue, threshold: float = ETA_THRESHOLD, axis=None):
    """Catastrophic outlier fraction N(|dz| > 0.15) / N (a fraction, not %).

    Not RAIL's ``point_outlier_rate`` (whose cut is max(0.06, 3 sigma_IQR)).
    """
    return _scalar(np.mean(outlier_indicator(dz_norm(zphot, ztrue), threshold), axis=axis))


def _inliers(zphot, ztrue, threshold):
    d = dz_norm(zphot, ztrue)
    return d[np.abs(d) <= threshold]


def bias_inlier_mean(zphot, ztrue, threshold: float = ETA_THRESHOLD) -> float:
    """mean(dz) over objects with |dz| <= 0.15 (NNC eq. 6); NaN when there is none."""
    d = _inliers(zphot, ztrue, threshold)
    return float(d.mean()) if d.size else float("nan")


def sigma_inlier_std(zphot, ztrue, threshold: float = ETA_THRESHOLD) -> float:
    """std(dz) over objects with |dz| <= 0.15 (NNC eq. 7, ddof = 0); NaN when there is none."""
    d = _inliers(zphot, ztrue, threshold)
    return float(d.std()) if d.size else float("nan")


def pco_indicator(pit, level: float = PCO_LEVEL) -> np.ndarray:
    """1.0 where ztrue is outside the central ``level`` interval (PIT < tail or > 1 - tail)."""
    pit = np.asarray(pit, dtype=np.float64)
    tail = 0.5 * (1.0 - level)
    return ((pit < tail) | (pit > 1.0 - tail)).astype(np.float64)


def pco(pit, level: float = PCO_LEVEL, axis=None):
    """Probabilistic catastrophic outliers: fraction of PIT < (1-level)/2 or > 1-(1-level)/2."""
    return _scalar(np.mean(pco_indicator(pit, level), axis=axis))


def _scalar(x):
    """A Python float for 0-d results, the array otherwise."""
    x = np.asarray(x)
    return float(x) if x.ndim == 0 else x
