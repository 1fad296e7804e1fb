"""Network of the LSTM method (recurrent mixture density network over band sequences).

Imported by :mod:`rail.estimation.algos.deepz_lstm` when a stage trains or estimates (not at import rail.deepz:
see :mod:`rail.deepz.nets`).
"""

from __future__ import annotations

import torch
from torch import nn

from rail.deepz.mixtures import GaussianMixtureHead
from rail.deepz.sequences import N_CHANNELS
from rail.deepz.training import batchnorm_affine, fold_input_affine_
from rail.estimation.algos.deepz_lstm import AGGREGATIONS


class LSTMMDN(nn.Module):
    """Stacked (Bi)LSTM over band steps -> aggregation -> dense -> Gaussian mixture head.

    Parameters
    ----------
    n_bands : int
        Sequence length (number of bands).
    lstm_units : list of int
        Hidden units per direction of each stacked LSTM layer.
    bidirectional : bool
        Bidirectional LSTMs (paper) or forward only.
    dropout : float
        Dropout after each LSTM layer (and after the dense layers).
    batch_norm : bool
        Batch normalisation of the LSTM outputs after each layer (paper).
    aggregation : {"last", "mean", "attention", "flatten"}
        How the last layer's outputs become one vector: ``last`` = final hidden state of
        each direction (paper, Keras ``return_sequences=False``), ``mean`` = average over
        steps, ``attention`` = learned softmax weights over steps, ``flatten`` = all steps
        concatenated.
    dense_units : list of int
        Widths of the ReLU dense layers before the mixture head.
    n_components : int
        Number of Gaussians K.
    zmin, zmax : float
        Range over which the initial component means are spread.
    min_sigma : float
        Floor on component widths.
    """

    def __init__(self, n_bands: int, lstm_units, bidirectional: bool = True, dropout: float = 0.3,
                 batch_norm: bool = True, aggregation: str = "last", dense_units=(64,),
                 n_components: int = 15, zmin: float = 0.0, zmax: float = 3.0, min_sigma: float = 1e-3):
        super().__init__()
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"Option 'aggregation'={aggregation!r} is not one of {AGGREGATIONS}")
        if not lstm_units:
            raise ValueError("Option 'lstm_units' must list at least one layer width")
        self.n_bands = n_bands
        self.aggregation = aggregation
        self.bidirectional = bool(bidirectional)
        ndir = 2 if bidirectional else 1
        # learned stand-in for the (flux, error) inputs of a masked band
        self.missing_token = nn.Parameter(torch.zeros(n_bands, N_CHANNELS - 1))
        self.lstms = nn.ModuleList()
        self.norms = nn.ModuleList()
        self.drop = nn.Dropout(dropout)
        width = N_CHANNELS
        for units in lstm_units:
            self.lstms.append(nn.LSTM(width, int(units), batch_first=True, bidirectional=self.bidirectional))
            width = ndir * int(units)
            self.norms.append(nn.BatchNorm1d(width) if batch_norm else nn.Identity())
        self.hidden = int(lstm_units[-1])
        if aggregation == "attention":
            self.attn = nn.Linear(width, 1)
        agg_width = width * n_bands if aggregation == "flatten" else width
        layers = []
        for units in dense_units:
            layers += [nn.Linear(agg_width, int(units)), nn.ReLU(), nn.Dropout(dropout)]
            agg_width = int(units)
        self.dense = nn.Sequential(*layers)
        self.head = GaussianMixtureHead(agg_width, n_components, min_sigma=min_sigma, mean_init=(zmin, zmax))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Sequences (N, B, 3) -> aggregated features (N, F)."""
        valid = x[..., 2:3]
        feats = x[..., :2] * valid + self.missing_token * (1.0 - valid)
        h = torch.cat([feats, valid], dim=-1)
        for lstm, norm in zip(self.lstms, self.norms):
            h, _ = lstm(h)
            h = self.drop(h)
            if isinstance(norm, nn.BatchNorm1d):
                h = norm(h.transpose(1, 2)).transpose(1, 2)
        if self.aggregation == "last":
            if self.bidirectional:
                # forward direction ends at the last step, backward at the first
                return torch.cat([h[:, -1, : self.hidden], h[:, 0, self.hidden:]], dim=-1)
            return h[:, -1]
        if self.aggregation == "mean":
            return h.mean(dim=1)
        if self.aggregation == "attention":
            a = torch.softmax(self.attn(h), dim=1)
            return (a * h).sum(dim=1)
        return h.reshape(h.shape[0], -1)

    def forward(self, x: torch.Tensor):
        return self.head(self.dense(self.encode(x)))

    def fold_batch_norms(self) -> "LSTMMDN":
        """Inference only: fold each eval-mode batch norm into the layer that reads its output
        (the next LSTM's input projection; after the last LSTM, the first dense layer or the
        mixture head), in place; puts the module in eval mode and returns it.

        Same outputs up to float rounding, without the batch-norm passes and the transposed
        copies around them. With ``aggregation='attention'`` the last norm is kept (the
        attention scores read the normalised outputs too).
        """
        self.eval()
        for i, norm in enumerate(self.norms):
            if not isinstance(norm, nn.BatchNorm1d):
                continue
            scale, shift = batchnorm_affine(norm)
            if i + 1 < len(self.lstms):
                nxt = self.lstms[i + 1]
                sfx = ["_l0", "_l0_reverse"] if nxt.bidirectional else ["_l0"]
                targets = [(getattr(nxt, "weight_ih" + x), getattr(nxt, "bias_ih" + x)) for x in sfx]
            elif self.aggregation == "attention":
                continue
            else:
                if self.aggregation == "flatten":  # features are step-major: (step, channel)
                    scale, shift = scale.repeat(self.n_bands), shift.repeat(self.n_bands)
                linears = [m for m in self.dense if isinstance(m, nn.Linear)][:1] or [
                    self.head.logits, self.head.mu, self.head.raw_sigma]
                targets = [(lin.weight, lin.bias) for lin in linears]
            for weight, bias in targets:
                fold_input_affine_(weight, bias, scale, shift)
            self.norms[i] = nn.Identity()
        return self
