"""Feature scaling fitted at inform time and stored with the model."""

from __future__ import annotations

import warnings

import numpy as np


class Standardizer:
    """Per-feature standardisation ``(x - mean) / std`` along the last axis.

    Fit it on training features only; it is serialised with :meth:`to_dict` and restored
    with :meth:`from_dict` so that estimation uses exactly the training statistics.
    Features with zero spread get ``std = 1`` so they pass through centred.

    Parameters
    ----------
    mask_value : float
        Value given to entries flagged invalid in :meth:`transform` (0 = the training mean).
    """

    def __init__(self, mask_value: float = 0.0):
        self.mean: np.ndarray | None = None
        self.std: np.ndarray | None = None
        self.mask_value = float(mask_value)

    def fit(self, x: np.ndarray, valid: np.ndarray | None = None) -> "Standardizer":
        """Fit on ``x`` (..., F); entries where ``valid`` is False are ignored."""
        x = np.asarray(x, dtype=np.float64).reshape(-1, np.shape(x)[-1])
        if valid is not None:
            v = np.asarray(valid, dtype=bool).reshape(-1, x.shape[-1])
            x = np.where(v, x, np.nan)
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-invalid features: handled below
            mean = np.nanmean(x, axis=0)
            std = np.nanstd(x, axis=0)
        mean = np.where(np.isfinite(mean), mean, 0.0)
        std = np.where(np.isfinite(std) & (std > 0), std, 1.0)
        self.mean, self.std = mean.astype(np.float32), std.astype(np.float32)
        return self

    def transform(self, x: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
        if self.mean is None:
            raise RuntimeError("Standardizer.transform called before fit")
        if np.shape(x)[-1] != self.mean.shape[0]:
            raise ValueError(
                f"Standardizer was fitted on {self.mean.shape[0]} features, got {np.shape(x)[-1]}"
            )
        out = (np.asarray(x, dtype=np.float32) - self.mean) / self.std
        if valid is not None:
            out = np.where(valid, out, np.float32(self.mask_value))
        return out.astype(np.float32)

    def fit_transform(self, x: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
        return self.fit(x, valid).transform(x, valid)

    def to_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std, "mask_value": self.mask_value}

    @classmethod
    def from_dict(cls, d: dict) -> "Standardizer":
        obj = cls(mask_value=d.get("mask_value", 0.0))
        obj.mean = np.asarray(d["mean"], dtype=np.float32)
        obj.std = np.asarray(d["std"], dtype=np.float32)
        return obj


def fit_standardizer(x: np.ndarray, valid: np.ndarray | None, rows: np.ndarray) -> Standardizer:
    """A :class:`Standardizer` fitted on ``x[rows]``, ignoring entries where ``valid`` is False
    (``valid`` None: all entries count)."""
    return Standardizer().fit(x[rows], None if valid is None else valid[rows])
