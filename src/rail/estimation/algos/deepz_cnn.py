"""Image CNN + Gaussian mixture ensemble (after PICZL, Roster et al.).

Each ensemble member is a two-branch network: a convolutional branch over the
multi-band cutouts (``n`` blocks of conv 3x3 + batch norm + ReLU + 2x2 max pool, then a
global average pool) and a dense branch over the catalog photometry (magnitudes, colours,
errors from :func:`rail.deepz.photometry.extract_photometry`), concatenated and mapped by
a dense layer to a K-component Gaussian mixture (:class:`GaussianMixtureHead`). Members are
trained with the closed-form mixture CRPS (``loss='crps'``), the NLL (``'nll'``) or
alternately both (``'both'``: even members CRPS, odd members NLL), with seeds
``seed + m``. As in PICZL the M members are combined into one mixture of M x K
components: member m's weights are multiplied by 1/M (``member_weighting='equal'``) or by
its normalised inverse validation CRPS (``'inverse_val_crps'``).

``ensemble='pool'`` follows PICZL's own ensemble recipe (Roster et al. 2024, Sect. 5.6): a
pool of members differing in loss (CRPS, NLL), number of Gaussians, learning rate and batch
size (``pool_losses`` x ``pool_n_components`` x ``pool_lrs`` x ``pool_batch_sizes``, loss
varying fastest, cycled with new seeds up to ``pool_size``) is trained; ``n_select`` of them
are chosen by forward selection on the validation outlier rate eta (|z_mode - z| / (1 + z) >
0.15, the paper's eta of its point estimate, the PDF mode), ties broken by the ensemble's
validation CRPS, optionally alternating losses so that CRPS and NLL members enter evenly
(``pool_balance_losses``, as in the paper's final ensemble); the chosen members' weights
(summing to 1, the paper's eq. 8) minimise the validation CRPS of the combined mixture
(``pool_weighting='val_crps'``; the paper tunes them with Optuna against an objective it
does not state) or are equal. Departures: the pool is a small grid, not 288 models; the
selection and weights use the validation split that also stops training early (the paper
selects on its test sample); ``n_members`` is not used in this mode.

``extra_features`` appends numeric catalogue columns (e.g. PICZL's numerical channel:
source type, dchisq, S/N, flux fractions, colours; :data:`rail.deepz.datasets.PICZL_FEATURES`)
to the catalog branch, standardised with the photometry features.

Error-aware augmentation (``augment_errors``, ``augment_depth``; :mod:`rail.deepz.augment`,
the block NNC, the LSTM and the embedding MDN use) applies to the catalog branch only: each
epoch member m's training photometry (``bands``) is redrawn within its errors (and/or degraded
to the test depth) from a generator seeded with the member's seed (``seed + m``, or ``seed + i``
for pool member i), and its magnitudes, colours and errors are re-standardised with the
scaler fitted on the measured training split. The image stamps and the ``extra_features``
columns are the measured ones every epoch: the stamps carry no variance or inverse-variance
plane to redraw pixels from, and the extra columns have no error model (PICZL's S/N and
colours among them are not made consistent with a redrawn flux). The flips/rotations of
``augment`` still apply to the stamps. With ``augment_depth`` the validation split's catalog
photometry is degraded once to the same depth (:func:`rail.deepz.augment.validation_at_depth`),
so early stopping and the pool's member selection and weights see test-depth photometry; its
stamps and extra columns stay measured. With ``augment_errors`` alone it stays measured.

Images: an array column ``image_col`` of shape (N, C, H, W) with C = len(``image_bands``)
in linear flux units per pixel; they are scaled per band by the pixel noise measured at
inform time and asinh-stretched (:mod:`rail.deepz.images`), optionally with C-1 colour
channels. ``use_images=False`` trains the catalog branch alone (ablation). Images must
come as a numpyDict / hdf5 table (pandas cannot hold a 4-d column). For catalogs without
pixels, :func:`rail.deepz.images.add_synthetic_stamps` simulates stamps.

Beyond the paper (kept small for a catalog pipeline): the stamp size is whatever the
data hold (PICZL uses 23x23 Legacy Survey cutouts) and the network is much smaller.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
from ceci.config import StageParameter as Param

from rail.deepz.augment import augment_options, check_augment_options, make_resampler, validation_at_depth
from rail.deepz.gmm import gmm_crps_numpy
from rail.deepz.images import (
    BAD_PIXEL_POLICIES,
    BadImageError,
    fit_image_scale,
    n_channels,
    preprocess_images,
    validate_images,
)
from rail.deepz.photometry import check_model_bands
from rail.deepz.pointmetrics import eta as outlier_rate
from rail.deepz.scaling import Standardizer, fit_standardizer
from rail.deepz.stages import (
    MIXTURE_OUTPUT_OPTIONS,
    DeepzEstimator,
    DeepzInformer,
    ModelFormatError,
    Option,
    bound,
    each,
    one_of,
    photometry_settings,
    positive_int_list,
    positive_int_list_or_empty,
    with_defaults,
)

if TYPE_CHECKING:  # annotations only: torch is imported where a stage trains or estimates
    import torch

LOSSES = ("crps", "nll")  # gmm_crps, gmm_nll (rail.deepz.mixtures)
FEATURES = ("mags", "colors", "errors")
#: what the error-aware augmentation options do to the CNN's other inputs (appended to their help)
AUGMENT_NOTE = ("; CNN: the catalog branch's photometry features only -- the image stamps (no variance plane to "
                "redraw pixels from) and the extra_features columns are the measured ones every epoch")


def random_flip_rot90(batch: list[torch.Tensor]) -> list[torch.Tensor]:
    """Augment the image tensor (second input) by random flips and 90-degree rotations.

    One of the 8 symmetries of the square per batch (the catalog features are unchanged);
    drawn from torch's global generator, which ``train_model`` seeds.
    """
    import torch
    if len(batch) < 2:
        return batch
    img = batch[1]
    k = int(torch.randint(0, 4, (1,)))
    if k:
        img = torch.rot90(img, k, dims=(2, 3))
    if bool(torch.randint(0, 2, (1,))):
        img = torch.flip(img, dims=(3,))
    return [batch[0], img, *batch[2:]]


def _member_losses(loss: str, m: int) -> str:
    if loss == "both":
        return "crps" if m % 2 == 0 else "nll"
    return loss


@dataclasses.dataclass(frozen=True)
class MemberSpec:
    """How one ensemble member is trained: loss ('crps' | 'nll'), Gaussians K, learning
    rate, batch size (objects per step) and seed."""

    loss: str
    n_components: int
    lr: float
    batch_size: int
    seed: int


def seed_members(cfg) -> list[MemberSpec]:
    """``n_members`` members that differ only by seed (``seed + m``) and, with ``loss='both'``,
    by alternating loss."""
    return [MemberSpec(_member_losses(cfg.loss, m), int(cfg.n_components), float(cfg.lr),
                       int(cfg.batch_size), int(cfg.seed) + m) for m in range(cfg.n_members)]


def pool_members(cfg) -> list[MemberSpec]:
    """PICZL's pool: every combination of ``pool_losses`` x ``pool_n_components`` x ``pool_lrs``
    x ``pool_batch_sizes`` (empty lists: the single-model option), the loss varying fastest so
    that a truncated pool stays balanced; ``pool_size`` (0 = the number of combinations)
    members, cycling through the combinations; member i has seed ``seed + i``."""
    losses = list(cfg.pool_losses) or [cfg.loss if cfg.loss != "both" else "crps"]
    comps = [int(k) for k in cfg.pool_n_components] or [int(cfg.n_components)]
    lrs = [float(v) for v in cfg.pool_lrs] or [float(cfg.lr)]
    batches = [int(b) for b in cfg.pool_batch_sizes] or [int(cfg.batch_size)]
    combos = [(loss, k, lr, b) for lr, k, b, loss in itertools.product(lrs, comps, batches, losses)]
    size = int(cfg.pool_size) or len(combos)
    return [MemberSpec(*combos[i % len(combos)], seed=int(cfg.seed) + i) for i in range(size)]


def _combine(params: Sequence[tuple], weights) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Members' mixtures [(w, mu, sigma) each (N, K_m)] -> one mixture, member m's component
    weights multiplied by ``weights[m]`` (mixture concatenation)."""
    w = np.concatenate([p[0] * float(c) for p, c in zip(params, weights)], axis=1)
    return w, np.concatenate([p[1] for p in params], 1), np.concatenate([p[2] for p in params], 1)


