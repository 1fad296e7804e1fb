"""A ceci stage that adds synthetic image stamps to a catalog, for example pipelines.

:class:`DeepzSyntheticStamps` runs :func:`rail.deepz.images.add_synthetic_stamps` on a
table: one exponential profile per object, convolved with a Gaussian PSF, flux per band
from the catalog magnitudes and Gaussian noise at each band's depth (``mag_limits``). It
lets the image CNN (:mod:`rail.estimation.algos.deepz_cnn`) run end to end on a catalog
without pixels (DC2, BOSS), as in ``examples/cnn_dc2.yml``.

The stamps are a demonstration, not data: the simulated half-light radius scales as
1 / (1 + z) with the *true* redshift, so the pixels carry redshift information that real
images of that size would not. Metrics of a pipeline on synthetic stamps say that the
pipeline runs, not how well the CNN does on real images (``benchmarks/qso_images.py``
measures that on SDSS quasar stamps).
"""

from __future__ import annotations

from ceci.config import StageParameter as Param
from rail.core.data import Hdf5Handle, TableHandle
from rail.core.stage import RailStage

from rail.deepz.images import add_synthetic_stamps
from rail.deepz.stages import table_to_numpy_dict, validate_config_keys


class DeepzSyntheticStamps(RailStage):
    """Copy a table and add a synthetic image column (N, len(bands), size, size), nJy per pixel."""

    name = "DeepzSyntheticStamps"
    entrypoint_function = "add_stamps"
    interactive_function = "deepz_synthetic_stamps"
    config_options = RailStage.config_options.copy()
    config_options.update(
        bands=Param(list, [], msg="magnitude columns (AB), one image band each, in this order"),
        mag_limits=Param(dict, {}, msg="5-sigma point-source depth (AB mag) of each band column: the pixel noise"),
        redshift_col=Param(str, "redshift", msg="redshift column (sets the simulated sizes)"),
        column=Param(str, "images", msg="name of the new image column"),
        size=Param(int, 16, msg="stamp side in pixels"),
        seed=Param(int, 0, msg="seed of the size scatter and the pixel noise"),
        hdf5_groupname=Param(str, "", msg="group of the input table in its HDF5 file ('' = top level)"),
    )
    inputs = [("input", TableHandle)]
    outputs = [("output", Hdf5Handle)]

    def __init__(self, args, **kwargs):
        super().__init__(args, **kwargs)
        validate_config_keys(self)

    def add_stamps(self, data):
        """Return a handle to a copy of ``data`` with the image column added."""
        self.set_data("input", data)
        self.run()
        self.finalize()
        return self.get_handle("output")

    def run(self):
        cfg = self.config
        if not cfg.bands:
            raise ValueError(f"{self.name}: option 'bands' is empty")
        if cfg.size < 4:
            raise ValueError(f"{self.name}: option 'size' must be >= 4 pixels, got {cfg.size}")
        table = table_to_numpy_dict(self, self.get_data("input"), cfg.hdf5_groupname)
        if cfg.column in table:
            raise ValueError(f"{self.name}: the input already has a column {cfg.column!r}; choose another 'column'")
        self.add_data("output", add_synthetic_stamps(table, list(cfg.bands), dict(cfg.mag_limits), size=cfg.size,
                                                     seed=cfg.seed, redshift_col=cfg.redshift_col,
                                                     column=cfg.column))
