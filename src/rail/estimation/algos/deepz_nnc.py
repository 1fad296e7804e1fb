"""Binned CRPS classifier (after Tian, Wen & Xia, "NNC").

A residual MLP maps photometric features to a softmax over ``nbins`` ordered, evenly
spaced redshift bins on [zmin, zmax], trained on the discrete-CDF CRPS of the paper's
eq. (2). The PDF is the histogram of the bin probabilities (``qp.hist``); the paper's
point estimate (eq. 3, the expectation) is the ancil ``zmean``.

Paper defaults: hidden layers [512, 256, 128, 64] with batch norm, ReLU, dropout 0.1 and
residual connections; AdamW lr 5e-4, weight decay 1e-5; lr x0.5 after 5 epochs on a
validation plateau; gradient clipping 1.0; early stopping patience 20; batch 4096;
300 epochs. The paper bins [0, 2] into 400 bins (dz = 0.005); our resolution is the
same bin width, option ``dz`` = 0.005, whatever the range (600 bins on [0, 3], 800 on
[0, 4]); ``nbins`` fixes the count instead. As in the paper, the softmax is
calibrated after training by a temperature fitted on the validation split.

Departures from the paper, each measured in ``benchmarks/results/ablations_nnc.md``
(what was tried and not kept: ``CHANGELOG.md``):

* ``smoothing_bins=2``: the softmax output is smoothed by a fixed Gaussian of this many
  bins (0.01 in z) before the loss and at output; the CRPS constrains only the CDF, and
  with 600 bins the raw output is a comb of single-bin spikes. ``smoothing_bins=0``
  restores the paper's head.
* ``nll_weight=0.1``: the loss is CRPS + 0.1 x the histogram negative log-likelihood
  (:func:`rail.deepz.mixtures.binned_nll`), which pins the density near the peak (with the
  CRPS alone the most probable bin wanders).
* ``batch_size=0`` / ``lr=0`` (automatic): batch 1024 and lr 1e-3 below 100,000 training
  objects, the paper's 4096 / 5e-4 from there (:func:`automatic_batch_lr`).
* ``dropout=0.0`` (paper 0.1).
* ``temperature_objective="pit_ks"`` (paper: the validation NLL; see
  :mod:`rail.deepz.calibration`).
* Estimator option ``mode_window=0.06``: zmode is the centre of the 0.06-wide window
  (13 bins) holding the most probability, not the single most probable bin, which is a
  noisy statistic of a 600-bin histogram. The histogram itself is unchanged; zmean,
  zmedian and the quantiles do not depend on it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Mapping

import numpy as np
from ceci.config import StageParameter as Param

from rail.deepz.augment import augment_options, make_resampler, validation_at_depth
from rail.deepz.calibration import binned_pit, fit_temperature, ks_uniform
from rail.deepz.ensemble import (
    ENSEMBLE_OPTIONS,
    build_members,
    fit_members,
    members_payload,
)
from rail.deepz.scaling import Standardizer, fit_standardizer
from rail.deepz.stages import (
    NON_NEGATIVE,
    POSITIVE,
    DeepzEstimator,
    DeepzInformer,
    Option,
    in_range,
    one_of,
    bound,
    photometry_settings,
    positive_int_list,
    with_defaults,
)

if TYPE_CHECKING:  # annotations only: torch is imported where a stage trains or estimates
    from torch import nn

    from rail.deepz.training import TrainConfig

FEATURE_BLOCKS = ("mags", "colors", "errors", "color_errors", "valid")


def pooled_probs(smoother: nn.Module, n_members: int, n_bins: int):
    """Logits of M members side by side (N, M x nbins) -> the pooled, smoothed bin probabilities
    (N, nbins): the average of the members' softmax, then the fixed smoothing."""
    import torch
    def probs(logits: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(logits.reshape(logits.shape[0], n_members, n_bins), dim=-1).mean(dim=1)
        return smoother(p)
    return probs


def _check_blocks(name, blocks):
    if not blocks or any(b not in FEATURE_BLOCKS for b in blocks):
        raise ValueError(f"Option {name!r}={list(blocks)} must be a non-empty subset of {FEATURE_BLOCKS}")


def _feature_blocks(config_features, missing_policy: str) -> list[str]:
    blocks = list(config_features)
    if missing_policy == "mask" and "valid" not in blocks:
        blocks.append("valid")
    return blocks


DEFAULT_DZ = 0.005


def _zero_or_at_least_2(name, value):
    if value != 0 and value < 2:
        raise ValueError(f"Option {name!r} must be 0 (bins from 'dz') or >= 2, got {value}")


#: below this many training objects (the table given to inform, validation rows included)
#: the automatic batch size / learning rate are AUTO_SMALL, from there the paper's AUTO_PAPER
AUTO_N_TRAIN = 100_000
AUTO_SMALL = (1024, 1e-3)
AUTO_PAPER = (4096, 5e-4)


def automatic_batch_lr(n_train: int) -> tuple[int, float]:
    """``(batch_size, lr)`` of the options left at 0 for ``n_train`` training objects: the paper's
    4096 / 5e-4 assume millions of objects and leave a few optimiser steps per epoch on 10^4."""
    return AUTO_SMALL if n_train < AUTO_N_TRAIN else AUTO_PAPER


def _zero_or(check):
    """``check`` for any value but 0 (= automatic)."""
    def check_auto(name, value):
        if value != 0:
            try:
                check(name, value)
            except ValueError as err:
                raise ValueError(f"{err} (or 0 = automatic)") from None
    return check_auto


def _n_bins(cfg) -> int:
    """Bin count from ``nbins`` (if set) or the bin width ``dz``; both set is an error."""
    if cfg.nbins and cfg.dz != DEFAULT_DZ:
        raise ValueError(f"Options 'nbins' ({cfg.nbins}) and 'dz' ({cfg.dz}) both set the NNC's bins: give one")
    if cfg.nbins:
        return int(cfg.nbins)
    n = int(round((cfg.zmax - cfg.zmin) / cfg.dz))
    if n < 2:
        raise ValueError(f"Option 'dz' ({cfg.dz}) gives {n} bin(s) on [{cfg.zmin}, {cfg.zmax}]: need >= 2")
    return n


class DeepzNNCInformer(DeepzInformer):
    """Train the binned CRPS classifier (NNC) on a spectroscopic table."""

    name = "DeepzNNCInformer"
    interactive_function = "deepz_nnc_informer"
    method = "nnc"
    config_options = DeepzInformer.config_options.copy()
    config_options.update(with_defaults(
        {k: DeepzInformer.config_options[k] for k in ("epochs", "patience")}, epochs=300, patience=20,
    ))
    config_options.update(
        batch_size=Option(int, 0, check=_zero_or(bound(">=", 2)),
                          msg="objects per optimisation step; 0 (default) = automatic: 1024 below 100,000 "
                          "training objects, else the paper's 4096"),
        lr=Option(float, 0.0, check=_zero_or(bound(">", 0)),
                  msg="initial learning rate; 0 (default) = automatic: 1e-3 below 100,000 training "
                  "objects, else the paper's 5e-4"),
        dz=Option(float, DEFAULT_DZ, check=POSITIVE, msg="width of the redshift bins (the paper's 0.005); the "
                  "bin count is round((zmax - zmin) / dz)"),
        nbins=Option(int, 0, check=_zero_or_at_least_2, msg="number of evenly spaced redshift bins on [zmin, zmax] "
                     "instead of 'dz' (0 = from dz; giving both is an error)"),
        hidden_layers=Option(list, [512, 256, 128, 64], check=positive_int_list, msg="widths of the residual MLP's hidden layers"),
        dropout=Option(float, 0.0, check=in_range(0, 1, "left"), msg="dropout probability after each hidden layer (paper: 0.1)"),
        smoothing_bins=Option(
            float, 2.0, check=NON_NEGATIVE,
            msg="width (in bins) of the fixed Gaussian smoothing of the softmax output; "
            "without it CRPS training leaves comb-like PDFs over fine bins (0 = off, as the paper)",
        ),
        nll_weight=Option(
            float, 0.1, check=NON_NEGATIVE,
            msg="weight of the histogram negative log-likelihood added to the CRPS loss "
            "(0 = the paper's pure CRPS)",
        ),
        temperature_scaling=Param(
            bool, True,
            msg="fit a softmax temperature on the validation split (paper Sec. 4.4); "
            "False keeps T = 1",
        ),
        temperature_objective=Option(
            str, "pit_ks", check=one_of("pit_ks", "nll"),
            msg="what the temperature minimises on the validation split: 'pit_ks' (KS distance "
            "of the PITs from uniform) or 'nll' (the paper's choice; outlier-dominated with "
            "fine bins, see rail.deepz.calibration)",
        ),
        features=Option(
            list, ["mags", "colors", "errors", "color_errors"], check=_check_blocks,
            msg=f"input feature blocks, a subset of {FEATURE_BLOCKS}; 'valid' (detection "
            "indicators) is added automatically with missing_policy='mask'",
        ),
    )
    config_options.update({k: v.copy() for k, v in ENSEMBLE_OPTIONS.items()})
    config_options.update(augment_options())

    def automatic_training(self, train_config: TrainConfig, n_train: int | None) -> TrainConfig:
        """``train_config`` with ``batch_size`` / ``lr`` left at 0 set by :func:`automatic_batch_lr`
        for ``n_train`` objects (None before the data is read: the values checked at construction)."""
        batch, lr = automatic_batch_lr(n_train or 0)
        return replace(train_config, batch_size=int(self.config.batch_size) or batch,
                       lr=float(self.config.lr) or lr)

    def _fit(self, data: Mapping, z: np.ndarray, val_mask):
        import torch
        from rail.deepz.nets.nnc import NNCNetwork
        from rail.deepz.mixtures import binned_crps, binned_nll
        from rail.deepz.training import concat_outputs, predict_batched, split_indices, train_model
        cfg = self.config
        train_config = self.automatic_training(self.train_config, len(z))
        auto = [k for k in ("batch_size", "lr") if not getattr(cfg, k)]
        if auto:
            self.log.info(f"automatic for {len(z)} training objects: batch_size={train_config.batch_size}, "
                          f"lr={train_config.lr:g}")
        blocks = _feature_blocks(cfg.features, cfg.missing_policy)
        mask = cfg.missing_policy == "mask"
        phot = self._photometry(data)
        x, fvalid = phot.masked_features(blocks, mask)
        tr, va = split_indices(len(z), cfg.val_fraction, cfg.seed, val_mask)
        scaler = fit_standardizer(x, fvalid, tr)
        xs = scaler.transform(x, fvalid)
        nbins = _n_bins(cfg)
        edges = np.linspace(cfg.zmin, cfg.zmax, nbins + 1)
        centers = torch.as_tensor(0.5 * (edges[1:] + edges[:-1]), dtype=torch.float32)
        edges_t = torch.as_tensor(edges, dtype=torch.float32)
        nll_weight = float(cfg.nll_weight)
        settings = photometry_settings(cfg)

        def features(p):
            return [scaler.transform(*p.masked_features(blocks, mask))]

        # early stopping and the temperature see the validation split at the test depth (augment_depth)
        x_va = (validation_at_depth(cfg, settings, phot, va, features) or [xs[va]])[0]

        def fit_one(m, seed, rows):
            torch.manual_seed(seed)
            net = NNCNetwork(xs.shape[1], list(cfg.hidden_layers), nbins, cfg.dropout, cfg.smoothing_bins)
            on_device = {}

            def loss_fn(logits, zb):
                key = logits.device
                if key not in on_device:
                    on_device[key] = (centers.to(key), edges_t.to(key))
                c_dev, e_dev = on_device[key]
                probs = net.probs(logits.float())
                loss = binned_crps(probs, zb, c_dev, from_logits=False)
                if nll_weight > 0:
                    loss = loss + nll_weight * binned_nll(probs, zb, e_dev)
                return loss

            resample = make_resampler(cfg, settings, phot, rows, seed, features)
            res = train_model(net, loss_fn, [xs[rows]], z[rows], [x_va], z[va], replace(train_config, seed=seed),
                              resample=resample)
            return net, res

        fitted = fit_members(cfg.n_members, cfg.seed, tr, cfg.bootstrap, fit_one, self.log)
        nets = [f[0] for f in fitted]
        temperature = 1.0
        diagnostics = {}
        if cfg.temperature_scaling or len(nets) > 1:
            for net in nets:
                net.to("cpu")
            val_logits = np.concatenate(
                [concat_outputs(predict_batched(net, [x_va], torch.device("cpu"))).numpy() for net in nets], axis=1)
            probs_fn = nets[0].probs if len(nets) == 1 else pooled_probs(nets[0].smoother, len(nets), nbins)
        if cfg.temperature_scaling:
            temperature = fit_temperature(val_logits, z[va], edges, cfg.temperature_objective, probs_fn=probs_fn)
            self.log.info(f"temperature scaling: T = {temperature:.3f}")
        if len(nets) > 1:  # the pooled ensemble's calibration on the validation split, before and after T
            with torch.no_grad():
                lg = torch.as_tensor(val_logits)
                diagnostics = {"val_pit_ks_pooled_T1": ks_uniform(binned_pit(probs_fn(lg).numpy(), edges, z[va])),
                               "val_pit_ks_pooled": ks_uniform(binned_pit(probs_fn(lg / temperature).numpy(),
                                                                           edges, z[va]))}
            self.log.info(f"pooled ensemble of {len(nets)}: validation PIT KS {diagnostics}")
        return self._model_dict(
            arch={
                "in_features": int(xs.shape[1]),
                "hidden": [int(h) for h in cfg.hidden_layers],
                "n_bins": int(nbins),
                "dropout": float(cfg.dropout),
                "smoothing_bins": float(cfg.smoothing_bins),
                "features": blocks,
                # masked features zeroed after standardisation (absent in older models: not zeroed)
                "mask_features": mask,
            },
            edges=edges,
            temperature=temperature,
            **members_payload(nets, [f[1].to_dict() for f in fitted], diagnostics),
            scalers={"x": scaler.to_dict()},
            train=dict(fitted[0][1].to_dict(), batch_size=int(train_config.batch_size), lr=float(train_config.lr),
                       automatic=auto),
        )


class DeepzNNCEstimator(DeepzEstimator):
    """Estimate binned redshift PDFs with a trained NNC model; emits ``qp.hist``."""

    name = "DeepzNNCEstimator"
    interactive_function = "deepz_nnc_estimator"
    method = "nnc"
    config_options = DeepzEstimator.config_options.copy()
    config_options.update(
        qp_representation=Option(
            str, "hist", check=one_of("hist", "interp"),
            msg="'hist' (exact histogram) or 'interp' (density at bin centres)",
        ),
        mode_window=Option(
            float, 0.06, check=NON_NEGATIVE,
            msg="width (redshift units) of the window whose centre is zmode: the window of this "
            "width holding the most probability per bin; 0 = centre of the most probable bin",
        ),
    )

    def _build_network(self, model):
        import torch
        from rail.deepz.mixtures import BinSmoother
        from rail.deepz.nets.nnc import NNCNetwork
        from rail.deepz.nets.pooling import ProbabilityPool
        from rail.deepz.training import fuse_linear_batchnorm
        arch = model["arch"]

        def make(state_dict):
            net = NNCNetwork(arch["in_features"], arch["hidden"], arch["n_bins"], arch["dropout"],
                             arch.get("smoothing_bins", 0.0))
            net.load_state_dict(state_dict)
            # inference-only rewrites, exact up to float rounding: batch norms folded into the
            # linear layers, and the softmax temperature into the head (logits / T)
            fuse_linear_batchnorm(net)
            with torch.no_grad():
                net.head.linear.weight.div_(model["temperature"])
                net.head.linear.bias.div_(model["temperature"])
            return net

        nets = build_members(model, self.name, make)
        self.scaler = Standardizer.from_dict(model["scalers"]["x"])
        # logits (or pooled softmax probabilities) come back to host memory; smooth them there
        self.smoother = BinSmoother(arch["n_bins"], arch.get("smoothing_bins", 0.0))
        self.pooled = len(nets) > 1
        # an ensemble: the members' softmax probabilities averaged on the device, smoothed after
        # (the smoothing is linear, so smoothing the average = averaging the smoothed members)
        return ProbabilityPool(nets, lambda net, logits: torch.softmax(logits, dim=-1)) if self.pooled else nets[0]

    def _estimate_chunk(self, data: Mapping):
        import torch
        from rail.deepz.pdf import binned_ensemble
        from rail.deepz.training import concat_outputs, predict_batched
        arch = self.model["arch"]
        x = self.scaler.transform(*self._photometry(data).masked_features(
            arch["features"], arch.get("mask_features", False)))
        logits = concat_outputs(
            predict_batched(self.net, [x], self.torch_device, self.inference_batch_size,
                            self.config.mixed_precision)
        )
        with torch.no_grad():  # temperature is in the head; softmax + smoothing block by block
            prob_fn = self.smoother if self.pooled else (lambda x: self.smoother(torch.softmax(x, dim=-1)))
            return binned_ensemble(logits, self.model["edges"], self.config.qp_representation,
                                   mode_window=self.config.mode_window, prob_fn=prob_fn)