def ensemble_scores(params: Sequence[tuple], weights, z: np.ndarray, zmin: float, zmax: float) -> tuple[float, float]:
    """Outlier rate eta of the combined mixture's mode (PICZL's point estimate) and its mean CRPS."""
    from rail.deepz.pdf import mixture_summaries
    w, mu, sig = _combine(params, weights)
    zmode = mixture_summaries(w, mu, sig, zmin, zmax)["zmode"]
    return float(outlier_rate(zmode, z)), float(np.mean(gmm_crps_numpy(w, mu, sig, z)))


def select_members(params: Sequence[tuple], z: np.ndarray, n_select: int, zmin: float, zmax: float,
                   losses: Sequence[str] | None = None) -> tuple[list[int], list[dict]]:
    """Forward selection of ``n_select`` pool members on validation data (PICZL Sect. 5.6).

    Start from the member with the lowest outlier rate eta (of its mode); then repeatedly add
    the member whose addition gives the equal-weight ensemble the lowest eta, ties broken by
    the ensemble's mean CRPS, then by pool order. With ``losses`` (one per member) the
    candidates at each step are restricted to the loss(es) chosen least so far, so CRPS and
    NLL members enter evenly. Returns the chosen indices (in order of entry) and one record
    per step (``member``, ``eta``, ``crps`` of the ensemble after it).
    """
    if not 1 <= n_select <= len(params):
        raise ValueError(f"Option 'n_select'={n_select} must lie in [1, pool size {len(params)}]")
    chosen: list[int] = []
    trace: list[dict] = []
    for _ in range(n_select):
        rest = [i for i in range(len(params)) if i not in chosen]
        if losses is not None:
            counts = {loss: sum(losses[j] == loss for j in chosen) for loss in {losses[i] for i in rest}}
            least = min(counts.values())
            rest = [i for i in rest if counts[losses[i]] == least]
        best = None
        for i in rest:
            members = [params[j] for j in chosen + [i]]
            score = ensemble_scores(members, np.full(len(members), 1.0 / len(members)), z, zmin, zmax)
            if best is None or score < best[0]:
                best = (score, i)
        chosen.append(best[1])
        trace.append({"member": int(best[1]), "eta": best[0][0], "crps": best[0][1]})
    return chosen, trace


