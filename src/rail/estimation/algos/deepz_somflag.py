"""SOM flags for the PDFs of any estimator (after the SOM + foundation-model paper, Moran et al.).

:class:`DeepzSOMFlagInformer` / :class:`DeepzSOMFlagger` (method ``"somflag"``) add to any
estimator's qp ensemble (FlexZBoost, BPZ, the deepz methods...) the flags that the
embedding MDN (:mod:`rail.estimation.algos.deepz_embed`) computes for its own PDFs. The
informer takes the estimator's training table (cell counts; also the SOM's training sample
unless a reference is given), a labelled calibration table the estimator was *not* trained
on, and the estimator's qp ensemble on that table; the flagger takes a qp ensemble and the
catalog it was computed from and returns the same ensemble with the ancil ``som_cell``,
``som_dist``, ``som_train_count``, ``flag_ood`` and ``flag_underperforming`` added. The SOM,
the per-cell statistics and the flag rules are in :mod:`rail.deepz.som`; the options are
those of :data:`rail.deepz.som_options.SOM_OPTIONS`.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import qp
from ceci.config import StageParameter as Param
from rail.core.data import QPHandle, TableHandle
from rail.estimation.informer import CatInformer

from rail.deepz.modelfile import DeepzModelHandle
from rail.deepz.qputils import ensemble_point_and_pit
from rail.deepz.som import SOMFlagModel, needs_photometry, som_feature_matrix
from rail.deepz.som_options import SOM_OPTIONS, read_reference, som_settings
from rail.deepz.stages import (
    PHOTOMETRY_OPTIONS,
    TRAINING_OPTIONS,
    DeepzEstimator,
    DeepzInformer,
    table_to_numpy_dict,
)


def _copy_ensemble(ens: qp.Ensemble) -> qp.Ensemble:
    """A new ensemble with the same PDFs (qp's slicing copies; it cannot slice one PDF)."""
    if ens.npdf > 1:
        return ens[0 : ens.npdf]
    meta = {k: v for k, v in ens.metadata.items() if k not in ("pdf_name", "pdf_version")}
    return qp.Ensemble(ens.gen_class, data={**meta, **ens.objdata})


class DeepzSOMFlagInformer(DeepzInformer):
    """Train the SOM flags for the output of any estimator.

    Inputs: ``input`` = the table the estimator was trained on (cell training counts; the
    SOM's training sample unless ``som_reference``/``reference`` is given), ``truth`` = a
    labelled calibration table the estimator was NOT trained on, ``ensemble`` = the
    estimator's qp ensemble on the ``truth`` rows (same order).
    """

    name = "DeepzSOMFlagInformer"
    interactive_function = "deepz_som_flag_informer"
    method = "somflag"
    inputs = [("input", TableHandle), ("truth", TableHandle), ("ensemble", QPHandle)]
    outputs = [("model", DeepzModelHandle)]
    config_options = CatInformer.config_options.copy()
    config_options.update(PHOTOMETRY_OPTIONS)
    config_options.update({k: TRAINING_OPTIONS[k] for k in ("redshift_col", "zmin", "zmax", "z_out_of_range", "seed",
                                                                   "num_threads")})
    config_options.update(
        point_estimate=Param(
            str, "zmode",
            msg="ancil column of the ensemble used as point estimate (if absent: zmode/zmedian/zmean computed from "
            "the PDFs, see rail.deepz.pdf.ensemble_point_estimate)",
        ),
    )
    config_options.update(SOM_OPTIONS)

    def __init__(self, args, **kwargs):
        super().__init__(args, **kwargs)
        som_settings(self.config)
        self._reference = None

    def inform(self, training_data, truth, ensemble, reference=None, **kwargs):
        """Train the SOM and measure the estimator's per-cell performance.

        Parameters
        ----------
        training_data : TableLike
            The table the flagged estimator was trained on.
        truth : TableLike
            Labelled calibration table (photometry + redshift), not used to train the estimator.
        ensemble : qp.Ensemble
            The estimator's PDFs for the ``truth`` rows, in the same order.
        reference : TableLike, optional
            Reference sample (possibly unlabelled) for the SOM; overrides ``som_reference``.

        Returns
        -------
        ModelHandle
            The flag model.
        """
        self._reference = reference
        self.set_data("truth", truth)
        self.set_data("ensemble", ensemble)
        return super().inform(training_data, **kwargs)

    def _run(self):
        cfg = self.config
        train = self._training_table()
        truth = table_to_numpy_dict(self, self.get_data("truth"), cfg.hdf5_groupname)
        ens = self.get_data("ensemble")
        z, keep = self._redshifts(truth)
        zphot, pit = ensemble_point_and_pit(ens, z, cfg.point_estimate, cfg.zmin, cfg.zmax)
        if not keep.all():
            truth = {k: np.asarray(v)[keep] for k, v in truth.items()}
            z, zphot, pit = z[keep], zphot[keep], pit[keep]
        needs = needs_photometry(cfg.som_features)
        x_train = som_feature_matrix(train, self._photometry(train) if needs else None, cfg.som_features)
        x_val = som_feature_matrix(truth, self._photometry(truth) if needs else None, cfg.som_features)
        ref = read_reference(self, self._reference, cfg.som_reference, cfg.som_reference_groupname,
                              cfg.som_max_reference, cfg.seed)
        x_ref = x_train if ref is None else som_feature_matrix(
            ref, self._photometry(ref) if needs else None, cfg.som_features)
        flags = SOMFlagModel.build(list(cfg.som_features), x_ref, x_train, x_val, zphot, z, pit,
                                   ref_is_train=ref is None, **som_settings(cfg, len(z)))
        self.log.info(f"SOM: {flags.summary()}")
        self.model = self._model_dict(som=flags.to_dict(), point_estimate=cfg.point_estimate)
        self.add_data("model", self.model)


class DeepzSOMFlagger(DeepzEstimator):
    """Add SOM flags to any estimator's qp ensemble.

    Inputs: ``model`` (from :class:`DeepzSOMFlagInformer`), ``input`` = the catalog the
    ensemble was computed from, ``ensemble`` = that qp ensemble (same rows). Output: the
    same PDFs with ancil ``som_cell``, ``som_dist``, ``som_train_count``, ``flag_ood``,
    ``flag_underperforming`` added. Streams the catalog chunk by chunk; a file ensemble is
    read in the same chunks.
    """

    name = "DeepzSOMFlagger"
    interactive_function = "deepz_som_flagger"
    method = "somflag"
    inputs = [("model", DeepzModelHandle), ("input", TableHandle), ("ensemble", QPHandle)]
    outputs = [("output", QPHandle)]

    def estimate(self, input_data, ensemble, **kwargs):
        """Flag the PDFs of ``ensemble``.

        Parameters
        ----------
        input_data : TableLike
            The catalog (photometry / SOM feature columns) the ensemble was computed from.
        ensemble : qp.Ensemble
            The PDFs to flag, one per catalog row, same order.

        Returns
        -------
        QPHandle
            The same PDFs with the flag ancil columns.
        """
        self.set_data("ensemble", ensemble)
        return super().estimate(input_data, **kwargs)

    def _build_network(self, model):
        self.flagger = SOMFlagModel.from_dict(model["som"])
        return None

    def _initialize_run(self):
        super()._initialize_run()
        handle = self.get_handle("ensemble", allow_missing=True)
        self._ens_iter = None
        self._ens = None
        if handle is not None and handle.data is None and handle.path:
            self._ens_iter = qp.iterator(str(handle.path), chunk_size=self.config.chunk_size)
            n = int(qp.data_length(str(handle.path)))
        else:
            self._ens = self.get_data("ensemble")
            n = self._ens.npdf
        if n != self._input_length:
            raise ValueError(f"{self.name}: the ensemble has {n} PDFs but the catalog has {self._input_length} rows")

    def _ensemble_chunk(self, start, end):
        if self._ens_iter is not None:
            s, e, ens = next(self._ens_iter)
            if (s, e) != (start, end):  # pragma: no cover - same chunk_size on both sides
                raise RuntimeError(f"{self.name}: ensemble chunk {s}-{e} does not match catalog chunk {start}-{end}")
            return ens
        if start == 0 and end == self._ens.npdf:
            return self._ens
        return self._ens[start:end]

    def _estimate_chunk(self, data: Mapping):  # pragma: no cover - _process_chunk is overridden
        raise NotImplementedError

    def _process_chunk(self, start, end, data, first):
        data = table_to_numpy_dict(self, data)
        ens = self._ensemble_chunk(start, end)
        ancil = dict(ens.ancil) if ens.ancil is not None else {}
        needs = needs_photometry(self.flagger.features)
        phot = self._photometry(data) if needs else None
        ancil.update(self.flagger.flag(som_feature_matrix(data, phot, self.flagger.features)))
        out = _copy_ensemble(ens)  # never modify the caller's ensemble
        out.set_ancil({k: np.asarray(v) for k, v in ancil.items()})
        self._do_chunk_output(out, start, end, first, data=data)
