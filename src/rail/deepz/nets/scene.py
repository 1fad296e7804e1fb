"""Network of the scene method (U-Net detector with per-object mixture heads).

Imported by :mod:`rail.estimation.algos.deepz_scene` when a stage trains or estimates (not at import rail.deepz:
see :mod:`rail.deepz.nets`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from rail.deepz.mixtures import GaussianMixtureHead, MixtureParams


def _block(cin: int, cout: int) -> nn.Sequential:
    groups = 8 if cout % 8 == 0 else 1
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(groups, cout), nn.ReLU(),
        nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(groups, cout), nn.ReLU(),
    )


def normalised_grid(x: torch.Tensor, y: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Pixel-centre coordinates (B, K) -> grid_sample coordinates (B, K, 1, 2), align_corners=False."""
    gx = (x + 0.5) / w * 2.0 - 1.0
    gy = (y + 0.5) / h * 2.0 - 1.0
    return torch.stack([gx, gy], dim=-1).unsqueeze(2)


class SceneNet(nn.Module):
    """U-Net backbone + heat-map / offset / size / mask heads + pooled mixture head.

    ``forward(images)`` returns the dense maps; ``mixture(maps, x, y)`` the redshift mixture
    of objects at pixel positions (B, K).
    """

    def __init__(self, in_channels: int, width: int = 32, hidden: int = 64, n_components: int = 5,
                 zrange: tuple[float, float] = (0.0, 3.0), aperture_radius: float = 0.0):
        super().__init__()
        w = int(width)
        self.aperture_radius = float(aperture_radius)
        n_ap = 0
        if self.aperture_radius > 0:
            r = int(np.ceil(self.aperture_radius))
            yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
            disk = torch.as_tensor((xx**2 + yy**2 <= self.aperture_radius**2).astype(np.float32))
            self.register_buffer("disk", disk[None, None].repeat(in_channels, 1, 1, 1), persistent=False)
            n_ap = 2 * in_channels - 1
        self.enc1 = _block(in_channels, w)
        self.enc2 = _block(w, 2 * w)
        self.enc3 = _block(2 * w, 2 * w)
        self.dec2 = _block(4 * w, 2 * w)
        self.dec1 = _block(3 * w, w)
        self.heat = nn.Conv2d(w, 1, 1)
        self.offset = nn.Conv2d(w, 2, 1)
        self.size = nn.Conv2d(w, 2, 1)
        self.mask = nn.Conv2d(w, 1, 1)
        with torch.no_grad():
            self.heat.bias.fill_(-2.19)  # prior 0.1 (CenterNet)
            self.size.bias.fill_(2.0)  # boxes of ~7 pixels
        n_feat = w + 2 * w + 2 * in_channels + n_ap
        self.mlp = nn.Sequential(nn.Linear(n_feat, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.head = GaussianMixtureHead(hidden, n_components, mean_init=zrange)

    def forward(self, img: torch.Tensor) -> dict:
        e1 = self.enc1(img)
        e2 = self.enc2(F.avg_pool2d(e1, 2, ceil_mode=True))
        e3 = self.enc3(F.avg_pool2d(e2, 2, ceil_mode=True))
        d2 = self.dec2(torch.cat([e2, F.interpolate(e3, size=e2.shape[-2:], mode="bilinear", align_corners=False)], 1))
        d1 = self.dec1(torch.cat([e1, F.interpolate(d2, size=e1.shape[-2:], mode="bilinear", align_corners=False)], 1))
        feats = [d1, e3, img, F.avg_pool2d(img, 5, stride=1, padding=2, count_include_pad=False)]
        if self.aperture_radius > 0:
            feats.append(self.aperture_features(img))
        return {"heat": self.heat(d1), "offset": self.offset(d1), "size": self.size(d1), "mask": self.mask(d1),
                "features": feats}

    def aperture_features(self, img: torch.Tensor) -> torch.Tensor:
        """Per-band aperture sums of the linear pixels (in units of each band's noise scale) around
        every pixel, as ``asinh(sum / sqrt(n_pixels))`` (the aperture S/N), and the C-1 differences
        of adjacent bands (log flux ratios, i.e. colours, for bright objects): (B, 2C-1, H, W)."""
        lin = torch.sinh(img.clamp(max=30.0))
        ap = F.conv2d(lin, self.disk, padding=self.disk.shape[-1] // 2, groups=img.shape[1])
        ap = torch.asinh(ap / float(np.sqrt(float(self.disk[0, 0].sum()))))
        return torch.cat([ap, ap[:, :-1] - ap[:, 1:]], dim=1)

    def mixture(self, maps: dict, x: torch.Tensor, y: torch.Tensor) -> MixtureParams:
        """Mixtures (B*K, n_components) of objects at pixel positions ``x``, ``y`` (B, K)."""
        h, w = maps["heat"].shape[-2:]
        grid = normalised_grid(x, y, h, w)
        feats = [F.grid_sample(f, grid, mode="bilinear", align_corners=False).squeeze(-1) for f in maps["features"]]
        f = torch.cat(feats, dim=1).permute(0, 2, 1).reshape(-1, sum(t.shape[1] for t in feats))
        return self.head(self.mlp(f))
