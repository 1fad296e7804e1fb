"""Photo-z metrics for the comparison harness, accumulated chunk by chunk in bounded memory.

Every metric is computed from a handful of *per-object* quantities, obtained in one pass
over a qp file (or ensemble) chunk by chunk:

* ``zphot``  the point estimate (ancil ``zmode`` by default, RAIL's convention),
* ``pit``    CDF of the PDF at the true redshift,
* ``crps``   CRPS of the PDF at the true redshift,
* ``cde1``, ``cde2``  the two per-object terms of the CDE loss,
* ``brier``  the per-object Brier sum,
* ``bad_pdf``, ``bad_truth``  flags of rows that cannot be scored (see below).

These are not kept per object: each block is summarised at once into a
:class:`GroupSummary` per group of the table (all rows, each redshift and magnitude bin;
:class:`MetricGroups`), whose memory does not depend on the number of objects (~5 MB per
group; a 1e8-object pass needs what a 1e5-object one does). Exact in the summaries: the means
(CRPS, CDE loss, Brier, bias_mean, the inlier mean and std) and the counts at fixed thresholds
(eta, PCO, PIT outlier rate, bad rows). Binned, with stated bounds
(:mod:`rail.evaluation.deepz_sketch`; asserted in ``tests/test_metric_sketch.py`` against
numpy / scipy / qp on the exact values, measured errors in CHANGELOG.md): the quantiles of dz
(sigma_nmad, bias_median, sigma_IQR: 2e-4 relative at most; RAIL's outlier rate) and the PIT
statistics (KS within 1/2^16, CvM 1e-4 relative, AD 1e-3 relative). Groups of up to a few thousand objects
are reconstructed exactly (one code path; no exact twin for small runs). The per-object
arrays are kept only on request (``per_object=True``: :meth:`MetricAccumulator.per_object`,
66 bytes per object) for callers that resample or subset objects; :func:`summarize_group`
computes the metrics of such arrays exactly (numpy, scipy's statistics as qp calls them) and
is the reference of the tests. PDFs are evaluated in blocks of ``_BLOCK`` rows and never all
held at once. The truth columns come whole (arrays) or, from an HDF5 file whose ids follow the
estimate's rows, slice by slice with its chunks (:mod:`rail.evaluation.deepz_truth`).

Direct paths: ``qp.hist``, ``qp.interp`` and ``qp.mixmod`` estimates are read and evaluated
from their stored parameters by :mod:`rail.evaluation.deepz_pdfblock` (equal to qp's values
within the tolerances stated in ``tests/test_metrics_fast.py``); other representations
through qp.

Rows that cannot be scored. A PDF with any non-finite parameter, whose integral is not
positive, or whose point estimate is not finite is ``bad_pdf``; a non-finite true redshift is
``bad_truth``. Their per-object values are NaN. :func:`accumulate_estimate` raises an error
naming the count and the first rows unless ``exclude_bad=True``, in which case they are
left out of every metric; either way the table has the counts (``n_bad_pdf``,
``n_bad_truth``). Nothing is dropped silently, so a NaN PDF cannot lower an outlier rate.

Ids. When the estimate's ancil and the truth table both have an id column, rows are matched
by id (:func:`align_to_truth`): the truth is reordered to the estimate's order when only
the order differs; different id sets are an error naming how many are missing and extra.

Definitions (``dz = (zphot - ztrue) / (1 + ztrue)``; point metrics from
:mod:`rail.deepz.pointmetrics`, which says which paper uses which):

===================  ======================================================================
sigma_nmad           1.4826 median(|dz - median(dz)|)  (NNC eq. 8; RAIL ``PointSigmaMAD``)
sigma_nmad_nomedian  1.4826 median(|dz|)  (LSTM-MDNz eq. 13, PICZL, SOM paper)
eta                  fraction with |dz| > 0.15 (catastrophic outliers of the papers)
bias_median          median(dz)  (LSTM-MDNz eq. 14; RAIL ``PointBias``)
bias_mean            mean(dz)  (SOM paper; PICZL with the opposite sign)
bias_inlier_mean     mean(dz) over |dz| <= 0.15 (NNC eq. 6)
sigma_inlier_std     std(dz) over |dz| <= 0.15 (NNC eq. 7)
rail_sigma_iqr       IQR(dz) / 1.349 (RAIL ``PointSigmaIQR``; DeepDISC eq. 4)
rail_outlier_rate    fraction with |dz| > max(0.06, 3 sigma_IQR) (RAIL ``PointOutlierRate``;
                     DeepDISC eq. 5)
crps                 mean over objects of int (F(z) - 1[z >= ztrue])^2 dz
pco                  fraction whose ztrue is outside the central 99% interval: PIT < 0.005
                     or > 0.995 (SOM paper)
pit_ks/cvm/ad        KS, Cramer-von Mises, Anderson-Darling statistics of the PIT values
                     against U(0, 1), as :class:`qp.metrics.pit.PIT` defines them (scipy's
                     kstest, cramervonmises, anderson_ksamp), computed by :func:`pit_statistics`
pit_outlier_rate     fraction of PIT values below 1e-4 or above 0.9999, counted on the PIT values
                     (qp's ``evaluate_PIT_outlier_rate`` reads it off a quantile fit of the PITs,
                     which is not a fraction when many PITs sit at exactly 0 or 1: kNN on VVDS-deep
                     gave 3.5e15)
cde_loss             mean_i int f_i(z)^2 dz - 2 mean_i f_i(ztrue_i) on the metric grid,
                     f_i(ztrue_i) at the grid point nearest to ztrue (RAIL ``CDELoss``)
brier                qp's ``calculate_brier``: mean_i sum_j (p_ij - o_ij)^2 with p_ij the
                     PDF *density* at the grid points of qp's grid over ``brier_limits`` with
                     step ``brier_dx``, o_ij = 1 for the grid cell holding ztrue
n_bad_pdf            rows whose PDF or point estimate is not finite (``all`` rows only)
n_bad_truth          rows whose true redshift is not finite (``all`` rows only)
===================  ======================================================================

Small or degenerate groups: a group (overall or one bin) with fewer than
``MIN_OBJECTS`` (10) objects gets NaN for every metric, with its count, and a
:class:`MetricWarning`; a metric that cannot be computed on a group (e.g. qp's PIT
statistics when every PIT is ~1) gets NaN and a warning, and the other metrics stay.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import numpy as np
import qp
from qp.metrics.metrics import _calculate_grid_parameters
from qp.metrics.pit import DEFAULT_QUANTS, PIT
from rail.evaluation.metrics.pointestimates import PointOutlierRate, PointSigmaIQR

from rail.deepz import pointmetrics as pm
from rail.deepz.gmm import pair_blocks
from rail.deepz.qputils import ensemble_pit, ensemble_point_estimate

from .deepz_mixsums import MixtureSquares, even_step
from .deepz_sketch import PITSketch, ResidualSketch, SortedRuns
from .deepz_truth import HDF5_SUFFIXES
from .deepz_pdfblock import (  # noqa: F401 - re-exported: the metrics' names for them
    _BLOCK,
    DIRECT_KINDS,
    PDFBlock,
    _cumsum_rows,
    _prefetched,
    _to_ensemble,
    crps,
    crps_grid,
    crps_qp,
    ensemble_length,
    ensemble_pdf,
    iterate_blocks,
    iterate_ensemble,
)

MIN_OBJECTS = 10  # fewer objects in a group (overall or bin) -> its metrics are NaN
ID_COLUMNS = ("id", "object_id", "objectId", "galaxy_id")  # looked for when no id column is named

PER_OBJECT_KEYS = ("ztrue", "zphot", "pit", "crps", "cde1", "cde2", "brier", "mag", "bad_pdf", "bad_truth")
_STAT_CHUNK = 1 << 18  # values per slice of the PIT statistics (bounded temporaries)
#: PIT values outside these limits are PIT outliers (qp's ``evaluate_PIT_outlier_rate`` defaults)
PIT_OUTLIER_LIMITS = (1e-4, 0.9999)
PIT_KEYS = ("pit_ks", "pit_cvm", "pit_ad", "pit_outlier_rate")

# metric name -> short description
METRIC_INFO = {
    "sigma_nmad": "1.4826 median(|dz - median(dz)|), dz = (zp-z)/(1+z)",
    "sigma_nmad_nomedian": "1.4826 median(|dz|)",
    "eta": "fraction |dz| > 0.15",
    "bias_median": "median(dz)",
    "bias_mean": "mean(dz)",
    "bias_inlier_mean": "mean(dz) over |dz| <= 0.15",
    "sigma_inlier_std": "std(dz) over |dz| <= 0.15",
    "rail_sigma_iqr": "RAIL sigma_IQR",
    "rail_outlier_rate": "RAIL outlier rate (> max(0.06, 3 sigma_IQR))",
    "crps": "mean CRPS",
    "pco": "fraction of ztrue outside the central 99% interval",
    "pit_ks": "PIT KS statistic",
    "pit_cvm": "PIT Cramer-von Mises statistic",
    "pit_ad": "PIT Anderson-Darling statistic",
    "pit_outlier_rate": "PIT outlier rate (qp)",
    "cde_loss": "CDE loss",
    "brier": "Brier score (qp)",
}
COUNT_METRICS = ("n_bad_pdf", "n_bad_truth")

# the point-metric functions, re-exported: their one home is rail.deepz.pointmetrics
dz_norm = pm.dz_norm
sigma_nmad = pm.sigma_nmad
sigma_nmad_nomedian = pm.sigma_nmad_nomedian
eta = pm.eta
bias_median = pm.bias_median
bias_mean = pm.bias_mean
bias_inlier_mean = pm.bias_inlier_mean
sigma_inlier_std = pm.sigma_inlier_std
pco = pm.pco


class MetricWarning(UserWarning):
    """A metric of one group could not be computed (too few objects, degenerate PITs)."""


# ----------------------------------------------------------------- point metrics


def point_metrics(zphot, ztrue) -> dict:
    """Every point metric of the table (see the module docstring) of one group."""
    zp = np.asarray(zphot, dtype=np.float64)
    zt = np.asarray(ztrue, dtype=np.float64)
    return {
        "sigma_nmad": sigma_nmad(zp, zt),
        "sigma_nmad_nomedian": sigma_nmad_nomedian(zp, zt),
        "eta": eta(zp, zt),
        "bias_median": bias_median(zp, zt),
        "bias_mean": bias_mean(zp, zt),
        "bias_inlier_mean": bias_inlier_mean(zp, zt),
        "sigma_inlier_std": sigma_inlier_std(zp, zt),
        **rail_point_metrics(zp, zt),
    }


def rail_point_metrics(zphot, ztrue) -> dict:
    """RAIL's sigma_IQR and outlier rate (``rail.evaluation.metrics.pointestimates``), called as is.

    sigma_IQR = IQR(dz)/1.349; outlier rate = fraction with |dz| > max(0.06, 3 sigma_IQR).
    (RAIL's ``PointBias`` and ``PointSigmaMAD`` are ``bias_median`` and ``sigma_nmad``.)
    """
    zp = np.asarray(zphot, dtype=np.float64)
    zt = np.asarray(ztrue, dtype=np.float64)
    return {
        "rail_sigma_iqr": float(PointSigmaIQR(zp, zt).evaluate()),
        "rail_outlier_rate": float(PointOutlierRate(zp, zt).evaluate()),
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
    """PIT_i = CDF_i(ztrue_i) through qp, exactly as qp's PIT samples it (non-finite -> 0):
    :func:`rail.deepz.pdf.ensemble_pit`, the general path."""
    return ensemble_pit(ens, ztrue)


def pit_metrics(pit) -> dict:
    """KS, CvM and AD statistics of the PIT values against U(0,1), and the PIT outlier rate.

    The statistics of :class:`qp.metrics.pit.PIT` (``evaluate_PIT_KS``: scipy ``kstest``;
    ``evaluate_PIT_CvM``: scipy ``cramervonmises``; ``evaluate_PIT_anderson_ksamp``: scipy's
    midrank k-sample AD of the PITs in [0, 1] against as many evenly spaced values on [0, 1]),
    computed by :func:`pit_statistics` from one sort of the PIT values (qp's path,
    :func:`pit_metrics_qp`, sorts them five times and builds a quantile ensemble it does not
    use here; equal to 1e-9 relative, ``tests/test_metrics_fast.py``). The outlier rate is the
    fraction of PIT values < 1e-4 or > 0.9999, counted directly: qp's
    ``evaluate_PIT_outlier_rate`` takes it from a quantile fit of the PIT distribution, which
    agrees on smooth PIT samples but is not a fraction at all (values > 1) when many PITs are
    exactly 0 or 1 (PDFs of finite support).
    """
    pit = np.asarray(pit, dtype=np.float64)
    if pit.size < 2:
        return {k: float("nan") for k in PIT_KEYS}
    out = pit_statistics(pit)
    out["pit_outlier_rate"] = float(np.mean((pit < PIT_OUTLIER_LIMITS[0]) | (pit > PIT_OUTLIER_LIMITS[1])))
    return out


def pit_statistics(pit) -> dict:
    """``pit_ks``, ``pit_cvm``, ``pit_ad`` of PIT values (n >= 2) against U(0, 1), as scipy's
    ``kstest``, ``cramervonmises`` and ``anderson_ksamp`` (midrank variant, Scholz & Stephens
    1987 eq. 7, normalised as scipy does) compute them on the arrays qp gives them: the exact
    values' runs (:class:`~rail.evaluation.deepz_sketch.SortedRuns`) through
    :func:`pit_statistics_runs`. Raises ``ValueError`` as scipy does when the AD sample is degenerate."""
    return pit_statistics_runs(SortedRuns(pit))


def _lin_value(i, m: int):
    """``np.linspace(0, 1, m)[i]`` as numpy computes it (i * step, the last value exactly 1)."""
    i = np.asarray(i, dtype=np.float64)
    if m == 1:
        return np.zeros_like(i)
    return np.where(i == m - 1, 1.0, i * (1.0 / (m - 1)))


def _lin_count_le(v: float, m: int) -> int:
    """How many values of ``np.linspace(0, 1, m)`` are <= v."""
    if v < 0.0:
        return 0
    if v >= 1.0:
        return m
    j0 = int(min(max(np.floor(v * max(m - 1, 1)) - 1, -1), m - 1))
    cnt = j0 + 1
    for d in (1, 2, 3):
        if j0 + d <= m - 1 and float(_lin_value(j0 + d, m)) <= v:
            cnt += 1
    return cnt


def _ad_h_g(big_n: int, chunk: int = _STAT_CHUNK) -> tuple[float, float]:
    """scipy's h = sum_{i<N} 1/i and g of the AD variance, in slices of ``chunk`` terms (no
    array of N values: ``hs_cs = cumsum(1/(N-1), ..., 1/2)``, g = sum(hs_cs / (2..N-1)))."""
    carry, g = 0.0, 0.0
    for s in range(0, big_n - 2, chunk):
        e = min(s + chunk, big_n - 2)
        hs = (1.0 / np.arange(big_n - 1 - s, big_n - 1 - e, -1)).cumsum() + carry
        g += float((hs / np.arange(2 + s, 2 + e)).sum())
        carry = float(hs[-1])
    return carry + 1.0, g


def pit_statistics_runs(src, chunk: int | None = None) -> dict:
    """KS, CvM and AD statistics (see :func:`pit_statistics`) from sorted runs of PIT values.

    ``src`` gives the values in [0, 1] as runs (distinct sorted values and their multiplicities:
    ``n_entries``, ``entries(i0, i1)``, ``entry_value(i)``, ``entries_le(v)``, ``m`` values in all)
    and ``below`` / ``above`` counts of values < 0 / > 1: :class:`~rail.evaluation.deepz_sketch.SortedRuns`
    (exact values) or :class:`~rail.evaluation.deepz_sketch.PITSketch` (the bounded summary).
    Everything is streamed in slices of ``chunk`` runs (default ``_STAT_CHUNK``); the memory is that
    of a slice whatever the number of values. A run of c equal values u at ranks i0+1..i0+c adds
    max((i0+c)/n - u, u - i0/n) to KS and c (abar - u)^2 + (c^3 - c)/(12 n^2) to CvM (abar: the mean
    of (2i-1)/(2n) over the run), the same sums as value by value."""
    chunk = _STAT_CHUNK if chunk is None else int(chunk)
    m, below, above = int(src.m), int(src.below), int(src.above)
    n = below + m + above
    ks, cvm, done = 0.0, 1.0 / (12 * n), 0

    def runs():
        if below:
            yield np.zeros(1), np.array([below])
        for s in range(0, src.n_entries, chunk):
            yield src.entries(s, min(s + chunk, src.n_entries))
        if above:
            yield np.ones(1), np.array([above])

    for vals, cnts in runs():
        u = np.clip(np.asarray(vals, dtype=np.float64), 0.0, 1.0)  # scipy.stats.uniform.cdf
        c = np.asarray(cnts, dtype=np.float64)
        i_end = done + np.cumsum(c)
        i_start = i_end - c
        ks = max(ks, float(np.max(i_end / n - u)), float(np.max(u - i_start / n)))
        abar = (i_start + i_end) / (2.0 * n)
        cvm += float(np.sum(c * (abar - u) ** 2 + (c**3 - c) / (12.0 * n * n)))
        done = int(i_end[-1])
    # AD: qp keeps the PITs in [0, 1] and compares them with np.linspace(0, 1, m) by scipy's
    # k-sample test; the pooled sorted values are visited in value slices (a, b] holding at most
    # ``chunk`` runs of each sample
    if m == 0:
        raise ValueError("anderson_ksamp encountered sample without observations (no PIT in [0, 1])")
    big_n = 2 * m
    sums, n_unique = [0.0, 0.0], 0
    pi = li = 0  # runs of the PITs / values of the linspace consumed
    below1 = below2 = 0  # PIT / linspace values below the slice
    while pi < src.n_entries or li < m:
        bp = src.entry_value(min(pi + chunk, src.n_entries) - 1) if pi < src.n_entries else np.inf
        bl = float(_lin_value(min(li + chunk, m) - 1, m)) if li < m else np.inf
        b = min(bp, bl)
        pj = src.entries_le(b) if np.isfinite(b) else src.n_entries
        lj_ = _lin_count_le(b, m) if np.isfinite(b) else m
        pv, pc = src.entries(pi, pj)
        lv = _lin_value(np.arange(li, lj_), m)
        vals = np.concatenate((np.asarray(pv, dtype=np.float64), lv))
        zstar, inv = np.unique(vals, return_inverse=True)
        n1 = np.bincount(inv, weights=np.concatenate((np.asarray(pc, dtype=np.float64), np.zeros(lv.size))),
                         minlength=zstar.size)
        n2 = np.bincount(inv, weights=np.concatenate((np.zeros(len(pv)), np.ones(lv.size))), minlength=zstar.size)
        lj = n1 + n2
        left1 = below1 + np.cumsum(n1) - n1
        left2 = below2 + np.cumsum(n2) - n2
        bj = left1 + left2 + lj / 2.0
        for q, (left, cnt) in enumerate(((left1, n1), (left2, n2))):
            mij = left + cnt / 2.0
            sums[q] += float((lj / float(big_n) * (big_n * mij - bj * m) ** 2
                              / (bj * (big_n - bj) - big_n * lj / 4.0)).sum())
        n_unique += zstar.size
        below1 += int(n1.sum())
        below2 += int(lv.size)
        if pj <= pi and lj_ <= li:  # (cannot happen: b is a value of one of the two samples)
            raise RuntimeError("pit_statistics_runs made no progress at PIT value {b!r}")
        pi, li = max(pj, pi), lj_
    if n_unique < 2:
        raise ValueError("anderson_ksamp needs more than one distinct observation")
    a2 = (sums[0] / m + sums[1] / m) * (big_n - 1.0) / big_n
    k = 2
    h_inv = 1.0 / m + 1.0 / m
    h, g = _ad_h_g(big_n)
    ca = (4 * g - 6) * (k - 1) + (10 - 6 * g) * h_inv
    cb = (2 * g - 4) * k**2 + 8 * h * k + (2 * g - 14 * h - 4) * h_inv - 8 * h + 4 * g - 6
    cc = (6 * h + 2 * g - 2) * k**2 + (4 * h - 4 * g + 6) * k + (2 * h - 6) * h_inv + 4 * h
    cd = (2 * h + 6) * k**2 - 4 * h * k
    sigmasq = (ca * big_n**3 + cb * big_n**2 + cc * big_n + cd) / ((big_n - 1.0) * (big_n - 2.0) * (big_n - 3.0))
    ad = (a2 - (k - 1)) / np.sqrt(sigmasq)
    return {"pit_ks": ks, "pit_cvm": cvm, "pit_ad": float(ad)}


def pit_metrics_qp(pit) -> dict:
    """:func:`pit_metrics` through :class:`qp.metrics.pit.PIT` itself (the reference in the tests)."""
    pit = np.asarray(pit, dtype=np.float64)
    if pit.size < 2:
        return {k: float("nan") for k in PIT_KEYS}
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
                "pit_outlier_rate": float(np.mean((pit < PIT_OUTLIER_LIMITS[0]) | (pit > PIT_OUTLIER_LIMITS[1]))),
            }
    finally:
        logger.setLevel(level)
    return out


# ----------------------------------------------------------------- CDE loss, Brier


def nearest_index(grid: np.ndarray, x) -> np.ndarray:
    """Index of the grid point nearest to each x (ties -> lower index, like ``argmin``)."""
    grid = np.asarray(grid, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    j = np.clip(np.searchsorted(grid, x, side="left"), 1, grid.size - 1)
    left_closer = np.abs(x - grid[j - 1]) <= np.abs(grid[j] - x)
    return np.where(left_closer, j - 1, j)


def trapezoid_weights(grid) -> np.ndarray:
    """Trapezoid node weights of ``grid``: half the widths of the adjacent intervals."""
    dx = np.diff(np.asarray(grid, dtype=np.float64))
    wts = np.zeros(dx.size + 1)
    wts[:-1] += 0.5 * dx
    wts[1:] += 0.5 * dx
    return wts


def cde_terms(pdf_on_grid: np.ndarray, grid: np.ndarray, ztrue) -> tuple[np.ndarray, np.ndarray]:
    """Per-object CDE-loss terms: (int f^2 dz by trapezoid, f at the grid point nearest ztrue).

    ``cde_loss = mean(term1) - 2 mean(term2)`` (RAIL ``CDELoss``; Izbicki & Lee 2017).
    """
    grid = np.asarray(grid, dtype=np.float64)
    t1 = (pdf_on_grid * pdf_on_grid) @ trapezoid_weights(grid)
    z = np.nan_to_num(np.asarray(ztrue, dtype=np.float64))
    t2 = pdf_on_grid[np.arange(pdf_on_grid.shape[0]), nearest_index(grid, z)]
    return t1, t2


def local_maxima_count(pdf_on_grid: np.ndarray, rel_height: float = 0.01, min_dip: float = 0.1) -> np.ndarray:
    """Number of local maxima of each PDF (N, G) on its grid, a measure of comb-shaped PDFs.

    A local maximum is where the density, having last changed upwards, goes down: a point or a
    flat top (one maximum however many grid points it spans; a histogram's rising staircase has
    none), not at an end of the grid. It counts when its density is at least ``rel_height`` x the
    PDF's own maximum (the far tails do not count) and the density falls by at least ``min_dip``
    x its value on both sides before rising again (the nearest local minimum or the grid's end on
    each side): a sum of equal Gaussians 2 sigma apart ripples by ~3% peak to trough and does not
    count; the teeth of one 4 sigma apart dip by most of their height and do. The highest point
    counts once in any case (so a smooth unimodal PDF gives 1, a mode at the grid's end included). Meaningful on a grid finer than the PDF's own structure (e.g. a spacing below
    half the narrowest component); a grid coarser than a comb's teeth aliases it. Rows with a
    non-finite or all-zero PDF give 0.
    """
    p = np.asarray(pdf_on_grid, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 3:
        raise ValueError(f"local_maxima_count needs PDFs on a grid of >= 3 points, shape (N, G); got {p.shape}")
    ok = np.isfinite(p).all(axis=1)
    p = np.where(ok[:, None], p, 0.0)
    n, g = p.shape
    top = p.max(axis=1, keepdims=True)
    slope = np.sign(np.diff(p, axis=1))  # (N, G-1): interval j is between points j and j+1
    idx = np.arange(g - 1)
    # the last non-zero slope at or before each interval (flat runs take the slope before them)
    before = np.take_along_axis(slope, np.maximum.accumulate(np.where(slope != 0, idx, 0), axis=1), axis=1)
    # the first non-zero slope at or after each interval
    nxt = np.minimum.accumulate(np.where(slope != 0, idx, g - 2)[:, ::-1], axis=1)[:, ::-1]
    after = np.take_along_axis(slope, nxt, axis=1)
    inner = np.zeros((n, g), dtype=bool)  # point i (1..G-2) between intervals i-1 and i
    inner[:, 1:-1] = True
    pad_b = np.concatenate([np.zeros((n, 1)), before], axis=1)  # slope arriving at point i
    pad_a = np.concatenate([after, np.zeros((n, 1))], axis=1)  # slope leaving point i
    is_max = inner & (pad_b > 0) & (np.concatenate([slope, np.zeros((n, 1))], axis=1) < 0)
    is_min = (pad_b < 0) & (pad_a > 0) | ~inner  # valleys, and both ends of the grid
    # value of the nearest minimum at or left / right of each point
    left = np.take_along_axis(p, np.maximum.accumulate(np.where(is_min, np.arange(g), 0), axis=1), axis=1)
    right_idx = np.minimum.accumulate(np.where(is_min, np.arange(g), g - 1)[:, ::-1], axis=1)[:, ::-1]
    right = np.take_along_axis(p, right_idx, axis=1)
    deep = np.maximum(left, right) <= (1.0 - min_dip) * p
    peak = is_max & deep & (p >= rel_height * top) & (top > 0)
    # the highest point always counts once (a mode at an end of the grid, or the top of ripples)
    top_counted = (peak & (p >= top)).any(axis=1)
    return peak.sum(axis=1) + ((top[:, 0] > 0) & ~top_counted)


def brier_cell(ztrue, limits=(0.0, 3.0), dx: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """Index of qp's Brier grid cell holding each ztrue (clipped) and whether it is inside the grid
    (the cells are ``np.histogram``'s bins over qp's ``hist_bin_edges``, the last one closed)."""
    edges = _calculate_grid_parameters(limits, dx).hist_bin_edges
    z = np.atleast_1d(np.asarray(ztrue, dtype=np.float64))
    k = np.searchsorted(edges, z, side="right") - 1
    k = np.where(z == edges[-1], edges.size - 2, k)  # np.histogram's closed last bin
    inside = (k >= 0) & (k < edges.size - 1)
    return np.clip(k, 0, edges.size - 2), inside


def brier_from_pdf(p: np.ndarray, ztrue, limits=(0.0, 3.0), dx: float = 0.01) -> np.ndarray:
    """Per-object Brier sums from densities ``p`` on qp's Brier grid (see :func:`brier_terms`)."""
    kk, inside = brier_cell(ztrue, limits, dx)
    pk = p[np.arange(p.shape[0]), kk]
    return np.einsum("ij,ij->i", p, p) + np.where(inside, 1.0 - 2.0 * pk, 0.0)


def brier_grid(limits=(0.0, 3.0), dx: float = 0.01) -> np.ndarray:
    """qp's Brier grid values over ``limits`` with step ``dx``."""
    return _calculate_grid_parameters(limits, dx).grid_values


def brier_terms(ens: qp.Ensemble, ztrue, limits=(0.0, 3.0), dx: float = 0.01) -> np.ndarray:
    """Per-object Brier sums as qp's ``calculate_brier`` defines them.

    qp's grid over ``limits`` with step ``dx`` (``_calculate_grid_parameters``); prediction
    p_ij = PDF density at grid value j; o_ij = 1 for the cell (histogram bin centred on
    grid value j) containing ztrue_i, else 0. Term_i = sum_j (p_ij - o_ij)^2 =
    sum_j p_ij^2 - 2 p_ik + 1 (k the cell of ztrue; the last two terms vanish when ztrue is
    outside the grid, where qp would widen the limits instead). brier = mean_i term_i.
    """
    return brier_from_pdf(ensemble_pdf(ens, brier_grid(limits, dx)), ztrue, limits, dx)


# ----------------------------------------------------------------- accumulation


@dataclass
class MetricConfig:
    """Grids and conventions of the metrics.

    Attributes
    ----------
    point_estimate : str
        Ancil key of the point estimate (``zmode``: RAIL's default); if absent from the
        ensemble, ``zmode``/``mode`` is the mode on ``zgrid``, ``zmedian``/``zmean`` qp's.
    zgrid : array
        Grid for the CDE loss and the example PDFs (RAIL's ``x_grid``).
    crps_limits, crps_npts : grid of the CRPS integral on qp's general path (representations
        other than hist, interp and mixmod).
    brier_limits, brier_dx : qp's Brier grid.
    mixture_float32 : evaluate Gaussian mixtures on the CDE and Brier grids in float32
        (faster: benchmarks/results/speed_metrics.md; CDE and Brier terms within ~1e-5 relative
        of float64, see ``tests/test_metrics_fast.py``). PIT and CRPS of mixtures are float64 closed forms.
    mixture_closed_form : the CDE-loss and Brier terms of Gaussian mixtures from closed forms
        of the same grid sums (:mod:`rail.evaluation.deepz_mixsums`: no grid evaluation; the
        tabulated sums to the rounding of its end terms, tested at 1e-7 relative) for objects whose
        components span at least two grid steps, or are narrower but lie far enough inside the
        grids (their aliasing added in closed form), when both grids are evenly spaced and the
        point estimate is in the ancil; tabulated on the grids otherwise (False: always).
    tabulated_quadratic : the CDE-loss and Brier terms of ``hist`` and ``interp`` PDFs as quadratic
        forms in their stored values (``PDFBlock.sq_sums``/``at_grid``: the same grid sums, added in
        another order) when the point estimate is in the ancil, instead of tabulating each PDF on
        both grids (False: always tabulated).
    """

    point_estimate: str = "zmode"
    zgrid: np.ndarray = field(default_factory=lambda: np.linspace(0.0, 3.0, 301))
    crps_limits: tuple = (0.0, 3.0)
    crps_npts: int = 3001
    brier_limits: tuple = (0.0, 3.0)
    brier_dx: float = 0.01
    mixture_float32: bool = True
    mixture_closed_form: bool = True
    tabulated_quadratic: bool = True

    @classmethod
    def for_range(cls, zmin: float, zmax: float, **kw) -> "MetricConfig":
        """Grids spanning [zmin, zmax] (301 points for CDE, step 1e-3 for CRPS)."""
        npts = int(round((zmax - zmin) / 0.001)) + 1
        return cls(zgrid=np.linspace(zmin, zmax, 301), crps_limits=(zmin, zmax), crps_npts=npts,
                   brier_limits=(zmin, zmax), **kw)


class MetricAccumulator:
    """Scores PDFs chunk by chunk into bounded summaries; the metrics come at the end.

    Memory: fixed, whatever the number of objects: the :class:`MetricGroups` of the table
    (``z_edges``/``mag_edges``: the redshift / magnitude bins; ~5 MB per group), one block of
    ``_BLOCK`` PDFs on the grids, and ``keep_pdfs`` (global row indices) whose PDFs on ``zgrid``
    (``kept_pdfs``) and true redshifts (``kept_ztrue``) are stored for plotting. With
    ``per_object=True`` it also keeps the per-object arrays (``PER_OBJECT_KEYS``: 66 bytes per
    object; :meth:`per_object`) for callers that resample or subset objects (bootstraps, flags).
    """

    def __init__(self, config: MetricConfig | None = None, keep_pdfs: Iterable[int] = (),
                 workers: int | None = None, n_total: int | None = None, *, per_object: bool = False,
                 z_edges=None, mag_edges=None):
        self.config = config or MetricConfig()
        self.workers = default_workers() if workers is None else max(1, int(workers))
        self.keep_per_object = bool(per_object)
        self._parts: dict[str, list] = {k: [] for k in PER_OBJECT_KEYS}
        # n_total known (accumulate_estimate): the per-object arrays are allocated once and
        # filled in place (no list of block arrays between the blocks' temporaries, no join)
        self._full = None if (n_total is None or not per_object) else {
            k: np.empty(int(n_total), dtype=bool if k in ("bad_pdf", "bad_truth") else np.float64)
            for k in PER_OBJECT_KEYS}
        zg = np.asarray(self.config.zgrid, dtype=np.float64)
        self.groups = MetricGroups(z_edges, mag_edges, zz_range=(float(zg[0]), float(zg[-1])))
        self.first_bad: dict[str, list] = {"bad_pdf": [], "bad_truth": []}  # first rows, for the error
        self.keep = np.sort(np.asarray(list(keep_pdfs), dtype=np.int64))
        self.kept_pdfs: dict[int, np.ndarray] = {}
        self.kept_ztrue: dict[int, float] = {}
        self.n = 0
        self._brier_grid = brier_grid(self.config.brier_limits, self.config.brier_dx)
        steps = (even_step(self.config.zgrid), even_step(self._brier_grid))
        self._steps = None if None in steps else steps  # closed-form mixture sums need even grids

    @property
    def nbytes(self) -> int:
        """Bytes of the accumulated state (summaries, kept PDFs, per-object arrays if kept)."""
        arrays = [v for v in (self._full or {}).values()] + [a for v in self._parts.values() for a in v]
        return (self.groups.nbytes + sum(a.nbytes for a in arrays)
                + sum(p.nbytes for p in self.kept_pdfs.values()))

    def tidy(self, estimator: str) -> list[dict]:
        """The tidy rows of everything added (:meth:`MetricGroups.tidy`)."""
        return self.groups.tidy(estimator)

    def point_estimate(self, block, pdf_on_zgrid: np.ndarray | None = None) -> np.ndarray:
        """The point estimate of each PDF: the ancil column ``config.point_estimate``, or
        the mode on ``zgrid`` (``zmode``/``mode``), or qp's median / mean."""
        if isinstance(block, qp.Ensemble):
            block = PDFBlock.from_ensemble(block)
        key = self.config.point_estimate
        if key in block.ancil:
            return np.asarray(block.ancil[key], dtype=np.float64).reshape(-1)
        if key in ("zmode", "mode"):
            p = block.pdf(self.config.zgrid) if pdf_on_zgrid is None else pdf_on_zgrid
            z = self.config.zgrid[np.argmax(np.nan_to_num(p, nan=-np.inf), axis=1)]
            return np.where(block.bad, np.nan, z)
        ens = block.ens if block.ens is not None else _to_ensemble(block)
        return ensemble_point_estimate(ens, key, self.config.zgrid)  # qp's median/mean, or a KeyError

    def add(self, ens, ztrue, mag=None, start: int | None = None) -> None:
        """Add one chunk: ``ens`` (a ``qp.Ensemble`` or :class:`PDFBlock` of n PDFs) with true
        redshifts ``ztrue`` (n,) and magnitudes (n,) or None. Evaluated in row blocks of
        ``_BLOCK``, on ``workers`` Python threads (NumPy releases the GIL; the metric path
        does not use torch, so no other thread pool multiplies them)."""
        block = PDFBlock.from_ensemble(ens, prepare=False) if isinstance(ens, qp.Ensemble) else ens
        block.float32 = self.config.mixture_float32
        ztrue = np.atleast_1d(np.asarray(ztrue, dtype=np.float64))
        if block.n != ztrue.size:
            raise ValueError(f"{block.n} PDFs but {ztrue.size} true redshifts in this chunk")
        start = self.n if start is None else start
        mag = np.full(ztrue.size, np.nan) if mag is None else np.asarray(mag, dtype=np.float64).reshape(-1)
        spans = [(s, min(s + _BLOCK, block.n)) for s in range(0, block.n, _BLOCK)]

        def one(span):
            s, e = span
            return self._block_parts(block.rows(s, e), ztrue[s:e], mag[s:e], start + s)

        if self.workers > 1 and len(spans) > 1 and block.kind in DIRECT_KINDS:
            results = list(_pool(self.workers).map(one, spans))
        else:
            results = [one(span) for span in spans]
        for (s, e), (parts, kept) in zip(spans, results):
            self.groups.add(parts)
            for k, rows in self.first_bad.items():
                if len(rows) <= 10 and parts[k].any():
                    rows.extend((start + s + np.flatnonzero(parts[k])[:11 - len(rows)]).tolist())
            if self.keep_per_object:
                for k, v in parts.items():
                    if self._full is not None and start + e <= self._full[k].size:
                        self._full[k][start + s:start + e] = v
                    else:
                        self._parts[k].append(v)
            self.kept_pdfs.update(kept)
            self.kept_ztrue.update({i: float(ztrue[i - start]) for i in kept})
        self.n += block.n

    def _block_parts(self, block: PDFBlock, ztrue, mag, start: int) -> tuple[dict, dict]:
        """Per-object quantities of one row block, and the kept example PDFs."""
        cfg = self.config
        block = block.prepared()
        bad_truth = ~np.isfinite(ztrue)
        zsafe = np.where(bad_truth, 0.0, ztrue)  # keeps NaN truths out of the arithmetic
        kept = {}
        if self._closed_form(block) or self._quadratic(block):
            zphot = self.point_estimate(block)
            bad_pdf = block.bad | ~np.isfinite(zphot)
            if block.kind == "mixmod":
                t1, t2, brier, crps_v = self._mixture_terms(block, zsafe)
            else:
                t1, t2, brier = self._tabulated_terms(block, zsafe)
                crps_v = block.crps(zsafe)
            pit = block.cdf_at(zsafe)
            if self.keep.size:
                sel = self.keep[(self.keep >= start) & (self.keep < start + block.n)]
                if sel.size:
                    pk = block.take(sel - start).pdf(cfg.zgrid)
                    kept = {int(i): pk[r].copy() for r, i in enumerate(sel)}
        else:
            pdf = block.pdf(cfg.zgrid)
            zphot = self.point_estimate(block, pdf)
            bad_pdf = block.bad | ~np.isfinite(zphot)
            t1, t2 = cde_terms(pdf, cfg.zgrid, zsafe)
            brier = brier_from_pdf(block.pdf(self._brier_grid), zsafe, cfg.brier_limits, cfg.brier_dx)
            if block.kind == "qp":
                pit = pit_values(block.ens, zsafe)
                crps_v = crps_qp(block.ens, zsafe, cfg.crps_limits, cfg.crps_npts)
                bad_pdf |= ~np.isfinite(pdf).all(axis=1)
            else:
                pit = block.cdf_at(zsafe)
                crps_v = block.crps(zsafe)
            if self.keep.size:
                sel = self.keep[(self.keep >= start) & (self.keep < start + block.n)]
                kept = {int(i): pdf[i - start].copy() for i in sel}
        parts = {
            "ztrue": ztrue,
            "zphot": zphot,
            "pit": pit,
            "crps": crps_v,
            "cde1": t1,
            "cde2": t2,
            "brier": brier,
            "mag": mag,
        }
        bad = bad_pdf | bad_truth
        if bad.any():  # never a number for a row that cannot be scored
            for k in ("pit", "crps", "cde1", "cde2", "brier"):
                parts[k] = np.where(bad, np.nan, parts[k])
            parts["zphot"] = np.where(bad_pdf, np.nan, zphot)
        parts["bad_pdf"] = bad_pdf
        parts["bad_truth"] = bad_truth
        parts = {k: np.asarray(v) for k, v in parts.items()}
        return parts, kept

    def _closed_form(self, block: PDFBlock) -> bool:
        """Whether a mixture block takes the closed-form CDE/Brier terms (``deepz_mixsums``):
        asked for, both grids evenly spaced, the point estimate in the ancil."""
        cfg = self.config
        return (block.kind == "mixmod" and cfg.mixture_closed_form and self._steps is not None
                and cfg.point_estimate in block.ancil)

    def _quadratic(self, block: PDFBlock) -> bool:
        """Whether a hist/interp block takes the quadratic-form CDE/Brier terms."""
        return (block.kind in ("hist", "interp") and self.config.tabulated_quadratic
                and self.config.point_estimate in block.ancil)

    def _tabulated_terms(self, block: PDFBlock, z):
        """cde1, cde2 and brier of a hist/interp block (:meth:`PDFBlock.sq_sums`), the same sums
        as :func:`cde_terms` and :func:`brier_from_pdf` on the tabulated PDFs."""
        cfg = self.config
        zg, bg = cfg.zgrid, self._brier_grid
        sums = block.sq_sums([(zg, trapezoid_weights(zg)), (bg, 1.0)])
        kk, inside = brier_cell(z, cfg.brier_limits, cfg.brier_dx)
        t2 = block.at_grid(zg, nearest_index(zg, z))
        brier = sums[:, 1] + np.where(inside, 1.0 - 2.0 * block.at_grid(bg, kk), 0.0)
        return sums[:, 0], t2, brier

    def _mixture_terms(self, block: PDFBlock, z):
        """cde1, cde2, brier and CRPS of a mixture block: closed forms
        (:class:`~rail.evaluation.deepz_mixsums.MixtureSquares`; the CRPS of every row, the grid
        sums of the rows :meth:`~rail.evaluation.deepz_mixsums.MixtureSquares.closed_form_ok`
        accepts), the grids for the other rows' sums."""
        cfg = self.config
        zg, bg = cfg.zgrid, self._brier_grid
        kk, inside = brier_cell(z, cfg.brier_limits, cfg.brier_dx)
        t1, t2, brier = (np.full(block.n, np.nan) for _ in range(3))
        crps_v = np.full(block.n, np.nan)
        ok = ~block.bad
        w, mu, s = block.mix
        closed = np.zeros(block.n, dtype=bool)
        ranges, hmax = ((zg[0], zg[-1]), (bg[0], bg[-1])), max(self._steps)
        for idx in pair_blocks(np.flatnonzero(ok), w.shape[1]):
            pairs = MixtureSquares(w[idx], mu[idx], s[idx])
            zc = z[idx]
            crps_v[idx] = pairs.crps(zc)
            good = pairs.closed_form_ok(ranges, hmax)
            if not good.any():
                continue
            sel = idx[good]
            t1[sel] = pairs.trapezoid_sq(zg[0], zg[-1], self._steps[0])[good]
            t2[sel] = pairs.at(zg[nearest_index(zg, zc)])[good]
            brier[sel] = (pairs.grid_sum_sq(bg[0], bg[-1], self._steps[1]) + np.where(
                inside[idx], 1.0 - 2.0 * pairs.at(bg[kk[idx]]), 0.0))[good]
            closed[sel] = True
        rest = np.flatnonzero(ok & ~closed)
        if rest.size:
            sub = block.take(rest)
            t1[rest], t2[rest] = cde_terms(sub.pdf(zg), zg, z[rest])
            brier[rest] = brier_from_pdf(sub.pdf(bg), z[rest], cfg.brier_limits, cfg.brier_dx)
        return t1, t2, brier, crps_v

    def per_object(self) -> dict:
        """The per-object arrays (``PER_OBJECT_KEYS``), all chunks so far. The chunks are joined
        one key at a time and kept joined, so that memory holds each value once (no second
        copy of the whole set; later calls return the same arrays). Only with ``per_object=True``."""
        if not self.keep_per_object:
            raise ValueError("this MetricAccumulator keeps bounded summaries only: construct it (or call "
                             "accumulate_estimate / compare) with per_object=True for the per-object arrays")
        if self._full is not None and not any(self._parts.values()):
            return {k: v[: self.n] for k, v in self._full.items()}
        if self._full is not None:  # (rows beyond n_total were added: join everything)
            for k, v in self._parts.items():
                v.insert(0, self._full[k][: self._full[k].size])
            self._full = None
        out = {}
        for k, v in self._parts.items():
            if len(v) != 1:
                joined = np.concatenate(v) if v else np.zeros(0)
                v.clear()  # frees the chunks before the next key is joined
                v.append(joined)
            out[k] = v[0].astype(bool, copy=False) if k in ("bad_pdf", "bad_truth") else v[0]
        return out


_MALLOC_TUNED = False


def _keep_freed_memory() -> None:
    """Ask glibc's malloc to keep freed blocks for reuse (once per process; elsewhere a no-op).

    The metric pass allocates and frees arrays of ~1 MB per row block on worker threads;
    glibc's defaults return such memory to the system after each free (thread arenas trim
    their top, and blocks above the adaptive mmap threshold are unmapped), so every block
    page-faults its arrays afresh: on 600-bin histograms the faults cost as much CPU as the
    metrics (CHANGELOG). Here blocks below 32 MB come from the heap and up to 64 MB of free
    top is kept per arena (``mallopt`` M_MMAP_THRESHOLD, M_TRIM_THRESHOLD); the peak RSS is
    that of the arrays alive at once either way."""
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return
    _MALLOC_TUNED = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        pass


def default_workers() -> int:
    """Threads for the tabulated-PDF metrics: the CPUs this process may use, at most 2
    (``DEEPZ_METRIC_WORKERS`` overrides)."""
    env = os.environ.get("DEEPZ_METRIC_WORKERS")
    if env:
        return max(1, int(env))
    try:
        ncpu = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        ncpu = os.cpu_count() or 1
    return max(1, min(2, ncpu))


_POOLS: dict = {}


def _pool(workers: int):
    """One shared thread pool per size (threads are cheap to keep, costly to start per chunk)."""
    if workers not in _POOLS:
        from concurrent.futures import ThreadPoolExecutor

        _POOLS[workers] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="deepz-metrics")
    return _POOLS[workers]


