"""Embedding MDN with SOM flags (after the SOM + foundation-model paper, Moran et al.).

:class:`DeepzEmbedInformer` / :class:`DeepzEmbedEstimator` (method ``"embed"``): a
pluggable encoder (:mod:`rail.deepz.encoders`: precomputed embedding columns, a small
autoencoder trained at inform time, or a local foundation model) gives an embedding; a
4-layer dense network maps the standardised embedding to the weights of evenly spaced
Gaussians of fixed width (paper: sigma = 0.0037) over [zmin, zmax], trained on the exact
mixture CRPS. The PDF is the mixture (``qp.mixmod``, exact;
:func:`rail.deepz.pdf.fixed_grid_ensemble`) with ancil zmode/zmean/zmedian/zstd/quantiles/
p_outside of the PDF restricted to [zmin, zmax]. At inform time a SOM
(:mod:`rail.deepz.som`) is trained on catalog features of the training sample, or of a
separate (larger, unlabelled) reference sample
(``som_reference`` path, or ``inform(training_data, reference=table)``), and its per-cell
statistics are measured on the validation split. The estimator adds the ancil
``som_cell``, ``som_dist``, ``som_train_count``, ``flag_ood`` and ``flag_underperforming``.
The same flags for any other estimator's PDFs: :mod:`rail.estimation.algos.deepz_somflag`.

Paper settings: 200 Gaussians, sigma 0.0037, CRPS loss, 4 dense layers (here three
hidden layers of 256 + the output layer), 10% validation hold-out. The SOM grid
size and the flag thresholds are not given in the paper; ours are options, the grid by default
sized from the validation split (``som_shape=[]``, :func:`rail.deepz.som_options.auto_som_side`).

Departure: ``nll_weight=0.1``, the loss is the CRPS plus 0.1 x the mixture negative
log-likelihood (as for NNC): the CRPS constrains the CDF only and leaves the density near
the peak loose (measured in ``benchmarks/results/ablations_embed.md``). ``nll_weight=0``
restores the paper's loss.

Departure: the width of the Gaussians follows the range. The paper's 200 Gaussians of sigma
0.0037 on z < 1.6 are ~2.2 sigma apart; 200 of that width on [0, 3] would be 4.1 sigma apart and
the PDFs combs (one peak per Gaussian). By default (``component_sigma=0``) the width is the
spacing / ``basis_spacing`` (2): sigma = 0.0075 for 200 Gaussians on [0, 3], 0.0030 on [0, 1.2],
0.0040 on the paper's [0, 1.6]. Alternatively ``n_components=0`` with a given width derives the
count (:func:`rail.deepz.gmm.fixed_grid_size`); an explicit pair spaced wider than
``basis_spacing`` sigma is refused. Models trained before keep their own count and width (stored in
the model file). Measured in ``benchmarks/results/ablations_embed.md``.

Calibration (``width_calibration``, off by default): the envelope of a fixed-grid PDF is set
by the weights, so ``'temperature'`` fits one temperature on the component logits (weights
w^(1/T), renormalised; for an ensemble each member's, then pooled), the analogue of NNC's
softmax temperature. ``'pit_ks'`` fits one factor on the component width but never one that
spaces the Gaussians more than ``basis_spacing`` widths apart: narrower components only
sharpen the teeth of a comb, which the PIT statistic it minimises does not see.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Mapping

import numpy as np
from ceci.config import StageParameter as Param

from rail.deepz.augment import augment_options, check_augment_options, make_resampler, validation_at_depth
from rail.deepz.calibration import fit_sigma_scale, fit_temperature, ks_uniform
from rail.deepz.ensemble import (
    ENSEMBLE_OPTIONS,
    build_members,
    fit_members,
    members_payload,
)
from rail.deepz.encoders import ENCODER_KINDS, encoder_from_dict, make_encoder
from rail.deepz.scaling import Standardizer
from rail.deepz.som import SOMFlagModel, needs_photometry, som_feature_matrix
from rail.deepz.som_options import SOM_OPTIONS, read_reference, som_settings
from rail.deepz.stages import (
    MIXTURE_REPRESENTATIONS,
    check_option_choice,
    DeepzEstimator,
    DeepzInformer,
    ModelFormatError,
    Option,
    one_of,
    photometry_settings,
    with_defaults,
)

# ----------------------------------------------------------------- options

ENCODER_OPTIONS = dict(
    encoder=Param(
        str, "autoencoder",
        msg=f"embedding encoder, one of {ENCODER_KINDS}: 'columns' = precomputed embedding columns "
        "of the input; 'autoencoder' = small autoencoder trained at inform time on the input "
        "photometry (and cutouts); 'foundation' = pretrained model loaded from foundation_path",
    ),
    embedding_columns=Param(
        list, [],
        msg="encoder='columns': the embedding column names (D scalar columns, or one 2-D (N, D) column)",
    ),
    ae_features=Param(list, ["mags", "colors"], msg="encoder='autoencoder': photometric feature blocks"),
    ae_hidden=Param(list, [64, 64], msg="encoder='autoencoder': hidden widths (mirrored in the decoder)"),
    ae_latent_dim=Param(int, 16, msg="encoder='autoencoder': dimension of the photometric latent"),
    ae_image_column=Param(
        str, "",
        msg="encoder='autoencoder': optional image column (N, C, H, W); adds a conv encoder branch",
    ),
    ae_image_latent_dim=Param(int, 8, msg="encoder='autoencoder': dimension of the image latent"),
    ae_epochs=Param(int, 100, msg="encoder='autoencoder': maximum training epochs"),
    ae_lr=Param(float, 1e-3, msg="encoder='autoencoder': learning rate"),
    ae_batch_size=Param(int, 512, msg="encoder='autoencoder': batch size"),
    foundation_path=Param(
        str, "",
        msg="encoder='foundation': LOCAL path of the model weights (never downloaded)",
    ),
    foundation_format=Param(
        str, "auto",
        msg="encoder='foundation': 'torchscript' (torch.jit file), 'loader' (foundation_loader "
        "builds the model from the path) or 'auto'",
    ),
    foundation_loader=Param(
        str, "",
        msg="encoder='foundation': 'module:function' taking the local path and returning a model "
        "that maps a float32 batch to (N, D) embeddings (e.g. a wrapper around AION/AstroPT)",
    ),
    foundation_inputs=Param(
        list, ["mags", "colors"],
        msg="encoder='foundation': photometric feature blocks fed to the model, or ['image:<column>']",
    ),
)

# ----------------------------------------------------------------- network


# ----------------------------------------------------------------- calibration on the fixed grid


def fit_basis_width_factor(weights, centers, sigma: float, z, basis_spacing: float) -> float:
    """Width factor f (``width_calibration='pit_ks'``) minimising the validation PIT KS, within
    [max(0.3, spacing / (basis_spacing sigma)), 3]: the calibrated width sigma f keeps the
    Gaussians at most ``basis_spacing`` widths apart, as :meth:`DeepzEmbedInformer.basis`
    requires of the basis itself. Narrower components than that only sharpen the teeth of a
    comb (the envelope is set by the weights), which a PIT statistic does not see and the CDE
    loss punishes."""
    centers = np.asarray(centers, dtype=np.float64)
    lowest = float(centers[1] - centers[0]) / (float(basis_spacing) * float(sigma))
    grid = np.broadcast_to(centers, np.shape(weights))
    return fit_sigma_scale(weights, grid, np.full(np.shape(weights), sigma), z, bounds=(max(0.3, lowest), 3.0))


def fit_weight_temperature(member_weights, centers, z) -> tuple[float, np.ndarray]:
    """Temperature T (``width_calibration='temperature'``) of the component weights of one or
    several members (each (N, K)): the pool is the mean over members of w_m^(1/T) / sum, and T
    minimises the KS distance of the validation PITs from uniform
    (:func:`rail.deepz.calibration.fit_temperature`, its PITs taken with each weight spread
    over its cell between the midpoints of the means: the fixed basis's PITs to within
    a fraction of one cell's weight). Returns (T, the pooled calibrated weights)."""
    centers = np.asarray(centers, dtype=np.float64)
    n_members, k = len(member_weights), centers.size
    d = centers[1] - centers[0]
    edges = np.concatenate([centers - d / 2, [centers[-1] + d / 2]])
    logits = np.log(np.clip(np.concatenate([np.asarray(w, np.float32) for w in member_weights], axis=1),
                            1e-30, None))

    import torch

    def pool(lg):
        return torch.softmax(lg.reshape(lg.shape[0], n_members, k), dim=-1).mean(dim=1)

    temperature = fit_temperature(logits, z, edges, "pit_ks", probs_fn=pool)
    with torch.no_grad():
        pooled = pool(torch.as_tensor(logits) / temperature).numpy()
    return temperature, pooled


# ----------------------------------------------------------------- embedding MDN stages


class DeepzEmbedInformer(DeepzInformer):
    """Train the encoder (if it learns), the fixed-grid mixture head and the SOM flags."""

    name = "DeepzEmbedInformer"
    interactive_function = "deepz_embed_informer"
    method = "embed"
    config_options = DeepzInformer.config_options.copy()
    config_options.update(with_defaults(
        {k: DeepzInformer.config_options[k] for k in ("lr", "batch_size", "epochs", "patience")},
        lr=1e-3, batch_size=512, epochs=200, patience=20,
    ))
    config_options.update(ENCODER_OPTIONS)
    config_options.update(
        hidden_layers=Param(
            list, [256, 256, 256],
            msg="hidden widths of the dense network (the paper's 4 dense layers = 3 hidden + output)",
        ),
        dropout=Param(float, 0.0, msg="dropout after each hidden layer"),
        n_components=Param(
            int, 200,
            msg="number of fixed Gaussians, evenly spaced over [zmin, zmax] (both ends included; paper 200); 0 = "
            "the fewest spaced at most basis_spacing x component_sigma (needs component_sigma > 0)",
        ),
        component_sigma=Param(
            float, 0.0,
            msg="fixed width of every Gaussian (redshift units; paper 0.0037); 0 = the spacing of the means / "
            "basis_spacing (0.0075 for 200 on [0, 3])",
        ),
        basis_spacing=Param(
            float, 2.0,
            msg="distance between neighbouring Gaussian means in units of component_sigma: the ratio used to derive "
            "the width (component_sigma=0) or the count (n_components=0), and the most an explicit pair may have "
            "(wider spacings make comb-shaped PDFs; raise this to allow one on purpose)",
        ),
        nll_weight=Param(
            float, 0.1,
            msg="weight of the mixture negative log-likelihood added to the CRPS loss (0 = CRPS only, the "
            "paper's; benchmarks/results/ablations_embed.md)",
        ),
        som_point_estimate=Param(str, "zmode", msg="point estimate used for the per-cell metrics"),
        width_calibration=Option(
            str, "none", check=one_of("temperature", "pit_ks", "none"),
            msg="post-hoc calibration fitted on the validation split so that the PITs are closest to uniform "
            "(KS; rail.deepz.calibration): 'temperature' = one temperature T on the component logits (the "
            "weights become w^(1/T), renormalised; T < 1 sharpens the envelope, the basis stays as trained); "
            "'pit_ks' = one factor on the component width, at least the one that keeps the spacing <= "
            "basis_spacing x width (a narrower basis only sharpens the comb: DC2 CDE loss +5.9 with the "
            "former unbounded factor 0.44, benchmarks/results/accuracy_dc2_ensembles.md), so it can only "
            "broaden; 'none' (default) leaves the PDFs as trained",
        ),
    )
    config_options.update(SOM_OPTIONS)
    config_options.update({k: v.copy() for k, v in ENSEMBLE_OPTIONS.items()})
    config_options.update(augment_options())

    def __init__(self, args, **kwargs):
        super().__init__(args, **kwargs)
        if self.config.encoder not in ENCODER_KINDS:
            raise ValueError(f"Option 'encoder'={self.config.encoder!r} is not one of {ENCODER_KINDS}")
        self.basis()  # the basis options, checked before any data
        if self.config.som_point_estimate not in ("zmode", "zmean", "zmedian"):
            raise ValueError(f"Option 'som_point_estimate'={self.config.som_point_estimate!r} is not zmode/zmean/zmedian")
        som_settings(self.config)
        self._reference = None
        make_encoder(self.config.encoder, self.config)  # the encoder's options, checked before any data

    def basis(self) -> tuple[int, float]:
        """(number of Gaussians, their width) from ``n_components``, ``component_sigma`` and ``basis_spacing``."""
        from rail.deepz.gmm import fixed_grid_size, fixed_grid_spacing
        cfg = self.config
        n, sigma, ratio = cfg.n_components, cfg.component_sigma, cfg.basis_spacing
        if not (np.isfinite(ratio) and ratio > 0):
            raise ValueError(f"Option 'basis_spacing' must be > 0, got {ratio}")
        if not (np.isfinite(sigma) and sigma >= 0):
            raise ValueError(f"Option 'component_sigma' must be > 0 (or 0 = derived from the spacing), got {sigma}")
        if n == 0 and sigma == 0:
            raise ValueError("Options 'n_components' and 'component_sigma' cannot both be 0 (derived): give one")
        if n != 0 and n < 2:
            raise ValueError(f"Option 'n_components' must be 0 (derived) or >= 2, got {n}")
        if sigma == 0:
            return int(n), fixed_grid_spacing(cfg.zmin, cfg.zmax, n) / ratio
        if n == 0:
            return fixed_grid_size(cfg.zmin, cfg.zmax, sigma, ratio), float(sigma)
        spacing = fixed_grid_spacing(cfg.zmin, cfg.zmax, n) / sigma
        if spacing > ratio * (1 + 1e-9):
            need = fixed_grid_size(cfg.zmin, cfg.zmax, sigma, ratio)
            raise ValueError(
                f"Option 'n_components'={n} on [{cfg.zmin:g}, {cfg.zmax:g}] spaces the Gaussians {spacing:.2f} x "
                f"component_sigma={sigma:g} apart, more than basis_spacing={ratio:g} (comb-shaped PDFs): use "
                f"component_sigma=0 (derived from the spacing), n_components=0 (derived, {need} here) or >= {need}, "
                "or a larger basis_spacing"
            )
        return int(n), float(sigma)

    def inform(self, training_data, reference=None, **kwargs):
        """Train the model.

        Parameters
        ----------
        training_data : TableLike
            Labelled training table (photometry, redshift, embedding/image columns).
        reference : TableLike, optional
            Reference sample (possibly unlabelled) for the SOM; overrides ``som_reference``.

        Returns
        -------
        ModelHandle
            The trained model.
        """
        self._reference = reference
        return super().inform(training_data, **kwargs)

    def _fit(self, data: Mapping, z: np.ndarray, val_mask):
        import torch
        from rail.deepz.nets.embed import EmbedMDN
        from rail.deepz.mixtures import (
            MixtureParams,
            fixed_grid_centers,
            fixed_grid_crps,
            fixed_grid_pair_matrix,
            gmm_nll,
        )
        from rail.deepz.training import concat_outputs, predict_batched, split_indices, train_model
        from rail.deepz.pdf import fixed_grid_pit, fixed_grid_summaries
        cfg = self.config
        if cfg.nll_weight < 0:
            raise ValueError(f"Option 'nll_weight' must be >= 0, got {cfg.nll_weight}")
        encoder = make_encoder(cfg.encoder, cfg)
        phot = None
        if encoder.needs_photometry or needs_photometry(cfg.som_features):
            phot = self._photometry(data)
        tr, va = split_indices(len(z), cfg.val_fraction, cfg.seed, val_mask)
        encoder.fit(data, phot, tr, va, self.train_config)
        emb = encoder.encode(data, phot, device=cfg.device)
        scaler = Standardizer().fit(emb[tr])
        xs = scaler.transform(emb)
        n_basis, sigma = self.basis()
        centers = torch.as_tensor(fixed_grid_centers(cfg.zmin, cfg.zmax, n_basis))
        pair = fixed_grid_pair_matrix(centers, sigma)
        cache = {}
        nll_weight = float(cfg.nll_weight)

        def loss_fn(w, zb):
            if w.device not in cache:
                cache[w.device] = (centers.to(w.device, torch.float32), pair.to(w.device, torch.float32))
            c, m = cache[w.device]
            loss = fixed_grid_crps(w.float(), zb, c, sigma, m)
            if nll_weight > 0:
                params = MixtureParams(w.float(), c.expand_as(w), torch.full_like(w, sigma, dtype=torch.float32))
                loss = loss + nll_weight * gmm_nll(params, zb)
            return loss

        augmenting = check_augment_options(cfg, list(cfg.bands))
        if augmenting and not encoder.needs_photometry:
            raise ValueError(f"Options 'augment_errors'/'augment_depth' resample photometry, but encoder={cfg.encoder!r} "
                             "does not read any: turn them off or use an encoder of the photometry")
        x_som = som_feature_matrix(data, phot, cfg.som_features)

        def validation_inputs(p):
            """The validation rows' scaled embedding and SOM features from their photometry ``p``."""
            va_data = {k: np.asarray(v)[va] for k, v in data.items()}
            return [scaler.transform(encoder.encode(va_data, p, device=cfg.device)),
                    som_feature_matrix(va_data, p, cfg.som_features)]

        # early stopping, the calibration and the SOM flags' validation statistics see the validation
        # split at the test depth (augment_depth); the encoder stays the one fitted on the measured data
        x_va, x_som_va = (validation_at_depth(cfg, photometry_settings(cfg), phot, va, validation_inputs)
                          or [xs[va], x_som[va]])

        def fit_one(m, seed, rows):
            torch.manual_seed(seed)
            net = EmbedMDN(xs.shape[1], list(cfg.hidden_layers), cfg.zmin, cfg.zmax, n_basis, sigma, cfg.dropout)
            resample = None
            if augmenting:  # the (fixed) encoder re-encodes each epoch's redrawn photometry
                rows_data = {k: np.asarray(v)[rows] for k, v in data.items()}
                resample = make_resampler(cfg, photometry_settings(cfg), phot, rows, seed, lambda p: [
                    scaler.transform(encoder.encode(rows_data, p, device=cfg.device))])
            res = train_model(net, loss_fn, [xs[rows]], z[rows], [x_va], z[va],
                              replace(self.train_config, seed=seed), resample=resample)
            net.to("cpu")
            return net, res

        fitted = fit_members(cfg.n_members, cfg.seed, tr, cfg.bootstrap, fit_one, self.log)
        nets = [f[0] for f in fitted]
        # the members share the fixed grid: their pool is the average of the component weights
        member_w = [concat_outputs(predict_batched(net, [x_va], torch.device("cpu"))).numpy() for net in nets]
        w_val = np.mean(member_w, axis=0) if len(nets) > 1 else member_w[0]
        cnp = centers.numpy()
        w_raw, sigma_scale, temperature, diagnostics = w_val, 1.0, 1.0, {}
        if cfg.width_calibration == "pit_ks":
            sigma_scale = fit_basis_width_factor(w_val, cnp, sigma, z[va], cfg.basis_spacing)
            self.log.info(f"width calibration: sigma x {sigma_scale:.3f}")
        elif cfg.width_calibration == "temperature":
            temperature, w_val = fit_weight_temperature(member_w, cnp, z[va])
            self.log.info(f"temperature calibration of the component weights: T = {temperature:.3f}")
        sigma_cal = sigma * sigma_scale
        if len(nets) > 1 or cfg.width_calibration != "none":
            diagnostics = {"val_pit_ks_pooled_raw": ks_uniform(fixed_grid_pit(w_raw, cnp, sigma, z[va])),
                           "val_pit_ks_pooled": ks_uniform(fixed_grid_pit(w_val, cnp, sigma_cal, z[va]))}
            self.log.info(f"pooled ensemble of {len(nets)}: validation PIT KS {diagnostics}")
        # SOM flags from the validation split
        anc = fixed_grid_summaries(w_val, cnp, sigma_cal, cfg.zmin, cfg.zmax)
        pit = fixed_grid_pit(w_val, cnp, sigma_cal, z[va])
        ref = read_reference(self, self._reference, cfg.som_reference, cfg.som_reference_groupname,
                              cfg.som_max_reference, cfg.seed)
        if ref is not None:
            ref_phot = self._photometry(ref) if needs_photometry(cfg.som_features) else None
            x_ref = som_feature_matrix(ref, ref_phot, cfg.som_features)
        else:
            x_ref = x_som[tr]
        flags = SOMFlagModel.build(list(cfg.som_features), x_ref, x_som[tr], x_som_va,
                                   anc[cfg.som_point_estimate], z[va], pit, ref_is_train=ref is None,
                                   **som_settings(cfg, len(va)))
        self.log.info(f"SOM: {flags.summary()}")
        return self._model_dict(
            arch={
                "in_features": int(xs.shape[1]),
                "hidden": [int(h) for h in cfg.hidden_layers],
                "n_components": n_basis,
                "sigma": float(sigma),
                "dropout": float(cfg.dropout),
            },
            encoder=encoder.to_dict(),
            **members_payload(nets, [f[1].to_dict() for f in fitted], diagnostics),
            **({"sigma_scale": sigma_scale} if sigma_scale != 1.0 else {}),
            **({"temperature": temperature} if temperature != 1.0 else {}),
            scalers={"embedding": scaler.to_dict()},
            som=flags.to_dict(),
            som_point_estimate=cfg.som_point_estimate,
            train=fitted[0][1].to_dict(),
        )


class DeepzEmbedEstimator(DeepzEstimator):
    """Fixed-grid mixture PDFs from embeddings (``qp.mixmod``) plus SOM flags in the ancil."""

    name = "DeepzEmbedEstimator"
    interactive_function = "deepz_embed_estimator"
    method = "embed"
    config_options = DeepzEstimator.config_options.copy()
    config_options.update(
        qp_representation=Param(
            str, "mixmod",
            msg="'mixmod' (exact mixture) or 'interp' (PDF sampled on nzbins points over [zmin, zmax]; "
            "use a spacing well below component_sigma)",
        ),
        foundation_path=Param(
            str, "",
            msg="encoder='foundation': local weights path if moved since inform ('' = the model's); "
            "the file must be the same (SHA-256 checked)",
        ),
        foundation_loader=Param(
            str, "",
            msg="encoder='foundation' with a loader function: repeat the model's 'module:function' here to "
            "allow calling it (a model file alone never makes the estimator import and call a function)",
        ),
        som_flags=Param(bool, True, msg="add the SOM ancil (som_cell, som_train_count, flag_ood, ...)"),
    )

    def __init__(self, args, **kwargs):
        super().__init__(args, **kwargs)
        check_option_choice(self.config, "qp_representation", MIXTURE_REPRESENTATIONS)

    def _build_network(self, model):
        import torch

        from rail.deepz.nets.embed import EmbedMDN
        from rail.deepz.nets.pooling import ProbabilityPool
        from rail.deepz.pdf import RepeatedRows
        enc = model["encoder"]
        if enc["kind"] == "foundation":
            if enc.get("loader") and enc["loader"] != self.config.foundation_loader:
                raise ModelFormatError(
                    f"{self.name}: the model's foundation encoder is built by calling {enc['loader']!r}; "
                    "a model file must not be able to run code, so set the option foundation_loader="
                    f"{enc['loader']!r} if you trust it"
                )
            self.encoder = encoder_from_dict(enc, path=self.config.foundation_path or None)
            self.encoder.check_weights()
        else:
            self.encoder = encoder_from_dict(enc)
        self.scaler = Standardizer.from_dict(model["scalers"]["embedding"])
        self.flagger = SOMFlagModel.from_dict(model["som"])
        self._needs_phot = self.encoder.needs_photometry or (
            self.config.som_flags and needs_photometry(self.flagger.features))
        arch = model["arch"]

        def make(state_dict):
            net = EmbedMDN(arch["in_features"], arch["hidden"], model["zmin"], model["zmax"], arch["n_components"],
                           arch["sigma"], arch["dropout"])
            net.load_state_dict(state_dict)
            if model.get("temperature", 1.0) != 1.0:  # weights w^(1/T) renormalised: the logits divided by T
                with torch.no_grad():
                    net.head.logits.weight.div_(model["temperature"])
                    net.head.logits.bias.div_(model["temperature"])
            return net

        nets = build_members(model, self.name, make)
        self._rows = RepeatedRows()
        # several members share the fixed grid: the pool averages their component weights
        return nets[0] if len(nets) == 1 else ProbabilityPool(nets, lambda net, w: w)

    def _estimate_chunk(self, data: Mapping):
        from rail.deepz.training import concat_outputs, predict_batched
        from rail.deepz.mixtures import fixed_grid_centers
        from rail.deepz.pdf import fixed_grid_ensemble
        phot = self._photometry(data) if self._needs_phot else None
        emb = self.encoder.encode(data, phot, device=self.torch_device, batch_size=self.inference_batch_size)
        x = self.scaler.transform(emb)
        w = concat_outputs(
            predict_batched(self.net, [x], self.torch_device, self.inference_batch_size,
                            self.config.mixed_precision)
        ).numpy()
        m = self.model
        centers = fixed_grid_centers(m["zmin"], m["zmax"], m["arch"]["n_components"])
        sigma = m["arch"]["sigma"] * m.get("sigma_scale", 1.0)  # (width calibration of an ensemble)
        ens = fixed_grid_ensemble(w, centers, sigma, m["zmin"], m["zmax"], self.config.nzbins,
                                  self.config.qp_representation, self._rows)
        if self.config.som_flags:
            ens.ancil.update(self.flagger.flag(som_feature_matrix(data, phot, self.flagger.features)))
        return ens
