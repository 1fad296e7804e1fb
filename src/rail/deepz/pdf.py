"""Conversion of network outputs to ``qp`` ensembles, with vectorised point estimates.

* :func:`mixture_ensemble`: Gaussian mixtures -> ``qp.mixmod`` (exact), or the same PDFs
  truncated to [zmin, zmax], renormalised and stored as ``qp.interp`` on a grid.
* :func:`binned_ensemble`: bin probabilities -> ``qp.hist`` (exact) or ``qp.interp``.

Every ensemble gets ancil columns ``zmode``, ``zmean``, ``zmedian``, ``zstd``, the
quantiles ``z_q{XX}`` (by default 2.5, 16, 84, 97.5 %) and ``p_outside`` (probability mass
outside [zmin, zmax]). Point estimates are those of the PDF *restricted to* [zmin, zmax]
and renormalised, so a Gaussian tail below z = 0 never produces a negative zmean.

How they are computed (array operations in torch, no per-object loop; on the device the
inputs live on, so a GPU estimator summarises on the GPU):

* histograms: exact moments of the piecewise-constant PDF; quantiles by one batched
  ``searchsorted`` in the cumulative sums and linear interpolation inside the bin.
* Gaussian mixtures: mean and standard deviation from the closed-form moments of
  truncated normals; quantiles bracketed on a grid of ``nzbins`` points (trapezoid CDF)
  and polished by safeguarded Newton steps on the exact mixture CDF; the mode is the
  best of the grid maximum and the component means, refined by fixed-point (mean-shift)
  iterations on the exact density.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import qp
import torch
from scipy.special import ndtr

from rail.deepz.calibration import mixture_pit
from rail.deepz.mixtures import exp_floored_, gaussian_basis
from rail.deepz.qputils import (  # noqa: F401 - their home is torch-free; importable from here as before
    ensemble_pit,
    ensemble_point_and_pit,
    ensemble_point_estimate,
    representation,
)

DEFAULT_QUANTILES = (0.025, 0.16, 0.84, 0.975)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def quantile_name(q: float) -> str:
    return "z_q" + f"{100 * q:g}".replace(".", "p")


def _tensor(a, dtype=torch.float32, device=None) -> torch.Tensor:
    """numpy array or tensor -> tensor of ``dtype`` (no copy when it already is one)."""
    t = a if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a))
    return t.to(device=device if device is not None else t.device, dtype=dtype)


def _numpy64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


def grid_summaries(pdfs, zgrid, quantiles=DEFAULT_QUANTILES) -> dict:
    """Point estimates of PDFs tabulated on a ``zgrid`` (N, G) -> dict of (N,) float64 arrays.

    The CDF is the cumulative trapezoid integral, normalised to 1 at ``zgrid[-1]``;
    the median and quantiles interpolate it linearly; moments use trapezoid weights.
    """
    p = _tensor(pdfs, torch.float32)
    z = _tensor(zgrid, torch.float64, p.device)
    dz = torch.diff(z)
    w = torch.cat([dz[:1] / 2, 0.5 * (dz[1:] + dz[:-1]), dz[-1:] / 2])  # trapezoid weights
    cum = torch.cumsum(_trapezoid_cells(p, dz), dim=1)
    total = cum[:, -1].double()
    total[total <= 0] = 1.0
    mean = (p @ (w * z).to(torch.float32)).double() / total
    second = (p @ (w * z**2).to(torch.float32)).double() / total
    out = {"zmode": z[torch.argmax(p, dim=1)], "zmean": mean,
           "zstd": torch.sqrt(torch.clamp(second - mean**2, min=0.0))}
    out.update(_cumulative_quantiles(cum, total, z, quantiles))
    return {k: _numpy64(v) for k, v in out.items()}


def _trapezoid_cells(p: torch.Tensor, dz: torch.Tensor) -> torch.Tensor:
    """Trapezoid mass of each grid interval of PDFs ``p`` (N, G) with spacings ``dz`` (G-1,) (a new tensor)."""
    return (p[:, 1:] + p[:, :-1]).mul_(0.5 * dz.to(p.dtype))


def _invert_cumulative(cum: torch.Tensor, total: torch.Tensor, edges: torch.Tensor, levels: torch.Tensor):
    """Levels (Q,) of the CDFs given by cumulative cell masses ``cum`` (N, M) (any positive
    scale; ``total`` (N,) = the last column) over cells [edges[j], edges[j+1]], the CDF
    linear inside a cell -> (N, Q) in ``edges``' dtype. One batched ``searchsorted``; the
    levels are scaled by the row total instead of normalising ``cum``, so no second (N, M)
    array is made. float32 cumulative sums round at ~1e-6 of the total, far below any
    quantile's meaning."""
    m = cum.shape[1]
    scaled = levels.to(torch.float64)[None, :] * total.to(torch.float64)[:, None]  # (N, Q)
    j = torch.searchsorted(cum, scaled.to(cum.dtype).contiguous(), side="left").clamp_(0, m - 1)
    c1 = torch.gather(cum, 1, j).double()
    c0 = torch.where(j > 0, torch.gather(cum, 1, (j - 1).clamp(min=0)).double(), 0.0)
    step = c1 - c0
    frac = torch.where(step > 0, (scaled - c0) / torch.where(step > 0, step, 1.0), 0.0).clamp_(0.0, 1.0)
    return (edges[j] + frac * (edges[j + 1] - edges[j])).to(edges.dtype)


