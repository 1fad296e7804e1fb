"""Error-aware augmentation of training photometry, shared by every catalog method.

With ``augment_errors=True`` each training epoch sees a new realisation of the training
photometry: every *detected* measurement is redrawn in flux space from a Gaussian centred
on the measured flux with the catalogue's flux error (``sigma_f = f x err / 1.0857``), and
its magnitude and magnitude error are recomputed from the drawn flux (the flux error is
kept: ``err' = 1.0857 x sigma_f / f'``). Non-detections and masked values (``valid`` False)
are left exactly as they are. A draw that a catalogue would not report as a measurement
(flux <= 0, a magnitude outside ``valid_mag_range`` or fainter than the band's entry in
``mag_limits``) becomes a non-detection by the same rule as in
:func:`rail.deepz.photometry.extract_photometry`: magnitude = the band's limit, error =
``nondetect_err``, ``valid`` False; with ``missing_policy='raise'`` or a band without a limit
(where a non-detection cannot be represented) the measured value is kept for that draw.

With ``augment_depth={band: m5}`` the training photometry is degraded to a (shallower) test
depth: ``m5`` is the test data's 5-sigma point-source limiting AB magnitude of the band, whose
sky-dominated flux error is ``sigma_t = 10**(-0.4 m5) / 5`` (flux units of 10**(-0.4 m)). A
training measurement with a smaller flux error gets extra Gaussian noise of
``sqrt(sigma_t**2 - sigma_f**2)`` and the flux error ``sigma_t``, so its total noise is that of
the test survey; a measurement already noisier than ``sigma_t`` is left at its own error.
Both options together add the two draws.

The validation split (early stopping, the post-hoc calibration of each method: NNC's softmax
temperature, the mixture width factors, the embedding MDN's SOM flags, the CNN pool's member
selection) should look like the data the model will be applied to. With ``augment_depth`` it is
therefore degraded to the same depth *once*, before training (:func:`validation_at_depth`: the
depth noise only, no redraw within the errors, so it is one realisation of test-depth
photometry, like the test catalogue itself); every member and epoch sees that same copy.
Measurements of the validation split already noisier than the depth are left as they are, so
validation rows that come from the test survey (``val_mask``) stay as measured. With
``augment_errors`` alone the validation split stays measured: redrawing within the errors does
not change the depth the model is calibrated for, it would only add noise the test data lacks.

The draws come from numpy generators seeded from the stage's ``seed``: each epoch's training
draws from the member's training seed, the validation draw from an independent stream of
``seed`` (:data:`VALIDATION_STREAM`), so seeded training stays deterministic and the
validation copy is not a repeat of any training draw.

:func:`depth_from_errors` estimates the ``m5`` per band that ``augment_depth`` takes from a
(test) catalogue's own magnitudes and errors.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np

from .photometry import (
    MAG_ERR_FACTOR,
    VALID_MAG_RANGE,
    Photometry,
    flux_err_to_mag_err,
    flux_to_mag,
    mag_err_to_flux_err,
    mag_to_flux,
)
from .stages import Option


def _check_depth(name, value):
    if not isinstance(value, Mapping):
        raise ValueError(f"Option {name!r} must map band names to 5-sigma limiting magnitudes, got {value!r}")
    for band, m5 in value.items():
        if isinstance(m5, bool) or not isinstance(m5, (int, float)) or not np.isfinite(m5) \
                or not VALID_MAG_RANGE[0] < m5 < VALID_MAG_RANGE[1]:
            raise ValueError(f"Option {name!r}: band {band!r} has the limiting magnitude {m5!r}; give a finite AB "
                             f"magnitude in {VALID_MAG_RANGE}")


#: the informer options of every catalog method that resamples its training photometry
AUGMENT_OPTIONS = dict(
    augment_errors=Option(bool, False, msg="error-aware augmentation: each epoch redraws every detected training "
                          "measurement in flux space within its catalogue error (rail.deepz.augment); "
                          "non-detections untouched; the validation split stays measured; False = the measured "
                          "photometry every epoch"),
    augment_depth=Option(dict, {}, check=_check_depth, msg="degrade the training photometry to a test depth: band -> "
                         "the test data's 5-sigma limiting AB magnitude; measurements with smaller flux errors "
                         "get extra noise up to that depth's flux error each epoch, and the validation split "
                         "(early stopping, calibration) is degraded to the same depth once, seeded by 'seed' "
                         "(rail.deepz.augment); {} = off"),
)


def augment_options(note: str = "") -> dict:
    """Fresh copies of :data:`AUGMENT_OPTIONS` for a stage's ``config_options``, with ``note``
    appended to each option's help (e.g. what a method does with inputs that are not
    photometry, such as the image CNN's stamps)."""
    return {k: Option(o.dtype, o.default, fmt=o._format, required=o.required, msg=o.msg + note, check=o.check)
            for k, o in AUGMENT_OPTIONS.items()}