def _nan_metrics() -> dict:
    return {k: float("nan") for k in METRIC_INFO}


def _metric_families(n: int, where: str, families) -> dict:
    """Every metric of a group of ``n`` objects from ``families`` ((name, callable returning a
    dict of metrics), ...): fewer than ``MIN_OBJECTS`` objects: NaN (and a :class:`MetricWarning`
    naming ``where``); a family that fails: its metrics NaN and a warning, the others stay."""
    if n < MIN_OBJECTS:
        if n:
            warnings.warn(f"{where}: {n} objects, fewer than {MIN_OBJECTS}: metrics set to NaN",
                          MetricWarning, stacklevel=3)
        return _nan_metrics()
    out = _nan_metrics()
    for name, fn in families:
        try:
            out.update(fn())
        except Exception as err:  # noqa: BLE001 - one bad family must not cost the table
            warnings.warn(f"{where}: {name} could not be computed on {n} objects "
                          f"({type(err).__name__}: {err}); set to NaN", MetricWarning, stacklevel=3)
    return out


def summarize_group(po: Mapping, where: str = "") -> dict:
    """All metrics (see module docstring) of one group of objects, exactly, from per-object arrays
    (numpy's medians and percentiles, scipy's PIT statistics as qp computes them): the reference
    of the bounded summaries (:meth:`GroupSummary.metrics`), and the metrics of callers that
    resample objects (bootstraps).

    Fewer than ``MIN_OBJECTS`` objects: every metric NaN (and a :class:`MetricWarning`
    naming ``where``); a metric family that fails on this group: NaN and a warning.
    """
    zp, zt = po["zphot"], po["ztrue"]
    return _metric_families(len(zt), where, (
        ("point metrics", lambda: point_metrics(zp, zt)),
        ("crps", lambda: {"crps": float(np.mean(po["crps"]))}),
        ("pco", lambda: {"pco": pco(po["pit"])}),
        ("PIT statistics", lambda: pit_metrics(po["pit"])),
        ("cde_loss", lambda: {"cde_loss": float(np.mean(po["cde1"]) - 2.0 * np.mean(po["cde2"]))}),
        ("brier", lambda: {"brier": float(np.mean(po["brier"]))}),
    ))


