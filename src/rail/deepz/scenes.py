"""Multi-band scene simulator and the catalog (``sep``) baseline on its pixels (after DeepDISC).

The scene estimator (:mod:`rail.estimation.algos.deepz_scene`, after Merz et al.'s
DeepDISC photo-z paper, ``deepdisc_photoz_lsst``) works on whole multi-band images in
which it must find, deblend and characterise every object. The DC2 catalogs shipped with
pz-rail-base have magnitudes and redshifts but no pixels; :func:`simulate_scenes` draws
scenes from such a catalog with GalSim, and :func:`sep_photometry` runs the classical
catalog path (detection, deblending, per-band aperture fluxes with ``sep``, the Source
Extractor library) on the same pixels, so that both paths can be compared object by object.

Two tables come out of the simulator (numpyDicts):

* **scene table**, one row per scene: ``images`` (N, C, H, W) float32 in nJy per pixel,
  ``psf_fwhm`` (N, C) arcsec, ``noise_sigma`` (N, C) nJy per pixel, ``pixel_scale`` (N,)
  arcsec per pixel, ``scene_id`` (N,).
* **truth table**, one row per drawn object: ``scene_id``; ``x``, ``y`` (pixel coordinates
  of the profile centre; pixel (0, 0) has its centre at x = y = 0; x runs along the last
  image axis); ``box`` (M, 4) = x0, y0, x1, y1 (bounding box of the footprint, half-open
  pixel ranges); ``footprint`` (M, H, W) bool and ``footprint_area``; ``redshift``; the
  catalog's magnitude columns; ``half_light_radius`` (arcsec); ``background`` (faint
  background object, see below); ``gold`` (i <= 25.3 and not background); ``blendedness``;
  ``catalog_index`` (row of the input catalog).

Definitions
-----------
footprint
    pixels where the object's own noiseless image in ``detection_band`` exceeds
    ``footprint_nsigma`` times that band's pixel noise (at least the object's peak pixel).
blendedness
    ``1 - sum_fp(own) / sum_fp(all objects)`` over the footprint, noiseless
    ``detection_band`` images: 0 for an isolated object, -> 1 when others dominate its
    footprint (the truth blendedness of the DeepDISC paper, Sec. 2).

Model of a scene (departures from DC2 coadds are deliberate simplifications)
--------------------------------------------------------------------------
* Galaxies: ``profile='bulge_disk'`` (exponential disk + de Vaucouleurs bulge of half the
  radius, bulge fraction uniform in [0, 0.6]) or ``'sersic'`` (index drawn from
  {1, 1.5, 2.5, 4}); ellipticity |e| uniform in [0, 0.6], random position angle. The same
  profile in every band (no colour gradients); band fluxes from the catalog magnitudes
  (>= 50 mag, the DC2 non-detections, are drawn with zero flux).
* Sizes (the DC2 files carry none). ``size_law='magnitude'`` (default):
  ``log10 r_e[arcsec] = -0.46 - 0.11 (i - 24) + N(0, 0.15)``, clipped to [0.05, 3] arcsec.
  It has **no redshift term**: given the i magnitude the size is independent of redshift,
  so a size carries no more redshift information than the i magnitude, which the catalog
  path measures too. ``size_law='shuffled'`` (control) draws the same sizes and then
  permutes them at random among all objects of the run: identical size distribution,
  independent of magnitude *and* redshift, so no gain of a pixel-based method over the
  catalog path can come through sizes at all.
* PSF per band: ``psf='moffat'`` (beta 3.5) or ``'kolmogorov'``; default FWHM 0.80 arcsec
  in i scaled as wavelength^-1/5 (u 0.92 ... y 0.76 arcsec).
* Noise: Gaussian, background-limited, per band, from the 5-sigma point-source depth
  ``depths`` (LSST 10-year, Ivezic et al. 2019) through
  :func:`rail.deepz.images.pixel_noise_njy`; no source Poisson noise.
* Density: the number of catalog objects per scene is uniform in ``n_objects``; a share
  ``pair_fraction`` of them is placed at ``pair_separation`` (arcsec, uniform range) from an
  earlier object of the same scene, the rest uniformly; so the share of overlapping
  objects is set by the density and ``pair_fraction`` and measured by ``blendedness``.
* Background: ``n_background`` (uniform range) extra objects per scene, copies of random
  catalog rows shifted fainter to i uniform in ``background_mag`` (colours kept), flagged
  ``background`` (never gold).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence

import numpy as np

from .images import mag_to_njy, pixel_noise_njy
from .photometry import FLUX_ZEROPOINTS, flux_err_to_mag_err, flux_to_mag

LSST_BANDS = "ugrizy"
#: 5-sigma point-source depths, LSST 10-year (Ivezic et al. 2019, ApJ 873, 111, table 1), AB
LSST_DEPTHS = {"u": 26.1, "g": 27.4, "r": 27.5, "i": 26.8, "z": 26.1, "y": 24.9}
#: effective wavelengths (Angstrom), for the PSF width scaling
LSST_WAVELENGTHS = {"u": 3671.0, "g": 4827.0, "r": 6223.0, "i": 7546.0, "z": 8691.0, "y": 9712.0}
GOLD_I_MAG = 25.3
SIZE_LAWS = ("magnitude", "shuffled")
PROFILES = ("bulge_disk", "sersic")
PSFS = ("moffat", "kolmogorov")
_SERSIC_N = (1.0, 1.5, 2.5, 4.0)


def default_psf_fwhm(i_fwhm: float = 0.80) -> dict:
    """Per-band PSF FWHM (arcsec): ``i_fwhm`` in i, scaled as wavelength^(-1/5) (Kolmogorov)."""
    return {b: float(i_fwhm * (w / LSST_WAVELENGTHS["i"]) ** -0.2) for b, w in LSST_WAVELENGTHS.items()}


class SceneInputError(ValueError):
    """A catalog, scene table or truth table cannot be used as given."""


@dataclass
class SceneConfig:
    """Parameters of :func:`simulate_scenes` (see the module docstring for the model).

    Attributes
    ----------
    size : int
        Scene side in pixels (square scenes).
    pixel_scale : float
        arcsec per pixel (LSST: 0.2).
    bands : str
        Band letters, in image-channel order.
    mag_cols : str
        Catalog magnitude column pattern, ``{band}`` replaced by the letter.
    redshift_col : str
        Catalog redshift column.
    detection_band : str
        Band of the truth footprints and blendedness.
    n_objects : (int, int)
        Catalog objects per scene, uniform integer in the closed range.
    n_background : (int, int)
        Faint background objects per scene, uniform integer in the closed range.
    background_mag : (float, float)
        i-band magnitude range of the background objects.
    pair_fraction : float
        Share of catalog objects placed close to an earlier object of the scene.
    pair_separation : (float, float)
        Separation range (arcsec) of those pairs.
    margin : float
        Centres are kept this many pixels inside the scene edges.
    size_law, profile, psf : str
        See :data:`SIZE_LAWS`, :data:`PROFILES`, :data:`PSFS`.
    psf_fwhm, depths : dict
        Per band, arcsec and 5-sigma AB magnitude.
    footprint_nsigma : float
        Footprint threshold in units of the detection band's pixel noise.
    seed : int
        Everything (catalog rows, positions, shapes, noise) follows from it.
    """

    size: int = 64
    pixel_scale: float = 0.2
    bands: str = LSST_BANDS
    mag_cols: str = "mag_{band}_lsst"
    redshift_col: str = "redshift"
    detection_band: str = "i"
    n_objects: tuple = (4, 8)
    n_background: tuple = (0, 4)
    background_mag: tuple = (25.5, 27.5)
    pair_fraction: float = 0.3
    pair_separation: tuple = (0.6, 2.0)
    margin: float = 3.0
    size_law: str = "magnitude"
    profile: str = "bulge_disk"
    psf: str = "moffat"
    psf_fwhm: dict = field(default_factory=default_psf_fwhm)
    depths: dict = field(default_factory=lambda: dict(LSST_DEPTHS))
    footprint_nsigma: float = 1.0
    seed: int = 0

    def validate(self) -> None:
        for name, choices in (("size_law", SIZE_LAWS), ("profile", PROFILES), ("psf", PSFS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"Scene option {name!r}={getattr(self, name)!r} is not one of {choices}")
        missing = [b for b in self.bands if b not in self.psf_fwhm or b not in self.depths]
        if missing:
            raise ValueError(f"Scene options 'psf_fwhm'/'depths' lack band(s) {missing}")
        if self.detection_band not in self.bands:
            raise ValueError(f"Scene option 'detection_band'={self.detection_band!r} is not in bands {self.bands!r}")
        if self.size < 8 or 2 * self.margin >= self.size:
            raise ValueError(f"Scene option 'size'={self.size} is too small for margin {self.margin}")
        lo, hi = self.n_objects
        if not 1 <= lo <= hi:
            raise ValueError(f"Scene option 'n_objects'={self.n_objects} must satisfy 1 <= min <= max")
        if not 0.0 <= self.pair_fraction <= 1.0:
            raise ValueError(f"Scene option 'pair_fraction'={self.pair_fraction} is not in [0, 1]")

    def noise_sigma(self) -> np.ndarray:
        """Per-band pixel noise (nJy per pixel), background-limited, at ``depths``."""
        return np.array([pixel_noise_njy(self.depths[b], self.psf_fwhm[b] / self.pixel_scale)
                         for b in self.bands], dtype=np.float64)


def magnitude_size_law(i_mag: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Half-light radius (arcsec) from the i magnitude only (no redshift term; module docstring)."""
    log_r = -0.46 - 0.11 * (np.asarray(i_mag, dtype=np.float64) - 24.0) + rng.normal(0.0, 0.15, np.size(i_mag))
    return np.clip(10.0 ** log_r, 0.05, 3.0)


