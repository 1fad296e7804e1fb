"""Unit tests of the shared building blocks in rail.deepz."""

import numpy as np
import pytest
import qp
import torch
from scipy import integrate, optimize, stats

from rail.deepz.calibration import binned_pit, fit_temperature, ks_uniform
from rail.deepz.mixtures import (
    BinnedHead,
    FixedGridMixtureHead,
    GaussianMixtureHead,
    MixtureParams,
    binned_crps,
    binned_nll,
    exp_floored,
    gaussian_basis,
    gmm_crps,
    gmm_crps_numpy,
    gmm_nll,
)
from rail.deepz.pdf import binned_ensemble, grid_summaries, mixture_ensemble, mixture_summaries
from rail.deepz.photometry import (
    FLUX_ZEROPOINTS,
    MAG_ERR_FACTOR,
    BadPhotometryError,
    check_model_bands,
    extract_photometry,
    flux_err_to_mag_err,
    flux_to_mag,
    mag_err_to_flux_err,
    mag_to_flux,
)
from rail.deepz.scaling import Standardizer
from rail.deepz.training import TrainConfig, fuse_linear_batchnorm, resolve_device, split_indices, train_model

BANDS = ["mag_g", "mag_r", "mag_i"]
ERRS = ["err_g", "err_r", "err_i"]
LIMITS = {"mag_g": 27.0, "mag_r": 26.5, "mag_i": 26.0}


def _table(n=5):
    rng = np.random.default_rng(1)
    d = {b: rng.uniform(20, 24, n) for b in BANDS}
    d.update({e: rng.uniform(0.01, 0.1, n) for e in ERRS})
    return d


# ------------------------------------------------------------------ photometry


def test_photometry_nondetect_nan_inf_replaced_by_limit():
    d = _table()
    d["mag_g"][0] = 99.0
    d["mag_r"][1] = np.nan
    d["mag_i"][2] = np.inf
    d["err_r"][3] = -1.0  # bad error -> the measurement is not used
    d["mag_i"][4] = 26.7  # fainter than the limit
    ph = extract_photometry(d, BANDS, ERRS, mag_limits=LIMITS)
    assert np.all(np.isfinite(ph.mags)) and np.all(np.isfinite(ph.errs))
    assert ph.mags[0, 0] == pytest.approx(27.0) and ph.errs[0, 0] == pytest.approx(1.0)
    assert ph.mags[1, 1] == pytest.approx(26.5)
    assert ph.mags[2, 2] == pytest.approx(26.0)
    assert ph.mags[3, 1] == pytest.approx(26.5)
    expected_invalid = {(0, 0), (1, 1), (2, 2), (3, 1), (4, 2)}
    assert {tuple(ix) for ix in np.argwhere(~ph.valid)} == expected_invalid


def test_photometry_take_slices_every_per_object_array():
    d = _table()
    d["mag_r"][1] = np.nan
    ph = extract_photometry(d, BANDS, ERRS, mag_limits=LIMITS)
    idx = np.array([3, 1, 1])
    sub = ph.take(idx)
    assert sub.bands == ph.bands and len(sub) == 3
    for key in ("mags", "errs", "valid"):
        np.testing.assert_array_equal(getattr(sub, key), getattr(ph, key)[idx])
    mask = np.zeros(len(ph), dtype=bool)
    mask[[0, 1]] = True
    np.testing.assert_array_equal(ph.take(mask).valid, ph.valid[:2])


def test_feature_blocks_list_is_what_features_accepts():
    from rail.deepz import encoders, som
    from rail.deepz.photometry import FEATURE_BLOCKS

    ph = extract_photometry(_table(), BANDS, ERRS, mag_limits=LIMITS)
    widths = {b: ph.features([b]).shape[1] for b in FEATURE_BLOCKS}
    assert widths == {"mags": 3, "colors": 2, "errors": 3, "color_errors": 2, "valid": 3}
    with pytest.raises(ValueError, match="flux"):
        ph.features(["flux"])
    assert encoders.PHOT_BLOCKS is FEATURE_BLOCKS
    assert tuple(som.PHOT_BLOCKS) == FEATURE_BLOCKS


def test_photometry_raise_policy_names_column():
    d = _table()
    d["mag_r"][2] = np.nan
    with pytest.raises(BadPhotometryError, match="mag_r"):
        extract_photometry(d, BANDS, ERRS, mag_limits=LIMITS, missing_policy="raise")


def test_photometry_missing_column_is_named():
    d = _table()
    del d["mag_i"]
    with pytest.raises(BadPhotometryError, match="'mag_i'"):
        extract_photometry(d, BANDS, ERRS, mag_limits=LIMITS)


