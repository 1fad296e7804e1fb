"""Scene-level evaluation: detection completeness / purity and photo-z metrics split by blending.

Used by ``benchmarks/scenes.py`` to compare the scene estimator
(:mod:`rail.estimation.algos.deepz_scene`) with catalog estimators run on ``sep``
photometry of the same pixels (:func:`rail.deepz.scenes.sep_photometry`). Photo-z metrics
are those of :mod:`rail.evaluation.deepz_metrics` (per-object quantities from
:class:`~rail.evaluation.deepz_metrics.MetricAccumulator`, summaries from
:func:`~rail.evaluation.deepz_metrics.summarize_group`), with bootstrap intervals over
objects.

Blending classes (truth blendedness ``b``, :mod:`rail.deepz.scenes`): isolated
``b < ISOLATED_MAX``, mildly blended ``ISOLATED_MAX <= b < 0.2``, blended ``b >= 0.2``.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import qp

from rail.evaluation.deepz_metrics import MetricAccumulator, MetricConfig, summarize_group

ISOLATED_MAX = 0.01
BLENDED_MIN = 0.2
BLEND_CLASSES = ("isolated", "mild", "blended")
#: metrics reported per blending class (names of :func:`summarize_group`)
REPORTED = ("sigma_nmad", "rail_sigma_iqr", "eta", "rail_outlier_rate", "bias_median", "crps", "cde_loss", "pit_ks")


def blend_class(blendedness) -> np.ndarray:
    """'isolated' / 'mild' / 'blended' per object (see the module docstring)."""
    b = np.asarray(blendedness, dtype=np.float64)
    return np.where(b < ISOLATED_MAX, "isolated", np.where(b < BLENDED_MIN, "mild", "blended"))


def detection_metrics(truth: Mapping, det_to_truth, select=None, mag_col: str = "mag_i_lsst",
                      mag_edges=(16.0, 22.0, 23.0, 24.0, 24.5, 25.0, 25.3),
                      blend_edges=(0.0, ISOLATED_MAX, 0.1, BLENDED_MIN, 0.5, 1.0 + 1e-9)) -> dict:
    """Completeness of the truth objects in ``select`` (default: gold) and purity of detections.

    ``det_to_truth``: for each detection the matched truth row (-1: none). Purity =
    matched detections / detections (a detection of a background object counts as real).
    Completeness is given overall, per blending class and in bins of ``mag_col`` and of
    blendedness, with the counts.
    """
    d2t = np.asarray(det_to_truth, dtype=np.int64)
    nt = len(truth["x"])
    sel = np.asarray(truth["gold"], bool) if select is None else np.asarray(select, bool)
    found = np.zeros(nt, bool)
    found[d2t[d2t >= 0]] = True
    out = {"n_detections": int(d2t.size), "purity": float(np.mean(d2t >= 0)) if d2t.size else float("nan"),
           "n_selected": int(sel.sum()), "completeness": float(found[sel].mean()) if sel.any() else float("nan")}
    cls = blend_class(truth["blendedness"])
    for c in BLEND_CLASSES:
        m = sel & (cls == c)
        out[f"completeness_{c}"] = float(found[m].mean()) if m.any() else float("nan")
        out[f"n_{c}"] = int(m.sum())

    def binned(values, edges):
        idx = np.digitize(values, edges) - 1
        rows = []
        for k in range(len(edges) - 1):
            m = sel & (idx == k)
            rows.append({"lo": float(edges[k]), "hi": float(edges[k + 1]), "n": int(m.sum()),
                         "completeness": float(found[m].mean()) if m.any() else float("nan")})
        return rows

    out["vs_mag"] = binned(np.asarray(truth[mag_col], dtype=np.float64), np.asarray(mag_edges))
    out["vs_blendedness"] = binned(np.asarray(truth["blendedness"], dtype=np.float64), np.asarray(blend_edges))
    return out


def per_object_quantities(ens: qp.Ensemble, ztrue, zmin: float, zmax: float) -> dict:
    """Per-object metric inputs (zphot = ancil zmode, PIT, CRPS, CDE terms, Brier)."""
    acc = MetricAccumulator(MetricConfig.for_range(zmin, zmax), per_object=True)
    acc.add(ens, ztrue)
    return acc.per_object()


def bootstrap_summary(po: Mapping, rows, n_boot: int = 100, seed: int = 0,
                      metrics=REPORTED, level: float = 0.68) -> dict:
    """Metrics of the objects ``rows`` of per-object arrays ``po`` and their bootstrap intervals.

    Returns ``{metric: {"value", "lo", "hi"}}`` (central ``level`` interval of ``n_boot``
    resamples of the objects with replacement) plus ``n``.
    """
    rows = np.asarray(rows, dtype=np.int64)
    sub = {k: np.asarray(v)[rows] for k, v in po.items()}
    out: dict = {"n": int(rows.size)}
    if rows.size == 0:
        return out | {m: {"value": float("nan"), "lo": float("nan"), "hi": float("nan")} for m in metrics}
    value = summarize_group(sub)
    rng = np.random.default_rng(seed)
    boots = {m: [] for m in metrics}
    for _ in range(n_boot):
        pick = rng.integers(0, rows.size, rows.size)
        s = summarize_group({k: v[pick] for k, v in sub.items()})
        for m in metrics:
            boots[m].append(s[m])
    q = [(1 - level) / 2, 1 - (1 - level) / 2]
    for m in metrics:
        b = np.asarray(boots[m], dtype=np.float64)
        lo, hi = np.nanquantile(b, q) if np.isfinite(b).any() else (float("nan"), float("nan"))
        out[m] = {"value": float(value[m]), "lo": float(lo), "hi": float(hi)}
    return out


def photoz_by_blending(po: Mapping, blendedness, rows=None, n_boot: int = 100, seed: int = 0) -> dict:
    """:func:`bootstrap_summary` for all ``rows`` (default: every object) and per blending class."""
    b = np.asarray(blendedness, dtype=np.float64)
    rows = np.arange(b.size) if rows is None else np.asarray(rows, dtype=np.int64)
    cls = blend_class(b[rows])
    out = {"all": bootstrap_summary(po, rows, n_boot, seed)}
    for c in BLEND_CLASSES:
        out[c] = bootstrap_summary(po, rows[cls == c], n_boot, seed)
    return out