def _catalog_arrays(catalog: Mapping, cfg: SceneConfig) -> tuple[np.ndarray, np.ndarray]:
    cols = [cfg.mag_cols.format(band=b) for b in cfg.bands]
    missing = [c for c in cols + [cfg.redshift_col] if c not in catalog]
    if missing:
        raise SceneInputError(f"Catalog lacks column(s) {missing} (options 'mag_cols', 'redshift_col')")
    mags = np.stack([np.asarray(catalog[c], dtype=np.float64) for c in cols], axis=1)
    z = np.asarray(catalog[cfg.redshift_col], dtype=np.float64)
    return mags, z


def _positions(n: int, cfg: SceneConfig, rng: np.random.Generator) -> np.ndarray:
    lo, hi = cfg.margin, cfg.size - 1 - cfg.margin
    pos = rng.uniform(lo, hi, size=(n, 2))
    paired = rng.random(n) < cfg.pair_fraction
    for k in range(1, n):  # a handful of objects per scene
        if paired[k]:
            j = rng.integers(0, k)
            sep = rng.uniform(*cfg.pair_separation) / cfg.pixel_scale
            ang = rng.uniform(0, 2 * np.pi)
            pos[k] = np.clip(pos[j] + sep * np.array([np.cos(ang), np.sin(ang)]), lo, hi)
    return pos