def crps_gram(params: Sequence[tuple], z: np.ndarray) -> np.ndarray:
    """G[m, n] = mean over objects of integral (F_m - H)(F_n - H) dz (F_m: member m's CDF, H: the
    step at the true z), so that the mean CRPS of the mixture sum_m a_m F_m is a^T G a for
    weights a summing to 1. Diagonal: each member's CRPS; off-diagonal from the closed-form
    CRPS of the half-half mixture, G_mn = 2 CRPS(F_m/2 + F_n/2) - (G_mm + G_nn) / 2."""
    m = len(params)
    g = np.zeros((m, m))
    for i in range(m):
        g[i, i] = np.mean(gmm_crps_numpy(*params[i], z))
    for i, j in itertools.combinations(range(m), 2):
        half = np.mean(gmm_crps_numpy(*_combine([params[i], params[j]], [0.5, 0.5]), z))
        g[i, j] = g[j, i] = 2.0 * half - 0.5 * (g[i, i] + g[j, j])
    return g


def fit_crps_weights(params: Sequence[tuple], z: np.ndarray) -> np.ndarray:
    """Member weights on the simplex (>= 0, sum 1) minimising the mean validation CRPS of the
    combined mixture: the convex quadratic a^T G a of :func:`crps_gram`, solved by SLSQP."""
    from scipy.optimize import minimize

    g = crps_gram(params, z)
    g = 0.5 * (g + g.T)
    m = len(params)
    x0 = np.full(m, 1.0 / m)
    res = minimize(lambda a: float(a @ g @ a), x0, jac=lambda a: 2.0 * g @ a, method="SLSQP",
                   bounds=[(0.0, 1.0)] * m, constraints=[{"type": "eq", "fun": lambda a: a.sum() - 1.0}],
                   options={"ftol": 1e-12, "maxiter": 500})
    a = np.clip(res.x, 0.0, None)
    if not (np.isfinite(a).all() and a.sum() > 0) or float(a @ g @ a) > float(x0 @ g @ x0):
        a = x0  # never worse than equal weights
    return a / a.sum()


