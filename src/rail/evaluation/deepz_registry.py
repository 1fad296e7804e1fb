"""Registry of the estimators the comparison harness knows how to train and run.

Each :class:`EstimatorSpec` names an informer/estimator pair by import path and holds, as
plain data, what the harness sets beyond the stage defaults:

* the options shared by every estimator of a data set (bands, error columns, limits,
  redshift column, grid, id column, non-detection marker...) in RAIL's shared-parameter
  vocabulary (:func:`shared_options`), passed only when the stage declares them;
* ``inform_options`` / ``estimate_options``: fixed per-estimator overrides (plain dicts);
* ``rules``: overrides that depend on the data set, each ``{"when": "n_train < N",
  "set": {...}, "why": "..."}`` (also plain data, listed by ``deepz-compare --list``);
* ``quick_inform`` / ``quick_estimate``: settings that train in seconds (tests, smoke runs);
* ``derive``: a function for the few options computed from the data set (the LSTM's band
  wavelengths, the SOM size, the embedding MDN's output grid), documented on the function.

The harness (:mod:`rail.evaluation.deepz_compare`) and the benchmark scripts iterate over
:data:`ESTIMATORS`; ``spec.make_configs(dataset, quick)`` returns ``(inform_config,
estimate_config)``. Any other RAIL estimator can be named by import path
(:func:`resolve`): ``pkg.module:SomethingInformer`` (the estimator class by RAIL's naming
convention, ``SomethingEstimator``) or ``pkg.module:Informer:Estimator``.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field, replace
from typing import Callable

#: the estimators' output grids (``nzbins`` on [zmin, zmax]): at least :data:`GRID_MIN_POINTS`
#: points and a spacing no coarser than :data:`GRID_DZ` (301 points on [0, 3], as RAIL's examples
#: use for FlexZBoost and BPZ; 301 on BOSS's [0, 1.2]; 401 on [0, 4]).
GRID_DZ = 0.01
GRID_MIN_POINTS = 301

#: the shared options the harness can set, in RAIL's shared-parameter vocabulary
SHARED_KEYS = ("bands", "err_bands", "mag_limits", "redshift_col", "zmin", "zmax", "nzbins", "ref_band",
               "hdf5_groupname", "id_col", "nondetect_val")
#: the catalog keys our own informers get (their estimators read bands etc. from the model)
_DEEP_INFORM = ("bands", "err_bands", "mag_limits", "redshift_col", "zmin", "zmax", "hdf5_groupname", "nondetect_val")
_DEEP_ESTIMATE = ("hdf5_groupname", "id_col", "redshift_col", "zmin", "zmax")


def nzbins_for(zmin: float, zmax: float) -> int:
    """Number of grid points on [zmin, zmax]: spacing at most :data:`GRID_DZ`, at least :data:`GRID_MIN_POINTS`."""
    return max(GRID_MIN_POINTS, int(round((zmax - zmin) / GRID_DZ)) + 1)


def shared_options(ds) -> dict:
    """The options every estimator of data set ``ds`` should agree on (RAIL's names)."""
    nd = ds.extra.get("nondetect_val", 99.0)
    return dict(
        bands=list(ds.bands), err_bands=list(ds.err_bands), mag_limits=dict(ds.mag_limits),
        redshift_col=ds.redshift_col, zmin=float(ds.zmin), zmax=float(ds.zmax),
        nzbins=nzbins_for(ds.zmin, ds.zmax), ref_band=ds.ref_band, hdf5_groupname="",
        id_col=ds.extra.get("id_col") or "object_id", nondetect_val=nd,
    )


#: per-band options whose RAIL defaults have one entry per DC2 band (6): resized to the data set's
#: band count with the same value when it differs (BPZ's zp_errors 0.1 mag / zp_offsets 0, GPz's
#: replace_error_vals)
PER_BAND_KEYS = ("zp_errors", "zp_offsets", "replace_error_vals")


def _per_band_defaults(cls, nbands: int) -> dict:
    from ceci.config import StageParameter
    from rail.core.common_params import SHARED_PARAMS

    out = {}
    for key in PER_BAND_KEYS:
        if not _declared(cls, key):
            continue
        opt = cls.config_options[key]
        default = opt.default if isinstance(opt, StageParameter) else SHARED_PARAMS[key]
        if isinstance(default, (list, tuple)) and default and len(default) != nbands:
            out[key] = [default[0]] * nbands
    return out


def _declared(cls, key) -> bool:
    return key in getattr(cls, "config_options", {})


def _fit_option(cls, key, value):
    """A shared value in the form the stage declares (RAIL's nondetect_val is one float; ours takes a list)."""
    if key == "nondetect_val" and isinstance(value, (list, tuple)):
        from ceci.config import StageParameter

        opt = cls.config_options[key]  # a StageParameter, or RAIL's SHARED_PARAMS (a float option)
        if not (isinstance(opt, StageParameter) and opt.dtype in (list, None)):
            return float(value[0])
    return value


_WHEN = re.compile(r"^\s*(n_train|n_test)\s*(<|<=|>|>=)\s*([0-9_.eE+]+)\s*$")


def _applies(when: str, ds) -> bool:
    m = _WHEN.match(when)
    if not m:
        raise ValueError(f"registry rule condition {when!r} is not 'n_train|n_test <op> number'")
    n = len(next(iter((ds.train if m.group(1) == "n_train" else ds.test).values())))
    lim = float(m.group(3))
    return {"<": n < lim, "<=": n <= lim, ">": n > lim, ">=": n >= lim}[m.group(2)]


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
    inform_options, estimate_options : dict
        Fixed overrides of the stage defaults.
    rules : list of dict
        Data-dependent overrides: ``{"when": "n_train < 100000", "set": {...}, "why": "..."}``.
    quick_inform, quick_estimate : dict
        Overrides for ``quick=True`` (seconds, not a good model).
    shared_inform, shared_estimate : tuple of str or None
        Which :func:`shared_options` to pass; None = all that the stage declares.
    derive : callable or None
        ``(ds, quick) -> (inform_extra, estimate_extra)`` for options computed from the data set.
    needs : tuple of str
        What the data set must provide: ``catalog`` (photometry), ``images``, ``embeddings``,
        ``bpz_filters`` (BPZ filter curve names for its bands).
    baseline : bool
        True for the reference estimators (FlexZBoost, BPZ, the peer RAIL estimators).
    in_all : bool
        Run by ``--estimators all`` (the peer RAIL estimators are opt-in: ``all,peers``).
    """

    key: str
    label: str
    informer: str
    estimator: str
    inform_options: dict = field(default_factory=dict)
    estimate_options: dict = field(default_factory=dict)
    rules: list = field(default_factory=list)
    quick_inform: dict = field(default_factory=dict)
    quick_estimate: dict = field(default_factory=dict)
    shared_inform: tuple | None = None
    shared_estimate: tuple | None = None
    derive: Callable | None = None
    needs: tuple = ("catalog",)
    baseline: bool = False
    in_all: bool = True
    package: str = ""
    extra: dict = field(default_factory=dict)

    @staticmethod
    def _load(path: str):
        mod, cls = path.split(":")
        try:
            module = importlib.import_module(mod)
        except ImportError as err:
            raise ImportError(f"cannot import {mod!r} for {path!r}: {err}") from err
        if not hasattr(module, cls):
            raise ImportError(f"module {mod!r} has no class {cls!r}")
        return getattr(module, cls)

    @property
    def informer_class(self):
        return self._load(self.informer)

    @property
    def estimator_class(self):
        return self._load(self.estimator)

    def available(self) -> str | None:
        """Reason the stages cannot be imported here (package not installed), or None."""
        try:
            self.informer_class, self.estimator_class
        except ImportError as err:
            hint = f" (pip install {self.package})" if self.package else ""
            return f"{err}{hint}"
        return None

    def make_configs(self, ds, quick: bool = False) -> tuple[dict, dict]:
        """``(inform_config, estimate_config)`` for data set ``ds``."""
        shared = shared_options(ds)
        out = []
        for cls, keys, fixed, quick_opts in (
            (self.informer_class, self.shared_inform, self.inform_options, self.quick_inform),
            (self.estimator_class, self.shared_estimate, self.estimate_options, self.quick_estimate),
        ):
            keys = SHARED_KEYS if keys is None else keys
            cfg = {k: _fit_option(cls, k, shared[k]) for k in keys if _declared(cls, k)}
            cfg.update(_per_band_defaults(cls, len(ds.bands)))
            cfg.update(fixed)
            out.append(cfg)
        inform, estimate = out
        for rule in self.rules:
            if _applies(rule["when"], ds):
                inform.update(rule.get("set", {}))
                estimate.update(rule.get("set_estimate", {}))
        if self.derive is not None:
            di, de = self.derive(ds, quick)
            inform.update(di)
            estimate.update(de)
        if quick:
            inform.update(self.quick_inform)
            estimate.update(self.quick_estimate)
        return inform, estimate

    def describe(self) -> str:
        """One paragraph: the stages and every override the harness makes (for --list / README)."""
        lines = [f"{self.key}: {self.label}  [{self.informer} / {self.estimator.split(':')[1]}]"]
        if self.inform_options:
            lines.append(f"    inform options: {self.inform_options}")
        if self.estimate_options:
            lines.append(f"    estimate options: {self.estimate_options}")
        for r in self.rules:
            lines.append(f"    when {r['when']}: {r.get('set', {})}  ({r.get('why', '')})")
        if self.derive is not None and self.derive.__doc__:
            lines.append("    derived: " + " ".join(self.derive.__doc__.split()))
        if self.quick_inform or self.quick_estimate:
            lines.append(f"    --quick: {dict(self.quick_inform, **self.quick_estimate)}")
        if not self.in_all:
            lines.append("    opt-in (not in 'all'; use 'peers' or name it)")
        return "\n".join(lines)


ESTIMATORS: dict[str, EstimatorSpec] = {}


def register(spec: EstimatorSpec) -> EstimatorSpec:
    ESTIMATORS[spec.key] = spec
    return spec


def get(key: str) -> EstimatorSpec:
    if key not in ESTIMATORS:
        raise KeyError(f"Unknown estimator {key!r}; known: {sorted(ESTIMATORS)}, or give an import path "
                       "'pkg.module:SomethingInformer' (or 'pkg.module:Informer:Estimator')")
    return ESTIMATORS[key]


def resolve(name: str) -> EstimatorSpec:
    """A registered key, or an import path ``pkg.module:XInformer[:XEstimator]`` (any RAIL estimator).

    For an import path the estimator class follows RAIL's naming convention (``...Informer``
    -> ``...Estimator`` in the same module) unless given; every shared option the stages
    declare is passed, no other override.
    """
    if ":" not in name:
        return get(name)
    parts = name.split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"estimator {name!r}: expected 'pkg.module:InformerClass' or "
                         "'pkg.module:InformerClass:EstimatorClass'")
    mod, inf = parts[0], parts[1]
    if len(parts) == 3:
        est = parts[2]
    elif inf.endswith("Informer"):
        est = inf[: -len("Informer")] + "Estimator"
    else:
        raise ValueError(f"estimator {name!r}: cannot derive the estimator class from {inf!r} (RAIL's "
                         "convention is XInformer / XEstimator); give 'module:Informer:Estimator'")
    key = re.sub(r"informer$", "", inf.lower()) or inf.lower()
    spec = EstimatorSpec(key=key, label=inf[: -len("Informer")] if inf.endswith("Informer") else inf,
                         informer=f"{mod}:{inf}", estimator=f"{mod}:{est}", baseline=True)
    why = spec.available()
    if why:
        raise ImportError(f"estimator {name!r}: {why}")
    return spec


# ----------------------------------------------------------------- built-in entries: this package

register(EstimatorSpec(
    key="nnc",
    label="NNC (binned CRPS)",
    informer="rail.estimation.algos.deepz_nnc:DeepzNNCInformer",
    estimator="rail.estimation.algos.deepz_nnc:DeepzNNCEstimator",
    shared_inform=_DEEP_INFORM,
    shared_estimate=_DEEP_ESTIMATE,
    # batch_size / lr: the stage's automatic defaults (1024 / 1e-3 under 100k objects)
    quick_inform=dict(epochs=5, hidden_layers=[64, 32], nbins=100, batch_size=512),
))

register(EstimatorSpec(
    key="flexzboost",
    label="FlexZBoost",
    informer="rail.estimation.algos.flexzboost:FlexZBoostInformer",
    estimator="rail.estimation.algos.flexzboost:FlexZBoostEstimator",
    # RAIL's default regression_params; trainfrac/bump/sharpen grid as in rail's examples
    shared_inform=("bands", "err_bands", "mag_limits", "redshift_col", "zmin", "zmax", "ref_band",
                   "hdf5_groupname", "nzbins", "nondetect_val"),
    shared_estimate=("bands", "err_bands", "mag_limits", "ref_band", "hdf5_groupname", "zmin", "zmax", "nzbins",
                     "nondetect_val", "id_col", "redshift_col"),
    inform_options=dict(trainfrac=0.75, max_basis=35),
    estimate_options=dict(qp_representation="interp"),
    quick_inform=dict(max_basis=10, nbump=3, nsharp=3, regression_params={"max_depth": 4,
                                                                          "objective": "reg:squarederror"}),
    baseline=True,
))


def _bpz_derive(ds, quick=False):
    """BPZ filter_list: the data set's filter curves (from LSST/DECam/HSC band names, or --bpz-filters)."""
    filters = ds.extra.get("bpz_filters")
    if not filters:
        raise ValueError(f"BPZ needs a filter curve for each band of {ds.name!r} ({ds.bands}): give --bpz-filters")
    return {}, {"filter_list": list(filters)}