def _profile(galsim, r_e: float, bulge_frac: float, sersic_n: float, e: float, beta: float, profile: str):
    gsp = galsim.GSParams(folding_threshold=1e-2, maxk_threshold=3e-3)
    if profile == "bulge_disk":
        gal = galsim.Exponential(half_light_radius=r_e, gsparams=gsp).withFlux(1.0 - bulge_frac)
        if bulge_frac > 0:
            gal = gal + galsim.DeVaucouleurs(half_light_radius=0.5 * r_e, gsparams=gsp).withFlux(bulge_frac)
    else:
        gal = galsim.Sersic(n=sersic_n, half_light_radius=r_e, gsparams=gsp)
    return gal.shear(e=e, beta=beta * galsim.radians)


def _psf(galsim, fwhm: float, kind: str):
    if kind == "moffat":
        return galsim.Moffat(beta=3.5, fwhm=fwhm)
    return galsim.Kolmogorov(fwhm=fwhm)


def _add_stamp(dest: np.ndarray, stamp: np.ndarray, ix: int, iy: int) -> None:
    """Add an odd-sized stamp centred on pixel (ix, iy) to ``dest`` (H, W), clipped to it."""
    half = stamp.shape[0] // 2
    h, w = dest.shape
    y0, x0 = iy - half, ix - half
    sy0, sx0 = max(0, -y0), max(0, -x0)
    dy0, dx0 = max(0, y0), max(0, x0)
    dy1, dx1 = min(h, y0 + stamp.shape[0]), min(w, x0 + stamp.shape[1])
    if dy1 > dy0 and dx1 > dx0:
        dest[dy0:dy1, dx0:dx1] += stamp[sy0 : sy0 + dy1 - dy0, sx0 : sx0 + dx1 - dx0]


