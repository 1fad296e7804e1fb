"""The one training loop used by every method in this package.

:func:`train_model` fits any ``nn.Module`` whose ``forward`` takes the input tensors of a
batch and whose output, passed with the true redshifts to ``loss_fn``, gives one loss per
object. It provides: AdamW/Adam, a plateau, step or one-cycle learning-rate schedule, gradient
clipping, early stopping that restores the best weights, deterministic CPU training
from ``seed``, device selection (``auto``/``cpu``/``cuda``), optional mixed precision on
CUDA, a one-line-per-epoch progress display that can be turned off, and a history list
stored with the model. :func:`thread_policy` sets torch's CPU thread count for a stage's run
(option ``num_threads``; 0 = fewer threads when other processes keep the CPUs busy).
"""

from __future__ import annotations

import copy
import logging
import os
import random
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from .trainconfig import DEVICES, LR_SCHEDULES, TrainConfig, check_device  # noqa: F401 - their torch-free home

log = logging.getLogger("rail.deepz")


def resolve_device(name: str) -> torch.device:
    """Map the ``device`` option to a torch device; ``auto`` picks CUDA when available."""
    check_device(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _joblib_executor():
    """joblib's reusable loky process pool if one is alive in this process, else None."""
    rex = sys.modules.get("joblib.externals.loky.reusable_executor")
    ex = getattr(rex, "_executor", None) if rex is not None else None
    flags = getattr(ex, "_flags", None)
    if ex is None or flags is None or getattr(flags, "shutdown", False) or getattr(flags, "broken", False):
        return None
    return ex


def release_joblib_workers() -> bool:
    """Shut down joblib's reusable process pool (loky) if one is alive; True if one was.

    FlexZBoost (FlexCode: scikit-learn's ``MultiOutputRegressor(n_jobs=-1)`` over xgboost)
    leaves such a pool behind. While it lives, torch's multi-threaded CPU work in the same
    process is slower: its OpenMP threads sleep and wake at every parallel region instead
    of spinning (measured: benchmarks/results/implementation_notes.md). Most likely the
    pool's manager thread holds an OpenMP team of its own (xgboost shares torch's libgomp),
    so libgomp counts more threads than CPUs and stops spinning. joblib starts a new pool the
    next time it needs one.
    """
    ex = _joblib_executor()
    if ex is None:
        return False
    ex.shutdown(wait=True)
    return True


def warn_if_joblib_pool_alive(device: torch.device) -> None:
    """Warn (and say what to do) when torch will run multi-threaded on the CPU next to a live
    joblib process pool (see :func:`release_joblib_workers`)."""
    if device.type == "cpu" and torch.get_num_threads() > 1 and _joblib_executor() is not None:
        warnings.warn(
            "A joblib process pool (e.g. left by FlexZBoost) is alive in this process: torch's "
            "multi-threaded CPU work is slower next to it (LSTM training 2-3x, inference ~1.5x). "
            "Call rail.deepz.training.release_joblib_workers() first (or run the torch estimators "
            "before FlexZBoost).",
            RuntimeWarning, stacklevel=3,
        )


def allowed_cpus() -> list[int]:
    """The CPUs this process may run on (``os.sched_getaffinity``; all CPUs where unsupported)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return list(range(os.cpu_count() or 1))


def _cpu_jiffies(cpus) -> tuple[float, float] | None:
    """(busy, total) jiffies summed over ``cpus`` from /proc/stat, or None where unreadable."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
    except OSError:  # pragma: no cover - not Linux
        return None
    want = {f"cpu{c}" for c in cpus}
    busy = total = 0.0
    for line in lines:
        parts = line.split()
        if parts and parts[0] in want:
            v = [float(x) for x in parts[1:]]
            idle = v[3] + (v[4] if len(v) > 4 else 0.0)  # idle + iowait
            tot = sum(v[:8])  # guest time is already counted in user
            busy += tot - idle
            total += tot
    return (busy, total) if total > 0 else None


def busy_cpus_elsewhere(cpus=None, probe_s: float = 0.1) -> float | None:
    """CPUs (among ``cpus``, default :func:`allowed_cpus`) kept busy by *other* processes,
    measured over ``probe_s`` seconds: busy time in /proc/stat minus this process's own
    CPU time (its idle OpenMP threads may still be spinning). Falls back to the 1-minute
    load average (which counts this process too) where /proc/stat is unreadable; None if
    neither is available."""
    cpus = allowed_cpus() if cpus is None else list(cpus)
    a, own_a = _cpu_jiffies(cpus), os.times()
    if a is None:
        try:
            return max(0.0, os.getloadavg()[0] - 1.0)
        except (AttributeError, OSError):  # pragma: no cover
            return None
    time.sleep(probe_s)
    b, own_b = _cpu_jiffies(cpus), os.times()
    if b is None or b[1] <= a[1]:
        return None
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    own = ((own_b.user - own_a.user) + (own_b.system - own_a.system)) * hz
    per_cpu = (b[1] - a[1]) / len(cpus)  # elapsed jiffies per CPU
    return max(0.0, (b[0] - a[0] - own) / per_cpu)


def choose_num_threads(num_threads: int = 0) -> tuple[int, str]:
    """torch intra-op threads for a stage: ``num_threads`` if > 0, else the environment
    variable ``DEEPZ_NUM_THREADS`` if set (a fixed count for a whole session, e.g. the tests),
    else automatic.

    Automatic: the current ``torch.get_num_threads()`` (what ``OMP_NUM_THREADS`` or the user
    set) capped by the CPUs this process may use, minus the CPUs other processes keep busy
    (:func:`busy_cpus_elsewhere`), rounded, at least 1. It only ever lowers the count: on an
    oversubscribed machine OpenMP threads that wait on each other slow torch down far more
    than one thread fewer does (issue 15: NNC beside three busy processes on 2 cores, 47.6 s
    with 2 threads, 17.7 s with 1). Returns the count and a sentence saying why.
    """
    if num_threads < 0:
        raise ValueError(f"Option 'num_threads' must be >= 0 (0 = automatic), got {num_threads}")
    if num_threads > 0:
        return int(num_threads), "set by option num_threads"
    env = os.environ.get("DEEPZ_NUM_THREADS", "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise ValueError(f"Environment variable DEEPZ_NUM_THREADS={env!r} must be a positive integer")
        return int(env), "set by the environment variable DEEPZ_NUM_THREADS"
    cpus = allowed_cpus()
    cap = max(1, min(torch.get_num_threads(), len(cpus)))
    busy = busy_cpus_elsewhere(cpus)
    if busy is None:
        return cap, f"automatic: {cap} (torch's count, capped by {len(cpus)} usable CPUs; load unknown)"
    n = int(max(1, min(cap, round(len(cpus) - busy))))
    return n, (f"automatic: {len(cpus)} usable CPUs, {busy:.1f} busy with other processes, "
               f"torch's count {torch.get_num_threads()}")


@contextmanager
def thread_policy(num_threads: int = 0, who: str = "rail.deepz"):
    """Set torch's intra-op threads (:func:`choose_num_threads`) for the ``with`` block,
    log the choice, and restore the previous count afterwards."""
    before = torch.get_num_threads()
    n, why = choose_num_threads(num_threads)
    log.info(f"{who}: {n} torch thread(s) ({why})")
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; make CPU kernels deterministic. Returns a generator."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen


@dataclass
class TrainResult:
    history: list = field(default_factory=list)
    best_epoch: int = -1
    best_val_loss: float = float("inf")
    seconds: float = 0.0
    device: str = "cpu"

    def to_dict(self) -> dict:
        return asdict(self)


def split_indices(n: int, val_fraction: float, seed: int, val_mask: np.ndarray | None = None):
    """Training/validation indices: from a boolean ``val_mask`` or a seeded random fraction."""
    if val_mask is not None:
        val_mask = np.asarray(val_mask, dtype=bool)
        train_idx, val_idx = np.flatnonzero(~val_mask), np.flatnonzero(val_mask)
    else:
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"Option 'val_fraction' must be in (0, 1), got {val_fraction}")
        perm = np.random.default_rng(seed).permutation(n)
        n_val = max(1, int(round(n * val_fraction)))
        val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    if len(train_idx) == 0 or len(val_idx) == 0:
        raise ValueError(
            f"Training/validation split left {len(train_idx)} training and {len(val_idx)} "
            "validation objects; both must be non-empty"
        )
    return train_idx, val_idx


def _to_tensors(arrays: Sequence[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    return [torch.as_tensor(np.ascontiguousarray(a)).to(device) for a in arrays]


#: smallest training batch: batch norm cannot train on a batch of one object, so a last
#: batch smaller than this is dropped (the one-cycle schedule counts the same batches)
MIN_TRAIN_BATCH = 2


def _batch_starts(n: int, batch_size: int, min_size: int = 1) -> range | list[int]:
    """Start indices of the batches of ``n`` objects, without a last batch below ``min_size``."""
    starts = range(0, n, batch_size)
    return [i for i in starts if n - i >= min_size] if min_size > 1 else starts


def _batches(n: int, batch_size: int, gen: torch.Generator | None, min_size: int = 1):
    order = torch.randperm(n, generator=gen) if gen is not None else torch.arange(n)
    for i in _batch_starts(n, batch_size, min_size):
        yield order[i : i + batch_size]


def evaluate_loss(model, loss_fn, inputs, z, batch_size, device, autocast_ctx) -> float:
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for idx in _batches(len(z), batch_size, None):
            idx_d = idx.to(device) if inputs[0].device != torch.device("cpu") else idx
            batch = [t[idx_d].to(device, non_blocking=True) for t in inputs]
            zb = z[idx_d].to(device, non_blocking=True)
            with autocast_ctx():
                out = model(*batch)
            loss = loss_fn(out, zb)
            total += float(loss.float().sum())
            count += len(zb)
    return total / max(count, 1)


def train_model(
    model: nn.Module,
    loss_fn: Callable[[object, torch.Tensor], torch.Tensor],
    train_inputs: Sequence[np.ndarray],
    train_z: np.ndarray,
    val_inputs: Sequence[np.ndarray],
    val_z: np.ndarray,
    cfg: TrainConfig,
    augment: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None,
    keep_on_cpu: bool = False,
    resample: Callable[[int], Sequence[np.ndarray]] | None = None,
) -> TrainResult:
    """Fit ``model`` in place and restore its best (lowest validation loss) weights.

    Parameters
    ----------
    model : nn.Module
        ``model(*batch_inputs)`` returns whatever ``loss_fn`` expects.
    loss_fn : callable
        ``loss_fn(output, z) -> (N,) tensor`` of per-object losses.
    train_inputs, val_inputs : list of ndarray
        Input arrays, first axis = objects.
    train_z, val_z : ndarray
        True redshifts.
    cfg : TrainConfig
    augment : callable, optional
        Applied to each training batch's input tensors (e.g. image flips).
    keep_on_cpu : bool
        Keep the data set in host memory and move batches to the device (for images);
        otherwise the whole set is copied to the device once (fast for catalogues).
    resample : callable, optional
        ``resample(epoch)`` returns new training input arrays (same rows as ``train_z``) at
        the start of each epoch, e.g. photometry redrawn within its errors
        (:class:`rail.deepz.augment.EpochResampler`); None = ``train_inputs`` every epoch.
    """
    cfg.validate()
    if len(train_z) < MIN_TRAIN_BATCH:  # no batch, no optimiser step: refuse to save the init
        raise ValueError(
            f"The training split holds {len(train_z)} row(s): no optimiser step is possible "
            f"(a batch needs at least {MIN_TRAIN_BATCH}); give more training rows or a smaller "
            "'val_fraction'"
        )
    device = resolve_device(cfg.device)
    gen = seed_everything(cfg.seed)
    if device.type == "cpu" and os.environ.get("DEEPZ_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["DEEPZ_NUM_THREADS"]))
    warn_if_joblib_pool_alive(device)
    model.to(device)
    data_device = torch.device("cpu") if keep_on_cpu else device
    tr = _to_tensors(train_inputs, data_device)
    va = _to_tensors(val_inputs, data_device)
    tz = torch.as_tensor(np.asarray(train_z, dtype=np.float32)).to(data_device)
    vz = torch.as_tensor(np.asarray(val_z, dtype=np.float32)).to(data_device)

    use_amp = cfg.mixed_precision and device.type == "cuda"

    def autocast_ctx():
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp)

    opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    opt = opt_cls(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.lr_schedule == "plateau":
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode="min", factor=cfg.lr_factor, patience=cfg.lr_patience
        )
    elif cfg.lr_schedule == "step":
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.lr_step, gamma=cfg.lr_factor)
    elif cfg.lr_schedule == "onecycle":
        steps_per_epoch = len(_batch_starts(len(tz), cfg.batch_size, MIN_TRAIN_BATCH))
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=cfg.lr, epochs=cfg.epochs, steps_per_epoch=max(steps_per_epoch, 1)
        )
    else:
        sched = None

    result = TrainResult(device=str(device))
    best_state = copy.deepcopy(model.state_dict())
    since_best = 0
    t0 = time.perf_counter()
    n = len(tz)
    for epoch in range(cfg.epochs):
        if resample is not None:
            tr = _to_tensors(resample(epoch), data_device)
        model.train()
        tot, cnt = 0.0, 0
        for idx in _batches(n, cfg.batch_size, gen, MIN_TRAIN_BATCH):
            idx_d = idx.to(data_device)
            batch = [t[idx_d].to(device, non_blocking=True) for t in tr]
            zb = tz[idx_d].to(device, non_blocking=True)
            if augment is not None:
                batch = augment(batch)
            with autocast_ctx():
                out = model(*batch)
            loss = loss_fn(out, zb).mean()
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"Training loss became {float(loss)} at epoch {epoch}; lower 'lr' or "
                    "check the inputs for extreme values"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_norm and cfg.clip_norm > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
            opt.step()
            if cfg.lr_schedule == "onecycle":
                sched.step()
            tot += float(loss.detach()) * len(zb)
            cnt += len(zb)
        train_loss = tot / max(cnt, 1)
        val_loss = evaluate_loss(model, loss_fn, va, vz, max(cfg.batch_size, 1024), device, autocast_ctx)
        lr_now = opt.param_groups[0]["lr"]
        result.history.append(
            {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "lr": lr_now}
        )
        if cfg.progress:
            elapsed = time.perf_counter() - t0
            eta = elapsed / (epoch + 1) * (cfg.epochs - epoch - 1)
            print(
                f"[deepz] epoch {epoch + 1:4d}/{cfg.epochs}  train {train_loss:.5f}  "
                f"val {val_loss:.5f}  lr {lr_now:.2e}  {_hms(elapsed)} elapsed, "
                f"<= {_hms(eta)} left",
                file=sys.stderr,
                flush=True,
            )
        if cfg.lr_schedule == "plateau":
            sched.step(val_loss)
        elif cfg.lr_schedule == "step":
            sched.step()
        if val_loss < result.best_val_loss - cfg.min_delta:
            result.best_val_loss = val_loss
            result.best_epoch = epoch
            best_state = copy.deepcopy(model.state_dict())
            since_best = 0
        else:
            since_best += 1
            if since_best >= cfg.patience:
                break
    model.load_state_dict(best_state)
    model.eval()
    result.seconds = time.perf_counter() - t0
    if cfg.progress:
        print(
            f"[deepz] stopped at epoch {len(result.history)}/{cfg.epochs}, best epoch {result.best_epoch + 1} "
            f"(val {result.best_val_loss:.5f}), {_hms(result.seconds)}",
            file=sys.stderr,
            flush=True,
        )
    log.info(
        "trained %d epochs in %.1f s on %s; best epoch %d, val loss %.5f",
        len(result.history), result.seconds, device, result.best_epoch, result.best_val_loss,
    )
    return result


def _hms(seconds: float) -> str:
    """``1h02m03s`` / ``2m03s`` / ``4.1s`` for progress lines."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, sec = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s"


def predict_batched(
    model: nn.Module,
    inputs: Sequence[np.ndarray],
    device: torch.device,
    batch_size: int = 65536,
    mixed_precision: bool = False,
) -> list:
    """Run ``model`` in eval mode over ``inputs`` in batches; return the list of outputs.

    Outputs are moved to host memory; concatenate them with :func:`concat_outputs`.
    """
    model.eval()
    outs = []
    use_amp = bool(mixed_precision) and device.type in ("cuda", "cpu")
    n = len(inputs[0])
    with torch.inference_mode():
        for i in range(0, max(n, 1), batch_size):  # an empty input still gives one (empty) output
            batch = [torch.as_tensor(np.ascontiguousarray(a[i : i + batch_size])).to(device) for a in inputs]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                out = model(*batch)
            outs.append(_to_cpu_float(out))
    return outs


def fuse_linear_batchnorm(module: nn.Module) -> nn.Module:
    """Fold every ``BatchNorm1d`` that directly follows a ``Linear`` in an ``nn.Sequential``
    into that layer's weights (eval-mode inference only), in place; returns ``module``.

    A batch norm in eval mode is a fixed affine map, so ``BN(Wx + b)`` is one linear layer
    (:func:`torch.nn.utils.fusion.fuse_linear_bn_eval`): the same outputs up to float
    rounding, one pass over the activations fewer. The module is put in eval mode.
    """
    from torch.nn.utils.fusion import fuse_linear_bn_eval

    module.eval()
    for seq in [m for m in module.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            lin, bn = seq[i], seq[i + 1]
            if isinstance(lin, nn.Linear) and isinstance(bn, nn.BatchNorm1d) and bn.track_running_stats:
                seq[i] = fuse_linear_bn_eval(lin, bn)
                seq[i + 1] = nn.Identity()
    return module


def batchnorm_affine(bn: nn.BatchNorm1d) -> tuple[torch.Tensor, torch.Tensor]:
    """The eval-mode batch norm as ``x * scale + shift`` per channel: (scale, shift)."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.affine:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.affine:
        shift = shift + bn.bias
    return scale.detach(), shift.detach()


@torch.no_grad()
def fold_input_affine_(weight: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """Make ``x -> weight @ x + bias`` equal ``x -> weight @ (x * scale + shift) + bias``, in place.

    Folds a per-feature affine map (an eval-mode batch norm, :func:`batchnorm_affine`) that
    precedes a linear map (a ``Linear`` layer, an LSTM's input projection) into its weights.
    """
    bias.add_(weight @ shift.to(weight.dtype))
    weight.mul_(scale.to(weight.dtype)[None, :])


def _to_cpu_float(out):
    if isinstance(out, torch.Tensor):
        return out.float().cpu()
    if hasattr(out, "__dataclass_fields__"):
        return type(out)(**{k: _to_cpu_float(getattr(out, k)) for k in out.__dataclass_fields__})
    if isinstance(out, (list, tuple)):
        return type(out)(_to_cpu_float(o) for o in out)
    return out


def concat_outputs(outs: list):
    first = outs[0]
    if len(outs) == 1:
        return first
    if isinstance(first, torch.Tensor):
        return torch.cat(outs)
    if hasattr(first, "__dataclass_fields__"):
        return type(first)(**{k: torch.cat([getattr(o, k) for o in outs]) for k in first.__dataclass_fields__})
    raise TypeError(f"cannot concatenate outputs of type {type(first)}")
