"""Network of the embedding MDN method (fixed-grid mixture head on an encoder's embedding).

Imported by :mod:`rail.estimation.algos.deepz_embed` when a stage trains or estimates (not at import rail.deepz:
see :mod:`rail.deepz.nets`).
"""

from __future__ import annotations

import torch
from torch import nn

from rail.deepz.mixtures import FixedGridMixtureHead


class EmbedMDN(nn.Module):
    """Dense network -> weights of a fixed grid of Gaussians (``forward`` returns (N, K) weights)."""

    def __init__(self, in_features: int, hidden: list[int], zmin: float, zmax: float, n_components: int,
                 sigma: float, dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, int(h)), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = int(h)
        self.body = nn.Sequential(*layers)
        self.head = FixedGridMixtureHead(width, zmin, zmax, n_components, sigma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head.weights(self.body(x))
