"""Base RAIL stages shared by every estimator of this package.

:class:`DeepzInformer` reads and validates the training table, cleans the photometry,
splits training/validation, calls the method's ``_fit`` and stores a model dict.
:class:`DeepzEstimator` loads and checks that model, rebuilds the network once, and
for each chunk converts the table, cleans the photometry with the *model's* conventions,
runs the network in batches and writes a qp ensemble aligned with the input rows.

A saved model is a plain dict holding only numpy arrays, CPU tensors and python scalars,
so a model trained on a GPU loads on a CPU. It is written by ``torch.save`` and read with
``torch.load(weights_only=True)`` (:mod:`rail.deepz.modelfile`: loading cannot run code;
a pickle is refused unless ``allow_pickle_model``)::

    {"format": "rail.deepz", "format_version": 2, "package_version": "0.1.0",
     "method": "nnc", "bands": [...], "err_bands": [...], "photometry": {...},
     "arch": {...}, "state_dict": {...}, "scalers": {...}, "train": {...}, ...}
"""

from __future__ import annotations

import difflib
import inspect
import numbers
import os
from typing import Any, Callable, Mapping

import numpy as np
import tables_io
from ceci.config import StageParameter as Param
from rail.core.common_params import SharedParams
from rail.core.data import DataHandle, TableHandle
from rail.estimation.estimator import CatEstimator
from rail.estimation.informer import CatInformer

from ._version import __version__
from .modelfile import DeepzModelHandle, load_model
from .photometry import (
    INPUT_UNITS,
    MISSING_POLICIES,
    VALID_MAG_RANGE,
    Photometry,
    check_model_bands,
    extract_photometry,
    sentinel_values,
    validate_photometry_options,
)
from .trainconfig import DEVICES, TrainConfig


FORMAT = "rail.deepz"
#: 2: the file is a torch zip archive read with ``torch.load(weights_only=True)``; the dict
#: inside is laid out as in version 1 (a pickle), which is still read with ``allow_pickle_model``
FORMAT_VERSION = 2
#: 3: as 2, for an NNC, LSTM or embedding-MDN model holding several ensemble members
#: (``member_state_dicts``, :mod:`rail.deepz.ensemble`), which version-2 readers would not pool
#: (they refuse it by version); single models are still written as version 2
READABLE_FORMAT_VERSIONS = (1, 2, 3)
BAD_PDF_POLICIES = ("raise", "flag")

# keys ceci/RAIL put in a stage's config besides its declared options
# (rail.interactive adds "force_exact" and the entrypoint's own arguments)
_FRAMEWORK_KEYS = {"name", "config", "aliases", "input", "output", "model", "force_exact"}
# ... and the command-line flags of `python -m ceci <Stage>` (how `ceci pipeline.yml` runs a stage)
_FRAMEWORK_KEYS |= {"stage_name", "mpi", "pdb", "cprofile", "memmon", "trace"}


def _entrypoint_args(stage) -> set:
    func = getattr(type(stage), getattr(stage, "entrypoint_function", "") or "", None)
    if func is None:
        return set()
    return {p for p in inspect.signature(func).parameters if p not in ("self", "kwargs")}


class ModelFormatError(ValueError):
    """The model file is not a usable rail.deepz model for this stage."""


class BadPDFError(ValueError):
    """An estimator produced PDFs that are not finite or do not integrate to 1."""


class PathClashError(ValueError):
    """A stage would write an output over one of its own inputs."""


def validate_config_keys(stage) -> None:
    """Fail with a clear message on config keys the stage does not know (typos)."""
    allowed = set(stage.config_options) | _FRAMEWORK_KEYS
    allowed |= set(stage.input_tags()) | set(stage.output_tags()) | _entrypoint_args(stage)
    # ceci pipelines put the aliased tags' paths in the config (aliases: {input: train_dc2})
    allowed |= {str(v) for v in (getattr(stage, "_aliases", None) or {}).values()}
    unknown = [k for k in stage.config.keys() if k not in allowed]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, sorted(stage.config_options), n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(
            f"Unknown config option(s) for stage {stage.name} ({type(stage).__name__}): "
            + ", ".join(hints)
            + f". Valid options: {', '.join(sorted(stage.config_options))}"
        )


# ----------------------------------------------------------------- option validation
#
# ceci casts a configured value with the option's type (bool("no") is True, list("64") is
# ['6', '4']). Every option of a rail.deepz stage is therefore checked on the value as the
# user gave it, before the cast, by type (:func:`check_type`) and, where declared beside the
# option (``Option(..., check=...)``), by range or choice. Stages run :func:`validate_options`
# in ``__init__``, before any data is read.