def test_photometry_option_errors_name_the_option():
    d = _table()
    with pytest.raises(ValueError, match="missing_policy"):
        extract_photometry(d, BANDS, ERRS, mag_limits=LIMITS, missing_policy="zero")
    with pytest.raises(ValueError, match="mag_limits"):
        extract_photometry(d, BANDS, ERRS, mag_limits={"mag_g": 27.0})
    with pytest.raises(ValueError, match="err_bands"):
        extract_photometry(d, BANDS, ERRS[:2], mag_limits=LIMITS)
    with pytest.raises(ValueError, match="input_units"):
        extract_photometry(d, BANDS, ERRS, mag_limits=LIMITS, input_units="Jy")


def test_photometry_flux_units_roundtrip():
    mags = np.array([20.0, 22.5, 25.0])
    errs = np.array([0.01, 0.05, 0.2])
    for unit, zp in (("nJy", 31.4), ("nanomaggies", 22.5)):
        flux = 10 ** (-0.4 * (mags - zp))
        ferr = flux * errs / (2.5 / np.log(10))
        d = {"f": np.append(flux, -1.0), "fe": np.append(ferr, 1.0)}
        ph = extract_photometry(d, ["f"], ["fe"], mag_limits={"f": 27.0}, input_units=unit)
        np.testing.assert_allclose(ph.mags[:3, 0], mags, rtol=1e-5)
        np.testing.assert_allclose(ph.errs[:3, 0], errs, rtol=1e-4)
        assert not ph.valid[3, 0] and ph.mags[3, 0] == pytest.approx(27.0)  # flux <= 0
        f2, fe2 = ph.fluxes(unit)
        np.testing.assert_allclose(f2[:3, 0], flux, rtol=1e-4)


def _bits(a):
    return np.frombuffer(np.asarray(a).tobytes(), np.uint8), np.asarray(a).dtype


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_mag_flux_helpers_are_the_formulas_they_replaced(dtype):
    """One home for AB magnitude <-> flux: bit-for-bit the inline formulas of augment, photometry,
    scenes, images and datasets (same dtype out), and each other's inverse."""
    rng = np.random.default_rng(3)
    m = rng.uniform(10, 30, 1000).astype(dtype)
    e = rng.uniform(0.001, 2, 1000).astype(dtype)
    f = rng.lognormal(2, 3, 1000).astype(dtype)
    for zp in (0.0, *FLUX_ZEROPOINTS.values()):
        pairs = [(mag_to_flux(m, zp), 10.0 ** (-0.4 * (m - zp))), (flux_to_mag(f, zp), -2.5 * np.log10(f) + zp),
                 (flux_to_mag(f, zp), zp - 2.5 * np.log10(f))]  # datasets' former ordering
        for got, want in pairs:
            assert _bits(got)[1] == dtype
            np.testing.assert_array_equal(*(b[0] for b in (_bits(got), _bits(want))))
        np.testing.assert_allclose(flux_to_mag(mag_to_flux(m.astype(np.float64), zp), zp), m, rtol=1e-12)
    np.testing.assert_array_equal(_bits(mag_to_flux(m))[0], _bits(10.0 ** (-0.4 * m))[0])  # augment's form
    np.testing.assert_array_equal(_bits(mag_err_to_flux_err(f, e))[0], _bits(f * e / MAG_ERR_FACTOR)[0])
    for factor in (MAG_ERR_FACTOR, 2.5 / np.log(10)):  # scenes wrote 2.5 / np.log(10)
        np.testing.assert_array_equal(_bits(flux_err_to_mag_err(f, e))[0], _bits(factor * e / f)[0])
    assert MAG_ERR_FACTOR == pytest.approx(1.0857362, abs=1e-7)
    # a 5-sigma depth of m5 = a flux error of f(m5) / 5, on Python floats as augment computes it
    assert isinstance(mag_to_flux(24.0), float) and mag_to_flux(24.0) / 5.0 == 10.0 ** (-0.4 * 24.0) / 5.0
    # first-order error propagation: a 1% flux error is 0.01086 mag, and back
    np.testing.assert_allclose(flux_err_to_mag_err(f, 0.01 * f), 0.01 * MAG_ERR_FACTOR, rtol=1e-6)
    np.testing.assert_allclose(mag_err_to_flux_err(f, flux_err_to_mag_err(f, 0.01 * f)), 0.01 * f, rtol=1e-6)


def test_features_and_colors():
    d = _table()
    ph = extract_photometry(d, BANDS, ERRS, mag_limits=LIMITS)
    col, colerr = ph.colors()
    np.testing.assert_allclose(col[:, 0], d["mag_g"] - d["mag_r"], rtol=1e-5)
    np.testing.assert_allclose(colerr[:, 1], np.hypot(d["err_r"], d["err_i"]), rtol=1e-5)
    f = ph.features(["mags", "colors", "errors", "valid"])
    assert f.shape == (5, 3 + 2 + 3 + 3) and f.dtype == np.float32
    names = ph.feature_names(BANDS, ["mags", "colors", "errors", "valid"])
    assert len(names) == f.shape[1] and names[3] == "mag_g-mag_r"
    with pytest.raises(ValueError, match="feature block"):
        ph.features(["mags", "bogus"])