def simulate_scenes(catalog: Mapping, n_scenes: int, config: SceneConfig | None = None, **overrides):
    """Draw ``n_scenes`` multi-band scenes from ``catalog``; return ``(scenes, truth)`` numpyDicts.

    Catalog rows are drawn without replacement while they last (then with), in a random
    order: the DC2 files are sorted by redshift. Objects are drawn one by one with GalSim
    (a simulator, not an estimator: about a millisecond per object and band).
    """
    import galsim

    cfg = replace(config or SceneConfig(), **overrides)
    cfg.validate()
    if n_scenes < 1:
        raise ValueError(f"n_scenes must be >= 1, got {n_scenes}")
    mags, z = _catalog_arrays(catalog, cfg)
    ok = np.isfinite(z) & np.isfinite(mags[:, cfg.bands.index("i") if "i" in cfg.bands else 0])
    rows = np.flatnonzero(ok)
    if rows.size == 0:
        raise SceneInputError("Catalog has no row with finite redshift and i magnitude")
    rng = np.random.default_rng(cfg.seed)
    n_obj = rng.integers(cfg.n_objects[0], cfg.n_objects[1] + 1, n_scenes)
    n_bkg = rng.integers(cfg.n_background[0], cfg.n_background[1] + 1, n_scenes)
    total = int(n_obj.sum() + n_bkg.sum())
    n_main = int(n_obj.sum())
    order = rng.permutation(rows)
    pick = np.concatenate([order, rng.choice(rows, max(0, n_main - rows.size))])[:n_main]
    bkg_pick = rng.choice(rows, int(n_bkg.sum()))
    ib = cfg.bands.index("i") if "i" in cfg.bands else cfg.bands.index(cfg.detection_band)
    # per object: catalog row, magnitudes, background flag (main objects first within each scene)
    scene_of = np.repeat(np.arange(n_scenes), n_obj + n_bkg)
    is_bkg = np.concatenate([np.r_[np.zeros(a, bool), np.ones(b, bool)] for a, b in zip(n_obj, n_bkg)])
    cat_idx = np.empty(total, dtype=np.int64)
    cat_idx[~is_bkg], cat_idx[is_bkg] = pick, bkg_pick
    obj_mags = mags[cat_idx].copy()
    shift = rng.uniform(*cfg.background_mag, int(is_bkg.sum())) - obj_mags[is_bkg, ib]
    obj_mags[is_bkg] += shift[:, None]
    finite = np.isfinite(obj_mags) & (obj_mags < 50.0)
    obj_mags = np.where(finite, obj_mags, 99.0)
    r_e = magnitude_size_law(obj_mags[:, ib], rng)
    if cfg.size_law == "shuffled":
        r_e = rng.permutation(r_e)
    bulge = rng.uniform(0.0, 0.6, total)
    sersic_n = rng.choice(np.array(_SERSIC_N), total)
    ell = rng.uniform(0.0, 0.6, total)
    beta = rng.uniform(0.0, np.pi, total)
    pos = np.concatenate([_positions(a + b, cfg, rng) for a, b in zip(n_obj, n_bkg)])
    flux = mag_to_njy(obj_mags)  # (M, C) nJy
    sigma = cfg.noise_sigma()
    C, H = len(cfg.bands), cfg.size
    psfs = [_psf(galsim, cfg.psf_fwhm[b], cfg.psf) for b in cfg.bands]
    images = np.zeros((n_scenes, C, H, H), dtype=np.float32)
    own = np.zeros((total, H, H), dtype=np.float32)  # noiseless detection-band image of each object
    idet = cfg.bands.index(cfg.detection_band)
    ix, iy = np.rint(pos[:, 0]).astype(int), np.rint(pos[:, 1]).astype(int)
    offs = pos - np.stack([ix, iy], axis=1)
    max_fwhm = max(cfg.psf_fwhm[b] for b in cfg.bands)
    for k in range(total):
        gal = _profile(galsim, float(r_e[k]), float(bulge[k]), float(sersic_n[k]), float(ell[k]),
                       float(beta[k]), cfg.profile)
        half = int(np.ceil((4.0 * r_e[k] + 2.0 * max_fwhm) / cfg.pixel_scale))
        n = int(min(2 * half + 1, 2 * H + 1))
        s = scene_of[k]
        for c in range(C):
            if flux[k, c] <= 0:
                continue
            stamp = galsim.Convolve(gal, psfs[c]).withFlux(float(flux[k, c])).drawImage(
                nx=n, ny=n, scale=cfg.pixel_scale, offset=(float(offs[k, 0]), float(offs[k, 1]))
            ).array
            _add_stamp(images[s, c], stamp, ix[k], iy[k])
            if c == idet:
                _add_stamp(own[k], stamp, ix[k], iy[k])
    noiseless_det = images[:, idet].copy()
    images += (rng.standard_normal(images.shape) * sigma[None, :, None, None]).astype(np.float32)
    # footprints and blendedness, vectorised over objects
    fp = own > cfg.footprint_nsigma * sigma[idet]
    flat = own.reshape(total, -1)
    peak = flat.argmax(axis=1)
    fp.reshape(total, -1)[np.arange(total), peak] = True
    all_light = noiseless_det[scene_of]
    own_sum = np.where(fp, own, 0.0).sum(axis=(1, 2), dtype=np.float64)
    all_sum = np.where(fp, all_light, 0.0).sum(axis=(1, 2), dtype=np.float64)
    blend = np.clip(1.0 - own_sum / np.maximum(all_sum, 1e-30), 0.0, 1.0)
    rows_any, cols_any = fp.any(axis=2), fp.any(axis=1)
    y0, y1 = rows_any.argmax(axis=1), H - rows_any[:, ::-1].argmax(axis=1)
    x0, x1 = cols_any.argmax(axis=1), H - cols_any[:, ::-1].argmax(axis=1)
    scenes = {
        "scene_id": np.arange(n_scenes, dtype=np.int64),
        "images": images,
        "psf_fwhm": np.tile(np.array([cfg.psf_fwhm[b] for b in cfg.bands]), (n_scenes, 1)),
        "noise_sigma": np.tile(sigma, (n_scenes, 1)),
        "pixel_scale": np.full(n_scenes, cfg.pixel_scale),
    }
    truth = {
        "scene_id": scene_of.astype(np.int64),
        "x": pos[:, 0],
        "y": pos[:, 1],
        "box": np.stack([x0, y0, x1, y1], axis=1).astype(np.int32),
        "footprint": fp,
        "footprint_area": fp.sum(axis=(1, 2)).astype(np.int64),
        "redshift": z[cat_idx],
        "half_light_radius": r_e,
        "background": is_bkg,
        "gold": (obj_mags[:, ib] <= GOLD_I_MAG) & ~is_bkg,
        "blendedness": blend,
        "catalog_index": cat_idx,
    }
    for c, b in enumerate(cfg.bands):
        truth[cfg.mag_cols.format(band=b)] = obj_mags[:, c]
    return scenes, truth


