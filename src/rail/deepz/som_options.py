"""Options and helpers shared by the stages that train SOM flags.

:class:`rail.estimation.algos.deepz_embed.DeepzEmbedInformer` (flags of the embedding MDN)
and :class:`rail.estimation.algos.deepz_somflag.DeepzSOMFlagInformer` (flags of any
estimator) take the same ``som_*`` options; the SOM and the flags themselves are in
:mod:`rail.deepz.som`. This module lives in ``rail.deepz`` (not in either stage module) so
that neither method module imports the other.
"""

from __future__ import annotations

from typing import Mapping

import tables_io
from ceci.config import StageParameter as Param

from .datasets import subsample
from .som import METRICS
from .stages import table_to_numpy_dict

SOM_OPTIONS = dict(
    som_features=Param(
        list, ["colors"],
        msg="catalog features of the SOM: photometric blocks ('colors', 'mags', ...) and/or column names",
    ),
    som_shape=Param(
        list, [],
        msg="SOM grid (rows, columns); [] (default) = automatic: a square grid whose cells hold ~20 "
        "validation objects on average, side sqrt(n_val / 20) clipped to 4..20 (see auto_som_side)",
    ),
    som_iterations=Param(int, 20000, msg="SOM online training updates"),
    som_sigma=Param(float, 0.0, msg="initial SOM neighbourhood radius in cells (0: a quarter of the larger side)"),
    som_learning_rate=Param(float, 0.5, msg="initial SOM learning rate"),
    som_reference=Param(
        str, "",
        msg="optional table file (hdf5/parquet/...) of a reference sample, possibly larger and "
        "unlabelled, to train the SOM on (default: the training sample)",
    ),
    som_reference_groupname=Param(str, "", msg="hdf5 group of som_reference ('' = top level)"),
    som_max_reference=Param(int, 500000, msg="random subset of the reference used to train the SOM (0 = all)"),
    som_min_train_count=Param(
        int, 5,
        msg="flag_ood when an object's cell holds fewer training objects than this",
    ),
    som_dist_quantile=Param(
        float, 0.999,
        msg="flag_ood when the distance to the best-matching unit exceeds this quantile of the "
        "training objects' distances (1 = off)",
    ),
    som_min_val_count=Param(
        int, 10,
        msg="a cell can be flagged underperforming only with at least this many validation objects",
    ),
    som_underperform_sigma=Param(
        float, 3.0,
        msg="flag_underperforming when a cell metric exceeds the global one by more than this many "
        "times the noise of the global metric on a sample of the cell's size",
    ),
    som_flag_metrics=Param(list, list(METRICS), msg=f"metrics tested for underperformance, subset of {METRICS}"),
    som_n_boot=Param(int, 100, msg="bootstrap replicates for the per-cell errors"),
)


#: automatic SOM side: cells hold ~AUTO_SOM_PER_CELL validation objects on average (the per-cell
#: metrics need a few), side clipped to [AUTO_SOM_MIN_SIDE, AUTO_SOM_MAX_SIDE]
AUTO_SOM_PER_CELL, AUTO_SOM_MIN_SIDE, AUTO_SOM_MAX_SIDE = 20.0, 4, 20


def auto_som_side(n_val: int) -> int:
    """Side of the automatic square SOM for ``n_val`` validation objects: int(sqrt(n_val / 20)) in 4..20
    (7 for DC2's 1,022 validation objects, 11 for 2,500, 20 from 8,000)."""
    return int(min(AUTO_SOM_MAX_SIDE, max(AUTO_SOM_MIN_SIDE, (n_val / AUTO_SOM_PER_CELL) ** 0.5)))


def som_settings(cfg, n_val: int = 0) -> dict:
    """Keyword arguments of :meth:`rail.deepz.som.SOMFlagModel.build` from a stage config (checks
    ``som_shape`` and ``som_flag_metrics``); an empty ``som_shape`` becomes the automatic
    :func:`auto_som_side` square for ``n_val`` validation objects."""
    shape = list(cfg.som_shape)
    if len(shape) not in (0, 2):
        raise ValueError(f"Option 'som_shape'={shape} must be two integers, or [] (automatic)")
    if not shape:
        shape = [auto_som_side(n_val)] * 2
    bad = [m for m in cfg.som_flag_metrics if m not in METRICS]
    if bad:
        raise ValueError(f"Option 'som_flag_metrics' has unknown metric(s) {bad}; choose from {METRICS}")
    return dict(shape=shape, n_iter=cfg.som_iterations, sigma=cfg.som_sigma, learning_rate=cfg.som_learning_rate,
                seed=cfg.seed, min_train_count=cfg.som_min_train_count, dist_quantile=cfg.som_dist_quantile,
                min_val_count=cfg.som_min_val_count, underperform_sigma=cfg.som_underperform_sigma,
                flag_metrics=list(cfg.som_flag_metrics), n_boot=cfg.som_n_boot)


def read_reference(stage, table, path: str, groupname: str, max_rows: int, seed: int) -> dict | None:
    """The SOM reference sample as a numpy dict: ``table`` (a table or DataHandle) if given, else
    the file ``path`` (``''`` and no table: None), cut to a random ``max_rows`` (0: all)."""
    if table is None and not path:
        return None
    if table is None:
        table = tables_io.read(path)
    if hasattr(table, "data") and not isinstance(table, Mapping):  # a DataHandle
        table = table.data
    data = table_to_numpy_dict(stage, table, groupname)
    return subsample(data, max_rows if max_rows and max_rows > 0 else None, seed)
