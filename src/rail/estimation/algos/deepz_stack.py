"""Stacking of photo-z PDFs from any RAIL estimators: a beta-transformed linear pool.

The informer reads the qp outputs of several estimators (any parameterisation: ``hist``,
``interp``, ``mixmod``, or anything else qp can evaluate) for a validation table with true
redshifts, and fits, by CRPS or log score, the beta-transformed linear pool of Ranjan &
Gneiting (2010, JRSS B 72, 71; Gneiting & Ranjan 2013)::

    G(z) = B( sum_i w_i F_i(z) ; a, b ),    w = softmax(theta),  a, b > 0,

with ``F_i`` the CDF of input ``i`` truncated to [zmin, zmax] and renormalised, and ``B``
the regularised incomplete beta function (the CDF of Beta(a, b)). With ``a = b = 1`` it is
the plain linear pool. A linear pool of calibrated PDFs is over-dispersed (Hora 2004;
Ranjan & Gneiting 2010): on DC2 the equal-weight average of four PDFs took the PIT KS from
0.02 to 0.04 (DEVELOPERS.md); ``a, b > 1`` sharpen the pool back. The fit can be global or
per bin of a column (``bin_col``: a magnitude; or any numeric column such as a SOM cell id
with ``bin_edges`` at half-integers). Carrasco Kind & Brunner (2014) combine photo-z PDFs by
Bayesian model averaging; the pooled-CDF form used here is what makes the combination
calibratable and lets it stack estimators it did not train (it only needs their qp files).

Every input is evaluated as a CDF on one common grid of ``nzbins + 1`` evenly spaced nodes
over [zmin, zmax] (vectorised per parameterisation: cumulative sums for ``hist``, cumulative
trapezoids for ``interp`` -- the CDF qp itself gives them --, the exact Gaussian CDF for
``mixmod``, qp's ``cdf`` in row blocks for anything else). The output is a ``qp.hist`` on
those nodes by default: the stack is defined by its CDF at the nodes, so the bin
probabilities are its exact increments, the CDF that was fitted is the CDF of the output
(linear between nodes, as the CRPS and PIT of the fit assume), and nothing is renormalised
afterwards; ``qp_representation='interp'`` stores the same histogram as densities at the
bin centres. Point estimates and quantiles come from
:func:`rail.deepz.pdf.binned_ensemble` (ancil ``zmode, zmean, zstd, zmedian, z_qXX``);
``p_outside`` is the pooled probability the inputs put outside [zmin, zmax]. ``zmode`` is the
most probable bin by default; the estimator's ``mode_smoothing`` makes it the mode of the
stacked PDF smoothed by a Gaussian (a departure from the papers, which take the raw mode: a
pool of several estimators' PDFs has narrow side spikes that the raw mode can pick; width
chosen on validation rows, the measurement in benchmarks/results/accuracy_dc2_stack_mode_smoothing.md).

Rows where an input has no probability inside [zmin, zmax] leave that input out of the
pool for that row (the weights of the others are renormalised); a row where no input has
any is uniform over [zmin, zmax] (with a warning giving the count).

The model is a plain dict (numpy arrays, python scalars)::

    {"format": "rail.deepz", "format_version": 1, "method": "stack", "inputs": [names],
     "input_kinds": [...], "zmin", "zmax", "nzbins", "score", "recalibrate",
     "bin_col", "bin_edges": (nb-1,), "weights": (nb+1, M), "a": (nb+1,), "b": (nb+1,),
     "bin_counts": (nb+1,), "diagnostics": {...}}

The last row of ``weights``/``a``/``b`` is the global fit, used for rows whose ``bin_col``
value is not finite and for bins with fewer than ``min_bin_objects`` validation rows.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
import qp
from scipy import stats
from ceci.config import StageParameter as Param
from rail.core.common_params import SharedParams
from rail.core.data import TableHandle
from rail.estimation.estimator import CatEstimator
from rail.estimation.informer import CatInformer

from rail.deepz._version import __version__
from rail.deepz.modelfile import DeepzModelHandle
from rail.deepz.qputils import representation as _kind
from rail.deepz.stages import (
    FORMAT,
    FORMAT_VERSION,
    NON_NEGATIVE,
    CheckedOptions,
    ModelFormatError,
    Option,
    check_option_choice,
    table_to_numpy_dict,
    validate_config_keys,
    validate_options,
)

if TYPE_CHECKING:  # annotations only: torch is imported where a stage trains or estimates
    import torch

METHOD = "stack"
SCORES = ("crps", "logscore")
REPRESENTATIONS = ("hist", "interp")
#: bounds of the beta parameters a, b (a, b < 1 widen the pool, > 1 sharpen it)
BETA_BOUNDS = (0.2, 50.0)
#: floor of the probability of the true redshift's grid cell in the log score
LOGSCORE_FLOOR = 1e-9

# ---------------------------------------------------------------- inputs on the grid


def grid_edges(zmin: float, zmax: float, nzbins: int) -> np.ndarray:
    """The ``nzbins + 1`` nodes of the common grid (also the output histogram's bin edges)."""
    return np.linspace(float(zmin), float(zmax), int(nzbins) + 1)


def _raw_cdf(ens: qp.Ensemble, edges: np.ndarray) -> np.ndarray:
    """CDFs (N, G) float64 of ``ens`` at ``edges``, each row normalised to its total mass
    (:meth:`rail.evaluation.deepz_pdfblock.PDFBlock.cdf`: hist/interp/mixmod from their
    parameters, qp otherwise; NaN for a PDF that is not finite or cannot be normalised)."""
    from rail.evaluation.deepz_pdfblock import PDFBlock

    return PDFBlock.from_ensemble(ens, prepare=False).cdf(edges)


def input_cdfs(ens: qp.Ensemble, edges: np.ndarray, name: str = "", row0: int = 0):
    """One input's CDFs on the common grid, truncated to [edges[0], edges[-1]] and renormalised.

    Returns ``(cdf (N, G) float32, has_mass (N,) bool, p_outside (N,) float64)``. A row with
    no probability inside the range gets the uniform CDF and ``has_mass = False``. Raises a
    ValueError naming the input and the (global, ``row0``-offset) rows whose PDF is NaN/inf
    or has negative density.
    """
    f = _raw_cdf(ens, edges)
    bad = ~np.isfinite(f).all(1)
    if bad.any():
        rows = np.flatnonzero(bad) + row0
        raise ValueError(f"Input {name!r}: {rows.size} PDF(s) are NaN/inf or not normalisable "
                         f"(rows {rows[:10].tolist()}{' ...' if rows.size > 10 else ''})")
    neg = (np.diff(f, axis=1) < -1e-6).any(1)
    if neg.any():
        rows = np.flatnonzero(neg) + row0
        raise ValueError(f"Input {name!r}: {rows.size} PDF(s) have negative density "
                         f"(rows {rows[:10].tolist()}{' ...' if rows.size > 10 else ''})")
    inside = f[:, -1] - f[:, 0]
    has = inside > 1e-9
    ramp = (edges - edges[0]) / (edges[-1] - edges[0])
    c = np.where(has[:, None], (f - f[:, :1]) / np.where(has, inside, 1.0)[:, None], ramp[None, :])
    np.clip(c, 0.0, 1.0, out=c)
    return c.astype(np.float32), has, np.clip(1.0 - inside, 0.0, 1.0)


# ---------------------------------------------------------------- the beta transform

_ELL, _NELL = 40.0, 4097  # beta-CDF table over logit(u) in [-40, 40]


def beta_table(a: torch.Tensor, b: torch.Tensor):
    """CDF of Beta(a, b) and its derivative in ell = logit(u), tabulated at ``_NELL`` nodes.

    With u = sigmoid(ell) the density in ell is u^a (1-u)^b / B(a, b): smooth and decaying
    at both ends for a, b > 0, so a trapezoid quadrature is accurate (checked against
    scipy's ``betainc`` in the tests); the tails beyond +-40 are added in closed form
    (u^a / (a B) and (1-u)^b / (b B)). Differentiable in a, b (torch autograd). Returns
    ``(T, h)``, each (len(a), _NELL).
    """
    import torch
    a, b = a.reshape(-1, 1), b.reshape(-1, 1)
    ell = torch.linspace(-_ELL, _ELL, _NELL, dtype=a.dtype)
    lu, l1u = torch.nn.functional.logsigmoid(ell), torch.nn.functional.logsigmoid(-ell)
    log_b = torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b)
    h = torch.exp(a * lu + b * l1u - log_b)
    step = 2 * _ELL / (_NELL - 1)
    lo = torch.exp(a * lu[0] - log_b) / a
    hi = torch.exp(b * l1u[-1] - log_b) / b
    cum = torch.cat([lo, lo + torch.cumsum(0.5 * (h[:, 1:] + h[:, :-1]) * step, dim=1)], dim=1)
    total = cum[:, -1:] + hi
    return cum / total, h / total