def catalog_columns(data: Mapping, columns: Sequence[str], who: str) -> np.ndarray:
    """Numeric catalogue columns (option ``extra_features``) as a float64 (N, F) array;
    a missing column or a NaN/inf value is an error naming the column."""
    if not columns:
        return np.zeros((len(next(iter(data.values()))), 0))
    missing = [c for c in columns if c not in data]
    if missing:
        raise KeyError(f"{who}: column(s) {missing} of option 'extra_features' are not in the input table")
    out = np.stack([np.asarray(data[c], dtype=np.float64) for c in columns], axis=1)
    bad = ~np.isfinite(out)
    if bad.any():
        cols = [columns[j] for j in np.flatnonzero(bad.any(axis=0))]
        raise ValueError(f"{who}: option 'extra_features' column(s) {cols[:5]} hold {int(bad.sum())} "
                         "NaN/inf value(s); fill or drop them first")
    return out


def check_members(model: Mapping, who: str) -> None:
    """Refuse an ensemble whose member lists disagree in length, or whose member weights are
    negative or do not sum to 1 (the combined PDF would not be normalised)."""
    n = len(model.get("member_state_dicts", []))
    if n == 0:
        raise ModelFormatError(f"{who}: the model has no members ('member_state_dicts' is empty)")
    for key in ("member_weights", "member_n_components"):
        if key in model and len(model[key]) != n:
            raise ModelFormatError(f"{who}: model entry {key!r} has {len(model[key])} value(s) but the model "
                                   f"has {n} member(s) ('member_state_dicts'); retrain it")
    w = np.asarray(model["member_weights"], dtype=np.float64)
    if (w < 0).any() or abs(w.sum() - 1.0) > 1e-6:
        raise ModelFormatError(f"{who}: model entry 'member_weights' = {w.tolist()} must be >= 0 and sum to 1")
    ks = model.get("member_n_components", [])
    if any(int(k) != k or k < 1 for k in ks):
        raise ModelFormatError(f"{who}: model entry 'member_n_components' = {list(ks)} must be positive integers")


def _loss_list(name: str, value) -> None:
    for i, v in enumerate(value):
        one_of(*LOSSES)(f"{name}[{i}]", v)


class _ImageMixin:
    """Shared image handling of the informer and the estimator."""

    def _images(self, data: Mapping, column: str, bands: list, shape=None, policy: str = "raise"):
        return validate_images(data, column, len(bands), shape, policy, bands)


