"""Output heads and proper-scoring losses shared by all methods.

Heads (``torch.nn.Module``) map a hidden representation to a distribution over redshift:

* :class:`GaussianMixtureHead`: K components, softmax weights, unbounded means, positive
  sigmas (softplus + floor). Used by the LSTM-MDN and the image CNN.
* :class:`BinnedHead`: logits over ordered redshift bins (softmax gives bin probabilities).
  Used by the binned CRPS classifier.
* :class:`FixedGridMixtureHead`: weights of Gaussians with fixed, evenly spaced means and a
  fixed width (the embedding MDN of the SOM + foundation-model paper).

Losses return one value per object (shape (N,)); callers average them.

* :func:`gmm_nll`: negative log-likelihood of a Gaussian mixture.
* :func:`gmm_crps`: closed-form CRPS of a Gaussian mixture (Grimit et al. 2006, QJRMS 132, 2925).
* :func:`binned_crps`: the discrete-CDF CRPS of eq. (2) in Tian, Wen & Xia (NNC),
  ``sum_i [F_i - 1(c_i >= z)]^2 dz``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .gmm import gmm_crps_numpy  # noqa: F401 - the NumPy CRPS lives in the torch-free rail.deepz.gmm
from .gmm import fixed_grid_size, fixed_grid_spacing  # noqa: F401 - torch-free home (checked when a stage is built)

_SQRT2 = math.sqrt(2.0)
_SQRT2PI = math.sqrt(2.0 * math.pi)
_INV_SQRTPI = 1.0 / math.sqrt(math.pi)


@dataclass
class MixtureParams:
    """Parameters of a batch of Gaussian mixtures, each of shape (N, K)."""

    weights: torch.Tensor
    means: torch.Tensor
    sigmas: torch.Tensor

    def detach_numpy(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return tuple(t.detach().float().cpu().numpy() for t in (self.weights, self.means, self.sigmas))


class GaussianMixtureHead(nn.Module):
    """Linear layer to the parameters of a K-component Gaussian mixture.

    Parameters
    ----------
    in_features : int
        Size of the hidden representation.
    n_components : int
        Number of Gaussians K.
    min_sigma : float
        Floor on component widths (redshift units), keeps the NLL bounded.
    mean_init : tuple(float, float)
        Initial component means are spread evenly over this redshift range, so that
        components start out covering the target range instead of collapsing at 0.
    """

    def __init__(
        self,
        in_features: int,
        n_components: int,
        min_sigma: float = 1e-3,
        mean_init: tuple[float, float] = (0.0, 3.0),
    ):
        super().__init__()
        self.n_components = n_components
        self.min_sigma = float(min_sigma)
        self.logits = nn.Linear(in_features, n_components)
        self.mu = nn.Linear(in_features, n_components)
        self.raw_sigma = nn.Linear(in_features, n_components)
        with torch.no_grad():
            lo, hi = mean_init
            self.mu.bias.copy_(torch.linspace(lo, hi, n_components + 2)[1:-1])
            self.mu.weight.mul_(0.1)
            spread = (hi - lo) / max(n_components, 1)
            self.raw_sigma.bias.fill_(math.log(math.expm1(max(spread, 2 * self.min_sigma))))

    def forward(self, h: torch.Tensor) -> MixtureParams:
        weights = torch.softmax(self.logits(h), dim=-1)
        means = self.mu(h)
        sigmas = F.softplus(self.raw_sigma(h)) + self.min_sigma
        return MixtureParams(weights, means, sigmas)


class BinnedHead(nn.Module):
    """Linear layer to logits over ``n_bins`` ordered redshift bins."""

    def __init__(self, in_features: int, n_bins: int):
        super().__init__()
        self.linear = nn.Linear(in_features, n_bins)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear(h)


class BinSmoother(nn.Module):
    """Fixed Gaussian smoothing of bin probabilities that preserves each row's total mass.

    With fine bins, a CRPS-trained softmax leaves neighbouring bins almost interchangeable
    (the CRPS sees only the CDF), and the output becomes a comb of single-bin spikes: fine
    CDF, useless density (CDE loss, mode). Convolving the probabilities with a Gaussian of
    ``sigma_bins`` bins makes the emitted histogram smooth at that scale. Mass that would
    leave the range is kept by renormalising each source bin's kernel to the bins inside.

    Parameters
    ----------
    n_bins : int
        Number of bins.
    sigma_bins : float
        Kernel width in bins (0 = identity).
    """

    def __init__(self, n_bins: int, sigma_bins: float):
        super().__init__()
        self.sigma_bins = float(sigma_bins)
        half = int(math.ceil(4 * self.sigma_bins)) if self.sigma_bins > 0 else 0
        self.half = half
        offsets = torch.arange(-half, half + 1, dtype=torch.float32)
        kernel = torch.exp(-0.5 * (offsets / max(self.sigma_bins, 1e-12)) ** 2) if half else torch.ones(1)
        kernel = kernel / kernel.sum()
        # fraction of each source bin's kernel that lands inside [0, n_bins)
        idx = torch.arange(n_bins).reshape(-1, 1) + offsets.reshape(1, -1).long()
        inside = ((idx >= 0) & (idx < n_bins)).float() @ kernel
        # the convolution as one (n_bins, n_bins) banded matrix: out = probs @ matrix (F.conv1d
        # is much slower on CPU, CHANGELOG.md; a matmul is what GPUs do best). Derived from
        # (n_bins, sigma_bins): not saved in state dicts.
        src = torch.arange(n_bins).reshape(-1, 1)
        dst = src + offsets.reshape(1, -1).long()
        ok = (dst >= 0) & (dst < n_bins)
        matrix = torch.zeros(n_bins, n_bins)
        matrix[src.expand_as(dst)[ok], dst[ok]] = kernel.expand_as(dst)[ok]
        self.register_buffer("matrix", matrix * (1.0 / inside).reshape(-1, 1), persistent=False)

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        if self.half == 0:
            return probs
        return probs @ self.matrix.to(probs.dtype)


def fixed_grid_centers(zmin: float, zmax: float, n_components: int) -> np.ndarray:
    """Means of the fixed-grid mixture: ``n_components`` points evenly spaced over [zmin, zmax]
    (both ends included), float64. The one definition used by the head, the loss and the
    output (:func:`rail.deepz.pdf.fixed_grid_ensemble`)."""
    return np.linspace(float(zmin), float(zmax), int(n_components))


class FixedGridMixtureHead(nn.Module):
    """Weights of ``n_components`` Gaussians with fixed means (evenly spaced) and width.

    Parameters
    ----------
    in_features : int
        Size of the hidden representation.
    zmin, zmax : float
        Range spanned by the component means (inclusive).
    n_components : int
        Number of Gaussians (paper: 200).
    sigma : float
        Fixed width of every component (paper: 0.0037).
    """

    def __init__(self, in_features: int, zmin: float, zmax: float, n_components: int = 200, sigma: float = 0.0037):
        super().__init__()
        self.logits = nn.Linear(in_features, n_components)
        self.register_buffer("centers", torch.as_tensor(fixed_grid_centers(zmin, zmax, n_components),
                                                        dtype=torch.float32))
        self.sigma = float(sigma)

    def weights(self, h: torch.Tensor) -> torch.Tensor:
        """Component weights (N, K) only: the means and widths are the same for every object."""
        return torch.softmax(self.logits(h), dim=-1)

    def forward(self, h: torch.Tensor) -> MixtureParams:
        weights = self.weights(h)
        means = self.centers.expand_as(weights)
        sigmas = torch.full_like(weights, self.sigma)
        return MixtureParams(weights, means, sigmas)


# --------------------------------------------------------------------------- losses


def gmm_nll(params: MixtureParams, z: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood ``-log sum_k w_k N(z | mu_k, sigma_k)`` per object."""
    z = z.reshape(-1, 1)
    log_norm = (
        -0.5 * ((z - params.means) / params.sigmas) ** 2
        - torch.log(params.sigmas)
        - math.log(_SQRT2PI)
    )
    log_w = torch.log(params.weights.clamp_min(1e-30))
    return -torch.logsumexp(log_w + log_norm, dim=-1)