def test_check_model_bands():
    check_model_bands(BANDS, BANDS, "x")
    with pytest.raises(BadPhotometryError, match="trained on bands"):
        check_model_bands(BANDS, BANDS[:2], "x")


# ------------------------------------------------------------------ scaling


def test_standardizer_roundtrip_and_mask():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, (1000, 4)).astype(np.float32)
    x[:, 3] = 5.0  # constant feature
    valid = np.ones_like(x, dtype=bool)
    valid[:10, 0] = False
    x[:10, 0] = 1e6  # must not influence the fit
    s = Standardizer().fit(x, valid)
    y = s.transform(x, valid)
    assert abs(y[10:, 0].mean()) < 1e-3 and abs(y[10:, 0].std() - 1) < 1e-2
    assert np.all(y[:10, 0] == 0.0) and np.all(y[:, 3] == 0.0)
    s2 = Standardizer.from_dict(s.to_dict())
    np.testing.assert_array_equal(s2.transform(x), s.transform(x))
    with pytest.raises(ValueError, match="fitted on 4 features"):
        s.transform(x[:, :3])


# ------------------------------------------------------------------ losses


def _random_mixture(n=7, k=3, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.dirichlet(np.ones(k), n)
    mu = rng.uniform(0.2, 2.0, (n, k))
    s = rng.uniform(0.02, 0.3, (n, k))
    z = rng.uniform(0.0, 2.5, n)
    return w, mu, s, z


def test_gmm_nll_matches_scipy():
    w, mu, s, z = _random_mixture()
    params = MixtureParams(*(torch.as_tensor(a) for a in (w, mu, s)))
    got = gmm_nll(params, torch.as_tensor(z)).numpy()
    want = -np.log((w * stats.norm.pdf(z[:, None], mu, s)).sum(1))
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_gmm_crps_matches_numerical_integral():
    w, mu, s, z = _random_mixture()
    got = gmm_crps_numpy(w, mu, s, z)
    for i in range(len(z)):
        cdf = lambda x: (w[i] * stats.norm.cdf(x, mu[i], s[i])).sum()  # noqa: E731
        left = integrate.quad(lambda x: cdf(x) ** 2, -5, z[i], limit=200)[0]
        right = integrate.quad(lambda x: (1 - cdf(x)) ** 2, z[i], 8, limit=200)[0]
        assert got[i] == pytest.approx(left + right, rel=1e-6, abs=1e-9)


def test_gmm_crps_single_gaussian_closed_form():
    # CRPS(N(mu, s), z) = s [t(2Phi(t)-1) + 2phi(t) - 1/sqrt(pi)], t = (z-mu)/s (Gneiting 2005)
    mu, s, z = 1.0, 0.2, 1.3
    t = (z - mu) / s
    want = s * (t * (2 * stats.norm.cdf(t) - 1) + 2 * stats.norm.pdf(t) - 1 / np.sqrt(np.pi))
    got = gmm_crps_numpy(np.ones((1, 1)), np.full((1, 1), mu), np.full((1, 1), s), np.array([z]))
    assert got[0] == pytest.approx(want, rel=1e-10)


def test_binned_crps_equals_brute_force_step_cdf_integral():
    rng = np.random.default_rng(3)
    nb = 50
    edges = np.linspace(0, 2, nb + 1)
    centers = 0.5 * (edges[1:] + edges[:-1])
    p = rng.dirichlet(np.ones(nb) * 0.3, 4)
    z = np.array([0.013, 0.77, 1.5, 1.999])
    got = binned_crps(torch.as_tensor(p), torch.as_tensor(z), torch.as_tensor(centers), from_logits=False).numpy()
    # brute force: integrate [F(x) - H(x - z)]^2 over [c_0, c_last + dz] with the step CDF at centres
    dz = edges[1] - edges[0]
    x = np.linspace(centers[0], centers[-1] + dz, 400001)[:-1] + 0.5 * (dz * nb / 400000)
    for i in range(4):
        F = np.cumsum(p[i])[np.clip(np.searchsorted(centers, x, side="right") - 1, 0, nb - 1)]
        # eq. (2) evaluates the indicator at the bin's left point (the centre), as the paper does
        H = (centers[np.clip(np.searchsorted(centers, x, side="right") - 1, 0, nb - 1)] >= z[i]).astype(float)
        brute = np.mean((F - H) ** 2) * (nb * dz)
        assert got[i] == pytest.approx(brute, rel=1e-3, abs=1e-6)


def test_binned_nll_is_minus_log_histogram_density_at_z():
    rng = np.random.default_rng(4)
    nb = 40
    edges = np.linspace(0.0, 2.0, nb + 1)
    p = rng.dirichlet(np.ones(nb), 5)
    z = np.array([0.0, 0.051, 1.0, 1.9999, 2.5])  # the last one beyond the range: last bin
    got = binned_nll(torch.as_tensor(p), torch.as_tensor(z), torch.as_tensor(edges)).numpy()
    # the same density through scipy's histogram distribution
    from scipy.stats import rv_histogram
    for i in range(5):
        dens = rv_histogram((p[i], edges), density=False).pdf(min(z[i], edges[-1] - 1e-9))
        assert got[i] == pytest.approx(-np.log(dens), rel=1e-9)


def test_binned_crps_is_minimised_by_a_sharp_correct_pdf():
    nb = 100
    centers = torch.linspace(0.005, 0.995, nb)
    z = torch.tensor([0.503])
    sharp = torch.full((1, nb), -20.0)
    sharp[0, 50] = 20.0
    wrong = torch.full((1, nb), -20.0)
    wrong[0, 10] = 20.0
    flat = torch.zeros((1, nb))
    a, b, c = (float(binned_crps(x, z, centers)) for x in (sharp, wrong, flat))
    assert a < c < b


def test_heads_shapes_and_constraints():
    h = torch.randn(16, 8)
    g = GaussianMixtureHead(8, 5, min_sigma=1e-3, mean_init=(0, 3))
    p = g(h)
    assert p.weights.shape == (16, 5)
    torch.testing.assert_close(p.weights.sum(-1), torch.ones(16))
    assert torch.all(p.sigmas >= 1e-3)
    fg = FixedGridMixtureHead(8, 0.0, 2.0, 200, 0.0037)(h)
    assert fg.means.shape == (16, 200) and float(fg.means[0, -1]) == pytest.approx(2.0)
    assert BinnedHead(8, 30)(h).shape == (16, 30)


# ------------------------------------------------------------------ qp conversion


def test_mixture_ensemble_ancil_matches_qp():
    w, mu, s, _ = _random_mixture(n=20, k=3, seed=5)
    ens = mixture_ensemble(w, mu, s, 0.0, 3.0, 301, "mixmod")
    assert ens.gen_class.name == "mixmod"
    # point estimates are those of the PDF truncated to [zmin, zmax] and renormalised
    x = np.linspace(0.0, 3.0, 30001)
    pdf = (w[:, :, None] * stats.norm.pdf(x[None, None, :], mu[:, :, None], s[:, :, None])).sum(1)
    norm = np.trapezoid(pdf, x, axis=1)
    np.testing.assert_allclose(ens.ancil["zmean"], np.trapezoid(pdf * x, x, axis=1) / norm, atol=1e-3)
    cdf = np.cumsum(pdf, axis=1) / pdf.sum(1, keepdims=True)
    med = np.array([np.interp(0.5, c, x) for c in cdf])
    np.testing.assert_allclose(ens.ancil["zmedian"], med, atol=2e-3)
    np.testing.assert_allclose(ens.ancil["p_outside"], 1 - norm, atol=1e-4)
    inside = ens.ancil["p_outside"] < 1e-6  # untruncated mixtures: exact mean and qp's median
    assert inside.sum() >= 5
    np.testing.assert_allclose(ens.ancil["zmean"][inside], (w * mu).sum(1)[inside], atol=1e-3)
    np.testing.assert_allclose(ens.ancil["zmedian"][inside], ens.median().ravel()[inside], atol=6e-3)  # qp grid


def test_mixture_summaries_exact_for_narrow_many_component_mixtures():
    """Components far narrower than the 151-point search grid (sigma down to 0.005) and
    K = 15: quantiles, mean and std must match the exact truncated mixture, not the grid."""
    rng = np.random.default_rng(11)
    n, k, zmin, zmax = 60, 15, 0.0, 3.0
    w = rng.dirichlet(np.full(k, 0.5), n)
    mu = rng.uniform(-0.2, 3.2, (n, k))
    s = rng.uniform(0.005, 0.3, (n, k))
    ancil = mixture_summaries(w, mu, s, zmin, zmax)

    def cdf(i, x):
        return (w[i] * stats.norm.cdf((x - mu[i]) / s[i])).sum()

    for i in range(n):
        lo, hi = cdf(i, zmin), cdf(i, zmax)
        for level, key in [(0.5, "zmedian"), (0.025, "z_q2p5"), (0.84, "z_q84")]:
            ref = optimize.brentq(lambda x: (cdf(i, x) - lo) / (hi - lo) - level, zmin, zmax, xtol=1e-10)
            assert ancil[key][i] == pytest.approx(ref, abs=2e-4), (i, key)
        mean, var = stats.truncnorm.stats((zmin - mu[i]) / s[i], (zmax - mu[i]) / s[i], mu[i], s[i])
        wk = w[i] * (stats.norm.cdf((zmax - mu[i]) / s[i]) - stats.norm.cdf((zmin - mu[i]) / s[i]))
        m = (wk * mean).sum() / wk.sum()
        sd = np.sqrt((wk * (var + mean**2)).sum() / wk.sum() - m**2)
        assert ancil["zmean"][i] == pytest.approx(m, abs=1e-6)
        assert ancil["zstd"][i] == pytest.approx(sd, abs=1e-6)
        assert ancil["p_outside"][i] == pytest.approx(1 - (hi - lo), abs=1e-9)


def test_mixture_ensemble_truncates_mass_below_zero():
    w = np.array([[1.0], [1.0]])
    mu = np.array([[0.05], [1.0]])
    s = np.array([[0.1], [0.1]])
    ens = mixture_ensemble(w, mu, s, 0.0, 3.0, 301, "interp")
    assert ens.ancil["zmean"][0] > 0.05  # truncated at z = 0 -> mean pushed up
    # exact mean of a normal truncated at 0: mu + s phi(a) / (1 - Phi(a)), a = -mu/s
    a = -0.5
    assert ens.ancil["zmean"][0] == pytest.approx(0.05 + 0.1 * stats.norm.pdf(a) / stats.norm.sf(a), abs=1e-3)
    assert ens.ancil["p_outside"][0] == pytest.approx(stats.norm.cdf(-0.5), rel=1e-4)
    grid = np.linspace(0, 3, 3001)
    assert np.trapezoid(ens.pdf(grid)[0], grid) == pytest.approx(1.0, abs=2e-3)
    with pytest.raises(ValueError, match="qp_representation"):
        mixture_ensemble(w, mu, s, 0.0, 3.0, 301, "bogus")


def test_binned_ensemble_matches_qp_and_is_exact_hist():
    rng = np.random.default_rng(2)
    p = rng.dirichlet(np.ones(40), 50).astype(np.float32)
    edges = np.linspace(0, 2, 41)
    ens = binned_ensemble(p, edges)
    assert ens.gen_class.name == "hist"
    centers = 0.5 * (edges[1:] + edges[:-1])
    p64 = p.astype(np.float64)
    # exact moments and quantiles of a piecewise-constant PDF
    np.testing.assert_allclose(ens.ancil["zmean"], p64 @ centers, atol=1e-6)
    var = p64 @ (centers**2 + (edges[1] - edges[0]) ** 2 / 12) - (p64 @ centers) ** 2
    np.testing.assert_allclose(ens.ancil["zstd"], np.sqrt(var), atol=1e-5)
    cdf = np.concatenate([np.zeros((50, 1)), np.cumsum(p64, 1)], 1)
    np.testing.assert_allclose(ens.ancil["zmedian"], [np.interp(0.5, c, edges) for c in cdf], atol=1e-6)
    np.testing.assert_allclose(ens.ancil["z_q2p5"], [np.interp(0.025, c, edges) for c in cdf], atol=1e-6)
    # and qp agrees to its own grid accuracy
    np.testing.assert_allclose(ens.ancil["zmedian"], ens.median().ravel(), atol=5e-4)
    np.testing.assert_allclose(ens.pdf(centers), p / (edges[1] - edges[0]), rtol=1e-5)
    np.testing.assert_allclose(ens.ancil["zmode"], centers[np.argmax(p, 1)])


def test_binned_window_mode_against_brute_force():
    rng = np.random.default_rng(5)
    nb = 120
    edges = np.linspace(0, 3, nb + 1)  # dz = 0.025
    centers = 0.5 * (edges[1:] + edges[:-1])
    p = rng.dirichlet(np.ones(nb) * 0.2, 200)
    # a spike beside a broad bump: the single-bin mode is the spike, the window mode the bump
    p[0] = 0.0
    p[0, 10] = 0.2
    tri = 6.0 - np.abs(np.arange(60, 71) - 65.0)
    p[0, 60:71] = 0.8 * tri / tri.sum()  # peaks at bin 65, every bin below the spike
    p[1] = 0.0
    p[1, 0:3] = [0.5, 0.3, 0.2]  # mass against zmin: window cut by the edge, compared per bin
    ens = binned_ensemble(p, edges, mode_window=0.125)  # 5 bins
    half = 2
    want = []
    for row in p:
        means = [row[max(i - half, 0):i + half + 1].mean() for i in range(nb)]
        want.append(centers[int(np.argmax(means))])
    np.testing.assert_allclose(ens.ancil["zmode"], want, atol=1e-12)
    assert ens.ancil["zmode"][0] == pytest.approx(centers[65])
    assert ens.ancil["zmode"][1] == pytest.approx(centers[0])
    # a window wider than the range: the widest that fits (here 119 bins)
    wide = binned_ensemble(p[:3], edges, mode_window=10.0).ancil["zmode"]
    assert np.all(np.isfinite(wide)) and np.all((wide > 0) & (wide < 3))
    # windows narrower than two bins: the most probable bin
    np.testing.assert_allclose(binned_ensemble(p, edges, mode_window=0.02).ancil["zmode"], centers[np.argmax(p, 1)])


def test_smoothed_mode_follows_the_bulk_and_lands_between_centres():
    from scipy.ndimage import gaussian_filter1d

    edges = np.linspace(0.0, 3.0, 601)  # bins of 0.005
    centers = 0.5 * (edges[1:] + edges[:-1])
    h = edges[1] - edges[0]
    mus = np.array([0.4123, 1.0, 2.2071])  # off-centre, on a centre, off-centre
    p = np.diff(stats.norm.cdf(edges[None, :], mus[:, None], 0.05), axis=1)
    p[:, 50] += 0.06  # a one-bin spike at z = 0.2525 above the bulk's peak bin (0.04 of the mass)
    p /= p.sum(1, keepdims=True)
    assert np.all(centers[np.argmax(p, 1)] == centers[50])  # the raw mode is the spike
    zm = binned_ensemble(p, edges, mode_smoothing=0.03).ancil["zmode"]
    # the bulk, smoothed: a Gaussian of width hypot(0.05, 0.03) centred on mu (plus a small pull of the
    # spike's smoothed tail); located between centres, far better than the half-bin of a centre
    assert np.all(np.abs(zm - mus) < 0.1 * h)
    # the same as a Gaussian filter of the PDF on a 50x finer grid, to the fine grid's step
    fine = np.linspace(0.0, 3.0, 30001)
    dens = p[:, np.clip(np.searchsorted(edges, fine, side="right") - 1, 0, 599)] / h
    ref = fine[np.argmax(gaussian_filter1d(dens, 0.03 / (fine[1] - fine[0]), axis=1, mode="constant"), axis=1)]
    np.testing.assert_allclose(zm, ref, atol=2 * (fine[1] - fine[0]))
    with pytest.raises(ValueError, match="cannot both"):
        binned_ensemble(p, edges, mode_window=0.06, mode_smoothing=0.03)
    with pytest.raises(ValueError, match="evenly spaced"):
        binned_ensemble(p[:, :3] + 0.1, np.array([0.0, 0.1, 0.3, 0.4]), mode_smoothing=0.03)


def test_grid_summaries_of_a_gaussian():
    z = np.linspace(0, 2, 2001)
    pdf = stats.norm.pdf(z, 1.0, 0.1)[None, :]
    out = grid_summaries(pdf, z)
    assert out["zmean"][0] == pytest.approx(1.0, abs=1e-4)
    assert out["zmedian"][0] == pytest.approx(1.0, abs=1e-4)
    assert out["zstd"][0] == pytest.approx(0.1, abs=1e-4)
    assert out["z_q16"][0] == pytest.approx(1.0 - 0.0994, abs=1e-3)


# ------------------------------------------------------------------ calibration


def test_binned_pit_and_ks():
    edges = np.linspace(0, 1, 11)
    p = np.full((1, 10), 0.1)
    assert binned_pit(p, edges, np.array([0.35]))[0] == pytest.approx(0.35)
    assert ks_uniform(np.linspace(0.005, 0.995, 100)) == pytest.approx(0.005, abs=1e-9)
    assert ks_uniform(np.full(10, 0.5)) == pytest.approx(0.5)


def test_fit_temperature_recovers_known_broadening():
    # truth drawn from softmax(l / 1), model reports l * 2 (over-confident): best T ~ 2
    rng = np.random.default_rng(0)
    n, nb = 4000, 50
    edges = np.linspace(0, 1, nb + 1)
    centers = 0.5 * (edges[1:] + edges[:-1])
    mu = rng.uniform(0.3, 0.7, n)
    true_logits = -0.5 * ((centers[None, :] - mu[:, None]) / 0.08) ** 2
    probs = np.exp(true_logits) / np.exp(true_logits).sum(1, keepdims=True)
    cum = probs.cumsum(1)
    k = (rng.random(n)[:, None] > cum).sum(1)
    z = edges[k] + rng.random(n) * (edges[1] - edges[0])
    for objective in ("pit_ks", "nll"):
        t = fit_temperature(2.0 * true_logits, z, edges, objective)
        assert t == pytest.approx(2.0, rel=0.15), objective
    with pytest.raises(ValueError, match="temperature_objective"):
        fit_temperature(true_logits, z, edges, "bogus")


# ------------------------------------------------------------------ training loop


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))

    def forward(self, x):
        return self.net(x).squeeze(-1)