def _cumulative_quantiles(cum: torch.Tensor, total: torch.Tensor, edges: torch.Tensor, quantiles) -> dict:
    """``zmedian`` and the ``quantiles`` columns from cumulative cell masses (see
    :func:`_invert_cumulative`)."""
    qs = torch.tensor([0.5, *quantiles], dtype=torch.float64, device=cum.device)
    inv = _invert_cumulative(cum, total, edges, qs)
    out = {"zmedian": inv[:, 0]}
    for i, q in enumerate(quantiles):
        out[quantile_name(q)] = inv[:, i + 1]
    return out


# ---------------------------------------------------------------- Gaussian mixtures


def _ndtr(t: torch.Tensor) -> torch.Tensor:
    return torch.special.ndtr(t)


# Terms w_k N(x | mu_k, s_k) are computed as exp(log(w_k / s_k) - t^2 / 2 - log sqrt(2 pi))
# with the argument floored (rail.deepz.mixtures.EXP_FLOOR: no underflowing exp, no subnormal
# products; 1.8e-35 is far below float32 resolution of any density it is added to), and
# CDF terms w_k Phi(t) with w_k >= 1e-15 and t >= -9 (Phi(-9) = 1e-19; changes a CDF by
# < 2e-14). Speed gain: benchmarks/results/implementation_notes.md.
_LOG_INV_SQRT_2PI = -0.5 * math.log(2.0 * math.pi)
_CDF_T_FLOOR, _CDF_W_FLOOR = -9.0, 1e-15


def _phi(t: torch.Tensor) -> torch.Tensor:
    return exp_floored_(-0.5 * t * t).mul_(_INV_SQRT_2PI)


def _log_coef(w: torch.Tensor, s: torch.Tensor, power: int = 1) -> torch.Tensor:
    """log(w / s**power / sqrt(2 pi)), (N, K); a zero weight gives -inf (floored later)."""
    return torch.log(w) - power * torch.log(s) + _LOG_INV_SQRT_2PI


def _mixture_pdf(w, mu, s, z, chunk: int = 1024) -> torch.Tensor:
    """(N, K) mixtures at grid z (G,) -> (N, G): one component at a time over row chunks
    small enough to stay in cache (about twice the cost of the exponentials alone). The torch
    form, on the estimator's device, of :func:`rail.deepz.gmm.mixture_pdf_on_grid` (NumPy,
    for the metrics)."""
    out = torch.zeros((w.shape[0], z.numel()), dtype=w.dtype, device=w.device)
    logc = _log_coef(w, s)
    inv_s = 1.0 / s
    for i in range(0, w.shape[0], chunk):
        o, m, iv, c = out[i : i + chunk], mu[i : i + chunk], inv_s[i : i + chunk], logc[i : i + chunk]
        for k in range(w.shape[1]):
            t = z[None, :] - m[:, k, None]
            o.add_(exp_floored_(t.mul_(iv[:, k, None]).square_().mul_(-0.5).add_(c[:, k, None])))
    return out


def _mixture_at(w, mu, s, x, pdf: bool = True, cdf: bool = True):
    """Density and CDF of mixtures (N, K) at points x (N, P) -> two (N, P) tensors
    (None for the one not asked for)."""
    t = (x[:, :, None] - mu[:, None, :]) / s[:, None, :]
    dens = exp_floored_(_log_coef(w, s)[:, None, :] - 0.5 * t * t).sum(-1) if pdf else None
    if not cdf:
        return dens, None
    return dens, (w.clamp(min=_CDF_W_FLOOR)[:, None, :] * _ndtr(t.clamp_(min=_CDF_T_FLOOR))).sum(-1)


def _mixture_mode(w, mu, s, zgrid, pdf_grid, zmin, zmax, iterations: int = 6, starts: int = 3):
    """Highest mode in [zmin, zmax]: the ``starts`` densest of (grid maximum, component means),
    each refined by fixed-point (mean-shift) iterations on the exact density; the best wins."""
    cand = torch.cat([zgrid[torch.argmax(pdf_grid, dim=1)][:, None], mu.clamp(zmin, zmax)], dim=1)
    p_cand, _ = _mixture_at(w, mu, s, cand, cdf=False)
    p0, top = torch.topk(p_cand, min(starts, cand.shape[1]), dim=1)
    x0 = torch.gather(cand, 1, top)  # (N, S)
    x = x0
    logc3 = _log_coef(w, s, power=3)[:, None, :]  # w / s^3 / sqrt(2 pi)
    for _ in range(iterations):  # fixed point of d pdf / dz = 0
        t = (x[:, :, None] - mu[:, None, :]) / s[:, None, :]
        r = exp_floored_(logc3 - 0.5 * t * t)
        den = r.sum(-1)
        ok = den > 0
        x = torch.where(ok, (r * mu[:, None, :]).sum(-1) / torch.where(ok, den, 1.0), x).clamp(zmin, zmax)
    p1, _ = _mixture_at(w, mu, s, x, cdf=False)
    better = p1 >= p0
    x, p = torch.where(better, x, x0), torch.where(better, p1, p0)
    return torch.gather(x, 1, torch.argmax(p, dim=1, keepdim=True))[:, 0]