register(EstimatorSpec(
    key="bpz",
    label="BPZ (template fit)",
    informer="rail.estimation.algos.bpz_lite:BPZliteInformer",
    estimator="rail.estimation.algos.bpz_lite:BPZliteEstimator",
    # BPZ (template fitting, CWWSB4 templates, HDFN prior) with the filter curves RAIL ships
    # (DC2LSST, LSSTCam, ComCam, DECam, HSC, Euclid, Roman: no SDSS ugriz)
    shared_inform=("bands", "err_bands", "mag_limits", "redshift_col", "zmin", "zmax", "ref_band",
                   "hdf5_groupname", "nzbins", "nondetect_val"),
    shared_estimate=("bands", "err_bands", "mag_limits", "redshift_col", "zmin", "zmax", "ref_band",
                     "hdf5_groupname", "nzbins", "nondetect_val", "id_col"),
    derive=_bpz_derive,
    needs=("catalog", "bpz_filters"),
    baseline=True,
))


def _embed_derive(ds, quick=False):
    """Output PDFs sampled on a grid of spacing 0.00185 = 0.0037 / 2 (qp.interp; at most 0.62 x the default width,
    0.0030 on [0, 1.2]; the SOM side is the stage's automatic default)."""
    # qp.mixmod with 200 components cannot be evaluated on a metric grid (qp allocates
    # N x 200 x grid floats: 1,000 objects x 3,001 points was killed for memory), so the
    # harness gets the PDFs sampled on a grid with spacing sigma / 2 (qp.interp).
    nz = int(2 * (ds.zmax - ds.zmin) / 0.0037) + 1
    return {}, {"qp_representation": "interp", "nzbins": nz}