def _toy(n=600, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 2)).astype(np.float32)
    z = (0.5 + 0.3 * x[:, 0] - 0.2 * x[:, 1] ** 2).astype(np.float32)
    return x, z


def _fit(seed, **kw):
    x, z = _toy()
    torch.manual_seed(seed)
    m = _Tiny()
    cfg = TrainConfig(epochs=kw.pop("epochs", 15), batch_size=kw.pop("batch_size", 64), lr=1e-2, seed=seed, device="cpu", progress=False, **kw)
    res = train_model(m, lambda o, t: (o - t) ** 2, [x[:500]], z[:500], [x[500:]], z[500:], cfg)
    return m, res


def test_training_is_deterministic_and_learns():
    m1, r1 = _fit(7)
    m2, r2 = _fit(7)
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    assert [h["val_loss"] for h in r1.history] == [h["val_loss"] for h in r2.history]
    assert r1.history[-1]["train_loss"] < 0.5 * r1.history[0]["train_loss"]
    m3, _ = _fit(8)
    assert not all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m3.state_dict().values()))


def test_early_stopping_restores_best_weights():
    m, res = _fit(1, epochs=200, patience=3, lr_schedule="none")
    assert len(res.history) < 200
    assert len(res.history) == res.best_epoch + 1 + 3
    x, z = _toy()
    with torch.no_grad():
        val = float(((m(torch.as_tensor(x[500:])) - torch.as_tensor(z[500:])) ** 2).mean())
    assert val == pytest.approx(res.best_val_loss, rel=1e-5)