def beta_transform(u: torch.Tensor, table, rows: torch.Tensor | None = None) -> torch.Tensor:
    """B(u; a, b) for u (N, G) in [0, 1], from :func:`beta_table` (cubic Hermite in logit(u));
    ``rows`` (N,) selects each row's table (per-bin parameters), default the first."""
    import torch
    t_tab, h_tab = table
    step = 2 * _ELL / (_NELL - 1)
    # one (4,) row per interval: T_i, T_i+1 and the slopes times the step (one gather)
    quad = torch.stack([t_tab[:, :-1], t_tab[:, 1:], h_tab[:, :-1] * step, h_tab[:, 1:] * step], dim=-1)
    quad = quad.reshape(-1, 4).to(u.dtype)
    eps = 1e-7 if u.dtype == torch.float32 else 1e-16
    pos = (torch.logit(u.clamp(eps, 1.0 - eps)).clamp(-_ELL, _ELL) + _ELL) * (1.0 / step)
    i = pos.detach().floor().clamp(0, _NELL - 2).long()
    t = pos - i
    if rows is not None:
        i = i + (rows * (_NELL - 1))[:, None]
    q = quad[i]  # (N, G, 4)
    t0, t1, d0, d1 = q.unbind(-1)
    # cubic Hermite, Horner form in t
    c2 = 3 * (t1 - t0) - 2 * d0 - d1
    c3 = 2 * (t0 - t1) + d0 + d1
    return t0 + t * (d0 + t * (c2 + t * c3))


