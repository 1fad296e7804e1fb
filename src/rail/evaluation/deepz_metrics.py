"""Photo-z metrics for the comparison harness, accumulated chunk by chunk.

Every metric is computed from a handful of *per-object* quantities, obtained in one pass
over a qp file (or ensemble) chunk by chunk:

* ``zphot``  the point estimate (ancil ``zmode`` by default, RAIL's convention),
* ``pit``    CDF of the PDF at the true redshift (qp's :class:`qp.metrics.pit.PIT` sampling),
* ``crps``   CRPS of the PDF at the true redshift,
* ``cde1``, ``cde2``  the two per-object terms of the CDE loss,
* ``brier``  the per-object Brier sum.

Only these O(N) float arrays are kept (8 floats per object: ~64 MB for 1e6 objects);
PDFs are evaluated on grids one chunk at a time (at most ``chunk_size x grid`` floats in
memory, and the CRPS grid in sub-blocks of ``_BLOCK`` rows), and never all held at once.
Medians, quantiles and PIT statistics are then exact (no digest approximation), and
every summary can be re-binned (by redshift, by magnitude) without another pass.

Definitions (``dz_norm = (zphot - ztrue) / (1 + ztrue)``):

================  ==========================================================================
sigma_nmad        1.4826 * median(|dz_norm|)    (the papers' NMAD, no median subtracted)
eta               fraction with |dz_norm| > 0.15 (catastrophic outliers of the papers)
bias              median(dz_norm)               (LSTM-MDNz paper eq. 14; = RAIL point_bias)
bias_inlier_mean  mean(dz_norm) over |dz_norm| <= 0.15 (NNC paper eq. 6)
rail_sigma_iqr    IQR(dz_norm) / 1.349          (RAIL ``PointSigmaIQR``)
rail_outlier_rate fraction with |dz_norm| > max(0.06, 3 sigma_IQR) (RAIL ``PointOutlierRate``)
rail_bias         median(dz_norm)               (RAIL ``PointBias``)
rail_sigma_mad    1.4826 * median(|dz_norm - median(dz_norm)|) (RAIL ``PointSigmaMAD``)
crps              mean over objects of int (F(z) - 1[z >= ztrue])^2 dz
pco               fraction whose ztrue is outside the central 99% interval: PIT < 0.005 or > 0.995
pit_ks/cvm/ad     KS, Cramer-von Mises, Anderson-Darling statistics of the PIT values against
                  U(0, 1), computed by :class:`qp.metrics.pit.PIT`
pit_outlier_rate  fraction of PIT values below 1e-4 or above 0.9999, as qp's PIT computes it
                  (from the PIT quantile ensemble)
cde_loss          mean_i int f_i(z)^2 dz - 2 mean_i f_i(ztrue_i) on the metric grid, f_i(ztrue_i)
                  at the grid point nearest to ztrue (RAIL ``CDELoss``, Izbicki & Lee 2017)
brier             qp's ``calculate_brier``: mean_i sum_j (p_ij - o_ij)^2 with p_ij the PDF
                  *density* at the grid points of qp's grid over ``brier_limits`` with step
                  ``brier_dx``, o_ij = 1 for the grid cell holding ztrue
================  ==========================================================================
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import numpy as np
import qp
from qp.metrics.metrics import _calculate_grid_parameters
from qp.metrics.pit import DEFAULT_QUANTS, PIT
from rail.evaluation.metrics.pointestimates import (
    PointBias,
    PointOutlierRate,
    PointSigmaIQR,
    PointSigmaMAD,
)

from rail.deepz.mixtures import gmm_crps_numpy
from rail.deepz.pdf import mixture_pdf_on_grid

NMAD_FACTOR = 1.4826
ETA_THRESHOLD = 0.15
PCO_LEVEL = 0.99
MIN_OBJECTS_DIST = 10  # fewer objects in a bin -> distribution metrics are NaN
_BLOCK = 2000  # rows per grid block in the CRPS integral

PER_OBJECT_KEYS = ("ztrue", "zphot", "pit", "crps", "cde1", "cde2", "brier", "mag")

# metric name -> (short description, lower is better?)
METRIC_INFO = {
    "sigma_nmad": "1.4826 median(|dz|/(1+z))",
    "eta": "fraction |dz|/(1+z) > 0.15",
    "bias": "median(dz/(1+z))",
    "bias_inlier_mean": "mean(dz/(1+z)) over |dz|/(1+z) <= 0.15",
    "rail_sigma_iqr": "RAIL sigma_IQR",
    "rail_outlier_rate": "RAIL outlier rate (> max(0.06, 3 sigma_IQR))",
    "rail_bias": "RAIL bias (median)",
    "rail_sigma_mad": "RAIL sigma_MAD (median subtracted)",
    "crps": "mean CRPS",
    "pco": "fraction of ztrue outside the central 99% interval",
    "pit_ks": "PIT KS statistic",
    "pit_cvm": "PIT Cramer-von Mises statistic",
    "pit_ad": "PIT Anderson-Darling statistic",
    "pit_outlier_rate": "PIT outlier rate (qp)",
    "cde_loss": "CDE loss",
    "brier": "Brier score (qp)",
}


# ----------------------------------------------------------------- point metrics


def dz_norm(zphot, ztrue) -> np.ndarray:
    """Normalised residual ``(zphot - ztrue) / (1 + ztrue)``."""
    zphot = np.asarray(zphot, dtype=np.float64)
    ztrue = np.asarray(ztrue, dtype=np.float64)
    return (zphot - ztrue) / (1.0 + ztrue)


def sigma_nmad(zphot, ztrue) -> float:
    """sigma_NMAD = 1.4826 x median(|zphot - ztrue| / (1 + ztrue)).

    The papers' definition (e.g. LSTM-MDNz eq. 13, with 1.4826): no median is subtracted
    from the residuals (RAIL's ``rail_sigma_mad`` subtracts it).
    """
    return float(NMAD_FACTOR * np.median(np.abs(dz_norm(zphot, ztrue))))


def eta(zphot, ztrue, threshold: float = ETA_THRESHOLD) -> float:
    """Catastrophic outlier fraction eta = N(|dz|/(1+ztrue) > 0.15) / N (a fraction, not %).

    Not RAIL's ``point_outlier_rate`` (whose cut is max(0.06, 3 sigma_IQR)).
    """
    return float(np.mean(np.abs(dz_norm(zphot, ztrue)) > threshold))


def bias(zphot, ztrue) -> float:
    """bias = median((zphot - ztrue) / (1 + ztrue)) (LSTM-MDNz eq. 14, RAIL ``PointBias``)."""
    return float(np.median(dz_norm(zphot, ztrue)))


def bias_inlier_mean(zphot, ztrue, threshold: float = ETA_THRESHOLD) -> float:
    """mean((zphot - ztrue)/(1 + ztrue)) over objects with |dz|/(1+z) <= 0.15 (NNC eq. 6)."""
    d = dz_norm(zphot, ztrue)
    keep = np.abs(d) <= threshold
    return float(d[keep].mean()) if keep.any() else float("nan")


def rail_point_metrics(zphot, ztrue) -> dict:
    """RAIL's point metrics (``rail.evaluation.metrics.pointestimates``), called as is.

    sigma_IQR = IQR(dz_norm)/1.349; outlier rate = fraction with |dz_norm| >
    max(0.06, 3 sigma_IQR); bias = median(dz_norm); sigma_MAD = 1.4826 median(|dz_norm -
    median(dz_norm)|).
    """
    zp = np.asarray(zphot, dtype=np.float64)
    zt = np.asarray(ztrue, dtype=np.float64)
    return {
        "rail_sigma_iqr": float(PointSigmaIQR(zp, zt).evaluate()),
        "rail_outlier_rate": float(PointOutlierRate(zp, zt).evaluate()),
        "rail_bias": float(PointBias(zp, zt).evaluate()),
        "rail_sigma_mad": float(PointSigmaMAD(zp, zt).evaluate()),
    }


# ----------------------------------------------------------------- PIT metrics


class PITFromSamples(PIT):
    """qp's :class:`~qp.metrics.pit.PIT` built from PIT values already computed.

    Lets the meta-metrics (KS, CvM, AD, outlier rate) of qp run on PIT values accumulated
    chunk by chunk; the construction repeats ``PIT.__init__`` after the sampling step.
    """

    def __init__(self, pit_samples, eval_grid=DEFAULT_QUANTS):  # pylint: disable=super-init-not-called
        self._pit_samps = np.asarray(pit_samples, dtype=np.float64)
        n_pit = min(len(self._pit_samps), len(eval_grid))
        if n_pit < len(eval_grid):
            eval_grid = np.linspace(0, 1, n_pit)
        data_quants = np.quantile(self._pit_samps, eval_grid)
        self._pit = self._produce_output_ensemble(data_quants, eval_grid)


def pit_values(ens: qp.Ensemble, ztrue) -> np.ndarray:
    """PIT_i = CDF_i(ztrue_i), exactly as qp's PIT samples it (non-finite values -> 0)."""
    ztrue = np.atleast_1d(np.asarray(ztrue, dtype=np.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.atleast_1d(PIT._gather_pit_samples(ens, ztrue)).astype(np.float64)


def pit_metrics(pit) -> dict:
    """KS, CvM and AD statistics of the PIT values against U(0,1) and qp's PIT outlier rate.

    All four come from :class:`qp.metrics.pit.PIT`: ``evaluate_PIT_KS`` (scipy ``kstest``),
    ``evaluate_PIT_CvM`` (scipy ``cramervonmises``), ``evaluate_PIT_anderson_ksamp``
    (k-sample AD against an evenly spaced uniform sample) and
    ``evaluate_PIT_outlier_rate`` (fraction of PIT < 1e-4 or > 0.9999).
    """
    pit = np.asarray(pit, dtype=np.float64)
    if pit.size < 2:
        return {k: float("nan") for k in ("pit_ks", "pit_cvm", "pit_ad", "pit_outlier_rate")}
    obj = PITFromSamples(pit)
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)  # qp logs "Removed N PITs" for exact 0/1 values
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = {
                "pit_ks": float(obj.evaluate_PIT_KS().statistic),
                "pit_cvm": float(obj.evaluate_PIT_CvM().statistic),
                "pit_ad": float(obj.evaluate_PIT_anderson_ksamp().statistic),
                "pit_outlier_rate": float(obj.evaluate_PIT_outlier_rate()),
            }
    finally:
        logger.setLevel(level)
    return out


def pco(pit, level: float = PCO_LEVEL) -> float:
    """Probabilistic catastrophic outliers: fraction of objects whose true redshift lies
    outside the central ``level`` (99%) interval of its PDF, i.e. PIT < (1-level)/2 or
    PIT > 1 - (1-level)/2 (SOM/embedding-MDN paper)."""
    pit = np.asarray(pit, dtype=np.float64)
    tail = 0.5 * (1.0 - level)
    return float(np.mean((pit < tail) | (pit > 1.0 - tail)))


# ----------------------------------------------------------------- CRPS


def _ensemble_support(ens: qp.Ensemble, default) -> tuple[float, float]:
    """[lo, hi] covering the tabulated support of interp/hist ensembles and ``default``."""
    lo, hi = float(default[0]), float(default[1])
    md = ens.metadata
    for key in ("xvals", "bins"):
        if key in md:
            x = np.asarray(md[key], dtype=np.float64).ravel()
            lo, hi = min(lo, x.min()), max(hi, x.max())
    return lo, hi


def crps_grid(cdf: np.ndarray, grid: np.ndarray, ztrue) -> np.ndarray:
    """CRPS_i = int (F_i(x) - 1[x >= z_i])^2 dx from CDFs tabulated on ``grid`` (N, G).

    Written as ``int_lo^hi F^2 - 2 int_zc^hi F + (hi - zc) + |z - zc|`` with
    ``zc = clip(z, lo, hi)``, taking F linear between grid points (exact for ``qp.hist``
    tabulated on a grid holding its bin edges); the step at ``z`` is integrated exactly. Assumes F = 0 below ``lo`` and
    F = 1 above ``hi`` (the grid covers the PDF's support). Vectorised.
    """
    cdf = np.clip(np.asarray(cdf, dtype=np.float64), 0.0, 1.0)
    grid = np.asarray(grid, dtype=np.float64)
    z = np.asarray(ztrue, dtype=np.float64)
    lo, hi = grid[0], grid[-1]
    dx = np.diff(grid)
    c1 = np.zeros_like(cdf)
    c2 = np.zeros_like(cdf)
    f0, f1 = cdf[:, :-1], cdf[:, 1:]
    # F linear on each grid interval: int F^2 = dx (f0^2 + f0 f1 + f1^2) / 3 exactly
    c1[:, 1:] = np.cumsum((f0 * f0 + f0 * f1 + f1 * f1) * (dx / 3.0), axis=1)
    c2[:, 1:] = np.cumsum(0.5 * (cdf[:, 1:] + cdf[:, :-1]) * dx, axis=1)
    zc = np.clip(z, lo, hi)
    j = np.clip(np.searchsorted(grid, zc, side="right") - 1, 0, grid.size - 2)
    rows = np.arange(cdf.shape[0])
    # exact integral of the linear CDF piece from grid[j] to zc
    t = zc - grid[j]
    f0 = cdf[rows, j]
    slope = (cdf[rows, j + 1] - f0) / dx[j]
    g2_at_z = c2[rows, j] + f0 * t + 0.5 * slope * t * t
    return c1[:, -1] - 2.0 * (c2[:, -1] - g2_at_z) + (hi - zc) + np.abs(z - zc)


def _is_mixmod(ens: qp.Ensemble) -> bool:
    """Whether ``ens`` holds Gaussian mixtures (``qp.mixmod``)."""
    return getattr(ens.gen_class, "name", "") == "mixmod"


def crps(ens: qp.Ensemble, ztrue, limits=(0.0, 3.0), npts: int = 3001) -> np.ndarray:
    """Per-object CRPS = int (F(x) - 1[x >= ztrue])^2 dx of each PDF at its true redshift.

    Exact closed form for ``qp.mixmod`` (Gaussian mixtures,
    :func:`rail.deepz.mixtures.gmm_crps_numpy`); otherwise the CDF is tabulated on
    ``npts`` evenly spaced points over ``limits`` widened to the ensemble's tabulated
    support, and integrated with :func:`crps_grid` (in blocks of rows).
    """
    ztrue = np.atleast_1d(np.asarray(ztrue, dtype=np.float64))
    if _is_mixmod(ens):
        od = ens.objdata
        return gmm_crps_numpy(od["weights"], od["means"], od["stds"], ztrue)
    lo, hi = _ensemble_support(ens, limits)
    step = (limits[1] - limits[0]) / max(npts - 1, 1)
    grid = np.linspace(lo, hi, int(round((hi - lo) / step)) + 1)
    out = np.empty(ens.npdf)
    for s in range(0, ens.npdf, _BLOCK):
        e = min(s + _BLOCK, ens.npdf)
        sub = ens[s:e] if (s, e) != (0, ens.npdf) else ens
        out[s:e] = crps_grid(np.asarray(sub.cdf(grid)).reshape(e - s, -1), grid, ztrue[s:e])
    return out


# ----------------------------------------------------------------- CDE loss, Brier


def ensemble_pdf(ens: qp.Ensemble, grid) -> np.ndarray:
    """``ens.pdf(grid)`` as an (N, G) float64 array. Gaussian mixtures (``qp.mixmod``, all
    widths > 0) are evaluated by :func:`rail.deepz.pdf.mixture_pdf_on_grid` (the same sum,
    faster than qp's scipy-based evaluation); anything else by qp."""
    grid = np.asarray(grid, dtype=np.float64).reshape(-1)
    if _is_mixmod(ens):
        od = ens.objdata
        stds = np.asarray(od["stds"])
        if stds.ndim == 2 and np.all(stds > 0) and np.all(np.isfinite(stds)):
            return mixture_pdf_on_grid(od["weights"], od["means"], stds, grid)
    return np.asarray(ens.pdf(grid), dtype=np.float64).reshape(ens.npdf, -1)


def nearest_index(grid: np.ndarray, x) -> np.ndarray:
    """Index of the grid point nearest to each x (ties -> lower index, like ``argmin``)."""
    grid = np.asarray(grid, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    j = np.clip(np.searchsorted(grid, x, side="left"), 1, grid.size - 1)
    left_closer = np.abs(x - grid[j - 1]) <= np.abs(grid[j] - x)
    return np.where(left_closer, j - 1, j)


def cde_terms(pdf_on_grid: np.ndarray, grid: np.ndarray, ztrue) -> tuple[np.ndarray, np.ndarray]:
    """Per-object CDE-loss terms: (int f^2 dz by trapezoid, f at the grid point nearest ztrue).

    ``cde_loss = mean(term1) - 2 mean(term2)`` (RAIL ``CDELoss``; Izbicki & Lee 2017).
    """
    t1 = np.trapezoid(pdf_on_grid**2, x=grid, axis=1)
    t2 = pdf_on_grid[np.arange(pdf_on_grid.shape[0]), nearest_index(grid, ztrue)]
    return t1, t2


def brier_terms(ens: qp.Ensemble, ztrue, limits=(0.0, 3.0), dx: float = 0.01) -> np.ndarray:
    """Per-object Brier sums as qp's ``calculate_brier`` defines them.

    qp's grid over ``limits`` with step ``dx`` (``_calculate_grid_parameters``); prediction
    p_ij = PDF density at grid value j; o_ij = 1 for the cell (histogram bin centred on
    grid value j) containing ztrue_i, else 0. Term_i = sum_j (p_ij - o_ij)^2 =
    sum_j p_ij^2 - 2 p_ik + 1 (k the cell of ztrue; the last two terms vanish when ztrue is
    outside the grid, where qp would widen the limits instead). brier = mean_i term_i.
    """
    g = _calculate_grid_parameters(limits, dx)
    p = ensemble_pdf(ens, g.grid_values)
    z = np.atleast_1d(np.asarray(ztrue, dtype=np.float64))
    edges = g.hist_bin_edges
    k = np.searchsorted(edges, z, side="right") - 1
    k = np.where(z == edges[-1], edges.size - 2, k)  # np.histogram's closed last bin
    inside = (k >= 0) & (k < edges.size - 1)
    kk = np.clip(k, 0, edges.size - 2)
    pk = p[np.arange(p.shape[0]), kk]
    return (p**2).sum(axis=1) + np.where(inside, 1.0 - 2.0 * pk, 0.0)


# ----------------------------------------------------------------- accumulation


@dataclass
class MetricConfig:
    """Grids and conventions of the metrics.

    Attributes
    ----------
    point_estimate : str
        Ancil key of the point estimate (``zmode``: RAIL's default); if absent from the
        ensemble it is computed as the mode on ``zgrid``.
    zgrid : array
        Grid for the CDE loss and the example PDFs (RAIL's ``x_grid``).
    crps_limits, crps_npts : grid of the CRPS integral for non-mixture PDFs.
    brier_limits, brier_dx : qp's Brier grid.
    """

    point_estimate: str = "zmode"
    zgrid: np.ndarray = field(default_factory=lambda: np.linspace(0.0, 3.0, 301))
    crps_limits: tuple = (0.0, 3.0)
    crps_npts: int = 3001
    brier_limits: tuple = (0.0, 3.0)
    brier_dx: float = 0.01

    @classmethod
    def for_range(cls, zmin: float, zmax: float, **kw) -> "MetricConfig":
        """Grids spanning [zmin, zmax] (301 points for CDE, step 1e-3 for CRPS)."""
        npts = int(round((zmax - zmin) / 0.001)) + 1
        return cls(zgrid=np.linspace(zmin, zmax, 301), crps_limits=(zmin, zmax), crps_npts=npts,
                   brier_limits=(zmin, zmax), **kw)


class MetricAccumulator:
    """Collects per-object quantities chunk by chunk; summaries come at the end.

    Memory: the per-object arrays (``PER_OBJECT_KEYS``, 8 floats per object) plus one
    chunk of PDFs on the grids. ``keep_pdfs`` (global row indices) stores those objects'
    PDFs on ``zgrid`` for plotting.
    """

    def __init__(self, config: MetricConfig | None = None, keep_pdfs: Iterable[int] = ()):
        self.config = config or MetricConfig()
        self._parts: dict[str, list] = {k: [] for k in PER_OBJECT_KEYS}
        self.keep = np.sort(np.asarray(list(keep_pdfs), dtype=np.int64))
        self.kept_pdfs: dict[int, np.ndarray] = {}
        self.n = 0

    def point_estimate(self, ens: qp.Ensemble) -> np.ndarray:
        key = self.config.point_estimate
        if ens.ancil is not None and key in ens.ancil:
            return np.asarray(ens.ancil[key], dtype=np.float64).reshape(-1)
        if key in ("zmode", "mode"):
            return np.asarray(ens.mode(grid=self.config.zgrid), dtype=np.float64).reshape(-1)
        if key in ("zmedian", "median"):
            return np.asarray(ens.median(), dtype=np.float64).reshape(-1)
        if key in ("zmean", "mean"):
            return np.asarray(ens.mean(), dtype=np.float64).reshape(-1)
        raise KeyError(f"point estimate {key!r} is neither in the ensemble's ancil nor zmode/zmean/zmedian")

    def add(self, ens: qp.Ensemble, ztrue, mag=None, start: int | None = None) -> None:
        """Add one chunk: ``ens`` (n PDFs) with true redshifts ``ztrue`` (n,) and magnitudes."""
        cfg = self.config
        ztrue = np.atleast_1d(np.asarray(ztrue, dtype=np.float64))
        if ens.npdf != ztrue.size:
            raise ValueError(f"{ens.npdf} PDFs but {ztrue.size} true redshifts in this chunk")
        start = self.n if start is None else start
        pdf = ensemble_pdf(ens, cfg.zgrid)
        t1, t2 = cde_terms(pdf, cfg.zgrid, ztrue)
        parts = {
            "ztrue": ztrue,
            "zphot": self.point_estimate(ens),
            "pit": pit_values(ens, ztrue),
            "crps": crps(ens, ztrue, cfg.crps_limits, cfg.crps_npts),
            "cde1": t1,
            "cde2": t2,
            "brier": brier_terms(ens, ztrue, cfg.brier_limits, cfg.brier_dx),
            "mag": (np.full(ztrue.size, np.nan) if mag is None
                    else np.asarray(mag, dtype=np.float64).reshape(-1)),
        }
        for k, v in parts.items():
            self._parts[k].append(v)
        if self.keep.size:
            sel = self.keep[(self.keep >= start) & (self.keep < start + ens.npdf)]
            for i in sel:
                self.kept_pdfs[int(i)] = pdf[i - start].copy()
        self.n += ens.npdf

    def per_object(self) -> dict:
        return {k: (np.concatenate(v) if v else np.zeros(0)) for k, v in self._parts.items()}


def summarize_group(po: Mapping) -> dict:
    """All metrics (see module docstring) of one group of objects (per-object arrays)."""
    n = len(po["ztrue"])
    nan = float("nan")
    if n == 0:
        return {k: nan for k in METRIC_INFO}
    zp, zt = po["zphot"], po["ztrue"]
    out = {
        "sigma_nmad": sigma_nmad(zp, zt),
        "eta": eta(zp, zt),
        "bias": bias(zp, zt),
        "bias_inlier_mean": bias_inlier_mean(zp, zt),
    }
    out.update(rail_point_metrics(zp, zt))
    out["crps"] = float(np.mean(po["crps"]))
    out["pco"] = pco(po["pit"])
    if n >= MIN_OBJECTS_DIST:
        out.update(pit_metrics(po["pit"]))
    else:
        out.update({k: nan for k in ("pit_ks", "pit_cvm", "pit_ad", "pit_outlier_rate")})
    out["cde_loss"] = float(np.mean(po["cde1"]) - 2.0 * np.mean(po["cde2"]))
    out["brier"] = float(np.mean(po["brier"]))
    return out


def default_z_edges(zmin: float, zmax: float, nbins: int = 6) -> np.ndarray:
    return np.linspace(zmin, zmax, nbins + 1)


def default_mag_edges(mag: np.ndarray, width: float = 1.0) -> np.ndarray:
    """Edges every ``width`` mag between the 1st and 99th percentiles of finite, < 90 mags."""
    m = np.asarray(mag, dtype=np.float64)
    m = m[np.isfinite(m) & (m < 90)]
    if m.size == 0:
        return np.zeros(0)
    lo, hi = np.floor(np.percentile(m, 1)), np.ceil(np.percentile(m, 99))
    return np.arange(lo, hi + 0.5 * width, width)


def tidy_metrics(po: Mapping, estimator: str, z_edges=None, mag_edges=None) -> list[dict]:
    """Tidy rows ``estimator, bin_type, bin_lo, bin_hi, metric, value, n``.

    ``bin_type`` is ``all`` (every object), ``redshift`` (bins of the *true* redshift,
    [lo, hi)) or ``magnitude`` (bins of the reference magnitude, [lo, hi)).
    """
    rows = []

    def emit(bin_type, lo, hi, mask):
        sub = {k: np.asarray(v)[mask] for k, v in po.items()}
        n = int(mask.sum())
        for metric, value in summarize_group(sub).items():
            rows.append(dict(estimator=estimator, bin_type=bin_type, bin_lo=float(lo), bin_hi=float(hi),
                             metric=metric, value=value, n=n))

    zt = np.asarray(po["ztrue"])
    emit("all", np.nan if zt.size == 0 else zt.min(), np.nan if zt.size == 0 else zt.max(),
         np.ones(zt.size, dtype=bool))
    for bin_type, col, edges in (("redshift", "ztrue", z_edges), ("magnitude", "mag", mag_edges)):
        if edges is None or len(edges) < 2:
            continue
        x = np.asarray(po[col], dtype=np.float64)
        for lo, hi in zip(edges[:-1], edges[1:]):
            mask = (x >= lo) & (x < hi)
            if mask.any():
                emit(bin_type, lo, hi, mask)
    return rows


# ----------------------------------------------------------------- one estimate


def iterate_ensemble(estimate, chunk_size: int):
    """Yield (start, end, qp.Ensemble chunk) from a qp file path (qp.iterator) or an ensemble."""
    if isinstance(estimate, qp.Ensemble):
        if estimate.npdf <= chunk_size:  # (qp cannot slice a one-PDF ensemble)
            yield 0, estimate.npdf, estimate
            return
        for s in range(0, estimate.npdf, chunk_size):
            e = min(s + chunk_size, estimate.npdf)
            yield s, e, estimate[s:e]
    else:
        yield from qp.iterator(str(estimate), chunk_size=chunk_size)


def ensemble_length(estimate) -> int:
    if isinstance(estimate, qp.Ensemble):
        return estimate.npdf
    return int(qp.data_length(str(estimate)))


def accumulate_estimate(
    estimate,
    ztrue,
    mag=None,
    *,
    config: MetricConfig | None = None,
    chunk_size: int = 10_000,
    keep_pdfs: Iterable[int] = (),
    progress=None,
    label: str = "",
) -> MetricAccumulator:
    """One streaming pass over ``estimate`` (qp file path or ensemble) against the truth.

    ``ztrue``/``mag`` are full-length arrays aligned with the ensemble rows.
    ``progress`` is a callable receiving a message per chunk (or None).
    """
    ztrue = np.asarray(ztrue, dtype=np.float64)
    n = ensemble_length(estimate)
    if n != ztrue.size:
        raise ValueError(
            f"estimate {label or estimate!s} has {n} PDFs but the truth table has {ztrue.size} rows"
        )
    acc = MetricAccumulator(config, keep_pdfs)
    t0 = time.perf_counter()
    for s, e, ens in iterate_ensemble(estimate, chunk_size):
        acc.add(ens, ztrue[s:e], None if mag is None else np.asarray(mag)[s:e], start=s)
        if progress is not None:
            rate = e / max(time.perf_counter() - t0, 1e-9)
            progress(f"  metrics {label}: {e}/{n} objects ({100 * e / n:.0f}%, {rate:,.0f}/s)")
    return acc