# ------------------------------------------------------------------ table checks


def scene_images(scenes: Mapping, n_bands: int | None = None, column: str = "images",
                 bands: Sequence[str] | None = None) -> np.ndarray:
    """Validated (N, C, H, W) float32 pixels of a scene table: clear errors for mixed sizes,
    a wrong channel count and NaN/inf pixels (scenes have no 'zero' policy: a hole in a scene
    would look like sky)."""
    if column not in scenes:
        raise SceneInputError(f"Scene table has no image column {column!r}; columns: {sorted(scenes)}")
    arr = np.asarray(check_scene_sizes(scenes, column))
    if arr.ndim != 4:
        raise SceneInputError(f"Scene column {column!r} must have shape (N, bands, height, width); got {arr.shape}")
    if n_bands is not None and arr.shape[1] != n_bands:
        names = f" {list(bands)}" if bands is not None else ""
        raise SceneInputError(
            f"Scene column {column!r} has {arr.shape[1]} channel(s) but the model expects {n_bands}{names}"
        )
    if not np.issubdtype(arr.dtype, np.floating):
        raise SceneInputError(f"Scene column {column!r} has dtype {arr.dtype}; pixels must be floating point")
    arr = arr.astype(np.float32, copy=False)
    bad = ~np.isfinite(arr)
    if bad.any():
        which = np.flatnonzero(bad.any(axis=(1, 2, 3)))
        raise SceneInputError(
            f"Scene column {column!r} has {int(bad.sum())} NaN/inf pixel(s) in {which.size} scene(s) "
            f"(first rows: {which[:5].tolist()}); mask them upstream (e.g. set to the sky level)"
        )
    return arr