def check_augment_options(config, bands: Sequence[str]) -> bool:
    """Whether the stage augments; refuses an ``augment_depth`` band that is not in ``bands``."""
    depth = dict(config["augment_depth"] or {})
    unknown = [b for b in depth if b not in bands]
    if unknown:
        raise ValueError(f"Option 'augment_depth' names band(s) {unknown} that are not in 'bands' {list(bands)}")
    return bool(config["augment_errors"]) or bool(depth)


def resample_photometry(phot: Photometry, rng: np.random.Generator, settings: Mapping, *,
                        errors: bool = True, depth: Mapping[str, float] | None = None) -> Photometry:
    """One noisy realisation of ``phot`` (a new object; ``phot`` is not modified).

    ``settings`` is the stage's :func:`rail.deepz.stages.photometry_settings` (mag_limits,
    nondetect_err, missing_policy, max_mag_err, valid_mag_range); ``errors`` and ``depth`` are
    the options ``augment_errors`` and ``augment_depth`` (see the module docstring).
    """
    mags = phot.mags.astype(np.float64)
    errs = phot.errs.astype(np.float64)
    valid = phot.valid.copy()
    flux = mag_to_flux(mags)
    sig = mag_err_to_flux_err(flux, errs)
    noise = rng.standard_normal(mags.shape) * sig if errors else np.zeros_like(mags)
    new_sig = sig
    if depth:
        sig_t = np.array([mag_to_flux(float(depth[b])) / 5.0 if b in depth else 0.0 for b in phot.bands])
        new_sig = np.maximum(sig, sig_t[None, :])
        extra = np.sqrt(np.maximum(new_sig ** 2 - sig ** 2, 0.0))
        noise = noise + rng.standard_normal(mags.shape) * extra
    f_new = flux + noise
    lo, hi = (float(v) for v in settings.get("valid_mag_range", VALID_MAG_RANGE))
    limits = dict(settings.get("mag_limits", {}))
    lim = np.array([float(limits.get(b, np.inf)) for b in phot.bands])
    with np.errstate(divide="ignore", invalid="ignore"):
        m_new = np.where(f_new > 0, flux_to_mag(np.where(f_new > 0, f_new, 1.0)), np.inf)
        e_new = np.minimum(flux_err_to_mag_err(np.where(f_new > 0, f_new, 1.0), new_sig),
                           float(settings.get("max_mag_err", np.inf)))
    drawn_bad = (f_new <= 0) | (m_new <= lo) | (m_new >= hi) | (m_new > lim[None, :])
    can_flag = settings.get("missing_policy", "limit") != "raise"
    to_nondetect = valid & drawn_bad & can_flag & np.isfinite(lim)[None, :]
    redrawn = valid & ~drawn_bad
    out_m = np.where(redrawn, m_new, mags)
    out_e = np.where(redrawn, e_new, errs)
    out_m = np.where(to_nondetect, lim[None, :], out_m)
    out_e = np.where(to_nondetect, float(settings.get("nondetect_err", 1.0)), out_e)
    valid &= ~to_nondetect
    return Photometry(bands=list(phot.bands), mags=out_m.astype(np.float32), errs=out_e.astype(np.float32),
                      valid=valid)


