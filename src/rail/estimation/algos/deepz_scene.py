"""Scene estimator: detect, deblend and emit a redshift PDF for every object of multi-band scenes
(after DeepDISC, Merz et al., ``deepdisc_photoz_lsst``).

DeepDISC is a Mask R-CNN (detectron2) with an extra Gaussian-mixture redshift head on each
detected instance. detectron2 does not install from the package index and torchvision's CPU
wheel cannot be imported beside torch 2.13.0 here, so this module builds a small
anchor-free detector from torch primitives instead (CenterNet-like, Zhou et al. 2019):

* a fully-convolutional U-Net (``width`` channels at full resolution, 2 x ``width`` at
  1/2 and 1/4) over ``asinh(pixels / noise)`` of the C bands (:mod:`rail.deepz.images`);
* full-resolution heads: centre heat map (focal loss on Gaussian-splatted centres of
  ``heatmap_sigma`` pixels), sub-pixel centre offset and log box size (L1 at the centre
  pixel), and a foreground-footprint mask (binary cross-entropy on the union of the truth
  footprints);
* per object, features sampled at its centre with ``grid_sample`` (full-resolution decoder,
  1/4-resolution bottleneck, the input pixels and their 5 x 5 box average; with
  ``aperture_radius`` > 0 also per-band aperture sums of the linear pixels and their
  adjacent-band differences, i.e. aperture colours) -> MLP -> K-component Gaussian mixture
  (:class:`rail.deepz.mixtures.GaussianMixtureHead`, trained with the closed-form CRPS at the
  *true* positions of the catalog objects).

Detections are the local maxima (3 x 3) of the heat map above ``score_threshold`` (at most
``max_detections`` per scene); each gets the box from the size head and a footprint area:
the predicted foreground pixels inside its box that are nearer to it than to any other
detection. This footprint is a semantic mask split by nearest centre, not the per-instance
mask of Mask R-CNN (a departure kept for size and CPU speed).

Inputs are the scene and truth tables of :func:`rail.deepz.scenes.simulate_scenes` (any
table with the same columns works). :class:`DeepzSceneEstimator` has two modes:
``mode='detect'`` (one PDF per detection; with a truth table the ancil ``truth_index`` names
the matched truth row, -1 for none) and ``mode='positions'`` (one PDF per row of a given
positions table, e.g. a catalog's detections, aligned with it: photo-z error without
detection error). Scenes stream chunk by chunk (``chunk_size`` scenes); the output, a
few numbers per detection, is assembled at the end.

Training scenes are augmented by the 8 symmetries of the square (``augment``). Not in this
version: per-scene metadata inputs (E(B-V)), ensembles of networks, MPI.
"""

from __future__ import annotations

import copy
import sys
import time
from typing import TYPE_CHECKING, Mapping

import numpy as np
from ceci.config import StageParameter as Param
from rail.core.data import TableHandle
from rail.estimation.informer import CatInformer

from rail.deepz.images import fit_image_scale, preprocess_images
from rail.deepz.scenes import (
    SceneInputError,
    check_scene_sizes,
    match_positions,
    scene_ids,
    scene_images,
    truth_columns,
)
from rail.deepz._version import __version__
from rail.deepz.modelfile import DeepzModelHandle
from rail.deepz.stages import (
    FORMAT,
    FORMAT_VERSION,
    MIXTURE_OUTPUT_OPTIONS,
    MIXTURE_REPRESENTATIONS,
    TRAINING_OPTIONS,
    CheckedOptions,
    DeepzEstimator,
    check_option_choice,
    check_output_paths,
    check_training_stage,
    table_to_numpy_dict,
    with_defaults,
)

if TYPE_CHECKING:  # annotations only: torch is imported where a stage trains or estimates
    import torch

    from rail.deepz.nets.scene import SceneNet

MODES = ("detect", "positions")
TRUTH_TRAIN_COLUMNS = ("scene_id", "x", "y", "box", "footprint")


def focal_heatmap_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 2.0, beta: float = 4.0):
    """CenterNet's penalty-reduced focal loss, summed and divided by the number of centres."""
    import torch
    p = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    pos = target >= 1.0 - 1e-6
    pos_loss = (torch.log(p) * (1 - p) ** alpha)[pos].sum()
    neg_loss = (torch.log(1 - p) * p**alpha * (1 - target) ** beta)[~pos].sum()
    return -(pos_loss + neg_loss) / pos.sum().clamp(min=1)


