"""Gaussian mixtures in NumPy (no torch): densities on a grid, CDFs and the closed-form CRPS.

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
#: CDF terms w_k Phi(t) are taken with w_k >= 1e-15 and t >= -9 (Phi(-9) = 1e-19: changes a
#: CDF by < 2e-14), as rail.deepz.pdf's torch CDF
_CDF_T_FLOOR, _CDF_W_FLOOR = -9.0, 1e-15


def _crps_a(mu: np.ndarray, var: np.ndarray) -> np.ndarray:
    """E|X| for X ~ N(mu, var): ``2 s phi(mu/s) + mu erf(mu / (s sqrt 2))``."""
    s = np.sqrt(var)
    t = mu / s
    pdf = np.exp(np.maximum(-0.5 * t * t, EXP_FLOOR[np.dtype(np.float64)])) * _INV_SQRT_2PI
    return 2.0 * s * pdf + mu * erf(t * _INV_SQRT2)


def gmm_crps_numpy(weights, means, sigmas, z) -> np.ndarray:
    """Closed-form CRPS of Gaussian mixtures (N, K) at ``z`` (N,), float64 -> (N,).

    ``CRPS = sum_i w_i A(z - mu_i, s_i^2) - 1/2 sum_ij w_i w_j A(mu_i - mu_j, s_i^2 + s_j^2)``
    with ``A(m, v) = E|N(m, v)|`` (Grimit et al. 2006, QJRMS 132, 2925); the formula of the
    training loss :func:`rail.deepz.mixtures.gmm_crps`. Cost O(K^2) per object.
    """
    w, mu, s = (np.asarray(a, dtype=np.float64) for a in (weights, means, sigmas))
    z = np.asarray(z, dtype=np.float64).reshape(-1, 1)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        term1 = (w * _crps_a(z - mu, s * s)).sum(-1)
        dmu = mu[:, :, None] - mu[:, None, :]
        var = (s * s)[:, :, None] + (s * s)[:, None, :]
        ww = w[:, :, None] * w[:, None, :]
        term2 = 0.5 * (ww * _crps_a(dmu, var)).sum((-1, -2))
    return term1 - term2


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