# Two slow paths of the CPU float kernels, both hit by Gaussian densities evaluated far from
# their centre: exp() of an argument whose result underflows (below about -87; -708 in
# float64) and arithmetic with a subnormal operand or result (below 1.2e-38); both cost many
# times a normal operation (measured: benchmarks/README.md, "Subnormal numbers"). Exponents
# are floored where exp is still a normal number, far below any density value that matters
# (1.8e-35 in float32).
EXP_FLOOR = {torch.float32: -80.0, torch.float64: -700.0, torch.bfloat16: -80.0, torch.float16: -9.0}


def _exp_floor(dtype: torch.dtype) -> float:
    return EXP_FLOOR.get(dtype, -80.0)


def exp_floored(a: torch.Tensor) -> torch.Tensor:
    """``exp(a)`` with ``a`` floored at :data:`EXP_FLOOR` of its dtype (differentiable; the
    gradient below the floor is 0 instead of < 1e-34)."""
    return torch.exp(a.clamp(min=_exp_floor(a.dtype)))


def exp_floored_(a: torch.Tensor) -> torch.Tensor:
    """In-place :func:`exp_floored` (no autograd; for the inference-time mixture summaries)."""
    return a.clamp_(min=_exp_floor(a.dtype)).exp_()


def gaussian_basis(grid, centers, sigma: float) -> torch.Tensor:
    """float32 matrix (K, G) of the unit Gaussians ``N(grid | centers_k, sigma)``; entries that
    would be subnormal in float32 (< 1e-30) are exactly 0, so products with it stay fast."""
    g = np.asarray(grid, dtype=np.float64)
    c = np.asarray(centers, dtype=np.float64).reshape(-1)
    t = (g[None, :] - c[:, None]) / float(sigma)
    basis = np.exp(-0.5 * t * t) / (math.sqrt(2.0 * math.pi) * float(sigma))
    basis[basis < 1e-30] = 0.0
    return torch.as_tensor(basis.astype(np.float32))


