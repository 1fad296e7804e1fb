"""Grid sums of Gaussian mixtures in closed form: the CDE-loss and Brier terms without the grid.

The CDE loss (RAIL ``CDELoss``) integrates ``p(z)^2`` by the trapezoid rule on the metric
grid, and qp's Brier score sums ``p(z_j)^2`` over its grid; for a Gaussian mixture
``p = sum_k w_k N(mu_k, s_k)`` both would need the mixture at every grid point (G x K
exponentials per object). For an evenly spaced grid of step ``h`` on [lo, hi] they follow
from closed forms instead:

* ``I = int_lo^hi p^2 = sum_ij w_i w_j N(mu_i - mu_j; 0, s_i^2 + s_j^2) [Phi(b_ij) - Phi(a_ij)]``,
  the product of two Gaussians being a scaled Gaussian of mean
  ``m_ij = (mu_i s_j^2 + mu_j s_i^2) / (s_i^2 + s_j^2)`` and width ``s_i s_j / sqrt(s_i^2 + s_j^2)``
  (``a_ij``, ``b_ij``: lo and hi in its units);
* the trapezoid sum ``T(h) = I + h^2/12 [g']_lo^hi - h^4/720 [g''']_lo^hi + h^6/30240 [g^(5)]_lo^hi``
  (Euler-Maclaurin, ``g = p^2``, derivatives at the two ends from the Hermite polynomials);
  the remainder is the next boundary term plus the aliasing of the lattice sum. Each Gaussian
  term ``c N(m, sig)`` of ``g`` aliases by ``2 c sum_k>=1 exp(-2 pi^2 k^2 sig^2 / h^2)
  cos(2 pi k (m - lo) / h)`` (Poisson summation), below 7e-18 of ``c`` for ``sig >= sqrt(2) h``
  (components of ``s_k >= MIN_SIGMA_STEPS h``, 2); narrower terms get this sum added
  (:meth:`MixtureSquares.aliasing`), exact when they lie far inside the grid
  (:meth:`MixtureSquares.closed_form_ok`: more than ``_INSIDE_NARROW`` widths from both ends,
  at least ``_ALIAS_MIN_STEPS`` steps wide). The next end term is largest for a component of
  width 2h at an end (``tests/test_metrics_fast.py`` compares with the tabulated sums); other
  objects are tabulated on the grid as before;
* the Brier grid sum ``sum_j p(z_j)^2 = T(h) / h + (g(lo) + g(hi)) / 2``.

Cost: the pair terms (:class:`rail.deepz.gmm.MixturePairs`, which also gives the closed-form
CRPS from them) are evaluated on row blocks of about ``rail.deepz.gmm.PAIR_BLOCK_ELEMENTS`` pairs
(kept in cache), and the masses ``Phi(b) - Phi(a)`` of the sums call ``ndtr`` only for the
Gaussians within ``_TAIL`` widths of an end of the range (:func:`_mass_between`).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import ndtr

from rail.deepz.gmm import MixturePairs, exp_floored

MIN_SIGMA_STEPS = 2.0  # components this many grid steps wide need no aliasing terms (their squares: sqrt(2) steps)
_INV_SQRT2PI = 1.0 / math.sqrt(2.0 * math.pi)
_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRTPI = 1.0 / math.sqrt(math.pi)
_EM = ((1, 2, 1.0 / 12.0), (3, 4, -1.0 / 720.0), (5, 6, 1.0 / 30240.0))  # (g^(k), h^p, B_2k/(2k)!)
#: Phi(-_TAIL) < 6e-17: a Gaussian whose mean lies more than _TAIL widths inside both ends of
#: a range has mass 1 there to float64 rounding (relative error < 1.2e-16), without ndtr
_TAIL = 8.3
#: narrow terms of p^2 (widths below ``_ALIAS_STEPS`` grid steps; a component of MIN_SIGMA_STEPS
#: steps has a square of width sqrt(2) steps) alias on the grid: their aliasing terms are added
#: (module docstring) when at least ``_ALIAS_MIN_STEPS`` steps wide (``_ALIAS_K`` terms then reach
#: exp(-2 pi^2 0.25^2 7^2) = 8e-27) and more than ``_INSIDE_NARROW`` widths inside the grids' ends
#: (their end derivatives, ~He_5(11) exp(-60) (h/s)^6, are then below 1e-17)
_ALIAS_STEPS = MIN_SIGMA_STEPS / math.sqrt(2.0)
_ALIAS_MIN_STEPS = 0.25
_ALIAS_K = 6
_INSIDE_NARROW = 11.0

def even_step(grid) -> float | None:
    """The step of an evenly spaced grid (relative spread of the steps <= 1e-9), else None."""
    g = np.asarray(grid, dtype=np.float64).reshape(-1)
    if g.size < 2:
        return None
    d = np.diff(g)
    h = (g[-1] - g[0]) / (g.size - 1)
    return float(h) if h > 0 and np.all(np.abs(d - h) <= 1e-9 * h) else None


def _t(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float64)


def _mass_between(lo: float, hi: float, m: np.ndarray, s: np.ndarray) -> np.ndarray:
    """``Phi((hi - m) / s) - Phi((lo - m) / s)`` elementwise: the mass of N(m, s) in [lo, hi].

    ``ndtr`` runs only where an end is within ``_TAIL`` widths of the mean,
    once where only one end is (``Phi(-a)`` or ``Phi(b)``: the other term is 0 or 1 to
    rounding); elsewhere the mass is 1 to rounding (see ``_TAIL``). Mixture components are
    mostly far inside the metric range, so this skips most of the evaluations."""
    a = (lo - m) / s
    b = (hi - m) / s
    out = np.ones_like(a)
    near_lo, near_hi = a > -_TAIL, b < _TAIL
    edge = np.flatnonzero(near_lo | near_hi)
    if edge.size:
        a, b, flat = a.reshape(-1), b.reshape(-1), out.reshape(-1)  # views (fresh, contiguous arrays)
        lo_e, hi_e = near_lo.reshape(-1)[edge], near_hi.reshape(-1)[edge]
        i = edge[lo_e & ~hi_e]
        flat[i] = ndtr(-a[i])
        i = edge[hi_e & ~lo_e]
        flat[i] = ndtr(b[i])
        i = edge[lo_e & hi_e]
        flat[i] = ndtr(b[i]) - ndtr(a[i])
    return out


class MixtureSquares(MixturePairs):
    """Mixtures (n, K) (weights normalised, widths > 0) with their pairwise terms
    (:class:`rail.deepz.gmm.MixturePairs`: ``crps(z)``, the closed-form CRPS) and the sums of
    ``p^2``: ``sq_integral(lo, hi)``: int_lo^hi p^2; ``trapezoid_sq(lo, hi, h)``: the trapezoid
    sum of p^2 on the grid lo, lo + h, ..., hi; ``grid_sum_sq(lo, hi, h)``: sum of p^2 over those
    grid points; ``at(x)``: p(x_i) per row.
    """

    def _more_pairs(self, mi, mj, vi, vj, si, sj) -> None:
        # product N(mu_i, s_i) N(mu_j, s_j) = N(mu_i - mu_j; 0, v) N(m, sp)
        self.m = (mi * vj + mj * vi) / self.v
        self.sp = si * sj / self.sd
        self._sq: dict = {}
        self._deriv: dict = {}
        self._terms = None

    def sq_integral(self, lo: float, hi: float) -> np.ndarray:
        """int_lo^hi p(z)^2 dz, exactly (n,)."""
        key = (float(lo), float(hi))
        if key not in self._sq:
            off = self.ww * self.phi / self.sd * _mass_between(lo, hi, self.m, self.sp)
            sd = self.s * _INV_SQRT2  # the width of N(mu_i, s_i)^2 / its integral
            diag = self.w * self.w * (0.5 * _INV_SQRTPI) / self.s * _mass_between(lo, hi, self.mu, sd)
            self._sq[key] = 2.0 * off.sum(1) + diag.sum(1)
        return self._sq[key]

    def derivatives(self, x: float) -> list:
        """p, p', ..., p^(5) at the point x, each (n,) (computed once per x: both grid sums
        usually share their ends)."""
        key = float(x)
        if key not in self._deriv:
            self._deriv[key] = self._derivatives(key)
        return self._deriv[key]

    def _derivatives(self, x: float) -> list:
        t = (x - self.mu) / self.s
        phi = self.w * exp_floored(-0.5 * t * t) * _INV_SQRT2PI / self.s
        t2 = t * t
        he = (np.ones_like(t), t, t2 - 1.0, t * (t2 - 3.0), t2 * (t2 - 6.0) + 3.0, t * (t2 * (t2 - 10.0) + 15.0))
        out, scale = [], phi
        for k in range(6):  # d^k/dx^k N(x; mu, s) = (-1)^k He_k(t) N / s^k
            out.append(((-1) ** k * he[k] * scale).sum(1))
            scale = scale / self.s
        return out

    @staticmethod
    def _g_derivs(p) -> dict:
        """Odd derivatives 1, 3, 5 and the value of g = p^2 from p, ..., p^(5) (Leibniz)."""
        return {0: p[0] * p[0], 1: 2.0 * p[0] * p[1], 3: 2.0 * (p[0] * p[3] + 3.0 * p[1] * p[2]),
                5: 2.0 * (p[0] * p[5] + 5.0 * p[1] * p[4] + 10.0 * p[2] * p[3])}

    def trapezoid_sq(self, lo: float, hi: float, h: float) -> np.ndarray:
        """Trapezoid rule of p^2 on the grid lo, lo + h, ..., hi (Euler-Maclaurin, see module)."""
        return self._trap(lo, hi, h)[0]

    def grid_sum_sq(self, lo: float, hi: float, h: float) -> np.ndarray:
        """sum_j p(z_j)^2 over the grid lo, lo + h, ..., hi."""
        trap, g_lo, g_hi = self._trap(lo, hi, h)
        return trap / h + 0.5 * (g_lo + g_hi)

    def _trap(self, lo, hi, h):
        a, b = self._g_derivs(self.derivatives(lo)), self._g_derivs(self.derivatives(hi))
        trap = self.sq_integral(lo, hi) + self.aliasing(lo, h)
        for k, p, c in _EM:
            trap += c * h**p * (b[k] - a[k])
        return trap, a[0], b[0]

    def _square_terms(self):
        """The Gaussian terms ``c N(m, sig)`` of p^2 as (c, m, sig, multiplicity): the pairs
        i < j (twice each) and the squares of the components (evaluated once)."""
        if self._terms is None:
            self._terms = ((self.ww * self.phi / self.sd, self.m, self.sp, 2.0),
                           (self.w * self.w * (0.5 * _INV_SQRTPI) / self.s, self.mu, self.s * _INV_SQRT2, 1.0))
        return self._terms

    def aliasing(self, lo: float, h: float) -> np.ndarray:
        """The aliasing of the trapezoid sum of p^2 on the lattice lo + j h (n,): for each term
        ``c N(m, sig)`` narrower than ``_ALIAS_STEPS h``, ``2 c sum_k exp(-2 pi^2 k^2 sig^2 / h^2)
        cos(2 pi k (m - lo) / h)``, k = 1.._ALIAS_K (Poisson summation); wider terms alias by
        less than 7e-18 of their mass. Exact for terms far inside the grid
        (:meth:`closed_form_ok`)."""
        n = self.w.shape[0]
        out = np.zeros(n)
        for c, m, sig, mult in self._square_terms():
            idx = np.flatnonzero(sig < _ALIAS_STEPS * h)
            if not idx.size:
                continue
            q = sig.reshape(-1)[idx] / h
            q = -2.0 * math.pi**2 * q * q  # log of the k = 1 damping
            ph = (2.0 * math.pi / h) * (m.reshape(-1)[idx] - lo)
            acc = np.zeros(idx.size)
            qmax = float(q.max())
            for k in range(1, _ALIAS_K + 1):
                if qmax * k * k < -40.0:  # exp(-40) = 4e-18: this and higher k vanish for every term
                    break
                acc += np.exp(q * (k * k)) * np.cos(k * ph)
            out += np.bincount(idx // sig.shape[1], weights=(2.0 * mult) * c.reshape(-1)[idx] * acc, minlength=n)
        return out

    def closed_form_ok(self, ranges, hmax: float) -> np.ndarray:
        """Rows (n,) whose closed-form grid sums hold on grids of steps <= ``hmax`` over each
        (lo, hi) of ``ranges``: every term of p^2 narrower than ``_ALIAS_STEPS hmax`` is at
        least ``_ALIAS_MIN_STEPS hmax`` wide and lies more than ``_INSIDE_NARROW`` widths inside
        every range (its aliasing is then exact and its end terms vanish). Rows whose components
        are all >= ``MIN_SIGMA_STEPS hmax`` wide have no such term."""
        ok = np.ones(self.w.shape[0], dtype=bool)
        for _, m, sig, _ in self._square_terms():
            idx = np.flatnonzero(sig < _ALIAS_STEPS * hmax)  # the narrow terms (few, usually)
            if not idx.size:
                continue
            mn, sn = m.reshape(-1)[idx], sig.reshape(-1)[idx]
            bad = sn < _ALIAS_MIN_STEPS * hmax
            for lo, hi in ranges:
                bad |= (mn - lo < _INSIDE_NARROW * sn) | (hi - mn < _INSIDE_NARROW * sn)
            ok[idx[bad] // sig.shape[1]] = False
        return ok

    def at(self, x) -> np.ndarray:
        """p(x_i) for one point per row (n,)."""
        x = _t(x).reshape(-1, 1)
        t = (x - self.mu) / self.s
        return (self.w * exp_floored(-0.5 * t * t) * _INV_SQRT2PI / self.s).sum(1)
