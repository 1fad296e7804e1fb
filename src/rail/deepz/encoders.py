"""Pluggable embedding encoders for the embedding MDN (:mod:`rail.estimation.algos.deepz_embed`).

An encoder turns one table chunk into an (N, D) float32 embedding. Three kinds:

* :class:`ColumnsEncoder` (``"columns"``): embeddings precomputed by any model and stored
  in the input table, as D scalar columns or as one 2-D array column (N, D).
* :class:`AutoencoderEncoder` (``"autoencoder"``): a small MLP autoencoder over
  standardised photometric features (colours, magnitudes...), trained at inform time on
  the input itself (no downloaded weights); with an image column, a small convolutional
  branch adds an image latent and the decoder also reconstructs a pooled image.
* :class:`FoundationModelEncoder` (``"foundation"``): adapter for a pretrained foundation
  model (AION, AstroPT, ...) loaded from a *local* path. Formats: ``torchscript`` (a
  ``torch.jit`` file mapping a float32 batch to (N, D) embeddings; how to export a model
  once, offline) or ``loader`` (a python callable ``"module:function"`` receiving the
  local path and returning a callable model; the hook for packages such as ``aion`` or
  ``astropt``). Nothing is ever downloaded: a missing path is a
  :class:`FileNotFoundError` saying so.

Common interface::

    enc = make_encoder(kind, options)
    enc.fit(data, phot, train_idx, val_idx, train_config)   # data: numpyDict, phot: Photometry|None
    emb = enc.encode(data, phot)                             # (N, D) float32
    d = enc.to_dict(); enc2 = encoder_from_dict(d)           # plain dict stored in the model

Encoders never standardise their output for the redshift head: the informer fits a
:class:`~rail.deepz.scaling.Standardizer` on the embeddings of the training split.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import os
from dataclasses import replace
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from .images import preprocess_images
from .photometry import FEATURE_BLOCKS as PHOT_BLOCKS
from .photometry import Photometry
from .scaling import Standardizer, fit_standardizer

if TYPE_CHECKING:  # annotations only: torch is imported where a stage trains or estimates
    from .nets.encoders import AutoencoderNet
    from .training import TrainConfig

ENCODER_KINDS = ("columns", "autoencoder", "foundation")


class EncoderError(ValueError):
    """The encoder cannot be built or applied as configured (names the column/option)."""


def _n_rows(data: Mapping) -> int:
    return len(next(iter(data.values())))


def _numeric_column(data: Mapping, name: str, what: str) -> np.ndarray:
    if name not in data:
        avail = ", ".join(sorted(map(str, data.keys()))[:30])
        raise EncoderError(f"Input has no {what} column {name!r}. Available columns: {avail}")
    arr = np.asarray(data[name])
    if arr.dtype.kind not in "fiu":
        raise EncoderError(f"{what} column {name!r} must be numeric, got dtype {arr.dtype}")
    return arr


def _check_finite(arr: np.ndarray, name: str, what: str) -> None:
    bad = ~np.isfinite(arr)
    if bad.any():
        rows = int(bad.reshape(arr.shape[0], -1).any(1).sum())
        raise EncoderError(f"{what} column {name!r} has NaN/inf values in {rows} row(s)")


class Encoder:
    """Base class: subclasses set ``kind`` and implement fit/encode/to_dict/from_dict."""

    kind = ""
    needs_photometry = False
    out_dim: int = 0

    def fit(self, data: Mapping, phot: Photometry | None, train_idx: np.ndarray, val_idx: np.ndarray,
            train_config: TrainConfig | None = None) -> "Encoder":
        return self

    def encode(self, data: Mapping, phot: Photometry | None, device: str = "cpu",
               batch_size: int = 65536) -> np.ndarray:
        raise NotImplementedError  # pragma: no cover

    def to_dict(self) -> dict:
        raise NotImplementedError  # pragma: no cover

    @classmethod
    def from_dict(cls, d: dict) -> "Encoder":
        raise NotImplementedError  # pragma: no cover


# ----------------------------------------------------------------- columns


class ColumnsEncoder(Encoder):
    """Embeddings already in the table: D scalar columns, or one 2-D array column.

    Parameters
    ----------
    columns : list of str
        Column names. One name whose column is 2-D (N, D) is used as is; otherwise each
        name is a 1-D column and they are stacked in the given order.
    """

    kind = "columns"

    def __init__(self, columns: Sequence[str]):
        self.columns = [str(c) for c in columns]
        if not self.columns:
            raise EncoderError("Option 'embedding_columns' is empty: name the embedding column(s)")
        self.out_dim = 0

    def _read(self, data: Mapping) -> np.ndarray:
        n = _n_rows(data)
        if len(self.columns) == 1:
            name = self.columns[0]
            arr = _numeric_column(data, name, "embedding")
            if arr.ndim == 1:
                arr = arr[:, None]
            elif arr.ndim != 2:
                raise EncoderError(
                    f"embedding column {name!r} must be 1-D or 2-D (N, D), got shape {arr.shape}"
                )
            _check_finite(arr, name, "embedding")
            out = arr
        else:
            cols = []
            for name in self.columns:
                arr = _numeric_column(data, name, "embedding")
                if arr.ndim != 1:
                    raise EncoderError(
                        f"embedding column {name!r} must be 1-D when several columns are listed "
                        f"(got shape {arr.shape}); give a 2-D column alone"
                    )
                _check_finite(arr, name, "embedding")
                cols.append(arr)
            out = np.stack(cols, axis=1)
        if out.shape[0] != n:
            raise EncoderError(f"embedding column(s) {self.columns} have {out.shape[0]} rows, table has {n}")
        return out.astype(np.float32)

    def fit(self, data, phot, train_idx, val_idx, train_config=None):
        self.out_dim = int(self._read(data).shape[1])
        return self

    def encode(self, data, phot, device="cpu", batch_size=65536):
        emb = self._read(data)
        if self.out_dim and emb.shape[1] != self.out_dim:
            raise EncoderError(
                f"embedding column(s) {self.columns} have dimension {emb.shape[1]}, the model was "
                f"trained on dimension {self.out_dim}"
            )
        return emb

    def to_dict(self):
        return {"kind": self.kind, "columns": list(self.columns), "out_dim": self.out_dim}

    @classmethod
    def from_dict(cls, d):
        obj = cls(d["columns"])
        obj.out_dim = int(d["out_dim"])
        return obj


# ----------------------------------------------------------------- images


def read_images(data: Mapping, column: str, shape: tuple | None = None) -> np.ndarray:
    """Image column as float32 (N, C, H, W); 3-D (N, H, W) becomes one channel.

    ``shape`` (C, H, W) is checked when given (the training shape).
    """
    arr = _numeric_column(data, column, "image")
    if arr.ndim == 3:
        arr = arr[:, None]
    if arr.ndim != 4:
        raise EncoderError(
            f"image column {column!r} must have shape (N, C, H, W) or (N, H, W), got {arr.shape}"
        )
    if shape is not None and tuple(arr.shape[1:]) != tuple(shape):
        raise EncoderError(
            f"image column {column!r} has images of shape {tuple(arr.shape[1:])} (C, H, W); "
            f"the model was trained on {tuple(shape)}"
        )
    _check_finite(arr, column, "image")
    return arr.astype(np.float32)


# ----------------------------------------------------------------- autoencoder


class AutoencoderEncoder(Encoder):
    """Small autoencoder trained at inform time on the input photometry (and cutouts).

    Parameters
    ----------
    features : list of str
        Photometric feature blocks (:meth:`Photometry.features`), e.g. ``["mags", "colors"]``.
    hidden : list of int
        Hidden widths of the encoder (mirrored in the decoder).
    latent_dim : int
        Dimension of the photometric latent.
    image_column : str
        Optional image column (N, C, H, W); adds a conv branch of ``image_latent_dim``.
    epochs, lr, batch_size : training of the autoencoder (the rest of the training
        settings, seed and device come from the stage's training options).
    mask : bool
        ``missing_policy='mask'``: masked measurements (and colours using them) are zeroed
        after standardisation and the per-band indicators (``valid`` block) are added, so the
        encoder never sees a masked value.
    """

    kind = "autoencoder"
    needs_photometry = True

    def __init__(self, features=("mags", "colors"), hidden=(64, 64), latent_dim=16, image_column="",
                 image_latent_dim=8, epochs=100, lr=1e-3, batch_size=512, mask=False):
        bad = [b for b in features if b not in PHOT_BLOCKS]
        if bad or not features:
            raise EncoderError(f"Option 'ae_features'={list(features)} must be a non-empty subset of {PHOT_BLOCKS}")
        if int(latent_dim) < 1:
            raise EncoderError(f"Option 'ae_latent_dim' must be >= 1, got {latent_dim}")
        self.mask = bool(mask)
        self.features = list(features) + (["valid"] if self.mask and "valid" not in features else [])
        self.hidden = [int(h) for h in hidden]
        self.latent_dim = int(latent_dim)
        self.image_column = str(image_column or "")
        self.image_latent_dim = int(image_latent_dim)
        self.epochs, self.lr, self.batch_size = int(epochs), float(lr), int(batch_size)
        self.scaler: Standardizer | None = None
        self.image_shape: tuple | None = None
        self.image_scale: np.ndarray | None = None
        self.net: AutoencoderNet | None = None
        self.history: list = []

    @property
    def out_dim(self):
        return self.latent_dim + (self.image_latent_dim if self.image_column else 0)

    def _arch(self):
        return dict(n_features=int(self.scaler.mean.shape[0]), hidden=self.hidden, latent_dim=self.latent_dim,
                    image_shape=self.image_shape, image_latent_dim=self.image_latent_dim)

    def _inputs(self, data, phot):
        if phot is None:
            raise EncoderError("the autoencoder encoder needs photometry (options 'bands'/'err_bands')")
        x = self.scaler.transform(*phot.masked_features(self.features, self.mask))
        inputs = [x]
        if self.image_column:
            img = read_images(data, self.image_column, self.image_shape)
            # arcsinh stretch with a per-channel scale fitted on the training images
            inputs.append(preprocess_images(img, self.image_scale))
        return inputs

    def fit(self, data, phot, train_idx, val_idx, train_config=None):
        import torch
        from .nets.encoders import AutoencoderNet
        from .training import TrainConfig, train_model
        if phot is None:
            raise EncoderError("the autoencoder encoder needs photometry (options 'bands'/'err_bands')")
        x, fvalid = phot.masked_features(self.features, self.mask)
        self.scaler = fit_standardizer(x, fvalid, train_idx)
        if self.image_column:
            img = read_images(data, self.image_column)
            self.image_shape = tuple(int(s) for s in img.shape[1:])
            scale = np.median(np.abs(img[train_idx]), axis=(0, 2, 3))
            self.image_scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        inputs = self._inputs(data, phot)
        cfg = copy.copy(train_config) if train_config is not None else TrainConfig(progress=False)
        cfg = replace(cfg, epochs=self.epochs, lr=self.lr, batch_size=self.batch_size)
        torch.manual_seed(cfg.seed)
        self.net = AutoencoderNet(**self._arch())
        zeros = np.zeros(len(x), dtype=np.float32)  # train_model's target: unused by the loss

        result = train_model(
            self.net, lambda loss, _z: loss.float(),
            [a[train_idx] for a in inputs], zeros[train_idx],
            [a[val_idx] for a in inputs], zeros[val_idx], cfg,
            keep_on_cpu=bool(self.image_column),
        )
        self.net.to("cpu").eval()
        self.history = result.history
        return self

    def encode(self, data, phot, device="cpu", batch_size=65536):
        from .nets.encoders import _EncodeOnly
        from .training import concat_outputs, predict_batched, resolve_device
        if self.net is None:
            raise RuntimeError("AutoencoderEncoder.encode called before fit")
        dev = resolve_device(device) if isinstance(device, str) else device
        model = _EncodeOnly(self.net).to(dev)
        out = concat_outputs(predict_batched(model, self._inputs(data, phot), dev, batch_size)).numpy()
        self.net.to("cpu")
        return out.astype(np.float32)

    def to_dict(self):
        return {
            "kind": self.kind, "features": self.features, "mask": self.mask, "hidden": self.hidden,
            "latent_dim": self.latent_dim,
            "image_column": self.image_column, "image_latent_dim": self.image_latent_dim,
            "epochs": self.epochs, "lr": self.lr, "batch_size": self.batch_size,
            "scaler": self.scaler.to_dict(), "image_shape": self.image_shape, "image_scale": self.image_scale,
            "state_dict": {k: v.detach().cpu() for k, v in self.net.state_dict().items()},
            "history": self.history,
        }

    @classmethod
    def from_dict(cls, d):
        from .nets.encoders import AutoencoderNet
        obj = cls(d["features"], d["hidden"], d["latent_dim"], d["image_column"], d["image_latent_dim"],
                  d["epochs"], d["lr"], d["batch_size"], d.get("mask", False))
        obj.scaler = Standardizer.from_dict(d["scaler"])
        obj.image_shape = tuple(d["image_shape"]) if d["image_shape"] is not None else None
        obj.image_scale = None if d["image_scale"] is None else np.asarray(d["image_scale"], dtype=np.float32)
        obj.net = AutoencoderNet(**obj._arch())
        obj.net.load_state_dict(d["state_dict"])
        obj.net.eval()
        obj.history = d.get("history", [])
        return obj


# ----------------------------------------------------------------- foundation models

FOUNDATION_FORMATS = ("auto", "torchscript", "loader")


def file_sha256(path: str, block: int = 1 << 20) -> str:
    """SHA-256 of a file (or of the sorted files of a directory), to recognise weights later."""
    h = hashlib.sha256()
    paths = [path]
    if os.path.isdir(path):
        paths = sorted(os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs)
    for p in paths:
        h.update(os.path.relpath(p, path).encode() if p != path else b"")
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(block), b""):
                h.update(chunk)
    return h.hexdigest()


class FoundationModelEncoder(Encoder):
    """Adapter for a pretrained (foundation) model whose weights are in a local file.

    Parameters
    ----------
    path : str
        Local file or directory with the weights. Never downloaded: a missing path raises
        :class:`FileNotFoundError`.
    fmt : {"auto", "torchscript", "loader"}
        ``torchscript``: ``torch.jit.load(path)``; ``loader``: ``loader(path)`` builds the
        model (for AION/AstroPT with their own packages, loading local weights only);
        ``auto``: ``loader`` if one is given, else ``torchscript``.
    loader : str
        ``"module:function"``; the function receives the local path and returns a callable
        mapping a float32 batch tensor to (N, D) embeddings (or a tuple/list whose first
        element is that).
    inputs : list of str
        What the model receives: photometric feature blocks (``mags``, ``colors``...; one
        (N, F) tensor) or, as a single entry ``"image:<column>"``, the image column
        (N, C, H, W).
    """

    kind = "foundation"

    def __init__(self, path: str, fmt: str = "auto", loader: str = "", inputs=("mags", "colors")):
        self.path = str(path or "")
        self.fmt = str(fmt)
        self.loader = str(loader or "")
        self.inputs = list(inputs)
        if self.fmt not in FOUNDATION_FORMATS:
            raise EncoderError(f"Option 'foundation_format'={self.fmt!r} is not one of {FOUNDATION_FORMATS}")
        if not self.inputs:
            raise EncoderError("Option 'foundation_inputs' is empty")
        self.image_column = ""
        if self.inputs[0].startswith("image:"):
            if len(self.inputs) != 1:
                raise EncoderError("Option 'foundation_inputs': an 'image:<column>' entry must be alone")
            self.image_column = self.inputs[0].split(":", 1)[1]
        else:
            bad = [b for b in self.inputs if b not in PHOT_BLOCKS]
            if bad:
                raise EncoderError(
                    f"Option 'foundation_inputs'={self.inputs}: unknown block(s) {bad}; use a subset of "
                    f"{PHOT_BLOCKS} or ['image:<column>']"
                )
        self.needs_photometry = not self.image_column
        self.sha256 = ""
        self.out_dim = 0
        self._model = None

    def _load(self):
        import torch
        from .nets.encoders import _CallableModule
        from torch import nn
        if self._model is not None:
            return self._model
        if not self.path:
            raise EncoderError(
                "Option 'foundation_path' is empty: give the local path of the foundation model's "
                "weights (nothing is downloaded at run time)"
            )
        if not os.path.exists(self.path):
            raise FileNotFoundError(
                f"Foundation model weights not found at {self.path!r} (option 'foundation_path'). "
                "This adapter never downloads weights: fetch/export them yourself and point "
                "'foundation_path' at the local copy."
            )
        fmt = self.fmt
        if fmt == "auto":
            fmt = "loader" if self.loader else "torchscript"
        if fmt == "loader":
            if ":" not in self.loader:
                raise EncoderError(
                    f"Option 'foundation_loader'={self.loader!r} must be 'module:function' "
                    "(a function taking the local weights path and returning the model)"
                )
            mod, fn = self.loader.split(":", 1)
            try:
                func = getattr(importlib.import_module(mod), fn)
            except (ImportError, AttributeError) as err:
                raise EncoderError(f"Option 'foundation_loader'={self.loader!r} cannot be imported: {err}") from err
            # belt and braces: hub-based loaders must not reach the network
            saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
            os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
            try:
                model = func(self.path)
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
        else:
            if os.path.isdir(self.path):
                raise EncoderError(
                    f"foundation_path {self.path!r} is a directory; format 'torchscript' needs a "
                    "torch.jit file (use 'loader' for directory checkpoints)"
                )
            try:
                model = torch.jit.load(self.path, map_location="cpu")
            except Exception as err:  # torch raises RuntimeError/ValueError variants
                raise EncoderError(
                    f"{self.path!r} is not a TorchScript file ({type(err).__name__}: {str(err)[:200]}); "
                    "export the model with torch.jit.script/trace and save it, or use "
                    "foundation_format='loader' with foundation_loader='module:function'"
                ) from err
        if not isinstance(model, nn.Module):
            model = _CallableModule(model)
        model.eval()
        self._model = model
        return model

    def _input_arrays(self, data, phot):
        if self.image_column:
            return [read_images(data, self.image_column)]
        if phot is None:
            raise EncoderError("foundation_inputs lists photometric blocks but no photometry was given")
        return [phot.features(self.inputs)]

    def fit(self, data, phot, train_idx, val_idx, train_config=None):
        self._load()
        self.sha256 = file_sha256(self.path)
        probe = self.encode({k: np.asarray(v)[train_idx[:4]] for k, v in data.items()},
                            None if phot is None else phot.take(train_idx[:4]))
        self.out_dim = int(probe.shape[1])
        return self

    def encode(self, data, phot, device="cpu", batch_size=65536):
        from .nets.encoders import _FirstOutput
        from .training import concat_outputs, predict_batched, resolve_device
        model = self._load()
        dev = resolve_device(device) if isinstance(device, str) else device
        model.to(dev)
        outs = predict_batched(_FirstOutput(model), self._input_arrays(data, phot), dev, batch_size)
        emb = concat_outputs(outs).numpy()
        n = _n_rows(data)
        if emb.ndim != 2 or emb.shape[0] != n:
            raise EncoderError(
                f"foundation model {self.path!r} returned shape {emb.shape}; expected (N, D) with N={n}"
            )
        if self.out_dim and emb.shape[1] != self.out_dim:
            raise EncoderError(
                f"foundation model {self.path!r} returns dimension {emb.shape[1]}, the model was trained "
                f"on {self.out_dim}"
            )
        if not np.all(np.isfinite(emb)):
            raise EncoderError(f"foundation model {self.path!r} returned NaN/inf embeddings")
        return emb.astype(np.float32)

    def check_weights(self):
        """Refuse weights that differ from those used at inform time."""
        if self.sha256 and file_sha256(self.path) != self.sha256:
            raise EncoderError(
                f"The foundation model at {self.path!r} differs from the one the model was trained "
                "with (SHA-256 mismatch); use the same weights or retrain"
            )

    def to_dict(self):
        return {"kind": self.kind, "path": self.path, "format": self.fmt, "loader": self.loader,
                "inputs": self.inputs, "sha256": self.sha256, "out_dim": self.out_dim}

    @classmethod
    def from_dict(cls, d, path: str | None = None):
        obj = cls(path or d["path"], d["format"], d["loader"], d["inputs"])
        obj.sha256, obj.out_dim = d["sha256"], int(d["out_dim"])
        return obj


# ----------------------------------------------------------------- factory

_CLASSES = {c.kind: c for c in (ColumnsEncoder, AutoencoderEncoder, FoundationModelEncoder)}


def make_encoder(kind: str, options: Mapping) -> Encoder:
    """Build an encoder from the stage options (keys as in ``ENCODER_OPTIONS``, plus the
    photometry option ``missing_policy`` when present)."""
    mask = "missing_policy" in options and options["missing_policy"] == "mask"
    if kind == "columns":
        return ColumnsEncoder(options["embedding_columns"])
    if kind == "autoencoder":
        return AutoencoderEncoder(options["ae_features"], options["ae_hidden"], options["ae_latent_dim"],
                                  options["ae_image_column"], options["ae_image_latent_dim"],
                                  options["ae_epochs"], options["ae_lr"], options["ae_batch_size"], mask)
    if kind == "foundation":
        enc = FoundationModelEncoder(options["foundation_path"], options["foundation_format"],
                                     options["foundation_loader"], options["foundation_inputs"])
        if mask and enc.needs_photometry:
            raise EncoderError(
                "missing_policy='mask' cannot hide a value from a pretrained foundation model fed "
                f"photometric blocks {enc.inputs} (it has no mask input); use missing_policy='limit' "
                "or 'raise', or the autoencoder encoder"
            )
        return enc
    raise EncoderError(f"Option 'encoder'={kind!r} is not one of {ENCODER_KINDS}")


def encoder_from_dict(d: dict, **kwargs) -> Encoder:
    kind = d.get("kind")
    if kind not in _CLASSES:
        raise EncoderError(f"stored encoder kind {kind!r} is not one of {ENCODER_KINDS}")
    return _CLASSES[kind].from_dict(d, **kwargs)