# ---------------------------------------------------------------- pooling and scores


def pool(cdfs: torch.Tensor, has: torch.Tensor, weights: torch.Tensor, table=None,
         rows: torch.Tensor | None = None) -> torch.Tensor:
    """Stacked CDFs (N, G), 0 at the first node and 1 at the last.

    ``cdfs`` (N, M, G), ``has`` (N, M) bool, ``weights`` (M,) or per row (N, M); ``table``
    from :func:`beta_table` (None: the plain linear pool).
    """
    import torch
    w = weights.expand(cdfs.shape[0], -1) if weights.dim() == 1 else weights
    we = w * has.to(w.dtype)
    s = we.sum(1, keepdim=True)
    we = torch.where(s > 0, we / torch.where(s > 0, s, 1.0), w)
    # products in the inputs' float32, the pooled CDF in float64: the optimum is flat (DC2:
    # weights 1% apart change the mean CRPS by 2e-5 relative), below float32 resolution
    f = torch.einsum("nmg,nm->ng", cdfs, we.to(cdfs.dtype)).double().clamp(0.0, 1.0)
    if table is not None:
        f = beta_transform(f, table, rows)
    return (f - f[:, :1]) / (f[:, -1:] - f[:, :1]).clamp(min=1e-300)


def _cells(edges: torch.Tensor, z: torch.Tensor):
    import torch
    j = (torch.searchsorted(edges, z, right=True) - 1).clamp(0, edges.numel() - 2)
    return j, z - edges[j]


def scores(g: torch.Tensor, edges: torch.Tensor, z: torch.Tensor) -> dict:
    """Per-object CRPS, log score and PIT of stacked CDFs ``g`` (N, G), linear between the
    nodes (the output histogram), at true redshifts ``z`` inside [edges[0], edges[-1]]."""
    import torch
    edges, z = edges.to(g.dtype), z.to(g.dtype)
    j, t = _cells(edges, z)
    dx = edges[1:] - edges[:-1]
    g0, g1 = g[:, :-1], g[:, 1:]
    sq = ((g0 * g0 + g0 * g1 + g1 * g1) * dx / 3.0).sum(1)  # int G^2, exact for linear G
    area = torch.cumsum(0.5 * (g0 + g1) * dx, dim=1)
    area = torch.cat([torch.zeros_like(area[:, :1]), area], dim=1)
    jj = j[:, None]
    gj, gj1 = g.gather(1, jj)[:, 0], g.gather(1, jj + 1)[:, 0]
    dxj = dx[j]
    g_at = gj + (gj1 - gj) * t / dxj
    above = area[:, -1] - area.gather(1, jj)[:, 0] - 0.5 * (gj + g_at) * t
    crps = sq - 2.0 * above + (edges[-1] - z)
    logs = -torch.log(((gj1 - gj) / dxj).clamp(min=LOGSCORE_FLOOR / dxj))
    return {"crps": crps, "logscore": logs, "pit": g_at}


def pit_ks(pit) -> float:
    """Kolmogorov-Smirnov distance of PIT values from U(0, 1)."""
    p = np.asarray(pit, dtype=np.float64).reshape(-1)
    if p.size == 0:
        return float("nan")
    return float(stats.kstest(p, "uniform").statistic)


# ---------------------------------------------------------------- fitting


def _params(theta: torch.Tensor, m: int):
    import torch
    w = torch.softmax(theta[:m], dim=0)
    lo, hi = math.log(BETA_BOUNDS[0]), math.log(BETA_BOUNDS[1])
    return w, torch.exp(theta[m].clamp(lo, hi)), torch.exp(theta[m + 1].clamp(lo, hi))


