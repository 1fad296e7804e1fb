"""LSTM mixture density network on wavelength-ordered band sequences (after LSTM-MDNz).

Each object is a sequence of bands in increasing effective wavelength (option
``wavelengths``, or the order of ``bands``); each step holds the band's scaled flux, scaled
flux error and a validity flag (:class:`rail.deepz.sequences.BandSequencer`; magnitudes
are converted to fluxes, per-band statistics are fitted at inform time). Stacked
(bidirectional) LSTMs, each followed by dropout and batch norm, are aggregated into one
vector, passed through dense layer(s) and a K-component Gaussian mixture head
(:class:`rail.deepz.mixtures.GaussianMixtureHead`: softmax weights, softplus sigmas),
trained on the mixture NLL (paper) or CRPS with :func:`rail.deepz.training.train_model`.

Paper (Luo et al., LSTM-MDNz) settings, all options here: BiLSTM 128 then 64 units per
direction, dropout 0.3 + batch norm after each, the last hidden states aggregated, a dense
layer, K = 15, NLL, Adam lr 1e-3, batch 128, lr x0.1 every 50 epochs, early stopping
patience 20 (best weights restored), per-band standardisation of flux and error.

Departures from the paper, each measured in ``benchmarks/results/ablations_lstm.md``
(what was tried and not kept: ``CHANGELOG.md``):

* ``missing_policy="mask"`` (paper: objects lacking any band are dropped): a missing, NaN
  or non-detected band becomes a *masked step*: its flux/error inputs are replaced by a
  learned per-band token and its validity flag is 0, so every object gets a PDF;
* ``band_dropout=0.1``: during training each band of each object is masked with this
  probability, so the network widens its PDFs when bands are absent at estimate time
  (``tests/test_lstm.py`` checks that they broaden and stay finite and normalised);
* ``width_calibration="pit_ks"``: one factor on all component widths, fitted on the
  validation split so that the validation PITs are closest to uniform (the raw MDN is
  over-dispersed on DC2); means and weights are unchanged;
* ``flux_transform="asinh"``: asinh-scaled fluxes and log errors instead of linear
  standardisation (see :mod:`rail.deepz.sequences`);
* ``aggregation="flatten"`` (paper: the last hidden states): the dense layer sees the last
  LSTM layer's outputs at every band, not only the two end states;
* ``lstm_units=[64, 32]`` (paper: 128, 64): for CPU inference speed;
* ``lr_schedule="onecycle"``, ``lr=3e-3``, ``epochs=40`` (paper: Adam 1e-3, x0.1 every 50
  epochs, early stopping with patience 20): the same loss in a third of the time;
* ``dropout=0`` (paper: 0.3): with band dropout and the short schedule dropout only blurs
  the mixture.

Output: ``qp.mixmod`` (exact mixture) with ancil zmean (the paper's point estimate),
zmode, zmedian, zstd, quantiles and ``p_outside``. **Mass below zmin (z < 0):** the mixture
means are unbounded, so a Gaussian near z = 0 puts some mass below 0. With ``mixmod`` the
mixture is emitted untruncated and that mass is reported in the ancil ``p_outside``; all
point estimates and quantiles in the ancil are those of the PDF truncated to
[zmin, zmax] and renormalised (never negative). ``qp_representation="interp"`` emits the
truncated, renormalised PDF itself on ``nzbins`` points.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Mapping

import numpy as np
from ceci.config import StageParameter as Param

from rail.deepz.augment import augment_options, make_resampler, validation_at_depth
from rail.deepz.calibration import fit_sigma_scale, ks_uniform, mixture_pit
from rail.deepz.ensemble import (
    ENSEMBLE_OPTIONS,
    build_members,
    fit_members,
    members_payload,
    pool_mixtures,
)
from rail.deepz.sequences import FLUX_TRANSFORMS, BandSequencer, band_order, make_band_dropout
from rail.deepz.stages import (
    MIXTURE_OUTPUT_OPTIONS,
    NON_NEGATIVE,
    POSITIVE,
    DeepzEstimator,
    DeepzInformer,
    Option,
    bound,
    each,
    in_range,
    one_of,
    photometry_settings,
    positive_int_list,
    positive_int_list_or_empty,
    with_defaults,
)

AGGREGATIONS = ("last", "mean", "attention", "flatten")
LOSSES = ("nll", "crps")
WIDTH_CALIBRATIONS = ("pit_ks", "none")


class _SequenceMixin:
    """Photometry -> sequences with the stage's/model's missing-band convention."""

    def _sequences(self, phot, sequencer: BandSequencer, policy: str) -> np.ndarray:
        # with 'limit' the replaced values are shown to the network as ordinary steps
        valid = phot.valid if policy == "mask" else np.ones_like(phot.valid)
        return sequencer.transform(phot, valid)


class DeepzLSTMInformer(_SequenceMixin, DeepzInformer):
    """Train the LSTM mixture density network (LSTM-MDNz) on a spectroscopic table."""

    name = "DeepzLSTMInformer"
    interactive_function = "deepz_lstm_informer"
    method = "lstm"
    config_options = DeepzInformer.config_options.copy()
    config_options.update(with_defaults(
        {k: DeepzInformer.config_options[k] for k in (
            "lr", "batch_size", "epochs", "patience", "optimizer", "lr_schedule", "lr_factor",
            "lr_step", "weight_decay", "missing_policy")},
        lr=3e-3, batch_size=128, epochs=40, patience=40, optimizer="adam", lr_schedule="onecycle",
        lr_factor=0.1, lr_step=50, weight_decay=0.0, missing_policy="mask",
    ))
    config_options.update(
        wavelengths=Option(
            list, [], check=each(POSITIVE),
            msg="effective wavelength of each band in 'bands' (same order, any unit); the sequence "
            "runs in increasing wavelength. Empty: the order of 'bands' is the sequence order",
        ),
        flux_transform=Option(
            str, "asinh", check=one_of(*FLUX_TRANSFORMS),
            msg=f"flux scaling before per-band standardisation, one of {FLUX_TRANSFORMS}: 'linear' "
            "= the paper's standardised fluxes and errors; 'asinh' = asinh(flux/b), log(err/b) with b "
            "the band's median flux error",
        ),
        lstm_units=Option(
            list, [64, 32], check=positive_int_list,
            msg="hidden units per direction of each stacked LSTM layer (paper: 128, 64; the default is "
            "halved for CPU inference speed, see the module docstring)",
        ),
        bidirectional=Param(bool, True, msg="bidirectional LSTM layers (paper: True)"),
        dropout=Option(
            float, 0.0, check=in_range(0, 1, "left"),
            msg="dropout after each LSTM layer and dense layer (paper: 0.3; 0 here, see the module docstring)",
        ),
        batch_norm=Param(bool, True, msg="batch norm after each LSTM layer (paper: True)"),
        aggregation=Option(
            str, "flatten", check=one_of(*AGGREGATIONS),
            msg=f"how the last LSTM layer's outputs become one vector, one of {AGGREGATIONS} "
            "('last' = final hidden state per direction, the paper's; 'flatten' = all steps "
            "concatenated, the default: better on DC2, see the module docstring)",
        ),
        dense_units=Option(list, [64], check=positive_int_list_or_empty, msg="widths of the ReLU dense layer(s) before the mixture head"),
        n_components=Option(int, 15, check=bound(">=", 1), msg="number of Gaussian components K (paper: 15)"),
        min_sigma=Option(float, 1e-3, check=POSITIVE, msg="floor on component widths (redshift units)"),
        loss=Option(str, "nll", check=one_of(*LOSSES), msg=f"training loss, one of {LOSSES} (paper: 'nll')"),
        aux_loss_weight=Option(
            float, 0.0, check=NON_NEGATIVE,
            msg="weight of the other loss added to 'loss' (nll + w x crps, or crps + w x nll); 0 = 'loss' alone",
        ),
        width_calibration=Option(
            str, "pit_ks", check=one_of(*WIDTH_CALIBRATIONS),
            msg=f"post-hoc calibration of the component widths on the validation split, one of "
            f"{WIDTH_CALIBRATIONS}: 'pit_ks' = one factor on all sigmas minimising the KS distance of the "
            "validation PITs from uniform (means/weights unchanged); 'none' = the paper's raw MDN output",
        ),
        band_dropout=Option(
            float, 0.1, check=in_range(0, 1, "left"),
            msg="missing_policy='mask' only: probability of masking each band of each training object "
            "(teaches the network to handle bands missing at estimate time; 0 = off, as the paper)",
        ),
    )
    config_options.update({k: v.copy() for k, v in ENSEMBLE_OPTIONS.items()})
    config_options.update(augment_options())

    def __init__(self, args, **kwargs):
        super().__init__(args, **kwargs)
        band_order(self.config.bands, self.config.wavelengths)  # one wavelength per band

    def _fit(self, data: Mapping, z: np.ndarray, val_mask):
        import torch
        from rail.deepz.nets.lstm import LSTMMDN
        from rail.deepz.training import concat_outputs, predict_batched, split_indices, train_model
        from rail.deepz.mixtures import gmm_crps, gmm_nll
        cfg = self.config
        order = band_order(cfg.bands, cfg.wavelengths)
        phot = self._photometry(data)
        tr, va = split_indices(len(z), cfg.val_fraction, cfg.seed, val_mask)
        policy = cfg.missing_policy
        fit_valid = phot.valid if policy == "mask" else np.ones_like(phot.valid)
        sequencer = BandSequencer(order, cfg.flux_transform)
        sequencer.fit(phot.take(tr), fit_valid[tr])
        x = self._sequences(phot, sequencer, policy)
        arch = {
            "n_bands": len(cfg.bands),
            "lstm_units": [int(u) for u in cfg.lstm_units],
            "bidirectional": bool(cfg.bidirectional),
            "dropout": float(cfg.dropout),
            "batch_norm": bool(cfg.batch_norm),
            "aggregation": cfg.aggregation,
            "dense_units": [int(u) for u in cfg.dense_units],
            "n_components": int(cfg.n_components),
            "zmin": float(cfg.zmin),
            "zmax": float(cfg.zmax),
            "min_sigma": float(cfg.min_sigma),
        }
        main_loss, aux_loss = (gmm_nll, gmm_crps) if cfg.loss == "nll" else (gmm_crps, gmm_nll)
        aux_w = float(cfg.aux_loss_weight)

        def loss_fn(out, zb):
            loss = main_loss(out, zb)
            return loss + aux_w * aux_loss(out, zb) if aux_w > 0 else loss
        augment = make_band_dropout(cfg.band_dropout) if (policy == "mask" and cfg.band_dropout > 0) else None
        settings = photometry_settings(cfg)

        def sequences(p):
            return [self._sequences(p, sequencer, policy)]

        # early stopping and the width calibration see the validation split at the test depth (augment_depth)
        x_va = (validation_at_depth(cfg, settings, phot, va, sequences) or [x[va]])[0]

        def fit_one(m, seed, rows):
            torch.manual_seed(seed)
            net = LSTMMDN(**arch)
            resample = make_resampler(cfg, settings, phot, rows, seed, sequences)
            res = train_model(net, loss_fn, [x[rows]], z[rows], [x_va], z[va],
                              replace(self.train_config, seed=seed), augment=augment, resample=resample)
            return net, res

        fitted = fit_members(cfg.n_members, cfg.seed, tr, cfg.bootstrap, fit_one, self.log)
        nets = [f[0] for f in fitted]
        sigma_scale = 1.0
        diagnostics = {}
        if cfg.width_calibration == "pit_ks" or len(nets) > 1:
            for net in nets:
                net.to("cpu")
            w, mu, sig = pool_mixtures([concat_outputs(predict_batched(net, [x_va], torch.device("cpu")))
                                        .detach_numpy() for net in nets])
        if cfg.width_calibration == "pit_ks":
            sigma_scale = fit_sigma_scale(w, mu, sig, z[va])
            self.log.info(f"width calibration: sigma x {sigma_scale:.3f}")
        if len(nets) > 1:  # the pooled ensemble's calibration on the validation split
            diagnostics = {"val_pit_ks_pooled_raw": ks_uniform(mixture_pit(w, mu, sig, z[va])),
                           "val_pit_ks_pooled": ks_uniform(mixture_pit(w, mu, sig * sigma_scale, z[va]))}
            self.log.info(f"pooled ensemble of {len(nets)}: validation PIT KS {diagnostics}")
        return self._model_dict(
            arch=arch,
            loss=cfg.loss,
            sigma_scale=sigma_scale,
            band_dropout=float(cfg.band_dropout),
            wavelengths=[float(w) for w in cfg.wavelengths],
            **members_payload(nets, [f[1].to_dict() for f in fitted], diagnostics),
            scalers={"sequence": sequencer.to_dict()},
            train=fitted[0][1].to_dict(),
        )


class DeepzLSTMEstimator(_SequenceMixin, DeepzEstimator):
    """Estimate redshift PDFs (Gaussian mixtures) with a trained LSTM-MDN model (or ensemble)."""

    name = "DeepzLSTMEstimator"
    interactive_function = "deepz_lstm_estimator"
    method = "lstm"
    # torch's CPU LSTM (oneDNN) allocates per-call buffers that at 4096 objects exceed glibc's
    # 32 MB mmap threshold; 2048 keeps them on the heap (measured: benchmarks/README.md)
    auto_batch_cpu = 2048
    config_options = DeepzEstimator.config_options.copy()
    config_options.update({k: v.copy() for k, v in MIXTURE_OUTPUT_OPTIONS.items()})

    def _build_network(self, model):
        from rail.deepz.nets.lstm import LSTMMDN
        from rail.deepz.nets.pooling import MixtureEnsemble
        def make(state_dict):
            net = LSTMMDN(**model["arch"])
            net.load_state_dict(state_dict)
            return net.fold_batch_norms()

        nets = build_members(model, self.name, make)
        self.sequencer = BandSequencer.from_dict(model["scalers"]["sequence"])
        # several members: one mixture of M x K components, weights 1/M each
        return nets[0] if len(nets) == 1 else MixtureEnsemble(nets)

    def _estimate_chunk(self, data: Mapping):
        from rail.deepz.training import concat_outputs, predict_batched
        from rail.deepz.pdf import mixture_ensemble
        m = self.model
        x = self._sequences(self._photometry(data), self.sequencer, m["photometry"]["missing_policy"])
        params = concat_outputs(
            predict_batched(self.net, [x], self.torch_device, self.inference_batch_size,
                            self.config.mixed_precision)
        )
        w, mu, sig = params.detach_numpy()
        sig = sig * np.float32(m.get("sigma_scale", 1.0))
        return mixture_ensemble(w, mu, sig, m["zmin"], m["zmax"], self.config.nzbins,
                                self.config.qp_representation)