def _crps_a(mu: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """E|X| for X ~ N(mu, var): ``2 s phi(mu/s) + mu (2 Phi(mu/s) - 1)``."""
    s = torch.sqrt(var)
    t = mu / s
    pdf = exp_floored(-0.5 * t * t) / _SQRT2PI
    return 2.0 * s * pdf + mu * torch.erf(t / _SQRT2)


def gmm_crps(params: MixtureParams, z: torch.Tensor) -> torch.Tensor:
    """Closed-form CRPS of a Gaussian mixture at ``z`` (redshift units), per object.

    ``CRPS = sum_i w_i A(z - mu_i, s_i^2) - 1/2 sum_ij w_i w_j A(mu_i - mu_j, s_i^2 + s_j^2)``
    with ``A(m, v) = E|N(m, v)|``. Cost O(K^2) per object.
    """
    w, mu, s = params.weights, params.means, params.sigmas
    z = z.reshape(-1, 1)
    term1 = (w * _crps_a(z - mu, s * s)).sum(-1)
    dmu = mu.unsqueeze(-1) - mu.unsqueeze(-2)
    var = (s * s).unsqueeze(-1) + (s * s).unsqueeze(-2)
    ww = w.unsqueeze(-1) * w.unsqueeze(-2)
    term2 = 0.5 * (ww * _crps_a(dmu, var)).sum((-1, -2))
    return term1 - term2


def binned_crps(logits_or_probs: torch.Tensor, z: torch.Tensor, centers: torch.Tensor, *, from_logits: bool = True) -> torch.Tensor:
    """Discrete-CDF CRPS of eq. (2) (NNC paper), per object.

    ``CRPS = sum_i [F_i - 1(c_i >= z)]^2 dz`` with ``F_i = sum_{j<=i} p_j`` and ``c_i`` the
    bin centres (evenly spaced, width ``dz``). It is the CRPS of the step CDF that jumps at
    the bin centres, integrated over [c_0, c_last + dz].
    """
    p = torch.softmax(logits_or_probs, dim=-1) if from_logits else logits_or_probs
    cdf = torch.cumsum(p, dim=-1)
    step = (centers.reshape(1, -1) >= z.reshape(-1, 1)).to(cdf.dtype)
    dz = centers[1] - centers[0]
    return ((cdf - step) ** 2).sum(-1) * dz


def binned_nll(probs: torch.Tensor, z: torch.Tensor, edges: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Negative log of the histogram density at ``z``, per object.

    ``probs`` (N, nbins) are bin probabilities over evenly spaced ``edges`` (nbins + 1,);
    ``-log(p_b / dz)`` with ``b`` the bin holding ``z`` (redshifts outside the edges fall
    in the first / last bin). Unlike the CRPS, it rewards mass at the true redshift itself,
    not only a CDF that crosses there.
    """
    dz = edges[1] - edges[0]
    idx = torch.clamp(((z - edges[0]) / dz).long(), 0, probs.shape[-1] - 1)
    p = probs.gather(-1, idx.reshape(-1, 1)).reshape(-1)
    return -torch.log(p.clamp_min(eps) / dz)


# ------------------------------------------------- fixed-grid mixtures (embedding MDN)


def fixed_grid_pair_matrix(centers, sigma: float) -> torch.Tensor:
    """Constant (K, K) matrix ``A(c_i - c_j, 2 sigma^2)`` of :func:`gmm_crps`'s second term.

    For Gaussians with fixed means ``centers`` and a common width ``sigma`` the pairwise
    term of the mixture CRPS does not depend on the object: compute it once.
    """
    c = torch.as_tensor(centers, dtype=torch.float64).reshape(-1)
    var = torch.full((c.numel(), c.numel()), 2.0 * float(sigma) ** 2, dtype=torch.float64)
    return _crps_a(c.unsqueeze(-1) - c.unsqueeze(-2), var)


def fixed_grid_crps(
    weights: torch.Tensor,
    z: torch.Tensor,
    centers: torch.Tensor,
    sigma: float,
    pair_matrix: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact CRPS of fixed-grid Gaussian mixtures (same value as :func:`gmm_crps`), per object.

    ``CRPS = sum_i w_i A(z - c_i, s^2) - 1/2 w^T M w`` with ``M`` from
    :func:`fixed_grid_pair_matrix` (pass it to avoid recomputing it each call). The
    pairwise term becomes one (N, K) x (K, K) matrix product instead of the (N, K, K)
    tensor of :func:`gmm_crps`.
    """
    if pair_matrix is None:
        pair_matrix = fixed_grid_pair_matrix(centers, sigma)
    pair_matrix = pair_matrix.to(device=weights.device, dtype=weights.dtype)
    centers = torch.as_tensor(centers, device=weights.device, dtype=weights.dtype).reshape(1, -1)
    z = z.reshape(-1, 1).to(weights.dtype)
    var = torch.full_like(centers, float(sigma) ** 2)
    term1 = (weights * _crps_a(z - centers, var)).sum(-1)
    term2 = 0.5 * ((weights @ pair_matrix) * weights).sum(-1)
    return term1 - term2