def rank_within_scene(local: np.ndarray, n_scenes: int) -> tuple[np.ndarray, int]:
    """Rank of each object among the objects of its scene (``local``: scene row per object, in
    input order) and the largest count (>= 1): the slots of a (n_scenes, kmax) padded array."""
    local = np.asarray(local, dtype=np.int64)
    order = np.argsort(local, kind="stable")
    counts = np.bincount(local, minlength=n_scenes)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size) - starts[local[order]]
    return rank, max(int(counts.max()) if counts.size else 0, 1)


class _SceneTargets:
    """Truth of the training scenes, padded per scene to (S, Kmax) arrays."""

    def __init__(self, truth: Mapping, row_of_scene: np.ndarray, n_scenes: int, h: int, w: int,
                 redshift_col: str, zmin: float, zmax: float):
        local = row_of_scene
        rank, kmax = rank_within_scene(local, n_scenes)
        box = np.asarray(truth["box"], dtype=np.float64)
        bkg = np.asarray(truth["background"], bool) if "background" in truth else np.zeros(local.size, bool)
        z = np.asarray(truth[redshift_col], dtype=np.float64) if redshift_col in truth else np.full(local.size, np.nan)
        zok = np.isfinite(z) & (z >= zmin) & (z <= zmax) & ~bkg

        def pad(v, fill=0.0, dtype=np.float32):
            out = np.full((n_scenes, kmax) + np.shape(v)[1:], fill, dtype=dtype)
            out[local, rank] = v
            return out

        self.x, self.y = pad(truth["x"]), pad(truth["y"])
        self.obj = pad(~bkg, False, bool)  # heat-map targets: catalog objects, not background
        self.zok = pad(zok, False, bool)
        self.z = pad(np.where(zok, z, 0.0))
        self.logwh = pad(np.log(np.maximum(np.stack([box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]], 1), 1.0)))
        fp = np.asarray(truth["footprint"], bool)
        if fp.shape[1:] != (h, w):
            raise SceneInputError(f"Truth column 'footprint' has shape {fp.shape[1:]} per object, scenes are {h}x{w}")
        mask = np.zeros((n_scenes, h, w), bool)
        keep = ~bkg
        np.logical_or.at(mask, local[keep], fp[keep])
        self.mask = mask[:, None].astype(np.float32)

    def batch(self, idx: np.ndarray, device) -> dict:
        import torch
        return {k: torch.as_tensor(getattr(self, k)[idx]).to(device)
                for k in ("x", "y", "obj", "zok", "z", "logwh", "mask")}


def augment_scenes(x: torch.Tensor, t: dict, k: int, flip: bool) -> tuple[torch.Tensor, dict]:
    """Rotate square scenes by ``k`` x 90 degrees and optionally mirror them, with their targets.

    Pixel-centre coordinates of an N x N scene map as (x, y) -> (y, N - 1 - x) per rotation
    (``torch.rot90`` over the (H, W) axes) and x -> N - 1 - x for the mirror; box width and
    height swap at each rotation. Padded (invalid) object slots are transformed too and stay
    masked.
    """
    import torch
    n = x.shape[-1]
    t = dict(t)
    for _ in range(k % 4):
        x, t["mask"] = torch.rot90(x, 1, dims=(2, 3)), torch.rot90(t["mask"], 1, dims=(2, 3))
        t["x"], t["y"] = t["y"], (n - 1) - t["x"]
        t["logwh"] = t["logwh"].flip(-1)
    if flip:
        x, t["mask"] = torch.flip(x, dims=(3,)), torch.flip(t["mask"], dims=(3,))
        t["x"] = (n - 1) - t["x"]
    return x, t