def _is_int(v) -> bool:
    """An integer, or a float with an integral value (1e5); never a bool or a string."""
    if isinstance(v, (bool, np.bool_)):
        return False
    return isinstance(v, numbers.Integral) or (isinstance(v, numbers.Real) and float(v).is_integer())


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


def check_type(name: str, dtype, value) -> None:
    """Refuse a value that ceci would silently cast into something else (names the option)."""
    if dtype is None or value is None:
        return
    ok = {
        bool: lambda v: isinstance(v, (bool, np.bool_)),
        int: _is_int,
        float: _is_real,
        str: lambda v: isinstance(v, (str, os.PathLike)),
        list: lambda v: isinstance(v, (list, tuple)),
        dict: lambda v: isinstance(v, Mapping),
    }.get(dtype)
    if ok is not None and not ok(value):
        raise ValueError(
            f"Option {name!r}={value!r} ({type(value).__name__}) must be a {dtype.__name__}"
            + (" (True or False; strings such as 'no' or 'false' are refused)" if dtype is bool else "")
            + (" (a list, not a string)" if dtype is list and isinstance(value, str) else "")
        )


def bound(op: str, limit: float) -> Callable:
    tests = {">": lambda v: v > limit, ">=": lambda v: v >= limit, "<": lambda v: v < limit,
             "<=": lambda v: v <= limit}

    def check(name, value):
        if not (np.isfinite(value) and tests[op](value)):
            raise ValueError(f"Option {name!r} must be {op} {limit}, got {value}")
    return check


#: checks to declare beside an option: ``Option(float, 0.1, check=POSITIVE)``
POSITIVE, NON_NEGATIVE = bound(">", 0), bound(">=", 0)


def in_range(lo: float, hi: float, closed: str = "neither") -> Callable:
    """Value in (lo, hi); ``closed`` = 'neither', 'left', 'right' or 'both' includes the ends."""
    def check(name, value):
        left = value >= lo if closed in ("left", "both") else value > lo
        right = value <= hi if closed in ("right", "both") else value < hi
        if not (np.isfinite(value) and left and right):
            brackets = ("[" if closed in ("left", "both") else "(") + f"{lo}, {hi}" + (
                "]" if closed in ("right", "both") else ")")
            raise ValueError(f"Option {name!r} must lie in {brackets}, got {value}")
    return check


def one_of(*choices) -> Callable:
    def check(name, value):
        if value not in choices:
            raise ValueError(f"Option {name!r}={value!r} is not one of {choices}")
    return check


def each(check: Callable, min_len: int = 0) -> Callable:
    """Apply ``check`` to every element of a list option (and require ``min_len`` elements)."""
    def check_list(name, value):
        if len(value) < min_len:
            raise ValueError(f"Option {name!r} needs at least {min_len} value(s), got {list(value)}")
        for i, v in enumerate(value):
            if not _is_real(v):
                raise ValueError(f"Option {name!r}={list(value)}: element {i} ({v!r}) is not a number")
            check(f"{name}[{i}]", v)
    return check_list


def positive_int_list(name, value):
    """A non-empty list of positive integers (layer widths)."""
    if not value or not all(_is_int(v) and v > 0 for v in value):
        raise ValueError(f"Option {name!r}={value!r} must be a non-empty list of positive integers")


def positive_int_list_or_empty(name, value):
    """A list of positive integers, possibly empty (optional layers)."""
    if value:
        positive_int_list(name, value)


class Option(Param):
    """A ceci ``StageParameter`` that also carries its check, declared beside the option.

    ``check(name, value)`` raises ValueError naming the option; it runs (after the type check
    of :func:`check_type`) on the value as given, from :func:`validate_options`.
    """

    def __init__(self, dtype=None, default=None, fmt="%s", required=None, msg="A parameter",
                 check: Callable | None = None):
        self.check = check
        self.raw = default
        super().__init__(dtype=dtype, default=default, fmt=fmt, required=required, msg=msg)

    @classmethod
    def wrap(cls, par: Param, check: Callable | None = None) -> "Option":
        """An Option with the type, default and help of ``par`` (e.g. a RAIL shared parameter)."""
        return cls(par.dtype, par.default, fmt=par._format, required=par.required, msg=par.msg,
                   check=check if check is not None else getattr(par, "check", None))

    def copy(self):
        return Option.wrap(self)

    def set(self, value):
        self.raw = value
        return super().set(value)

    def set_to_default(self):
        self.raw = self._default
        return super().set_to_default()

    def validate(self, name: str) -> None:
        check_type(name, self.dtype, self.raw)
        if self.check is not None and self.raw is not None:
            self.check(name, self.raw)