register(EstimatorSpec(
    key="embed",
    label="Embedding MDN (fixed-grid CRPS) + SOM flags",
    informer="rail.estimation.algos.deepz_embed:DeepzEmbedInformer",
    estimator="rail.estimation.algos.deepz_embed:DeepzEmbedEstimator",
    shared_inform=_DEEP_INFORM,
    shared_estimate=_DEEP_ESTIMATE,
    derive=_embed_derive,
    quick_inform=dict(epochs=5, ae_epochs=3, hidden_layers=[32, 32, 32], ae_hidden=[32], som_shape=[5, 5],
                      som_iterations=2000, som_n_boot=20),
))


def _lstm_derive(ds, quick=False):
    """LSTM band order: the data set's effective wavelengths (from band names, given, or band order)."""
    return {"wavelengths": [float(w) for w in ds.wavelengths]}, {}


register(EstimatorSpec(
    key="lstm",
    label="LSTM-MDN (band sequences)",
    informer="rail.estimation.algos.deepz_lstm:DeepzLSTMInformer",
    estimator="rail.estimation.algos.deepz_lstm:DeepzLSTMEstimator",
    shared_inform=_DEEP_INFORM,
    shared_estimate=_DEEP_ESTIMATE,
    derive=_lstm_derive,
    quick_inform=dict(epochs=4, lstm_units=[16], dense_units=[16], n_components=5, batch_size=256),
))