def _truncated_moments(w, mu, s, zmin, zmax):
    """Mass inside, mean and std of mixtures (N, K) truncated to [zmin, zmax] (float64)."""
    a, b = (zmin - mu) / s, (zmax - mu) / s
    za = _ndtr(b) - _ndtr(a)  # each component's mass inside
    pa, pb = _phi(a), _phi(b)
    ok = za > 1e-300
    safe = torch.where(ok, za, 1.0)
    r1 = torch.where(ok, (pa - pb) / safe, 0.0)
    r2 = torch.where(ok, (a * pa - b * pb) / safe, 0.0)
    m1 = mu + s * r1
    m2 = mu * mu + 2 * mu * s * r1 + s * s * (1 + r2)
    wk = w * torch.where(ok, za, 0.0)
    inside = wk.sum(1)
    norm = torch.where(inside > 0, inside, 1.0)
    mean = (wk * m1).sum(1) / norm
    second = (wk * m2).sum(1) / norm
    # all mass outside the range: fall back to the untruncated mean, clipped into the range
    fallback = ((w * mu).sum(1) / w.sum(1)).clamp(zmin, zmax)
    mean = torch.where(inside > 0, mean, fallback)
    std = torch.sqrt(torch.clamp(second - mean * mean, min=0.0))
    return inside, mean, std