def check_scene_sizes(scenes: Mapping, column: str = "images"):
    """The image column, stacked when given as a list of per-scene arrays; a clear error when
    those scenes differ in size (call before any table conversion, which would fail obscurely)."""
    raw = scenes.get(column) if isinstance(scenes, Mapping) else None
    if isinstance(raw, (list, tuple)) or (isinstance(raw, np.ndarray) and raw.dtype == object):
        shapes = sorted({tuple(np.shape(a)) for a in raw})
        if len(shapes) > 1:
            raise SceneInputError(
                f"Scene table column {column!r} holds scenes of mixed sizes {shapes[:4]}; every scene of "
                "a table must have the same (bands, height, width): cut or pad them to one size"
            )
        return np.stack([np.asarray(a) for a in raw]) if len(raw) else np.zeros((0, 0, 0, 0), np.float32)
    return raw


def truth_columns(truth: Mapping, needed: Sequence[str] = ("scene_id", "x", "y")) -> None:
    """Raise naming the column when a truth table lacks scene ids or positions."""
    missing = [c for c in needed if c not in truth]
    if missing:
        raise SceneInputError(
            f"Truth table lacks column(s) {missing}: every truth row needs its scene's 'scene_id' "
            "and the pixel position 'x', 'y'"
        )


def scene_ids(scenes: Mapping, n: int, offset: int = 0) -> np.ndarray:
    """The table's ``scene_id`` column, or row numbers (plus ``offset``) when absent."""
    if "scene_id" in scenes:
        return np.asarray(scenes["scene_id"], dtype=np.int64)
    return np.arange(offset, offset + n, dtype=np.int64)


# ------------------------------------------------------------------ matching


def match_positions(det_scene, det_x, det_y, true_scene, true_x, true_y, radius: float):
    """Mutual-nearest-neighbour matching within ``radius`` pixels, scene by scene.

    Returns ``(det_to_true, true_to_det)``: for each detection the index of its truth
    object (-1: unmatched) and the reverse. A pair is matched when each is the other's
    nearest neighbour in the same scene and they lie within ``radius``; vectorised with a
    KD-tree on coordinates offset per scene so that scenes cannot match across.
    """
    from scipy.spatial import cKDTree

    det_scene, true_scene = np.asarray(det_scene, np.int64), np.asarray(true_scene, np.int64)
    nd, nt = det_scene.size, true_scene.size
    d2t, t2d = np.full(nd, -1, np.int64), np.full(nt, -1, np.int64)
    if nd == 0 or nt == 0:
        return d2t, t2d
    span = float(max(np.max(det_x), np.max(true_x), np.max(det_y), np.max(true_y))) + 10.0 * radius + 1.0
    dp = np.stack([np.asarray(det_x) + det_scene * span, np.asarray(det_y)], axis=1)
    tp = np.stack([np.asarray(true_x) + true_scene * span, np.asarray(true_y)], axis=1)
    dd, di = cKDTree(tp).query(dp, distance_upper_bound=radius)
    td, ti = cKDTree(dp).query(tp, distance_upper_bound=radius)
    ok = np.isfinite(dd)
    cand = np.flatnonzero(ok)
    mutual = cand[ti[di[cand]] == cand]
    d2t[mutual] = di[mutual]
    t2d[di[mutual]] = mutual
    return d2t, t2d


# ------------------------------------------------------------------ sep baseline


@dataclass
class SepConfig:
    """Detection and photometry settings of the catalog baseline (:func:`sep_photometry`).

    Detection runs on the inverse-variance weighted sum of ``detection_bands``, scaled to
    unit pixel noise, at ``thresh`` sigma with ``minarea`` pixels, deblended with
    ``deblend_nthresh`` / ``deblend_cont`` (Source Extractor's DEBLEND_NTHRESH /
    DEBLEND_MINCONT). Fluxes: circular apertures of ``aperture_radius`` arcsec in every
    band, with the pixels of the other objects' segments masked (sep's ``seg_id``).
    """

    detection_bands: str = "riz"
    thresh: float = 1.5
    minarea: int = 5
    deblend_nthresh: int = 32
    deblend_cont: float = 0.005
    aperture_radius: float = 1.0
    match_radius: float = 2.5
    nondetect_val: float = 99.0