def checked_config(stage) -> None:
    """Turn every plain parameter of ``stage``'s config into an :class:`Option` (type-checked)."""
    for key, par in dict.items(stage._configs):
        if isinstance(par, Param) and not isinstance(par, Option):
            dict.__setitem__(stage._configs, key, Option.wrap(par))


def validate_options(stage) -> None:
    """Check every option of ``stage`` by type and declared range; raise naming the option."""
    for key, par in dict.items(stage.config):
        if isinstance(par, Option):
            par.validate(key)


def check_training_stage(stage) -> TrainConfig:
    """Validate an informer's options (keys, types, ranges, training settings, z range) before any data is read.

    Returns the :class:`TrainConfig` of the stage; a stage with a method ``automatic_training(train_config,
    n_train)`` (NNC: ``batch_size`` / ``lr`` 0 = automatic) has it applied with ``n_train=None`` first, so the
    values checked are ones the stage can train with (``_fit`` resolves them from the data). Shared by :class:`DeepzInformer` and informers that do not
    read photometry (the scene informer).
    """
    validate_config_keys(stage)
    validate_options(stage)
    train_config = TrainConfig.from_config(stage.config)
    automatic = getattr(stage, "automatic_training", None)
    if automatic is not None:  # options left at 0 = automatic, resolved from the data in _fit
        train_config = automatic(train_config, None)
    train_config.validate()
    if stage.config.zmax <= stage.config.zmin:
        raise ValueError(f"Option 'zmax' ({stage.config.zmax}) must exceed 'zmin' ({stage.config.zmin})")
    return train_config


def with_defaults(options: Mapping[str, Param], **defaults: Any) -> dict:
    """Copy a dict of ``Param`` and change some defaults (a method's paper values)."""
    out = {}
    for key, par in options.items():
        p = par.copy()
        if key in defaults:
            p.set_default(defaults[key])
        out[key] = p
    unknown = set(defaults) - set(options)
    if unknown:
        raise KeyError(f"with_defaults: no such option(s) {sorted(unknown)}")
    return out


def _check_sentinels(name, value):
    sentinel_values(value)


def _check_mag_range(name, value):
    if len(value) != 2 or not all(_is_real(v) and np.isfinite(v) for v in value) or not value[0] < value[1]:
        raise ValueError(f"Option {name!r}={value!r} must be two finite magnitudes [low, high], low < high")


PHOTOMETRY_OPTIONS = dict(
    bands=SharedParams.copy_param("bands"),
    err_bands=SharedParams.copy_param("err_bands"),
    mag_limits=SharedParams.copy_param("mag_limits"),
    nondetect_val=Option(
        None, 99.0, check=_check_sentinels,
        msg="magnitude value(s) marking a non-detection: a number (RAIL's 99) or a list, e.g. "
        "[99, -99, -9999] (matched within 0.01 mag; magnitude inputs only)",
    ),
    valid_mag_range=Option(
        list, list(VALID_MAG_RANGE), check=_check_mag_range,
        msg="open interval of AB magnitudes that can be measurements; values outside it "
        "(-99, 0, -1e30, 1e30...) are bad and follow missing_policy",
    ),
    input_units=Option(
        str, "mag", check=one_of(*INPUT_UNITS),
        msg="units of the 'bands' columns: 'mag' (AB magnitudes, errors in mag), 'nJy' or "
        "'nanomaggies' (fluxes, errors in the same unit; converted to AB magnitudes)",
    ),
    missing_policy=Option(
        str, "limit", check=one_of(*MISSING_POLICIES),
        msg="bad values (nondetect_val sentinels, NaN/inf, outside valid_mag_range, beyond "
        "mag_limits, non-positive errors): 'limit' = replace by the band's mag_limits value with "
        "error nondetect_err; 'mask' = hide from the network (masked step, or zeroed feature "
        "plus a per-band indicator); 'raise' = error",
    ),
    nondetect_err=Option(float, 1.0, check=POSITIVE, msg="magnitude error given to replaced values (mag)"),
    max_mag_err=Option(float, 5.0, check=POSITIVE, msg="detected magnitude errors are clipped to this (mag)"),
)