def fit_pool(cdfs: torch.Tensor, has: torch.Tensor, z: torch.Tensor, edges: torch.Tensor,
             score: str = "crps", recalibrate: bool = True, max_iter: int = 100,
             init: tuple | None = None) -> tuple[np.ndarray, float, float]:
    """Fit weights (softmax) and, with ``recalibrate``, the beta transform's (a, b) by
    minimising the mean ``score`` (full-batch L-BFGS, float64). Returns ``(w, a, b)``."""
    import torch
    m = cdfs.shape[1]
    theta = torch.zeros(m + 2, dtype=torch.float64)
    if init is not None:
        w0, a0, b0 = init
        theta.data[:m] = torch.log(torch.as_tensor(np.clip(w0, 1e-12, None), dtype=torch.float64))
        theta.data[m], theta.data[m + 1] = math.log(a0), math.log(b0)
    theta.requires_grad_(True)
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=int(max_iter), line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12, history_size=20)

    def loss_of(th):
        w, a, b = _params(th, m)
        table = beta_table(a, b) if recalibrate else None
        return scores(pool(cdfs, has, w, table), edges, z)[score].mean()

    # the objective is divided by its starting value: mean CRPS ~0.03 has gradients ~1e-5 in
    # the logits, which L-BFGS's default tolerances took for convergence (no step at all)
    with torch.no_grad():
        scale = 1.0 / max(abs(float(loss_of(theta))), 1e-3)

    def objective():
        opt.zero_grad()
        loss = loss_of(theta) * scale
        loss.backward()
        if not recalibrate:
            theta.grad[m:] = 0.0
        return loss

    opt.step(objective)
    w, a, b = _params(theta.detach(), m)
    if not recalibrate:
        a = b = torch.tensor(1.0)
    return w.numpy().astype(np.float64), float(a), float(b)


def evaluate_pool(cdfs, has, z, edges, w, a=1.0, b=1.0) -> dict:
    """Mean CRPS, mean log score and PIT KS of one pool on some rows."""
    import torch
    with torch.no_grad():
        wt = torch.as_tensor(np.asarray(w, dtype=np.float64))
        table = None if (a == 1.0 and b == 1.0) else beta_table(
            torch.tensor([a], dtype=torch.float64), torch.tensor([b], dtype=torch.float64))
        s = scores(pool(cdfs, has, wt, table), edges, z)
    return {"crps": float(s["crps"].mean()), "logscore": float(s["logscore"].mean()),
            "pit_ks": pit_ks(s["pit"].numpy()), "n": int(z.numel())}


def bin_index(values, edges) -> np.ndarray:
    """Bin of each value given the inner ``edges`` (nb-1,): 0..nb-1; non-finite -> nb (global)."""
    v = np.asarray(values, dtype=np.float64)
    edges = np.asarray(edges, dtype=np.float64).reshape(-1)
    idx = np.searchsorted(edges, v, side="right")
    return np.where(np.isfinite(v), idx, edges.size + 1)