class DeepzCNNInformer(_ImageMixin, DeepzInformer):
    """Train an ensemble of image CNN + catalog MDNs (PICZL-like)."""

    name = "DeepzCNNInformer"
    entrypoint_function = "inform"
    interactive_function = "deepz_cnn_informer"
    method = "cnn"
    config_options = DeepzInformer.config_options.copy()
    config_options.update(with_defaults(
        {k: DeepzInformer.config_options[k] for k in ("lr", "batch_size", "epochs", "patience")},
        lr=1e-3, batch_size=256, epochs=100, patience=10,
    ))
    config_options.update(
        image_col=Param(str, "images",
                        msg="column of the (N, bands, height, width) image array (linear flux per pixel)"),
        image_bands=Param(list, [], msg="names of the image bands along axis 1 (their count is checked); "
                          "empty = the catalog 'bands'"),
        use_images=Param(bool, True, msg="False: catalog branch only (ablation; no image column needed)"),
        image_colors=Param(bool, True, msg="add C-1 colour channels (differences of adjacent asinh images)"),
        bad_pixel_policy=Option(str, "raise", check=one_of(*BAD_PIXEL_POLICIES), msg="NaN/inf pixels: 'raise' or 'zero' (set to 0)"),
        augment=Param(bool, True, msg="random flips and 90-degree rotations of training images"),
        n_components=Option(int, 5, check=bound(">=", 1), msg="Gaussian components K per member"),
        n_members=Option(int, 3, check=bound(">=", 1), msg="ensemble members M (seeds seed + m); output has M x K components"),
        loss=Option(str, "crps", check=one_of("crps", "nll", "both"), msg="'crps' (closed-form mixture CRPS), 'nll', or 'both' (alternating over members)"),
        member_weighting=Option(str, "equal", check=one_of("equal", "inverse_val_crps"),
                               msg="'equal' (1/M) or 'inverse_val_crps' (normalised 1 / validation CRPS)"),
        conv_channels=Option(list, [16, 32, 64], check=positive_int_list, msg="output channels of the conv blocks (each halves H and W)"),
        dense_units=Option(list, [64, 64], check=positive_int_list,
                          msg="widths of the catalog branch's dense layers (the last also sizes the merge layer)"),
        extra_features=Option(list, [], msg="numeric catalogue columns appended to the catalog branch's "
                              "input (e.g. PICZL's numerical channel, rail.deepz.datasets.PICZL_FEATURES); "
                              "they must be finite"),
        ensemble=Option(str, "seeds", check=one_of("seeds", "pool"),
                        msg="'seeds': n_members members differing by seed; 'pool': PICZL's recipe, a pool "
                        "varied by loss, components, lr and batch size, n_select chosen by validation "
                        "outlier rate and weighted (pool_* options; n_members unused)"),
        pool_losses=Option(list, ["crps", "nll"], check=_loss_list,
                           msg="pool mode: losses of the pool ('crps', 'nll'); empty = option 'loss'"),
        pool_n_components=Option(list, [5, 10], check=positive_int_list_or_empty,
                                 msg="pool mode: Gaussians K of the pool's members; empty = option 'n_components'"),
        pool_lrs=Option(list, [1e-3, 3e-4], check=each(bound(">", 0)),
                        msg="pool mode: learning rates of the pool's members; empty = option 'lr'"),
        pool_batch_sizes=Option(list, [], check=positive_int_list_or_empty,
                                msg="pool mode: batch sizes (objects per step) of the pool's members; "
                                "empty = option 'batch_size'"),
        pool_size=Option(int, 0, check=bound(">=", 0),
                         msg="pool mode: members trained (seeds seed + i), cycling through the combinations "
                         "of the pool_* lists; 0 = one per combination"),
        n_select=Option(int, 4, check=bound(">=", 1),
                        msg="pool mode: members kept, by forward selection on the validation outlier rate "
                        "(|zmode - z|/(1+z) > 0.15), ties broken by validation CRPS; <= the pool size"),
        pool_balance_losses=Option(bool, True, msg="pool mode: alternate losses during selection so that "
                                   "CRPS and NLL members enter evenly (PICZL's final ensemble)"),
        pool_weighting=Option(str, "val_crps", check=one_of("val_crps", "equal"),
                              msg="pool mode: weights of the selected members: minimise the combined "
                              "mixture's validation CRPS on the simplex ('val_crps'), or 1/n_select"),
    )
    config_options.update(augment_options(AUGMENT_NOTE))

    def __init__(self, args, **kwargs):
        super().__init__(args, **kwargs)
        check_augment_options(self.config, list(self.config.bands))
        if self.config.ensemble == "pool":
            size = len(pool_members(self.config))
            if self.config.n_select > size:
                raise ValueError(f"Option 'n_select'={self.config.n_select} exceeds the pool size {size} "
                                 "(options pool_size / pool_losses x pool_n_components x pool_lrs x "
                                 "pool_batch_sizes)")

    def _fit(self, data: Mapping, z: np.ndarray, val_mask):
        from rail.deepz.training import split_indices
        cfg = self.config
        mask = cfg.missing_policy == "mask"
        blocks = list(FEATURES) + (["valid"] if mask else [])
        phot = self._photometry(data)
        extra = list(cfg.extra_features)
        extra_x = catalog_columns(data, extra, self.name) if extra else None

        def catalog_features(p, extra_rows):
            """The catalog branch's unscaled features (and validity with 'mask') of photometry ``p``."""
            xp, fv = p.masked_features(blocks, mask)
            if extra:
                xp = np.concatenate([xp, extra_rows], axis=1)
                if fv is not None:
                    fv = np.concatenate([fv, np.ones((len(xp), len(extra)), bool)], axis=1)
            return xp, fv

        x, fvalid = catalog_features(phot, extra_x)
        tr, va = split_indices(len(z), cfg.val_fraction, cfg.seed, val_mask)
        scaler = fit_standardizer(x, fvalid, tr)
        xs = scaler.transform(x, fvalid)
        inputs = [xs]
        image_info = {"use_images": bool(cfg.use_images)}
        in_ch = 0
        if cfg.use_images:
            bands = list(cfg.image_bands) or list(cfg.bands)
            img = self._images(data, cfg.image_col, bands, None, cfg.bad_pixel_policy)
            h, w = img.shape[2:]
            if min(h, w) < 2 ** len(cfg.conv_channels):
                raise BadImageError(
                    f"Image column {cfg.image_col!r}: {h}x{w} stamps are too small for "
                    f"{len(cfg.conv_channels)} pooling blocks (option 'conv_channels')"
                )
            scale = fit_image_scale(img[tr])
            inputs.append(preprocess_images(img, scale, cfg.image_colors))
            in_ch = n_channels(len(bands), cfg.image_colors)
            image_info.update(col=cfg.image_col, bands=bands, height=int(h), width=int(w),
                              scale=[float(s) for s in scale], colors=bool(cfg.image_colors),
                              bad_pixel_policy=cfg.bad_pixel_policy)
        arch = dict(n_features=int(xs.shape[1]), in_channels=int(in_ch),
                    conv_channels=[int(c) for c in cfg.conv_channels],
                    dense_units=[int(u) for u in cfg.dense_units], n_components=int(cfg.n_components),
                    use_images=bool(cfg.use_images), zrange=(float(cfg.zmin), float(cfg.zmax)))
        pool = cfg.ensemble == "pool"
        specs = pool_members(cfg) if pool else seed_members(cfg)
        settings = photometry_settings(cfg)
        train_inputs = [a[tr] for a in inputs]  # sliced once, for every member and augmented epoch
        extra_tr = extra_x[tr] if extra else None

        def augmented(p):
            """One epoch's inputs of the training rows: the redrawn photometry's features beside
            the measured extra columns, and the measured stamps."""
            return [scaler.transform(*catalog_features(p, extra_tr)), *train_inputs[1:]]

        val_inputs = [a[va] for a in inputs]
        extra_va = extra_x[va] if extra else None
        # early stopping and the member selection/weights see the validation split at the test depth
        val_catalog = validation_at_depth(cfg, settings, phot, va,
                                          lambda p: [scaler.transform(*catalog_features(p, extra_va))])
        if val_catalog is not None:
            val_inputs[0] = val_catalog[0]
        trained = [self._train_member(arch, spec, z, tr, va, m, train_inputs, val_inputs,
                                      make_resampler(cfg, settings, phot, tr, spec.seed, augmented))
                   for m, spec in enumerate(specs)]
        val_params = [t[2] for t in trained]
        val_crps = [float(np.mean(gmm_crps_numpy(*p, z[va]))) for p in val_params]
        record = {}
        if pool:
            losses = [sp.loss for sp in specs] if cfg.pool_balance_losses else None
            keep, trace = select_members(val_params, z[va], cfg.n_select, cfg.zmin, cfg.zmax, losses)
            kept = [val_params[i] for i in keep]
            mw = (fit_crps_weights(kept, z[va]) if cfg.pool_weighting == "val_crps"
                  else np.full(len(keep), 1.0 / len(keep)))
            final = ensemble_scores(kept, mw, z[va], cfg.zmin, cfg.zmax)
            single = [ensemble_scores([p], [1.0], z[va], cfg.zmin, cfg.zmax)[0] for p in val_params]
            self.log.info(f"pool: selected members {keep}, weights {np.round(mw, 4).tolist()}, "
                          f"validation eta {final[0]:.4f}, CRPS {final[1]:.5f}")
            record["pool"] = dict(
                members=[dataclasses.asdict(sp) for sp in specs], val_eta=single, val_crps=val_crps,
                selected=[int(i) for i in keep], selection=trace, weighting=cfg.pool_weighting,
                val_eta_selected=final[0], val_crps_selected=final[1],
                balance_losses=bool(cfg.pool_balance_losses),
                train=[trained[i][1] for i in range(len(specs))])
        else:
            keep = list(range(len(specs)))
            if cfg.member_weighting == "equal":
                mw = np.full(len(keep), 1.0 / len(keep))
            else:
                inv = 1.0 / np.maximum(np.asarray(val_crps), 1e-12)
                mw = inv / inv.sum()
        return self._model_dict(
            arch=arch,
            feature_blocks=blocks,
            extra_features=extra,
            # masked features zeroed after standardisation (absent in older models: not zeroed)
            mask_features=mask,
            images=image_info,
            ensemble=cfg.ensemble,
            member_state_dicts=[trained[i][0] for i in keep],
            member_weights=[float(v) for v in mw],
            member_losses=[specs[i].loss for i in keep],
            member_n_components=[specs[i].n_components for i in keep],
            member_val_crps=[val_crps[i] for i in keep],
            scalers={"x": scaler.to_dict()},
            train=[trained[i][1] for i in keep],
            **record,
        )

    def _train_member(self, arch: dict, spec: MemberSpec, z: np.ndarray, tr, va, m: int,
                      train_inputs: list, val_inputs: list, resample=None):
        """Train one member -> (CPU state dict, training record, validation mixture (w, mu, sigma));
        ``train_inputs`` / ``val_inputs``: the network inputs of the rows ``tr`` / ``va``;
        ``resample``: the member's :class:`rail.deepz.augment.EpochResampler` (None: no augmentation)."""
        import torch
        from rail.deepz.nets.cnn import CNNMember
        from rail.deepz.training import concat_outputs, predict_batched, train_model
        from rail.deepz.mixtures import gmm_crps, gmm_nll
        torch.manual_seed(spec.seed)
        net = CNNMember(**dict(arch, n_components=spec.n_components))
        tcfg = dataclasses.replace(self.train_config, seed=spec.seed, lr=spec.lr, batch_size=spec.batch_size)
        augment = random_flip_rot90 if (self.config.augment and self.config.use_images) else None
        loss = {"crps": gmm_crps, "nll": gmm_nll}[spec.loss]
        res = train_model(net, loss, train_inputs, z[tr], val_inputs, z[va],
                          tcfg, augment=augment, keep_on_cpu=True, resample=resample)
        net.to("cpu")
        val = concat_outputs(predict_batched(net, val_inputs, torch.device("cpu"),
                                             max(spec.batch_size, 1024))).detach_numpy()
        self.log.info(f"member {m} ({spec.loss}, K={spec.n_components}, lr={spec.lr:g}, batch={spec.batch_size}): "
                      f"validation CRPS {np.mean(gmm_crps_numpy(*val, z[va])):.5f}")
        return {k: v.detach().cpu() for k, v in net.state_dict().items()}, res.to_dict(), val