TRAINING_OPTIONS = dict(
    redshift_col=SharedParams.copy_param("redshift_col"),
    zmin=SharedParams.copy_param("zmin"),
    zmax=SharedParams.copy_param("zmax"),
    z_out_of_range=Option(
        str, "raise",
        check=one_of("raise", "clip", "drop"),
        msg="training redshifts outside [zmin, zmax] or non-finite: 'raise', 'clip' "
        "(to the range; non-finite still raise) or 'drop'",
    ),
    epochs=Option(int, 300, check=bound(">=", 1), msg="maximum number of training epochs"),
    batch_size=Option(int, 4096, check=bound(">=", 2), msg="objects per optimisation step"),
    lr=Option(float, 5e-4, check=POSITIVE, msg="initial learning rate"),
    weight_decay=Option(float, 1e-5, check=NON_NEGATIVE, msg="weight decay"),
    optimizer=Option(str, "adamw", check=one_of("adamw", "adam"), msg="'adamw' or 'adam'"),
    lr_schedule=Option(str, "plateau", check=one_of("plateau", "step", "onecycle", "none"), msg="'plateau', 'step', 'onecycle' (warm-up then cosine decay to ~0 over 'epochs', max lr 'lr', stepped per batch) or 'none'"),
    lr_factor=Option(float, 0.5, check=in_range(0, 1, "right"), msg="learning-rate multiplier of the schedule"),
    lr_patience=Option(int, 5, check=NON_NEGATIVE,
                       msg="plateau schedule: epochs without improvement before lowering lr"),
    lr_step=Option(int, 50, check=bound(">=", 1), msg="step schedule: epochs between lr reductions"),
    clip_norm=Param(float, 1.0, msg="gradient clipping max norm (<= 0: off)"),
    patience=Option(int, 20, check=bound(">=", 1),
                    msg="early stopping patience in epochs (best weights restored)"),
    min_delta=Option(float, 0.0, check=NON_NEGATIVE, msg="minimum validation-loss decrease counted as improvement"),
    val_fraction=Option(float, 0.1, check=in_range(0, 1),
                        msg="fraction of the training set held out for validation"),
    val_column=Param(
        str, "",
        msg="name of a boolean column marking validation rows (overrides val_fraction)",
    ),
    seed=Param(int, 42, msg="random seed: CPU training is deterministic for a given seed and torch thread count"),
    device=Param(str, "auto", msg="'auto' (CUDA if available), 'cpu' or 'cuda'"),
    mixed_precision=Param(bool, False, msg="bfloat16 autocast on CUDA (ignored on CPU)"),
    progress=Param(bool, True, msg="print a line per epoch with train/val loss"),
)

THREAD_OPTIONS = dict(
    num_threads=Option(
        int, 0, check=NON_NEGATIVE,
        msg="torch CPU (intra-op) threads while the stage runs, restored afterwards; 0 = automatic: "
        "the CPUs this process may use (os.sched_getaffinity) minus the busy ones (1-minute load "
        "average), at least 1. Results are reproducible for a fixed thread count only",
    ),
)
TRAINING_OPTIONS.update(THREAD_OPTIONS)

ESTIMATION_OPTIONS = dict(
    zmin=Option(
        float, None, required=False,
        msg="lower end of the output grid; None (default) = the model's. A value that differs "
        "from the model's is an error (the network was trained on the model's grid)",
    ),
    zmax=Option(float, None, required=False,
                msg="upper end of the output grid; None (default) = the model's (see zmin)"),
    nzbins=Option.wrap(SharedParams.copy_param("nzbins"), check=bound(">", 2)),
    bands=Param(
        list, [],
        msg="magnitude columns; empty = the model's bands. If given, must equal the model's",
    ),
    err_bands=Param(list, [], msg="error columns; empty = the model's"),
    device=Param(str, "auto", msg="'auto' (CUDA if available), 'cpu' or 'cuda'"),
    mixed_precision=Param(bool, False, msg="bfloat16 autocast for inference, on CUDA or CPU (fast on CPUs with AMX / AVX512-BF16); "
        "PDFs then differ from float32 by bf16 rounding (see benchmarks/README.md)"),
    inference_batch_size=Option(
        int, 0, check=NON_NEGATIVE,
        msg="objects per forward pass at estimation; 0 = automatic: on CPU 4096 (LSTM 2048; small batches "
        "keep the activations in cache and the temporaries below glibc's 32 MB mmap threshold, "
        "benchmarks/README.md), 65536 on CUDA",
    ),
    bad_pdf_policy=Option(
        str, "raise", check=one_of(*BAD_PDF_POLICIES),
        msg="PDFs that are not finite or whose total mass misses 1 (rail.deepz.pdf.MASS_TOL): 'raise' = "
        "error naming the rows; 'flag' = keep them, with ancil pdf_ok=False and NaN point estimates",
    ),
    allow_pickle_model=Param(
        bool, False,
        msg="accept a model file that is a pickle (older models, RAIL's ModelHandle); loading a pickle "
        "can run arbitrary code: only for files you trust",
    ),
)
ESTIMATION_OPTIONS.update(THREAD_OPTIONS)


