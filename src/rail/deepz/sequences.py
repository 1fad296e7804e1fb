"""Photometry as wavelength-ordered sequences (one step per band) for sequence models.

A :class:`BandSequencer` turns a :class:`rail.deepz.photometry.Photometry` into an array
``(N, B, 3)``: for each band, in increasing effective wavelength, the scaled flux, the
scaled flux error and a validity flag (1 = measured, 0 = missing / non-detected / masked).
The per-band scaling statistics are fitted at inform time and stored with the model
(:meth:`BandSequencer.to_dict`).

Flux scaling (``flux_transform``):

* ``"linear"``: the LSTM-MDNz paper's choice, flux and flux error standardised per band,
  ``(x - mean) / std`` over the training set (eq. 9 of the paper).
* ``"asinh"`` (default of the LSTM stage): ``asinh(f / b)`` and ``log(sigma_f / b)``
  with ``b`` the band's median training flux error (Lupton et al. 1999 asinh magnitudes,
  up to sign and scale), then standardised per band. Galaxy fluxes span 3-4 decades: with
  linear scaling the faint majority ends up in a sliver around ``-mean/std`` and a few
  bright objects set the scale; the asinh transform is linear near the noise level and
  logarithmic for bright objects, so colours become differences of inputs again (see the
  DC2 comparison in benchmarks/results/ablations_lstm.md).

Invalid entries (``Photometry.valid`` False) get ``mask_value`` = 0 (the training mean
after standardisation) in the flux and error channels and 0 in the validity channel; the
network decides what to do with them (the LSTM stage swaps them for a learned per-band
token). Statistics are fitted on valid entries only.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .photometry import Photometry
from .scaling import Standardizer

FLUX_TRANSFORMS = ("asinh", "linear")
N_CHANNELS = 3  # scaled flux, scaled flux error, validity flag


def band_order(bands: Sequence[str], wavelengths: Sequence[float] | None = None) -> np.ndarray:
    """Indices that put ``bands`` in increasing effective wavelength.

    ``wavelengths`` (same length as ``bands``, any unit) gives each band's effective
    wavelength; empty/None keeps the order of ``bands`` (an explicit order). Ties keep
    the given order (stable sort).
    """
    n = len(bands)
    if wavelengths is None or len(wavelengths) == 0:
        return np.arange(n)
    if len(wavelengths) != n:
        raise ValueError(
            f"Option 'wavelengths' has {len(wavelengths)} values for {n} bands {list(bands)}; "
            "give one effective wavelength per band (same order), or an empty list to keep "
            "the order of 'bands'"
        )
    wl = np.asarray(wavelengths, dtype=np.float64)
    if not np.all(np.isfinite(wl)) or np.any(wl <= 0):
        raise ValueError(f"Option 'wavelengths' must hold positive finite numbers, got {list(wavelengths)}")
    return np.argsort(wl, kind="stable")


class BandSequencer:
    """Photometry -> ``(N, B, 3)`` float32 sequences [scaled flux, scaled error, valid].

    Parameters
    ----------
    order : array of int
        Band permutation (from :func:`band_order`): step ``t`` holds band ``order[t]``.
    flux_transform : {"asinh", "linear"}
        See the module docstring.
    flux_unit : str
        Unit of :meth:`Photometry.fluxes` used before scaling (``nJy``).
    """

    def __init__(self, order: Sequence[int], flux_transform: str = "asinh", flux_unit: str = "nJy"):
        if flux_transform not in FLUX_TRANSFORMS:
            raise ValueError(f"Option 'flux_transform'={flux_transform!r} is not one of {FLUX_TRANSFORMS}")
        self.order = np.asarray(order, dtype=np.int64)
        self.flux_transform = flux_transform
        self.flux_unit = flux_unit
        self.softening: np.ndarray | None = None
        self.flux_scaler = Standardizer()
        self.err_scaler = Standardizer()

    # ------------------------------------------------------------------ helpers
    def _raw(self, phot: Photometry) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if phot.n_bands != len(self.order):
            raise ValueError(f"BandSequencer built for {len(self.order)} bands, got {phot.n_bands}")
        flux, ferr = phot.fluxes(self.flux_unit)
        o = self.order
        return flux[:, o].astype(np.float64), ferr[:, o].astype(np.float64), phot.valid[:, o]

    def _transform_raw(self, flux, ferr):
        if self.flux_transform == "linear":
            return flux, ferr
        b = self.softening[None, :]
        return np.arcsinh(flux / b), np.log(np.maximum(ferr, 1e-6 * b) / b)

    # ------------------------------------------------------------------ API
    def fit(self, phot: Photometry, valid: np.ndarray | None = None) -> "BandSequencer":
        """Fit the per-band statistics on (valid entries of) the training photometry."""
        flux, ferr, v = self._raw(phot)
        if valid is not None:
            v = v & np.asarray(valid, dtype=bool)[:, self.order]
        soft = np.ones(flux.shape[1])
        for j in range(flux.shape[1]):  # loop over bands (a handful), not objects
            e = ferr[v[:, j], j]
            if e.size and np.isfinite(np.median(e)) and np.median(e) > 0:
                soft[j] = np.median(e)
        self.softening = soft
        tf, te = self._transform_raw(flux, ferr)
        self.flux_scaler.fit(tf, v)
        self.err_scaler.fit(te, v)
        return self

    def transform(self, phot: Photometry, valid: np.ndarray | None = None) -> np.ndarray:
        """Sequences ``(N, B, 3)``; ``valid`` (N, B) in the photometry's band order
        (defaults to ``phot.valid``) says which steps are measured."""
        if self.softening is None:
            raise RuntimeError("BandSequencer.transform called before fit")
        flux, ferr, _ = self._raw(phot)
        v = (phot.valid if valid is None else np.asarray(valid, dtype=bool))[:, self.order]
        tf, te = self._transform_raw(flux, ferr)
        out = np.empty(flux.shape + (N_CHANNELS,), dtype=np.float32)
        out[..., 0] = self.flux_scaler.transform(tf.astype(np.float32), v)
        out[..., 1] = self.err_scaler.transform(te.astype(np.float32), v)
        out[..., 2] = v
        return out

    def to_dict(self) -> dict:
        return {
            "order": self.order.copy(),
            "flux_transform": self.flux_transform,
            "flux_unit": self.flux_unit,
            "softening": None if self.softening is None else self.softening.copy(),
            "flux_scaler": self.flux_scaler.to_dict(),
            "err_scaler": self.err_scaler.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "BandSequencer":
        obj = cls(d["order"], d["flux_transform"], d.get("flux_unit", "nJy"))
        obj.softening = None if d["softening"] is None else np.asarray(d["softening"], dtype=np.float64)
        obj.flux_scaler = Standardizer.from_dict(d["flux_scaler"])
        obj.err_scaler = Standardizer.from_dict(d["err_scaler"])
        return obj


def make_band_dropout(p: float):
    """Training augmentation of sequence batches (N, B, N_CHANNELS): mask each band of each
    object with probability ``p`` (validity flag and values set to 0, as a masked step)."""
    import torch

    def augment(batch):
        x = batch[0]
        drop = torch.rand(x.shape[:2], device=x.device) < p
        x = x.clone()
        x[..., 2] = x[..., 2] * (~drop).to(x.dtype)
        x[..., :2] = x[..., :2] * x[..., 2:3]
        return [x, *batch[1:]]

    return augment