def _cnn_derive(ds, quick=False):
    """Image column and bands: ds.extra['image_col'] (default 'images'), ['image_bands'] (default the bands)."""
    return {"image_col": ds.extra.get("image_col", "images"),
            "image_bands": list(ds.extra.get("image_bands", ds.bands))}, {}


register(EstimatorSpec(
    key="cnn",
    label="Image CNN + GMM ensemble (PICZL-like)",
    informer="rail.estimation.algos.deepz_cnn:DeepzCNNInformer",
    estimator="rail.estimation.algos.deepz_cnn:DeepzCNNEstimator",
    shared_inform=_DEEP_INFORM,
    shared_estimate=_DEEP_ESTIMATE,
    derive=_cnn_derive,
    quick_inform=dict(epochs=3, n_members=2, n_components=3, conv_channels=[8, 16], dense_units=[16],
                      batch_size=128),
    needs=("catalog", "images"),
))

# ----------------------------------------------------------------- deep ensembles (opt-in)


def variant(base: str, key: str, what: str, **inform) -> EstimatorSpec:
    """Register ``key``: the entry ``base`` with the inform options given (opt-in: by key, or
    ``--estimators ensembles`` for the deep ensembles ``<base>_x<M>``)."""
    spec = get(base)
    quick = {k: (2 if k == "n_members" else v) for k, v in inform.items()}
    return register(replace(spec, key=key, label=f"{spec.label}, {what}",
                            inform_options={**spec.inform_options, **inform},
                            quick_inform={**spec.quick_inform, **quick}, in_all=False,
                            extra={**spec.extra, "variant_of": base}))


