"""Bounded-memory summaries of the metric pass: its state does not grow with the number of objects.

The metrics of :mod:`rail.evaluation.deepz_metrics` are computed, for every group (all objects,
each redshift and magnitude bin), from a :class:`GroupSummary` filled block by block:

* exact: the object count, the sums of CRPS, the two CDE-loss terms and Brier (means), the
  mean of dz and the mean / variance of the inlier dz (|dz| <= 0.15; Chan et al.'s pairwise
  update, float64), and the counts of eta (|dz| > 0.15), PCO (PIT < 0.005 or > 0.995) and PIT
  outliers (PIT < 1e-4 or > 0.9999): these thresholds are fixed, so the counts are exact;
* binned, in :class:`SlotSketch` es that hold per bin the count and the smallest and largest
  value: the PIT values (``PIT_BINS`` = 2^16 equal bins on (0, 1), exact 0 and exact 1 in
  bins of their own) and dz = (zphot - ztrue)/(1 + ztrue) (bins equal in asinh(dz / ``DZ_SCALE``),
  step ``DZ_STEP``: relative width <= 2e-4 for |dz| >> 1e-4, absolute width <= 2e-8 near 0; one
  overflow bin each side of |dz| = ``DZ_RANGE``).

Order statistics are read from a sketch by *reconstructing* each bin's values: c values evenly
spaced from the bin's minimum to its maximum. A bin with one or two values, or whose values are
all equal (PITs piled at exactly 0 or 1), is reconstructed exactly; otherwise each value moves
by less than its bin's width. Hence (proved in the docstrings below; the errors measured against
numpy / scipy on the exact values are asserted in ``tests/test_metric_sketch.py`` and recorded in
CHANGELOG.md, issue 20):

* medians, quartiles, MAD (sigma_NMAD, bias_median, sigma_IQR): each order statistic within one
  bin width of the exact one: relative error <= 2e-4 for |value| >> 1e-4;
* RAIL's outlier rate: its cut moves with sigma_IQR; the count beyond it is read off the
  reconstruction (error: the values of one bin at each cut);
* PIT KS: absolute error <= 1/2^16 = 1.5e-5; CvM: each PIT moves by < 1.5e-5; AD (scipy's
  k-sample midrank statistic of qp): computed on the reconstructed PITs, which the tests hold
  to 1e-3 relative (plus 1e-3 absolute) on smooth, piled and heavy-tailed PIT samples.

Order statistics that fall in an overflow bin (|dz| > ``DZ_RANGE``) are only ordered, not
located: no metric reads one (the quantiles used are the quartiles and medians).

Small groups (most bins holding <= 2 values: a few thousand objects) are therefore exact up to
rounding; there is one code path. The state is ~5 MB per group (2^16 + 2 PIT bins and 129,002
dz bins, each an int64 count and two float64 extremes), fixed whatever the number of objects.
"""

from __future__ import annotations

import numpy as np

PIT_BINS = 1 << 16  # equal bins of the PIT on (0, 1)
DZ_SCALE = 1e-4  # dz bins are equal in asinh(dz / DZ_SCALE): linear below ~1e-4, logarithmic above
DZ_STEP = 2e-4  # bin width in asinh(dz / DZ_SCALE): relative width of a dz bin for |dz| >> DZ_SCALE
DZ_RANGE = 20.0  # |dz| beyond this falls in one overflow bin each side (still counted and ordered)
STAT_CHUNK = 1 << 18  # values per slice of the streamed statistics (bounded temporaries)


def _recon(lo, hi, j, c):
    """Value j (0..c-1) of a bin whose c values are reconstructed evenly from ``lo`` to ``hi``."""
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(c > 1, j / np.maximum(c - 1, 1), 0.0)
        return np.where(hi > lo, lo + (hi - lo) * frac, lo)


def _within(lo, hi, c, v, strict: bool):
    """How many of a bin's c reconstructed values are <= v (``strict``: < v), elementwise."""
    lo, hi, c, v = np.broadcast_arrays(*(np.asarray(a, dtype=np.float64) for a in (lo, hi, c, v)))
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        t = np.where(hi > lo, (v - lo) / (hi - lo) * (c - 1), np.where(v >= lo, c - 1, -1.0))
    t = np.clip(np.where(np.isnan(t), -1.0, t), -1e300, 1e300)
    j0 = np.clip(np.floor(t) - 1, -1, np.maximum(c - 1, -1))
    cnt = j0 + 1
    for d in (1, 2, 3):  # the estimate of j is exact to +-1; the values themselves decide
        jj = j0 + d
        val = _recon(lo, hi, jj, c)
        ok = (jj <= c - 1) & ((val < v) if strict else (val <= v))
        cnt = cnt + ok
    return np.where(c > 0, cnt, 0).astype(np.int64)