class DeepzCNNEstimator(_ImageMixin, DeepzEstimator):
    """Estimate redshift PDFs (M x K Gaussian mixtures) with a trained image CNN ensemble."""

    name = "DeepzCNNEstimator"
    entrypoint_function = "estimate"
    interactive_function = "deepz_cnn_estimator"
    method = "cnn"
    config_options = DeepzEstimator.config_options.copy()
    config_options.update({k: v.copy() for k, v in MIXTURE_OUTPUT_OPTIONS.items()})
    config_options.update(
        image_col=Param(str, "", msg="image column; empty = the column name used at training"),
        image_bands=Param(list, [], msg="image band names; empty = the model's. If given, must equal the model's"),
        bad_pixel_policy=Option(str, "", check=one_of("", *BAD_PIXEL_POLICIES),
                                msg="NaN/inf pixels: 'raise', 'zero', or empty = the model's setting"),
    )

    def _check_model(self, model) -> None:
        super()._check_model(model)
        info = model.get("images", {})
        if info.get("use_images") and self.config.image_bands:
            check_model_bands(info["bands"], self.config.image_bands, self.name + " (image_bands)")
        check_members(model, self.name)

    def _build_network(self, model):
        from rail.deepz.nets.cnn import CNNMember
        from rail.deepz.nets.pooling import MixtureEnsemble
        arch = dict(model["arch"])
        arch["zrange"] = tuple(arch["zrange"])
        ks = model.get("member_n_components") or [arch["n_components"]] * len(model["member_state_dicts"])
        members = []
        for i, (sd, k) in enumerate(zip(model["member_state_dicts"], ks)):
            net = CNNMember(**dict(arch, n_components=int(k)))
            try:
                net.load_state_dict(sd)
            except RuntimeError as err:
                raise ModelFormatError(
                    f"{self.name}: member {i}'s weights do not fit its architecture (arch, "
                    f"member_n_components[{i}]={k}): {str(err).splitlines()[0]}") from err
            members.append(net)
        self.scaler = Standardizer.from_dict(model["scalers"]["x"])
        return MixtureEnsemble(members, model["member_weights"])

    def _estimate_chunk(self, data: Mapping):
        from rail.deepz.training import concat_outputs, predict_batched
        from rail.deepz.pdf import mixture_ensemble
        m = self.model
        x, fvalid = self._photometry(data).masked_features(m["feature_blocks"], m.get("mask_features", False))
        extra = list(m.get("extra_features", []))
        if extra:
            x = np.concatenate([x, catalog_columns(data, extra, self.name)], axis=1)
            if fvalid is not None:
                fvalid = np.concatenate([fvalid, np.ones((len(x), len(extra)), bool)], axis=1)
        x = self.scaler.transform(x, fvalid)
        inputs = [x]
        info = m["images"]
        if info["use_images"]:
            col = self.config.image_col or info["col"]
            policy = self.config.bad_pixel_policy or info["bad_pixel_policy"]
            img = self._images(data, col, info["bands"], (info["height"], info["width"]), policy)
            inputs.append(preprocess_images(img, info["scale"], info["colors"]))
        params = concat_outputs(
            predict_batched(self.net, inputs, self.torch_device, self.inference_batch_size,
                            self.config.mixed_precision)
        )
        w, mu, sig = params.detach_numpy()
        return mixture_ensemble(w, mu, sig, m["zmin"], m["zmax"], self.config.nzbins,
                                self.config.qp_representation)