class _Moments:
    """Count, mean and sum of squared deviations of values added block by block (Chan, Golub &
    LeVeque 1979's pairwise update): mean and (ddof 0) std as exact as numpy's on all values."""

    __slots__ = ("n", "mean", "m2")

    def __init__(self):
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def add(self, x: np.ndarray) -> None:
        nb = int(x.size)
        if nb == 0:
            return
        mb = float(np.mean(x))
        m2b = float(np.sum((x - mb) ** 2))
        n = self.n + nb
        delta = mb - self.mean
        self.mean += delta * nb / n
        self.m2 += m2b + delta * delta * self.n * nb / n
        self.n = n

    def std(self) -> float:
        return float(np.sqrt(self.m2 / self.n)) if self.n else float("nan")


class GroupSummary:
    """Everything the metrics of one group (overall, one bin) need, in memory that does not grow
    with its number of objects: exact sums and counts, and the PIT and dz sketches of
    :mod:`rail.evaluation.deepz_sketch` (whose module docstring states what is binned and the
    bounds). :meth:`metrics` gives the table's metrics (the keys of ``METRIC_INFO``)."""

    SUM_KEYS = ("crps", "cde1", "cde2", "brier")

    def __init__(self):
        self.n = 0
        self.sums = dict.fromkeys(self.SUM_KEYS, 0.0)
        self.dz_all, self.dz_in = _Moments(), _Moments()
        self.n_eta = self.n_pco = self.n_pit_out = self.n_pit_nan = 0
        self.zmin, self.zmax = np.inf, -np.inf
        self.pit = PITSketch()
        self.dz = ResidualSketch()

    @property
    def nbytes(self) -> int:
        """Bytes of the state (fixed: the two sketches and a few scalars)."""
        return self.pit.nbytes + self.dz.nbytes

    def add(self, part: Mapping) -> None:
        """Add objects (rows that can be scored only): arrays ``ztrue, zphot, pit, crps, cde1,
        cde2, brier``."""
        zt = np.asarray(part["ztrue"], dtype=np.float64)
        if zt.size == 0:
            return
        self.n += int(zt.size)
        self.zmin, self.zmax = min(self.zmin, float(zt.min())), max(self.zmax, float(zt.max()))
        for k in self.SUM_KEYS:
            self.sums[k] += float(np.sum(part[k]))
        d = dz_norm(part["zphot"], zt)
        inl = np.abs(d) <= pm.ETA_THRESHOLD
        self.n_eta += int(np.sum(np.abs(d) > pm.ETA_THRESHOLD))
        self.dz_all.add(d)
        self.dz_in.add(d[inl])
        self.dz.add(d)
        pit = np.asarray(part["pit"], dtype=np.float64)
        self.n_pco += int(np.sum(pm.pco_indicator(pit) > 0))
        self.n_pit_out += int(np.sum((pit < PIT_OUTLIER_LIMITS[0]) | (pit > PIT_OUTLIER_LIMITS[1])))
        self.n_pit_nan += int(np.sum(np.isnan(pit)))  # (not in the sketch: the PIT statistics become NaN)
        self.pit.add(pit)

    def point_metrics(self) -> dict:
        """:func:`point_metrics` from the summary (quantiles of the dz sketch, exact counts/moments)."""
        n, dz = self.n, self.dz
        med = dz.median()
        q75, q25 = dz.percentile([75.0, 25.0])
        sig_iqr = float(q75 - q25) / 1.349
        cut = max(0.06, 3.0 * sig_iqr)
        n_rail = n - int(dz.count_le(cut)) + int(dz.count_le(-cut, strict=True))
        return {
            "sigma_nmad": pm.NMAD_FACTOR * dz.abs_dev_median(med),
            "sigma_nmad_nomedian": pm.NMAD_FACTOR * dz.abs_dev_median(0.0),
            "eta": self.n_eta / n,
            "bias_median": med,
            "bias_mean": self.dz_all.mean,
            "bias_inlier_mean": self.dz_in.mean if self.dz_in.n else float("nan"),
            "sigma_inlier_std": self.dz_in.std(),
            "rail_sigma_iqr": sig_iqr,
            "rail_outlier_rate": n_rail / n,
        }

    def pit_metrics(self) -> dict:
        if self.n_pit_nan:
            raise ValueError(f"{self.n_pit_nan} PIT values are NaN")
        out = pit_statistics_runs(self.pit)
        out["pit_outlier_rate"] = self.n_pit_out / self.n
        return out

    def metrics(self, where: str = "") -> dict:
        """All metrics of the group, as :func:`summarize_group` gives them on per-object arrays:
        fewer than ``MIN_OBJECTS`` objects: NaN (and a :class:`MetricWarning`); a family that fails:
        NaN and a warning."""
        n = self.n
        return _metric_families(n, where, (
            ("point metrics", self.point_metrics),
            ("crps", lambda: {"crps": self.sums["crps"] / n}),
            ("pco", lambda: {"pco": self.n_pco / n}),
            ("PIT statistics", self.pit_metrics),
            ("cde_loss", lambda: {"cde_loss": self.sums["cde1"] / n - 2.0 * self.sums["cde2"] / n}),
            ("brier", lambda: {"brier": self.sums["brier"] / n}),
        ))


