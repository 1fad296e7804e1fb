"""Training options without torch: :class:`TrainConfig`, the ``device`` names and their check.

A stage checks its options when it is built (``make_stage``, a pipeline file, a notebook); these
live here, apart from :mod:`rail.deepz.training`, so that building a stage does not import torch
(its import time: CHANGELOG.md). torch is imported only to check a ``cuda`` device, or when the
stage trains or estimates.
"""

from __future__ import annotations

from dataclasses import dataclass

DEVICES = ("auto", "cpu", "cuda")
LR_SCHEDULES = ("plateau", "step", "onecycle", "none")


def check_device(name: str) -> None:
    """Refuse a ``device`` option that is not ``auto``, ``cpu``, ``cuda`` or ``cuda:N``, or a CUDA
    device when torch sees none (the only case that imports torch here)."""
    if name not in DEVICES and not str(name).startswith("cuda:"):
        raise ValueError(f"Option 'device'={name!r} is not one of {DEVICES} (or 'cuda:N')")
    if str(name).startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError(f"Option 'device'={name!r} but torch sees no CUDA device; use 'auto' or 'cpu'")


@dataclass
class TrainConfig:
    """Hyper-parameters of :func:`train_model` (each is a stage config option of the same name).

    Attributes
    ----------
    epochs : int
        Maximum number of passes over the training set.
    batch_size : int
        Objects per optimisation step.
    lr : float
        Initial learning rate.
    weight_decay : float
        Decoupled weight decay (AdamW) or L2 penalty (Adam).
    optimizer : str
        ``adamw`` or ``adam``.
    lr_schedule : str
        ``plateau`` (multiply by ``lr_factor`` after ``lr_patience`` epochs without
        validation improvement), ``step`` (multiply by ``lr_factor`` every ``lr_step``
        epochs), ``onecycle`` (``torch.optim.lr_scheduler.OneCycleLR``: warm-up from
        ``lr``/25 to ``lr`` over the first 30 % of ``epochs``, then cosine decay to ~0,
        stepped per batch; the run is planned for ``epochs``, so set ``patience`` >=
        ``epochs`` to run the whole cycle) or ``none``.
    lr_factor, lr_patience, lr_step : float, int, int
        Schedule parameters.
    clip_norm : float
        Maximum gradient L2 norm (<= 0 disables clipping).
    patience : int
        Early stopping: stop after this many epochs without validation improvement and
        restore the best weights.
    min_delta : float
        Minimum decrease of the validation loss that counts as an improvement.
    seed : int
        Seeds weight initialisation and batch order; CPU training is bit-for-bit repeatable
        for a given number of torch threads (another thread count changes float rounding).
    device : str
        ``auto``, ``cpu`` or ``cuda``.
    mixed_precision : bool
        Use bfloat16 autocast on CUDA (ignored on CPU).
    progress : bool
        Print one line per epoch (epoch, train/val loss, learning rate) to stderr.
    """

    epochs: int = 300
    batch_size: int = 4096
    lr: float = 5e-4
    weight_decay: float = 1e-5
    optimizer: str = "adamw"
    lr_schedule: str = "plateau"
    lr_factor: float = 0.5
    lr_patience: int = 5
    lr_step: int = 50
    clip_norm: float = 1.0
    patience: int = 20
    min_delta: float = 0.0
    seed: int = 42
    device: str = "auto"
    mixed_precision: bool = False
    progress: bool = True

    def validate(self) -> None:
        if self.optimizer not in ("adamw", "adam"):
            raise ValueError(f"Option 'optimizer'={self.optimizer!r} is not 'adamw' or 'adam'")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"Option 'lr_schedule'={self.lr_schedule!r} is not one of {LR_SCHEDULES}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"Option {name!r} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"Option 'lr' must be > 0, got {self.lr}")
        check_device(self.device)

    @classmethod
    def from_config(cls, config) -> "TrainConfig":
        """Build from a stage config (any mapping with the attribute names as keys)."""
        kwargs = {k: config[k] for k in cls.__dataclass_fields__ if k in config}
        return cls(**kwargs)
