"""Deep ensembles: M members of one method trained with different seeds, pooled into one PDF.

Lakshminarayanan, Pritzel & Blundell (2017, "Simple and scalable predictive uncertainty
estimation using deep ensembles"): M networks of the same architecture, each from its own
random initialisation and batch order (member ``m`` uses seed ``seed + m``; member 0 is the
single model of ``n_members=1``, bit for bit), optionally each on a bootstrap resample of the
training split (``bootstrap=True``; the validation split is the same for all members: early
stopping and calibration see measured data). The M predictive distributions are combined as
an equal-weight linear pool:

* Gaussian mixtures (LSTM-MDN, image CNN): the M mixtures of K components become one mixture
  of M x K components, member m's weights multiplied by its member weight (1/M by default),
  :class:`MixtureEnsemble` / :func:`pool_mixtures`;
* binned PDFs (NNC): the bin probabilities are averaged, :class:`ProbabilityPool`;
* fixed-grid mixtures (embedding MDN): every member has the same components, so the pool is
  the average of the component weights (the same mixture as the concatenation, K columns).

A linear pool of calibrated members is over-dispersed (its variance adds the spread of the
member means): NNC and the LSTM re-fit their post-hoc calibration (temperature, mixture width
factor, :mod:`rail.deepz.calibration`) on the *pooled* validation output; the embedding MDN's
width factor is optional (it narrows the fixed-grid components, not the PDF's envelope). The
pooled validation PIT KS before and after is stored in the model (``ensemble_diagnostics``).

Model files: a single model keeps ``state_dict``; an ensemble stores ``member_state_dicts``
(a list of M state dicts) and ``n_members`` and is written with format version 3
(:data:`ENSEMBLE_FORMAT_VERSION`), so that a version that cannot pool members refuses it by its
format check instead of failing on a missing key; a single model is still written (and read)
as version 2. :func:`member_state_dicts` reads both layouts
and refuses a model whose member count does not match its list.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from .stages import Option, bound

if TYPE_CHECKING:  # annotations only: torch is imported where a stage trains or estimates
    from torch import nn

#: format version of a model file holding several members (``member_state_dicts``)
ENSEMBLE_FORMAT_VERSION = 3

#: the informer options of every method that trains deep ensembles
ENSEMBLE_OPTIONS = dict(
    n_members=Option(int, 1, check=bound(">=", 1), msg="deep ensemble: number of members M trained with seeds seed + m and pooled "
                    "into one PDF (equal-weight linear pool; inference cost grows with M); 1 = a single network"),
    bootstrap=Option(bool, False, msg="deep ensemble: train each member on a bootstrap resample (with "
                    "replacement, seed + m) of the training split; the validation split is shared"),
)


class ModelMembersError(ValueError):
    """The model's members do not match what it declares (count or layout)."""


def check_n_members(n_members) -> int:
    """``n_members`` as an int >= 1, else a ValueError naming the option."""
    if isinstance(n_members, bool) or int(n_members) != n_members or n_members < 1:
        raise ValueError(f"Option 'n_members' must be an integer >= 1, got {n_members!r}")
    return int(n_members)


def member_seed(seed: int, m: int) -> int:
    """Seed of member ``m`` (member 0 = the single model's seed)."""
    return int(seed) + int(m)


def member_rows(train_idx: np.ndarray, seed: int, m: int, bootstrap: bool) -> np.ndarray:
    """Training rows of member ``m``: ``train_idx`` itself, or with ``bootstrap`` a resample of
    the same size drawn with replacement (numpy generator seeded with ``seed + m``), sorted."""
    train_idx = np.asarray(train_idx)
    if not bootstrap:
        return train_idx
    rng = np.random.default_rng(member_seed(seed, m))
    return np.sort(rng.choice(train_idx, size=len(train_idx), replace=True))