class MetricGroups:
    """The groups of the tidy table (``all``; bins of the true redshift; bins of the reference
    magnitude), each a :class:`GroupSummary`, filled block by block; plus the bad-row counts and,
    for the plots, the zphot-ztrue 2-D histogram of all scored rows (``zz_bins`` x ``zz_bins`` over
    ``zz_range``, as ``np.histogram2d``). Memory: fixed (~5 MB per group)."""

    def __init__(self, z_edges=None, mag_edges=None, zz_range=None, zz_bins: int = 120):
        self.groups = [("all", np.nan, np.nan, GroupSummary())]
        self._bins = []
        for bin_type, col, edges in (("redshift", "ztrue", z_edges), ("magnitude", "mag", mag_edges)):
            if edges is None or len(edges) < 2:
                continue
            edges = np.asarray(edges, dtype=np.float64)
            for lo, hi in zip(edges[:-1], edges[1:]):
                self._bins.append((col, float(lo), float(hi), len(self.groups)))
                self.groups.append((bin_type, float(lo), float(hi), GroupSummary()))
        self.total = self.n_bad_pdf = self.n_bad_truth = 0
        self.zz_range = None if zz_range is None else (float(zz_range[0]), float(zz_range[1]))
        self.zz_bins = int(zz_bins)
        self.zz_hist = None if zz_range is None else np.zeros((self.zz_bins, self.zz_bins))
        self._pending, self._pending_n = [], 0

    @property
    def all(self) -> GroupSummary:
        """The summary of all scored rows (buffered rows summarised first)."""
        self.flush()
        return self.groups[0][3]

    @property
    def nbytes(self) -> int:
        """Bytes of the summaries (buffered rows summarised first)."""
        self.flush()
        return sum(g[3].nbytes for g in self.groups) + (0 if self.zz_hist is None else self.zz_hist.nbytes)

    #: rows buffered before they are summarised (fewer, larger sorts; bounded: one batch plus one part)
    BATCH = 1 << 16

    def add(self, part: Mapping) -> None:
        """Add rows: ``ztrue, zphot, pit, crps, cde1, cde2, brier, mag`` (mag may be absent) and the
        ``bad_pdf`` / ``bad_truth`` flags (absent: none); flagged rows are only counted. Rows are
        buffered up to ``BATCH`` and summarised a batch at a time; :meth:`flush` (called by
        :meth:`tidy`) summarises the rest."""
        part = {k: v for k, v in part.items() if v is not None}
        self._pending.append(part)
        self._pending_n += len(part["ztrue"])
        if self._pending_n >= self.BATCH:
            self.flush()

    def flush(self) -> None:
        """Summarise the buffered rows."""
        if not self._pending:
            return
        parts, self._pending, self._pending_n = self._pending, [], 0
        keys = set.intersection(*(set(p) for p in parts))
        joined = {k: np.concatenate([np.asarray(p[k]).reshape(-1) for p in parts]) for k in keys}
        del parts
        self._add_now(joined)

    def _add_now(self, part: Mapping) -> None:
        zt = np.asarray(part["ztrue"], dtype=np.float64)
        self.total += int(zt.size)
        good = np.ones(zt.size, dtype=bool)
        for k in ("bad_pdf", "bad_truth"):
            if k in part:
                flag = np.asarray(part[k], dtype=bool)
                setattr(self, "n_" + k, getattr(self, "n_" + k) + int(flag.sum()))
                good &= ~flag
        keys = ("ztrue", "zphot", "pit") + GroupSummary.SUM_KEYS
        sub = {k: np.asarray(part[k])[good] for k in keys}
        self.groups[0][3].add(sub)
        if self.zz_hist is not None:
            ok = np.isfinite(sub["ztrue"]) & np.isfinite(sub["zphot"])
            r = self.zz_range
            self.zz_hist += np.histogram2d(sub["ztrue"][ok], sub["zphot"][ok], bins=self.zz_bins,
                                           range=[list(r), list(r)])[0]
        if self._bins:
            cols = {"ztrue": sub["ztrue"]}
            if "mag" in part and part["mag"] is not None:
                cols["mag"] = np.asarray(part["mag"], dtype=np.float64)[good]
            for col, lo, hi, gi in self._bins:
                if col not in cols:
                    continue
                x = cols[col]
                mask = (x >= lo) & (x < hi)
                if mask.any():
                    self.groups[gi][3].add({k: v[mask] for k, v in sub.items()})

    def tidy(self, estimator: str) -> list[dict]:
        """Tidy rows ``estimator, bin_type, bin_lo, bin_hi, metric, value, n`` (see :func:`tidy_metrics`)."""
        self.flush()
        rows = []
        for i, (bin_type, lo, hi, g) in enumerate(self.groups):
            if bin_type == "all":
                lo, hi = (g.zmin, g.zmax) if g.n else (np.nan, np.nan)
                where = f"{estimator} (all)"
            elif g.n == 0:
                continue
            else:
                where = f"{estimator} {bin_type} [{lo:.4g}, {hi:.4g})"
            for metric, value in g.metrics(where).items():
                rows.append(dict(estimator=estimator, bin_type=bin_type, bin_lo=float(lo), bin_hi=float(hi),
                                 metric=metric, value=value, n=g.n))
            if i == 0:
                for key in COUNT_METRICS:
                    rows.append(dict(estimator=estimator, bin_type="all", bin_lo=np.nan, bin_hi=np.nan,
                                     metric=key, value=float(getattr(self, key)), n=self.total))
        return rows


