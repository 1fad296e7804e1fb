"""Post-hoc calibration of PDFs on the validation split.

* Softmax outputs (NNC): temperature scaling (Guo et al. 2017), :func:`fit_temperature`.
* Gaussian mixtures (LSTM-MDN): one factor on all component widths, :func:`fit_sigma_scale`.

The NNC paper (Tian, Wen & Xia, Sec. 4.4) divides the logits by a single temperature T,
chosen to minimise the negative log-likelihood of the validation set; T > 1 broadens
the PDFs, T < 1 sharpens them. The bin ranking (and so zmode) is unchanged.

With fine bins and a few catastrophic outliers (DC2: 600 bins of 0.005, ~2% outliers)
the NLL is dominated by the outliers' near-zero true-bin probabilities and picks a
far too large T (measured in ``benchmarks/results/ablations_nnc.md``). :func:`fit_temperature`
therefore also offers ``objective="pit_ks"``: the T whose validation PITs are closest to
uniform in the Kolmogorov-Smirnov sense, which is the calibration criterion itself.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import ndtr


def binned_pit(probs: np.ndarray, edges: np.ndarray, z: np.ndarray) -> np.ndarray:
    """PIT = CDF at the true redshift of piecewise-constant PDFs (N, nbins), vectorised."""
    probs = np.asarray(probs, dtype=np.float64)
    nb = probs.shape[1]
    k = np.clip(np.searchsorted(edges, z, side="right") - 1, 0, nb - 1)
    cdf_before = np.cumsum(probs, axis=1) - probs
    rows = np.arange(len(z))
    frac = np.clip((z - edges[k]) / (edges[k + 1] - edges[k]), 0.0, 1.0)
    return cdf_before[rows, k] + probs[rows, k] * frac


def ks_uniform(u: np.ndarray) -> float:
    """Kolmogorov-Smirnov distance between the empirical CDF of ``u`` and U(0, 1)."""
    u = np.sort(np.asarray(u, dtype=np.float64))
    n = len(u)
    i = np.arange(1, n + 1)
    return float(max(np.max(i / n - u), np.max(u - (i - 1) / n)))


def fit_temperature(
    logits: np.ndarray,
    z: np.ndarray,
    edges: np.ndarray,
    objective: str = "pit_ks",
    bounds=(0.05, 20.0),
    probs_fn=None,
) -> float:
    """Temperature T in ``bounds`` minimising ``objective`` on a validation set.

    ``objective``: ``"nll"`` (paper) = mean -log p(true bin); ``"pit_ks"`` = KS distance of the
    validation PITs from uniform (grid over log T, 121 points, then the best point's
    neighbourhood refined by a bounded scalar search). ``probs_fn`` maps tempered logits
    to bin probabilities (default: softmax), e.g. softmax followed by a fixed smoothing.

    Parameters
    ----------
    logits : ndarray (N, nbins)
        Validation logits (or (N, M x nbins) for an ensemble of M members, with a
        ``probs_fn`` that pools them into (N, nbins) probabilities).
    z : ndarray (N,)
        True redshifts (inside the bin range).
    edges : ndarray (nbins + 1,)
        Bin edges.
    """
    import torch
    lg = torch.as_tensor(np.asarray(logits), dtype=torch.float32)
    nb = len(edges) - 1  # (the logits may hold several members' bins side by side, see probs_fn)
    lo, hi = np.log(bounds[0]), np.log(bounds[1])
    if probs_fn is None:
        def probs_fn(x):
            return torch.softmax(x, dim=-1)
    if objective == "nll":
        target = torch.as_tensor(np.clip(np.searchsorted(edges, z, side="right") - 1, 0, nb - 1))

        def nll(logt):
            with torch.no_grad():
                p = probs_fn(lg / float(np.exp(logt))).double()
            return float(-torch.log(p.gather(1, target.reshape(-1, 1)).clamp_min(1e-300)).mean())

        res = minimize_scalar(nll, bounds=(lo, hi), method="bounded", options={"xatol": 1e-4})
        return float(np.exp(res.x))
    if objective != "pit_ks":
        raise ValueError(f"Option 'temperature_objective'={objective!r} is not 'pit_ks' or 'nll'")

    def ks(logt):
        with torch.no_grad():
            probs = probs_fn(lg / float(np.exp(logt))).numpy()
        return ks_uniform(binned_pit(probs, edges, z))

    grid = np.linspace(lo, hi, 121)
    vals = np.array([ks(g) for g in grid])
    i = int(np.argmin(vals))
    res = minimize_scalar(ks, bounds=(grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]),
                          method="bounded", options={"xatol": 1e-3})
    best = res.x if res.fun <= vals[i] else grid[i]
    return float(np.exp(best))


# ---------------------------------------------------------------- Gaussian mixtures


def mixture_pit(weights, means, sigmas, z) -> np.ndarray:
    """PIT values (CDF at the true redshift) of Gaussian mixtures (N, K), vectorised."""
    return (weights * ndtr((np.asarray(z)[:, None] - means) / sigmas)).sum(1)


def fit_sigma_scale(weights, means, sigmas, z, bounds=(0.3, 3.0), n_grid: int = 81) -> float:
    """Common factor on all component widths that makes validation PITs closest to uniform (KS).

    A post-hoc width calibration (the mixture analogue of temperature scaling): the means
    and weights, hence zmode and zmean, are unchanged.
    """
    w, mu, s = (np.asarray(a, dtype=np.float64) for a in (weights, means, sigmas))
    grid = np.exp(np.linspace(np.log(bounds[0]), np.log(bounds[1]), n_grid))
    ks = [ks_uniform(mixture_pit(w, mu, s * f, z)) for f in grid]  # loop over 81 factors, not objects
    return float(grid[int(np.argmin(ks))])