def scene_loss(net: SceneNet, img: torch.Tensor, t: dict, sigma: float, weights: dict) -> tuple[torch.Tensor, dict]:
    """Total multi-task loss of a batch of scenes and its parts (floats)."""
    import torch
    from torch.nn import functional as F
    from rail.deepz.mixtures import MixtureParams, gmm_crps
    maps = net(img)
    b, _, h, w = img.shape
    yy = torch.arange(h, device=img.device, dtype=torch.float32)[None, None, :, None]
    xx = torch.arange(w, device=img.device, dtype=torch.float32)[None, None, None, :]
    cx, cy = torch.round(t["x"]).clamp(0, w - 1), torch.round(t["y"]).clamp(0, h - 1)
    blobs = torch.exp(-((xx - cx[..., None, None]) ** 2 + (yy - cy[..., None, None]) ** 2) / (2 * sigma**2))
    blobs = torch.where(t["obj"][..., None, None], blobs, torch.zeros_like(blobs))
    heat_t = blobs.amax(dim=1, keepdim=True) if blobs.shape[1] else torch.zeros_like(maps["heat"])
    l_heat = focal_heatmap_loss(maps["heat"], heat_t)
    flat = (cy * w + cx).long()
    sel = t["obj"]

    def at_centres(m):  # (B, c, H, W) -> (B, K, c)
        return torch.gather(m.flatten(2), 2, flat[:, None, :].expand(-1, m.shape[1], -1)).permute(0, 2, 1)

    n_obj = sel.sum().clamp(min=1)
    off_t = torch.stack([t["x"] - cx, t["y"] - cy], dim=-1)
    l_off = ((at_centres(maps["offset"]) - off_t).abs().sum(-1) * sel).sum() / n_obj
    l_size = ((at_centres(maps["size"]) - t["logwh"]).abs().sum(-1) * sel).sum() / n_obj
    l_mask = F.binary_cross_entropy_with_logits(maps["mask"], t["mask"])
    params = net.mixture(maps, t["x"], t["y"])
    zsel = t["zok"].reshape(-1)
    if zsel.any():
        sub = MixtureParams(params.weights[zsel], params.means[zsel], params.sigmas[zsel])
        l_z = gmm_crps(sub, t["z"].reshape(-1)[zsel]).mean()
    else:
        l_z = torch.zeros((), device=img.device)
    total = l_heat + weights["box"] * (l_off + l_size) + weights["mask"] * l_mask + weights["z"] * l_z
    parts = {"heat": float(l_heat.detach()), "offset": float(l_off.detach()), "size": float(l_size.detach()),
             "mask": float(l_mask.detach()),
             "crps": float(l_z.detach())}
    return total, parts


def _scene_rows(truth: Mapping, sids: np.ndarray) -> np.ndarray:
    """Row of the scene table of every truth row (error naming unknown scene ids)."""
    truth_columns(truth, ("scene_id",))
    tid = np.asarray(truth["scene_id"], dtype=np.int64)
    order = np.argsort(sids)
    pos = np.searchsorted(sids[order], tid)
    pos = np.clip(pos, 0, max(sids.size - 1, 0))
    ok = sids.size > 0 and np.all(sids[order][pos] == tid)
    if not ok:
        bad = np.unique(tid[sids[order][pos] != tid]) if sids.size else np.unique(tid)
        raise SceneInputError(f"Truth table has scene_id(s) {bad[:5].tolist()} that are not in the scene table")
    return order[pos]