def fit_members(n_members: int, seed: int, train_idx: np.ndarray, bootstrap: bool,
                fit_one: Callable[[int, int, np.ndarray], object], log=None) -> list:
    """``[fit_one(m, seed + m, rows_m) for m in range(n_members)]`` (rows from :func:`member_rows`),
    logging each member when there are several."""
    n = check_n_members(n_members)
    out = []
    for m in range(n):
        if log is not None and n > 1:
            log.info(f"ensemble member {m + 1}/{n} (seed {member_seed(seed, m)}"
                     f"{', bootstrap resample' if bootstrap else ''})")
        out.append(fit_one(m, member_seed(seed, m), member_rows(train_idx, seed, m, bootstrap)))
    return out


def state_dict_cpu(net: nn.Module) -> dict:
    """The network's weights as detached CPU tensors (what a model file stores)."""
    return {k: v.detach().cpu() for k, v in net.state_dict().items()}


def members_payload(nets: Sequence[nn.Module], train_records: Sequence[dict] = (),
                    diagnostics: dict | None = None) -> dict:
    """Model-dict entries for the trained member networks: ``state_dict`` for one member (the
    single model's layout); for several ``member_state_dicts``, ``n_members``, each member's
    training record ``members_train``, the pooled validation ``ensemble_diagnostics`` and the
    format version :data:`ENSEMBLE_FORMAT_VERSION` (given to ``_model_dict``, it replaces the
    single-model one)."""
    sds = [state_dict_cpu(net) for net in nets]
    if len(sds) == 1:
        return {"state_dict": sds[0]}
    return {"member_state_dicts": sds, "n_members": len(sds), "format_version": ENSEMBLE_FORMAT_VERSION,
            "members_train": list(train_records), "ensemble_diagnostics": dict(diagnostics or {})}


def member_state_dicts(model: dict, who: str) -> list[dict]:
    """The members' state dicts of a model (one for a single model); refuses a model that has
    both or neither layout, or whose ``n_members`` differs from its number of state dicts."""
    has_single, has_members = "state_dict" in model, "member_state_dicts" in model
    if has_single == has_members:
        raise ModelMembersError(
            f"{who}: the model holds {'both' if has_single else 'neither'} 'state_dict' and "
            "'member_state_dicts'; it is damaged or not written by this package, retrain it")
    if has_single:
        if model.get("n_members", 1) != 1:
            raise ModelMembersError(f"{who}: the model declares n_members={model['n_members']} but holds one "
                                    "network; retrain it")
        return [model["state_dict"]]
    sds = model["member_state_dicts"]
    if not isinstance(sds, list) or len(sds) < 1 or model.get("n_members") != len(sds):
        raise ModelMembersError(
            f"{who}: the model declares n_members={model.get('n_members')!r} but holds "
            f"{len(sds) if isinstance(sds, list) else type(sds).__name__} member network(s); retrain it")
    if model.get("format_version", 0) < ENSEMBLE_FORMAT_VERSION:
        raise ModelMembersError(
            f"{who}: an ensemble model must have format version >= {ENSEMBLE_FORMAT_VERSION}, this one "
            f"says {model.get('format_version')!r}; retrain it")
    return list(sds)


def build_members(model: dict, who: str, make: Callable[[dict], nn.Module]) -> list[nn.Module]:
    """One network per member: ``make(state_dict)`` builds and loads each."""
    return [make(sd) for sd in member_state_dicts(model, who)]


# ----------------------------------------------------------------- pooling


def pool_mixtures(params: Sequence[tuple], member_weights=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """numpy twin of :class:`MixtureEnsemble` for already computed ``(w, mu, sigma)`` per member."""
    m = len(params)
    mw = np.full(m, 1.0 / m) if member_weights is None else np.asarray(member_weights)
    w = np.concatenate([p[0] * np.asarray(mw[i], dtype=p[0].dtype) for i, p in enumerate(params)], axis=1)
    return w, np.concatenate([p[1] for p in params], 1), np.concatenate([p[2] for p in params], 1)