def sep_photometry(scenes: Mapping, truth: Mapping | None = None, config: SepConfig | None = None,
                   bands: str = LSST_BANDS, mag_cols: str = "mag_{band}_lsst",
                   err_cols: str = "mag_err_{band}_lsst") -> dict:
    """Detect, deblend and measure every scene with sep; one row per detection (numpyDict).

    Columns: ``scene_id``, ``x``, ``y`` (pixels), the magnitude and error columns (AB;
    fluxes below 1 sigma or <= 0 get ``nondetect_val`` for both), ``flux_{band}`` /
    ``flux_err_{band}`` (nJy), ``truth_index`` (row of ``truth`` matched by
    :func:`match_positions`, -1 = none) and, when matched, the truth ``redshift``
    (NaN otherwise) so the table can train catalog estimators.
    """
    import sep

    cfg = config or SepConfig()
    img = scene_images(scenes, len(bands))
    n = img.shape[0]
    sid = scene_ids(scenes, n)
    sigma = np.asarray(scenes["noise_sigma"], dtype=np.float64) if "noise_sigma" in scenes else None
    scale = np.asarray(scenes.get("pixel_scale", np.full(n, 0.2)), dtype=np.float64)
    det_idx = [bands.index(b) for b in cfg.detection_bands]
    out: dict[str, list] = {k: [] for k in ("scene_id", "x", "y", "flux", "flux_err")}
    for s in range(n):  # sep works scene by scene
        data = img[s].astype(np.float64)
        sig = sigma[s] if sigma is not None else np.array(
            [sep.Background(np.ascontiguousarray(d)).globalrms for d in data])
        wgt = 1.0 / sig[det_idx] ** 2
        det = np.tensordot(wgt, data[det_idx], axes=1) / np.sqrt(wgt.sum())
        objs, seg = sep.extract(np.ascontiguousarray(det), cfg.thresh, err=1.0, minarea=cfg.minarea,
                                deblend_nthresh=cfg.deblend_nthresh, deblend_cont=cfg.deblend_cont,
                                segmentation_map=True)
        if len(objs) == 0:
            continue
        ids = np.arange(1, len(objs) + 1, dtype=np.int32)
        r = cfg.aperture_radius / scale[s]
        f = np.empty((len(objs), len(bands)))
        fe = np.empty_like(f)
        for c in range(len(bands)):
            f[:, c], fe[:, c], _ = sep.sum_circle(np.ascontiguousarray(data[c]), objs["x"], objs["y"], r,
                                                  err=float(sig[c]), segmap=seg.astype(np.int32), seg_id=ids)
        out["scene_id"].append(np.full(len(objs), sid[s]))
        out["x"].append(objs["x"])
        out["y"].append(objs["y"])
        out["flux"].append(f)
        out["flux_err"].append(fe)
    cat = {k: (np.concatenate(v) if v else np.zeros((0, len(bands)) if k.startswith("flux") else 0))
           for k, v in out.items()}
    flux, ferr = cat.pop("flux"), cat.pop("flux_err")
    cat["scene_id"] = cat["scene_id"].astype(np.int64)
    _add_magnitudes(cat, flux, ferr, bands, mag_cols, err_cols, cfg.nondetect_val)
    if truth is not None:
        truth_columns(truth)
        d2t, _ = match_positions(cat["scene_id"], cat["x"], cat["y"], truth["scene_id"], truth["x"],
                                 truth["y"], cfg.match_radius)
        cat["truth_index"] = d2t
        if "redshift" in truth:
            zt = np.asarray(truth["redshift"], dtype=np.float64)
            cat["redshift"] = np.where(d2t >= 0, zt[np.maximum(d2t, 0)], np.nan)
    return cat


