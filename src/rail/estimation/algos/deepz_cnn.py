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
from typing import Mapping

import numpy as np
import torch
from ceci.config import StageParameter as Param
from torch import nn

from rail.deepz.ensemble import MixtureEnsemble
from rail.deepz.images import (
    BAD_PIXEL_POLICIES,
    BadImageError,
    fit_image_scale,
    n_channels,
    preprocess_images,
    validate_images,
)
from rail.deepz.mixtures import GaussianMixtureHead, MixtureParams, gmm_crps, gmm_crps_numpy, gmm_nll
from rail.deepz.pdf import mixture_ensemble
from rail.deepz.photometry import check_model_bands
from rail.deepz.scaling import Standardizer, fit_standardizer
from rail.deepz.stages import (
    MIXTURE_OUTPUT_OPTIONS,
    DeepzEstimator,
    DeepzInformer,
    Option,
    bound,
    one_of,
    positive_int_list,
    with_defaults,
)
from rail.deepz.training import concat_outputs, predict_batched, split_indices, train_model

LOSSES = {"crps": gmm_crps, "nll": gmm_nll}
FEATURES = ("mags", "colors", "errors")


class CNNMember(nn.Module):
    """One ensemble member: conv branch (optional) + dense catalog branch -> mixture head.

    ``forward(x_cat[, x_img])`` returns :class:`MixtureParams` (N, K).
    """

    def __init__(self, n_features: int, in_channels: int, conv_channels: list[int],
                 dense_units: list[int], n_components: int, use_images: bool,
                 zrange: tuple[float, float]):
        super().__init__()
        self.use_images = bool(use_images)
        width = 0
        if self.use_images:
            layers, prev = [], in_channels
            for c in conv_channels:
                layers += [nn.Conv2d(prev, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2)]
                prev = c
            layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
            self.conv = nn.Sequential(*layers)
            width += prev
        dense, prev = [], n_features
        for u in dense_units:
            dense += [nn.Linear(prev, u), nn.ReLU()]
            prev = u
        self.dense = nn.Sequential(*dense)
        width += prev
        hidden = dense_units[-1] if dense_units else width
        self.merge = nn.Sequential(nn.Linear(width, hidden), nn.ReLU())
        self.head = GaussianMixtureHead(hidden, n_components, mean_init=zrange)

    def forward(self, x_cat: torch.Tensor, x_img: torch.Tensor | None = None) -> MixtureParams:
        h = self.dense(x_cat)
        if self.use_images:
            h = torch.cat([h, self.conv(x_img)], dim=1)
        return self.head(self.merge(h))


def random_flip_rot90(batch: list[torch.Tensor]) -> list[torch.Tensor]:
    """Augment the image tensor (second input) by random flips and 90-degree rotations.

    One of the 8 symmetries of the square per batch (the catalog features are unchanged);
    drawn from torch's global generator, which ``train_model`` seeds.
    """
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
    )

    def _fit(self, data: Mapping, z: np.ndarray, val_mask):
        cfg = self.config
        mask = cfg.missing_policy == "mask"
        blocks = list(FEATURES) + (["valid"] if mask else [])
        x, fvalid = self._photometry(data).masked_features(blocks, mask)
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
        augment = random_flip_rot90 if (cfg.augment and cfg.use_images) else None
        members, results, val_crps, losses = [], [], [], []
        for m in range(cfg.n_members):
            loss_name = _member_losses(cfg.loss, m)
            loss_fn = LOSSES[loss_name]
            torch.manual_seed(cfg.seed + m)
            net = CNNMember(**arch)
            tcfg = dataclasses.replace(self.train_config, seed=cfg.seed + m)
            res = train_model(net, loss_fn, [a[tr] for a in inputs], z[tr], [a[va] for a in inputs], z[va],
                              tcfg, augment=augment, keep_on_cpu=True)
            net.to("cpu")
            wv, mv, sv = concat_outputs(predict_batched(net, [a[va] for a in inputs], torch.device("cpu"),
                                                        max(self.train_config.batch_size, 1024))).detach_numpy()
            val_crps.append(float(np.mean(gmm_crps_numpy(wv, mv, sv, z[va]))))
            self.log.info(f"member {m} ({loss_name}): validation CRPS {val_crps[-1]:.5f}")
            members.append({k: v.detach().cpu() for k, v in net.state_dict().items()})
            results.append(res.to_dict())
            losses.append(loss_name)
        if cfg.member_weighting == "equal":
            mw = np.full(cfg.n_members, 1.0 / cfg.n_members)
        else:
            inv = 1.0 / np.maximum(np.asarray(val_crps), 1e-12)
            mw = inv / inv.sum()
        return self._model_dict(
            arch=arch,
            feature_blocks=blocks,
            # masked features zeroed after standardisation (absent in older models: not zeroed)
            mask_features=mask,
            images=image_info,
            member_state_dicts=members,
            member_weights=[float(v) for v in mw],
            member_losses=losses,
            member_val_crps=val_crps,
            scalers={"x": scaler.to_dict()},
            train=results,
        )


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

    def _build_network(self, model):
        arch = dict(model["arch"])
        arch["zrange"] = tuple(arch["zrange"])
        members = []
        for sd in model["member_state_dicts"]:
            net = CNNMember(**arch)
            net.load_state_dict(sd)
            members.append(net)
        self.scaler = Standardizer.from_dict(model["scalers"]["x"])
        return MixtureEnsemble(members, model["member_weights"])

    def _estimate_chunk(self, data: Mapping):
        m = self.model
        x = self.scaler.transform(*self._photometry(data).masked_features(
            m["feature_blocks"], m.get("mask_features", False)))
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
