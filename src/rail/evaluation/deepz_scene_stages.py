"""ceci stages around the scene estimator: the scene simulator and the scene evaluator.

* :class:`DeepzSceneSimulator` runs :func:`rail.deepz.scenes.simulate_scenes` on a catalog
  (any table with the magnitude and redshift columns; in the example pipeline a DC2 file of
  pz-rail-base) and writes the scene table (``output``) and the truth table (``truth``).
* :class:`DeepzSceneEvaluator` scores a :class:`~rail.estimation.algos.deepz_scene.DeepzSceneEstimator`
  output against a truth table: detection completeness / purity and photo-z metrics of the
  matched gold objects per blending class, with bootstrap intervals
  (:mod:`rail.evaluation.deepz_scene_metrics`), as a tidy table.

Together with the informer and estimator they make the pipeline
``simulate -> inform -> estimate -> evaluate`` of ``examples/scene_dc2.yml``. The scenes
are simulations with the simplifications listed in :mod:`rail.deepz.scenes`: metrics of such a
pipeline measure the method on those scenes, not on survey images.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from rail.core.data import Hdf5Handle, QPHandle, TableHandle
from rail.core.stage import RailStage

from rail.deepz.scenes import (
    PROFILES,
    PSFS,
    SIZE_LAWS,
    SceneConfig,
    SceneInputError,
    match_positions,
    simulate_scenes,
    truth_columns,
)
from rail.deepz.stages import (
    NON_NEGATIVE,
    POSITIVE,
    CheckedOptions,
    Option,
    bound,
    check_output_paths,
    in_range,
    one_of,
    table_to_numpy_dict,
    validate_config_keys,
    validate_options,
)
from rail.evaluation.deepz_scene_metrics import (
    BLEND_CLASSES,
    REPORTED,
    detection_metrics,
    per_object_quantities,
    photoz_by_blending,
)

_DEFAULT = SceneConfig()


def _pair(check):
    """A two-element [min, max] list option whose elements pass ``check``."""
    def check_pair(name, value):
        if len(value) != 2:
            raise ValueError(f"Option {name!r}={list(value)} must be [min, max]")
        for i, v in enumerate(value):
            check(f"{name}[{i}]", v)
        if value[0] > value[1]:
            raise ValueError(f"Option {name!r}={list(value)}: min > max")
    return check_pair


def _per_band(check):
    def check_dict(name, value):
        for band, v in dict(value).items():
            check(f"{name}[{band!r}]", v)
    return check_dict


class DeepzSceneSimulator(CheckedOptions, RailStage):
    """Draw multi-band scenes from a catalog with GalSim (:func:`rail.deepz.scenes.simulate_scenes`).

    Outputs: ``output``, the scene table (``images`` (N, C, H, W) float32 nJy per pixel,
    ``psf_fwhm``, ``noise_sigma``, ``pixel_scale``, ``scene_id``), and ``truth``, one row per
    drawn object (position, box, footprint, redshift, magnitudes, gold flag, blendedness; see
    :mod:`rail.deepz.scenes`). The model of a scene and the meaning of every option are those
    of :class:`rail.deepz.scenes.SceneConfig`; everything follows from ``seed``.
    """

    name = "DeepzSceneSimulator"
    entrypoint_function = "simulate"
    interactive_function = "deepz_scene_simulator"
    config_options = RailStage.config_options.copy()
    config_options.update(
        n_scenes=Option(int, 100, msg="number of scenes to draw", check=bound(">=", 1)),
        size=Option(int, _DEFAULT.size, msg="scene side in pixels (square scenes)", check=bound(">=", 8)),
        pixel_scale=Option(float, _DEFAULT.pixel_scale, msg="arcsec per pixel (LSST: 0.2)", check=POSITIVE),
        bands=Option(str, _DEFAULT.bands, msg="band letters, in image-channel order"),
        mag_cols=Option(str, _DEFAULT.mag_cols, msg="catalog magnitude columns (AB), '{band}' replaced by the letter"),
        redshift_col=Option(str, _DEFAULT.redshift_col, msg="catalog redshift column"),
        detection_band=Option(str, _DEFAULT.detection_band, msg="band of the truth footprints and blendedness"),
        n_objects=Option(list, list(_DEFAULT.n_objects), msg="[min, max] catalog objects per scene (uniform)",
                         check=_pair(bound(">=", 1))),
        n_background=Option(list, list(_DEFAULT.n_background), msg="[min, max] faint background objects per scene",
                            check=_pair(NON_NEGATIVE)),
        background_mag=Option(list, list(_DEFAULT.background_mag), msg="[min, max] i magnitude (AB) of the "
                              "background objects", check=_pair(POSITIVE)),
        pair_fraction=Option(float, _DEFAULT.pair_fraction, msg="share of objects placed close to an earlier "
                             "object of the scene", check=in_range(0.0, 1.0, "both")),
        pair_separation=Option(list, list(_DEFAULT.pair_separation), msg="[min, max] separation (arcsec) of "
                               "those pairs", check=_pair(POSITIVE)),
        margin=Option(float, _DEFAULT.margin, msg="centres are kept this many pixels inside the edges",
                      check=NON_NEGATIVE),
        size_law=Option(str, _DEFAULT.size_law, msg="'magnitude' (default) or 'shuffled' (control: sizes "
                        "independent of magnitude and redshift)", check=one_of(*SIZE_LAWS)),
        profile=Option(str, _DEFAULT.profile, msg="galaxy profile: 'bulge_disk' or 'sersic'",
                       check=one_of(*PROFILES)),
        psf=Option(str, _DEFAULT.psf, msg="PSF model: 'moffat' or 'kolmogorov'", check=one_of(*PSFS)),
        psf_fwhm=Option(dict, {}, msg="PSF FWHM (arcsec) per band letter; {} = 0.80 arcsec in i scaled as "
                        "wavelength^-1/5", check=_per_band(POSITIVE)),
        depths=Option(dict, {}, msg="5-sigma point-source depth (AB) per band letter; {} = LSST 10-year",
                      check=_per_band(POSITIVE)),
        footprint_nsigma=Option(float, _DEFAULT.footprint_nsigma, msg="footprint threshold in units of the "
                                "detection band's pixel noise", check=POSITIVE),
        seed=Option(int, 0, msg="seed of everything drawn (catalog rows, positions, shapes, noise)"),
        hdf5_groupname=Option(str, "", msg="group of the catalog in its HDF5 file ('' = top level)"),
    )
    inputs = [("input", TableHandle)]
    outputs = [("output", Hdf5Handle), ("truth", Hdf5Handle)]

    def __init__(self, args, **kwargs):
        super().__init__(args, **kwargs)
        validate_config_keys(self)
        validate_options(self)
        self.scene_config().validate()  # cross-option checks (margin vs size, bands vs PSF/depths)

    def scene_config(self) -> SceneConfig:
        """The :class:`~rail.deepz.scenes.SceneConfig` of this stage's options."""
        c = self.config
        psf = dict(c.psf_fwhm) if c.psf_fwhm else _DEFAULT.psf_fwhm
        depths = dict(c.depths) if c.depths else _DEFAULT.depths
        return SceneConfig(
            size=int(c.size), pixel_scale=float(c.pixel_scale), bands=str(c.bands), mag_cols=str(c.mag_cols),
            redshift_col=str(c.redshift_col), detection_band=str(c.detection_band),
            n_objects=tuple(int(v) for v in c.n_objects), n_background=tuple(int(v) for v in c.n_background),
            background_mag=tuple(float(v) for v in c.background_mag), pair_fraction=float(c.pair_fraction),
            pair_separation=tuple(float(v) for v in c.pair_separation), margin=float(c.margin),
            size_law=str(c.size_law), profile=str(c.profile), psf=str(c.psf), psf_fwhm=psf, depths=depths,
            footprint_nsigma=float(c.footprint_nsigma), seed=int(c.seed),
        )

    def simulate(self, catalog):
        """Draw the scenes from ``catalog`` (table or handle); returns {"output": scene handle, "truth": truth handle}."""
        self.set_data("input", catalog)
        self.run()
        self.finalize()
        return {"output": self.get_handle("output"), "truth": self.get_handle("truth")}

    def run(self):
        check_output_paths(self)
        catalog = table_to_numpy_dict(self, self.get_data("input"), self.config.hdf5_groupname)
        scenes, truth = simulate_scenes(catalog, int(self.config.n_scenes), self.scene_config())
        self.add_data("output", scenes)
        self.add_data("truth", truth)