def default_z_edges(zmin: float, zmax: float, nbins: int = 6) -> np.ndarray:
    return np.linspace(zmin, zmax, nbins + 1)


def default_mag_edges(mag=None, width: float = 1.0, *, sketch=None) -> np.ndarray:
    """Edges every ``width`` mag from the floor of the 1st to the ceiling of the 99th percentile
    (numpy's linear method) of the finite magnitudes below 90, from the magnitudes ``mag`` or a
    :class:`~rail.evaluation.deepz_sketch.MagnitudeSketch` of them (``sketch``: a chunked pass
    over a file); the two give the same edges (the sketch is exact in what the edges read, see
    its docstring)."""
    from .deepz_sketch import MagnitudeSketch

    if sketch is None:
        sketch = MagnitudeSketch()
        sketch.add(mag)
    if sketch.n == 0:
        return np.zeros(0)
    p1, p99 = sketch.percentile([1.0, 99.0])
    lo, hi = np.floor(p1), np.ceil(p99)
    return np.arange(lo, hi + 0.5 * width, width)


def good_rows(po: Mapping) -> np.ndarray:
    """Rows that can be scored (finite PDF, point estimate and truth)."""
    n = len(po["ztrue"])
    good = np.ones(n, dtype=bool)
    for k in ("bad_pdf", "bad_truth"):
        if k in po:
            good &= ~np.asarray(po[k], dtype=bool)
    return good