def test_onecycle_schedule_warms_up_then_decays_and_learns():
    m, res = _fit(3, epochs=20, patience=20, lr_schedule="onecycle")
    lrs = [h["lr"] for h in res.history]  # learning rate at the end of each epoch
    peak = int(np.argmax(lrs))
    assert 0 < peak < len(lrs) - 1
    assert lrs[0] < 0.2 * 1e-2 and max(lrs) == pytest.approx(1e-2, rel=0.05)
    assert all(a <= b for a, b in zip(lrs[:peak], lrs[1 : peak + 1]))
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1 :])) and lrs[-1] < 0.05 * max(lrs)
    assert len(res.history) == 20 and res.history[-1]["train_loss"] < 0.5 * res.history[0]["train_loss"]


def test_a_last_batch_of_one_is_dropped_and_the_schedule_counts_the_same_batches():
    from rail.deepz.training import MIN_TRAIN_BATCH, _batch_starts

    assert list(_batch_starts(500, 499, MIN_TRAIN_BATCH)) == [0]  # 499 + 1: the 1 is dropped
    assert list(_batch_starts(500, 498, MIN_TRAIN_BATCH)) == [0, 498]
    assert list(_batch_starts(500, 499)) == [0, 499]  # evaluation keeps every object
    # one-cycle raises if stepped more often than it was told, and does not anneal to ~0 by
    # the last step if told more: it must count the kept batches (one per epoch here)
    _, res = _fit(3, epochs=6, patience=6, lr_schedule="onecycle", batch_size=499)
    assert len(res.history) == 6 and min(h["lr"] for h in res.history[:-1]) < 1e-6


