"""Network of one member of the CNN method (catalogue MLP and optional image CNN, mixture head).

Imported by :mod:`rail.estimation.algos.deepz_cnn` when a stage trains or estimates (not at import rail.deepz:
see :mod:`rail.deepz.nets`).
"""

from __future__ import annotations

import torch
from torch import nn

from rail.deepz.mixtures import GaussianMixtureHead, MixtureParams


class CNNMember(nn.Module):
    """One ensemble member: conv branch (optional) + dense catalog branch -> mixture head.

    ``forward(x_cat[, x_img])`` returns :class:`MixtureParams` (N, K).
    """

    def __init__(self, n_features: int, in_channels: int, conv_channels: list[int],
                 dense_units: list[int], n_components: int, use_images: bool,
                 zrange: tuple[float, float]):
        super().__init__()
        self.use_images = bool(use_images)
        width = 0
        if self.use_images:
            layers, prev = [], in_channels
            for c in conv_channels:
                layers += [nn.Conv2d(prev, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2)]
                prev = c
            layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
            self.conv = nn.Sequential(*layers)
            width += prev
        dense, prev = [], n_features
        for u in dense_units:
            dense += [nn.Linear(prev, u), nn.ReLU()]
            prev = u
        self.dense = nn.Sequential(*dense)
        width += prev
        hidden = dense_units[-1] if dense_units else width
        self.merge = nn.Sequential(nn.Linear(width, hidden), nn.ReLU())
        self.head = GaussianMixtureHead(hidden, n_components, mean_init=zrange)

    def forward(self, x_cat: torch.Tensor, x_img: torch.Tensor | None = None) -> MixtureParams:
        h = self.dense(x_cat)
        if self.use_images:
            h = torch.cat([h, self.conv(x_img)], dim=1)
        return self.head(self.merge(h))