def tidy_metrics(po: Mapping, estimator: str, z_edges=None, mag_edges=None) -> list[dict]:
    """Tidy rows ``estimator, bin_type, bin_lo, bin_hi, metric, value, n`` of per-object arrays.

    ``bin_type`` is ``all`` (every object), ``redshift`` (bins of the *true* redshift,
    [lo, hi)) or ``magnitude`` (bins of the reference magnitude, [lo, hi)). Rows flagged
    ``bad_pdf``/``bad_truth`` are left out of every metric (``accumulate_estimate`` only
    lets them through with ``exclude_bad=True``) and counted in the ``all`` rows
    ``n_bad_pdf`` / ``n_bad_truth`` (value = count, n = all rows). A bin with fewer than
    ``MIN_OBJECTS`` objects has NaN metrics and its count. Computed as the streaming pass does
    (:class:`MetricGroups`, in slices of ``_STAT_CHUNK`` rows): the same values as
    :meth:`MetricAccumulator.tidy`.
    """
    groups = MetricGroups(z_edges, mag_edges)
    n = len(po["ztrue"])
    for s in range(0, max(n, 1), _STAT_CHUNK):
        groups.add({k: (None if v is None else np.asarray(v)[s:s + _STAT_CHUNK]) for k, v in po.items()})
    return groups.tidy(estimator)