def depth_from_errors(phot: Photometry, snr_range: Sequence[float] = (0.0, np.inf),
                      min_count: int = 20) -> dict[str, float]:
    """Each band's 5-sigma point-source limiting AB magnitude estimated from the catalogue's
    own magnitudes and errors: the ``{band: m5}`` that ``augment_depth`` takes.

    Under sky-dominated noise every object of a band has the same flux error ``sigma_f``
    and ``m5 = -2.5 log10(5 sigma_f)``. Each valid measurement gives its flux error
    ``sigma_f = f x err / 1.0857``, i.e. ``m5_i = m_i + 2.5 log10(SNR_i / 5)`` with
    ``SNR_i = 1.0857 / err_i``; the band's estimate is the median of ``m5_i`` over its valid
    measurements (``phot.valid``: non-detections are not used) whose S/N lies in the closed
    ``snr_range``. Source photon noise makes bright objects report a brighter ``m5_i``, so a
    catalogue that is not sky-limited at the bright end may want an S/N upper bound; a depth
    that varies over the footprint gives its median. A band with fewer than ``min_count``
    usable measurements raises ``ValueError`` naming it (no number is made up).
    """
    lo, hi = (float(v) for v in snr_range)
    if not 0.0 <= lo < hi:
        raise ValueError(f"snr_range {tuple(snr_range)!r} must be (low, high) with 0 <= low < high")
    errs = phot.errs.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = MAG_ERR_FACTOR / errs
        m5 = phot.mags.astype(np.float64) + 2.5 * np.log10(snr / 5.0)
    out = {}
    for j, band in enumerate(phot.bands):
        use = phot.valid[:, j] & np.isfinite(m5[:, j]) & (snr[:, j] >= lo) & (snr[:, j] <= hi)
        if use.sum() < min_count:
            raise ValueError(f"Band {band!r}: {int(use.sum())} valid measurement(s) with S/N in {(lo, hi)}, "
                             f"fewer than min_count={min_count}; cannot estimate its 5-sigma depth")
        out[band] = float(np.median(m5[use, j]))
    return out


#: spawn key of the validation draw's stream: ``SeedSequence(seed, spawn_key=(VALIDATION_STREAM,))``
#: is independent of the training draws' ``default_rng(member seed)`` for every seed
VALIDATION_STREAM = 1


def validation_at_depth(config, settings: Mapping, phot: Photometry, rows: np.ndarray,
                        make_inputs: Callable[[Photometry], list]) -> list | None:
    """The network inputs of the validation ``rows`` degraded once to the stage's
    ``augment_depth`` (None when it is off: use the measured validation inputs).

    One :func:`resample_photometry` draw with the depth noise only (``errors=False``), from a
    generator on the :data:`VALIDATION_STREAM` of the stage's ``seed``, turned into inputs by
    ``make_inputs`` (the method's feature pipeline with the scalers fitted on the measured
    training split). See the module docstring for why ``augment_errors`` alone leaves the
    validation split measured.
    """
    depth = dict(config["augment_depth"] or {})
    if not depth:
        return None
    check_augment_options(config, phot.bands)
    rng = np.random.default_rng(np.random.SeedSequence(int(config["seed"]), spawn_key=(VALIDATION_STREAM,)))
    return make_inputs(resample_photometry(phot.take(rows), rng, settings, errors=False, depth=depth))


class EpochResampler:
    """``resample(epoch) -> list of input arrays`` for :func:`rail.deepz.training.train_model`:
    a new :func:`resample_photometry` realisation of the training rows each epoch, turned into
    the method's network inputs by ``make_inputs(photometry)`` (the same feature pipeline as
    the measured photometry, with the scalers fitted on the measured training split)."""

    def __init__(self, phot: Photometry, settings: Mapping, make_inputs: Callable[[Photometry], list],
                 seed: int, errors: bool = True, depth: Mapping[str, float] | None = None):
        self.phot, self.settings, self.make_inputs = phot, dict(settings), make_inputs
        self.errors, self.depth = bool(errors), dict(depth or {})
        self.rng = np.random.default_rng(seed)

    def __call__(self, epoch: int) -> list:
        return self.make_inputs(resample_photometry(self.phot, self.rng, self.settings,
                                                    errors=self.errors, depth=self.depth))


def make_resampler(config, settings: Mapping, phot: Photometry, rows: np.ndarray, seed: int,
                   make_inputs: Callable[[Photometry], list]) -> EpochResampler | None:
    """The stage's :class:`EpochResampler` over the training ``rows`` (None when the stage does
    not augment)."""
    if not check_augment_options(config, phot.bands):
        return None
    return EpochResampler(phot.take(rows), settings, make_inputs, seed, errors=bool(config["augment_errors"]),
                          depth=dict(config["augment_depth"] or {}))
