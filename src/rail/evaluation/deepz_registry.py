"""Registry of the estimators the comparison harness knows how to train and run.

Each :class:`EstimatorSpec` names an informer/estimator pair by import path and says how
to configure it for a :class:`rail.deepz.datasets.Dataset`. The harness
(:mod:`rail.evaluation.deepz_compare`) and the benchmark scripts iterate over
:data:`ESTIMATORS`; a method module adds itself with :func:`register`.

``make_configs(dataset, quick)`` returns ``(inform_config, estimate_config)``; ``quick``
asks for a configuration that trains in seconds (tests, smoke runs), not a good model.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class EstimatorSpec:
    """How to run one estimator in a comparison.

    Attributes
    ----------
    key : str
        Short name used on the command line and in tables (``nnc``, ``flexzboost``...).
    label : str
        Human-readable name for tables and plots.
    informer, estimator : str
        ``"module:ClassName"`` import paths.
    make_configs : callable
        ``(dataset, quick) -> (inform_config, estimate_config)``.
    needs : tuple of str
        What the input table must hold: ``catalog`` (photometry), ``images``, ``embeddings``.
    baseline : bool
        True for the reference estimators (FlexZBoost, BPZ).
    """

    key: str
    label: str
    informer: str
    estimator: str
    make_configs: Callable
    needs: tuple = ("catalog",)
    baseline: bool = False
    extra: dict = field(default_factory=dict)

    @staticmethod
    def _load(path: str):
        mod, cls = path.split(":")
        return getattr(importlib.import_module(mod), cls)

    @property
    def informer_class(self):
        return self._load(self.informer)

    @property
    def estimator_class(self):
        return self._load(self.estimator)


ESTIMATORS: dict[str, EstimatorSpec] = {}


def register(spec: EstimatorSpec) -> EstimatorSpec:
    ESTIMATORS[spec.key] = spec
    return spec


def get(key: str) -> EstimatorSpec:
    if key not in ESTIMATORS:
        raise KeyError(f"Unknown estimator {key!r}; known: {sorted(ESTIMATORS)}")
    return ESTIMATORS[key]


# ---------------------------------------------------------------- built-in entries


def _nnc_configs(ds, quick=False):
    """NNC with the paper's settings, except on small training sets.

    The paper's batch 4096 / lr 5e-4 assume millions of objects; on DC2's 10k objects that
    is 3 optimiser steps per epoch. Below 100k training objects we use batch 1024 and
    lr 1e-3 (measured on DC2: best epoch 86 vs 120, sigma_NMAD 0.0202 vs 0.0212).
    """
    base = ds.catalog_config()
    inform = {k: base[k] for k in ("bands", "err_bands", "mag_limits", "redshift_col", "zmin", "zmax", "hdf5_groupname")}
    inform.update(progress=False)
    if len(ds.train[ds.redshift_col]) < 100_000:
        inform.update(batch_size=1024, lr=1e-3)
    if quick:
        inform.update(epochs=5, hidden_layers=[64, 32], nbins=100, batch_size=512)
    estimate = dict(hdf5_groupname="", id_col=ds.extra.get("id_col", "object_id"), redshift_col=ds.redshift_col,
                    zmin=ds.zmin, zmax=ds.zmax)
    return inform, estimate


register(EstimatorSpec(
    key="nnc",
    label="NNC (binned CRPS)",
    informer="rail.estimation.algos.deepz_nnc:DeepzNNCInformer",
    estimator="rail.estimation.algos.deepz_nnc:DeepzNNCEstimator",
    make_configs=_nnc_configs,
))


def _flexzboost_configs(ds, quick=False):
    base = ds.catalog_config()
    inform = {k: base[k] for k in ("bands", "err_bands", "mag_limits", "redshift_col", "zmin", "zmax", "ref_band", "hdf5_groupname")}
    # RAIL's default regression_params; trainfrac/bump/sharpen grid as in rail's examples
    inform.update(nzbins=301, trainfrac=0.75, max_basis=35, nondetect_val=99.0)
    if quick:
        inform.update(max_basis=10, nbump=3, nsharp=3, regression_params={"max_depth": 4, "objective": "reg:squarederror"})
    estimate = {k: base[k] for k in ("bands", "err_bands", "mag_limits", "ref_band", "hdf5_groupname", "zmin", "zmax")}
    estimate.update(nzbins=301, nondetect_val=99.0, id_col=ds.extra.get("id_col", "object_id"),
                    redshift_col=ds.redshift_col, qp_representation="interp")
    return inform, estimate


register(EstimatorSpec(
    key="flexzboost",
    label="FlexZBoost",
    informer="rail.estimation.algos.flexzboost:FlexZBoostInformer",
    estimator="rail.estimation.algos.flexzboost:FlexZBoostEstimator",
    make_configs=_flexzboost_configs,
    baseline=True,
))


def _bpz_configs(ds, quick=False):
    """BPZ (template fitting, CWWSB4 templates, HDFN prior) on DC2's LSST filters.

    desc-bpz / RAIL ship filter curves for DC2LSST, LSSTCam, ComCam, DECam, HSC, Euclid and
    Roman only -- no SDSS ugriz -- so BPZ is configured for DC2 only (EstimatorSpec.extra).
    """
    if ds.name != "dc2":
        raise ValueError(f"BPZ baseline is only configured for DC2 (no SDSS filter curves); got {ds.name!r}")
    base = ds.catalog_config()
    keys = ("bands", "err_bands", "mag_limits", "redshift_col", "zmin", "zmax", "ref_band", "hdf5_groupname")
    inform = {k: base[k] for k in keys}
    inform.update(nzbins=301, nondetect_val=99.0)
    estimate = {k: base[k] for k in keys}
    estimate.update(nzbins=301, nondetect_val=99.0, id_col=ds.extra.get("id_col", "object_id"),
                    filter_list=[f"DC2LSST_{b}" for b in "ugrizy"])
    return inform, estimate


register(EstimatorSpec(
    key="bpz",
    label="BPZ (template fit)",
    informer="rail.estimation.algos.bpz_lite:BPZliteInformer",
    estimator="rail.estimation.algos.bpz_lite:BPZliteEstimator",
    make_configs=_bpz_configs,
    baseline=True,
    extra={"datasets": ("dc2",)},
))


def _embed_configs(ds, quick=False):
    """Embedding MDN (autoencoder embeddings of mags + colours, 200 fixed Gaussians, CRPS) + SOM flags.

    The SOM grid is sized to the validation split (10% of the training set) so that cells
    hold ~20 validation objects on average (per-cell metrics need a few objects): 7x7 on
    DC2's 10k, 12x12 on BOSS's 25k, at most 20x20.
    """
    base = ds.catalog_config()
    inform = {k: base[k] for k in ("bands", "err_bands", "mag_limits", "redshift_col", "zmin", "zmax", "hdf5_groupname")}
    n_train = len(ds.train[ds.redshift_col])
    side = int(min(20, max(4, (0.1 * n_train / 20.0) ** 0.5)))
    inform.update(progress=False, som_shape=[side, side])
    if quick:
        inform.update(epochs=5, ae_epochs=3, hidden_layers=[32, 32, 32], ae_hidden=[32], som_shape=[5, 5],
                      som_iterations=2000, som_n_boot=20)
    # qp.mixmod with 200 components cannot be evaluated on a metric grid (qp allocates
    # N x 200 x grid floats: 1,000 objects x 3,001 points was killed for memory), so the
    # harness gets the PDFs sampled on a grid with spacing sigma / 2 (qp.interp).
    nz = int(2 * (ds.zmax - ds.zmin) / 0.0037) + 1
    estimate = dict(hdf5_groupname="", id_col=ds.extra.get("id_col", "object_id"), redshift_col=ds.redshift_col,
                    zmin=ds.zmin, zmax=ds.zmax, qp_representation="interp", nzbins=nz)
    return inform, estimate


register(EstimatorSpec(
    key="embed",
    label="Embedding MDN (fixed-grid CRPS) + SOM flags",
    informer="rail.estimation.algos.deepz_embed:DeepzEmbedInformer",
    estimator="rail.estimation.algos.deepz_embed:DeepzEmbedEstimator",
    make_configs=_embed_configs,
))


def _lstm_configs(ds, quick=False):
    """LSTM-MDN on wavelength-ordered band sequences (rail.estimation.algos.deepz_lstm).

    Band order from the data set's effective wavelengths; missing / non-detected bands are
    masked steps (missing_policy='mask', the stage default). The stage defaults are the
    choices documented in the module (measured on DC2); the harness gets qp.mixmod.
    """
    base = ds.catalog_config()
    inform = {k: base[k] for k in ("bands", "err_bands", "mag_limits", "redshift_col", "zmin", "zmax", "hdf5_groupname")}
    inform.update(progress=False, wavelengths=[float(w) for w in ds.wavelengths])
    if quick:
        inform.update(epochs=4, lstm_units=[16], dense_units=[16], n_components=5, batch_size=256)
    estimate = dict(hdf5_groupname="", id_col=ds.extra.get("id_col", "object_id"), redshift_col=ds.redshift_col,
                    zmin=ds.zmin, zmax=ds.zmax)
    return inform, estimate


register(EstimatorSpec(
    key="lstm",
    label="LSTM-MDN (band sequences)",
    informer="rail.estimation.algos.deepz_lstm:DeepzLSTMInformer",
    estimator="rail.estimation.algos.deepz_lstm:DeepzLSTMEstimator",
    make_configs=_lstm_configs,
))


def _cnn_configs(ds, quick=False):
    """Image CNN + catalog MDN ensemble (PICZL-like; rail.estimation.algos.deepz_cnn).

    Runs only on data sets whose tables carry an image column (``ds.extra['provides']``
    includes ``images``; column ``ds.extra['image_col']``, default ``images``, bands
    ``ds.extra['image_bands']``, default the catalog bands). For catalogs without pixels,
    ``rail.deepz.images.add_synthetic_stamps`` makes one. The harness gets qp.mixmod.
    """
    base = ds.catalog_config()
    inform = {k: base[k] for k in ("bands", "err_bands", "mag_limits", "redshift_col", "zmin", "zmax", "hdf5_groupname")}
    inform.update(progress=False, image_col=ds.extra.get("image_col", "images"),
                  image_bands=list(ds.extra.get("image_bands", ds.bands)))
    if quick:
        inform.update(epochs=3, n_members=2, n_components=3, conv_channels=[8, 16], dense_units=[16],
                      batch_size=128)
    estimate = dict(hdf5_groupname="", id_col=ds.extra.get("id_col", "object_id"), redshift_col=ds.redshift_col,
                    zmin=ds.zmin, zmax=ds.zmax)
    return inform, estimate


register(EstimatorSpec(
    key="cnn",
    label="Image CNN + GMM ensemble (PICZL-like)",
    informer="rail.estimation.algos.deepz_cnn:DeepzCNNInformer",
    estimator="rail.estimation.algos.deepz_cnn:DeepzCNNEstimator",
    make_configs=_cnn_configs,
    needs=("catalog", "images"),
))