def fit_stack(cdfs: np.ndarray, has: np.ndarray, z: np.ndarray, edges: np.ndarray, names: Sequence[str],
              *, score: str = "crps", recalibrate: bool = True, bin_col: str = "", bin_values=None, bin_edges=(),
              min_bin_objects: int = 300, holdout_fraction: float = 0.25, max_iter: int = 100,
              seed: int = 42, log=None) -> dict:
    """Fit the stack on validation CDFs (N, M, G) (from :func:`input_cdfs`) and truths (N,).

    With ``holdout_fraction`` > 0, a first fit on the other rows is scored on the held-out
    rows against each input alone, the equal-weight pool and the fitted linear pool (the
    model's ``diagnostics``); the returned parameters are then fitted on all rows.
    ``bin_values`` (N,) of column ``bin_col`` with inner ``bin_edges``: one fit per bin.
    """
    import torch
    if score not in SCORES:
        raise ValueError(f"Option 'score'={score!r} is not one of {SCORES}")
    c = torch.as_tensor(cdfs)
    hs = torch.as_tensor(has)
    zt = torch.as_tensor(np.asarray(z, dtype=np.float64))
    e = torch.as_tensor(np.asarray(edges, dtype=np.float64))
    n, m = c.shape[0], c.shape[1]
    bin_edges = np.asarray(bin_edges, dtype=np.float64).reshape(-1)
    nb = bin_edges.size + 1 if bin_values is not None else 0
    bidx = bin_index(bin_values, bin_edges) if bin_values is not None else np.full(n, 0)

    def fit_all(rows: np.ndarray):
        r = torch.as_tensor(rows)
        g = fit_pool(c[r], hs[r], zt[r], e, score, recalibrate, max_iter)
        w, a, b = np.tile(g[0], (nb + 1, 1)), np.full(nb + 1, g[1]), np.full(nb + 1, g[2])
        counts = np.zeros(nb + 1, dtype=np.int64)
        counts[nb] = rows.size
        for k in range(nb):  # a few bins: one small fit each, started from the global one
            sel = rows[bidx[rows] == k]
            counts[k] = sel.size
            if sel.size >= min_bin_objects:
                s = torch.as_tensor(sel)
                w[k], a[k], b[k] = fit_pool(c[s], hs[s], zt[s], e, score, recalibrate, max_iter, init=g)
        return w, a, b, counts

    diagnostics: dict = {}
    if holdout_fraction > 0:
        rng = np.random.default_rng(seed)
        perm = rng.permutation(n)
        n_out = int(round(holdout_fraction * n))
        out_rows, in_rows = np.sort(perm[:n_out]), np.sort(perm[n_out:])
        if n_out < 10 or in_rows.size < 10:
            raise ValueError(f"holdout_fraction={holdout_fraction} leaves {n_out} held-out / {in_rows.size} "
                             f"fit rows of {n}; need >= 10 each (or holdout_fraction=0)")
        W, A, B, _ = fit_all(in_rows)
        ro = torch.as_tensor(out_rows)
        co, ho, zo = c[ro], hs[ro], zt[ro]
        for i, name in enumerate(names):
            diagnostics[f"input:{name}"] = evaluate_pool(co, ho, zo, e, np.eye(m)[i])
        diagnostics["equal_weights"] = evaluate_pool(co, ho, zo, e, np.full(m, 1.0 / m))
        wl = fit_pool(c[torch.as_tensor(in_rows)], hs[torch.as_tensor(in_rows)], zt[torch.as_tensor(in_rows)],
                      e, score, False, max_iter)[0]
        diagnostics["fitted_weights"] = evaluate_pool(co, ho, zo, e, wl)
        with torch.no_grad():
            b_out = torch.as_tensor(bidx[out_rows])
            tables = beta_table(torch.as_tensor(A), torch.as_tensor(B)) if recalibrate else None
            g = pool(co, ho, torch.as_tensor(W)[b_out], tables, b_out if recalibrate else None)
            s = scores(g, e, zo)
        diagnostics["stack"] = {"crps": float(s["crps"].mean()), "logscore": float(s["logscore"].mean()),
                                "pit_ks": pit_ks(s["pit"].numpy()), "n": int(n_out)}
        diagnostics["holdout"] = {"n_fit": int(in_rows.size), "n_holdout": int(n_out), "seed": int(seed)}
        if log:
            for k, v in diagnostics.items():
                if "crps" in v:
                    log(f"[stack] held-out {k}: CRPS {v['crps']:.5f}, log score {v['logscore']:.4f}, "
                        f"PIT KS {v['pit_ks']:.4f}")
    W, A, B, counts = fit_all(np.arange(n))
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "package_version": __version__,
        "method": METHOD, "inputs": list(names), "score": score, "recalibrate": bool(recalibrate),
        "bin_col": str(bin_col) if bin_values is not None else "",
        "zmin": float(edges[0]), "zmax": float(edges[-1]), "nzbins": int(len(edges) - 1),
        "bin_edges": bin_edges, "weights": np.asarray(W, dtype=np.float64), "a": np.asarray(A, dtype=np.float64),
        "b": np.asarray(B, dtype=np.float64), "bin_counts": counts, "n_fit": int(n),
        "diagnostics": diagnostics,
    }


def stack_cdfs(model: Mapping, cdfs: np.ndarray, has: np.ndarray, bin_values=None, block: int = 4096) -> np.ndarray:
    """Stacked CDFs (N, G) float32 at the model's grid nodes, in row blocks."""
    import torch
    W = torch.as_tensor(np.asarray(model["weights"], dtype=np.float64))
    nb = W.shape[0] - 1
    if model.get("bin_col"):
        if bin_values is None:
            raise ValueError(f"The stack model was fitted per bin of {model['bin_col']!r}: its values are needed")
        bidx = bin_index(bin_values, model["bin_edges"])
    else:
        bidx = np.full(cdfs.shape[0], nb)
    table = beta_table(torch.as_tensor(model["a"], dtype=torch.float64),
                       torch.as_tensor(model["b"], dtype=torch.float64)) if model["recalibrate"] else None
    out = np.empty((cdfs.shape[0], cdfs.shape[2]), dtype=np.float32)
    with torch.no_grad():
        for i in range(0, cdfs.shape[0], block):
            r = torch.as_tensor(bidx[i: i + block])
            g = pool(torch.as_tensor(cdfs[i: i + block]), torch.as_tensor(has[i: i + block]), W[r], table,
                     r if table is not None else None)
            out[i: i + block] = g.numpy()
    return out


