"""Model files that cannot run code when loaded.

RAIL's ``ModelHandle`` reads and writes models with ``pickle``, and unpickling a file can
execute arbitrary code (a crafted ``__reduce__``). This package's models are plain dicts of
numpy arrays, CPU tensors and python scalars, so they are stored instead with
``torch.save`` and read with ``torch.load(weights_only=True)``, whose restricted unpickler
only rebuilds tensors, containers and primitive types and refuses any other class or
callable. numpy arrays are not among those types: :func:`encode` turns each into
``{"__ndarray__": tensor}`` (or, for string arrays, ``{"__ndarray_str__": list, "dtype":
str}``) and :func:`decode` turns them back, so a loaded model equals the saved one.

The file is a zip archive (torch's format, magic ``PK\\x03\\x04``), whatever its suffix;
``.pkl`` paths (RAIL's default model suffix) keep working. A file that is a pickle (a model
written by an earlier version of this package, or by RAIL's ``ModelHandle``) is refused
unless ``allow_pickle=True`` (the estimators' option ``allow_pickle_model``), which warns.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np
from rail.core.data import ModelHandle, default_model_read

ZIP_MAGIC = b"PK\x03\x04"
#: first bytes of a pickle: protocol 2+ starts with the PROTO opcode 0x80; protocols 0/1
#: start with an opcode such as "(" (MARK), "}" (EMPTY_DICT) or "]" (EMPTY_LIST)
PICKLE_STARTS = (b"\x80", b"(", b"}", b"]", b"c")

_ND, _ND_STR = "__ndarray__", "__ndarray_str__"


class UnsafeModelFileError(ValueError):
    """The model file is a pickle, which can run code when loaded; refused by default."""


def encode(obj: Any, where: str = "model") -> Any:
    """Model dict -> the same structure with numpy arrays wrapped as tensors and numpy
    scalars as python scalars; a type that ``torch.load(weights_only=True)`` could not read
    back is a TypeError naming its key path (so nothing is ever written that needs pickle)."""
    import torch
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind in "US":
            return {_ND_STR: obj.tolist(), "dtype": obj.dtype.str}
        if obj.dtype.kind not in "biuf":
            raise TypeError(f"{where}: numpy array of dtype {obj.dtype} cannot be saved in a rail.deepz model file")
        return {_ND: torch.from_numpy(np.ascontiguousarray(obj).copy())}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: key {k!r} of type {type(k).__name__} cannot be saved")
            out[k] = encode(v, f"{where}[{k!r}]")
        return out
    if isinstance(obj, (list, tuple)):
        items = [encode(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    raise TypeError(f"{where}: object of type {type(obj).__name__} cannot be saved in a rail.deepz model file")


def decode(obj: Any) -> Any:
    """Inverse of :func:`encode`."""
    import torch
    if isinstance(obj, dict):
        if set(obj) == {_ND} and isinstance(obj[_ND], torch.Tensor):
            return obj[_ND].numpy()
        if set(obj) == {_ND_STR, "dtype"}:
            return np.asarray(obj[_ND_STR], dtype=np.dtype(obj["dtype"]))
        return {k: decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(decode(v) for v in obj)
    return obj


def save_model(model: dict, path: str) -> None:
    """Write ``model`` to ``path`` with ``torch.save`` (readable with ``weights_only=True``)."""
    import torch
    torch.save(encode(model), os.path.expandvars(str(path)))


def file_kind(path: str) -> str:
    """``'zip'`` (torch.save), ``'pickle'`` or ``'unknown'``, from the file's first bytes."""
    with open(os.path.expandvars(str(path)), "rb") as f:
        head = f.read(4)
    if head == ZIP_MAGIC:
        return "zip"
    if head[:1] in PICKLE_STARTS:
        return "pickle"
    return "unknown"


def load_model(path: str, allow_pickle: bool = False) -> Any:
    """Read a model file without running code from it.

    A torch zip archive is read with ``torch.load(weights_only=True)`` on the CPU. A pickle
    is refused with :class:`UnsafeModelFileError` unless ``allow_pickle`` (then it is read
    by RAIL's ``pickle.load``, with a warning). Anything else is a ValueError.
    """
    import torch
    path = os.path.expandvars(str(path))
    kind = file_kind(path)
    if kind == "zip":
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch's restricted unpickler refused something
            raise UnsafeModelFileError(
                f"Model file {path!r} holds objects other than tensors, containers and plain types, "
                f"so it was not loaded (torch.load(weights_only=True): {type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''})"
            ) from err
        return decode(obj)
    if kind == "pickle":
        if not allow_pickle:
            raise UnsafeModelFileError(
                f"Model file {path!r} is a pickle: loading it could run arbitrary code, so it is refused. "
                "If (and only if) you trust its source, set the option allow_pickle_model=True to load it "
                "(e.g. a model written by an earlier pz-rail-deepz, format version 1; re-save it safely with "
                "rail.deepz.modelfile.save_model)"
            )
        warnings.warn(
            f"Loading the pickle model file {path!r} (allow_pickle_model=True): a pickle can run "
            "arbitrary code; load only files you trust", RuntimeWarning, stacklevel=2,
        )
        return default_model_read(path)
    raise ValueError(f"Model file {path!r} is neither a rail.deepz model (torch zip archive) nor a pickle")


class DeepzModelHandle(ModelHandle):
    """``ModelHandle`` whose files are written by :func:`save_model` and read by
    :func:`load_model` (no pickle; a pickle file is refused). The estimators read their
    model through :meth:`rail.deepz.stages.DeepzEstimator.open_model`, which passes their
    ``allow_pickle_model`` option; this handle's own reads never allow pickle."""

    suffix = "pkl"  # RAIL's model suffix, so pipelines' default file names do not change

    @classmethod
    def _open(cls, path: str, **kwargs: Any):
        if kwargs.get("mode", "r") == "w":
            return open(path, mode="wb")
        return load_model(path)

    @classmethod
    def _read(cls, path: str, **kwargs: Any):
        return load_model(path)

    @classmethod
    def _write(cls, data: Any, path: str, **kwargs: Any) -> None:
        save_model(data, path)
