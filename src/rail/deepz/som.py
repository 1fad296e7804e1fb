"""Self-organising map (SOM) of catalog features, per-cell performance and flags.

After the SOM + foundation-model paper (shared/papers/som_foundation_embedding_mdn.txt):
a SOM is trained on catalog-level features of a reference sample (which may be larger than
the training sample and unlabelled); every cell stores the training-sample count and, from
a validation sample with true redshifts and the estimator's PDFs, its sigma_NMAD, bias,
eta and PCO with bootstrap errors. Objects are then flagged as

* **out of distribution** (``flag_ood``): their cell holds fewer than ``min_train_count``
  training objects, *or* their distance to the best-matching codebook vector exceeds the
  ``dist_quantile`` quantile of the training objects' distances (an object far outside
  the training colours lands on an edge cell that may be well populated: the distance
  catches it);
* **underperforming** (``flag_underperforming``): their cell holds at least
  ``min_val_count`` validation objects and one of the cell's metrics deviates from the
  global value by more than ``underperform_sigma`` times the statistical noise expected
  for the global metric measured on a sample of the cell's size (the paper's Fig. 1
  "standard error" band; obtained by drawing that many objects from the whole
  validation sample). sigma_NMAD, eta and PCO count when they are *worse* (larger) than
  global, bias when it deviates in either direction.

Definitions (``dz = (zphot - ztrue) / (1 + ztrue)``, the SOM paper's, from
:mod:`rail.deepz.pointmetrics`): the key ``sigma_nmad`` here is the paper's
1.4826 median(|dz|) (``pointmetrics.sigma_nmad_nomedian``; the comparison table's
``sigma_nmad`` subtracts the median); ``bias`` = median(dz) (``bias_median``); eta =
fraction |dz| > 0.15; PCO = fraction of ztrue outside the central 99% interval of the PDF
(PIT < 0.005 or > 0.995).

The SOM itself is trained with :mod:`minisom` (PCA initialisation, random-order online
updates, Gaussian neighbourhood decaying to one cell). Best-matching units of whole
chunks are computed here with one distance matrix per chunk (minisom's ``winner`` is per
object). Per-cell statistics use ``np.bincount`` and one sort per bootstrap replicate;
nothing loops over objects or cells.
"""

from __future__ import annotations

import warnings
from typing import Mapping, Sequence

import numpy as np

from . import pointmetrics as pm
from .photometry import Photometry
from .scaling import Standardizer

METRICS = ("sigma_nmad", "bias", "eta", "pco")
NMAD_FACTOR = pm.NMAD_FACTOR
PHOT_BLOCKS = ("mags", "colors", "errors", "color_errors", "valid")


# ----------------------------------------------------------------- features


def som_feature_matrix(data: Mapping, phot: Photometry | None, spec: Sequence[str]) -> np.ndarray:
    """Catalog features for the SOM: photometric blocks (``colors``, ``mags``...) computed
    from the cleaned photometry, and/or table column names, stacked in ``spec`` order."""
    if not spec:
        raise ValueError("Option 'som_features' is empty")
    blocks = []
    for entry in spec:
        if entry in PHOT_BLOCKS:
            if phot is None:
                raise ValueError(f"som_features entry {entry!r} needs photometry (options 'bands'/'err_bands')")
            blocks.append(phot.features([entry]).astype(np.float64))
            continue
        if entry not in data:
            avail = ", ".join(sorted(map(str, data.keys()))[:30])
            raise KeyError(
                f"som_features entry {entry!r} is neither a photometric block {PHOT_BLOCKS} nor a "
                f"column of the input. Available columns: {avail}"
            )
        col = np.asarray(data[entry])
        if col.ndim != 1 or col.dtype.kind not in "fiu":
            raise ValueError(f"SOM feature column {entry!r} must be 1-D numeric, got {col.dtype} {col.shape}")
        col = col.astype(np.float64)
        bad = ~np.isfinite(col)
        if bad.any():
            raise ValueError(f"SOM feature column {entry!r} has {int(bad.sum())} NaN/inf value(s)")
        blocks.append(col[:, None])
    return np.concatenate(blocks, axis=1)