def stack_ensemble(model: Mapping, cdfs: np.ndarray, has: np.ndarray, p_outside: np.ndarray,
                   bin_values=None, representation: str = "hist", mode_window: float = 0.0,
                   mode_smoothing: float = 0.0) -> qp.Ensemble:
    """qp ensemble of the stacked PDFs with the usual ancil (see the module docstring)."""
    from rail.deepz.pdf import binned_ensemble
    edges = grid_edges(model["zmin"], model["zmax"], model["nzbins"])
    g = stack_cdfs(model, cdfs, has, bin_values)
    probs = np.clip(np.diff(g, axis=1), 0.0, None)
    ens = binned_ensemble(probs, edges, representation=representation, mode_window=mode_window,
                          mode_smoothing=mode_smoothing)
    W = np.asarray(model["weights"])
    if model.get("bin_col"):
        wr = W[bin_index(bin_values, model["bin_edges"])]
    else:
        wr = np.broadcast_to(W[-1], (g.shape[0], W.shape[1]))
    ancil = dict(ens.ancil)
    ancil["p_outside"] = np.sum(wr * p_outside, axis=1)
    ens.set_ancil(ancil)
    return ens


def read_inputs(paths: Mapping[str, object], edges: np.ndarray, start: int, end: int):
    """Rows [start, end) of every input (qp file path or ensemble) on the grid:
    ``(cdfs (n, M, G) float32, has (n, M), p_outside (n, M), kinds)``."""
    cs, hs, ps, kinds = [], [], [], []
    for name, src in paths.items():
        if isinstance(src, qp.Ensemble):
            ens = src if (start, end) == (0, src.npdf) else src[start:end]
        else:
            ens = qp.read(str(src), read_slice=slice(start, end))
        if ens.npdf != end - start:
            raise ValueError(f"Input {name!r}: read {ens.npdf} PDFs for rows {start}-{end}")
        c, h, p = input_cdfs(ens, edges, name, row0=start)
        cs.append(c)
        hs.append(h)
        ps.append(p)
        kinds.append(_kind(ens))
    return np.stack(cs, axis=1), np.stack(hs, axis=1), np.stack(ps, axis=1), kinds


def input_length(name: str, src) -> int:
    if isinstance(src, qp.Ensemble):
        return int(src.npdf)
    path = Path(str(src))
    if not path.exists():
        raise FileNotFoundError(f"Input {name!r}: qp file {path} not found (option 'inputs')")
    return int(qp.data_length(str(path)))


def check_inputs(inputs: Mapping, n_rows: int, what: str) -> dict:
    """Every input exists and has ``n_rows`` PDFs; returns a plain dict name -> source."""
    if not isinstance(inputs, Mapping) or not inputs:
        raise ValueError("Option 'inputs' must be a non-empty mapping {estimator name: qp file}")
    for name, src in inputs.items():
        n = input_length(name, src)
        if n != n_rows:
            raise ValueError(f"Input {name!r} has {n} PDFs but the {what} table has {n_rows} rows "
                             "(the qp files must be row-aligned with it)")
    return dict(inputs)


# ---------------------------------------------------------------- stages

STACK_GRID_OPTIONS = dict(
    zmin=SharedParams.copy_param("zmin"),
    zmax=SharedParams.copy_param("zmax"),
    nzbins=Param(int, 600, msg="bins of the common grid over [zmin, zmax] (its nzbins+1 nodes are where the "
                 "inputs' CDFs are evaluated) and of the output histogram"),
)


