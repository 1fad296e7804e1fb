"""Multi-band image cutouts: validation, preprocessing and a synthetic stamp simulator.

Images travel in a table as one array column of shape (N, C, H, W): N objects, C bands
(in the order of the model's ``image_bands``), H x W pixels. Pixel values are fluxes per
pixel in any linear unit (the catalog simulator below writes nJy per pixel); the
preprocessing divides by a per-band scale fitted at inform time (a robust estimate of
the pixel noise, same unit as the pixels) and applies ``asinh``, which is linear near the
noise level and logarithmic for bright pixels.

:func:`add_synthetic_stamps` builds such a column for catalog tables without pixels
(e.g. cosmoDC2), so that image models can be exercised on them. **It uses the true
redshift** to set the galaxy size (a half-light radius shrinking with redshift): any
gain an image model draws from these stamps measures that simulated size-redshift
relation, not the value of real images.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from .photometry import FLUX_ZEROPOINTS, mag_to_flux

BAD_PIXEL_POLICIES = ("raise", "zero")
# half-light radius of an exponential profile in units of its scale length
_EXP_RE_OVER_H = 1.678347


class BadImageError(ValueError):
    """Raised when an image column cannot be used as configured."""


def validate_images(
    data: Mapping,
    column: str,
    n_bands: int,
    shape: tuple[int, int] | None = None,
    bad_pixel_policy: str = "raise",
    bands: Sequence[str] | None = None,
) -> np.ndarray:
    """Check an image column and return it as a float32 array (N, C, H, W).

    Parameters
    ----------
    data : mapping
        The table (numpyDict).
    column : str
        Name of the image column (config option ``image_col``).
    n_bands : int
        Expected number of bands C (length of ``image_bands``).
    shape : (int, int), optional
        Expected (H, W) in pixels (the model's); None accepts any.
    bad_pixel_policy : {"raise", "zero"}
        NaN/inf pixels: raise an error naming the column, or set them to 0.
    bands : list of str, optional
        Band names, only used in error messages.
    """
    if bad_pixel_policy not in BAD_PIXEL_POLICIES:
        raise ValueError(
            f"Option 'bad_pixel_policy'={bad_pixel_policy!r} is not one of {BAD_PIXEL_POLICIES}"
        )
    if column not in data:
        available = ", ".join(sorted(map(str, data.keys()))[:30])
        raise BadImageError(
            f"Image column {column!r} (option 'image_col') is not in the input table; "
            f"available columns: {available}"
        )
    arr = np.asarray(data[column])
    if arr.ndim != 4:
        raise BadImageError(
            f"Image column {column!r} must have shape (N, bands, height, width); got shape {arr.shape}"
        )
    if arr.shape[1] != n_bands:
        names = f" {list(bands)}" if bands is not None else ""
        raise BadImageError(
            f"Image column {column!r} has {arr.shape[1]} band(s) on axis 1 but {n_bands} are "
            f"expected (option 'image_bands'{names})"
        )
    if shape is not None and tuple(arr.shape[2:]) != tuple(shape):
        raise BadImageError(
            f"Image column {column!r} has {arr.shape[2]}x{arr.shape[3]} pixel stamps but the model "
            f"was trained on {shape[0]}x{shape[1]}; cut the stamps to that size"
        )
    if not np.issubdtype(arr.dtype, np.floating):
        raise BadImageError(
            f"Image column {column!r} has dtype {arr.dtype}; pixel values must be floating point "
            "(linear flux units)"
        )
    arr = arr.astype(np.float32, copy=False)
    bad = ~np.isfinite(arr)
    if bad.any():
        if bad_pixel_policy == "raise":
            rows = np.flatnonzero(bad.any(axis=(1, 2, 3)))
            raise BadImageError(
                f"Image column {column!r} has {int(bad.sum())} NaN/inf pixel(s) in {rows.size} "
                f"object(s) (first rows: {rows[:5].tolist()}); set bad_pixel_policy='zero' to "
                "replace them by 0"
            )
        arr = np.where(bad, np.float32(0.0), arr)
    return arr


def fit_image_scale(images: np.ndarray) -> np.ndarray:
    """Per-band pixel scale (C,) in the pixels' unit: robust noise level of the images.

    1.4826 x the median absolute deviation of all pixels of a band (the noise of
    background-dominated stamps); falls back to the standard deviation, then to 1.
    """
    x = np.asarray(images, dtype=np.float32)
    flat = np.moveaxis(x, 1, 0).reshape(x.shape[1], -1)
    med = np.median(flat, axis=1, keepdims=True)
    scale = 1.4826 * np.median(np.abs(flat - med), axis=1)
    std = flat.std(axis=1)
    scale = np.where(scale > 0, scale, std)
    scale = np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)
    return scale.astype(np.float64)


def preprocess_images(images: np.ndarray, scale: Sequence[float], colors: bool = False) -> np.ndarray:
    """``asinh(pixels / scale)`` per band, optionally followed by colour channels.

    Parameters
    ----------
    images : ndarray (N, C, H, W)
        Pixel fluxes (linear unit, as at inform time).
    scale : sequence of float (C,)
        Per-band scale from :func:`fit_image_scale` (same unit as the pixels).
    colors : bool
        Append C-1 colour images ``asinh(x_b/s_b) - asinh(x_{b+1}/s_{b+1})``: for pixels well
        above the noise this is the log of the adjacent-band flux ratio (a colour map, as
        PICZL builds colour images), and it stays finite at zero flux.

    Returns
    -------
    ndarray (N, C or 2C-1, H, W), float32
    """
    s = np.asarray(scale, dtype=np.float32)[None, :, None, None]
    a = np.arcsinh(np.asarray(images, dtype=np.float32) / s)
    if colors and a.shape[1] > 1:
        a = np.concatenate([a, a[:, :-1] - a[:, 1:]], axis=1)
    return a.astype(np.float32, copy=False)


def n_channels(n_bands: int, colors: bool) -> int:
    """Number of network input channels for ``n_bands`` bands."""
    return 2 * n_bands - 1 if (colors and n_bands > 1) else n_bands


# ----------------------------------------------------------------------- simulator


def mag_to_njy(mags: np.ndarray) -> np.ndarray:
    """AB magnitudes -> flux in nJy; non-finite or >= 50 mag (non-detections) -> 0."""
    m = np.asarray(mags, dtype=np.float64)
    ok = np.isfinite(m) & (m < 50.0)
    return np.where(ok, mag_to_flux(np.where(ok, m, 0.0), FLUX_ZEROPOINTS["nJy"]), 0.0)


def pixel_noise_njy(mag_limit: float, psf_fwhm: float) -> float:
    """Per-pixel noise sigma (nJy) for a 5-sigma point-source depth ``mag_limit`` (AB).

    Background-limited: a point source of flux F_lim is detected at 5 sigma in an optimal
    (PSF-weighted) aperture of effective area 4 pi sigma_psf^2 pixels, so
    sigma_pix = F_lim / 5 / sqrt(4 pi sigma_psf^2). ``psf_fwhm`` in pixels.
    """
    sig_psf = psf_fwhm / 2.3548
    return float(mag_to_njy(np.array([mag_limit]))[0] / 5.0 / np.sqrt(4 * np.pi * sig_psf**2))


def exponential_stamps(
    half_light_radius: np.ndarray,
    size: int = 16,
    psf_fwhm: float = 3.5,
    pad_factor: int = 4,
    chunk: int = 512,
) -> np.ndarray:
    """Unit-flux, PSF-convolved, pixel-integrated circular exponential profiles (N, size, size).

    Computed in Fourier space (vectorised over objects): the exponential disk of scale
    length h has transform (1 + (2 pi h k)^2)^(-3/2), the Gaussian PSF exp(-2 pi^2 sigma^2 k^2),
    pixel integration sinc(kx) sinc(ky). The profile is centred on the stamp centre on a
    periodic box ``pad_factor`` x larger than the stamp, then cropped, so each stamp sums to
    the fraction of the light falling inside it (< 1 for large galaxies).

    Parameters
    ----------
    half_light_radius : ndarray (N,)
        Intrinsic (pre-PSF) half-light radius in pixels.
    size : int
        Stamp side in pixels.
    psf_fwhm : float
        FWHM of the Gaussian PSF in pixels.
    """
    re = np.asarray(half_light_radius, dtype=np.float64)
    p = int(pad_factor * size)
    k = np.fft.fftfreq(p)  # cycles / pixel
    kx, ky = np.meshgrid(k, k, indexing="xy")
    k2 = kx**2 + ky**2
    sig_psf = psf_fwhm / 2.3548
    common = np.exp(-2 * np.pi**2 * sig_psf**2 * k2) * np.sinc(kx) * np.sinc(ky)
    # centre at (c, c) with c = (p - 1) / 2 so that the crop below is centred
    c = (p - 1) / 2.0
    phase = np.exp(-2j * np.pi * (kx + ky) * c)
    lo = (p - size) // 2
    out = np.empty((re.size, size, size), dtype=np.float32)
    for i in range(0, re.size, chunk):
        h = (re[i : i + chunk] / _EXP_RE_OVER_H)[:, None, None]
        ft = (1.0 + (2 * np.pi * h) ** 2 * k2[None]) ** -1.5 * (common * phase)[None]
        img = np.fft.ifft2(ft).real
        out[i : i + chunk] = img[:, lo : lo + size, lo : lo + size]
    return out


def synthetic_stamps(
    mags: np.ndarray,
    z: np.ndarray,
    mag_limits: Sequence[float],
    size: int = 16,
    seed: int = 0,
    re0: float = 3.0,
    size_scatter: float = 0.1,
    psf_fwhm: float = 3.5,
    noise: bool = True,
) -> np.ndarray:
    """Simulated multi-band stamps (N, B, size, size) in nJy per pixel.

    Each object is a circular exponential profile centred on the stamp, with intrinsic
    half-light radius ``re0 / (1 + z) x 10**(size_scatter * g)`` pixels (g standard
    normal), convolved with a Gaussian PSF of FWHM ``psf_fwhm`` pixels (3.5 px = 0.7" at
    0.2"/px), with the same shape in every band and total flux per band from the catalog
    magnitude (AB -> nJy; non-detections get zero flux). With ``noise``, Gaussian pixel
    noise of each band's depth (:func:`pixel_noise_njy`, ``mag_limits`` = 5-sigma point-source
    AB depths) is added.
    """
    mags = np.asarray(mags, dtype=np.float64)
    z = np.asarray(z, dtype=np.float64)
    if mags.ndim != 2 or mags.shape[0] != z.shape[0]:
        raise ValueError(f"mags must be (N, B) and z (N,); got {mags.shape} and {z.shape}")
    if len(mag_limits) != mags.shape[1]:
        raise ValueError(f"need one mag limit per band ({mags.shape[1]}), got {len(mag_limits)}")
    rng = np.random.default_rng(seed)
    re = re0 / (1.0 + np.clip(z, 0.0, None)) * 10.0 ** (size_scatter * rng.standard_normal(z.size))
    prof = exponential_stamps(re, size=size, psf_fwhm=psf_fwhm)
    flux = mag_to_njy(mags).astype(np.float32)
    stamps = flux[:, :, None, None] * prof[:, None]
    if noise:
        sig = np.array([pixel_noise_njy(m, psf_fwhm) for m in mag_limits], dtype=np.float32)
        stamps += sig[None, :, None, None] * rng.standard_normal(stamps.shape, dtype=np.float32)
    return stamps


def add_synthetic_stamps(
    table: Mapping,
    bands: Sequence[str],
    mag_limits: Mapping[str, float],
    size: int = 16,
    seed: int = 0,
    redshift_col: str = "redshift",
    column: str = "images",
    **kwargs,
) -> dict:
    """Return a copy of a numpyDict ``table`` with a synthetic image column added.

    Parameters
    ----------
    table : mapping of column -> ndarray
        Must hold the magnitude columns ``bands`` (AB mag) and ``redshift_col``.
    bands : list of str
        Magnitude columns, one image band each, in that order.
    mag_limits : dict
        5-sigma point-source depth (AB mag) per band column (e.g. ``lsst_def_maglims``).
    size : int
        Stamp side in pixels.
    seed : int
        Seed of the size scatter and the pixel noise.
    column : str
        Name of the new column, shape (N, len(bands), size, size), nJy per pixel.
    **kwargs
        Passed to :func:`synthetic_stamps` (``re0``, ``size_scatter``, ``psf_fwhm``, ``noise``).
    """
    missing = [b for b in [*bands, redshift_col] if b not in table]
    if missing:
        raise KeyError(f"add_synthetic_stamps: table has no column(s) {missing}")
    nolim = [b for b in bands if b not in mag_limits]
    if nolim:
        raise KeyError(f"add_synthetic_stamps: no mag_limits entry for band(s) {nolim}")
    mags = np.stack([np.asarray(table[b], dtype=np.float64) for b in bands], axis=1)
    stamps = synthetic_stamps(mags, np.asarray(table[redshift_col]), [mag_limits[b] for b in bands],
                              size=size, seed=seed, **kwargs)
    out = dict(table)
    out[column] = stamps
    return out


# ------------------------------------------------- PICZL's band-first image files


def read_band_first_stack(path, bands: Sequence[str], n_objects: int, size: int | None = None) -> np.ndarray:
    """Read one of PICZL's image files and return it object-first, float32 (N, B, H, W).

    PICZL (Roster et al. 2024; its ``demo_data`` folders) stores each image product as a
    NumPy ``.npy`` array of shape (B, N, H, W): bands first, then objects. Object (pickled)
    arrays are refused (``allow_pickle=False``).

    Parameters
    ----------
    path : path-like
        The ``.npy`` file.
    bands : list of str
        Band names along axis 0 (their count is checked; used in error messages).
    n_objects : int
        Rows of the catalogue the images belong to (checked against axis 1).
    size : int, optional
        Expected stamp side in pixels (PICZL: 23); None accepts any square stamp.
    """
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} not found (bands {list(bands)})")
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as err:
        raise BadImageError(f"image file {path} is not a plain numeric array ({err})") from err
    if arr.ndim != 4:
        raise BadImageError(f"image file {path} must have shape (bands, objects, height, width); got {arr.shape}")
    if arr.shape[0] != len(bands):
        raise BadImageError(f"image file {path} has {arr.shape[0]} band(s) on axis 0 but {len(bands)} are "
                            f"expected ({list(bands)})")
    if arr.shape[1] != n_objects:
        raise BadImageError(f"image file {path} has {arr.shape[1]} object(s) on axis 1 but the catalogue has "
                            f"{n_objects} row(s)")
    h, w = arr.shape[2:]
    if h != w or (size is not None and h != size):
        want = f"{size}x{size}" if size is not None else "square"
        raise BadImageError(f"image file {path} has {h}x{w} pixel stamps; {want} stamps are expected")
    if not np.issubdtype(arr.dtype, np.floating):
        raise BadImageError(f"image file {path} has dtype {arr.dtype}; pixel values must be floating point")
    return np.ascontiguousarray(np.moveaxis(arr, 0, 1), dtype=np.float32)