#: automatic ``inference_batch_size`` (option 0) on CPU and on CUDA
AUTO_BATCH_CPU, AUTO_BATCH_CUDA = 4096, 65536

MIXTURE_REPRESENTATIONS = ("mixmod", "interp")

#: ``qp_representation`` option of the estimators that emit Gaussian mixtures
MIXTURE_OUTPUT_OPTIONS = dict(
    qp_representation=Option(
        str, "mixmod", check=one_of(*MIXTURE_REPRESENTATIONS),
        msg="'mixmod' (exact mixture; mass outside [zmin, zmax] reported in ancil p_outside) or "
        "'interp' (PDF truncated to [zmin, zmax], renormalised, sampled on nzbins points)",
    ),
)


#: model entries holding network weights and scalers: every float in them must be finite
_WEIGHT_KEYS = ("state_dict", "member_state_dicts", "member_weights", "scalers", "edges")
#: model entries that multiply or divide the network's output: finite and > 0
_POSITIVE_KEYS = (("temperature",), ("sigma_scale",), ("arch", "sigma"))


def _nonfinite(obj, where: str):
    """Key paths of non-finite floats in tensors, arrays and floats nested in ``obj``."""
    import torch
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() and not bool(torch.isfinite(obj).all()):
            yield f"{where} ({int((~torch.isfinite(obj)).sum())} value(s))"
    elif isinstance(obj, np.ndarray):
        if obj.dtype.kind == "f" and not np.isfinite(obj).all():
            yield f"{where} ({int((~np.isfinite(obj)).sum())} value(s))"
    elif isinstance(obj, (float, np.floating)):
        if not np.isfinite(obj):
            yield where
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _nonfinite(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _nonfinite(v, f"{where}[{i}]")


def check_model_values(model: Mapping, who: str = "model") -> None:
    """Refuse a model whose weights or scalers hold NaN/inf, or whose temperature / width
    factor is not a finite positive number (either would give NaN or meaningless PDFs)."""
    bad = [p for key in _WEIGHT_KEYS if key in model for p in _nonfinite(model[key], key)]
    if bad:
        raise ModelFormatError(f"{who}: the model has non-finite values in " + ", ".join(bad[:5])
                               + (f" and {len(bad) - 5} more" if len(bad) > 5 else "") + "; retrain it")
    for path in _POSITIVE_KEYS:
        obj = model
        for k in path:
            obj = obj.get(k) if isinstance(obj, Mapping) else None
        if obj is None:
            continue
        try:
            ok = float(obj) > 0 and np.isfinite(float(obj))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ModelFormatError(f"{who}: model entry {'.'.join(path)!r} = {obj!r} must be a finite number > 0")


def check_option_choice(config, key: str, choices) -> None:
    """Raise a ValueError naming option ``key`` when its value is not one of ``choices``."""
    if config[key] not in choices:
        raise ValueError(f"Option {key!r}={config[key]!r} is not one of {tuple(choices)}")


def table_to_numpy_dict(stage, data, groupname: str | None = None) -> dict:
    """Select ``groupname`` if present, and convert any RAIL table to a numpyDict."""
    if groupname and isinstance(data, Mapping) and groupname in data:
        data = data[groupname]
    if tables_io.types.table_type(data) != tables_io.types.NUMPY_DICT:
        data = stage._convert_table_format(data, "numpyDict")
    return data


def photometry_settings(config) -> dict:
    """The photometry conventions of a stage, as stored in its model (plain types).

    Models written before ``valid_mag_range`` existed lack it and get the default range.
    """
    sentinels = sentinel_values(config["nondetect_val"])
    return {
        "mag_limits": {k: float(v) for k, v in dict(config["mag_limits"]).items()},
        "nondetect_val": sentinels[0] if len(sentinels) == 1 else sentinels,
        "nondetect_err": float(config["nondetect_err"]),
        "missing_policy": config["missing_policy"],
        "input_units": config["input_units"],
        "max_mag_err": float(config["max_mag_err"]),
        "valid_mag_range": [float(v) for v in config["valid_mag_range"]],
    }


def _real(path) -> str | None:
    if path is None or str(path) in ("", "None", "none"):
        return None
    return os.path.realpath(os.path.expandvars(str(path)))


def _same_file(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)  # hard links, bind mounts
    except OSError:
        return False


def stage_input_paths(stage) -> dict:
    """{tag: file path} of the stage's inputs that are files (in-memory inputs have none)."""
    out = {}
    for tag in stage.input_tags():
        handle = stage.data_store.get(stage.get_aliased_tag(tag))
        if handle is not None:
            path = handle.path
        else:
            try:
                path = stage.get_input(tag)
            except KeyError:
                path = None
        if tag == "model" and isinstance(stage.config.get("model"), str):
            path = path if _real(path) else stage.config["model"]
        if _real(path):
            out[tag] = path
    return out


def check_output_paths(stage) -> None:
    """Refuse (:class:`PathClashError`, naming both) to run when an output file of the stage
    (its final name or ceci's ``inprogress_`` name) is one of its input files. Called before
    anything is read or written; no check when outputs are only returned (output_mode='return')."""
    if stage.config.get("output_mode", "default") == "return":
        return
    inputs = {tag: _real(p) for tag, p in stage_input_paths(stage).items()}
    for tag in stage.output_tags():
        try:
            names = {stage.get_output(tag, final_name=True), stage.get_output(tag)}
        except KeyError:
            continue
        for name in names:
            out = _real(name)
            for itag, ipath in inputs.items():
                if out and ipath and _same_file(out, ipath):
                    raise PathClashError(
                        f"{stage.name}: output {tag!r} ({name}) is the same file as input {itag!r} "
                        f"({stage_input_paths(stage)[itag]}); writing it would destroy the input. "
                        "Choose another output path"
                    )


class CheckedOptions:
    """Mixin of the base stages: every config parameter becomes a type-checked :class:`Option`
    before ceci loads (and casts) the configured values."""

    def load_configs(self, args):
        checked_config(self)
        super().load_configs(args)


class DeepzInformer(CheckedOptions, CatInformer):
    """Base informer: table -> cleaned photometry + redshifts -> ``_fit`` -> model dict."""

    name = "DeepzInformer"
    interactive_function = "deepz_informer"
    method = ""  # set by subclasses, stored in the model and checked at load time
    outputs = [("model", DeepzModelHandle)]
    config_options = CatInformer.config_options.copy()
    config_options.update(PHOTOMETRY_OPTIONS)
    config_options.update(TRAINING_OPTIONS)

    def __init__(self, args, **kwargs):
        super().__init__(args, **kwargs)
        self.train_config = check_training_stage(self)
        settings = photometry_settings(self.config)
        if self.config.bands:  # (a stage may not need photometry: embedding columns)
            validate_photometry_options(
                self.config.bands, self.config.err_bands, settings.pop("mag_limits"),
                settings.pop("missing_policy"), settings.pop("input_units"), **settings)

    # -- data preparation -------------------------------------------------
    def _training_table(self) -> dict:
        data = self.get_data("input")
        return table_to_numpy_dict(self, data, self.config.hdf5_groupname)

    def _redshifts(self, data: Mapping) -> tuple[np.ndarray, np.ndarray]:
        """True redshifts and the boolean mask of rows kept for training."""
        col = self.config.redshift_col
        if col not in data:
            raise KeyError(f"Training data has no redshift column {col!r} (option 'redshift_col')")
        z = np.asarray(data[col], dtype=np.float64)
        bad = ~np.isfinite(z)
        if bad.any():
            raise ValueError(f"Redshift column {col!r} has {int(bad.sum())} NaN/inf value(s)")
        lo, hi = self.config.zmin, self.config.zmax
        out = (z < lo) | (z > hi)
        keep = np.ones(z.shape, dtype=bool)
        if out.any():
            policy = self.config.z_out_of_range
            msg = (
                f"{int(out.sum())} training redshift(s) in {col!r} lie outside "
                f"[zmin, zmax] = [{lo}, {hi}] (range {z.min():.4g}..{z.max():.4g})"
            )
            if policy == "raise":
                raise ValueError(msg + "; widen zmin/zmax or set z_out_of_range='clip' or 'drop'")
            self.log.warning(msg + f"; z_out_of_range={policy!r}")
            if policy == "clip":
                z = np.clip(z, lo, hi)
            else:
                keep = ~out
        return z, keep

    def _photometry(self, data: Mapping) -> Photometry:
        return extract_photometry(
            data, self.config.bands, self.config.err_bands, **photometry_settings(self.config)
        )

    def _val_mask(self, data: Mapping) -> np.ndarray | None:
        col = self.config.val_column
        if not col:
            return None
        if col not in data:
            raise KeyError(f"Training data has no validation column {col!r} (option 'val_column')")
        return np.asarray(data[col]).astype(bool)

    # -- model packaging --------------------------------------------------
    def _model_dict(self, **payload) -> dict:
        model = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "package_version": __version__,
            "method": self.method,
            "bands": list(self.config.bands),
            "err_bands": list(self.config.err_bands),
            "photometry": photometry_settings(self.config),
            "zmin": float(self.config.zmin),
            "zmax": float(self.config.zmax),
        }
        model.update(payload)
        return model

    def run(self):
        from .training import thread_policy
        check_output_paths(self)
        with thread_policy(self.config.num_threads, self.name):
            self._run()

    def _run(self):
        data = self._training_table()
        z, keep = self._redshifts(data)
        if not keep.all():
            data = {k: np.asarray(v)[keep] for k, v in data.items()}
            z = z[keep]
        if len(z) == 0:
            raise ValueError(
                f"{self.name}: the training table has 0 usable rows"
                + ("" if keep.size == 0 else f" ({keep.size} before z_out_of_range='drop')")
                + "; nothing to train on"
            )
        model = self._fit(data, z, self._val_mask(data))
        self.model = model
        self.add_data("model", self.model)

    def _fit(self, data: Mapping, z: np.ndarray, val_mask: np.ndarray | None) -> dict:
        raise NotImplementedError  # pragma: no cover