class DeepzStackInformer(CheckedOptions, CatInformer):
    """Fit the stack's weights and beta recalibration on a validation table with true redshifts.

    ``input`` is the validation table (``redshift_col``, and ``bin_col`` when binned); option
    ``inputs`` maps each estimator's name to its qp file of PDFs for the same rows, in order.
    """

    name = "DeepzStackInformer"
    entrypoint_function = "inform"
    interactive_function = "deepz_stack_informer"
    outputs = [("model", DeepzModelHandle)]  # written and read without pickle (rail.deepz.modelfile)
    config_options = CatInformer.config_options.copy()
    config_options.update(STACK_GRID_OPTIONS)
    config_options.update(
        inputs=Param(dict, {}, msg="{estimator name: qp file} of PDFs row-aligned with the input table"),
        redshift_col=SharedParams.copy_param("redshift_col"),
        score=Param(str, "crps", msg="fitted score: 'crps' (mean CRPS, redshift units) or 'logscore' "
                    "(mean -log density of the output histogram at the true redshift)"),
        recalibrate=Param(bool, True, msg="fit the beta transform (a, b) of the pooled CDF; False = "
                          "a linear pool with fitted weights only"),
        bin_col=Param(str, "", msg="column of the input table whose bins get their own weights and (a, b) "
                      "(a magnitude; or e.g. a SOM cell id); '' = one global fit"),
        bin_edges=Param(list, [], msg="sorted boundaries between the bins of bin_col (values beyond them go "
                        "to the outer bins); [] = n_bins quantile bins of the validation values"),
        n_bins=Param(int, 4, msg="number of quantile bins when bin_edges is empty"),
        min_bin_objects=Param(int, 300, msg="bins with fewer validation rows use the global fit"),
        holdout_fraction=Param(float, 0.25, msg="fraction of the validation rows held out to score a first "
                               "fit (model['diagnostics']); the final fit uses all rows. 0 = no check"),
        max_fit_objects=Param(int, 10000, msg="random subsample of the validation rows used for the fit "
                              "(memory: rows x inputs x (nzbins+1) float32)"),
        max_iter=Param(int, 100, msg="maximum L-BFGS iterations per fit"),
        z_out_of_range=Param(str, "raise", msg="true redshifts outside [zmin, zmax]: 'raise' or 'drop'"),
        seed=Param(int, 42, msg="seed of the subsample and of the held-out split"),
    )
    config_options["chunk_size"] = SharedParams.copy_param("chunk_size")

    def __init__(self, args, **kwargs):
        super().__init__(args, **kwargs)
        validate_config_keys(self)
        validate_options(self)
        check_option_choice(self.config, "score", SCORES)
        check_option_choice(self.config, "z_out_of_range", ("raise", "drop"))
        if self.config.zmax <= self.config.zmin:
            raise ValueError(f"Option 'zmax' ({self.config.zmax}) must exceed 'zmin' ({self.config.zmin})")
        if self.config.nzbins < 2:
            raise ValueError(f"Option 'nzbins'={self.config.nzbins} must be >= 2")
        if not 0.0 <= self.config.holdout_fraction < 1.0:
            raise ValueError(f"Option 'holdout_fraction'={self.config.holdout_fraction} must be in [0, 1)")
        if list(self.config.bin_edges) != sorted(self.config.bin_edges):
            raise ValueError(f"Option 'bin_edges'={self.config.bin_edges} must be sorted")

    def run(self):
        cfg = self.config
        data = table_to_numpy_dict(self, self.get_data("input"), cfg.hdf5_groupname)
        if cfg.redshift_col not in data:
            raise KeyError(f"Validation table has no redshift column {cfg.redshift_col!r} (option 'redshift_col')")
        z = np.asarray(data[cfg.redshift_col], dtype=np.float64).reshape(-1)
        n = z.size
        inputs = check_inputs(cfg.inputs, n, "validation")
        bad = ~np.isfinite(z)
        if bad.any():
            raise ValueError(f"Redshift column {cfg.redshift_col!r} has {int(bad.sum())} NaN/inf value(s) "
                             f"(rows {np.flatnonzero(bad)[:10].tolist()})")
        keep = (z >= cfg.zmin) & (z <= cfg.zmax)
        if not keep.all():
            msg = (f"{int((~keep).sum())} true redshift(s) lie outside [zmin, zmax] = [{cfg.zmin}, {cfg.zmax}] "
                   f"(range {z.min():.4g}..{z.max():.4g})")
            if cfg.z_out_of_range == "raise":
                raise ValueError(msg + "; widen zmin/zmax or set z_out_of_range='drop'")
            self.log.warning(msg + "; dropped")
        bin_values = None
        if cfg.bin_col:
            if cfg.bin_col not in data:
                raise KeyError(f"Validation table has no column {cfg.bin_col!r} (option 'bin_col')")
            bin_values = np.asarray(data[cfg.bin_col], dtype=np.float64).reshape(-1)
        rows = np.flatnonzero(keep)
        if rows.size > cfg.max_fit_objects:
            rng = np.random.default_rng(cfg.seed)
            rows = np.sort(rng.choice(rows, cfg.max_fit_objects, replace=False))
        edges = grid_edges(cfg.zmin, cfg.zmax, cfg.nzbins)
        cdfs = np.empty((rows.size, len(inputs), edges.size), dtype=np.float32)
        has = np.empty((rows.size, len(inputs)), dtype=bool)
        kinds = None
        for s in range(0, n, cfg.chunk_size):  # read chunk by chunk, keep the selected rows
            e = min(s + cfg.chunk_size, n)
            sel = rows[(rows >= s) & (rows < e)]
            if sel.size == 0:
                continue
            c, h, _, kinds = read_inputs(inputs, edges, s, e)
            pos = np.searchsorted(rows, sel)
            cdfs[pos], has[pos] = c[sel - s], h[sel - s]
        bin_edges = list(cfg.bin_edges)
        if cfg.bin_col and not bin_edges:
            v = bin_values[rows]
            v = v[np.isfinite(v)]
            bin_edges = np.unique(np.quantile(v, np.linspace(0, 1, cfg.n_bins + 1)[1:-1])).tolist() if v.size else []
        no_mass = ~has.any(1)
        if no_mass.any():
            self.log.warning(f"[stack] {int(no_mass.sum())} validation row(s) where no input has probability "
                             f"in [{cfg.zmin}, {cfg.zmax}]: uniform")
        model = fit_stack(cdfs, has, z[rows], edges, list(inputs), score=cfg.score, recalibrate=cfg.recalibrate,
                          bin_col=cfg.bin_col, bin_values=None if bin_values is None else bin_values[rows],
                          bin_edges=bin_edges,
                          min_bin_objects=cfg.min_bin_objects, holdout_fraction=cfg.holdout_fraction,
                          max_iter=cfg.max_iter, seed=cfg.seed, log=self.log.info)
        model["input_kinds"] = list(kinds or [])
        self.model = model
        self.add_data("model", self.model)


