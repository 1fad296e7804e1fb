"""Direct evaluation of qp PDFs for the metrics: :class:`PDFBlock` and the chunked readers.

``qp.hist``, ``qp.interp`` and ``qp.mixmod`` files are read with h5py, and
their PDFs evaluated from the stored parameters (:class:`PDFBlock`): a tabulated PDF's CDF
on its own nodes is a cumulative sum (hist: sum of bin masses; interp: trapezoids), PIT is
that CDF interpolated linearly at ztrue (qp's CDF is linear between the nodes too), CRPS is
its exact integral (:func:`crps_grid` on the nodes), and densities on the metric grids are
qp's rules (hist: qp's own bin lookup; interp: linear, 0 outside the nodes). Values are
normalised as qp normalises them on reading. Gaussian mixtures use the closed-form CRPS
and CDF (and, in the metric pass, closed forms of the CDE/Brier grid sums:
:mod:`rail.evaluation.deepz_mixsums`). :meth:`PDFBlock.cdf` tabulates the CDFs on any grid
(the stack's inputs). Any other representation goes through qp's general machinery (the reference in
``tests/test_metrics_fast.py``). One departure from qp, kept on purpose: qp's
``interp`` CDF starts at ``0.5 y_0 (x_1 - x_0)`` at the first node (an offset in
``interp_gen._compute_ycumul``), ours at 0, the CDF of the linearly interpolated PDF; the
two differ by that much, which is 0 for PDFs that vanish at the first node. Mixtures on
grids may be evaluated in float32 (``PDFBlock.float32``, set from
``MetricConfig.mixture_float32``).

Files are read ``chunk_size`` rows at a time (:func:`iterate_blocks`, the next chunk on a
background thread: :func:`_prefetched`) without building qp ensembles: qp's construction
and normalisation on reading cost more than the metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Mapping

import numpy as np
import qp
from qp.utils.array import get_bin_indices
from scipy.special import ndtr

from rail.deepz.gmm import gmm_crps_numpy, mixture_cdf_on_grid, mixture_pdf_on_grid
from rail.deepz.qputils import ensemble_pit
from rail.deepz.qputils import representation as _kind

from .deepz_mixsums import even_step

_BLOCK = 2048  # rows per block of grid evaluations (memory: a few x _BLOCK x grid floats)
DIRECT_KINDS = ("hist", "interp", "mixmod")


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


def crps_grid(cdf: np.ndarray, grid: np.ndarray, ztrue, clip: bool = True) -> np.ndarray:
    """CRPS_i = int (F_i(x) - 1[x >= z_i])^2 dx from CDFs tabulated on ``grid`` (N, G).

    Written as ``int_lo^hi F^2 - 2 int_zc^hi F + (hi - zc) + |z - zc|`` with
    ``zc = clip(z, lo, hi)``, taking F linear between grid points (exact for ``qp.hist`` and
    ``qp.interp`` tabulated on their own nodes, whose CDFs qp interpolates linearly); the step
    at ``z`` is integrated exactly. Assumes F = 0 below ``lo`` and F = 1 above ``hi`` (the
    grid covers the PDF's support). Zero-width intervals (repeated nodes) are allowed.
    ``clip``: clip F to [0, 1] first (a copy; not needed for CDFs built by cumulative sums).
    """
    cdf = np.asarray(cdf, dtype=np.float64)
    if clip:
        cdf = np.clip(cdf, 0.0, 1.0)
    cdf = np.ascontiguousarray(cdf)
    grid = np.asarray(grid, dtype=np.float64)
    z = np.asarray(ztrue, dtype=np.float64)
    n, g = cdf.shape
    lo, hi = grid[0], grid[-1]
    dx = np.diff(grid)
    w = np.zeros(grid.size)  # node weights: the widths of the adjacent intervals
    w[:-1] += dx
    w[1:] += dx
    # F linear on each interval: int F^2 = sum dx (f0^2 + f0 f1 + f1^2) / 3 = (F^2 . w + f0 f1 . dx) / 3
    int_f2 = (np.einsum("ij,ij,j->i", cdf, cdf, w) + np.einsum("ij,ij,j->i", cdf[:, :-1], cdf[:, 1:], dx)) / 3.0
    zc = np.clip(z, lo, hi)
    j = np.clip(np.searchsorted(grid, zc, side="right") - 1, 0, grid.size - 2)
    rows = np.arange(n)
    # int_{grid[j+1]}^{hi} F = sum_{i > j} dx_i (F_i + F_(i+1)) / 2 = (sum_{k > j} F_k w_k - F_(j+1) dx_j) / 2;
    # the suffix sums of F w in one pass (np.add.reduceat over each row's [j + 1, end), no cumulative sum)
    starts = np.empty(2 * n, dtype=np.intp)
    starts[0::2] = rows * g
    starts[1::2] = rows * g + j + 1
    step = even_step(grid)
    if step is not None and n:  # even grid: w = 2 h inside, h at the last node
        suffix = 2.0 * step * np.add.reduceat(cdf.reshape(-1), starts)[1::2] - step * cdf[:, -1]
    elif n:
        suffix = np.add.reduceat((cdf * w).reshape(-1), starts)[1::2]
    else:
        suffix = np.zeros(0)
    f0j, f1j, dxj = cdf[rows, j], cdf[rows, j + 1], dx[j]
    after = 0.5 * (suffix - f1j * dxj)
    # exact integral of the linear CDF piece from zc to grid[j+1]
    with np.errstate(invalid="ignore", divide="ignore"):
        slope = np.where(dxj > 0, (f1j - f0j) / np.where(dxj > 0, dxj, 1.0), 0.0)
    t = zc - grid[j]
    piece = 0.5 * (f0j + f1j) * dxj - (f0j * t + 0.5 * slope * t * t)
    return int_f2 - 2.0 * (after + piece) + (hi - zc) + np.abs(z - zc)


def _is_mixmod(ens: qp.Ensemble) -> bool:
    """Whether ``ens`` holds Gaussian mixtures (``qp.mixmod``)."""
    return _kind(ens) == "mixmod"


def crps(ens: qp.Ensemble, ztrue, limits=(0.0, 3.0), npts: int = 3001) -> np.ndarray:
    """Per-object CRPS = int (F(x) - 1[x >= ztrue])^2 dx of each PDF at its true redshift.

    hist/interp/mixmod through :class:`PDFBlock` (exact on the PDF's own nodes; closed form
    for Gaussian mixtures); otherwise through qp: the CDF is tabulated on ``npts`` evenly
    spaced points over ``limits`` widened to the ensemble's tabulated support, and integrated
    with :func:`crps_grid` (in blocks of rows). The qp path is :func:`crps_qp`.
    """
    ztrue = np.atleast_1d(np.asarray(ztrue, dtype=np.float64))
    block = PDFBlock.from_ensemble(ens)
    if block.kind in DIRECT_KINDS:
        return block.crps(ztrue)
    return crps_qp(ens, ztrue, limits, npts)


def crps_qp(ens: qp.Ensemble, ztrue, limits=(0.0, 3.0), npts: int = 3001) -> np.ndarray:
    """CRPS through qp's ``cdf`` on an even grid (any representation): the general path."""
    ztrue = np.atleast_1d(np.asarray(ztrue, dtype=np.float64))
    lo, hi = _ensemble_support(ens, limits)
    step = (limits[1] - limits[0]) / max(npts - 1, 1)
    grid = np.linspace(lo, hi, int(round((hi - lo) / step)) + 1)
    out = np.empty(ens.npdf)
    for s in range(0, ens.npdf, _BLOCK):
        e = min(s + _BLOCK, ens.npdf)
        sub = ens[s:e] if (s, e) != (0, ens.npdf) else ens
        out[s:e] = crps_grid(np.asarray(sub.cdf(grid)).reshape(e - s, -1), grid, ztrue[s:e])
    return out


# ----------------------------------------------------------------- direct PDF evaluation


def _cumsum_rows(m: np.ndarray) -> np.ndarray:
    """``np.cumsum(m, axis=1)`` computed in place in ``m`` (float64; rows contiguous)."""
    return np.cumsum(m, axis=1, out=m)


def _interp_weights(x: np.ndarray, grid: np.ndarray):
    """Index j, weight t and inside-mask for linear interpolation of nodes ``x`` at ``grid``."""
    grid = np.asarray(grid, dtype=np.float64)
    j = np.clip(np.searchsorted(x, grid, side="right") - 1, 0, x.size - 2)
    dx = x[j + 1] - x[j]
    with np.errstate(invalid="ignore", divide="ignore"):
        t = np.where(dx > 0, (grid - x[j]) / np.where(dx > 0, dx, 1.0), 0.0)
    inside = (grid >= x[0]) & (grid <= x[-1])
    return j, np.clip(t, 0.0, 1.0), inside


_LOOKUPS: dict = {}  # (kind, nodes, grid) -> the grid's lookup in the nodes (see _grid_lookup)


def _grid_lookup(kind: str, x: np.ndarray, grid: np.ndarray):
    """The lookup of ``grid`` in a tabulated PDF's nodes ``x``, computed once per (kind, x,
    grid) and kept (a few small arrays per grid; every block of a file has the same nodes
    and the metric grids are fixed): ``hist``: qp's bin index and inside-mask
    (``get_bin_indices``), ``interp``: :func:`_interp_weights`."""
    key = (kind, x.tobytes(), grid.tobytes())
    hit = _LOOKUPS.get(key)
    if hit is None:
        hit = get_bin_indices(x, grid) if kind == "hist" else _interp_weights(x, grid)
        if len(_LOOKUPS) >= 64:
            _LOOKUPS.clear()
        _LOOKUPS[key] = hit
    return hit


@dataclass
class PDFBlock:
    """A block of PDFs in a form the metrics evaluate directly.

    ``kind`` is ``hist`` (``x`` = bin edges (B+1,), ``y`` = densities (n, B)), ``interp``
    (``x`` = nodes (G,), ``y`` = densities at the nodes (n, G)), ``mixmod`` (``mix`` =
    weights, means, stds, each (n, K)) or ``qp`` (anything else: ``ens``, evaluated by qp).
    ``y`` and the mixture weights are normalised as qp normalises them; ``bad`` flags rows
    that are not finite or cannot be normalised. ``ancil`` holds the ancil columns.
    """

    kind: str
    n: int
    x: np.ndarray | None = None
    y: np.ndarray | None = None
    mix: tuple | None = None
    ens: qp.Ensemble | None = None
    ancil: dict = field(default_factory=dict)
    bad: np.ndarray | None = None
    _cdf: np.ndarray | None = None
    float32: bool = False  # mixtures on grids in float32 (deepz_metrics.MetricConfig.mixture_float32)

    # ---- construction
    @classmethod
    def from_arrays(cls, kind: str, meta: Mapping, data: Mapping, ancil: Mapping | None = None,
                    prepare: bool = True) -> "PDFBlock":
        """From a qp representation's stored parameters (``meta``: bins/xvals; ``data``: objdata).

        ``prepare=False`` defers the normalisation and CDFs to :meth:`prepared` (so that row
        blocks can do it on worker threads)."""
        ancil = dict(ancil or {})
        if kind in ("hist", "interp"):
            x = np.asarray(meta["bins" if kind == "hist" else "xvals"], dtype=np.float64).reshape(-1)
            y = np.asarray(data["pdfs" if kind == "hist" else "yvals"], dtype=np.float64)
            block = cls(kind, y.reshape(-1, y.shape[-1]).shape[0], x=x, y=y.reshape(-1, y.shape[-1]), ancil=ancil)
        elif kind == "mixmod":
            w, mu, s = (np.asarray(data[k], dtype=np.float64) for k in ("weights", "means", "stds"))
            w, mu, s = (a.reshape(-1, a.shape[-1]) for a in (w, mu, s))
            block = cls(kind, w.shape[0], mix=(w, mu, s), ancil=ancil)
        else:
            raise ValueError(f"no direct path for qp representation {kind!r}")
        return block.prepared() if prepare else block

    def prepared(self) -> "PDFBlock":
        """This block normalised as qp normalises on reading, with ``bad`` flags and (hist,
        interp) the CDF on the nodes; itself if already done."""
        if self.bad is not None:
            return self
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            if self.kind == "mixmod":
                w, mu, s = self.mix
                wsum = w.sum(axis=1)
                bad = ~(np.isfinite(w).all(1) & np.isfinite(mu).all(1) & np.isfinite(s).all(1)
                        & (s > 0).all(1) & (wsum > 0))
                return replace(self, mix=(w / np.where(bad, np.nan, wsum)[:, None], mu, s), bad=bad)
            # hist / interp: normalised as qp does; the CDF on the nodes is the cumulative mass
            # divided by the total, so that it ends at exactly 1 (qp's PIT statistics drop PITs
            # of exactly 0 or 1: 1 - 1e-16 would count). Not clipped: qp's CDF is not either.
            # The cumulative sums are taken in place in the CDF array (no mass temporary); on an
            # evenly spaced grid (step h) the constant factor (h for hist, h / 2 for interp) is
            # left out of them and put into the total instead.
            x, y = self.x, self.y
            dx = np.diff(x)
            h = even_step(x)
            cdf = np.empty((y.shape[0], x.size))
            cdf[:, 0] = 0.0
            cum = cdf[:, 1:]
            if self.kind == "hist" and h is not None:
                np.cumsum(y, axis=1, out=cum)
            else:
                if self.kind == "hist":
                    np.multiply(y, dx, out=cum)
                else:
                    np.add(y[:, 1:], y[:, :-1], out=cum)
                    if h is None:
                        cum *= 0.5 * dx
                _cumsum_rows(cum)
            last = cum[:, -1].copy()
            total = last if h is None else last * (h if self.kind == "hist" else 0.5 * h)
            bad = ~(np.isfinite(total) & (total > 0))  # (a non-finite value makes the total so)
            cum /= np.where(bad, np.nan, last)[:, None]
            y = y * (1.0 / np.where(bad, np.nan, total))[:, None]
            return replace(self, y=y, bad=bad, _cdf=cdf)

    @classmethod
    def from_ensemble(cls, ens: qp.Ensemble, prepare: bool = True) -> "PDFBlock":
        kind = _kind(ens)
        ancil = {} if ens.ancil is None else {k: np.asarray(v) for k, v in ens.ancil.items()}
        if kind in DIRECT_KINDS:
            return cls.from_arrays(kind, ens.metadata, ens.objdata, ancil, prepare=prepare)
        return cls("qp", ens.npdf, ens=ens, ancil=ancil, bad=np.zeros(ens.npdf, dtype=bool))

    def rows(self, s: int, e: int) -> "PDFBlock":
        """Rows [s, e) as a block (views, no copies)."""
        if (s, e) == (0, self.n):
            return self
        cut = dict(n=e - s, ancil={k: v[s:e] for k, v in self.ancil.items()},
                   bad=None if self.bad is None else self.bad[s:e])
        if self.kind in ("hist", "interp"):
            return replace(self, y=self.y[s:e], _cdf=None if self._cdf is None else self._cdf[s:e], **cut)
        if self.kind == "mixmod":
            return replace(self, mix=tuple(a[s:e] for a in self.mix), **cut)
        return replace(self, ens=self.ens[s:e], **cut)

    def take(self, idx) -> "PDFBlock":
        """The rows ``idx`` (integer array) as a prepared block (copies)."""
        block = self.prepared()
        idx = np.asarray(idx)
        cut = dict(n=idx.size, ancil={k: np.asarray(v)[idx] for k, v in block.ancil.items()}, bad=block.bad[idx])
        if block.kind in ("hist", "interp"):
            return replace(block, y=block.y[idx], _cdf=block._cdf[idx], **cut)
        if block.kind == "mixmod":
            return replace(block, mix=tuple(a[idx] for a in block.mix), **cut)
        return replace(block, ens=block.ens[idx], **cut)

    # ---- evaluation
    def pdf(self, grid) -> np.ndarray:
        """Densities on ``grid`` (G,) -> (n, G), by qp's rules for each representation."""
        grid = np.asarray(grid, dtype=np.float64).reshape(-1)
        with np.errstate(invalid="ignore", over="ignore"):
            if self.kind == "hist":
                idx, mask = _grid_lookup("hist", self.x, grid)  # qp's own bin lookup (edges included)
                return self.y[:, idx] * mask
            if self.kind == "interp":
                j, t, inside = _grid_lookup("interp", self.x, grid)
                return (self.y[:, j] * (1.0 - t) + self.y[:, j + 1] * t) * inside
            if self.kind == "mixmod":
                w, mu, s = self.mix
                ok = ~self.bad
                if ok.all():
                    return _mixture_grid(w, mu, s, grid, self.float32)
                out = np.full((self.n, grid.size), np.nan)  # evaluate the good rows only
                if ok.any():
                    out[ok] = _mixture_grid(w[ok], mu[ok], s[ok], grid, self.float32)
                return out
        return np.asarray(self.ens.pdf(grid), dtype=np.float64).reshape(self.n, -1)

    def sq_sums(self, grids) -> np.ndarray:
        """``sum_g w_g p(g)^2`` per row for each ``(grid, w)`` in ``grids`` -> (n, len(grids)), for
        ``hist`` and ``interp`` without tabulating the PDFs on the grids: on a grid, such a PDF is
        linear in its stored values (a bin lookup, or two nodes and a weight), so the weighted sum
        of squares is a quadratic form in them whose coefficients collect the grid's weights
        (``y_b^2`` per bin for ``hist``; ``y_k^2`` and ``y_k y_(k+1)`` per node and interval for
        ``interp``). Equal to ``(self.pdf(grid)**2) @ w`` up to the order of the additions
        (``tests/test_metrics_fast.py``); the CDE loss's trapezoid and the Brier sum are two such sums."""
        if self.kind not in ("hist", "interp"):
            raise ValueError(f"sq_sums is for hist/interp blocks, not {self.kind!r}")
        nx = self.x.size
        diag = np.zeros((nx, len(grids)))
        off = np.zeros((nx - 1, len(grids)))
        for c, (grid, w) in enumerate(grids):
            grid = np.asarray(grid, dtype=np.float64).reshape(-1)
            w = np.broadcast_to(np.asarray(w, dtype=np.float64), grid.shape)
            if self.kind == "hist":
                idx, mask = _grid_lookup("hist", self.x, grid)
                np.add.at(diag[:, c], idx[mask], w[mask])
            else:
                j, t, inside = _grid_lookup("interp", self.x, grid)
                wi = np.where(inside, w, 0.0)
                np.add.at(diag[:, c], j, wi * (1.0 - t) ** 2)
                np.add.at(diag[:, c], j + 1, wi * t * t)
                np.add.at(off[:, c], j, 2.0 * wi * t * (1.0 - t))
        y = self.y
        with np.errstate(invalid="ignore", over="ignore"):
            if self.kind == "hist":
                return (y * y) @ diag[: y.shape[1]]
            return (y * y) @ diag + (y[:, :-1] * y[:, 1:]) @ off

    def at_grid(self, grid, gidx) -> np.ndarray:
        """``p_i(grid[gidx_i])`` for each row i (``hist``/``interp``): the values ``pdf(grid)``
        would hold at those columns, by the same arithmetic, without tabulating the rest."""
        grid = np.asarray(grid, dtype=np.float64).reshape(-1)
        gidx = np.asarray(gidx).reshape(-1)
        rows = np.arange(self.n)
        with np.errstate(invalid="ignore", over="ignore"):
            if self.kind == "hist":
                idx, mask = _grid_lookup("hist", self.x, grid)
                return self.y[rows, idx[gidx]] * mask[gidx]
            if self.kind == "interp":
                j, t, inside = _grid_lookup("interp", self.x, grid)
                jj, tt = j[gidx], t[gidx]
                return (self.y[rows, jj] * (1.0 - tt) + self.y[rows, jj + 1] * tt) * inside[gidx]
        raise ValueError(f"at_grid is for hist/interp blocks, not {self.kind!r}")

    def cdf(self, grid) -> np.ndarray:
        """CDFs on one ``grid`` (G,) -> (n, G) float64, ``_BLOCK`` rows at a time: hist/interp
        linear between the nodes of the CDF built by cumulative sums (0 below the first node,
        1 from the last: :meth:`cdf_at`'s rule), Gaussian mixtures in closed form
        (:func:`rail.deepz.gmm.mixture_cdf_on_grid`, float64), qp's ``cdf`` otherwise. Rows that cannot be
        normalised (``bad``) are NaN."""
        grid = np.asarray(grid, dtype=np.float64).reshape(-1)
        out = np.empty((self.n, grid.size))
        if self.kind in ("hist", "interp"):
            j, t, _ = _grid_lookup("interp", self.x, grid)
            below, above = grid < self.x[0], grid >= self.x[-1]
        for s in range(0, self.n, _BLOCK):
            e = min(s + _BLOCK, self.n)
            b = self.rows(s, e).prepared()
            if self.kind in ("hist", "interp"):
                c = b._cdf[:, j] * (1.0 - t) + b._cdf[:, j + 1] * t
                c[:, below] = 0.0
                c[:, above] = 1.0
                c[b.bad] = np.nan
                out[s:e] = c
            elif self.kind == "mixmod":
                w, mu, sd = b.mix
                out[s:e] = mixture_cdf_on_grid(w, mu, np.where(b.bad[:, None], 1.0, sd), grid)
                out[s:e][b.bad] = np.nan
            else:
                out[s:e] = np.asarray(b.ens.cdf(grid), dtype=np.float64).reshape(e - s, -1)
        return out

    def cdf_at(self, z) -> np.ndarray:
        """CDF_i(z_i) (PIT when z = ztrue): linear between the nodes of a tabulated PDF
        (0 below the first, 1 from the last), closed form for mixtures, qp otherwise."""
        z = np.asarray(z, dtype=np.float64).reshape(-1)
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            if self.kind in ("hist", "interp"):
                j, t, _ = _interp_weights(self.x, z)
                rows = np.arange(self.n)
                c = self._cdf[rows, j] * (1.0 - t) + self._cdf[rows, j + 1] * t
                return np.where(z < self.x[0], 0.0, np.where(z >= self.x[-1], 1.0, c))
            if self.kind == "mixmod":
                w, mu, s = self.mix
                return np.sum(w * ndtr((z[:, None] - mu) / s), axis=1)
        return ensemble_pit(self.ens, z)

    def crps(self, z) -> np.ndarray:
        """Per-object CRPS at z: exact on the own nodes (hist/interp), closed form (mixmod)."""
        z = np.asarray(z, dtype=np.float64).reshape(-1)
        out = np.full(self.n, np.nan)
        ok = ~self.bad
        if self.kind in ("hist", "interp"):
            if ok.all():
                return crps_grid(self._cdf, self.x, z, clip=False)
            out[ok] = crps_grid(self._cdf[ok], self.x, z[ok], clip=False)
        elif self.kind == "mixmod":
            w, mu, s = self.mix
            if ok.any():
                out[ok] = gmm_crps_numpy(w[ok], mu[ok], s[ok], z[ok])
        else:
            raise ValueError("PDFBlock.crps: use crps_qp for qp-evaluated blocks")
        return out


def _mixture_grid(w, mu, s, grid, float32: bool) -> np.ndarray:
    """Mixture densities on a grid: :func:`rail.deepz.gmm.mixture_pdf_on_grid`, in float32 if
    asked (faster), densities within ~2e-6 of the object's largest density (float32
    rounding of (z - mu)/sigma), 0 instead of densities below ~1e-35."""
    return mixture_pdf_on_grid(w, mu, s, grid, dtype=np.float32 if float32 else np.float64)


def ensemble_pdf(ens: qp.Ensemble, grid) -> np.ndarray:
    """``ens.pdf(grid)`` as an (N, G) float64 array: hist, interp and mixmod directly
    (:class:`PDFBlock`, qp's values to rounding), anything else by qp."""
    return PDFBlock.from_ensemble(ens).pdf(grid)



def _to_ensemble(block: PDFBlock) -> qp.Ensemble:
    """The qp ensemble of a direct block (for qp's median/mean)."""
    if block.kind == "hist":
        return qp.Ensemble(qp.hist, data=dict(bins=block.x, pdfs=block.y))
    if block.kind == "interp":
        return qp.Ensemble(qp.interp, data=dict(xvals=block.x, yvals=block.y))
    w, mu, s = block.mix
    return qp.Ensemble(qp.mixmod, data=dict(weights=w, means=mu, stds=s))


# ----------------------------------------------------------------- reading estimates


def _h5_kind(f) -> str | None:
    """qp representation name of an open qp HDF5 file, or None if not a plain qp file."""
    try:
        name = f["meta"]["pdf_name"][0]
    except (KeyError, TypeError, IndexError):
        return None
    return name.decode() if isinstance(name, bytes) else str(name)


_DIRECT_LAYOUT = {"hist": (("bins",), ("pdfs",)), "interp": (("xvals",), ("yvals",)),
                  "mixmod": ((), ("weights", "means", "stds"))}


def _direct_file_kind(f) -> str | None:
    kind = _h5_kind(f)
    if kind not in _DIRECT_LAYOUT:
        return None
    meta_keys, data_keys = _DIRECT_LAYOUT[kind]
    if "data" not in f or not all(k in f["meta"] for k in meta_keys) or not all(k in f["data"] for k in data_keys):
        return None
    return kind


def iterate_blocks(estimate, chunk_size: int, buffers: int = 0):
    """Yield (start, end, :class:`PDFBlock`) from a qp file path or a ``qp.Ensemble``.

    hist/interp/mixmod files are read with h5py, ``chunk_size`` rows at a time, without
    building qp ensembles (qp's construction and normalisation on reading cost more than the
    metrics); other files go through ``qp.iterator``. ``buffers`` > 0: the PDF parameters are
    read into that many preallocated arrays in turn (no fresh memory per chunk: a chunk of
    600-bin histograms is 48 MB per 10,000 rows, whose page faults cost more than reading it),
    so a block's ``y``/``mix`` arrays are overwritten ``buffers`` chunks later: only for a
    consumer that is done with a chunk by then: :func:`_prefetched` reads chunk k + 2 when its
    consumer asks for chunk k + 1, so two buffers suffice there (:func:`accumulate_estimate`).
    """
    if isinstance(estimate, qp.Ensemble):
        if _kind(estimate) in DIRECT_KINDS:
            block = PDFBlock.from_ensemble(estimate, prepare=False)
            for s in range(0, block.n, chunk_size):
                e = min(s + chunk_size, block.n)
                yield s, e, block.rows(s, e)
            return
        for s, e, ens in iterate_ensemble(estimate, chunk_size):
            yield s, e, PDFBlock.from_ensemble(ens)
        return
    import h5py

    with h5py.File(str(estimate), "r") as f:
        kind = _direct_file_kind(f)
        if kind is not None:
            meta_keys, data_keys = _DIRECT_LAYOUT[kind]
            meta = {k: f["meta"][k][()] for k in meta_keys}
            n = f["data"][data_keys[0]].shape[0]
            anc = f["ancil"] if "ancil" in f else {}
            pool = []
            for i, s in enumerate(range(0, n, chunk_size)):
                e = min(s + chunk_size, n)
                if buffers > 0 and all(f["data"][k].dtype == np.float64 and f["data"][k].ndim == 2
                                       for k in data_keys):
                    if len(pool) < buffers:
                        pool.append({k: np.empty((min(chunk_size, n), f["data"][k].shape[1])) for k in data_keys})
                    buf = pool[i % buffers]
                    data = {}
                    for k in data_keys:
                        f["data"][k].read_direct(buf[k], np.s_[s:e], np.s_[0:e - s])
                        data[k] = buf[k][: e - s]
                else:
                    data = {k: f["data"][k][s:e] for k in data_keys}
                ancil = {k: anc[k][s:e] for k in anc}
                yield s, e, PDFBlock.from_arrays(kind, meta, data, ancil, prepare=False)
            return
    for s, e, ens in qp.iterator(str(estimate), chunk_size=chunk_size):
        yield s, e, PDFBlock.from_ensemble(ens)


def _prefetched(items):
    """Iterate ``items`` with the next one read on a background thread while the caller works
    on the current one (reading a chunk is serial; the metrics of a chunk run on the workers)."""
    from concurrent.futures import ThreadPoolExecutor

    done = object()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="deepz-read") as ex:
        fut = ex.submit(next, items, done)
        while True:
            item = fut.result()
            if item is done:
                return
            fut = ex.submit(next, items, done)
            yield item


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