class DeepzEstimator(CheckedOptions, CatEstimator):
    """Base estimator: checks the model, rebuilds the network once, streams chunks."""

    name = "DeepzEstimator"
    interactive_function = "deepz_estimator"
    method = ""
    #: objects per forward pass on CPU when ``inference_batch_size`` is 0
    auto_batch_cpu = AUTO_BATCH_CPU
    inputs = [("model", DeepzModelHandle), ("input", TableHandle)]
    config_options = CatEstimator.config_options.copy()
    config_options.update(ESTIMATION_OPTIONS)

    def __init__(self, args, **kwargs):
        super().__init__(args, **kwargs)
        validate_config_keys(self)
        validate_options(self)
        if self.config.device not in DEVICES and not str(self.config.device).startswith("cuda:"):
            raise ValueError(f"Option 'device'={self.config.device!r} is not one of {DEVICES}")
        # the grid the user asked for (None = the model's), checked against the model's at load
        self._asked_grid = (self.config.zmin, self.config.zmax)
        lo, hi = self._asked_grid
        if lo is not None and hi is not None and not hi > lo:
            raise ValueError(f"Option 'zmax' ({hi}) must exceed 'zmin' ({lo})")
        self._loaded_model_id = None
        self.net = None
        self.torch_device = None

    def run(self):
        from .training import thread_policy
        check_output_paths(self)
        with thread_policy(self.config.num_threads, self.name):
            super().run()

    def _read_model_file(self, path: str) -> dict:
        """Read a model file without pickle (:func:`rail.deepz.modelfile.load_model`; a pickle
        only with ``allow_pickle_model``) into the stage's model handle, once per path."""
        handle = self.get_handle("model", allow_missing=True)
        if handle.data is None or handle.path != path:
            handle.data = load_model(path, allow_pickle=self.config.allow_pickle_model)
            handle.path = path
        self.config["model"] = path
        return handle.data

    def _check_grid(self, model) -> None:
        """An asked zmin/zmax must be the model's; unset ones become the model's."""
        if "zmin" not in model:
            return
        for key, asked in zip(("zmin", "zmax"), self._asked_grid):
            if asked is not None and not np.isclose(asked, model[key], rtol=0, atol=1e-9):
                raise ValueError(
                    f"{self.name}: option {key!r}={asked} differs from the model's {key}={model[key]} "
                    f"(the model was trained on [{model['zmin']}, {model['zmax']}]); leave {key!r} "
                    "unset to use the model's grid, or retrain"
                )
            self.config[key] = float(model[key])

    def open_model(self, **kwargs):
        from .training import resolve_device, warn_if_joblib_pool_alive
        given = kwargs.get("model")
        if isinstance(given, str) and given not in ("", "None", "none"):
            kwargs["model"] = self._read_model_file(given)
        elif isinstance(given, DataHandle) and given.data is None and given.has_path:
            kwargs["model"] = self._read_model_file(given.path)
        model = super().open_model(**kwargs)
        if model is None:
            raise ModelFormatError(f"{self.name}: no model given (option/input 'model')")
        if id(model) != self._loaded_model_id:
            self._check_model(model)
            self._check_grid(model)
            self.torch_device = resolve_device(self.config.device)
            warn_if_joblib_pool_alive(self.torch_device)
            self.net = self._build_network(model)
            if self.net is not None:
                self.net.to(self.torch_device).eval()
            self._loaded_model_id = id(model)
        return model

    @property
    def inference_batch_size(self) -> int:
        """Objects per forward pass: the option, or with 0 the automatic choice for the device."""
        if self.config.inference_batch_size > 0:
            return int(self.config.inference_batch_size)
        on_cuda = self.torch_device is not None and self.torch_device.type == "cuda"
        return AUTO_BATCH_CUDA if on_cuda else self.auto_batch_cpu

    def _check_model(self, model) -> None:
        if not isinstance(model, dict) or model.get("format") != FORMAT:
            raise ModelFormatError(
                f"{self.name}: the model is not a rail.deepz model (got {type(model).__name__})"
            )
        if model.get("format_version") not in READABLE_FORMAT_VERSIONS:
            raise ModelFormatError(
                f"{self.name}: model format version {model.get('format_version')} (written by "
                f"pz-rail-deepz {model.get('package_version')}) cannot be read by this version "
                f"({__version__}, format {FORMAT_VERSION}); retrain the model"
            )
        if model.get("method") != self.method:
            raise ModelFormatError(
                f"{self.name}: this is a {model.get('method')!r} model, expected {self.method!r}"
            )
        if self.config.bands:
            check_model_bands(model["bands"], self.config.bands, self.name)
        if self.config.err_bands and list(self.config.err_bands) != list(model["err_bands"]):
            check_model_bands(model["err_bands"], self.config.err_bands, self.name + " (err_bands)")
        check_model_values(model, self.name)

    def _photometry(self, data: Mapping) -> Photometry:
        return extract_photometry(data, self.model["bands"], self.model["err_bands"], **self.model["photometry"])

    def input_iterator(self, tag: str, **kwargs):
        """RAIL's iterator, except that an input file with 0 rows gives one empty chunk (RAIL's
        raises a TypeError from a log call), so that an empty, valid ensemble is written."""
        handle = self.get_handle(tag, allow_missing=True)
        if tag == "input" and handle is not None and handle.path not in (None, "None", "none"):
            groupname = kwargs.get("groupname", self.config.hdf5_groupname)
            if handle.size(groupname=groupname) == 0:
                self._input_length = 0
                data = handle.read()
                if groupname and isinstance(data, Mapping) and groupname in data:
                    data = data[groupname]
                return [(0, 0, data)]
        return super().input_iterator(tag, **kwargs)

    def _process_chunk(self, start, end, data, first):
        data = table_to_numpy_dict(self, data)
        ens = self._estimate_chunk(data)
        if ens.npdf != end - start:
            raise RuntimeError(f"{self.name}: produced {ens.npdf} PDFs for {end - start} rows")
        self._check_pdfs(ens, start)
        self._do_chunk_output(ens, start, end, first, data=data)

    def _check_pdfs(self, ens, start: int) -> None:
        """Every PDF finite with total mass 1 (:func:`rail.deepz.pdf.pdf_ok`), else an error
        naming the input rows, or with ``bad_pdf_policy='flag'`` the ancil ``pdf_ok`` and NaN
        point estimates for those rows."""
        from .pdf import MASS_TOL, MASS_TOL_BF16, flag_bad_pdfs, pdf_ok
        zrange = (self.model["zmin"], self.model["zmax"]) if "zmin" in self.model else None
        ok = pdf_ok(ens, MASS_TOL_BF16 if self.config.mixed_precision else MASS_TOL, zrange)
        if self.config.bad_pdf_policy == "flag":
            flag_bad_pdfs(ens, ok)
            if not ok.all():
                self.log.warning(f"{self.name}: {int((~ok).sum())} PDF(s) flagged (pdf_ok=False) in rows "
                                 f"{start}-{start + len(ok) - 1}")
            return
        if not ok.all():
            bad = np.flatnonzero(~ok) + start
            first = ", ".join(str(i) for i in bad[:5]) + (", ..." if len(bad) > 5 else "")
            raise BadPDFError(
                f"{self.name}: {len(bad)} PDF(s) are not finite or do not integrate to 1 (tolerance "
                f"{MASS_TOL_BF16 if self.config.mixed_precision else MASS_TOL}), input rows {first}. "
                "Check the photometry of those rows and the model; bad_pdf_policy='flag' keeps them "
                "with ancil pdf_ok=False and NaN point estimates"
            )

    def _build_network(self, model: dict):
        raise NotImplementedError  # pragma: no cover

    def _estimate_chunk(self, data: Mapping):
        raise NotImplementedError  # pragma: no cover