class DeepzStackEstimator(CheckedOptions, CatEstimator):
    """Stacked PDFs for a table, from the same estimators' qp files for its rows.

    ``input`` is the table whose rows the qp files of option ``inputs`` describe (it provides
    the chunking, the row count that every file must match, ``bin_col`` and ``id_col``);
    the input names must be the model's.
    """

    name = "DeepzStackEstimator"
    entrypoint_function = "estimate"
    interactive_function = "deepz_stack_estimator"
    inputs = [("model", DeepzModelHandle), ("input", TableHandle)]
    config_options = CatEstimator.config_options.copy()
    config_options.update(
        inputs=Param(dict, {}, msg="{estimator name: qp file} of PDFs row-aligned with the input table; "
                     "the names must be the model's"),
        qp_representation=Param(str, "hist", msg="'hist' (exact: the stacked CDF's increments on the grid) "
                                "or 'interp' (the same histogram as densities at the bin centres)"),
        mode_window=Option(float, 0.0, check=NON_NEGATIVE,
                           msg="zmode = centre of the window of this width (redshift units) holding the most "
                           "probability; 0 = the most probable bin"),
        mode_smoothing=Option(float, 0.0, check=NON_NEGATIVE,
                              msg="zmode = mode of the stacked PDF smoothed by a Gaussian of this width "
                              "(redshift units; 0 = off; not with mode_window): follows the bulk of the "
                              "probability rather than a narrow spike. Choose it on validation rows, never "
                              "on the test set (benchmarks/point_estimates.py --validation-*)"),
    )

    def __init__(self, args, **kwargs):
        super().__init__(args, **kwargs)
        validate_config_keys(self)
        validate_options(self)
        check_option_choice(self.config, "qp_representation", REPRESENTATIONS)
        if self.config.mode_window > 0 and self.config.mode_smoothing > 0:
            raise ValueError(f"{self.name}: options 'mode_window' ({self.config.mode_window}) and 'mode_smoothing' "
                             f"({self.config.mode_smoothing}) cannot both be > 0: pick one zmode")
        self._checked = False

    def open_model(self, **kwargs):
        model = super().open_model(**kwargs)
        self._check_model(self.model)
        return model

    def _check_model(self, model) -> None:
        if not isinstance(model, dict) or model.get("format") != FORMAT or model.get("method") != METHOD:
            raise ModelFormatError(f"{self.name}: the model is not a rail.deepz stack model "
                                   f"(got {type(model).__name__} {getattr(model, 'get', lambda k: None)('method')!r})")
        if model.get("format_version") != FORMAT_VERSION:
            raise ModelFormatError(f"{self.name}: model format version {model.get('format_version')} cannot be "
                                   f"read by this version (format {FORMAT_VERSION}); refit the stack")
        have, want = list(self.config.inputs), list(model["inputs"])
        if sorted(have) != sorted(want):
            missing = [k for k in want if k not in have]
            extra = [k for k in have if k not in want]
            raise ValueError(f"{self.name}: option 'inputs' must name the model's estimators {want}; "
                             f"missing {missing}, unknown {extra}")

    def _process_chunk(self, start, end, data, first):
        data = table_to_numpy_dict(self, data)
        model = self.model
        inputs = {k: self.config.inputs[k] for k in model["inputs"]}  # the model's order
        if not self._checked:
            check_inputs(inputs, int(self._input_length), "input")
            self._checked = True
        edges = grid_edges(model["zmin"], model["zmax"], model["nzbins"])
        cdfs, has, p_out, kinds = read_inputs(inputs, edges, start, end)
        if model.get("input_kinds") and kinds != list(model["input_kinds"]) and first:
            warnings.warn(f"{self.name}: input parameterisations {kinds} differ from those the stack was "
                          f"fitted on {model['input_kinds']}", stacklevel=2)
        bin_values = None
        if model.get("bin_col"):
            if model["bin_col"] not in data:
                raise KeyError(f"{self.name}: the stack was fitted per bin of {model['bin_col']!r}, which the "
                               "input table lacks")
            bin_values = np.asarray(data[model["bin_col"]], dtype=np.float64).reshape(-1)
        ens = stack_ensemble(model, cdfs, has, p_out, bin_values, self.config.qp_representation,
                             self.config.mode_window, self.config.mode_smoothing)
        self._do_chunk_output(ens, start, end, first, data=data)
