"""Networks of the encoders (autoencoder, wrappers of foundation models).

Imported by :mod:`rail.deepz.encoders` when a stage trains or estimates (not at import rail.deepz:
see :mod:`rail.deepz.nets`).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn


def _mlp(sizes: Sequence[int], final_act: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2 or final_act:
            layers.append(nn.GELU())
    return nn.Sequential(*layers)


class _ConvEncoder(nn.Module):
    """Two strided conv blocks + global average pooling -> ``out`` features."""

    def __init__(self, channels: int, width: int, out: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, width, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.GELU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, out),
        )

    def forward(self, img):
        return self.net(img)


class AutoencoderNet(nn.Module):
    """MLP autoencoder over features, with an optional conv branch over images.

    ``encode(x[, img])`` returns the latent (N, latent_dim (+ image_latent_dim)).
    ``forward(x[, img])`` returns the per-object reconstruction loss (mean squared error
    of the features, plus that of the images average-pooled to ``pool`` x ``pool``).
    """

    def __init__(self, n_features: int, hidden: Sequence[int], latent_dim: int,
                 image_shape: tuple | None = None, image_latent_dim: int = 8, conv_width: int = 16,
                 pool: int = 4):
        super().__init__()
        hidden = [int(h) for h in hidden]
        self.encoder = _mlp([n_features, *hidden, latent_dim])
        self.has_image = image_shape is not None
        total = latent_dim
        if self.has_image:
            c = int(image_shape[0])
            self.pool = int(pool)
            self.img_encoder = _ConvEncoder(c, conv_width, image_latent_dim)
            total += image_latent_dim
            self.img_decoder = _mlp([total, *hidden[::-1], c * self.pool * self.pool])
        self.decoder = _mlp([total, *hidden[::-1], n_features])

    def encode(self, x, img=None):
        h = self.encoder(x)
        if self.has_image:
            h = torch.cat([h, self.img_encoder(img)], dim=1)
        return h

    def forward(self, x, img=None):
        h = self.encode(x, img)
        loss = ((self.decoder(h) - x) ** 2).mean(-1)
        if self.has_image:
            target = nn.functional.adaptive_avg_pool2d(img, self.pool).flatten(1)
            loss = loss + ((self.img_decoder(h) - target) ** 2).mean(-1)
        return loss


class _EncodeOnly(nn.Module):
    def __init__(self, net: AutoencoderNet):
        super().__init__()
        self.net = net

    def forward(self, *inputs):
        return self.net.encode(*inputs)


class _CallableModule(nn.Module):
    """Wrap a plain callable so predict_batched can run it."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *x):
        return self.fn(*x)


class _FirstOutput(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *x):
        out = self.model(*x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if isinstance(out, Mapping):
            out = next(iter(out.values()))
        return out.float()