#: truth columns the evaluator reads (the footprints are not needed)
_EVAL_TRUTH = ("scene_id", "x", "y", "gold", "blendedness")


def _read_columns(handle, columns) -> dict:
    """Only ``columns`` of a table handle (an HDF5 file is read column by column: the truth
    table's footprints, (M, H, W), are never loaded)."""
    if handle.data is None and handle.path not in (None, "None", "none", ""):
        import h5py

        with h5py.File(handle.path, "r") as f:
            missing = [c for c in columns if c not in f]
            if missing:
                raise SceneInputError(f"Truth table {handle.path} lacks column(s) {missing}")
            return {c: f[c][()] for c in columns}
    data = handle.data
    if not isinstance(data, Mapping):
        import tables_io

        data = tables_io.convert(data, tables_io.types.NUMPY_DICT)
    missing = [c for c in columns if c not in data]
    if missing:
        raise SceneInputError(f"Truth table lacks column(s) {missing}")
    return {c: np.asarray(data[c]) for c in columns}


class DeepzSceneEvaluator(RailStage):
    """Score scene-estimator output (one PDF per detection, ancil ``scene_id``, ``x``, ``y``)
    against the truth table of the scenes.

    Detections are matched to truth objects by mutual nearest neighbours within
    ``match_radius`` pixels (:func:`rail.deepz.scenes.match_positions`). The output table has
    one row per number: ``section`` (``detection`` or ``photoz``), ``blend_class`` (``all``,
    ``isolated``, ``mild``, ``blended``; :mod:`rail.evaluation.deepz_scene_metrics`),
    ``metric``, ``value``, ``lo``, ``hi`` (bootstrap interval, photo-z only; 16-84%) and ``n``
    (objects counted). Detection: completeness of gold objects and purity of all detections.
    Photo-z: on the matched gold objects.
    """

    name = "DeepzSceneEvaluator"
    entrypoint_function = "evaluate"
    interactive_function = "deepz_scene_evaluator"
    config_options = RailStage.config_options.copy()
    config_options.update(
        redshift_col=Option(str, "redshift", msg="true-redshift column of the truth table"),
        mag_col=Option(str, "mag_i_lsst", msg="magnitude column of the truth table for the completeness bins"),
        match_radius=Option(float, 2.5, msg="pixels: detection-truth matching radius", check=POSITIVE),
        zmin=Option(float, 0.0, msg="lower end of the metric grid"),
        zmax=Option(float, 3.0, msg="upper end of the metric grid"),
        n_boot=Option(int, 100, msg="bootstrap resamples of the photo-z metrics", check=bound(">=", 1)),
        seed=Option(int, 0, msg="seed of the bootstrap"),
    )
    inputs = [("input", QPHandle), ("truth", TableHandle)]
    outputs = [("output", Hdf5Handle)]

    def __init__(self, args, **kwargs):
        super().__init__(args, **kwargs)
        validate_config_keys(self)
        validate_options(self)
        if not self.config.zmax > self.config.zmin:
            raise ValueError(f"Options 'zmin'={self.config.zmin} and 'zmax'={self.config.zmax}: zmax must be > zmin")

    def evaluate(self, data, truth):
        """Score ``data`` (qp ensemble or handle) against ``truth`` (table or handle); returns the table handle."""
        self.set_data("input", data)
        self.set_data("truth", truth, do_read=False)
        self.run()
        self.finalize()
        return self.get_handle("output")

    def run(self):
        check_output_paths(self)
        cfg = self.config
        ens = self.get_data("input")
        handle = self.get_handle("truth", allow_missing=True)
        truth = _read_columns(handle, _EVAL_TRUTH + (cfg.redshift_col, cfg.mag_col))
        truth_columns(truth)
        ancil = ens.ancil or {}
        missing = [k for k in ("scene_id", "x", "y") if k not in ancil]
        if missing:
            raise SceneInputError(f"{self.name}: the estimate's ancil lacks {missing}; expected the output of "
                                  "DeepzSceneEstimator (one PDF per detection with its scene_id, x, y)")
        d2t, _ = match_positions(ancil["scene_id"], ancil["x"], ancil["y"], truth["scene_id"], truth["x"],
                                 truth["y"], float(cfg.match_radius))
        rows: list[tuple] = []
        det = detection_metrics(truth, d2t, mag_col=cfg.mag_col)
        rows.append(("detection", "all", "purity", det["purity"], np.nan, np.nan, det["n_detections"]))
        rows.append(("detection", "all", "completeness", det["completeness"], np.nan, np.nan, det["n_selected"]))
        for c in BLEND_CLASSES:
            rows.append(("detection", c, "completeness", det[f"completeness_{c}"], np.nan, np.nan, det[f"n_{c}"]))
        gold = np.asarray(truth["gold"], bool)
        matched = np.flatnonzero(d2t >= 0)
        keep = matched[gold[d2t[matched]]]
        if keep.size:
            zt = np.asarray(truth[cfg.redshift_col], dtype=np.float64)[d2t[keep]]
            po = per_object_quantities(ens[keep], zt, float(cfg.zmin), float(cfg.zmax))
            res = photoz_by_blending(po, np.asarray(truth["blendedness"], np.float64)[d2t[keep]],
                                     n_boot=int(cfg.n_boot), seed=int(cfg.seed))
            for cls, g in res.items():
                for m in REPORTED:
                    rows.append(("photoz", cls, m, g[m]["value"], g[m]["lo"], g[m]["hi"], g["n"]))
        cols = list(zip(*rows))
        out = {name: np.asarray([str(v).encode() for v in col], dtype="S") for name, col in
               zip(("section", "blend_class", "metric"), cols[:3])}
        out.update(value=np.asarray(cols[3], np.float64), lo=np.asarray(cols[4], np.float64),
                   hi=np.asarray(cols[5], np.float64), n=np.asarray(cols[6], np.int64))
        self.add_data("output", out)


__all__ = ["DeepzSceneSimulator", "DeepzSceneEvaluator"]