def test_train_config_errors_name_the_option():
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="sgd").validate()
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="cosine").validate()
    with pytest.raises(ValueError, match="device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            resolve_device("cuda")
        assert resolve_device("auto").type == "cpu"


def test_split_indices():
    tr, va = split_indices(100, 0.2, 0)
    assert len(va) == 20 and len(set(tr) | set(va)) == 100
    tr2, va2 = split_indices(100, 0.2, 0)
    np.testing.assert_array_equal(va, va2)
    mask = np.zeros(10, bool)
    mask[[1, 5]] = True
    tr, va = split_indices(10, 0.5, 0, mask)
    assert list(va) == [1, 5]
    with pytest.raises(ValueError, match="val_fraction"):
        split_indices(10, 1.5, 0)
    with pytest.raises(ValueError, match="validation"):
        split_indices(10, 0.5, 0, np.zeros(10, bool))


def test_bin_smoother_preserves_mass_and_smooths_a_comb():
    from rail.deepz.mixtures import BinSmoother

    nb = 60
    comb = torch.zeros(2, nb)
    comb[0, 20:40:2] = 0.1  # spikes every other bin
    comb[1, 0] = 1.0  # all mass in the first bin: kernel must not leak out of range
    out = BinSmoother(nb, 2.0)(comb)
    torch.testing.assert_close(out.sum(1), torch.ones(2, dtype=out.dtype))
    assert float(out[0, 21:38].max() - out[0, 21:38].min()) < 0.01  # comb filled in
    assert torch.all(out >= 0)
    assert torch.equal(BinSmoother(nb, 0.0)(comb), comb)


def test_interp_ensemble_normalises_and_handles_rows_without_density():
    from rail.deepz.pdf import interp_ensemble

    z = np.linspace(0.0, 3.0, 301)
    pdf = np.vstack([3.0 * stats.norm.pdf(z, 1.0, 0.1), np.zeros_like(z)]).astype(np.float32)
    ens = interp_ensemble(z, pdf)
    assert ens.gen_class.name == "interp"
    y = ens.objdata["yvals"]
    np.testing.assert_allclose(np.trapezoid(y, z, axis=1), [1.0, 1.0], rtol=1e-5)
    np.testing.assert_allclose(y[1], 1.0 / 3.0)  # no density on the grid -> uniform, finite
    assert ens.cdf(np.array([1.0]))[0, 0] == pytest.approx(0.5, abs=1e-3)


def test_fuse_linear_batchnorm_keeps_eval_outputs():
    import copy

    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(7, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4), nn.BatchNorm1d(4))
    net.train()
    with torch.no_grad():
        for _ in range(5):  # non-trivial running statistics
            net(torch.randn(64, 7) * 3 + 1)
    net.eval()
    x = torch.randn(200, 7)
    with torch.no_grad():
        want = net(x)
        fused = fuse_linear_batchnorm(copy.deepcopy(net))
        got = fused(x)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in fused.modules())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_gaussian_basis_matches_scipy_without_subnormals():
    from scipy.stats import norm

    grid, centers = np.linspace(0, 3, 1201), np.linspace(0, 3, 200)
    basis = gaussian_basis(grid, centers, 0.0037).numpy()
    ref = norm.pdf(grid[None, :], centers[:, None], 0.0037)
    assert basis.dtype == np.float32 and basis.shape == (200, 1201)
    tiny = np.finfo(np.float32).tiny
    assert not np.any((basis > 0) & (basis < tiny))  # no subnormal float32 entries
    assert np.any((ref > 0) & (ref < tiny))  # which a plain float32 cast would have
    np.testing.assert_allclose(basis, ref, rtol=1e-6, atol=1e-30)


