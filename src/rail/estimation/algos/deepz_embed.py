"""Embedding MDN with SOM flags (after the SOM + foundation-model paper, Moran et al.).

Two pairs of stages:

* :class:`DeepzEmbedInformer` / :class:`DeepzEmbedEstimator` (method ``"embed"``): a
  pluggable encoder (:mod:`rail.deepz.encoders`: precomputed embedding columns, a small
  autoencoder trained at inform time, or a local foundation model) gives an embedding;
  a 4-layer dense network maps the standardised embedding to the weights of 200 evenly
  spaced Gaussians of fixed width (paper: sigma = 0.0037) over [zmin, zmax], trained on
  the exact mixture CRPS. The PDF is the mixture (``qp.mixmod``, exact) with ancil
  zmode/zmean/zmedian/zstd/quantiles/p_outside of the PDF restricted to [zmin, zmax].
  At inform time a SOM (:mod:`rail.deepz.som`) is trained on catalog features of the
  training sample, or of a separate (larger, unlabelled) reference sample
  (``som_reference`` path, or ``inform(training_data, reference=table)``), and its per-cell
  statistics are measured on the validation split. The estimator adds the ancil
  ``som_cell``, ``som_dist``, ``som_train_count``, ``flag_ood`` and
  ``flag_underperforming``.
* :class:`DeepzSOMFlagInformer` / :class:`DeepzSOMFlagger` (method ``"somflag"``): the
  same flags for *any* estimator. The informer takes the estimator's training table (cell
  counts; SOM training sample unless a reference is given), a labelled calibration table
  the estimator was *not* trained on, and the estimator's qp ensemble on that table; the
  flagger takes a qp ensemble and the catalog it was computed from and returns the same
  ensemble with the flag ancil added (e.g. FlexZBoost or BPZ output).

Paper settings: 200 Gaussians, sigma 0.0037, CRPS loss, 4 dense layers (here three
hidden layers of 256 + the 200-wide output layer), 10% validation hold-out. The SOM grid
size and the flag thresholds are not given in the paper; ours are options.

Departure: ``nll_weight=0.1``, the loss is the CRPS plus 0.1 x the mixture negative
log-likelihood (as for NNC). The CRPS constrains the CDF only and leaves the density near
the peak loose: zmode sigma_IQR on DC2 (benchmark harness, autoencoder embedding, 1
thread) 0.0250 / 0.0271 (seeds 42 / 1) with the pure CRPS, 0.0206 / 0.0203 with the NLL
term (0.03: 0.0207); zmedian 0.0187 / 0.0188 (was 0.0246 for seed 1); eta 0.026 / 0.025
unchanged; PIT KS 0.007 / 0.016. SDSS BOSS: zmode 0.0194 vs 0.0200, eta 0.017 vs 0.019,
PIT KS 0.008 vs 0.010. ``nll_weight=0`` restores the paper's loss.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import qp
import tables_io
import torch
from ceci.config import StageParameter as Param
from rail.core.data import QPHandle, TableHandle
from rail.deepz.modelfile import DeepzModelHandle
from scipy.special import ndtr
from torch import nn

from rail.deepz.encoders import ENCODER_KINDS, encoder_from_dict, make_encoder
from rail.deepz.mixtures import (
    FixedGridMixtureHead,
    MixtureParams,
    fixed_grid_crps,
    fixed_grid_pair_matrix,
    gaussian_basis,
    gmm_nll,
)
from rail.deepz.pdf import DEFAULT_QUANTILES, grid_summaries, interp_ensemble
from rail.deepz.scaling import Standardizer
from rail.deepz.som import METRICS, SOMFlagModel, needs_photometry, som_feature_matrix
from rail.deepz.stages import (
    MIXTURE_REPRESENTATIONS,
    check_option_choice,
    PHOTOMETRY_OPTIONS,
    TRAINING_OPTIONS,
    DeepzEstimator,
    DeepzInformer,
    ModelFormatError,
    table_to_numpy_dict,
    with_defaults,
)
from rail.deepz.datasets import subsample
from rail.deepz.training import concat_outputs, predict_batched, split_indices, train_model
from rail.estimation.informer import CatInformer

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

SOM_OPTIONS = dict(
    som_features=Param(
        list, ["colors"],
        msg="catalog features of the SOM: photometric blocks ('colors', 'mags', ...) and/or column names",
    ),
    som_shape=Param(list, [15, 15], msg="SOM grid (rows, columns)"),
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


def _som_settings(cfg) -> dict:
    shape = list(cfg.som_shape)
    if len(shape) != 2:
        raise ValueError(f"Option 'som_shape'={shape} must be two integers")
    bad = [m for m in cfg.som_flag_metrics if m not in METRICS]
    if bad:
        raise ValueError(f"Option 'som_flag_metrics' has unknown metric(s) {bad}; choose from {METRICS}")
    return dict(shape=shape, n_iter=cfg.som_iterations, sigma=cfg.som_sigma, learning_rate=cfg.som_learning_rate,
                seed=cfg.seed, min_train_count=cfg.som_min_train_count, dist_quantile=cfg.som_dist_quantile,
                min_val_count=cfg.som_min_val_count, underperform_sigma=cfg.som_underperform_sigma,
                flag_metrics=list(cfg.som_flag_metrics), n_boot=cfg.som_n_boot)


# ----------------------------------------------------------------- network and PDFs


class EmbedMDN(nn.Module):
    """Dense network -> weights of a fixed grid of Gaussians (``forward`` returns (N, K) weights)."""

    def __init__(self, in_features: int, hidden: list[int], zmin: float, zmax: float, n_components: int,
                 sigma: float, dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, int(h)), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = int(h)
        self.body = nn.Sequential(*layers)
        self.head = FixedGridMixtureHead(width, zmin, zmax, n_components, sigma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.head.logits(self.body(x)), dim=-1)


def fixed_grid_summaries(weights, centers, sigma, zmin, zmax, nzbins: int = 301, quantiles=DEFAULT_QUANTILES,
                         block: int = 4096):
    """Ancil of fixed-grid mixtures truncated to [zmin, zmax] (the same keys as
    :func:`rail.deepz.pdf.mixture_ensemble`), from the PDFs on a fine grid (spacing below
    ``sigma``) obtained as one (N, K) x (K, G) product per ``block`` rows (bounded memory;
    4096 x 1201 float32 is 20 MB, below glibc's 32 MB mmap threshold, so the blocks reuse heap
    memory instead of mapping and page-faulting fresh pages each time: with 16384-row blocks
    and fresh means/widths arrays per chunk the estimator ran at 40-46k objects/s instead of
    51-57k, 500k DC2 rows, 2 threads)."""
    weights = np.asarray(weights, dtype=np.float32)
    centers = np.asarray(centers, dtype=np.float64)
    fine = np.linspace(zmin, zmax, max(nzbins, 1201))  # spacing <= 0.0025 for [0, 3]
    basis = gaussian_basis(fine, centers, sigma)
    parts = [grid_summaries(torch.as_tensor(weights[i : i + block]) @ basis, fine, quantiles)
             for i in range(0, max(len(weights), 1), block)]
    ancil = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    # each component's mass outside [zmin, zmax], then one float32 product (no float64 copy of
    # the weights): relative precision ~1e-7 of the (small) outside mass
    outside_k = (ndtr((zmin - centers) / sigma) + ndtr((centers - zmax) / sigma)).astype(np.float32)
    ancil["p_outside"] = np.clip((weights @ outside_k).astype(np.float64), 0.0, 1.0)
    return ancil


def fixed_grid_pit(weights, centers, sigma, z) -> np.ndarray:
    """CDF of each (untruncated) mixture at its own ``z`` (what qp.mixmod's cdf gives)."""
    z = np.asarray(z, dtype=np.float64)
    return (np.asarray(weights, dtype=np.float64) * ndtr((z[:, None] - centers[None, :]) / sigma)).sum(1)


class RepeatedRows:
    """Read-only (n, k) float32 arrays of one repeated row, kept between calls.

    ``qp.mixmod`` stores means and widths per object, although for a fixed-grid mixture they
    are the same row for every object; building (and, for the HDF5 writer, making contiguous)
    two fresh (chunk, K) arrays per chunk costs more than the network. One array per row is
    kept, as long as the largest chunk seen, and each call returns a view of its first n rows.
    """

    def __init__(self):
        self._arrays: dict[bytes, np.ndarray] = {}

    def __call__(self, row, n: int) -> np.ndarray:
        row = np.asarray(row, dtype=np.float32).ravel()
        key = row.tobytes()
        arr = self._arrays.get(key)
        if arr is None or len(arr) < n:
            arr = np.ascontiguousarray(np.broadcast_to(row, (n, row.size)))
            arr.flags.writeable = False
            self._arrays[key] = arr
        return arr[:n]


def fixed_grid_ensemble(weights, centers, sigma, zmin, zmax, nzbins: int = 301,
                        representation: str = "mixmod", rows: RepeatedRows | None = None) -> qp.Ensemble:
    """Fixed-grid mixtures -> ``qp.mixmod`` (exact) or ``qp.interp`` on ``nzbins`` points.

    ``interp`` samples the PDF on the grid: choose ``nzbins`` so that the spacing is well
    below sigma (e.g. >= 3 (zmax - zmin) / sigma), or the narrow components are aliased.

    The ``mixmod`` parameters are stored in float32, the precision of the network's softmax
    (float64 would double the output, 4.8 kB per object for 200 components, for no
    information); the weights must be finite and non-negative (a softmax output), so qp's
    per-element input checks are skipped. The means and widths are read-only arrays from
    ``rows`` (a :class:`RepeatedRows` reused over chunks; by default a new one).
    """
    weights = np.asarray(weights, dtype=np.float32)
    n, k = weights.shape
    ancil = fixed_grid_summaries(weights, centers, sigma, zmin, zmax, nzbins)
    if representation == "mixmod":
        rows = rows if rows is not None else RepeatedRows()
        means, stds = rows(centers, n), rows(np.full(k, sigma), n)
        ens = qp.Ensemble(qp.mixmod, data=dict(weights=weights, means=means, warn=False, stds=stds))
    elif representation == "interp":
        zgrid = np.linspace(zmin, zmax, nzbins)
        basis = gaussian_basis(zgrid, centers, sigma).numpy()
        ens = interp_ensemble(zgrid, weights @ basis)
    else:
        raise ValueError(f"Option 'qp_representation'={representation!r} is not 'mixmod' or 'interp'")
    ens.set_ancil({key: np.asarray(v) for key, v in ancil.items()})
    return ens


# ----------------------------------------------------------------- helpers


def _read_reference(stage, table, path: str, groupname: str, max_rows: int, seed: int) -> dict | None:
    if table is None and not path:
        return None
    if table is None:
        table = tables_io.read(path)
    if hasattr(table, "data") and not isinstance(table, Mapping):  # a DataHandle
        table = table.data
    data = table_to_numpy_dict(stage, table, groupname)
    return subsample(data, max_rows if max_rows and max_rows > 0 else None, seed)


def _ensemble_point_and_pit(ens: qp.Ensemble, z: np.ndarray, point: str, zmin: float, zmax: float,
                            chunk: int = 10000) -> tuple[np.ndarray, np.ndarray]:
    """Point estimate (ancil ``point``, else the mode on a grid) and PIT of any qp ensemble."""
    n = ens.npdf
    if len(z) != n:
        raise ValueError(f"The ensemble has {n} PDFs but the truth table has {len(z)} rows")
    zphot = None
    if ens.ancil is not None and point in ens.ancil:
        zphot = np.asarray(ens.ancil[point], dtype=np.float64).ravel()
    grid = np.linspace(zmin, zmax, 1201)
    pits, modes = [], []
    for s in range(0, n, chunk):
        part = ens if n <= chunk else ens[s : min(s + chunk, n)]
        pits.append(np.asarray(part.cdf(z[s : s + chunk, None]), dtype=np.float64).reshape(-1))
        if zphot is None:
            modes.append(grid[np.argmax(part.pdf(grid), axis=1)])
    pit = np.concatenate(pits)
    if zphot is None:
        zphot = np.concatenate(modes)
    return zphot, np.nan_to_num(pit, nan=0.0)


def _copy_ensemble(ens: qp.Ensemble) -> qp.Ensemble:
    """A new ensemble with the same PDFs (qp's slicing copies; it cannot slice one PDF)."""
    if ens.npdf > 1:
        return ens[0 : ens.npdf]
    meta = {k: v for k, v in ens.metadata.items() if k not in ("pdf_name", "pdf_version")}
    return qp.Ensemble(ens.gen_class, data={**meta, **ens.objdata})


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
        n_components=Param(int, 200, msg="number of fixed Gaussians, evenly spaced over [zmin, zmax]"),
        component_sigma=Param(float, 0.0037, msg="fixed width of every Gaussian (redshift units)"),
        nll_weight=Param(
            float, 0.1,
            msg="weight of the mixture negative log-likelihood added to the CRPS loss (0 = CRPS only, the "
            "paper's; see the module docstring)",
        ),
        som_point_estimate=Param(str, "zmode", msg="point estimate used for the per-cell metrics"),
    )
    config_options.update(SOM_OPTIONS)

    def __init__(self, args, **kwargs):
        super().__init__(args, **kwargs)
        if self.config.encoder not in ENCODER_KINDS:
            raise ValueError(f"Option 'encoder'={self.config.encoder!r} is not one of {ENCODER_KINDS}")
        if self.config.n_components < 2 or self.config.component_sigma <= 0:
            raise ValueError("Options 'n_components' must be >= 2 and 'component_sigma' > 0")
        if self.config.som_point_estimate not in ("zmode", "zmean", "zmedian"):
            raise ValueError(f"Option 'som_point_estimate'={self.config.som_point_estimate!r} is not zmode/zmean/zmedian")
        _som_settings(self.config)
        self._reference = None

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
        torch.manual_seed(cfg.seed)
        net = EmbedMDN(xs.shape[1], list(cfg.hidden_layers), cfg.zmin, cfg.zmax, cfg.n_components,
                       cfg.component_sigma, cfg.dropout)
        centers = net.head.centers.detach().double()
        pair = fixed_grid_pair_matrix(centers, cfg.component_sigma)
        cache = {}
        nll_weight = float(cfg.nll_weight)

        def loss_fn(w, zb):
            if w.device not in cache:
                cache[w.device] = (centers.to(w.device, torch.float32), pair.to(w.device, torch.float32))
            c, m = cache[w.device]
            loss = fixed_grid_crps(w.float(), zb, c, cfg.component_sigma, m)
            if nll_weight > 0:
                params = MixtureParams(w.float(), c.expand_as(w), torch.full_like(w, cfg.component_sigma, dtype=torch.float32))
                loss = loss + nll_weight * gmm_nll(params, zb)
            return loss

        result = train_model(net, loss_fn, [xs[tr]], z[tr], [xs[va]], z[va], self.train_config)
        net.to("cpu")
        # SOM flags from the validation split
        w_val = concat_outputs(predict_batched(net, [xs[va]], torch.device("cpu"))).numpy()
        cnp = centers.numpy()
        anc = fixed_grid_summaries(w_val, cnp, cfg.component_sigma, cfg.zmin, cfg.zmax)
        pit = fixed_grid_pit(w_val, cnp, cfg.component_sigma, z[va])
        x_som = som_feature_matrix(data, phot, cfg.som_features)
        ref = _read_reference(self, self._reference, cfg.som_reference, cfg.som_reference_groupname,
                              cfg.som_max_reference, cfg.seed)
        if ref is not None:
            ref_phot = self._photometry(ref) if needs_photometry(cfg.som_features) else None
            x_ref = som_feature_matrix(ref, ref_phot, cfg.som_features)
        else:
            x_ref = x_som[tr]
        flags = SOMFlagModel.build(list(cfg.som_features), x_ref, x_som[tr], x_som[va],
                                   anc[cfg.som_point_estimate], z[va], pit, ref_is_train=ref is None,
                                   **_som_settings(cfg))
        self.log.info(f"SOM: {flags.summary()}")
        return self._model_dict(
            arch={
                "in_features": int(xs.shape[1]),
                "hidden": [int(h) for h in cfg.hidden_layers],
                "n_components": int(cfg.n_components),
                "sigma": float(cfg.component_sigma),
                "dropout": float(cfg.dropout),
            },
            encoder=encoder.to_dict(),
            state_dict={k: v.detach().cpu() for k, v in net.state_dict().items()},
            scalers={"embedding": scaler.to_dict()},
            som=flags.to_dict(),
            som_point_estimate=cfg.som_point_estimate,
            train=result.to_dict(),
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
        net = EmbedMDN(arch["in_features"], arch["hidden"], model["zmin"], model["zmax"], arch["n_components"],
                       arch["sigma"], arch["dropout"])
        net.load_state_dict(model["state_dict"])
        self._rows = RepeatedRows()
        return net

    def _estimate_chunk(self, data: Mapping):
        phot = self._photometry(data) if self._needs_phot else None
        emb = self.encoder.encode(data, phot, device=self.torch_device, batch_size=self.inference_batch_size)
        x = self.scaler.transform(emb)
        w = concat_outputs(
            predict_batched(self.net, [x], self.torch_device, self.inference_batch_size,
                            self.config.mixed_precision)
        ).numpy()
        m = self.model
        centers = np.linspace(m["zmin"], m["zmax"], m["arch"]["n_components"])
        ens = fixed_grid_ensemble(w, centers, m["arch"]["sigma"], m["zmin"], m["zmax"], self.config.nzbins,
                                  self.config.qp_representation, self._rows)
        if self.config.som_flags:
            ens.ancil.update(self.flagger.flag(som_feature_matrix(data, phot, self.flagger.features)))
        return ens


# ----------------------------------------------------------------- flags for any estimator


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
            msg="ancil column of the ensemble used as point estimate (if absent: the PDF mode on a grid)",
        ),
    )
    config_options.update(SOM_OPTIONS)

    def __init__(self, args, **kwargs):
        super().__init__(args, **kwargs)
        _som_settings(self.config)
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
        zphot, pit = _ensemble_point_and_pit(ens, z, cfg.point_estimate, cfg.zmin, cfg.zmax)
        if not keep.all():
            truth = {k: np.asarray(v)[keep] for k, v in truth.items()}
            z, zphot, pit = z[keep], zphot[keep], pit[keep]
        needs = needs_photometry(cfg.som_features)
        x_train = som_feature_matrix(train, self._photometry(train) if needs else None, cfg.som_features)
        x_val = som_feature_matrix(truth, self._photometry(truth) if needs else None, cfg.som_features)
        ref = _read_reference(self, self._reference, cfg.som_reference, cfg.som_reference_groupname,
                              cfg.som_max_reference, cfg.seed)
        x_ref = x_train if ref is None else som_feature_matrix(
            ref, self._photometry(ref) if needs else None, cfg.som_features)
        flags = SOMFlagModel.build(list(cfg.som_features), x_ref, x_train, x_val, zphot, z, pit,
                                   ref_is_train=ref is None, **_som_settings(cfg))
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