class SlotSketch:
    """Count, minimum and maximum of the values in each of ``nslots`` ordered bins ("slots").

    Subclasses define :meth:`slot`, a non-decreasing map of values to slot indices. Adding is
    vectorised (one lexsort per call); merging two sketches is elementwise. Memory: 24 bytes per
    slot, independent of how many values were added.
    """

    def __init__(self, nslots: int):
        self.count = np.zeros(nslots, dtype=np.int64)
        self.lo = np.full(nslots, np.inf)
        self.hi = np.full(nslots, -np.inf)
        self._cum = None

    def slot(self, v: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def n(self) -> int:
        return int(self.count.sum())

    @property
    def nbytes(self) -> int:
        return self.count.nbytes + self.lo.nbytes + self.hi.nbytes

    def add(self, v) -> None:
        v = np.asarray(v, dtype=np.float64).reshape(-1)
        if v.size == 0:
            return
        k = self.slot(v)
        order = np.lexsort((v, k))
        v, k = v[order], k[order]
        start = np.flatnonzero(np.concatenate(([True], k[1:] != k[:-1])))
        end = np.append(start[1:], v.size)
        ks = k[start]
        self.count[ks] += end - start
        self.lo[ks] = np.minimum(self.lo[ks], v[start])
        self.hi[ks] = np.maximum(self.hi[ks], v[end - 1])
        self._cum = None

    def merge(self, other: "SlotSketch") -> None:
        self.count += other.count
        np.minimum(self.lo, other.lo, out=self.lo)
        np.maximum(self.hi, other.hi, out=self.hi)
        self._cum = None

    def cum(self) -> np.ndarray:
        """Values in the slots before each slot (length nslots + 1)."""
        if self._cum is None:
            self._cum = np.concatenate(([0], np.cumsum(self.count)))
        return self._cum

    def value_at(self, rank) -> np.ndarray:
        """The reconstructed order statistics of 0-based ``rank`` (array)."""
        r = np.asarray(rank, dtype=np.int64)
        cum = self.cum()
        k = np.searchsorted(cum, r, side="right") - 1
        return _recon(self.lo[k], self.hi[k], r - cum[k], self.count[k])

    def count_le(self, v, strict: bool = False) -> np.ndarray:
        """How many reconstructed values are <= v (``strict``: < v)."""
        v = np.asarray(v, dtype=np.float64)
        k = self.slot(v)
        return self.cum()[k] + _within(self.lo[k], self.hi[k], self.count[k], v, strict)

    def percentile(self, q) -> np.ndarray:
        """``np.percentile(values, q)`` (linear method) of the reconstructed values."""
        n = self.n
        pos = np.asarray(q, dtype=np.float64) / 100.0 * (n - 1)
        f = np.floor(pos)
        t = pos - f
        a = self.value_at(f.astype(np.int64))
        b = self.value_at(np.minimum(f.astype(np.int64) + 1, n - 1))
        d = b - a
        return np.where(t >= 0.5, b - d * (1 - t), a + d * t)  # numpy's _lerp

    def median(self) -> float:
        """``np.median`` of the reconstructed values."""
        n = self.n
        a, b = self.value_at(np.array([(n - 1) // 2, n // 2]))
        return float(np.mean([a, b]))

    def abs_dev_median(self, center: float) -> float:
        """``np.median(|values - center|)`` of the reconstructed values: each of the two middle
        order statistics of |x - center| is the smallest t with #{|x - center| <= t} > its rank,
        bracketed on grids of 2049 values of t (5 rounds: to ~3e-17 of the largest deviation)."""
        n = self.n
        occupied = self.count > 0
        top = max(abs(self.hi[occupied].max() - center), abs(center - self.lo[occupied].min()))
        need = np.array([(n - 1) // 2, n // 2], dtype=np.int64)[:, None] + 1
        a, b = np.zeros((2, 1)), np.full((2, 1), float(top))
        if self._abs_le(center, np.zeros(1))[0] >= need.max():
            return 0.0
        grid = np.linspace(0.0, 1.0, 2049)[None, :]
        for _ in range(5):  # invariant: count(a) < need <= count(b) (or a == 0 and count(0) >= need)
            ts = a + (b - a) * grid
            ok = self._abs_le(center, ts) >= need
            i = np.argmax(ok, axis=1)[:, None]  # ok[:, -1] holds (count(b) >= need)
            b = np.take_along_axis(ts, i, axis=1)
            a = np.take_along_axis(ts, np.maximum(i - 1, 0), axis=1)
        return float(np.mean(b))

    def _abs_le(self, center: float, t) -> np.ndarray:
        """#{|x - center| <= t} of the reconstructed values x, elementwise in t."""
        t = np.asarray(t, dtype=np.float64)
        return self.count_le(center + t) - self.count_le(center - t, strict=True)


class ResidualSketch(SlotSketch):
    """Sketch of dz values: slots equal in asinh(dz / ``DZ_SCALE``) with step ``DZ_STEP`` up to
    |dz| = ``DZ_RANGE``, one overflow slot each side (129,002 slots, 3.1 MB)."""

    def __init__(self, scale: float = DZ_SCALE, step: float = DZ_STEP, zrange: float = DZ_RANGE):
        self.scale, self.step = float(scale), float(step)
        self.half = int(np.ceil(np.arcsinh(zrange / scale) / step))
        super().__init__(2 * self.half + 2)

    def slot(self, v):
        with np.errstate(invalid="ignore"):
            k = np.floor(np.arcsinh(np.asarray(v, dtype=np.float64) / self.scale) / self.step)
        return (np.clip(np.nan_to_num(k, nan=0.0), -self.half - 1, self.half) + self.half + 1).astype(np.int64)


class PITSketch(SlotSketch):
    """Sketch of PIT values: slot 0 holds exact zeros, slots 1..``bins`` equal bins of (0, 1),
    the last slot exact ones; values below 0 / above 1 (not produced by the direct paths, kept
    for qp's) are counted in ``below`` / ``above`` (KS and CvM clip them, AD leaves them out, as
    :func:`rail.evaluation.deepz_metrics.pit_statistics`)."""

    def __init__(self, bins: int = PIT_BINS):
        self.bins = int(bins)
        self.below = 0
        self.above = 0
        super().__init__(self.bins + 2)
        self._entries = None

    def slot(self, v):
        v = np.asarray(v, dtype=np.float64)
        k = 1 + np.minimum(np.floor(np.clip(v, 0.0, 1.0) * self.bins), self.bins - 1)
        return np.where(v <= 0.0, 0, np.where(v >= 1.0, self.bins + 1, k)).astype(np.int64)

    def add(self, v) -> None:
        v = np.asarray(v, dtype=np.float64).reshape(-1)
        self.below += int(np.sum(v < 0.0))
        self.above += int(np.sum(v > 1.0))
        super().add(v[(v >= 0.0) & (v <= 1.0)])
        self._entries = None

    def merge(self, other: "PITSketch") -> None:
        super().merge(other)
        self.below += other.below
        self.above += other.above
        self._entries = None

    # ---- the sorted-runs interface of deepz_metrics.pit_statistics_runs (values in [0, 1])

    def _entry_cum(self):
        """Entries per slot: 1 for a slot whose values are all equal (one run), else its count."""
        if self._entries is None:
            e = np.where(self.count > 0, np.where(self.lo == self.hi, 1, self.count), 0)
            self._entries = np.concatenate(([0], np.cumsum(e)))
        return self._entries

    @property
    def m(self) -> int:
        return self.n

    @property
    def n_entries(self) -> int:
        return int(self._entry_cum()[-1])

    def entries(self, i0: int, i1: int):
        """Runs i0..i1-1 of the reconstructed sorted values: (values, multiplicities)."""
        i = np.arange(i0, i1, dtype=np.int64)
        ec = self._entry_cum()
        k = np.searchsorted(ec, i, side="right") - 1
        lo, hi, c = self.lo[k], self.hi[k], self.count[k]
        tie = lo == hi
        vals = np.where(tie, lo, _recon(lo, hi, i - ec[k], c))
        return vals, np.where(tie, c, 1)

    def entry_value(self, i: int) -> float:
        return float(self.entries(i, i + 1)[0][0])

    def entries_le(self, v: float) -> int:
        """How many runs have a value <= v."""
        if v < 0.0:
            return 0
        if v >= 1.0 and not np.isfinite(v):
            return self.n_entries
        k = int(self.slot(np.array([min(v, 1.0)]))[0])
        lo, hi, c = self.lo[k], self.hi[k], self.count[k]
        base = int(self._entry_cum()[k])
        if c == 0:
            return base
        if lo == hi:
            return base + int(lo <= v)
        return base + int(_within(lo, hi, c, v, strict=False))


class SortedRuns:
    """The sorted-runs interface over exact values in [0, 1] (the reference and array path)."""

    def __init__(self, pit):
        x = np.asarray(pit, dtype=np.float64).reshape(-1)
        inside = (x >= 0.0) & (x <= 1.0)
        self.below = int(np.sum(x < 0.0))
        self.above = int(x.size - self.below - inside.sum())
        self.values, self.counts = np.unique(x[inside], return_counts=True)
        self.m = int(self.counts.sum())
        self.n_entries = int(self.values.size)

    def entries(self, i0: int, i1: int):
        return self.values[i0:i1], self.counts[i0:i1]

    def entry_value(self, i: int) -> float:
        return float(self.values[i])

    def entries_le(self, v: float) -> int:
        return int(np.searchsorted(self.values, v, side="right"))


MAG_LOW = -1000  # magnitudes below this share one slot (ordered, not located)
MAG_HIGH = 90  # magnitudes >= 90 are non-detection markers: never added (default_mag_edges' rule)


class MagnitudeSketch(SlotSketch):
    """Count, smallest and largest magnitude per slot: one slot per integer value k and one per open
    interval (k, k + 1), k in [``MAG_LOW``, ``MAG_HIGH``): 2,180 slots, 52 kB, whatever the number of
    objects. Its :meth:`percentile` (numpy's linear method) is therefore *exact* in what
    :func:`~rail.evaluation.deepz_metrics.default_mag_edges` reads off it, the floor of the 1st and
    the ceiling of the 99th percentile: when the two order statistics it interpolates lie in one slot
    the result lies in that slot (exactly k, or strictly between k and k + 1, which fixes floor and
    ceiling); when they lie in two slots they are the last value of one and the first of the next,
    which a slot holds exactly (its maximum and minimum), and the interpolation is numpy's formula on
    the same two numbers. (Below ``MAG_LOW``: one slot, exact only when its values are equal.)"""

    def __init__(self):
        super().__init__(2 * (MAG_HIGH - MAG_LOW) + 1)

    def slot(self, v):
        v = np.asarray(v, dtype=np.float64)
        k = np.floor(v)
        s = 2 * (k - MAG_LOW) + 1 + (v > k)
        return np.clip(np.where(np.isfinite(s), s, 0), 0, self.count.size - 1).astype(np.int64)

    def add(self, v) -> None:
        """Add magnitudes; only finite values below ``MAG_HIGH`` are kept (the others are markers)."""
        v = np.asarray(v, dtype=np.float64).reshape(-1)
        super().add(v[np.isfinite(v) & (v < MAG_HIGH)])

    def value_at(self, rank) -> np.ndarray:
        """Order statistics: exact for the first and last value of a slot, reconstructed within
        the slot otherwise (see the class docstring for why that is exact enough)."""
        r = np.asarray(rank, dtype=np.int64)
        cum = self.cum()
        k = np.searchsorted(cum, r, side="right") - 1
        j, c = r - cum[k], self.count[k]
        inner = _recon(self.lo[k], self.hi[k], j, c)
        return np.where(j == 0, self.lo[k], np.where(j == c - 1, self.hi[k], inner))


class QuantileRows:
    """Rows whose value sits at given quantiles of the values in [lo, hi], from one chunked pass.

    ``nbins`` equal bins on [lo, hi] (the last one closed, as ``np.histogram``) hold a count and the
    first row (in the order rows were added) of their values: 16 bytes per bin, whatever the number
    of rows. :meth:`rows` returns, for each requested rank of the sorted values, the first row of the
    bin holding that rank: a row whose value is within one bin width, (hi - lo) / nbins, of the value
    at that rank (the exact choice would need every value). Non-finite values and values outside
    [lo, hi] are not counted."""

    def __init__(self, lo: float, hi: float, nbins: int = 4096):
        self.lo, self.hi, self.nbins = float(lo), float(hi), int(nbins)
        self.count = np.zeros(self.nbins, dtype=np.int64)
        self.first = np.full(self.nbins, np.iinfo(np.int64).max, dtype=np.int64)

    @property
    def n(self) -> int:
        return int(self.count.sum())

    @property
    def bin_width(self) -> float:
        return (self.hi - self.lo) / self.nbins

    def add(self, v, start: int) -> None:
        """Add the values of rows ``start``, ``start + 1``, ..."""
        v = np.asarray(v, dtype=np.float64).reshape(-1)
        ok = np.flatnonzero(np.isfinite(v) & (v >= self.lo) & (v <= self.hi))
        if ok.size == 0:
            return
        k = np.floor((v[ok] - self.lo) / max(self.hi - self.lo, 1e-300) * self.nbins).astype(np.int64)
        k = np.clip(k, 0, self.nbins - 1)
        self.count += np.bincount(k, minlength=self.nbins)
        ks, first = np.unique(k, return_index=True)  # first occurrence in this chunk, in row order
        np.minimum.at(self.first, ks, start + ok[first])

    def rows(self, ranks) -> np.ndarray:
        """The chosen row for each 0-based rank (< :attr:`n`) of the sorted counted values."""
        cum = np.cumsum(self.count)
        k = np.searchsorted(cum, np.asarray(ranks, dtype=np.int64), side="right")
        return self.first[k]