def test_exp_floored_and_crps_gradients_far_from_the_components():
    a = torch.tensor([-1e5, -100.0, -3.0, 0.5], requires_grad=True)
    y = exp_floored(a)
    v = y.detach()
    assert float(v[0]) > 0 and float(v[0]) == pytest.approx(np.exp(-80.0), rel=1e-5)
    assert float(v[2]) == pytest.approx(np.exp(-3.0), rel=1e-6)
    y.sum().backward()
    assert torch.all(torch.isfinite(a.grad)) and float(a.grad[0]) == 0.0
    # a mixture far from z: CRPS ~ |z - mu| and finite gradients
    params = MixtureParams(torch.tensor([[0.5, 0.5]]), torch.tensor([[0.1, 0.2]], requires_grad=True),
                           torch.tensor([[0.001, 0.002]]))
    crps = gmm_crps(params, torch.tensor([2.9]))
    assert float(crps.detach()) == pytest.approx(2.75 - 0.5 * 0.05, abs=1e-3)  # E|X-z| - E|X-X'|/2
    crps.sum().backward()
    assert torch.all(torch.isfinite(params.means.grad))


@pytest.mark.parametrize("even", [True, False])
def test_binned_ensemble_densities_for_even_and_uneven_bins(even):
    rng = np.random.default_rng(0)
    edges = np.linspace(0, 3, 31) if even else np.sort(np.r_[0.0, rng.uniform(0, 3, 29), 3.0])
    p = rng.dirichlet(np.ones(30), 100).astype(np.float32) * 2.0  # rows summing to 2: renormalised
    ens = binned_ensemble(p, edges, block_rows=32)
    ref = p / p.sum(1, keepdims=True) / np.diff(edges)
    np.testing.assert_allclose(ens.objdata["pdfs"], ref, rtol=1e-5)


