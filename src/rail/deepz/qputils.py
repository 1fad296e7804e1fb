"""Helpers on any ``qp`` ensemble, in NumPy/qp only (no torch): its representation, PIT and
point estimates.

Used by the metrics (:mod:`rail.evaluation.deepz_metrics`) and the SOM flagger on
ensembles they read, so that neither imports torch; :mod:`rail.deepz.pdf` (which builds the
estimators' ensembles with torch) imports them from here.
"""

from __future__ import annotations

import numpy as np
import qp


def representation(ens: qp.Ensemble) -> str:
    """The qp parameterisation of ``ens`` (``"hist"``, ``"interp"``, ``"mixmod"``, ...; ``""`` if unnamed)."""
    return str(getattr(ens.gen_class, "name", ""))


def ensemble_point_estimate(ens: qp.Ensemble, key: str, zgrid) -> np.ndarray:
    """Point estimate ``key`` of every PDF of any qp ensemble -> (N,) float64.

    The ancil column ``key`` when the ensemble has one; otherwise computed from the PDFs:
    ``zmode``/``mode`` = the grid point of highest density on ``zgrid`` (as ``qp``'s
    ``mode``), ``zmedian``/``median`` and ``zmean``/``mean`` by qp. Any other key absent
    from the ancil is an error (no silent substitute).
    """
    if ens.ancil is not None and key in ens.ancil:
        return np.asarray(ens.ancil[key], dtype=np.float64).reshape(-1)
    if key in ("zmode", "mode"):
        grid = np.asarray(zgrid, dtype=np.float64).reshape(-1)
        return grid[np.argmax(np.asarray(ens.pdf(grid)).reshape(ens.npdf, -1), axis=1)]
    if key in ("zmedian", "median"):
        return np.asarray(ens.median(), dtype=np.float64).reshape(-1)
    if key in ("zmean", "mean"):
        return np.asarray(ens.mean(), dtype=np.float64).reshape(-1)
    raise KeyError(f"point estimate {key!r} is neither in the ensemble's ancil nor zmode/zmean/zmedian")


def ensemble_pit(ens: qp.Ensemble, z) -> np.ndarray:
    """PIT_i = CDF_i(z_i) of any qp ensemble (N PDFs, N redshifts) -> (N,) float64, as
    ``qp.metrics.pit.PIT`` samples it (``ens.cdf`` at each object's own redshift; a
    non-finite value becomes 0, qp's convention)."""
    z = np.atleast_1d(np.asarray(z, dtype=np.float64)).reshape(-1)
    if len(z) != ens.npdf:
        raise ValueError(f"The ensemble has {ens.npdf} PDFs but {len(z)} redshifts were given")
    with np.errstate(invalid="ignore"):
        pit = np.asarray(ens.cdf(z[:, None]), dtype=np.float64).reshape(-1)
    pit[~np.isfinite(pit)] = 0.0
    return pit


def ensemble_point_and_pit(ens: qp.Ensemble, z, point: str, zmin: float, zmax: float,
                           chunk: int = 10000) -> tuple[np.ndarray, np.ndarray]:
    """:func:`ensemble_point_estimate` (a missing ``zmode`` from a 1201-point grid over
    [zmin, zmax]) and :func:`ensemble_pit` of any qp ensemble, ``chunk`` PDFs at a time."""
    z = np.asarray(z, dtype=np.float64).reshape(-1)
    n = ens.npdf
    if len(z) != n:
        raise ValueError(f"The ensemble has {n} PDFs but the truth table has {len(z)} rows")
    grid = np.linspace(zmin, zmax, 1201)
    points, pits = [], []
    for s in range(0, max(n, 1), chunk):
        part = ens if n <= chunk else ens[s : min(s + chunk, n)]
        points.append(ensemble_point_estimate(part, point, grid))
        pits.append(ensemble_pit(part, z[s : s + chunk]))
    return np.concatenate(points), np.concatenate(pits)