def _add_magnitudes(cat: dict, flux: np.ndarray, ferr: np.ndarray, bands: str, mag_cols: str, err_cols: str,
                    nondetect_val: float) -> None:
    """AB magnitude / error columns (``nondetect_val`` below 1 sigma or <= 0) and the nJy flux
    columns of (M, C) aperture fluxes, added to ``cat``."""
    good = (flux > ferr) & (ferr > 0)
    zp = FLUX_ZEROPOINTS["nJy"]
    mag = np.where(good, flux_to_mag(np.where(good, flux, 1.0), zp), nondetect_val)
    err = np.where(good, flux_err_to_mag_err(np.where(good, flux, 1.0), ferr), nondetect_val)
    for c, b in enumerate(bands):
        cat[mag_cols.format(band=b)] = mag[:, c]
        cat[err_cols.format(band=b)] = err[:, c]
        cat[f"flux_{b}"] = flux[:, c]
        cat[f"flux_err_{b}"] = ferr[:, c]


def forced_photometry(scenes: Mapping, positions: Mapping, config: SepConfig | None = None,
                      bands: str = LSST_BANDS, mag_cols: str = "mag_{band}_lsst",
                      err_cols: str = "mag_err_{band}_lsst") -> dict:
    """Per-band aperture photometry at given positions (e.g. the scene network's detections).

    ``positions`` has ``scene_id``, ``x``, ``y`` (pixels); the output has one row per
    positions row, aligned with it, with the columns of :func:`sep_photometry` (magnitudes,
    errors, nJy fluxes; no detection or matching). Circular apertures of
    ``config.aperture_radius`` arcsec, with the pixels nearer to another position of the same
    scene than to this one masked (the Voronoi cells of the positions play the part of sep's
    segmentation map). This is the photometry of the two-stage path of ``benchmarks/scenes.py``:
    detections from the network, colours from the pixels at those positions, a catalog
    estimator on the colours.
    """
    import sep

    cfg = config or SepConfig()
    truth_columns(positions)
    img = scene_images(scenes, len(bands))
    n, _, h, w = img.shape
    sid = scene_ids(scenes, n)
    sigma = np.asarray(scenes["noise_sigma"], dtype=np.float64) if "noise_sigma" in scenes else None
    scale = np.asarray(scenes.get("pixel_scale", np.full(n, 0.2)), dtype=np.float64)
    p_sid = np.asarray(positions["scene_id"], dtype=np.int64)
    px, py = np.asarray(positions["x"], dtype=np.float64), np.asarray(positions["y"], dtype=np.float64)
    unknown = ~np.isin(p_sid, sid)
    if unknown.any():
        raise SceneInputError(f"{int(unknown.sum())} positions row(s) name scene_id(s) "
                              f"{np.unique(p_sid[unknown])[:5].tolist()} that are not in the scene table")
    flux = np.zeros((p_sid.size, len(bands)))
    ferr = np.zeros_like(flux)
    gy, gx = np.mgrid[0:h, 0:w]
    for s in range(n):  # sep works scene by scene
        rows = np.flatnonzero(p_sid == sid[s])
        if rows.size == 0:
            continue
        data = img[s].astype(np.float64)
        sig = sigma[s] if sigma is not None else np.array(
            [sep.Background(np.ascontiguousarray(d)).globalrms for d in data])
        d2 = (gx[None] - px[rows, None, None]) ** 2 + (gy[None] - py[rows, None, None]) ** 2
        seg = (d2.argmin(axis=0) + 1).astype(np.int32)
        ids = np.arange(1, rows.size + 1, dtype=np.int32)
        r = cfg.aperture_radius / scale[s]
        for c in range(len(bands)):
            flux[rows, c], ferr[rows, c], _ = sep.sum_circle(np.ascontiguousarray(data[c]), px[rows], py[rows], r,
                                                             err=float(sig[c]), segmap=seg, seg_id=ids)
    cat = {"scene_id": p_sid, "x": px, "y": py}
    _add_magnitudes(cat, flux, ferr, bands, mag_cols, err_cols, cfg.nondetect_val)
    return cat


def sep_mag_limits(config: SceneConfig, sep_config: SepConfig | None = None,
                   mag_cols: str = "mag_{band}_lsst") -> dict:
    """1-sigma limiting magnitude of the sep aperture per band: the ``mag_limits`` option of
    catalog estimators trained on :func:`sep_photometry` output."""
    sc = sep_config or SepConfig()
    area = np.pi * (sc.aperture_radius / config.pixel_scale) ** 2
    sig = config.noise_sigma() * np.sqrt(area)
    zp = FLUX_ZEROPOINTS["nJy"]
    return {mag_cols.format(band=b): float(flux_to_mag(s, zp)) for b, s in zip(config.bands, sig)}