def test_joblib_pool_is_found_warned_about_and_released():
    """FlexZBoost leaves joblib's loky pool alive, which slows torch's CPU threads: the stages
    warn about it and release_joblib_workers() shuts it down (joblib makes a new one on demand)."""
    import warnings

    joblib = pytest.importorskip("joblib")  # comes with the baselines (scikit-learn)
    Parallel, delayed = joblib.Parallel, joblib.delayed

    from rail.deepz.training import _joblib_executor, release_joblib_workers, warn_if_joblib_pool_alive

    release_joblib_workers()
    assert _joblib_executor() is None and release_joblib_workers() is False
    assert Parallel(n_jobs=2, backend="loky")(delayed(abs)(-i) for i in range(4)) == [0, 1, 2, 3]
    assert _joblib_executor() is not None
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with pytest.warns(RuntimeWarning, match="release_joblib_workers"):
            warn_if_joblib_pool_alive(torch.device("cpu"))
        torch.set_num_threads(1)  # one thread: nothing to warn about
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            warn_if_joblib_pool_alive(torch.device("cpu"))
        torch.set_num_threads(2)
        assert release_joblib_workers() is True
        assert _joblib_executor() is None and release_joblib_workers() is False
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            warn_if_joblib_pool_alive(torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    # joblib starts a new pool when asked again
    assert Parallel(n_jobs=2, backend="loky")(delayed(abs)(-i) for i in range(2)) == [0, 1]
    release_joblib_workers()
