"""Gaussian mixtures in NumPy (no torch): densities on a grid, CDFs, the closed-form CRPS and the
size of an evenly spaced fixed basis.

The evaluation side of the mixtures (``deepz-compare``'s metric pass, the stack's inputs,
member selection from stored parameters): mixtures ``p(z) = sum_k w_k N(z | mu_k, s_k)``
given as arrays (N, K) of weights, means and widths (redshift units, widths > 0). The torch
side that trains and summarises them is :mod:`rail.deepz.mixtures` and :mod:`rail.deepz.pdf`;
this module imports neither, so the metrics run without importing torch.

Exponentials are floored as in :data:`rail.deepz.mixtures.EXP_FLOOR` (-700 in float64,
-80 in float32): a term below ~1e-304 (float64) or ~1.8e-35 (float32) counts as that value,
far below any density it is added to, and no exponential underflows to a subnormal.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import erf, ndtr

#: exponent floor per float dtype (the float32 and float64 entries of rail.deepz.mixtures.EXP_FLOOR)
EXP_FLOOR = {np.dtype(np.float32): -80.0, np.dtype(np.float64): -700.0}
_LOG_INV_SQRT_2PI = -0.5 * math.log(2.0 * math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRTPI = 1.0 / math.sqrt(math.pi)
#: CDF terms w_k Phi(t) are taken with w_k >= 1e-15 and t >= -9 (Phi(-9) = 1e-19: changes a
#: CDF by < 2e-14), as rail.deepz.pdf's torch CDF
_CDF_T_FLOOR, _CDF_W_FLOOR = -9.0, 1e-15


#: elements of one (rows, pairs) array of :class:`MixturePairs` (512 KB): a block of rows this
#: size keeps its ~20 temporaries in a core's cache (larger blocks: slower, see CHANGELOG.md)
PAIR_BLOCK_ELEMENTS = 1 << 16


def pair_blocks(rows: np.ndarray, k: int) -> list:
    """``rows`` (indices) cut into pieces whose :class:`MixturePairs` of ``k`` components have
    about ``PAIR_BLOCK_ELEMENTS`` pair entries (at least 16 rows a piece). Rows are independent:
    the values do not depend on the cut."""
    step = max(16, PAIR_BLOCK_ELEMENTS // max(1, k * (k - 1) // 2))
    return [rows[i:i + step] for i in range(0, rows.size, step)]


def exp_floored(a: np.ndarray) -> np.ndarray:
    """exp(a) with the float64 floor of :data:`EXP_FLOOR`, in place in ``a`` (a temporary)."""
    np.maximum(a, EXP_FLOOR[np.dtype(np.float64)], out=a)
    return np.exp(a, out=a)


class MixturePairs:
    """Gaussian mixtures (n, K) (float64) with the terms of their K(K-1)/2 component pairs
    i < j, evaluated once: ``mu_i - mu_j`` (``dm``), ``s_i^2 + s_j^2`` (``v``, ``sd`` its
    root), ``t = dm / sd``, the standard normal density at ``t`` (``phi``) and ``w_i w_j``
    (``ww``), as (n, P) arrays. :meth:`crps` is the closed-form CRPS;
    :class:`rail.evaluation.deepz_mixsums.MixtureSquares` adds the grid sums of ``p^2``, which
    need the same pairs. Memory: ~10 (n, P) float64 arrays; cut large sets with
    :func:`pair_blocks`."""

    def __init__(self, w, mu, s):
        self.w, self.mu, self.s = (np.ascontiguousarray(a, dtype=np.float64) for a in (w, mu, s))
        iu, ju = np.triu_indices(self.w.shape[1], 1)

        def pair(a):  # (n, K) -> its columns iu and ju, (n, P) each (np.take: the fast gather)
            return np.take(a, iu, axis=1), np.take(a, ju, axis=1)

        (mi, mj), (wi, wj), (si, sj) = pair(self.mu), pair(self.w), pair(self.s)
        vi, vj = si * si, sj * sj  # the pairs of s^2 (squaring after the gather: two gathers fewer)
        self.v = vi + vj  # (n, P) variances of mu_i - mu_j
        self.sd = np.sqrt(self.v)
        self.dm = mi - mj
        self.t = self.dm / self.sd
        self.phi = exp_floored(-0.5 * self.t * self.t) * _INV_SQRT_2PI  # standard normal density at t
        self.ww = wi * wj
        self._more_pairs(mi, mj, vi, vj, si, sj)

    def _more_pairs(self, mi, mj, vi, vj, si, sj) -> None:
        """Hook for subclasses needing more pair terms from the gathered columns."""

    def crps(self, z) -> np.ndarray:
        """CRPS at ``z`` (n,): ``sum_i w_i A(z - mu_i, s_i^2) - 1/2 sum_ij w_i w_j A(mu_i - mu_j,
        s_i^2 + s_j^2)`` with ``A(m, v) = E|N(m, v)|`` (Grimit et al. 2006, QJRMS 132, 2925; the
        training loss :func:`rail.deepz.mixtures.gmm_crps`), the pair sum as its diagonal
        (``A(0, 2 s^2) = 2 s / sqrt(pi)``) plus twice the pairs i < j."""
        z = np.asarray(z, dtype=np.float64).reshape(-1, 1)
        d = z - self.mu
        t = d / self.s
        a1 = 2.0 * self.s * exp_floored(-0.5 * t * t) * _INV_SQRT_2PI + d * erf(t * _INV_SQRT2)
        term1 = (self.w * a1).sum(1)
        pair = 2.0 * self.sd * self.phi + self.dm * erf(self.t * _INV_SQRT2)
        diag = (self.w * self.w * 2.0 * self.s * _INV_SQRTPI).sum(1)
        return term1 - 0.5 * diag - (self.ww * pair).sum(1)


def gmm_crps_numpy(weights, means, sigmas, z) -> np.ndarray:
    """Closed-form CRPS of Gaussian mixtures (N, K) at ``z`` (N,), float64 -> (N,)
    (:meth:`MixturePairs.crps`, on row blocks of :func:`pair_blocks`). Cost O(K^2) per object;
    non-finite parameters give NaN for their row."""
    w, mu, s = (np.asarray(a, dtype=np.float64) for a in (weights, means, sigmas))
    z = np.asarray(z, dtype=np.float64).reshape(-1)
    out = np.empty(w.shape[0])
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        for rows in pair_blocks(np.arange(w.shape[0]), w.shape[1]):
            out[rows] = MixturePairs(w[rows], mu[rows], s[rows]).crps(z[rows])
    return out


def mixture_pdf_on_grid(weights, means, sigmas, grid, chunk: int = 1024, dtype=np.float64) -> np.ndarray:
    """Densities of Gaussian mixtures (N, K) on one grid (G,) -> (N, G) float64 array.

    ``sum_k w_k N(x | mu_k, sigma_k)``, the formula of ``qp.mixmod``'s pdf (sigmas must be
    > 0), each term as ``exp(log(w_k / s_k) - t^2 / 2 - log sqrt(2 pi))`` with the exponent
    floored (:data:`EXP_FLOOR`), one component at a time over row chunks small enough to stay
    in cache. qp evaluates the same sum through ``scipy.stats.norm`` on (N, G, K) arrays,
    much slower for the same result. ``dtype=np.float32`` computes in float32 (faster;
    densities within ~2e-6 of the object's largest density: the float32 rounding of
    ``(z - mu) / sigma``; the metrics' option ``MetricConfig.mixture_float32``).
    """
    dtype = np.dtype(dtype)
    floor = EXP_FLOOR[dtype]
    w, mu, s = (np.asarray(a, dtype=np.float64) for a in (weights, means, sigmas))
    n, k = w.shape
    z = np.asarray(grid, dtype=dtype).reshape(-1)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        logc = (np.log(w) - np.log(s) + _LOG_INV_SQRT_2PI).astype(dtype)  # a zero weight: -inf, floored
        inv_s = (1.0 / s).astype(dtype)
        mu = mu.astype(dtype)
        out = np.zeros((n, z.size), dtype=dtype)
        t = np.empty((min(chunk, max(n, 1)), z.size), dtype=dtype)
        for i in range(0, n, chunk):
            e = min(i + chunk, n)
            o, tt = out[i:e], t[: e - i]
            for c in range(k):
                np.subtract(z[None, :], mu[i:e, c, None], out=tt)
                tt *= inv_s[i:e, c, None]
                np.square(tt, out=tt)
                tt *= -0.5
                tt += logc[i:e, c, None]
                np.maximum(tt, floor, out=tt)
                np.exp(tt, out=tt)
                o += tt
    return out if dtype == np.float64 else out.astype(np.float64)


def mixture_cdf_on_grid(weights, means, sigmas, grid) -> np.ndarray:
    """CDFs of Gaussian mixtures (N, K) on one grid (G,) -> (N, G) float64:
    ``sum_k w_k Phi((x - mu_k) / s_k)`` with the floors of :data:`_CDF_T_FLOOR`."""
    w, mu, s = (np.asarray(a, dtype=np.float64) for a in (weights, means, sigmas))
    x = np.asarray(grid, dtype=np.float64).reshape(-1)
    out = np.zeros((w.shape[0], x.size))
    with np.errstate(invalid="ignore", divide="ignore"):
        wf = np.maximum(w, _CDF_W_FLOOR)
        for c in range(w.shape[1]):
            t = (x[None, :] - mu[:, c, None]) / s[:, c, None]
            out += wf[:, c, None] * ndtr(np.maximum(t, _CDF_T_FLOOR))
    return out


def fixed_grid_size(zmin: float, zmax: float, sigma: float, max_spacing: float) -> int:
    """Fewest Gaussians evenly spaced over [zmin, zmax] (both ends included) whose spacing is at
    most ``max_spacing`` x ``sigma``: ``ceil((zmax - zmin) / (max_spacing sigma)) + 1``.

    At a spacing of 2 sigma a sum of equal-weight Gaussians ripples by about 1.4%
    (``2 exp(-pi^2 / 2)``); at the 4.1 sigma of 200 Gaussians of sigma 0.0037 on [0, 3] the
    basis itself is a comb. The SOM + foundation-model paper's 200 Gaussians of sigma 0.0037
    on z < 1.6 are ~2.2 sigma apart.
    """
    if not (sigma > 0 and max_spacing > 0 and zmax > zmin):
        raise ValueError(f"fixed_grid_size needs sigma > 0, max_spacing > 0 and zmax > zmin, got "
                         f"sigma={sigma}, max_spacing={max_spacing}, [zmin, zmax]=[{zmin}, {zmax}]")
    # the small tolerance keeps an exact ratio (e.g. 3 / (2 x 0.0075) = 200) from rounding up
    return int(math.ceil((float(zmax) - float(zmin)) / (float(max_spacing) * float(sigma)) - 1e-9)) + 1


def fixed_grid_spacing(zmin: float, zmax: float, n_components: int) -> float:
    """Distance between neighbouring means of :func:`rail.deepz.mixtures.fixed_grid_centers` (redshift units)."""
    return (float(zmax) - float(zmin)) / (int(n_components) - 1)
