"""Pools of ensemble members as torch modules (the numpy pool is rail.deepz.ensemble.pool_mixtures).

Imported by :mod:`rail.deepz.ensemble's users` when a stage trains or estimates (not at import rail.deepz:
see :mod:`rail.deepz.nets`).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from rail.deepz.mixtures import MixtureParams


class MixtureEnsemble(nn.Module):
    """M mixture networks -> one mixture with M x K components, member m's weights times
    ``member_weights[m]`` (default 1/M). ``forward`` returns :class:`MixtureParams`."""

    def __init__(self, members: Sequence[nn.Module], member_weights=None):
        super().__init__()
        self.members = nn.ModuleList(members)
        mw = np.full(len(members), 1.0 / len(members)) if member_weights is None else np.asarray(member_weights)
        self.register_buffer("member_weights", torch.as_tensor(mw, dtype=torch.float32))

    def forward(self, *inputs) -> MixtureParams:
        outs = [m(*inputs) for m in self.members]
        w = torch.cat([o.weights * self.member_weights[i] for i, o in enumerate(outs)], dim=1)
        return MixtureParams(w, torch.cat([o.means for o in outs], 1), torch.cat([o.sigmas for o in outs], 1))


class ProbabilityPool(nn.Module):
    """M networks whose ``prob_fn(net(x))`` are per-object probability vectors (N, K) -> their
    average (an equal-weight linear pool of binned or fixed-grid PDFs)."""

    def __init__(self, members: Sequence[nn.Module], prob_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self._prob_fn = prob_fn

    def forward(self, *inputs) -> torch.Tensor:
        total = None
        for net in self.members:
            p = self._prob_fn(net, net(*inputs)).float()
            total = p if total is None else total + p
        return total / len(self.members)
