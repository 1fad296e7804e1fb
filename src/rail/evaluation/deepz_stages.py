"""ceci stages of the comparison harness.

* :class:`DeepzCompareEvaluator` -- ends a pipeline with :func:`~rail.evaluation.deepz_compare.compare`:
  inputs ``input`` (a qp estimate, dependency-tracked by ceci) and ``truth``; further estimate
  files can be named in the ``estimates`` option (label -> path). Output: the tidy metrics
  table; the CSV/HDF5 copies and the plots go to ``plot_dir``.
* :class:`DeepzExampleData` -- writes the training and test tables of a data set of
  :mod:`rail.deepz.datasets` (optionally random subsets) so an example pipeline is
  self-contained: ``ceci examples/<name>.yml`` needs no input files.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from ceci.config import StageParameter as Param
from rail.core.data import Hdf5Handle, QPHandle, TableHandle
from rail.core.stage import RailStage

from . import deepz_compare as dc


class DeepzCompareEvaluator(RailStage):
    """Compare one or more qp estimates against a truth table (tidy metrics table + plots)."""

    name = "DeepzCompareEvaluator"
    entrypoint_function = "evaluate"
    interactive_function = "deepz_compare_evaluator"
    config_options = RailStage.config_options.copy()
    config_options.update(
        input_label=Param(str, "estimate", msg="estimator name of the 'input' estimate in the table"),
        estimates=Param(dict, {}, msg="further estimates to compare: label -> qp file path (rows aligned "
                        "with the truth table; not tracked as ceci dependencies)"),
        redshift_col=Param(str, "redshift", msg="true-redshift column of the truth table"),
        mag_col=Param(str, "", msg="reference magnitude column for the magnitude bins ('' = none)"),
        hdf5_groupname=Param(str, "", msg="group of the truth table in its HDF5 file ('' = auto)"),
        zmin=Param(float, 0.0, msg="lower end of the metric grids and redshift bins"),
        zmax=Param(float, 0.0, msg="upper end of the metric grids and redshift bins; 0 = the estimates' own "
                   "grid, else the true redshifts' maximum rounded up to 0.1 (deepz_compare.metric_zrange)"),
        n_zbins=Param(int, 6, msg="number of equal-width true-redshift bins"),
        point_estimate=Param(str, "zmode", msg="ancil key of the point estimate"),
        chunk_size=Param(int, 10000, msg="PDFs per chunk when streaming estimates"),
        plots=Param(bool, True, msg="write the PNG plots"),
        plot_dir=Param(str, "", msg="folder for metrics.csv/hdf5 and plots ('' = <output folder>/<stage name>)"),
        progress=Param(bool, True, msg="print a progress line per step and chunk"),
    )
    inputs = [("input", QPHandle), ("truth", TableHandle)]
    outputs = [("output", Hdf5Handle)]

    def evaluate(self, data, truth):
        """Compare ``data`` (qp.Ensemble or QPHandle) and the ``estimates`` option against ``truth``."""
        self.set_data("input", data, do_read=False)
        self.set_data("truth", truth, do_read=False)
        self.run()
        self.finalize()
        return self.get_handle("output")

    @staticmethod
    def _source(handle):
        if handle.data is not None:
            return handle.data
        if handle.path and handle.path != "None" and os.path.exists(handle.path):
            return handle.path
        raise FileNotFoundError(f"input {handle.tag!r} has neither data nor an existing file ({handle.path})")

    def run(self):
        cfg = self.config
        estimates = {cfg.input_label: self._source(self.get_handle("input", allow_missing=True))}
        for label, path in dict(cfg.estimates).items():
            if label in estimates:
                raise ValueError(f"option 'estimates' repeats the label {label!r}")
            estimates[label] = path
        truth = self._source(self.get_handle("truth", allow_missing=True))
        plot_dir = cfg.plot_dir
        if not plot_dir:
            out = self.get_output(self.get_aliased_tag("output"))
            plot_dir = str(Path(out).parent / self.instance_name) if out and out != "None" else self.instance_name
        auto = cfg.zmax == 0.0
        result = dc.compare(
            estimates, truth, outdir=plot_dir, redshift_col=cfg.redshift_col, mag_col=cfg.mag_col or None,
            truth_groupname=cfg.hdf5_groupname or None, zmin=cfg.zmin,
            zmax=None if auto else cfg.zmax,
            z_edges=None if auto else np.linspace(cfg.zmin, cfg.zmax, cfg.n_zbins + 1),
            z_nbins=cfg.n_zbins, point_estimate=cfg.point_estimate,
            chunk_size=cfg.chunk_size, plots=cfg.plots, progress=cfg.progress,
        )
        table = result.table
        out = {}
        for col in table.columns:
            v = table[col].to_numpy()
            out[col] = np.asarray([str(x).encode() for x in v], dtype="S") if v.dtype == object else v
        self.add_data("output", out)


class DeepzExampleData(RailStage):
    """Write a data set's training and test tables (plain numpyDict HDF5, no group)."""

    name = "DeepzExampleData"
    entrypoint_function = "make_data"
    interactive_function = "deepz_example_data"
    config_options = RailStage.config_options.copy()
    config_options.update(
        dataset=Param(str, "dc2", msg="preset data set of rail.deepz.datasets ('dc2', 'boss' or 'zcosmos')"),
        n_train=Param(int, 0, msg="random training subset size (0 = all)"),
        n_test=Param(int, 0, msg="random test subset size (0 = all)"),
        seed=Param(int, 0, msg="seed of the random subsets"),
    )
    inputs = []
    outputs = [("train", Hdf5Handle), ("test", Hdf5Handle)]

    def make_data(self):
        """Write the data set's tables; returns {"train": handle, "test": handle}.

        (``rail.interactive`` requires a docstring on every stage's entry point.)
        """
        self.run()
        self.finalize()
        return {"train": self.get_handle("train"), "test": self.get_handle("test")}

    def run(self):
        cfg = self.config
        ds = dc.load_dataset(cfg.dataset, cfg.n_train or None, cfg.n_test or None, cfg.seed)
        self.add_data("train", ds.train)
        self.add_data("test", ds.test)