def _mixture_quantiles(w, mu, s, zgrid, pdf_grid, levels, zmin, zmax, iterations: int = 3,
                       tol: float = 2e-6, max_iterations: int = 48):
    """Quantiles of truncated, renormalised mixtures (N, Q).

    The trapezoid CDF on the grid gives a first guess; a bracket of +-2 grid steps around
    it is checked with the exact CDF (widened to [zmin, zmax] where it does not hold);
    then Newton steps on the exact CDF, falling back to bisection whenever a step leaves
    the bracket (which shrinks at every iteration). Rows not converged to ``tol`` (in CDF
    units, or bracket width in z) after ``iterations`` get up to ``max_iterations`` more.
    """
    n, g = pdf_grid.shape
    cum = torch.cumsum(_trapezoid_cells(pdf_grid, zgrid[1:] - zgrid[:-1]), dim=1)
    tot = cum[:, -1]
    x = _invert_cumulative(cum, torch.where(tot > 0, tot, 1.0), zgrid, levels)  # (N, Q) first guess
    nq = x.shape[1]
    q = levels[None, :]
    # exact truncated CDF: (F(x) - F(zmin)) / (F(zmax) - F(zmin))
    ends = torch.tensor([zmin, zmax], dtype=w.dtype, device=w.device).expand(n, 2)
    h = float(zgrid[1] - zgrid[0]) if g > 1 else float(zmax - zmin)
    lo, hi = (x - 2 * h).clamp(min=zmin), (x + 2 * h).clamp(max=zmax)
    _, f_all = _mixture_at(w, mu, s, torch.cat([ends, lo, hi], dim=1), pdf=False)
    fa, mass = f_all[:, :1], f_all[:, 1:2] - f_all[:, :1]
    good = mass[:, 0] > 1e-12
    mass = torch.where(mass > 1e-12, mass, 1.0)
    f_lo, f_hi = (f_all[:, 2 : 2 + nq] - fa) / mass, (f_all[:, 2 + nq :] - fa) / mass
    lo = torch.where(f_lo <= q, lo, torch.full_like(lo, zmin))
    hi = torch.where(f_hi >= q, hi, torch.full_like(hi, zmax))
    x = torch.minimum(torch.maximum(x, lo), hi)
    x, lo, hi, f = _polish(w, mu, s, x, lo, hi, fa, mass, q, iterations)
    # rows whose guess was poor (a component much narrower than the grid step, a bracket
    # widened to the whole range): more iterations on those rows only, until converged
    bad = ((f.abs() > tol) & (hi - lo > tol)).any(1) & good
    if bad.any():
        i = torch.nonzero(bad)[:, 0]
        xb, lob, hib = x[i], lo[i], hi[i]
        for _ in range(max_iterations // 4):
            xb, lob, hib, fb = _polish(w[i], mu[i], s[i], xb, lob, hib, fa[i], mass[i], q, 4)
            if not ((fb.abs() > tol) & (hib - lob > tol)).any():
                break
        x[i] = xb
    return torch.where(good[:, None], x, x.clamp(zmin, zmax))


def _polish(w, mu, s, x, lo, hi, fa, mass, q, iterations):
    """Safeguarded Newton on the exact truncated CDF: a step that leaves the bracket [lo, hi]
    (which shrinks at every iteration) is replaced by bisection. Returns x, lo, hi, F(x) - q."""
    for _ in range(iterations):
        pdf, cdf_x = _mixture_at(w, mu, s, x)
        f = (cdf_x - fa) / mass - q
        lo = torch.where(f < 0, x, lo)
        hi = torch.where(f >= 0, x, hi)
        dens = pdf / mass
        x_new = x - f / torch.where(dens > 0, dens, 1.0)
        use = (dens > 0) & (x_new >= lo) & (x_new <= hi) & torch.isfinite(x_new)
        x = torch.where(use, x_new, 0.5 * (lo + hi))
    _, cdf_x = _mixture_at(w, mu, s, x, pdf=False)
    return x, lo, hi, (cdf_x - fa) / mass - q


def mixture_summaries(weights, means, sigmas, zmin: float, zmax: float, grid_points: int = 151,
                      quantiles=DEFAULT_QUANTILES, chunk: int = 16384, return_grid: bool = False):
    """Ancil of Gaussian mixtures (N, K) truncated to [zmin, zmax]: dict of (N,) float64 arrays.

    ``grid_points`` is the search grid over [zmin, zmax] that seeds the exact refinements
    (quantile brackets, mode candidates); its spacing does not limit their accuracy. With
    ``return_grid`` also returns the float32 PDFs (untruncated, not renormalised) on that
    grid as a numpy array (N, grid_points).
    """
    w = _tensor(weights, torch.float64)
    mu, s = (_tensor(a, torch.float64, w.device) for a in (means, sigmas))
    zgrid = torch.linspace(zmin, zmax, max(int(grid_points), 2), dtype=torch.float64, device=w.device)
    levels = torch.tensor([0.5, *quantiles], dtype=torch.float64, device=w.device)
    parts: dict[str, list] = {}
    grids = []
    for i in range(0, w.shape[0], chunk):
        wc, mc, sc = w[i : i + chunk], mu[i : i + chunk], s[i : i + chunk]
        inside, mean, std = _truncated_moments(wc, mc, sc, zmin, zmax)  # float64, cheap
        # the rest in float32: z resolution ~2e-7, CDF differences ~1e-7
        wc, mc, sc, zg = wc.float(), mc.float(), sc.float(), zgrid.float()
        pdf_grid = _mixture_pdf(wc, mc, sc, zg)
        qv = _mixture_quantiles(wc, mc, sc, zg, pdf_grid, levels.float(), zmin, zmax)
        res = {"zmode": _mixture_mode(wc, mc, sc, zg, pdf_grid, zmin, zmax), "zmean": mean, "zstd": std,
               "zmedian": qv[:, 0], "p_outside": (1.0 - inside).clamp(0.0, 1.0)}
        for j, q in enumerate(quantiles):
            res[quantile_name(q)] = qv[:, j + 1]
        for k, v in res.items():
            parts.setdefault(k, []).append(_numpy64(v))
        if return_grid:
            grids.append(pdf_grid.cpu().numpy())
    order = ["zmode", "zmean", "zstd", "zmedian", *[quantile_name(q) for q in quantiles], "p_outside"]
    out = {k: np.concatenate(parts[k]) if parts else np.zeros(0) for k in order}
    if return_grid:
        return out, (np.concatenate(grids) if grids else np.zeros((0, zgrid.numel()), np.float32))
    return out


def mixture_ensemble(
    weights,
    means,
    sigmas,
    zmin: float,
    zmax: float,
    nzbins: int = 301,
    representation: str = "mixmod",
    quantiles=DEFAULT_QUANTILES,
) -> qp.Ensemble:
    """Gaussian mixtures (N, K) (numpy arrays or tensors) -> qp ensemble with point-estimate ancil.

    Parameters
    ----------
    nzbins : int
        Grid points over [zmin, zmax] of the ``interp`` representation.
    representation : {"mixmod", "interp"}
        ``mixmod`` keeps the exact mixture (mass outside [zmin, zmax] is reported in the
        ancil ``p_outside``); ``interp`` tabulates the PDF on ``nzbins`` points over
        [zmin, zmax], i.e. truncates it to that range and renormalises.
    """
    if representation not in ("mixmod", "interp"):
        raise ValueError(f"Option 'qp_representation'={representation!r} is not 'mixmod' or 'interp'")
    if representation == "mixmod":
        ancil = mixture_summaries(weights, means, sigmas, zmin, zmax, quantiles=quantiles)
        w, mu, s = (_numpy64(_tensor(a, torch.float64)) for a in (weights, means, sigmas))
        ens = qp.Ensemble(qp.mixmod, data=dict(weights=w, means=mu, stds=s))
    else:
        ancil, pdf = mixture_summaries(weights, means, sigmas, zmin, zmax, max(int(nzbins), 2), quantiles,
                                       return_grid=True)
        ens = interp_ensemble(np.linspace(zmin, zmax, max(int(nzbins), 2)), pdf)
    ens.set_ancil(ancil)
    return ens


def interp_ensemble(zgrid, pdf) -> qp.Ensemble:
    """PDFs tabulated on ``zgrid`` (N, G) -> ``qp.interp``, each row normalised to a unit
    trapezoid integral here (float32, in place) rather than by qp (which makes float64
    copies and integrates twice). A row with no density on the grid (all its mass
    outside it; see the ancil ``p_outside``) becomes uniform over the grid."""
    z = np.asarray(zgrid, dtype=np.float64)
    p = torch.as_tensor(np.asarray(pdf, dtype=np.float32))
    total = _trapezoid_cells(p, torch.as_tensor(np.diff(z))).sum(1, keepdim=True)
    empty = ~(total[:, 0] > 0)
    p.div_(torch.where(total > 0, total, 1.0))
    if bool(empty.any()):
        p[empty] = float(1.0 / (z[-1] - z[0]))
    return qp.Ensemble(qp.interp, data=dict(xvals=z, yvals=p.numpy(), norm=False, warn=False))


# ---------------------------------------------------------------- fixed-grid mixtures
#
# Gaussians with fixed, evenly spaced means (rail.deepz.mixtures.fixed_grid_centers) and one
# common width; only the weights differ between objects (the embedding MDN's output).


def fixed_grid_summaries(weights, centers, sigma, zmin, zmax, nzbins: int = 301, quantiles=DEFAULT_QUANTILES,
                         block: int = 4096):
    """Ancil of fixed-grid mixtures truncated to [zmin, zmax] (the same keys as
    :func:`rail.deepz.pdf.mixture_ensemble`), from the PDFs on a fine grid (spacing below
    ``sigma``) obtained as one (N, K) x (K, G) product per ``block`` rows (bounded memory;
    4096 x 1201 float32 is 20 MB, below glibc's 32 MB mmap threshold, so the blocks reuse heap
    memory instead of mapping and page-faulting fresh pages each time; speed:
    benchmarks/results/implementation_notes.md)."""
    weights = np.asarray(weights, dtype=np.float32)
    centers = np.asarray(centers, dtype=np.float64)
    fine = np.linspace(zmin, zmax, max(nzbins, 1201))  # spacing <= 0.0025 for [0, 3]
    basis = gaussian_basis(fine, centers, sigma)
    parts = [grid_summaries(torch.as_tensor(weights[i : i + block]) @ basis, fine, quantiles)
             for i in range(0, max(len(weights), 1), block)]
    ancil = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    # each component's mass outside [zmin, zmax], then one float32 product (no float64 copy of
    # the weights): relative precision ~1e-7 of the (small) outside mass
    outside_k = (ndtr((zmin - centers) / sigma) + ndtr((centers - zmax) / sigma)).astype(np.float32)
    ancil["p_outside"] = np.clip((weights @ outside_k).astype(np.float64), 0.0, 1.0)
    return ancil


def fixed_grid_pit(weights, centers, sigma, z) -> np.ndarray:
    """CDF of each (untruncated) mixture at its own ``z`` (what qp.mixmod's cdf gives)."""
    return mixture_pit(np.asarray(weights, dtype=np.float64), np.asarray(centers, dtype=np.float64)[None, :],
                       sigma, np.asarray(z, dtype=np.float64))


class RepeatedRows:
    """Read-only (n, k) float32 arrays of one repeated row, kept between calls.

    ``qp.mixmod`` stores means and widths per object, although for a fixed-grid mixture they
    are the same row for every object; building (and, for the HDF5 writer, making contiguous)
    two fresh (chunk, K) arrays per chunk costs more than the network. One array per row is
    kept, as long as the largest chunk seen, and each call returns a view of its first n rows.
    """

    def __init__(self):
        self._arrays: dict[bytes, np.ndarray] = {}

    def __call__(self, row, n: int) -> np.ndarray:
        row = np.asarray(row, dtype=np.float32).ravel()
        key = row.tobytes()
        arr = self._arrays.get(key)
        if arr is None or len(arr) < n:
            arr = np.ascontiguousarray(np.broadcast_to(row, (n, row.size)))
            arr.flags.writeable = False
            self._arrays[key] = arr
        return arr[:n]


def fixed_grid_ensemble(weights, centers, sigma, zmin, zmax, nzbins: int = 301,
                        representation: str = "mixmod", rows: RepeatedRows | None = None) -> qp.Ensemble:
    """Fixed-grid mixtures -> ``qp.mixmod`` (exact) or ``qp.interp`` on ``nzbins`` points.

    ``interp`` samples the PDF on the grid: choose ``nzbins`` so that the spacing is well
    below sigma (e.g. >= 3 (zmax - zmin) / sigma), or the narrow components are aliased.

    The ``mixmod`` parameters are stored in float32, the precision of the network's softmax
    (float64 would double the output, 4.8 kB per object for 200 components, for no
    information); the weights must be finite and non-negative (a softmax output), so qp's
    per-element input checks are skipped. The means and widths are read-only arrays from
    ``rows`` (a :class:`RepeatedRows` reused over chunks; by default a new one).
    """
    weights = np.asarray(weights, dtype=np.float32)
    n, k = weights.shape
    ancil = fixed_grid_summaries(weights, centers, sigma, zmin, zmax, nzbins)
    if representation == "mixmod":
        rows = rows if rows is not None else RepeatedRows()
        means, stds = rows(centers, n), rows(np.full(k, sigma), n)
        ens = qp.Ensemble(qp.mixmod, data=dict(weights=weights, means=means, warn=False, stds=stds))
    elif representation == "interp":
        zgrid = np.linspace(zmin, zmax, nzbins)
        basis = gaussian_basis(zgrid, centers, sigma).numpy()
        ens = interp_ensemble(zgrid, weights @ basis)
    else:
        raise ValueError(f"Option 'qp_representation'={representation!r} is not 'mixmod' or 'interp'")
    ens.set_ancil({key: np.asarray(v) for key, v in ancil.items()})
    return ens


# ---------------------------------------------------------------- any qp ensemble


# ---------------------------------------------------------------- histograms


def _window_mode(cum: torch.Tensor, half: int) -> torch.Tensor:
    """Index of the bin centring the ``2 half + 1``-bin window of highest mean probability.

    ``cum`` is the row-wise (inclusive) cumulative sum of the bin probabilities. Window sums
    are differences of ``cum`` (no convolution); windows cut by the range edges are compared
    by their mean per bin, so the mode is not pushed away from ``zmin``/``zmax``. Ties go to
    the lowest bin.
    """
    n = cum.shape[1]
    h = int(half)
    w = 2 * h + 1
    if h < 1 or w >= n:
        raise ValueError(f"window of {w} bins needs 3 <= width < {n} bins")
    # bins h+1 .. n-h-1: full windows [i-h, i+h], sum = cum[i+h] - cum[i-h-1]
    mid_val, mid_idx = torch.max(cum[:, w:] - cum[:, : n - w], dim=1)
    best_val, best_idx = mid_val / w, mid_idx + (h + 1)
    # bins 0 .. h: windows [0, i+h] of i+h+1 bins
    i_left = torch.arange(h + 1, device=cum.device)
    left_val, left_idx = torch.max(cum[:, h: w] / (i_left + h + 1).to(cum.dtype), dim=1)
    # bins n-h .. n-1: windows [i-h, n-1] of n-i+h bins
    i_right = torch.arange(n - h, n, device=cum.device)
    right = (cum[:, -1:] - cum[:, n - w: n - h - 1]) / (n - i_right + h).to(cum.dtype)
    right_val, right_idx = torch.max(right, dim=1)
    right_idx = right_idx + (n - h)
    # lowest index wins ties: left < mid < right
    take = right_val > best_val
    best_val, best_idx = torch.where(take, right_val, best_val), torch.where(take, right_idx, best_idx)
    take = left_val >= best_val
    return torch.where(take, left_idx, best_idx)


def _smoothed_mode(p: torch.Tensor, edges: torch.Tensor, sigma: float) -> torch.Tensor:
    """Mode of the piecewise-constant PDFs (N, nbins) on even ``edges`` convolved with a
    Gaussian of width ``sigma`` (redshift units; zero outside the range). The smoothed density
    at the bin centres is exact (the kernel of a bin offset by j bins is the Gaussian's mass
    over that bin, Phi((j + 1/2) h / sigma) - Phi((j - 1/2) h / sigma)); the maximum is placed
    between centres by the parabola through the largest value and its neighbours (within half
    a bin of the best centre). A smoothed mode follows the bulk of the probability rather than a
    narrow spike (the choice of ``sigma`` on validation rows: benchmarks/point_estimates.py)."""
    h = float(edges[1] - edges[0])
    nb = p.shape[1]
    half = min(int(math.ceil(4.0 * sigma / h)), nb - 1)
    j = np.arange(-half, half + 1, dtype=np.float64)
    kern = ndtr((j + 0.5) * h / sigma) - ndtr((j - 0.5) * h / sigma)
    k = torch.as_tensor(kern, dtype=p.dtype, device=p.device)[None, None, :]
    ps = torch.nn.functional.conv1d(p[:, None, :], k, padding=half)[:, 0, :]
    i = torch.argmax(ps, dim=1)
    rows = torch.arange(p.shape[0], device=p.device)
    y0 = ps[rows, (i - 1).clamp(min=0)].double()
    y1 = ps[rows, i].double()
    y2 = ps[rows, (i + 1).clamp(max=nb - 1)].double()
    curv = y0 - 2.0 * y1 + y2  # < 0 at a strict maximum
    inner = (i > 0) & (i < nb - 1) & (curv < 0)
    delta = torch.where(inner, 0.5 * (y0 - y2) / torch.where(inner, curv, -1.0), 0.0).clamp(-0.5, 0.5)
    centers = 0.5 * (edges[1:] + edges[:-1])
    return centers[i] + delta * h


def binned_summaries(probs, edges, quantiles=DEFAULT_QUANTILES, mode_window: float = 0.0,
                     mode_smoothing: float = 0.0) -> tuple[dict, torch.Tensor]:
    """Ancil of histograms (N, nbins) over ``edges`` and the row totals (tensor, for densities).

    ``mode_window`` (redshift units): zmode is the centre of the window of about this width
    (an odd number of bins) holding the most probability per bin; 0 or less than two bins:
    the centre of the most probable bin. ``mode_smoothing`` (redshift units, even bins only):
    zmode is the mode of the PDF smoothed by a Gaussian of this width (:func:`_smoothed_mode`);
    at most one of the two may be > 0.
    """
    if mode_window > 0 and mode_smoothing > 0:
        raise ValueError("Options 'mode_window' and 'mode_smoothing' cannot both be > 0: pick one zmode")
    p = _tensor(probs, torch.float32)
    e = _tensor(edges, torch.float64, p.device)
    widths = e[1:] - e[:-1]
    centers = 0.5 * (e[1:] + e[:-1])
    cum = torch.cumsum(p, dim=1)
    total = cum[:, -1].double()
    total[total <= 0] = 1.0
    mean = (p @ centers.to(torch.float32)).double() / total
    second = (p @ (centers**2 + widths**2 / 12.0).to(torch.float32)).double() / total
    if mode_smoothing > 0:
        if not torch.allclose(widths, widths[0], rtol=1e-9, atol=0.0):
            raise ValueError("Option 'mode_smoothing' needs evenly spaced bins")
        zmode = _smoothed_mode(p, e, float(mode_smoothing))
    else:
        half = int(round(0.5 * (mode_window / float(widths.mean()) - 1.0))) if mode_window > 0 else 0
        half = min(half, (p.shape[1] - 2) // 2)  # at least one full window inside the range
        zmode = centers[_window_mode(cum, half) if half > 0 else torch.argmax(p, dim=1)]
    out = {"zmode": zmode, "zmean": mean,
           "zstd": torch.sqrt(torch.clamp(second - mean**2, min=0.0))}
    out.update(_cumulative_quantiles(cum, total, e, quantiles))
    ancil = {k: _numpy64(v) for k, v in out.items()}
    ancil["p_outside"] = np.zeros(p.shape[0])
    return ancil, total


def binned_ensemble(
    probs,
    edges,
    representation: str = "hist",
    quantiles=DEFAULT_QUANTILES,
    mode_window: float = 0.0,
    prob_fn=None,
    block_rows: int = 8192,
    mode_smoothing: float = 0.0,
) -> qp.Ensemble:
    """Bin probabilities (N, nbins) over ``edges`` (nbins+1,) -> qp ensemble with ancil.

    ``probs`` (numpy array or tensor, on any device) must be normalised per row (a softmax
    output), or become so through ``prob_fn`` (e.g. logits -> softmax), which is applied
    block by block. ``hist`` stores the histogram exactly (piecewise-constant PDF); ``interp``
    stores the density at the bin centres (piecewise-linear PDF). zmode is the centre of
    the most probable bin, or with ``mode_window`` > 0 (redshift units) the centre of the
    most probable window of that width, or with ``mode_smoothing`` > 0 the mode of the PDF
    smoothed by a Gaussian of that width (:func:`binned_summaries`); zmean, zstd, zmedian
    and quantiles are those of the piecewise-constant PDF.

    Rows are processed ``block_rows`` at a time into one preallocated output, so the
    (N, nbins) temporaries of a whole chunk (240 MB each for 1e5 rows of 600 bins) are
    never alive together (peak memory: benchmarks/results/implementation_notes.md).
    """
    if representation not in ("hist", "interp"):
        raise ValueError(f"Option 'qp_representation'={representation!r} is not 'hist' or 'interp'")
    x = _tensor(probs, torch.float32)
    edges = np.asarray(edges, dtype=np.float64)
    n, nb = x.shape
    widths = np.diff(edges)
    uniform = bool(np.allclose(widths, widths[0], rtol=1e-9, atol=0.0))
    inv_widths = torch.as_tensor(1.0 / widths, dtype=torch.float32, device=x.device)
    dens = np.empty((n, nb), dtype=np.float32)
    parts = []
    for i in range(0, max(n, 1), block_rows):
        p = x[i: i + block_rows]
        if prob_fn is not None:
            p = prob_fn(p)
        ancil_b, total = binned_summaries(p, edges, quantiles, mode_window, mode_smoothing)
        parts.append(ancil_b)
        # density = p / total / width, written straight into the output rows (one pass on CPU
        # for even bins)
        out = torch.from_numpy(dens[i: i + len(p)])
        scale = ((1.0 / widths[0]) / total if uniform else 1.0 / total).float()[:, None]
        q = torch.mul(p, scale, out=out) if p.device.type == "cpu" else p * scale
        if not uniform:
            q.mul_(inv_widths[None, :])
        if q is not out:
            out.copy_(q)
    ancil = {k: np.concatenate([a[k] for a in parts]) for k in parts[0]}
    if representation == "hist":
        ens = qp.Ensemble(qp.hist, data=dict(bins=edges, pdfs=dens, norm=False, warn=False))
    else:
        centers = 0.5 * (edges[1:] + edges[:-1])
        ens = qp.Ensemble(qp.interp, data=dict(xvals=centers, yvals=dens, norm=False, warn=False))
    ens.set_ancil(ancil)
    return ens


# ---------------------------------------------------------------- validity of the output

#: largest accepted |total mass - 1| of a stored PDF (float32 outputs). The stored mass is
#: a sum of at most a few thousand non-negative float32 terms (softmax weights, bins, grid
#: cells) that should add up to 1; float32 rounding moves such a sum by at most
#: n * 2**-24 ~ 1.2e-4 for n = 2000, so 1e-3 leaves an 8x margin and still catches an
#: unnormalised PDF, a zero row or a lost component.
MASS_TOL = 1e-3
#: the same under ``mixed_precision`` (bf16 softmax outputs): each weight is rounded to
#: 8 significant bits (relative 2**-9 = 0.2 %; measured up to 3e-4 over 600 bins), so the
#: sum can miss 1 by up to ~0.4 %
MASS_TOL_BF16 = 1e-2
_SUMMARY_KEYS = ("zmode", "zmean", "zstd", "zmedian", "p_outside")


def summary_keys(ancil) -> list:
    """The point-estimate ancil columns written by this module (not e.g. SOM flags)."""
    return [k for k in ancil if k in _SUMMARY_KEYS or k.startswith("z_q")]


def pdf_mass(ens: qp.Ensemble, zrange: tuple | None = None, block_rows: int = 4096) -> np.ndarray:
    """Total probability of each stored PDF (N,), NaN where a parameter is not finite or
    not valid (negative weight or density, width <= 0).

    * ``mixmod``: with ``zrange`` = (zmin, zmax) and an ancil ``p_outside``, the exact mass
      inside [zmin, zmax] (mixture CDF) plus the reported ``p_outside``; otherwise the sum of
      the weights. (qp renormalises mixture weights, so an unnormalised network output shows
      up as a ``p_outside`` that disagrees with the stored mixture.)
    * ``hist``: sum of density x bin width; ``interp``: trapezoid integral over the grid
      (these store the PDF on the grid, renormalised there; ``p_outside`` is then informative).
    Rows are taken ``block_rows`` at a time (bounded temporaries); other qp types: all 1.
    """
    name = representation(ens)
    n = ens.npdf
    mass = np.ones(n, dtype=np.float64)
    obj = ens.objdata
    ancil = ens.ancil or {}
    outside = None
    if name == "mixmod" and zrange is not None and "p_outside" in ancil:
        outside = np.asarray(ancil["p_outside"], dtype=np.float64).reshape(n)
    for i in range(0, n, block_rows):
        sl = slice(i, min(i + block_rows, n))
        rows = sl.stop - sl.start

        def block(key, dtype=np.float64):  # (rows, K); qp may hold a single PDF as a 1-D array
            a = np.asarray(obj[key])
            return np.asarray((a.reshape(n, -1) if a.ndim == 1 else a)[sl], dtype=dtype).reshape(rows, -1)

        if name == "mixmod":
            # float32 torch rather than scipy's float64 ndtr (faster; CDF differences good to ~1e-7)
            with warnings.catch_warnings():  # read-only arrays (RepeatedRows): only read here
                warnings.simplefilter("ignore", UserWarning)
                w, mu, s = (torch.from_numpy(block(k, np.float32)) for k in ("weights", "means", "stds"))
            w_ok = (w.amin(1) >= 0) & torch.isfinite(w.sum(1))
            # fixed-grid mixtures (the embedding MDN) repeat one row of means and widths: then
            # (finite columns whose min equals their max) one check and one product for the block
            mu0, s0 = mu.amin(0), s.amin(0)
            repeated = bool(((mu0 == mu.amax(0)) & (s0 == s.amax(0))).all())
            if repeated:
                row_ok = bool(torch.isfinite(mu0).all() & torch.isfinite(s0).all() & (s0 > 0).all())
                valid = (w_ok & row_ok).numpy()
            else:
                valid = (w_ok & torch.isfinite(mu.sum(1)) & (s.amin(1) > 0) & torch.isfinite(s.sum(1))).numpy()
            if outside is None:
                m = w.sum(1, dtype=torch.float64).numpy()
            else:
                lo, hi = zrange
                if repeated:
                    m = w @ (_ndtr((hi - mu0) / s0) - _ndtr((lo - mu0) / s0))
                else:
                    m = (w * (_ndtr((hi - mu) / s) - _ndtr((lo - mu) / s))).sum(1)
                m = m.double().numpy() + outside[sl]
        elif name in ("hist", "interp"):
            # float32 (the stored precision; a float32 sum of normalised terms is good to ~1e-6)
            p = block("pdfs" if name == "hist" else "yvals", np.float32)
            x = np.asarray(ens.metadata["bins" if name == "hist" else "xvals"], dtype=np.float64).ravel()
            dx = np.diff(x)
            if name == "interp":  # trapezoid weights: sum_j p_j (dx_{j-1} + dx_j) / 2
                dx = 0.5 * (np.concatenate([dx, [0.0]]) + np.concatenate([[0.0], dx]))
            m = p @ dx.astype(np.float32)
            valid = (p.min(1) >= 0) & np.isfinite(m)  # a NaN row's min is NaN; inf makes the sum inf
        else:
            continue
        mass[sl] = np.where(valid, m, np.nan)
    return mass


def pdf_ok(ens: qp.Ensemble, tol: float = MASS_TOL, zrange: tuple | None = None) -> np.ndarray:
    """Boolean (N,): the PDF's parameters are finite and valid, its total mass (see
    :func:`pdf_mass`; ``zrange`` = the estimator's (zmin, zmax)) is within ``tol`` of 1, and
    its point-estimate ancil is finite."""
    ok = np.abs(pdf_mass(ens, zrange) - 1.0) <= tol  # NaN -> False
    if len(ok) == 0:  # an empty input gives an empty, valid ensemble
        return ok
    ancil = ens.ancil or {}
    for k in summary_keys(ancil):
        ok &= np.isfinite(np.asarray(ancil[k], dtype=np.float64).reshape(len(ok), -1)).all(1)
    return ok


def flag_bad_pdfs(ens: qp.Ensemble, ok: np.ndarray) -> None:
    """Add the ancil column ``pdf_ok`` and set every point estimate of the rows not ok to NaN."""
    ancil = ens.ancil
    for k in summary_keys(ancil):
        v = np.array(ancil[k], dtype=np.float64)
        v[~ok] = np.nan
        ancil[k] = v
    ancil["pdf_ok"] = np.asarray(ok, dtype=bool)
