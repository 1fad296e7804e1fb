"""Networks of the NNC method (residual MLP with a binned softmax head).

Imported by :mod:`rail.estimation.algos.deepz_nnc` when a stage trains or estimates (not at import rail.deepz:
see :mod:`rail.deepz.nets`).
"""

from __future__ import annotations

import torch
from torch import nn

from rail.deepz.mixtures import BinnedHead, BinSmoother


class ResidualMLP(nn.Module):
    """MLP with batch norm, ReLU, dropout and a (projected) residual connection per layer.

    Parameters
    ----------
    in_features : int
        Number of input features.
    hidden : list of int
        Widths of the hidden layers.
    dropout : float
        Dropout probability after each hidden layer.
    """

    def __init__(self, in_features: int, hidden: list[int], dropout: float = 0.1):
        super().__init__()
        self.layers = nn.ModuleList()
        self.skips = nn.ModuleList()
        width = in_features
        for h in hidden:
            self.layers.append(
                nn.Sequential(nn.Linear(width, h), nn.BatchNorm1d(h), nn.ReLU(), nn.Dropout(dropout))
            )
            self.skips.append(nn.Identity() if h == width else nn.Linear(width, h, bias=False))
            width = h
        self.out_features = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer, skip in zip(self.layers, self.skips):
            x = layer(x) + skip(x)
        return x


class NNCNetwork(nn.Module):
    """Residual MLP + binned softmax head; ``forward`` returns bin logits.

    :meth:`probs` turns (tempered) logits into the emitted bin probabilities: softmax,
    then the fixed mass-preserving Gaussian smoothing of ``smoothing_bins`` bins.
    """

    def __init__(self, in_features: int, hidden: list[int], n_bins: int, dropout: float,
                 smoothing_bins: float = 0.0):
        super().__init__()
        self.body = ResidualMLP(in_features, hidden, dropout)
        self.head = BinnedHead(self.body.out_features, n_bins)
        self.smoother = BinSmoother(n_bins, smoothing_bins)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        # the head stays in float32 under autocast: with bf16 logits too, zmode moved by
        # more than 0.03 for 1% of DC2 test objects (0.005 with this float32 head)
        with torch.autocast(x.device.type, enabled=False):
            return self.head(h.float())

    def probs(self, logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        return self.smoother(torch.softmax(logits / temperature, dim=-1))