class DeepzSceneInformer(CheckedOptions, CatInformer):
    """Train the scene network on a scene table (``input``) and its truth table (``truth``)."""

    name = "DeepzSceneInformer"
    entrypoint_function = "inform"
    interactive_function = "deepz_scene_informer"
    method = "scene"
    inputs = [("input", TableHandle), ("truth", TableHandle)]
    outputs = [("model", DeepzModelHandle)]
    config_options = CatInformer.config_options.copy()
    config_options["hdf5_groupname"] = Param(str, "", msg="HDF5 group of the scene table ('' = top level)")
    config_options.update(with_defaults(
        {k: TRAINING_OPTIONS[k] for k in ("redshift_col", "zmin", "zmax", "epochs", "batch_size", "lr",
                                          "weight_decay", "clip_norm", "patience", "min_delta", "val_fraction",
                                          "seed", "device", "progress", "num_threads")},
        epochs=30, batch_size=8, lr=2e-3, patience=10,
    ))
    config_options.update(
        bands=Param(list, list("ugrizy"), msg="names of the image channels (axis 1 of the images); their count is checked"),
        image_col=Param(str, "images", msg="scene table column of the (N, C, H, W) pixels (linear flux per pixel)"),
        width=Param(int, 32, msg="channels of the full-resolution layers (2 x width at 1/2 and 1/4)"),
        hidden=Param(int, 64, msg="width of the per-object MLP before the mixture head"),
        n_components=Param(int, 5, msg="Gaussian components K of the redshift mixture"),
        heatmap_sigma=Param(float, 1.5, msg="width (pixels) of the Gaussian centre targets of the heat map"),
        box_weight=Param(float, 0.1, msg="weight of the offset + log-box-size L1 losses"),
        mask_weight=Param(float, 1.0, msg="weight of the footprint-mask cross-entropy"),
        z_weight=Param(float, 5.0, msg="weight of the redshift mixture CRPS"),
        aperture_radius=Param(float, 0.0, msg="pixels: radius of per-band aperture sums of the pixels at each "
                              "object's centre added to the redshift head's features (aperture S/N and "
                              "adjacent-band differences, i.e. colours); 0 = off"),
        augment=Param(bool, True, msg="random 90-degree rotations and mirror images of square training scenes "
                      "(one of the 8 per batch, targets transformed alike)"),
    )

    def __init__(self, args, **kwargs):
        super().__init__(args, **kwargs)
        self.train_config = check_training_stage(self)
        if self.config.width < 1 or self.config.n_components < 1 or self.config.hidden < 1:
            raise ValueError("Options 'width', 'hidden' and 'n_components' must be >= 1")
        if not self.config.aperture_radius >= 0:
            raise ValueError(f"Option 'aperture_radius' must be >= 0 pixels, got {self.config.aperture_radius}")

    def inform(self, training_data=None, truth=None, input=None, **kwargs):  # noqa: A002 (ceci tag name)
        """Train from a scene table and its truth table (tables or handles); return the model handle.

        ``input`` is an alias of ``training_data`` (``rail.interactive`` passes inputs by tag name).
        """
        training_data = input if training_data is None else training_data
        if training_data is None or truth is None:
            raise SceneInputError(f"{self.name}.inform needs a scene table and a truth table")
        self.set_data("input", training_data)
        self.set_data("truth", truth)
        self.run()
        self.finalize()
        return self.get_handle("model")

    def run(self):
        from rail.deepz.training import thread_policy
        check_output_paths(self)
        with thread_policy(self.config.num_threads, self.name):
            self._run()

    def _run(self):
        from rail.deepz.training import split_indices
        cfg = self.config
        scenes = self.get_data("input")
        if isinstance(scenes, Mapping) and cfg.image_col in scenes:
            scenes = dict(scenes, **{cfg.image_col: check_scene_sizes(scenes, cfg.image_col)})
        scenes = table_to_numpy_dict(self, scenes, cfg.hdf5_groupname)
        truth = table_to_numpy_dict(self, self.get_data("truth"))
        truth_columns(truth, TRUTH_TRAIN_COLUMNS)
        if cfg.redshift_col not in truth:
            raise SceneInputError(f"Truth table has no redshift column {cfg.redshift_col!r} (option 'redshift_col')")
        img = scene_images(scenes, len(cfg.bands), cfg.image_col, cfg.bands)
        n, c, h, w = img.shape
        sids = scene_ids(scenes, n)
        rows = _scene_rows(truth, sids)
        tr, va = split_indices(n, cfg.val_fraction, cfg.seed)
        sample = tr if tr.size <= 256 else np.random.default_rng(cfg.seed).choice(tr, 256, replace=False)
        scale = fit_image_scale(img[np.sort(sample)])
        x = preprocess_images(img, scale)
        targets = _SceneTargets(truth, rows, n, h, w, cfg.redshift_col, cfg.zmin, cfg.zmax)
        arch = dict(in_channels=int(c), width=int(cfg.width), hidden=int(cfg.hidden),
                    n_components=int(cfg.n_components), zrange=(float(cfg.zmin), float(cfg.zmax)),
                    aperture_radius=float(cfg.aperture_radius))
        weights = {"box": float(cfg.box_weight), "mask": float(cfg.mask_weight), "z": float(cfg.z_weight)}
        net, history = self._train(x, targets, tr, va, arch, weights)
        self.model = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "package_version": __version__,
            "method": self.method, "bands": list(cfg.bands), "err_bands": [],
            "zmin": float(cfg.zmin), "zmax": float(cfg.zmax), "arch": arch,
            "images": {"col": cfg.image_col, "scale": [float(s) for s in scale], "height": int(h), "width": int(w)},
            "heatmap_sigma": float(cfg.heatmap_sigma), "loss_weights": weights,
            "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
            "train": history,
        }
        self.add_data("model", self.model)

    def _train(self, x, targets, tr, va, arch, weights):
        """Multi-task loop over batches of scenes; best validation weights restored.

        Not :func:`rail.deepz.training.train_model`: that loop trains per-object inputs
        against one redshift each, while a scene carries a variable number of objects and
        dense targets.
        """
        import torch
        from rail.deepz.nets.scene import SceneNet
        from torch import nn
        from rail.deepz.training import resolve_device, seed_everything
        tc = self.train_config
        device = resolve_device(tc.device)
        gen = seed_everything(tc.seed)
        net = SceneNet(**arch).to(device)
        opt = torch.optim.AdamW(net.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=max(tc.patience // 3, 1))
        sigma = float(self.config.heatmap_sigma)
        augment = bool(self.config.augment) and x.shape[-1] == x.shape[-2]
        best, best_state, since, hist = float("inf"), copy.deepcopy(net.state_dict()), 0, []
        t0 = time.perf_counter()
        for epoch in range(tc.epochs):
            net.train()
            order = tr[torch.randperm(tr.size, generator=gen).numpy()]
            tot = 0.0
            for i in range(0, order.size, tc.batch_size):
                idx = order[i : i + tc.batch_size]
                xb, tb = torch.as_tensor(x[idx]).to(device), targets.batch(idx, device)
                if augment:
                    k, flip = int(torch.randint(0, 4, (1,), generator=gen)), bool(torch.randint(0, 2, (1,), generator=gen))
                    xb, tb = augment_scenes(xb, tb, k, flip)
                loss, _ = scene_loss(net, xb, tb, sigma, weights)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"Scene training loss became {float(loss)} at epoch {epoch}; lower 'lr'")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if tc.clip_norm > 0:
                    nn.utils.clip_grad_norm_(net.parameters(), tc.clip_norm)
                opt.step()
                tot += float(loss.detach()) * idx.size
            net.eval()
            val, parts = 0.0, {}
            with torch.no_grad():
                for i in range(0, va.size, tc.batch_size):
                    idx = va[i : i + tc.batch_size]
                    loss, p = scene_loss(net, torch.as_tensor(x[idx]).to(device), targets.batch(idx, device), sigma, weights)
                    val += float(loss) * idx.size
                    for k, v in p.items():
                        parts[k] = parts.get(k, 0.0) + v * idx.size / va.size
            val /= va.size
            hist.append({"epoch": epoch, "train_loss": tot / tr.size, "val_loss": val, **{f"val_{k}": v for k, v in parts.items()}})
            if tc.progress:
                print(f"[deepz-scene] epoch {epoch + 1}/{tc.epochs} train {tot / tr.size:.4f} val {val:.4f} "
                      + " ".join(f"{k} {v:.4f}" for k, v in parts.items()), file=sys.stderr, flush=True)
            sched.step(val)
            if val < best - tc.min_delta:
                best, best_state, since = val, copy.deepcopy(net.state_dict()), 0
            else:
                since += 1
                if since >= tc.patience:
                    break
        net.load_state_dict(best_state)
        return net.cpu().eval(), {"history": hist, "best_val_loss": best, "seconds": time.perf_counter() - t0,
                                  "device": str(device)}


def decode_detections(maps: dict, score_threshold: float, max_detections: int, mask_threshold: float = 0.5):
    """Peaks of the heat map -> per-scene padded detections (all tensors (B, K)), vectorised.

    Returns a dict: ``valid`` (bool), ``x``, ``y`` (peak pixel + predicted offset), ``score``,
    ``box`` (B, K, 4: x0, y0, x1, y1), ``area`` (footprint pixels, see the module docstring).
    """
    import torch
    from torch.nn import functional as F
    heat = torch.sigmoid(maps["heat"])
    b, _, h, w = heat.shape
    peak = heat == F.max_pool2d(heat, 3, stride=1, padding=1)
    score = torch.where(peak, heat, torch.zeros_like(heat)).flatten(1)
    k = min(int(max_detections), h * w)
    top, idx = score.topk(k, dim=1)
    valid = top > score_threshold
    py, px = (idx // w).float(), (idx % w).float()

    def at(m):
        return torch.gather(m.flatten(2), 2, idx[:, None, :].expand(-1, m.shape[1], -1))  # (B, c, K)

    off, size = at(maps["offset"]), at(maps["size"]).clamp(max=float(np.log(4 * max(h, w)))).exp()
    x, y = px + off[:, 0], py + off[:, 1]
    box = torch.stack([x - size[:, 0] / 2, y - size[:, 1] / 2, x + size[:, 0] / 2, y + size[:, 1] / 2], dim=-1)
    # footprint: foreground pixels inside the box, nearest to this detection
    fg = (torch.sigmoid(maps["mask"]) > mask_threshold).flatten(1)  # (B, HW)
    gy = torch.arange(h, device=heat.device, dtype=torch.float32).repeat_interleave(w)
    gx = torch.arange(w, device=heat.device, dtype=torch.float32).repeat(h)
    d2 = (gx[None, None] - x[..., None]) ** 2 + (gy[None, None] - y[..., None]) ** 2  # (B, K, HW)
    d2 = torch.where(valid[..., None], d2, torch.full_like(d2, float("inf")))
    nearest = d2.argmin(dim=1)  # (B, HW)
    mine = nearest[:, None, :] == torch.arange(k, device=heat.device)[None, :, None]
    inside = ((gx[None, None] >= box[..., 0:1]) & (gx[None, None] < box[..., 2:3])
              & (gy[None, None] >= box[..., 1:2]) & (gy[None, None] < box[..., 3:4]))
    area = (mine & inside & fg[:, None, :]).sum(-1)
    return {"valid": valid, "x": x, "y": y, "score": top, "box": box, "area": area}


class DeepzSceneEstimator(DeepzEstimator):
    """Detect objects in scenes and emit one Gaussian-mixture redshift PDF per detection
    (``mode='detect'``) or per row of a given positions table (``mode='positions'``).

    ``inference_batch_size`` counts scenes per forward pass here (0 = 16); ``chunk_size``
    scenes are read and validated at a time.
    """

    name = "DeepzSceneEstimator"
    entrypoint_function = "estimate"
    interactive_function = "deepz_scene_estimator"
    method = "scene"
    inputs = [("model", DeepzModelHandle), ("input", TableHandle), ("truth", TableHandle),
              ("positions", TableHandle)]
    config_options = DeepzEstimator.config_options.copy()
    config_options.update({k: v.copy() for k, v in MIXTURE_OUTPUT_OPTIONS.items()})
    config_options["hdf5_groupname"] = Param(str, "", msg="HDF5 group of the scene table ('' = top level)")
    config_options["chunk_size"] = Param(int, 64, msg="scenes per chunk read and processed at a time")
    config_options.update(
        mode=Param(str, "detect", msg="'detect': one PDF per detection; 'positions': one PDF per row of the "
                   "'positions' table (columns scene_id, x, y in pixels), aligned with it"),
        image_col=Param(str, "", msg="scene table image column; empty = the column used at training"),
        score_threshold=Param(float, 0.3, msg="minimum heat-map peak (0-1) of a detection"),
        max_detections=Param(int, 64, msg="most detections kept per scene (highest scores)"),
        mask_threshold=Param(float, 0.5, msg="foreground probability above which a pixel is in a footprint"),
        match_radius=Param(float, 2.5, msg="pixels: detection-truth matching radius (mutual nearest neighbours)"),
    )

    def __init__(self, args, **kwargs):
        super().__init__(args, **kwargs)
        check_option_choice(self.config, "qp_representation", MIXTURE_REPRESENTATIONS)
        check_option_choice(self.config, "mode", MODES)
        if self.config.max_detections < 1:
            raise ValueError(f"Option 'max_detections' must be >= 1, got {self.config.max_detections}")
        if self.config.mixed_precision:
            raise ValueError("Option 'mixed_precision' is not supported by DeepzSceneEstimator (float32 only)")
        if not 0.0 <= self.config.score_threshold < 1.0:
            raise ValueError(f"Option 'score_threshold' must be in [0, 1), got {self.config.score_threshold}")
        self._given = None  # (truth, positions) when called through estimate()

    def estimate(self, input_data=None, truth=None, positions=None, input=None, **kwargs):  # noqa: A002
        """Scene table (or handle) -> qp ensemble handle; ``truth`` and ``positions`` are optional
        tables (None or ``"none"``: absent, as ``rail.interactive`` passes unused inputs).
        ``input`` is an alias of ``input_data``."""
        input_data = input if input_data is None else input_data
        if input_data is None:
            raise SceneInputError(f"{self.name}.estimate needs a scene table")
        self.set_data("input", input_data)

        def given(t):
            if t is None or (isinstance(t, str) and t.lower() == "none"):
                return None
            return table_to_numpy_dict(self, t)

        self._given = (given(truth), given(positions))
        try:
            self.run()
        finally:
            self._given = None
        self.finalize()
        return self.get_handle("output")

    def _optional_table(self, tag: str):
        handle = self.get_handle(tag, allow_missing=True)
        if handle.data is None and handle.path in (None, "None", "none", ""):
            return None
        return table_to_numpy_dict(self, self.get_data(tag))

    def _scene_chunks(self):
        """(start, end, numpyDict) chunks of ``chunk_size`` scenes, from a file or from memory
        (RAIL's iterator hands an in-memory table over in one piece)."""
        handle = self.get_handle("input", allow_missing=True)
        group = self.config.hdf5_groupname
        if handle.data is not None and handle.path in (None, "None", "none", ""):
            data = handle.data
            if isinstance(data, Mapping):
                col = self.config.image_col or self.model["images"]["col"]
                inner = data[group] if group and group in data else data
                data = dict(inner, **{col: check_scene_sizes(inner, col)}) if col in inner else inner
            data = table_to_numpy_dict(self, data, group)
            n = len(next(iter(data.values()))) if data else 0
            step = max(int(self.config.chunk_size), 1)
            for s in range(0, n, step):
                yield s, min(s + step, n), {k: v[s : s + step] for k, v in data.items()}
            return
        for s, e, chunk in self.input_iterator("input"):
            yield s, e, table_to_numpy_dict(self, chunk, group)

    def _build_network(self, model):
        from rail.deepz.nets.scene import SceneNet
        arch = dict(model["arch"])
        arch["zrange"] = tuple(arch["zrange"])
        net = SceneNet(**arch)
        net.load_state_dict(model["state_dict"])
        return net

    def run(self):
        from rail.deepz.training import thread_policy
        check_output_paths(self)
        with thread_policy(self.config.num_threads, self.name):
            self._run()

    def _run(self):
        import torch
        from rail.deepz.pdf import mixture_ensemble
        self.open_model(**self.config)
        m, cfg = self.model, self.config
        if self._given is not None:
            truth, positions = self._given
        else:  # run by ceci: the optional inputs are whatever the pipeline connected
            truth, positions = self._optional_table("truth"), self._optional_table("positions")
        if truth is not None:
            truth_columns(truth)
        if cfg.mode == "positions":
            if positions is None:
                raise SceneInputError("mode='positions' needs a 'positions' table (scene_id, x, y)")
            truth_columns(positions)
            pos_sid = np.asarray(positions["scene_id"], dtype=np.int64)
            pos_x = np.asarray(positions["x"], dtype=np.float32)
            pos_y = np.asarray(positions["y"], dtype=np.float32)
            k = m["arch"]["n_components"]
            out_w, out_mu, out_s = (np.full((pos_sid.size, k), np.nan, np.float32) for _ in range(3))
            done = np.zeros(pos_sid.size, bool)
        parts: dict[str, list] = {}
        shape = None
        col = cfg.image_col or m["images"]["col"]
        for start, end, chunk in self._scene_chunks():
            img = scene_images(chunk, len(m["bands"]), col, m["bands"])
            if shape is None:
                shape = img.shape[2:]
            elif img.shape[2:] != shape:
                raise SceneInputError(
                    f"Scene table holds scenes of mixed sizes: {shape} in earlier chunks, {img.shape[2:]} at rows "
                    f"{start}-{end}; every scene of a table must have the same size"
                )
            sids = scene_ids(chunk, img.shape[0], start)
            x = preprocess_images(img, m["images"]["scale"])
            bs = self.inference_batch_size if cfg.inference_batch_size > 0 else 16
            for i in range(0, x.shape[0], bs):
                xb = torch.as_tensor(x[i : i + bs]).to(self.torch_device)
                with torch.inference_mode():
                    maps = self.net(xb)
                    if cfg.mode == "detect":
                        self._detect_batch(maps, sids[i : i + bs], parts)
                    else:
                        self._positions_batch(maps, sids[i : i + bs], pos_sid, pos_x, pos_y,
                                              (out_w, out_mu, out_s), done)
        if cfg.mode == "positions":
            if not done.all():
                miss = np.unique(pos_sid[~done])
                raise SceneInputError(f"{int((~done).sum())} positions row(s) name scene_id(s) {miss[:5].tolist()} "
                                      "that are not in the scene table")
            ens = mixture_ensemble(out_w, out_mu, out_s, m["zmin"], m["zmax"], cfg.nzbins, cfg.qp_representation)
            ancil = {"scene_id": pos_sid, "x": pos_x.astype(np.float64), "y": pos_y.astype(np.float64)}
        else:
            cat = {k: np.concatenate(v) for k, v in parts.items()} if parts else {}
            k = m["arch"]["n_components"]
            if not cat:
                cat = {"w": np.zeros((0, k)), "mu": np.zeros((0, k)), "s": np.ones((0, k)),
                       "scene_id": np.zeros(0, np.int64), "x": np.zeros(0), "y": np.zeros(0),
                       "score": np.zeros(0), "box": np.zeros((0, 4)), "footprint_area": np.zeros(0, np.int64)}
            ens = mixture_ensemble(cat.pop("w"), cat.pop("mu"), cat.pop("s"), m["zmin"], m["zmax"], cfg.nzbins,
                                   cfg.qp_representation)
            ancil = cat
            if truth is not None:
                d2t, _ = match_positions(cat["scene_id"], cat["x"], cat["y"], truth["scene_id"], truth["x"],
                                         truth["y"], cfg.match_radius)
                ancil["truth_index"] = d2t
        full = dict(ens.ancil) if ens.ancil is not None else {}
        full.update(ancil)
        ens.set_ancil(full)
        self._check_pdfs(ens, 0)  # rows named are detections (detect) or positions rows
        self.add_data("output", ens)

    def _detect_batch(self, maps, sids, parts):
        import torch
        cfg = self.config
        det = decode_detections(maps, cfg.score_threshold, cfg.max_detections, cfg.mask_threshold)
        v = det["valid"]
        if not v.any():
            return
        params = self.net.mixture(maps, det["x"], det["y"])
        flat = v.reshape(-1)
        w, mu, s = (t[flat].float().cpu().numpy() for t in (params.weights, params.means, params.sigmas))
        b_idx = torch.nonzero(v, as_tuple=True)[0].cpu().numpy()
        new = {"w": w, "mu": mu, "s": s, "scene_id": np.asarray(sids)[b_idx],
               "x": det["x"][v].double().cpu().numpy(), "y": det["y"][v].double().cpu().numpy(),
               "score": det["score"][v].double().cpu().numpy(), "box": det["box"][v].double().cpu().numpy(),
               "footprint_area": det["area"][v].cpu().numpy().astype(np.int64)}
        for key, val in new.items():
            parts.setdefault(key, []).append(val)

    def _positions_batch(self, maps, sids, pos_sid, pos_x, pos_y, out, done):
        import torch
        rows = np.flatnonzero(np.isin(pos_sid, sids))
        if rows.size == 0:
            return
        local = np.searchsorted(np.sort(sids), pos_sid[rows])
        local = np.argsort(sids)[local]
        rank, kmax = rank_within_scene(local, len(sids))
        px = np.zeros((len(sids), kmax), np.float32)
        py = np.zeros_like(px)
        px[local, rank], py[local, rank] = pos_x[rows], pos_y[rows]
        dev = self.torch_device
        params = self.net.mixture(maps, torch.as_tensor(px).to(dev), torch.as_tensor(py).to(dev))
        flat = local * kmax + rank
        for arr, t in zip(out, (params.weights, params.means, params.sigmas)):
            arr[rows] = t.float().cpu().numpy()[flat]
        done[rows] = True