for _base in ("nnc", "lstm", "embed"):
    for _m in (3, 5):
        variant(_base, f"{_base}_x{_m}", f"deep ensemble of {_m}", n_members=_m)
    variant(_base, f"{_base}_aug", "error-aware augmentation", augment_errors=True)
    variant(_base, f"{_base}_x3_aug", "deep ensemble of 3 + error-aware augmentation", n_members=3,
            augment_errors=True)
variant("embed", "embed_x3_widthcal", "deep ensemble of 3 + pooled width calibration", n_members=3,
        width_calibration="pit_ks")
variant("embed", "embed_x3_tempcal", "deep ensemble of 3 + temperature of the pooled weights", n_members=3,
        width_calibration="temperature")
# band dropout (default 0.1) buys graceful degradation when bands are missing at estimate time and costs ~0.001
# in full-band sigma_IQR on DC2 (benchmarks/results/ablations_lstm.md); for catalogues without missing bands
variant("lstm", "lstm_bd0", "no band dropout (the paper's setting)", band_dropout=0.0)
variant("lstm", "lstm_x3_bd0", "deep ensemble of 3, no band dropout", n_members=3, band_dropout=0.0)

# ----------------------------------------------------------------- peers: other RAIL estimators
# Stage defaults throughout (the harness runs what users get); only the shared options are set.
# Opt-in: `--estimators all,peers` or by key. Installed by this package's `peers` extra.


def _peer(key: str, package: str, path: str, **kw) -> EstimatorSpec:
    """A peer entry: ``path`` = ``module:Stem`` for RAIL's ``StemInformer`` / ``StemEstimator``."""
    mod, stem = path.split(":")
    return register(EstimatorSpec(
        key=key, label=f"{key.upper()} ({package})", package=package, informer=f"{mod}:{stem}Informer",
        estimator=f"{mod}:{stem}Estimator", baseline=True, in_all=False, **kw))


_peer("knn", "pz-rail-sklearn", "rail.estimation.algos.k_nearneigh:KNearNeigh")
_peer("dnf", "pz-rail-dnf", "rail.estimation.algos.dnf:DNF")
_peer("gpz", "pz-rail-gpz-v1", "rail.estimation.algos.gpz:GPz", quick_inform=dict(n_basis=10, max_iter=20))
_peer("cmnn", "pz-rail-cmnn", "rail.estimation.algos.cmnn:CMNN")

#: keys selected by the words of ``--estimators``
GROUPS = {
    "all": lambda: [k for k, s in ESTIMATORS.items() if s.in_all],
    "peers": lambda: [k for k, s in ESTIMATORS.items() if not s.in_all and s.baseline],
    "ensembles": lambda: [k for k, s in ESTIMATORS.items() if re.fullmatch(r"\w+_x\d+", k) and not s.in_all],
}
