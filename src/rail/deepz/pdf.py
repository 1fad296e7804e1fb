"""Conversion of network outputs to ``qp`` ensembles, with vectorised point estimates.

* :func:`mixture_ensemble`: Gaussian mixtures -> ``qp.mixmod`` (exact), or the same PDFs
  truncated to [zmin, zmax], renormalised and stored as ``qp.interp`` on a grid.
* :func:`binned_ensemble`: bin probabilities -> ``qp.hist`` (exact) or ``qp.interp``.

Every ensemble gets ancil columns ``zmode``, ``zmean``, ``zmedian``, ``zstd``, the
quantiles ``z_q{XX}`` (by default 2.5, 16, 84, 97.5 %) and ``p_outside`` (probability mass
outside [zmin, zmax]). Point estimates are those of the PDF *restricted to* [zmin, zmax]
and renormalised, so a Gaussian tail below z = 0 never produces a negative zmean.
Everything is computed on a fine grid with array operations, no per-object loop.
"""

from __future__ import annotations

import numpy as np
import qp
from scipy.special import ndtr

DEFAULT_QUANTILES = (0.025, 0.16, 0.84, 0.975)


def quantile_name(q: float) -> str:
    return "z_q" + f"{100 * q:g}".replace(".", "p")


def grid_summaries(pdfs: np.ndarray, zgrid: np.ndarray, quantiles=DEFAULT_QUANTILES) -> dict:
    """Point estimates of PDFs tabulated on an evenly spaced ``zgrid`` (N, G) -> dict of (N,).

    The CDF is the cumulative trapezoid integral, normalised to 1 at ``zgrid[-1]``;
    the median and quantiles interpolate it linearly. All vectorised over objects.
    """
    pdfs = np.asarray(pdfs, dtype=np.float64)
    zgrid = np.asarray(zgrid, dtype=np.float64)
    dz = np.diff(zgrid)
    cdf = np.concatenate(
        [np.zeros((pdfs.shape[0], 1)), np.cumsum(0.5 * (pdfs[:, 1:] + pdfs[:, :-1]) * dz, axis=1)],
        axis=1,
    )
    norm = cdf[:, -1:]
    norm = np.where(norm > 0, norm, 1.0)
    cdf /= norm
    p = pdfs / norm
    out = {"zmode": zgrid[np.argmax(pdfs, axis=1)]}
    w = p * np.concatenate([[dz[0] / 2], 0.5 * (dz[1:] + dz[:-1]), [dz[-1] / 2]])
    mean = (w * zgrid).sum(1)
    out["zmean"] = mean
    out["zstd"] = np.sqrt(np.clip((w * zgrid**2).sum(1) - mean**2, 0.0, None))
    out["zmedian"] = _cdf_inverse(cdf, zgrid, 0.5)
    for q in quantiles:
        out[quantile_name(q)] = _cdf_inverse(cdf, zgrid, q)
    return out


def _cdf_inverse(cdf: np.ndarray, zgrid: np.ndarray, q: float) -> np.ndarray:
    """First crossing of ``q`` by each row of a monotone ``cdf``, linearly interpolated."""
    n, g = cdf.shape
    idx = np.clip((cdf < q).sum(axis=1), 1, g - 1)
    rows = np.arange(n)
    c0, c1 = cdf[rows, idx - 1], cdf[rows, idx]
    frac = np.where(c1 > c0, (q - c0) / np.where(c1 > c0, c1 - c0, 1.0), 0.0)
    return zgrid[idx - 1] + np.clip(frac, 0.0, 1.0) * (zgrid[idx] - zgrid[idx - 1])


def mixture_pdf_on_grid(weights, means, sigmas, zgrid, chunk: int = 20000) -> np.ndarray:
    """Evaluate Gaussian mixtures (N, K) on ``zgrid`` (G,) -> (N, G) float32, in chunks."""
    weights, means, sigmas = (np.asarray(a, dtype=np.float32) for a in (weights, means, sigmas))
    zgrid = np.asarray(zgrid, dtype=np.float32)
    out = np.empty((weights.shape[0], zgrid.size), dtype=np.float32)
    inv = np.float32(1.0 / np.sqrt(2.0 * np.pi))
    for i in range(0, weights.shape[0], chunk):
        w, m, s = weights[i : i + chunk], means[i : i + chunk], sigmas[i : i + chunk]
        t = (zgrid[None, None, :] - m[:, :, None]) / s[:, :, None]
        out[i : i + chunk] = np.einsum("nk,nkg->ng", w / s * inv, np.exp(-0.5 * t * t))
    return out