# ----------------------------------------------------------------- ids


def estimate_id_column(estimate, id_col: str | None = None) -> str | None:
    """The estimate's ancil id column: ``id_col``, else ``id`` (where RAIL's estimators put the
    input's ``id_col``), else the first of ``ID_COLUMNS``; None when it has none."""
    cands = tuple(dict.fromkeys(((id_col,) if id_col else ()) + ID_COLUMNS))
    if isinstance(estimate, qp.Ensemble):
        anc = estimate.ancil or {}
        return next((c for c in cands if c in anc), None)
    import h5py

    with h5py.File(str(estimate), "r") as f:
        if "ancil" in f:
            return next((c for c in cands if c in f["ancil"]), None)
    return None


def estimate_ids(estimate, id_col: str | None = None, start: int = 0, stop: int | None = None):
    """The estimate's ids (:func:`estimate_id_column`), rows ``start:stop``, or None."""
    col = estimate_id_column(estimate, id_col)
    if col is None:
        return None
    if isinstance(estimate, qp.Ensemble):
        return np.asarray(estimate.ancil[col])[start:stop].reshape(-1)
    import h5py

    with h5py.File(str(estimate), "r") as f:
        return np.asarray(f["ancil"][col][start:stop]).reshape(-1)


def truth_ids(truth, id_col: str | None = None, groupname: str | None = None):
    """The truth table's id column (``id_col``, or the first of ``ID_COLUMNS``), or None.

    ``truth`` is a path (HDF5 read column-wise with h5py, other formats through tables_io),
    a DataHandle, a numpyDict or a DataFrame, possibly one level nested (DC2's
    ``photometry`` group, or ``groupname``).
    """
    cands = (id_col,) if id_col else ID_COLUMNS
    if hasattr(truth, "data") and hasattr(truth, "path") and not isinstance(truth, (str, bytes)):
        truth = truth.data if truth.data is not None else truth.path
    if isinstance(truth, (str, bytes)) or hasattr(truth, "__fspath__"):
        path = str(truth)
        if path.endswith(HDF5_SUFFIXES):
            import h5py

            from .deepz_truth import h5_id_dataset

            with h5py.File(path, "r") as f:
                name = h5_id_dataset(f, cands, groupname)
                return None if name is None else np.asarray(f[name][()]).reshape(-1)
        import tables_io

        truth = tables_io.read(path)
    tables = [truth]
    if isinstance(truth, Mapping):
        if groupname and groupname in truth:
            tables = [truth[groupname]]
        else:
            tables += [v for v in truth.values() if isinstance(v, Mapping) or hasattr(v, "columns")]
    for t in tables:
        cols = t.columns if hasattr(t, "columns") else t.keys()
        for c in cands:
            if c in cols:
                return np.asarray(t[c]).reshape(-1)
    return None


