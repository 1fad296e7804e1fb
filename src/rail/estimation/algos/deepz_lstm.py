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

Beyond the paper (which drops objects lacking any band):

* ``missing_policy="mask"`` (default here): a missing, NaN or non-detected band becomes a
  *masked step*: its flux/error inputs are replaced by a learned per-band token and its
  validity flag is 0, so every object gets a PDF whatever bands it lacks;
* ``band_dropout``: during training each band of each object is masked with this
  probability, so the network learns to widen its PDFs when bands are absent (measured in
  ``tests/test_lstm.py``: removing bands at estimate time broadens the PDFs and keeps
  them finite and normalised);
* ``width_calibration="pit_ks"``: one factor on all component widths, fitted on the
  validation split so that the validation PITs are closest to uniform (the MDN trained with
  NLL and dropout gives over-dispersed PDFs on DC2, with or without band dropout: inverted-U
  PIT histogram, test PIT KS 0.051-0.053; the fitted factor ~0.7 brings it to 0.019-0.022).
  Means and weights are unchanged;
* ``flux_transform="asinh"``: asinh-scaled fluxes and log errors instead of linear
  standardisation (see :mod:`rail.deepz.sequences`).

Defaults that differ from the paper, and why (DC2, 10,225 train / 20,449 test, 1 thread on
a shared 2-core machine, so times are with contention; point estimate zmode; "train s"
is the stage's inform time):

==========================================  =========  ======  =========  =======  =======
setting                                     sigma_IQR  eta     PIT KS     epochs   train s
==========================================  =========  ======  =========  =======  =======
paper: BiLSTM 128/64, linear, no band drop  0.0209     0.0247  0.051      129      538
  + width calibration                       0.0209     0.0246  0.022      129      538
64/32, asinh, no band dropout, width cal.   0.0210     0.0255  0.022      171      706
64/32, asinh, band_dropout 0.1,            0.0223     0.0259  0.019      141      306
width calibration, aggregation 'last'
  the same with 'flatten'                   0.0213     0.0250  0.019      121      124
  + one-cycle lr 3e-3 over 40 epochs        0.0223     0.0231  0.029      40       45
  + dropout 0.1                             0.0203     0.0246  0.023      40       45
default: + dropout 0, seed 42              0.01945    0.0261  0.024      40       42
  the same, seed 1                          0.01918    0.0249  0.024      40       38
  the same, seed 2                          0.01905    0.0260  0.011      40       38
==========================================  =========  ======  =========  =======  =======

* ``lr_schedule="onecycle"``, ``lr=3e-3``, ``epochs=40`` (paper: Adam 1e-3, x0.1 every 50
  epochs, early stopping with patience 20, which ran ~120 epochs): a warm-up to 3e-3 and
  a cosine decay over 40 epochs reaches the same loss in a third of the time. The step
  schedule cut short (x0.1 every 20 epochs) gave 0.0264, a plateau schedule 0.0231,
  batches of 512 with lr 2e-3 0.0233 in 188 s (a CPU LSTM epoch does not get cheaper with
  bigger batches).
* ``dropout=0`` (paper: 0.3): with band dropout and the short schedule, dropout only blurs
  the mixture (0.3: 0.0223, 0.1: 0.0203, 0: 0.0191-0.0195 over three seeds). Outlier rate (RAIL's definition) 0.094-0.096
  vs 0.093 with dropout 0.3. On BOSS (same settings, ``benchmarks/accuracy.py``'s
  harness): sigma_IQR 0.0182, outlier rate 0.060, PIT KS 0.016, inform 85 s (the 300-epoch
  step schedule with dropout 0.3: 0.0189, 0.058, 0.025, 207 s).
* Tried and not kept: the CRPS loss plus 0.1 x NLL (``loss="crps", aux_loss_weight=0.1``;
  0.0212 with the paper's schedule in 198 s, 0.0202 vs 0.0203 with one-cycle and dropout
  0.1), bf16 autocast in training (no faster on CPU), 32/16 units (0.0262), ``mean``
  aggregation (0.0224).

Bands removed at estimate time (set to 99; 6,000 random DC2 test objects, zmode
sigma_NMAD / PIT KS / median zstd): the default model gives 0.020/0.030/0.059 with all
bands, 0.031/0.042/0.108 without u and y, 0.032/0.014/0.107 without r (the previous
default, 300-epoch step schedule with dropout 0.3: 0.022/0.025/0.049, 0.033/0.033/0.090,
0.034/0.016/0.110). A network trained without band dropout (dropout 0.3, step schedule,
before width calibration) gives 0.021/0.025/0.049, then 0.173/0.302/0.140 without u and
y and 0.243/0.515/0.050 without r: confidently wrong PDFs. Band dropout is what makes
missing bands degrade gracefully.

* ``aggregation="flatten"`` (paper: the last hidden states): the dense layer sees the
  last LSTM layer's outputs at every band, not only the two end states. Measured with the
  paper's step schedule and dropout 0.3 (before the two changes above): DC2 sigma_IQR
  0.0213 / 0.0214 (seeds 42 / 1) vs 0.0223 / 0.0222 with ``last``, RAIL outlier rate 0.093
  vs 0.094, training 124-126 s vs 139-142 s (1 thread, two runs at a time); ``mean``
  gave 0.0224. On BOSS: 0.0189 vs 0.0188, outlier rate 0.058 vs 0.057, PIT KS 0.025 vs
  0.009 (both within 0.03). On zCOSMOS (12 bands, benchmarks/zcosmos_ablation.py, 40
  epochs) the all-band sigma_NMAD (zmean) is 0.0165 vs 0.0233 with ``last``: the end states
  of a 12-step sequence lose what the middle bands carry. It costs inference speed: 26k vs
  29k objects/s at 1e7 rows (benchmarks/results/speed_memory.md).
* ``lstm_units=[64, 32]``: the paper's 128/64 BiLSTM runs at ~9k objects/s (network only,
  1 thread, 20k objects of 6 bands), below the 20k/s target; 64/32 runs at ~25k/s and
  trains in about half the time, for +0.0014 in sigma_IQR on DC2.
* ``flux_transform="asinh"``: on 3,000 DC2 objects (small net, 30 epochs) linear
  standardisation gave sigma_NMAD 0.17 vs 0.10 with asinh.
* ``band_dropout=0.1`` and ``width_calibration="pit_ks"``: see above; band dropout costs
  ~0.001 in full-band sigma_IQR and buys graceful degradation with missing bands. The
  64/32 network without band dropout matches the paper's 128/64 (0.0210 vs 0.0209).

Output: ``qp.mixmod`` (exact mixture) with ancil zmean (the paper's point estimate),
zmode, zmedian, zstd, quantiles and ``p_outside``. **Mass below zmin (z < 0):** the mixture
means are unbounded, so a Gaussian near z = 0 puts some mass below 0. With ``mixmod`` the
mixture is emitted untruncated and that mass is reported in the ancil ``p_outside``; all
point estimates and quantiles in the ancil are those of the PDF truncated to
[zmin, zmax] and renormalised (never negative). ``qp_representation="interp"`` emits the
truncated, renormalised PDF itself on ``nzbins`` points. On DC2 the mean mass outside
[0, 3] is 0.0005 per object.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from ceci.config import StageParameter as Param
from scipy.special import ndtr
from torch import nn

from rail.deepz.calibration import ks_uniform
from rail.deepz.mixtures import GaussianMixtureHead, gmm_crps, gmm_nll
from rail.deepz.pdf import mixture_ensemble
from rail.deepz.sequences import FLUX_TRANSFORMS, N_CHANNELS, BandSequencer, band_order
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
    positive_int_list,
    positive_int_list_or_empty,
    with_defaults,
)
from rail.deepz.training import (
    batchnorm_affine,
    concat_outputs,
    fold_input_affine_,
    predict_batched,
    split_indices,
    train_model,
)

AGGREGATIONS = ("last", "mean", "attention", "flatten")
LOSSES = ("nll", "crps")
WIDTH_CALIBRATIONS = ("pit_ks", "none")


def mixture_pit(weights, means, sigmas, z) -> np.ndarray:
    """PIT values (CDF at the true redshift) of Gaussian mixtures (N, K), vectorised."""
    return (weights * ndtr((np.asarray(z)[:, None] - means) / sigmas)).sum(1)


def fit_sigma_scale(weights, means, sigmas, z, bounds=(0.3, 3.0), n_grid: int = 81) -> float:
    """Common factor on all component widths that makes validation PITs closest to uniform (KS).

    A post-hoc width calibration (the mixture analogue of temperature scaling): the means
    and weights, hence zmode and zmean, are unchanged.
    """
    w, mu, s = (np.asarray(a, dtype=np.float64) for a in (weights, means, sigmas))
    grid = np.exp(np.linspace(np.log(bounds[0]), np.log(bounds[1]), n_grid))
    ks = [ks_uniform(mixture_pit(w, mu, s * f, z)) for f in grid]  # loop over 81 factors, not objects
    return float(grid[int(np.argmin(ks))])


class LSTMMDN(nn.Module):
    """Stacked (Bi)LSTM over band steps -> aggregation -> dense -> Gaussian mixture head.

    Parameters
    ----------
    n_bands : int
        Sequence length (number of bands).
    lstm_units : list of int
        Hidden units per direction of each stacked LSTM layer.
    bidirectional : bool
        Bidirectional LSTMs (paper) or forward only.
    dropout : float
        Dropout after each LSTM layer (and after the dense layers).
    batch_norm : bool
        Batch normalisation of the LSTM outputs after each layer (paper).
    aggregation : {"last", "mean", "attention", "flatten"}
        How the last layer's outputs become one vector: ``last`` = final hidden state of
        each direction (paper, Keras ``return_sequences=False``), ``mean`` = average over
        steps, ``attention`` = learned softmax weights over steps, ``flatten`` = all steps
        concatenated.
    dense_units : list of int
        Widths of the ReLU dense layers before the mixture head.
    n_components : int
        Number of Gaussians K.
    zmin, zmax : float
        Range over which the initial component means are spread.
    min_sigma : float
        Floor on component widths.
    """

    def __init__(self, n_bands: int, lstm_units, bidirectional: bool = True, dropout: float = 0.3,
                 batch_norm: bool = True, aggregation: str = "last", dense_units=(64,),
                 n_components: int = 15, zmin: float = 0.0, zmax: float = 3.0, min_sigma: float = 1e-3):
        super().__init__()
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"Option 'aggregation'={aggregation!r} is not one of {AGGREGATIONS}")
        if not lstm_units:
            raise ValueError("Option 'lstm_units' must list at least one layer width")
        self.n_bands = n_bands
        self.aggregation = aggregation
        self.bidirectional = bool(bidirectional)
        ndir = 2 if bidirectional else 1
        # learned stand-in for the (flux, error) inputs of a masked band
        self.missing_token = nn.Parameter(torch.zeros(n_bands, N_CHANNELS - 1))
        self.lstms = nn.ModuleList()
        self.norms = nn.ModuleList()
        self.drop = nn.Dropout(dropout)
        width = N_CHANNELS
        for units in lstm_units:
            self.lstms.append(nn.LSTM(width, int(units), batch_first=True, bidirectional=self.bidirectional))
            width = ndir * int(units)
            self.norms.append(nn.BatchNorm1d(width) if batch_norm else nn.Identity())
        self.hidden = int(lstm_units[-1])
        if aggregation == "attention":
            self.attn = nn.Linear(width, 1)
        agg_width = width * n_bands if aggregation == "flatten" else width
        layers = []
        for units in dense_units:
            layers += [nn.Linear(agg_width, int(units)), nn.ReLU(), nn.Dropout(dropout)]
            agg_width = int(units)
        self.dense = nn.Sequential(*layers)
        self.head = GaussianMixtureHead(agg_width, n_components, min_sigma=min_sigma, mean_init=(zmin, zmax))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Sequences (N, B, 3) -> aggregated features (N, F)."""
        valid = x[..., 2:3]
        feats = x[..., :2] * valid + self.missing_token * (1.0 - valid)
        h = torch.cat([feats, valid], dim=-1)
        for lstm, norm in zip(self.lstms, self.norms):
            h, _ = lstm(h)
            h = self.drop(h)
            if isinstance(norm, nn.BatchNorm1d):
                h = norm(h.transpose(1, 2)).transpose(1, 2)
        if self.aggregation == "last":
            if self.bidirectional:
                # forward direction ends at the last step, backward at the first
                return torch.cat([h[:, -1, : self.hidden], h[:, 0, self.hidden:]], dim=-1)
            return h[:, -1]
        if self.aggregation == "mean":
            return h.mean(dim=1)
        if self.aggregation == "attention":
            a = torch.softmax(self.attn(h), dim=1)
            return (a * h).sum(dim=1)
        return h.reshape(h.shape[0], -1)

    def forward(self, x: torch.Tensor):
        return self.head(self.dense(self.encode(x)))

    def fold_batch_norms(self) -> "LSTMMDN":
        """Inference only: fold each eval-mode batch norm into the layer that reads its output
        (the next LSTM's input projection; after the last LSTM, the first dense layer or the
        mixture head), in place; puts the module in eval mode and returns it.

        Same outputs up to float rounding, without the batch-norm passes and the transposed
        copies around them. With ``aggregation='attention'`` the last norm is kept (the
        attention scores read the normalised outputs too).
        """
        self.eval()
        for i, norm in enumerate(self.norms):
            if not isinstance(norm, nn.BatchNorm1d):
                continue
            scale, shift = batchnorm_affine(norm)
            if i + 1 < len(self.lstms):
                nxt = self.lstms[i + 1]
                sfx = ["_l0", "_l0_reverse"] if nxt.bidirectional else ["_l0"]
                targets = [(getattr(nxt, "weight_ih" + x), getattr(nxt, "bias_ih" + x)) for x in sfx]
            elif self.aggregation == "attention":
                continue
            else:
                if self.aggregation == "flatten":  # features are step-major: (step, channel)
                    scale, shift = scale.repeat(self.n_bands), shift.repeat(self.n_bands)
                linears = [m for m in self.dense if isinstance(m, nn.Linear)][:1] or [
                    self.head.logits, self.head.mu, self.head.raw_sigma]
                targets = [(lin.weight, lin.bias) for lin in linears]
            for weight, bias in targets:
                fold_input_affine_(weight, bias, scale, shift)
            self.norms[i] = nn.Identity()
        return self


def make_band_dropout(p: float):
    """Training augmentation: mask each band of each object with probability ``p``."""

    def augment(batch):
        x = batch[0]
        drop = torch.rand(x.shape[:2], device=x.device) < p
        x = x.clone()
        x[..., 2] = x[..., 2] * (~drop).to(x.dtype)
        x[..., :2] = x[..., :2] * x[..., 2:3]
        return [x, *batch[1:]]

    return augment


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

    def __init__(self, args, **kwargs):
        super().__init__(args, **kwargs)
        band_order(self.config.bands, self.config.wavelengths)  # one wavelength per band

    def _fit(self, data: Mapping, z: np.ndarray, val_mask):
        cfg = self.config
        order = band_order(cfg.bands, cfg.wavelengths)
        phot = self._photometry(data)
        tr, va = split_indices(len(z), cfg.val_fraction, cfg.seed, val_mask)
        policy = cfg.missing_policy
        fit_valid = phot.valid if policy == "mask" else np.ones_like(phot.valid)
        sequencer = BandSequencer(order, cfg.flux_transform)
        sequencer.fit(_subset(phot, tr), fit_valid[tr])
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
        torch.manual_seed(cfg.seed)
        net = LSTMMDN(**arch)
        main_loss, aux_loss = (gmm_nll, gmm_crps) if cfg.loss == "nll" else (gmm_crps, gmm_nll)
        aux_w = float(cfg.aux_loss_weight)

        def loss_fn(out, zb):
            loss = main_loss(out, zb)
            return loss + aux_w * aux_loss(out, zb) if aux_w > 0 else loss
        augment = make_band_dropout(cfg.band_dropout) if (policy == "mask" and cfg.band_dropout > 0) else None
        result = train_model(net, loss_fn, [x[tr]], z[tr], [x[va]], z[va], self.train_config, augment=augment)
        sigma_scale = 1.0
        if cfg.width_calibration == "pit_ks":
            net.to("cpu")
            w, mu, sig = concat_outputs(predict_batched(net, [x[va]], torch.device("cpu"))).detach_numpy()
            sigma_scale = fit_sigma_scale(w, mu, sig, z[va])
            self.log.info(f"width calibration: sigma x {sigma_scale:.3f}")
        return self._model_dict(
            arch=arch,
            loss=cfg.loss,
            sigma_scale=sigma_scale,
            band_dropout=float(cfg.band_dropout),
            wavelengths=[float(w) for w in cfg.wavelengths],
            state_dict={k: v.detach().cpu() for k, v in net.state_dict().items()},
            scalers={"sequence": sequencer.to_dict()},
            train=result.to_dict(),
        )


def _subset(phot, idx):
    from rail.deepz.photometry import Photometry

    return Photometry(bands=phot.bands, mags=phot.mags[idx], errs=phot.errs[idx], valid=phot.valid[idx])


class DeepzLSTMEstimator(_SequenceMixin, DeepzEstimator):
    """Estimate redshift PDFs (Gaussian mixtures) with a trained LSTM-MDN model."""

    name = "DeepzLSTMEstimator"
    interactive_function = "deepz_lstm_estimator"
    method = "lstm"
    # torch's CPU LSTM (oneDNN) allocates per-call buffers of ~8.5 and ~9.6 kB per object for the
    # default 64/32 bidirectional network (strace: 35 and 39 MB at 4096 objects): above glibc's
    # 32 MB mmap threshold, so every batch maps and page-faults fresh memory; 2048 keeps them on
    # the heap (500k DC2 rows, 2 threads: 45-47k -> 56-58k objects/s, benchmarks/README.md)
    auto_batch_cpu = 2048
    config_options = DeepzEstimator.config_options.copy()
    config_options.update({k: v.copy() for k, v in MIXTURE_OUTPUT_OPTIONS.items()})

    def _build_network(self, model):
        net = LSTMMDN(**model["arch"])
        net.load_state_dict(model["state_dict"])
        self.sequencer = BandSequencer.from_dict(model["scalers"]["sequence"])
        return net.fold_batch_norms()

    def _estimate_chunk(self, data: Mapping):
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