def mixture_ensemble(
    weights: np.ndarray,
    means: np.ndarray,
    sigmas: np.ndarray,
    zmin: float,
    zmax: float,
    nzbins: int = 301,
    representation: str = "mixmod",
    quantiles=DEFAULT_QUANTILES,
) -> qp.Ensemble:
    """Gaussian mixtures (N, K) -> qp ensemble with point-estimate ancil.

    Parameters
    ----------
    representation : {"mixmod", "interp"}
        ``mixmod`` keeps the exact mixture (mass outside [zmin, zmax] is reported in the
        ancil ``p_outside``); ``interp`` tabulates the PDF on ``nzbins`` points over
        [zmin, zmax], i.e. truncates it to that range and renormalises.
    """
    weights = np.asarray(weights, dtype=np.float64)
    means = np.asarray(means, dtype=np.float64)
    sigmas = np.asarray(sigmas, dtype=np.float64)
    zgrid = np.linspace(zmin, zmax, nzbins)
    fine = np.linspace(zmin, zmax, max(4 * nzbins, 1201))
    pdf_fine = mixture_pdf_on_grid(weights, means, sigmas, fine)
    ancil = grid_summaries(pdf_fine, fine, quantiles)
    inside = (weights * (ndtr((zmax - means) / sigmas) - ndtr((zmin - means) / sigmas))).sum(1)
    ancil["p_outside"] = np.clip(1.0 - inside, 0.0, 1.0)
    if representation == "mixmod":
        ens = qp.Ensemble(qp.mixmod, data=dict(weights=weights, means=means, stds=sigmas))
    elif representation == "interp":
        pdf = mixture_pdf_on_grid(weights, means, sigmas, zgrid)
        ens = qp.Ensemble(qp.interp, data=dict(xvals=zgrid, yvals=pdf))
    else:
        raise ValueError(f"Option 'qp_representation'={representation!r} is not 'mixmod' or 'interp'")
    ens.set_ancil({k: np.asarray(v) for k, v in ancil.items()})
    return ens


def binned_ensemble(
    probs: np.ndarray,
    edges: np.ndarray,
    representation: str = "hist",
    quantiles=DEFAULT_QUANTILES,
) -> qp.Ensemble:
    """Bin probabilities (N, nbins) over ``edges`` (nbins+1,) -> qp ensemble with ancil.

    ``hist`` stores the histogram exactly (piecewise-constant PDF); ``interp`` stores the
    density at the bin centres (piecewise-linear PDF). zmode is the centre of the most
    probable bin; zmean, zmedian and quantiles are those of the piecewise-constant PDF.
    """
    probs = np.asarray(probs, dtype=np.float64)
    edges = np.asarray(edges, dtype=np.float64)
    widths = np.diff(edges)
    centers = 0.5 * (edges[1:] + edges[:-1])
    dens = probs / widths
    cdf = np.concatenate([np.zeros((probs.shape[0], 1)), np.cumsum(probs, axis=1)], axis=1)
    cdf /= np.where(cdf[:, -1:] > 0, cdf[:, -1:], 1.0)
    ancil = {"zmode": centers[np.argmax(probs, axis=1)]}
    mean = (probs * centers).sum(1) / probs.sum(1)
    ancil["zmean"] = mean
    second = (probs * (centers**2 + widths**2 / 12.0)).sum(1) / probs.sum(1)
    ancil["zstd"] = np.sqrt(np.clip(second - mean**2, 0.0, None))
    ancil["zmedian"] = _cdf_inverse(cdf, edges, 0.5)
    for q in quantiles:
        ancil[quantile_name(q)] = _cdf_inverse(cdf, edges, q)
    ancil["p_outside"] = np.zeros(probs.shape[0])
    if representation == "hist":
        ens = qp.Ensemble(qp.hist, data=dict(bins=edges, pdfs=dens))
    elif representation == "interp":
        ens = qp.Ensemble(qp.interp, data=dict(xvals=centers, yvals=dens))
    else:
        raise ValueError(f"Option 'qp_representation'={representation!r} is not 'hist' or 'interp'")
    ens.set_ancil(ancil)
    return ens