def _comparable(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ids of two tables as arrays that compare equal when the ids are the same."""
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype.kind in "SUO" or b.dtype.kind in "SUO":
        conv = lambda v: np.asarray([x.decode() if isinstance(x, bytes) else str(x) for x in v])  # noqa: E731
        if a.dtype.kind in "iu" or b.dtype.kind in "iu" or a.dtype.kind != b.dtype.kind:
            return conv(a), conv(b)
    return a, b


def align_to_truth(est_ids, truth_ids, label: str = "estimate") -> np.ndarray | None:
    """Truth row for each estimate row, matched by id; None when the rows are already aligned.

    Raises ``ValueError`` naming how many ids are missing from the truth table and how many
    truth ids have no PDF when the two id sets differ, or when ids repeat.
    """
    e, t = _comparable(est_ids, truth_ids)
    if e.shape == t.shape and np.array_equal(e, t):
        return None
    for name, ids in (("estimate " + label, e), ("truth table", t)):
        u, c = np.unique(ids, return_counts=True)
        if (c > 1).any():
            raise ValueError(f"ids repeat in the {name}: {int((c > 1).sum())} ids appear more than once "
                             f"(e.g. {u[c > 1][:5].tolist()}); rows cannot be matched by id")
    missing = np.setdiff1d(e, t)
    extra = np.setdiff1d(t, e)
    if missing.size or extra.size:
        raise ValueError(
            f"ids of estimate {label} and the truth table disagree: {missing.size} of its {e.size} ids are "
            f"not in the truth table (e.g. {missing[:5].tolist()}), {extra.size} of the {t.size} truth ids have "
            f"no PDF (e.g. {extra[:5].tolist()})")
    order = np.argsort(t, kind="stable")
    return order[np.searchsorted(t, e, sorter=order)]


# ----------------------------------------------------------------- one estimate


def _first(idx: np.ndarray, k: int = 10) -> str:
    return ", ".join(str(int(i)) for i in idx[:k]) + (", ..." if idx.size > k else "")


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
    truth_ids=None,
    id_col: str | None = None,
    exclude_bad: bool = False,
    z_edges=None,
    mag_edges=None,
    per_object: bool = False,
) -> MetricAccumulator:
    """One streaming pass over ``estimate`` (qp file path or ensemble) against the truth.

    ``ztrue``/``mag`` are full-length arrays, aligned with the ensemble rows unless both
    ``truth_ids`` and the estimate's ancil id column (:func:`estimate_ids`) are there: then rows are matched by id (:func:`align_to_truth`;
    the per-object arrays follow the estimate's row order). ``ztrue`` may instead be a
    :class:`~rail.evaluation.deepz_truth.TruthFile` (``mag``/``truth_ids`` unused): its columns
    are read chunk by chunk with the estimate's when its ids equal the estimate's row by row
    (checked slice by slice) or either side has none; otherwise they are read whole and matched
    as above (the progress line says so). Rows whose PDF, point estimate or
    truth is not finite raise a ``ValueError`` naming their count and first rows, unless
    ``exclude_bad`` (then they are flagged and left out of the metrics).
    ``progress`` is a callable receiving a message per chunk (or None). ``z_edges`` /
    ``mag_edges``: the bins of :meth:`MetricAccumulator.tidy`; ``per_object``: also keep the
    per-object arrays (memory growing with the number of objects; the metrics do not need them).
    """
    label = label or str(estimate)
    n = ensemble_length(estimate)
    stream = ztrue if hasattr(ztrue, "id_mismatch") else None  # a deepz_truth.TruthFile
    if stream is not None and stream.has_ids and estimate_id_column(estimate, id_col) is not None:
        row = stream.id_mismatch(lambda s, e: estimate_ids(estimate, id_col, s, e), n)
        if row is not None:
            if progress is not None:
                progress(f"  metrics {label}: ids differ from the truth table's from row {row} on: the truth "
                         "columns are read whole into memory to match rows by id")
            ztrue, mag, truth_ids = stream.whole()
            stream = None
    elif stream is not None and stream.has_ids and progress is not None:
        progress(f"  metrics {label}: the estimate has no id column; rows matched by position")
    if stream is not None:
        if n != stream.n:
            raise ValueError(f"estimate {label} has {n} PDFs but the truth table has {stream.n} rows")
        with stream.open() as f:
            return _accumulate(estimate, lambda s, e: stream.slice(f, s, e), n, config, chunk_size, keep_pdfs,
                               progress, label, exclude_bad, z_edges, mag_edges, per_object)
    ztrue = np.asarray(ztrue, dtype=np.float64).reshape(-1)
    if truth_ids is not None:
        eids = estimate_ids(estimate, id_col)
        if eids is not None:
            if eids.size != n:
                raise ValueError(f"estimate {label}: id column has {eids.size} values for {n} PDFs")
            perm = align_to_truth(eids, truth_ids, label)
            if perm is not None:
                if progress is not None:
                    progress(f"  metrics {label}: truth rows matched to the estimate by id (other row order)")
                ztrue = ztrue[perm]
                mag = None if mag is None else np.asarray(mag)[perm]
        elif progress is not None:
            progress(f"  metrics {label}: the estimate has no id column; rows matched by position")
    if n != ztrue.size:
        raise ValueError(
            f"estimate {label} has {n} PDFs but the truth table has {ztrue.size} rows"
        )
    return _accumulate(estimate, lambda s, e: (ztrue[s:e], None if mag is None else np.asarray(mag)[s:e]), n,
                       config, chunk_size, keep_pdfs, progress, label, exclude_bad, z_edges, mag_edges, per_object)


def _accumulate(estimate, truth_rows, n, config, chunk_size, keep_pdfs, progress, label, exclude_bad, z_edges,
                mag_edges, per_object) -> MetricAccumulator:
    """The pass of :func:`accumulate_estimate`; ``truth_rows(s, e)``: (ztrue, mag or None) of rows s:e."""
    acc = MetricAccumulator(config, keep_pdfs, n_total=n, per_object=per_object, z_edges=z_edges,
                            mag_edges=mag_edges)
    _keep_freed_memory()
    t0 = time.perf_counter()
    for s, e, block in _prefetched(iterate_blocks(estimate, chunk_size, buffers=2)):
        acc.add(block, *truth_rows(s, e), start=s)
        if progress is not None:
            rate = e / max(time.perf_counter() - t0, 1e-9)
            progress(f"  metrics {label}: {e}/{n} objects ({100 * e / max(n, 1):.0f}%, {rate:,.0f}/s)")
    acc.groups.flush()
    n_pdf, n_truth = acc.groups.n_bad_pdf, acc.groups.n_bad_truth
    if (n_pdf or n_truth) and not exclude_bad:
        parts = []
        if n_pdf:
            rows = np.asarray(acc.first_bad["bad_pdf"], dtype=np.int64)
            parts.append(f"{n_pdf} PDFs or point estimates are not finite (rows {_first(rows)})")
        if n_truth:
            rows = np.asarray(acc.first_bad["bad_truth"], dtype=np.int64)
            parts.append(f"{n_truth} true redshifts are not finite (rows {_first(rows)})")
        raise ValueError(f"estimate {label}: {'; '.join(parts)} of {n}. Pass exclude_bad=True "
                         "(deepz-compare --exclude-bad) to leave them out of the metrics; "
                         "their counts are then reported as n_bad_pdf / n_bad_truth")
    return acc