def needs_photometry(spec: Sequence[str]) -> bool:
    return any(e in PHOT_BLOCKS for e in spec)


# ----------------------------------------------------------------- SOM


class SOM:
    """A rectangular SOM trained with minisom on standardised features.

    Parameters
    ----------
    shape : (int, int)
        Grid size (rows, columns); cell index = row * columns + column.
    n_iter : int
        Online updates (random objects, with replacement).
    sigma : float
        Initial neighbourhood radius in cells (0: a quarter of the larger side); decays
        linearly to 1 cell.
    learning_rate : float
        Initial learning rate (decays linearly to 0).
    seed : int
    """

    def __init__(self, shape=(15, 15), n_iter: int = 20000, sigma: float = 0.0, learning_rate: float = 0.5,
                 seed: int = 0):
        self.shape = (int(shape[0]), int(shape[1]))
        if min(self.shape) < 1:
            raise ValueError(f"Option 'som_shape'={list(shape)} must be two positive integers")
        self.n_iter = int(n_iter)
        self.sigma = float(sigma) if sigma and sigma > 0 else max(1.0, max(self.shape) / 4.0)
        self.learning_rate = float(learning_rate)
        self.seed = int(seed)
        self.scaler: Standardizer | None = None
        self.codebook: np.ndarray | None = None  # (K, F) in standardised units

    @property
    def n_cells(self) -> int:
        return self.shape[0] * self.shape[1]

    def fit(self, x: np.ndarray) -> "SOM":
        from minisom import MiniSom

        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or len(x) < 2:
            raise ValueError(f"SOM needs at least 2 objects with (N, F) features, got shape {x.shape}")
        self.scaler = Standardizer().fit(x)
        xs = self.scaler.transform(x).astype(np.float64)
        som = MiniSom(self.shape[0], self.shape[1], xs.shape[1], sigma=self.sigma, learning_rate=self.learning_rate,
                      neighborhood_function="gaussian", random_seed=self.seed,
                      decay_function="linear_decay_to_zero", sigma_decay_function="linear_decay_to_one")
        if xs.shape[1] >= 2:
            som.pca_weights_init(xs)
        else:
            som.random_weights_init(xs)
        som.train(xs, max(self.n_iter, 1), random_order=True)
        self.codebook = som.get_weights().reshape(self.n_cells, xs.shape[1]).astype(np.float64)
        return self

    def winners(self, x: np.ndarray, chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
        """Best-matching cell (int64) and Euclidean distance to it (standardised units)."""
        if self.codebook is None:
            raise RuntimeError("SOM.winners called before fit")
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.codebook.shape[1]:
            raise ValueError(f"SOM was trained on {self.codebook.shape[1]} features, got shape {x.shape}")
        cells = np.empty(len(x), dtype=np.int64)
        dist = np.empty(len(x), dtype=np.float64)
        w = self.codebook
        w2 = (w * w).sum(1)
        for i in range(0, len(x), chunk):
            xs = self.scaler.transform(x[i : i + chunk]).astype(np.float64)
            d2 = (xs * xs).sum(1, keepdims=True) - 2.0 * xs @ w.T + w2[None, :]
            c = np.argmin(d2, axis=1)
            cells[i : i + chunk] = c
            dist[i : i + chunk] = np.sqrt(np.clip(d2[np.arange(len(c)), c], 0.0, None))
        return cells, dist

    def to_dict(self) -> dict:
        return {"shape": list(self.shape), "n_iter": self.n_iter, "sigma": self.sigma,
                "learning_rate": self.learning_rate, "seed": self.seed, "scaler": self.scaler.to_dict(),
                "codebook": self.codebook}

    @classmethod
    def from_dict(cls, d: dict) -> "SOM":
        obj = cls(d["shape"], d["n_iter"], d["sigma"], d["learning_rate"], d["seed"])
        obj.scaler = Standardizer.from_dict(d["scaler"])
        obj.codebook = np.asarray(d["codebook"], dtype=np.float64)
        return obj


# ----------------------------------------------------------------- per-cell metrics


def residual_terms(zphot, ztrue, pit) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """dz = (zphot - ztrue)/(1 + ztrue), outlier indicator |dz| > 0.15, PCO indicator."""
    dz = pm.dz_norm(zphot, ztrue)
    return dz, pm.outlier_indicator(dz), pm.pco_indicator(pit)


def grouped_median(values: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    """Median of ``values`` within each group 0..n_groups-1 (NaN for empty groups); one sort."""
    values = np.asarray(values, dtype=np.float64)
    groups = np.asarray(groups, dtype=np.int64)
    order = np.lexsort((values, groups))
    vs = values[order]
    counts = np.bincount(groups, minlength=n_groups)
    starts = np.cumsum(counts) - counts
    out = np.full(n_groups, np.nan)
    nz = counts > 0
    lo = starts[nz] + (counts[nz] - 1) // 2
    hi = starts[nz] + counts[nz] // 2
    out[nz] = 0.5 * (vs[lo] + vs[hi])
    return out


def grouped_metrics(groups, n_groups, dz, outlier, pco) -> dict:
    """sigma_NMAD, bias, eta, PCO and count per group (NaN where empty)."""
    counts = np.bincount(groups, minlength=n_groups).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        eta = np.bincount(groups, weights=outlier, minlength=n_groups) / counts
        pcov = np.bincount(groups, weights=pco, minlength=n_groups) / counts
    return {
        "count": counts,
        "sigma_nmad": NMAD_FACTOR * grouped_median(np.abs(dz), groups, n_groups),
        "bias": grouped_median(dz, groups, n_groups),
        "eta": eta,
        "pco": pcov,
    }


def global_metrics(dz, outlier, pco) -> dict:
    return {"sigma_nmad": float(pm.nmad_of(dz, center=False)), "bias": float(np.median(dz)),
            "eta": float(np.mean(outlier)), "pco": float(np.mean(pco)), "count": int(len(dz))}


def _metrics_rows(dz_s, out_s, pco_s) -> dict:
    """Metrics along axis 1 of (B, n) samples."""
    return {"sigma_nmad": pm.nmad_of(dz_s, axis=1, center=False), "bias": np.median(dz_s, axis=1),
            "eta": out_s.mean(1), "pco": pco_s.mean(1)}


def cell_statistics(cells, n_cells: int, zphot, ztrue, pit, n_boot: int = 100, seed: int = 0) -> dict:
    """Per-cell metrics of a validation sample with bootstrap errors and null-noise levels.

    Returns a dict of (n_cells,) arrays: ``val_count``; for each metric ``m`` in
    :data:`METRICS`: ``m`` (NaN in empty cells), ``m_err`` (std of the metric over
    ``n_boot`` resamplings of the cell's own objects; 0 for one object) and ``m_null``
    (std of the global metric measured on ``n_boot`` random samples of the cell's size from
    the whole validation set); plus ``global`` (the metrics over all objects).
    """
    cells = np.asarray(cells, dtype=np.int64)
    dz, outl, pco = residual_terms(zphot, ztrue, pit)
    if len(dz) == 0:
        raise ValueError("cell_statistics: the validation sample is empty")
    rng = np.random.default_rng(seed)
    stats = grouped_metrics(cells, n_cells, dz, outl, pco)
    counts = stats.pop("count").astype(np.int64)
    out = {"val_count": counts, **stats, "global": global_metrics(dz, outl, pco)}
    # bootstrap within cells: resample positions inside each cell's block of the sorted order
    order = np.argsort(cells, kind="stable")
    cs = cells[order]
    starts = np.cumsum(counts) - counts
    boots = {m: np.empty((n_boot, n_cells)) for m in METRICS}
    for b in range(n_boot):
        pos = starts[cs] + np.floor(rng.random(len(cs)) * counts[cs]).astype(np.int64)
        idx = order[pos]
        g = grouped_metrics(cs, n_cells, dz[idx], outl[idx], pco[idx])
        for m in METRICS:
            boots[m][b] = g[m]
    for m in METRICS:
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # empty cells: all-NaN columns
            err = np.nanstd(boots[m], axis=0, ddof=1) if n_boot > 1 else np.zeros(n_cells)
        out[f"{m}_err"] = np.where(counts > 0, err, np.nan)
    # null noise: the global metric measured on random samples of the cell's size
    nulls = {m: np.full(n_cells, np.nan) for m in METRICS}
    for n in np.unique(counts[counts > 0]):
        sel = rng.integers(0, len(dz), size=(max(n_boot, 2), int(n)))
        rows = _metrics_rows(dz[sel], outl[sel], pco[sel])
        which = counts == n
        for m in METRICS:
            nulls[m][which] = np.std(rows[m], ddof=1)
    for m in METRICS:
        out[f"{m}_null"] = nulls[m]
    return out


def deviation_significance(stats: dict, metrics: Sequence[str] = METRICS) -> dict:
    """(cell - global) / null noise per metric; bias two-sided (absolute value)."""
    out = {}
    for m in metrics:
        if m not in METRICS:
            raise ValueError(f"Unknown SOM flag metric {m!r}; choose from {METRICS}")
        dev = stats[m] - stats["global"][m]
        if m == "bias":
            dev = np.abs(dev)
        null = stats[f"{m}_null"]
        with np.errstate(invalid="ignore", divide="ignore"):
            z = np.where(null > 0, dev / np.where(null > 0, null, 1.0), np.where(dev > 0, np.inf, 0.0))
        out[m] = np.where(np.isfinite(stats[m]), z, np.nan)
    return out


# ----------------------------------------------------------------- flag model


class SOMFlagModel:
    """A trained SOM, its per-cell counts/statistics and the flag thresholds.

    Build it with :meth:`build`; apply it with :meth:`flag`; store it with
    :meth:`to_dict` / :meth:`from_dict` (plain numpy arrays and scalars).
    """

    def __init__(self, som: SOM, features: list, train_count: np.ndarray, stats: dict, *,
                 dist_threshold: float, min_train_count: int, dist_quantile: float, min_val_count: int,
                 underperform_sigma: float, flag_metrics: Sequence[str], ref_count: np.ndarray | None = None):
        self.som = som
        self.features = list(features)
        self.train_count = np.asarray(train_count, dtype=np.int64)
        self.ref_count = None if ref_count is None else np.asarray(ref_count, dtype=np.int64)
        self.stats = stats
        self.dist_threshold = float(dist_threshold)
        self.min_train_count = int(min_train_count)
        self.dist_quantile = float(dist_quantile)
        self.min_val_count = int(min_val_count)
        self.underperform_sigma = float(underperform_sigma)
        self.flag_metrics = list(flag_metrics)
        self._derive()

    def _derive(self):
        sig = deviation_significance(self.stats, self.flag_metrics)
        self.significance = sig
        enough = self.stats["val_count"] >= self.min_val_count
        bad = np.zeros(self.som.n_cells, dtype=bool)
        for m in self.flag_metrics:
            bad |= enough & (np.nan_to_num(sig[m], nan=0.0) > self.underperform_sigma)
        self.cell_underperforming = bad
        self.cell_ood = self.train_count < self.min_train_count

    @classmethod
    def build(cls, features: list, x_som_train: np.ndarray, x_train: np.ndarray, x_val: np.ndarray,
              val_zphot, val_ztrue, val_pit, *, shape=(15, 15), n_iter=20000, sigma=0.0, learning_rate=0.5,
              seed=0, min_train_count=5, dist_quantile=0.999, min_val_count=10, underperform_sigma=3.0,
              flag_metrics=METRICS, n_boot=100, ref_is_train: bool = True) -> "SOMFlagModel":
        """Train the SOM on ``x_som_train`` (reference or training features), count the
        training sample ``x_train`` per cell, measure the validation sample per cell."""
        if not 0.0 < dist_quantile <= 1.0:
            raise ValueError(f"Option 'som_dist_quantile' must be in (0, 1], got {dist_quantile}")
        som = SOM(shape, n_iter, sigma, learning_rate, seed).fit(x_som_train)
        tc, td = som.winners(x_train)
        train_count = np.bincount(tc, minlength=som.n_cells)
        ref_count = None
        if not ref_is_train:
            rc, _ = som.winners(x_som_train)
            ref_count = np.bincount(rc, minlength=som.n_cells)
        dist_threshold = float(np.quantile(td, dist_quantile)) if dist_quantile < 1.0 else np.inf
        vc, _ = som.winners(x_val)
        stats = cell_statistics(vc, som.n_cells, val_zphot, val_ztrue, val_pit, n_boot=n_boot, seed=seed)
        return cls(som, features, train_count, stats, dist_threshold=dist_threshold,
                   min_train_count=min_train_count, dist_quantile=dist_quantile, min_val_count=min_val_count,
                   underperform_sigma=underperform_sigma, flag_metrics=flag_metrics, ref_count=ref_count)

    def flag(self, x: np.ndarray) -> dict:
        """Ancil columns for objects with SOM features ``x`` (N, F)."""
        cells, dist = self.som.winners(x)
        return {
            "som_cell": cells,
            "som_dist": dist,
            "som_train_count": self.train_count[cells],
            "flag_ood": self.cell_ood[cells] | (dist > self.dist_threshold),
            "flag_underperforming": self.cell_underperforming[cells],
        }

    def cell_table(self) -> dict:
        """Per-cell arrays (count, metrics, errors, significances, flags) for plots/tables."""
        out = {"cell": np.arange(self.som.n_cells), "train_count": self.train_count}
        if self.ref_count is not None:
            out["ref_count"] = self.ref_count
        for k, v in self.stats.items():
            if k != "global":
                out[k] = v
        for m, z in self.significance.items():
            out[f"{m}_sig"] = z
        out["ood"] = self.cell_ood
        out["underperforming"] = self.cell_underperforming
        return out

    def summary(self) -> dict:
        return {
            "n_cells": self.som.n_cells,
            "empty_train_cells": int((self.train_count == 0).sum()),
            "ood_cells": int(self.cell_ood.sum()),
            "underperforming_cells": int(self.cell_underperforming.sum()),
            "global": dict(self.stats["global"]),
            "dist_threshold": self.dist_threshold,
        }

    def to_dict(self) -> dict:
        return {
            "som": self.som.to_dict(), "features": self.features, "train_count": self.train_count,
            "ref_count": self.ref_count, "stats": self.stats, "dist_threshold": self.dist_threshold,
            "min_train_count": self.min_train_count, "dist_quantile": self.dist_quantile,
            "min_val_count": self.min_val_count, "underperform_sigma": self.underperform_sigma,
            "flag_metrics": self.flag_metrics,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "SOMFlagModel":
        return cls(SOM.from_dict(d["som"]), d["features"], d["train_count"], d["stats"],
                   dist_threshold=d["dist_threshold"], min_train_count=d["min_train_count"],
                   dist_quantile=d["dist_quantile"], min_val_count=d["min_val_count"],
                   underperform_sigma=d["underperform_sigma"], flag_metrics=d["flag_metrics"],
                   ref_count=d.get("ref_count"))
